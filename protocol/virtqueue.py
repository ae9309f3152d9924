"""Split virtqueue layouts (VIRTIO 1.x, "Split Virtqueues"). All fields little-endian."""

from __future__ import annotations

import enum
from typing import Any

import construct as cs
import numpy as np

from ._derive import field_dtype

DESCRIPTOR = cs.Struct(
    "addr" / cs.Int64ul,
    "len" / cs.Int32ul,
    "flags" / cs.Int16ul,
    "next" / cs.Int16ul,
)
USED_ELEM = cs.Struct("id" / cs.Int32ul, "len" / cs.Int32ul)
RING_HEADER = cs.Struct("flags" / cs.Int16ul, "idx" / cs.Int16ul)
RING_INDEX = cs.Int16ul


def avail_ring(size: int) -> cs.Construct:
    """The driver area of a queue of ``size`` entries, with the EVENT_IDX ``used_event`` tail."""
    return cs.Struct(
        "flags" / cs.Int16ul,
        "idx" / cs.Int16ul,
        "ring" / cs.Array(size, cs.Int16ul),
        "used_event" / cs.Int16ul,
    )


def used_ring(size: int) -> cs.Construct:
    """The device area of a queue of ``size`` entries, with the EVENT_IDX ``avail_event`` tail."""
    return cs.Struct(
        "flags" / cs.Int16ul,
        "idx" / cs.Int16ul,
        "ring" / cs.Array(size, USED_ELEM),
        "avail_event" / cs.Int16ul,
    )


class DescFlag(enum.IntFlag):
    NEXT = 1
    WRITE = 2
    INDIRECT = 4


AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768

DESCRIPTOR_SIZE = DESCRIPTOR.sizeof()  # 16
USED_ELEM_SIZE = USED_ELEM.sizeof()  # 8
RING_HEADER_SIZE = RING_HEADER.sizeof()  # 4
RING_INDEX_SIZE = RING_INDEX.sizeof()  # 2
#: numpy views of the same declarations, for reading whole tables at once.
DESCRIPTOR_DTYPE: np.dtype[Any] = field_dtype(DESCRIPTOR)
USED_ELEM_DTYPE: np.dtype[Any] = field_dtype(USED_ELEM)

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4


def desc_table_size(size: int) -> int:
    return DESCRIPTOR_SIZE * size


def avail_ring_size(size: int) -> int:
    return avail_ring(size).sizeof()


def used_ring_size(size: int) -> int:
    return used_ring(size).sizeof()


def avail_entry_offset(slot: int) -> int:
    return RING_HEADER_SIZE + RING_INDEX_SIZE * slot


def used_entry_offset(slot: int) -> int:
    return RING_HEADER_SIZE + USED_ELEM_SIZE * slot


def used_event_offset(size: int) -> int:
    """Where ``used_event`` sits in the avail ring (EVENT_IDX)."""
    return avail_entry_offset(size)


def avail_event_offset(size: int) -> int:
    """Where ``avail_event`` sits in the used ring (EVENT_IDX)."""
    return used_entry_offset(size)


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """``vring_need_event``: did moving from old to new cross the other side's event index?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
