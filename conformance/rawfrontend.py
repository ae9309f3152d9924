"""A low-level vhost-user front-end for conformance and hostile tests.

Unlike a well-behaved front-end, this one lets a test send any header, payload and fds
(wrong counts, bogus ring addresses, overlapping tables) and look at the exact reply bytes
(flags included). Guest RAM is a memfd the harness owns, shared with the back-end through
SET_MEM_TABLE / ADD_MEM_REG, so the harness can also read the back-end's effects on it
(zeros after reclaim, ``st_blocks`` of the file).

Layers:

* :class:`Channel`: the front-ends' one wire (:mod:`guest_driver.wire`: SCM_RIGHTS, exact
  reads, connect retry) with the knobs to send any header, size and fds and to see the
  reply's flags.
* guest RAM is :class:`guest_driver.frontend.GuestRamFile` (:func:`flat_ram`: one memfd
  region at a gpa), the rings' memory port :class:`guest_driver.frontend.MemfdPort`.
* :class:`Frontend`: negotiation and ring set-up the way QEMU does it (reference
  vhost-user-virtio.md §2.5), with every knob exposed.
* :class:`VmwGuest`, :class:`BalloonGuest`: issue vmmemctl commands on ``cmdq`` /
  inflate-deflate-stats on virtio-balloon queues through :class:`guest_driver.virtq.DriverQueue`.

Every wait is bounded by the caller's ``trio.fail_after``; :class:`BackendHungUp` means the
back-end hung up.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from guest_driver.frontend import (
    UVA_BASE as QVA_BASE,  # the fake front-end virtual address of gpa 0
)
from guest_driver.frontend import GuestRamFile, MemfdPort
from guest_driver.virtq import Buffer, DriverQueue, RingLayout, UsedElem
from guest_driver.wire import Message, WireChannel, connect_retrying
from protocol import vhost_user as vu
from protocol import virtio_balloon as vb
from protocol import vmw
from protocol.errors import BackendError, BackendHungUp
from protocol.units import PAGE_SIZE
from protocol.vhost_user import FrontendRequest as R
from protocol.vhost_user import ProtocolFeature as PF
from protocol.vhost_user import VirtioFeature as VF

PAGE = PAGE_SIZE


@dataclass(frozen=True)
class Reply(Message):
    """A message from the back-end, as received (flags included)."""

    @property
    def u64(self) -> int:
        if len(self.payload) != 8:
            raise AssertionError(
                f"reply to {self.request} carries {len(self.payload)} bytes, not 8"
            )
        return int(struct.unpack("=Q", self.payload)[0])


class Channel(WireChannel):
    """The wire (:class:`guest_driver.wire.WireChannel`) with the harness's knobs: any
    header (request, flags, a ``size`` that lies about the payload) and any fds."""

    async def send(  # type: ignore[override]
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        flags: int = vu.VERSION,
        size: int | None = None,
    ) -> None:
        header = vu.build_header(request, flags, len(payload) if size is None else size)
        await super().send(header + payload, fds)

    async def recv(self) -> Reply:
        """The next message; a payload claim over 1 MiB is a failed check, not a read."""
        try:
            m = await self.recv_message()
        except BackendError as exc:
            if isinstance(exc, BackendHungUp):
                raise
            raise AssertionError(str(exc)) from None
        return Reply(m.request, m.flags, m.payload, m.fds)


def flat_ram(size: int, gpa: int = 0, name: str = "harness-ram") -> GuestRamFile:
    """One guest-RAM region at ``gpa`` backed by its own memfd (the harness's RAM, or a
    region it adds or lies about)."""
    return GuestRamFile(size, layout="flat", name=name, gpa=gpa)


def touch(ram: GuestRamFile, first_pfn: int, count: int, byte: int = 0xA5) -> None:
    """Make pages resident (written, so the memfd allocates them)."""
    ram.fill(first_pfn * PAGE, count * PAGE, byte)


def table_payload(regions: Sequence[dict[str, int]]) -> bytes:
    return vu.build_payload(
        vu.MEMORY_TABLE,
        {"nregions": len(regions), "padding": 0, "regions": list(regions)},
        "memory table",
    )


def single_region_payload(region: dict[str, int]) -> bytes:
    return vu.build_payload(vu.SINGLE_REGION, {"padding": 0, "region": region}, "region")


def vring_state(index: int, num: int) -> bytes:
    return vu.build_payload(vu.VRING_STATE, {"index": index, "num": num}, "vring state")


def vring_addr(index: int, desc: int, used: int, avail: int, flags: int = 0) -> bytes:
    body = {"index": index, "flags": flags, "desc": desc, "used": used, "avail": avail, "log": 0}
    return vu.build_payload(vu.VRING_ADDRESS, body, "vring address")


# Guest-physical layout of the harness's RAM (region 0 starts at gpa 0):
RING_AREA = 0x0  # queue q's rings at RING_AREA + q * RING_STRIDE
RING_STRIDE = 0x8000
SCRATCH = 0x40000  # request/response slots, 64 bytes per descriptor slot
BATCH_PAGE = 0x80000
EVENT_BUFFERS = 0x90000
INDIRECT = 0xA0000
STATS_BUFFER = 0xB0000
FREE_START_PFN = 0x200  # first page (2 MiB) the tests lock / inflate
DEFAULT_RAM = 32 << 20
QUEUE_SIZE = 64


@dataclass
class Queue:
    index: int
    ring: DriverQueue
    kick: int | None
    call: int | None
    calls_seen: int = 0

    def kick_now(self) -> None:
        if self.kick is not None:
            os.eventfd_write(self.kick, 1)

    def drain_call(self) -> int:
        """How many times the back-end signalled the call fd since the last drain."""
        if self.call is None:
            return 0
        try:
            n = os.eventfd_read(self.call)
        except BlockingIOError:
            n = 0
        self.calls_seen += n
        return n


@dataclass
class Frontend:
    """Negotiation and ring set-up, QEMU's order, all knobs exposed."""

    chan: Channel
    mem: MemfdPort
    features: int = 0  # what the back-end offered
    protocol_features: int = 0
    acked: int = 0
    acked_protocol: int = 0
    queue_count: int = 0
    queues: dict[int, Queue] = field(default_factory=dict)
    reply_flags_seen: list[tuple[int, int]] = field(default_factory=list)  # (request, flags)
    _fds: list[int] = field(default_factory=list)

    @classmethod
    async def connect(
        cls, path: str, ram_size: int = DEFAULT_RAM, *, retry: float = 3.0
    ) -> Frontend:
        """Connect; a back-end serving one front-end per socket may refuse us while it has
        not yet noticed the previous one leave, so probe with GET_FEATURES and retry
        (:func:`guest_driver.wire.connect_retrying`)."""

        async def first(chan: WireChannel) -> tuple[Channel, Reply]:
            raw = Channel(chan.sock)
            await raw.send(R.GET_FEATURES)
            return raw, await raw.recv()

        chan, reply = await connect_retrying(path, first, retry=retry, refused=(BackendHungUp,))
        ram = flat_ram(ram_size)
        # make the harness's own control area (rings, scratch, batch page) resident now,
        # so that st_blocks measured later moves only by what the back-end reclaims
        ram.write(0, b"\x01" * min(ram_size, FREE_START_PFN * PAGE))
        fe = cls(chan=chan, mem=MemfdPort(ram))
        fe.reply_flags_seen.append((reply.request, reply.flags))
        return fe

    @property
    def ram(self) -> GuestRamFile:
        return self.mem.ram

    def close(self) -> None:
        self.chan.close()
        for q in self.queues.values():
            for fd in (q.kick, q.call):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        self.queues.clear()
        for r in self.mem.rams:
            r.close()

    # -- messages ------------------------------------------------------------------------

    @property
    def reply_ack(self) -> bool:
        return bool(self.acked_protocol & PF.REPLY_ACK)

    async def request(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
        flags: int | None = None,
    ) -> Reply | None:
        """Send one request; return its reply (own body, or the REPLY_ACK ack) if one is due."""
        has_body = R.lookup(request) in vu.REPLY_PAYLOAD
        if need_reply is None:
            need_reply = self.reply_ack and not has_body
        if flags is None:
            flags = vu.VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        await self.chan.send(request, payload, fds, flags=flags)
        if not (has_body or (need_reply and self.reply_ack)):
            return None
        reply = await self.chan.recv()
        self.reply_flags_seen.append((reply.request, reply.flags))
        if reply.request != request:
            raise AssertionError(f"reply to request {request} came back as request {reply.request}")
        return reply

    async def ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """A request sent with NEED_REPLY under REPLY_ACK; returns the ack value (0 = ok)."""
        reply = await self.request(request, payload, fds, need_reply=True)
        if reply is None:
            return 0
        return reply.u64

    async def get_u64(self, request: int) -> int:
        reply = await self.request(request)
        assert reply is not None
        return reply.u64

    # -- negotiation ---------------------------------------------------------------------

    async def negotiate(
        self,
        *,
        features: int | None = None,
        protocol_features: int | None = None,
        device_features: int | None = None,
    ) -> None:
        """GET_FEATURES .. SET_FEATURES (QEMU's order). ``None`` accepts what was offered."""
        self.features = await self.get_u64(R.GET_FEATURES)
        if self.features & VF.PROTOCOL_FEATURES:
            self.protocol_features = await self.get_u64(R.GET_PROTOCOL_FEATURES)
            want = self.protocol_features if protocol_features is None else protocol_features
            # REPLY_ACK takes effect after this message: send it plain
            await self.request(R.SET_PROTOCOL_FEATURES, vu.u64(want), need_reply=False)
            self.acked_protocol = want
            if want & PF.MQ:
                self.queue_count = await self.get_u64(R.GET_QUEUE_NUM)
        await self.ack(R.SET_OWNER)
        if features is None:
            features = self.features
            if device_features is not None:
                features = (features & ~0xFFFFFF) | device_features
        self.acked = features
        await self.ack(R.SET_FEATURES, vu.u64(features))

    async def set_mem_table(self, rams: Sequence[GuestRamFile] | None = None) -> int:
        rams = list(self.mem.rams if rams is None else rams)
        payload = table_payload([region for r in rams for region in r.vhost_regions()])
        return await self.ack(R.SET_MEM_TABLE, payload, [r.fd for r in rams for _ in r.regions])

    async def setup_queue(
        self,
        index: int,
        size: int = QUEUE_SIZE,
        *,
        base: int | None = None,
        enable: bool = True,
        kick: bool = True,
        call: bool = True,
    ) -> Queue:
        gpa = RING_AREA + index * RING_STRIDE if base is None else base
        layout = RingLayout.contiguous(gpa, size)
        ring = DriverQueue(self.mem, layout, event_idx=bool(self.acked & VF.RING_EVENT_IDX))
        await ring.init()
        await self.ack(R.SET_VRING_NUM, vring_state(index, size))
        await self.ack(R.SET_VRING_BASE, vring_state(index, 0))
        await self.ack(
            R.SET_VRING_ADDR,
            vring_addr(
                index, QVA_BASE + layout.desc, QVA_BASE + layout.used, QVA_BASE + layout.avail
            ),
        )
        kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if kick else None
        call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if call else None
        await self.ack(
            R.SET_VRING_KICK,
            vu.u64(index | (0 if kick_fd is not None else vu.VRING_NOFD_MASK)),
            [kick_fd] if kick_fd is not None else [],
        )
        await self.ack(
            R.SET_VRING_CALL,
            vu.u64(index | (0 if call_fd is not None else vu.VRING_NOFD_MASK)),
            [call_fd] if call_fd is not None else [],
        )
        q = Queue(index, ring, kick_fd, call_fd)
        self.queues[index] = q
        if enable and self.acked & VF.PROTOCOL_FEATURES:
            await self.ack(R.SET_VRING_ENABLE, vring_state(index, 1))
        return q

    async def start(self, queues: Sequence[int], **negotiate: Any) -> None:
        await self.negotiate(**negotiate)
        await self.set_mem_table()
        for i in queues:
            await self.setup_queue(i)

    async def get_vring_base(self, index: int) -> tuple[int, int]:
        reply = await self.request(R.GET_VRING_BASE, vring_state(index, 0))
        assert reply is not None
        body = vu.parse_payload(vu.VRING_STATE, reply.payload, "vring state")
        return int(body.index), int(body.num)

    async def get_config(self, offset: int, size: int) -> bytes:
        payload = vu.build_payload(
            vu.CONFIG, {"offset": offset, "size": size, "flags": 0, "data": bytes(size)}, "config"
        )
        reply = await self.request(R.GET_CONFIG, payload)
        assert reply is not None
        body = vu.parse_payload(vu.CONFIG, reply.payload, "config")
        return bytes(body.data)

    async def set_config(self, offset: int, data: bytes, flags: int = 0) -> int:
        payload = vu.build_payload(
            vu.CONFIG, {"offset": offset, "size": len(data), "flags": flags, "data": data}, "config"
        )
        return await self.ack(R.SET_CONFIG, payload)

    # -- ring traffic ----------------------------------------------------------------------

    async def wait_used(self, q: Queue, count: int = 1, *, poll: float = 0.001) -> list[UsedElem]:
        """Kick, then poll the used ring until ``count`` elements came back (caller bounds it)."""
        q.kick_now()
        got: list[UsedElem] = []
        while len(got) < count:
            got += await q.ring.poll_used()
            if len(got) >= count:
                break
            q.drain_call()
            await trio.sleep(poll)
        q.drain_call()
        return got

    async def settle(self, q: Queue, wait: float = 0.2) -> list[UsedElem]:
        """Kick and give the back-end ``wait`` seconds; return whatever came back."""
        q.kick_now()
        await trio.sleep(wait)
        q.drain_call()
        return await q.ring.poll_used()


