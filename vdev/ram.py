"""A simple in-process guest RAM for tests and the fuzzer (satisfies ``vdev.balloon.GuestRam``).

``BytearrayRam(regions=[(gpa, size), ...])`` models guest-physical RAM as page-aligned,
non-overlapping regions. Storage is sparse: a page gets its own ``bytearray`` the first time
it is written, so a "4 GiB guest" costs only the pages actually touched. Every ``read`` and
``write`` is recorded in ``accesses`` (``("r"|"w", gpa, length)``) so tests can check that
the device only touched what it may touch.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise

import numpy as np
import numpy.typing as npt

from protocol.errors import ConfigError, GuestError
from protocol.units import PAGE_SHIFT, PAGE_SIZE

_PAGE_MASK = PAGE_SIZE - 1


class BytearrayRam:
    """Guest RAM made of ``(gpa, size)`` regions, sparse, bytearray-backed."""

    def __init__(self, regions: Iterable[tuple[int, int]], *, record: bool = True) -> None:
        spans = sorted((int(gpa), int(size)) for gpa, size in regions)
        for gpa, size in spans:
            if gpa < 0 or size <= 0 or gpa & _PAGE_MASK or size & _PAGE_MASK:
                raise ConfigError(f"RAM region ({gpa:#x}, {size:#x}) is not page-aligned")
        for (gpa_a, size_a), (gpa_b, _) in pairwise(spans):
            if gpa_a + size_a > gpa_b:
                raise ConfigError(f"RAM regions at {gpa_a:#x} and {gpa_b:#x} overlap")
        self.regions: tuple[tuple[int, int], ...] = tuple(spans)
        self._start_pfns = np.array([gpa >> PAGE_SHIFT for gpa, _ in spans], dtype=np.uint64)
        self._end_pfns = np.array(
            [(gpa + size) >> PAGE_SHIFT for gpa, size in spans], dtype=np.uint64
        )
        self._pages: dict[int, bytearray] = {}
        self.record = record
        self.accesses: list[tuple[str, int, int]] = []

    @property
    def total_pages(self) -> int:
        """4 KiB frames of RAM."""
        return sum(size for _, size in self.regions) >> PAGE_SHIFT

    @property
    def end_pfn(self) -> int:
        """One past the highest RAM PFN (0 without RAM)."""
        return int(self._end_pfns.max()) if self._end_pfns.size else 0

    def ram_pfn_mask(self, pfns: npt.NDArray[np.uint64], npages: int) -> npt.NDArray[np.bool_]:
        """Per PFN: ``[pfn, pfn + npages)`` lies wholly inside one RAM region."""
        array = np.asarray(pfns, dtype=np.uint64).reshape(-1)
        if not self._start_pfns.size or npages <= 0:
            return np.zeros(array.shape, dtype=np.bool_)
        index = np.searchsorted(self._start_pfns, array, side="right").astype(np.intp) - 1
        found = index >= 0
        ends = self._end_pfns[np.maximum(index, 0)]
        inside = found & (array < ends)
        # ends - array wraps for PFNs past the end; those are already excluded by ``inside``.
        room = np.where(inside, ends - np.where(inside, array, 0), 0)
        return inside & (room >= np.uint64(npages))

    def _check(self, gpa: int, length: int) -> None:
        if length < 0 or gpa < 0:
            raise GuestError(f"bad guest access ({gpa:#x}, {length})")
        for start, size in self.regions:
            if start <= gpa and gpa + length <= start + size:
                return
        raise GuestError(f"guest range {gpa:#x}+{length:#x} is not inside one RAM region")

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length)
        if self.record:
            self.accesses.append(("r", gpa, length))
        out = bytearray()
        while length > 0:
            pfn, offset = gpa >> PAGE_SHIFT, gpa & _PAGE_MASK
            chunk = min(length, PAGE_SIZE - offset)
            page = self._pages.get(pfn)
            out += page[offset : offset + chunk] if page is not None else bytes(chunk)
            gpa += chunk
            length -= chunk
        return bytes(out)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._check(gpa, len(view))
        if self.record:
            self.accesses.append(("w", gpa, len(view)))
        done = 0
        while done < len(view):
            pfn, offset = gpa >> PAGE_SHIFT, gpa & _PAGE_MASK
            chunk = min(len(view) - done, PAGE_SIZE - offset)
            page = self._pages.setdefault(pfn, bytearray(PAGE_SIZE))
            page[offset : offset + chunk] = view[done : done + chunk]
            gpa += chunk
            done += chunk

    def touched_pfns(self) -> set[int]:
        """PFNs the recorded accesses touched."""
        pfns: set[int] = set()
        for _, gpa, length in self.accesses:
            if length:
                pfns.update(range(gpa >> PAGE_SHIFT, ((gpa + length - 1) >> PAGE_SHIFT) + 1))
        return pfns

    def __repr__(self) -> str:
        spans = ", ".join(f"({gpa:#x}, {size:#x})" for gpa, size in self.regions)
        return f"BytearrayRam([{spans}])"
