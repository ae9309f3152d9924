"""The driver core over vhost-user: our guest, with guest RAM in a memfd, talks to ``vdev``.

:class:`VhostUserTransport` is a thin adapter from :class:`guest_driver.transport.Transport`
to the front-end of :mod:`guest_driver.frontend`: commands go through its
:class:`~guest_driver.frontend.VmwChannel` (``cmdq``), doorbell events come from the same
channel (``eventq``), guest RAM is read and written through its
:class:`~guest_driver.frontend.MemfdPort`; front-end failures become :class:`DeviceGone`, and
so does the back-end hanging up (the front-end's hang-up event cancels the wait at once) or
a command unanswered for ``command_timeout`` seconds.

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

import trio

from guest_driver.driver import BalloonDriver, DriverConfig
from guest_driver.frontend import GuestRamFile, VmwChannel, connect_frontend
from guest_driver.guest_memory import GuestMemory, Workload, WorkloadSpec
from protocol import vmw
from protocol.errors import BackendError, DeviceGone
from protocol.units import PAGE_SIZE

log = logging.getLogger(__name__)

QUEUE_SIZE = 64
EVENT_BUFFERS = 8
COMMAND_TIMEOUT = 10.0
#: What a dead front-end looks like from here (closed socket or eventfds, a bad reply).
_GONE = (BackendError, OSError, trio.ClosedResourceError, trio.BrokenResourceError)


class VhostUserTransport:
    """:class:`guest_driver.transport.Transport` over a :class:`VmwChannel`."""

    def __init__(self, channel: VmwChannel, *, command_timeout: float = COMMAND_TIMEOUT) -> None:
        self.channel = channel
        self.port = channel.fe.port
        self.command_timeout = command_timeout

    @property
    def ram(self) -> GuestRamFile:
        return self.channel.fe.ram

    def reserved_ranges(self) -> list[tuple[int, int]]:
        """(first pfn, count) the guest kernel keeps: the front-end's pages and RAM holes."""
        return self.channel.reserved_ranges()

    async def command(self, request: vmw.Request) -> vmw.Response:
        fe = self.channel.fe
        try:
            with fe.cancel_on_hangup() as scope, trio.fail_after(self.command_timeout):
                response, _ = await self.channel.command(request)
        except trio.TooSlowError:
            raise DeviceGone(
                f"no answer to command {request.command} in {self.command_timeout} s"
            ) from None
        except _GONE as exc:
            raise DeviceGone(f"command {request.command}: {exc}") from None
        if scope.cancelled_caught:
            raise DeviceGone(f"command {request.command}: the back-end hung up")
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


@contextlib.asynccontextmanager
async def connect_transport(
    socket_path: str, ram_bytes: int, *, layout: str = "qemu"
) -> AsyncIterator[VhostUserTransport]:
    """Guest RAM (a sparse memfd), the front-end started on ``socket_path``, event buffers
    posted; everything closed on exit."""
    ram = GuestRamFile(ram_bytes, layout=layout, name="vballoon-guest-ram")
    try:
        async with connect_frontend(socket_path, ram, queue_size=QUEUE_SIZE) as fe:
            channel = VmwChannel(fe)
            await channel.post_event_buffers(EVENT_BUFFERS)
            yield VhostUserTransport(channel)
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


@dataclass
class Guest:
    """Everything one running guest consists of (handed to ``task_status.started``)."""

    transport: VhostUserTransport
    memory: GuestMemory
    driver: BalloonDriver
    workload: Workload | None

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
        }


async def run_guest(
    options: GuestOptions, *, task_status: trio.TaskStatus[Guest] = trio.TASK_STATUS_IGNORED
) -> None:
    """Connect, set up, run the driver until cancelled; then START(0) and pop (shielded)."""
    from guest_driver.cli import serve_control

    async with connect_transport(options.socket_path, options.ram_bytes) as transport:
        view = memoryview(transport.ram.mm)
        memory = GuestMemory(
            options.ram_bytes // PAGE_SIZE, reserved=transport.reserved_ranges(), ram=view
        )
        driver = BalloonDriver(transport, memory, options.config)
        workload = Workload(memory, options.workload) if options.workload else None
        guest = Guest(transport, memory, driver, workload)

        def control(request: dict[str, Any]) -> dict[str, Any]:
            if request.get("cmd", "stat") == "stat":
                return guest.status()
            return {"error": f"unknown command {request.get('cmd')!r}"}

        try:
            async with trio.open_nursery() as nursery:
                if options.control_path:
                    await nursery.start(serve_control, options.control_path, control)
                if workload is not None:
                    nursery.start_soon(_drive_workload, guest, options.workload_interval)
                nursery.start_soon(_run_driver, driver, nursery.cancel_scope)
                task_status.started(guest)
        finally:
            with trio.move_on_after(5, shield=True):
                try:
                    await driver.close()
                except DeviceGone as exc:  # close() pops in any case
                    log.info("exit: %s", exc)
            memory.detach_ram()
            with contextlib.suppress(BufferError):  # still exported: the GC unmaps
                view.release()


async def _run_driver(driver: BalloonDriver, scope: trio.CancelScope) -> None:
    try:
        await driver.run()
    except DeviceGone as exc:
        log.warning("device gone: %s", exc)
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
