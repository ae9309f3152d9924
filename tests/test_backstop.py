"""The v1 backstop's decisions (sans-I/O, hypothesis) and the stop guard (real processes):
a stopped process is continued when vdev's pipe closes, even after a ``kill -9`` of vdev."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proc_states import proc_state, wait_state

from vdev.policy.backstop import (
    BUSY_BYTES,
    REPAUSE_GRACE,
    STALL,
    PauseDecider,
    VmSample,
    margins,
)
from vdev.policy.guard import StopGuard, start_time

MiB = 1 << 20
LIMIT = 1024 * MiB


def test_margins_are_ordered_and_below_the_limit() -> None:
    for limit in (0, 10 * MiB, 256 * MiB, 64 << 30):
        pause_at, resume_below = margins(limit)
        assert 0 <= resume_below <= pause_at <= limit


def test_the_grower_is_stopped_at_the_pause_level_and_continued_below_resume() -> None:
    d = PauseDecider(deadline=30.0)
    pause_at, resume_below = margins(LIMIT)
    vms = [VmSample("quiet", 100, 300 * MiB), VmSample("hog", 200, 300 * MiB)]
    assert d.observe(0.0, pause_at - MiB, LIMIT, vms) == []
    vms = [VmSample("quiet", 100, 300 * MiB), VmSample("hog", 200, 340 * MiB)]
    acts = d.observe(0.1, pause_at, LIMIT, vms)
    assert [(a.kind, a.name, a.pid) for a in acts] == [("stop", "hog", 200)]
    # still above resume: nothing; not stopped twice
    assert d.observe(0.2, resume_below + MiB, LIMIT, vms) == []
    acts = d.observe(0.3, resume_below - MiB, LIMIT, vms)
    assert [(a.kind, a.name) for a in acts] == [("cont", "hog")]
    assert "back below" in acts[0].detail
    assert d.paused == {}


def test_nothing_grows_nothing_is_stopped_and_no_limit_means_no_pause() -> None:
    d = PauseDecider()
    vms = [VmSample("a", 1, 100 * MiB)]
    assert d.observe(0.0, LIMIT, LIMIT, vms) == []
    assert d.observe(0.5, LIMIT, LIMIT, vms) == []  # no growth
    assert d.observe(1.0, LIMIT, None, [VmSample("a", 1, 500 * MiB)]) == []


def test_every_busy_grower_is_stopped_else_only_the_largest() -> None:
    d = PauseDecider()
    base = [VmSample(n, i, 0) for i, n in enumerate("abc", 1)]
    d.observe(0.0, 0, LIMIT, base)
    grown = [VmSample("a", 1, BUSY_BYTES), VmSample("b", 2, 2 * BUSY_BYTES), VmSample("c", 3, 0)]
    acts = d.observe(0.1, LIMIT, LIMIT, grown)
    assert sorted(a.name for a in acts if a.kind == "stop") == ["a", "b"]
    d2 = PauseDecider()
    d2.observe(0.0, 0, LIMIT, base)
    small = [VmSample("a", 1, MiB), VmSample("b", 2, 2 * MiB), VmSample("c", 3, 0)]
    assert [a.name for a in d2.observe(0.1, LIMIT, LIMIT, small)] == ["b"]


def test_deadline_continues_and_grace_delays_a_second_stop() -> None:
    d = PauseDecider(deadline=5.0)
    d.observe(0.0, 0, LIMIT, [VmSample("hog", 7, 0)])
    assert [a.kind for a in d.observe(0.5, LIMIT, LIMIT, [VmSample("hog", 7, 50 * MiB)])] == [
        "stop"
    ]
    for i, t in enumerate((1.5, 2.5, 3.5, 4.5)):  # memory is being freed: no stall
        assert d.observe(t, LIMIT - (i + 1) * 5 * MiB, LIMIT, [VmSample("hog", 7, 50 * MiB)]) == []
    acts = d.observe(5.5, LIMIT - 25 * MiB, LIMIT, [VmSample("hog", 7, 50 * MiB)])
    assert [a.kind for a in acts] == ["cont"] and "deadline" in acts[0].detail
    assert d.observe(5.5 + REPAUSE_GRACE / 2, LIMIT, LIMIT, [VmSample("hog", 7, 60 * MiB)]) == []
    acts = d.observe(5.6 + REPAUSE_GRACE, LIMIT, LIMIT, [VmSample("hog", 7, 70 * MiB)])
    assert [a.kind for a in acts] == ["stop"]


def test_a_pause_that_frees_nothing_ends_after_the_stall_time() -> None:
    d = PauseDecider(deadline=30.0)
    d.observe(0.0, 0, LIMIT, [VmSample("hog", 7, 0)])
    assert [a.kind for a in d.observe(0.5, LIMIT, LIMIT, [VmSample("hog", 7, 50 * MiB)])] == [
        "stop"
    ]
    assert d.observe(0.5 + STALL - 0.1, LIMIT - MiB, LIMIT, [VmSample("hog", 7, 50 * MiB)]) == []
    acts = d.observe(0.5 + STALL, LIMIT - MiB, LIMIT, [VmSample("hog", 7, 50 * MiB)])
    assert [a.kind for a in acts] == ["cont"] and "stalled" in acts[0].detail


def test_a_disconnected_or_restarted_vm_is_continued() -> None:
    d = PauseDecider()
    d.observe(0.0, 0, LIMIT, [VmSample("hog", 7, 0)])
    d.observe(0.1, LIMIT, LIMIT, [VmSample("hog", 7, 50 * MiB)])
    acts = d.observe(0.2, LIMIT, LIMIT, [VmSample("hog", 8, 0)])  # same name, new QEMU
    assert [(a.kind, a.pid, a.detail) for a in acts] == [("cont", 7, "disconnected")]
    assert d.release() == []


vm_names = st.sampled_from(["a", "b", "c"])
steps = st.lists(
    st.tuples(
        st.floats(0.0, 3.0),  # time advance
        st.integers(0, LIMIT + 64 * MiB),  # usage
        st.dictionaries(vm_names, st.integers(0, 64 * MiB)),  # growth per VM this step
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(steps, st.floats(0.5, 10.0))
def test_decider_invariants(
    trace: list[tuple[float, int, dict[str, int]]], deadline: float
) -> None:
    """Never stopped twice, never continued unless stopped, never a stop below the pause
    level, never paused longer than the deadline, and release continues everyone."""
    d = PauseDecider(deadline=deadline)
    pause_at, _ = margins(LIMIT)
    now = 0.0
    alloc = {"a": 0, "b": 0, "c": 0}
    stopped: dict[str, float] = {}
    for advance, usage, growth in trace:
        now += advance
        for name, g in growth.items():
            alloc[name] += g
        vms = [VmSample(n, ord(n), b) for n, b in alloc.items()]
        for a in d.observe(now, usage, LIMIT, vms):
            if a.kind == "stop":
                assert a.name not in stopped
                assert usage >= pause_at
                stopped[a.name] = now
            else:
                assert a.name in stopped
                del stopped[a.name]
        assert set(stopped) == set(d.paused)
        for since in stopped.values():
            assert now - since < deadline or advance > 0  # checked at the step after
            assert now - since < deadline + 3.0
    released = {a.name for a in d.release()}
    assert released == set(stopped)


# --------------------------------------------------------------------------- the guard


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_guard_stops_and_continues(sleeper: subprocess.Popen[bytes]) -> None:
    guard = StopGuard()
    try:
        assert guard.stop(sleeper.pid)
        assert wait_state(sleeper.pid, {"T"}) == "T"
        guard.cont(sleeper.pid)
        assert wait_state(sleeper.pid, {"S", "R"}) in {"S", "R"}
        assert not guard.stop(2**22 + 12345)  # no such process: refused, not recorded
        guard.proc.kill()
        guard.proc.wait()
        assert not guard.stop(sleeper.pid)  # no guard, no stop
        assert proc_state(sleeper.pid) != "T"
    finally:
        guard.close()


def test_a_vdev_killed_with_sigkill_strands_nothing(sleeper: subprocess.Popen[bytes]) -> None:
    """A process playing vdev stops the sleeper through its guard, then is SIGKILLed: the
    guard sees its pipe close and continues the sleeper."""
    code = (
        "import os, sys, time\n"
        "from vdev.policy.guard import StopGuard\n"
        "g = StopGuard()\n"
        f"assert g.stop({sleeper.pid})\n"
        "print(g.proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    vdev = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert vdev.stdout is not None
    guard_pid = int(vdev.stdout.readline())
    assert wait_state(sleeper.pid, {"T"}) == "T"
    os.kill(vdev.pid, signal.SIGKILL)
    vdev.wait()
    assert wait_state(sleeper.pid, {"S", "R"}) in {"S", "R"}
    # the guard has exited (reaped by init once its parent died)
    end = time.monotonic() + 20
    while start_time(guard_pid) is not None and time.monotonic() < end:
        if proc_state(guard_pid) == "Z":
            break
        time.sleep(0.02)
    assert start_time(guard_pid) is None or proc_state(guard_pid) == "Z"


def test_guard_continues_on_sigterm_and_ignores_sigint(sleeper: subprocess.Popen[bytes]) -> None:
    guard = StopGuard()
    try:
        assert guard.stop(sleeper.pid)
        assert wait_state(sleeper.pid, {"T"}) == "T"
        assert guard.wait_ready()
        os.kill(guard.proc.pid, signal.SIGINT)
        os.kill(guard.proc.pid, signal.SIGHUP)
        time.sleep(0.2)  # had either signal killed it, it would be gone by now
        assert guard.proc.poll() is None and proc_state(sleeper.pid) == "T"
        os.kill(guard.proc.pid, signal.SIGTERM)
        assert guard.proc.wait(timeout=20) == 0
        assert wait_state(sleeper.pid, {"S", "R"}) in {"S", "R"}
    finally:
        guard.close()


def test_a_stopped_vm_makes_the_policy_count_the_gap_to_the_resume_level() -> None:
    from vdev.policy.backstop import Backstop

    b = Backstop([])
    b.deciders["/cg"] = PauseDecider()
    assert b.demand_bytes("/cg", LIMIT) == 0 and not b.is_paused("hog")
    assert b.demand_bytes("/other", LIMIT) == 0
    b.deciders["/cg"].paused["hog"] = (7, 0.0)
    assert b.demand_bytes("/cg", LIMIT) == LIMIT - margins(LIMIT)[1]
    assert b.is_paused("hog") and not b.is_paused("quiet")
    assert b.paused() == [{"name": "hog", "pid": 7, "cgroup": "/cg", "since": 0.0}]
