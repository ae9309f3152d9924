"""The driver core over vhost-user: our guest, with guest RAM in a memfd, talks to ``vdev``.

``guest_driver/frontend.py`` (the back-end engineer's full front-end) had not landed when
this was written, so this module carries a minimal well-behaved front-end of its own
(:class:`MiniFrontend`): QEMU's negotiation order, one memfd region at GPA 0, ``cmdq`` and
``eventq`` as split rings driven by :class:`guest_driver.virtq.DriverQueue`. Swap it for
frontend.py's ``VmwChannel`` when that lands; :class:`VhostUserTransport` only needs
``command`` / ``read`` / ``write`` / events from it.

Guest-physical layout of the first 2 MiB (all of it "kernel", reserved in the guest memory
model except the last page, which becomes the balloon driver's batch page):

    0x00000  cmdq rings       0x08000  eventq rings
    0x40000  request / response slots        0x50000  event buffers
    0x1ff000 the batch page (pfn 511)

:func:`run_guest` is the trio shell used by ``guest-driver run``: front-end, guest memory
model (with the workload writing real pages into the memfd), driver, control endpoint.
"""

from __future__ import annotations

import array
import contextlib
import logging
import math
import mmap
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from protocol import vhost_user as vu
from protocol import vmw
from protocol.errors import FormatError, LocalError
from protocol.vhost_user import FrontendRequest as R
from protocol.vhost_user import ProtocolFeature as PF
from protocol.vhost_user import VirtioFeature as VF

from .driver import BalloonDriver, DriverConfig
from .guest_memory import PAGE_SIZE, PAGES_PER_2M, GuestMemory, Workload, WorkloadSpec
from .transport import DeviceGone
from .virtq import Buffer, DriverQueue, RingLayout

log = logging.getLogger(__name__)

QVA_BASE = 0x7F00_0000_0000  # the front-end "virtual address" of GPA 0 (any value works)
RING_GPA = (0x0, 0x8000)
QUEUE_SIZE = 64
REQ_GPA = 0x40000
RESP_GPA = REQ_GPA + 32
EVENT_GPA = 0x50000
EVENT_BUFFERS = 8
KERNEL_PAGES = PAGES_PER_2M - 1  # pfn 511 stays free: the guest memory model's batch page
COMMAND_TIMEOUT = 10.0
#: Virtio features we accept: no EVENT_IDX (we want every call), no indirect descriptors.
WANTED_FEATURES = VF.VERSION_1 | VF.PROTOCOL_FEATURES
WANTED_PROTOCOL = PF.REPLY_ACK | PF.MQ


