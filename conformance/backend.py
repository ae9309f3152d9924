"""A back-end under test as a child process, started from a command line: any back-end.

* :func:`unix_listening`: whether unix sockets listen, without connecting to them;
* :class:`BackendProcess`: a started child (its own session, output to a log file), waited
  for until its sockets listen, stopped by its PID (SIGTERM, then SIGKILL);
* :class:`BackendSpawner`: one back-end per initial target a case needs (reused), from a
  command template; by default vdev's ``vdev serve`` (``python -m vdev``), with its
  ``vdev set-target`` as the target hook. vdev is only ever a command line here: nothing of
  it is imported.

:mod:`lab.vdev_process` builds vdev's own child process on :class:`BackendProcess`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from conformance.context import CaseFailed, SetupError
from protocol.errors import LocalError

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
#: ``python -m vdev``: the back-end the harness starts unless given another command.
VDEV_CMD = (sys.executable, "-m", "vdev")

#: ``__SO_ACCEPTCON`` in ``/proc/net/unix``'s Flags column: the socket listens.
_SO_ACCEPTCON = 0x10000


class BackendStartError(LocalError):
    """A back-end child exited, or did not listen in time, before it was ready.

    Raised by :meth:`BackendProcess.wait_listening`; caught by :class:`BackendSpawner`,
    which turns it into a :class:`conformance.context.SetupError` (the harness run stops and
    fails); a rig's test fails with it."""


