"""End to end with a real QEMU (TCG): vdev attached as a vhost-user device, our qtest guest.

Both personalities: handshake and DRIVER_OK, inflate and deflate (vmw: 2 MiB and 4 KiB
pages; virtio-balloon: 4 KiB PFN arrays), a target change delivered by the doorbell
(vmw eventq) or a config interrupt (virtio-balloon), QEMU's guest RAM (the memfd's blocks
and QEMU's RssShmem) dropping by the ballooned amount and coming back when the guest
touches the pages again, a guest device reset in the middle of an inflation followed by
re-initialisation, and QEMU dying in the middle of a command (vdev survives and serves the
next QEMU on the same socket).

vdev runs in-process (:func:`lab.transport_qtest.vdev_rig`): its trio tasks answer
QEMU's vhost-user messages while the guest awaits its qtest replies.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
import pytest
import trio
from conftest import missing_prerequisite

from guest_driver.driver import BalloonDriver, DriverConfig
from guest_driver.guest_memory import GuestMemory as GuestPages
from guest_driver.guest_memory import PageSize
from guest_driver.transport_virtio_pci import CMDQ
from lab import qemu
from lab.qtest.client import QtestError
from lab.qtest.launcher import QtestVm, qtest_vm
from lab.qtest.virtio_pci import GuestAllocator, VirtioPci
from lab.transport_qtest import (
    QtestTransport,
    vdev_rig,
    vhost_user_device,
)
from lab.vdev_inprocess import InProcessVdev
from lab.virtio_balloon_driver import PagePool, VirtioBalloonDriver
from protocol import virtio_balloon as vb
from protocol.errors import DeviceGone
from protocol.vmw import ALL_CAPABILITIES, Capability, Command, EventKind, Request, Response

pytestmark = pytest.mark.qemu

MIB = 1 << 20
RAM_MIB = 256
RAM_PAGES = RAM_MIB * MIB // 4096
KERNEL_PAGES = 1024  # the bottom 4 MiB: rings, buffers, the ROM holes
TOUCH = (4 * MIB, 100 * MIB)  # what the guest "uses" before ballooning
BALLOON = 16384  # 64 MiB
SLACK = 2 * MIB  # page tables, the odd page read back


def want_qemu(personality: str) -> qemu.QemuBinary:
    q = qemu.best_qemu(need_test_device=personality == "virtio-balloon")
    q = q or qemu.best_qemu(need_test_device=False)
    if q is None:
        missing_prerequisite("no QEMU (run scripts/setup)")
    return q


@contextlib.asynccontextmanager
async def guest(
    rig: InProcessVdev, q: qemu.QemuBinary, *, qmp: bool = False
) -> AsyncIterator[tuple[QtestVm, VirtioPci]]:
    device, vid = vhost_user_device(rig.personality, q)
    async with qtest_vm(
        q, devices=[device], chardevs={"c0": rig.socket_path}, scratch=rig.scratch, ram_mib=RAM_MIB,
        qmp=qmp,
    ) as vm:  # fmt: skip
        dev = await VirtioPci.find(vm.qt, vid)
        yield vm, dev


async def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)


def vmw_driver(t: QtestTransport, caps: Capability = ALL_CAPABILITIES) -> BalloonDriver:
    pages = GuestPages(RAM_PAGES, kernel_pages=KERNEL_PAGES)
    return BalloonDriver(t, pages, DriverConfig(capabilities=caps, poll_interval=0.1))


async def vmw_fill(drv: BalloonDriver, t: QtestTransport, limit: int = 50) -> None:
    """Run the work item until the balloon reached its target."""
    for _ in range(limit):
        await drv.work()
        if drv.size == drv.target:
            return
        await t.wait_event(0.05)
    raise AssertionError(f"balloon stuck at {drv.size}, target {drv.target}")


# --------------------------------------------------------------------------------- vmw


@pytest.mark.parametrize("page", ["2m", "4k"])
async def test_vmw_inflate_deflate_reclaims(page: str) -> None:
    q = want_qemu("vmw")
    caps = ALL_CAPABILITIES if page == "2m" else ALL_CAPABILITIES & ~Capability.BATCHED_2M_CMDS
    with trio.fail_after(60):
        async with vdev_rig("vmw", q) as rig, guest(rig, q) as (vm, dev):
            t = await QtestTransport.open(dev, GuestAllocator())
            drv = vmw_driver(t, Capability(caps))
            await drv.work()  # reset: START, doorbell, GUEST_ID, GET_TARGET
            view = rig.view()
            assert view.connected and view.doorbell_registered
            assert view.capabilities == caps & ~1
            await vm.qt.memset(TOUCH[0], TOUCH[1] - TOUCH[0], 0x5A)
            before, rss_before = vm.memfd_bytes(), vm.rss_shmem_kib()
            assert before >= TOUCH[1] - TOUCH[0]

            rig.set_target(BALLOON)
            assert await t.wait_event(5) == EventKind.TARGET_CHANGED
            await vmw_fill(drv, t)
            big = drv.count(PageSize.SIZE_2M)
            assert (big == BALLOON // 512) if page == "2m" else big == 0
            assert rig.view().size_pages == BALLOON
            assert await t.config() == (BALLOON, BALLOON)
            dropped = before - vm.memfd_bytes()
            assert BALLOON * 4096 - SLACK <= dropped <= BALLOON * 4096
            assert (rss_before - vm.rss_shmem_kib()) * 1024 >= BALLOON * 4096 - SLACK
            pfn = int(drv.pages(PageSize.SIZE_2M if page == "2m" else PageSize.SIZE_4K)[-1])
            assert await vm.qt.read(pfn << 12, 4096) == bytes(4096)

            rig.set_target(0)
            assert await t.wait_event(5) == EventKind.TARGET_CHANGED
            await vmw_fill(drv, t)
            assert drv.size == 0 and rig.view().size_pages == 0
            await vm.qt.memset(TOUCH[0], TOUCH[1] - TOUCH[0], 0x5A)  # the guest uses them again
            assert vm.memfd_bytes() >= before
            assert vm.rss_shmem_kib() >= rss_before


async def test_vmw_guest_reset_mid_inflation() -> None:
    """status 0 between two batches (QEMU: SET_VRING_ENABLE 0, GET_VRING_BASE), re-init
    with the rings at 0: the device forgets its balloon and tells the driver (ERROR_RESET),
    which pops its pages and starts over (vmballoon_reset); both end at the target."""
    q = want_qemu("vmw")
    with trio.fail_after(60):
        async with vdev_rig("vmw", q) as rig, guest(rig, q) as (_vm, dev):
            t = await QtestTransport.open(dev, GuestAllocator())
            drv = vmw_driver(t, Capability(ALL_CAPABILITIES & ~Capability.BATCHED_2M_CMDS))
            await drv.work()
            conn = rig.connection()
            assert conn is not None
            locks = 0
            real = t.command

            async def command(req: Request) -> Response:
                nonlocal locks
                if req.command == Command.BATCHED_LOCK:
                    locks += 1
                    if locks == 5:
                        await dev.reset()  # QEMU stops the rings (GET_VRING_BASE)
                        assert not any(qq.started for qq in conn.queues)
                        await t.init()  # re-probe: features, rings, DRIVER_OK, event buffers
                return await real(req)

            t.command = command  # type: ignore[method-assign]
            rig.set_target(BALLOON)
            await vmw_fill(drv, t)
            assert locks > 5
            assert rig.connection() is conn  # same vhost-user connection throughout
            assert rig.view().size_pages == BALLOON == drv.size
            assert conn.queues[CMDQ].started
            # the doorbell still works on the re-initialised eventq
            rig.set_target(BALLOON // 2)
            assert await t.wait_event(5) == EventKind.TARGET_CHANGED


# ----------------------------------------------------------------------- virtio-balloon

POOL = PagePool(TOUCH[0] // 4096, (TOUCH[1] - TOUCH[0]) // 4096)


def vb_driver(dev: VirtioPci) -> VirtioBalloonDriver:
    return VirtioBalloonDriver(
        dev, GuestAllocator(), PagePool(POOL.first_pfn, POOL.count), timeout=10
    )


async def test_virtio_balloon_e2e() -> None:
    q = want_qemu("virtio-balloon")
    with trio.fail_after(60):
        async with vdev_rig("virtio-balloon", q) as rig, guest(rig, q) as (vm, dev):
            drv = vb_driver(dev)
            await drv.start()
            stats = q.has_test_device
            assert drv.features & vb.Feature.DEFLATE_ON_OOM
            assert bool(drv.features & vb.Feature.STATS_VQ) == stats
            await wait_for(lambda: rig.view().connected)
            if stats:  # the first stats buffer arrived and is held
                await wait_for(lambda: rig.view().guest_stats.get("stat-total-memory", -1) > 0)
                assert rig.view().guest_stats["stat-total-memory"] == POOL.count * 4096
                assert rig.view().guest_stats["stat-oom-kills"] == -1  # not sent: missing
            await vm.qt.memset(TOUCH[0], TOUCH[1] - TOUCH[0], 0x5A)
            before, rss_before = vm.memfd_bytes(), vm.rss_shmem_kib()

            rig.set_target(BALLOON)  # -> CONFIG_CHANGE_MSG -> config interrupt (ISR bit 1)
            assert await drv.on_config_change(10) == BALLOON
            assert await drv.read_actual() == BALLOON == drv.num_pages
            view = rig.view()
            assert view.size_pages == BALLOON and view.counters["actual"] == BALLOON
            assert view.counters["inflate buffers"] == BALLOON // vb.MAX_PFNS_PER_BUFFER
            dropped = before - vm.memfd_bytes()
            assert BALLOON * 4096 - SLACK <= dropped <= BALLOON * 4096
            assert (rss_before - vm.rss_shmem_kib()) * 1024 >= BALLOON * 4096 - SLACK
            assert await vm.qt.read(drv.pages[-1] << 12, 4096) == bytes(4096)

            if stats:  # the device gives the held buffer back; the driver refills it
                assert await rig.request_stats()
                await stats_refreshed(drv)
                free = (POOL.count - BALLOON) * 4096
                await wait_for(lambda: rig.view().guest_stats["stat-free-memory"] == free)

            assert await drv.oom() == 256  # DEFLATE_ON_OOM
            assert await drv.read_actual() == BALLOON - 256
            await wait_for(lambda: rig.view().size_pages == BALLOON - 256)

            rig.set_target(0)
            assert await drv.on_config_change(10) == -(BALLOON - 256)
            assert await drv.read_actual() == 0 and rig.view().size_pages == 0
            await vm.qt.memset(TOUCH[0], TOUCH[1] - TOUCH[0], 0x5A)
            assert vm.memfd_bytes() >= before
            assert vm.rss_shmem_kib() >= rss_before


async def test_virtio_balloon_guest_reset_mid_inflation() -> None:
    q = want_qemu("virtio-balloon")
    with trio.fail_after(60):
        async with vdev_rig("virtio-balloon", q) as rig, guest(rig, q) as (_vm, dev):
            drv = vb_driver(dev)
            await drv.start()
            conn = rig.connection()
            assert conn is not None
            real = drv.fill
            calls = 0

            async def fill(num: int) -> int:
                nonlocal calls
                calls += 1
                if calls == 10:  # the VM reboots mid-inflation
                    await dev.reset()  # GET_VRING_BASE on every ring (statsq: rewound)
                    assert not any(qq.started for qq in conn.queues)
                    assert rig.view().size_pages == 9 * vb.MAX_PFNS_PER_BUFFER  # not yet
                    drv.reboot()  # the new kernel's driver: an empty balloon
                    await drv.start()  # probe: rings at 0 -> vdev forgets its balloon
                    assert rig.view().size_pages == 0
                    assert rig.view().counters["forgotten (4k)"] == 9 * vb.MAX_PFNS_PER_BUFFER
                return await real(num)

            drv.fill = fill  # type: ignore[method-assign]
            rig.set_target(BALLOON)
            await drv.on_config_change(10)
            assert calls > 10 and rig.connection() is conn
            assert drv.num_pages == BALLOON == await drv.read_actual()
            assert rig.view().size_pages == BALLOON
            if drv.has_stats:  # the stats buffer posted after re-init is held again
                await wait_for(lambda: rig.view().counters["stats held"] == 1)
                assert await rig.request_stats()
                await stats_refreshed(drv)


async def stats_refreshed(drv: VirtioBalloonDriver) -> None:
    """Serve interrupts until the driver answered one stats request."""
    with trio.fail_after(5):
        while drv.counters.stats_requests == 0:
            await drv.service(5)


async def test_virtio_balloon_stats_buffer_survives_vm_stop_cont() -> None:
    """QMP stop/cont: QEMU stops every ring (GET_VRING_BASE) while vdev holds the guest's
    only stats buffer. vdev reports the avail index rewound by one, so after ``cont`` the
    same buffer is popped again and can still be given back (reference section 6.5)."""
    q = want_qemu("virtio-balloon")
    if not q.has_test_device:
        missing_prerequisite("needs QEMU >= 10.2 (statsq)")
    with trio.fail_after(60):
        async with vdev_rig("virtio-balloon", q) as rig, guest(rig, q, qmp=True) as (vm, dev):
            assert vm.qmp is not None
            drv = vb_driver(dev)
            await drv.start()
            await wait_for(lambda: rig.view().counters["stats held"] == 1)
            conn = rig.connection()
            assert conn is not None
            await vm.qmp.execute("stop")
            await wait_for(lambda: not conn.queues[2].started)
            assert rig.view().counters["stats held"] == 0  # rewound, not lost
            await vm.qmp.execute("cont")
            await wait_for(lambda: rig.view().counters["stats held"] == 1)  # popped again
            assert await rig.request_stats()
            await stats_refreshed(drv)
            await wait_for(lambda: rig.view().counters["stats held"] == 1)  # the refill


# ----------------------------------------------------------------- QEMU dies, vdev lives


async def _vmw_session(
    rig: InProcessVdev, vm: QtestVm, dev: VirtioPci, kill_after: int | None
) -> None:
    t = await QtestTransport.open(dev, GuestAllocator())
    drv = vmw_driver(t)
    await drv.work()
    if kill_after is None:
        rig.set_target(BALLOON)
        await vmw_fill(drv, t)
        return
    _arm_kill(vm, dev, CMDQ, kill_after)
    rig.set_target(BALLOON)
    await vmw_fill(drv, t)


async def _vb_session(
    rig: InProcessVdev, vm: QtestVm, dev: VirtioPci, kill_after: int | None
) -> None:
    drv = vb_driver(dev)
    await drv.start()
    if kill_after is not None:
        _arm_kill(vm, dev, drv.INFLATE, kill_after)
    rig.set_target(BALLOON)
    await drv.on_config_change(10)
    assert drv.num_pages == BALLOON


def _arm_kill(vm: QtestVm, dev: VirtioPci, queue: int, after: int) -> None:
    """SIGKILL QEMU right after the ``after``-th notify of ``queue``: a request is in flight."""
    real = dev.notify
    count = 0

    async def notify(index: int) -> None:
        nonlocal count
        await real(index)
        if index == queue:
            count += 1
            if count == after:
                vm.proc.kill()

    dev.notify = notify  # type: ignore[method-assign]


SESSIONS: dict[str, Callable[[InProcessVdev, QtestVm, VirtioPci, int | None], Awaitable[None]]] = {
    "vmw": _vmw_session,
    "virtio-balloon": _vb_session,
}


@pytest.mark.parametrize("personality", ["vmw", "virtio-balloon"])
async def test_qemu_dies_mid_command_vdev_serves_the_next(personality: str) -> None:
    q = want_qemu(personality)
    with trio.fail_after(60):
        async with vdev_rig(personality, q) as rig:
            with pytest.raises((DeviceGone, QtestError)) as gone:
                async with guest(rig, q) as (vm, dev):
                    await SESSIONS[personality](rig, vm, dev, 2)
            print("the guest saw:", repr(gone.value))
            await wait_for(lambda: not rig.view().connected)
            assert rig.view().size_pages == 0  # the balloon of a gone guest is forgotten
            # the same vdev, the same socket, a new QEMU
            async with guest(rig, q) as (vm, dev):
                await SESSIONS[personality](rig, vm, dev, None)
                view = rig.view()
                assert view.connected and view.size_pages == BALLOON


def test_pool_constants() -> None:
    assert POOL.count >= BALLOON and np.uint64(POOL.first_pfn) >= KERNEL_PAGES
