"""Split virtqueue, driver side, over an async memory port.

The same ring code runs over our vhost-user front-end (a memfd-backed port, see
:class:`guest_driver.frontend.MemfdPort`) and over the qtest transport (qtest ``read`` /
``write`` commands). Layouts come from :mod:`protocol.virtqueue`; nothing is restated here.

Usage::

    layout = RingLayout.contiguous(base_gpa, size=64)
    q = DriverQueue(port, layout, event_idx=True)
    await q.init()                       # zero the three areas
    head = await q.add([Buffer(req_gpa, 24), Buffer(resp_gpa, 24, write=True)])
    if await q.needs_kick(): ...         # notify the device (eventfd, MMIO write, ...)
    for elem in await q.poll_used(): ...  # UsedElem(id=head, len=bytes written)

For hostile tests, :meth:`DriverQueue.post_raw` writes arbitrary descriptors and a head into
the avail ring, and :meth:`DriverQueue.publish_avail_idx` moves ``avail.idx`` anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from protocol import virtqueue as vq
from protocol.errors import LocalError
from protocol.units import PAGE_SIZE


class MemoryPort(Protocol):
    """Guest-physical memory as the driver sees it."""

    async def read(self, gpa: int, n: int) -> bytes: ...

    async def write(self, gpa: int, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Buffer:
    """One descriptor's worth of guest memory. ``write``: device-writable."""

    addr: int
    len: int
    write: bool = False


@dataclass(frozen=True, slots=True)
class UsedElem:
    id: int
    len: int


