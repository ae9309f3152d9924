"""The overcommit scenario suite (``pytest -m overcommit``): real Linux guests in a real
memory cgroup whose limit is below what they could use, under no policy, MoM's and ours.

Per scenario, three guests (384 + 256 + 256 MiB, QEMU under TCG) boot once, their QEMUs in a
child of this process's cgroup v1 memory cgroup, and are reused across the three policies (a
guest the kernel kills is booted again); one test per scenario keeps each within the
per-test timeout. See :mod:`lab.overcommit` for the scenarios. Asserted:
our policy has zero OOM kills of any kind in all four scenarios; with no balloon policy the
kernel kills a VM in (b) and (c). Everything else (MoM's kills, peak usage vs limit, the busy
workload's time, memory regained, backstop pauses) is recorded: ``overcommit.json`` under
the test's tmp dir, and the table is printed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from lab.overcommit import (
    POLICIES,
    SCENARIOS,
    ScenarioError,
    format_table,
    plot_results,
    run_suite,
)
from vdev.policy.cgroup import own_memory_cgroup

pytestmark = [pytest.mark.overcommit, pytest.mark.linux_guest]


def _need_v1_memory_cgroup() -> None:
    own = own_memory_cgroup()
    if own is None or own.version != 1 or os.geteuid() != 0:
        why = f"needs root and a cgroup v1 memory cgroup of our own (have {own})"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


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
    assert plot_results(results, tmp_path / "overcommit.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "overcommit.json").read_text())  # recorded
    by = {r.policy: r for r in results}
    ours = by["ours"]
    assert ours.cgroup_oom_kills == 0 and ours.guest_oom_kills == 0, table
    assert not ours.killed, table
    assert ours.busy_seconds is not None, table  # the busy guest finished its work
    if scenario in ("b", "c"):
        assert by["none"].cgroup_oom_kills >= 1, table
    if scenario != "d":  # in (d) the burst may fit before the policy is needed
        assert ours.regained_bytes > 0, table  # the memory came from the idle guests
