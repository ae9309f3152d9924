"""One-bit-per-page maps of the pages a guest has locked into its balloon.

Two packed bitmaps over the guest's PFN space:

* ``4k``: bit ``pfn`` is set when the 4 KiB page ``pfn`` is locked *as a 4 KiB page*;
* ``2m``: bit ``frame`` (``frame = pfn >> 9``) is set when the 2 MiB page starting at PFN
  ``frame * 512`` is locked *as a 2 MiB page*.

The two never overlap (the device refuses such locks), so a 4 KiB page is in the balloon
when either its own bit or its frame's bit is set. Memory: one bit per 4 KiB page plus one
bit per 2 MiB frame, i.e. about 32 KiB per GiB of guest-physical address space covered.

The maps cover PFNs ``0 .. capacity-1`` and grow on demand (``ensure``); a PFN beyond the
capacity is simply "not locked". The capacity is always a multiple of 512 pages so that a
2 MiB frame is exactly eight ``uint64`` words of the 4 KiB map. Every operation takes numpy
arrays of PFNs (or frames) and works on them at once; there is no per-page Python loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np
import numpy.typing as npt

from protocol.errors import ConfigError

PAGES_PER_2M = 512
FRAME_SHIFT = 9
_WORDS_PER_FRAME = PAGES_PER_2M // 64  # 8 uint64 words of the 4 KiB map per 2 MiB frame
#: Growth factor when a lock lands beyond the capacity (bounded over-allocation).
_GROWTH_NUM, _GROWTH_DEN = 5, 4

BoolArray = npt.NDArray[np.bool_]
U64Array = npt.NDArray[np.uint64]


def _as_u64(values: npt.ArrayLike) -> U64Array:
    array = np.asarray(values)
    if array.dtype != np.uint64:
        if array.size and array.dtype.kind == "i" and int(array.min()) < 0:
            raise ValueError("page numbers cannot be negative")
        array = array.astype(np.uint64)
    return array.reshape(-1)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class MapBacking(Protocol):
    """Where a :class:`PageMap` keeps its bits instead of process memory: the hand-over
    state file (:class:`vdev.handover.StateFile`), so the map outlives the process."""

    @property
    def map_capacity(self) -> int: ...

    def map_views(self, pages: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
        """The 4 KiB and 2 MiB bitmaps covering ``pages`` pfns (their bytes persist)."""
        ...

    def journal(self, which: int, lo: int, hi: int, scattered: npt.NDArray[np.intp] | None) -> None:
        """Called before map ``which`` (0: 4 KiB, 1: 2 MiB) changes bytes ``[lo, hi)`` or the
        bytes at ``scattered``."""
        ...


_Journal = Callable[[int, int, "npt.NDArray[np.intp] | None"], None]


class PageMap:
    """Locked 4 KiB pages and locked 2 MiB pages of one guest, one bit each."""

    __slots__ = ("_backing", "_bits_2m", "_bits_4k", "_count_2m", "_count_4k")

    def __init__(self, capacity: int = 0, *, backing: MapBacking | None = None) -> None:
        """``capacity``: PFNs to cover from the start (rounded up to a multiple of 512).
        ``backing``: keep the bits there (their current content is the map: counts are
        recounted from it) instead of in process memory."""
        if capacity < 0:
            raise ValueError("capacity cannot be negative")
        self._backing = backing
        pages = _round_up(capacity, PAGES_PER_2M)
        if backing is not None:
            pages = max(pages, backing.map_capacity)
            self._bits_4k, self._bits_2m = backing.map_views(pages)
            self._count_4k, self._count_2m = self.recount()
            return
        self._bits_4k = np.zeros(pages // 8, dtype=np.uint8)
        self._bits_2m = np.zeros(_round_up(pages // PAGES_PER_2M, 8) // 8, dtype=np.uint8)
        self._count_4k = 0
        self._count_2m = 0

    def _journal(self, which: int) -> _Journal | None:
        backing = self._backing
        if backing is None:
            return None
        return lambda lo, hi, scattered: backing.journal(which, lo, hi, scattered)

    # ----------------------------------------------------------------------------- size

    @property
    def capacity(self) -> int:
        """Number of PFNs covered (a multiple of 512)."""
        return int(self._bits_4k.size) * 8

    @property
    def nbytes(self) -> int:
        """Bytes held by the two bitmaps."""
        return int(self._bits_4k.nbytes + self._bits_2m.nbytes)

    @property
    def count_4k(self) -> int:
        """Pages locked as 4 KiB pages."""
        return self._count_4k

    @property
    def count_2m(self) -> int:
        """2 MiB pages locked."""
        return self._count_2m

    @property
    def size(self) -> int:
        """The balloon size in 4 KiB frames: 4 KiB pages + 512 x 2 MiB pages."""
        return self._count_4k + PAGES_PER_2M * self._count_2m

    def ensure(self, end_pfn: int, *, limit: int | None = None) -> None:
        """Cover at least PFNs ``0 .. end_pfn-1``, keeping the bits.

        Grows geometrically (x1.25) to keep repeated growth cheap; ``limit`` (e.g. the
        guest's RAM size in pages) caps that over-allocation, never ``end_pfn`` itself.
        """
        if end_pfn <= self.capacity:
            return
        grown = self.capacity * _GROWTH_NUM // _GROWTH_DEN
        if limit is not None:
            grown = min(grown, limit)
        pages = _round_up(max(end_pfn, grown), PAGES_PER_2M)
        if self._backing is not None:  # the file reserves the room: the views just grow
            self._bits_4k, self._bits_2m = self._backing.map_views(pages)
            return
        bits_4k = np.zeros(pages // 8, dtype=np.uint8)
        bits_4k[: self._bits_4k.size] = self._bits_4k
        bits_2m = np.zeros(_round_up(pages // PAGES_PER_2M, 8) // 8, dtype=np.uint8)
        bits_2m[: self._bits_2m.size] = self._bits_2m
        self._bits_4k, self._bits_2m = bits_4k, bits_2m

    def clear(self) -> None:
        """Forget every page (the capacity stays)."""
        if self._backing is not None:
            if self._count_4k:
                self._backing.journal(0, 0, self._bits_4k.size, None)
            if self._count_2m:
                self._backing.journal(1, 0, self._bits_2m.size, None)
        self._bits_4k.fill(0)
        self._bits_2m.fill(0)
        self._count_4k = 0
        self._count_2m = 0

    # ------------------------------------------------------------------------- queries

    def test_4k(self, pfns: npt.ArrayLike) -> BoolArray:
        """Per PFN: locked as a 4 KiB page."""
        return _test(self._bits_4k, _as_u64(pfns))

    def test_2m(self, frames: npt.ArrayLike) -> BoolArray:
        """Per 2 MiB frame number (``pfn >> 9``): locked as a 2 MiB page."""
        return _test(self._bits_2m, _as_u64(frames))

    def covered(self, pfns: npt.ArrayLike) -> BoolArray:
        """Per PFN: in the balloon, either as a 4 KiB page or inside a locked 2 MiB page."""
        array = _as_u64(pfns)
        result = _test(self._bits_4k, array) if self._count_4k else np.zeros(array.shape, np.bool_)
        if self._count_2m:
            result |= _test(self._bits_2m, array >> np.uint64(FRAME_SHIFT))
        return result

    def covered_pfn(self, pfn: int) -> bool:
        """:meth:`covered` for one PFN (a Python int), without arrays."""
        if pfn < 0:
            raise ValueError("page numbers cannot be negative")
        frame = pfn >> FRAME_SHIFT
        bits_4k, bits_2m = self._bits_4k, self._bits_2m
        if pfn >> 3 < bits_4k.size and bits_4k[pfn >> 3] >> (pfn & 7) & 1:
            return True
        return bool(frame >> 3 < bits_2m.size and bits_2m[frame >> 3] >> (frame & 7) & 1)

    def any_4k_in_2m(self, frames: npt.ArrayLike) -> BoolArray:
        """Per 2 MiB frame number: at least one of its 512 pages is locked as a 4 KiB page."""
        array = _as_u64(frames)
        if not self._count_4k:
            return np.zeros(array.shape, dtype=np.bool_)
        words = self._bits_4k.view(np.uint64).reshape(-1, _WORDS_PER_FRAME)
        inside = array < np.uint64(words.shape[0])
        result = np.zeros(array.shape, dtype=np.bool_)
        if inside.any():
            result[inside] = words[array[inside].astype(np.intp)].any(axis=1)
        return result

    def locked_4k(self) -> U64Array:
        """PFNs locked as 4 KiB pages, ascending."""
        return np.flatnonzero(np.unpackbits(self._bits_4k, bitorder="little")).astype(np.uint64)

    def locked_2m(self) -> U64Array:
        """Frame numbers (``pfn >> 9``) locked as 2 MiB pages, ascending."""
        return np.flatnonzero(np.unpackbits(self._bits_2m, bitorder="little")).astype(np.uint64)

    def recount(self) -> tuple[int, int]:
        """(4 KiB pages, 2 MiB pages) counted from the bitmaps (for checks; O(capacity))."""
        return (
            int(np.bitwise_count(self._bits_4k).sum(dtype=np.int64)),
            int(np.bitwise_count(self._bits_2m).sum(dtype=np.int64)),
        )

    # ------------------------------------------------------------------------- updates

    def set_4k(self, pfns: npt.ArrayLike) -> int:
        """Lock 4 KiB pages (grows the map as needed). Returns how many bits were newly set."""
        array = _as_u64(pfns)
        if array.size:
            self.ensure(int(array.max()) + 1)
        added = _update(self._bits_4k, array, set_bits=True, journal=self._journal(0))
        self._count_4k += added
        return added

    def clear_4k(self, pfns: npt.ArrayLike) -> int:
        """Unlock 4 KiB pages. Returns how many bits were cleared."""
        removed = _update(self._bits_4k, _as_u64(pfns), set_bits=False, journal=self._journal(0))
        self._count_4k -= removed
        return removed

    def set_2m(self, frames: npt.ArrayLike) -> int:
        """Lock 2 MiB pages by frame number. Returns how many bits were newly set."""
        array = _as_u64(frames)
        if array.size:
            self.ensure((int(array.max()) + 1) * PAGES_PER_2M)
        added = _update(self._bits_2m, array, set_bits=True, journal=self._journal(1))
        self._count_2m += added
        return added

    def clear_2m(self, frames: npt.ArrayLike) -> int:
        """Unlock 2 MiB pages by frame number. Returns how many bits were cleared."""
        removed = _update(self._bits_2m, _as_u64(frames), set_bits=False, journal=self._journal(1))
        self._count_2m -= removed
        return removed

    def __repr__(self) -> str:
        return (
            f"PageMap(capacity={self.capacity}, 4k={self._count_4k}, 2m={self._count_2m}, "
            f"nbytes={self.nbytes})"
        )


#: Batches whose indices span at most this many bytes of a map are tested / updated through
#: an unpacked copy of that span (a few whole-array operations; a batch of 512 contiguous or
#: every-other pages spans 64 / 128 bytes). Wider ones index the bytes one by one.
_SPAN_BYTES = 4096


def _span(bits: npt.NDArray[np.uint8], index: U64Array) -> tuple[int, int] | None:
    """(first byte, end byte) of a narrow span holding every index, all inside the map."""
    if not index.size:
        return None
    lo, hi = int(index.min()) >> 3, int(index.max()) >> 3
    if hi >= bits.size or hi - lo >= _SPAN_BYTES:
        return None
    return lo, hi + 1


def _test(bits: npt.NDArray[np.uint8], index: U64Array) -> BoolArray:
    span = _span(bits, index)
    if span is not None:
        lo, hi = span
        seg = np.unpackbits(bits[lo:hi], bitorder="little")
        return seg[(index - np.uint64(lo * 8)).astype(np.intp)].view(np.bool_)
    inside = index < np.uint64(bits.size * 8)
    result = np.zeros(index.shape, dtype=np.bool_)
    if inside.any():
        idx = index[inside]
        byte = bits[(idx >> np.uint64(3)).astype(np.intp)]
        result[inside] = (byte >> (idx & np.uint64(7)).astype(np.uint8)) & np.uint8(1) != 0
    return result


def _update(
    bits: npt.NDArray[np.uint8], index: U64Array, *, set_bits: bool, journal: _Journal | None = None
) -> int:
    """Set or clear the bits at ``index`` (duplicates allowed); returns how many changed.
    ``journal`` is told which bytes are about to change (the hand-over's undo log)."""
    span = _span(bits, index)
    if span is not None:
        lo, hi = span
        if journal is not None:
            journal(lo, hi, None)
        seg = np.unpackbits(bits[lo:hi], bitorder="little")
        before = int(np.count_nonzero(seg))
        seg[(index - np.uint64(lo * 8)).astype(np.intp)] = 1 if set_bits else 0
        after = int(np.count_nonzero(seg))
        bits[lo:hi] = np.packbits(seg, bitorder="little")
        return after - before if set_bits else before - after
    inside = index < np.uint64(bits.size * 8)
    if not inside.all():
        if set_bits:
            raise IndexError("page number beyond the map's capacity")
        index = index[inside]  # clearing a bit that is not there is a no-op
    if not index.size:
        return 0
    byte_index = (index >> np.uint64(3)).astype(np.intp)
    masks = np.left_shift(np.uint8(1), (index & np.uint64(7)).astype(np.uint8))
    touched = np.unique(byte_index)
    if journal is not None:
        journal(0, 0, touched)
    before = int(np.bitwise_count(bits[touched]).sum(dtype=np.int64))
    if set_bits:
        np.bitwise_or.at(bits, byte_index, masks)
    else:
        np.bitwise_and.at(bits, byte_index, np.invert(masks))
    after = int(np.bitwise_count(bits[touched]).sum(dtype=np.int64))
    return after - before if set_bits else before - after


class PinnedRanges:
    """Pages the device may never take, kept per owner ("rings", an operator's ranges).

    Each owner's ranges are (first PFN, count) pairs; the union is kept merged and sorted so
    a whole batch is tested with one ``searchsorted``.
    """

    def __init__(self) -> None:
        self._by_owner: dict[str, tuple[tuple[int, int], ...]] = {}
        self._starts: npt.NDArray[np.uint64] = np.zeros(0, np.uint64)
        self._ends: npt.NDArray[np.uint64] = np.zeros(0, np.uint64)

    def set(self, owner: str, ranges: Iterable[tuple[int, int]]) -> None:
        """Replace ``owner``'s ranges; an empty iterable removes the owner."""
        cleaned: list[tuple[int, int]] = []
        for start, count in ranges:
            if start < 0 or count < 0:
                raise ConfigError(f"bad pinned range ({start}, {count})")
            if count:
                cleaned.append((int(start), int(count)))
        if cleaned:
            self._by_owner[owner] = tuple(sorted(cleaned))
        else:
            self._by_owner.pop(owner, None)
        merged: list[list[int]] = []
        for start, count in sorted(r for rs in self._by_owner.values() for r in rs):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], start + count)
            else:
                merged.append([start, start + count])
        self._starts = np.array([s for s, _ in merged], dtype=np.uint64)
        self._ends = np.array([e for _, e in merged], dtype=np.uint64)

    def by_owner(self) -> dict[str, tuple[tuple[int, int], ...]]:
        return dict(self._by_owner)

    def overlaps(self, pfns: npt.NDArray[np.uint64], npages: int = 1) -> npt.NDArray[np.bool_]:
        """Per PFN: ``[pfn, pfn + npages)`` overlaps a pinned range (PFNs are RAM: no wrap)."""
        if not self._starts.size:
            return np.zeros(pfns.shape, dtype=np.bool_)
        ends = pfns + np.uint64(npages)
        j = np.searchsorted(self._starts, ends, side="left").astype(np.intp) - 1
        return (j >= 0) & (self._ends[np.maximum(j, 0)] > pfns)
