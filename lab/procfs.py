"""What /proc says about a process's guest RAM (QEMU's, or ``guest-driver run``'s memfd):
``RssShmem`` (the shared pages it has touched that are still in the memfd: a punched page
leaves it), the memfds' allocated bytes, and which pages of one are holes (opened from
outside through ``/proc/PID/fd``). Used by the qtest VM and the Linux guest rigs, the demo
and the end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

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


def open_memfd(pid: int, name: str) -> int:
    """A read-only fd of the first memfd named ``name`` that process ``pid`` holds open (the
    same file, opened anew through ``/proc/PID/fd``); the caller closes it."""
    for entry in sorted(Path(f"/proc/{pid}/fd").iterdir(), key=lambda e: int(e.name)):
        try:
            if os.readlink(entry).startswith(f"/memfd:{name} "):
                return os.open(entry, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
    raise LocalError(f"process {pid} holds no memfd named {name!r}")


SEEK_DATA, SEEK_HOLE = 3, 4


def hole_mask(fd: int, first_pfn: int, count: int, page: int = 4096) -> npt.NDArray[np.bool_]:
    """Per page of ``[first_pfn, first_pfn + count)`` of file ``fd``: whether it is a hole
    (SEEK_DATA / SEEK_HOLE, no per-page loop)."""
    holes = np.ones(count, dtype=bool)
    start, end = first_pfn * page, (first_pfn + count) * page
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        if data >= end:
            break
        stop = min(os.lseek(fd, data, SEEK_HOLE), end)
        holes[(data - start) // page : -(-(stop - start) // page)] = False
        pos = stop
    return holes
