"""Real guest memory for the driver, inside a Linux guest: pages the guest kernel gives us.

A userspace balloon needs what ``vmw_balloon.c`` gets from the page allocator: pages that
stay put while the host holds them, and their guest-physical frame numbers. Here:

* pages come from anonymous ``mmap`` + ``mlock`` (locked: never swapped), populated at once;
  the guest kernel chooses them, so it gives up free pages first, then page cache, then
  (with swap) other processes' memory, exactly as for any allocation;
* frame numbers come from ``/proc/self/pagemap`` (root: without CAP_SYS_ADMIN the kernel
  reports 0), one ``pread`` for a whole chunk;
* 2 MiB pages come from transparent huge pages (``MADV_HUGEPAGE`` on a 2 MiB-aligned run):
  a run counts only when pagemap shows 512 contiguous frames starting on a 2 MiB boundary;
  otherwise it is given back and the driver falls back to 4 KiB pages;
* pages must not move while ballooned: mlocked pages can still be migrated by compaction
  unless ``vm.compact_unevictable_allowed`` is 0, and khugepaged may collapse 4 KiB runs
  into a huge page, so :func:`pin_settings` sets the sysctl and the 4 KiB chunks are
  ``MADV_NOHUGEPAGE``; :meth:`LinuxPageSource.moved` re-reads the frame numbers and reports
  any page that moved anyway (the runner then stops: a moved page must never stay locked
  on the host while the guest reuses its old frame).

:class:`LockedPages` is the small pool of locked pages for rings, request buffers and the
batch page; it is also the :class:`guest_driver.virtq.MemoryPort` for them (guest-physical
address -> our own mapping). Each page is its own allocation unit: guest pages are not
physically contiguous, so nothing larger than a page is handed out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from guest_driver.guest_memory import PAGES_PER_2M, PageSize
from protocol.errors import LocalError
from protocol.units import PAGE_SIZE

log = logging.getLogger(__name__)

I64Array = npt.NDArray[np.int64]
_EMPTY = np.zeros(0, dtype=np.int64)

PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_POPULATE = 0x02, 0x20, 0x8000
MADV_DONTNEED, MADV_HUGEPAGE, MADV_NOHUGEPAGE = 4, 14, 15
MAP_FAILED = ctypes.c_void_p(-1).value
HUGE = PAGE_SIZE * PAGES_PER_2M
PFN_MASK = (1 << 55) - 1
PAGE_PRESENT = 1 << 63
COMPACT_UNEVICTABLE = "/proc/sys/vm/compact_unevictable_allowed"

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
for _name in ("munmap", "mlock", "munlock", "madvise"):
    getattr(_libc, _name).argtypes = [ctypes.c_void_p, ctypes.c_size_t] + (
        [ctypes.c_int] if _name == "madvise" else []
    )
    getattr(_libc, _name).restype = ctypes.c_int


class GuestMemoryError(LocalError):
    """The guest kernel refused memory or a frame number (not root, no pagemap, mlock limit).

    Raised by :class:`LockedPages` and :class:`LinuxPageSource`; caught by nothing inside
    the driver: ``guest-driver run-linux`` reports it and stops (a balloon page without a
    known frame must never be sent to the host)."""


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise GuestMemoryError(f"{what}: {os.strerror(err)}")


def _mmap(length: int, *, populate: bool = False) -> int:
    flags = MAP_PRIVATE | MAP_ANONYMOUS | (MAP_POPULATE if populate else 0)
    addr = _libc.mmap(None, length, PROT_READ | PROT_WRITE, flags, -1, 0)
    if addr is None or addr == MAP_FAILED:
        raise GuestMemoryError(f"mmap of {length} bytes: {os.strerror(ctypes.get_errno())}")
    return int(addr)


def _unmap(addr: int, length: int) -> None:
    _libc.munmap(addr, length)


class Pagemap:
    """``/proc/self/pagemap``: frame numbers of our own virtual pages (root only)."""

    def __init__(self) -> None:
        self.fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)

    def pfns(self, addr: int, npages: int) -> I64Array:
        """Frame numbers of ``npages`` pages from ``addr``; -1 where not present."""
        raw = os.pread(self.fd, 8 * npages, addr // PAGE_SIZE * 8)
        entries = np.frombuffer(raw, dtype=np.uint64)
        present = (entries & np.uint64(PAGE_PRESENT)) != 0
        pfns = (entries & np.uint64(PFN_MASK)).astype(np.int64)
        pfns[~present] = -1
        return pfns

    def close(self) -> None:
        os.close(self.fd)


def pin_settings() -> dict[str, str]:
    """Keep ballooned pages where they are: compaction may not migrate mlocked pages.

    Returns the previous values (give them to :func:`restore_settings`)."""
    old: dict[str, str] = {}
    try:
        with open(COMPACT_UNEVICTABLE) as f:
            old[COMPACT_UNEVICTABLE] = f.read().strip()
        with open(COMPACT_UNEVICTABLE, "w") as f:
            f.write("0")
    except OSError as exc:
        log.warning(
            "cannot set %s to 0 (%s): locked pages may be migrated", COMPACT_UNEVICTABLE, exc
        )
    return old


def restore_settings(old: dict[str, str]) -> None:
    for path, value in old.items():
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as exc:
            log.warning("cannot restore %s: %s", path, exc)


@dataclass
class LockedPages:
    """A pool of locked 4 KiB pages with known frame numbers: rings, buffers, batch page.

    ``alloc`` hands out whole pages only (guest pages are not physically contiguous); it is
    the :class:`guest_driver.virtio_pci.Allocator` and, through ``read``/``write``, the
    :class:`guest_driver.virtq.MemoryPort` of what it handed out."""

    pagemap: Pagemap
    pages: int = 64
    contiguous = False  # one page per allocation (Allocator.contiguous)
    _addr: int = 0
    _pfns: I64Array = field(default_factory=lambda: _EMPTY)
    _next: int = 0
    _by_pfn: dict[int, int] = field(default_factory=dict)  # pfn -> page index

    def __post_init__(self) -> None:
        length = self.pages * PAGE_SIZE
        self._addr = _mmap(length, populate=True)
        _libc.madvise(self._addr, length, MADV_NOHUGEPAGE)
        _check(_libc.mlock(self._addr, length), "mlock of the ring pages")
        ctypes.memset(self._addr, 0, length)
        self._pfns = self.pagemap.pfns(self._addr, self.pages)
        if (self._pfns <= 0).any():
            raise GuestMemoryError("pagemap gave no frame numbers (run as root)")
        self._by_pfn = {int(p): i for i, p in enumerate(self._pfns)}

    def alloc(self, size: int, align: int = PAGE_SIZE) -> int:
        if size > PAGE_SIZE or align > PAGE_SIZE:
            raise GuestMemoryError(f"{size} bytes (align {align}) do not fit one page")
        if self._next >= self.pages:
            raise GuestMemoryError(f"all {self.pages} locked pages are in use")
        gpa = int(self._pfns[self._next]) * PAGE_SIZE
        self._next += 1
        return gpa

    def _where(self, gpa: int, n: int) -> int:
        index = self._by_pfn.get(gpa // PAGE_SIZE)
        if index is None or gpa % PAGE_SIZE + n > PAGE_SIZE:
            raise GuestMemoryError(f"guest-physical {gpa:#x}+{n} is not inside one of our pages")
        return self._addr + index * PAGE_SIZE + gpa % PAGE_SIZE

    async def read(self, gpa: int, n: int) -> bytes:
        return ctypes.string_at(self._where(gpa, n), n)

    async def write(self, gpa: int, data: bytes) -> None:
        ctypes.memmove(self._where(gpa, len(data)), data, len(data))

    def moved(self) -> bool:
        now = self.pagemap.pfns(self._addr, self.pages)
        return bool((now != self._pfns).any())

    def close(self) -> None:
        if self._addr:
            _libc.munlock(self._addr, self.pages * PAGE_SIZE)
            _unmap(self._addr, self.pages * PAGE_SIZE)
            self._addr = 0


@dataclass
class _Chunk:
    """One allocation: ``npages`` 4 KiB pages from ``addr`` (2 MiB pages: 512 each)."""

    addr: int
    size: PageSize
    firsts: I64Array  # the frame of each balloon page (its first 4 KiB frame)
    live: npt.NDArray[np.bool_]  # still in the balloon


class LinuxPageSource:
    """The driver core's :class:`guest_driver.driver.PageSource` from the guest kernel."""

    def __init__(self, pagemap: Pagemap, batch: LockedPages, *, huge: bool = True) -> None:
        self.pagemap = pagemap
        self.huge = huge
        self._batch_pfn = batch.alloc(PAGE_SIZE) // PAGE_SIZE
        self._total = os.sysconf("SC_PHYS_PAGES")
        self._chunks: list[_Chunk] = []
        # every ballooned page's frame -> (chunk index, index in chunk), as sorted arrays
        self._index_pfns = _EMPTY
        self._index_chunk = _EMPTY
        self._index_pos = _EMPTY
        self.refused_huge = 0

    @property
    def total_pages(self) -> int:
        return int(self._total)

    @property
    def batch_pfn(self) -> int | None:
        return int(self._batch_pfn)

    # -- allocation ----------------------------------------------------------------------

    def alloc_balloon(self, size: PageSize, n: int) -> I64Array:
        if n <= 0:
            return _EMPTY
        if size == PageSize.SIZE_2M:
            return self._alloc_huge(n) if self.huge else _EMPTY
        length = n * PAGE_SIZE
        addr = _mmap(length)
        _libc.madvise(addr, length, MADV_NOHUGEPAGE)
        if _libc.mlock(addr, length) != 0:  # populates; fails when memory is short
            _unmap(addr, length)
            return _EMPTY
        pfns = self.pagemap.pfns(addr, n)
        if (pfns <= 0).any():
            _libc.munlock(addr, length)
            _unmap(addr, length)
            raise GuestMemoryError("pagemap gave no frame numbers (run as root)")
        self._add(_Chunk(addr, size, pfns, np.ones(n, dtype=np.bool_)))
        return pfns

    def _alloc_huge(self, n: int) -> I64Array:
        # A 2 MiB-aligned run inside an over-sized mapping, THP asked for with MADV_HUGEPAGE.
        length = n * HUGE
        raw = _mmap(length + HUGE)
        addr = (raw + HUGE - 1) // HUGE * HUGE
        if addr > raw:
            _unmap(raw, addr - raw)
        tail = raw + length + HUGE - (addr + length)
        if tail:
            _unmap(addr + length, tail)
        _libc.madvise(addr, length, MADV_HUGEPAGE)
        if _libc.mlock(addr, length) != 0:
            _unmap(addr, length)
            return _EMPTY
        pfns = self.pagemap.pfns(addr, n * PAGES_PER_2M).reshape(n, PAGES_PER_2M)
        firsts = pfns[:, 0]
        huge = (
            (firsts > 0)
            & (firsts % PAGES_PER_2M == 0)
            & (pfns == firsts[:, None] + np.arange(PAGES_PER_2M)).all(axis=1)
        )
        # Give back the runs the kernel did not back with one huge page.
        for i in np.flatnonzero(~huge):
            a = addr + int(i) * HUGE
            _libc.munlock(a, HUGE)
            _unmap(a, HUGE)
        self.refused_huge += int((~huge).sum())
        got = firsts[huge].astype(np.int64)
        for run_start, run_len in _runs(np.flatnonzero(huge)):
            a = addr + run_start * HUGE
            self._add(_Chunk(a, PageSize.SIZE_2M, firsts[run_start : run_start + run_len].copy(),
                             np.ones(run_len, dtype=np.bool_)))  # fmt: skip
        return got

    def _add(self, chunk: _Chunk) -> None:
        self._chunks.append(chunk)
        ci = len(self._chunks) - 1
        pfns = np.concatenate([self._index_pfns, chunk.firsts])
        cidx = np.concatenate([self._index_chunk, np.full(chunk.firsts.size, ci, np.int64)])
        pos = np.concatenate([self._index_pos, np.arange(chunk.firsts.size, dtype=np.int64)])
        order = np.argsort(pfns, kind="stable")
        self._index_pfns, self._index_chunk, self._index_pos = pfns[order], cidx[order], pos[order]

    # -- freeing -------------------------------------------------------------------------

    def free_balloon(self, size: PageSize, firsts: npt.ArrayLike) -> None:
        pfns = np.asarray(firsts, dtype=np.int64).ravel()
        if not pfns.size:
            return
        at = np.searchsorted(self._index_pfns, pfns)
        ok = (at < self._index_pfns.size) & (
            self._index_pfns[np.minimum(at, self._index_pfns.size - 1)] == pfns
        )
        if not ok.all():
            raise GuestMemoryError(f"freeing {int((~ok).sum())} pages that are not ours")
        chunks, positions = self._index_chunk[at], self._index_pos[at]
        step = HUGE if size == PageSize.SIZE_2M else PAGE_SIZE
        for ci in np.unique(chunks):
            chunk = self._chunks[int(ci)]
            pos = np.sort(positions[chunks == ci])
            chunk.live[pos] = False
            for start, count in _runs(pos):  # one munmap per virtually contiguous run
                a = chunk.addr + start * step
                _libc.munlock(a, count * step)
                _unmap(a, count * step)
        keep = np.ones(self._index_pfns.size, dtype=np.bool_)
        keep[at] = False
        self._index_pfns = self._index_pfns[keep]
        self._index_chunk = self._index_chunk[keep]
        self._index_pos = self._index_pos[keep]

    # -- checks --------------------------------------------------------------------------

    def moved(self) -> int:
        """How many ballooned pages no longer sit at the frame the host was given."""
        moved = 0
        for chunk in self._chunks:
            live = np.flatnonzero(chunk.live)
            if not live.size:
                continue
            per = PAGES_PER_2M if chunk.size == PageSize.SIZE_2M else 1
            for start, count in _runs(live):
                now = self.pagemap.pfns(chunk.addr + start * per * PAGE_SIZE, count * per)
                moved += int((now[::per] != chunk.firsts[start : start + count]).sum())
        return moved

    @property
    def ballooned_pages(self) -> int:
        """4 KiB pages currently held."""
        return sum(
            int(c.live.sum()) * (PAGES_PER_2M if c.size == PageSize.SIZE_2M else 1)
            for c in self._chunks
        )


def _runs(sorted_positions: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive integers in a sorted array."""
    if not sorted_positions.size:
        return []
    breaks = np.flatnonzero(np.diff(sorted_positions) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [sorted_positions.size]])
    return [(int(sorted_positions[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in KiB."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0])
    return out
