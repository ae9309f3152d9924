"""`vdev serve` attached to a real QEMU 10 through the vhost-user-gpio-pci carrier.

qemu-interop.md's recipe: ``-device vhost-user-gpio-pci`` (2 queues, 8-byte config),
``-accel tcg -bios HLT``, qtest as the guest. The guest brings the device to DRIVER_OK and
does vmmemctl round trips (START, GET_TARGET, a batched lock that really reclaims).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio
from conftest import missing_prerequisite

from guest_driver.virtq import Buffer
from lab.qemu import QemuNotFoundError, require_qemu
from lab.qtest.launcher import qtest_vm
from lab.qtest.virtio_pci import GuestAllocator, VirtioPci
from protocol.units import PAGE_SIZE
from protocol.vmw import (
    ALL_CAPABILITIES,
    Command,
    Request,
    Response,
    Status,
    batch_entries,
    build_batch,
    entry_statuses,
)

pytestmark = pytest.mark.qemu
GPIO_DEVICE_ID = 41


@pytest.fixture
def qemu():
    try:
        return require_qemu()
    except QemuNotFoundError as exc:
        missing_prerequisite(str(exc))


async def test_qemu_round_trip(qemu, vdev_process) -> None:
    scratch = qemu.scratch_dir("vbs-")
    srv = vdev_process(target="1M")
    sock = Path(srv.paths[0])
    with trio.fail_after(60):
        async with qtest_vm(
            qemu,
            chardevs={"vb": sock},
            devices=["vhost-user-gpio-pci,chardev=vb"],
            ram_mib=128,
            scratch=scratch,
        ) as vm:
            dev = await VirtioPci.find(vm.qt, GPIO_DEVICE_ID)
            await dev.begin(1 << 32)
            mem = GuestAllocator(start=0x100000, end=0x400000)
            cmdq = await dev.setup_queue(0, 16, mem)
            await dev.setup_queue(1, 16, mem)
            await dev.driver_ok()
            assert await dev.status() & 0x4  # DRIVER_OK stuck: QEMU started the back-end
            req_gpa, resp_gpa, batch_gpa = mem.alloc(PAGE_SIZE), mem.alloc(PAGE_SIZE), 0x800000

            async def command(req: Request) -> Response:
                await vm.qt.write(req_gpa, req.build())
                head = await cmdq.add([Buffer(req_gpa, 24), Buffer(resp_gpa, 24, write=True)])
                await dev.kick(0)
                while True:
                    for elem in await dev.wait_used(0, 10):
                        if elem.id == head:
                            assert elem.len == 24
                            return Response.parse(await vm.qt.read(resp_gpa, 24))

            r = await command(Request(Command.START, int(ALL_CAPABILITIES)))
            assert r.status == Status.SUCCESS_WITH_CAPABILITIES
            assert r.capabilities == int(ALL_CAPABILITIES)
            r = await command(Request(Command.GET_TARGET, 128 * 256))
            assert (r.status, r.result) == (Status.SUCCESS, 256)

            # a real reclaim: fill 1 MiB, lock it, QEMU's memfd shrinks
            await vm.qt.memset(0x1000000, 1 << 20, 0x5A)
            await vm.qt.write(batch_gpa, bytes(PAGE_SIZE))
            before = vm.memfd_bytes()
            pfns = np.arange(0x1000, 0x1100, dtype=np.uint64)
            await vm.qt.write(batch_gpa, build_batch(pfns))
            r = await command(Request(Command.BATCHED_LOCK, batch_gpa // PAGE_SIZE, 256))
            assert r.status == Status.SUCCESS
            entries = batch_entries(await vm.qt.read(batch_gpa, 256 * 8), 256)
            assert (entry_statuses(entries) == 0).all()
            assert before - vm.memfd_bytes() == 1 << 20

            # config space goes through GET_CONFIG: num_pages = target
            assert await dev.config_read(0, 4) == 256
    assert srv.alive()
    assert srv.stop() == 0
