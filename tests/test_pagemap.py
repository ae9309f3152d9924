"""vdev.pagemap: the packed one-bit-per-page maps, checked against Python sets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdev.pagemap import PAGES_PER_2M, PageMap

GiB_PAGES = (1 << 30) >> 12

pfn_lists = st.lists(st.integers(0, 8 * PAGES_PER_2M - 1), max_size=600)
frame_lists = st.lists(st.integers(0, 15), max_size=20)


def test_empty_map() -> None:
    m = PageMap()
    assert m.capacity == 0
    assert m.size == m.count_4k == m.count_2m == 0
    assert not m.test_4k([0, 1, 2**52]).any()
    assert not m.covered([5]).any()
    assert not m.any_4k_in_2m([0]).any()
    assert m.locked_4k().size == 0


@pytest.mark.parametrize(
    ("requested", "capacity"),
    [(0, 0), (1, 512), (512, 512), (513, 1024), (GiB_PAGES, GiB_PAGES)],
)
def test_capacity_rounds_to_2m(requested: int, capacity: int) -> None:
    assert PageMap(requested).capacity == capacity


@pytest.mark.parametrize("gib", [1, 4, 64])
def test_memory_is_about_one_bit_per_page(gib: int) -> None:
    m = PageMap(gib * GiB_PAGES)
    per_gib = m.nbytes / gib
    assert 32 * 1024 <= per_gib <= 33 * 1024  # 1 bit per 4 KiB page + 1 bit per 2 MiB frame
    assert per_gib <= 64 * 1024


def test_growth_is_bounded() -> None:
    m = PageMap(GiB_PAGES)
    m.set_4k([GiB_PAGES + 5])  # just beyond: grows by 1.25x, not to double
    assert GiB_PAGES + 6 <= m.capacity <= GiB_PAGES * 5 // 4 + PAGES_PER_2M
    assert m.test_4k([GiB_PAGES + 5]).all()


def test_growth_keeps_bits() -> None:
    m = PageMap(512)
    m.set_4k([1, 511])
    m.set_2m([0])
    m.set_4k([100_000])
    assert m.test_4k([1, 511, 100_000]).all()
    assert m.test_2m([0]).all()
    assert (m.count_4k, m.count_2m) == m.recount() == (3, 1)


def test_negative_rejected() -> None:
    with pytest.raises(ValueError):
        PageMap(-1)
    with pytest.raises(ValueError):
        PageMap(10).set_4k(np.array([-1]))


def test_huge_pfns_are_not_locked() -> None:
    m = PageMap(1024)
    m.set_4k([3])
    big = np.array([2**52 - 1, 2**63, 2**64 - 1], dtype=np.uint64)
    assert not m.test_4k(big).any()
    assert not m.covered(big).any()
    assert not m.test_2m(big).any()
    assert not m.any_4k_in_2m(big).any()
    assert m.clear_4k(big) == 0


def test_covered_combines_both_maps() -> None:
    m = PageMap(4096)
    m.set_4k([3, 700])
    m.set_2m([2])  # pfns 1024..1535
    pfns = [3, 4, 700, 1023, 1024, 1300, 1535, 1536]
    assert m.covered(pfns).tolist() == [True, False, True, False, True, True, True, False]
    assert m.test_4k(pfns).tolist() == [True, False, True] + [False] * 5
    assert m.any_4k_in_2m([0, 1, 2, 3]).tolist() == [True, True, False, False]
    assert m.size == 2 + 512


def test_set_returns_newly_set_and_dedups() -> None:
    m = PageMap(1024)
    assert m.set_4k([1, 2, 2, 3, 1]) == 3
    assert m.set_4k([3, 4]) == 1
    assert m.count_4k == 4
    assert m.clear_4k([4, 4, 9]) == 1
    assert m.count_4k == 3
    assert m.set_2m([1, 1]) == 1
    assert m.clear_2m([0, 1]) == 1
    assert m.count_2m == 0


def test_clear_keeps_capacity() -> None:
    m = PageMap(2048)
    m.set_4k(range(0, 2048, 3))
    m.set_2m([1])
    m.clear()
    assert m.capacity == 2048
    assert m.size == 0
    assert m.recount() == (0, 0)
    assert m.locked_4k().size == m.locked_2m().size == 0


def test_vectorised_on_a_big_guest() -> None:
    m = PageMap(4 * GiB_PAGES)
    rng = np.random.default_rng(7)
    pfns = rng.choice(4 * GiB_PAGES, size=200_000, replace=False).astype(np.uint64)
    assert m.set_4k(pfns) == 200_000
    assert m.test_4k(pfns).all()
    assert np.array_equal(m.locked_4k(), np.sort(pfns))
    frames = np.unique(pfns >> np.uint64(9))
    assert m.any_4k_in_2m(frames).all()
    assert m.recount() == (200_000, 0)


@settings(max_examples=60, deadline=None)
@given(pfn_lists, pfn_lists, frame_lists, frame_lists, pfn_lists)
def test_against_sets(
    add: list[int], remove: list[int], add2m: list[int], remove2m: list[int], probe: list[int]
) -> None:
    m = PageMap(1024)
    small: set[int] = set()
    huge: set[int] = set()
    assert m.set_4k(add) == len(set(add))
    small |= set(add)
    assert m.clear_4k(remove) == len(small & set(remove))
    small -= set(remove)
    assert m.set_2m(add2m) == len(set(add2m))
    huge |= set(add2m)
    assert m.clear_2m(remove2m) == len(huge & set(remove2m))
    huge -= set(remove2m)

    assert m.count_4k == len(small)
    assert m.count_2m == len(huge)
    assert m.recount() == (len(small), len(huge))
    assert m.size == len(small) + 512 * len(huge)
    assert m.locked_4k().tolist() == sorted(small)
    assert m.locked_2m().tolist() == sorted(huge)
    assert m.test_4k(probe).tolist() == [p in small for p in probe]
    assert m.covered(probe).tolist() == [p in small or p >> 9 in huge for p in probe]
    frames = [p >> 9 for p in probe] + add2m
    assert m.test_2m(frames).tolist() == [f in huge for f in frames]
    assert m.any_4k_in_2m(frames).tolist() == [any(p >> 9 == f for p in small) for f in frames]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**52 - 1), max_size=50))
def test_sparse_high_pfns(pfns: list[int]) -> None:
    # Queries anywhere in the 52-bit PFN space never index out of the map.
    m = PageMap(1024)
    m.set_4k([p for p in pfns if p < 1024])
    low = {p for p in pfns if p < 1024}
    assert m.covered(np.array(pfns, dtype=np.uint64)).tolist() == [p in low for p in pfns]


@pytest.mark.parametrize(
    ("start", "end", "limit", "expected"),
    [
        (0, 1, None, 512),
        (4096, 4097, None, 5120),  # x1.25
        (4096, 4097, 4608, 4608),  # the limit caps the over-allocation
        (4096, 8000, 4608, 8192),  # ... never what is needed
        (4096, 100, 10, 4096),  # no shrinking
    ],
)
def test_ensure_growth(start: int, end: int, limit: int | None, expected: int) -> None:
    m = PageMap(start)
    m.ensure(end, limit=limit)
    assert m.capacity == expected


# --------------------------------------------------------------------------- PinnedRanges


def test_pinned_ranges_merge_per_owner_and_overlap() -> None:
    from protocol.errors import ConfigError
    from vdev.pagemap import PinnedRanges

    pinned = PinnedRanges()
    pfns = np.array([0, 9, 10, 14, 15, 20, 29, 30], dtype=np.uint64)
    assert not pinned.overlaps(pfns).any()
    pinned.set("rings", [(10, 5), (12, 0)])  # pages 10..14; a zero-length range is dropped
    pinned.set("operator", [(20, 10)])  # pages 20..29
    assert pinned.by_owner() == {"rings": ((10, 5),), "operator": ((20, 10),)}
    assert pinned.overlaps(pfns).tolist() == [False, False, True, True, False, True, True, False]
    # A 2 MiB-style range overlaps when any of its pages is pinned.
    assert pinned.overlaps(np.array([0, 512], dtype=np.uint64), 512).tolist() == [True, False]
    pinned.set("operator", [(14, 7)])  # touches and overlaps "rings": merged into 10..20
    assert pinned.overlaps(np.array([15, 20, 21], dtype=np.uint64)).tolist() == [True, True, False]
    pinned.set("rings", [])
    assert pinned.by_owner() == {"operator": ((14, 7),)}
    assert not pinned.overlaps(np.array([10, 13], dtype=np.uint64)).any()
    with pytest.raises(ConfigError):
        pinned.set("operator", [(-1, 2)])
