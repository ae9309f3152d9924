"""Our vmw driver INSIDE a real Linux guest: the guest kernel chooses the pages.

QEMU 11 (TCG) boots the Linux test guest with 512 MiB of shared memfd RAM; the balloon is
``vdev serve --device vmw`` (a child process driven through its API) behind
``vhost-user-test-device-pci,virtio-id=41``; inside, ``guest-driver run-linux`` binds the
function to ``uio_pci_generic`` and balloons pages it got from the guest kernel
(:mod:`lab.vmw_guest`). One boot, in order:

1. the guest touches its free memory once (so it is resident in the RAM file), then target
   256 MiB through the API: the guest's MemFree falls by ~256 MiB, QEMU's RssShmem and the
   RAM file's allocated bytes by ~256 MiB, vdev's size equals the driver's;
2. a process in the guest then needs 320 MiB: the driver deflates under the pressure and
   the process gets its memory without any OOM kill;
3. target 0 deflates everything;
4. page cache goes first: with the cache filled (files read over 9p) and a process holding
   64 MiB, inflating 192 MiB shrinks the cache while the process keeps its memory.

A second boot runs the conformance harness's guest-level vmw cases inside the guest
(:func:`test_conformance_cases_inside_a_linux_guest`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from lab.linux_guest import KIB, MIB, LinuxGuest, wait_until
from lab.qemu import QemuBinary
from lab.vdev_process import ApiVdev, vdev_serve
from lab.vmw_guest import (
    VmwGuestImage,
    boot_vmw_guest,
    guest_driver_stat,
    guest_level_cases,
    run_harness,
    start_driver,
)
from protocol.units import PAGES_PER_MIB

pytestmark = [pytest.mark.qemu, pytest.mark.linux_guest, pytest.mark.timeout(600)]

RAM_MIB = 512
#: the vmw cases that need nothing but a guest's cmdq (conformance/cases.py, needs=GUEST)
GUEST_LEVEL = 17


@pytest.fixture
def vmw_env(linux_env: tuple[QemuBinary, object]) -> tuple[QemuBinary, VmwGuestImage]:
    vmw = VmwGuestImage.load()
    if vmw is None:
        pytest.fail(
            "the vmw guest image is not built (scripts/setup runs python -m lab.vmw_guest build)"
        )
    return linux_env[0], vmw


@pytest.fixture
def scratch(vmw_env: tuple[QemuBinary, VmwGuestImage]) -> Iterator[Path]:
    d = vmw_env[0].scratch_dir("vbw-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def meminfo(guest: LinuxGuest) -> dict[str, int]:
    """The guest's /proc/meminfo in bytes."""
    out: dict[str, int] = {}
    for line in await guest.run("cat /proc/meminfo"):
        m = re.match(r"(\w+):\s+(\d+)", line)
        if m:
            out[m[1]] = int(m[2]) * KIB
    return out


async def driver_pages(guest: LinuxGuest) -> int:
    """The driver's balloon size (4 KiB pages), from ``guest-driver stat --json`` in the guest."""
    lines = await guest_driver_stat(guest, "--json")
    return int(json.loads("\n".join(lines))["driver"]["current"])


async def agreed(guest: LinuxGuest, vdev: ApiVdev, timeout: float = 180) -> int:
    """Wait until the driver inside and vdev hold the same balloon; its size in pages.

    Each probe of the driver is a Python process started in the guest: under TCG, with the
    guest's memory taken by a workload and the host loaded, one took ~25 s, so the deadline
    (as :func:`settled`'s) leaves room for several probes, not two."""
    with trio.fail_after(timeout):
        while True:
            size = (await vdev.vm())["size_pages"]
            if await driver_pages(guest) == size == (await vdev.vm())["size_pages"]:
                return int(size)
            await trio.sleep(0.5)


async def settled(guest: LinuxGuest, vdev: ApiVdev, pages: int, timeout: float = 180) -> dict:
    """Wait until vdev holds ``pages`` and the driver inside agrees."""
    with trio.fail_after(timeout):
        vm = await wait_until(vdev.vm, lambda v: v["size_pages"] == pages, poll=0.3)
        while await driver_pages(guest) != pages:
            await trio.sleep(0.5)
    return vm


def explain(guest: LinuxGuest, vdev: ApiVdev) -> str:
    return "\n".join(
        [
            "console tail:",
            *guest.console.lines[-40:],
            "QEMU: " + guest.stderr()[-800:],
            "vdev log: " + vdev.proc.log_tail(3000),
        ]
    )


def step(text: str) -> None:
    print(text, flush=True)


