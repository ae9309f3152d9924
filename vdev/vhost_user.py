"""The vhost-user back-end connection as a sans-I/O state machine (h11 style).

Bytes and file descriptors go in (:meth:`BackendConnection.receive`), typed
:class:`Message`\\ s come out; replies are built as bytes (:meth:`BackendConnection.reply`,
:meth:`BackendConnection.ack`, :meth:`BackendConnection.answer`). No sockets here.

The connection validates everything that does not need guest memory or the device:

* the header: version 1, no reserved flag bits, no REPLY bit on a request,
  ``size <= MAX_PAYLOAD``; the request must be one we implement;
* the payload: exactly the declared size of its format (``protocol.vhost_user``);
* the fds: only SET_MEM_TABLE (one per region), ADD_MEM_REG (exactly one),
  SET_VRING_KICK/CALL/ERR (one unless the no-fd bit 0x100 is set), SET_BACKEND_REQ_FD
  (exactly one) may carry fds; REM_MEM_REG may carry one, which the owner closes unused. Anything
  else with fds is a :class:`~protocol.errors.FrontendError`;
* the state (:class:`State`, below): feature bits never offered, protocol-feature-gated
  requests without the bit, ring-configuring requests before SET_OWNER, a ring started
  before SET_FEATURES, a running ring re-configured, queue indices beyond the device's
  queues, SET_VRING_ENABLE without PROTOCOL_FEATURES acked or with a value other than 0/1.

Any violation raises :class:`FrontendError`; the connection is then dead (every fd it was
still holding is closed) and the caller closes the socket. The negotiation requests
(features, protocol features, owner, queue count, memory slots) are answered here
(:meth:`answer`); the rest is the server's business.

States and transitions (``BackendConnection.state``)::

    NEW --SET_OWNER--> OWNED --SET_FEATURES--> NEGOTIATED --SET_VRING_KICK i--> RUNNING
    RUNNING --GET_VRING_BASE of the last started ring--> NEGOTIATED
    RUNNING --SET_VRING_KICK / GET_VRING_BASE of another ring--> RUNNING
    NEGOTIATED, RUNNING --SET_FEATURES--> same state (re-acked; the rings keep running)
    OWNED, NEGOTIATED, RUNNING --RESET_DEVICE / RESET_OWNER--> OWNED (rings stopped,
                                                                     features forgotten)
    any --a violation, or fail()--> DEAD (absorbing: every later input is refused)

Negotiation requests (GET_FEATURES, protocol features, queue count, memory slots) are
allowed in every live state and change none. Ring and memory requests need OWNED or later;
SET_VRING_NUM / SET_VRING_BASE / SET_VRING_ADDR need their ring stopped (not started by a
SET_VRING_KICK since its last GET_VRING_BASE); SET_VRING_KICK needs NEGOTIATED or later.

**Device resets.** A real device forgets everything on a reset, and so must the balloon.
QEMU never tells a vhost-user back-end "reset" when the guest resets the device or the VM
reboots (docs/PROTOCOL.md section 6): it stops every ring (GET_VRING_BASE) and, when the
driver re-initialises it, replays SET_FEATURES, the memory table and each ring with its
base set to 0. A pause (``stop``/``cont``, suspend) replays the same sequence with each
ring's base set to the index GET_VRING_BASE reported. So the machine records each stopped
ring's reported base (:meth:`vring_base_reply`) and reports a device reset when:

* SET_VRING_BASE restarts a stopped ring at another index than the one reported for it
  (the driver's queue state started over): ``"ring N re-initialised"``;
* SET_FEATURES acks other bits than the features acked before (virtio features change only
  through a reset): ``"features re-negotiated"``;
* RESET_DEVICE or RESET_OWNER arrives: ``"RESET_DEVICE"``.

:meth:`take_reset` hands the reason to the caller once (the server then makes the device
forget the balloon). SET_STATUS (VHOST_USER_PROTOCOL_F_STATUS) is not offered: QEMU's
generic device sends only FEATURES_OK through it and never status 0 on a reset, so it would
tell nothing. A ring whose reported base was 0 and that restarts at 0 tells nothing either;
the reset is then seen on another ring (a balloon that ever inflated has moved its inflate
ring), or there is nothing to forget.
"""