def slot_gpa(q: int, slot: int) -> int:
    return SCRATCH + (q * QUEUE_SIZE + slot % QUEUE_SIZE) * 64


class VmwCommands:
    """``command`` and ``start`` over a session's ``exchange`` (one request chain, one
    response): shared by :class:`VmwGuest` and :class:`conformance.inguest.GuestVmw`."""

    async def exchange(
        self, request: bytes, resp_len: int = vmw.RESPONSE_SIZE
    ) -> tuple[bytes, UsedElem]:
        raise NotImplementedError

    async def command(self, cmd: int, arg1: int = 0, arg2: int = 0) -> vmw.Response:
        raw, used = await self.exchange(vmw.Request(cmd, arg1, arg2).build())
        if used.len != vmw.RESPONSE_SIZE:
            raise AssertionError(f"command {cmd}: used length {used.len}, expected 24")
        return vmw.Response.parse(raw)

    async def start(self, caps: int = int(vmw.ALL_CAPABILITIES)) -> vmw.Response:
        return await self.command(vmw.Command.START, caps)


@dataclass
class VmwGuest(VmwCommands):
    """A vmmemctl guest over a :class:`Frontend` (cmdq = 0, eventq = 1)."""

    fe: Frontend
    slot: int = 0

    @classmethod
    async def attach(cls, path: str, **negotiate: Any) -> VmwGuest:
        fe = await Frontend.connect(path)
        try:
            await fe.start([0, 1], **negotiate)
        except BaseException:
            fe.close()
            raise
        return cls(fe)

    @property
    def cmdq(self) -> Queue:
        return self.fe.queues[0]

    @property
    def eventq(self) -> Queue:
        return self.fe.queues[1]

    def close(self) -> None:
        self.fe.close()

    async def exchange(
        self, request: bytes, resp_len: int = vmw.RESPONSE_SIZE
    ) -> tuple[bytes, UsedElem]:
        """Post a request (readable) + response buffer (writable); return (response, used)."""
        req_gpa = slot_gpa(0, self.slot)
        resp_gpa = req_gpa + 32
        self.slot += 1
        await self.fe.mem.write(req_gpa, request)
        await self.fe.mem.write(resp_gpa, b"\xee" * resp_len)
        bufs = [Buffer(req_gpa, len(request))]
        if resp_len:
            bufs.append(Buffer(resp_gpa, resp_len, write=True))
        await self.cmdq.ring.add(bufs)
        (used,) = await self.fe.wait_used(self.cmdq)
        return await self.fe.mem.read(resp_gpa, resp_len), used

    async def batch(
        self,
        cmd: int,
        pfns: Sequence[int],
        *,
        raw_entries: Sequence[int] | None = None,
        count: int | None = None,
        page_pfn: int = BATCH_PAGE // PAGE,
    ) -> tuple[vmw.Response, list[int]]:
        """A batched command over the batch page; returns (response, entries after)."""
        if raw_entries is None:
            page = vmw.build_batch(pfns)
        else:
            page = b"".join(struct.pack("<Q", e) for e in raw_entries)
        await self.fe.mem.write(BATCH_PAGE, page.ljust(PAGE, b"\0"))
        n = len(page) // 8 if count is None else count
        resp = await self.command(cmd, page_pfn, n)
        after = await self.fe.mem.read(BATCH_PAGE, len(page))
        return resp, list(struct.unpack(f"<{len(page) // 8}Q", after))

    # -- what the guest-level cases use (conformance.inguest.GuestVmw has the same) --------

    @property
    def ram_end_pfn(self) -> int:
        """The first page frame past the guest's RAM."""
        return self.fe.ram.size // PAGE

    @property
    def batch_pfn(self) -> int:
        return BATCH_PAGE // PAGE

    @property
    def indirect(self) -> bool:
        """INDIRECT_DESC was negotiated."""
        return bool(self.fe.acked & VF.RING_INDIRECT_DESC)

    @property
    def scratch(self) -> int:
        """A scratch area (>= 512 bytes, in one page) for hand-made chains."""
        return slot_gpa(0, 40)

    def ring_pfn_ranges(self) -> list[tuple[int, int]]:
        """(first pfn, count) of every page the cmdq and eventq rings occupy."""
        return [r for q in (self.cmdq, self.eventq) for r in q.ring.layout.pfn_ranges()]

    async def write(self, gpa: int, data: bytes) -> None:
        await self.fe.mem.write(gpa, data)

    async def read(self, gpa: int, n: int) -> bytes:
        return await self.fe.mem.read(gpa, n)

    async def post(self, buffers: Sequence[Buffer], *, indirect: bool = False) -> UsedElem:
        """Post one chain on cmdq (through an indirect table if asked); its used element."""
        await self.cmdq.ring.add(buffers, indirect_table=INDIRECT if indirect else None)
        (used,) = await self.fe.wait_used(self.cmdq)
        return used

    async def fill_page(self, pfn: int, byte: int) -> None:
        """Write ``byte`` all over guest page ``pfn`` (resident afterwards)."""
        touch(self.fe.ram, pfn, 1, byte)

    async def read_page(self, pfn: int) -> bytes:
        return self.fe.ram.read(pfn * PAGE, PAGE)

    async def post_event_buffer(self, i: int = 0) -> None:
        await self.eventq.ring.add([Buffer(EVENT_BUFFERS + 16 * i, vmw.EVENT_SIZE, write=True)])
        self.eventq.kick_now()

    async def events(self) -> list[tuple[UsedElem, bytes]]:
        out = []
        for used in await self.eventq.ring.poll_used():
            gpa = EVENT_BUFFERS + 16 * (used.id % 8)
            out.append((used, await self.fe.mem.read(gpa, vmw.EVENT_SIZE)))
        return out


