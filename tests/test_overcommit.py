"""The overcommit scenario suite (``pytest -m overcommit``, in the default run): real Linux
guests in a real memory cgroup whose limit is below what they could use, under no policy,
MoM's and ours.

Per scenario, three guests (384 + 256 + 256 MiB, QEMU under TCG) boot once, their QEMUs in a
child of this process's cgroup v1 memory cgroup, and are reused across the three policies (a
guest the kernel kills is booted again); each phase and the whole scenario have deadlines
(:class:`lab.overcommit.PhaseTimeout` says which phase, which guest, and what everything
looked like), well inside the per-test timeout. See :mod:`lab.overcommit` for the scenarios.
Asserted: our policy has zero OOM kills of any kind in all four scenarios and the busy
workload finishes; with no balloon policy the kernel kills a VM in (b) and (c); in (a)-(c)
ours took the memory from the idle guests; in (d) ours had inflated the idle guests and
deflates them once the busy guest stops. Everything else (MoM's kills, peak usage vs limit,
the busy workload's time, memory regained, backstop pauses) is recorded: ``overcommit.json``
under the test's tmp dir (drawn by ``vdev plot --recording``, checked here), and the table
is printed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lab import overcommit
from lab.linux_guest import MIB
from lab.overcommit import (
    DEFLATE_TIMEOUT,
    DEFLATED_MIB,
    INFLATED_MIB,
    POLICIES,
    SCENARIOS,
    PhaseTimeout,
    ScenarioError,
    format_table,
    plot_results,
    run_suite,
    scenario_budget,
)
from vdev.cli.main import main
from vdev.cli.plot import load_recording
from vdev.policy.cgroup import own_memory_cgroup

pytestmark = [pytest.mark.overcommit, pytest.mark.linux_guest]


def _need_v1_memory_cgroup() -> None:
    own = own_memory_cgroup()
    if own is None or own.version != 1 or os.geteuid() != 0:
        why = f"needs root and a cgroup v1 memory cgroup of our own (have {own})"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


# the suite bounds itself (scenario_budget); pytest's timeout is only the last resort
@pytest.mark.timeout(scenario_budget(len(POLICIES)) + 60)
@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_overcommit_scenario(
    scenario: str, linux_env: tuple[Any, Any], tmp_path: Path
) -> None:
    _need_v1_memory_cgroup()
    q, image = linux_env
    try:
        results = await run_suite(q, image, tmp_path, [scenario], POLICIES)
    except ScenarioError as e:
        pytest.fail(str(e))
    table = format_table(results)
    print("\n" + table)
    (tmp_path / "overcommit.txt").write_text(table + "\n")
    # the recording is what vdev plot draws: the same file, the same drawing
    recording = tmp_path / "overcommit.json"
    runs = load_recording(str(recording))
    assert [(r.scenario, r.policy) for r in runs] == [(scenario, p) for p in POLICIES]
    assert all(len(r.timeline) > 10 for r in runs)
    assert plot_results(results, tmp_path / "overcommit.png").stat().st_size > 10_000
    cli = CliRunner().invoke(
        main, ["plot", "--recording", str(recording), "-o", str(tmp_path / "cli.png")]
    )
    assert cli.exit_code == 0, cli.output
    assert (tmp_path / "cli.png").stat().st_size > 10_000

    by = {r.policy: r for r in results}
    ours = by["ours"]
    assert ours.cgroup_oom_kills == 0 and ours.guest_oom_kills == 0, table
    assert not ours.killed, table
    assert not ours.dropped, table  # no guest lost its balloon device
    assert ours.busy_seconds is not None, table  # the busy guest finished its work
    decisions = [e for e in ours.events if e["type"] == "target"]
    assert decisions and all(e["reason"] for e in decisions), table  # recorded, with reasons
    if scenario in ("b", "c"):
        assert by["none"].cgroup_oom_kills >= 1, table
        assert by["none"].killed, table
    if scenario != "d":
        assert ours.regained_bytes > 0, table  # the memory came from the idle guests
    else:
        # pressure came (the idle guests were inflated), then ended: the balloons come back
        assert ours.idle_balloon_peak_bytes >= INFLATED_MIB * MIB, table
        assert ours.deflated_seconds is not None, f"not deflated in {DEFLATE_TIMEOUT}s\n{table}"
        last = ours.timeline[-1]["vms"]
        assert last["vm1"]["balloon"] + last["vm2"]["balloon"] <= DEFLATED_MIB * MIB, table


def _our_children() -> list[str]:
    """Processes whose parent is this one (the QEMUs the suite starts), with their names."""
    mine = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, _, rest = text.partition("(")[2].rpartition(")")
        fields = rest.split()
        if len(fields) > 1 and int(fields[1]) == os.getpid() and fields[0] != "Z":
            mine.append(f"{stat.parent.name} {comm}")
    return mine


def _our_cgroups() -> list[Path]:
    own = own_memory_cgroup()
    assert own is not None
    return sorted(Path(own.path).glob(f"vballoon-overcommit-{os.getpid()}-*"))


@pytest.mark.timeout(120)
async def test_phase_timeout_names_the_phase_and_cleans_up(
    linux_env: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A phase past its deadline (here: booting the guests, given 3 s) fails naming the
    scenario, the policy, the phase and the guest, with what QEMU, vdev and the cgroup said;
    every QEMU is killed and reaped, and the child cgroup removed."""
    _need_v1_memory_cgroup()
    q, image = linux_env
    monkeypatch.setitem(overcommit.PHASE_SECONDS, "boot", 3.0)
    before = _our_cgroups()
    with pytest.raises(PhaseTimeout) as info:
        await run_suite(q, image, tmp_path, ["b"], ["ours"])
    text = str(info.value)
    assert re.search(r"^scenario b, policy ours: boot \(vm[012]\): not done after 3s$", text, re.M)
    assert "usage" in text and "limit" in text and "oom_kill_disable" in text
    for name in ("vm0", "vm1", "vm2"):
        assert re.search(rf"^{name}: QEMU pid \d+ ", text, re.M), text
    assert "vdev   | " in text and "serving virtio-balloon" in text
    assert _our_children() == []  # every QEMU reaped
    assert _our_cgroups() == before  # the child cgroup removed
    assert not (tmp_path / "overcommit.json").exists()
