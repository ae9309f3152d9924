"""The vmmemctl transport over qtest: the driver core runs unchanged against QEMU.

QEMU attaches vdev (``vdev serve --device vmw``) as a vhost-user device; we are the guest,
driving the device's virtio-pci function through qtest (:mod:`lab.qtest`):

* queue 0 ``cmdq``: one command = one chain [24-byte request (R), 24-byte response (W)];
  :meth:`QtestTransport.command` posts it, notifies, and waits for the used element
  (interrupt via the intercepted IOAPIC line, ISR polled as a fallback);
* queue 1 ``eventq``: :data:`EVENT_BUFFERS` 8-byte buffers kept posted; each used one is a
  doorbell event (docs/PROTOCOL.md section 5), re-posted after it is read;
* guest RAM ``read``/``write`` are qtest ``b64read``/``b64write``.

The device may be ``vhost-user-gpio-pci`` (virtio id 41: two queues and an 8-byte config,
exactly vmw's shape; any QEMU >= 10) or ``vhost-user-test-device-pci`` (QEMU >= 10.2):
:meth:`QtestTransport.open` takes the first virtio function whose id is in ``device_ids``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from guest_driver.transport_virtio_pci import VirtioPciTransport
from lab.qemu import TEST_DEVICE, QemuBinary
from lab.qtest.virtio_pci import GuestAllocator, VirtioPci
from protocol.errors import LocalError

if TYPE_CHECKING:
    from lab.vdev_inprocess import InProcessVdev

log = logging.getLogger(__name__)

VIRTIO_ID_GPIO = 41


class QtestTransport(VirtioPciTransport):
    """:class:`guest_driver.transport_virtio_pci.VirtioPciTransport` over a qtest-driven
    function (:class:`lab.qtest.virtio_pci.VirtioPci`)."""


# --------------------------------------------------------------------------- vdev + QEMU rig

#: The virtio id of QEMU's generic vhost-user device for each personality, or None when the
#: carrier is used (vhost-user-gpio-pci, virtio id 41).
VIRTIO_ID = {"virtio-balloon": 5, "vmw": None}


def vhost_user_device(personality: str, qemu: QemuBinary, chardev: str = "c0") -> tuple[str, int]:
    """The ``-device`` argument that attaches vdev's ``personality``, and the virtio id the
    guest will find.

    virtio-balloon: ``vhost-user-test-device-pci`` (QEMU >= 10.2) with virtio-id 5, 3 queues
    (inflateq, deflateq, statsq) and an 8-byte config, so a stock Linux virtio_balloon binds.
    Without it (QEMU 10.0/10.1 cannot instantiate the generic device), and for vmw (which
    no stock guest driver knows anyway), the carrier ``vhost-user-gpio-pci``: two queues
    and an 8-byte config, exactly inflate/deflate (no statsq) or cmdq/eventq.
    """
    vid = VIRTIO_ID.get(personality)
    if vid is not None and qemu.has_test_device:
        return (
            f"{TEST_DEVICE},chardev={chardev},virtio-id={vid},num_vqs=3,config_size=8",
            vid,
        )
    return f"vhost-user-gpio-pci,chardev={chardev}", VIRTIO_ID_GPIO


@contextlib.asynccontextmanager
async def vdev_rig(
    personality: str, qemu: QemuBinary, *, target: int = 0, scratch: Path | None = None
) -> AsyncIterator[InProcessVdev]:
    """Serve ``personality`` in-process (:mod:`lab.vdev_inprocess`) on ``SCRATCH/vu.sock``
    (a scratch dir QEMU can see; the rig's :attr:`~InProcessVdev.scratch`)."""
    from lab.vdev_inprocess import open_inprocess_vdev

    own = scratch is None
    d = qemu.scratch_dir("vbq-") if scratch is None else scratch
    try:
        async with open_inprocess_vdev(
            [d / "vu.sock"], device=personality, target_pages=target, scratch=d
        ) as rig:
            yield rig
    finally:
        if own:
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------- side by side with QEMU's own

#: Observations that must agree between QEMU's virtio-balloon-pci and vdev's personality.
AGREED = (
    "features",
    "num_pages_at_probe",
    "actual_after_inflate",
    "host_logical_size_after_inflate",
    "reclaimed_pages_after_inflate",
    "ballooned_page_reads_zero",
    "guest_stats",
    "actual_after_oom",
    "actual_after_deflate",
    "reclaimed_pages_after_deflate",
    "deflated_page_reads_zero",
    "ram_back_after_touch",
)
U64_MINUS_ONE = 2**64 - 1


def normalise_stats(stats: dict[str, int]) -> dict[str, int]:
    """QEMU's QMP shows a missing stat as 2**64-1 (it is a u64 there); we say -1."""
    return {k: (-1 if v in (-1, U64_MINUS_ONE) else int(v)) for k, v in sorted(stats.items())}


@dataclass
class SideResult:
    """What one balloon implementation showed the guest and the host."""

    side: str  # "qemu" or "vdev"
    qemu: str
    device: str
    observations: dict[str, object] = field(default_factory=dict)
    inflate_s: list[float] = field(default_factory=list)
    deflate_s: list[float] = field(default_factory=list)
    pages: int = 0

    def rate(self, which: str) -> float:
        """Median pages per second of the inflate (or deflate) rounds."""
        times = sorted(self.inflate_s if which == "inflate" else self.deflate_s)
        return self.pages / times[len(times) // 2] if times else 0.0


@contextlib.asynccontextmanager
async def balloon_side(
    side: str,
    qemu: QemuBinary,
    *,
    pages: int = 16384,
    ram_mib: int = 256,
    touch: tuple[int, int] = (4 << 20, 100 << 20),
    timeout: float = 60.0,
) -> AsyncIterator[Callable[[int], Awaitable[None]]]:
    """One balloon ready for the script: ``side`` "qemu" is virtio-balloon-pci with its target
    set via QMP ``balloon``; "vdev" is vdev's virtio-balloon through QEMU with its target set
    via the registry. Yields ``run_round(r)``: inflate by ``pages``, deflate to 0 (round 0
    also records the observations into ``result``, reached as ``run_round.result``)."""
    from lab.qtest.launcher import qtest_vm
    from lab.virtio_balloon_driver import PagePool, VirtioBalloonDriver

    ram = ram_mib << 20
    pool = PagePool(touch[0] >> 12, (touch[1] - touch[0]) >> 12)
    if pages + 256 > pool.count:
        raise LocalError(f"at most {pool.count - 256} pages")
    rig_cm: contextlib.AbstractAsyncContextManager[InProcessVdev | None] = (
        vdev_rig("virtio-balloon", qemu) if side == "vdev" else contextlib.nullcontext(None)
    )
    async with rig_cm as rig, contextlib.AsyncExitStack() as stack:
        if rig is not None:
            device, vid = vhost_user_device("virtio-balloon", qemu)
            vm = await stack.enter_async_context(
                qtest_vm(qemu, devices=[device], chardevs={"c0": rig.socket_path},
                         scratch=rig.scratch, ram_mib=ram_mib)
            )  # fmt: skip
        else:
            device, vid = "virtio-balloon-pci,id=balloon0,deflate-on-oom=on", 5
            vm = await stack.enter_async_context(qtest_vm(qemu, devices=[device], ram_mib=ram_mib))
        qmp = vm.qmp
        assert qmp is not None
        res = SideResult(side, f"{qemu.name} {qemu.version_str}", device.split(",")[0])
        obs = res.observations
        res.pages = pages

        async def set_target(n: int) -> None:
            if rig is not None:
                rig.set_target(n)
            else:
                await qmp.execute("balloon", {"value": ram - n * 4096})

        async def guest_stats() -> dict[str, int]:
            if rig is not None:
                return dict(rig.view().guest_stats)
            got = await qmp.execute(
                "qom-get", {"path": "/machine/peripheral/balloon0", "property": "guest-stats"}
            )
            return dict(got["stats"])

        async def refresh_stats() -> None:
            """Fresh stats from the guest: QEMU polls on a timer, vdev gives on request."""
            if rig is not None:
                await rig.request_stats()
            else:
                await qmp.execute(
                    "qom-set",
                    {"path": "/machine/peripheral/balloon0",
                     "property": "guest-stats-polling-interval", "value": 1},
                )  # fmt: skip
            wanted = drv.counters.stats_requests + 1
            while drv.counters.stats_requests < wanted:
                await drv.service(timeout)
            await trio.sleep(0.05)  # the device parses the buffer after the kick

        dev = await VirtioPci.find(vm.qt, vid)
        drv = VirtioBalloonDriver(dev, GuestAllocator(), pool, timeout=10)
        await drv.start()
        obs["features"] = drv.features
        obs["num_pages_at_probe"] = await drv.target()
        await vm.qt.memset(touch[0], touch[1] - touch[0], 0x5A)
        before = vm.memfd_bytes()

        async def run_round(r: int) -> None:
            with trio.fail_after(timeout):
                t0 = trio.current_time()
                await set_target(pages)
                moved = await drv.on_config_change(timeout)
                res.inflate_s.append(trio.current_time() - t0)
                if moved != pages:
                    raise LocalError(f"{side}: inflated {moved} pages, not {pages}")
                if r == 0:
                    obs["actual_after_inflate"] = await drv.read_actual()
                    if rig is not None:
                        logical = ram - rig.view().counters["actual"] * 4096
                    else:
                        logical = (await qmp.execute("query-balloon"))["actual"]
                    obs["host_logical_size_after_inflate"] = logical
                    obs["reclaimed_pages_after_inflate"] = (before - vm.memfd_bytes()) // 4096
                    page = await vm.qt.read(drv.pages[-1] << 12, 4096)
                    obs["ballooned_page_reads_zero"] = page == bytes(4096)
                    obs["guest_stats"] = None
                    if drv.has_stats:
                        await refresh_stats()
                        obs["guest_stats"] = normalise_stats(await guest_stats())
                    obs["actual_after_oom"] = (await drv.oom(256), await drv.read_actual())
                t0 = trio.current_time()
                await set_target(0)
                await drv.on_config_change(timeout)
                res.deflate_s.append(trio.current_time() - t0)
                if r == 0:
                    obs["actual_after_deflate"] = await drv.read_actual()
                    obs["reclaimed_pages_after_deflate"] = (before - vm.memfd_bytes()) // 4096
                    first = pool.first_pfn << 12
                    obs["deflated_page_reads_zero"] = await vm.qt.read(first, 4096) == bytes(4096)
                await vm.qt.memset(touch[0], touch[1] - touch[0], 0x5A)  # the guest uses it again
                if r == 0:
                    obs["ram_back_after_touch"] = vm.memfd_bytes() >= before

        run_round.result = res  # type: ignore[attr-defined]
        yield run_round


async def side_by_side(
    *, pages: int = 16384, rounds: int = 1, timeout: float = 120.0
) -> tuple[SideResult, SideResult]:
    """The same script on QEMU's virtio-balloon-pci and on vdev's virtio-balloon, on the same
    QEMU binary when it has the generic vhost-user device. Both VMs run at once and the
    rounds alternate, so that a change in the machine's load hits both sides alike."""
    from lab.qemu import best_qemu

    vq = best_qemu(need_test_device=True) or best_qemu(need_test_device=False)
    if vq is None:
        raise LocalError("no QEMU (run scripts/setup)")
    with trio.fail_after(timeout):
        async with (
            balloon_side("qemu", vq, pages=pages) as qemu_round,
            balloon_side("vdev", vq, pages=pages) as vdev_round,
        ):
            for r in range(rounds):
                first, second = (qemu_round, vdev_round) if r % 2 == 0 else (vdev_round, qemu_round)
                await first(r)
                await second(r)
            return qemu_round.result, vdev_round.result  # type: ignore[attr-defined]
