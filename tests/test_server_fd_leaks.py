"""Fifty hostile connections leak no file descriptor in ``vdev serve``."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any

import numpy as np
import trio
from server_helpers import (
    MiB,
)

from guest_driver.frontend import VmwChannel, connect_frontend
from protocol import vhost_user as vu
from protocol.vhost_user import FrontendRequest as R
from protocol.vmw import ALL_CAPABILITIES, Command


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _hostile(path: str, i: int, ram: Any) -> None:
    """One of several ways of leaving a connection with fds in flight."""
    kind = i % 7
    if kind in (5, 6):
        async with connect_frontend(path, ram, start=False) as fe:
            if kind == 5:  # an fd together with the "no fd" flag
                request, body = R.SET_VRING_KICK, vu.u64(0 | vu.VRING_NOFD_MASK)
                extra = [os.eventfd(0)]
            else:  # a datagram socket as the back-end channel
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                a.close()
                request, body, extra = R.SET_BACKEND_REQ_FD, b"", [b.detach()]
            try:
                await fe.send_raw(vu.build_header(request, vu.VERSION, len(body)) + body, extra)
            finally:
                for fd in extra:
                    os.close(fd)
            with trio.move_on_after(1), contextlib.suppress(OSError):
                while await fe.sock.recv(4096):
                    pass
        return
    if kind == 0:  # fds with a header, then the connection dies inside the payload
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await s.connect(path)
        fds = [os.eventfd(0) for _ in range(3)]
        try:
            hdr = vu.build_header(R.SET_MEM_TABLE, vu.VERSION, 200)
            await s.sendmsg(
                [hdr + b"\0" * 10],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, np.array(fds, np.int32).tobytes())],
            )
        finally:
            for fd in fds:
                os.close(fd)
        s.close()
        return
    if kind == 1:  # too many fds
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await s.connect(path)
        fds = [os.eventfd(0) for _ in range(12)]
        try:
            hdr = vu.build_header(R.SET_VRING_CALL, vu.VERSION, 8)
            await s.sendmsg(
                [hdr + vu.u64(0)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, np.array(fds, np.int32).tobytes())],
            )
        finally:
            for fd in fds:
                os.close(fd)
        with trio.move_on_after(2), contextlib.suppress(OSError):
            while await s.recv(4096):
                pass
        s.close()
        return
    async with connect_frontend(path, ram, start=kind != 2) as fe:
        if kind == 3:  # a running device, a memory table, kick/call fds, then a bad message
            await fe.send_raw(vu.build_header(99, vu.VERSION, 0))
            with trio.move_on_after(2), contextlib.suppress(OSError):
                while await fe.sock.recv(4096):
                    pass
        elif kind == 4:  # a bad region with its fd
            fd = os.eventfd(0)
            try:
                region = {
                    "guest_phys_addr": 1 << 40,
                    "memory_size": 1 << 30,
                    "userspace_addr": 0,
                    "mmap_offset": 0,
                }
                payload = vu.build_payload(
                    vu.SINGLE_REGION, {"padding": 0, "region": region}, "region"
                )
                await fe.send_raw(
                    vu.build_header(R.ADD_MEM_REG, vu.VERSION, len(payload)) + payload, [fd]
                )
            finally:
                os.close(fd)
            with trio.move_on_after(2), contextlib.suppress(OSError):
                while await fe.sock.recv(4096):
                    pass


async def test_fifty_hostile_connections_leak_no_fd(vdev_process, guest_ram) -> None:
    server = vdev_process(sockets=2, verbose=1)
    pid = server.proc.pid
    with trio.fail_after(120):
        # one clean connection first so lazily opened fds (threads, imports) exist
        async with connect_frontend(server.paths[0], guest_ram(32 * MiB)) as fe:
            await VmwChannel(fe).call(Command.START, int(ALL_CAPABILITIES))
        await trio.sleep(0.3)
        before = _fd_count(pid)
        for i in range(50):
            await _hostile(server.paths[i % 2], i, guest_ram(32 * MiB))
        deadline = time.monotonic() + 10
        while _fd_count(pid) > before and time.monotonic() < deadline:
            await trio.sleep(0.05)
        after = _fd_count(pid)
    assert server.alive()
    assert after <= before, (before, after, sorted(os.listdir(f"/proc/{pid}/fd")))
    assert "Traceback" not in server.log()


# ------------------------------------------------------------------------------ exit time
