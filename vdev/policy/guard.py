"""The stop guard and the stop file: a QEMU vdev stopped is continued, whatever happens to vdev.

The v1 backstop (:mod:`vdev.policy.backstop`) pauses an allocating VM with SIGSTOP. A
stopped QEMU must never be stranded: vdev continues it on exit, but a ``kill -9`` of vdev
runs no exit code. Two records cover that:

* **The guard**, a process of its own: before each SIGSTOP, vdev writes ``stop PID
  STARTTIME`` to its stdin (a pipe; the write is complete once it is in the kernel's
  buffer), and ``cont PID`` after each SIGCONT. When the pipe reaches end of file -- vdev
  exited, crashed or was killed: the kernel closes its end -- or the guard gets SIGTERM,
  every PID still recorded is sent SIGCONT (if its start time still matches: PIDs are
  reused) and the guard exits. It runs in its own session (``start_new_session``): a
  SIGKILL to vdev's process group (a supervisor killing the group, a terminal's job
  control) does not reach it; SIGINT and SIGHUP are ignored all the same.
* **The stop file** (:class:`StopFile`), for what kills the guard too (systemd killing the
  service's cgroup, an OOM kill of both): before each SIGSTOP vdev also writes the PID, its
  start time, the VM's name and its cgroup to a small file, atomically (a temporary file
  renamed over it: never a partial line), and removes the PID after its SIGCONT (the file
  is deleted when nothing is stopped). When ``vdev serve`` starts, backstop or not, it
  continues every recorded PID that is still the same process and still stopped
  (:func:`resume_left_stopped`), reports each (a ``resumed`` backstop action: "left stopped
  by a previous vdev"), and clears the file. So a VM stays stopped only until vdev starts
  again -- at once under systemd's ``Restart=`` -- and meanwhile ``vdev host`` of a live
  vdev lists the paused ones. The file also names the guard that covers the same stops; a
  starting vdev ends that guard first if it is still alive (stalled, e.g. in reclaim, when
  its vdev died): otherwise it could wake up later and continue a QEMU the new vdev has
  stopped again since.

Where the file is (:func:`default_stop_file`): ``[serve] stop_file`` / ``--stop-file``;
else ``$RUNTIME_DIRECTORY/<first vhost-user socket's name>.stopped`` under systemd
(``RuntimeDirectory=``; keep it across restarts with ``RuntimeDirectoryPreserve=``); else
``<first vhost-user socket>.stopped`` next to it (``--fd``: ``<API socket>.stopped``). The
socket is this vdev's own (:mod:`vdev.socket_files` claims it), so two vdevs never share a
stop file (under ``$RUNTIME_DIRECTORY``: as long as their sockets' names differ, as in
``contrib/systemd``'s ``%i.sock``). The file names the boot it was written in (``/proc/sys/kernel/random/boot_id``):
after a reboot its PIDs mean nothing and are dropped.

Run the guard as ``python -m vdev.policy.guard``; :class:`StopGuard` starts and feeds it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: what the stop file's name adds to the socket's
STOP_FILE_SUFFIX = ".stopped"
#: a stop file larger than this is not read (it holds one short line per stopped QEMU)
MAX_STOP_FILE = 1 << 20
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _stat(pid: int, proc: str = "/proc") -> tuple[str, int] | None:
    """(state, start time) from /proc/PID/stat, or None if the PID is gone."""
    try:
        with open(f"{proc}/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    try:
        fields = text[text.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])
    except (ValueError, IndexError):
        return None


def start_time(pid: int, proc: str = "/proc") -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot), or None if the PID is gone."""
    st = _stat(pid, proc)
    return None if st is None else st[1]


# --------------------------------------------------------------------------- the stop file
#
# Text, one record a line:
#     # comment
#     boot BOOT_ID                      (the boot the PIDs belong to)
#     guard PID STARTTIME VDEVPID VDEVSTARTTIME
#                                       (the guard covering the same stops, and its vdev)
#     PID STARTTIME [NAME [CGROUP]]     (NAME has no blanks; CGROUP is the rest of the line)
# Every line ends with a newline: a last line without one is incomplete and not used.

_RECORD = re.compile(r"([0-9]{1,10})\s+([0-9]{1,20})(?:\s+(\S+)(?:\s+(.+))?)?")
_BOOT = re.compile(r"boot\s+([0-9a-f-]{1,64})")
_GUARD = re.compile(r"guard\s+([0-9]{1,10})\s+([0-9]{1,20})\s+([0-9]{1,10})\s+([0-9]{1,20})")
#: how long a starting vdev waits for a previous vdev's guard to end on SIGTERM (it continues
#: what it recorded and exits: milliseconds) before it SIGKILLs it
GUARD_EXIT_TIMEOUT = 0.5


