"""Guest memory as the back-end sees it: the regions a front-end shared, mapped once each.

* :class:`GuestMemory` holds the regions of one connection. ``SET_MEM_TABLE`` replaces them
  (:meth:`GuestMemory.set_table`), ``ADD_MEM_REG`` / ``REM_MEM_REG`` edit them. A new table
  may arrive at any time; users never keep a view into a mapping across an ``await``, they
  translate again on every access (the rings keep guest-physical addresses, translated from
  front-end virtual addresses once at ``SET_VRING_ADDR``). So unmapping a removed region is
  always safe, except while a reclaim worker thread still uses it: such regions are retired
  until the worker finishes.
* Replaced, removed and refused regions (and the fds of a refused table) are never closed
  inline: they are *released*, and the owner takes them (:meth:`GuestMemory.take_released`,
  or :meth:`GuestMemory.detach` for everything) and closes them with :func:`close_regions`
  in a worker thread. Closing the last fd of a populated RAM file frees that RAM there and
  then (about a second per few GiB): a front-end that hands over its only copy of a large
  memfd and then replaces the table must not stall every other guest. :meth:`close` closes
  whatever is left, inline (owners that do not care, e.g. tests).
* Every access is bounds-checked: a range must lie wholly inside one region (PROTOCOL.md
  section 1); anything else raises :class:`~protocol.errors.GuestError`.
* It implements the device model's ``GuestRam`` protocol (``total_pages``, ``ram_pfn_mask``,
  ``read``, ``write``).
* Reclaim punches holes in the region's file: ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` for large
  pieces, ``madvise(MADV_REMOVE)`` on our shared mapping of it for small ones (the same
  kernel operation on shmem), each falling back to the other. Runs are clamped to their
  regions and planned with numpy into per-region arrays of (offset, length); the calls are
  made by a small C loop (``vdev/native/punch.c``, built by scripts/setup, loaded with
  ctypes: one foreign call per region and batch, the GIL released while it runs), so no
  Python code runs per page. Without the library (no compiler at set-up) the same calls are
  made from a Python loop, and :data:`NATIVE_PUNCH` says so.

Accesses to ring index fields go through :meth:`load_u16` / :meth:`store_u16`, which copy two
naturally aligned bytes (one machine load/store on the hosts we support).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import logging
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from protocol.errors import FrontendError, GuestError, HostResourceError
from protocol.units import PAGE_SHIFT, PAGE_SIZE

log = logging.getLogger(__name__)

U64_MAX = (1 << 64) - 1

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: Reclaims larger than this run in a worker thread so one guest never stalls another.
THREAD_RECLAIM_BYTES = 64 << 20
#: ... and so do reclaims of more separate runs than this (one punch each, ~4-10 us: 16k
#: scattered 4 KiB pages from a virtio-balloon guest would hold the trio thread ~0.1 s). One
#: full vmmemctl batch of isolated pages (512, ~2 ms) stays inline: less than the inline
#: punch of a 64 MiB run costs (~12 ms), and the thread hand-off cost ~8 % of the scattered
#: 4 KiB inflate rate (A/B: 163k vs 178k pages/s).
THREAD_RECLAIM_PIECES = 512
#: Pieces up to this long are punched with ``madvise(MADV_REMOVE)`` on our mapping (cheaper per
#: call than ctypes' fallocate; many per ``process_madvise`` call in the native loop); longer
#: ones with ``fallocate`` (faster per byte; 2 MiB per call in the native loop, ~10 % faster
#: than one call for a 1 GiB run, and the file's locks are let go between calls).
MADVISE_MAX_BYTES = 64 << 10
_MADV_REMOVE = getattr(mmap, "MADV_REMOVE", None)
_NO_PUNCH = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


#: the native reclaim loop (see the module docstring); $VBALLOON_PUNCH_LIB overrides the path
NATIVE_LIBRARY = Path(__file__).with_name("native") / "libvbpunch.so"


def _load_native() -> tuple[Any, Any, str]:
    path = os.environ.get("VBALLOON_PUNCH_LIB") or str(NATIVE_LIBRARY)
    try:
        lib = ctypes.CDLL(path)
        fn, batching = lib.vb_punch, lib.vb_punch_batching
    except (OSError, AttributeError) as exc:
        msg = f"{path}: {exc} (scripts/setup or the wheel builds it): reclaim loops in Python"
        return None, None, msg
    batching.argtypes, batching.restype = [], ctypes.c_int
    u64p = ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [
        ctypes.c_void_p,  # map
        ctypes.c_int,  # fd
        ctypes.c_int64,  # file_delta
        ctypes.c_void_p,  # moff (uint64[n])
        ctypes.c_void_p,  # len (uint64[n])
        ctypes.c_size_t,  # n
        ctypes.c_uint64,  # madvise_max
        u64p,  # done
        ctypes.POINTER(ctypes.c_size_t),  # failed
        ctypes.POINTER(ctypes.c_int),  # call
    ]
    fn.restype = ctypes.c_int
    return fn, batching, path


_vb_punch, _vb_punch_batching, NATIVE_PUNCH_INFO = _load_native()
#: True when reclaim runs through the native loop; :data:`NATIVE_PUNCH_INFO` says from where,
#: or why not.
NATIVE_PUNCH = _vb_punch is not None
if not NATIVE_PUNCH:
    log.warning("native punch library not loaded: %s", NATIVE_PUNCH_INFO)


def punch_batching() -> bool | None:
    """Whether the native loop gives isolated pages back many per kernel call
    (``process_madvise``): True once that worked, False once the kernel refused it (then one
    call per page), None before the first scattered reclaim or without the native loop."""
    state = _vb_punch_batching() if _vb_punch_batching is not None else 0
    return None if state == 0 else state > 0


def _mapping_address(mm: mmap.mmap) -> int:
    """The address of ``mm``'s first byte (the export ends with the ctypes object)."""
    view = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def punch_hole(fd: int, offset: int, length: int) -> None:
    """``fallocate(fd, PUNCH_HOLE | KEEP_SIZE, offset, length)``; raises OSError."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """One region as vhost-user describes it."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def validate(self) -> None:
        if self.memory_size == 0:
            raise FrontendError("memory region of size 0")
        for name in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
            if getattr(self, name) + self.memory_size > U64_MAX + 1:
                raise FrontendError(f"memory region {name} + size overflows 64 bits")