@dataclass(frozen=True, slots=True)
class RingLayout:
    """Where the three areas of one queue live (guest-physical addresses)."""

    size: int
    desc: int
    avail: int
    used: int

    def __post_init__(self) -> None:
        if not 0 < self.size <= vq.MAX_QUEUE_SIZE or self.size & (self.size - 1):
            raise LocalError(f"queue size {self.size} is not a power of two in 1..32768")

    @classmethod
    def contiguous(cls, base: int, size: int) -> RingLayout:
        """Descriptor table at ``base``, avail ring right after, used ring on the next page."""
        desc = base
        avail = desc + vq.desc_table_size(size)
        used_start = avail + vq.avail_ring_size(size)
        used = (used_start + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        return cls(size=size, desc=desc, avail=avail, used=used)

    @staticmethod
    def footprint(size: int) -> int:
        """Bytes :meth:`contiguous` needs from ``base`` (a multiple of the page size)."""
        lay = RingLayout.contiguous(0, size)
        end = lay.used + vq.used_ring_size(size)
        return (end + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE

    def areas(self) -> list[tuple[int, int]]:
        """(gpa, length) of the descriptor table, avail ring and used ring."""
        return [
            (self.desc, vq.desc_table_size(self.size)),
            (self.avail, vq.avail_ring_size(self.size)),
            (self.used, vq.used_ring_size(self.size)),
        ]

    def pfn_ranges(self) -> list[tuple[int, int]]:
        """(first pfn, count) of every page the three areas touch."""
        out: list[tuple[int, int]] = []
        for gpa, length in self.areas():
            first = gpa // PAGE_SIZE
            last = (gpa + length - 1) // PAGE_SIZE
            out.append((first, last - first + 1))
        return out


def _u16(data: bytes) -> int:
    return int.from_bytes(data[:2], "little")


def _p16(value: int) -> bytes:
    return (value & 0xFFFF).to_bytes(2, "little")


def build_descriptors(rows: Sequence[tuple[int, int, int, int]]) -> bytes:
    """Bytes of a descriptor table from (addr, len, flags, next) rows."""
    table = np.zeros(len(rows), dtype=vq.DESCRIPTOR_DTYPE)
    for i, (addr, length, flags, nxt) in enumerate(rows):
        table[i] = (addr, length, flags, nxt)
    return table.tobytes()


class DriverQueue:
    """The driver's half of one split virtqueue.

    Keeps a free list of descriptor indices, writes chains, publishes them on the avail ring,
    and collects used elements. With ``event_idx`` it writes ``used_event`` (asking for an
    interrupt on every completion) and honours the device's ``avail_event`` in
    :meth:`needs_kick`; without it, it honours ``used.flags & NO_NOTIFY``.
    """

    def __init__(self, port: MemoryPort, layout: RingLayout, *, event_idx: bool = False) -> None:
        self.port = port
        self.layout = layout
        self.event_idx = event_idx
        self.size = layout.size
        self.avail_idx = 0  # next value of avail.idx we will publish
        self.last_used_idx = 0  # used.idx up to which we collected
        self._kicked_at = 0  # avail.idx at the last kick decision
        self._free: list[int] = list(range(self.size))
        self._chains: dict[int, list[int]] = {}  # head -> descriptor indices of the chain
        #: Used elements whose head was not in flight (answered twice, or never posted).
        self.stray_used = 0
        #: Called (no arguments) after :meth:`reset_state`: every chain in flight is gone, the
        #: device will never answer it (a user that keeps buffers per chain frees them).
        self.on_reset: list[Callable[[], None]] = []

    # -- set-up --------------------------------------------------------------------------

    async def init(self) -> None:
        """Zero the three ring areas and reset the driver state."""
        for gpa, length in self.layout.areas():
            await self.port.write(gpa, bytes(length))
        self.reset_state()

    def reset_state(self, base: int = 0) -> None:
        """Forget everything in flight; indices restart at ``base`` (after a device reset)."""
        self.avail_idx = base
        self.last_used_idx = base
        self._kicked_at = base
        self._free = list(range(self.size))
        self._chains.clear()
        for callback in list(self.on_reset):
            callback()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._chains)

    # -- posting -------------------------------------------------------------------------

    async def add(self, buffers: Sequence[Buffer], *, indirect_table: int | None = None) -> int:
        """Post one chain; return its head index.

        With ``indirect_table`` (a gpa with room for ``16 * len(buffers)`` bytes) the chain is
        written there and a single INDIRECT descriptor is used in the ring.
        """
        if not buffers:
            raise LocalError("a chain needs at least one buffer")
        rows = []
        n = len(buffers)
        if indirect_table is not None:
            for i, b in enumerate(buffers):
                flags = (vq.DescFlag.WRITE if b.write else 0) | (
                    vq.DescFlag.NEXT if i + 1 < n else 0
                )
                rows.append((b.addr, b.len, int(flags), i + 1 if i + 1 < n else 0))
            await self.port.write(indirect_table, build_descriptors(rows))
            head = self._take(1)[0]
            await self._write_desc(
                head, (indirect_table, vq.DESCRIPTOR_SIZE * n, int(vq.DescFlag.INDIRECT), 0)
            )
            self._chains[head] = [head]
        else:
            idxs = self._take(n)
            for i, b in enumerate(buffers):
                last = i + 1 == n
                flags = (vq.DescFlag.WRITE if b.write else 0) | (0 if last else vq.DescFlag.NEXT)
                await self._write_desc(
                    idxs[i], (b.addr, b.len, int(flags), 0 if last else idxs[i + 1])
                )
            head = idxs[0]
            self._chains[head] = idxs
        await self._push_avail(head)
        return head

    async def post_raw(self, head: int, descriptors: dict[int, tuple[int, int, int, int]]) -> None:
        """Write arbitrary descriptors (index -> (addr, len, flags, next)) and post ``head``.

        Meant for hostile-input tests: nothing is validated. The indices are taken off the
        free list when they are on it, and the chain is tracked under ``head`` (best effort).
        """
        for idx, row in descriptors.items():
            await self._write_desc(idx, row)
            if idx in self._free:
                self._free.remove(idx)
        self._chains[head % self.size] = [i for i in descriptors if 0 <= i < self.size]
        await self._push_avail(head)

    async def publish_avail_idx(self, idx: int) -> None:
        """Write ``avail.idx`` directly (hostile tests: jump it beyond the queue size)."""
        self.avail_idx = idx & 0xFFFF
        await self.port.write(self.layout.avail + 2, _p16(idx))

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise LocalError(f"queue full: {n} descriptors wanted, {len(self._free)} free")
        out, self._free = self._free[:n], self._free[n:]
        return out

    async def _write_desc(self, idx: int, row: tuple[int, int, int, int]) -> None:
        await self.port.write(
            self.layout.desc + vq.DESCRIPTOR_SIZE * (idx % self.size), build_descriptors([row])
        )

    async def _push_avail(self, head: int) -> None:
        slot = self.avail_idx % self.size
        await self.port.write(self.layout.avail + vq.avail_entry_offset(slot), _p16(head))
        if self.event_idx:
            # ask for an interrupt on every completion: used_event = the used idx we wait for
            await self.port.write(
                self.layout.avail + vq.used_event_offset(self.size), _p16(self.last_used_idx)
            )
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        # the ring entry is written before the index (ports are sequential: program order)
        await self.port.write(self.layout.avail + 2, _p16(self.avail_idx))

    async def needs_kick(self) -> bool:
        """Whether the device wants a notification for what was published since the last call."""
        old, new = self._kicked_at, self.avail_idx
        self._kicked_at = new
        if old == new:
            return False
        if self.event_idx:
            off = self.layout.used + vq.avail_event_offset(self.size)
            event = _u16(await self.port.read(off, 2))
            return vq.need_event(event, new, old)
        flags = _u16(await self.port.read(self.layout.used, 2))
        return not flags & vq.USED_F_NO_NOTIFY

    async def set_no_interrupt(self, on: bool) -> None:
        """Set or clear ``avail.flags`` NO_INTERRUPT (ignored by devices with EVENT_IDX)."""
        await self.port.write(self.layout.avail, _p16(vq.AVAIL_F_NO_INTERRUPT if on else 0))

    # -- completions ---------------------------------------------------------------------

    async def used_idx(self) -> int:
        return _u16(await self.port.read(self.layout.used + 2, 2))

    async def poll_used(self) -> list[UsedElem]:
        """Every used element published since the last call, in order; frees their chains."""
        idx = await self.used_idx()
        count = (idx - self.last_used_idx) & 0xFFFF
        if count == 0:
            return []
        if count > self.size:
            raise LocalError(f"device moved used.idx by {count} > queue size {self.size}")
        out: list[UsedElem] = []
        for k in range(count):
            slot = (self.last_used_idx + k) % self.size
            raw = await self.port.read(
                self.layout.used + vq.used_entry_offset(slot), vq.USED_ELEM_SIZE
            )
            elem = np.frombuffer(raw, dtype=vq.USED_ELEM_DTYPE)[0]
            head = int(elem["id"])
            out.append(UsedElem(id=head, len=int(elem["len"])))
            chain = self._chains.pop(head, None)
            if chain is None:  # not posted, or already answered: the device's mistake
                self.stray_used += 1
            for i in chain or []:
                if i not in self._free:
                    self._free.append(i)
        self.last_used_idx = idx
        if self.event_idx:
            await self.port.write(
                self.layout.avail + vq.used_event_offset(self.size), _p16(self.last_used_idx)
            )
        return out
