"""The control plane's engine room: runs the policy on a period and applies its targets.

One :class:`ControlPlane` per ``vdev serve``. Every ``policy_period`` seconds (and at once after
anything that should change a target: a manual target, a setting, the simulated host) it

1. samples the host: :func:`vdev.policy.host.read_host_sample` (MemAvailable, PSI, and the cgroup
   v2 memory controller when the process sits in a limited cgroup), or a
   :class:`vdev.policy.host.SimulatedHost` when ``--host-memory`` is given;
2. builds a :class:`vdev.policy.model.VmState` per guest whose balloon driver is running (esxtop
   MCTL? = Y), sized by the guest's RAM;
3. steps the :class:`vdev.policy.model.PolicyEngine` and applies the targets to the registry.

Manual targets (``PUT /vms/{name}/target``) override the policy: they are applied at once,
not rate limited (the operator asked for that number), and are capped by MCTLMAX like every
target; the policy sees them as fixed and shares the pressure among the other VMs.

It also keeps, in memory only, a ring of history points per VM (for ``vdev plot``), inflate
and deflate rates over a sliding window, and fans events out to API subscribers
(``GET /events``): the registry's target / size / state events, tagged with the reason of the
last target we set, plus control-plane events (host state changes, manual/policy switches,
setting changes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from protocol.errors import ConfigError, HostResourceError, NotSimulated
from protocol.units import PAGE_SIZE
from vdev.config import ControlConfig
from vdev.logs import event as log_event
from vdev.policy.backstop import Backstop
from vdev.policy.cgroup import CgroupReading, CgroupSource, read_cgroup, resolve_cgroup
from vdev.policy.guard import resume_left_stopped
from vdev.policy.host import SimulatedHost, host_sample_from_readings, read_host_sample
from vdev.policy.model import (
    HostSample,
    PolicyDecision,
    PolicyEngine,
    VmState,
    min_free_bytes,
    vm_bounds,
)
from vdev.policy.mom import MomEngine
from vdev.policy.watch import Notice, PressureWatch
from vdev.registry import GuestEvent

log = logging.getLogger(__name__)

#: Events buffered per API subscriber; a subscriber that falls this far behind is dropped
#: (its stream ends; it reconnects and re-reads the state).
SUBSCRIBER_BUFFER = 4096
#: A poke runs the policy step this much later, not at once: what poked (a manual target,
#: a setting, the simulated host) has already been applied, so the step only re-shares the
#: other guests; meanwhile the guest whose doorbell a manual target just rang gets its first
#: commands (GET_TARGET, the first LOCK) served without waiting behind a step over every
#: guest (~0.3-0.6 ms with 32), and a burst of API calls is one step.
POKE_DELAY = 0.005
#: A watched cgroup's growth rate is measured over this window (s) and projected this far
#: ahead (s): what a burst will take before the balloons can answer counts as used now.
GROWTH_WINDOW = 0.5
GROWTH_HORIZON = 1.0
#: A guest whose RAM file grew by more than this within GROWTH_WINDOW is busy: its balloon
#: does not grow (its stats are stale and what it frees it is about to use).
BUSY_GROWTH_BYTES = 4 << 20
#: Inflating is futile for a guest when, over RETURN_WINDOW seconds, its balloon grew by at
#: least FUTILE_MIN_GROWTH bytes and its RAM file shrank by less than a quarter of that; its
#: balloon is then held for FUTILE_BACKOFF seconds.
RETURN_WINDOW = 2.0
FUTILE_MIN_GROWTH = 8 << 20
FUTILE_BACKOFF = 30.0
#: Error margin of the resident-free estimate (stats lag the balloon by one buffer).
RESIDENT_SLACK = 8 << 20
#: While a watched cgroup grows (projected growth > 0) the policy steps this often (s).
FAST_PERIOD = 0.05
#: Watching cgroups, pressure balloons are not deflated until the cgroup has been calm
#: (no ballooning state, no growth) this long (s).
DEFLATE_HOLD = 10.0
#: A guest that deflated by itself, OOM-killed or swapped is not inflated for this long (s).
GUEST_BACKOFF = 60.0
#: MoM's min_guest_free_percent and pressure_threshold, for the guest floor.
MIN_GUEST_FREE = 0.20
MOM_PRESSURE_THRESHOLD = 0.20


class GuestViewLike(Protocol):
    """What the control plane reads of a :class:`vdev.registry.GuestView`."""

    @property
    def name(self) -> str: ...
    @property
    def connected(self) -> bool: ...
    @property
    def ram_pages(self) -> int: ...
    @property
    def size_pages(self) -> int: ...
    @property
    def target_pages(self) -> int: ...
    @property
    def guest_stats(self) -> Mapping[str, int]: ...
    @property
    def driver_active(self) -> bool: ...


class RegistryLike(Protocol):
    """The :class:`vdev.registry.GuestRegistry` interface (docs/ARCHITECTURE.md)."""

    def names(self) -> list[str]: ...
    def view(self, name: str) -> Any: ...
    def set_target(self, name: str, pages: int) -> None: ...
    def demand_reset(self, name: str) -> None: ...
    def subscribe(self) -> trio.MemoryReceiveChannel[Any]: ...


def jsonable(value: Any) -> Any:
    """Dataclasses, enums, mappings and sequences to plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Flag):
        return [str(m.name) for m in value]  # a capability set: the names of its members
    if isinstance(value, enum.Enum):
        return jsonable(value.value) if isinstance(value.value, str) else value.name.lower()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def driver_active(view: Any) -> bool:
    """esxtop MCTL?: a connected guest whose balloon driver runs, as its personality says
    (:attr:`vdev.registry.GuestView.driver_active`; never inferred from capabilities)."""
    return bool(view.connected) and bool(view.driver_active)


