"""The systemd notification protocol and file-descriptor store, client side (no libsystemd).

* :func:`notify` sends one datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET`` (a path, or
  ``@name`` for the abstract namespace), with fds attached as ``SCM_RIGHTS``. Without
  ``$NOTIFY_SOCKET`` it does nothing and returns False (vdev runs unmanaged).
* :class:`FdStore` names what it stores: ``store(name, fd)`` is ``FDSTORE=1`` +
  ``FDNAME=name``; ``remove(name)`` is ``FDSTOREREMOVE=1`` + ``FDNAME=name``. One name per
  message (systemd applies one name to every fd of a message).
* :func:`listen_fds` reads ``LISTEN_FDS`` / ``LISTEN_PID`` / ``LISTEN_FDNAMES`` (the fds
  start at 3) into ``{name: [fd, ...]}``, marks them close-on-exec and unsets the variables.
  In a standby of ``vdev supervise --standby`` (``$VBALLOON_STANDBY_FD``) it first says
  ``WARM`` and blocks until the supervisor hands it the store (:func:`standby_fds`).

The same protocol is served by systemd (``Type=notify``, ``FileDescriptorStoreMax=``) and by
``vdev supervise`` (:mod:`vdev.supervise`) where no systemd manages vdev.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import logging
import os
import re
import socket
from collections.abc import Iterable, Mapping

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
#: systemd's rules for FDNAME: printable ASCII, no ':', at most 255 characters.
_FDNAME = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,255}$")
#: The kernel's limit of fds in one AF_UNIX message.
MAX_FDS_PER_MESSAGE = 253
#: ``vdev supervise --standby``: the standby's end of its ``SOCK_SEQPACKET`` pair. The standby
#: sends ``WARM`` when it waits; the supervisor sends ``FDNAMES=a:b`` messages with the fds
#: (``SCM_RIGHTS``, at most :data:`MAX_FDS_PER_MESSAGE` each), then ``GO``; end of file
#: instead means "not needed": the standby exits (:class:`StandbyDismissed`).
STANDBY_ENV = "VBALLOON_STANDBY_FD"
STANDBY_WARM = b"WARM"
STANDBY_GO = b"GO"
STANDBY_FDS_PER_MESSAGE = MAX_FDS_PER_MESSAGE


class StandbyDismissed(Exception):
    """A standby's supervisor closed its socket without handing it the store: exit (0)."""


F_DUPFD_QUERY = 1027  # Linux 6.10
_SYS_KCMP = 312  # x86_64
_KCMP_FILE = 0


def same_open_file(a: int, b: int) -> bool:
    """``a`` and ``b`` share one open file description (what systemd's fd store compares
    to drop a duplicate: ``F_DUPFD_QUERY``, else ``kcmp(KCMP_FILE)``). Two eventfds, or
    two memfds, are *not* the same even though they share an inode."""
    if a == b:
        return True
    try:
        return fcntl.fcntl(a, F_DUPFD_QUERY, b) == 1
    except OSError:
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pid = os.getpid()
        return int(libc.syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, a, b)) == 0
    except (OSError, AttributeError):
        return False


def valid_fdname(name: str) -> bool:
    return bool(_FDNAME.match(name))


def notify_address(value: str | None = None) -> str | bytes | None:
    """The socket address ``$NOTIFY_SOCKET`` names (None when unset or unsupported)."""
    value = os.environ.get("NOTIFY_SOCKET") if value is None else value
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%s: only unix socket addresses are supported", value)
    return None


def notify(
    assignments: Mapping[str, str | int] | str,
    fds: Iterable[int] = (),
    *,
    address: str | bytes | None = None,
) -> bool:
    """Send one notification; True when it was sent (a manager is listening)."""
    addr = address if address is not None else notify_address()
    if addr is None:
        return False
    if isinstance(assignments, str):
        payload = assignments
    else:
        payload = "".join(f"{k}={v}\n" for k, v in assignments.items())
    fd_list = list(fds)
    if len(fd_list) > MAX_FDS_PER_MESSAGE:
        raise ValueError(f"at most {MAX_FDS_PER_MESSAGE} fds per notification")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        if fd_list:
            socket.send_fds(s, [payload.encode()], fd_list)
        else:
            s.sendall(payload.encode())
    return True


