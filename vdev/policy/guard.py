"""The stop guard: a process that continues every QEMU vdev stopped, whatever happens to vdev.

The v1 backstop (:mod:`vdev.policy.backstop`) pauses an allocating VM with SIGSTOP. A
stopped QEMU must never be stranded: vdev continues it on exit, but a ``kill -9`` of vdev
runs no exit code. So before each SIGSTOP, vdev writes ``stop PID STARTTIME`` to this
process's stdin (a pipe; the write is complete once it is in the kernel's buffer), and
``cont PID`` after each SIGCONT. When the pipe reaches end of file -- vdev exited, crashed or
was killed: the kernel closes its end -- or this process gets SIGTERM, every PID still
recorded is sent SIGCONT (if its start time still matches: PIDs are reused) and the guard
exits. SIGINT and SIGHUP are ignored (a Ctrl-C in vdev's terminal must leave it running
until vdev is gone). Its limit: a ``kill -9`` of the guard *and* vdev together (for example
a supervisor that SIGKILLs the whole process group) runs nothing; continue the VMs then by
hand (``kill -CONT``) -- ``vdev host`` lists the paused ones.

Run as ``python -m vdev.policy.guard``; :class:`StopGuard` starts and feeds it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys


def start_time(pid: int, proc: str = "/proc") -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot), or None if the PID is gone."""
    try:
        with open(f"{proc}/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    try:
        return int(text[text.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


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
    """vdev's side: the guard process and the records sent to it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vdev.policy.guard"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert self.proc.stdin is not None
        self._pipe = self.proc.stdin.fileno()

    def wait_ready(self) -> bool:
        """Block until the guard has set its signal handlers (tests; vdev need not wait:
        what it writes meanwhile waits in the pipe)."""
        assert self.proc.stdout is not None
        return self.proc.stdout.readline() == b"ready\n"

    def _send(self, line: str) -> None:
        os.write(self._pipe, line.encode("ascii"))  # < PIPE_BUF: one atomic write

    def stop(self, pid: int) -> bool:
        """Record, then SIGSTOP ``pid``. False if it is gone, or the guard is."""
        started = start_time(pid)
        if started is None:
            return False
        try:
            self._send(f"stop {pid} {started}\n")
        except OSError:  # the guard is gone: never stop what nothing would continue
            return False
        try:
            os.kill(pid, signal.SIGSTOP)
        except OSError:
            self._send(f"cont {pid}\n")
            return False
        return True

    def cont(self, pid: int) -> None:
        """SIGCONT ``pid``, then forget it."""
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)
        with contextlib.suppress(OSError):
            self._send(f"cont {pid}\n")

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