def status_of(entry: int) -> int:
    return entry & vmw.ENTRY_STATUS_MASK


@dataclass
class BalloonGuest:
    """A virtio-balloon driver over a :class:`Frontend` (0 inflate, 1 deflate, 2 stats)."""

    fe: Frontend
    slot: int = 0

    @classmethod
    async def attach(cls, path: str, *, stats: bool = True, **negotiate: Any) -> BalloonGuest:
        fe = await Frontend.connect(path)
        try:
            await fe.negotiate(**negotiate)
            await fe.set_mem_table()
            for i in [0, 1, 2] if stats else [0, 1]:
                await fe.setup_queue(i)
        except BaseException:
            fe.close()
            raise
        return cls(fe)

    def close(self) -> None:
        self.fe.close()

    def _buf(self, q: int) -> int:
        gpa = SCRATCH + 0x10000 + (q * QUEUE_SIZE + self.slot % QUEUE_SIZE) * 1024
        self.slot += 1
        return gpa

    async def pfns(self, q: int, pfns: Sequence[int], *, write: bool = False) -> UsedElem:
        gpa = self._buf(q)
        data = struct.pack(f"<{len(pfns)}I", *pfns)
        await self.fe.mem.write(gpa, data)
        await self.fe.queues[q].ring.add([Buffer(gpa, len(data), write=write)])
        (used,) = await self.fe.wait_used(self.fe.queues[q])
        return used

    async def inflate(self, pfns: Sequence[int]) -> UsedElem:
        return await self.pfns(vb.Queue.INFLATE, pfns)

    async def deflate(self, pfns: Sequence[int]) -> UsedElem:
        return await self.pfns(vb.Queue.DEFLATE, pfns)

    async def config(self) -> tuple[int, int]:
        data = await self.fe.get_config(0, vb.BASIC_CONFIG_SIZE)
        num_pages, actual = struct.unpack("<II", data)
        return num_pages, actual

    async def post_stats(
        self, entries: Sequence[tuple[int, int]], *, gpa: int = STATS_BUFFER
    ) -> None:
        data = vb.pack_stats(entries)
        await self.fe.mem.write(gpa, data)
        await self.fe.queues[vb.Queue.STATS].ring.add([Buffer(gpa, len(data))])
        self.fe.queues[vb.Queue.STATS].kick_now()
