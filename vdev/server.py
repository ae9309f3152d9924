"""The server: one per ``vdev serve`` process, tying listeners, connections and the registry.

After rust-vmm's ``vhost-user-backend`` daemon: :mod:`vdev.listeners` creates the sockets
and accepts (one socket per guest, or one already-connected socket with ``--fd``);
:mod:`vdev.connection` serves each front-end (reader task and message dispatch onto the
sans-I/O :class:`~vdev.vhost_user.BackendConnection`); :mod:`vdev.rings` runs the kick
loops and the used-ring/call side. These four modules are the only ones in ``vdev`` that do
I/O on the vhost-user side.

One front-end per guest: a new one waits :data:`RECONNECT_GRACE` for the previous one of
the same guest to disconnect, else it is refused. A bug surfacing as an unexpected
exception in one connection closes that connection (logged with its traceback) and never
takes the server down. :meth:`Server.shutdown` (SIGINT/SIGTERM) answers the requests still
queued with ERROR_BUSY, then closes everything.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

from protocol.errors import GuestError
from vdev.connection import Connection
from vdev.devices.base import Device
from vdev.listeners import accept_loop, listen
from vdev.logs import current_vm
from vdev.registry import GuestRegistry

log = logging.getLogger(__name__)

#: The most shutdown waits for the requests queued at that moment to be answered BUSY (one
#: pass per ring, every connection at once; a lock held by a large reclaim is what can
#: make it wait at all).
SHUTDOWN_GRACE = 0.5
#: How long a new front-end waits for the previous one of the same guest to disconnect.
RECONNECT_GRACE = 2.0


class Server:
    """Listeners for every guest socket, and the connections they accept."""

    def __init__(
        self,
        registry: GuestRegistry,
        device_cls: type[Device],
        *,
        socket_paths: Sequence[str] = (),
        names: Sequence[str] | None = None,
        stats_interval: float = 0.0,
    ) -> None:
        if not (stats_interval >= 0 and math.isfinite(stats_interval)):
            raise ValueError("the stats interval must be >= 0 seconds")
        self.registry = registry
        self.device_cls = device_cls
        #: Seconds between guest stats refreshes (0: only on request).
        self.stats_interval = float(stats_interval)
        self.socket_paths = [os.fspath(p) for p in socket_paths]
        self.names = list(names) if names else [f"vm{i}" for i in range(len(self.socket_paths))]
        if len(self.names) != len(self.socket_paths):
            raise ValueError("one name per socket")
        for name, path in zip(self.names, self.socket_paths, strict=True):
            if name not in registry.names():
                registry.add(name, path)
        self.connections: set[Connection] = set()
        self._nursery: trio.Nursery | None = None
        self._listeners: list[trio.socket.SocketType] = []
        self._guest_locks: dict[str, trio.Lock] = {}

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on every socket and serve until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for name, path in zip(self.names, self.socket_paths, strict=True):
                listener = await listen(path)
                self._listeners.append(listener)
                nursery.start_soon(accept_loop, listener, name, partial(self._spawn, name=name))
            log.info("serving %s on %s", self.device_cls.name, ", ".join(self.socket_paths) or "-")
            task_status.started(self)

    async def serve_fd(self, fd: int, name: str = "vm0") -> None:
        """Serve one already-connected socket (``--fd``) until it closes."""
        if name not in self.registry.names():
            self.registry.add(name, f"fd:{fd}")
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._serve(sock, name)

    def _spawn(self, sock: trio.socket.SocketType, name: str) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_when_free, sock, name)

    async def _serve_when_free(self, sock: trio.socket.SocketType, name: str) -> None:
        """One front-end per guest: a new one waits briefly for the old one to go away."""
        current_vm.set(name)  # log lines from this task and its children name the guest
        lock = self._guest_locks.setdefault(name, trio.Lock())
        got = False
        with trio.move_on_after(RECONNECT_GRACE):
            await lock.acquire()
            got = True
        if not got:
            log.warning("%s: a second front-end connected while one is active: refused", name)
            sock.close()
            return
        try:
            await self._serve(sock, name)
        finally:
            lock.release()

    async def _serve(self, sock: trio.socket.SocketType, name: str) -> None:
        current_vm.set(name)
        try:
            conn = Connection(self, sock, name, self.device_cls)
        except BaseException:
            sock.close()
            raise
        self.connections.add(conn)
        try:
            await conn.run()
        except GuestError as exc:  # should have been answered inside; never fatal
            log.error("%s: unexpected guest error: %s", conn.name, exc)
        except Exception:  # a bug: lose this connection, not every guest of the process
            log.exception("%s: internal error, connection closed", conn.name)
        finally:
            self.connections.discard(conn)

    async def shutdown(self) -> None:
        """Answer queued requests with BUSY, then close every connection and listener."""
        log.info("shutting down: answering queued requests BUSY")
        connections = list(self.connections)
        for conn in connections:
            conn.device.shutdown()
        with trio.move_on_after(SHUTDOWN_GRACE):
            async with trio.open_nursery() as nursery:
                for conn in connections:
                    nursery.start_soon(conn.answer_queued)
        for path in self.socket_paths:
            with contextlib.suppress(OSError):
                if Path(path).is_socket():
                    os.unlink(path)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
