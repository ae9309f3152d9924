"""The listening sockets of ``vdev serve``: their names, their atomic creation, the accept loop.

One unix socket per guest (``--socket-path PATH``, or ``PATH0..PATH(N-1)`` with
``--socket-count N``, :func:`socket_paths`). :func:`listen` never lets the path exist bound
but not yet listening (a connect in between would be refused, and QEMU's
``-chardev socket,reconnect`` would give up a round): it binds a temporary name beside it,
listens, then renames it onto the path; the path is claimed first and the file removed only
if still ours (:mod:`vdev.socket_files`). :func:`accept_loop`
hands every accepted socket to the server (:class:`vdev.server.Server`), which decides
whether it may be served.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import trio

from vdev import socket_files

log = logging.getLogger(__name__)


def socket_paths(path: str, count: int | None) -> list[str]:
    """``PATH`` alone, or ``PATH0..PATH(count-1)`` (rust-vmm's --socket-count)."""
    if count is None:
        return [path]
    return [f"{path}{i}" for i in range(count)]


async def listen(
    path: str, *, mode: int = 0o600, gid: int | None = None
) -> tuple[trio.socket.SocketType, socket_files.Owned]:
    """A listener on ``path``, claimed for this process, with its mode (and group) set,
    that never exists bound but not yet listening (a connect in between would be refused):
    :func:`vdev.socket_files.own_listener` binds a unique temporary name beside it, listens,
    then renames it onto ``path``. The second value removes the file (only if still ours)
    and releases the path."""
    owned = socket_files.own_listener(path, mode=mode, gid=gid, what="vhost-user socket")
    return trio.socket.from_stdlib_socket(owned.listener.sock), owned


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
