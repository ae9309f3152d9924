"""The VMware balloon (vmmemctl) command set, carried over a virtqueue.

Numbers, statuses, capabilities and the batch page are those of Linux
``drivers/misc/vmw_balloon.c``; the request and response frames are the 24-byte carriers of
docs/PROTOCOL.md section 2 (they mirror the backdoor registers EAX/ECX/EBX/ESI in and
EAX/EBX/ECX out).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import construct as cs
import numpy as np
import numpy.typing as npt

from . import _derive
from .units import PAGE_SHIFT, PAGE_SIZE

MAGIC = 0x456C6D6F  # "Elmo", the backdoor's EAX magic
PAGES_PER_2M = 512
U32_MAX = 0xFFFF_FFFF
VMCI_INVALID_ID = 0xFFFF_FFFF


class Command(enum.IntEnum):
    START = 0
    GET_TARGET = 1
    LOCK = 2
    UNLOCK = 3
    GUEST_ID = 4
    # 5 was GET_PROTO_V3 in an abandoned protocol version; it is invalid.
    BATCHED_LOCK = 6
    BATCHED_UNLOCK = 7
    BATCHED_2M_LOCK = 8
    BATCHED_2M_UNLOCK = 9
    VMCI_DOORBELL_SET = 10

    @classmethod
    def lookup(cls, number: int) -> Command | None:
        try:
            return cls(number)
        except ValueError:
            return None


#: The names Linux's debugfs file prints for each command (``vmballoon_cmd_names``).
COMMAND_DEBUGFS_NAME: dict[Command, str] = {
    Command.START: "start",
    Command.GET_TARGET: "target",
    Command.LOCK: "lock",
    Command.UNLOCK: "unlock",
    Command.GUEST_ID: "guestType",
    Command.BATCHED_LOCK: "batchLock",
    Command.BATCHED_UNLOCK: "batchUnlock",
    Command.BATCHED_2M_LOCK: "2m-lock",
    Command.BATCHED_2M_UNLOCK: "2m-unlock",
    Command.VMCI_DOORBELL_SET: "doorbellSet",
}

#: Commands whose response carries the balloon target in ``result``.
TARGET_CARRYING: frozenset[Command] = frozenset(
    {
        Command.GET_TARGET,
        Command.LOCK,
        Command.UNLOCK,
        Command.BATCHED_LOCK,
        Command.BATCHED_UNLOCK,
        Command.BATCHED_2M_LOCK,
        Command.BATCHED_2M_UNLOCK,
    }
)

BATCHED_COMMANDS: frozenset[Command] = frozenset(
    {
        Command.BATCHED_LOCK,
        Command.BATCHED_UNLOCK,
        Command.BATCHED_2M_LOCK,
        Command.BATCHED_2M_UNLOCK,
    }
)
LOCKING_COMMANDS: frozenset[Command] = frozenset(
    {Command.LOCK, Command.BATCHED_LOCK, Command.BATCHED_2M_LOCK}
)
HUGE_COMMANDS: frozenset[Command] = frozenset({Command.BATCHED_2M_LOCK, Command.BATCHED_2M_UNLOCK})


class Status(enum.IntEnum):
    SUCCESS = 0
    ERROR_CMD_INVALID = 1
    ERROR_PPN_INVALID = 2
    ERROR_PPN_LOCKED = 3
    ERROR_PPN_UNLOCKED = 4
    ERROR_PPN_PINNED = 5
    ERROR_PPN_NOTNEEDED = 6
    ERROR_RESET = 7
    ERROR_BUSY = 8
    SUCCESS_WITH_CAPABILITIES = 0x0300_0000


class Capability(enum.IntFlag):
    NONE = 0
    # bit 0 is never granted: legacy v2 guests send 2 (== BASIC_CMDS) as a version number.
    BASIC_CMDS = 1 << 1
    BATCHED_CMDS = 1 << 2
    BATCHED_2M_CMDS = 1 << 3
    SIGNALLED_WAKEUP_CMD = 1 << 4
    BIT64_TARGET = 1 << 5


ALL_CAPABILITIES = (
    Capability.BASIC_CMDS
    | Capability.BATCHED_CMDS
    | Capability.BATCHED_2M_CMDS
    | Capability.SIGNALLED_WAKEUP_CMD
    | Capability.BIT64_TARGET
)  # 0x3E, what Linux offers on 64-bit


def required_capabilities(command: Command) -> Capability:
    """The capabilities that must have been negotiated for ``command`` to be valid."""
    if command in (Command.LOCK, Command.UNLOCK):
        return Capability.BASIC_CMDS
    if command in (Command.BATCHED_LOCK, Command.BATCHED_UNLOCK):
        return Capability.BATCHED_CMDS
    if command in HUGE_COMMANDS:
        return Capability.BATCHED_CMDS | Capability.BATCHED_2M_CMDS
    if command is Command.VMCI_DOORBELL_SET:
        return Capability.SIGNALLED_WAKEUP_CMD
    return Capability.NONE


class GuestType(enum.IntEnum):
    UNKNOWN = 0
    LINUX = 1
    BSD = 2
    WINDOWS_NT4 = 3
    WINDOWS_NT5 = 4
    SOLARIS = 5
    MACOS = 6
    FROBOS = 7


class EventKind(enum.IntEnum):
    """The doorbell event written into an ``eventq`` buffer."""

    TARGET_CHANGED = 1
    RESET = 2


# ---------------------------------------------------------------------------------------
# Frames

REQUEST = cs.Struct(
    "magic" / cs.Int32ul,
    "command" / cs.Int32ul,
    "arg1" / cs.Int64ul,
    "arg2" / cs.Int64ul,
)
RESPONSE = cs.Struct(
    "status" / cs.Int32ul,
    "reserved" / cs.Int32ul,
    "result" / cs.Int64ul,
    "capabilities" / cs.Int64ul,
)
EVENT = cs.Struct(
    "kind" / cs.Int32ul,
    "reserved" / cs.Int32ul,
)
REQUEST_SIZE = REQUEST.sizeof()
RESPONSE_SIZE = RESPONSE.sizeof()
EVENT_SIZE = EVENT.sizeof()

_REQUEST_C = REQUEST.compile()
_RESPONSE_C = RESPONSE.compile()


@dataclass(frozen=True, slots=True)
class Request:
    """One vmmemctl command. ``command`` stays a plain int: unknown numbers must be answerable."""

    command: int
    arg1: int = 0
    arg2: int = 0
    magic: int = MAGIC

    def build(self) -> bytes:
        return _derive.build(_REQUEST_C, _as_dict(self), "vmw request")

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Request:
        if len(data) != REQUEST_SIZE:
            raise _derive.FormatError(f"vmw request must be {REQUEST_SIZE} bytes, got {len(data)}")
        c = _derive.parse(_REQUEST_C, data, "vmw request")
        return cls(command=c.command, arg1=c.arg1, arg2=c.arg2, magic=c.magic)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    result: int = 0
    capabilities: int = 0
    reserved: int = 0

    def build(self) -> bytes:
        return _derive.build(_RESPONSE_C, _as_dict(self), "vmw response")

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Response:
        if len(data) != RESPONSE_SIZE:
            raise _derive.FormatError(
                f"vmw response must be {RESPONSE_SIZE} bytes, got {len(data)}"
            )
        c = _derive.parse(_RESPONSE_C, data, "vmw response")
        return cls(
            status=c.status, result=c.result, capabilities=c.capabilities, reserved=c.reserved
        )


def build_event(kind: EventKind) -> bytes:
    return _derive.build(EVENT, {"kind": int(kind), "reserved": 0}, "vmw event")


def parse_event(data: bytes | bytearray | memoryview) -> EventKind:
    """The kind of an 8-byte doorbell event; its reserved word must be 0 (PROTOCOL.md s5)."""
    if len(data) != EVENT_SIZE:
        raise _derive.FormatError(f"vmw event must be {EVENT_SIZE} bytes, got {len(data)}")
    c = _derive.parse(EVENT, data, "vmw event")
    if c.reserved:
        raise _derive.FormatError(f"vmw event reserved word is {c.reserved:#x}, must be 0")
    try:
        return EventKind(c.kind)
    except ValueError:
        raise _derive.FormatError(f"unknown doorbell event kind {c.kind}") from None


def _as_dict(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


# ---------------------------------------------------------------------------------------
# The batch page: up to 512 little-endian u64 entries, PFN in bits 12..63, status in 0..4.

#: One entry. ByteSwapped turns the little-endian u64 into the MSB-first bit order that
#: BitStruct reads, so the fields below are listed from bit 63 down to bit 0.
BATCH_ENTRY = cs.ByteSwapped(
    cs.BitStruct(
        "pfn" / cs.BitsInteger(64 - PAGE_SHIFT),
        "reserved" / cs.BitsInteger(PAGE_SHIFT - 5),
        "status" / cs.BitsInteger(5),
    )
)
BATCH_MAX_ENTRIES = PAGE_SIZE // BATCH_ENTRY.sizeof()  # 512
BATCH_PAGE = cs.Array(BATCH_MAX_ENTRIES, BATCH_ENTRY)


def batch(count: int) -> cs.Construct:
    """A batch of ``count`` entries (the first ``count`` entries of a batch page)."""
    return cs.Array(count, BATCH_ENTRY)


def _bit_fields(entry: cs.Construct) -> dict[str, tuple[int, int]]:
    """(shift, width) of each field of the batch entry, read off the declaration."""
    node: Any = entry
    while not isinstance(node, cs.Struct):
        node = node.subcon
    fields: dict[str, tuple[int, int]] = {}
    remaining = entry.sizeof() * 8
    for member in node.subcons:
        width = member.subcon.length
        remaining -= width
        fields[member.name] = (remaining, width)
    assert remaining == 0
    return fields


_FIELDS = _bit_fields(BATCH_ENTRY)
#: numpy view of an entry; parse a page with ``np.frombuffer(page, BATCH_ENTRY_DTYPE)``.
BATCH_ENTRY_DTYPE: np.dtype[np.uint64] = np.dtype("<u8")
assert BATCH_ENTRY_DTYPE.itemsize == BATCH_ENTRY.sizeof()
ENTRY_PFN_SHIFT = _FIELDS["pfn"][0]
ENTRY_STATUS_MASK = (1 << _FIELDS["status"][1]) - 1 << _FIELDS["status"][0]
ENTRY_RESERVED_MASK = (1 << _FIELDS["reserved"][1]) - 1 << _FIELDS["reserved"][0]
ENTRY_PFN_MASK = ~(ENTRY_STATUS_MASK | ENTRY_RESERVED_MASK) & 0xFFFF_FFFF_FFFF_FFFF

U64Array = npt.NDArray[np.uint64]


def batch_entries(page: bytes | bytearray | memoryview, count: int) -> U64Array:
    """The first ``count`` entries of a batch page as a read-only array (no copy when possible)."""
    if not 0 <= count <= BATCH_MAX_ENTRIES:
        raise _derive.FormatError(f"batch count {count} outside 0..{BATCH_MAX_ENTRIES}")
    if len(page) < count * BATCH_ENTRY_DTYPE.itemsize:
        raise _derive.FormatError(f"batch page of {len(page)} bytes cannot hold {count} entries")
    return np.frombuffer(page, BATCH_ENTRY_DTYPE, count)


def entry_pfns(entries: U64Array) -> U64Array:
    return entries >> np.uint64(ENTRY_PFN_SHIFT)


def entry_statuses(entries: U64Array) -> U64Array:
    return entries & np.uint64(ENTRY_STATUS_MASK)


def entry_reserved(entries: U64Array) -> U64Array:
    return entries & np.uint64(ENTRY_RESERVED_MASK)


def with_statuses(entries: U64Array, statuses: npt.ArrayLike) -> U64Array:
    """Entries with their status bits replaced; the PFN and reserved bits are left untouched."""
    status_bits = np.asarray(statuses, dtype=np.uint64) & np.uint64(ENTRY_STATUS_MASK)
    return (entries & np.uint64(~ENTRY_STATUS_MASK & 0xFFFF_FFFF_FFFF_FFFF)) | status_bits


def build_batch(pfns: npt.ArrayLike, statuses: npt.ArrayLike | None = None) -> bytes:
    """Entries for ``pfns`` (status 0 unless given), as the bytes of the batch's used part."""
    pfn_array = np.asarray(pfns, dtype=np.uint64)
    if pfn_array.size > BATCH_MAX_ENTRIES:
        raise _derive.FormatError(f"a batch holds at most {BATCH_MAX_ENTRIES} entries")
    if pfn_array.size and int(pfn_array.max()) >> (64 - ENTRY_PFN_SHIFT):
        raise _derive.FormatError("PFN does not fit in 52 bits")
    entries = pfn_array << np.uint64(ENTRY_PFN_SHIFT)
    if statuses is not None:
        entries = with_statuses(entries, statuses)
    return entries.astype(BATCH_ENTRY_DTYPE).tobytes()
