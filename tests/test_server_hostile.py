"""Hostile inputs against one `vdev serve` process while another guest keeps inflating.

Each row: what a broken front-end or guest sends on guest vm1, and the documented reaction.
"closed": the back-end logs a line naming the connection and closes that one connection.
Throughout, guest vm0 locks and unlocks pages; at the end its traffic must have completed,
and the process must still be alive.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import trio

from guest_driver.frontend import UVA_BASE, VmwChannel, connect_frontend
from protocol import vhost_user as vu
from protocol.errors import BackendError
from protocol.units import PAGE_SIZE
from protocol.vhost_user import FrontendRequest as R
from protocol.virtqueue import DescFlag
from protocol.vmw import (
    ALL_CAPABILITIES,
    Command,
    Request,
    Status,
    batch_entries,
    build_batch,
    entry_statuses,
)

MiB = 1 << 20
RAM = 32 * MiB


async def expect_closed(fe) -> None:
    """The back-end must close this connection (EOF or reset) within a few seconds."""
    with trio.fail_after(5):
        try:
            while await fe.sock.recv(4096):
                pass
        except OSError:
            pass


async def raw(
    fe, request: int, payload: bytes = b"", flags: int = vu.VERSION, size: int | None = None, fds=()
) -> None:
    header = vu.build_header(request, flags, len(payload) if size is None else size)
    await fe.send_raw(header + payload, fds)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK)


async def case_bad_version(fe, ch):
    await raw(fe, R.GET_FEATURES, flags=0x2)
    return "closed"


async def case_reply_flag(fe, ch):
    await raw(fe, R.GET_FEATURES, flags=0x5)
    return "closed"


async def case_oversized(fe, ch):
    await raw(fe, R.SET_FEATURES, size=1 << 20)
    return "closed"


async def case_unknown_request(fe, ch):
    await raw(fe, 99)
    return "closed"


async def case_unsupported_request(fe, ch):
    await raw(fe, R.SET_LOG_BASE, bytes(16))
    return "closed"


async def case_fds_where_none_belong(fe, ch):
    fd = eventfd()
    try:
        await raw(fe, R.GET_FEATURES, fds=[fd])
    finally:
        os.close(fd)
    return "closed"


async def case_too_many_fds(fe, ch):
    fds = [eventfd() for _ in range(12)]
    try:
        await raw(fe, R.SET_VRING_CALL, vu.u64(0), fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    return "closed"


async def case_wrong_payload_size(fe, ch):
    await raw(fe, R.SET_VRING_NUM, bytes(4))
    return "closed"


async def case_unoffered_feature(fe, ch):
    await raw(fe, R.SET_FEATURES, vu.u64(1 << 33))  # ACCESS_PLATFORM, never offered
    return "closed"


async def case_queue_index_out_of_range(fe, ch):
    await raw(fe, R.SET_VRING_NUM, vu.build_payload(vu.VRING_STATE, {"index": 7, "num": 64}, "s"))
    return "closed"


async def case_ring_outside_regions(fe, ch):
    await fe.request(R.GET_VRING_BASE, {"index": 0, "num": 0})
    body = {
        "index": 0,
        "flags": 0,
        "desc": UVA_BASE + 64 * MiB,
        "used": UVA_BASE,
        "avail": UVA_BASE,
        "log": 0,
    }
    await raw(fe, R.SET_VRING_ADDR, vu.build_payload(vu.VRING_ADDRESS, body, "addr"))
    return "closed"


async def case_truncated_message(fe, ch):
    await fe.send_raw(vu.build_header(R.SET_FEATURES, vu.VERSION, 8) + b"\x01\x02")
    fe.sock.shutdown(socket.SHUT_WR)
    return "closed"


async def case_descriptor_loop(fe, ch):
    q = ch.cmdq
    req = Request(Command.GET_TARGET).build()
    fe.ram.write(ch.request_gpa, req)
    N = int(DescFlag.NEXT)
    await q.driver.post_raw(
        5, {5: (ch.request_gpa, 24, N, 6), 6: (ch.response_gpa, 24, N | int(DescFlag.WRITE), 5)}
    )
    await q.kick()
    while True:
        used = await q.driver.poll_used()
        if used:
            break
        await q.wait_call()
    assert [(u.id, u.len) for u in used] == [(5, 0)]
    r = await ch.call(Command.GET_TARGET)  # the queue keeps serving
    assert r.status == Status.SUCCESS
    return "answered"


async def case_batch_page_outside_ram(fe, ch):
    r = await ch.call(Command.BATCHED_LOCK, (RAM + 64 * MiB) // PAGE_SIZE, 1)
    assert r.status == Status.ERROR_CMD_INVALID
    r = await ch.call(Command.BATCHED_LOCK, 0xC0, 1)  # inside the ROM hole
    assert r.status == Status.ERROR_CMD_INVALID
    return "answered"


async def case_513_entries(fe, ch):
    r = await ch.call(Command.BATCHED_LOCK, 0x300, 513)
    assert r.status == Status.ERROR_CMD_INVALID
    return "answered"


async def case_pfns_beyond_ram(fe, ch):
    pfns = [RAM // PAGE_SIZE, RAM // PAGE_SIZE + 5, 2**40, 0xC5]
    resp, batch = await ch.command(Request(Command.BATCHED_LOCK, 0x300, 4), build_batch(pfns))
    assert resp.status == Status.SUCCESS
    assert entry_statuses(batch_entries(batch, 4)).tolist() == [Status.ERROR_PPN_INVALID] * 4
    return "answered"


async def case_avail_idx_jump(fe, ch):
    q = ch.cmdq
    await q.driver.publish_avail_idx(q.driver.avail_idx + 1000)
    os.eventfd_write(q.kick_fd, 1)
    await trio.sleep(0.1)
    # the ring is dead, the connection is not: the front-end can still stop it
    bases = await fe.stop()
    assert len(bases) == 2
    return "ring stopped"


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.fixture
def server(vdev_process):
    return vdev_process(sockets=2, target="16M", verbose=1)


async def inflate_forever(path: str, ram, counter: dict) -> None:
    async with connect_frontend(path, ram) as fe:
        ch = VmwChannel(fe)
        r = await ch.call(Command.START, int(ALL_CAPABILITIES))
        assert r.status == Status.SUCCESS_WITH_CAPABILITIES
        base = 0x400
        while True:
            pfns = np.arange(base, base + 256, dtype=np.uint64)
            resp, batch = await ch.command(
                Request(Command.BATCHED_LOCK, 0x300, 256), build_batch(pfns)
            )
            assert resp.status == Status.SUCCESS
            assert (entry_statuses(batch_entries(batch, 256)) == 0).all()
            resp, batch = await ch.command(
                Request(Command.BATCHED_UNLOCK, 0x300, 256), build_batch(pfns)
            )
            assert (entry_statuses(batch_entries(batch, 256)) == 0).all()
            counter["rounds"] += 1
            await trio.sleep(0)


async def test_hostile_inputs(server, guest_ram) -> None:
    good_ram = guest_ram(RAM)
    counter = {"rounds": 0}
    reactions = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(inflate_forever, server.paths[0], good_ram, counter)
            for name, case in CASES.items():
                ram = guest_ram(RAM)
                async with connect_frontend(server.paths[1], ram) as fe:
                    ch = VmwChannel(fe)
                    r = await ch.call(Command.START, int(ALL_CAPABILITIES))
                    assert r.status == Status.SUCCESS_WITH_CAPABILITIES
                    reaction = await case(fe, ch)
                    if reaction == "closed":
                        await expect_closed(fe)
                    reactions[name] = reaction
                assert server.alive(), name
                before = counter["rounds"]
                with trio.fail_after(5):
                    while counter["rounds"] < before + 1:
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert server.alive()
    log = server.log()
    assert "Traceback" not in log
    assert log.count("closing the connection") >= sum(r == "closed" for r in reactions.values()) - 1
    assert counter["rounds"] >= len(CASES)
    print(reactions, counter)


async def test_bad_fd_kinds_do_not_kill(server, guest_ram) -> None:
    """A regular file as kick fd, a non-socket as back-end channel: contained."""
    ram = guest_ram(RAM)
    with trio.fail_after(20):
        async with connect_frontend(server.paths[1], ram, start=False) as fe:
            await fe.start()
            ch = VmwChannel(fe)
            await fe.stop()
            with open(
                os.devnull, "rb"
            ) as f:  # not pollable by epoll: the ring falls back to polling
                await fe.request(R.SET_VRING_KICK, {"value": 0}, [f.fileno()])
            await fe.request(R.SET_VRING_CALL, {"value": 0}, [fe.queues[0].call_fd])
            await fe.request(R.SET_VRING_ENABLE, {"index": 0, "num": 1})
            r = await ch.call(Command.START, int(ALL_CAPABILITIES))
            assert r.status == Status.SUCCESS_WITH_CAPABILITIES
        async with connect_frontend(server.paths[1], ram, handshake=False) as fe:
            await fe.get_u64(R.GET_FEATURES)
            fe.protocol_features = await fe.get_u64(R.GET_PROTOCOL_FEATURES)
            await fe.request(R.SET_PROTOCOL_FEATURES, {"value": fe.protocol_features})
            fd = os.eventfd(0)
            try:
                with pytest.raises(BackendError):  # the back-end refused
                    await fe.request(R.SET_BACKEND_REQ_FD, None, [fd])
            finally:
                os.close(fd)
    assert server.alive()
