"""The hand-over state file: what one guest connection keeps in a memfd across vdev restarts.

vdev stores this memfd in systemd's file-descriptor store (``FDNAME=state.<guest>``) next to
the fds QEMU gave it, so that a restarted vdev resumes the connection (docs/ARCHITECTURE.md,
"Hand-over"). The layout is declared here once; ``vdev/handover.py`` maps it.

::

    0                  Header (fixed fields below, the rest of the first 4 KiB is zero)
    record_offset      two record slots of record_slot_size bytes: a JSON object each
                       (versioned by its "v" key); the committed one is slot generation & 1
    map_4k_offset      the 4 KiB page map (one bit per pfn), reserved map_4k_bytes (sparse)
    map_2m_offset      the 2 MiB page map (one bit per 2 MiB frame), map_2m_bytes
    undo_offset        the undo log of the batch in progress, undo_bytes (sparse)

Every field is little-endian and naturally aligned, so the single-word fields that change
at run time (``generation``, ``map_capacity``, the ``vu_*`` markers, ``undo_*``) are each
written with one store: a process killed at any instant leaves either the old or the new
value. The page maps live in the file itself: a page enters or leaves the map the moment
the device model updates it.

Undo log entries (the map bytes a batch changed, written before the change):

* ``UndoEntry`` header, then ``count`` bytes of old values at ``first`` (kind SPAN), or
  ``count`` little-endian u64 byte offsets followed by ``count`` old bytes (kind SCATTER).

A reader that finds a larger ``header_size`` or unknown record keys ignores what it does
not know; a different ``layout`` is refused (the state is then started afresh).
"""

from __future__ import annotations

import enum

import construct as cs

from ._derive import field_dtype

MAGIC = 0x52_45_56_4F_48_42_56  # "VBHOVER" little-endian, padded
LAYOUT = 1
#: The JSON record's own version ("v"); readers accept any record with the same major.
RECORD_VERSION = 1
HEADER_BYTES = 4096

Header = cs.Struct(
    "magic" / cs.Int64ul,
    "layout" / cs.Int32ul,
    "header_size" / cs.Int32ul,
    "generation" / cs.Int64ul,  # the committed record is slot generation & 1
    "record_offset" / cs.Int64ul,
    "record_slot_size" / cs.Int64ul,
    "record_len0" / cs.Int64ul,
    "record_len1" / cs.Int64ul,
    "map_4k_offset" / cs.Int64ul,
    "map_4k_bytes" / cs.Int64ul,
    "map_2m_offset" / cs.Int64ul,
    "map_2m_bytes" / cs.Int64ul,
    "map_capacity" / cs.Int64ul,  # pfns the maps cover now (a multiple of 512)
    "undo_offset" / cs.Int64ul,
    "undo_bytes" / cs.Int64ul,
    "undo_base" / cs.Int64ul,  # the generation the undo log applies on top of
    "undo_len" / cs.Int64ul,  # bytes of valid entries
    "vu_consumed" / cs.Int64ul,  # vhost-user messages consumed from the socket
    "vu_sent" / cs.Int64ul,  # 1 + the message number whose reply was last sent
)
HEADER_DTYPE = field_dtype(Header)


class UndoKind(enum.IntEnum):
    SPAN = 1
    SCATTER = 2


class MapId(enum.IntEnum):
    MAP_4K = 0
    MAP_2M = 1


UndoEntry = cs.Struct(
    "kind" / cs.Int32ul,
    "map" / cs.Int32ul,
    "first" / cs.Int64ul,  # SPAN: first byte of the map; SCATTER: unused (0)
    "count" / cs.Int64ul,
)
UNDO_ENTRY_SIZE = UndoEntry.sizeof()
