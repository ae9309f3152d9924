"""Tests for vdev/policy/host.py: parsers fed text captured from a real host, malformed input,
the cgroup view, and the simulated host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import HostResourceError
from protocol.units import PAGE_SIZE
from vdev.policy.host import (
    MemInfo,
    Psi,
    PsiLine,
    SimulatedHost,
    host_sample_from_cgroup,
    host_sample_from_meminfo,
    parse_meminfo,
    parse_meminfo_fields,
    parse_memory_current,
    parse_memory_max,
    parse_psi,
    read_host_sample,
)
from vdev.policy.model import HostSample

# `cat /proc/meminfo` on the build machine (Linux 6.18, 24 GB, no swap), verbatim.
MEMINFO_CAPTURED = """\
MemTotal:       24684084 kB
MemFree:        22286944 kB
MemAvailable:   23869700 kB
Buffers:           24548 kB
Cached:          1702624 kB
SwapCached:            0 kB
Active:           652868 kB
Inactive:        1412256 kB
Active(anon):       1608 kB
Inactive(anon):   345220 kB
Active(file):     651260 kB
Inactive(file):  1067036 kB
Unevictable:       20492 kB
Mlocked:           19488 kB
SwapTotal:             0 kB
SwapFree:              0 kB
Zswap:                 0 kB
Zswapped:              0 kB
Dirty:            170576 kB
Writeback:             0 kB
AnonPages:        358488 kB
Mapped:            54744 kB
Shmem:              8872 kB
KReclaimable:     150476 kB
Slab:             179896 kB
SReclaimable:     150476 kB
SUnreclaim:        29420 kB
KernelStack:        2004 kB
PageTables:         4104 kB
SecPageTables:         0 kB
NFS_Unstable:          0 kB
Bounce:                0 kB
WritebackTmp:          0 kB
CommitLimit:    12342040 kB
Committed_AS:     774996 kB
VmallocTotal:   34359738367 kB
VmallocUsed:       14828 kB
VmallocChunk:          0 kB
Percpu:              736 kB
AnonHugePages:         0 kB
ShmemHugePages:        0 kB
ShmemPmdMapped:        0 kB
FileHugePages:     59392 kB
FilePmdMapped:         0 kB
Balloon:               0 kB
HugePages_Total:       0
HugePages_Free:        0
HugePages_Rsvd:        0
HugePages_Surp:        0
Hugepagesize:       2048 kB
Hugetlb:               0 kB
DirectMap4k:       30720 kB
DirectMap2M:     2066432 kB
DirectMap1G:    25165824 kB
"""

# `cat /proc/pressure/memory` on the same machine (idle).
PSI_MEMORY_CAPTURED = """\
some avg10=0.00 avg60=0.00 avg300=0.00 total=0
full avg10=0.00 avg60=0.00 avg300=0.00 total=0
"""

# `cat /proc/pressure/cpu` on the same machine, captured during a busy moment: same format,
# non-zero figures.
PSI_BUSY_CAPTURED = """\
some avg10=72.59 avg60=44.18 avg300=15.04 total=56708450
full avg10=0.00 avg60=0.00 avg300=0.00 total=0
"""

# A 2.6-era /proc/meminfo (before MemAvailable, Linux 3.14): the head of the file.
MEMINFO_OLD_KERNEL = """\
MemTotal:        2059532 kB
MemFree:          101404 kB
Buffers:          161220 kB
Cached:          1125252 kB
"""

KIB = 1024


# --------------------------------------------------------------------------------------------
# /proc/meminfo


def test_meminfo_captured() -> None:
    info = parse_meminfo(MEMINFO_CAPTURED)
    assert info == MemInfo(
        total_bytes=24_684_084 * KIB,
        free_bytes=22_286_944 * KIB,
        available_bytes=23_869_700 * KIB,
    )
    fields = parse_meminfo_fields(MEMINFO_CAPTURED)
    assert len(fields) == 54
    assert fields["HugePages_Total"] == 0  # no unit: a count, not kB
    assert fields["Hugepagesize"] == 2048 * KIB
    assert fields["Active(file)"] == 651_260 * KIB  # parentheses in the key


def test_meminfo_sample_uses_mem_available() -> None:
    sample = host_sample_from_meminfo(parse_meminfo(MEMINFO_CAPTURED))
    assert sample == HostSample(total_bytes=24_684_084 * KIB, free_bytes=23_869_700 * KIB)


def test_meminfo_old_kernel_falls_back_to_mem_free() -> None:
    info = parse_meminfo(MEMINFO_OLD_KERNEL)
    assert info.available_bytes is None
    assert host_sample_from_meminfo(info).free_bytes == 101_404 * KIB


@pytest.mark.parametrize(
    "text",
    [
        "",  # no MemTotal
        "MemFree: 100 kB\n",  # no MemTotal
        "MemTotal: 100 kB\n",  # no MemFree
        "MemTotal 100 kB\nMemFree: 1 kB\n",  # no colon
        "MemTotal: kB\nMemFree: 1 kB\n",  # no number
        "MemTotal: 1x00 kB\nMemFree: 1 kB\n",
        "MemTotal: -100 kB\nMemFree: 1 kB\n",
        "MemTotal: 100 MB\nMemFree: 1 kB\n",  # the kernel never prints MB
        "MemTotal: 100 kB extra\nMemFree: 1 kB\n",
        "MemTotal:\nMemFree: 1 kB\n",
        ": 100 kB\nMemTotal: 100 kB\nMemFree: 1 kB\n",  # empty key
    ],
)
def test_meminfo_malformed(text: str) -> None:
    with pytest.raises(HostResourceError):
        parse_meminfo(text)


def test_meminfo_sample_clamps_available_above_total() -> None:
    # Not seen in practice, but MemAvailable is an estimate: never report free > total.
    info = MemInfo(total_bytes=100, free_bytes=50, available_bytes=150)
    assert host_sample_from_meminfo(info).free_bytes == 100


# --------------------------------------------------------------------------------------------
# PSI


def test_psi_captured_idle() -> None:
    assert parse_psi(PSI_MEMORY_CAPTURED) == Psi(
        some=PsiLine(0.0, 0.0, 0.0, 0), full=PsiLine(0.0, 0.0, 0.0, 0)
    )


def test_psi_captured_busy() -> None:
    psi = parse_psi(PSI_BUSY_CAPTURED)
    assert psi.some == PsiLine(72.59, 44.18, 15.04, 56_708_450)
    sample = host_sample_from_meminfo(parse_meminfo(MEMINFO_CAPTURED), psi)
    assert (sample.psi_some_avg10, sample.psi_full_avg10) == (72.59, 0.0)


def test_psi_without_full_line() -> None:
    # Kernels before 5.13 print no "full" line for the cpu file; accept it everywhere.
    psi = parse_psi("some avg10=1.50 avg60=0.20 avg300=0.00 total=1234\n")
    assert psi.full is None
    assert host_sample_from_meminfo(MemInfo(100, 50, None), psi).psi_full_avg10 is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",  # no "some"
        "some avg10=0.00 avg60=0.00 total=0\n",  # avg300 missing
        "some avg10=0.00 avg60=0.00 avg300=0.00\n",  # total missing
        "some avg10=x avg60=0.00 avg300=0.00 total=0\n",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=1.5\n",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=-1\n",
        "some avg10=101.00 avg60=0.00 avg300=0.00 total=0\n",  # a share of time, <= 100 %
        "some avg10=nan avg60=0.00 avg300=0.00 total=0\n",
        "some avg10 0.00 avg60=0.00 avg300=0.00 total=0\n",
        "most avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        PSI_MEMORY_CAPTURED + PSI_MEMORY_CAPTURED,  # repeated lines
    ],
)
def test_psi_malformed(text: str) -> None:
    with pytest.raises(HostResourceError):
        parse_psi(text)


# --------------------------------------------------------------------------------------------
# cgroup v2 (this build machine runs cgroup v1 for memory; the texts follow cgroup-v2.rst)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("max\n", None), ("8589934592\n", 8 * 1024**3), ("0\n", 0)],
)
def test_memory_max(text: str, expected: int | None) -> None:
    assert parse_memory_max(text) == expected


@pytest.mark.parametrize("text", ["", "\n", "-1\n", "8G\n", "max max\n", "1 2\n", "MAX\n"])
def test_memory_max_malformed(text: str) -> None:
    with pytest.raises(HostResourceError):
        parse_memory_max(text)


@pytest.mark.parametrize("text", ["", "max\n", "-5\n", "12 kB\n", "0x10\n"])
def test_memory_current_malformed(text: str) -> None:
    with pytest.raises(HostResourceError):
        parse_memory_current(text)


def test_cgroup_sample() -> None:
    host = HostSample(total_bytes=24 * 1024**3, free_bytes=20 * 1024**3, psi_some_avg10=0.5)
    # 8 GiB limit, 6 GiB used: the cgroup sees 8 GiB total and 2 GiB free.
    sample = host_sample_from_cgroup(parse_memory_max("8589934592\n"), 6 * 1024**3, host)
    assert (sample.total_bytes, sample.free_bytes) == (8 * 1024**3, 2 * 1024**3)
    assert sample.psi_some_avg10 == 0.5  # no cgroup PSI: the host's
    # Over the limit (memory.current can exceed memory.max briefly): free 0, not negative.
    assert host_sample_from_cgroup(8 * 1024**3, 9 * 1024**3, host).free_bytes == 0
    # No limit: the host's total; the host's free memory bounds the headroom.
    unlimited = host_sample_from_cgroup(None, 1 * 1024**3, host)
    assert (unlimited.total_bytes, unlimited.free_bytes) == (24 * 1024**3, 20 * 1024**3)
    psi = parse_psi(PSI_BUSY_CAPTURED)
    assert host_sample_from_cgroup(None, 0, host, psi).psi_some_avg10 == 72.59


# --------------------------------------------------------------------------------------------
# The reader (the one function with I/O), over a fake /proc and cgroup directory


def test_read_host_sample_from_files(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "pressure").mkdir(parents=True)
    (proc / "meminfo").write_text(MEMINFO_CAPTURED)
    (proc / "pressure" / "memory").write_text(PSI_BUSY_CAPTURED)
    sample = read_host_sample(str(proc))
    assert sample.free_bytes == 23_869_700 * KIB
    assert sample.psi_some_avg10 == 72.59

    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text(f"{4 * 1024**3}\n")
    sample = read_host_sample(str(proc), str(cgroup))
    assert sample.free_bytes == 24_684_084 * KIB - 4 * 1024**3

    (proc / "pressure" / "memory").unlink()  # kernel without CONFIG_PSI
    assert read_host_sample(str(proc)).psi_some_avg10 is None
    with pytest.raises(HostResourceError):
        read_host_sample(str(proc), str(tmp_path / "no-such-cgroup"))
    with pytest.raises(HostResourceError):
        read_host_sample(str(tmp_path / "no-such-proc"))


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux /proc")
def test_read_real_host() -> None:
    sample = read_host_sample()
    assert 0 < sample.free_bytes <= sample.total_bytes


# --------------------------------------------------------------------------------------------
# SimulatedHost


def test_simulated_host() -> None:
    sim = SimulatedHost(total_bytes=1000 * PAGE_SIZE, free_bytes=100 * PAGE_SIZE)
    assert sim.sample() == HostSample(1000 * PAGE_SIZE, 100 * PAGE_SIZE)
    sim.balloon_changed(50)  # balloons took 50 pages from guests: the host has them back
    assert sim.free_bytes == 150 * PAGE_SIZE
    sim.balloon_changed(-500)  # clamped at 0
    assert sim.free_bytes == 0
    sim.free_bytes = 10**15  # clamped at total
    assert sim.sample().free_bytes == 1000 * PAGE_SIZE
    with pytest.raises(ValueError):
        SimulatedHost(total_bytes=10, free_bytes=11)


@given(st.lists(st.integers(-2000, 2000), max_size=30), st.integers(0, 1000))
def test_a_simulated_host_gets_back_what_its_balloons_give_back(
    deltas: list[int], free: int
) -> None:
    """Whatever the balloons did in between (free memory pinned at 0 or at the total for a
    while), once they are back where they were free memory is back where it was: the clamp
    to 0..total is what is shown, not what is kept (it used to lose the part cut off)."""
    sim = SimulatedHost(total_bytes=1000 * PAGE_SIZE, free_bytes=free * PAGE_SIZE)
    for d in deltas:
        sim.balloon_changed(d)
        assert 0 <= sim.free_bytes <= sim.total_bytes
    sim.balloon_changed(-sum(deltas))
    assert sim.free_bytes == free * PAGE_SIZE