async def test_vmw_driver_inside_a_linux_guest(
    vmw_env: tuple[QemuBinary, VmwGuestImage], scratch: Path
) -> None:
    q, vmw = vmw_env
    with trio.fail_after(540):
        async with (
            vdev_serve(scratch, device="vmw", socket_name="vdev.sock") as vdev,
            boot_vmw_guest(q, vmw, vdev.socket_path, ram_mib=RAM_MIB,
                           append="vb.interval=100000") as guest,
        ):  # fmt: skip
            try:
                await start_driver(guest, ("-v", "--poll", "0.5"))
                step("driver started")
                with trio.fail_after(60):
                    vm = await wait_until(vdev.vm, lambda v: v["connected"] and v["driver_active"])
                assert vm["personality"] == "vmw"
                # Touch the guest's free memory once (a guest that has run a while), so the
                # pages the balloon takes are resident in the RAM file and their reclaim shows.
                free = (await meminfo(guest))["MemFree"]
                await guest.workload(free // MIB - 48)
                await guest.workload(0)
                before = await meminfo(guest)
                vm = await vdev.vm()
                rss0, ram0 = guest.rss_shmem_kib() * KIB, vm["ram_allocated_bytes"]

                step(
                    f"driver up; MemFree {before['MemFree'] // MIB} MiB, RssShmem {rss0 // MIB} MiB"
                )
                # 1. inflate 256 MiB
                pages = 256 * PAGES_PER_MIB
                await vdev.set_target(pages)
                vm = await settled(guest, vdev, pages)
                after = await meminfo(guest)
                dropped = before["MemFree"] - after["MemFree"]
                # ~256 MiB, plus what the driver process itself allocates while inflating
                assert 240 * MIB <= dropped <= 320 * MIB, (before, after)
                rss1 = guest.rss_shmem_kib() * KIB
                assert 230 * MIB <= rss0 - rss1 <= 290 * MIB, (rss0, rss1)
                assert 250 * MIB <= ram0 - vm["ram_allocated_bytes"] <= 262 * MIB, (ram0, vm)

                step(
                    f"1. inflated: MemFree -{dropped // MIB} MiB, RssShmem -{(rss0 - rss1) // MIB} MiB"
                )
                # 2. a process needs 320 MiB: the driver deflates, nobody is OOM-killed
                out = await guest.run(
                    "for i in $(seq 32); do dd if=/dev/zero of=/tmp/hog$i bs=1M count=10 "
                    "2>/dev/null || echo FAIL $i; sleep 0.1; done; "
                    "du -sm /tmp | cut -f1; grep oom_kill /proc/vmstat"
                )
                assert not [ln for ln in out if ln.startswith("FAIL")], out
                assert int(out[-2]) >= 320, out
                assert out[-1] == "oom_kill 0", out
                shrunk = await agreed(guest, vdev)
                assert shrunk < pages, "the driver did not deflate under pressure"
                await guest.run("rm -f /tmp/hog*")

                step(f"2. the hog got 320 MiB, no OOM kill; balloon {shrunk // PAGES_PER_MIB} MiB")
                # 3. target 0 deflates everything
                await vdev.set_target(0)
                await settled(guest, vdev, 0)

                step("3. deflated to 0")
                # 4. page cache first: fill the cache, hold 64 MiB in a process, inflate
                await guest.run("find /mnt/root/usr -type f -exec cat {} + > /dev/null 2>&1")
                held = await guest.workload(64)
                full = await meminfo(guest)
                cache0 = full["Cached"] - full["Shmem"]
                assert cache0 >= 100 * MIB, full
                await vdev.set_target(192 * PAGES_PER_MIB)
                await settled(guest, vdev, 192 * PAGES_PER_MIB)
                squeezed = await meminfo(guest)
                cache1 = squeezed["Cached"] - squeezed["Shmem"]
                assert cache0 - cache1 >= 64 * MIB, (full, squeezed)
                assert squeezed["Shmem"] >= full["Shmem"] - MIB  # the process kept its memory
                assert held == 64
                assert (await guest.run("grep oom_kill /proc/vmstat"))[-1] == "oom_kill 0"
                step(f"4. cache {cache0 // MIB} -> {cache1 // MIB} MiB, process kept {held} MiB")
                print("--- guest-driver stat --all (in the guest) ---")
                print("\n".join(await guest_driver_stat(guest, "--all")))
                await vdev.set_target(0)
                await settled(guest, vdev, 0)
            except BaseException:
                print(explain(guest, vdev), flush=True)
                raise


async def test_conformance_cases_inside_a_linux_guest(
    vmw_env: tuple[QemuBinary, VmwGuestImage], scratch: Path
) -> None:
    """The harness's guest-level vmw cases, inside the guest, over the same function the
    driver uses (``python3 -m conformance --in-guest``, one pass per target the host sets
    through vdev's API): every one passes, they are exactly the :data:`GUEST_LEVEL` cases the
    catalogue declares runnable there (none silently skipped or dropped), and vdev holds
    nothing afterwards, having counted the guest's bad PFNs. A boot of its own (~45 s), so
    that neither test's failure hides the other's result and the driver test's memory
    steps run on a guest nothing else has run in."""
    q, vmw = vmw_env
    with trio.fail_after(280):
        async with (
            vdev_serve(scratch, device="vmw", socket_name="vdev.sock") as vdev,
            boot_vmw_guest(q, vmw, vdev.socket_path, ram_mib=RAM_MIB,
                           append="vb.interval=100000") as guest,
        ):  # fmt: skip
            try:
                results = await run_harness(guest, vdev.set_target)
                print("\n".join(f"{r['case']:32} {r['outcome']:5} {r['seconds']:6.2f}s "
                                 f"{r['message']}" for r in results))  # fmt: skip
                assert [r for r in results if r["outcome"] != "pass"] == []
                names = sorted(r["case"] for r in results)
                assert names == sorted(c.name for c in guest_level_cases())
                assert len(names) == GUEST_LEVEL
                vm = await vdev.vm()
                # vdev's view: the bad PFNs were counted against the guest, and the run's
                # end (a fresh start, START(0), a reset) left it holding nothing
                assert vm["connected"] and vm["size_pages"] == 0, vm
                assert vm["failures"] > 0, vm
            except BaseException:
                print(explain(guest, vdev), flush=True)
                raise
