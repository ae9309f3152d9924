"""Split virtqueues, device side, over :class:`vdev.memory.GuestMemory`. Sans-I/O.

A :class:`VirtQueue` holds one ring's vhost-user state (size, addresses, base, kick/call/err
fds, started/enabled) and walks it:

* :meth:`VirtQueue.pop` reads ``avail.idx`` once, reads the whole descriptor table with the
  numpy dtype of :mod:`protocol.virtqueue`, and returns one :class:`Chain` per new head.
  Every chain is validated (PROTOCOL.md section 2, vhost-user-virtio.md section 5.6): head or
  ``next`` out of the table, more descriptors than the table holds (a loop), an address range
  outside RAM or overflowing, indirect tables (feature not negotiated, length not a multiple
  of 16 or zero, nested, INDIRECT together with NEXT), a device-readable descriptor after a
  device-writable one, more than 4 GiB in total. A bad chain comes back with ``error`` set;
  the caller completes it with used length 0 (it is counted in ``counters["bad_chains"]``)
  and the queue keeps serving.
* ``avail.idx`` moving by more than the queue size cannot be recovered from (we no longer
  know which heads are new): it raises :class:`RingBroken`, the ring is marked ``broken`` and
  not touched again until the front-end re-arms it (``SET_VRING_BASE`` / ``SET_VRING_ADDR``
  after a ``GET_VRING_BASE``). Other rings and other guests are unaffected. The same happens
  when the ring areas themselves stop being guest RAM (a later memory table dropped them).
* :meth:`VirtQueue.push` writes used elements, then ``used.idx``, and tells whether the
  driver wants an interrupt (EVENT_IDX ``used_event``, or ``avail.flags`` NO_INTERRUPT).
  :meth:`VirtQueue.signal` writes the call eventfd.

Ring addresses arrive as front-end virtual addresses and are translated to guest-physical
ones once, in :meth:`VirtQueue.set_addr`; all later accesses re-translate through the
current memory table, so a new table never leaves a dangling pointer.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from protocol import virtqueue as vq
from protocol.errors import FrontendError, GuestError
from vdev.memory import GuestMemory

log = logging.getLogger(__name__)

_NEXT = int(vq.DescFlag.NEXT)
_WRITE = int(vq.DescFlag.WRITE)
_INDIRECT = int(vq.DescFlag.INDIRECT)
MAX_CHAIN_BYTES = 1 << 32


class RingBroken(GuestError):
    """The ring can no longer be followed; it stays stopped until the front-end re-arms it.

    Raised by :class:`VirtQueue` (a loop, an index jump beyond the queue size); caught by
    vdev's connection (its kick loop stops serving that ring; the others go on)."""