@dataclass(frozen=True)
class StopRecord:
    """A QEMU vdev stopped: its PID and start time (together: the process), for the report
    its VM's name and cgroup."""

    pid: int
    started: int
    name: str = "-"
    cgroup: str = "-"


@dataclass(frozen=True)
class GuardRecord:
    """The guard covering a stop file's stops (PID and start time), and the vdev it serves."""

    pid: int
    started: int
    vdev_pid: int
    vdev_started: int


@dataclass
class ParsedStopFile:
    boot: str | None = None
    #: the guard that covers the same stops
    guard: GuardRecord | None = None
    records: list[StopRecord] = field(default_factory=list)
    #: what is wrong with it, line by line (those lines are not used)
    problems: list[str] = field(default_factory=list)


def render_stop_file(
    boot: str | None, records: Sequence[StopRecord], guard: GuardRecord | None = None
) -> str:
    out = ["# vdev: QEMUs stopped by the backstop (PID STARTTIME NAME CGROUP);"
           " continued when vdev starts\n"]  # fmt: skip
    if boot:
        out.append(f"boot {boot}\n")
    if guard is not None:
        out.append(f"guard {guard.pid} {guard.started} {guard.vdev_pid} {guard.vdev_started}\n")
    for r in records:
        name = r.name if r.name and not any(c.isspace() for c in r.name) else "-"
        cgroup = " ".join(r.cgroup.split()) or "-"
        out.append(f"{r.pid} {r.started} {name} {cgroup}\n")
    return "".join(out)


def parse_stop_file(data: bytes) -> ParsedStopFile:
    """The records of a stop file; whatever is not one is named in ``problems``."""
    out = ParsedStopFile()
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    last = lines.pop()  # "" when the file ends with a newline
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        boot = _BOOT.fullmatch(line)
        if boot is not None:
            out.boot = boot.group(1)
            continue
        guard = _GUARD.fullmatch(line)
        if guard is not None and int(guard.group(1)) > 0 and int(guard.group(3)) > 0:
            out.guard = GuardRecord(*(int(g) for g in guard.groups()))
            continue
        m = _RECORD.fullmatch(line)
        if m is None or int(m.group(1)) == 0:
            out.problems.append(f"line {n} is not 'PID STARTTIME [NAME [CGROUP]]': {line[:80]!r}")
            continue
        out.records.append(
            StopRecord(int(m.group(1)), int(m.group(2)), m.group(3) or "-", m.group(4) or "-")
        )
    if last.strip():
        out.problems.append(
            f"line {len(lines) + 1} is incomplete (no newline at the end: a partial write):"
            f" {last[:80]!r}"
        )
    return out


