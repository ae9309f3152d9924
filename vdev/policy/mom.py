"""oVirt MoM's balloon rules as a selectable policy (``vdev serve --policy mom``), sans-I/O.

A re-implementation in our own code of ``doc/balloon.rules`` from the oVirt/mom repository
(constants and algorithm as published; reference: production.md section 5), so that MoM and
our ESXi-model policy can run the same scenario. It plugs into the control plane in place of
:class:`vdev.policy.model.PolicyEngine` (same ``step`` signature and result).

Inputs, mapped to what vdev has:

* host: ``mem_free / mem_available`` = the sample's free / total (host-wide: MemAvailable /
  MemTotal; with ``--watch-cgroup``: the cgroup's headroom / limit), averaged over the last
  ``SAMPLE_HISTORY`` evaluations (MoM's ``Host.StatAvg``);
* guest ``balloon_cur`` = its RAM minus the balloon, ``balloon_max`` = its RAM,
  ``balloon_min`` = its reservation, ``mem_unused`` = the virtio-balloon free-memory stat
  (MoM reads libvirt's ``unused``, the same stat); each averaged over the last samples
  (``StatAvg``). A guest without stats has ``mem_unused`` 0, as in MoM.

MoM evaluates its rules every ``policy-engine-interval`` (10 s by default); here every
control-plane step that is at least ``interval`` seconds after the previous evaluation.
MoM's "balloon" is the guest's memory size: a larger target deflates.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from protocol.units import PAGE_SIZE
from vdev.policy.model import (
    HostSample,
    HostState,
    PolicyDecision,
    PolicySettings,
    PoolSpec,
    VmDecision,
    VmState,
)

PRESSURE_THRESHOLD = 0.20
PRESSURE_CRITICAL = 0.05
MIN_GUEST_FREE_PERCENT = 0.20
MAX_BALLOON_CHANGE_PERCENT = 0.05
MIN_BALLOON_CHANGE_PERCENT = 0.0025
SAMPLE_HISTORY = 10
DEFAULT_INTERVAL = 10.0


@dataclass
class _Guest:
    balloon_cur: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLE_HISTORY))
    mem_unused: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLE_HISTORY))


def _avg(values: deque[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class MomEngine:
    """MoM's balloon rules over vdev's inputs; targets in balloon pages."""

    name = "mom"

    def __init__(self, settings: PolicySettings | None = None, interval: float = DEFAULT_INTERVAL):
        #: kept for the control plane's settings API; MoM's rules use none of them
        self.settings = settings if settings is not None else PolicySettings()
        self.interval = interval
        self._host_free: deque[float] = deque(maxlen=SAMPLE_HISTORY)
        self._guests: dict[str, _Guest] = {}
        self._last: float | None = None
        self._issued: dict[str, int] = {}
        self._state: HostState | None = None
        self.last_host_free_percent: float | None = None

    @property
    def state(self) -> HostState | None:
        return self._state

    @property
    def pools(self) -> Mapping[str, PoolSpec]:
        return {}

    def set_pools(self, pools: Iterable[PoolSpec]) -> None:  # MoM has no resource pools
        return None

    def step(self, now: float, host: HostSample, vms: Mapping[str, VmState]) -> PolicyDecision:
        total = max(1, host.total_bytes)
        self._host_free.append(host.free_bytes / total)
        for name, vm in vms.items():
            g = self._guests.setdefault(name, _Guest())
            g.balloon_cur.append(float(vm.spec.size_pages - vm.balloon_pages))
            g.mem_unused.append(float(vm.guest_free_pages or 0))
        evaluate = self._last is None or now - self._last >= self.interval
        host_free_percent = _avg(self._host_free)
        self.last_host_free_percent = host_free_percent
        shrinking = host_free_percent < PRESSURE_THRESHOLD
        if host_free_percent <= PRESSURE_CRITICAL:
            state = HostState.HARD
        elif shrinking:
            state = HostState.SOFT
        else:
            state = HostState.HIGH
        decisions: dict[str, VmDecision] = {}
        for name, vm in vms.items():
            size = vm.spec.size_pages
            max_pages = max(0, size - vm.spec.reservation_pages)
            prev = min(self._issued.get(name, vm.balloon_pages), max_pages)
            target, reason = prev, "mom:interval"
            if evaluate:
                g = self._guests[name]
                new_mem = self._shrink(vm, g, host_free_percent) if shrinking else self._grow(vm, g)
                if new_mem is None:
                    reason = "mom:unchanged"
                else:
                    target = min(max_pages, max(0, size - int(new_mem)))
                    reason = "mom:shrink" if shrinking else "mom:grow"
            decisions[name] = VmDecision(
                target_pages=target,
                reason=reason,
                desired_pages=target,
                max_pages=max_pages,
                desired_reason=reason,
            )
        if evaluate:
            self._last = now
        self._issued = {n: d.target_pages for n, d in decisions.items()}
        self._state = state
        return PolicyDecision(
            now=now,
            state=state,
            min_free_pages=int(total * PRESSURE_THRESHOLD) // PAGE_SIZE,
            free_pages=host.free_bytes // PAGE_SIZE,
            pressure_pages=0,
            unmet_pages=0,
            vms=decisions,
        )

    @staticmethod
    def _change_big_enough(cur: float, new: float) -> bool:
        return abs(new - cur) > MIN_BALLOON_CHANGE_PERCENT * cur

    def _shrink(self, vm: VmState, g: _Guest, host_free_percent: float) -> float | None:
        """Guest memory size to set, or None (doc/balloon.rules ``shrink_guest``)."""
        cur = float(vm.spec.size_pages - vm.balloon_pages)
        if host_free_percent <= PRESSURE_CRITICAL:
            guest_free_percent = host_free_percent - 0.05  # force the guest to swap
        else:
            guest_free_percent = MIN_GUEST_FREE_PERCENT * host_free_percent / PRESSURE_THRESHOLD
        used = _avg(g.balloon_cur) - _avg(g.mem_unused)
        floor = max(float(vm.spec.reservation_pages), used + guest_free_percent * cur)
        target = cur * (1 - MAX_BALLOON_CHANGE_PERCENT)
        if target < floor:
            target = floor
        if target <= cur and self._change_big_enough(cur, target):
            return target
        return None

    def _grow(self, vm: VmState, g: _Guest) -> float | None:
        """Guest memory size to set, or None (doc/balloon.rules ``grow_guest``)."""
        cur = float(vm.spec.size_pages - vm.balloon_pages)
        top = float(vm.spec.size_pages)
        if cur >= top:
            return None
        used = _avg(g.balloon_cur) - _avg(g.mem_unused)
        floor = max(float(vm.spec.reservation_pages), used + MIN_GUEST_FREE_PERCENT * cur)
        target = cur * (1 + MAX_BALLOON_CHANGE_PERCENT)
        if target < floor:
            target = floor
        if target > top:
            target = top
        if self._change_big_enough(cur, target):
            return target
        return None