from __future__ import annotations

import contextlib
import enum
import os
from dataclasses import dataclass
from typing import Any

from protocol import vhost_user as vu
from protocol.errors import FormatError, FrontendError
from protocol.vhost_user import FrontendRequest as R
from protocol.vhost_user import ProtocolFeature as PF
from protocol.vhost_user import VirtioFeature as VF

#: Transport features every personality offers (PROTOCOL.md section 1).
BASE_FEATURES = VF.VERSION_1 | VF.PROTOCOL_FEATURES | VF.RING_INDIRECT_DESC | VF.RING_EVENT_IDX
#: Protocol features we implement and offer.
OFFERED_PROTOCOL_FEATURES = (
    PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.RESET_DEVICE
)
MAX_MEM_SLOTS = 509

#: The requests we implement, and the protocol feature each needs (None: always allowed).
SUPPORTED: dict[R, PF | None] = {
    R.GET_FEATURES: None,
    R.SET_FEATURES: None,
    R.SET_OWNER: None,
    R.RESET_OWNER: None,
    R.SET_MEM_TABLE: None,
    R.SET_VRING_NUM: None,
    R.SET_VRING_ADDR: None,
    R.SET_VRING_BASE: None,
    R.GET_VRING_BASE: None,
    R.SET_VRING_KICK: None,
    R.SET_VRING_CALL: None,
    R.SET_VRING_ERR: None,
    R.GET_PROTOCOL_FEATURES: None,
    R.SET_PROTOCOL_FEATURES: None,
    R.GET_QUEUE_NUM: PF.MQ,
    R.SET_VRING_ENABLE: None,
    R.SET_BACKEND_REQ_FD: PF.BACKEND_REQ,
    R.GET_CONFIG: PF.CONFIG,
    R.SET_CONFIG: PF.CONFIG,
    R.RESET_DEVICE: PF.RESET_DEVICE,
    R.GET_MAX_MEM_SLOTS: PF.CONFIGURE_MEM_SLOTS,
    R.ADD_MEM_REG: PF.CONFIGURE_MEM_SLOTS,
    R.REM_MEM_REG: PF.CONFIGURE_MEM_SLOTS,
}
#: Requests that configure the device and therefore need an owner first.
NEEDS_OWNER = frozenset(
    {
        R.SET_FEATURES,
        R.SET_MEM_TABLE,
        R.ADD_MEM_REG,
        R.REM_MEM_REG,
        R.SET_VRING_NUM,
        R.SET_VRING_ADDR,
        R.SET_VRING_BASE,
        R.GET_VRING_BASE,
        R.SET_VRING_KICK,
        R.SET_VRING_CALL,
        R.SET_VRING_ERR,
        R.SET_VRING_ENABLE,
    }
)
VRING_FD_REQUESTS = frozenset({R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR})
VRING_STATE_REQUESTS = frozenset(
    {R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE}
)
#: Requests that (re)configure a ring and so need it stopped.
RING_SETUP_REQUESTS = frozenset({R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ADDR})
#: Requests :meth:`BackendConnection.answer` handles completely.
NEGOTIATION = frozenset(
    {
        R.GET_FEATURES,
        R.SET_FEATURES,
        R.GET_PROTOCOL_FEATURES,
        R.SET_PROTOCOL_FEATURES,
        R.GET_QUEUE_NUM,
        R.GET_MAX_MEM_SLOTS,
        R.SET_OWNER,
    }
)


class State(enum.Enum):
    """Where a connection stands (see the module docstring for the transitions)."""

    NEW = "new"  # connected: negotiation only, no SET_OWNER yet
    OWNED = "owned"  # SET_OWNER: memory and rings may be configured; no features acked
    NEGOTIATED = "negotiated"  # SET_FEATURES acked: rings may start; none running
    RUNNING = "running"  # at least one ring started (SET_VRING_KICK) and not stopped
    DEAD = "dead"  # a protocol violation (or the caller closed it): everything refused


