"""``vdev supervise``: a stand-in for systemd's notify socket and fd store, for tests, CI and
containers where no systemd manages vdev.

It implements only what a ``Type=notify`` / ``Restart=always`` / ``FileDescriptorStoreMax=``
service needs, the way systemd does it (docs/ARCHITECTURE.md, "Hand-over"):

* a ``SOCK_DGRAM`` notify socket (``$NOTIFY_SOCKET`` for the child); each datagram is
  ``KEY=VALUE`` lines plus ``SCM_RIGHTS`` fds. Honoured: ``FDSTORE=1`` (+ ``FDNAME=``,
  ``FDPOLL=0``), ``FDSTOREREMOVE=1`` + ``FDNAME=``, ``READY=1``, ``STOPPING=1``,
  ``WATCHDOG=1``, ``STATUS=``. Fds on any other message are closed, as systemd does;
* stored fds are kept (at most ``--max-fds``), duplicates of one open file description
  dropped, and a stored fd that reports ``POLLHUP``/``POLLERR`` (a front-end that went away)
  closed and dropped unless it was stored with ``FDPOLL=0``;
* the child is started with the store at fds 3.. and ``LISTEN_FDS``/``LISTEN_PID``/
  ``LISTEN_FDNAMES``, and restarted whenever it exits (``--restart-delay``), ``Restart=always``
  style; ``SIGHUP`` restarts it on purpose (SIGTERM, then the restart); ``SIGTERM``/``SIGINT``
  stop it and the supervisor, releasing the store. A child that sent ``STOPPING=1``, emptied
  the store and exited 0 (a final stop) is not restarted: the supervisor exits too;
* ``--command-file F`` (JSON list) is re-read at every start: an upgrade points it at the new
  build, then ``SIGHUP``;
* with ``--watchdog-sec S`` the child gets ``WATCHDOG_USEC`` and is killed with SIGABRT when
  it does not ping within ``S``.

It never reads a ring or a vhost-user message: the only input it parses is the notify
datagrams of its own child, and it keeps everything else as opaque fds.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vdev.sdnotify import same_open_file

log = logging.getLogger("vdev.supervise")

_ANC = socket.CMSG_SPACE(253 * 4) + socket.CMSG_SPACE(12)


@dataclass
class Stored:
    name: str
    fd: int
    poll: bool


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        *,
        command_file: str | None = None,
        max_fds: int = 1024,
        restart_delay: float = 0.1,
        watchdog_sec: float = 0.0,
        notify_name: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.command_file = command_file
        self.max_fds = max_fds
        self.restart_delay = restart_delay
        self.watchdog_sec = watchdog_sec
        self.store: list[Stored] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        name = notify_name or f"vballoon-supervise-{os.getpid()}"
        self.sock.bind(b"\0" + name.encode())
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.notify_socket = "@" + name
        self.child: int | None = None
        self.last_child: int | None = None
        self.child_stopping = False
        self.stopping = False
        self.restart_requested = False
        self.last_ping = 0.0
        self.starts = 0
        self.ready = False

    # -- notify socket -------------------------------------------------------------------

    def _receive(self) -> None:
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(4096, _ANC, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            fds: list[int] = []
            pid: int | None = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = int.from_bytes(payload[:4], sys.byteorder)
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                log.warning("notify: truncated message dropped")
                self._close(fds)
                continue
            if pid is not None and pid not in (self.child, self.last_child):
                log.warning("notify: message from pid %d (not the child) ignored", pid)
                self._close(fds)
                continue
            self._apply(data.decode("utf-8", "replace"), fds)

    def _apply(self, text: str, fds: list[int]) -> None:
        fields: dict[str, str] = {}
        for line in text.split("\n"):
            key, sep, value = line.partition("=")
            if sep:
                fields[key] = value
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTOREREMOVE") == "1":
            for entry in [e for e in self.store if e.name == name]:
                self.store.remove(entry)
                self._close([entry.fd])
        if fields.get("FDSTORE") == "1":
            for fd in fds:
                if any(same_open_file(fd, e.fd) for e in self.store):
                    self._close([fd])  # "Suppressing duplicate fd"
                elif len(self.store) >= self.max_fds:
                    log.warning("fd store full (%d): closing %s", self.max_fds, name)
                    self._close([fd])
                else:
                    self.store.append(Stored(name, fd, fields.get("FDPOLL") != "0"))
            fds = []
        self._close(fds)
        if fields.get("READY") == "1":
            self.ready = True
            log.info("child ready (%d fds stored)", len(self.store))
        if fields.get("STOPPING") == "1":
            self.child_stopping = True
        if "WATCHDOG" in fields or "READY" in fields:
            self.last_ping = time.monotonic()
        if "STATUS" in fields:
            log.info("child status: %s", fields["STATUS"])

    @staticmethod
    def _close(fds: list[int]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _poll_store(self) -> None:
        """Drop stored fds that hung up (POLLHUP/POLLERR), as systemd's epoll does."""
        polled = [e for e in self.store if e.poll]
        if not polled:
            return
        p = select.poll()
        for e in polled:
            with contextlib.suppress(OSError, ValueError):
                p.register(e.fd, 0)
        for fd, ev in p.poll(0):
            if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                for e in [e for e in self.store if e.fd == fd]:
                    log.info("stored fd %s hung up: dropped", e.name)
                    self.store.remove(e)
                    self._close([e.fd])

    # -- the child -----------------------------------------------------------------------

    def _command(self) -> list[str]:
        if self.command_file:
            argv = json.loads(Path(self.command_file).read_text())
            if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
                raise ValueError(f"{self.command_file}: not a JSON list of strings")
            return argv
        return self.argv

    def _spawn(self) -> None:
        argv = self._command()
        fds = [e.fd for e in self.store]
        names = ":".join(e.name for e in self.store)
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = self.notify_socket
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(key, None)
        if fds:
            env["LISTEN_FDS"] = str(len(fds))
            env["LISTEN_FDNAMES"] = names
        if self.watchdog_sec > 0:
            env["WATCHDOG_USEC"] = str(int(self.watchdog_sec * 1e6))
        self.child_stopping = False
        self.ready = False
        self.last_ping = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: fds to 3.., then exec (no Python-level cleanup)
            try:
                high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds) + 16) for fd in fds]
                for i, fd in enumerate(high):
                    os.dup2(fd, 3 + i, inheritable=True)
                env["LISTEN_PID"] = str(os.getpid())
                if self.watchdog_sec > 0:
                    env["WATCHDOG_PID"] = str(os.getpid())
                os.execvpe(argv[0], argv, env)
            except BaseException as exc:
                os.write(2, f"vdev supervise: cannot start {argv[0]}: {exc}\n".encode())
            finally:
                os._exit(127)
        self.child = self.last_child = pid
        self.starts += 1
        log.info("started %s (pid %d, %d fds passed)", argv[0], pid, len(fds))

    def _reap(self) -> int | None:
        """The child's exit status if it exited (None while it runs)."""
        if self.child is None:
            return None
        try:
            pid, status = os.waitpid(self.child, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.child, 0
        if pid == 0:
            return None
        self.child = None
        return os.waitstatus_to_exitcode(status)

    def _signal_child(self, signum: int) -> None:
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signum)

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> int:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        pending: list[int] = []

        def on_signal(signum: int, _frame: object) -> None:
            pending.append(signum)

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(s, on_signal)
        self._spawn()
        exit_code = 0
        restart_at: float | None = None
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(rfd, select.POLLIN)
        while True:
            with contextlib.suppress(InterruptedError):
                poller.poll(100)
            with contextlib.suppress(BlockingIOError):
                while os.read(rfd, 512):
                    pass
            self._receive()
            self._poll_store()
            while pending:
                signum = pending.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("signal %d: stopping the child and the supervisor", signum)
                    self.stopping = True
                    self._signal_child(signal.SIGTERM)
                elif signum == signal.SIGHUP:
                    log.info("SIGHUP: restarting the child")
                    self.restart_requested = True
                    self._signal_child(signal.SIGTERM)
            if (
                self.watchdog_sec > 0
                and self.child is not None
                and self.ready
                and time.monotonic() - self.last_ping > self.watchdog_sec
            ):
                log.error("watchdog: no ping for %.1f s: SIGABRT", self.watchdog_sec)
                self._signal_child(signal.SIGABRT)
                self.last_ping = time.monotonic()
            code = self._reap()
            if code is not None:
                self._receive()  # whatever it sent last
                log.info("child exited with %d (%d fds stored)", code, len(self.store))
                if self.stopping:
                    exit_code = 0 if code in (0, -signal.SIGTERM) else 1
                    break
                if (
                    self.child_stopping
                    and code == 0
                    and not self.store
                    and not self.restart_requested
                ):
                    log.info("final stop: the child emptied the store")
                    break
                self.restart_requested = False
                restart_at = time.monotonic() + self.restart_delay
            if restart_at is not None and self.child is None and time.monotonic() >= restart_at:
                restart_at = None
                try:
                    self._spawn()
                except (OSError, ValueError) as exc:
                    log.error("cannot restart: %s", exc)
                    restart_at = time.monotonic() + max(self.restart_delay, 1.0)
        self._close([e.fd for e in self.store])
        self.store.clear()
        self.sock.close()
        return exit_code


def supervise(
    argv: Sequence[str],
    *,
    command_file: str | None = None,
    max_fds: int = 1024,
    restart_delay: float = 0.1,
    watchdog_sec: float = 0.0,
) -> int:
    if not argv and not command_file:
        raise ValueError("nothing to supervise: give a command after -- or --command-file")
    try:
        sup = Supervisor(
            argv,
            command_file=command_file,
            max_fds=max_fds,
            restart_delay=restart_delay,
            watchdog_sec=watchdog_sec,
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, "notify socket name in use") from None
        raise
    return sup.run()
