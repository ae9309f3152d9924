"""A small, honest model of a guest kernel's memory, over the guest RAM's PFN space.

Every 4 KiB page of guest RAM is in exactly one state:

* ``RESERVED``: the "kernel": pages nobody else may take (low memory, the virtqueue rings,
  the balloon driver's batch page, the unused tail of the last 2 MiB frame);
* ``FREE``: on the free lists;
* ``CACHE``: clean page cache, droppable at any time;
* ``APP``: application (anonymous) memory, each page with a priority 0..3; priority 3 is
  critical (never reclaimed), lower priorities are reclaimed first (swapped out);
* ``BALLOON``: handed to the balloon driver.

The allocator works like a buddy allocator would, without its machinery: a 2 MiB allocation
takes a wholly free, 2 MiB-aligned frame and never reclaims (Linux allocates 2 MiB balloon
pages without ``__GFP_RECLAIM``); a 4 KiB allocation takes free pages from the most
fragmented frames first (so that whole frames stay free for 2 MiB allocations), in address
order (so that reclaimed ranges coalesce), then drops page cache, then -- only for the
balloon, the "real demand" case -- reclaims the least critical application pages.
Application allocations only ever take ``FREE`` or ``CACHE`` pages: a ballooned page is never
handed to the workload.

Everything is numpy over per-page arrays (state, priority) plus a per-frame free count
maintained incrementally; there is no per-page Python loop.

When a RAM buffer is given (the memfd mapping of our vhost-user front-end), pages given to
the application or the page cache are really written: one 8-byte marker per page, enough
for the host to back the page with real memory and for :meth:`GuestMemory.verify_app` to
check later that no application page was ever ballooned (a ballooned page is punched out
by the device and reads back as zeros).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protocol.errors import ConfigError, LocalError
from protocol.units import PAGE_SIZE

PAGES_PER_2M = 512
FRAME_SHIFT = 9
_FRAME_OFFSETS = np.arange(PAGES_PER_2M, dtype=np.int64)
_EMPTY_PFNS = np.empty(0, dtype=np.int64)

I64Array = npt.NDArray[np.int64]
_MARKER_SALT = np.uint64(0x5642_414C_4C4F_4F4E)  # "VBALLOON"


class PageSize(enum.IntEnum):
    """The balloon's two page sizes, in Linux's order (``vmballoon_page_size_type``)."""

    SIZE_4K = 0
    SIZE_2M = 1

    @property
    def frames(self) -> int:
        return 1 if self is PageSize.SIZE_4K else PAGES_PER_2M

    @property
    def label(self) -> str:
        return "4k" if self is PageSize.SIZE_4K else "2M"


class PageState(enum.IntEnum):
    FREE = 0
    RESERVED = 1
    CACHE = 2
    APP = 3
    BALLOON = 4


_FREE = int(PageState.FREE)  # a plain int: numpy compares it without the enum


CRITICAL = 3  # application priority that is never reclaimed


@dataclass(frozen=True)
class MemInfo:
    total: int
    free: int
    cache: int
    app: int
    balloon: int
    reserved: int
    app_reclaimed: int  # application pages taken by the balloon so far (swapped out)


def _as_pfns(pfns: npt.ArrayLike) -> I64Array:
    return np.asarray(pfns, dtype=np.int64).reshape(-1)


class GuestMemory:
    """The guest's page allocator, page cache and application pages.

    ``reserved`` lists (first pfn, count) ranges the kernel owns (rings, ...);
    ``kernel_pages`` more pages at the bottom of RAM are reserved as "the kernel";
    ``ram``, when given, is a writable buffer over all of guest RAM (pfn 0 at offset 0).
    """

    def __init__(
        self,
        total_pages: int,
        *,
        reserved: Iterable[tuple[int, int]] = (),
        kernel_pages: int = 0,
        ram: memoryview | bytearray | None = None,
    ) -> None:
        if total_pages <= 0:
            raise ConfigError("guest memory must have at least one page")
        self.total_pages = total_pages
        self.frames = math.ceil(total_pages / PAGES_PER_2M)
        span = self.frames * PAGES_PER_2M
        self.state = np.full(span, PageState.FREE, dtype=np.uint8)
        self.priority = np.zeros(span, dtype=np.uint8)
        self.state[total_pages:] = PageState.RESERVED
        self.state[: min(kernel_pages, total_pages)] = PageState.RESERVED
        for first, count in reserved:
            if first < 0 or count < 0 or first + count > total_pages:
                raise ConfigError(f"reserved range {first}+{count} is outside guest RAM")
            self.state[first : first + count] = PageState.RESERVED
        self.frame_free = (
            (self.state == PageState.FREE).reshape(self.frames, PAGES_PER_2M).sum(axis=1)
        ).astype(np.int64)
        self.app_reclaimed = 0
        self._ram: npt.NDArray[np.uint64] | None = None
        if ram is not None:
            if len(ram) < total_pages * PAGE_SIZE:
                raise ConfigError("the RAM buffer is smaller than guest RAM")
            words = np.frombuffer(ram, dtype=np.uint64, count=total_pages * PAGE_SIZE // 8)
            self._ram = words.reshape(total_pages, PAGE_SIZE // 8)
        # The balloon driver's batch page: one reserved page, taken like any kernel page.
        self.batch_pfn: int | None = self.reserve_page()

    def detach_ram(self) -> None:
        """Stop writing to the RAM buffer (before it is unmapped)."""
        self._ram = None

    # -- kernel pages -------------------------------------------------------------------

    def reserve_page(self) -> int | None:
        """Take one free page for the kernel (lowest address), or None when memory is full."""
        pfns = np.flatnonzero(self.state[: self.total_pages] == PageState.FREE)[:1]
        if pfns.size == 0:
            return None
        self._take(pfns, PageState.RESERVED)
        return int(pfns[0])

    # -- the balloon driver's allocator ---------------------------------------------------

    def alloc_balloon(self, size: PageSize, n: int) -> I64Array:
        """Up to ``n`` pages of ``size`` for the balloon (first PFNs); fewer means failure."""
        if n <= 0:
            return np.empty(0, dtype=np.int64)
        if size is PageSize.SIZE_2M:
            frames = np.flatnonzero(self.frame_free == PAGES_PER_2M)[:n]
            firsts = frames.astype(np.int64) << FRAME_SHIFT
            self._take(_expand_2m(firsts), PageState.BALLOON)
            return firsts
        pfns = self._pick_free(n)
        self._take(pfns, PageState.BALLOON)
        got = [pfns]
        missing = n - pfns.size
        if missing:
            cache = self._pick_state(PageState.CACHE, missing)
            self._retake(cache, PageState.BALLOON)
            got.append(cache)
            missing -= cache.size
        if missing:
            victims = self._pick_app_victims(missing)
            self._retake(victims, PageState.BALLOON)
            self.app_reclaimed += int(victims.size)
            got.append(victims)
        return np.concatenate(got) if len(got) > 1 else pfns

    def free_balloon(self, size: PageSize, firsts: npt.ArrayLike) -> None:
        """Give balloon pages back to the free lists (they read as zeros until rewritten)."""
        pfns = _as_pfns(firsts)
        if size is PageSize.SIZE_2M:
            pfns = _expand_2m(pfns)
        if pfns.size == 0:
            return
        if not np.all(self.state[pfns] == PageState.BALLOON):
            raise LocalError("freeing a page that is not in the balloon")
        self._give(pfns)

    # -- applications and the page cache ----------------------------------------------------

    def alloc_app(self, n: int, priority: int) -> I64Array:
        """Up to ``n`` application pages: free pages, then dropped cache; never balloon pages."""
        if not 0 <= priority <= CRITICAL:
            raise ConfigError(f"priority {priority} outside 0..{CRITICAL}")
        pfns = self._pick_free(n)
        self._take(pfns, PageState.APP)
        if pfns.size < n:
            cache = self._pick_state(PageState.CACHE, n - pfns.size)
            self._retake(cache, PageState.APP)
            pfns = np.concatenate([pfns, cache])
        self.priority[pfns] = priority
        self._touch(pfns)
        return pfns

    def free_app(self, n: int) -> int:
        """Free ``n`` application pages, least critical and highest address first."""
        victims = self._pick_state(PageState.APP, n, by_priority=True)
        self.priority[victims] = 0
        self._give(victims)
        return int(victims.size)

    def fill_cache(self, n: int) -> int:
        """Read ``n`` pages of "files" into the page cache (free pages only)."""
        pfns = self._pick_free(n)
        self._take(pfns, PageState.CACHE)
        self._touch(pfns)
        return int(pfns.size)

    def drop_cache(self, n: int) -> int:
        pfns = self._pick_state(PageState.CACHE, n)
        self._give(pfns)
        return int(pfns.size)

    def pages(self, state: PageState) -> I64Array:
        return np.flatnonzero(self.state[: self.total_pages] == state).astype(np.int64)

    def count(self, state: PageState) -> int:
        return int(np.count_nonzero(self.state[: self.total_pages] == state))

    def meminfo(self) -> MemInfo:
        counts = np.bincount(self.state[: self.total_pages], minlength=len(PageState))
        return MemInfo(
            total=self.total_pages,
            free=int(counts[PageState.FREE]),
            cache=int(counts[PageState.CACHE]),
            app=int(counts[PageState.APP]),
            balloon=int(counts[PageState.BALLOON]),
            reserved=int(counts[PageState.RESERVED]),
            app_reclaimed=self.app_reclaimed,
        )

    def verify_app(self) -> int:
        """Application (and cache) pages whose marker is gone; 0 when nothing was lost.

        Only meaningful with a RAM buffer: a page the device reclaimed reads back as zeros.
        """
        if self._ram is None:
            return 0
        mask = (self.state[: self.total_pages] == PageState.APP) | (
            self.state[: self.total_pages] == PageState.CACHE
        )
        pfns = np.flatnonzero(mask)
        return int(np.count_nonzero(self._ram[pfns, 0] != _marker(pfns)))

    # -- internals ------------------------------------------------------------------------

    def _pick_free(self, n: int) -> I64Array:
        """``n`` free pages (or fewer), most fragmented frames first, address order inside."""
        if n <= 0:
            return np.empty(0, dtype=np.int64)
        free = self.frame_free
        # Partially free frames first (fewest free pages first, stable: address order among
        # equals), whole free frames last in address order. Only the partial frames need
        # sorting and a look at their page states; whole ones are all free.
        partial = np.flatnonzero((free > 0) & (free < PAGES_PER_2M))
        head = _EMPTY_PFNS
        if partial.size:
            partial = partial[np.argsort(free[partial], kind="stable")]
            enough = int(np.searchsorted(np.cumsum(free[partial]), n)) + 1
            frames = partial[:enough]
            rows = self.state.reshape(self.frames, PAGES_PER_2M)[frames] == _FREE
            r, c = np.nonzero(rows)
            head = (frames[r].astype(np.int64) << FRAME_SHIFT) + c
            if head.size >= n:
                return head[:n]
        need = n - head.size
        whole = np.flatnonzero(free == PAGES_PER_2M)[: -(-need // PAGES_PER_2M)]
        tail = ((whole.astype(np.int64)[:, None] << FRAME_SHIFT) + _FRAME_OFFSETS).reshape(-1)
        return np.concatenate((head, tail[:need])) if head.size else tail[:need]

    def _pick_state(self, state: PageState, n: int, *, by_priority: bool = False) -> I64Array:
        if n <= 0:
            return np.empty(0, dtype=np.int64)
        pfns = np.flatnonzero(self.state[: self.total_pages] == state).astype(np.int64)
        if by_priority:
            pfns = pfns[::-1]
            pfns = pfns[np.argsort(self.priority[pfns], kind="stable")]
        return pfns[:n]

    def _pick_app_victims(self, n: int) -> I64Array:
        mask = (self.state[: self.total_pages] == PageState.APP) & (
            self.priority[: self.total_pages] < CRITICAL
        )
        pfns = np.flatnonzero(mask).astype(np.int64)
        pfns = pfns[np.argsort(self.priority[pfns], kind="stable")]
        return pfns[:n]

    def _take(self, pfns: I64Array, state: PageState) -> None:
        """FREE -> ``state``."""
        if pfns.size == 0:
            return
        self.state[pfns] = state
        self.frame_free -= np.bincount(pfns >> FRAME_SHIFT, minlength=self.frames)

    def _retake(self, pfns: I64Array, state: PageState) -> None:
        """CACHE/APP -> ``state`` (free counts unchanged)."""
        if pfns.size:
            self.state[pfns] = state
            self.priority[pfns] = 0

    def _give(self, pfns: I64Array) -> None:
        """Any state -> FREE."""
        if pfns.size == 0:
            return
        self.state[pfns] = PageState.FREE
        self.frame_free += np.bincount(pfns >> FRAME_SHIFT, minlength=self.frames)

    def _touch(self, pfns: I64Array) -> None:
        if self._ram is not None and pfns.size:
            self._ram[pfns, 0] = _marker(pfns)


def _marker(pfns: npt.NDArray[np.integer]) -> npt.NDArray[np.uint64]:
    return pfns.astype(np.uint64) ^ _MARKER_SALT


def _expand_2m(firsts: I64Array) -> I64Array:
    """The 4 KiB PFNs of each 2 MiB page, page by page."""
    return (firsts[:, None] + np.arange(PAGES_PER_2M, dtype=np.int64)[None, :]).reshape(-1)


# ---------------------------------------------------------------------------------------
# A small synthetic workload


@dataclass
class WorkloadSpec:
    """A workload wanting ``base`` pages plus a wave of ``amplitude`` pages every ``period`` s.

    ``cache`` pages of page cache are read at start. Pages are allocated in chunks whose
    priorities cycle through ``priorities`` (3 = critical).
    """

    base: int = 0
    amplitude: int = 0
    period: float = 20.0
    cache: int = 0
    priorities: tuple[int, ...] = (3, 2, 1, 0)
    chunk: int = 256
    cache_growth: int = 0  # pages per second read into the page cache while memory is free


class Workload:
    """Grows and shrinks its resident application memory towards a moving goal.

    ``step(now)`` returns the shortfall in pages: what it wanted but could not get (memory
    pressure). Pages the balloon reclaimed from it count as missing and are faulted back in
    on the next step, like swapped-out anonymous memory.
    """

    def __init__(self, memory: GuestMemory, spec: WorkloadSpec) -> None:
        self.memory = memory
        self.spec = spec
        self._chunk_index = 0
        self.shortfall = 0
        self.started: float | None = None
        self._last: float | None = None
        if spec.cache:
            memory.fill_cache(spec.cache)

    def goal(self, now: float) -> int:
        if self.started is None:
            self.started = now
        if not self.spec.amplitude:
            return self.spec.base
        phase = (now - self.started) / self.spec.period * 2 * math.pi
        return self.spec.base + int(self.spec.amplitude * (1 - math.cos(phase)) / 2)

    def step(self, now: float) -> int:
        goal = self.goal(now)
        resident = self.memory.count(PageState.APP)
        if resident > goal:
            self.memory.free_app(resident - goal)
            want = 0
        else:
            want = self._grow(goal - resident)
        self.shortfall = want
        if self.spec.cache_growth and self._last is not None and want == 0:
            self.memory.fill_cache(int(self.spec.cache_growth * max(0.0, now - self._last)))
        self._last = now
        return want

    def _grow(self, want: int) -> int:
        while want > 0:
            prios = self.spec.priorities
            prio = prios[self._chunk_index % len(prios)]
            got = self.memory.alloc_app(min(want, self.spec.chunk), prio).size
            if got == 0:
                break
            self._chunk_index += 1
            want -= got
        return want
