"""Sans-I/O host memory policy: how many pages each VM's balloon should hold (ESXi model).

No I/O, no clock reads: the caller samples the host (see :mod:`vdev.policy.host`), passes the
time in, and applies the targets to the balloon devices.

Sources (see ``/work/shared/reference/vmw-balloon-protocol.md`` §8 and ``anchors.md`` §A.6):

* [WALDSPURGER] C. A. Waldspurger, "Memory Resource Management in VMware ESX Server",
  OSDI 2002: shares, min-funding revocation and the idle memory tax.
* [RESMGMT] VMware vSphere Resource Management guide: shares presets, reservations, limits,
  resource pools and expandable reservations, ``sched.mem.maxmemctl``.
* [MEM-ADV] ESXi ``Mem.*`` advanced settings: ``Mem.CtlMaxPercent`` (65, 0-99),
  ``Mem.IdleTax`` (75, 0-99), ``Mem.MinFreePct``.
* [STATES] Host memory states high/clear/soft/hard/low and their thresholds as a fraction of
  minFree (Duncan Epping's vSphere 6 table, reference doc §8.5), and the ESXi 5+ sliding
  minFree scale.

The ESXi per-VM target algorithm itself is not public (reference doc §8.4); what follows is the
published model made concrete. Every place where we had to choose is marked "Our choice".

Overview of one :meth:`PolicyEngine.step`:

1. minFree from the host size (:func:`min_free_bytes`), host state from free memory with
   enter/exit hysteresis (:func:`classify_host_state`).
2. Per VM bounds: the most its balloon may hold (``CtlMaxPercent``, ``maxmemctl``,
   reservation) and the least it must hold (its limit, its pools' limits).
3. How much the host wants reclaimed by ballooning beyond those limits, from the host state
   (:func:`pressure_reclaim_pages`).
4. That amount is split over the pool tree by water-filling over the adjusted
   shares-per-page ratio (:func:`water_fill`), giving each VM a desired target.
5. Hysteresis (small changes are not issued) and the inflation rate limit turn desired
   targets into issued targets.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from protocol.errors import ConfigError
from protocol.units import PAGE_SIZE, PAGES_PER_MIB

#: The vmmemctl driver polls GET_TARGET once a second (BALLOON_POLL_PERIOD, reference §7.3).
#: Used as the time step of the very first :meth:`PolicyEngine.step`, which has no predecessor.
POLL_PERIOD_S = 1.0

GIB = 1 << 30


# --------------------------------------------------------------------------------------------
# Shares


class SharesLevel(enum.Enum):
    """ESXi share presets. For a VM the value is shares per MB of configured memory [RESMGMT]."""

    LOW = 5
    NORMAL = 10
    HIGH = 20

    def vm_shares(self, size_pages: int) -> float:
        return self.value * size_pages / PAGES_PER_MIB

    def pool_shares(self) -> int:
        # [RESMGMT] resource pool memory shares: low 81920, normal 163840, high 327680,
        # i.e. the shares of a 16 GB VM at the same level (16384 MB x 5/10/20).
        return self.value * 16384


Shares = SharesLevel | int
"""A preset level, or a custom number of shares."""


def _check_shares(shares: Shares, what: str) -> None:
    if isinstance(shares, SharesLevel):
        return
    if isinstance(shares, bool) or not isinstance(shares, int) or shares < 0:
        raise ConfigError(f"{what}: shares must be a SharesLevel or an int >= 0, got {shares!r}")


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class _SettingPath:
    attribute: str
    minimum: int
    maximum: int


# Paths under /Mem/ are ESXi's advanced settings [MEM-ADV]; /VBalloon/ are ours (ESXi does
# not publish these knobs, or has none).
_SETTING_PATHS: dict[str, _SettingPath] = {
    "/Mem/CtlMaxPercent": _SettingPath("ctl_max_percent", 0, 99),
    "/Mem/IdleTax": _SettingPath("idle_tax_percent", 0, 99),
    "/Mem/MinFreePct": _SettingPath("min_free_pct", 0, 50),
    "/VBalloon/ClearPct": _SettingPath("clear_pct", 1, 10_000),
    "/VBalloon/SoftPct": _SettingPath("soft_pct", 1, 10_000),
    "/VBalloon/HardPct": _SettingPath("hard_pct", 1, 10_000),
    "/VBalloon/LowPct": _SettingPath("low_pct", 1, 10_000),
    "/VBalloon/StateExitMarginPct": _SettingPath("state_exit_margin_pct", 0, 1_000),
    "/VBalloon/InflateRatePagesPerSec": _SettingPath("inflate_rate_pages_per_s", 0, 1 << 40),
    "/VBalloon/HostInflateRatePagesPerSec": _SettingPath(
        "host_inflate_rate_pages_per_s", 0, 1 << 40
    ),
    "/VBalloon/MinTargetChangePages": _SettingPath("min_target_change_pages", 0, 1 << 40),
}


@dataclass
class PolicySettings:
    """Host-wide policy knobs, addressable by ESXi-style paths (:meth:`get`, :meth:`set`)."""

    #: ``Mem.CtlMaxPercent``: most of a VM's configured memory the balloon may take. 0 turns
    #: ballooning off for every VM [MEM-ADV].
    ctl_max_percent: int = 65
    #: ``Mem.IdleTax``: idle memory tax rate tau in percent; idle pages cost k = 1/(1-tau)
    #: times an active page [WALDSPURGER, idle memory tax].
    idle_tax_percent: int = 75
    #: ``Mem.MinFreePct``: ESX <= 4.1 kept a fixed 6 % free. Our choice: 0 (the default)
    #: selects the ESXi 5+ sliding scale, any other value a fixed percentage of host memory.
    min_free_pct: int = 0
    #: Host state thresholds in percent of minFree [STATES]: the host *enters* a state when
    #: free memory falls below its threshold. (The 400 % "high" figure in the table is where
    #: ESXi starts breaking large pages for TPS; it changes nothing for ballooning.)
    clear_pct: int = 100
    soft_pct: int = 64
    hard_pct: int = 32
    low_pct: int = 16
    #: Our choice: a state is *left* towards a milder one only once free memory is above its
    #: threshold plus this margin (percent of minFree). ESXi documents that states have
    #: hysteresis but not the numbers.
    state_exit_margin_pct: int = 10
    #: Inflation rate limit per VM, pages per second; 0 = unlimited. 16384 is the historic
    #: driver's per-tick NOSLEEP allocation cap (reference §7.3) at one tick per second.
    inflate_rate_pages_per_s: int = 16384
    #: Host-wide inflation budget, pages per second, shared by all VMs; 0 = unlimited.
    host_inflate_rate_pages_per_s: int = 0
    #: Target hysteresis: a desired target within this many pages of the issued one is not
    #: issued. 512 echoes the driver's own deflate hysteresis (reference §7.3).
    min_target_change_pages: int = 512

    def __post_init__(self) -> None:
        self.validate()

    @staticmethod
    def paths() -> tuple[str, ...]:
        return tuple(_SETTING_PATHS)

    def get(self, path: str) -> int:
        value: int = getattr(self, _lookup_path(path).attribute)
        return value

    def set(self, path: str, value: int) -> None:
        """Set one setting by path; on any error nothing changes and ConfigError is raised."""
        spec = _lookup_path(path)
        _check_int_range(path, value, spec)
        previous = getattr(self, spec.attribute)
        setattr(self, spec.attribute, value)
        try:
            self.validate()
        except ConfigError:
            setattr(self, spec.attribute, previous)
            raise

    def validate(self) -> None:
        for path, spec in _SETTING_PATHS.items():
            _check_int_range(path, getattr(self, spec.attribute), spec)
        if not self.clear_pct > self.soft_pct > self.hard_pct > self.low_pct:
            raise ConfigError(
                "state thresholds must satisfy ClearPct > SoftPct > HardPct > LowPct, got "
                f"{self.clear_pct} > {self.soft_pct} > {self.hard_pct} > {self.low_pct}"
            )

    @property
    def idle_cost_factor(self) -> float:
        """k = 1 / (1 - tau) [WALDSPURGER, idle memory tax]; tau = 75 % gives k = 4."""
        return 1.0 / (1.0 - self.idle_tax_percent / 100.0)


def _lookup_path(path: str) -> _SettingPath:
    try:
        return _SETTING_PATHS[path]
    except KeyError:
        raise ConfigError(f"unknown setting {path!r}; known: {', '.join(_SETTING_PATHS)}") from None


def _check_int_range(path: str, value: object, spec: _SettingPath) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path} must be an integer, got {value!r}")
    if not spec.minimum <= value <= spec.maximum:
        raise ConfigError(f"{path} must be in {spec.minimum}..{spec.maximum}, got {value}")


# --------------------------------------------------------------------------------------------
# minFree and host states

# ESXi 5+ sliding scale [STATES]: 6 % of the first 4 GB, 4 % of the next 8 GB (4-12 GB),
# 2 % of the next 16 GB (12-28 GB), 1 % of the rest. 28 GB -> ~901 MB, 128 GB -> ~1.9 GB.
_MIN_FREE_BANDS: tuple[tuple[int | None, int], ...] = (
    (4 * GIB, 6),
    (8 * GIB, 4),
    (16 * GIB, 2),
    (None, 1),
)


def min_free_bytes(total_bytes: int, min_free_pct: int = 0) -> int:
    """minFree for a host of ``total_bytes``: a fixed percentage, or the sliding scale if 0."""
    if total_bytes < 0:
        raise ConfigError(f"host memory must be >= 0, got {total_bytes}")
    if min_free_pct:
        return total_bytes * min_free_pct // 100
    remaining = total_bytes
    hundredths = 0  # sum of band_bytes * pct, divided by 100 once to keep integers exact
    for band, pct in _MIN_FREE_BANDS:
        portion = remaining if band is None else min(remaining, band)
        hundredths += portion * pct
        remaining -= portion
    return hundredths // 100


class HostState(enum.Enum):
    """ESXi 6.x host memory states [STATES], mildest first.

    What ESXi does in each, and what we do:

    * HIGH: nothing (above 400 % of minFree not even large-page breaking). We: no pressure
      ballooning; pressure balloons deflate as far as free memory stays above the clear
      threshold plus margin. Limits and manual targets still apply.
    * CLEAR: large pages broken, TPS run actively. We have no TPS: pressure balloons are held
      where they are, neither grown nor released.
    * SOFT: TPS + ballooning. We balloon, within the inflation rate limit.
    * HARD: ESXi compresses and swaps, and (per Epping) stops ballooning. We can neither
      compress nor swap, so we keep ballooning with the rate limit lifted.
    * LOW: ESXi also blocks VM memory allocation. We cannot block; same as HARD. The pressure
      demand the caps keep us from placing is reported as ``PolicyDecision.unmet_pages``
      (limits and manual targets cut by the caps are ``capped_pages``, a separate figure).
    """

    HIGH = "high"
    CLEAR = "clear"
    SOFT = "soft"
    HARD = "hard"
    LOW = "low"

    @property
    def severity(self) -> int:
        return _STATES_MILD_FIRST.index(self)

    @property
    def balloons(self) -> bool:
        """Whether this state grows pressure balloons."""
        return self.severity >= HostState.SOFT.severity

    @property
    def rate_limited(self) -> bool:
        return self.severity <= HostState.SOFT.severity


_STATES_MILD_FIRST = (
    HostState.HIGH,
    HostState.CLEAR,
    HostState.SOFT,
    HostState.HARD,
    HostState.LOW,
)


def _enter_pct(state: HostState, settings: PolicySettings) -> int:
    return {
        HostState.CLEAR: settings.clear_pct,
        HostState.SOFT: settings.soft_pct,
        HostState.HARD: settings.hard_pct,
        HostState.LOW: settings.low_pct,
    }[state]


def _exit_free_pages(state: HostState, min_free_pages: int, settings: PolicySettings) -> int:
    """Free pages at or above which ``state`` is left (its threshold plus the margin)."""
    pct = _enter_pct(state, settings) + settings.state_exit_margin_pct
    return math.ceil(min_free_pages * pct / 100)


def classify_host_state(
    free_pages: int,
    min_free_pages: int,
    settings: PolicySettings,
    previous: HostState | None = None,
) -> HostState:
    """The host state for ``free_pages``, with ESXi-style enter/exit hysteresis.

    A state is entered as soon as free memory falls below its threshold (``free < pct x
    minFree``). Going back towards HIGH, each state is left only when free memory reaches its
    threshold plus ``state_exit_margin_pct``; so with the defaults SOFT is entered below 64 %
    of minFree and left at 74 %.
    """
    raw = HostState.HIGH
    for state in _STATES_MILD_FIRST[1:]:
        if free_pages * 100 < _enter_pct(state, settings) * min_free_pages:
            raw = state
    if previous is None or raw.severity >= previous.severity:
        return raw
    state = previous
    while state.severity > raw.severity and free_pages >= _exit_free_pages(
        state, min_free_pages, settings
    ):
        state = _STATES_MILD_FIRST[state.severity - 1]
    return state


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class HostSample:
    """Host memory at one instant. ``free_bytes`` is what could be handed out now (on Linux:
    MemAvailable, or a cgroup's headroom). PSI averages are informational."""

    total_bytes: int
    free_bytes: int
    psi_some_avg10: float | None = None
    psi_full_avg10: float | None = None

    def __post_init__(self) -> None:
        if self.total_bytes < 0 or self.free_bytes < 0:
            raise ConfigError(f"host memory must be >= 0: {self}")


@dataclass(frozen=True)
class VmSpec:
    """A VM's memory configuration, all sizes in 4 KiB pages."""

    size_pages: int
    reservation_pages: int = 0
    limit_pages: int | None = None  # None = unlimited
    shares: Shares = SharesLevel.NORMAL
    max_memctl_pages: int | None = None  # sched.mem.maxmemctl; None = -1 = unlimited
    pool: str | None = None  # the resource pool this VM sits in; None = the host's root

    def __post_init__(self) -> None:
        if self.size_pages <= 0:
            raise ConfigError(f"VM size must be > 0 pages, got {self.size_pages}")
        if not 0 <= self.reservation_pages <= self.size_pages:
            raise ConfigError(
                f"reservation {self.reservation_pages} must be in 0..size {self.size_pages}"
            )
        if self.limit_pages is not None and self.limit_pages < self.reservation_pages:
            # [RESMGMT]: a limit below the reservation cannot be configured.
            raise ConfigError(
                f"limit {self.limit_pages} is below reservation {self.reservation_pages}"
            )
        if self.max_memctl_pages is not None and self.max_memctl_pages < 0:
            raise ConfigError(f"maxmemctl must be >= 0 or None, got {self.max_memctl_pages}")
        _check_shares(self.shares, "VM")

    @property
    def share_count(self) -> float:
        if isinstance(self.shares, SharesLevel):
            return self.shares.vm_shares(self.size_pages)
        return float(self.shares)


@dataclass(frozen=True)
class VmState:
    """A VM as the policy sees it at one step."""

    spec: VmSpec
    #: Fraction of memory actively used, 0..1 (ESXi estimates it by sampling, Mem.SamplePeriod).
    active_fraction: float = 1.0
    #: Pages the balloon holds now (the device model's size).
    balloon_pages: int = 0
    #: Operator override of the target; still capped, but shares and limits are ignored.
    manual_target_pages: int | None = None
    #: The largest balloon that still gives the host memory back: the pages it holds plus
    #: the guest's free pages that are resident in the host's RAM file (a balloon page that
    #: was never touched returns nothing). None: unknown (no guest stats), no such cap.
    host_return_pages: int | None = None
    #: The guest's free memory from its statistics (virtio-balloon), pages; None: unknown.
    guest_free_pages: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.active_fraction <= 1.0:
            raise ConfigError(f"active fraction must be in 0..1, got {self.active_fraction}")
        if self.balloon_pages < 0:
            raise ConfigError(f"balloon size must be >= 0, got {self.balloon_pages}")
        if self.manual_target_pages is not None and self.manual_target_pages < 0:
            raise ConfigError(f"manual target must be >= 0, got {self.manual_target_pages}")


@dataclass(frozen=True)
class PoolSpec:
    """A resource pool [RESMGMT]. Sizes in pages; ``parent`` None hangs it off the root."""

    name: str
    parent: str | None = None
    reservation_pages: int = 0
    limit_pages: int | None = None
    shares: Shares = SharesLevel.NORMAL
    #: An expandable reservation lets children reserve more than the pool's own reservation by
    #: borrowing from the parent; without it the children's reservations must fit inside.
    expandable_reservation: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a pool needs a name")
        if self.reservation_pages < 0:
            raise ConfigError(f"pool {self.name}: reservation must be >= 0")
        if self.limit_pages is not None and self.limit_pages < self.reservation_pages:
            raise ConfigError(f"pool {self.name}: limit is below its reservation")
        _check_shares(self.shares, f"pool {self.name}")

    @property
    def share_count(self) -> float:
        if isinstance(self.shares, SharesLevel):
            return float(self.shares.pool_shares())
        return float(self.shares)


# --------------------------------------------------------------------------------------------
# Water-filling over the adjusted shares-per-page ratio


def idle_cost(active_fraction: float, settings: PolicySettings) -> float:
    """Cost of one page: f + k (1 - f) [WALDSPURGER, idle memory tax].

    1 when fully active, k when idle."""
    k = settings.idle_cost_factor
    return active_fraction + k * (1.0 - active_fraction)


@dataclass(frozen=True)
class FillItem:
    """One claimant in :func:`water_fill`: it keeps between ``low`` and ``high`` pages and has
    ``weight`` = S / (f + k (1 - f)), its shares divided by its per-page cost."""

    low: int
    high: int
    weight: float


def water_fill(items: Sequence[FillItem], reclaim: int) -> tuple[list[int], list[bool]]:
    """Take ``reclaim`` pages from ``items``; return what each keeps and whether it is pinned at
    ``low`` by its bound rather than by the water level.

    Min-funding revocation [WALDSPURGER, share-based allocation] takes each page from the
    claimant with the lowest adjusted shares-per-page ratio
    rho = S / (P (f + k (1 - f))) = weight / P, with k = 1 / (1 - tau). Taking pages raises
    rho, so in the limit every claimant that gave something up ends at one common level rho*
    and keeps P_i = weight_i / rho*, clamped to [low_i, high_i]. We solve for
    mu = 1 / rho* (pages kept per unit of weight) exactly instead of revoking page by page:
    kept(mu) = sum(clamp(weight_i mu, low_i, high_i)) is piecewise linear and nondecreasing,
    so we find the segment between two breakpoints low_i/weight_i, high_i/weight_i where it
    equals sum(high) - reclaim and solve the linear equation there.

    Claimants with zero shares have rho = 0 and give everything first, split in proportion to
    what they can give. Fractional pages are rounded by largest remainder so the total taken
    is exactly ``reclaim`` (clamped to what the bounds allow).
    """
    if not items:
        return [], []
    room = [it.high - it.low for it in items]
    reclaim = max(0, min(reclaim, sum(room)))
    taken = [0.0] * len(items)
    pinned = [False] * len(items)

    free_riders = [i for i, it in enumerate(items) if it.weight <= 0 and room[i] > 0]
    riders_room = sum(room[i] for i in free_riders)
    if reclaim <= riders_room:
        for i in free_riders:
            taken[i] = reclaim * room[i] / riders_room if riders_room else 0.0
        return _round_kept(items, taken, reclaim), pinned
    for i in free_riders:
        taken[i] = float(room[i])
        pinned[i] = True

    rest = [i for i, it in enumerate(items) if it.weight > 0 and room[i] > 0]
    target_kept = sum(items[i].high for i in rest) - (reclaim - riders_room)

    def kept(mu: float) -> float:
        return sum(min(max(items[i].weight * mu, items[i].low), items[i].high) for i in rest)

    breakpoints = sorted(
        {items[i].low / items[i].weight for i in rest}
        | {items[i].high / items[i].weight for i in rest}
    )
    # kept() is nondecreasing in mu: find the first breakpoint where it reaches the target.
    k = next((j for j, mu in enumerate(breakpoints) if kept(mu) >= target_kept), None)
    k = len(breakpoints) - 1 if k is None else k
    upper = breakpoints[k]
    # Classify each claimant on the segment (lower, upper) by its midpoint, not at ``upper``
    # itself: at a breakpoint ``weight * (high / weight)`` may round just above ``high`` and a
    # claimant still on its slope would be taken for clamped (then nothing is free to solve
    # for, and rounding hands the whole reclaim to whoever comes first).
    lower = breakpoints[k - 1] if k > 0 else 0.0
    mid = (lower + upper) / 2
    clamped_sum = 0.0
    free_weight = 0.0
    for i in rest:
        it = items[i]
        if it.weight * mid <= it.low:
            clamped_sum += it.low
        elif it.weight * mid >= it.high:
            clamped_sum += it.high
        else:  # on the slope just below ``upper``
            free_weight += it.weight
    mu = (target_kept - clamped_sum) / free_weight if free_weight else upper
    for i in rest:
        it = items[i]
        ideal = it.weight * mu
        keep = min(max(ideal, it.low), it.high)
        taken[i] = it.high - keep
        pinned[i] = ideal < it.low - 1e-6 * max(1, it.low)
    return _round_kept(items, taken, reclaim), pinned


def _round_kept(items: Sequence[FillItem], taken: list[float], reclaim: int) -> list[int]:
    """Largest-remainder rounding of ``taken`` to integers summing to ``reclaim``."""
    room = [it.high - it.low for it in items]
    whole = [min(max(math.floor(t + 1e-9), 0), r) for t, r in zip(taken, room, strict=True)]
    short = reclaim - sum(whole)
    order = sorted(range(len(items)), key=lambda i: taken[i] - whole[i], reverse=True)
    while short > 0:
        progressed = False
        for i in order:
            if short and whole[i] < room[i]:
                whole[i] += 1
                short -= 1
                progressed = True
        if not progressed:
            break
    for i in reversed(order):  # float error overshot: give back from the smallest remainders
        while short < 0 and whole[i] > 0:
            whole[i] -= 1
            short += 1
    return [it.high - w for it, w in zip(items, whole, strict=True)]


# --------------------------------------------------------------------------------------------
# The pool tree


@dataclass
class _Node:
    name: str
    pool: PoolSpec | None = None  # None: a VM, or the root
    vm: str | None = None
    children: list[_Node] = field(default_factory=list)
    low: int = 0  # least memory the node keeps (caps, reservations)
    high: int = 0  # most memory the node keeps (configured size, limits)
    cost: float = 1.0  # per-page cost f + k (1 - f), allocation-weighted for pools
    shares: float = 0.0
    reservation: int = 0  # effective reservation, including what children borrow


@dataclass(frozen=True)
class VmBounds:
    """The per-VM constraints the water-filling works inside, in pages of balloon."""

    max_pages: int  # most the balloon may hold: min(CtlMaxPercent, maxmemctl, size - reservation)
    max_reason: str  # which of the three binds
    limit_pages: int  # what the VM's own limit (or manual target) asks for, before the cap


def vm_bounds(vm: VmState, settings: PolicySettings) -> VmBounds:
    spec = vm.spec
    candidates = [
        (spec.size_pages * settings.ctl_max_percent // 100, "capped:CtlMaxPercent"),
        (spec.size_pages - spec.reservation_pages, "reservation floor"),
    ]
    if spec.max_memctl_pages is not None:
        candidates.append((spec.max_memctl_pages, "capped:maxmemctl"))
    if vm.host_return_pages is not None:
        candidates.append((vm.host_return_pages, "capped:resident"))
    # Ties go to the first listed; min() is stable on equal keys.
    max_pages, max_reason = min(candidates, key=lambda c: c[0])
    if vm.manual_target_pages is not None:
        wanted = vm.manual_target_pages
    elif spec.limit_pages is not None:
        # [RESMGMT] / KB "Impact of ... limits": a limit balloons even on an idle host.
        wanted = max(0, spec.size_pages - spec.limit_pages)
    else:
        wanted = 0
    return VmBounds(max_pages=max(0, max_pages), max_reason=max_reason, limit_pages=wanted)


def _build_tree(
    vms: Mapping[str, VmState], pools: Mapping[str, PoolSpec], settings: PolicySettings
) -> tuple[_Node, dict[str, _Node], dict[str, VmBounds]]:
    root = _Node(name="")
    pool_nodes = {name: _Node(name=name, pool=spec) for name, spec in pools.items()}
    for name, node in pool_nodes.items():
        parent = pools[name].parent
        if parent is None:
            root.children.append(node)
        elif parent in pool_nodes:
            pool_nodes[parent].children.append(node)
        else:
            raise ConfigError(f"pool {name}: parent {parent!r} does not exist")
    for name in pools:  # a cycle is unreachable from the root, so look for it upwards
        seen = {name}
        parent = pools[name].parent
        while parent is not None and parent in pools:
            if parent in seen:
                raise ConfigError(f"pool {name}: pool tree has a cycle through {parent}")
            seen.add(parent)
            parent = pools[parent].parent
    vm_nodes: dict[str, _Node] = {}
    bounds: dict[str, VmBounds] = {}
    for name, vm in vms.items():
        node = _Node(name=name, vm=name)
        vm_nodes[name] = node
        bounds[name] = vm_bounds(vm, settings)
        if vm.spec.pool is None:
            root.children.append(node)
        elif vm.spec.pool in pool_nodes:
            pool_nodes[vm.spec.pool].children.append(node)
        else:
            raise ConfigError(f"VM {name}: pool {vm.spec.pool!r} does not exist")

    def settle(node: _Node) -> None:
        """Fill in low/high/cost/shares bottom-up."""
        if node.vm is not None:
            vm = vms[node.vm]
            b = bounds[node.vm]
            size = vm.spec.size_pages
            node.low = size - b.max_pages
            node.high = max(node.low, size - b.limit_pages)
            if vm.manual_target_pages is not None:
                node.low = node.high  # the operator fixed it; shares play no part
            node.cost = idle_cost(vm.active_fraction, settings)
            node.shares = vm.spec.share_count
            node.reservation = vm.spec.reservation_pages
            return
        for child in node.children:
            settle(child)
        low_caps = sum(c.low for c in node.children)
        high_children = sum(c.high for c in node.children)
        children_reserve = sum(c.reservation for c in node.children)
        node.cost = (
            sum(c.cost * c.high for c in node.children) / high_children if high_children else 1.0
        )
        pool = node.pool
        if pool is None:  # the root: the host itself
            node.low, node.high = low_caps, high_children
            return
        node.shares = pool.share_count
        # Expandable reservation [RESMGMT]: what the children reserve beyond the pool's own
        # reservation is borrowed from the parent, so it counts against the parent too.
        # Without it, admission control would have refused the configuration.
        if pool.expandable_reservation:
            node.reservation = max(pool.reservation_pages, children_reserve)
        elif children_reserve > pool.reservation_pages:
            raise ConfigError(
                f"pool {pool.name}: children reserve {children_reserve} pages, more than its "
                f"non-expandable reservation of {pool.reservation_pages}"
            )
        else:
            node.reservation = pool.reservation_pages
        if pool.limit_pages is not None and node.reservation > pool.limit_pages:
            raise ConfigError(
                f"pool {pool.name}: reservations of {node.reservation} pages exceed its limit"
            )
        limit = high_children if pool.limit_pages is None else pool.limit_pages
        # The caps may keep the pool above its limit: then low_caps wins (and the rest is unmet).
        node.high = max(low_caps, min(high_children, limit))
        node.low = min(node.high, max(low_caps, node.reservation))

    settle(root)
    return root, vm_nodes, bounds


@dataclass(frozen=True)
class Entitlement:
    """The desired (pre rate-limit, pre hysteresis) balloon target of one VM."""

    target_pages: int
    reason: str
    max_pages: int
    #: What the VM's own limit or manual target asked for beyond ``max_pages`` (cut by the
    #: caps: ESXi would swap it). Not host pressure: see :attr:`Entitlements.unmet_pages`.
    capped_pages: int = 0


@dataclass(frozen=True)
class Entitlements:
    vms: dict[str, Entitlement]
    #: Host pressure demand the caps kept us from placing on any balloon (ESXi would
    #: compress or swap it). Limits and manual targets never count here.
    unmet_pages: int
    #: Pressure reclamation actually placed on top of the limit-driven targets.
    pressure_pages: int
    #: Per pool: how far the caps keep the pool above its limit (only pools short of it).
    pool_capped_pages: dict[str, int] = field(default_factory=dict)

    @property
    def capped_pages(self) -> int:
        """Limit and manual requests cut by the caps, summed per constraint (a VM short of
        both its own and its pool's limit counts twice)."""
        return sum(e.capped_pages for e in self.vms.values()) + sum(self.pool_capped_pages.values())


def limit_targets(
    vms: Mapping[str, VmState],
    pools: Mapping[str, PoolSpec],
    settings: PolicySettings,
) -> dict[str, int]:
    """Balloon targets with no host pressure: only limits, pool limits and manual targets."""
    root, vm_nodes, _ = _build_tree(vms, pools, settings)
    kept = _distribute(root, 0)
    return {name: vms[name].spec.size_pages - kept[name] for name in vm_nodes}


def compute_entitlements(
    vms: Mapping[str, VmState],
    pools: Mapping[str, PoolSpec],
    settings: PolicySettings,
    pressure_pages: int,
    state: HostState = HostState.SOFT,
) -> Entitlements:
    """Split ``pressure_pages`` of reclamation over the VMs on top of their limit targets.

    Each level of the pool tree is one :func:`water_fill` among siblings (pools enter with
    their own shares and the allocation-weighted cost of their VMs); what a pool must give up
    is then water-filled among its children, together with what its own limit takes.
    """
    root, vm_nodes, bounds = _build_tree(vms, pools, settings)
    base = _distribute(root, 0)
    applied = max(0, min(pressure_pages, root.high - root.low))
    final = _distribute(root, applied)
    # Only a state that balloons has a demand to miss: in HIGH / CLEAR ``pressure_pages`` is
    # what the balloons may keep, and what the caps cut from it is simply released.
    unmet = pressure_pages - applied if state.balloons else 0
    result: dict[str, Entitlement] = {}
    for name in vm_nodes:
        vm = vms[name]
        b = bounds[name]
        size = vm.spec.size_pages
        target = size - final[name]
        base_target = size - base[name]
        own_wanted = b.limit_pages
        capped = max(0, own_wanted - b.max_pages)
        if vm.manual_target_pages is not None:
            reason = b.max_reason if own_wanted > b.max_pages else "manual"
        elif own_wanted > b.max_pages:
            reason = b.max_reason
        elif target > base_target:
            # At the cap the water level may have wanted more (and the rest went elsewhere
            # or is unmet); say so rather than just "pressure".
            reason = b.max_reason if target >= b.max_pages else f"pressure:{state.value}"
        elif target > own_wanted:
            reason = "pool-limit"
        elif target > 0:
            reason = "limit"
        else:
            reason = "none"
        result[name] = Entitlement(
            target_pages=target, reason=reason, max_pages=b.max_pages, capped_pages=capped
        )
    return Entitlements(
        vms=result,
        unmet_pages=unmet,
        pressure_pages=applied,
        pool_capped_pages=_pool_limit_capped(root),
    )


def _pool_limit_capped(node: _Node) -> dict[str, int]:
    """Per pool with a limit the caps keep it above: by how many pages."""
    out: dict[str, int] = {}
    if node.pool is not None and node.pool.limit_pages is not None:
        over = node.high - node.pool.limit_pages  # > 0 only if the caps beat the limit
        if over > 0:
            out[node.pool.name] = over
    for child in node.children:
        out.update(_pool_limit_capped(child))
    return out


def _distribute(root: _Node, reclaim: int) -> dict[str, int]:
    """Pages each VM keeps when the root gives up ``reclaim`` pages beyond the limits."""
    out: dict[str, int] = {}

    def visit(node: _Node, keep: int) -> None:
        if node.vm is not None:
            out[node.vm] = keep
            return
        children = node.children
        items = [FillItem(c.low, c.high, c.shares / c.cost) for c in children]
        kept, _ = water_fill(items, sum(c.high for c in children) - keep)
        for child, k in zip(children, kept, strict=True):
            visit(child, k)

    visit(root, max(root.low, root.high - reclaim))
    return out


# --------------------------------------------------------------------------------------------
# How much to reclaim


def pressure_reclaim_pages(
    state: HostState,
    free_pages: int,
    min_free_pages: int,
    held_pages: int,
    settings: PolicySettings,
) -> int:
    """Total pressure ballooning wanted, on top of limit and manual targets.

    ``held_pages`` is what the balloons already hold beyond their limit targets; the free
    memory we see is already net of it, so the answer is "held, plus or minus a correction":

    * SOFT/HARD/LOW: held + (soft exit - free): balloon until the host leaves SOFT, i.e. free
      memory back at SoftPct + margin of minFree. Aiming at the exit (not the entry) threshold
      is what keeps us from re-entering SOFT on the next small dip.
    * CLEAR: held. No new ballooning, nothing released.
    * HIGH: held - (free - clear exit), at least 0, at most held: release only what keeps free
      memory above ClearPct + margin, so a release cannot push the host back into CLEAR.

    The result never decreases as free memory decreases (monotonic in pressure).
    """
    held_pages = max(0, held_pages)
    if state.balloons:
        goal = _exit_free_pages(HostState.SOFT, min_free_pages, settings)
        return held_pages + max(0, goal - free_pages)
    if state is HostState.CLEAR:
        return held_pages
    surplus = free_pages - _exit_free_pages(HostState.CLEAR, min_free_pages, settings)
    return min(held_pages, max(0, held_pages - surplus))


# --------------------------------------------------------------------------------------------
# The engine


@dataclass(frozen=True)
class VmDecision:
    target_pages: int  # the balloon target to issue
    reason: str  # what decided the number (see module docs)
    desired_pages: int  # the entitlement before hysteresis and rate limit
    max_pages: int  # most the balloon may hold (esxtop MCTLMAX)
    capped_pages: int = 0  # its limit / manual target beyond max_pages (see Entitlement)
    desired_reason: str = ""  # why the entitlement is desired_pages (e.g. the cap that binds)


@dataclass(frozen=True)
class PolicyDecision:
    now: float
    state: HostState
    min_free_pages: int
    free_pages: int
    pressure_pages: int  # pressure reclamation placed beyond the limits
    unmet_pages: int  # pressure demand beyond the caps (ESXi would compress or swap these)
    vms: dict[str, VmDecision]
    #: Pools whose limit the caps keep them above, and by how much (VMs: VmDecision).
    pool_capped_pages: dict[str, int] = field(default_factory=dict)

    @property
    def total_target_pages(self) -> int:
        return sum(d.target_pages for d in self.vms.values())

    @property
    def capped_pages(self) -> int:
        """Limit and manual requests cut by the caps (per VM and per pool), in total."""
        return sum(d.capped_pages for d in self.vms.values()) + sum(self.pool_capped_pages.values())


class PolicyEngine:
    """Turns host samples into balloon targets. Keeps only what rate limiting and hysteresis
    need: the time of the last step, the host state, and the last issued target per VM.

    Rate limit (our choice): it bounds *inflation* only, by ``rate x dt`` pages per step,
    per VM and, if set, host-wide. Deflation is never slowed: the host only deflates when it
    has the memory to spare, the guest wants its memory back, and the driver paces deflation
    itself. In HARD and LOW the limit is lifted (see :class:`HostState`).

    Target hysteresis: if the desired target is within ``min_target_change_pages`` of the
    issued one, the issued one stands. A desired target of 0 always goes through (like the
    driver's "deflate if target == 0" rule), and so does any move needed to respect a cap.
    """

    def __init__(
        self, settings: PolicySettings | None = None, pools: Iterable[PoolSpec] = ()
    ) -> None:
        self.settings = settings if settings is not None else PolicySettings()
        self._pools: dict[str, PoolSpec] = {}
        self.set_pools(pools)
        self._last_now: float | None = None
        self._state: HostState | None = None
        self._issued: dict[str, int] = {}

    @property
    def pools(self) -> Mapping[str, PoolSpec]:
        return dict(self._pools)

    @property
    def state(self) -> HostState | None:
        return self._state

    def set_pools(self, pools: Iterable[PoolSpec]) -> None:
        by_name: dict[str, PoolSpec] = {}
        for pool in pools:
            if pool.name in by_name:
                raise ConfigError(f"pool {pool.name} defined twice")
            by_name[pool.name] = pool
        _build_tree({}, by_name, self.settings)  # validates parents, cycles, reservations
        self._pools = by_name

    def step(self, now: float, host: HostSample, vms: Mapping[str, VmState]) -> PolicyDecision:
        settings = self.settings
        dt = POLL_PERIOD_S if self._last_now is None else max(0.0, now - self._last_now)
        free_pages = min(host.free_bytes, host.total_bytes) // PAGE_SIZE
        min_free = min_free_bytes(host.total_bytes, settings.min_free_pct) // PAGE_SIZE
        state = classify_host_state(free_pages, min_free, settings, self._state)

        base = limit_targets(vms, self._pools, settings)
        held = sum(
            max(0, min(vm.balloon_pages, vm.spec.size_pages) - base[name])
            for name, vm in vms.items()
            if vm.manual_target_pages is None
        )
        wanted = pressure_reclaim_pages(state, free_pages, min_free, held, settings)
        ent = compute_entitlements(vms, self._pools, settings, wanted, state)

        decisions = self._apply_dynamics(vms, ent, state, dt)
        self._issued = {name: d.target_pages for name, d in decisions.items()}
        self._last_now = now
        self._state = state
        return PolicyDecision(
            now=now,
            state=state,
            min_free_pages=min_free,
            free_pages=free_pages,
            pressure_pages=ent.pressure_pages,
            unmet_pages=ent.unmet_pages,
            vms=decisions,
            pool_capped_pages=dict(ent.pool_capped_pages),
        )

    def _apply_dynamics(
        self, vms: Mapping[str, VmState], ent: Entitlements, state: HostState, dt: float
    ) -> dict[str, VmDecision]:
        settings = self.settings
        rate = settings.inflate_rate_pages_per_s if state.rate_limited else 0
        host_rate = settings.host_inflate_rate_pages_per_s if state.rate_limited else 0
        targets: dict[str, int] = {}
        reasons: dict[str, str] = {}
        previous: dict[str, int] = {}
        for name, vm in vms.items():
            e = ent.vms[name]
            # Clamping to the cap here means a lowered cap is obeyed at once, whatever the
            # hysteresis says (deflation is never rate-limited).
            prev = min(self._issued.get(name, vm.balloon_pages), e.max_pages)
            previous[name] = prev
            target, reason = e.target_pages, e.reason
            if (
                target != prev
                and target != 0
                and abs(target - prev) < settings.min_target_change_pages
            ):
                target, reason = prev, "hysteresis"
            if rate and target > prev:
                step_max = prev + math.floor(rate * dt)
                if target > step_max:
                    target, reason = step_max, "rate-limited"
            targets[name], reasons[name] = target, reason

        if host_rate:
            budget = math.floor(host_rate * dt)
            rises = {n: targets[n] - previous[n] for n in targets if targets[n] > previous[n]}
            total_rise = sum(rises.values())
            if total_rise > budget:
                # Share the host budget in proportion to what each VM wanted this step.
                for name, rise in rises.items():
                    targets[name] = previous[name] + rise * budget // total_rise
                    reasons[name] = "rate-limited"

        return {
            name: VmDecision(
                target_pages=targets[name],
                reason=reasons[name],
                desired_pages=ent.vms[name].target_pages,
                max_pages=ent.vms[name].max_pages,
                capped_pages=ent.vms[name].capped_pages,
                desired_reason=ent.vms[name].reason,
            )
            for name in vms
        }