def socket_identity(path: str | Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the socket file at ``path``; None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def unix_listening(
    paths: Sequence[str | Path], *, stale: Mapping[str, tuple[int, int] | None] | None = None
) -> bool:
    """Whether a unix socket listens on each of ``paths``, without connecting (a connection
    would be a front-end to the back-end). A socket file appears at ``bind()``, before
    ``listen()``, so its existence is not enough: ``/proc/net/unix`` lists every socket by the
    name it was bound to, with a "listening" flag. A path counts as listening when it is a
    socket and no socket bound to that name is still short of ``listen()``; a socket bound
    under another name and renamed onto the path once listening (as vdev does, so that a
    connect never meets a bound-but-not-listening socket) is not listed under the path.
    ``stale`` maps a path to the socket file that was there before (:func:`socket_identity`):
    that one does not count, a new one must appear. Falls back to "a new socket file exists"
    where ``/proc/net/unix`` cannot be read."""
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            next(f)
            not_yet = {
                fields[7]
                for fields in (line.rstrip("\n").split(None, 7) for line in f)
                if len(fields) == 8 and not int(fields[3], 16) & _SO_ACCEPTCON
            }
    except (OSError, StopIteration, ValueError):
        not_yet = set()
    old = stale or {}

    def ready(p: str | Path) -> bool:
        ident = socket_identity(p)
        return ident is not None and ident != old.get(str(p)) and str(p) not in not_yet

    return all(ready(p) for p in paths)


class BackendProcess:
    """A back-end child started from ``args``, ready when every one of ``wait_for`` (unix
    socket paths) listens.

    ``proc`` is the :class:`subprocess.Popen`. The child gets its own session (a terminal's
    Ctrl-C reaches only us; we stop it), stdin from ``/dev/null``, stdout and stderr appended
    to ``log_path`` (else nowhere; ``inherit_output``: ours), ``env`` and ``cwd`` (None:
    ours). ``what`` names it in errors; :attr:`start_error` is the class raised."""

    start_error: type[BackendStartError] = BackendStartError

    def __init__(
        self,
        args: Sequence[str],
        wait_for: Sequence[str | Path],
        *,
        what: str = "back-end",
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        inherit_output: bool = False,
    ) -> None:
        self.args = list(args)
        self.wait_for = [str(p) for p in wait_for]
        #: socket files already at those paths: left by a back-end that is gone (or being
        #: replaced); only new ones count as this child's
        self.stale = {p: socket_identity(p) for p in self.wait_for}
        self.what = what
        self.log_path = log_path
        out: Any = None if inherit_output else subprocess.DEVNULL
        if log_path is not None:
            out = open(log_path, "ab")  # noqa: SIM115 (the child keeps its own copy)
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                self.args, cwd=cwd, env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip
        finally:
            if log_path is not None:
                out.close()

    # -- state -----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit code, None while it runs (polls)."""
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        """Its output so far ("" without a log file)."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 1500) -> str:
        return self.log()[-n:]

    # -- start -----------------------------------------------------------------------------

    def listening(self) -> bool:
        """Every socket waited for listens; :attr:`start_error` if the process exited."""
        if self.proc.poll() is not None:
            raise self.start_error(
                f"{self.what} exited {self.proc.returncode} before listening: {self.log_tail()}"
            )
        return unix_listening(self.wait_for, stale=self.stale)

    def _not_listening(self, timeout: float) -> BackendStartError:
        return self.start_error(
            f"{self.what} did not listen on {self.wait_for} within {timeout} s: {self.log_tail()}"
        )

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        """Block until it listens; on failure the process is stopped and this raises."""
        deadline = time.monotonic() + timeout
        while not self.listening():
            if time.monotonic() > deadline:
                self.stop(timeout=1)
                raise self._not_listening(timeout)
            time.sleep(0.02)

    async def wait_listening_async(self, timeout: float = START_TIMEOUT) -> None:
        """:meth:`wait_listening` for trio."""
        with trio.move_on_after(timeout):
            while not self.listening():
                await trio.sleep(0.02)
            return
        await self.stop_async(timeout=1)
        raise self._not_listening(timeout)

    # -- stop ------------------------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` (if still running), wait ``timeout`` s, then SIGKILL; the exit code.
        Whatever else still runs in its process group (its session: children it started, a
        supervisor's vdev) is SIGKILLed then too."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            self.proc.kill()
            code = self.proc.wait()
        self._kill_group()
        return code

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def stop_async(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """:meth:`stop` in a worker thread, shielded from cancellation (it is bounded)."""
        with trio.CancelScope(shield=True):
            code = await trio.to_thread.run_sync(self.stop, sig, timeout)
        return code

    def __enter__(self) -> BackendProcess:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def vdev_serve_command(vdev_cmd: Sequence[str] = VDEV_CMD) -> str:
    """The default back-end: ``vdev serve`` (its API on ``{socket}.api``), as a template."""
    return (
        f"{shlex.join(vdev_cmd)} serve --device {{device}} --socket-path {{socket}} "
        f"--api-socket {{socket}}.api --target {{bytes}}"
    )


def vdev_target_hook(vdev_cmd: Sequence[str] = VDEV_CMD) -> str:
    """The default target hook: ``vdev set-target`` through the spawned vdev's API."""
    return f"{shlex.join(vdev_cmd)} set-target --api-socket {{socket}}.api {{vm}} {{bytes}}"


class BackendSpawner:
    """Start a back-end per initial target a case needs (one process per value, reused),
    each waited for until its sockets listen.

    ``command`` is a shell-style template: ``{socket}`` (a fresh socket path), ``{device}``,
    ``{pages}`` and ``{bytes}`` (the case's initial target) are substituted in each word;
    ``wait_for`` are templates of the socket paths to wait for. Without ``command`` it runs
    vdev (``vdev_cmd``, default ``python -m vdev``): ``vdev serve``, waiting for its
    vhost-user socket and its API, with :attr:`target_hook` its ``vdev set-target``."""

    def __init__(
        self,
        device: str,
        vdev_cmd: Sequence[str] | None = None,
        *,
        command: str | None = None,
        wait_for: Sequence[str] = ("{socket}",),
        target_hook: str | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.device = device
        self.start_timeout = start_timeout
        vdev = list(vdev_cmd or VDEV_CMD)
        if command is None:
            self.command = vdev_serve_command(vdev)
            self.wait_for = ["{socket}", "{socket}.api"]
            self.target_hook: str | None = target_hook or vdev_target_hook(vdev)
        else:
            self.command = command
            self.wait_for = list(wait_for)
            self.target_hook = target_hook
        self.tmp = tempfile.TemporaryDirectory(prefix="vballoon-harness-")
        self.procs: dict[int | None, tuple[BackendProcess, str]] = {}
        self.log = Path(self.tmp.name) / "backend.log"

    def argv(self, socket: str, target: int | None) -> list[str]:
        """The command line for a back-end on ``socket`` with initial target ``target``."""
        pages = 0 if target is None else target
        subst = {"socket": socket, "device": self.device, "pages": pages, "bytes": pages * 4096}
        return [word.format(**subst) for word in shlex.split(self.command)]

    async def socket_for(self, target: int | None) -> str:
        """A listening back-end's socket for a case with initial ``target`` (None: 0)."""
        if target in self.procs:
            proc, path = self.procs[target]
            if proc.alive():
                return path
            tail = self.log.read_text(errors="replace")[-1500:]
            raise CaseFailed(
                f"the back-end (target {target}) exited with {proc.returncode} during an "
                f"earlier case, and is not restarted: {tail}"
            )
        path = str(Path(self.tmp.name) / f"backend-{len(self.procs)}.sock")
        argv = self.argv(path, target)
        with self.log.open("ab") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
        wait_for = [w.format(socket=path) for w in self.wait_for]
        # a relative command is relative to our working directory
        try:
            proc = BackendProcess(argv, wait_for, what=argv[0], log_path=self.log, cwd=None)
        except OSError as e:
            raise SetupError(f"cannot start the back-end `{shlex.join(argv)}`: {e}") from None
        self.procs[target] = (proc, path)
        try:
            await proc.wait_listening_async(self.start_timeout)
        except BackendStartError as e:
            raise SetupError(
                f"the back-end did not start (`{shlex.join(argv)}`, target {target}): {e}"
            ) from None
        return path

    def close(self) -> None:
        for proc, _ in self.procs.values():  # SIGTERM to all first, then wait for each
            if proc.alive():
                proc.proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs.values():
            proc.stop(timeout=5)
        self.procs.clear()
        self.tmp.cleanup()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[BackendSpawner]:
        try:
            yield self
        finally:
            self.close()
