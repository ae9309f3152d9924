"""The virtio-balloon personality, sans-I/O (no QEMU)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from guest_driver.virtq import Buffer, DriverQueue, RingLayout
from protocol import virtio_balloon as vb
from vdev.devices.base import DeviceContext, get_personality
from vdev.devices.virtio_balloon import (
    CONFIG_SIZE,
    DEFLATEQ,
    DEVICE_FEATURES,
    INFLATEQ,
    STATSQ,
    VirtioBalloon,
    VirtioBalloonDevice,
    parse_stats,
    pfn_array,
)
from vdev.memory import GuestMemory, RegionSpec
from vdev.ram import BytearrayRam
from vdev.virtq import VirtQueue

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
    data = vb.pack_stats([(vb.StatTag.MEMFREE, 123), (vb.StatTag.MEMTOT, 456), (99, 1)])
    # tag 99 is unknown: ignored
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


def test_reset_forgets_the_balloon() -> None:
    """A device reset (reboot, unbind, freeze): the guest holds no balloon pages any more
    (Linux's remove_common() deflates everything first; a rebooted kernel starts empty), so
    the map, ``actual`` and the held stats buffer start from zero; the target stays. The
    same PFNs inflated again are new balloon pages, reclaimed again."""
    r = ram()
    d = VirtioBalloon(target=5)
    d.set_features(DEVICE_FEATURES)
    d.process(INFLATEQ, [put_pfns(r, 0x1000, [0x500, 0x501])], r, now=0)
    d.write_config(4, (2).to_bytes(4, "little"))
    d.held_stats = 1
    assert d.reset() == 2
    assert d.size == 0 and d.actual == 0 and d.held_stats is None
    assert d.target == 5 and d.negotiated == DEVICE_FEATURES and d.counters["resets"] == 1
    out = d.process(INFLATEQ, [put_pfns(r, 0x1000, [0x500, 0x501])], r, now=1)
    assert out.reclaim is not None and out.reclaim.runs() == [(0x500, 2)]
    assert d.size == 2 and d.counters["inflate ignored: already in balloon"] == 0


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


# ---------------------------------------------------------------- behind the Device interface


class MemPort:
    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem

    async def read(self, gpa: int, n: int) -> bytes:
        return self.mem.read(gpa, n)

    async def write(self, gpa: int, data: bytes) -> None:
        self.mem.write(gpa, data)


UVA = 0x7F00_0000_0000


@pytest.fixture
def gmem() -> Iterator[GuestMemory]:
    fd = os.memfd_create("vb")
    os.ftruncate(fd, 8 * MIB)
    m = GuestMemory("vb")
    m.set_table([RegionSpec(0, 8 * MIB, UVA, 0)], [fd])
    yield m
    m.close()


async def rig(mem: GuestMemory) -> tuple[VirtioBalloonDevice, list[DriverQueue]]:
    drivers, queues = [], []
    for i in range(3):
        lay = RingLayout.contiguous(0x10000 + i * 0x4000, 16)
        drv = DriverQueue(MemPort(mem), lay)
        await drv.init()
        q = VirtQueue(i)
        q.set_num(16)
        q.set_base(0)
        q.set_addr(mem, UVA + lay.desc, UVA + lay.used, UVA + lay.avail)
        q.started = q.enabled = True
        drivers.append(drv)
        queues.append(q)
    dev = VirtioBalloonDevice(DeviceContext("vm0", mem, queues), target=0)
    dev.rings_changed()
    return dev, drivers


async def test_device_inflate_reclaims_and_stats_rewind(gmem: GuestMemory) -> None:
    with trio.fail_after(10):
        dev, drv = await rig(gmem)
        assert get_personality("virtio-balloon") is VirtioBalloonDevice
        assert dev.set_target(64).config_changed
        gmem.write(0x400000, b"\x5a" * (64 * 4096))
        pfns = np.arange(0x400, 0x440, dtype=np.uint32)
        ring_pfn = 0x10  # a ring page: never reclaimed
        gmem.write(0x100000, np.append(pfns, ring_pfn).astype("<u4").tobytes())
        before = gmem.allocated_bytes()
        head = await drv[INFLATEQ].add([Buffer(0x100000, 65 * 4)])
        work = dev.kick(INFLATEQ)
        assert work.completions == [(INFLATEQ, head, 0)] and work.popped == 1
        [rec] = work.reclaims
        assert rec.runs() == [(0x400, 64)]
        gmem.reclaim(rec.pfn_starts, rec.pfn_counts)
        assert before - gmem.allocated_bytes() == 64 * 4096
        assert gmem.read(0x400000, 8) == bytes(8)
        assert dev.status().size_pages == 64
        assert dev.status().counters["inflate ignored: pinned"] == 1
        dev.write_config(0, struct.pack("<II", 0, 64), migration=False)
        assert dev.read_config(0, 8) == struct.pack("<II", 64, 64)
        # stats: held, then given back on request; a stop while held rewinds the ring
        gmem.write(0x200000, vb.pack_stats([(vb.StatTag.MEMFREE, 5)]))
        sh = await drv[STATSQ].add([Buffer(0x200000, 10)])
        assert dev.kick(STATSQ).completions == []
        assert dev.status().guest_stats["stat-free-memory"] == 5
        dev.queue_stopped(STATSQ)
        assert dev.ctx.queues[STATSQ].stop() == 0  # the held head will be popped again
        dev.ctx.queues[STATSQ].started = True
        dev.ctx.queues[STATSQ].set_base(0)
        assert dev.kick(STATSQ).completions == []
        assert dev.request_stats().completions == [(STATSQ, sh, 0)]
        assert dev.request_stats().completions == []
