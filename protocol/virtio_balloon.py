"""The standard virtio-balloon device (device id 5): config, features, statistics."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

import construct as cs
import numpy as np

from ._derive import field_dtype

DEVICE_ID = 5
PFN_SHIFT = 12  # PFNs are in 4 KiB units whatever the guest's page size
MAX_PFNS_PER_BUFFER = 256  # Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX

CONFIG = cs.Struct(
    "num_pages" / cs.Int32ul,
    "actual" / cs.Int32ul,
    "free_page_hint_cmd_id" / cs.Int32ul,
    "poison_val" / cs.Int32ul,
)
CONFIG_SIZE = CONFIG.sizeof()  # 16
#: Without FREE_PAGE_HINT and PAGE_POISON the config space is num_pages + actual only.
BASIC_CONFIG_SIZE = 8

PFN = cs.Int32ul
# Not np.dtype(PFN.fmtstr): struct's "L" is 4 bytes, numpy's is a C long (8 bytes on x86-64).
PFN_DTYPE: np.dtype[Any] = np.dtype(f"{PFN.fmtstr[0]}u{PFN.sizeof()}")
assert PFN_DTYPE.itemsize == PFN.sizeof()

STAT = cs.Struct("tag" / cs.Int16ul, "val" / cs.Int64ul)  # packed: 10 bytes
STAT_SIZE = STAT.sizeof()
STAT_DTYPE: np.dtype[Any] = field_dtype(STAT)
_U64 = (1 << 64) - 1


def pack_stats(entries: Iterable[tuple[int, int]]) -> bytes:
    """A stats buffer: one :data:`STAT` entry per ``(tag, value)``, in order (a driver's side;
    values are taken modulo 2**64, as a u64 on the wire; a tag must fit in a u16)."""
    rows = [(int(tag), int(val) & _U64) for tag, val in entries]
    return np.array(rows, dtype=STAT_DTYPE).tobytes()


class Feature(enum.IntFlag):
    MUST_TELL_HOST = 1 << 0
    STATS_VQ = 1 << 1
    DEFLATE_ON_OOM = 1 << 2
    FREE_PAGE_HINT = 1 << 3
    PAGE_POISON = 1 << 4
    PAGE_REPORTING = 1 << 5


class StatTag(enum.IntEnum):
    SWAP_IN = 0
    SWAP_OUT = 1
    MAJFLT = 2
    MINFLT = 3
    MEMFREE = 4
    MEMTOT = 5
    AVAIL = 6
    CACHES = 7
    HTLB_PGALLOC = 8
    HTLB_PGFAIL = 9
    OOM_KILL = 10
    ALLOC_STALL = 11
    ASYNC_SCAN = 12
    DIRECT_SCAN = 13
    ASYNC_RECLAIM = 14
    DIRECT_RECLAIM = 15


#: QEMU's ``guest-stats`` QOM keys for each tag.
STAT_QOM_KEY: dict[StatTag, str] = {
    StatTag.SWAP_IN: "stat-swap-in",
    StatTag.SWAP_OUT: "stat-swap-out",
    StatTag.MAJFLT: "stat-major-faults",
    StatTag.MINFLT: "stat-minor-faults",
    StatTag.MEMFREE: "stat-free-memory",
    StatTag.MEMTOT: "stat-total-memory",
    StatTag.AVAIL: "stat-available-memory",
    StatTag.CACHES: "stat-disk-caches",
    StatTag.HTLB_PGALLOC: "stat-htlb-pgalloc",
    StatTag.HTLB_PGFAIL: "stat-htlb-pgfail",
    StatTag.OOM_KILL: "stat-oom-kills",
    StatTag.ALLOC_STALL: "stat-alloc-stalls",
    StatTag.ASYNC_SCAN: "stat-async-scans",
    StatTag.DIRECT_SCAN: "stat-direct-scans",
    StatTag.ASYNC_RECLAIM: "stat-async-reclaims",
    StatTag.DIRECT_RECLAIM: "stat-direct-reclaims",
}

#: The statistics that are levels (bytes now); every other one counts events since the guest
#: booted (pages swapped, faults, OOM kills, stalls, scans, reclaims, huge page allocations):
#: a Prometheus counter, not a gauge.
LEVEL_STATS: frozenset[StatTag] = frozenset(
    {StatTag.MEMFREE, StatTag.MEMTOT, StatTag.AVAIL, StatTag.CACHES}
)


class Queue(enum.IntEnum):
    """Spec queue indices (QEMU's own device compacts 3/4; see docs)."""

    INFLATE = 0
    DEFLATE = 1
    STATS = 2
    FREE_PAGE = 3
    REPORTING = 4
