"""The virtio-balloon personality, sans-I/O (no QEMU)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from protocol import virtio_balloon as vb
from vdev.device_virtio_balloon import (
    CONFIG_SIZE,
    DEFLATEQ,
    DEVICE_FEATURES,
    INFLATEQ,
    STATSQ,
    VirtioBalloon,
    build_stats,
    parse_stats,
    pfn_array,
)
from vdev.ram import BytearrayRam

MIB = 1 << 20


@dataclass
class FakeChain:
    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    error: str | None = None


def ram() -> BytearrayRam:
    return BytearrayRam([(0, 0xC0000), (0x100000, 64 * MIB)], record=False)


def put_pfns(r: BytearrayRam, gpa: int, pfns: list[int]) -> FakeChain:
    data = np.array(pfns, dtype=vb.PFN_DTYPE).tobytes()
    r.write(gpa, data)
    return FakeChain(head=gpa >> 12 & 0x3F, readable=[(gpa, len(data))])


def test_identity_and_config() -> None:
    d = VirtioBalloon(target=10)
    assert d.device_id == 5 and d.num_queues == 3 and CONFIG_SIZE == 8
    assert DEVICE_FEATURES == vb.Feature.STATS_VQ | vb.Feature.DEFLATE_ON_OOM
    assert d.config() == struct.pack("<II", 10, 0)
    assert d.read_config(4, 8) == bytes(8)
    # QEMU's generic front-end writes the whole config, stale num_pages included
    d.write_config(0, struct.pack("<II", 999, 7))
    assert d.actual == 7 and d.target == 10
    d.write_config(4, struct.pack("<I", 9))
    assert d.actual == 9
    assert d.set_target(20) is True
    assert d.set_target(20) is False
    assert d.read_config(0, 4) == struct.pack("<I", 20)


def test_inflate_deflate_accounting() -> None:
    r = ram()
    d = VirtioBalloon(target=100)
    d.set_pinned("ring", [(0x100, 1)])
    pfns = [0x200, 0x201, 0x202, 0x300, 0x201, 0x100, 0xC0, 0x999999]
    out = d.process(INFLATEQ, [put_pfns(r, 0x1000, pfns)], r, now=1.0)
    assert out.completions == [(1, 0)]
    assert out.reclaim is not None and out.reclaim.runs() == [(0x200, 3), (0x300, 1)]
    assert d.size == 4
    c = d.counters
    assert c["inflate ignored: pinned"] == 1
    assert c["inflate ignored: not RAM"] == 2  # 0xC0 is the ROM hole, 0x999999 beyond RAM
    # again: already in the balloon, nothing to reclaim
    out = d.process(INFLATEQ, [put_pfns(r, 0x1000, [0x200])], r, now=2.0)
    assert out.reclaim is None and d.counters["inflate ignored: already in balloon"] == 1
    out = d.process(DEFLATEQ, [put_pfns(r, 0x2000, [0x200, 0x300, 0x400])], r, now=3.0)
    assert out.completions == [(2, 0)] and out.reclaim is None
    assert d.size == 2 and d.counters["deflate ignored: not in balloon"] == 1


def test_bad_chain_and_trailing_fragment() -> None:
    r = ram()
    d = VirtioBalloon()
    out = d.process(INFLATEQ, [FakeChain(head=3, error="loop")], r, now=0)
    assert out.completions == [(3, 0)] and d.counters["bad chains"] == 1
    assert pfn_array(b"\x01\x00\x00\x00\x02\x00").tolist() == [1]


def test_stats_held_returned_and_rewound() -> None:
    r = ram()
    d = VirtioBalloon()
    data = build_stats({vb.StatTag.MEMFREE: 123, vb.StatTag.MEMTOT: 456}) + struct.pack(
        "<HQ", 99, 1
    )  # unknown tag: ignored
    r.write(0x3000, data)
    out = d.process(STATSQ, [FakeChain(5, [(0x3000, len(data))])], r, now=42.0)
    assert out.completions == []  # held
    assert d.held_stats == 5 and d.stats_last_update == 42.0
    assert d.guest_stats["stat-free-memory"] == 123
    assert d.guest_stats["stat-total-memory"] == 456
    assert d.guest_stats["stat-swap-in"] == -1
    assert set(d.guest_stats) == set(vb.STAT_QOM_KEY.values())
    # a second buffer while one is held returns the old one
    out = d.process(STATSQ, [FakeChain(6, [(0x3000, 10)])], r, now=43.0)
    assert out.completions == [(5, 0)] and d.held_stats == 6
    assert d.guest_stats["stat-total-memory"] == -1  # every stat is reset per update
    assert d.queue_stopped(INFLATEQ) == 0
    assert d.queue_stopped(STATSQ) == 1 and d.held_stats is None
    assert d.queue_stopped(STATSQ) == 0
    out = d.process(STATSQ, [FakeChain(7, [(0x3000, 10)])], r, now=44.0)
    assert d.request_stats() == 7 and d.request_stats() is None


def test_reset_keeps_pages() -> None:
    r = ram()
    d = VirtioBalloon(target=5)
    d.process(INFLATEQ, [put_pfns(r, 0x1000, [0x500, 0x501])], r, now=0)
    d.held_stats = 1
    d.reset()
    assert d.size == 2 and d.held_stats is None


@given(st.lists(st.integers(0x100, 0x100 + 4096), max_size=300), st.lists(st.integers(0, 8000)))
def test_map_matches_a_set(inflate: list[int], deflate: list[int]) -> None:
    r = ram()
    d = VirtioBalloon()
    ref: set[int] = set()
    reclaimed: set[int] = set()
    rec = d.inflate(np.array(inflate, dtype=np.uint64), r)
    if rec is not None:
        for s, c in rec.runs():
            reclaimed.update(range(s, s + c))
    ref |= set(inflate)
    assert reclaimed == set(inflate)
    assert d.deflate(np.array(deflate, dtype=np.uint64)) == len(ref & set(deflate))
    ref -= set(deflate)
    assert d.size == len(ref)
    assert set(d.pages.locked_4k().tolist()) == ref


def test_parse_stats_empty() -> None:
    assert all(v == -1 for v in parse_stats(b"").values())
