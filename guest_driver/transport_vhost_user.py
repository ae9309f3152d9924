"""The driver core over vhost-user: our guest, with guest RAM in a memfd, talks to ``vdev``.

:class:`VhostUserTransport` is a thin adapter from :class:`guest_driver.transport.Transport`
to the front-end of :mod:`guest_driver.frontend`: commands go through its
:class:`~guest_driver.frontend.VmwChannel` (``cmdq``), doorbell events come from the same
channel (``eventq``), guest RAM is read and written through its
:class:`~guest_driver.frontend.MemfdPort`; front-end failures become :class:`DeviceGone`.

A device may stop answering for a while and come back: a vdev being restarted keeps the
vhost-user connection (its fds are kept for it) and resumes the rings where it stopped.
As Linux's vmw_balloon rides out a host that is busy or being reset, the driver then waits:
its command stays posted (never sent twice), the kick is sent again every
:data:`REKICK_INTERVAL` seconds, one warning says so, and it keeps its balloon. When the
device answers, the driver carries on; if the device had forgotten the balloon it answers
ERROR_RESET and the driver resyncs by vmw_balloon's reset protocol (pop, START, inflate to
the target again). The device is gone for good, and :class:`DeviceGone` raised, when:

* the back-end hangs up (closes the connection): a vhost-user connection is never
  re-established (QEMU's generic device cannot either), so at once;
* a command stays unanswered for ``device_timeout`` seconds (:data:`DEVICE_TIMEOUT`,
  ``guest-driver run --device-timeout``).

:func:`connect_transport` opens one: guest RAM as a sparse memfd laid out like QEMU's
(:class:`~guest_driver.frontend.GuestRamFile`, ``layout="qemu"``), QEMU's handshake and start
sequence, event buffers posted. The pages the front-end uses for itself (everything below the
channel's last page: low memory with the ROM holes, the rings, the request/response and event
pages) come from :meth:`VhostUserTransport.reserved_ranges`, for the guest memory model.

:func:`run_guest` is the trio shell used by ``guest-driver run``: front-end, guest memory
model (with the workload writing real pages into the memfd), driver, control endpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from guest_driver.driver import BalloonDriver, DriverConfig
from guest_driver.frontend import (
    COMMAND_SLOTS,
    GuestRamFile,
    Patience,
    VmwChannel,
    connect_frontend,
)
from guest_driver.guest_memory import GuestMemory, PageState, Workload, WorkloadSpec
from protocol import vmw
from protocol.errors import BackendError, DeviceGone
from protocol.units import PAGE_SIZE

log = logging.getLogger(__name__)

QUEUE_SIZE = 64
EVENT_BUFFERS = 8
#: Seconds a command may stay unanswered before the device is taken as gone for good. Long
#: enough for a vdev restart (its supervisor restarts it within a second or two).
DEVICE_TIMEOUT = 30.0
#: Seconds between kicks to a device that is not answering.
REKICK_INTERVAL = 1.0
#: Seconds ``guest-driver run`` gives the device, when told to stop, to take START(0).
STOP_GRACE = 5.0
#: What a dead front-end looks like from here (closed socket or eventfds, a bad reply).
_GONE = (BackendError, OSError, trio.ClosedResourceError, trio.BrokenResourceError)


class VhostUserTransport:
    """:class:`guest_driver.transport.Transport` over a :class:`VmwChannel`."""

    #: commands this transport carries at once (the channel's slots)
    max_in_flight = COMMAND_SLOTS

    def __init__(
        self,
        channel: VmwChannel,
        *,
        device_timeout: float = DEVICE_TIMEOUT,
        rekick_interval: float = REKICK_INTERVAL,
    ) -> None:
        if not device_timeout > 0:
            raise ValueError("the device timeout must be > 0 seconds")
        self.channel = channel
        self.port = channel.fe.port
        self.device_timeout = device_timeout
        self.rekick_interval = min(rekick_interval, device_timeout)
        #: Commands the device was slow to answer (a warning was logged for each).
        self.stalls = 0

    @property
    def ram(self) -> GuestRamFile:
        return self.channel.fe.ram

    def reserved_ranges(self) -> list[tuple[int, int]]:
        """(first pfn, count) the guest kernel keeps: the front-end's pages and RAM holes."""
        return self.channel.reserved_ranges()

    async def command(self, request: vmw.Request) -> vmw.Response:
        fe = self.channel.fe
        name = _command_name(request.command)
        stalled = False

        def on_wait(waited: float) -> None:
            nonlocal stalled
            if waited >= self.device_timeout:
                raise DeviceGone(
                    f"no answer to {name} for {waited:.0f} s (device timeout "
                    f"{self.device_timeout:g} s)"
                )
            if not stalled:
                stalled = True
                self.stalls += 1
                log.warning(
                    "the device has not answered %s for %.1f s: waiting for it to come back "
                    "(the balloon is kept; giving up after %g s)",
                    name,
                    waited,
                    self.device_timeout,
                )

        patience = Patience(self.rekick_interval, on_wait)
        try:
            with fe.cancel_on_hangup() as scope:
                response, _ = await self.channel.command(request, patience=patience)
        except DeviceGone:
            raise
        except _GONE as exc:
            raise DeviceGone(f"{name}: {exc}") from None
        if scope.cancelled_caught:
            raise DeviceGone(f"{name}: the back-end hung up (closed the connection)")
        if stalled:
            log.warning("the device answered %s again", name)
        return response

    async def read(self, gpa: int, n: int) -> bytes:
        return await self.port.read(gpa, n)

    async def write(self, gpa: int, data: bytes) -> None:
        await self.port.write(gpa, data)

    async def wait_event(self, timeout: float) -> vmw.EventKind | None:
        fe = self.channel.fe
        try:
            with fe.cancel_on_hangup() as scope, trio.move_on_after(timeout):
                return await self.channel.next_event()
        except _GONE as exc:
            raise DeviceGone(f"eventq: {exc}") from None
        if scope.cancelled_caught:
            raise DeviceGone("eventq: the back-end hung up")
        return None

    @property
    def doorbell_ids(self) -> tuple[int, int] | None:
        return (2, 1)  # any pair but (INVALID, INVALID): the eventq is the doorbell

    def counters(self) -> dict[str, int]:
        """Commands posted and answered, answers for nothing in flight (a device answering
        twice), commands the device was slow to answer, kicks sent again."""
        ch = self.channel
        return {
            "posted": ch.posted,
            "answered": ch.answered,
            "stray_answers": ch.cmdq.driver.stray_used,
            "in_flight": ch.cmdq.driver.in_flight,
            "stalls": self.stalls,
            "rekicks": ch.rekicks,
        }


