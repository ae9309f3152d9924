"""``guest-driver run-linux``: the driver inside a real Linux guest, as a userspace driver.

The driver core (:class:`guest_driver.driver.BalloonDriver`) runs unchanged over
:class:`guest_driver.transport_virtio_pci.VirtioPciTransport` on
:class:`guest_driver.uio.UioPort` (the device's PCI function bound to ``uio_pci_generic``),
with the guest kernel's own pages (:class:`guest_driver.linux_memory.LinuxPageSource`).

What a kernel driver gets for free and a userspace one must arrange:

* **Never push the guest into OOM.** An allocation for the balloon is cut to what
  ``MemAvailable`` allows above ``reserve`` (``high`` by default; ``guest-driver
  run-linux`` refuses one below ``low``) (like the kernel driver's
  ``__GFP_NORETRY``: the kernel may drop page cache for it, never kill for it).
* **Deflate under pressure, like the shrinker.** A watcher reads ``MemAvailable`` every
  ``pressure_poll`` s; below ``low`` it deflates (UNLOCK, then unmap) until ``high`` is
  free again, and inflation then pauses for the shrink delay (``VMBALLOON_SHRINK_DELAY``).
* **Not be the OOM killer's victim:** ``oom_score_adj`` -1000 (its pages are the guest's
  spare memory already given to the host; killing it would free nothing the host lacks and
  would leave the host holding frames the guest reuses).
* **Pages that stay put:** :func:`guest_driver.linux_memory.pin_settings`; every
  ``check_interval`` s the frames are re-read and a moved page stops the driver (exit
  status 3) after telling the host to forget the balloon (START(0)).
* **Dying:** the kernel frees the pages; the device sees the function reset (closing
  ``/dev/uioN`` and the next driver's reset) and forgets the balloon.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import trio

from guest_driver.driver import BalloonDriver, DriverConfig
from guest_driver.guest_memory import PageSize
from guest_driver.linux_memory import (
    LinuxPageSource,
    LockedPages,
    Pagemap,
    meminfo,
    pin_settings,
    restore_settings,
)
from guest_driver.transport_virtio_pci import VirtioPciTransport
from guest_driver.uio import VMW_PCI_ID, UioPort, find_function
from protocol.errors import DeviceGone, LocalError
from protocol.units import PAGE_SIZE

log = logging.getLogger(__name__)

MIB = 1 << 20


class PagesMoved(LocalError):
    """A ballooned page is no longer at the frame the host was given (compaction, THP).

    Raised by :func:`run_in_guest`'s checker; caught by ``guest-driver run-linux``, which
    exits with status 3 after the host was told to forget the balloon."""


@dataclass(frozen=True)
class LinuxOptions:
    config: DriverConfig
    pci_id: tuple[int, int] = VMW_PCI_ID
    control_path: str | None = "/run/guest-driver.sock"
    reserve_bytes: int = 64 * MIB  # never allocate below this much MemAvailable (>= low)
    low_bytes: int = 32 * MIB  # deflate when MemAvailable falls below
    high_bytes: int = 64 * MIB  # ... until this much is available again
    pressure_poll: float = 0.02
    check_interval: float = 1.0
    huge: bool = True


class GuardedPageSource(LinuxPageSource):
    """:class:`LinuxPageSource` that never allocates below ``reserve`` of MemAvailable."""

    def __init__(self, pagemap: Pagemap, batch: LockedPages, *, reserve: int, huge: bool) -> None:
        super().__init__(pagemap, batch, huge=huge)
        self.reserve = reserve
        self.cut_pages = 0

    def alloc_balloon(self, size: PageSize, n: int) -> Any:
        per = 512 if size == PageSize.SIZE_2M else 1
        spare = (meminfo().get("MemAvailable", 0) * 1024 - self.reserve) // (PAGE_SIZE * per)
        allowed = max(0, min(n, spare))
        self.cut_pages += (n - allowed) * per
        return super().alloc_balloon(size, allowed)


async def _watch_pressure(driver: BalloonDriver, options: LinuxOptions) -> None:
    while True:
        avail = meminfo().get("MemAvailable", 0) * 1024
        if avail < options.low_bytes and driver.size > 0:
            want = (options.high_bytes - avail + PAGE_SIZE - 1) // PAGE_SIZE
            got = await driver.shrink(want)
            if got:
                log.info("memory pressure: MemAvailable %d MiB, deflated %d pages",
                         avail // MIB, got)  # fmt: skip
                continue
        await trio.sleep(options.pressure_poll)


async def _check_moved(source: LinuxPageSource, locked: LockedPages, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        moved = source.moved()
        if moved or locked.moved():
            raise PagesMoved(f"{moved} ballooned pages (or a ring page) moved to another frame")


def _set_oom_score_adj(value: int) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError as exc:
        log.warning("cannot set oom_score_adj: %s", exc)


async def run_in_guest(
    options: LinuxOptions,
    *,
    task_status: trio.TaskStatus[BalloonDriver] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind the device, run the driver until cancelled (then START(0) and pop)."""
    from guest_driver.cli import serve_control

    _set_oom_score_adj(-1000)
    old = pin_settings()
    pagemap = Pagemap()
    locked = LockedPages(pagemap)
    port: UioPort | None = None
    try:
        port, dev = UioPort.open(find_function(*options.pci_id), locked)
        transport = await VirtioPciTransport.open(dev, locked)
        # Inflate only above ``reserve`` (``high`` by default), deflate below ``low``: the gap
        # between them keeps the two from chasing each other while the guest's use is steady.
        source = GuardedPageSource(
            pagemap, locked, reserve=options.reserve_bytes, huge=options.huge
        )
        driver = BalloonDriver(transport, source, options.config)

        def control(request: dict[str, Any]) -> dict[str, Any]:
            if request.get("cmd", "stat") != "stat":
                return {"error": f"unknown command {request.get('cmd')!r}"}
            snap = driver.snapshot()
            return {
                "driver": snap,
                "debugfs": driver.render(),
                "meminfo": {k: v for k, v in meminfo().items()
                            if k in ("MemTotal", "MemFree", "MemAvailable", "Cached")},
                "held_pages": source.ballooned_pages,
                "cut_pages": source.cut_pages,
                "refused_huge": source.refused_huge,
                "device": dev.name,
            }  # fmt: skip

        try:
            async with trio.open_nursery() as nursery:
                if options.control_path:
                    await nursery.start(serve_control, options.control_path, control)
                nursery.start_soon(_watch_pressure, driver, options)
                nursery.start_soon(_check_moved, source, locked, options.check_interval)
                nursery.start_soon(_run, driver, nursery.cancel_scope)
                log.info("driver running on %s (%s)", dev.name, options.config)
                task_status.started(driver)
        finally:
            with trio.move_on_after(5, shield=True):
                try:
                    await driver.close()
                except DeviceGone as exc:
                    log.info("exit: %s", exc)
            with trio.move_on_after(2, shield=True):
                try:
                    await dev.reset(timeout=2)
                except (LocalError, trio.TooSlowError) as exc:
                    log.info("device reset at exit: %s", exc)
    finally:
        if port is not None:
            port.close()
        locked.close()
        pagemap.close()
        restore_settings(old)


async def _run(driver: BalloonDriver, scope: trio.CancelScope) -> None:
    try:
        await driver.run()
    except DeviceGone as exc:
        log.warning("device gone: %s", exc)
    scope.cancel()


def available() -> str | None:
    """Why this cannot run here, or None."""
    if os.geteuid() != 0:
        return "run-linux needs root (pagemap frame numbers, sysfs binding, mlock)"
    if not os.path.isdir("/sys/bus/pci"):
        return "no /sys/bus/pci (mount sysfs)"
    return None
