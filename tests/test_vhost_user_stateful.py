"""BackendConnection driven by random message sequences against a plain-Python reference.

The reference writes the state rules of ``vdev/vhost_user.py`` the obvious way: which
request each state allows, which ring requests need their ring stopped, when the state
moves, and when a device reset is reported. After every message: accepted or rejected as
the reference says (a rejection is a FrontendError naming the reason, and the connection
is dead from then on, every fd closed), and the whole state agrees. Nothing else escapes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from protocol import vhost_user as vu
from protocol.errors import FrontendError
from protocol.vhost_user import FrontendRequest as R
from protocol.vhost_user import ProtocolFeature as PF
from protocol.vhost_user import VirtioFeature as VF
from vdev.vhost_user import OFFERED_PROTOCOL_FEATURES, BackendConnection, Message, State

NUM_QUEUES = 3
DEVICE_FEATURES = 1 << 1 | 1 << 2

#: Mostly valid: a connection dies at its first refusal, and the interesting states (rings
#: running, stopped, restarted) lie behind a run of accepted messages.
queues = st.sampled_from([0, 1, 2] * 3 + [NUM_QUEUES])  # NUM_QUEUES itself is out of range
bases = st.sampled_from([0, 1, 7, 52, 0xFFFF])


@dataclass
class Reference:
    """The rules, written the obvious way."""

    offered: int
    state: State = State.NEW
    acked: int = 0
    protocol: int = 0
    started: set[int] = field(default_factory=set)
    stopped_at: dict[int, int] = field(default_factory=dict)
    resets: list[str] = field(default_factory=list)

    def owned(self) -> bool:
        return self.state in (State.OWNED, State.NEGOTIATED, State.RUNNING)

    def refusal(self, request: R, index: int | None = None, value: int = 0) -> str | None:
        """Why ``request`` is refused now (a fragment of the error), or None."""
        if self.state is State.DEAD:
            return "already failed"
        gate = {
            R.GET_QUEUE_NUM: PF.MQ,
            R.RESET_DEVICE: PF.RESET_DEVICE,
            R.GET_MAX_MEM_SLOTS: PF.CONFIGURE_MEM_SLOTS,
        }.get(request)
        if gate is not None and not self.protocol & gate:
            return "without protocol feature"
        needs_owner = request in (
            R.SET_FEATURES,
            R.SET_VRING_NUM,
            R.SET_VRING_BASE,
            R.GET_VRING_BASE,
            R.SET_VRING_KICK,
            R.SET_VRING_CALL,
            R.SET_VRING_ENABLE,
        )
        if needs_owner and not self.owned():
            return "before SET_OWNER"
        if request is R.SET_VRING_KICK and self.state is State.OWNED:
            return "before SET_FEATURES"
        if request is R.SET_FEATURES and value & ~self.offered:
            return "never offered"
        if request is R.SET_PROTOCOL_FEATURES and value & ~int(OFFERED_PROTOCOL_FEATURES):
            return "unknown bits"
        if index is not None and index >= NUM_QUEUES:
            return f"queue {index}"
        if request in (R.SET_VRING_NUM, R.SET_VRING_BASE) and index in self.started:
            return "on running ring"
        if request is R.SET_VRING_ENABLE:
            if not self.acked & VF.PROTOCOL_FEATURES:
                return "without PROTOCOL_FEATURES"
            if value not in (0, 1):
                return "SET_VRING_ENABLE value"
        return None

    def note_reset(self, reason: str) -> None:
        if not self.resets:
            self.resets.append(reason)
        self.stopped_at.clear()

    def apply(self, request: R, index: int | None = None, value: int = 0) -> None:
        if request is R.SET_OWNER and self.state is State.NEW:
            self.state = State.OWNED
        elif request is R.SET_FEATURES:
            if self.state in (State.NEGOTIATED, State.RUNNING) and value != self.acked:
                self.note_reset("features re-negotiated")
            self.acked = value
            if self.state is State.OWNED:
                self.state = State.NEGOTIATED
        elif request is R.SET_PROTOCOL_FEATURES:
            self.protocol = value
        elif request in (R.RESET_DEVICE, R.RESET_OWNER):
            self.acked = 0
            self.started.clear()
            self.stopped_at.clear()
            if self.state is not State.NEW:
                self.state = State.OWNED
            self.note_reset(request.name)
        elif request is R.SET_VRING_KICK:
            assert index is not None
            self.started.add(index)
            self.state = State.RUNNING
        elif request is R.GET_VRING_BASE:
            assert index is not None
            self.started.discard(index)
            if not self.started and self.state is State.RUNNING:
                self.state = State.NEGOTIATED
        elif request is R.SET_VRING_BASE:
            assert index is not None
            reported = self.stopped_at.pop(index, None)
            if reported is not None and reported != value:
                self.note_reset(f"ring {index} re-initialised")


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def vring_state(index: int, num: int) -> bytes:
    return vu.build_payload(vu.VRING_STATE, {"index": index, "num": num}, "vring state")


alive = precondition(lambda self: self.ref.state is not State.DEAD)


class ConnectionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fds: list[int] = []  # every fd the connection handed out (the caller's)
        self.fresh()

    def fresh(self) -> None:
        self.conn = BackendConnection(
            name="t", device_features=DEVICE_FEATURES, num_queues=NUM_QUEUES
        )
        self.ref = Reference(offered=self.conn.offered_features)

    def teardown(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- one message ---------------------------------------------------------------------

    def send(
        self,
        request: R,
        payload: bytes = b"",
        *,
        index: int | None = None,
        value: int = 0,
        nfds: int = 0,
    ) -> Message | None:
        """Feed one message; check it is accepted or refused as the reference says. The
        message when accepted."""
        fds = [os.eventfd(0) for _ in range(nfds)]
        why = self.ref.refusal(request, index, value)
        try:
            msgs = self.conn.receive(vu.build_message(request, payload), fds)
        except FrontendError as exc:
            assert why is not None, f"{request.name} refused: {exc}"
            assert why in str(exc), f"{request.name}: {exc!r}, expected {why!r}"
            self.ref.state = State.DEAD
            self.ref.started.clear()
            left = [fd for fd in fds if _is_open(fd)]
            assert not left, f"fds {left} left open after a refusal"
            return None
        assert why is None, f"{request.name} accepted, expected refusal: {why}"
        [msg] = msgs
        assert msg.request is request and len(msg.fds) == nfds
        self.fds += list(msg.fds)  # the caller owns them now
        self.ref.apply(request, index, value)
        # the server asks after every message whether it reset the device
        got, want = self.conn.take_reset(), self.ref.resets[:1]
        self.ref.resets.clear()
        assert (got is None) == (not want), (request.name, got, want)
        assert got is None or got.startswith(want[0]), (got, want)
        return msg

    # -- rules ---------------------------------------------------------------------------

    @precondition(lambda self: self.ref.state is State.DEAD)
    @rule(request=st.sampled_from([R.GET_FEATURES, R.SET_OWNER, R.SET_VRING_CALL]))
    def reconnect(self, request: R) -> None:
        """A dead connection refuses everything (and closes the fds that came with it);
        the next front-end gets a fresh one."""
        payload = vu.u64(0) if request is R.SET_VRING_CALL else b""
        nfds = 1 if request is R.SET_VRING_CALL else 0
        assert self.send(request, payload, index=0, nfds=nfds) is None
        self.fresh()

    @alive
    @rule(event_idx=st.booleans())
    def qemu_handshake(self, event_idx: bool) -> None:
        """QEMU's order: features, protocol features, owner, SET_FEATURES (valid in NEW; in
        a later state SET_FEATURES re-acks, maybe other bits: a re-negotiation)."""
        bits = int(VF.VERSION_1 | VF.PROTOCOL_FEATURES | (VF.RING_EVENT_IDX if event_idx else 0))
        proto = int(OFFERED_PROTOCOL_FEATURES)
        _ = (
            self.send(R.GET_FEATURES)
            and self.send(R.SET_PROTOCOL_FEATURES, vu.u64(proto), value=proto)
            and self.send(R.SET_OWNER)
            and self.send(R.SET_FEATURES, vu.u64(bits), value=bits)
        )

    @alive
    @rule(index=st.integers(0, NUM_QUEUES - 1), base=bases)
    def start_ring(self, index: int, base: int) -> None:
        """QEMU's ring start: NUM, BASE, KICK (refused somewhere unless stopped and owned)."""
        _ = (
            self.send(R.SET_VRING_NUM, vring_state(index, 64), index=index, value=64)
            and self.send(R.SET_VRING_BASE, vring_state(index, base), index=index, value=base)
            and self.send(R.SET_VRING_KICK, vu.u64(index), index=index, nfds=1)
        )

    @alive
    @rule()
    def get_features(self) -> None:
        msg = self.send(R.GET_FEATURES)
        if msg is not None:
            reply = self.conn.answer(msg)
            assert int.from_bytes(reply[vu.HEADER_SIZE :], "little") == self.ref.offered

    @alive
    @rule()
    def set_owner(self) -> None:
        self.send(R.SET_OWNER)

    @alive
    @rule(
        bits=st.sampled_from(
            [int(VF.VERSION_1 | VF.PROTOCOL_FEATURES)] * 3
            + [int(VF.VERSION_1 | VF.PROTOCOL_FEATURES | VF.RING_EVENT_IDX)] * 2
            + [int(VF.VERSION_1) | DEVICE_FEATURES, 1 << 40]  # 1 << 40: never offered
        )
    )
    def set_features(self, bits: int) -> None:
        self.send(R.SET_FEATURES, vu.u64(bits), value=bits)

    @alive
    @rule(
        bits=st.sampled_from([int(OFFERED_PROTOCOL_FEATURES)] * 4 + [int(PF.REPLY_ACK), 0, 1 << 40])
    )
    def set_protocol_features(self, bits: int) -> None:
        self.send(R.SET_PROTOCOL_FEATURES, vu.u64(bits), value=bits)

    @alive
    @rule(index=queues, num=st.sampled_from([64, 256]))
    def set_vring_num(self, index: int, num: int) -> None:
        self.send(R.SET_VRING_NUM, vring_state(index, num), index=index, value=num)

    @alive
    @rule(index=queues, base=bases)
    def set_vring_base(self, index: int, base: int) -> None:
        self.send(R.SET_VRING_BASE, vring_state(index, base), index=index, value=base)

    @alive
    @rule(index=queues, base=bases)
    def get_vring_base(self, index: int, base: int) -> None:
        """Stop a ring; the caller reports it stopped at ``base``."""
        msg = self.send(R.GET_VRING_BASE, vring_state(index, 0), index=index)
        if msg is not None:
            # the reply goes through the machine: it records the reported base
            reply = self.conn.vring_base_reply(msg, base)
            self.ref.stopped_at[index] = base
            assert vu.parse_header(reply[: vu.HEADER_SIZE]).flags == vu.REPLY_FLAGS
            assert reply[vu.HEADER_SIZE :] == vring_state(index, base)

    @precondition(lambda self: self.ref.started and self.ref.state is not State.DEAD)
    @rule(data=st.data(), base=bases)
    def stop_running_ring(self, data: st.DataObject, base: int) -> None:
        """GET_VRING_BASE of a running ring (the last one: RUNNING -> NEGOTIATED)."""
        self.get_vring_base(data.draw(st.sampled_from(sorted(self.ref.started))), base)

    @precondition(lambda self: self.ref.stopped_at and self.ref.state is not State.DEAD)
    @rule(data=st.data(), how=st.sampled_from(["pause", "reboot", "other"]))
    def restart_stopped_ring(self, data: st.DataObject, how: str) -> None:
        """QEMU's restart of a stopped ring: at the reported base (a pause: no reset), at 0
        (a reboot) or elsewhere (either way the driver re-initialised it: a device reset,
        unless the reported base was that too)."""
        index = data.draw(st.sampled_from(sorted(self.ref.stopped_at)))
        reported = self.ref.stopped_at[index]
        base = {"pause": reported, "reboot": 0, "other": reported ^ 1}[how]
        self.start_ring(index, base)

    @alive
    @rule(index=queues, nofd=st.booleans())
    def set_vring_kick(self, index: int, nofd: bool) -> None:
        value = index | (vu.VRING_NOFD_MASK if nofd else 0)
        self.send(R.SET_VRING_KICK, vu.u64(value), index=index, nfds=0 if nofd else 1)

    @alive
    @rule(index=queues)
    def set_vring_call(self, index: int) -> None:
        self.send(R.SET_VRING_CALL, vu.u64(index), index=index, nfds=1)

    @alive
    @rule(index=queues, on=st.sampled_from([0, 1] * 3 + [2]))
    def set_vring_enable(self, index: int, on: int) -> None:
        self.send(R.SET_VRING_ENABLE, vring_state(index, on), index=index, value=on)

    @alive
    @rule()
    def reset_device(self) -> None:
        self.send(R.RESET_DEVICE)

    @alive
    @rule()
    def reset_owner(self) -> None:
        self.send(R.RESET_OWNER)

    @alive
    @rule()
    def get_queue_num(self) -> None:
        self.send(R.GET_QUEUE_NUM)

    @precondition(lambda self: self.ref.state is not State.DEAD)
    @rule(junk=st.sampled_from([b"\x01\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00", b"x" * 12]))
    def garbage(self, junk: bytes) -> None:
        """A header with a bad version, or an unknown request: refused, then dead."""
        try:
            self.conn.receive(junk)
        except FrontendError:
            self.ref.state = State.DEAD
            self.ref.started.clear()
            return
        raise AssertionError("garbage accepted")

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def state_agrees(self) -> None:
        c, r = self.conn, self.ref
        assert c.state is r.state
        assert c.dead == (r.state is State.DEAD)
        assert c.started == r.started
        assert (c.state is State.RUNNING) == bool(c.started) or c.state is State.DEAD
        if c.state is not State.DEAD:
            assert c.acked_features == r.acked
            assert c.protocol_features == r.protocol
            assert c.stopped_at == r.stopped_at
            assert c.pending_bytes == 0


ConnectionMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_backend_connection_states = ConnectionMachine.TestCase