@dataclass(eq=False)
class Region:
    spec: RegionSpec
    fd: int
    mm: mmap.mmap
    base: int  # offset of the region's first byte inside ``mm``
    file_key: tuple[int, int]  # (st_dev, st_ino)
    addr: int = 0  # address of ``mm`` in this process (for the native punch loop)
    busy: int = 0  # reclaim workers using it
    retired: bool = False
    closed: bool = field(default=False)

    @property
    def gpa(self) -> int:
        return self.spec.guest_phys_addr

    @property
    def size(self) -> int:
        return self.spec.memory_size

    @property
    def uaddr(self) -> int:
        return self.spec.userspace_addr

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.mm.close()
        except BufferError:  # a view escaped: leave it to the garbage collector
            log.warning("region gpa=%#x: mapping still exported, not unmapped", self.gpa)
        os.close(self.fd)


def _map(spec: RegionSpec, fd: int) -> Region:
    try:
        st = os.fstat(fd)
        align = max(mmap.ALLOCATIONGRANULARITY, st.st_blksize or PAGE_SIZE)
        map_off = spec.mmap_offset // align * align
        base = spec.mmap_offset - map_off
        length = base + spec.memory_size
        if map_off + length > st.st_size:
            raise HostResourceError(
                f"region gpa={spec.guest_phys_addr:#x} needs {map_off + length} bytes of its "
                f"file, which has {st.st_size}"
            )
        mm = mmap.mmap(
            fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=map_off
        )
    except OSError as exc:
        raise HostResourceError(f"cannot map region gpa={spec.guest_phys_addr:#x}: {exc}") from exc
    return Region(
        spec=spec,
        fd=fd,
        mm=mm,
        base=base,
        file_key=(st.st_dev, st.st_ino),
        addr=_mapping_address(mm),
    )


