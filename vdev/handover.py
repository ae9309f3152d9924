"""The hand-over: what lets a restarted vdev resume every connection exactly.

Everything QEMU gave vdev and everything needed to resume lives outside the vdev process,
in the manager's file-descriptor store (systemd, or ``vdev supervise``; :mod:`vdev.sdnotify`):

* the listening sockets (``listen.<guest>``): a restart keeps the path and never refuses;
* per connection: the connected socket (``conn.<guest>``), every memory-region fd, the
  kick/call/err eventfds, the back-end channel socket, each under a unique name
  (``<kind>.<guest>.<token>.<n>``), and the state memfd (``state.<guest>``,
  :class:`StateFile`, layout in :mod:`protocol.handover`).

The state memfd holds the page maps themselves (a page enters the map in the file the moment
the model sets its bit), an undo log of the map bytes the batch in progress changed, and a
small versioned JSON record (negotiated features, memory table, rings, the personality's
state, the completions of the last batch) committed in one of two slots by bumping a
generation counter: one aligned 8-byte store, so a kill at any instant leaves the old or the
new record.

Order of one ring batch (``Connection._execute``): the model runs (map bytes journaled in
the undo log first), the record is committed (it names the completions and the used index
they start at), then reclaim, then the used ring is written and the call eventfd signalled.
A restart then finds either no commit (the undo log rolls the maps back to the last record,
the ring is re-read from the recorded ``last_avail_idx`` and the same requests are executed
again from the same state: the same statuses) or a commit (its completions are written
again at the recorded used index: the same bytes in the same slots, harmless if the guest
already saw them). So no request is answered twice or lost. vhost-user messages: see
``Connection`` (peeked, handled, recorded, answered, then consumed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import secrets
import stat
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol import handover as ho
from protocol.errors import HostResourceError
from vdev.sdnotify import FdStore, same_open_file

log = logging.getLogger(__name__)

#: Record slots (each): the JSON record of one connection is a few KiB.
RECORD_SLOT = 1 << 20
#: PFNs the page maps can cover: 2**28 pages = 1 TiB of guest-physical address space.
MAX_PAGES = 1 << 28
_MAP_4K = MAX_PAGES // 8
_MAP_2M = MAX_PAGES // 512 // 8
#: The undo log: room for a full copy of both maps plus entries (sparse until used).
_UNDO = 2 * (_MAP_4K + _MAP_2M) + (1 << 20)


def _align(n: int, a: int = 4096) -> int:
    return -(-n // a) * a


class HandoverError(Exception):
    """A stored state that cannot be used (wrong layout, truncated): start afresh."""


class StateFile:
    """One connection's state memfd, mapped (see :mod:`protocol.handover`)."""

    def __init__(self, fd: int, mm: mmap.mmap) -> None:
        self.fd = fd
        self.mm = mm
        self.h = np.ndarray((), dtype=ho.HEADER_DTYPE, buffer=mm, offset=0)
        self._snapshotted: set[int] = set()

    # -- creation ------------------------------------------------------------------------

    @classmethod
    def create(cls, guest: str) -> StateFile:
        record = ho.HEADER_BYTES
        map4 = _align(record + 2 * RECORD_SLOT)
        map2 = _align(map4 + _MAP_4K)
        undo = _align(map2 + _MAP_2M)
        size = _align(undo + _UNDO)
        try:
            fd = os.memfd_create(f"vballoon-state-{guest}", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise HostResourceError(f"{guest}: cannot create the state memfd: {exc}") from exc
        self = cls(fd, mm)
        h = self.h
        h["layout"] = ho.LAYOUT
        h["header_size"] = ho.Header.sizeof()
        h["record_offset"], h["record_slot_size"] = record, RECORD_SLOT
        h["map_4k_offset"], h["map_4k_bytes"] = map4, _MAP_4K
        h["map_2m_offset"], h["map_2m_bytes"] = map2, _MAP_2M
        h["undo_offset"], h["undo_bytes"] = undo, _UNDO
        h["magic"] = ho.MAGIC  # last: a file without it is not a state file
        return self

    @classmethod
    def open(cls, fd: int) -> StateFile:
        """Map a stored state memfd (raises :class:`HandoverError` when unusable)."""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < ho.HEADER_BYTES:
                raise HandoverError("not a state file")
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise HandoverError(f"cannot map the state file: {exc}") from exc
        self = cls(fd, mm)
        h = self.h
        if int(h["magic"]) != ho.MAGIC or int(h["layout"]) != ho.LAYOUT:
            self.close()
            raise HandoverError("unknown state layout")
        for off, n in (("map_4k_offset", "map_4k_bytes"), ("map_2m_offset", "map_2m_bytes"),
                       ("undo_offset", "undo_bytes")):  # fmt: skip
            if int(h[off]) + int(h[n]) > st.st_size:
                self.close()
                raise HandoverError("state file truncated")
        return self

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            del self.h
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)

    # -- the record ----------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return int(self.h["generation"])

    def read_record(self) -> dict[str, Any] | None:
        gen = self.generation
        if gen == 0:
            return None
        slot = gen & 1
        n = int(self.h[f"record_len{slot}"])
        off = int(self.h["record_offset"]) + slot * int(self.h["record_slot_size"])
        try:
            record = json.loads(bytes(self.mm[off : off + n]))
        except ValueError as exc:
            raise HandoverError(f"state record unreadable: {exc}") from None
        if not isinstance(record, dict) or int(record.get("v", 0)) != ho.RECORD_VERSION:
            raise HandoverError(f"state record version {record.get('v')!r} unknown")
        return record

    def commit(self, record: dict[str, Any]) -> None:
        """Write ``record`` into the free slot, then publish it (one 8-byte store)."""
        data = json.dumps(record, separators=(",", ":")).encode()
        size = int(self.h["record_slot_size"])
        if len(data) > size:
            raise HostResourceError(f"state record of {len(data)} bytes > {size}")
        gen = self.generation + 1
        slot = gen & 1
        off = int(self.h["record_offset"]) + slot * size
        self.mm[off : off + len(data)] = data
        self.h[f"record_len{slot}"] = len(data)
        self.h["generation"] = gen  # the commit point; the undo log is void from here
        self._snapshotted.clear()

    # -- page maps -----------------------------------------------------------------------

    def map_views(self, pages: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
        """uint8 views of the two maps covering ``pages`` pfns (a multiple of 512)."""
        if pages > MAX_PAGES or pages // 8 > int(self.h["map_4k_bytes"]):
            raise HostResourceError(f"page map of {pages} pages exceeds the state file")
        self.h["map_capacity"] = pages
        n4 = pages // 8
        n2 = _align(pages // 512, 8) // 8
        b4 = np.ndarray(n4, np.uint8, self.mm, int(self.h["map_4k_offset"]))
        b2 = np.ndarray(n2, np.uint8, self.mm, int(self.h["map_2m_offset"]))
        return b4, b2

    @property
    def map_capacity(self) -> int:
        return int(self.h["map_capacity"])

    def _map_base(self, which: int) -> int:
        return int(self.h["map_4k_offset" if which == ho.MapId.MAP_4K else "map_2m_offset"])

    def journal(self, which: int, lo: int, hi: int, scattered: npt.NDArray[np.intp] | None) -> None:
        """Before map ``which`` changes: save the old bytes ``[lo, hi)`` (or the bytes at
        ``scattered``) in the undo log of the current generation."""
        if which in self._snapshotted:
            return
        h = self.h
        gen = self.generation
        if int(h["undo_base"]) != gen:
            h["undo_len"] = 0
            h["undo_base"] = gen
        base = self._map_base(which)
        if scattered is None:
            body = bytes(self.mm[base + lo : base + hi])
            entry = ho.UndoEntry.build(
                {"kind": ho.UndoKind.SPAN, "map": which, "first": lo, "count": hi - lo}
            )
        else:
            idx = np.asarray(scattered, dtype=np.uint64)
            view = np.ndarray(int(h["map_4k_bytes"] if which == 0 else h["map_2m_bytes"]),
                              np.uint8, self.mm, base)  # fmt: skip
            old = view[idx.astype(np.intp)]
            body = idx.astype("<u8").tobytes() + old.tobytes()
            entry = ho.UndoEntry.build(
                {"kind": ho.UndoKind.SCATTER, "map": which, "first": 0, "count": len(idx)}
            )
        start = int(h["undo_len"])
        end = start + len(entry) + len(body)
        if end > int(h["undo_bytes"]):  # a huge batch: snapshot the whole map once
            size = (
                self.map_capacity // 8 if which == 0 else _align(self.map_capacity // 512, 8) // 8
            )
            self._snapshotted.add(which)
            body = bytes(self.mm[base : base + size])
            entry = ho.UndoEntry.build(
                {"kind": ho.UndoKind.SPAN, "map": which, "first": 0, "count": size}
            )
            start = int(h["undo_len"])
            end = start + len(entry) + len(body)
            if end > int(h["undo_bytes"]):
                raise HostResourceError("undo log full")
        uoff = int(h["undo_offset"]) + start
        self.mm[uoff : uoff + len(entry)] = entry
        self.mm[uoff + len(entry) : uoff + len(entry) + len(body)] = body
        h["undo_len"] = end  # the entry is valid from here

    def rollback(self) -> int:
        """Undo the map changes made after the last commit; returns the entries undone."""
        h = self.h
        if int(h["undo_base"]) != self.generation or not int(h["undo_len"]):
            return 0
        entries: list[tuple[int, int, int, int, int]] = []
        pos, end = 0, int(h["undo_len"])
        base_off = int(h["undo_offset"])
        while pos < end:
            e = ho.UndoEntry.parse(
                bytes(self.mm[base_off + pos : base_off + pos + ho.UNDO_ENTRY_SIZE])
            )
            body = base_off + pos + ho.UNDO_ENTRY_SIZE
            size = e.count if e.kind == ho.UndoKind.SPAN else e.count * 9
            entries.append((e.kind, e.map, e.first, e.count, body))
            pos += ho.UNDO_ENTRY_SIZE + size
        for kind, which, first, count, body in reversed(entries):
            base = self._map_base(which)
            if kind == ho.UndoKind.SPAN:
                self.mm[base + first : base + first + count] = self.mm[body : body + count]
            else:
                idx = np.frombuffer(self.mm, "<u8", count, body).astype(np.intp)
                old = np.frombuffer(self.mm, np.uint8, count, body + 8 * count)
                view = np.ndarray(int(h["map_4k_bytes"] if which == 0 else h["map_2m_bytes"]),
                                  np.uint8, self.mm, base)  # fmt: skip
                view[idx] = old
        h["undo_len"] = 0
        return len(entries)


class Handover:
    """The fd store as one ``vdev serve`` process uses it: what it inherited, by name, and
    unique names for what it stores."""

    def __init__(self, store: FdStore, inherited: dict[str, list[int]]) -> None:
        self.store = store
        self.inherited = inherited
        self.token = secrets.token_hex(3)
        self._serial = 0
        self._taken: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.store.enabled

    def name(self, kind: str, guest: str) -> str:
        self._serial += 1
        return f"{kind}.{guest}.{self.token}.{self._serial}"

    def take(self, name: str) -> int | None:
        """The inherited fd stored as ``name`` (claimed: not cleaned up). Asked again for
        the same name (roles sharing one entry), a dup of it."""
        fds = self.inherited.pop(name, None)
        if not fds:
            first = self._taken.get(name)
            return os.dup(first) if first is not None else None
        for extra in fds[1:]:
            with contextlib.suppress(OSError):
                os.close(extra)
        self._taken[name] = fds[0]
        return fds[0]

    def cleanup(self) -> list[str]:
        """Close and remove from the store every inherited fd nobody claimed."""
        names = sorted(self.inherited)
        for name, fds in self.inherited.items():
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.store.remove(name)
        self.inherited.clear()
        if names:
            log.info("fd store: removed %d stale entries", len(names))
        return names


class ConnStore:
    """The fd store entries of one connection: one name per role key (``conn``,
    ``backend.N``, ``mem.N``, ``q0.kick.N``...). The store keeps one entry per open file
    description (systemd drops a duplicate), so roles whose fds share one (regions of one
    memfd; an eventfd QEMU hands over again, or for another ring) share that entry's name:
    the connection keeps a dup of every stored fd to compare. A name a role let go is removed
    only after the next commit (a crash in between leaves the old record valid), and only
    when no role uses it any more."""

    def __init__(self, handover: Handover, guest: str) -> None:
        self.handover = handover
        self.guest = guest
        self.names: dict[str, str] = {}
        self._dups: dict[str, int] = {}  # stored name -> our dup of its fd
        self._obsolete: set[str] = set()

    def put(self, key: str, fd: int | None, *, poll: bool = True) -> None:
        """Store ``fd`` as role ``key`` (None: the role let its fd go)."""
        old = self.names.pop(key, None)
        if old is not None:
            self._obsolete.add(old)
        if fd is None:
            return
        for name, dup in self._dups.items():
            if same_open_file(fd, dup):
                self.names[key] = name
                self._obsolete.discard(name)
                return
        name = self.handover.name(key.replace(".", "-"), self.guest)
        self.handover.store.store(name, fd, poll=poll)
        self.names[key] = name
        self._dups[name] = os.dup(fd)

    def adopt(self, key: str, name: str, fd: int) -> None:
        """A role of a resumed connection, stored as ``name`` by the previous process."""
        self.names[key] = name
        if name not in self._dups:
            self._dups[name] = os.dup(fd)

    def committed(self) -> None:
        live = set(self.names.values())
        for name in self._obsolete - live:
            self.handover.store.remove(name)
            with contextlib.suppress(OSError, KeyError):
                os.close(self._dups.pop(name))
        self._obsolete.clear()

    def remove_all(self) -> None:
        for name in {*self.names.values(), *self._obsolete, *self._dups}:
            self.handover.store.remove(name)
        for dup in self._dups.values():
            with contextlib.suppress(OSError):
                os.close(dup)
        self.names.clear()
        self._dups.clear()
        self._obsolete.clear()

    def close(self) -> None:
        """Close our dups, leaving the store as it is (a hand-over)."""
        for dup in self._dups.values():
            with contextlib.suppress(OSError):
                os.close(dup)
        self._dups.clear()


Journal = Callable[[int, int, int, "npt.NDArray[np.intp] | None"], None]
