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
  stop it and the supervisor, releasing the store: since nothing will resume the guests
  then, the child is asked for a final stop (:data:`STOP_SIGNAL`, vdev's SIGUSR1: it deflates
  every guest first). A child that sent ``STOPPING=1``, emptied the store and exited 0 (a
  final stop) is not restarted: the supervisor exits too;
* a command that fails before it is ready (exits without ``READY=1``: a broken upgrade) is
  not retried blindly: the supervisor goes back to the last command that was ready, and
  waits longer between attempts while a command keeps failing;
* ``--command-file F`` (JSON list) is re-read at every start: an upgrade points it at the new
  build, then ``SIGHUP``;
* with ``--watchdog-sec S`` the child gets ``WATCHDOG_USEC`` and is killed with SIGABRT when
  it does not ping within ``S``;
* with ``--standby`` the next child is started ahead of need (a warm standby: Python started,
  vdev imported) once the current one is ready; it blocks in :func:`vdev.sdnotify.listen_fds`
  on a ``SOCK_SEQPACKET`` pair (``$VBALLOON_STANDBY_FD``) until the current child exits, then
  receives the store over it (``SCM_RIGHTS``) and serves: a restart costs no interpreter
  start-up. It says ``WARM`` when it waits; one that is not warm, or was started from another
  command than the one to run now, is stopped and the child started cold. ``SIGHUP`` first
  warms a standby of the (re-read) command, then stops the child (systemd has no standby:
  there a restart is a cold start); a new command that cannot be read, or whose standby exits
  or is not warm in time, is refused and the running child keeps serving;
