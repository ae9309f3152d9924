"""The listening sockets of ``vdev serve``: their names, their atomic creation, the accept loop.

One unix socket per guest (``--socket-path PATH``, or ``PATH0..PATH(N-1)`` with
``--socket-count N``, :func:`socket_paths`). :func:`listen` never lets the path exist bound
but not yet listening (a connect in between would be refused, and QEMU's
``-chardev socket,reconnect`` would give up a round): it binds a temporary name beside it
(:func:`listen_temp_path`), listens, then renames it onto the path. :func:`accept_loop`
hands every accepted socket to the server (:class:`vdev.server.Server`), which decides
whether it may be served.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import trio

log = logging.getLogger(__name__)


def socket_paths(path: str, count: int | None) -> list[str]:
    """``PATH`` alone, or ``PATH0..PATH(count-1)`` (rust-vmm's --socket-count)."""
    if count is None:
        return [path]
    return [f"{path}{i}" for i in range(count)]


def listen_temp_path(path: str) -> str:
    """The name a listener is bound to before it is renamed onto ``path`` (``.NAME~`` beside
    it). ``/proc/net/unix`` keeps the bound name, so ``path`` itself is never listed short
    of ``listen()`` (what ``conformance.backend.unix_listening`` checks)."""
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}~")


async def listen(path: str) -> trio.socket.SocketType:
    """A listener on ``path`` that never exists bound but not yet listening (a connect in
    between would be refused): bind a temporary name in the same directory, listen, then
    ``rename`` it onto ``path`` (atomic; it replaces a stale socket file there)."""
    p = Path(path)
    if p.exists() and not p.is_socket():
        raise OSError(errno.EADDRINUSE, "exists and is not a socket", path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = listen_temp_path(path)
    if len(os.fsencode(tmp)) >= 108:  # sun_path: no room for it
        tmp = ""  # bind the final name (a connect may race the listen)
    stale = Path(tmp or path)
    if stale.is_socket():
        stale.unlink()  # left by a vdev that is gone
    try:
        await sock.bind(tmp or path)
        sock.listen(8)
        if tmp:
            os.rename(tmp, path)
    except OSError:
        sock.close()
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    return sock


async def accept_loop(
    listener: trio.socket.SocketType,
    name: str,
    on_accept: Callable[[trio.socket.SocketType], None],
) -> None:
    """Accept on ``listener`` (guest ``name``) until it is closed; ``on_accept(sock)`` takes
    each new front-end socket (it must not block). Running out of fds or buffers is logged
    and retried after a pause; the listener is closed on the way out."""
    with listener:
        while True:
            try:
                sock, _ = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("%s: accept failed: %s", name, exc)
                    await trio.sleep(0.1)
                    continue
                raise
            on_accept(sock)