def _command_name(number: int) -> str:
    try:
        return vmw.Command(number).name
    except ValueError:
        return f"command {number}"


@contextlib.asynccontextmanager
async def connect_transport(
    socket_path: str,
    ram_bytes: int,
    *,
    layout: str = "qemu",
    device_timeout: float = DEVICE_TIMEOUT,
    rekick_interval: float = REKICK_INTERVAL,
) -> AsyncIterator[VhostUserTransport]:
    """Guest RAM (a sparse memfd), the front-end started on ``socket_path``, event buffers
    posted; everything closed on exit."""
    ram = GuestRamFile(ram_bytes, layout=layout, name="vballoon-guest-ram")
    try:
        async with connect_frontend(socket_path, ram, queue_size=QUEUE_SIZE) as fe:
            channel = VmwChannel(fe)
            await channel.post_event_buffers(EVENT_BUFFERS)
            yield VhostUserTransport(
                channel, device_timeout=device_timeout, rekick_interval=rekick_interval
            )
    finally:
        ram.close()


# ---------------------------------------------------------------------------------------
# guest-driver run


@dataclass(frozen=True)
class GuestOptions:
    socket_path: str
    ram_bytes: int
    config: DriverConfig
    workload: WorkloadSpec | None = None
    control_path: str | None = None
    workload_interval: float = 0.2
    device_timeout: float = DEVICE_TIMEOUT
    rekick_interval: float = REKICK_INTERVAL


