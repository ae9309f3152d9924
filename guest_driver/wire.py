"""The front-end's wire: one vhost-user connection's bytes, for every front-end we have.

* :func:`connect_unix`: a connected AF_UNIX stream socket;
* :class:`WireChannel`: send bytes with fds attached (SCM_RIGHTS), receive exactly ``n``
  bytes (collecting fds that came with them), receive one whole message, tell whether the
  back-end hung up. The back-end hanging up is :class:`~protocol.errors.BackendHungUp`,
  whatever the socket said (EOF, reset, broken pipe);
* :func:`connect_retrying`: connect and run a first exchange, retrying while the back-end
  refuses us (nothing listens yet, or it hangs up on the first message because it serves
  one front-end per socket and has not yet noticed the previous one leave).

The well-behaved front-end (:mod:`guest_driver.frontend`) and the conformance harness's
deliberately low-level one (:mod:`conformance.rawfrontend`) both speak through it; what
goes into the bytes is theirs.
"""

from __future__ import annotations

import array
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import trio

from protocol import vhost_user as vu
from protocol.errors import BackendError, BackendHungUp

T = TypeVar("T")

#: What a back-end not (yet) taking us looks like: nothing listens, or a hang-up on accept.
REFUSED: tuple[type[BaseException], ...] = (
    BackendHungUp, FileNotFoundError, ConnectionRefusedError, BrokenPipeError, ConnectionResetError,
)  # fmt: skip
#: Pause between connection attempts in :func:`connect_retrying`.
RETRY_PAUSE = 0.02


async def connect_unix(path: str) -> trio.socket.SocketType:
    """A connected AF_UNIX stream socket (closed again if connecting fails). An ``OSError``
    from connecting carries ``path`` as its ``filename``."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except OSError as exc:
        sock.close()
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, path) from None
        raise
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class Message:
    """One message as received: the header's fields, the payload, the fds that came along."""

    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()


class WireChannel:
    """One vhost-user connection (a connected unix stream socket). ``on_hangup`` is called
    when a read or write finds the back-end gone, before :class:`BackendHungUp` is raised."""

    def __init__(
        self, sock: trio.socket.SocketType, *, on_hangup: Callable[[], None] | None = None
    ) -> None:
        self.sock = sock
        self.closed = False
        self.on_hangup = on_hangup

    @classmethod
    async def connect(cls, path: str) -> WireChannel:
        return cls(await connect_unix(path))

    def close(self) -> None:
        self.closed = True
        self.sock.close()

    def _hung_up(self, why: str) -> BackendHungUp:
        if self.on_hangup is not None:
            self.on_hangup()
        return BackendHungUp(why)

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``data`` whole, ``fds`` attached to its first byte (no checks at all)."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            sent = await self.sock.sendmsg([data], anc if fds else [])
            view = memoryview(data)[sent:]
            while view:
                view = view[await self.sock.send(view) :]
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise self._hung_up(f"back-end closed the connection: {exc}") from None

    async def recv_exact(self, n: int, fds: list[int] | None = None) -> bytes:
        """Exactly ``n`` bytes. With ``fds``, the fds that arrive with them are appended to
        it (they come with the first byte of a message)."""
        buf = bytearray()
        while len(buf) < n:
            try:
                if fds is not None:
                    data, anc, _flags, _ = await self.sock.recvmsg(
                        n - len(buf), socket.CMSG_SPACE(vu.MAX_FDS * 4)
                    )
                    for level, kind, cdata in anc:
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                            arr = array.array("i")
                            arr.frombytes(cdata[: len(cdata) - len(cdata) % 4])
                            fds.extend(arr)
                else:
                    data = await self.sock.recv(n - len(buf))
            except ConnectionResetError:
                data = b""
            if not data:
                raise self._hung_up(f"back-end closed the connection ({len(buf)}/{n} bytes read)")
            buf += data
        return bytes(buf)

    async def recv_message(self, max_size: int = 1 << 20) -> Message:
        """One message: the header (and any fds), then the payload it announces. A header
        announcing more than ``max_size`` bytes raises :class:`~protocol.errors.BackendError`
        (:class:`~protocol.errors.FormatError` if the header does not parse)."""
        fds: list[int] = []
        header = vu.parse_header(await self.recv_exact(vu.HEADER_SIZE, fds))
        if header.size > max_size:
            raise BackendError(f"reply claims a {header.size}-byte payload")
        payload = await self.recv_exact(header.size) if header.size else b""
        return Message(header.request, header.flags, payload, tuple(fds))

    async def is_closed(self, wait: float = 0.3) -> bool:
        """Whether the back-end hung up (EOF within ``wait`` seconds); data counts as open."""
        with trio.move_on_after(wait):
            try:
                data = await self.sock.recv(1, socket.MSG_PEEK)
            except (ConnectionResetError, BrokenPipeError):
                return True
            return not data
        return False


async def connect_retrying(
    path: str,
    first: Callable[[WireChannel], Awaitable[T]],
    *,
    retry: float = 0.0,
    refused: tuple[type[BaseException], ...] = REFUSED,
) -> T:
    """Connect to ``path`` and run ``first`` on the channel (the first exchange, or just
    wrapping it); its result. While that raises one of ``refused`` the channel is closed and
    it is tried again, for ``retry`` seconds; any other failure closes the channel and
    propagates. ``first`` owns the channel once it returns."""
    deadline = trio.current_time() + retry
    while True:
        chan: WireChannel | None = None
        try:
            chan = await WireChannel.connect(path)
            return await first(chan)
        except BaseException as exc:
            if chan is not None:
                chan.close()
            if not isinstance(exc, refused) or trio.current_time() >= deadline:
                raise
        await trio.sleep(RETRY_PAUSE)