def boot_id() -> str | None:
    try:
        with open(BOOT_ID, encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def default_stop_file(
    socket_paths: Sequence[str],
    api_socket: str | None,
    runtime_directory: str | None = None,
) -> str | None:
    """Where vdev records the QEMUs it holds stopped (see the module's docstring); None when
    it has no socket path of its own to name the file after (``--fd`` without an API)."""
    own = socket_paths[0] if socket_paths else api_socket
    if not own:
        return None
    directory = (runtime_directory or "").split(":")[0]
    if directory:
        return os.path.join(directory, os.path.basename(own) + STOP_FILE_SUFFIX)
    return own + STOP_FILE_SUFFIX


class StopFile:
    """vdev's record of the QEMUs it holds stopped, rewritten atomically on each change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.records: dict[int, StopRecord] = {}
        #: the guard covering the same stops (set by :class:`StopGuard`)
        self.guard: GuardRecord | None = None
        #: the last write's failure (None: the file is up to date)
        self.error: str | None = None
        self._boot = boot_id()

    def probe(self) -> None:
        """Raise OSError unless the file can be written where it is (checked when the
        backstop engages: a stop file that cannot be written keeps no promise)."""
        directory, name = os.path.split(self.path)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}~", dir=directory or ".")
        os.close(fd)
        os.unlink(tmp)

    def add(self, record: StopRecord) -> None:
        self.records[record.pid] = record
        self._write()

    def remove(self, pid: int) -> None:
        if self.records.pop(pid, None) is not None:
            self._write()

    def _write(self) -> None:
        try:
            if not self.records:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            else:
                data = render_stop_file(
                    self._boot, list(self.records.values()), self.guard
                ).encode()
                directory, name = os.path.split(self.path)
                # a new file (O_EXCL, 0600) renamed over the old: never a partial line
                fd, tmp = tempfile.mkstemp(prefix=f".{name}~", dir=directory or ".")
                try:
                    try:
                        os.write(fd, data)  # a few hundred bytes: one write
                    finally:
                        os.close(fd)
                    os.replace(tmp, self.path)  # no fsync: the PIDs mean nothing after a reboot
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
        except OSError as e:
            error = f"cannot record the stopped QEMUs in {self.path}: {e.strerror}"
            if error != self.error:
                log.warning(
                    "%s (the guard still continues them if vdev dies; a kill of both leaves"
                    " them stopped)",
                    error,
                )
            self.error = error
        else:
            self.error = None


def resume_left_stopped(path: str, proc: str = "/proc") -> list[tuple[str, str, str]]:
    """At start-up: SIGCONT every QEMU the stop file ``path`` says a previous vdev left
    stopped -- if it is still the same process (start time) and still stopped -- then
    delete the file. Returns backstop actions (kind, cgroup, detail): ``resumed`` for each
    one continued, ``skipped`` for what could not be read or done. Never raises."""
    actions: list[tuple[str, str, str]] = []

    def problem(cgroup: str, detail: str) -> None:
        log.warning("backstop skipped: %s", detail)
        actions.append(("skipped", cgroup, detail))

    try:
        # never a symlink, and never wait: a FIFO or a device put there must not hold vdev up
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return actions
    except OSError as e:
        problem("-", f"cannot read the stop file {path}: {e.strerror}; a QEMU a previous vdev"
                " stopped may still be stopped (kill -CONT it)")  # fmt: skip
        return actions
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        problem("-", f"the stop file {path} is not a regular file: not read, not removed")
        return actions
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_STOP_FILE + 1)
        except OSError as e:
            problem("-", f"cannot read the stop file {path}: {e.strerror}")
            data = b""
    if len(data) > MAX_STOP_FILE:
        problem("-", f"the stop file {path} is larger than {MAX_STOP_FILE} bytes: not a stop"
                " file; not read")  # fmt: skip
        data = b""
    parsed = parse_stop_file(data)
    for p in parsed.problems[:5]:
        problem("-", f"the stop file {path}: {p}; that line is ignored")
    if len(parsed.problems) > 5:
        problem("-", f"the stop file {path}: {len(parsed.problems) - 5} more bad lines ignored")
    records = parsed.records
    if parsed.boot is not None and parsed.boot != boot_id():
        log.debug("stop file %s: written before the last reboot; its PIDs are dropped", path)
        records = []
    for r in records:
        who = f"{r.name} (pid {r.pid})"
        st = _stat(r.pid, proc)
        if st is None:
            log.debug("stop file %s: %s is gone", path, who)
            continue
        state, started = st
        if started != r.started:
            log.debug("stop file %s: pid %d is another process now (start time %d, not %d)",
                      path, r.pid, started, r.started)  # fmt: skip
            continue
        if state != "T":
            log.debug("stop file %s: %s is running (state %s)", path, who, state)
            continue
        try:
            os.kill(r.pid, signal.SIGCONT)
        except OSError as e:
            problem(r.cgroup, f"{who} left stopped by a previous vdev: SIGCONT failed:"
                    f" {e.strerror}")  # fmt: skip
            continue
        detail = f"{who} continued: left stopped by a previous vdev (recorded in {path})"
        log.warning("backstop resumed on %s: %s", r.cgroup, detail)
        actions.append(("resumed", r.cgroup, detail))
    if parsed.guard is not None and records:  # before this vdev can stop anything again
        trouble = _end_old_guard(parsed.guard, proc=proc)
        if trouble:
            problem("-", f"the stop file {path}: {trouble}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        problem("-", f"cannot clear the stop file {path}: {e.strerror}")
    return actions


def _alive(pid: int, started: int, proc: str = "/proc") -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs (not a zombie)."""
    st = _stat(pid, proc)
    return st is not None and st[1] == started and st[0] not in ("Z", "X")


def _end_old_guard(guard: GuardRecord, proc: str = "/proc") -> str | None:
    """End a previous vdev's guard if it outlived that vdev: SIGTERM (it continues what it
    recorded and exits), SIGCONT in case it is stopped, and SIGKILL if it has not ended within
    :data:`GUARD_EXIT_TIMEOUT`. Once this returns it can never continue anything again. Only
    a process that is that guard is signalled: the same PID and start time, running
    ``-m vdev.policy.guard``, and its vdev gone (a live vdev's guard is its own business).
    Returns what went wrong, if anything."""
    pid, started = guard.pid, guard.started
    if pid == os.getpid() or _alive(guard.vdev_pid, guard.vdev_started, proc):
        return None
    if not _alive(pid, started, proc):
        return None  # gone (or that PID is another process now)
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            argv = f.read(4096).split(b"\0")
    except OSError:
        return None
    if b"vdev.policy.guard" not in argv:
        return f"pid {pid}, named as the guard, is not one: not signalled"
    log.warning("a previous vdev's guard (pid %d) still runs: ending it", pid)
    try:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)
    except OSError as e:
        return f"cannot end the previous vdev's guard (pid {pid}): {e.strerror}"
    deadline = time.monotonic() + GUARD_EXIT_TIMEOUT
    while time.monotonic() < deadline:
        if not _alive(pid, started, proc):
            return None
        time.sleep(0.005)
    try:
        os.kill(pid, signal.SIGKILL)  # queued even in D state: it never runs user code again
    except OSError as e:
        return f"cannot end the previous vdev's guard (pid {pid}): {e.strerror}"
    return (
        f"the previous vdev's guard (pid {pid}) did not end on SIGTERM within"
        f" {GUARD_EXIT_TIMEOUT} s: killed; the QEMUs this file names are continued here"
    )


