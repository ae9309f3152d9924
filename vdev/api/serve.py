"""Serving the management API on a unix socket: a small HTTP/1.1 server on h11 (sans-I/O)
running the FastAPI app (:mod:`vdev.api.app`) in vdev's trio loop.

Why not a general ASGI server: nothing an API client does may reach a guest. This server
owns every failure of the HTTP layer and every bound the daemon needs
(docs/ARCHITECTURE.md "Management API", docs/SECURITY.md "API clients"):

* **Containment.** Each connection runs in its own guarded task: whatever it raises (a
  client vanishing mid-upload, a framing error, a bug) is logged and closes that connection
  only. The accept loop is supervised: if it fails it is restarted on the same listening
  socket. Nothing propagates into vdev's nursery, where the guests' connections live.
* **Bounds** (:class:`ApiLimits`, ``vdev serve --api-*`` and ``[serve] api_*``): request
  body size (413 from the ``Content-Length`` alone, the body is never read), header size
  (431), header and body read timeouts (408), a write timeout, concurrent connections (503
  beyond, the connection is closed at once so it holds no fd) and event subscribers (503).
  The soft ``RLIMIT_NOFILE`` is raised to the hard one at start and the connection cap is
  kept to at most a quarter of it, so API load cannot take the fds guests need.
* **Authorization** (:class:`Access`): the peer's credentials (``SO_PEERCRED``) decide;
  vdev's own uid and root may do everything, members of the read-only group
  (``--api-read-group``) may GET, anyone else gets 403, whatever the socket's mode.
* **One error shape.** Every answer this layer writes is ``{"error": "..."}`` JSON, like
  the app's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import socket
import stat
import struct
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h11
import trio

from protocol.errors import ConfigError
from vdev.api.app import PEER_SCOPE_KEY, create_app
from vdev.api.limits import ApiLimits
from vdev.policy.control import ControlPlane

log = logging.getLogger(__name__)

MAX_RECV = 1 << 16
#: Listen backlog: connections the kernel queues before the accept loop sees them.
BACKLOG = 128

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Asgi = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


# --------------------------------------------------------------------------------------------
# Who is calling


@dataclass
class Peer:
    """The process at the other end of an API connection (``SO_PEERCRED``, taken when the
    connection was made; groups and command line read from ``/proc/PID`` when needed)."""

    pid: int
    uid: int
    gid: int
    _cmdline: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, sock: socket.socket | trio.socket.SocketType) -> Peer:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return cls(pid, uid, gid)

    def groups(self) -> set[int]:
        """Primary and supplementary groups (``/proc/PID/status``; the primary one only if
        the process is gone)."""
        groups = {self.gid}
        with (
            contextlib.suppress(OSError, ValueError),
            open(f"/proc/{self.pid}/status", encoding="ascii", errors="replace") as f,
        ):
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
                    break
        return groups

    def cmdline(self) -> str:
        if self._cmdline is None:
            try:
                with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                    raw = f.read(4096)
                self._cmdline = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                self._cmdline = "?"
        return self._cmdline

    def describe(self) -> dict[str, Any]:
        return {"uid": self.uid, "gid": self.gid, "pid": self.pid, "cmdline": self.cmdline()}


@dataclass(frozen=True)
class Access:
    """Who may do what: ``owner_uid`` (vdev's) and root everything, members of ``read_gid``
    GET only, everyone else nothing."""

    owner_uid: int = field(default_factory=os.geteuid)
    read_gid: int | None = None

    def refusal(self, peer: Peer, method: str) -> str | None:
        """None if ``peer`` may send ``method``; else the 403 message."""
        if peer.uid in (0, self.owner_uid):
            return None
        who = f"uid {peer.uid} (pid {peer.pid})"
        writers = f"only uid {self.owner_uid} (vdev's) and root may"
        if self.read_gid is not None and self.read_gid in peer.groups():
            if method in ("GET", "HEAD"):
                return None
            return (
                f"{who} is in the read-only group {self.read_gid}: {method} refused; "
                f"{writers} change things"
            )
        readers = (
            f", members of group {self.read_gid} may read" if self.read_gid is not None else ""
        )
        return f"{who} may not use this API: {writers} use it{readers}"


# --------------------------------------------------------------------------------------------
# The socket


def default_api_socket(vhost_user_sockets: list[str]) -> str:
    """``<first vhost-user socket>.api`` (e.g. ``/run/vm0.sock`` -> ``/run/vm0.sock.api``)."""
    if not vhost_user_sockets:
        raise ConfigError("no vhost-user socket to put the API socket next to; give --api-socket")
    return str(vhost_user_sockets[0]) + ".api"


def check_socket_path(path: str) -> None:
    """ConfigError unless ``path`` is free or a stale socket (which is then removed).

    A live socket (someone accepts on it) or any other kind of file is an error rather than
    something we delete."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"API socket path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"API socket path {path}: {e.strerror}") from e
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        raise ConfigError(f"API socket {path} is in use by another process")
    finally:
        probe.close()


