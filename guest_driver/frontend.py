"""Our vhost-user front-end, in Python (trio): what QEMU does for a vhost-user device.

* :class:`GuestRamFile`: guest RAM as a sparse memfd, optionally laid out like QEMU's
  low RAM with the two ROM holes (``layout="qemu"``), with a fake front-end virtual address
  space (``uva = UVA_BASE + file offset``, like QEMU's single mapping of the memfd).
  ``layout="flat"`` is one region at any ``gpa`` (the conformance front-end's RAM).
* :class:`MemfdPort`: the async memory port :mod:`guest_driver.virtq` runs over (over one or
  more RAM files).
* The bytes go through :mod:`guest_driver.wire` (SCM_RIGHTS, exact reads, hang-up, connect
  retry), the wire both front-ends share.
* :class:`VhostUserFrontend` (open it with :func:`connect_frontend`): connects to the
  back-end's socket and speaks QEMU 10's message order (docs: qemu-interop.md sections 1-2):
  :meth:`~VhostUserFrontend.handshake` (realize) then :meth:`~VhostUserFrontend.start`
  (DRIVER_OK): features, protocol features, queue count, memory slots, the back-end channel
  (a socketpair whose CONFIG_CHANGE_MSGs it services and counts), owner, memory table
  (SET_MEM_TABLE, or ADD_MEM_REG with CONFIGURE_MEM_SLOTS), then per queue
  NUM/BASE/ADDR/KICK/CALL and ENABLE for all. :meth:`~VhostUserFrontend.stop` does
  GET_VRING_BASE per queue; ``start`` again restarts from those bases.
  :meth:`~VhostUserFrontend.request` / :meth:`~VhostUserFrontend.send_raw` are there for
  hostile tests.
* :class:`VmwChannel`: vmmemctl commands on ``cmdq`` (up to :data:`COMMAND_SLOTS` in flight,
  each with an optional batch page), and doorbell events from ``eventq``.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import select
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from guest_driver.virtq import Buffer, DriverQueue, RingLayout
from guest_driver.wire import WireChannel, connect_retrying
from protocol import vhost_user as vu
from protocol.errors import BackendError, FormatError, LocalError
from protocol.units import PAGE_SIZE
from protocol.vhost_user import FrontendRequest as R
from protocol.vhost_user import ProtocolFeature as PF
from protocol.vhost_user import VirtioFeature as VF
from protocol.vmw import (
    EVENT_SIZE,
    REQUEST_SIZE,
    RESPONSE_SIZE,
    EventKind,
    Request,
    Response,
    parse_event,
)

UVA_BASE = 0x7F00_0000_0000
#: QEMU's x86 low-RAM holes (VGA/ROM at 0xc0000-0xdffff, BIOS shadow at 0xf0000-0xfffff).
QEMU_HOLES = ((0xC0000, 0xE0000), (0xF0000, 0x100000))
WANTED_FEATURES = VF.VERSION_1 | VF.RING_INDIRECT_DESC | VF.RING_EVENT_IDX
WANTED_PROTOCOL = (
    PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.RESET_DEVICE
)
#: Where the rings of queue 0 start (the first RAM page above QEMU's holes).
RING_BASE = 0x100000


@dataclass(frozen=True, slots=True)
class RegionLayout:
    gpa: int
    size: int
    offset: int  # in the memfd

    @property
    def uva(self) -> int:
        """The fake front-end virtual address of ``gpa`` (one address space for all RAM)."""
        return UVA_BASE + self.gpa

    def vhost_region(self) -> dict[str, int]:
        """The region as SET_MEM_TABLE / ADD_MEM_REG carry it."""
        return {
            "guest_phys_addr": self.gpa,
            "memory_size": self.size,
            "userspace_addr": self.uva,
            "mmap_offset": self.offset,
        }


class GuestRamFile:
    """Guest RAM: one sparse memfd, mapped once, split into regions. With ``layout="qemu"``
    QEMU's low RAM with its two ROM holes (gpa == file offset); ``"flat"`` is one region at
    ``gpa`` (the whole file). The guest-RAM class of every front-end we have."""

    def __init__(
        self, size: int, *, layout: str = "qemu", name: str = "guest-ram", gpa: int = 0
    ) -> None:
        if size % PAGE_SIZE or size <= 0 or (layout == "qemu" and size < 2 * RING_BASE):
            raise LocalError("guest RAM must be page-aligned (QEMU's layout: at least 2 MiB)")
        if layout == "qemu" and gpa:
            raise LocalError("QEMU's layout starts at gpa 0")
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if layout == "flat":
            self.regions = [RegionLayout(gpa, size, 0)]
        elif layout == "qemu":
            self.regions = []
            start = 0
            for lo, hi in QEMU_HOLES:
                self.regions.append(RegionLayout(start, lo - start, start))
                start = hi
            self.regions.append(RegionLayout(start, size - start, start))
        else:
            raise LocalError(f"unknown RAM layout {layout!r}")

    def holes(self) -> list[tuple[int, int]]:
        """(first pfn, count) of the gaps between regions: not RAM, never a guest's to use."""
        out, end = [], 0
        for r in self.regions:
            if r.gpa > end:
                out.append((end // PAGE_SIZE, (r.gpa - end) // PAGE_SIZE))
            end = r.gpa + r.size
        return out

    def is_ram(self, gpa: int, length: int = 1) -> bool:
        return any(r.gpa <= gpa and gpa + length <= r.gpa + r.size for r in self.regions)

    def _offset(self, gpa: int, length: int) -> int:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.offset + gpa - r.gpa
        raise LocalError(f"{gpa:#x}+{length:#x} is not guest RAM")

    def read(self, gpa: int, length: int) -> bytes:
        off = self._offset(gpa, length)
        return self.mm[off : off + length]

    def write(self, gpa: int, data: bytes) -> None:
        off = self._offset(gpa, len(data))
        self.mm[off : off + len(data)] = data

    def fill(self, gpa: int, length: int, byte: int) -> None:
        off = self._offset(gpa, length)
        self.mm[off : off + length] = bytes([byte]) * length

    def vhost_regions(self) -> list[dict[str, int]]:
        """Every region as SET_MEM_TABLE / ADD_MEM_REG carry it (all in :attr:`fd`)."""
        return [r.vhost_region() for r in self.regions]

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    @property
    def total_pages(self) -> int:
        return sum(r.size for r in self.regions) // PAGE_SIZE

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class MemfdPort:
    """The async memory port of :mod:`guest_driver.virtq` over one or more
    :class:`GuestRamFile` (``rams``: more can be added, e.g. a region hot-added by
    ADD_MEM_REG)."""

    def __init__(self, *rams: GuestRamFile) -> None:
        self.rams = list(rams)

    @property
    def ram(self) -> GuestRamFile:
        """The first (main) RAM."""
        return self.rams[0]

    def _find(self, gpa: int, n: int) -> GuestRamFile:
        for ram in self.rams:
            if ram.is_ram(gpa, n):
                return ram
        raise LocalError(f"{gpa:#x}+{n:#x} is not guest RAM")

    async def read(self, gpa: int, n: int) -> bytes:
        return self._find(gpa, n).read(gpa, n)

    async def write(self, gpa: int, data: bytes) -> None:
        self._find(gpa, len(data)).write(gpa, data)


@dataclass
class FrontendQueue:
    index: int
    driver: DriverQueue
    kick_fd: int
    call_fd: int
    started: bool = False
    base: int = 0
    initialized: bool = False

    @property
    def layout(self) -> RingLayout:
        return self.driver.layout

    async def kick(self) -> None:
        """Notify the back-end if the ring wants it."""
        if await self.driver.needs_kick():
            os.eventfd_write(self.kick_fd, 1)

    async def wait_call(self) -> None:
        await trio.lowlevel.wait_readable(self.call_fd)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.call_fd)


@dataclass
class _BackendChannel:
    sock: trio.socket.SocketType
    config_changes: int = 0
    changed: trio.Event = field(default_factory=trio.Event)


class VhostUserFrontend:
    """A vhost-user front-end on one connection (use :func:`connect_frontend`)."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        ram: GuestRamFile,
        nursery: trio.Nursery | None = None,
        *,
        queue_size: int = 64,
        wanted_features: int = int(WANTED_FEATURES),
        wanted_protocol: int = int(WANTED_PROTOCOL),
    ) -> None:
        self.sock = sock
        self.wire = WireChannel(sock, on_hangup=self._mark_hung_up)
        self.ram = ram
        self.port = MemfdPort(ram)
        self.queue_size = queue_size
        self.wanted_features = wanted_features
        self.wanted_protocol = wanted_protocol
        self.features = 0
        self.protocol_features = 0
        self.num_queues = 0
        self.queues: list[FrontendQueue] = []
        self.backend: _BackendChannel | None = None
        self.offered_features: int | None = None  # GET_FEATURES's answer, once probed
        self._lock = trio.Lock()
        self._sent_regions: set[tuple[int, int]] = set()
        #: Set when the back-end hangs up (EOF or reset on the socket), even while no
        #: request is in flight: see :meth:`cancel_on_hangup`.
        self.hung_up = trio.Event()
        self._hangup_scopes: set[trio.CancelScope] = set()
        # a private epoll set that turns readable only on the peer's hang-up, not on data
        self._hangup_poll = select.epoll(1)
        self._hangup_poll.register(sock.fileno(), select.EPOLLRDHUP)
        self._nursery = nursery
        if nursery is not None:
            self.run_in(nursery)

    def run_in(self, nursery: trio.Nursery) -> None:
        """Where this front-end's own tasks run (the hang-up watcher, the back-end channel);
        needed before :meth:`handshake`."""
        self._nursery = nursery
        nursery.start_soon(self._watch_hangup)

    @property
    def nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise LocalError("front-end not running in a nursery yet (run_in)")
        return self._nursery

    # -- hang-up -------------------------------------------------------------------------

    async def _watch_hangup(self) -> None:
        try:
            await trio.lowlevel.wait_readable(self._hangup_poll.fileno())
        except (OSError, trio.ClosedResourceError):
            return  # closed by us
        self._mark_hung_up()

    def _mark_hung_up(self) -> None:
        if not self.hung_up.is_set():
            self.hung_up.set()
            for scope in self._hangup_scopes:
                scope.cancel()

    @contextlib.contextmanager
    def cancel_on_hangup(self) -> Iterator[trio.CancelScope]:
        """A cancel scope cancelled as soon as the back-end hangs up (at once if it has):
        wrap waits that only the back-end can end (a used ring, a call eventfd), then check
        ``scope.cancelled_caught`` / :attr:`hung_up`."""
        with trio.CancelScope() as scope:
            if self.hung_up.is_set():
                scope.cancel()
            self._hangup_scopes.add(scope)
            try:
                yield scope
            finally:
                self._hangup_scopes.discard(scope)

    # -- messages ------------------------------------------------------------------------

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes (fds attached to the first byte), no checks: for hostile tests."""
        await self.wire.send(data, fds)

    async def recv_reply(self, request: int) -> bytes:
        try:
            reply = await self.wire.recv_message()
        except FormatError as exc:
            raise BackendError(f"bad reply to {request}: {exc}") from None
        if reply.flags != vu.REPLY_FLAGS or reply.request != request:
            raise BackendError(f"bad reply header: request {reply.request} flags {reply.flags:#x}")
        return reply.payload

    async def request(
        self,
        request: R,
        body: Any = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
    ) -> bytes | None:
        """Send one request; return the reply payload (or None when none is owed).

        ``need_reply`` defaults to what QEMU does: NEED_REPLY on the requests QEMU sends it
        with, when REPLY_ACK was negotiated. A non-zero ack raises BackendError.
        """
        fmt = vu.REQUEST_PAYLOAD.get(request)
        payload = b"" if fmt is None else vu.build_payload(fmt, body, request.name)
        if need_reply is None:
            need_reply = bool(self.protocol_features & PF.REPLY_ACK) and request in (
                R.SET_BACKEND_REQ_FD,
                R.SET_MEM_TABLE,
                R.ADD_MEM_REG,
                R.REM_MEM_REG,
                R.SET_VRING_ENABLE,
                R.SET_CONFIG,
                R.RESET_DEVICE,
            )
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        async with self._lock:
            await self.send_raw(vu.build_message(request, payload, flags), fds)
            if request in vu.REPLY_PAYLOAD:
                return await self.recv_reply(request)
            if need_reply:
                ack = await self.recv_reply(request)
                if vu.parse_payload(vu.U64, ack, "ack").value != 0:
                    raise BackendError(f"back-end refused {request.name}")
                return ack
        return None

    async def get_u64(self, request: R) -> int:
        reply = await self.request(request)
        assert reply is not None
        return int(vu.parse_payload(vu.U64, reply, request.name).value)

    # -- QEMU's sequences ----------------------------------------------------------------

    async def probe(self) -> int:
        """GET_FEATURES, QEMU's first message: raises :class:`BackendHungUp` when the back-end
        refuses the connection (closes it); :meth:`handshake` goes on from here."""
        if self.offered_features is None:
            self.offered_features = await self.get_u64(R.GET_FEATURES)
        return self.offered_features

    async def handshake(self) -> None:
        """Device realize: QEMU's order (qemu-interop.md section 1)."""
        offered = await self.probe()
        if not offered & VF.PROTOCOL_FEATURES:
            raise BackendError("back-end does not offer PROTOCOL_FEATURES")
        offered_proto = await self.get_u64(R.GET_PROTOCOL_FEATURES)
        self.protocol_features = offered_proto & self.wanted_protocol
        await self.request(R.SET_PROTOCOL_FEATURES, {"value": self.protocol_features})
        self.num_queues = (
            await self.get_u64(R.GET_QUEUE_NUM) if self.protocol_features & PF.MQ else 2
        )
        if self.protocol_features & PF.CONFIGURE_MEM_SLOTS:
            await self.get_u64(R.GET_MAX_MEM_SLOTS)
        if self.protocol_features & PF.BACKEND_REQ:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await self.request(R.SET_BACKEND_REQ_FD, None, [theirs.fileno()])
            finally:
                theirs.close()
            self.backend = _BackendChannel(trio.socket.from_stdlib_socket(mine))
            self.nursery.start_soon(self._serve_backend, self.backend)
        await self.request(R.SET_OWNER)
        self.features = (await self.get_u64(R.GET_FEATURES)) & self.wanted_features
        base = RING_BASE
        for i in range(self.num_queues):
            layout = RingLayout.contiguous(base, self.queue_size)
            base += RingLayout.footprint(self.queue_size)
            q = FrontendQueue(
                index=i,
                driver=DriverQueue(
                    self.port, layout, event_idx=bool(self.features & VF.RING_EVENT_IDX)
                ),
                kick_fd=os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
                call_fd=os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
            )
            self.queues.append(q)
            # QEMU's realize-time masked notifiers
            await self.request(R.SET_VRING_CALL, {"value": i}, [q.call_fd])
            await self.request(R.SET_VRING_ERR, {"value": i | vu.VRING_NOFD_MASK})
        self.scratch = base  # first free page after the rings

    async def set_memory(self) -> None:
        regions = self.ram.vhost_regions()
        if self.protocol_features & PF.CONFIGURE_MEM_SLOTS:
            # like QEMU: only the regions the back-end does not have yet
            for region in regions:
                key = (region["guest_phys_addr"], region["memory_size"])
                if key in self._sent_regions:
                    continue
                self._sent_regions.add(key)
                await self.request(R.ADD_MEM_REG, {"padding": 0, "region": region}, [self.ram.fd])
        else:
            await self.request(
                R.SET_MEM_TABLE,
                {"nregions": len(regions), "padding": 0, "regions": regions},
                [self.ram.fd] * len(regions),
            )

    async def start(self, *, init_rings: bool = True, queues: Sequence[int] | None = None) -> None:
        """DRIVER_OK: QEMU's start sequence (qemu-interop.md section 2)."""
        await self.request(R.SET_FEATURES, {"value": self.features | VF.PROTOCOL_FEATURES})
        await self.set_memory()
        for q in self.queues:
            if queues is not None and q.index not in queues:
                continue
            if init_rings and not q.initialized:
                await q.driver.init()
                q.initialized = True
            lay = q.layout
            i = q.index
            await self.request(R.SET_VRING_NUM, {"index": i, "num": lay.size})
            await self.request(R.SET_VRING_BASE, {"index": i, "num": q.base})
            await self.request(
                R.SET_VRING_ADDR,
                {
                    "index": i,
                    "flags": 0,
                    "desc": UVA_BASE + lay.desc,
                    "used": UVA_BASE + lay.used,
                    "avail": UVA_BASE + lay.avail,
                    "log": 0,
                },
            )
            os.eventfd_write(q.kick_fd, 1)  # QEMU hands the kick fd over already signalled
            await self.request(R.SET_VRING_KICK, {"value": i}, [q.kick_fd])
            await self.request(R.SET_VRING_CALL, {"value": i}, [q.call_fd])
            q.started = True
        for q in self.queues:
            await self.request(R.SET_VRING_ENABLE, {"index": q.index, "num": 1})
        for q in self.queues:  # the unmask pass: the same call fd again
            await self.request(R.SET_VRING_CALL, {"value": q.index}, [q.call_fd])

    async def reboot(self) -> None:
        """A guest reset or VM reboot: the rings stop; the new driver re-initialises them
        (:meth:`start` zeroes the ring memory and the driver's indices) and QEMU restarts
        them at 0."""
        await self.stop()
        for q in self.queues:
            q.base = 0
            q.initialized = False
        await self.start()

    async def stop(self) -> list[int]:
        """Guest reset: SET_VRING_ENABLE(0) for all, GET_VRING_BASE per started queue."""
        for q in self.queues:
            await self.request(R.SET_VRING_ENABLE, {"index": q.index, "num": 0})
        bases = []
        for q in self.queues:
            if not q.started:
                continue
            reply = await self.request(R.GET_VRING_BASE, {"index": q.index, "num": 0})
            assert reply is not None
            state = vu.parse_payload(vu.VRING_STATE, reply, "vring state")
            q.base = int(state.num)
            q.started = False
            bases.append(q.base)
        return bases

    async def get_config(self, offset: int, size: int) -> bytes:
        reply = await self.request(
            R.GET_CONFIG, {"offset": offset, "size": size, "flags": 0, "data": bytes(size)}
        )
        assert reply is not None
        return bytes(vu.parse_payload(vu.CONFIG, reply, "config").data)

    async def set_config(self, offset: int, data: bytes) -> None:
        await self.request(
            R.SET_CONFIG, {"offset": offset, "size": len(data), "flags": 0, "data": data}
        )

    async def _serve_backend(self, ch: _BackendChannel) -> None:
        """Read back-end requests; count CONFIG_CHANGE_MSG; ack when asked."""
        buf = bytearray()
        try:
            while True:
                chunk = await ch.sock.recv(4096)
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= vu.HEADER_SIZE:
                    h = vu.parse_header(bytes(buf[: vu.HEADER_SIZE]))
                    if len(buf) < vu.HEADER_SIZE + h.size:
                        break
                    del buf[: vu.HEADER_SIZE + h.size]
                    ok = h.request == vu.BackendRequest.CONFIG_CHANGE_MSG
                    if ok:
                        ch.config_changes += 1
                        ch.changed.set()
                        ch.changed = trio.Event()
                    if h.flags & vu.FLAG_NEED_REPLY:
                        await ch.sock.send(
                            vu.build_message(h.request, vu.u64(0 if ok else 1), vu.REPLY_FLAGS)
                        )
        except (OSError, trio.ClosedResourceError):
            return

    async def wait_config_change(self) -> int:
        """Wait for the next CONFIG_CHANGE_MSG; returns the total seen."""
        assert self.backend is not None
        await self.backend.changed.wait()
        return self.backend.config_changes

    def close(self) -> None:
        for q in self.queues:
            for fd in (q.kick_fd, q.call_fd):
                trio.lowlevel.notify_closing(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.queues = []
        if self.backend is not None:
            self.backend.sock.close()
        if not self._hangup_poll.closed:
            trio.lowlevel.notify_closing(self._hangup_poll.fileno())
            self._hangup_poll.close()
        self.sock.close()


async def open_frontend(
    path: str, ram: GuestRamFile, *, probe: bool = True, retry: float = 0.0, **kw: Any
) -> VhostUserFrontend:
    """Connect (and :meth:`~VhostUserFrontend.probe`), retrying refusals for ``retry``
    seconds (:func:`guest_driver.wire.connect_retrying`, see :func:`connect_frontend`);
    nothing is left open when this raises. The caller owns the front-end:
    :meth:`~VhostUserFrontend.run_in` a nursery, then close it."""

    async def first(chan: WireChannel) -> VhostUserFrontend:
        fe = VhostUserFrontend(chan.sock, ram, **kw)
        try:
            if probe:
                await fe.probe()
        except BaseException:
            fe.close()
            raise
        return fe

    return await connect_retrying(path, first, retry=retry)


@contextlib.asynccontextmanager
async def connect_frontend(
    path: str,
    ram: GuestRamFile,
    *,
    handshake: bool = True,
    start: bool = True,
    retry: float = 0.0,
    **kw: Any,
) -> AsyncIterator[VhostUserFrontend]:
    """Connect to a back-end socket; by default run the handshake and the start sequence.

    ``retry`` (seconds): keep trying while the back-end refuses us -- nothing listens yet, or
    it hangs up on the first message (GET_FEATURES) because it serves one front-end per
    socket and has not yet noticed the previous one leave (vdev waits a moment, then
    refuses). Without ``handshake`` only the connect itself is retried. Connecting raises
    plain exceptions (``OSError``, :class:`BackendHungUp`); later ones come out of the
    front-end's nursery."""
    fe = await open_frontend(path, ram, probe=handshake, retry=retry, **kw)
    try:
        async with trio.open_nursery() as nursery:
            fe.run_in(nursery)
            try:
                if handshake:
                    await fe.handshake()
                    if start:
                        await fe.start()
                yield fe
            finally:
                nursery.cancel_scope.cancel()
    finally:
        fe.close()


@dataclass(frozen=True)
class Patience:
    """How a command waits for a device that stops answering (a vdev being restarted keeps
    the connection but answers nothing for a while): kick again every ``rekick`` seconds
    and call ``on_wait(seconds waited so far)``, which raises to give up."""

    rekick: float
    on_wait: Callable[[float], None]


#: commands one VmwChannel keeps in flight at most (256-byte slots of its scratch page)
COMMAND_SLOTS = 16
_SLOT_SIZE = 0x100
_RESPONSE_OFFSET = 0x80


class VmwChannel:
    """vmmemctl commands on ``cmdq`` and doorbell events on ``eventq`` of a front-end.

    Requests and responses live in one scratch page (``fe.scratch`` by default): up to
    :data:`COMMAND_SLOTS` commands may be in flight at once, each in its own 256-byte slot
    (request at the slot's start, response 128 bytes in); the event buffers are in the page
    after it. ``command`` writes an optional batch page at ``batch_pfn`` first and reads it
    back after; concurrent commands must use different batch pages (PROTOCOL.md section 2).
    :meth:`reserved_ranges` lists the pages a guest kernel on top must never hand out (they
    hold the rings and this channel's buffers).

    A slot is the device's from the moment its chain is posted until the chain comes back in
    the used ring. A command cancelled before that (a stop in the middle of commands) leaves
    its slot *parked*: no other command writes it until the device answers the chain, or
    cmdq's ring is reset (re-initialised: the device forgets every chain on it). Whoever
    waits, for an answer or for a free slot, takes its turn polling the used ring for all,
    so parked slots come back even when every slot is parked.
    """

    def __init__(self, fe: VhostUserFrontend, *, scratch: int | None = None) -> None:
        self.fe = fe
        self.scratch = fe.scratch if scratch is None else scratch
        self.request_gpa = self.scratch  # slot 0's
        self.response_gpa = self.scratch + _RESPONSE_OFFSET
        self.event_gpa = self.scratch + PAGE_SIZE  # one page of 8-byte event buffers
        self.end = self.event_gpa + PAGE_SIZE  # first byte after this channel's pages
        self.bad_events = 0  # event buffers that did not parse (skipped)
        self.rekicks = 0  # kicks sent again to a device that was not answering
        self.posted = 0  # commands posted on cmdq
        self.answered = 0  # ... and answered (each once: see ``cmdq.driver.stray_used``)
        self._free_slots = list(range(COMMAND_SLOTS))  # ascending: the lowest is taken first
        self._posted: dict[int, tuple[int, int]] = {}  # slot -> (head, ring resets) in flight
        self._parked: dict[int, int] = {}  # head -> slot of a cancelled command in flight
        self._resets = 0  # times cmdq's ring was reset under this channel
        self._watched: DriverQueue | None = None  # the cmdq ring whose resets we follow
        self._polling = False  # a task polls cmdq's used ring for all (one at a time)
        self._poll_wait: trio.CancelScope | None = None  # the poller's wait for a call
        self._progress = trio.Event()  # set (and replaced) by _wake
        self._ring_lock = trio.Lock()
        self._used: dict[int, int] = {}  # head -> used length, for the task waiting on it
        self._event_heads: dict[int, int] = {}
        self._free_event_slots = list(range(PAGE_SIZE // EVENT_SIZE))
        self._events: list[EventKind] = []

    def reserved_ranges(self) -> list[tuple[int, int]]:
        """(first pfn, count) a guest kernel must keep for itself: all of RAM below
        :attr:`end` (low memory, every queue's rings, the request and event pages) and the
        holes between RAM regions."""
        return [(0, -(-self.end // PAGE_SIZE)), *self.fe.ram.holes()]

    @property
    def cmdq(self) -> FrontendQueue:
        return self.fe.queues[0]

    @property
    def eventq(self) -> FrontendQueue:
        return self.fe.queues[1]

    def slot_gpa(self, slot: int) -> int:
        """Where command slot ``slot`` starts (its request; the response is 128 bytes in)."""
        return self.scratch + slot * _SLOT_SIZE

    @property
    def parked_slots(self) -> list[int]:
        """Slots of cancelled commands whose chains the device still holds."""
        return sorted(self._parked.values())

    # -- waiting: one poller files every answer, the others wait for it --------------------

    def _wake(self) -> None:
        """Something changed (an answer filed, a slot freed, the ring reset, the poller
        left): every waiter looks again, the poller too (its wait for a call ends)."""
        self._progress.set()
        self._progress = trio.Event()
        if self._poll_wait is not None:
            self._poll_wait.cancel()

    def _free_slot(self, slot: int) -> None:
        bisect.insort(self._free_slots, slot)
        self._wake()

    def _live_heads(self) -> set[int]:
        """The heads of the commands in flight that a task still waits for."""
        return {head for head, _ in self._posted.values()}

    def _ring_reset(self) -> None:
        """cmdq's ring was re-initialised: the device holds none of its chains any more, so
        the parked slots are free; answers filed for no command left are dropped (their
        heads will be reused)."""
        self._resets += 1
        for slot in self._parked.values():
            bisect.insort(self._free_slots, slot)
        self._parked.clear()
        live = self._live_heads()
        self._used = {h: n for h, n in self._used.items() if h in live}
        self._wake()

    def _follow_resets(self, q: FrontendQueue) -> None:
        if self._watched is not q.driver:
            if self._watched is not None:
                self._watched.on_reset.remove(self._ring_reset)
            q.driver.on_reset.append(self._ring_reset)
            self._watched = q.driver

    async def _collect(self, q: FrontendQueue) -> None:
        """File every answer the used ring holds: for its waiting task, or, for a parked
        slot, free the slot."""
        used = await q.driver.poll_used()
        live = self._live_heads()
        for elem in used:
            slot = self._parked.pop(elem.id, None)
            if slot is None:
                if elem.id in live:  # else not ours in flight: counted as stray by the ring
                    self._used[elem.id] = elem.len
            else:  # its command was cancelled: nobody waits for the answer
                self.answered += 1
                bisect.insort(self._free_slots, slot)
        if used:
            self._wake()

    async def _wait_until(
        self, q: FrontendQueue, done: Callable[[], bool], patience: Patience | None
    ) -> None:
        """Wait until ``done()``: poll the used ring for everyone while nobody else does,
        else wait for whoever does (woken as soon as it files anything). With ``patience``,
        a device silent for ``patience.rekick`` seconds gets the kick again (one sent while
        it was down may be lost) and ``patience.on_wait(seconds waited)`` is told, which
        may raise to give up."""
        t0 = trio.current_time()
        while not done():
            if not self._polling:
                self._polling = True
                try:
                    await self._poll(q, done, patience, t0)
                finally:
                    self._polling = False
                    self._wake()  # another waiter takes over the polling
            elif patience is None:
                await self._progress.wait()
            else:
                with trio.move_on_after(patience.rekick) as quiet:
                    await self._progress.wait()
                if quiet.cancelled_caught:
                    patience.on_wait(trio.current_time() - t0)

    async def _poll(
        self, q: FrontendQueue, done: Callable[[], bool], patience: Patience | None, t0: float
    ) -> None:
        while True:
            await self._collect(q)
            if done():
                return
            with trio.CancelScope() as self._poll_wait:  # _wake ends the wait early
                try:
                    if patience is None:
                        await q.wait_call()
                        continue
                    with trio.move_on_after(patience.rekick) as silent:
                        await q.wait_call()
                    if silent.cancelled_caught:
                        self.rekicks += 1
                        os.eventfd_write(q.kick_fd, 1)
                        patience.on_wait(trio.current_time() - t0)
                finally:
                    self._poll_wait = None

    async def _complete(
        self, q: FrontendQueue, head: int, patience: Patience | None, resets: int
    ) -> int:
        """Wait until the device used chain ``head``, posted after ``resets`` ring resets;
        its used length. Whoever polls files every completion it finds, so concurrent
        commands each get their own (see :meth:`_wait_until` for ``patience``). The chain is
        never posted twice: the device answers it once."""
        await self._wait_until(q, lambda: head in self._used or self._resets != resets, patience)
        if head not in self._used:
            raise LocalError("cmdq was reset with the command in flight: it is never answered")
        self.answered += 1
        return self._used.pop(head)

    async def _take_slot(self, patience: Patience | None) -> int:
        if not self._free_slots:
            await self._wait_until(self.cmdq, lambda: bool(self._free_slots), patience)
        return self._free_slots.pop(0)  # the lowest free slot: slot 0 when alone

    def _settle(self, slot: int) -> None:
        """The command in ``slot`` is over (answered, failed or cancelled): free the slot,
        or park it while the device still holds its chain."""
        head, resets = self._posted.pop(slot, (None, self._resets))
        if head is not None and resets == self._resets:
            if head in self._used:  # answered, but the task was cancelled before it looked
                del self._used[head]
                self.answered += 1
            else:
                self._parked[head] = slot
                return
        self._free_slot(slot)

    async def command(
        self,
        request: Request,
        batch: bytes | None = None,
        *,
        batch_pfn: int | None = None,
        patience: Patience | None = None,
    ) -> tuple[Response, bytes | None]:
        """Send one command; return the response and the batch page as the device left it.
        ``patience``: how to wait for a device that stops answering (see :class:`Patience`;
        without it, for ever). Up to :data:`COMMAND_SLOTS` may be in flight (callers'
        tasks); more wait for a slot. Cancelled after it was posted, its slot stays parked
        until the device answers (see the class)."""
        self._follow_resets(self.cmdq)
        slot = await self._take_slot(patience)
        try:
            return await self._command(slot, request, batch, batch_pfn, patience)
        finally:
            self._settle(slot)

    async def _command(
        self,
        slot: int,
        request: Request,
        batch: bytes | None,
        batch_pfn: int | None,
        patience: Patience | None,
    ) -> tuple[Response, bytes | None]:
        ram = self.fe.ram
        request_gpa = self.slot_gpa(slot)
        response_gpa = request_gpa + _RESPONSE_OFFSET
        if batch is not None:
            if batch_pfn is None:
                batch_pfn = request.arg1
            ram.write(batch_pfn * PAGE_SIZE, batch)
        ram.write(request_gpa, request.build())
        ram.write(response_gpa, bytes(RESPONSE_SIZE))
        async with self._ring_lock:  # the avail ring is one writer's at a time
            # posted and recorded as one step: a cancel after it parks the slot
            with trio.CancelScope(shield=True):
                head = await self.cmdq.driver.add(
                    [
                        Buffer(request_gpa, REQUEST_SIZE),
                        Buffer(response_gpa, RESPONSE_SIZE, write=True),
                    ]
                )
                resets = self._resets
                self._posted[slot] = (head, resets)
                self.posted += 1
                await self.cmdq.kick()
        length = await self._complete(self.cmdq, head, patience, resets)
        del self._posted[slot]
        if length != RESPONSE_SIZE:
            raise BackendError(f"device wrote {length} response bytes")
        response = Response.parse(ram.read(response_gpa, RESPONSE_SIZE))
        after = None
        if batch is not None and batch_pfn is not None:
            after = ram.read(batch_pfn * PAGE_SIZE, len(batch))
        return response, after

    async def call(self, command: int, arg1: int = 0, arg2: int = 0) -> Response:
        response, _ = await self.command(Request(command, arg1, arg2))
        return response

    async def post_event_buffers(self, n: int = 4) -> None:
        """Make ``n`` 8-byte buffers available on eventq."""
        for _ in range(n):
            gpa = self.event_gpa + self._free_event_slots.pop(0) * EVENT_SIZE
            head = await self.eventq.driver.add([Buffer(gpa, EVENT_SIZE, write=True)])
            self._event_heads[head] = gpa
        await self.eventq.kick()

    async def next_event(self) -> EventKind:
        """Wait for the next doorbell event (re-posts the buffer it came in)."""
        q = self.eventq
        while not self._events:
            used = await q.driver.poll_used()
            for elem in used:
                gpa = self._event_heads.pop(elem.id)
                self._free_event_slots.append((gpa - self.event_gpa) // EVENT_SIZE)
                try:
                    self._events.append(parse_event(self.fe.ram.read(gpa, EVENT_SIZE)))
                except FormatError:
                    self.bad_events += 1
            if used:
                await self.post_event_buffers(len(used))
            else:
                await q.wait_call()
        return self._events.pop(0)
