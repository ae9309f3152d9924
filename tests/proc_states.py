"""Shared by the tests that stop and continue real processes (the backstop, its guard and
the stop file): a process's scheduler state from ``/proc/PID/stat``, and waiting for one."""

from __future__ import annotations

import time


def proc_state(pid: int) -> str:
    """Field 3 of ``/proc/PID/stat``: R, S, T (stopped), Z, ..."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        text = f.read()
    return text[text.rindex(")") + 2]


def wait_state(pid: int, want: set[str], timeout: float = 20.0) -> str:
    """Poll until the state is one of ``want`` or ``timeout`` s passed; the last state seen."""
    end = time.monotonic() + timeout
    while True:
        s = proc_state(pid)
        if s in want or time.monotonic() > end:
            return s
        time.sleep(0.01)