@dataclass
class Guest:
    """Everything one running guest consists of (handed to ``task_status.started``)."""

    transport: VhostUserTransport
    memory: GuestMemory
    driver: BalloonDriver
    workload: Workload | None
    #: Why the driver stopped because the device is gone for good (None: it did not).
    gone: str | None = None
    #: How the stop went when told to stop (None: not stopped that way, or not yet).
    stop_note: str | None = None
    #: Ballooned pages handed back to the guest when the driver stopped.
    released: int = 0

    @property
    def ram(self) -> GuestRamFile:
        return self.transport.ram

    def status(self) -> dict[str, Any]:
        info = self.memory.meminfo()
        return {
            "driver": self.driver.snapshot(),
            "debugfs": self.driver.render(),
            "meminfo": {k: getattr(info, k) for k in info.__dataclass_fields__},
            "ram_bytes": self.ram.size,
            "ram_allocated_bytes": self.ram.allocated_bytes(),
            "workload_shortfall": self.workload.shortfall if self.workload else 0,
            "lost_pages": self.memory.verify_app(),
            "transport": self.transport.counters(),
        }

    def page_runs(self) -> dict[str, Any]:
        """Where the balloon and the kernel's own pages are, as ``[first pfn, count]`` runs
        (``{"cmd": "pages"}``): what the guest RAM file's holes are checked against."""
        state = self.memory.state[: self.memory.total_pages]
        return {
            "total_pages": self.memory.total_pages,
            "balloon": _runs(state == PageState.BALLOON),
            "reserved": _runs(state == PageState.RESERVED),
        }


def _runs(mask: npt.NDArray[np.bool_]) -> list[list[int]]:
    """``[first, count]`` of every run of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    return [[int(a), int(b - a)] for a, b in zip(edges[::2], edges[1::2], strict=True)]


async def run_guest(
    options: GuestOptions, *, task_status: trio.TaskStatus[Guest] = trio.TASK_STATUS_IGNORED
) -> None:
    """Connect, set up, run the driver until cancelled; then START(0) and pop (shielded)."""
    from guest_driver.cli import serve_control

    async with connect_transport(
        options.socket_path,
        options.ram_bytes,
        device_timeout=options.device_timeout,
        rekick_interval=options.rekick_interval,
    ) as transport:
        view = memoryview(transport.ram.mm)
        memory = GuestMemory(
            options.ram_bytes // PAGE_SIZE, reserved=transport.reserved_ranges(), ram=view
        )
        driver = BalloonDriver(transport, memory, options.config)
        workload = Workload(memory, options.workload) if options.workload else None
        guest = Guest(transport, memory, driver, workload)

        def control(request: dict[str, Any]) -> dict[str, Any]:
            cmd = request.get("cmd", "stat")
            if cmd == "stat":
                return guest.status()
            if cmd == "pages":
                return guest.page_runs()
            return {"error": f"unknown command {cmd!r}"}

        try:
            async with trio.open_nursery() as nursery:
                if options.control_path:
                    await nursery.start(serve_control, options.control_path, control)
                if workload is not None:
                    nursery.start_soon(_drive_workload, guest, options.workload_interval)
                nursery.start_soon(_run_driver, guest, nursery.cancel_scope)
                task_status.started(guest)
        finally:
            guest.released = driver.size + driver.held  # held: of LOCKs it gave up waiting for
            if guest.gone is not None:
                driver.abandon()  # nobody to tell: the pages are the guest's again
            else:
                guest.stop_note = "the device took START(0)"
                with trio.move_on_after(STOP_GRACE, shield=True) as scope:
                    try:
                        await driver.close()  # START(0), then pop
                    except DeviceGone as exc:  # close() pops in any case
                        log.warning("stopping: %s", exc)
                        guest.stop_note = f"START(0) failed: {exc}"
                if scope.cancelled_caught:
                    driver.abandon()
                    guest.stop_note = f"the device did not take START(0) within {STOP_GRACE:g} s"
                    log.warning("stopping: %s", guest.stop_note)
            memory.detach_ram()
            with contextlib.suppress(BufferError):  # still exported: the GC unmaps
                view.release()


async def _run_driver(guest: Guest, scope: trio.CancelScope) -> None:
    try:
        await guest.driver.run()
    except DeviceGone as exc:
        guest.gone = str(exc)
        log.error(
            "device gone: %s; stopping with %d pages ballooned (they are the guest's again)",
            exc,
            guest.driver.size,
        )
    scope.cancel()


async def _drive_workload(guest: Guest, interval: float) -> None:
    assert guest.workload is not None
    while True:
        shortfall = guest.workload.step(time.monotonic())
        if shortfall and guest.driver.config.shrinker:
            await guest.driver.shrink(shortfall)
        await trio.sleep(interval)


def pages(nbytes: int) -> int:
    return math.ceil(nbytes / PAGE_SIZE)
