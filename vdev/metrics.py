"""Prometheus metrics: a custom collector over the guest registry and the control plane,
rendered with prometheus_client's ``generate_latest`` (text format 0.0.4).

Everything is read at scrape time from the live state (no metric objects to keep in sync):

=====================================================  ===============================
metric                                                 esxtop / meaning
=====================================================  ===============================
vballoon_vm_connected{vm,personality}                  a front-end is connected
vballoon_vm_driver_active{vm}                          MCTL?
vballoon_vm_balloon_size_bytes{vm}                     MCTLSZ
vballoon_vm_balloon_target_bytes{vm}                   MCTLTGT
vballoon_vm_balloon_max_bytes{vm}                      MCTLMAX
vballoon_vm_manual_target{vm}                          1 if the operator pinned the target
vballoon_vm_ram_bytes{vm}, _ram_allocated_bytes{vm}    guest RAM, its host-resident part
vballoon_vm_inflate_pages_per_second{vm} (deflate)     rates over the last window
vballoon_vm_balloon_events_total{vm,counter}           device counters (debugfs names)
vballoon_vm_balloon_level{vm,level}                    device gauges (events pending, actual..)
vballoon_vm_failures_total{vm}                         failed commands + refused pages
vballoon_vm_reclaimed_bytes_total{vm}                  bytes the guest gave and vdev punched
vballoon_vm_guest_stat{vm,stat}                        virtio-balloon guest stats: levels
vballoon_vm_guest_events_total{vm,stat}                ... counts since boot (OOM kills, swap..)
vballoon_host_memory_{total,free,min_free}_bytes       the policy's source / its free / minFree
vballoon_host_state{state}                             1 for the current state
vballoon_host_psi_{some,full}_avg10                    PSI memory stall, percent
vballoon_policy_{pressure,unmet}_pages                 last policy step (pressure only)
vballoon_policy_capped_pages{vm}                       limit / manual target cut by MCTLMAX
vballoon_policy_steps_total                            policy steps taken
vballoon_setting{path}                                 advanced settings
vballoon_vm_reported_bytes_total{vm}                   free page reporting: bytes punched
vballoon_vm_guest_backoff{vm}                          1 while the guest's balloon is held
vballoon_cgroup_usage_bytes{cgroup}, _limit_bytes      a watched cgroup (--watch-cgroup)
vballoon_cgroup_events_total{cgroup,event}             its oom / oom_kill / max / high counts
vballoon_cgroup_under_oom{cgroup}                      v1: under OOM (the kernel's)
vballoon_pressure_notifications_total                  kernel notifications that woke us
vballoon_backstop_engaged, _pauses_total               the backstop (--backstop)
vballoon_backstop_vm_paused{vm}                        v1: 1 while its QEMU is stopped
vballoon_vm_info{vm,socket}                            1 per guest: the socket it is served on
vballoon_build_info{version}                           1: the vballoon package version
process_start_time_seconds, process_* (Linux)          prometheus_client's process collector:
                                                       a change of the start time = a restart
=====================================================  ===============================

A reclaim the host refused (``fallocate``/``madvise`` failed: the pages stay resident) counts
in ``vballoon_vm_balloon_events_total{counter="reclaim failures"}``. The alerting rules and the
Grafana dashboard over these series are in ``contrib/prometheus`` and ``contrib/grafana``.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from protocol.errors import ConfigError
from protocol.units import PAGE_SIZE
from protocol.version import package_version
from protocol.virtio_balloon import LEVEL_STATS, STAT_QOM_KEY
from vdev.policy.control import driver_active, failures
from vdev.policy.model import HostState

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from vdev.policy.control import ControlPlane

#: The guest statistics (QEMU's names) exported as gauges; the others are counters.
_LEVEL_STATS = frozenset(STAT_QOM_KEY[tag] for tag in LEVEL_STATS)

log = logging.getLogger(__name__)


class ControlPlaneCollector(Collector):
    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    def collect(self) -> Iterator[Metric]:
        control = self.control
        vm = ["vm"]
        connected = GaugeMetricFamily(
            "vballoon_vm_connected",
            "A vhost-user front-end is connected",
            labels=["vm", "personality"],
        )
        active = GaugeMetricFamily(
            "vballoon_vm_driver_active", "Balloon driver active (esxtop MCTL?)", labels=vm
        )
        size = GaugeMetricFamily(
            "vballoon_vm_balloon_size_bytes", "Balloon size (esxtop MCTLSZ)", labels=vm
        )
        target = GaugeMetricFamily(
            "vballoon_vm_balloon_target_bytes", "Balloon target (esxtop MCTLTGT)", labels=vm
        )
        maximum = GaugeMetricFamily(
            "vballoon_vm_balloon_max_bytes", "Most the balloon may hold (esxtop MCTLMAX)", labels=vm
        )
        manual = GaugeMetricFamily(
            "vballoon_vm_manual_target", "1 if the target is a manual override", labels=vm
        )
        ram = GaugeMetricFamily("vballoon_vm_ram_bytes", "Guest RAM", labels=vm)
        resident = GaugeMetricFamily(
            "vballoon_vm_ram_allocated_bytes", "Host memory backing the guest RAM file", labels=vm
        )
        inflate = GaugeMetricFamily(
            "vballoon_vm_inflate_pages_per_second", "Inflation over the rate window", labels=vm
        )
        deflate = GaugeMetricFamily(
            "vballoon_vm_deflate_pages_per_second", "Deflation over the rate window", labels=vm
        )
        events = CounterMetricFamily(
            "vballoon_vm_balloon_events",
            "Device model counters (debugfs vocabulary)",
            labels=["vm", "counter"],
        )
        levels = GaugeMetricFamily(
            "vballoon_vm_balloon_level",
            "Device model gauges: current levels such as events pending",
            labels=["vm", "level"],
        )
        fails = CounterMetricFamily(
            "vballoon_vm_failures",
            "Times the guest did something wrong (FAIL: bad frames, ERROR_CMD_INVALID, pages "
            "refused PPN_INVALID/LOCKED/UNLOCKED; not RESET/BUSY/NOTNEEDED/PINNED)",
            labels=vm,
        )
        reclaimed = CounterMetricFamily(
            "vballoon_vm_reclaimed_bytes",
            "Bytes of guest RAM the guest gave up and vdev punched out of its RAM file (pages "
            "that were never resident free nothing: see vballoon_vm_ram_allocated_bytes)",
            labels=vm,
        )
        stats = GaugeMetricFamily(
            "vballoon_vm_guest_stat",
            "virtio-balloon guest statistics that are levels (bytes now)",
            labels=["vm", "stat"],
        )
        guest_events = CounterMetricFamily(
            "vballoon_vm_guest_events",
            "virtio-balloon guest statistics that count since the guest booted",
            labels=["vm", "stat"],
        )
        info = GaugeMetricFamily(
            "vballoon_vm_info", "The guest and the socket it is served on", labels=["vm", "socket"]
        )

        for name in control.registry.names():
            try:
                view = control.registry.view(name)
            except KeyError:
                continue
            counters = {
                str(k): int(v) for k, v in dict(getattr(view, "counters", {}) or {}).items()
            }
            info.add_metric([name, str(getattr(view, "socket_path", ""))], 1)
            connected.add_metric(
                [name, str(getattr(view, "personality", ""))], float(bool(view.connected))
            )
            active.add_metric([name], float(driver_active(view)))
            size.add_metric([name], int(view.size_pages) * PAGE_SIZE)
            target.add_metric([name], int(view.target_pages) * PAGE_SIZE)
            maximum.add_metric([name], control.max_pages(name, view) * PAGE_SIZE)
            manual.add_metric([name], float(name in control.manual))
            ram.add_metric([name], int(view.ram_pages) * PAGE_SIZE)
            resident.add_metric([name], int(getattr(view, "ram_allocated_bytes", 0) or 0))
            up, down = control.rates(name)
            inflate.add_metric([name], up)
            deflate.add_metric([name], down)
            gauges = frozenset(getattr(view, "gauges", ()) or ())
            for counter, value in sorted(counters.items()):
                (levels if counter in gauges else events).add_metric([name, counter], value)
            fails.add_metric([name], failures(counters))
            reclaimed.add_metric([name], int(getattr(view, "reclaimed_bytes_total", 0) or 0))
            for stat, value in sorted(dict(getattr(view, "guest_stats", {}) or {}).items()):
                if int(value) >= 0:  # -1: the guest does not report it
                    family = stats if stat in _LEVEL_STATS else guest_events
                    family.add_metric([name, str(stat)], int(value))
        yield from (connected, active, size, target, maximum, manual, ram, resident)
        yield from (inflate, deflate, events, levels, fails, reclaimed, stats, guest_events)
        yield info
        build = GaugeMetricFamily(
            "vballoon_build_info", "The vballoon package version", labels=["version"]
        )
        build.add_metric([package_version()], 1)
        yield build

        sample = control.last_sample
        decision = control.last_decision
        if sample is not None:
            host = control.host_info()
            yield GaugeMetricFamily(
                "vballoon_host_memory_total_bytes",
                "Memory as the policy sees it: the host's MemTotal, a watched cgroup's limit "
                "where smaller (--watch-cgroup), or the simulated host's (--host-memory)",
                value=sample.total_bytes,
            )
            yield GaugeMetricFamily(
                "vballoon_host_memory_free_bytes",
                "Free memory as the policy sees it: the host's MemAvailable, a watched cgroup's "
                "headroom where smaller (--watch-cgroup), or the simulated host's (--host-memory)",
                value=sample.free_bytes,
            )
            yield GaugeMetricFamily(
                "vballoon_host_memory_min_free_bytes",
                "ESXi-style minFree",
                value=host["min_free_bytes"],
            )
            if sample.psi_some_avg10 is not None:
                yield GaugeMetricFamily(
                    "vballoon_host_psi_some_avg10",
                    "PSI memory some avg10 (percent)",
                    value=sample.psi_some_avg10,
                )
            if sample.psi_full_avg10 is not None:
                yield GaugeMetricFamily(
                    "vballoon_host_psi_full_avg10",
                    "PSI memory full avg10 (percent)",
                    value=sample.psi_full_avg10,
                )
        if decision is not None:
            state = GaugeMetricFamily(
                "vballoon_host_state", "Host memory state (1 = current)", labels=["state"]
            )
            for s in HostState:
                state.add_metric([s.value], float(s is decision.state))
            yield state
            yield GaugeMetricFamily(
                "vballoon_policy_pressure_pages",
                "Pressure reclamation placed",
                value=decision.pressure_pages,
            )
            yield GaugeMetricFamily(
                "vballoon_policy_unmet_pages",
                "Host pressure demand the caps kept from every balloon",
                value=decision.unmet_pages,
            )
            capped = GaugeMetricFamily(
                "vballoon_policy_capped_pages",
                "A VM's limit or manual target cut by its cap (MCTLMAX)",
                labels=["vm"],
            )
            for name, d in sorted(decision.vms.items()):
                capped.add_metric([name], d.capped_pages)
            yield capped
        yield CounterMetricFamily(
            "vballoon_policy_steps", "Policy steps taken", value=control.steps
        )
        setting = GaugeMetricFamily("vballoon_setting", "Advanced settings", labels=["path"])
        settings = control.engine.settings
        for path in settings.paths():
            setting.add_metric([path], settings.get(path))
        yield setting
        yield from overcommit_metrics(control)


#: memory.events (v2) and memory.oom_control / failcnt (v1) keys that are counters
CGROUP_EVENT_COUNTERS = ("low", "high", "max", "oom", "oom_kill", "oom_group_kill")


def overcommit_metrics(control: ControlPlane) -> Iterator[Metric]:
    """Watched cgroups, kernel notifications, the backstop, and per VM: free page reporting
    and guest back-off."""
    reported = CounterMetricFamily(
        "vballoon_vm_reported_bytes", "Free page reporting: bytes punched", labels=["vm"]
    )
    held = GaugeMetricFamily(
        "vballoon_vm_guest_backoff", "1 while the guest's balloon is held (it needs memory)",
        labels=["vm"],
    )  # fmt: skip
    guests = control.guests_info()
    for name in control.registry.names():
        try:
            view = control.registry.view(name)
        except KeyError:
            continue
        counters = dict(getattr(view, "counters", {}) or {})
        reported.add_metric([name], int(counters.get("reported (4k)", 0)) * PAGE_SIZE)
        hold = (guests.get(name) or {}).get("hold") or ""
        held.add_metric([name], float(hold.startswith("guest-backoff")))
    yield from (reported, held)
    usage = GaugeMetricFamily("vballoon_cgroup_usage_bytes", "Watched cgroup usage",
                              labels=["cgroup"])  # fmt: skip
    limit = GaugeMetricFamily("vballoon_cgroup_limit_bytes", "Watched cgroup limit",
                              labels=["cgroup"])  # fmt: skip
    events = CounterMetricFamily("vballoon_cgroup_events", "Watched cgroup memory events",
                                 labels=["cgroup", "event"])  # fmt: skip
    under = GaugeMetricFamily("vballoon_cgroup_under_oom", "cgroup v1: tasks paused under OOM",
                              labels=["cgroup"])  # fmt: skip
    for r in control.cgroup_readings:
        path = r.source.path
        usage.add_metric([path], r.usage_bytes)
        if r.limit_bytes is not None:
            limit.add_metric([path], r.limit_bytes)
        for key in CGROUP_EVENT_COUNTERS:
            if key in r.events:
                events.add_metric([path, key], r.events[key])
        if "under_oom" in r.events:
            under.add_metric([path], r.events["under_oom"])
    yield from (usage, limit, events, under)
    yield CounterMetricFamily(
        "vballoon_pressure_notifications", "Kernel memory-pressure notifications received",
        value=control.pressure_notices,
    )  # fmt: skip
    backstop = control.backstop
    yield GaugeMetricFamily(
        "vballoon_backstop_engaged", "1 while the backstop is set on the watched cgroups",
        value=float(backstop is not None and backstop.engaged),
    )  # fmt: skip
    yield CounterMetricFamily(
        "vballoon_backstop_pauses", "Times the backstop stopped a VM's QEMU (v1)",
        value=backstop.pauses if backstop is not None else 0,
    )  # fmt: skip
    paused = GaugeMetricFamily(
        "vballoon_backstop_vm_paused", "1 while the backstop holds the VM's QEMU stopped",
        labels=["vm"],
    )  # fmt: skip
    for p in backstop.paused() if backstop is not None else []:
        paused.add_metric([str(p["name"])], 1.0)
    yield paused


def render_metrics(control: ControlPlane) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControlPlaneCollector(control))
    ProcessCollector(registry=registry)  # process_start_time_seconds: restarts
    return generate_latest(registry)


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``127.0.0.1:9851``, ``[::1]:9851``; ``:9851`` = every address; port 0:
    one the kernel picks, logged)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"not HOST:PORT: {text!r} (example: 127.0.0.1:9851)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


async def serve_metrics(
    control: ControlPlane,
    address: str,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``GET /metrics`` (only) over TCP on ``address`` for Prometheus, which cannot scrape the
    API's unix socket. Read-only: nothing here changes a target. Runs until cancelled."""
    from prometheus_client import CONTENT_TYPE_LATEST
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from vdev.api.limits import ApiLimits
    from vdev.api.serve import ApiServer

    host, port = parse_metrics_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen for metrics on {address}: {exc.strerror}") from exc
    bound = sock.getsockname()[:2]

    async def metrics(request: Request) -> Response:
        return Response(render_metrics(control), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])
    # the management API's server: a scraper or anyone else on the network cannot stop vdev,
    # hold its fds or memory (bounds, containment: vdev/api/serve.py); no SO_PEERCRED on TCP,
    # and the app only reads
    server = ApiServer(app, ApiLimits(), None)
    try:
        log.info("metrics on http://%s:%d/metrics", *bound)
        task_status.started((str(bound[0]), int(bound[1])))
        await server.serve(sock)
    finally:
        sock.close()