class FdStore:
    """Named entries in the manager's fd store (all no-ops when unmanaged).

    A manager that stops answering (``vdev supervise`` killed: its notify socket is gone,
    and its store with it) is logged once; from then on every call is a no-op and
    :attr:`lost` is True, so that a stop deflates the guests instead of handing them over
    to nobody, and a notification never fails a connection or the watchdog."""

    def __init__(self, address: str | bytes | None = None) -> None:
        self.address = address if address is not None else notify_address()
        #: the manager stopped answering (see the class docstring)
        self.lost = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _notify(self, fields: Mapping[str, str | int], fds: Iterable[int] = ()) -> bool:
        if self.address is None or self.lost:
            return False
        try:
            return notify(fields, fds, address=self.address)
        except OSError as exc:
            self.lost = True
            log.warning(
                "the manager's notify socket %s does not answer (%s): its fd store is gone; "
                "nothing this vdev holds survives its restart now, and a stop deflates the "
                "guests",
                self.address, exc.strerror or exc,
            )  # fmt: skip
            return False

    def store(self, name: str, fd: int, *, poll: bool = True) -> None:
        if not valid_fdname(name):
            raise ValueError(f"invalid fd store name {name!r}")
        fields: dict[str, str | int] = {"FDSTORE": 1, "FDNAME": name}
        if not poll:
            fields["FDPOLL"] = 0
        self._notify(fields, [fd])

    def remove(self, name: str) -> None:
        if valid_fdname(name):
            self._notify({"FDSTOREREMOVE": 1, "FDNAME": name})

    def send(self, assignments: Mapping[str, str | int]) -> bool:
        """True when the manager took it (False: unmanaged, or the manager is gone)."""
        return self._notify(assignments)


def listen_fds(
    environ: dict[str, str] | None = None, *, unset: bool = True
) -> dict[str, list[int]]:
    """The fds passed by the manager, by name (several fds may share one name)."""
    env = os.environ if environ is None else environ
    try:
        count = int(env.get("LISTEN_FDS", "0"))
        pid = int(env.get("LISTEN_PID", "0"))
    except ValueError:
        count = pid = 0
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if unset:
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_PIDFDID"):
            env.pop(key, None)
    standby = env.pop(STANDBY_ENV, None)
    if standby is not None:
        return standby_fds(int(standby))
    if count <= 0 or pid != os.getpid():
        return {}
    out: dict[str, list[int]] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) else "unknown"
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue
        out.setdefault(name, []).append(fd)
    return out


def is_standby(environ: Mapping[str, str] | None = None) -> bool:
    """This process is a standby of ``vdev supervise --standby`` (not serving yet)."""
    return STANDBY_ENV in (os.environ if environ is None else environ)


def standby_fds(fd: int) -> dict[str, list[int]]:
    """A standby (``vdev supervise --standby``): say ``WARM`` on ``fd``, block until the
    supervisor hands over the store, then the store as :func:`listen_fds` returns it. Raises
    :class:`StandbyDismissed` when the supervisor closes the socket instead."""
    out: dict[str, list[int]] = {}
    space = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)
    with socket.socket(fileno=fd) as sock:
        os.set_inheritable(fd, False)
        try:
            sock.send(STANDBY_WARM)
        except OSError:
            raise StandbyDismissed from None
        while True:
            data, anc, _flags, _ = sock.recvmsg(4096, space, socket.MSG_CMSG_CLOEXEC)
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
            if not data and not fds:
                raise StandbyDismissed
            if data == STANDBY_GO:
                return out
            names = data.decode("ascii", "replace").removeprefix("FDNAMES=").split(":")
            for i, received in enumerate(fds):
                out.setdefault(names[i] if i < len(names) else "unknown", []).append(received)