#: States in which a ring-configuring request is allowed.
OWNED_STATES = frozenset({State.OWNED, State.NEGOTIATED, State.RUNNING})


@dataclass(frozen=True, slots=True)
class Message:
    """One front-end request. ``body`` is the parsed payload (None when it has none)."""

    request: R
    flags: int
    body: Any
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & vu.FLAG_NEED_REPLY)

    @property
    def vring_index(self) -> int:
        """The queue index of a vring request (state, address or fd message)."""
        if self.request in VRING_FD_REQUESTS:
            return int(self.body.value) & vu.VRING_INDEX_MASK
        return int(self.body.index)

    @property
    def fd(self) -> int | None:
        """The single fd this message carries, if any."""
        return self.fds[0] if self.fds else None

    def __str__(self) -> str:
        return f"{self.request.name}(flags={self.flags:#x}, fds={len(self.fds)})"


def close_fds(fds: tuple[int, ...] | list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


#: REPLY_ACK replies by (request, ok): the same bytes every time
_ACKS: dict[tuple[R, bool], bytes] = {}


class BackendConnection:
    """Negotiation state and message validation of one vhost-user connection."""

    def __init__(
        self,
        *,
        name: str,
        device_features: int,
        num_queues: int,
        protocol_features: int = int(OFFERED_PROTOCOL_FEATURES),
        max_mem_slots: int = MAX_MEM_SLOTS,
    ) -> None:
        self.name = name
        self.offered_features = int(BASE_FEATURES) | device_features
        self.offered_protocol_features = protocol_features
        self.num_queues = num_queues
        self.max_mem_slots = max_mem_slots
        self.acked_features = 0
        self.protocol_features = 0
        self.state = State.NEW
        #: Rings started by SET_VRING_KICK and not stopped since (RUNNING while non-empty).
        self.started: set[int] = set()
        #: The base GET_VRING_BASE reported for each stopped ring (device-reset detection).
        self.stopped_at: dict[int, int] = {}
        self._reset_reason: str | None = None
        self._buf = bytearray()
        self._fds: list[int] = []
        self._head: Any = None  # the parsed, checked header of the message being received

    # -- negotiated state ----------------------------------------------------------------

    def has_protocol(self, bit: int) -> bool:
        return bool(self.protocol_features & bit)

    @property
    def reply_ack(self) -> bool:
        return self.has_protocol(PF.REPLY_ACK)

    @property
    def event_idx(self) -> bool:
        return bool(self.acked_features & VF.RING_EVENT_IDX)

    @property
    def indirect(self) -> bool:
        return bool(self.acked_features & VF.RING_INDIRECT_DESC)

    @property
    def rings_start_enabled(self) -> bool:
        """Without PROTOCOL_FEATURES acked, rings are enabled as soon as they start."""
        return not self.acked_features & VF.PROTOCOL_FEATURES

    @property
    def dead(self) -> bool:
        return self.state is State.DEAD

    def reset_device(self) -> None:
        """RESET_DEVICE / RESET_OWNER: stop every ring, forget the acked features; the owner
        and the protocol features stay (back to OWNED, or NEW without an owner)."""
        self.acked_features = 0
        self.started.clear()
        self.stopped_at.clear()
        if self.state is not State.NEW:
            self.state = State.OWNED

    def take_reset(self) -> str | None:
        """Why the device was reset since the last call (see the module docstring), once;
        None when it was not."""
        reason, self._reset_reason = self._reset_reason, None
        return reason

    def _note_reset(self, reason: str) -> None:
        self._reset_reason = self._reset_reason or reason
        self.stopped_at.clear()  # every ring starts over: its old base means nothing now

    # -- input ---------------------------------------------------------------------------

    def receive(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> list[Message]:
        """Feed bytes (and the fds that came with them); return every complete message."""
        if self.dead:
            close_fds(list(fds))
            raise FrontendError(f"{self.name}: connection already failed")
        self._buf += data
        self._fds.extend(fds)
        out: list[Message] = []
        try:
            while len(self._buf) >= vu.HEADER_SIZE:
                header = self._head
                if header is None:  # parsed and checked once, however the payload arrives
                    header = vu.parse_header(bytes(self._buf[: vu.HEADER_SIZE]))
                    self._check_header(header)
                    self._head = header
                end = vu.HEADER_SIZE + header.size
                if len(self._buf) < end:
                    break
                payload = bytes(self._buf[vu.HEADER_SIZE : end])
                del self._buf[:end]
                self._head = None
                fds_now, self._fds = self._fds, []
                out.append(self._message(header, payload, fds_now))
        except (FrontendError, FormatError) as exc:
            self.fail()
            for m in out:
                close_fds(m.fds)
            if isinstance(exc, FrontendError):
                raise
            raise FrontendError(f"{self.name}: {exc}") from None
        return out

    def fail(self) -> None:
        """Mark the connection dead and close every fd not yet handed out."""
        self.state = State.DEAD
        self.started.clear()
        close_fds(self._fds)
        self._fds = []

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def check_header(self, data: bytes) -> int:
        """Validate a 12-byte header before its payload arrives; returns the payload size
        (a :class:`FrontendError` for a bad one, the connection is then dead)."""
        try:
            self._check_header(vu.parse_header(data))
        except (FrontendError, FormatError) as exc:
            self.fail()
            if isinstance(exc, FrontendError):
                raise
            raise FrontendError(f"{self.name}: {exc}") from None
        return int(vu.parse_header(data).size)

    @staticmethod
    def expected_fds(data: bytes) -> int:
        """How many fds the whole message ``data`` (header + payload) must carry (0 when
        it does not parse: :meth:`receive` then says why). REM_MEM_REG counts 0: its
        optional fd is never used."""
        try:
            request = R(vu.parse_header(data[: vu.HEADER_SIZE]).request)
            if request in (R.ADD_MEM_REG, R.SET_BACKEND_REQ_FD):
                return 1
            if request is not R.SET_MEM_TABLE and request not in VRING_FD_REQUESTS:
                return 0
            fmt = vu.REQUEST_PAYLOAD[request]
            body: Any = vu.parse_payload(fmt, data[vu.HEADER_SIZE :], request.name)
        except (FormatError, ValueError, KeyError):
            return 0
        if request is R.SET_MEM_TABLE:
            return int(body.nregions)
        return 0 if body.value & vu.VRING_NOFD_MASK else 1

    @property
    def pending_payload(self) -> int:
        """Payload bytes still missing for the message whose header was received (0 when
        no header is pending)."""
        if self._head is None:
            return 0
        return max(0, vu.HEADER_SIZE + self._head.size - len(self._buf))

    def _check_header(self, header: Any) -> None:
        flags = header.flags
        if flags & vu.VERSION_MASK != vu.VERSION:
            raise FrontendError(f"{self.name}: header version {flags & vu.VERSION_MASK} != 1")
        if flags & ~vu.KNOWN_FLAGS:
            raise FrontendError(f"{self.name}: reserved header flag bits {flags:#x}")
        if flags & vu.FLAG_REPLY:
            raise FrontendError(f"{self.name}: REPLY flag on a request")
        if header.size > vu.MAX_PAYLOAD:
            raise FrontendError(
                f"{self.name}: payload size {header.size} > {vu.MAX_PAYLOAD} "
                f"(request {header.request})"
            )
        request = R.lookup(header.request)
        if request is None or request not in SUPPORTED:
            what = request.name if request is not None else f"unknown request {header.request}"
            raise FrontendError(f"{self.name}: {what} is not supported")

    def _message(self, header: Any, payload: bytes, fds: list[int]) -> Message:
        request = R(header.request)
        try:
            fmt = vu.REQUEST_PAYLOAD.get(request)
            if fmt is None:
                if payload:
                    raise FrontendError(
                        f"{self.name}: {request.name} carries {len(payload)} payload bytes"
                    )
                body = None
            else:
                body = vu.parse_payload(fmt, payload, request.name)
            fds = self._check_fds(request, body, fds)
            self._check_state(request, body)
        except BaseException:
            close_fds(fds)
            raise
        msg = Message(request=request, flags=header.flags, body=body, fds=tuple(fds))
        self._apply(msg)
        return msg

    def _check_fds(self, request: R, body: Any, fds: list[int]) -> list[int]:
        n = len(fds)
        if n > vu.MAX_FDS:
            raise FrontendError(f"{self.name}: {request.name} carries {n} fds")
        if request is R.SET_MEM_TABLE:
            want = body.nregions
            if want == 0 or want > vu.MAX_FDS:
                raise FrontendError(f"{self.name}: SET_MEM_TABLE with {want} regions")
        elif request in (R.ADD_MEM_REG, R.SET_BACKEND_REQ_FD):
            want = 1
        elif request in VRING_FD_REQUESTS:
            want = 0 if body.value & vu.VRING_NOFD_MASK else 1
            if body.value & ~(vu.VRING_INDEX_MASK | vu.VRING_NOFD_MASK):
                raise FrontendError(f"{self.name}: {request.name} reserved bits {body.value:#x}")
        elif request is R.REM_MEM_REG:
            # allowed, never used: the owner closes it (vdev/connection.py: in a worker thread,
            # it may be the last reference to a populated RAM file)
            return fds
        else:
            want = 0
        if n != want:
            raise FrontendError(f"{self.name}: {request.name} carries {n} fds, expected {want}")
        return fds

    def _check_state(self, request: R, body: Any) -> None:
        gate = SUPPORTED[request]
        if gate is not None and not self.has_protocol(gate):
            raise FrontendError(f"{self.name}: {request.name} without protocol feature {gate!r}")
        if request in NEEDS_OWNER and self.state not in OWNED_STATES:
            raise FrontendError(f"{self.name}: {request.name} before SET_OWNER")
        if request is R.SET_VRING_KICK and self.state is State.OWNED:
            raise FrontendError(f"{self.name}: SET_VRING_KICK before SET_FEATURES")
        if request is R.SET_FEATURES and body.value & ~self.offered_features:
            raise FrontendError(
                f"{self.name}: SET_FEATURES {body.value:#x} acks bits never offered "
                f"({body.value & ~self.offered_features:#x})"
            )
        if request is R.SET_PROTOCOL_FEATURES and body.value & ~self.offered_protocol_features:
            raise FrontendError(
                f"{self.name}: SET_PROTOCOL_FEATURES {body.value:#x} acks unknown bits "
                f"({body.value & ~self.offered_protocol_features:#x})"
            )
        if (
            request in VRING_FD_REQUESTS
            or request in VRING_STATE_REQUESTS
            or (request is R.SET_VRING_ADDR)
        ):
            index = body.value & vu.VRING_INDEX_MASK if request in VRING_FD_REQUESTS else body.index
            if index >= self.num_queues:
                raise FrontendError(
                    f"{self.name}: {request.name} for queue {index}, device has {self.num_queues}"
                )
            if request in RING_SETUP_REQUESTS and index in self.started:
                raise FrontendError(f"{self.name}: {request.name} on running ring {index}")
        if request is R.SET_VRING_ENABLE:
            if not self.acked_features & VF.PROTOCOL_FEATURES:
                raise FrontendError(f"{self.name}: SET_VRING_ENABLE without PROTOCOL_FEATURES")
            if body.num not in (0, 1):
                raise FrontendError(f"{self.name}: SET_VRING_ENABLE value {body.num}")
        if request is R.SET_VRING_ADDR and body.flags & vu.VRING_F_LOG:
            raise FrontendError(f"{self.name}: SET_VRING_ADDR asks for dirty logging")
        if request in (R.GET_CONFIG, R.SET_CONFIG) and (
            body.size == 0 or body.offset + body.size > vu.MAX_CONFIG_SIZE
        ):
            raise FrontendError(
                f"{self.name}: {request.name} window {body.offset}+{body.size} is invalid"
            )

    def _apply(self, msg: Message) -> None:
        r = msg.request
        if r is R.SET_FEATURES:
            value = int(msg.body.value)
            if self.state in (State.NEGOTIATED, State.RUNNING) and value != self.acked_features:
                self._note_reset("features re-negotiated")
            self.acked_features = value
            if self.state is State.OWNED:
                self.state = State.NEGOTIATED
        elif r is R.SET_PROTOCOL_FEATURES:
            self.protocol_features = int(msg.body.value)
        elif r is R.SET_OWNER:
            if self.state is State.NEW:
                self.state = State.OWNED
        elif r in (R.RESET_DEVICE, R.RESET_OWNER):
            self.reset_device()
            self._note_reset(r.name)
        elif r is R.SET_VRING_KICK:
            self.started.add(msg.vring_index)
            self.state = State.RUNNING
        elif r is R.GET_VRING_BASE:
            self.started.discard(msg.vring_index)
            if not self.started and self.state is State.RUNNING:
                self.state = State.NEGOTIATED
        elif r is R.SET_VRING_BASE:
            index, base = msg.vring_index, int(msg.body.num)
            reported = self.stopped_at.pop(index, None)
            if reported is not None and reported != base:
                self._note_reset(
                    f"ring {index} re-initialised (base {base}, stopped at {reported})"
                )

    # -- output --------------------------------------------------------------------------

    def vring_base_reply(self, msg: Message, base: int) -> bytes:
        """The GET_VRING_BASE reply for ``msg``'s ring, stopped at ``base`` (recorded: a
        restart at another base is a device reset)."""
        index = msg.vring_index
        self.stopped_at[index] = base
        body = vu.build_payload(vu.VRING_STATE, {"index": index, "num": base}, "vring state")
        return self.reply(msg, body)

    def reply(self, msg: Message, body: bytes) -> bytes:
        """A reply carrying ``body`` (flags exactly REPLY|version: QEMU checks 0x5)."""
        return vu.build_message(msg.request, body, flags=vu.REPLY_FLAGS)

    def ack(self, msg: Message, ok: bool = True) -> bytes:
        """The REPLY_ACK u64 when the request asked for one, else nothing."""
        if msg.request in vu.REPLY_PAYLOAD or not (msg.need_reply and self.reply_ack):
            return b""
        key = (msg.request, ok)
        reply = _ACKS.get(key)
        if reply is None:  # SET_CONFIG is acked once per Linux balloon request: built once
            reply = _ACKS[key] = self.reply(msg, vu.u64(0 if ok else 1))
        return reply

    def answer(self, msg: Message) -> bytes:
        """Reply bytes for a :data:`NEGOTIATION` request (state was applied by receive)."""
        if msg.request is R.GET_FEATURES:
            return self.reply(msg, vu.u64(self.offered_features))
        if msg.request is R.GET_PROTOCOL_FEATURES:
            return self.reply(msg, vu.u64(self.offered_protocol_features))
        if msg.request is R.GET_QUEUE_NUM:
            return self.reply(msg, vu.u64(self.num_queues))
        if msg.request is R.GET_MAX_MEM_SLOTS:
            return self.reply(msg, vu.u64(self.max_mem_slots))
        if msg.request in NEGOTIATION:
            return self.ack(msg)
        raise ValueError(f"{msg.request.name} is not a negotiation request")

    def config_change_message(self) -> bytes:
        """BACKEND_CONFIG_CHANGE_MSG for the back-end channel, without NEED_REPLY."""
        return vu.build_message(vu.BackendRequest.CONFIG_CHANGE_MSG, b"")
