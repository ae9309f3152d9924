"""The socket files ``vdev serve`` listens on, and nothing else: claim, bind, remove.

* **Claim** (:func:`claim`): a path is owned by the process holding an exclusive ``flock`` on
  ``PATH.lock`` beside it (the file holds ``vdev pid N``). A second vdev on the same path
  finds the lock held and is refused, naming the owner's pid; the first keeps serving. After
  taking the lock, a connect probe refuses a path some other program listens on. A socket
  left at the path by a vdev that is gone (connect refused) is stale and gets replaced. A lock
  is taken once per process (:class:`Claim` is reference-counted, so the command line can claim
  every path before starting and the listeners claim them again).
* **Bind** (:func:`bind_listener`): bound to a temporary name unique to this bind
  (``.NAME~XXXXXXXX`` beside the path, created by the bind itself, so no foreign file of that
  name is ever touched), given its mode (and group) explicitly while nobody can connect yet
  (umask has no say: 0600 by default, 0660 with a group for QEMU running as another user),
  listening, then renamed onto the path. The listener's ``(st_dev, st_ino)`` is recorded.
* **Remove** (:meth:`Listener.remove`): only a file that is still the one we bound (same
  device and inode, kept allocated by a duplicate fd of the socket until then) is unlinked:
  never one another process put at the path since. The lock
  file is removed by its last owner while it holds the lock (a competitor that opened the
  old file sees the inode change and retries), and only when it is a vdev lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import socket
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.errors import ConfigError

__all__ = [
    "SUN_PATH_MAX",
    "Claim",
    "Listener",
    "Owned",
    "adopt_listener",
    "bind_listener",
    "check_socket_path_length",
    "claim",
    "claim_all",
    "lock_path",
    "own_listener",
    "same_path",
    "unlink_if_ours",
]

#: ``sizeof(sun_path) - 1``: the longest path a unix socket can be bound to (Linux).
SUN_PATH_MAX = 107
_LOCK_MAGIC = b"vdev pid "
_held: dict[str, Claim] = {}


def lock_path(path: str) -> str:
    return f"{path}.lock"


def _key(path: str) -> str:
    head, name = os.path.split(os.path.abspath(path))
    with contextlib.suppress(OSError):
        head = os.path.realpath(head)
    return os.path.join(head, name)


def same_path(a: str, b: str) -> bool:
    """Whether two socket paths name the same file (through ``..``, symlinked directories)."""
    return _key(a) == _key(b)


def check_socket_path_length(path: str, what: str = "socket path") -> None:
    """ConfigError for an empty path or one too long for ``sun_path``."""
    if not path:
        raise ConfigError(f"{what}: empty path")
    n = len(os.fsencode(path))
    if n > SUN_PATH_MAX:
        raise ConfigError(
            f"{what}: {path} is {n} bytes long; a unix socket path has at most {SUN_PATH_MAX}"
        )


class Claim:
    """This process's exclusive hold on one socket path (see the module docstring)."""

    def __init__(self, path: str, fd: int, created: bool) -> None:
        self.path = path
        self._fd = fd
        self._ours = created  # a vdev lock file: removed when released
        self._refs = 1

    def release(self) -> None:
        self._refs -= 1
        if self._refs > 0 or self._fd < 0:
            return
        _held.pop(_key(self.path), None)
        lock = lock_path(self.path)
        try:
            if self._ours:
                with contextlib.suppress(OSError):
                    st, mine = os.lstat(lock), os.fstat(self._fd)
                    if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                        os.unlink(lock)  # still holding the lock: nobody else owns it
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _refuse(path: str, why: str) -> ConfigError:
    return ConfigError(f"{path}: {why}")


