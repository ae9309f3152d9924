"""``scripts/demo``'s program (``python -m lab.demo --quick``), run as a user runs it:
a subprocess with a timeout. Each act's last line carries its numbers; they are checked here,
not only the exit status. Act 3 needs a QEMU (marked ``qemu``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import missing_prerequisite

from lab import qemu

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_demo(out: Path, *args: str, timeout: float) -> str:
    """The demo's output (stdout); fails with its tail if it did not exit 0."""
    argv = [sys.executable, "-m", "lab.demo", "--quick", "--out", str(out), *args]
    # wide enough that no result line wraps
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    print(done.stdout[-6000:])
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr}"
    return done.stdout


def result_line(out: str, act: int) -> str:
    """The summary's ``ok act N: ...`` line (the demo's own checks passed)."""
    lines = [ln for ln in out.splitlines() if re.match(rf"^(ok|FAIL)\s+act {act}: ", ln)]
    assert len(lines) == 1, f"no single summary line for act {act}:\n{out[-3000:]}"
    assert lines[0].startswith("ok"), lines[0]
    return lines[0]


def test_act1_balloon_follows_targets_and_host_memory_falls(tmp_path: Path) -> None:
    out = run_demo(tmp_path, "--act", "1", timeout=90)
    line = result_line(out, 1)
    m = re.search(
        r"balloon reached (\d+)/(\d+) targets \(([\d, ]+) MiB\); host RAM (\d+) MiB at the "
        r"start, (\d+) MiB with the (\d+) MiB balloon, (\d+) MiB at the end",
        line,
    )
    assert m, line
    reached, steps = int(m[1]), int(m[2])
    targets = [int(t) for t in m[3].split(", ")]
    start, fullest_host, fullest, end = (int(m[i]) for i in (4, 5, 6, 7))
    assert reached == steps == 3
    # quick: 2 GiB, 3 GiB capped at Mem.CtlMaxPercent (65 % of 4 GiB less the ROM holes), 0
    assert targets[0] == 2048 and 2600 < targets[1] < 2663 and targets[2] == 0
    assert fullest == targets[1]
    # the balloon took memory the workload had touched: the host got it back, and the
    # guest used it again once deflated
    assert fullest_host <= start - 200, line
    assert end > fullest_host, line
    assert (tmp_path / "act1-vdev.log").exists()


def test_act2_policy_balloons_by_shares(tmp_path: Path) -> None:
    out = run_demo(tmp_path, "--act", "2", timeout=90)
    line = result_line(out, 2)
    m = re.search(
        r"at the peak the policy held (\d+) MiB by shares: vm2 \(low\) (\d+) MiB > vm1 "
        r"\(normal\) (\d+) MiB > vm0 \(high\) (\d+) MiB; after the release (\d+) MiB ballooned",
        line,
    )
    assert m, line
    total, low, normal, high, left = (int(m[i]) for i in range(1, 6))
    assert low > normal > high > 0 and total == low + normal + high
    assert low <= 666  # Mem.CtlMaxPercent 65 % of 1 GiB, rounded up to the driver's 2 MiB page
    assert left == 0
    # the host went through the states and the policy said why at each step
    for state in ("clear", "low", "high"):
        assert re.search(rf"-> host {state} \(", out), state
    assert "pressure:low" in out and "capped:CtlMaxPercent" in out
    # vdev stat at the peak: three guests, policy control
    assert len(re.findall(r"^vm[012]\s+vmw\s+Y\s+Y\s.*\spolicy\s", out, re.M)) == 3, out
    for name in ("act2", "vm0", "vm1", "vm2"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000, png


@pytest.mark.qemu
def test_act3_real_vm_or_fallback(tmp_path: Path) -> None:
    if qemu.best_qemu(need_test_device=False) is None:
        missing_prerequisite("no QEMU (run scripts/setup)")
    out = run_demo(tmp_path, "--act", "3", timeout=90)
    line = result_line(out, 3)
    m = re.search(
        r"act 3: Linux (\S+) virtio_balloon inflated to (\d+) MiB \(balloon_inflate=(\d+)\) in "
        r"[\d.]+s; QEMU RssShmem (\d+) -> (\d+) MiB, (\d+) MiB after deflate and touch; "
        r"deflate on OOM to (\d+) MiB, oom_kill=(\d+)",
        line,
    )
    if m is None:  # no QEMU >= 10.2 or no Linux image: the fallback, and it says why
        check_qtest_fallback(line)
        assert re.search(r"^fallback: .*: the qtest guest", out, re.M), out
        return
    inflated, counted, rss0, rss1, rss2, oom_size, kills = (int(m[i]) for i in range(2, 9))
    assert inflated == 64 and counted == 64 * 256  # the guest's own vmstat, 4 KiB pages
    assert rss0 - rss1 >= 0.8 * 64 and rss2 - rss1 >= 0.6 * 64, line
    assert oom_size < 64 and kills == 0, line
    assert "guest> @vbg meminfo MemTotal=" in out
    assert re.search(r"guest> @vbg vmstat balloon_inflate=16384 ", out), out


@pytest.mark.qemu
def test_act3_qtest_fallback(tmp_path: Path) -> None:
    if qemu.best_qemu(need_test_device=False) is None:
        missing_prerequisite("no QEMU (run scripts/setup)")
    out = run_demo(tmp_path, "--act", "3", "--qtest", timeout=60)
    check_qtest_fallback(result_line(out, 3))


def check_qtest_fallback(line: str) -> None:
    m = re.search(
        r"act 3: fell back to the qtest guest \((.+)\); vmw driver over QEMU \S+ inflated to "
        r"(\d+) MiB in [\d.]+s; QEMU RssShmem (\d+) -> (\d+) MiB, (\d+) MiB after",
        line,
    )
    assert m and m[1], line
    inflated, rss0, rss1, rss2 = (int(m[i]) for i in range(2, 6))
    assert inflated == 64 and rss0 - rss1 >= 0.8 * 64 and rss2 - rss1 >= 0.8 * 64, line
