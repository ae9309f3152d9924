"""The qtest client against a scripted fake QEMU (no QEMU needed), and vdev as a separate
process under a real QEMU."""

from __future__ import annotations

import base64
import shutil

import pytest
import trio
import trio.testing
from conftest import missing_prerequisite

from guest_driver.driver import BalloonDriver, DriverConfig
from guest_driver.guest_memory import GuestMemory as GuestPages
from lab import qemu
from lab.qtest.client import Qtest, QtestClosed, QtestError
from lab.qtest.launcher import qtest_vm
from lab.qtest.pci import BarAllocator
from lab.qtest.virtio_pci import GuestAllocator, VirtioPci
from lab.transport_qtest import QtestTransport, vhost_user_device
from lab.vdev_process import open_vdev


async def fake_qemu(stream: trio.abc.Stream, script: dict[str, list[str]]) -> None:
    """Answer each command line with the scripted lines (default ``OK``)."""
    buf = b""
    while True:
        data = await stream.receive_some(4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            cmd = line.decode()
            if cmd == "quit":
                await stream.aclose()
                return
            out = script.get(cmd.split()[0], ["OK"])
            await stream.send_all("".join(x + "\n" for x in out).encode())


async def test_replies_irq_lines_and_failures() -> None:
    with trio.fail_after(5):
        ours, theirs = trio.testing.memory_stream_pair()
        payload = bytes(range(16))
        script = {
            "irq_intercept_in": ["OK"],
            "readl": ["IRQ raise 21", "OK 0x0000000000000012", "IRQ lower 21"],
            "b64read": [f"OK {base64.b64encode(payload).decode()}"],
            "outb": ["FAIL bad port"],
        }
        async with trio.open_nursery() as n:
            n.start_soon(fake_qemu, theirs, script)
            async with Qtest.open(ours) as qt:
                assert await qt.readl(0x1000) == 0x12
                assert qt.irq_raises == 1
                assert await qt.read(0x2000, 16) == payload
                assert qt.irq_level == {21: False}  # the lower line came before this reply
                await qt.write(0x2000, payload)
                with pytest.raises(QtestError, match="bad port"):
                    await qt.outb(0x80, 1)
                assert await qt.wait_irq(1, 0.01) is False
                with pytest.raises(QtestClosed):
                    await qt.command("quit")  # QEMU went away mid-command
                with pytest.raises(QtestClosed):
                    await qt.readl(0)
                assert qt.commands == 5


def test_allocators() -> None:
    a = BarAllocator()
    assert a.take_mmio(0x4000) == 0xC000_0000
    assert a.take_mmio(0x1000) == 0xC000_4000
    assert a.take_mmio(0x4000) == 0xC000_8000
    assert a.take_io(0x40) == 0xC000
    g = GuestAllocator(start=0x1000, end=0x4000)
    assert g.alloc(10) == 0x1000 and g.alloc(10, align=16) == 0x1010
    with pytest.raises(Exception, match="exhausted"):
        g.alloc(0x4000)


@pytest.mark.qemu
async def test_vdev_as_a_separate_process() -> None:
    """``vdev serve --device vmw --target 64M`` in its own process; QEMU; our qtest guest
    inflates to the initial target and QEMU's memfd shrinks by it."""
    q = qemu.best_qemu(need_test_device=False)
    if q is None:
        missing_prerequisite("no QEMU (run scripts/setup)")
    d = q.scratch_dir("vbq-")
    sock = d / "vu.sock"
    try:
        with trio.fail_after(30):
            async with open_vdev(
                sock, device="vmw", target="64M", no_api=True, verbose=0
            ) as vdev:  # stopped on exit, by its pid
                device, vid = vhost_user_device("vmw", q)
                async with qtest_vm(q, devices=[device], chardevs={"c0": sock}, scratch=d) as vm:
                    dev = await VirtioPci.find(vm.qt, vid)
                    t = await QtestTransport.open(dev, GuestAllocator())
                    pages = GuestPages(256 * 256, kernel_pages=1024)
                    drv = BalloonDriver(t, pages, DriverConfig())
                    await vm.qt.memset(4 << 20, 96 << 20, 0x5A)
                    before = vm.memfd_bytes()
                    for _ in range(10):
                        await drv.work()
                        if drv.size and drv.size == drv.target:
                            break
                    assert drv.size == drv.target == 16384
                    assert before - vm.memfd_bytes() >= (64 << 20) - (2 << 20)
                assert vdev.alive()  # QEMU gone, vdev still serving
            assert vdev.returncode == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)