def _open_lock(path: str) -> tuple[int, bool]:
    lock = lock_path(path)
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        return os.open(lock, flags | os.O_CREAT | os.O_EXCL, 0o600), True
    except FileExistsError:
        pass
    except OSError as e:
        raise _refuse(path, f"cannot create the lock file {lock}: {e.strerror}") from None
    try:
        fd = os.open(lock, flags)
    except OSError as e:
        raise _refuse(path, f"cannot open the lock file {lock}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refuse(path, f"{lock} exists and is not a regular file")
    return fd, False


def _owner(fd: int) -> str:
    """`` (pid N)`` from a held lock file (its owner writes it right after locking: a
    moment's wait covers a vdev that is starting at the same time)."""
    for _ in range(20):
        with contextlib.suppress(OSError):
            text = os.pread(fd, 64, 0)
            if text.startswith(_LOCK_MAGIC) and text.endswith(b"\n"):
                return f" (pid {text[len(_LOCK_MAGIC) :].strip().decode(errors='replace')})"
            if text and not (text.startswith(_LOCK_MAGIC) or _LOCK_MAGIC.startswith(text)):
                return ""  # not a vdev lock file
        time.sleep(0.005)
    return ""


def claim(path: str, what: str = "socket", *, probe: bool = True) -> Claim:
    """Hold ``path`` for this process (again, if it already does); ConfigError when another
    vdev holds it, another program listens on it, or something other than a stale socket is
    there."""
    check_socket_path_length(path, what)
    head = os.path.dirname(path) or "."
    if not os.path.isdir(head):
        raise _refuse(path, f"the directory {head} does not exist")
    held = _held.get(_key(path))
    if held is not None:
        held._refs += 1
        return held
    for _ in range(10):
        fd, created = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = _owner(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise _refuse(path, f"in use by a running vdev{owner}") from None
            raise _refuse(path, f"cannot lock {lock_path(path)}: {e.strerror}") from None
        try:
            st, mine = os.lstat(lock_path(path)), os.fstat(fd)
            current = (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
        except OSError:
            current = False
        if not current:  # its owner removed it between our open and our lock: again
            os.close(fd)
            continue
        break
    else:
        raise _refuse(path, "the lock file keeps changing: another vdev is starting here")
    content = os.pread(fd, 64, 0)
    ours = created or content == b"" or content.startswith(_LOCK_MAGIC)
    if ours:  # never write into a file that is not a vdev lock file
        os.ftruncate(fd, 0)
        os.pwrite(fd, _LOCK_MAGIC + f"{os.getpid()}\n".encode(), 0)
    c = Claim(path, fd, ours)
    try:
        _check_free(path, what, probe)
    except BaseException:
        c.release()
        raise
    _held[_key(path)] = c
    return c


def _check_free(path: str, what: str, probe: bool = True) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise _refuse(path, f"exists and is not a socket (given as {what}; not replaced)")
    if not probe:  # a hand-over: the socket there is a previous vdev's, still listening
        return
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise _refuse(path, f"cannot probe the socket there: {e.strerror}") from None
        return  # stale: left by a process that is gone
    finally:
        conn.close()
    raise _refuse(path, "another program is listening on it")


@dataclass
class Listener:
    """A listening socket at ``path`` and the identity of the file we bound there.

    ``keep`` is a duplicate of the socket's fd, held until :meth:`remove`: while any fd of the
    bound socket is open its file's inode stays allocated, so the identity cannot be reused
    by a file someone else puts at the path after ``sock`` is closed."""

    sock: socket.socket
    path: str
    ident: tuple[int, int]
    keep: int = -1

    def remove(self) -> bool:
        """Unlink the path if it is still the file we bound; then let go of the socket."""
        try:
            return unlink_if_ours(self.path, self.ident)
        finally:
            if self.keep >= 0:
                os.close(self.keep)
                self.keep = -1


def bind_listener(
    path: str, *, mode: int = 0o600, gid: int | None = None, backlog: int = 8
) -> Listener:
    """A listening unix socket at ``path`` (claimed by the caller) with exactly ``mode``
    (and group ``gid``), without a moment where it exists bound but not listening."""
    head, name = os.path.split(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = ""
    try:
        for _ in range(16):
            tmp = os.path.join(head, f".{name}~{secrets.token_hex(4)}")
            if len(os.fsencode(tmp)) > SUN_PATH_MAX:
                tmp = ""  # no room for it: bind the final name (a connect may race listen)
            try:
                sock.bind(tmp or path)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE or not tmp:
                    raise
        else:
            raise OSError(errno.EADDRINUSE, "no free temporary name", path)
        bound = tmp or path
        os.chmod(bound, mode)  # before listen(): nobody can connect yet
        if gid is not None:
            os.chown(bound, -1, gid)
        sock.listen(backlog)
        if tmp:
            os.rename(tmp, path)
        st = os.lstat(path)
    except OSError:
        sock.close()
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # the name our bind created
        raise
    return Listener(sock, path, (st.st_dev, st.st_ino), os.dup(sock.fileno()))


def unlink_if_ours(path: str, ident: tuple[int, int]) -> bool:
    """Unlink ``path`` only if it is still the file identified by ``ident``."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) != ident:
            return False
        os.unlink(path)
    except OSError:
        return False
    return True


def claim_all(
    paths: Sequence[str], what: str = "socket", *, probe: bool = True
) -> contextlib.ExitStack:
    """:func:`claim` every path, or none (ConfigError)."""
    stack = contextlib.ExitStack()
    try:
        for p in paths:
            stack.enter_context(claim(p, what, probe=probe))
    except BaseException:
        stack.close()
        raise
    return stack


@dataclass
class Owned:
    """A listener at a path this process claimed: :meth:`remove` undoes both."""

    listener: Listener
    claim: Claim | None

    def remove(self) -> None:
        try:
            self.listener.remove()
        finally:
            self.release()

    def release(self) -> None:
        """Let go of the path but leave the file (a hand-over: the next vdev takes it)."""
        if self.listener.keep >= 0:
            os.close(self.listener.keep)
            self.listener.keep = -1
        if self.claim is not None:
            self.claim.release()
            self.claim = None


def adopt_listener(sock: socket.socket, path: str) -> Owned:
    """A listening socket handed over by a previous vdev (the fd store): its file at
    ``path`` is recorded as ours now (the claim is this process's command line's)."""
    st = os.lstat(path)
    return Owned(Listener(sock, path, (st.st_dev, st.st_ino), os.dup(sock.fileno())), None)


def own_listener(
    path: str, *, mode: int = 0o600, gid: int | None = None, what: str = "socket"
) -> Owned:
    """:func:`claim` ``path``, then :func:`bind_listener` on it (the claim is released if
    that fails)."""
    c = claim(path, what)
    try:
        return Owned(bind_listener(path, mode=mode, gid=gid), c)
    except BaseException:
        c.release()
        raise