@dataclass(slots=True)
class Chain:
    """One descriptor chain: device-readable then device-writable (gpa, length) segments."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)
    error: str | None = None  # set: the chain is malformed; complete it with length 0

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)

    def read(self, mem: GuestMemory) -> bytes:
        """The device-readable bytes, concatenated in chain order."""
        return b"".join(mem.read(a, n) for a, n in self.readable)

    def write(self, mem: GuestMemory, data: bytes) -> int:
        """Scatter ``data`` over the writable segments; returns bytes written."""
        done = 0
        for a, n in self.writable:
            if done >= len(data):
                break
            piece = data[done : done + n]
            mem.write(a, piece)
            done += len(piece)
        return done


class VirtQueue:
    """One split ring of one connection (see the module docstring)."""

    def __init__(self, index: int, *, name: str = "") -> None:
        self.index = index
        self.name = name or f"q{index}"
        self.size = 0
        self.desc = self.avail = self.used = 0  # guest-physical
        self.addr_set = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self.event_idx = False
        self.indirect = False
        self.enabled = False
        self.started = False
        self.broken = False
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.counters: dict[str, int] = {
            "chains": 0,
            "bad_chains": 0,
            "ring_errors": 0,
            "kicks": 0,
            "calls": 0,
        }
        self._bad_logged = 0

    # -- configuration (from vhost-user messages) -----------------------------------------

    def set_num(self, num: int) -> None:
        if not 0 < num <= vq.MAX_QUEUE_SIZE or num & (num - 1):
            raise FrontendError(f"{self.name}: queue size {num} is not a power of two ≤ 32768")
        self.size = num

    def set_base(self, base: int) -> None:
        if base > 0xFFFF:
            raise FrontendError(f"{self.name}: split-ring base {base:#x} does not fit 16 bits")
        self.last_avail_idx = base
        self.used_idx = base  # we complete in order: nothing is in flight across a stop
        self.broken = False

    def set_addr(self, mem: GuestMemory, desc: int, used: int, avail: int) -> None:
        """Translate and validate the three front-end virtual addresses."""
        if not self.size:
            raise FrontendError(f"{self.name}: SET_VRING_ADDR before SET_VRING_NUM")
        if desc % vq.DESC_ALIGN or avail % vq.AVAIL_ALIGN or used % vq.USED_ALIGN:
            raise FrontendError(f"{self.name}: misaligned ring addresses")
        self.desc = mem.qva_to_gpa(desc, vq.desc_table_size(self.size))
        self.avail = mem.qva_to_gpa(avail, vq.avail_ring_size(self.size))
        self.used = mem.qva_to_gpa(used, vq.used_ring_size(self.size))
        self.addr_set = True
        self.broken = False

    def pinned_pfns(self) -> list[tuple[int, int]]:
        """(first pfn, count) of the pages holding the three ring areas."""
        if not self.addr_set:
            return []
        out = []
        for gpa, length in (
            (self.desc, vq.desc_table_size(self.size)),
            (self.avail, vq.avail_ring_size(self.size)),
            (self.used, vq.used_ring_size(self.size)),
        ):
            first, last = gpa >> 12, (gpa + length - 1) >> 12
            out.append((first, last - first + 1))
        return out

    def replace_fd(self, which: str, fd: int | None) -> None:
        """Install a new kick/call/err fd (closing the old one; None = no fd)."""
        attr = f"{which}_fd"
        old = getattr(self, attr)
        if old is not None and old != fd:
            with contextlib.suppress(OSError):
                os.close(old)
        setattr(self, attr, fd)

    def stop(self) -> int:
        """GET_VRING_BASE: stop the ring, drop kick/call fds, return the next avail index."""
        self.started = False
        self.replace_fd("kick", None)
        self.replace_fd("call", None)
        return self.last_avail_idx

    def close(self) -> None:
        self.started = False
        for which in ("kick", "call", "err"):
            self.replace_fd(which, None)

    @property
    def ready(self) -> bool:
        """Started, enabled, addressed and not broken: its buffers may be processed."""
        return self.started and self.enabled and self.addr_set and not self.broken

    # -- the ring --------------------------------------------------------------------------

    def avail_idx(self, mem: GuestMemory) -> int:
        """The driver's ``avail.idx`` now."""
        try:
            return mem.load_u16(self.avail + 2)
        except GuestError as exc:
            self._break(f"avail ring is not readable: {exc}")

    def avail_count(self, mem: GuestMemory) -> int:
        """How many heads the driver has made available and we have not taken yet."""
        idx = self.avail_idx(mem)
        n = (idx - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            self._break(f"avail.idx {idx} moved {n} past {self.last_avail_idx} (size {self.size})")
        return n

    def pop(self, mem: GuestMemory, limit: int | None = None) -> list[Chain]:
        """Take up to ``limit`` (default: all) available chains, validated."""
        n = self.avail_count(mem)
        if limit is not None:
            n = min(n, limit)
        if n == 0:
            return []
        try:
            ring = mem.read_array(self.avail + vq.avail_entry_offset(0), np.dtype("<u2"), self.size)
            table = mem.read_array(self.desc, vq.DESCRIPTOR_DTYPE, self.size)
        except GuestError as exc:
            self._break(f"ring areas are not readable: {exc}")
        chains = []
        for k in range(n):
            head = int(ring[(self.last_avail_idx + k) % self.size])
            chain = self._walk(mem, table, head)
            self.counters["chains"] += 1
            if chain.error is not None:
                self.counters["bad_chains"] += 1
                if self._bad_logged < 10:
                    self._bad_logged += 1
                    log.warning("%s: bad chain at head %d: %s", self.name, head, chain.error)
            chains.append(chain)
        self.last_avail_idx = (self.last_avail_idx + n) & 0xFFFF
        return chains

    def _walk(self, mem: GuestMemory, table: np.ndarray[Any, Any], head: int) -> Chain:
        chain = Chain(head=head)
        if head >= self.size:
            chain.error = f"head {head} ≥ queue size {self.size}"
            return chain
        try:
            self._walk_table(mem, table, head, chain, nested=False)
        except _BadChain as exc:
            chain.error = str(exc)
            chain.readable.clear()
            chain.writable.clear()
        return chain

    def _walk_table(
        self,
        mem: GuestMemory,
        table: np.ndarray[Any, Any],
        start: int,
        chain: Chain,
        *,
        nested: bool,
    ) -> None:
        limit = len(table)
        idx = start
        seen = 0
        total = chain.readable_len + chain.writable_len
        while True:
            seen += 1
            if seen > limit:
                raise _BadChain(f"chain longer than its table ({limit}): a loop")
            d = table[idx]
            addr, length, flags, nxt = (
                int(d["addr"]),
                int(d["len"]),
                int(d["flags"]),
                int(d["next"]),
            )
            if flags & _INDIRECT:
                if nested:
                    raise _BadChain("nested indirect table")
                if not self.indirect:
                    raise _BadChain("indirect descriptor without INDIRECT_DESC")
                if flags & _NEXT:
                    raise _BadChain("INDIRECT together with NEXT")
                if length == 0 or length % vq.DESCRIPTOR_SIZE:
                    raise _BadChain(f"indirect table length {length} is not a multiple of 16")
                count = length // vq.DESCRIPTOR_SIZE
                if count > vq.MAX_QUEUE_SIZE:
                    raise _BadChain(f"indirect table of {count} descriptors")
                try:
                    sub = mem.read_array(addr, vq.DESCRIPTOR_DTYPE, count)
                except GuestError as exc:
                    raise _BadChain(f"indirect table: {exc}") from None
                self._walk_table(mem, sub, 0, chain, nested=True)
                return
            if length:
                if addr + length > (1 << 64):
                    raise _BadChain(f"descriptor {addr:#x}+{length:#x} overflows")
                if not mem.contains(addr, length):
                    raise _BadChain(f"descriptor {addr:#x}+{length:#x} is outside RAM")
            total += length
            if total > MAX_CHAIN_BYTES:
                raise _BadChain("chain longer than 4 GiB")
            if flags & _WRITE:
                chain.writable.append((addr, length))
            else:
                if chain.writable:
                    raise _BadChain("device-readable descriptor after a device-writable one")
                chain.readable.append((addr, length))
            if not flags & _NEXT:
                return
            if nxt >= limit:
                raise _BadChain(f"next {nxt} ≥ table size {limit}")
            idx = nxt

    def push(self, mem: GuestMemory, completions: list[tuple[int, int]]) -> bool:
        """Publish (head, written length) pairs; True if the driver wants an interrupt."""
        if not completions:
            return False
        old = self.used_idx
        try:
            for k, (head, length) in enumerate(completions):
                slot = (old + k) % self.size
                elem = np.zeros(1, dtype=vq.USED_ELEM_DTYPE)
                elem[0] = (head, length)
                mem.write(self.used + vq.used_entry_offset(slot), elem.tobytes())
            new = (old + len(completions)) & 0xFFFF
            mem.store_u16(self.used + 2, new)  # after the elements: program order on x86
            self.used_idx = new
            if self.event_idx:
                event = mem.load_u16(self.avail + vq.used_event_offset(self.size))
                return vq.need_event(event, new, old)
            return not mem.load_u16(self.avail) & vq.AVAIL_F_NO_INTERRUPT
        except GuestError as exc:
            self._break(f"used ring is not writable: {exc}")

    def publish_avail_event(self, mem: GuestMemory, seen: int | None = None) -> bool:
        """EVENT_IDX: ask for a kick at the next new head. Returns True if the driver may
        have skipped a kick: with ``seen`` (its ``avail.idx`` read before the pass that
        ends here), if heads were made available since, while the old event was still
        published; without, if any head is available and untaken.

        Pass ``seen`` whenever a device may leave heads on the ring on purpose (eventq
        buffers waiting for an event, a stats buffer held until the next request): they
        are available and untaken for as long as the device wants, and "untaken" would
        make the caller serve the ring again and again, a spinning core per idle guest."""
        if not self.event_idx:
            return False
        try:
            mem.store_u16(self.used + vq.avail_event_offset(self.size), self.last_avail_idx)
        except GuestError as exc:
            self._break(f"used ring is not writable: {exc}")
        if seen is not None:
            return self.avail_idx(mem) != seen
        return self.avail_count(mem) > 0

    def signal(self) -> None:
        """Write the call eventfd (no fd: the front-end polls)."""
        if self.call_fd is None:
            return
        try:
            os.eventfd_write(self.call_fd, 1)
            self.counters["calls"] += 1
        except OSError as exc:  # a bad fd from the front-end: not fatal for us
            log.warning("%s: call eventfd write failed: %s", self.name, exc)

    def drain_kick(self) -> None:
        """Consume the kick eventfd's counter (non-blocking)."""
        if self.kick_fd is None:
            return
        try:
            os.read(self.kick_fd, 8)
            self.counters["kicks"] += 1
        except BlockingIOError:
            pass
        except OSError as exc:
            log.warning("%s: kick eventfd read failed: %s", self.name, exc)

    def _break(self, why: str) -> NoReturn:
        self.broken = True
        self.counters["ring_errors"] += 1
        log.error("%s: ring broken, stopped until the front-end re-arms it: %s", self.name, why)
        if self.err_fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(self.err_fd, 1)
        raise RingBroken(f"{self.name}: {why}")


class _BadChain(Exception):
    pass