* ``--pid-file F`` holds the pid of the child serving now (systemd's ``MAINPID``).

It never reads a ring or a vhost-user message: the only input it parses is the notify
datagrams of its own child and the standby's ``WARM``, and it keeps everything else as
opaque fds.
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

from vdev.sdnotify import (
    STANDBY_ENV,
    STANDBY_FDS_PER_MESSAGE,
    STANDBY_GO,
    STANDBY_WARM,
    same_open_file,
)

log = logging.getLogger("vdev.supervise")

_ANC = socket.CMSG_SPACE(253 * 4) + socket.CMSG_SPACE(12)


#: how long ``SIGHUP`` waits for the new build's standby to be warm before stopping the child
STANDBY_WARM_TIMEOUT = 30.0
#: after a standby exited by itself (a broken command), the next one waits this long
STANDBY_RETRY = 10.0
#: what the supervisor's own SIGTERM/SIGINT sends the child: vdev serve's final stop
STOP_SIGNAL = signal.SIGUSR1
#: the longest wait between two starts of a command that keeps failing before it is ready
MAX_RESTART_BACKOFF = 10.0


@dataclass
class Stored:
    name: str
    fd: int
    poll: bool


@dataclass
class Standby:
    """A child started ahead of need, waiting on ``sock`` (our end) for the store."""

    pid: int
    sock: socket.socket
    argv: list[str]
    warm: bool = False


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
        standby: bool = False,
        pid_file: str | None = None,
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
        self.use_standby = standby
        self.standby: Standby | None = None
        #: SIGHUP with a standby: the monotonic deadline for it to be warm, then the restart
        self.upgrade_by: float | None = None
        self.standby_retry_at = 0.0
        self.pid_file = pid_file
        #: the command the child runs, and the last one that became ready (the fallback)
        self.child_argv: list[str] | None = None
        self.good_argv: list[str] | None = None
        #: starts in a row that failed before READY=1 (the backoff)
        self.failures = 0
        self.fall_back = False

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
            self.good_argv = self.child_argv
            self.failures = 0
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
            where = f"--command-file {self.command_file}"
            try:
                argv = json.loads(Path(self.command_file).read_text())
            except OSError as exc:
                raise ValueError(f"{where}: {exc.strerror or exc}") from None
            except ValueError as exc:
                raise ValueError(f"{where}: not JSON: {exc}") from None
            if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
                raise ValueError(f"{where}: not a JSON list of strings")
            return argv
        return self.argv

    def _to_run(self) -> list[str]:
        """The command to start: the configured one, or while it fails before it is ready
        (see :meth:`_restart_delay_after`) the last one that was."""
        if self.fall_back and self.good_argv is not None:
            return self.good_argv
        return self._command()

    def _spawn(self) -> None:
        """Start the child now (cold), with the store at fds 3..: the command to run, or
        after it failed before it was ready, the last command that was."""
        argv = self._to_run()
        self._discard_standby()
        pid = self._fork(argv, [e.fd for e in self.store], None)
        self._became_child(pid, argv)
        log.info("started %s (pid %d, %d fds passed)", argv[0], pid, len(self.store))

    def _fork(self, argv: list[str], fds: list[int], standby: socket.socket | None) -> int:
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = self.notify_socket
        for key in (
            "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID",
            STANDBY_ENV,
        ):  # fmt: skip
            env.pop(key, None)
        if fds:
            env["LISTEN_FDS"] = str(len(fds))
            env["LISTEN_FDNAMES"] = ":".join(e.name for e in self.store)
        if self.watchdog_sec > 0:
            env["WATCHDOG_USEC"] = str(int(self.watchdog_sec * 1e6))
        pid = os.fork()
        if pid == 0:  # the child: fds to 3.., then exec (no Python-level cleanup)
            try:
                high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds) + 16) for fd in fds]
                for i, fd in enumerate(high):
                    os.dup2(fd, 3 + i, inheritable=True)
                if standby is not None:
                    os.set_inheritable(standby.fileno(), True)
                    env[STANDBY_ENV] = str(standby.fileno())
                env["LISTEN_PID"] = str(os.getpid())
                if self.watchdog_sec > 0:
                    env["WATCHDOG_PID"] = str(os.getpid())
                os.execvpe(argv[0], argv, env)
            except BaseException as exc:
                os.write(2, f"vdev supervise: cannot start {argv[0]}: {exc}\n".encode())
            finally:
                os._exit(127)
        return pid

    def _became_child(self, pid: int, argv: list[str]) -> None:
        self.child = self.last_child = pid
        self.child_argv = argv
        self.child_stopping = False
        self.ready = False
        self.last_ping = time.monotonic()
        self.starts += 1
        self._write_pid_file()

    def _write_pid_file(self) -> None:
        if self.pid_file is None or self.child is None:
            return
        tmp = f"{self.pid_file}.tmp"
        with contextlib.suppress(OSError):
            Path(tmp).write_text(f"{self.child}\n")
            os.replace(tmp, self.pid_file)

    # -- the standby ---------------------------------------------------------------------

    def _start_standby(self) -> None:
        """Start the next child ahead of need; it waits for the store on a socket pair."""
        try:
            argv = self._to_run()
        except (OSError, ValueError) as exc:
            log.error("no standby: %s", exc)
            return
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        try:
            pid = self._fork(argv, [], theirs)
        finally:
            theirs.close()
        ours.setblocking(False)
        self.standby = Standby(pid, ours, argv)
        log.info("standby %s started (pid %d)", argv[0], pid)

    def _check_standby(self) -> None:
        """Note the standby's ``WARM``; reap it if it exited (it is then gone)."""
        sb = self.standby
        if sb is None:
            return
        while not sb.warm:
            try:
                msg = sb.sock.recv(64)
            except BlockingIOError:
                break
            except OSError:
                msg = b""
            if msg == STANDBY_WARM:
                sb.warm = True
                log.info("standby pid %d warm", sb.pid)
            if not msg:
                break
        try:
            pid, status = os.waitpid(sb.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = sb.pid, 0
        if pid:
            log.warning("standby pid %d exited with %d", sb.pid, os.waitstatus_to_exitcode(status))
            sb.sock.close()
            self.standby = None
            self.standby_retry_at = time.monotonic() + STANDBY_RETRY

    def _discard_standby(self) -> None:
        """Stop the standby (it sees its socket close; SIGKILL to be sure) and reap it."""
        sb, self.standby = self.standby, None
        if sb is None:
            return
        sb.sock.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(sb.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(sb.pid, 0)

    def _activate_standby(self) -> bool:
        """Hand the store to a warm standby of the current command: it is the child now.
        False when there is none (the caller starts one cold)."""
        sb = self.standby
        if sb is None:
            return False
        self._check_standby()
        try:
            argv = self._to_run()
        except (OSError, ValueError):
            argv = None
        if self.standby is None or not sb.warm or sb.argv != argv:
            self._discard_standby()
            return False
        try:
            for i in range(0, len(self.store), STANDBY_FDS_PER_MESSAGE):
                part = self.store[i : i + STANDBY_FDS_PER_MESSAGE]
                names = ":".join(e.name for e in part).encode()
                rights = array.array("i", [e.fd for e in part])
                sb.sock.sendmsg(
                    [b"FDNAMES=" + names], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
                )
            sb.sock.sendmsg([STANDBY_GO])
        except OSError as exc:
            log.warning("standby pid %d did not take the store: %s", sb.pid, exc)
            self._discard_standby()
            return False
        self.standby = None
        sb.sock.close()
        self._became_child(sb.pid, sb.argv)
        log.info("standby pid %d took over (%d fds passed)", sb.pid, len(self.store))
        return True

    def _upgrade(self) -> None:
        """SIGHUP: restart the child on the (re-read) command, unless it cannot be read."""
        try:
            self._command()
        except ValueError as exc:
            log.error("SIGHUP refused, the child keeps serving: %s", exc)
            return
        log.info("SIGHUP: restarting the child")
        self.fall_back = False
        self.restart_requested = True
        if self.use_standby and self.child is not None:
            self._discard_standby()  # it may run the previous command
            self._start_standby()
            self.upgrade_by = time.monotonic() + STANDBY_WARM_TIMEOUT
        else:
            self._signal_child(signal.SIGTERM)

    def _check_upgrade(self) -> None:
        """A SIGHUP's standby: warm, the child is stopped (the standby takes over); gone or
        not warm in time, the upgrade is refused and the child keeps serving."""
        sb = self.standby
        if sb is not None and sb.warm:
            self.upgrade_by = None
            self._signal_child(signal.SIGTERM)
            return
        expired = self.upgrade_by is not None and time.monotonic() > self.upgrade_by
        if sb is not None and not expired:
            return
        self.upgrade_by = None
        self.restart_requested = False
        self.fall_back = True  # later restarts and standbys: the command that serves now
        why = (
            "exited before it was ready"
            if sb is None
            else f"not warm in {STANDBY_WARM_TIMEOUT:g} s"
        )
        log.error(
            "SIGHUP refused, the child keeps serving: the new command's standby %s (see its "
            "output above; fix %s and send SIGHUP again)",
            why, f"--command-file {self.command_file}" if self.command_file else "the command",
        )  # fmt: skip
        self._discard_standby()

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

    def _restart_delay_after(self, code: int) -> float:
        """The wait before the next start: ``--restart-delay``, longer while commands fail
        before they are ready; a new command that failed so is replaced by the last one that
        was ready (a broken upgrade must not keep the guests without a device)."""
        if self.ready or code == 0:
            self.failures = 0
            return self.restart_delay
        self.failures += 1
        if self.good_argv is not None and self.child_argv != self.good_argv and not self.fall_back:
            self.fall_back = True
            log.error(
                "the child exited with %d before it was ready: going back to the last command "
                "that served (%s); fix %s and send SIGHUP",
                code, " ".join(self.good_argv),
                f"--command-file {self.command_file}" if self.command_file else "the command",
            )  # fmt: skip
            return self.restart_delay
        delay = min(MAX_RESTART_BACKOFF, max(self.restart_delay, 0.25) * 2 ** (self.failures - 1))
        log.error(
            "the child exited with %d before it was ready (%d in a row): next start in %.1f s",
            code, self.failures, delay,
        )  # fmt: skip
        return delay

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
        polled_standby: int | None = None
        while True:
            standby_fd = None if self.standby is None else self.standby.sock.fileno()
            if standby_fd != polled_standby:
                if polled_standby is not None:
                    with contextlib.suppress(KeyError):
                        poller.unregister(polled_standby)
                if standby_fd is not None:
                    poller.register(standby_fd, select.POLLIN)
                polled_standby = standby_fd
            with contextlib.suppress(InterruptedError):
                poller.poll(100)
            with contextlib.suppress(BlockingIOError):
                while os.read(rfd, 512):
                    pass
            self._receive()
            self._poll_store()
            self._check_standby()
            while pending:
                signum = pending.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info(
                        "signal %d: stopping the child (a final stop: the store goes with the "
                        "supervisor) and the supervisor", signum
                    )  # fmt: skip
                    self.stopping = True
                    self.upgrade_by = None
                    self._discard_standby()
                    self._signal_child(STOP_SIGNAL)
                elif signum == signal.SIGHUP and not self.stopping:
                    self._upgrade()
            if self.upgrade_by is not None:
                self._check_upgrade()
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
                self.upgrade_by = None
                restart_at = time.monotonic() + self._restart_delay_after(code)
            if restart_at is not None and self.child is None and time.monotonic() >= restart_at:
                restart_at = None
                try:
                    if not self._activate_standby():
                        self._spawn()
                except (OSError, ValueError) as exc:
                    log.error("cannot restart: %s", exc)
                    restart_at = time.monotonic() + max(self.restart_delay, 1.0)
            if (
                self.use_standby
                and self.standby is None
                and self.child is not None
                and self.ready
                and not self.stopping
                and time.monotonic() >= self.standby_retry_at
            ):
                self._start_standby()
        self._discard_standby()
        self._close([e.fd for e in self.store])
        self.store.clear()
        self.sock.close()
        if self.pid_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.pid_file)
        return exit_code


def supervise(
    argv: Sequence[str],
    *,
    command_file: str | None = None,
    max_fds: int = 1024,
    restart_delay: float = 0.1,
    watchdog_sec: float = 0.0,
    standby: bool = False,
    pid_file: str | None = None,
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
            standby=standby,
            pid_file=pid_file,
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, "notify socket name in use") from None
        raise
    return sup.run()