class GuestMemory:
    """The memory regions of one vhost-user connection (see the module docstring)."""

    def __init__(self, name: str = "guest") -> None:
        self.name = name
        self._regions: list[Region] = []  # sorted by gpa
        self._retired: list[Region] = []  # replaced while a reclaim worker uses them
        self._released: list[Region | int] = []  # for the owner to close (take_released)
        self.generation = 0  # bumps on every table change
        self.reclaimed_bytes_total = 0
        #: Reclaims that failed (a punch the host refused): the pages stay resident.
        self.reclaim_failures = 0
        self._index()

    # -- table management ----------------------------------------------------------------

    def set_table(self, specs: list[RegionSpec], fds: list[int]) -> None:
        """Replace every region. Takes ownership of ``fds`` (released on failure too); the
        old regions are released (:meth:`take_released`)."""
        if len(specs) != len(fds):
            self._released += fds
            raise FrontendError(f"{len(specs)} memory regions but {len(fds)} fds")
        new: list[Region] = []
        pending = list(fds)
        try:
            for spec in specs:
                spec.validate()
            for spec in specs:
                new.append(_map(spec, pending[0]))
                pending.pop(0)
            self._check_overlap(new)
        except BaseException:
            self._released += pending
            self._released += new
            raise
        old, self._regions = self._regions, sorted(new, key=lambda r: r.gpa)
        self._drop(old)
        self._changed()

    def add_region(self, spec: RegionSpec, fd: int) -> None:
        """Add a region (owning ``fd``); one with the same gpa, size and uaddr is replaced
        and released, and so are ``fd`` / the new region when refused."""
        try:
            spec.validate()
            region = _map(spec, fd)
        except BaseException:
            self._released.append(fd)
            raise
        # an identical region added again (same gpa, size, uaddr) replaces the old one
        same = [
            r
            for r in self._regions
            if (r.gpa, r.size, r.uaddr) == (region.gpa, region.size, region.uaddr)
        ]
        others = [r for r in self._regions if r not in same]
        try:
            self._check_overlap([*others, region])
        except BaseException:
            self._released.append(region)
            raise
        self._regions = sorted([*others, region], key=lambda r: r.gpa)
        self._drop(same)
        self._changed()

    def remove_region(self, spec: RegionSpec) -> bool:
        """Remove (and release) every region equal to ``spec`` in (gpa, size, uaddr); True
        if any was."""
        keep: list[Region] = []
        gone: list[Region] = []
        for r in self._regions:
            same = (r.gpa, r.size, r.uaddr) == (
                spec.guest_phys_addr,
                spec.memory_size,
                spec.userspace_addr,
            )
            (gone if same else keep).append(r)
        if not gone:
            return False
        self._regions = keep
        self._drop(gone)
        self._changed()
        return True

    def close(self) -> None:
        """Unmap and close everything now, in this thread (retiring regions a reclaim worker
        still uses)."""
        close_regions(self.detach())

    def detach(self) -> list[Region | int]:
        """Forget every region; return those the caller must close (:func:`close_regions`),
        released ones included, e.g. in a worker thread: closing the last fd of a RAM file
        frees the RAM there and then. Regions a reclaim worker still uses are retired and
        released when it finishes (take them with :meth:`take_released`)."""
        old, self._regions = self._regions, []
        self._drop(old)
        self._changed()
        return self.take_released()

    def take_released(self) -> list[Region | int]:
        """The regions (and bare fds) replaced, removed or refused since the last call, for
        the caller to close with :func:`close_regions`, in a worker thread when they may
        be the last reference to a populated RAM file."""
        released, self._released = self._released, []
        return released

    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(self._regions)

    @property
    def empty(self) -> bool:
        return not self._regions

    @staticmethod
    def _check_overlap(regions: list[Region]) -> None:
        rs = sorted(regions, key=lambda r: r.gpa)
        for a, b in itertools.pairwise(rs):
            if a.gpa + a.size > b.gpa:
                raise FrontendError(
                    f"memory regions overlap: gpa {a.gpa:#x}+{a.size:#x} and {b.gpa:#x}"
                )

    def _drop(self, regions: Iterable[Region]) -> None:
        """Regions leaving the table: released now, or once their reclaim workers finish."""
        for r in regions:
            if r.busy:
                r.retired = True
                self._retired.append(r)
            else:
                self._released.append(r)

    def _changed(self) -> None:
        self.generation += 1
        self._index()

    def _index(self) -> None:
        rs = self._regions
        self._spans = [(r.gpa, r.gpa + r.size, r) for r in rs]
        self._gpa_starts = np.array([r.gpa for r in rs], dtype=np.uint64)
        # page-granular RAM: the whole 4 KiB frames inside each region
        self._pfn_starts = np.array(
            [(r.gpa + PAGE_SIZE - 1) >> PAGE_SHIFT for r in rs], dtype=np.uint64
        )
        self._pfn_ends = np.array([(r.gpa + r.size) >> PAGE_SHIFT for r in rs], dtype=np.uint64)
        self._pfn_spans = [
            (int(a), int(b)) for a, b in zip(self._pfn_starts, self._pfn_ends, strict=True)
        ]
        self._total_pages = (
            int(
                np.sum(
                    np.maximum(
                        self._pfn_ends.astype(np.int64) - self._pfn_starts.astype(np.int64), 0
                    )
                )
            )
            if rs
            else 0
        )

    # -- translation ---------------------------------------------------------------------

    def _find(self, gpa: int, length: int) -> tuple[Region, int]:
        """The region holding [gpa, gpa+length) and the offset of gpa inside its mapping."""
        if gpa < 0 or length < 0 or gpa + length > U64_MAX + 1:
            raise GuestError(f"{self.name}: address range {gpa:#x}+{length:#x} overflows")
        for start, end, r in self._spans:  # few regions: a linear scan beats bisect
            if start <= gpa and gpa + length <= end and (gpa < end or length == 0):
                return r, r.base + gpa - start
        raise GuestError(f"{self.name}: range {gpa:#x}+{length:#x} is not inside one RAM region")

    def qva_to_gpa(self, qva: int, length: int) -> int:
        """Translate a front-end virtual address (ring addresses); the range must fit a region."""
        for r in self._regions:
            if r.uaddr <= qva and qva + length <= r.uaddr + r.size:
                return r.gpa + qva - r.uaddr
        raise FrontendError(
            f"{self.name}: front-end address {qva:#x}+{length:#x} is not inside one region"
        )

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._find(gpa, length)
        except GuestError:
            return False
        return True

    # -- GuestRam ------------------------------------------------------------------------

    @property
    def total_pages(self) -> int:
        return self._total_pages

    def ram_pfn_mask(self, pfns: npt.ArrayLike, npages: int) -> npt.NDArray[np.bool_]:
        """Per pfn: is [pfn, pfn+npages) wholly inside one region? (vectorised)"""
        arr = np.asarray(pfns, dtype=np.uint64)
        if not self._regions or npages <= 0:
            return np.zeros(arr.shape, dtype=bool)
        if arr.size:  # the usual batch: every range inside one region (two reductions)
            lo, hi = int(arr.min()), int(arr.max()) + npages
            for first, end in self._pfn_spans:
                if first <= lo and hi <= end:
                    return np.ones(arr.shape, dtype=bool)
        idx = np.searchsorted(self._pfn_starts, arr, side="right").astype(np.int64) - 1
        valid = idx >= 0
        safe = np.where(valid, idx, 0)
        ends = self._pfn_ends[safe]
        n = np.uint64(npages)
        # pfn + npages <= end, written without overflowing uint64
        fits = (ends >= n) & (arr <= ends - np.minimum(ends, n))
        return valid & fits & (arr >= self._pfn_starts[safe])

    def read(self, gpa: int, length: int) -> bytes:
        r, off = self._find(gpa, length)
        return r.mm[off : off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        r, off = self._find(gpa, len(data))
        r.mm[off : off + len(data)] = bytes(data)

    def read_array(self, gpa: int, dtype: np.dtype[Any], count: int) -> np.ndarray[Any, Any]:
        """``count`` items of ``dtype`` at ``gpa`` (a copy: never a view into the mapping)."""
        data = self.read(gpa, dtype.itemsize * count)
        return np.frombuffer(data, dtype=dtype, count=count)

    def load_u16(self, gpa: int) -> int:
        if gpa & 1:
            raise GuestError(f"{self.name}: unaligned u16 at {gpa:#x}")
        r, off = self._find(gpa, 2)
        return int.from_bytes(r.mm[off : off + 2], "little")

    def store_u16(self, gpa: int, value: int) -> None:
        if gpa & 1:
            raise GuestError(f"{self.name}: unaligned u16 at {gpa:#x}")
        r, off = self._find(gpa, 2)
        r.mm[off : off + 2] = (value & 0xFFFF).to_bytes(2, "little")

    # -- reclaim -------------------------------------------------------------------------

    def _plan(
        self,
        pfn_starts: npt.ArrayLike,
        pfn_counts: npt.ArrayLike,
        regions: Iterable[Region] | None = None,
    ) -> list[Plan]:
        """Per region: the pieces to punch, as arrays of (offset in region, length), runs
        clamped to the region and adjacent pieces merged, in offset order. Vectorised: a
        virtio-balloon batch is thousands of one-page runs."""
        starts = np.asarray(pfn_starts, dtype=np.uint64).ravel()
        counts = np.asarray(pfn_counts, dtype=np.uint64).ravel()
        if starts.shape != counts.shape:
            raise ValueError("pfn_starts and pfn_counts differ in length")
        plans: list[Plan] = []
        regions = self._regions if regions is None else list(regions)
        if not starts.size or not regions:
            return plans
        if starts.size == 1:  # one run (a contiguous batch): the same plan with Python ints
            pfn = min(int(starts[0]), U64_MAX >> PAGE_SHIFT)
            run_lo = pfn << PAGE_SHIFT
            run_hi = (pfn + min(int(counts[0]), (U64_MAX >> PAGE_SHIFT) - pfn)) << PAGE_SHIFT
            for r in regions:
                a, b = max(run_lo, r.gpa), min(run_hi, r.gpa + r.size)
                if a < b:
                    plans.append(
                        (r, np.array([a - r.gpa], np.uint64), np.array([b - a], np.uint64))
                    )
            return plans
        # PFNs past 2**52 cannot be guest RAM: clip them so the shifts stay inside 64 bits
        cap = np.uint64(U64_MAX >> PAGE_SHIFT)
        first = np.minimum(starts, cap)
        lo = first << np.uint64(PAGE_SHIFT)
        hi = (first + np.minimum(counts, cap - first)) << np.uint64(PAGE_SHIFT)
        for r in regions:
            a = np.maximum(lo, np.uint64(r.gpa))
            b = np.minimum(hi, np.uint64(r.gpa + r.size))
            keep = a < b
            if not keep.any():
                continue
            off = a[keep] - np.uint64(r.gpa)
            end = b[keep] - np.uint64(r.gpa)
            if off.size > 1 and not (off[1:] > off[:-1]).all():  # drivers send sorted batches
                order = np.argsort(off, kind="stable")
                off, end = off[order], end[order]
            reach = np.maximum.accumulate(end)
            new = np.ones(off.size, dtype=np.bool_)
            new[1:] = off[1:] > reach[:-1]  # a gap: a new piece (touching/overlapping merge)
            idx = np.flatnonzero(new)
            seg_off = off[idx]
            seg_end = np.maximum.reduceat(end, idx)
            plans.append((r, seg_off, seg_end - seg_off))
        return plans

    @staticmethod
    def _punch(plans: list[Plan]) -> int:
        if _vb_punch is None:
            return _punch_python(plans)
        done, failed, call = ctypes.c_uint64(), ctypes.c_size_t(), ctypes.c_int()
        total = 0
        for r, off, length in plans:
            moff = np.ascontiguousarray(off + np.uint64(r.base), dtype=np.uint64)
            lens = np.ascontiguousarray(length, dtype=np.uint64)
            err = _vb_punch(
                r.addr,
                r.fd,
                r.spec.mmap_offset - r.base,
                moff.ctypes.data,
                lens.ctypes.data,
                moff.size,
                MADVISE_MAX_BYTES,
                ctypes.byref(done),
                ctypes.byref(failed),
                ctypes.byref(call),
            )
            total += done.value
            if err:
                what = "madvise(MADV_REMOVE)" if call.value == 1 else "fallocate(PUNCH_HOLE)"
                raise HostResourceError(f"{what} failed: [Errno {err}] {os.strerror(err)}")
        return total

    def reclaim(self, pfn_starts: npt.ArrayLike, pfn_counts: npt.ArrayLike) -> int:
        """Punch the pages out of the RAM files now; returns the bytes punched."""
        try:
            done = self._punch(self._plan(pfn_starts, pfn_counts))
        except HostResourceError:
            self.reclaim_failures += 1
            raise
        self.reclaimed_bytes_total += done
        return done

    async def reclaim_async(self, pfn_starts: npt.ArrayLike, pfn_counts: npt.ArrayLike) -> int:
        """:meth:`reclaim`, planned and punched in a worker thread when it is large (many
        bytes, or many runs: one fallocate each)."""
        starts = np.asarray(pfn_starts, dtype=np.uint64).ravel()
        counts = np.asarray(pfn_counts, dtype=np.uint64).ravel()
        upper = int(np.minimum(counts, np.uint64(1 << 40)).sum()) << PAGE_SHIFT
        if starts.size <= THREAD_RECLAIM_PIECES and upper < THREAD_RECLAIM_BYTES:
            try:
                done = self._punch(self._plan(starts, counts))
            except HostResourceError:
                self.reclaim_failures += 1
                raise
        else:
            regions = list(self._regions)
            for r in regions:
                r.busy += 1
            try:
                done = await trio.to_thread.run_sync(
                    lambda: self._punch(self._plan(starts, counts, regions))
                )
            except HostResourceError:
                self.reclaim_failures += 1
                raise
            finally:
                for r in regions:
                    r.busy -= 1
                    if r.retired and not r.busy:
                        self._retired.remove(r)
                        self._released.append(r)  # the owner closes it (take_released)
        self.reclaimed_bytes_total += done
        return done

    def allocated_bytes(self) -> int:
        """Bytes the RAM files really occupy (st_blocks), each file counted once."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for r in self._regions:
            if r.file_key in seen:
                continue
            seen.add(r.file_key)
            total += os.fstat(r.fd).st_blocks * 512
        return total


#: one region's share of a reclaim: (region, offsets in it, lengths), uint64 arrays
Plan = tuple[Region, npt.NDArray[np.uint64], npt.NDArray[np.uint64]]


def _punch_python(plans: list[Plan]) -> int:
    """The reclaim loop without the native library: the same calls, one Python round each."""
    done = 0
    advice, small, unaligned = _MADV_REMOVE, MADVISE_MAX_BYTES, mmap.PAGESIZE - 1
    for r, offs, lengths in plans:
        for off, length in zip(offs.tolist(), lengths.tolist(), strict=True):
            addr = r.base + off
            if length <= small and advice is not None and not (addr | length) & unaligned:
                try:
                    r.mm.madvise(advice, addr, length)
                    done += length
                    continue
                except OSError as exc:
                    if exc.errno not in _NO_PUNCH:
                        raise HostResourceError(f"madvise(MADV_REMOVE) failed: {exc}") from exc
                    # e.g. a mapping madvise cannot punch: try fallocate on the file
            try:
                punch_hole(r.fd, r.spec.mmap_offset + off, length)
            except OSError as exc:
                if exc.errno not in _NO_PUNCH:
                    raise HostResourceError(f"fallocate(PUNCH_HOLE) failed: {exc}") from exc
                try:
                    r.mm.madvise(mmap.MADV_REMOVE, addr, length)
                except OSError as exc2:
                    raise HostResourceError(f"madvise(MADV_REMOVE) failed: {exc2}") from exc2
            done += length
    return done


def close_regions(regions: Iterable[Region | int]) -> None:
    """Unmap and close ``regions`` and bare fds (what :meth:`GuestMemory.detach` and
    :meth:`GuestMemory.take_released` hand out). Safe in a worker thread: nothing else
    refers to them any more."""
    for r in regions:
        if isinstance(r, int):
            _close_quietly(r)
        else:
            r.close()


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
