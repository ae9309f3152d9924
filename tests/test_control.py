"""vdev/policy/control.py: the policy loop over the real GuestRegistry (guests are fakes that follow
their targets): simulated host pressure -> targets on the registry's guests, manual
override, the inflation rate limit, history, rates, events, the period and pokes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
import trio.testing
from control_fakes import FakeGuest, make_registry

from protocol.errors import HostResourceError, NotSimulated
from protocol.units import PAGE_SIZE
from vdev.config import ControlConfig, VmConfig
from vdev.devices.base import DeviceStatus
from vdev.policy.control import ControlPlane, find_cgroup_v2_dir
from vdev.policy.model import HostSample, HostState

MIB = 1 << 20
GIB = 1 << 30
VM_PAGES = GIB // PAGE_SIZE  # 262144


def simulated(host_memory: int = 4 * GIB, **kw: object) -> ControlConfig:
    cfg = ControlConfig(host_memory=host_memory)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


async def test_pressure_targets_applied_to_registry_guests() -> None:
    with trio.fail_after(5):
        registry, guests = make_registry(VM_PAGES, VM_PAGES)
        control = ControlPlane(registry, simulated())
        assert control.host_source == "simulated"
        d0 = control.step(now=0.0)
        assert d0 is not None and d0.state is HostState.HIGH
        assert [registry.view(n).target_pages for n in ("vm0", "vm1")] == [0, 0]

        # 100 MiB free of 4 GiB: below 64 % of minFree (245 MiB) -> SOFT, ballooning.
        control.set_simulated_free(100 * MIB)
        d1 = control.step(now=1.0)
        assert d1 is not None and d1.state is HostState.SOFT
        for name in ("vm0", "vm1"):
            issued = d1.vms[name].target_pages
            assert issued > 0
            assert registry.view(name).target_pages == issued  # applied to the guest
            assert control.reason(name).startswith(("pressure:", "rate-limited"))
        # Equal VMs, equal shares: the pressure is split evenly (within rounding).
        assert abs(d1.vms["vm0"].target_pages - d1.vms["vm1"].target_pages) <= 1
        host = control.host_info()
        assert host["state"] == "soft" and host["free_bytes"] == 100 * MIB

        # The guests inflate; the simulated host gets the memory back and leaves SOFT.
        for g in guests:
            g.settle()
        d2 = control.step(now=2.0)
        assert d2 is not None and d2.state is not HostState.SOFT
        assert control.last_sample is not None
        assert control.last_sample.free_bytes > 100 * MIB + (d1.total_target_pages - 1) * PAGE_SIZE

        # Pressure gone: balloons are released.
        control.set_simulated_free(4 * GIB)
        d3 = control.step(now=3.0)
        assert d3 is not None and d3.state is HostState.HIGH
        assert all(registry.view(n).target_pages == 0 for n in ("vm0", "vm1"))


async def test_manual_override_wins_and_policy_resumes() -> None:
    with trio.fail_after(5):
        registry, _guests = make_registry(VM_PAGES, VM_PAGES, follow=True)
        control = ControlPlane(registry, simulated())
        control.set_simulated_free(100 * MIB)
        control.step(now=0.0)

        applied, reason = control.set_manual_target("vm0", 50_000)
        # At once (no waiting for the period), not rate limited, reason "manual".
        assert (applied, reason) == (50_000, "manual")
        assert registry.view("vm0").target_pages == 50_000
        for now in (1.0, 2.0, 3.0):
            d = control.step(now=now)
            assert d is not None
            assert registry.view("vm0").target_pages == 50_000
            assert control.reason("vm0") == "manual"
        # The other VM is still under the policy.
        assert control.reason("vm1") != "manual"

        # Above MCTLMAX (65 % of RAM): capped, and the cap is named.
        cap = VM_PAGES * 65 // 100
        assert control.max_pages("vm0", registry.view("vm0")) == cap
        applied, reason = control.set_manual_target("vm0", VM_PAGES)
        assert (applied, reason) == (cap, "capped:CtlMaxPercent")
        assert registry.view("vm0").target_pages == cap
        # Raising the cap lets the manual target through on the next step, at once (manual
        # targets skip the rate limit), and the cap that still binds stays the reason.
        control.set_setting("/Mem/CtlMaxPercent", 99)
        control.step(now=4.0)
        assert registry.view("vm0").target_pages == VM_PAGES * 99 // 100
        assert control.reason("vm0") == "capped:CtlMaxPercent"
        control.set_setting("/Mem/CtlMaxPercent", 50)  # a lowered cap binds at once
        control.step(now=4.5)
        assert registry.view("vm0").target_pages == VM_PAGES * 50 // 100
        assert control.reason("vm0") == "capped:CtlMaxPercent"

        with pytest.raises(ValueError, match="more than the guest's RAM"):
            control.set_manual_target("vm0", VM_PAGES + 1)
        with pytest.raises(KeyError):
            control.set_manual_target("vm9", 1)

        control.clear_manual_target("vm0")
        assert "vm0" not in control.manual
        control.set_simulated_free(4 * GIB)
        control.step(now=5.0)
        assert registry.view("vm0").target_pages == 0
        assert control.reason("vm0") != "manual"


async def test_inflation_rate_limit_observed() -> None:
    with trio.fail_after(5):
        registry, _guests = make_registry(VM_PAGES, VM_PAGES, follow=True)
        control = ControlPlane(registry, simulated())
        control.set_setting("/VBalloon/InflateRatePagesPerSec", 1000)
        control.set_setting("/VBalloon/MinTargetChangePages", 0)
        control.step(now=0.0)
        # 120 MiB free: SOFT (HARD, below 32 % of minFree, would lift the limit).
        control.set_simulated_free(120 * MIB)
        previous = {n: 0 for n in ("vm0", "vm1")}
        limited = 0
        for i in range(1, 6):
            d = control.step(now=float(i))
            assert d is not None and d.state is HostState.SOFT
            for name in previous:
                target = registry.view(name).target_pages
                assert 0 <= target - previous[name] <= 1000  # rate x dt, dt = 1 s
                limited += control.reason(name) == "rate-limited"
                previous[name] = target
        assert limited >= 8  # the limit, not the need, set the pace
        assert sum(previous.values()) > 0


async def test_history_rates_and_events(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        registry, guests = make_registry(VM_PAGES)
        control = ControlPlane(registry, simulated(rate_window=10.0, history=5))
        events = control.subscribe()
        async with trio.open_nursery() as nursery:
            await nursery.start(control.run)
            control.set_manual_target("vm0", 4000)
            for _ in range(4):  # 1000 pages a second for 4 s
                await trio.sleep(1)
                guests[0].settle(1000)
            await trio.sleep(1.5)  # one more policy step sees the last size
            inflate, deflate = control.rates("vm0")
            assert inflate == pytest.approx(4000 / 10.0)
            assert deflate == 0.0
            history = control.history("vm0")
            assert len(history) == 5  # the ring keeps the last 5 points
            assert history[-1].target_pages == 4000
            assert history[-1].size_pages == 4000
            assert history[-1].host_free_bytes == 4 * GIB  # free started at 4 GiB, clamped
            assert history[-1].max_pages == VM_PAGES * 65 // 100
            assert history[-1].connected  # vdev plot draws the balloon only while connected
            nursery.cancel_scope.cancel()
        seen = []
        while True:
            try:
                seen.append(events.receive_nowait())
            except trio.WouldBlock:
                break
        kinds = [(e["type"], e.get("kind") or e.get("control") or e.get("state")) for e in seen]
        assert ("control", "manual") in kinds
        assert ("host", "high") in kinds
        target_events = [e for e in seen if e.get("kind") == "target"]
        assert target_events and target_events[0]["reason"] == "manual"
        assert target_events[0]["target_pages"] == 4000
        assert [e["size_pages"] for e in seen if e.get("kind") == "size"] == [
            1000,
            2000,
            3000,
            4000,
        ]


async def test_period_and_poke(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        registry, _ = make_registry(VM_PAGES)
        control = ControlPlane(registry, simulated(policy_period=2.0))
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            await nursery.start(control.run)
            assert control.steps == 1
            await trio.sleep(7)  # steps at +2, +4, +6
            assert control.steps == 4
            control.set_simulated_free(100 * MIB)  # pokes the loop
            await trio.sleep(0.01)
            assert control.steps == 5
            assert control.host_info()["state"] == "soft"
            assert trio.current_time() - start < 7.1
            nursery.cancel_scope.cancel()


async def test_real_host_and_errors() -> None:
    with trio.fail_after(5):
        registry, _ = make_registry(VM_PAGES)
        control = ControlPlane(registry, ControlConfig())
        assert control.host_source in ("proc",) or control.host_source.startswith("cgroup:")
        d = control.step()
        assert d is not None
        host = control.host_info()
        assert host["total_bytes"] > 0 and 0 <= host["free_bytes"] <= host["total_bytes"]
        assert host["simulated"] is False
        with pytest.raises(NotSimulated):
            control.set_simulated_free(0)

        def broken() -> HostSample:
            raise HostResourceError("no /proc")

        control = ControlPlane(registry, ControlConfig(), host_sampler=broken)
        assert control.step() is None
        assert "no /proc" in control.host_info()["error"]


async def test_only_guests_with_a_running_driver_are_steered() -> None:
    with trio.fail_after(5):
        registry, guests = make_registry(VM_PAGES)
        registry.add("idle", "/nonexistent/idle.sock")
        cfg = simulated()
        cfg.vms["idle"] = VmConfig(memory_pages=VM_PAGES, limit_pages=VM_PAGES // 2)
        control = ControlPlane(registry, cfg)
        control.set_manual_target("idle", 1000)  # applied at once, connected or not
        assert registry.view("idle").target_pages == 1000
        control.set_simulated_free(100 * MIB)
        d = control.step(now=0.0)
        assert d is not None and set(d.vms) == {"vm0"}  # no pressure placed where it cannot work
        assert registry.view("idle").target_pages == 1000
        # MCTLMAX of a guest that is not connected comes from its configured memory.
        assert control.max_pages("idle", registry.view("idle")) == VM_PAGES * 65 // 100
        # A connected guest whose driver has not STARTed yet is not steered either.
        guests[0].started = False
        d = control.step(now=1.0)
        assert d is not None and d.vms == {}


async def test_mctl_is_the_driver_state_not_the_capabilities() -> None:
    """A virtio driver may accept no feature bits (capabilities 0) and still run; a vmw
    guest with a reset pending keeps its capabilities but is not running."""
    with trio.fail_after(5):
        registry, [featureless, resetting] = make_registry(VM_PAGES, VM_PAGES)
        featureless.capabilities = 0
        control = ControlPlane(registry, simulated())
        control.set_simulated_free(100 * MIB)
        d = control.step(now=0.0)
        assert d is not None and set(d.vms) == {"vm0", "vm1"}
        assert registry.view("vm0").driver_active and registry.view("vm0").capabilities == 0
        resetting.started = False
        resetting.capabilities = 0x3E

        def status() -> DeviceStatus:  # capabilities still granted, driver not running
            return dataclasses.replace(FakeGuest.status(resetting), capabilities=0x3E)

        resetting.status = status  # type: ignore[method-assign]
        d = control.step(now=1.0)
        assert d is not None and set(d.vms) == {"vm0"}
        assert not registry.view("vm1").driver_active


def test_find_cgroup_v2_dir(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    root = tmp_path / "cgroup"
    (root / "machine.slice" / "vdev").mkdir(parents=True)
    (root / "machine.slice" / "vdev" / "memory.max").write_text("max\n")
    (proc / "self" / "cgroup").write_text("0::/machine.slice/vdev\n")
    assert find_cgroup_v2_dir(str(proc), str(root)) == str(root / "machine.slice" / "vdev")
    (proc / "self" / "cgroup").write_text("0::/\n")
    assert find_cgroup_v2_dir(str(proc), str(root)) is None
    (proc / "self" / "cgroup").write_text("4:memory:/x\n")  # cgroup v1 only
    assert find_cgroup_v2_dir(str(proc), str(root)) is None


async def test_resubscribes_when_the_registry_drops_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        registry, _ = make_registry(VM_PAGES)
        control = ControlPlane(registry, simulated())
        async with trio.open_nursery() as nursery:
            await nursery.start(control.run)
            await trio.sleep(0.1)
            for size in range(1, 5000):  # a burst, with no checkpoint: more than the buffer
                registry.note_size("vm0", size)
            await trio.sleep(0.1)
            events = control.subscribe()
            registry.set_target("vm0", 1234)
            await trio.sleep(0.1)
            seen = []
            while True:
                try:
                    seen.append(events.receive_nowait())
                except trio.WouldBlock:
                    break
            assert any(e.get("kind") == "target" and e["target_pages"] == 1234 for e in seen)
            nursery.cancel_scope.cancel()


async def test_the_age_of_a_guests_stats_is_known_without_the_resident_cap() -> None:
    """``vdev stat``'s AGE: the time since the control plane saw the guest's current stats
    (a new stats buffer), measured from the policy's steps and from the query itself. It
    used to be recorded only on the resident-cap path, so AGE stayed "-" while GFREE moved;
    a guest that never sent stats has no age."""
    registry, (with_stats, _vmw) = make_registry(1 << 16, 1 << 16)
    control = ControlPlane(registry, ControlConfig(host_memory=1 << 40))
    control.set_manual_target("vm0", 100)  # the operator's target: no resident cap computed
    control.step(now=0.0)
    assert control.guests_info()["vm0"]["stats_age_s"] is None  # nothing reported yet
    with_stats.counters["stats buffers"] = 1
    with_stats.guest_stats = {"stat-free-memory": 1 << 30}
    control.step(now=1.0)
    info = control.guests_info()
    assert info["vm0"]["stats_age_s"] is not None and 0 <= info["vm0"]["stats_age_s"] < 5
    assert info["vm1"]["stats_age_s"] is None  # a vmw guest: no stats, no age
    # first seen by the query itself (no step in between) counts as well
    with_stats.counters["stats buffers"] = 2
    age = control.guests_info()["vm0"]["stats_age_s"]
    assert age == 0.0 and str(age) == "0.0"  # seen during the query: not "-0.0" (the demo's)
