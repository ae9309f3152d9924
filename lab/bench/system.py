"""Machine and version facts, and the /proc readers the cases use."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

GIB = 1 << 30
MIB = 1 << 20
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def loadavg() -> list[float]:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def qemu_version() -> str | None:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version\s+(\S+)", out)
    return m.group(1) if m else out.strip().splitlines()[0] if out.strip() else None


def machine() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "memory_bytes": mem_total_bytes(),
        "hostname": platform.node(),
        "loadavg_at_start": loadavg(),
    }


def versions() -> dict[str, Any]:
    import matplotlib
    import numpy
    import trio

    return {
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "trio": trio.__version__,
        "matplotlib": matplotlib.__version__,
        "qemu": qemu_version(),
        "git": _git_head(),
    }


def _git_head() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out or None


@dataclass(frozen=True)
class ProcSample:
    """One look at a process: CPU seconds (user + system) and memory (bytes)."""

    cpu_s: float
    vm_rss: int
    rss_anon: int
    rss_file: int
    rss_shmem: int


def process_cpu_clock(pid: int) -> int:
    """The clock id of process ``pid``'s CPU-time clock (Linux ``clock_getcpuclockid``).

    ``MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)``: the scheduler's runtime of the whole
    thread group, exited threads included, in nanoseconds. ``/proc/PID/stat``'s utime and
    stime count in clock ticks (10 ms), too coarse for a short case: a quick 2 MiB inflate
    can use less than one tick and read as 0.
    """
    return ((~pid) << 3) | 2


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid``, nanosecond resolution.

    Falls back to ``/proc/PID/stat``'s ticks where the kernel refuses the CPU clock.
    """
    try:
        return time.clock_gettime(process_cpu_clock(pid))
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        # fields after the ")" that closes comm: state is field 3, utime 14, stime 15
        rest = stat[stat.rindex(")") + 2 :].split()
        return (int(rest[11]) + int(rest[12])) / _CLK_TCK


def proc_sample(pid: int) -> ProcSample:
    mem: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                mem[key] = int(value.split()[0]) * 1024
    return ProcSample(
        cpu_s=proc_cpu_s(pid),
        vm_rss=mem.get("VmRSS", 0),
        rss_anon=mem.get("RssAnon", 0),
        rss_file=mem.get("RssFile", 0),
        rss_shmem=mem.get("RssShmem", 0),
    )


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def allocated_bytes(fd: int) -> int:
    """Bytes the file really occupies (st_blocks)."""
    return os.fstat(fd).st_blocks * 512


def clock_tick_s() -> float:
    return 1.0 / _CLK_TCK