def bind_unix_socket(path: str, mode: int = 0o600, group: int | None = None) -> socket.socket:
    """A bound (not yet listening) unix stream socket at ``path`` with permissions ``mode``
    and, if given, group ``group`` (see :func:`check_socket_path` for what may already be
    there). Nobody can connect before the caller listens, so there is no window with looser
    permissions."""
    check_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)  # before listen(): nobody can connect yet
    except OSError as e:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise ConfigError(f"cannot bind API socket {path}: {e.strerror}") from e
    return sock


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as e:
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, target, e)
    return soft


# --------------------------------------------------------------------------------------------
# HTTP/1.1 on h11


class _Close(Exception):
    """End this connection (after whatever answer was already written)."""


def _json_error(status: int, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    return headers, body


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def canned_error(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 error response, for a connection we do not even parse."""
    headers, body = _json_error(status, message)
    head = b"HTTP/1.1 %d %s\r\n" % (status, _reason(status)) + b"".join(
        k + b": " + v + b"\r\n" for k, v in headers
    )
    return head + b"\r\n" + body


class ApiServer:
    """Accepts API connections and serves ``app`` on each, within ``limits`` and ``access``
    (None: no peer credentials to check, e.g. ``--metrics-address``'s TCP socket, whose app
    only reads)."""

    def __init__(self, app: Asgi, limits: ApiLimits, access: Access | None) -> None:
        self.app = app
        self.limits = limits
        self.access = access
        self.active = 0
        self.max_connections = limits.max_connections
        #: Connections refused for the cap, and connection tasks that failed (contained).
        self.refused = 0
        self.failed = 0

    # ---------------------------------------------------------------------- accepting

    async def serve(
        self, sock: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve on the listening ``sock`` until cancelled. The accept loop is restarted if
        it ever fails; connections are contained one by one (:meth:`_guarded`)."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with trio.open_nursery() as connections:
            task_status.started()
            while True:
                try:
                    await self._accept_loop(listener, connections)
                except Exception:
                    log.exception("API accept loop failed; restarting it in 1 s")
                    await trio.sleep(1.0)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("API accept: %s; pausing 0.1 s", e.strerror)
                    await trio.sleep(0.1)
                    continue
                raise
            if self.active >= self.max_connections:
                self.refused += 1
                await self._refuse(stream)
                continue
            self.active += 1
            nursery.start_soon(self._guarded, stream)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """503 and close at once: a connection over the cap holds no fd."""
        try:
            with trio.move_on_after(0.05):
                await stream.send_all(
                    canned_error(
                        503,
                        f"too many API connections ({self.max_connections}, "
                        "--api-max-connections); try again later",
                    )
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await self._close(stream)

    async def _guarded(self, stream: trio.SocketStream) -> None:
        try:
            peer = Peer.of(stream.socket) if self.access is not None else None
            await self._connection(stream, peer)
        except _Close:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass  # the client went away or would not read
        except Exception:
            self.failed += 1
            log.warning("API connection failed (contained; vdev goes on)", exc_info=True)
        finally:
            self.active -= 1
            await self._close(stream)

    @staticmethod
    async def _close(stream: trio.SocketStream) -> None:
        with contextlib.suppress(Exception), trio.CancelScope(shield=True):
            await stream.aclose()

    # ---------------------------------------------------------------------- one connection

    async def _send(self, stream: trio.SocketStream, data: bytes) -> None:
        if data:
            with trio.fail_after(self.limits.write_timeout):
                await stream.send_all(data)

    async def _error(
        self, stream: trio.SocketStream, conn: h11.Connection, status: int, message: str
    ) -> None:
        """Write an error answer and end the connection."""
        headers, body = _json_error(status, message)
        try:
            data = conn.send(
                h11.Response(status_code=status, headers=headers, reason=_reason(status))
            )
            data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                raise _Close() from None  # mid-response: nothing sane to add
            data = canned_error(status, message)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._send(stream, data)
        raise _Close()

    async def _next_event(
        self, stream: trio.SocketStream, conn: h11.Connection, first: bool
    ) -> h11.Request | None:
        """The next request head (None: the client closed cleanly between requests)."""
        limits = self.limits
        deadline = trio.current_time() + (limits.header_timeout if first else limits.idle_timeout)
        started = first
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint
                if status == 431 or "exceeds" in str(e) or "maximum" in str(e):
                    await self._error(
                        stream,
                        conn,
                        431,
                        f"request line and headers larger than {limits.max_header_bytes} bytes "
                        "(--api-max-header-bytes)",
                    )
                await self._error(stream, conn, status, f"bad HTTP request: {e}")
            if isinstance(event, h11.Request):
                return event
            if isinstance(event, h11.ConnectionClosed):
                return None
            if event is not h11.NEED_DATA:
                raise _Close()  # PAUSED or anything unexpected between requests
            with trio.move_on_at(deadline) as timer:
                data = await stream.receive_some(MAX_RECV)
            if timer.cancelled_caught:
                if not started and not conn.trailing_data[0]:
                    raise _Close()  # an idle kept-alive connection: just close it
                await self._error(
                    stream,
                    conn,
                    408,
                    f"request headers not received within {limits.header_timeout} s "
                    "(--api-header-timeout)",
                )
            if data and not started:
                started = True
                deadline = trio.current_time() + limits.header_timeout
            conn.receive_data(data)

    async def _read_body(
        self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request
    ) -> bytes:
        limits = self.limits
        length = None
        for name, value in request.headers:
            if name == b"content-length":
                length = int(value)  # h11 checked it is digits
        if length is not None and length > limits.max_body_bytes:
            await self._error(
                stream,
                conn,
                413,
                f"request body of {length} bytes is larger than {limits.max_body_bytes} bytes "
                "(--api-max-body-bytes)",
            )
        if conn.they_are_waiting_for_100_continue:  # curl -d with more than 1 KiB
            await self._send(
                stream, conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
            )
        body = bytearray()
        with trio.move_on_after(limits.body_timeout) as timer:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as e:
                    await self._error(stream, conn, e.error_status_hint, f"bad HTTP request: {e}")
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limits.max_body_bytes:  # chunked: counted as it comes
                        await self._error(
                            stream,
                            conn,
                            413,
                            f"request body larger than {limits.max_body_bytes} bytes "
                            "(--api-max-body-bytes)",
                        )
                elif isinstance(event, h11.EndOfMessage):
                    return bytes(body)
                elif event is h11.NEED_DATA:
                    data = await stream.receive_some(MAX_RECV)
                    conn.receive_data(data)
                    if not data:
                        raise _Close()  # the client gave up mid-body (the aborted upload)
                else:
                    raise _Close()
        assert timer.cancelled_caught
        await self._error(
            stream,
            conn,
            408,
            f"request body not received within {limits.body_timeout} s (--api-body-timeout)",
        )
        raise AssertionError("unreachable")

    async def _connection(self, stream: trio.SocketStream, peer: Peer | None) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        first = True
        while True:
            request = await self._next_event(stream, conn, first)
            if request is None:
                return
            first = False
            head = len(request.method) + len(request.target) + 12
            head += sum(len(k) + len(v) + 4 for k, v in request.headers)
            if head > self.limits.max_header_bytes:
                await self._error(
                    stream,
                    conn,
                    431,
                    f"request line and headers of {head} bytes are larger than "
                    f"{self.limits.max_header_bytes} bytes (--api-max-header-bytes)",
                )
            method = request.method.decode("ascii", "replace")
            refusal = (
                None if peer is None or self.access is None else self.access.refusal(peer, method)
            )
            if refusal is not None:
                log.warning("API: refused %s %r: %s", method, request.target, refusal)
                await self._error(stream, conn, 403, refusal)
            body = await self._read_body(stream, conn, request)
            await self._run_app(stream, conn, request, body, peer)
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                return

    async def _run_app(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        request: h11.Request,
        body: bytes,
        peer: Peer | None,
    ) -> None:
        target = request.target
        if not target.startswith(b"/"):  # absolute form: take its path
            target = urllib.parse.urlsplit(target).path or b"/"
            target = target if target.startswith(b"/") else b"/" + target
        raw_path, _, query = target.partition(b"?")
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode("ascii", "replace"),
            "method": request.method.decode("ascii", "replace").upper(),
            "scheme": "http",
            "path": urllib.parse.unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": [(k.lower(), v) for k, v in request.headers],
            "client": None,
            "server": None,
            "state": {},
            PEER_SCOPE_KEY: peer,
        }
        disconnected = trio.Event()
        delivered = False
        started: list[Message] = []
        done = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        broken = False  # a write failed: drop the rest
        #: the response head, held until the first body message so that both go out in one
        #: write: one wake-up of the client instead of two (each costs ~0.3 ms here: the
        #: woken client preempts us), and no half answer for it to parse
        head = b""

        async def send(message: Message) -> None:
            # a client that went away (or would not read) ends its connection quietly: its
            # writes are dropped and the app sees http.disconnect, so an event stream stops.
            # A client that only half-closed (EOF after its request) still reads its answer.
            nonlocal broken
            if broken:
                return
            try:
                await write(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                broken = True
                disconnected.set()

        async def write(message: Message) -> None:
            nonlocal done, head
            kind = message["type"]
            if kind == "http.response.start":
                started.append(message)
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
                response = h11.Response(
                    status_code=message["status"],
                    headers=headers,
                    reason=_reason(message["status"]),
                )
                head = conn.send(response) or b""
            elif kind == "http.response.body":
                chunk = bytes(message.get("body", b""))
                data = conn.send(h11.Data(data=chunk)) if chunk else b""
                if not message.get("more_body", False):
                    data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
                    done = True
                data, head = head + (data or b""), b""
                await self._send(stream, data)

        async def watch() -> None:
            # while the app runs (an event stream may run for hours), notice the client
            # leaving; bytes it sends meanwhile (a pipelined request) wait in h11's buffer
            while True:
                data = await stream.receive_some(MAX_RECV)
                if not data:
                    disconnected.set()
                    return
                conn.receive_data(data)
                if len(conn.trailing_data[0]) > self.limits.max_header_bytes:
                    # pipelined more than a request head: stop reading (the kernel holds
                    # the rest); this answer is still written whole, the next request
                    # then gets its 431
                    return

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                try:
                    await self.app(scope, receive, send)
                finally:
                    nursery.cancel_scope.cancel()
        except Exception as e:
            if started or isinstance(e, trio.TooSlowError | OSError | trio.BrokenResourceError):
                raise _Close() from e
            log.exception("API: %s %r failed", scope["method"], scope["path"])
            await self._error(stream, conn, 500, f"internal error: {type(e).__name__}")
        if not done:
            raise _Close()
        if disconnected.is_set():
            raise _Close()


# --------------------------------------------------------------------------------------------
# vdev serve's API task


async def serve_api(
    control: ControlPlane,
    path: str,
    *,
    mode: int = 0o600,
    limits: ApiLimits | None = None,
    read_group: int | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API on ``path`` until cancelled; the socket file is removed on the way out.

    ``read_group``: the gid whose members may read (the socket gets that group; a mode of
    0600 becomes 0660 so that they can connect)."""
    limits = limits or ApiLimits()
    limits.check()
    # the audit trail is written whatever the verbosity (vdev serve -v or not)
    logging.getLogger("vdev.audit").setLevel(logging.INFO)
    nofile = raise_nofile_limit()
    if read_group is not None and mode & 0o060 == 0:
        mode |= 0o060
    sock = bind_unix_socket(path, mode, read_group)
    inode = os.stat(path).st_ino
    try:
        sock.listen(BACKLOG)
        server = ApiServer(
            create_app(control, max_subscribers=limits.max_subscribers),
            limits,
            Access(read_gid=read_group),
        )
        # API connections may never hold more than a quarter of the fds: the rest are the
        # guests' (memory regions, eventfds, sockets)
        server.max_connections = max(1, min(limits.max_connections, nofile // 4))
        if server.max_connections < limits.max_connections:
            log.warning(
                "API: at most %d connections (a quarter of RLIMIT_NOFILE %d), not %d",
                server.max_connections,
                nofile,
                limits.max_connections,
            )
        log.info(
            "management API on %s (mode %04o%s, at most %d connections)",
            path,
            mode,
            f", read-only group {read_group}" if read_group is not None else "",
            server.max_connections,
        )
        task_status.started(path)
        await server.serve(sock)
    finally:
        sock.close()
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except OSError:
            pass
