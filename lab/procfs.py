"""What /proc says about a QEMU process's guest RAM: ``RssShmem`` (the shared pages it has
touched that are still in the memfd: a punched page leaves it) and the memfds' allocated
bytes. Used by the qtest VM and the Linux guest rigs, the demo and the end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

from protocol.errors import LocalError


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` line of ``/proc/PID/status`` (``RssShmem``, ``VmRSS``...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise LocalError(f"no {key} in /proc/{pid}/status")


def rss_shmem_kib(pid: int) -> int:
    """``RssShmem`` of a process (kB): the shared guest RAM it has mapped and touched, and
    that is still in the memfd (a punched page leaves it)."""
    return proc_status_kib(pid, "RssShmem")


def memfd_allocated_bytes(pid: int, name: str = "memory-backend-memfd") -> int:
    """Allocated bytes (``st_blocks``) of the memfds named ``name`` that process ``pid`` holds
    open (QEMU names every ``memory-backend-memfd``'s memfd so)."""
    seen: set[int] = set()
    total = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
            if not target.startswith(f"/memfd:{name} "):
                continue
            st = entry.stat()
        except OSError:
            continue
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total

