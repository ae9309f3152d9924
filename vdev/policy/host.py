"""Host memory sampling for the policy: pure parsers for Linux memory statistics, a thin
reader, and a simulated host for tests and demos.

The parsers take text and never touch the file system, so they can be fed captured text;
only :func:`read_host_sample` opens files. Malformed text raises
:class:`protocol.errors.HostResourceError` (the host, not a peer, is at fault).

Sources: Documentation/filesystems/proc.rst (``/proc/meminfo``),
Documentation/accounting/psi.rst (``/proc/pressure/memory``, cgroup ``memory.pressure``),
Documentation/admin-guide/cgroup-v2.rst (``memory.max``, ``memory.current``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from protocol.errors import ConfigError, HostResourceError
from protocol.units import PAGE_SIZE
from vdev.policy.cgroup import CgroupReading, non_negative_int, read_text
from vdev.policy.model import HostSample

# --------------------------------------------------------------------------------------------
# /proc/meminfo


@dataclass(frozen=True)
class MemInfo:
    total_bytes: int
    free_bytes: int
    #: MemAvailable (Linux >= 3.14): free plus what reclaim can get back cheaply (page cache,
    #: reclaimable slab). None on kernels that do not report it.
    available_bytes: int | None


def parse_meminfo_fields(text: str) -> dict[str, int]:
    """Every ``Key: value [kB]`` line of /proc/meminfo, in bytes (unit-less lines: as is)."""
    values: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        words = rest.split()
        if not sep or not key or not 1 <= len(words) <= 2:
            raise HostResourceError(f"meminfo line {number}: cannot parse {line!r}")
        try:
            value = int(words[0])
        except ValueError:
            raise HostResourceError(f"meminfo line {number}: bad number in {line!r}") from None
        if value < 0:
            raise HostResourceError(f"meminfo line {number}: negative value in {line!r}")
        if len(words) == 2:
            if words[1] != "kB":  # the kernel prints kB (meaning KiB) or nothing
                raise HostResourceError(f"meminfo line {number}: unknown unit in {line!r}")
            value *= 1024
        values[key.strip()] = value
    return values


def parse_meminfo(text: str) -> MemInfo:
    values = parse_meminfo_fields(text)
    try:
        total, free = values["MemTotal"], values["MemFree"]
    except KeyError as missing:
        raise HostResourceError(f"meminfo has no {missing.args[0]}") from None
    return MemInfo(total_bytes=total, free_bytes=free, available_bytes=values.get("MemAvailable"))


# --------------------------------------------------------------------------------------------
# PSI: /proc/pressure/memory and cgroup v2 memory.pressure (same format)


@dataclass(frozen=True)
class PsiLine:
    """Share of wall time (percent) that some / all tasks stalled on memory, averaged over
    10, 60 and 300 s, and the total stall time in microseconds."""

    avg10: float
    avg60: float
    avg300: float
    total_us: int


@dataclass(frozen=True)
class Psi:
    some: PsiLine
    full: PsiLine | None  # absent on kernels before 5.13 for the cpu file; memory always has it


def _parse_psi_line(line: str) -> tuple[str, PsiLine]:
    kind, *pairs = line.split()
    fields: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise HostResourceError(f"PSI: expected name=value, got {pair!r} in {line!r}")
        fields[name] = value
    try:
        averages = [float(fields[name]) for name in ("avg10", "avg60", "avg300")]
        total = int(fields["total"])
    except KeyError as missing:
        raise HostResourceError(f"PSI: {missing.args[0]} missing in {line!r}") from None
    except ValueError:
        raise HostResourceError(f"PSI: bad number in {line!r}") from None
    if not all(math.isfinite(a) and 0.0 <= a <= 100.0 for a in averages) or total < 0:
        raise HostResourceError(f"PSI: value out of range in {line!r}")
    return kind, PsiLine(averages[0], averages[1], averages[2], total)


def parse_psi(text: str) -> Psi:
    lines: dict[str, PsiLine] = {}
    for line in text.splitlines():
        if line.strip():
            kind, parsed = _parse_psi_line(line)
            if kind not in ("some", "full"):
                raise HostResourceError(f"PSI: unknown line kind {kind!r}")
            if kind in lines:
                raise HostResourceError(f"PSI: {kind!r} line repeated")
            lines[kind] = parsed
    if "some" not in lines:
        raise HostResourceError("PSI: no 'some' line")
    return Psi(some=lines["some"], full=lines.get("full"))


# --------------------------------------------------------------------------------------------
# cgroup v2 memory.max / memory.current


def _single_value(text: str, what: str) -> str:
    words = text.split()
    if len(words) != 1:
        raise HostResourceError(f"{what}: expected one value, got {text!r}")
    return words[0]


def parse_memory_max(text: str) -> int | None:
    """cgroup v2 ``memory.max``: bytes, or None for ``max`` (no limit)."""
    word = _single_value(text, "memory.max")
    return None if word == "max" else non_negative_int(word, "memory.max")


def parse_memory_current(text: str) -> int:
    """cgroup v2 ``memory.current``: bytes in use by the cgroup and its descendants."""
    return non_negative_int(_single_value(text, "memory.current"), "memory.current")


# --------------------------------------------------------------------------------------------
# Samples


def host_sample_from_meminfo(info: MemInfo, psi: Psi | None = None) -> HostSample:
    """Free = MemAvailable (MemFree if the kernel lacks it).

    MemFree alone would count page cache as used and make an idle host with a warm cache
    look like it is under pressure; ESXi's "free" likewise excludes nothing it could hand out.
    """
    free = info.available_bytes if info.available_bytes is not None else info.free_bytes
    return HostSample(
        total_bytes=info.total_bytes,
        free_bytes=min(free, info.total_bytes),
        psi_some_avg10=psi.some.avg10 if psi else None,
        psi_full_avg10=psi.full.avg10 if psi and psi.full else None,
    )


def host_sample_from_cgroup(
    memory_max: int | None,
    memory_current: int,
    host: HostSample,
    psi: Psi | None = None,
) -> HostSample:
    """The host as seen from inside a cgroup: total is the smaller of the cgroup limit and the
    host; free is the smaller of the cgroup's headroom and the host's free memory."""
    total = host.total_bytes if memory_max is None else min(memory_max, host.total_bytes)
    headroom = max(0, total - memory_current)
    return HostSample(
        total_bytes=total,
        free_bytes=min(headroom, host.free_bytes),
        psi_some_avg10=psi.some.avg10 if psi else host.psi_some_avg10,
        psi_full_avg10=psi.full.avg10 if psi and psi.full else host.psi_full_avg10,
    )


def host_sample_from_readings(
    readings: list[CgroupReading], host: HostSample, growth: Mapping[str, int] | None = None
) -> HostSample:
    """The host as the watched cgroups see it: the most constrained one (the smallest free
    share of its limit) decides, as :func:`host_sample_from_cgroup`; its PSI if it has one
    (cgroup v2), else the host's. No reading with a limit: the host as it is.

    ``growth``: bytes each cgroup (by path) is expected to grow by before ballooning can
    answer (its recent growth rate times a horizon); counted as already used, so that a
    burst is met before it reaches the limit rather than after."""
    best: HostSample | None = None
    for r in readings:
        ahead = (growth or {}).get(r.source.path, 0)
        r = dataclasses.replace(r, usage_bytes=r.usage_bytes + max(0, ahead))
        psi_some = r.psi_some_avg10 if r.psi_some_avg10 is not None else host.psi_some_avg10
        psi_full = r.psi_full_avg10 if r.psi_full_avg10 is not None else host.psi_full_avg10
        total = host.total_bytes if r.limit_bytes is None else min(r.limit_bytes, host.total_bytes)
        free = min(max(0, total - r.usage_bytes), host.free_bytes)
        sample = HostSample(total, free, psi_some, psi_full)
        if best is None or sample.free_bytes * max(1, best.total_bytes) < best.free_bytes * max(
            1, sample.total_bytes
        ):
            best = sample
    return best if best is not None else host


def read_host_sample(proc: str = "/proc", cgroup_dir: str | None = None) -> HostSample:
    """Sample the real host (the only function here that does I/O).

    ``cgroup_dir`` (for example ``/sys/fs/cgroup/machine.slice``) narrows the view to a cgroup
    v2 memory controller; PSI is read if the kernel has it (CONFIG_PSI).
    """
    meminfo = read_text(os.path.join(proc, "meminfo"))
    if meminfo is None:
        raise HostResourceError(f"{proc}/meminfo does not exist")
    psi_text = read_text(os.path.join(proc, "pressure", "memory"))
    host = host_sample_from_meminfo(
        parse_meminfo(meminfo), parse_psi(psi_text) if psi_text else None
    )
    if cgroup_dir is None:
        return host
    max_text = read_text(os.path.join(cgroup_dir, "memory.max"))
    current_text = read_text(os.path.join(cgroup_dir, "memory.current"))
    if max_text is None or current_text is None:
        raise HostResourceError(f"{cgroup_dir} has no cgroup v2 memory controller files")
    cg_psi_text = read_text(os.path.join(cgroup_dir, "memory.pressure"))
    return host_sample_from_cgroup(
        parse_memory_max(max_text),
        parse_memory_current(current_text),
        host,
        parse_psi(cg_psi_text) if cg_psi_text else None,
    )


# --------------------------------------------------------------------------------------------
# Simulation


class SimulatedHost:
    """A host whose memory is whatever the test says. Ballooned pages come back as free
    memory, which closes the loop for convergence tests and demos.

    Free memory is shown within 0..total, but the balance behind it is kept whole: a balloon
    that grows while free memory is already at the total, then shrinks, leaves free memory
    where it was (clamping the balance itself lost what the clamp cut, every cycle)."""

    def __init__(self, total_bytes: int, free_bytes: int) -> None:
        if not 0 <= free_bytes <= total_bytes:
            raise ConfigError(f"need 0 <= free ({free_bytes}) <= total ({total_bytes})")
        self.total_bytes = total_bytes
        self._balance = free_bytes

    @property
    def free_bytes(self) -> int:
        return min(max(0, self._balance), self.total_bytes)

    @free_bytes.setter
    def free_bytes(self, value: int) -> None:
        self._balance = min(max(0, value), self.total_bytes)

    def balloon_changed(self, delta_pages: int) -> None:
        """Balloons grew (positive) or shrank (negative) by ``delta_pages`` pages in total."""
        self._balance += delta_pages * PAGE_SIZE

    def sample(self) -> HostSample:
        return HostSample(total_bytes=self.total_bytes, free_bytes=self.free_bytes)