# --------------------------------------------------------------------------- the guard


def _continue_all(recorded: dict[int, int]) -> None:
    for pid, started in recorded.items():
        if start_time(pid) == started:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
    recorded.clear()


def main() -> None:
    recorded: dict[int, int] = {}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def on_term(_sig: int, _frame: object) -> None:
        _continue_all(recorded)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    with contextlib.suppress(OSError):  # vdev may be gone already: carry on
        sys.stdout.write("ready\n")
        sys.stdout.flush()
    for line in sys.stdin.buffer:
        parts = line.split()
        try:
            if parts[:1] == [b"stop"] and len(parts) == 3:
                recorded[int(parts[1])] = int(parts[2])
            elif parts[:1] == [b"cont"] and len(parts) == 2:
                recorded.pop(int(parts[1]), None)
        except ValueError:
            continue
    _continue_all(recorded)


class StopGuard:
    """vdev's side: the guard process, the records sent to it, and the stop file if any."""

    def __init__(self, stop_file: StopFile | None = None) -> None:
        self.stop_file = stop_file
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vdev.policy.guard"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            start_new_session=True,  # a SIGKILL to vdev's process group does not reach it
        )
        assert self.proc.stdin is not None
        self._pipe = self.proc.stdin.fileno()
        if stop_file is not None:  # a later vdev ends this guard if it outlives this vdev
            started, mine = start_time(self.proc.pid), start_time(os.getpid())
            if started is not None and mine is not None:
                stop_file.guard = GuardRecord(self.proc.pid, started, os.getpid(), mine)

    def wait_ready(self) -> bool:
        """Block until the guard has set its signal handlers (tests; vdev need not wait:
        what it writes meanwhile waits in the pipe)."""
        assert self.proc.stdout is not None
        return self.proc.stdout.readline() == b"ready\n"

    def _send(self, line: str) -> None:
        os.write(self._pipe, line.encode("ascii"))  # < PIPE_BUF: one atomic write

    def stop(self, pid: int, name: str = "-", cgroup: str = "-") -> bool:
        """Record (the guard, the stop file), then SIGSTOP ``pid``. False if it is gone, or
        the guard is."""
        started = start_time(pid)
        if started is None:
            return False
        try:
            self._send(f"stop {pid} {started}\n")
        except OSError:  # the guard is gone: never stop what nothing would continue
            return False
        if self.stop_file is not None:
            self.stop_file.add(StopRecord(pid, started, name, cgroup))
        try:
            os.kill(pid, signal.SIGSTOP)
        except OSError:
            self._forget(pid)
            return False
        return True

    def cont(self, pid: int) -> None:
        """SIGCONT ``pid``, then forget it."""
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)
        self._forget(pid)

    def _forget(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            self._send(f"cont {pid}\n")
        if self.stop_file is not None:
            self.stop_file.remove(pid)

    def close(self) -> None:
        """Close the pipe: the guard continues whatever is still recorded and exits."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait()


if __name__ == "__main__":
    main()
