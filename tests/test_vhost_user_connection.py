"""The sans-I/O vhost-user connection: negotiation, validation, replies (no sockets)."""

from __future__ import annotations

import os

import pytest

from protocol import vhost_user as vu
from protocol.errors import FrontendError
from protocol.vhost_user import FrontendRequest as R
from vdev.vhost_user import BackendConnection


def conn() -> BackendConnection:
    return BackendConnection(name="t", device_features=0, num_queues=2)


def msg(request: int, payload: bytes = b"", flags: int = vu.VERSION) -> bytes:
    return vu.build_message(request, payload, flags)


def test_negotiation_and_replies() -> None:
    c = conn()
    [m] = c.receive(msg(R.GET_FEATURES))
    reply = c.answer(m)
    assert reply[:12] == vu.build_header(R.GET_FEATURES, 0x5, 8)
    assert int.from_bytes(reply[12:], "little") == c.offered_features
    # split across calls: nothing until complete
    data = msg(R.SET_PROTOCOL_FEATURES, vu.u64(0x8 | 0x1))
    assert c.receive(data[:5]) == []
    [m] = c.receive(data[5:])
    assert c.protocol_features == 0x9 and c.answer(m) == b""
    [m] = c.receive(msg(R.SET_OWNER, flags=vu.VERSION | vu.FLAG_NEED_REPLY))
    assert c.answer(m) == msg(R.SET_OWNER, vu.u64(0), 0x5)  # REPLY_ACK: exactly 0x5
    [m] = c.receive(msg(R.SET_FEATURES, vu.u64(1 << 32 | 1 << 30 | 1 << 29)))
    assert c.event_idx and not c.indirect and not c.rings_start_enabled


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (vu.build_header(R.GET_FEATURES, 0x2, 0), "version"),
        (vu.build_header(R.GET_FEATURES, 0x5, 0), "REPLY"),
        (vu.build_header(R.GET_FEATURES, 0x11, 0), "reserved"),
        (vu.build_header(R.SET_FEATURES, 0x1, 5000), "size"),
        (vu.build_header(77, 0x1, 0), "unknown"),
        (msg(R.SET_LOG_BASE, bytes(16)), "not supported"),
        (msg(R.SET_VRING_NUM, bytes(4)), "payload"),
        (msg(R.SET_FEATURES, vu.u64(1 << 32)), "before SET_OWNER"),
        (msg(R.GET_QUEUE_NUM), "protocol feature"),
        (msg(R.SET_PROTOCOL_FEATURES, vu.u64(1 << 1)), "unknown bits"),
    ],
)
def test_rejections(data: bytes, why: str) -> None:
    c = conn()
    with pytest.raises(FrontendError, match=why):
        c.receive(data)
    assert c.dead


def test_fds_validated_and_closed() -> None:
    c = conn()
    c.receive(msg(R.SET_OWNER))
    fd = os.eventfd(0)
    with pytest.raises(FrontendError, match="fds"):
        c.receive(msg(R.GET_FEATURES), [fd])
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the connection
    c = conn()
    c.receive(msg(R.SET_OWNER))
    fd = os.eventfd(0)
    [m] = c.receive(msg(R.SET_VRING_CALL, vu.u64(1)), [fd])
    assert m.fd == fd and m.vring_index == 1
    os.close(fd)
    with pytest.raises(FrontendError, match="expected 0"):
        c.receive(msg(R.SET_VRING_KICK, vu.u64(0x100)), [os.eventfd(0)])
    c = conn()
    c.receive(msg(R.SET_OWNER))
    with pytest.raises(FrontendError, match="queue 5"):
        c.receive(msg(R.SET_VRING_CALL, vu.u64(5 | 0x100)))