class MiniFrontend:
    """A vhost-user front-end for one vmw device; guest RAM is a memfd at GPA 0."""

    def __init__(self, sock: trio.socket.SocketType, ram_bytes: int) -> None:
        self.sock = sock
        self.ram_bytes = ram_bytes
        self.fd = os.memfd_create("vballoon-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, ram_bytes)
        self.map = mmap.mmap(self.fd, ram_bytes, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)
        self.acked_protocol = 0
        self.queues: list[DriverQueue] = []
        self.kicks: list[int] = []
        self.calls: list[int] = []
        self.closed = False

    @classmethod
    async def connect(cls, path: str, ram_bytes: int) -> MiniFrontend:
        if ram_bytes < 4 * PAGES_PER_2M * PAGE_SIZE or ram_bytes % (PAGES_PER_2M * PAGE_SIZE):
            raise LocalError("guest RAM must be a multiple of 2 MiB, at least 8 MiB")
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, ram_bytes)

    # -- memory port ------------------------------------------------------------------
    async def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.view[gpa : gpa + n])

    async def write(self, gpa: int, data: bytes) -> None:
        self.view[gpa : gpa + len(data)] = data

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    # -- vhost-user messages -----------------------------------------------------------
    async def _send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
                    need_reply: bool = False) -> None:
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        data = vu.build_header(request, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sent = await self.sock.sendmsg([data], anc)
            while sent < len(data):
                sent += await self.sock.send(data[sent:])
        except OSError as exc:
            raise DeviceGone(f"vhost-user socket: {exc}") from None

    async def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = await self.sock.recv(n - len(buf))
            except OSError:
                chunk = b""
            if not chunk:
                raise DeviceGone("the back-end closed the vhost-user connection")
            buf += chunk
        return buf

    async def _request(self, request: R, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """Send; return the reply body (GET_*) or check the REPLY_ACK ack."""
        has_body = request in vu.REPLY_PAYLOAD
        ack = not has_body and bool(self.acked_protocol & PF.REPLY_ACK)
        await self._send(request, payload, fds, need_reply=ack)
        if not (has_body or ack):
            return b""
        header = vu.parse_header(await self._recv_exact(vu.HEADER_SIZE))
        body = await self._recv_exact(header.size) if header.size else b""
        if header.request != request:
            raise DeviceGone(f"reply to {request.name} came back as request {header.request}")
        if ack and int.from_bytes(body, "little"):
            raise DeviceGone(f"the back-end refused {request.name}")
        return body

    async def start(self) -> None:
        features = int.from_bytes(await self._request(R.GET_FEATURES), "little")
        if features & VF.PROTOCOL_FEATURES:
            offered = int.from_bytes(await self._request(R.GET_PROTOCOL_FEATURES), "little")
            want = offered & WANTED_PROTOCOL
            await self._request(R.SET_PROTOCOL_FEATURES, vu.u64(want))
            self.acked_protocol = want
            if want & PF.MQ:
                await self._request(R.GET_QUEUE_NUM)
        await self._request(R.SET_OWNER)
        acked = features & WANTED_FEATURES
        await self._request(R.SET_FEATURES, vu.u64(acked))
        region = {"guest_phys_addr": 0, "memory_size": self.ram_bytes,
                  "userspace_addr": QVA_BASE, "mmap_offset": 0}
        table = vu.build_payload(vu.MEMORY_TABLE,
                                 {"nregions": 1, "padding": 0, "regions": [region]}, "table")
        await self._request(R.SET_MEM_TABLE, table, [self.fd])
        for index, gpa in enumerate(RING_GPA):
            layout = RingLayout.contiguous(gpa, QUEUE_SIZE)
            ring = DriverQueue(self, layout, event_idx=False)
            await ring.init()
            state = vu.build_payload(vu.VRING_STATE, {"index": index, "num": QUEUE_SIZE}, "s")
            await self._request(R.SET_VRING_NUM, state)
            base = vu.build_payload(vu.VRING_STATE, {"index": index, "num": 0}, "s")
            await self._request(R.SET_VRING_BASE, base)
            addr = {"index": index, "flags": 0, "desc": QVA_BASE + layout.desc,
                    "used": QVA_BASE + layout.used, "avail": QVA_BASE + layout.avail, "log": 0}
            await self._request(R.SET_VRING_ADDR,
                                vu.build_payload(vu.VRING_ADDRESS, addr, "vring address"))
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            await self._request(R.SET_VRING_KICK, vu.u64(index), [kick])
            await self._request(R.SET_VRING_CALL, vu.u64(index), [call])
            if acked & VF.PROTOCOL_FEATURES:
                on = vu.build_payload(vu.VRING_STATE, {"index": index, "num": 1}, "s")
                await self._request(R.SET_VRING_ENABLE, on)
            self.queues.append(ring)
            self.kicks.append(kick)
            self.calls.append(call)

    def reserved_ranges(self) -> list[tuple[int, int]]:
        """(first pfn, count) of everything the front-end placed in guest RAM."""
        return [(0, KERNEL_PAGES)]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sock.close()
        for fd in (*self.kicks, *self.calls):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(BufferError):  # a view is still exported: the GC unmaps
            self.view.release()
            self.map.close()
        os.close(self.fd)


async def _wait_call(fd: int, timeout: float) -> None:
    """Wait until the call eventfd fires (or ``timeout``); drain it."""
    with trio.move_on_after(timeout):
        await trio.lowlevel.wait_readable(fd)
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(fd)


class VhostUserTransport:
    """:class:`guest_driver.transport.Transport` over :class:`MiniFrontend`."""

    def __init__(self, fe: MiniFrontend) -> None:
        self.fe = fe
        self._lock = trio.Lock()
        self._event_gpa: dict[int, int] = {}  # descriptor head -> event buffer

    async def post_event_buffers(self) -> None:
        q = self.fe.queues[1]
        for i in range(EVENT_BUFFERS):
            gpa = EVENT_GPA + 16 * i
            self._event_gpa[await q.add([Buffer(gpa, vmw.EVENT_SIZE, write=True)])] = gpa
        os.eventfd_write(self.fe.kicks[1], 1)

    async def command(self, request: vmw.Request) -> vmw.Response:
        async with self._lock:
            q, fe = self.fe.queues[0], self.fe
            await fe.write(REQ_GPA, request.build())
            await fe.write(RESP_GPA, bytes(vmw.RESPONSE_SIZE))
            head = await q.add([Buffer(REQ_GPA, vmw.REQUEST_SIZE),
                                Buffer(RESP_GPA, vmw.RESPONSE_SIZE, write=True)])
            try:
                os.eventfd_write(fe.kicks[0], 1)
            except OSError as exc:
                raise DeviceGone(str(exc)) from None
            deadline = trio.current_time() + COMMAND_TIMEOUT
            while True:
                used = [u for u in await q.poll_used() if u.id == head]
                if used:
                    break
                if fe.closed or trio.current_time() > deadline:
                    raise DeviceGone(f"no answer to command {request.command}")
                await _wait_call(fe.calls[0], 0.05)
            if used[0].len != vmw.RESPONSE_SIZE:
                raise DeviceGone(f"command {request.command} answered with {used[0].len} bytes")
            return vmw.Response.parse(await fe.read(RESP_GPA, vmw.RESPONSE_SIZE))

    async def read(self, gpa: int, n: int) -> bytes:
        return await self.fe.read(gpa, n)

    async def write(self, gpa: int, data: bytes) -> None:
        await self.fe.write(gpa, data)

    async def wait_event(self, timeout: float) -> vmw.EventKind | None:
        q = self.fe.queues[1]
        deadline = trio.current_time() + timeout
        while True:
            used = await q.poll_used()
            if used:
                kinds = []
                for u in used:
                    gpa = self._event_gpa.pop(u.id)
                    raw = await self.fe.read(gpa, vmw.EVENT_SIZE)
                    try:
                        kinds.append(vmw.parse_event(raw))
                    except FormatError as exc:
                        log.warning("bad doorbell event: %s", exc)
                    await self.fe.write(gpa, bytes(vmw.EVENT_SIZE))
                    head = await q.add([Buffer(gpa, vmw.EVENT_SIZE, write=True)])
                    self._event_gpa[head] = gpa
                os.eventfd_write(self.fe.kicks[1], 1)
                if kinds:
                    return kinds[-1]
                continue
            left = deadline - trio.current_time()
            if left <= 0:
                return None
            await _wait_call(self.fe.calls[1], left)

    @property
    def doorbell_ids(self) -> tuple[int, int] | None:
        return (2, 1)  # any pair but (INVALID, INVALID): the eventq is the doorbell


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

    fe: MiniFrontend
    transport: VhostUserTransport
    memory: GuestMemory
    driver: BalloonDriver
    workload: Workload | None

    def status(self) -> dict[str, Any]:
        info = self.memory.meminfo()
        return {
            "driver": self.driver.snapshot(),
            "debugfs": self.driver.render(),
            "meminfo": {k: getattr(info, k) for k in info.__dataclass_fields__},
            "ram_bytes": self.fe.ram_bytes,
            "ram_allocated_bytes": self.fe.allocated_bytes(),
            "workload_shortfall": self.workload.shortfall if self.workload else 0,
            "lost_pages": self.memory.verify_app(),
        }


async def run_guest(
    options: GuestOptions, *, task_status: trio.TaskStatus[Guest] = trio.TASK_STATUS_IGNORED
) -> None:
    """Connect, set up, run the driver until cancelled; then START(0) and pop (shielded)."""
    from .cli import serve_control

    fe = await MiniFrontend.connect(options.socket_path, options.ram_bytes)
    try:
        await fe.start()
        transport = VhostUserTransport(fe)
        await transport.post_event_buffers()
        memory = GuestMemory(options.ram_bytes // PAGE_SIZE, reserved=fe.reserved_ranges(),
                             ram=fe.view)
        driver = BalloonDriver(transport, memory, options.config)
        workload = Workload(memory, options.workload) if options.workload else None
        guest = Guest(fe, transport, memory, driver, workload)

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
    finally:
        fe.close()


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