#: Per-page refusals that mean the guest did something wrong (``lock refused <STATUS> (4k)``,
#: ``unlock refused <STATUS> (2M)`` ...): a PFN that is not RAM, a page already in the
#: balloon, a page not in it. Not PPN_NOTNEEDED (the target fell meanwhile) nor PPN_PINNED
#: (a ring page: the driver cannot know where the front-end put its rings).
FAIL_REFUSALS = ("ERROR_PPN_INVALID", "ERROR_PPN_LOCKED", "ERROR_PPN_UNLOCKED")
#: virtio-balloon's counterparts (vdev/devices/virtio_balloon.py). Not "inflate ignored:
#: pinned" (a ring page, as PPN_PINNED) nor "deflate ignored: not in balloon" (after the
#: operator's reset the device forgot pages the guest still holds, and rightly deflates).
FAIL_VIRTIO_COUNTERS = ("inflate ignored: not RAM", "inflate ignored: already in balloon")


def failures(counters: dict[str, int]) -> int:
    """The FAIL column: how many times the guest did something wrong, each counted once.

    * bad frames: a cmdq frame that is not a request or cannot take the answer
      (``bad frame``), and chains the ring code rejected (``q<N> bad_chains``, any
      personality);
    * commands answered ERROR_CMD_INVALID (unknown or not negotiated command, bad batch page
      or count); a bad frame answered ERROR_CMD_INVALID counts once, as a bad frame;
    * pages refused PPN_INVALID / PPN_LOCKED / PPN_UNLOCKED (:data:`FAIL_REFUSALS`; single
      and batched, 4k and 2M: a refused single LOCK is one page, not also a failed command),
      and virtio-balloon's :data:`FAIL_VIRTIO_COUNTERS`.

    Normal balloon flow is not a failure: ERROR_RESET (commands before START after a reset,
    e.g. Linux's DOORBELL_SET(unregister) on its first reset), ERROR_BUSY (vdev shutting
    down), PPN_NOTNEEDED (the target fell), PPN_PINNED (ring pages). That is why the debugfs
    ``<cmd> failed`` counters are not summed: they count all of those.

    Answered bad frames are the ``status <NAME>`` answers that no ``<cmd>`` counter accounts
    for (an executed command bumps its ``<cmd>`` and one ``status``; a bad frame a status only).
    """
    bad = counters.get("bad frame", 0)
    bad += sum(v for k, v in counters.items() if k.startswith("q") and k.endswith(" bad_chains"))
    answered = sum(v for k, v in counters.items() if k.startswith("status "))
    executed = sum(
        counters.get(k.removesuffix(" failed"), 0) for k in counters if k.endswith(" failed")
    )
    answered_bad = max(0, answered - executed)
    invalid = max(0, counters.get("status ERROR_CMD_INVALID", 0) - answered_bad)
    refused = sum(
        v
        for k, v in counters.items()
        if k.startswith(("lock refused ", "unlock refused ")) and k.split(" ")[2] in FAIL_REFUSALS
    )
    virtio = sum(counters.get(k, 0) for k in FAIL_VIRTIO_COUNTERS)
    return bad + invalid + refused + virtio


