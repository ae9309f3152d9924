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
from vdev import socket_files
from vdev.connection import Connection
from vdev.devices.base import Device
from vdev.handover import Handover, HandoverError
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
        socket_mode: int = 0o600,
        socket_gid: int | None = None,
        handover: Handover | None = None,
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
        #: vhost-user socket files: mode, group (``--socket-group``), what we bound.
        self.socket_mode = socket_mode
        self.socket_gid = socket_gid
        self._owned: list[socket_files.Owned] = []
        self._guest_locks: dict[str, trio.Lock] = {}
        #: The fd store and what this process inherited from it (None: unmanaged).
        self.handover = handover if handover is not None and handover.enabled else None
        #: Set while stopping for a hand-over: connections keep their store entries.
        self.handing_over = False
        #: The wait of :meth:`deflate_all` (cancelled by :meth:`stop_waiting`).
        self._deflate_wait = trio.CancelScope()
        self._deflate_skipped = False

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on every socket (resuming the connections a previous vdev handed over)
        and serve until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                resumed: list[Connection] = []
                for name, path in zip(self.names, self.socket_paths, strict=True):
                    listener = await self._listener(name, path)
                    self._listeners.append(listener)
                    conn = self._resume(name)
                    if conn is not None:
                        resumed.append(conn)
                    nursery.start_soon(accept_loop, listener, name, partial(self._spawn, name=name))
                if self.handover is not None:
                    self.handover.cleanup()  # whatever no listener or connection claimed
                for conn in resumed:  # each holds its guest's lock before any accept is served
                    await nursery.start(self._run_resumed, conn)
                log.info(
                    "serving %s on %s", self.device_cls.name, ", ".join(self.socket_paths) or "-"
                )
                task_status.started(self)
        finally:
            self._remove_sockets()

    def _remove_sockets(self) -> None:
        """Unlink the socket files we bound (only if still ours) and release the paths; on a
        hand-over the files stay (the next vdev takes the listeners over)."""
        owned, self._owned = self._owned, []
        for o in owned:
            if self.handing_over:
                o.release()
            else:
                o.remove()

    async def _listener(self, name: str, path: str) -> trio.socket.SocketType:
        """The listening socket of guest ``name``: the stored one, else a new one (stored)."""
        ho = self.handover
        if ho is not None:
            fd = ho.take(f"listen.{name}")
            if fd is not None:
                sock = socket.socket(fileno=fd)
                if (
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.family == socket.AF_UNIX
                    and Path(path).is_socket()
                ):
                    log.info("%s: listening socket taken over from the fd store", name)
                    self._owned.append(socket_files.adopt_listener(sock, path))
                    return trio.socket.from_stdlib_socket(sock)
                sock.close()
                ho.store.remove(f"listen.{name}")
        listener, owned = await listen(path, mode=self.socket_mode, gid=self.socket_gid)
        self._owned.append(owned)
        if ho is not None:
            ho.store.store(f"listen.{name}", listener.fileno())
        return listener

    def _resume(self, name: str) -> Connection | None:
        """The connection of guest ``name`` a previous vdev handed over, rebuilt."""
        ho = self.handover
        if ho is None:
            return None
        sock_fd, state_fd = ho.take(f"conn.{name}"), ho.take(f"state.{name}")
        if sock_fd is None or state_fd is None:
            for fd, what in ((sock_fd, "conn"), (state_fd, "state")):
                if fd is not None:
                    os.close(fd)
                    ho.store.remove(f"{what}.{name}")
            return None
        try:
            conn = Connection.resume(self, name, self.device_cls, sock_fd, state_fd)
        except (HandoverError, OSError, KeyError, ValueError, TypeError) as exc:
            log.error("%s: cannot resume the handed-over connection: %s", name, exc)
            for what, fd in (("conn", sock_fd), ("state", state_fd)):
                with contextlib.suppress(OSError):
                    os.close(fd)
                ho.store.remove(f"{what}.{name}")
            return None
        status = conn.device.status()
        self.registry.set_target(name, status.target_pages)  # the record's, not --target's
        self.registry.resumed.add(name)
        manual = conn.manual_target
        if manual is not None:
            self.registry.manual[name] = int(manual)
        else:
            self.registry.manual.pop(name, None)
        log.info("%s: connection resumed (balloon %d pages)", conn.name, status.size_pages)
        return conn

    async def _run_resumed(
        self, conn: Connection, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with self._guest_locks.setdefault(conn.guest, trio.Lock()):
            task_status.started()
            await self._run_connection(conn, resumed=True)

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
        await self._run_connection(conn)

    async def _run_connection(self, conn: Connection, *, resumed: bool = False) -> None:
        self.connections.add(conn)
        try:
            await conn.run(resumed=resumed)
        except GuestError as exc:  # should have been answered inside; never fatal
            log.error("%s: unexpected guest error: %s", conn.name, exc)
        except Exception:  # a bug: lose this connection, not every guest of the process
            log.exception("%s: internal error, connection closed", conn.name)
        finally:
            self.connections.discard(conn)

    async def hand_over(self) -> None:
        """Stop for a restart (SIGTERM under a manager): finish the batches in progress,
        commit every connection, and stop, leaving the sockets, fds and state in the store
        (the next vdev resumes them; no guest notices)."""
        log.info(
            "stopping for a hand-over: %d connections stay in the fd store", len(self.connections)
        )
        self.handing_over = True
        for conn in list(self.connections):
            async with conn.lock:  # no batch in the middle
                conn._commit()
        if self.handover is not None:
            self.handover.store.send({"STOPPING": 1, "STATUS": "handing over"})
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def deflate_all(self, timeout: float) -> dict[str, int]:
        """Target 0 for every connected guest; wait (at most ``timeout`` s) until their
        balloons are empty. Returns the pages each guest still held at the end."""
        self.registry.deflating_all = True  # the control plane's steps cannot raise it again
        for name in sorted(set(self.names) | {c.guest for c in self.connections}):
            if name in self.registry.names():
                self.registry.set_target(name, 0)
        wait = 0.0 if self._deflate_skipped else timeout
        with trio.move_on_after(wait) as self._deflate_wait:
            while any(self._held().values()):
                await trio.sleep(0.05)
        return self._held()

    def _held(self) -> dict[str, int]:
        return {c.guest: c.device.size_pages() for c in self.connections if not c.closed}

    def stop_waiting(self) -> None:
        """End :meth:`deflate_all`'s wait now (a second SIGTERM/SIGINT during a final stop)."""
        self._deflate_skipped = True
        self._deflate_wait.cancel()

    async def final_stop(self, timeout: float) -> dict[str, int]:
        """A stop that strands no memory: deflate every guest (bounded, reported), then
        stop answering, remove everything from the fd store and close."""
        left = await self.deflate_all(timeout)
        for guest, pages in sorted(left.items()):
            if pages:
                waited = (
                    "not waiting (a second signal)"
                    if self._deflate_skipped
                    else f"after {timeout:.1f} s (--stop-timeout)"
                )
                log.warning("%s: %d pages still ballooned, %s", guest, pages, waited)
            else:
                log.info("%s: deflated", guest)
        if self.handover is not None:
            for name in self.names:
                self.handover.store.remove(f"listen.{name}")
        await self.shutdown()
        return left

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
        self._remove_sockets()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
