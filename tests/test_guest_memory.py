"""The guest memory model: allocator order, reclaim order, markers, workload."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from guest_driver.guest_memory import (
    CRITICAL,
    PAGES_PER_2M,
    GuestMemory,
    PageSize,
    PageState,
    Workload,
    WorkloadSpec,
)
from protocol.errors import ConfigError, LocalError

PAGES = 8 * PAGES_PER_2M


def test_reserved_pages_and_batch_page() -> None:
    mem = GuestMemory(PAGES, kernel_pages=100, reserved=[(1000, 4)])
    assert mem.batch_pfn == 100  # the lowest free page
    info = mem.meminfo()
    assert info.reserved == 100 + 4 + 1
    assert info.free == PAGES - info.reserved
    assert mem.state[1000:1004].tolist() == [PageState.RESERVED] * 4
    with pytest.raises(ConfigError):
        GuestMemory(PAGES, reserved=[(PAGES - 1, 2)])


def test_tail_frame_is_never_handed_out_as_2m() -> None:
    mem = GuestMemory(PAGES_PER_2M * 2 + 10)
    firsts = mem.alloc_balloon(PageSize.SIZE_2M, 5)
    assert firsts.tolist() == [PAGES_PER_2M]  # frame 0 holds the batch page, frame 2 is short
    assert mem.batch_pfn == 0
    assert mem.alloc_balloon(PageSize.SIZE_4K, 100).max() < PAGES_PER_2M * 2 + 10


def test_2m_allocations_are_aligned_wholly_free_frames_and_never_reclaim() -> None:
    mem = GuestMemory(PAGES)
    mem.fill_cache(PAGES_PER_2M)  # fills frame 0 (after the batch page) and part of frame 1
    firsts = mem.alloc_balloon(PageSize.SIZE_2M, 100)
    assert np.all(firsts % PAGES_PER_2M == 0)
    assert firsts.tolist() == [f * PAGES_PER_2M for f in range(2, 8)]
    assert mem.count(PageState.CACHE) == PAGES_PER_2M  # 2M never drops the cache
    assert mem.count(PageState.BALLOON) == 6 * PAGES_PER_2M


def test_4k_allocations_prefer_fragmented_frames_and_contiguous_runs() -> None:
    mem = GuestMemory(PAGES)
    mem.alloc_app(PAGES_PER_2M + 100, priority=1)  # frame 0 full, frame 1 has 100 used
    pfns = mem.alloc_balloon(PageSize.SIZE_4K, 50)
    # From frame 1 (partially used), not from the whole frames 2..7, in address order.
    assert np.all(pfns // PAGES_PER_2M == 1)
    assert np.all(np.diff(pfns) == 1)
    assert int(mem.frame_free[2:].min()) == PAGES_PER_2M


def test_balloon_takes_free_then_cache_then_least_critical_app_pages() -> None:
    mem = GuestMemory(PAGES)
    crit = mem.alloc_app(1000, priority=CRITICAL)
    low = mem.alloc_app(1000, priority=0)
    mid = mem.alloc_app(1000, priority=2)
    mem.fill_cache(500)
    free = mem.count(PageState.FREE)
    got = mem.alloc_balloon(PageSize.SIZE_4K, free + 500 + 1500)
    assert got.size == free + 2000
    assert mem.count(PageState.CACHE) == 0
    assert np.all(mem.state[low] == PageState.BALLOON)  # priority 0 first
    assert np.count_nonzero(mem.state[mid] == PageState.BALLOON) == 500
    assert np.all(mem.state[crit] == PageState.APP)  # critical: never
    assert mem.meminfo().app_reclaimed == 1500
    # Then the rest of the priority-2 pages, and never the critical ones.
    assert mem.alloc_balloon(PageSize.SIZE_4K, 600).size == 500
    assert mem.alloc_balloon(PageSize.SIZE_4K, 10).size == 0


def test_application_pages_never_come_from_the_balloon() -> None:
    mem = GuestMemory(PAGES)
    ballooned = mem.alloc_balloon(PageSize.SIZE_4K, PAGES - 2000)
    app = mem.alloc_app(5000, priority=1)
    assert app.size < 2000
    assert not set(app.tolist()) & set(ballooned.tolist())
    mem.free_balloon(PageSize.SIZE_4K, ballooned[:100])
    more = mem.alloc_app(5000, priority=1)
    assert set(more.tolist()) <= set(ballooned[:100].tolist())
    with pytest.raises(LocalError):
        mem.free_balloon(PageSize.SIZE_4K, app[:1])


def test_free_counts_stay_consistent() -> None:
    mem = GuestMemory(PAGES)
    rng = np.random.default_rng(1)
    held: list[tuple[PageSize, np.ndarray]] = []
    for _ in range(200):
        op = rng.integers(5)
        if op == 0:
            size = PageSize(int(rng.integers(2)))
            held.append((size, mem.alloc_balloon(size, int(rng.integers(1, 600)))))
        elif op == 1 and held:
            size, pfns = held.pop(int(rng.integers(len(held))))
            mem.free_balloon(size, pfns)
        elif op == 2:
            mem.alloc_app(int(rng.integers(1, 700)), int(rng.integers(4)))
        elif op == 3:
            mem.free_app(int(rng.integers(1, 700)))
        else:
            mem.fill_cache(int(rng.integers(1, 300)))
        expected = (mem.state == PageState.FREE).reshape(-1, PAGES_PER_2M).sum(axis=1)
        assert np.array_equal(mem.frame_free, expected)
    info = mem.meminfo()
    assert info.free + info.cache + info.app + info.balloon + info.reserved == PAGES


def test_pages_are_written_and_verified_in_ram() -> None:
    buf = mmap.mmap(-1, PAGES * 4096)
    ram = memoryview(buf)
    mem = GuestMemory(PAGES, ram=ram)
    app = mem.alloc_app(300, priority=1)
    mem.fill_cache(100)
    assert mem.verify_app() == 0
    assert int.from_bytes(ram[int(app[0]) * 4096 : int(app[0]) * 4096 + 8], "little") != 0
    # A page the device punched out reads back as zeros: verify notices.
    ram[int(app[5]) * 4096 : int(app[5]) * 4096 + 8] = bytes(8)
    assert mem.verify_app() == 1
    del ram
    mem._ram = None
    buf.close()


def test_workload_grows_shrinks_and_reports_pressure() -> None:
    mem = GuestMemory(PAGES)
    work = Workload(mem, WorkloadSpec(base=1000, amplitude=2000, period=10.0, cache=300))
    assert mem.count(PageState.CACHE) == 300
    assert work.step(0.0) == 0 and mem.count(PageState.APP) == 1000
    assert work.step(5.0) == 0 and mem.count(PageState.APP) == 3000
    assert work.step(10.0) == 0 and mem.count(PageState.APP) == 1000
    # Balloon nearly everything: the workload cannot grow back, it reports the shortfall.
    mem.alloc_balloon(PageSize.SIZE_4K, mem.count(PageState.FREE) + 300)
    short = work.step(5.0)
    assert short == 2000
    assert mem.count(PageState.APP) == 1000
    priorities = set(mem.priority[mem.pages(PageState.APP)].tolist())
    assert CRITICAL in priorities and len(priorities) > 1