def find_cgroup_v2_dir(proc: str = "/proc", root: str = "/sys/fs/cgroup") -> str | None:
    """This process's cgroup v2 directory if it has a memory controller and is not the root."""
    try:
        with open(os.path.join(proc, "self", "cgroup"), encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            rel = line[3:].strip()
            if rel in ("", "/"):
                return None
            path = os.path.join(root, rel.lstrip("/"))
            if os.path.exists(os.path.join(path, "memory.max")):
                return path
    return None


@dataclass(frozen=True)
class HistoryPoint:
    t: float  # wall-clock seconds (time.time())
    target_pages: int
    size_pages: int
    max_pages: int
    host_free_bytes: int
    host_state: str
    connected: bool = True  # a front-end was connected (False: no guest; vdev plot skips it)


class SizeRates:
    """A guest's balloon sizes, for its inflate and deflate rates over a window: the pages it
    grew and shrank by between consecutive samples, the later of which is inside the window.

    The sums are kept as samples come and go, so a rate costs the same after an hour of
    inflation as after none. (``GET /vms`` and ``/metrics`` read them for every guest;
    summing every sample of the window cost ~0.2 ms per guest a few seconds into a reaction
    run, on the API answer that the guest's first commands waited behind.)"""

    def __init__(self, maxlen: int = 65536) -> None:
        self.samples: deque[tuple[float, int]] = deque()  # (monotonic time, size pages)
        self.maxlen = maxlen
        self.up = 0  # pages grown between consecutive samples
        self.down = 0  # ... and shrunk

    def _count(self, before: int, after: int, sign: int) -> None:
        if after > before:
            self.up += sign * (after - before)
        else:
            self.down += sign * (before - after)

    def _drop_first(self) -> None:
        first = self.samples.popleft()
        if self.samples:
            self._count(first[1], self.samples[0][1], -1)

    def add(self, t: float, size: int) -> None:
        """Record ``size`` at ``t`` (nothing when it did not change)."""
        if self.samples:
            last = self.samples[-1][1]
            if last == size:
                return
            if len(self.samples) >= self.maxlen:
                self._drop_first()
            self._count(last, size, 1)
        self.samples.append((t, size))

    def rates(self, now: float, window: float) -> tuple[float, float]:
        """(inflate, deflate) pages per second over the ``window`` seconds before ``now``;
        the last sample before the window stays as the base of the first change in it."""
        start = now - window
        samples = self.samples
        while len(samples) > 2 and samples[1][0] < start:
            self._drop_first()
        if len(samples) < 2 or samples[1][0] < start:
            return 0.0, 0.0
        return self.up / window, self.down / window


@dataclass
class _VmTrack:
    history: deque[HistoryPoint]
    sizes: SizeRates  # the balloon's size over time, for the rates
    reason: str = "none"
    last_target: int | None = None


class ControlPlane:
    """Owns the policy engine, the host sampler, manual targets, history and event fan-out."""

    def __init__(
        self,
        registry: RegistryLike,
        config: ControlConfig | None = None,
        *,
        host_sampler: Callable[[], HostSample] | None = None,
        wall_clock: Callable[[], float] = time.time,
        initial_target_pages: int = 0,
    ) -> None:
        self.registry = registry
        self.config = config if config is not None else ControlConfig()
        self.engine: PolicyEngine | MomEngine
        if self.config.policy == "mom":
            self.engine = MomEngine(self.config.settings, interval=self.config.policy_period)
        else:
            self.engine = PolicyEngine(self.config.settings, self.config.pools)
        self.simulated: SimulatedHost | None = None
        #: the watched memory cgroups (``--watch-cgroup``) and their last readings
        self.cgroups: list[CgroupSource] = []
        self.cgroup_readings: list[CgroupReading] = []
        #: kernel notifications (:mod:`vdev.policy.watch`) when the host is real
        self.watch: PressureWatch | None = None
        self.pressure_notices = 0
        self.backstop: Backstop | None = None
        #: what start-up did about QEMUs a previous vdev left stopped (backstop actions)
        self.left_stopped: list[tuple[str, str, str]] = []
        #: per watched cgroup: recent (monotonic, usage) and the growth expected ahead
        self._usage_trail: dict[str, deque[tuple[float, int]]] = {}
        self.projected_growth: dict[str, int] = {}
        self._reclaimed_total = 0
        #: per VM: (stats buffers seen, balloon bytes then); recent (monotonic, RAM file bytes)
        self._stats_mark: dict[str, tuple[int, int]] = {}
        self._alloc_trail: dict[str, deque[tuple[float, int]]] = {}
        self._return_trail: dict[str, deque[tuple[float, int, int]]] = {}
        self._futile_until: dict[str, float] = {}
        #: respect: last balloon size, (OOM kills, swap-in) from stats, back-off deadlines
        self._last_size: dict[str, int] = {}
        self._guest_marks: dict[str, tuple[int, int]] = {}
        self._backoff_until: dict[str, float] = {}
        self._stats_seen: dict[str, float] = {}
        self._last_pressure = -math.inf
        self.last_notice: dict[str, Any] | None = None
        if host_sampler is not None:
            self._sample = host_sampler
            self.host_source = "custom"
            self.host_source_why = "a sampler given by the caller"
        elif self.config.host_memory is not None:
            self.simulated = SimulatedHost(self.config.host_memory, self.config.host_memory)
            self._sample = self.simulated.sample
            self.host_source = "simulated"
            self.host_source_why = "--host-memory / [serve] host_memory"
        elif self.config.watch_cgroups:
            self.cgroups = [resolve_cgroup(p) for p in self.config.watch_cgroups]  # ConfigError
            self._sample = self._sample_cgroups
            self.host_source = ", ".join(c.label for c in self.cgroups)
            self.host_source_why = (
                "--watch-cgroup "
                + " ".join(self.config.watch_cgroups)
                + ": the most constrained cgroup (least free share of its limit) decides"
            )
        else:
            cgroup = find_cgroup_v2_dir()
            self._sample = lambda: read_host_sample(cgroup_dir=cgroup)
            self.host_source = "cgroup:" + cgroup if cgroup else "proc"
            self.host_source_why = (
                "vdev's own cgroup v2 has a memory controller (no --watch-cgroup given)"
                if cgroup
                else "no --watch-cgroup given: host-wide /proc/meminfo (MemAvailable) and"
                " /proc/pressure/memory"
            )
        self._wall = wall_clock
        # the registry's dict when it has one (kept across a hand-over with the connections)
        shared = getattr(registry, "manual", None)
        self.manual: dict[str, int] = shared if isinstance(shared, dict) else {}
        #: ``vdev serve --target``: an operator's target, so a manual pin on every guest
        #: (applied when the guest is first seen) until ``{"policy": true}``.
        self.initial_target_pages = initial_target_pages
        self._seen: set[str] = set()
        self.last_decision: PolicyDecision | None = None
        self.last_sample: HostSample | None = None
        self.last_error: str | None = None
        self.steps = 0
        self._last_step_wall: float | None = None
        self._tracks: dict[str, _VmTrack] = {}
        self._subscribers: list[trio.MemorySendChannel[dict[str, Any]]] = []
        self._wakeup = trio.Event()
        self._known_sizes: dict[str, int] = {}

    def _sample_cgroups(self) -> HostSample:
        host = read_host_sample()
        readings = [read_cgroup(c) for c in self.cgroups]
        self.cgroup_readings = readings
        if self.watch is not None:
            for c in self.cgroups:
                self.watch.rearm_thresholds(c)  # the limit may have changed
        self._backstop_check(readings)
        growth: dict[str, int] = {}
        now = time.monotonic()
        for r in readings:
            # gross growth: what the cgroup grew by plus what vdev punched out meanwhile
            # (reclaim that keeps pace with a burst hides it from the usage alone)
            gross = r.usage_bytes + self._reclaimed_total
            trail = self._usage_trail.setdefault(r.source.path, deque(maxlen=64))
            trail.append((now, gross))
            while len(trail) > 2 and now - trail[1][0] >= GROWTH_WINDOW:
                trail.popleft()
            t_old, u_old = trail[0]
            if now - t_old >= 0.02:
                rate = (gross - u_old) / (now - t_old)
                growth[r.source.path] = int(max(0.0, rate) * GROWTH_HORIZON)
            if self.backstop is not None and r.limit_bytes is not None:
                # a VM held stopped: the policy needs the cgroup below the resume level
                # (free memory only counts from there), so it inflates the others until then
                need = self.backstop.demand_bytes(r.source.path, r.limit_bytes)
                if need:
                    growth[r.source.path] = max(growth.get(r.source.path, 0), need)
        self.projected_growth = growth
        return host_sample_from_readings(readings, host, growth)

    def _backstop_vms(self) -> list[tuple[str, int | None, int]]:
        """The connected guests: (name, QEMU pid, RAM file resident bytes)."""
        out: list[tuple[str, int | None, int]] = []
        for name in self.registry.names():
            try:
                view = self.registry.view(name)
            except KeyError:
                continue
            if view.connected:
                out.append((name, view.pid, int(view.ram_allocated_bytes)))
        return out

    def _publish_backstop(self, actions: list[tuple[str, str, str]]) -> None:
        for kind, path, detail in actions:
            self.publish({"type": "backstop", "action": kind, "cgroup": path, "detail": detail})

    def _backstop_check(self, readings: list[CgroupReading] | None = None) -> None:
        """Let the backstop stop or continue VMs now (fresh readings if none given)."""
        if self.backstop is None or not self.backstop.deciders:
            return
        if readings is None:
            try:
                readings = [read_cgroup(c) for c in self.cgroups]
            except HostResourceError as e:
                log.warning("backstop: %s", e)
                return
        self._publish_backstop(
            self.backstop.check(readings, time.monotonic(), self._backstop_vms())
        )

    def on_pressure(self, notices: list[Notice]) -> None:
        """Kernel notifications: ask every guest for fresh statistics (hand the held stats
        buffer back) and run a policy step now."""
        self.pressure_notices += len(notices)
        self._backstop_check()  # before anything else: pause the allocating VM now
        for name in self.registry.names():
            request = getattr(self.registry, "request_stats", None)
            if request is not None:
                with contextlib.suppress(KeyError):
                    request(name)
        event = {
            "type": "pressure",
            "notices": [{"source": n.source, "kind": n.kind, "detail": n.detail} for n in notices],
        }
        self.last_notice = {**event, "time": self._wall()}
        self.publish(event)
        self.poke()

    # ----------------------------------------------------------------------------- events

    def subscribe(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        send, receive = trio.open_memory_channel[dict[str, Any]](SUBSCRIBER_BUFFER)
        self._subscribers.append(send)
        return receive

    def publish(self, event: dict[str, Any]) -> None:
        event.setdefault("time", self._wall())
        # the guest events carry the registry's stamp (when the device did it); the others
        # are stamped here
        event.setdefault("monotonic", time.monotonic())
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                log.warning(
                    "event subscriber fell %d events behind; dropping it", SUBSCRIBER_BUFFER
                )
                send.close()
                self._subscribers.remove(send)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(send)

    def _on_guest_event(self, event: Any) -> None:
        if type(event) is GuestEvent:  # the registry's own events: no generic conversion
            track = self._track(event.name)
            if event.kind == "size":
                self._note_size(event.name, event.size_pages)
            else:
                self._note_size(event.name)
            self.publish(
                {
                    "type": "guest",
                    "name": event.name,
                    "kind": event.kind,
                    "target_pages": event.target_pages,
                    "size_pages": event.size_pages,
                    "connected": event.connected,
                    "monotonic": event.monotonic,
                    "reason": track.reason,
                }
            )
            return
        data = jsonable(event)
        if not isinstance(data, dict):
            data = {"event": data}
        kind = data.get("kind", data.get("type"))
        data = {"type": "guest", **data}
        if kind is not None:
            data["kind"] = kind
        name = data.get("name")
        if isinstance(name, str):
            track = self._track(name)
            data.setdefault("reason", track.reason)
            self._note_size(name)
        self.publish(data)

    def _note_size(self, name: str, size: int | None = None) -> None:
        """Record the guest's balloon size (``size``, or read from the registry) for the rates
        and the simulated host."""
        if size is None:
            try:
                view = self.registry.view(name)
            except KeyError:
                return
            size = int(view.size_pages)
        previous = self._known_sizes.get(name)
        self._known_sizes[name] = size
        if previous is not None and previous != size and self.simulated is not None:
            self.simulated.balloon_changed(size - previous)
        self._track(name).sizes.add(trio.current_time(), size)

    # ----------------------------------------------------------------------------- state

    def _track(self, name: str) -> _VmTrack:
        track = self._tracks.get(name)
        if track is None:
            track = _VmTrack(history=deque(maxlen=self.config.history), sizes=SizeRates())
            self._tracks[name] = track
        return track

    def rates(self, name: str) -> tuple[float, float]:
        """(inflate, deflate) pages per second over the last ``rate_window`` seconds."""
        track = self._tracks.get(name)
        if track is None:
            return 0.0, 0.0
        return track.sizes.rates(trio.current_time(), self.config.rate_window)

    def reason(self, name: str) -> str:
        return self._track(name).reason

    def max_pages(self, name: str, view: Any) -> int:
        """MCTLMAX: the most this VM's balloon may hold under the current settings."""
        spec = self.config.vm(name).spec(int(view.ram_pages))
        if spec is None:
            return 0
        return vm_bounds(VmState(spec), self.engine.settings).max_pages

    def history(self, name: str) -> list[HistoryPoint]:
        self.registry.view(name)  # KeyError for an unknown guest
        return list(self._track(name).history)

    def host_info(self) -> dict[str, Any]:
        sample = self.last_sample
        decision = self.last_decision
        info: dict[str, Any] = {
            "source": self.host_source,
            "source_why": self.host_source_why,
            "cgroups": [
                {
                    "path": r.source.path,
                    "version": r.source.version,
                    "usage_bytes": r.usage_bytes,
                    "limit_bytes": r.limit_bytes,
                    "high_bytes": r.high_bytes,
                    "events": dict(r.events),
                    "stat": dict(r.stat),
                }
                for r in self.cgroup_readings
            ],
            "notifications": {
                "armed": list(self.watch.armed) if self.watch else [],
                "skipped": list(self.watch.skipped) if self.watch else [],
                "received": self.pressure_notices,
                "last": self.last_notice,
            },
            "backstop": {
                "engaged": self.backstop is not None and self.backstop.engaged,
                "pauses": self.backstop.pauses if self.backstop else 0,
                "paused": self.backstop.paused() if self.backstop else [],
                "actions": [
                    {"action": k, "cgroup": p, "detail": d}
                    for k, p, d in (
                        self.left_stopped + (self.backstop.actions if self.backstop else [])
                    )[-20:]
                ],
            },
            "simulated": self.simulated is not None,
            "state": decision.state.value if decision else None,
            "total_bytes": sample.total_bytes if sample else None,
            "free_bytes": sample.free_bytes if sample else None,
            "min_free_bytes": (
                min_free_bytes(sample.total_bytes, self.engine.settings.min_free_pct)
                if sample
                else None
            ),
            "psi": {
                "some_avg10": sample.psi_some_avg10 if sample else None,
                "full_avg10": sample.psi_full_avg10 if sample else None,
            },
            "projected_growth_bytes": dict(self.projected_growth),
            "guests": self.guests_info(),
            "pressure_pages": decision.pressure_pages if decision else 0,
            "unmet_pages": decision.unmet_pages if decision else 0,
            "capped_pages": decision.capped_pages if decision else 0,
            "capped": {
                "vms": (
                    {n: d.capped_pages for n, d in decision.vms.items() if d.capped_pages}
                    if decision
                    else {}
                ),
                "pools": dict(decision.pool_capped_pages) if decision else {},
            },
            "policy": self.config.policy,
            "policy_period_s": self.config.policy_period,
            "steps": self.steps,
            "last_step": self._last_step_wall,
            "error": self.last_error,
        }
        return info

    # ----------------------------------------------------------------------------- commands

    def set_manual_target(self, name: str, pages: int) -> tuple[int, str]:
        """Pin ``name``'s target (KeyError: unknown guest; ValueError: above its RAM).

        Returns the target actually applied and why (``manual`` or the cap that bound)."""
        view = self.registry.view(name)
        if pages < 0:
            raise ValueError("a target must be >= 0")
        ram = int(view.ram_pages)
        if ram > 0 and pages > ram:
            raise ValueError(
                f"target {pages} pages is more than the guest's RAM ({ram} pages, "
                f"{ram * PAGE_SIZE >> 20} MiB)"
            )
        was_manual = name in self.manual
        self.manual[name] = pages
        spec = self.config.vm(name).spec(ram)
        applied, reason = pages, "manual"
        if spec is not None:
            bounds = vm_bounds(VmState(spec, manual_target_pages=pages), self.engine.settings)
            if pages > bounds.max_pages:
                applied, reason = bounds.max_pages, bounds.max_reason
        previous = int(view.target_pages)
        # the guest first (the doorbell rings in _apply), the log line after it
        self._apply(name, applied, reason, quiet=True)
        log_event(
            log,
            logging.INFO,
            "manual_target",
            "operator set a manual target of %d MiB (applied %d MiB: %s; was %d MiB)",
            pages * PAGE_SIZE >> 20,
            applied * PAGE_SIZE >> 20,
            reason,
            previous * PAGE_SIZE >> 20,
            vm=name,
            requested_bytes=pages * PAGE_SIZE,
            target_bytes=applied * PAGE_SIZE,
            previous_bytes=previous * PAGE_SIZE,
            reason=reason,
            source="operator",
        )
        if not was_manual:
            self.publish({"type": "control", "name": name, "control": "manual"})
        self.poke()
        return applied, reason

    def clear_manual_target(self, name: str) -> None:
        self.registry.view(name)
        if self.manual.pop(name, None) is not None:
            log_event(
                log,
                logging.INFO,
                "policy_target",
                "operator handed the target back to the policy",
                vm=name,
                reason="operator",
                source="operator",
            )
            self.publish({"type": "control", "name": name, "control": "policy"})
        self.poke()

    def reset(self, name: str) -> None:
        self.registry.demand_reset(name)
        log_event(
            log,
            logging.INFO,
            "reset",
            "operator demanded a balloon reset",
            vm=name,
            reason="operator",
            source="operator",
        )
        self.publish({"type": "control", "name": name, "action": "reset"})

    def set_setting(self, path: str, value: int) -> None:
        old = self.engine.settings.get(path)  # ConfigError: unknown path
        self.engine.settings.set(path, value)  # ConfigError: bad value
        log_event(
            log,
            logging.INFO,
            "setting",
            "operator set %s = %s (was %s)",
            path,
            value,
            old,
            path=path,
            value=value,
            previous=old,
            reason="operator",
            source="operator",
        )
        self.publish({"type": "setting", "path": path, "value": value})
        self.poke()

    def set_simulated_free(self, free_bytes: int) -> int:
        if self.simulated is None:
            raise NotSimulated("the host is not simulated (start vdev serve with --host-memory)")
        if not 0 <= free_bytes <= self.simulated.total_bytes:
            raise ValueError(
                f"free memory must be in 0..{self.simulated.total_bytes} bytes, got {free_bytes}"
            )
        self.simulated.free_bytes = free_bytes
        log_event(
            log,
            logging.INFO,
            "simulated_free",
            "operator set the simulated host's free memory to %d MiB",
            free_bytes >> 20,
            free_bytes=free_bytes,
            reason="operator",
            source="operator",
        )
        self.publish({"type": "host", "free_bytes": free_bytes, "simulated": True})
        self.poke()
        return self.simulated.free_bytes

    def wall(self) -> float:
        """Wall-clock time as the control plane stamps events and history."""
        return self._wall()

    def poke(self) -> None:
        """Run a policy step now (within :data:`POKE_DELAY`) rather than at the next period."""
        self._wakeup.set()

    def _apply(self, name: str, pages: int, reason: str, *, quiet: bool = False) -> None:
        """Set ``name``'s target; a change is logged once with its reason (``quiet``: the
        caller already logged it as an operator change)."""
        track = self._track(name)
        track.reason = reason
        view = self.registry.view(name)
        previous = int(view.target_pages)
        if previous != pages:
            self.registry.set_target(name, pages)
            if not quiet:
                source = "manual" if name in self.manual else "policy"
                log_event(
                    log,
                    logging.INFO,
                    "target",
                    "target %d -> %d MiB (%s: %s)",
                    previous * PAGE_SIZE >> 20,
                    pages * PAGE_SIZE >> 20,
                    source,
                    reason,
                    vm=name,
                    target_bytes=pages * PAGE_SIZE,
                    previous_bytes=previous * PAGE_SIZE,
                    reason=reason,
                    source=source,
                )
        track.last_target = pages

    # ----------------------------------------------------------------------------- the loop

    def step(self, now: float | None = None) -> PolicyDecision | None:
        """One policy step: sample, decide, apply. Errors are logged and kept for GET /host."""
        now = trio.current_time() if now is None else now
        # One view per guest for the whole step (a view copies the device's counters and
        # fstats its RAM file); fresh ones only for the guests whose target we set.
        views: dict[str, Any] = {}
        for name in self.registry.names():
            if name not in self._seen:
                self._seen.add(name)
                if (
                    self.initial_target_pages > 0
                    and name not in self.manual
                    and name not in getattr(self.registry, "resumed", ())
                ):
                    self.manual[name] = self.initial_target_pages
            try:
                view = self.registry.view(name)
            except KeyError:
                continue
            views[name] = view
            # sizes first: the simulated host gets its memory back
            self._note_size(name, int(view.size_pages))
            self._balloon_at_stats(name, view)  # stats new since the last step: their age
        self._reclaimed_total = sum(
            int(getattr(v, "reclaimed_bytes_total", 0) or 0) for v in views.values()
        )
        try:
            sample = self._sample()
        except HostResourceError as e:
            self._error(f"host sampling failed: {e}")
            return None
        self.last_sample = sample
        vms: dict[str, VmState] = {}
        for name, view in views.items():
            cfg = self.config.vm(name)
            spec = cfg.spec(int(view.ram_pages))
            if spec is None or not driver_active(view):
                # Only a running balloon driver (MCTL? = Y) can give memory back: pressure
                # placed on any other guest would never be reclaimed (ESXi swaps instead).
                # Its target stays as it is (manual targets still apply at once).
                continue
            vms[name] = VmState(
                spec=spec,
                active_fraction=self._active_fraction(cfg.active_fraction, view),
                balloon_pages=min(max(0, int(view.size_pages)), spec.size_pages),
                manual_target_pages=self.manual.get(name),
                # the operator's manual target is not second-guessed by the guest floor
                host_return_pages=self._caps(name, view, sample)
                if self.config.policy == "esxi" and name not in self.manual
                else None,
                guest_free_pages=self._guest_free_pages(view),
            )
        try:
            decision = self.engine.step(now, sample, vms)
        except ConfigError as e:
            self._error(f"policy step failed: {e}")
            return None
        if self.last_error is not None:
            log_event(log, logging.INFO, "recovered", "policy steps work again")
        self.last_error = None
        previous_state = self.last_decision.state if self.last_decision else None
        self.last_decision = decision
        self.steps += 1
        if decision.state is not previous_state:
            log_event(
                log,
                logging.WARNING if decision.state.value in ("low", "hard") else logging.INFO,
                "host_state",
                "host memory state %s -> %s (free %d MiB, minFree %d MiB)",
                previous_state.value if previous_state else "-",
                decision.state.value,
                sample.free_bytes >> 20,
                min_free_bytes(sample.total_bytes, self.engine.settings.min_free_pct) >> 20,
                state=decision.state.value,
                previous=previous_state.value if previous_state else None,
                free_bytes=sample.free_bytes,
                reason="host free memory",
            )
            self.publish(
                {
                    "type": "host",
                    "state": decision.state.value,
                    "previous": previous_state.value if previous_state else None,
                    "free_bytes": sample.free_bytes,
                }
            )
        wall = self._wall()
        self._last_step_wall = wall
        mono = time.monotonic()
        if decision.state.balloons or any(self.projected_growth.values()):
            self._last_pressure = mono
        hold_deflation = bool(self.cgroups) and mono - self._last_pressure < DEFLATE_HOLD
        for name, d in decision.vms.items():
            target, reason = d.target_pages, d.reason
            manual = self.manual.get(name)
            if manual is not None:
                # Manual wins over rate limit and hysteresis; the cap still holds, and is
                # then the reason (d.reason may name the rate limit manual targets skip).
                target = min(manual, d.max_pages)
                reason = "manual" if manual <= d.max_pages else d.desired_reason
            elif hold_deflation:
                # A cgroup under pressure a moment ago: deflating now would hand the guests
                # pages that are no longer resident, and the next burst would have to be met
                # by inflating over them (for nothing). Hold pressure balloons a while.
                last = self._track(name).last_target
                if last is not None and target < last <= d.max_pages:
                    target, reason = last, "deflate-hold"
            self._apply(name, target, reason)
        for name, view in views.items():
            d2 = decision.vms.get(name)
            fresh = self.registry.view(name) if d2 is not None else view
            self._track(name).history.append(
                HistoryPoint(
                    t=wall,
                    target_pages=int(fresh.target_pages),
                    size_pages=int(fresh.size_pages),
                    max_pages=d2.max_pages if d2 else self.max_pages(name, view),
                    host_free_bytes=sample.free_bytes,
                    host_state=decision.state.value,
                    connected=bool(fresh.connected),
                )
            )
        return decision

    def _caps(self, name: str, view: Any, sample: HostSample) -> int | None:
        """The most this guest's balloon may hold now, from the guest's side (respect: its
        own deflation, OOM kills, swapping, a MoM-style free-memory floor) and, when watching
        cgroups, from the host's (what inflating gives back). None: no such limit."""
        if getattr(view, "unreclaimable", ()):  # share=off: inflating frees nothing
            return int(view.size_pages)
        caps = [self._respect_cap(name, view, sample)]
        if self.cgroups:
            caps.append(self._host_return_pages(name, view))
        known = [c for c in caps if c is not None]
        return min(known) if known else None

    def _respect_cap(self, name: str, view: Any, sample: HostSample) -> int | None:
        """Respect the guest.

        * Guest-initiated deflation (deflate-on-OOM: the balloon shrank while below its
          target), a new guest OOM kill or swap-in in its stats: the guest needs its memory.
          Its balloon is held at what it is (so the target falls to it) for GUEST_BACKOFF
          seconds, and an event says why.
        * A floor in MoM's style: leave the guest MIN_GUEST_FREE of its memory free, scaled
          down as the host runs out (MoM's shrink rule: ``0.20 x host_free / 0.20``)."""
        now = time.monotonic()
        size = int(view.size_pages)
        target = int(view.target_pages)
        previous = self._last_size.get(name)
        self._last_size[name] = size
        stats: Mapping[str, int] = getattr(view, "guest_stats", {}) or {}
        marks = (stats.get("stat-oom-kills", -1), stats.get("stat-swap-in", -1))
        before = self._guest_marks.get(name)
        self._guest_marks[name] = marks
        why: list[str] = []
        if previous is not None and size < previous and size < target:
            why.append(f"deflated by itself to {size} pages below its target {target}")
        if before is not None and marks[0] > before[0] >= 0:
            why.append(f"OOM kills {before[0]} -> {marks[0]}")
        if before is not None and marks[1] > before[1] >= 0:
            why.append(f"swapped in {marks[1] - before[1]} pages")
        if why:
            self._backoff_until[name] = now + GUEST_BACKOFF
            self.publish(
                {"type": "guest-backoff", "name": name, "why": why, "seconds": GUEST_BACKOFF}
            )
        if now < self._backoff_until.get(name, 0.0):
            return size
        free = stats.get("stat-free-memory", -1)
        ram = int(view.ram_pages) * PAGE_SIZE
        if free < 0 or ram <= 0:
            return None
        host_free = sample.free_bytes / max(1, sample.total_bytes)
        keep = MIN_GUEST_FREE * min(1.0, host_free / MOM_PRESSURE_THRESHOLD)
        free_now = free - (size - self._balloon_at_stats(name, view)) * PAGE_SIZE
        spare = free_now - keep * (ram - size * PAGE_SIZE)
        return size + max(0, int(spare)) // PAGE_SIZE

    def _balloon_at_stats(self, name: str, view: Any) -> int:
        """The balloon's size (pages) when the guest's current stats were new to us."""
        buffers = int((getattr(view, "counters", {}) or {}).get("stats buffers", 0))
        mark = self._stats_mark.get(name)
        if mark is None or mark[0] != buffers:
            mark = self._stats_mark[name] = (buffers, int(view.size_pages) * PAGE_SIZE)
            if buffers:  # a guest that never sent stats has none to be old
                self._stats_seen[name] = time.monotonic()
        return mark[1] // PAGE_SIZE

    def guests_info(self) -> dict[str, dict[str, Any]]:
        """Per guest, for ``vdev stat``: how old its stats are (since the control plane
        first saw them) and what holds its balloon (back-off, futile inflation)."""
        now = time.monotonic()
        out: dict[str, dict[str, Any]] = {}
        for name in self.registry.names():
            hold = None
            if now < self._backoff_until.get(name, 0.0):
                hold = f"guest-backoff {self._backoff_until[name] - now:.0f}s"
            elif now < self._futile_until.get(name, 0.0):
                hold = f"futile {self._futile_until[name] - now:.0f}s"
            try:
                view = self.registry.view(name)
            except KeyError:
                continue
            self._balloon_at_stats(name, view)
            seen = self._stats_seen.get(name)
            failed = int((getattr(view, "counters", {}) or {}).get("reclaim failures", 0))
            private = list(getattr(view, "unreclaimable", ()) or ())
            if private:
                hold = "RAM not reclaimable (share=off?)"
            out[name] = {
                "stats_age_s": None if seen is None else round(max(0.0, now - seen), 1),
                "hold": hold,
                "reclaim_failures": failed,
                "unreclaimable": private,
            }
        return out

    def _host_return_pages(self, name: str, view: Any) -> int | None:
        """Balloon pages plus the guest's free pages that are resident in its RAM file.

        With R the guest's RAM, F its free memory and B its balloon when it last sent stats,
        and A the RAM file's allocated bytes now: the guest uses U = R - F - B (kernel,
        caches, applications: all resident; inflating does not change U), so A - U of its
        free memory is resident; inflating over the rest returns nothing to the host.

        A guest whose RAM file is growing (it faults in new pages: it is busy, and its stats
        are already stale) gets no more than it holds. None without stats."""
        now = time.monotonic()
        allocated = getattr(view, "ram_allocated_bytes", None)
        balloon = int(view.size_pages) * PAGE_SIZE
        stats: Mapping[str, int] = getattr(view, "guest_stats", {}) or {}
        free = stats.get("stat-free-memory", -1)
        ram = int(view.ram_pages) * PAGE_SIZE
        if free < 0 or allocated is None or ram <= 0:
            return None
        balloon_at_stats = self._balloon_at_stats(name, view) * PAGE_SIZE
        trail = self._alloc_trail.setdefault(name, deque(maxlen=64))
        trail.append((now, int(allocated)))
        while len(trail) > 2 and now - trail[1][0] >= GROWTH_WINDOW:
            trail.popleft()
        if int(allocated) - trail[0][1] > BUSY_GROWTH_BYTES or (
            self.backstop is not None and self.backstop.is_paused(name)
        ):  # busy, or held stopped by the backstop (it could not inflate)
            return balloon // PAGE_SIZE
        # Does inflating pay? Over the last RETURN_WINDOW, the RAM file must have shrunk by
        # a fair share of what the balloon grew; if not, the balloon sits on pages that
        # were never resident: hold it where it is for a while.
        ret = self._return_trail.setdefault(name, deque(maxlen=256))
        ret.append((now, balloon, int(allocated)))
        while len(ret) > 2 and now - ret[1][0] >= RETURN_WINDOW:
            ret.popleft()
        grew = balloon - ret[0][1]
        returned = ret[0][2] - int(allocated)
        if grew >= FUTILE_MIN_GROWTH and returned * 4 < grew:
            if now >= self._futile_until.get(name, 0.0):
                self.publish(
                    {
                        "type": "futile",
                        "name": name,
                        "balloon_grew_bytes": grew,
                        "host_regained_bytes": max(0, returned),
                    }
                )
            self._futile_until[name] = now + FUTILE_BACKOFF
        if now < self._futile_until.get(name, 0.0):
            return balloon // PAGE_SIZE
        used = max(0, ram - free - balloon_at_stats)
        resident_free = max(0, int(allocated) - used - RESIDENT_SLACK)
        return (balloon + resident_free) // PAGE_SIZE

    @staticmethod
    def _guest_free_pages(view: Any) -> int | None:
        stats: Mapping[str, int] = getattr(view, "guest_stats", {}) or {}
        free = stats.get("stat-free-memory", -1)
        return free // PAGE_SIZE if free >= 0 else None

    def _error(self, message: str) -> None:
        """Keep ``message`` for GET /host; log it once (not every period while it lasts)."""
        if message != self.last_error:
            log_event(log, logging.WARNING, "policy_error", "%s", message)
        self.last_error = message

    @staticmethod
    def _active_fraction(fixed: float | None, view: Any) -> float:
        """A fixed estimate from the config, else 1 - available/total from guest stats
        (virtio-balloon), else 1.0 (fully active: no idle tax, the conservative choice)."""
        if fixed is not None:
            return fixed
        stats: Mapping[str, int] = getattr(view, "guest_stats", {}) or {}
        total = stats.get("stat-total-memory", -1)
        avail = stats.get("stat-available-memory", stats.get("stat-free-memory", -1))
        if total > 0 and 0 <= avail <= total:
            return 1.0 - avail / total
        return 1.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Step every ``policy_period`` seconds, or sooner when poked; forward guest events."""
        if self.config.stop_file is not None:  # first: those guests are hanging
            self.left_stopped = resume_left_stopped(self.config.stop_file)
            self._publish_backstop(self.left_stopped)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._forward, self.registry.subscribe())
            if self.host_source not in ("custom", "simulated"):
                self.watch = PressureWatch(self.cgroups)
                await nursery.start(self.watch.run, self.on_pressure)
            if self.cgroups and self.config.backstop:
                self.backstop = Backstop(
                    self.cgroups, self.config.backstop_deadline, stop_file=self.config.stop_file
                )
                try:
                    self.backstop.engage()
                except HostResourceError:
                    self.backstop.release()
                    raise
                for kind, path, detail in self.backstop.actions:
                    self.publish(
                        {"type": "backstop", "action": kind, "cgroup": path, "detail": detail}
                    )
            try:
                await self._loop(task_status)
            finally:
                if self.backstop is not None:
                    self._publish_backstop(self.backstop.release())  # continues every VM

    async def _loop(self, task_status: trio.TaskStatus[None]) -> None:
        self.step()
        task_status.started()
        period = self.config.policy_period
        deadline = trio.current_time() + period
        while True:
            with trio.move_on_at(deadline):
                await self._wakeup.wait()
            if self._wakeup.is_set() and trio.current_time() < deadline:
                await trio.sleep(POKE_DELAY)
            self._wakeup = trio.Event()
            self.step()
            now = trio.current_time()
            if now >= deadline:
                deadline = max(deadline + period, now)
            if any(self.projected_growth.values()):
                deadline = min(deadline, now + FAST_PERIOD)  # a burst: watch it closely

    async def _forward(self, events: trio.MemoryReceiveChannel[Any]) -> None:
        """Forward registry events; if the registry drops us (we fell behind), subscribe again
        and tell our subscribers that events were lost."""
        while True:
            async with events:
                async for event in events:
                    self._on_guest_event(event)
            log.warning("the registry dropped our event subscription; subscribing again")
            events = self.registry.subscribe()
            self.publish({"type": "resync"})
            for name in self.registry.names():
                self._note_size(name)
