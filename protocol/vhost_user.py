"""vhost-user messages (QEMU ``docs/interop/vhost-user.rst``).

vhost-user integers are in the host's native byte order (the spec says so); vballoon runs on
little-endian hosts, and the native-order construct fields (``Int32un``) keep that honest.
"""

from __future__ import annotations

import enum
import io
from typing import Any

import construct as cs

from . import _derive

HEADER = cs.Struct(
    "request" / cs.Int32un,
    "flags" / cs.Int32un,
    "size" / cs.Int32un,
)
HEADER_SIZE = HEADER.sizeof()  # 12
HEADER_C = HEADER.compile()

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
REPLY_FLAGS = VERSION | FLAG_REPLY  # QEMU insists on exactly 0x5

#: Largest payload we accept; rust-vmm's MAX_MSG_SIZE. Anything larger is a broken peer.
MAX_PAYLOAD = 4096
#: Most fds one message may carry (QEMU's VHOST_MEMORY_BASELINE_NREGIONS).
MAX_FDS = 8
MAX_CONFIG_SIZE = 256


class FrontendRequest(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43

    @classmethod
    def lookup(cls, number: int) -> FrontendRequest | None:
        try:
            return cls(number)
        except ValueError:
            return None


class BackendRequest(enum.IntEnum):
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class VirtioFeature(enum.IntFlag):
    """Transport-level virtio and vhost feature bits (device-specific bits live per device)."""

    NOTIFY_ON_EMPTY = 1 << 24
    LOG_ALL = 1 << 26
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    RING_RESET = 1 << 40


class ProtocolFeature(enum.IntFlag):
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


# ---------------------------------------------------------------------------------------
# Payloads

U64 = cs.Struct("value" / cs.Int64un)
VRING_STATE = cs.Struct("index" / cs.Int32un, "num" / cs.Int32un)
VRING_ADDRESS = cs.Struct(
    "index" / cs.Int32un,
    "flags" / cs.Int32un,  # bit 0: VHOST_VRING_F_LOG
    "desc" / cs.Int64un,
    "used" / cs.Int64un,  # the order is desc, used, avail (not the ring order)
    "avail" / cs.Int64un,
    "log" / cs.Int64un,
)
VRING_F_LOG = 0x1
MEMORY_REGION = cs.Struct(
    "guest_phys_addr" / cs.Int64un,
    "memory_size" / cs.Int64un,
    "userspace_addr" / cs.Int64un,
    "mmap_offset" / cs.Int64un,
)
MEMORY_TABLE = cs.Struct(
    "nregions" / cs.Int32un,
    "padding" / cs.Int32un,
    "regions" / cs.Array(cs.this.nregions, MEMORY_REGION),
)
SINGLE_REGION = cs.Struct(
    "padding" / cs.Int64un,
    "region" / MEMORY_REGION,
)
LOG = cs.Struct("mmap_size" / cs.Int64un, "mmap_offset" / cs.Int64un)
CONFIG = cs.Struct(
    "offset" / cs.Int32un,
    "size" / cs.Int32un,
    "flags" / cs.Int32un,  # 0 = front-end write, 1 = live migration
    "data" / cs.Bytes(cs.this.size),
)
CONFIG_HEADER_SIZE = 12
VRING_AREA = cs.Struct(
    "index" / cs.Int64un,  # bits 0..7 queue index, bit 8: no fd
    "size" / cs.Int64un,
    "offset" / cs.Int64un,
)
INFLIGHT = cs.Struct(
    "mmap_size" / cs.Int64un,
    "mmap_offset" / cs.Int64un,
    "num_queues" / cs.Int16un,
    "queue_size" / cs.Int16un,
    "padding" / cs.Int32un,  # C struct tail padding: QEMU sends 24 bytes
)
DEVICE_STATE_TRANSFER = cs.Struct("direction" / cs.Int32un, "phase" / cs.Int32un)

#: SET_VRING_KICK / CALL / ERR: the u64's low byte is the queue index, bit 8 means "no fd".
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

#: The payload each front-end request carries (None: empty).
REQUEST_PAYLOAD: dict[FrontendRequest, cs.Construct | None] = {
    FrontendRequest.GET_FEATURES: None,
    FrontendRequest.SET_FEATURES: U64,
    FrontendRequest.SET_OWNER: None,
    FrontendRequest.RESET_OWNER: None,
    FrontendRequest.SET_MEM_TABLE: MEMORY_TABLE,
    FrontendRequest.SET_LOG_BASE: LOG,
    FrontendRequest.SET_LOG_FD: None,
    FrontendRequest.SET_VRING_NUM: VRING_STATE,
    FrontendRequest.SET_VRING_ADDR: VRING_ADDRESS,
    FrontendRequest.SET_VRING_BASE: VRING_STATE,
    FrontendRequest.GET_VRING_BASE: VRING_STATE,
    FrontendRequest.SET_VRING_KICK: U64,
    FrontendRequest.SET_VRING_CALL: U64,
    FrontendRequest.SET_VRING_ERR: U64,
    FrontendRequest.GET_PROTOCOL_FEATURES: None,
    FrontendRequest.SET_PROTOCOL_FEATURES: U64,
    FrontendRequest.GET_QUEUE_NUM: None,
    FrontendRequest.SET_VRING_ENABLE: VRING_STATE,
    FrontendRequest.SEND_RARP: U64,
    FrontendRequest.NET_SET_MTU: U64,
    FrontendRequest.SET_BACKEND_REQ_FD: None,
    FrontendRequest.SET_VRING_ENDIAN: VRING_STATE,
    FrontendRequest.GET_CONFIG: CONFIG,
    FrontendRequest.SET_CONFIG: CONFIG,
    FrontendRequest.CLOSE_CRYPTO_SESSION: U64,
    FrontendRequest.POSTCOPY_ADVISE: None,
    FrontendRequest.POSTCOPY_LISTEN: None,
    FrontendRequest.POSTCOPY_END: None,
    FrontendRequest.GET_INFLIGHT_FD: INFLIGHT,
    FrontendRequest.SET_INFLIGHT_FD: INFLIGHT,
    FrontendRequest.GPU_SET_SOCKET: None,
    FrontendRequest.RESET_DEVICE: None,
    FrontendRequest.VRING_KICK: VRING_STATE,
    FrontendRequest.GET_MAX_MEM_SLOTS: None,
    FrontendRequest.ADD_MEM_REG: SINGLE_REGION,
    FrontendRequest.REM_MEM_REG: SINGLE_REGION,
    FrontendRequest.SET_STATUS: U64,
    FrontendRequest.GET_STATUS: None,
    FrontendRequest.SET_DEVICE_STATE_FD: DEVICE_STATE_TRANSFER,
    FrontendRequest.CHECK_DEVICE_STATE: None,
}

#: The reply body each request owes regardless of REPLY_ACK (None: no body of its own).
REPLY_PAYLOAD: dict[FrontendRequest, cs.Construct] = {
    FrontendRequest.GET_FEATURES: U64,
    FrontendRequest.GET_PROTOCOL_FEATURES: U64,
    FrontendRequest.GET_QUEUE_NUM: U64,
    FrontendRequest.GET_VRING_BASE: VRING_STATE,
    FrontendRequest.GET_CONFIG: CONFIG,
    FrontendRequest.GET_MAX_MEM_SLOTS: U64,
    FrontendRequest.GET_STATUS: U64,
    FrontendRequest.GET_INFLIGHT_FD: INFLIGHT,
    FrontendRequest.CHECK_DEVICE_STATE: U64,
    FrontendRequest.SET_DEVICE_STATE_FD: U64,
    FrontendRequest.POSTCOPY_END: U64,
}


def build_header(request: int, flags: int, size: int) -> bytes:
    return HEADER_C.build({"request": request, "flags": flags, "size": size})


def parse_header(data: bytes | bytearray | memoryview) -> Any:
    if len(data) != HEADER_SIZE:
        raise _derive.FormatError(f"vhost-user header must be {HEADER_SIZE} bytes, got {len(data)}")
    return _derive.parse(HEADER_C, data, "vhost-user header")


def _fixed_size(fmt: cs.Construct) -> int | None:
    try:
        return int(fmt.sizeof())
    except cs.SizeofError:
        return None


#: per payload format: its size when fixed (most are), else None
_SIZES: dict[int, int | None] = {}


def parse_payload(fmt: cs.Construct, data: bytes | bytearray | memoryview, what: str) -> Any:
    """Parse a payload that must be consumed exactly (no trailing bytes)."""
    key = id(fmt)
    if key not in _SIZES:
        _SIZES[key] = _fixed_size(fmt)
    size = _SIZES[key]
    if size is not None and len(data) != size:
        raise _derive.FormatError(f"{what} payload is {len(data)} bytes, its content is {size}")
    stream = io.BytesIO(bytes(data))
    try:
        value = fmt.parse_stream(stream)
    except (cs.ConstructError, ValueError, TypeError, OverflowError) as exc:
        raise _derive.FormatError(f"malformed {what} payload: {exc}") from None
    used = stream.tell()
    if used != len(data):
        raise _derive.FormatError(f"{what} payload is {len(data)} bytes, its content is {used}")
    return value


def build_payload(fmt: cs.Construct, value: Any, what: str) -> bytes:
    return _derive.build(fmt, value, what)


def build_message(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return build_header(request, flags, len(payload)) + payload


def u64(value: int) -> bytes:
    return build_payload(U64, {"value": value}, "u64")
