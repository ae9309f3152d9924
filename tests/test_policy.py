"""Tests for the sans-I/O host memory policy (vdev/policy/model.py).

Numbers are in 4 KiB pages unless a name says otherwise. Worked arithmetic is in the comments
so that each expected value can be checked by hand.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from protocol.errors import ConfigError
from protocol.units import PAGE_SIZE
from vdev.policy.host import SimulatedHost
from vdev.policy.model import (
    GIB,
    FillItem,
    HostSample,
    HostState,
    PolicyEngine,
    PolicySettings,
    PoolSpec,
    SharesLevel,
    VmSpec,
    VmState,
    classify_host_state,
    compute_entitlements,
    idle_cost,
    limit_targets,
    min_free_bytes,
    pressure_reclaim_pages,
    vm_bounds,
    water_fill,
)

MIB = 1 << 20


def vm(
    size: int = 10_000,
    *,
    active: float = 1.0,
    balloon: int = 0,
    manual: int | None = None,
    **spec: object,
) -> VmState:
    return VmState(
        spec=VmSpec(size_pages=size, **spec),  # type: ignore[arg-type]
        active_fraction=active,
        balloon_pages=balloon,
        manual_target_pages=manual,
    )


def targets(vms: Mapping[str, VmState], reclaim: int, **kw: object) -> dict[str, int]:
    pools = kw.pop("pools", {})
    s = kw.pop("settings", PolicySettings())
    ent = compute_entitlements(vms, pools, s, reclaim)  # type: ignore[arg-type]
    return {n: e.target_pages for n, e in ent.vms.items()}


def reasons(vms: Mapping[str, VmState], reclaim: int, **kw: object) -> dict[str, str]:
    pools = kw.pop("pools", {})
    s = kw.pop("settings", PolicySettings())
    ent = compute_entitlements(vms, pools, s, reclaim)  # type: ignore[arg-type]
    return {n: e.reason for n, e in ent.vms.items()}


# --------------------------------------------------------------------------------------------
# Settings


def test_settings_defaults_by_esxi_path() -> None:
    s = PolicySettings()
    assert s.get("/Mem/CtlMaxPercent") == 65
    assert s.get("/Mem/IdleTax") == 75
    assert s.get("/Mem/MinFreePct") == 0  # 0 = ESXi 5+ sliding scale
    assert s.idle_cost_factor == pytest.approx(4.0)  # k = 1 / (1 - 0.75)
    assert "/VBalloon/SoftPct" in PolicySettings.paths()


def test_settings_set_by_path() -> None:
    s = PolicySettings()
    s.set("/Mem/IdleTax", 0)
    assert s.idle_tax_percent == 0
    assert s.idle_cost_factor == 1.0  # no tax: idle and active pages cost the same
    s.set("/VBalloon/SoftPct", 70)
    assert s.soft_pct == 70


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("/Mem/CtlMaxPercent", 100),  # ESXi range is 0-99
        ("/Mem/CtlMaxPercent", -1),
        ("/Mem/IdleTax", 100),  # tau = 1 would make k infinite
        ("/Mem/CtlMaxPercent", "65"),
        ("/Mem/CtlMaxPercent", True),
        ("/Mem/CtlMaxPercent", 6.5),
        ("/Mem/NoSuchThing", 1),
        ("Mem.CtlMaxPercent", 65),  # dotted vSphere spelling is not a path
        ("/VBalloon/SoftPct", 100),  # not below ClearPct (100)
        ("/VBalloon/LowPct", 40),  # not below HardPct (32)
        ("/VBalloon/InflateRatePagesPerSec", -5),
    ],
)
def test_settings_rejects_bad_values_and_changes_nothing(path: str, value: object) -> None:
    s = PolicySettings()
    before = PolicySettings()
    with pytest.raises(ConfigError):
        s.set(path, value)  # type: ignore[arg-type]
    assert s == before


def test_settings_constructor_validates() -> None:
    with pytest.raises(ConfigError):
        PolicySettings(ctl_max_percent=120)
    with pytest.raises(ConfigError):
        PolicySettings(hard_pct=10, low_pct=10)


# --------------------------------------------------------------------------------------------
# minFree and host states


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (0, 0),
        # 6 % of 4 GiB = 4294967296 * 6 / 100
        (4 * GIB, 4 * GIB * 6 // 100),
        # 2 GiB: only the first band, 6 %
        (2 * GIB, 2 * GIB * 6 // 100),
        # 12 GiB: 4 GiB x 6 % + 8 GiB x 4 % = 56 GiB / 100
        (12 * GIB, 56 * GIB // 100),
        # 28 GiB: 24 + 32 + 16 x 2 = 88 GiB / 100 = 901.12 MiB ("~901 MB" in the reference)
        (28 * GIB, 88 * GIB // 100),
        # 128 GiB: 88 + 100 x 1 = 188 GiB / 100 = 1925.12 MiB ("~1.9 GB")
        (128 * GIB, 188 * GIB // 100),
    ],
)
def test_min_free_sliding_scale(total: int, expected: int) -> None:
    assert min_free_bytes(total) == expected


def test_min_free_reference_figures() -> None:
    assert min_free_bytes(28 * GIB) / MIB == pytest.approx(901.12, abs=0.01)
    assert min_free_bytes(128 * GIB) / MIB == pytest.approx(1925.12, abs=0.01)


def test_min_free_fixed_percentage() -> None:
    # ESX <= 4.1 style Mem.MinFreePct = 6: 6 % of 100 GiB = 6 GiB
    assert min_free_bytes(100 * GIB, 6) == 6 * GIB


# minFree = 1000 pages: clear < 1000, soft < 640, hard < 320, low < 160 (default thresholds
# 100/64/32/16 %). Exits with the 10 % margin: low 260, hard 420, soft 740, clear 1100.
@pytest.mark.parametrize(
    ("free", "expected"),
    [
        (5000, HostState.HIGH),
        (1000, HostState.HIGH),
        (999, HostState.CLEAR),
        (640, HostState.CLEAR),
        (639, HostState.SOFT),
        (320, HostState.SOFT),
        (319, HostState.HARD),
        (160, HostState.HARD),
        (159, HostState.LOW),
        (0, HostState.LOW),
    ],
)
def test_host_state_thresholds(free: int, expected: HostState) -> None:
    assert classify_host_state(free, 1000, PolicySettings()) is expected


@pytest.mark.parametrize(
    ("previous", "free", "expected"),
    [
        (HostState.SOFT, 700, HostState.SOFT),  # above the 640 entry, below the 740 exit
        (HostState.SOFT, 739, HostState.SOFT),
        (HostState.SOFT, 740, HostState.CLEAR),  # soft exit reached; clear needs 1100
        (HostState.SOFT, 1099, HostState.CLEAR),
        (HostState.SOFT, 1100, HostState.HIGH),
        (HostState.LOW, 200, HostState.LOW),  # low exit is 260
        (HostState.LOW, 300, HostState.HARD),  # hard exit is 420
        (HostState.LOW, 5000, HostState.HIGH),
        (HostState.HIGH, 639, HostState.SOFT),  # getting worse takes effect at once
        (HostState.CLEAR, 100, HostState.LOW),
    ],
)
def test_host_state_hysteresis(previous: HostState, free: int, expected: HostState) -> None:
    assert classify_host_state(free, 1000, PolicySettings(), previous) is expected


# minFree 1000, 500 pages already held by pressure balloons.
@pytest.mark.parametrize(
    ("state", "free", "expected"),
    [
        (HostState.SOFT, 600, 640),  # 500 + (soft exit 740 - 600)
        (HostState.HARD, 300, 940),  # 500 + (740 - 300)
        (HostState.LOW, 0, 1240),  # 500 + 740
        (HostState.CLEAR, 900, 500),  # hold
        (HostState.HIGH, 1050, 500),  # below clear exit 1100: nothing to give back
        (HostState.HIGH, 1300, 300),  # give back the 200 above 1100
        (HostState.HIGH, 5000, 0),  # give back everything
    ],
)
def test_pressure_reclaim_by_state(state: HostState, free: int, expected: int) -> None:
    assert pressure_reclaim_pages(state, free, 1000, 500, PolicySettings()) == expected


# --------------------------------------------------------------------------------------------
# Water-filling


def test_water_fill_shares_two_to_one() -> None:
    # Two active 10000-page VMs, shares 2000 and 1000, reclaim 6000. Keep 14000 in total in
    # proportion to weight (= shares, cost 1): mu = 14000 / 3000 = 4.667; A keeps 9333.3,
    # B keeps 4666.7. Largest remainder: A gives 666.7 -> 667, B 5333.3 -> 5333 (sum 6000).
    kept, pinned = water_fill([FillItem(0, 10_000, 2000), FillItem(0, 10_000, 1000)], 6000)
    assert kept == [9333, 4667]
    assert pinned == [False, False]
    # Min-funding revocation equilibrium: equal shares-per-page ratio rho = S / P.
    assert 2000 / kept[0] == pytest.approx(1000 / kept[1], rel=1e-3)


def test_water_fill_monotone_at_a_breakpoint_that_rounds() -> None:
    # 0.969... * (15977 / 0.969...) rounds just above 15977: the claimant on its slope was taken
    # for clamped, nothing was left to solve for, and rounding gave the whole reclaim to the
    # first item (found by test_prop_monotonic_in_host_pressure: more pressure, less taken
    # from vm0). Each item's share of the reclaim must grow with the reclaim.
    items = [FillItem(63, 116, 2.1296875), FillItem(8628, 15977, 0.9690721649484536)]
    previous = [116, 15977]
    for reclaim in range(7000, 7403):
        kept, _ = water_fill(items, reclaim)
        assert sum(kept) == 116 + 15977 - reclaim
        assert all(k <= p for k, p in zip(kept, previous, strict=True)), (reclaim, kept, previous)
        previous = kept
    # vm1's weight per page is lower: it gives everything before vm0 gives anything.
    assert water_fill(items, 7348)[0] == [116, 8629]


def test_water_fill_lowest_rho_loses_first() -> None:
    # A: rho = 1000 / 10000 = 0.1, B: rho = 1000 / 5000 = 0.2. Reclaim 3000 < 5000 (the gap
    # that brings A down to B's ratio), so only A loses: A keeps 7000 (rho 0.143 < 0.2).
    kept, _ = water_fill([FillItem(0, 10_000, 1000), FillItem(0, 5000, 1000)], 3000)
    assert kept == [7000, 5000]


def test_water_fill_zero_shares_lose_first() -> None:
    # A has 0 shares (rho = 0) and gives all it can (8000) before B gives anything.
    kept, _ = water_fill([FillItem(2000, 10_000, 0), FillItem(0, 10_000, 1000)], 5000)
    assert kept == [5000, 10_000]
    kept, pinned = water_fill([FillItem(2000, 10_000, 0), FillItem(0, 10_000, 1000)], 9000)
    assert kept == [2000, 9000]
    assert pinned == [True, False]


def test_water_fill_cannot_take_more_than_room() -> None:
    kept, pinned = water_fill([FillItem(3500, 10_000, 1), FillItem(3500, 10_000, 1)], 99_999)
    assert kept == [3500, 3500]
    assert pinned == [False, False]  # at the bound, and the level wanted exactly there


def test_water_fill_empty() -> None:
    assert water_fill([], 100) == ([], [])


# --------------------------------------------------------------------------------------------
# Entitlements: shares, idle tax, caps, reservations, limits


def test_preset_shares_split_in_proportion_to_size() -> None:
    # NORMAL = 10 shares per MB: 1 GiB VM has 10240, 3 GiB VM 30720; same density, both
    # active, so reclaiming 100000 pages takes 25000 and 75000.
    small, large = 262_144, 786_432
    vms = {"small": vm(small), "large": vm(large)}
    t = targets(vms, 100_000)
    assert t == {"small": 25_000, "large": 75_000}
    assert vms["small"].spec.share_count == 10_240


def test_high_shares_keep_more() -> None:
    # Same size, HIGH (20/MB) vs LOW (5/MB): weights 4:1. Reclaim 8000 of 20000:
    # keep 12000 = mu x (4w + w) -> HIGH keeps 9600, LOW keeps 2400 -> but LOW's cap (65 %)
    # keeps it at 3500, so HIGH keeps 12000 - 3500 = 8500.
    vms = {
        "hi": vm(shares=SharesLevel.HIGH),
        "lo": vm(shares=SharesLevel.LOW),
    }
    assert targets(vms, 8000) == {"hi": 1500, "lo": 6500}
    assert reasons(vms, 8000) == {"hi": "pressure:soft", "lo": "capped:CtlMaxPercent"}


@pytest.mark.parametrize(
    ("idle_tax", "expected"),
    [
        # tax 75 %: k = 4, idle B costs 4 per page -> weights A 1000, B 250. Reclaim 2000:
        # keep 18000 = mu x 1250 -> mu = 14.4, A would keep 14400 > 10000, so A stays at 10000
        # and B keeps 8000: all 2000 come from the idle VM.
        (75, {"active": 0, "idle": 2000}),
        # tax 0: k = 1, equal weights: 1000 each.
        (0, {"active": 1000, "idle": 1000}),
        # tax 50: k = 2, weights 1000 and 500; keep 18000 = 1500 mu -> mu = 12, A would keep
        # 12000 > 10000 -> the idle VM again gives all 2000.
        (50, {"active": 0, "idle": 2000}),
    ],
)
def test_idle_tax_shifts_reclamation_to_idle_vm(idle_tax: int, expected: dict[str, int]) -> None:
    vms = {"active": vm(shares=1000, active=1.0), "idle": vm(shares=1000, active=0.0)}
    assert targets(vms, 2000, settings=PolicySettings(idle_tax_percent=idle_tax)) == expected


def test_idle_tax_partial_activity_with_cap() -> None:
    # B half active: cost = 0.5 + 4 x 0.5 = 2.5, weight 1000 / 2.5 = 400; A weight 1000.
    # Reclaim 8000: keep 12000 = 1400 mu -> mu = 8.571, B would keep 3428.6 < its floor
    # 3500 (65 % cap) -> B pinned at 3500, A keeps 8500.
    assert idle_cost(0.5, PolicySettings()) == pytest.approx(2.5)
    vms = {"a": vm(shares=1000), "b": vm(shares=1000, active=0.5)}
    assert targets(vms, 8000) == {"a": 1500, "b": 6500}
    assert reasons(vms, 8000)["b"] == "capped:CtlMaxPercent"


def test_limit_balloons_without_pressure() -> None:
    # 10000-page VM limited to 6000: 4000 ballooned with no host pressure at all.
    vms = {"limited": vm(limit_pages=6000), "free": vm()}
    ent = compute_entitlements(vms, {}, PolicySettings(), 0)
    assert {n: e.target_pages for n, e in ent.vms.items()} == {"limited": 4000, "free": 0}
    assert ent.vms["limited"].reason == "limit"
    assert ent.vms["free"].reason == "none"
    assert ent.unmet_pages == 0


@pytest.mark.parametrize(
    ("spec", "settings_kw", "target", "reason", "capped"),
    [
        # limit 2000 wants 8000, CtlMaxPercent 65 % of 10000 = 6500; ESXi swaps the other 1500
        ({"limit_pages": 2000}, {}, 6500, "capped:CtlMaxPercent", 1500),
        # sched.mem.maxmemctl = 1000 pages
        ({"limit_pages": 2000, "max_memctl_pages": 1000}, {}, 1000, "capped:maxmemctl", 7000),
        # reservation 8000 and limit 8000: the limit wants 2000, exactly what the reservation
        # leaves balloonable, so it is met and nothing is capped
        ({"limit_pages": 8000, "reservation_pages": 8000}, {}, 2000, "limit", 0),
        # limit 9000 wants 1000, reservation 8000 allows 2000, maxmemctl 500 caps it
        (
            {"limit_pages": 9000, "reservation_pages": 8000, "max_memctl_pages": 500},
            {},
            500,
            "capped:maxmemctl",
            500,
        ),
        # limit 5000 wants 5000: reservation 5000 allows exactly 5000, reservation 4000
        # allows 6000; either way the limit is met
        ({"limit_pages": 5000, "reservation_pages": 5000}, {}, 5000, "limit", 0),
        ({"limit_pages": 5000, "reservation_pages": 4000}, {}, 5000, "limit", 0),
        # CtlMaxPercent 0 turns ballooning off
        ({"limit_pages": 2000}, {"ctl_max_percent": 0}, 0, "capped:CtlMaxPercent", 8000),
    ],
)
def test_caps_on_limit_targets(
    spec: dict[str, int],
    settings_kw: dict[str, int],
    target: int,
    reason: str,
    capped: int,
) -> None:
    # A limit cut by a cap is "capped", not unmet pressure: there is no host pressure here.
    vms = {"v": vm(**spec)}
    ent = compute_entitlements(vms, {}, PolicySettings(**settings_kw), 0)
    assert ent.vms["v"].target_pages == target
    assert ent.vms["v"].reason == reason
    assert ent.vms["v"].capped_pages == ent.capped_pages == capped
    assert ent.unmet_pages == 0


def test_capped_limits_are_not_unmet_pressure() -> None:
    # A pool whose limit the caps cannot reach: 2 x 10000 pages limited to 2000, caps let
    # each give 6500 -> the pool stays at 7000, 5000 above its limit. That is "capped".
    pools = {"p": PoolSpec("p", limit_pages=2000)}
    vms = {"a": vm(pool="p"), "b": vm(pool="p")}
    ent = compute_entitlements(vms, pools, PolicySettings(), 0)
    assert ent.pool_capped_pages == {"p": 5000} and ent.capped_pages == 5000
    assert ent.unmet_pages == 0
    # Pressure on top, with room elsewhere: all of it placed on c, nothing unmet.
    vms["c"] = vm()
    ent = compute_entitlements(vms, pools, PolicySettings(), 3000)
    assert ent.pressure_pages == 3000 and ent.unmet_pages == 0
    assert ent.vms["c"].target_pages == 3000 and ent.pool_capped_pages == {"p": 5000}


def test_engine_manual_target_above_cap_on_a_high_host_is_not_unmet() -> None:
    # The demo's case: a host in HIGH, a manual target of 9000 on a VM whose MCTLMAX is 6500.
    # The 2500 the cap cut are "capped" on that VM; no pressure demand is unmet.
    vms = {"a": vm(manual=9000), "b": vm(balloon=100)}
    d = engine().step(0.0, host(HOST_PAGES), vms)
    assert d.state is HostState.HIGH
    assert d.unmet_pages == 0
    assert d.vms["a"].target_pages == 6500 and d.vms["a"].capped_pages == 2500
    assert d.vms["b"].capped_pages == 0 and d.capped_pages == 2500
    # In LOW the same VM still counts as capped; unmet is only what pressure could not place.
    d = engine().step(0.0, host(0), {"a": vm(1000, manual=900), "b": vm(1000)})
    assert d.state is HostState.LOW
    assert d.vms["a"].capped_pages == 900 - 650
    assert d.unmet_pages == 7400 - 650  # b takes 650 of the 7400 wanted; a is fixed


def test_reservation_is_never_ballooned() -> None:
    # 4 GB VM with a 3 GB reservation: at most 1 GB ballooned (reference §8.3 example).
    size, reservation = 4 * GIB // PAGE_SIZE, 3 * GIB // PAGE_SIZE
    vms = {"r": vm(size, reservation_pages=reservation), "other": vm(size)}
    ent = compute_entitlements(vms, {}, PolicySettings(), 10 * size)
    assert ent.vms["r"].target_pages == size - reservation == 262_144
    assert ent.vms["r"].reason == "reservation floor"
    assert ent.vms["other"].target_pages == size * 65 // 100
    assert vm_bounds(vms["r"], PolicySettings()).max_pages == 262_144


def test_manual_target_overrides_shares_and_limits_but_not_caps() -> None:
    vms = {"m": vm(manual=3000, limit_pages=2000), "n": vm()}
    # Under pressure 4000: m is fixed at 3000 (manual), so all 4000 comes from n.
    ent = compute_entitlements(vms, {}, PolicySettings(), 4000)
    assert ent.vms["m"].target_pages == 3000
    assert ent.vms["m"].reason == "manual"
    assert ent.vms["n"].target_pages == 4000
    capped = compute_entitlements({"m": vm(manual=9000)}, {}, PolicySettings(), 0)
    assert capped.vms["m"].target_pages == 6500
    assert capped.vms["m"].reason == "capped:CtlMaxPercent"


# --------------------------------------------------------------------------------------------
# Resource pools


def test_pool_limit_balloons_children() -> None:
    # Pool limit 12000 over two 10000-page VMs with equal shares: the pool gives 8000, 4000 each.
    pools = {"p": PoolSpec("p", limit_pages=12_000)}
    vms = {"a": vm(pool="p"), "b": vm(pool="p")}
    assert limit_targets(vms, pools, PolicySettings()) == {"a": 4000, "b": 4000}
    assert reasons(vms, 0, pools=pools) == {"a": "pool-limit", "b": "pool-limit"}


def test_nested_pool_limits() -> None:
    # inner (limit 8000) holds a; outer (limit 15000) holds inner and b. Shares 1000 each.
    # inner: a must keep <= 8000 -> target 2000.
    # outer: inner (high 8000) + b (high 10000) = 18000 > 15000: reclaim 3000 by equal weights
    # -> each would keep 7500; inner 7500 <= 8000, b 7500 -> a target 2500, b target 2500.
    pools = {
        "outer": PoolSpec("outer", limit_pages=15_000, shares=1000),
        "inner": PoolSpec("inner", parent="outer", limit_pages=8000, shares=1000),
    }
    vms = {"a": vm(pool="inner", shares=1000), "b": vm(pool="outer", shares=1000)}
    assert limit_targets(vms, pools, PolicySettings()) == {"a": 2500, "b": 2500}


def test_pool_reservation_protects_its_children() -> None:
    # Pool p (shares 1000, reservation 7000) holds a; c (shares 1000) sits at the root.
    # Reclaim 8000 of 20000: equal weights would keep 6000 each, but p must keep 7000, so
    # c keeps 5000: a gives 3000, c gives 5000. Without the reservation: 4000 each.
    vms = {"a": vm(pool="p"), "c": vm(shares=1000)}
    reserved = {"p": PoolSpec("p", reservation_pages=7000, shares=1000)}
    plain = {"p": PoolSpec("p", shares=1000)}
    assert targets(vms, 8000, pools=reserved) == {"a": 3000, "c": 5000}
    assert targets(vms, 8000, pools=plain) == {"a": 4000, "c": 4000}


def test_pool_shares_split_between_pools() -> None:
    # Pools HIGH (327680) and LOW (81920): weights 4:1, each with one 10000-page VM.
    # Reclaim 5000: keep 15000 = 5 w mu -> HIGH keeps 12000 > 10000 -> stays at 10000,
    # LOW keeps 5000: the LOW pool's VM gives all 5000.
    pools = {
        "gold": PoolSpec("gold", shares=SharesLevel.HIGH),
        "bronze": PoolSpec("bronze", shares=SharesLevel.LOW),
    }
    assert pools["gold"].share_count == 327_680
    assert pools["bronze"].share_count == 81_920
    vms = {"g": vm(pool="gold"), "b": vm(pool="bronze")}
    assert targets(vms, 5000, pools=pools) == {"g": 0, "b": 5000}


def test_expandable_reservation_borrows_from_parent() -> None:
    child_vm = {"v": vm(reservation_pages=2000, pool="child")}
    # Non-expandable child pool reserving 1000 cannot hold a VM that reserves 2000.
    with pytest.raises(ConfigError, match="non-expandable"):
        compute_entitlements(
            child_vm,
            {"child": PoolSpec("child", reservation_pages=1000, expandable_reservation=False)},
            PolicySettings(),
            0,
        )
    # Expandable: the missing 1000 are borrowed from the parent...
    ok = {
        "parent": PoolSpec("parent", reservation_pages=2500, expandable_reservation=False),
        "child": PoolSpec("child", parent="parent", reservation_pages=1000),
    }
    none = compute_entitlements(child_vm, ok, PolicySettings(), 0)
    assert none.vms["v"].target_pages == 0 and none.unmet_pages == 0
    # Under pressure beyond what the tree can give, the VM keeps the parent's reservation
    # (2500, which holds the child's 1000 and the 1000 it borrowed) and no more: its own
    # reservation alone would let it go to 8000 (its max).
    squeezed = compute_entitlements(child_vm, ok, PolicySettings(ctl_max_percent=99), 20_000)
    e = squeezed.vms["v"]
    assert (e.target_pages, e.max_pages) == (7500, 8000)
    assert squeezed.pressure_pages == 7500 and squeezed.unmet_pages == 20_000 - 7500
    # ...which must have them: a non-expandable parent reserving only 1500 refuses.
    short = dict(
        ok, parent=PoolSpec("parent", reservation_pages=1500, expandable_reservation=False)
    )
    with pytest.raises(ConfigError):
        compute_entitlements(child_vm, short, PolicySettings(), 0)


@pytest.mark.parametrize(
    "pools",
    [
        [PoolSpec("a", parent="b"), PoolSpec("b", parent="a")],  # cycle
        [PoolSpec("a", parent="nowhere")],
        [PoolSpec("a"), PoolSpec("a")],  # twice
    ],
)
def test_bad_pool_trees(pools: list[PoolSpec]) -> None:
    with pytest.raises(ConfigError):
        PolicyEngine(pools=pools)


@pytest.mark.parametrize(
    "make",
    [
        lambda: VmSpec(size_pages=0),
        lambda: VmSpec(size_pages=100, reservation_pages=101),
        lambda: VmSpec(size_pages=100, reservation_pages=50, limit_pages=40),
        lambda: VmSpec(size_pages=100, shares=-1),
        lambda: VmSpec(size_pages=100, max_memctl_pages=-1),
        lambda: VmState(VmSpec(size_pages=100), active_fraction=1.5),
        lambda: VmState(VmSpec(size_pages=100), balloon_pages=-1),
        lambda: PoolSpec("p", reservation_pages=10, limit_pages=5),
        lambda: PoolSpec(""),
        lambda: HostSample(total_bytes=-1, free_bytes=0),
    ],
)
def test_bad_specs(make: object) -> None:
    with pytest.raises(ConfigError):
        make()  # type: ignore[operator]


def test_vm_in_unknown_pool() -> None:
    with pytest.raises(ConfigError):
        PolicyEngine().step(0.0, HostSample(GIB, GIB), {"v": vm(pool="ghost")})


# --------------------------------------------------------------------------------------------
# The engine: states, rate limit, hysteresis

# Host of 100000 pages with Mem.MinFreePct = 10 -> minFree = 10000 pages. SOFT below 6400
# free, left at 7400; CLEAR below 10000, left at 11000; HARD below 3200.
HOST_PAGES = 100_000


def engine(**kw: int) -> PolicyEngine:
    return PolicyEngine(PolicySettings(min_free_pct=10, **kw))


def host(free_pages: int) -> HostSample:
    return HostSample(total_bytes=HOST_PAGES * PAGE_SIZE, free_bytes=free_pages * PAGE_SIZE)


def two_vms(balloon_a: int = 0, balloon_b: int = 0) -> dict[str, VmState]:
    return {"a": vm(40_000, balloon=balloon_a), "b": vm(40_000, balloon=balloon_b)}


def test_engine_soft_state_balloons_to_soft_exit() -> None:
    # free 5400 (SOFT): reclaim 7400 - 5400 = 2000, equal VMs -> 1000 each.
    d = engine().step(0.0, host(5400), two_vms())
    assert d.state is HostState.SOFT
    assert d.min_free_pages == 10_000
    assert {n: v.target_pages for n, v in d.vms.items()} == {"a": 1000, "b": 1000}
    assert {v.reason for v in d.vms.values()} == {"pressure:soft"}


def test_engine_high_and_clear_do_not_balloon_for_pressure() -> None:
    for free in (9000, 50_000):  # CLEAR, HIGH
        d = engine().step(0.0, host(free), two_vms())
        assert d.state in (HostState.CLEAR, HostState.HIGH)
        assert d.total_target_pages == 0


def test_engine_closed_loop_converges_without_oscillation() -> None:
    sim = SimulatedHost(total_bytes=HOST_PAGES * PAGE_SIZE, free_bytes=5400 * PAGE_SIZE)
    eng = engine()
    balloons = {"a": 0, "b": 0}
    history = []
    for tick in range(30):
        d = eng.step(float(tick), sim.sample(), two_vms(balloons["a"], balloons["b"]))
        history.append(d)
        # The guests reach their targets within the tick; the host gets the pages back.
        sim.balloon_changed(sum(v.target_pages for v in d.vms.values()) - sum(balloons.values()))
        balloons = {n: v.target_pages for n, v in d.vms.items()}
        # Small noise in the host's own use (+-300 pages) around the settled point.
        sim.balloon_changed(300 if tick % 2 else -300)
    assert history[0].state is HostState.SOFT
    assert {n: v.target_pages for n, v in history[-1].vms.items()} == {"a": 1000, "b": 1000}
    # After the first step the targets never move again. Free memory now swings between
    # 7100 and 7700 around the soft exit (7400): at 7100 the host stays SOFT and wants
    # 2000 + 300 = 2300 pages, 150 more per VM, below the 512-page target hysteresis; at 7700
    # it is CLEAR and holds. Nothing re-enters SOFT from CLEAR (entry is 6400).
    assert all(d.total_target_pages == 2000 for d in history)
    assert {d.state for d in history[1:]} <= {HostState.SOFT, HostState.CLEAR}
    assert {d.vms["a"].reason for d in history[1:]} <= {"hysteresis", "pressure:clear"}


def test_engine_high_releases_only_the_surplus() -> None:
    eng = engine()
    eng.step(0.0, host(5400), two_vms())  # 1000 each
    # Free rises to 12400 (HIGH): surplus over the clear exit 11000 is 1400, so pressure
    # balloons shrink from 2000 to 600: 300 each.
    d = eng.step(1.0, host(12_400), two_vms(1000, 1000))
    assert d.state is HostState.HIGH
    assert {n: v.target_pages for n, v in d.vms.items()} == {"a": 300, "b": 300}
    # Plenty free: everything released, at once (deflation is not rate-limited).
    d = eng.step(2.0, host(60_000), two_vms(300, 300))
    assert d.total_target_pages == 0


def test_engine_rate_limit_on_inflation() -> None:
    eng = engine(inflate_rate_pages_per_s=100, min_target_change_pages=0)
    # First step: dt is one poll period (1 s) -> 100 pages each.
    d = eng.step(10.0, host(5400), two_vms())
    assert {n: (v.target_pages, v.reason) for n, v in d.vms.items()} == {
        "a": (100, "rate-limited"),
        "b": (100, "rate-limited"),
    }
    assert d.vms["a"].desired_pages == 1000
    # 2.5 s later: +250 each -> 350.
    d = eng.step(12.5, host(5400), two_vms(100, 100))
    assert {v.target_pages for v in d.vms.values()} == {350}
    # Clock going backwards grants nothing.
    d = eng.step(11.0, host(5400), two_vms(350, 350))
    assert {v.target_pages for v in d.vms.values()} == {350}


def test_engine_host_wide_rate_limit() -> None:
    # Host-wide 150 pages/s shared in proportion to demand (1000 each) -> 75 each.
    eng = engine(inflate_rate_pages_per_s=0, host_inflate_rate_pages_per_s=150)
    d = eng.step(0.0, host(5400), two_vms())
    assert {v.target_pages for v in d.vms.values()} == {75}


def test_engine_hard_state_lifts_rate_limit() -> None:
    # free 3000 < 3200: HARD. Reclaim 7400 - 3000 = 4400, 2200 each, all at once.
    d = engine(inflate_rate_pages_per_s=100).step(0.0, host(3000), two_vms())
    assert d.state is HostState.HARD
    assert {(v.target_pages, v.reason) for v in d.vms.values()} == {(2200, "pressure:hard")}


def test_engine_low_state_reports_unmet() -> None:
    # Two small VMs of 1000 pages each can give at most 650 each (CtlMaxPercent).
    # free 0: LOW, reclaim 7400 -> 1300 placed, 6100 unmet (ESXi would compress/swap).
    vms = {"a": vm(1000), "b": vm(1000)}
    d = engine().step(0.0, host(0), vms)
    assert d.state is HostState.LOW
    assert d.total_target_pages == 1300
    assert d.unmet_pages == 6100
    assert {v.reason for v in d.vms.values()} == {"capped:CtlMaxPercent"}


def test_engine_target_hysteresis() -> None:
    eng = engine()
    eng.step(0.0, host(5400), two_vms())  # 1000 each
    # Free dips to 6200 (still SOFT); held 2000 -> wanted 2000 + 1200 = 3200, 1600 each:
    # a change of 600 >= 512 is issued.
    d = eng.step(1.0, host(6200), two_vms(1000, 1000))
    assert {v.target_pages for v in d.vms.values()} == {1600}
    # Then 6300 with the balloons at 1600: wanted 3200 + 1100 = 4300, 2150 each: +550, issued.
    # But with free 6300 and balloons lagging at 1400: wanted 2800 + 1100 = 3900 -> 1950,
    # a change of 350 < 512 -> held at 1600.
    d = eng.step(2.0, host(6300), two_vms(1400, 1400))
    assert {(v.target_pages, v.reason) for v in d.vms.values()} == {(1600, "hysteresis")}
    assert d.vms["a"].desired_pages == 1950


def test_engine_zero_target_passes_hysteresis() -> None:
    eng = engine()
    vms = {"a": vm(40_000, manual=300)}
    # A manual target of 300 from a balloon of 0 is below the 512 threshold: held at 0.
    d = eng.step(0.0, host(50_000), vms)
    assert d.vms["a"].target_pages == 0
    vms = {"a": vm(40_000, manual=2000)}
    assert eng.step(1.0, host(50_000), vms).vms["a"].target_pages == 2000
    # 2000 -> 0 is always issued, unlike 2000 -> 1700.
    assert eng.step(2.0, host(50_000), {"a": vm(40_000, manual=1700)}).vms["a"].target_pages == 2000
    assert eng.step(3.0, host(50_000), {"a": vm(40_000, manual=0)}).vms["a"].target_pages == 0


def test_engine_limit_applies_on_idle_host_with_rate_limit() -> None:
    eng = engine(inflate_rate_pages_per_s=1000)
    vms = {"a": vm(40_000, limit_pages=30_000)}
    d = eng.step(0.0, host(90_000), vms)
    assert d.state is HostState.HIGH
    assert (d.vms["a"].target_pages, d.vms["a"].reason) == (1000, "rate-limited")
    d = eng.step(5.0, host(90_000), {"a": vm(40_000, limit_pages=30_000, balloon=1000)})
    assert (d.vms["a"].target_pages, d.vms["a"].reason) == (6000, "rate-limited")
    d = eng.step(20.0, host(90_000), {"a": vm(40_000, limit_pages=30_000, balloon=6000)})
    assert (d.vms["a"].target_pages, d.vms["a"].reason) == (10_000, "limit")


def test_engine_lowered_cap_is_obeyed_at_once() -> None:
    eng = engine()
    vms = {"a": vm(40_000, limit_pages=20_000)}
    assert eng.step(0.0, host(90_000), vms).vms["a"].target_pages == 16_384  # rate, 1 s
    eng.settings.set("/Mem/CtlMaxPercent", 10)  # cap 4000
    d = eng.step(0.1, host(90_000), vms)
    assert (d.vms["a"].target_pages, d.vms["a"].reason) == (4000, "capped:CtlMaxPercent")


def test_engine_uses_current_balloon_as_starting_point() -> None:
    # A VM seen for the first time with a 5000-page balloon and nothing to do: deflates to 0.
    d = engine().step(0.0, host(90_000), {"a": vm(40_000, balloon=5000)})
    assert d.vms["a"].target_pages == 0


# --------------------------------------------------------------------------------------------
# Properties

share_values = st.one_of(st.sampled_from(list(SharesLevel)), st.integers(0, 100_000))


@st.composite
def vm_states(draw: st.DrawFn, pools: tuple[str, ...] = ()) -> VmState:
    size = draw(st.integers(1, 200_000))
    reservation = draw(st.integers(0, size))
    limit = draw(st.none() | st.integers(reservation, size + 1000))
    return VmState(
        spec=VmSpec(
            size_pages=size,
            reservation_pages=reservation,
            limit_pages=limit,
            shares=draw(share_values),
            max_memctl_pages=draw(st.none() | st.integers(0, size)),
            pool=draw(st.sampled_from((None, *pools))),
        ),
        active_fraction=draw(st.floats(0.0, 1.0)),
        balloon_pages=draw(st.integers(0, size)),
        manual_target_pages=draw(st.none() | st.none() | st.integers(0, size)),
    )


Scenario = tuple[dict[str, VmState], dict[str, PoolSpec], PolicySettings]


@st.composite
def scenarios(draw: st.DrawFn, with_pools: bool = True) -> Scenario:
    pools: dict[str, PoolSpec] = {}
    if with_pools:
        for i in range(draw(st.integers(0, 3))):
            name = f"p{i}"
            parent = draw(st.sampled_from((None, *pools)))
            limit = draw(st.none() | st.integers(0, 400_000))
            pools[name] = PoolSpec(
                name,
                parent=parent,
                limit_pages=limit,
                shares=draw(share_values),
                # Reservations with admission control are tested by example; here keep them
                # expandable so every drawn tree is admissible.
                reservation_pages=draw(st.integers(0, limit or 0)) if limit else 0,
            )
    n = draw(st.integers(1, 5))
    vms = {f"vm{i}": draw(vm_states(tuple(pools))) for i in range(n)}
    s = PolicySettings(
        ctl_max_percent=draw(st.integers(0, 99)), idle_tax_percent=draw(st.integers(0, 99))
    )
    return vms, pools, s


def admissible(
    vms: Mapping[str, VmState], pools: Mapping[str, PoolSpec], s: PolicySettings
) -> bool:
    try:
        compute_entitlements(vms, pools, s, 0)
    except ConfigError:
        return False  # e.g. children reserve more than a pool's limit
    return True


@given(scenarios(), st.integers(0, 2_000_000))
@settings(max_examples=300, deadline=None)
def test_prop_targets_respect_reservation_and_caps(scenario: Scenario, reclaim: int) -> None:
    vms, pools, s = scenario
    assume(admissible(vms, pools, s))
    ent = compute_entitlements(vms, pools, s, reclaim)
    for name, e in ent.vms.items():
        spec = vms[name].spec
        assert 0 <= e.target_pages <= e.max_pages
        assert spec.size_pages - e.target_pages >= spec.reservation_pages
        assert e.target_pages <= spec.size_pages * s.ctl_max_percent // 100
        if spec.max_memctl_pages is not None:
            assert e.target_pages <= spec.max_memctl_pages


@given(scenarios(), st.integers(0, 2_000_000))
@settings(max_examples=300, deadline=None)
def test_prop_reclamation_meets_demand_when_possible(scenario: Scenario, reclaim: int) -> None:
    vms, pools, s = scenario
    assume(admissible(vms, pools, s))
    base = limit_targets(vms, pools, s)
    ent = compute_entitlements(vms, pools, s, reclaim)
    placed = sum(ent.vms[n].target_pages - base[n] for n in vms)
    assert placed == ent.pressure_pages
    # Room: what the balloons could still take beyond the limit targets, within the caps,
    # ignoring pool reservations (which can only reduce it).
    room = sum(ent.vms[n].max_pages - base[n] for n in vms if vms[n].manual_target_pages is None)
    assert placed <= min(reclaim, room)
    if not pools:
        assert placed == min(reclaim, room)
    assert ent.unmet_pages == reclaim - placed  # pressure only: limits are capped_pages


@given(scenarios(), st.integers(0, 1_000_000), st.integers(0, 1_000_000))
@settings(max_examples=300, deadline=None)
def test_prop_monotonic_in_reclaim(scenario: Scenario, r1: int, r2: int) -> None:
    vms, pools, s = scenario
    assume(admissible(vms, pools, s))
    lo, hi = sorted((r1, r2))
    t_lo = targets(vms, lo, pools=pools, settings=s)
    t_hi = targets(vms, hi, pools=pools, settings=s)
    assert sum(t_lo.values()) <= sum(t_hi.values())
    for name in vms:
        # Per VM within one page per rounding level (largest-remainder rounding at each pool
        # level may move a single page between siblings).
        assert t_lo[name] <= t_hi[name] + 1 + len(pools)


@given(
    scenarios(with_pools=False),
    st.integers(0, HOST_PAGES),
    st.integers(0, HOST_PAGES),
)
@settings(max_examples=200, deadline=None)
def test_prop_monotonic_in_host_pressure(scenario: Scenario, f1: int, f2: int) -> None:
    vms, _, s = scenario
    s.min_free_pct = 10
    more_free, less_free = max(f1, f2), min(f1, f2)
    relaxed = PolicyEngine(s).step(0.0, host(more_free), vms)
    pressed = PolicyEngine(s).step(0.0, host(less_free), vms)
    assert pressed.state.severity >= relaxed.state.severity
    assert pressed.pressure_pages >= relaxed.pressure_pages
    for name in vms:
        assert pressed.vms[name].desired_pages + 1 >= relaxed.vms[name].desired_pages


@given(
    scenarios(with_pools=False),
    st.lists(st.tuples(st.floats(0.0, 10.0), st.integers(0, HOST_PAGES)), min_size=1, max_size=8),
    st.integers(1, 50_000),
)
@settings(max_examples=200, deadline=None)
def test_prop_engine_rate_limit_and_caps_hold(
    scenario: Scenario, steps: list[tuple[float, int]], rate: int
) -> None:
    vms, _, s = scenario
    s.min_free_pct = 10
    s.inflate_rate_pages_per_s = rate
    eng = PolicyEngine(s)
    now = 0.0
    previous = {n: v.balloon_pages for n, v in vms.items()}
    first = True
    for dt, free in steps:
        now += dt
        d = eng.step(now, host(free), vms)
        window = 1.0 if first else dt
        for name, v in d.vms.items():
            spec = vms[name].spec
            assert 0 <= v.target_pages <= v.max_pages
            assert spec.size_pages - v.target_pages >= spec.reservation_pages
            start = min(previous[name], v.max_pages)
            if d.state.rate_limited:
                assert v.target_pages - start <= rate * window + 1e-9
        previous = {n: v.target_pages for n, v in d.vms.items()}
        first = False
