"""The operator's side of ``vdev``: subcommands that talk to a running ``vdev serve`` through
its management API, and the options that ``vdev serve`` grows for the control plane.

    vdev stat                 one table in esxtop's vocabulary (MCTL?, MCTLSZ, MCTLTGT, MCTLMAX)
    vdev top                  the same, live (redrawn on every event, and each --interval)
    vdev set-target VM SIZE   manual balloon target (512M, 1.5G, 0); SIZE "policy" hands back
    vdev reset VM             demand a balloon reset
    vdev host [--set-free S]  host memory state (and the simulated host's free memory)
    vdev pools                resource pools
    vdev config list | get PATH | set PATH VALUE    advanced settings (/Mem/CtlMaxPercent ...)
    vdev events [--vm VM] [--json]                  the event stream, as it happens
    vdev plot VM --output FILE.png                  target, size and host free memory over time
    vdev plot --recording overcommit.json -o F.png  a recorded overcommit scenario

Every command takes ``--api-socket PATH`` (or ``$VDEV_API_SOCKET``); ``vdev serve`` puts the
socket next to its first vhost-user socket, at ``<socket>.api``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from protocol.errors import ApiError, ConfigError
from protocol.units import PAGE_SIZE
from vdev.api.client import ApiClient, setting_segments
from vdev.api.limits import LIMIT_RANGES
from vdev.registry import check_guest_name

if TYPE_CHECKING:
    import trio

    from vdev.registry import GuestRegistry

F = TypeVar("F", bound=Callable[..., Any])

MIB = 1 << 20


class ConfigRefused(click.ClickException):
    """A bad option or config-file value: one line naming it (the option, or the file and
    its key), exit status 2 like click's usage errors, without the usage banner that would
    send the operator to the command line when the file is at fault."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        from vdev.logs import error_line

        click.echo(error_line(f"Error: {self.format_message()}"), err=True)


CONTROL_META = "vdev.control_config"
METRICS_META = "vdev.metrics_address"

# ------------------------------------------------------------------------------ vdev serve


def serve_options(f: F) -> F:
    """Adds the control-plane options to ``vdev serve`` and stashes the resulting config in
    the click context for :func:`start_control_plane` (flags override the config file)."""

    @click.option(
        "--api-socket",
        type=click.Path(dir_okay=False),
        default=None,
        help="Management API socket (default: <first --socket-path>.api; mode 0600).",
    )
    @click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, exists=True),
        default=None,
        help="TOML config: [serve], [settings], [pools.*], [vms.*].",
    )
    @click.option(
        "--host-memory",
        default=None,
        help="Simulate a host of this size (e.g. 16G) instead of sampling /proc/meminfo.",
    )
    @click.option(
        "--policy-period",
        type=click.FloatRange(min=0.001),
        default=None,
        help="Seconds between policy steps (default 1).",
    )
    @click.option(
        "--watch-cgroup",
        "watch_cgroups",
        multiple=True,
        help="Memory cgroup holding the VMs (repeatable; v1 or v2): a directory, or a path"
        " under the memory controller's mount such as machine.slice. Default: the host.",
    )
    @click.option(
        "--policy",
        type=click.Choice(["esxi", "mom"]),
        default=None,
        help="Balloon policy: esxi (default: the ESXi model) or mom (oVirt MoM's rules).",
    )
    @click.option(
        "--backstop/--no-backstop",
        default=None,
        help="Near a watched cgroup's limit, stop the allocating VM's QEMU until the others"
        " give memory back (v1: SIGSTOP/SIGCONT, at most [serve] backstop_deadline s) or throttle"
        " the cgroup (v2: memory.high) instead of letting the kernel kill a VM.",
    )
    @click.option(
        "--stop-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Where the QEMUs the backstop stops are recorded; read when vdev starts, to"
        " continue those a killed vdev left stopped (default:"
        " $RUNTIME_DIRECTORY/<socket name>.stopped, else <first --socket-path>.stopped).",
    )
    @click.option("--no-api", is_flag=True, help="Run the policy but serve no management API.")
    @click.option(
        "--metrics-address",
        default=None,
        metavar="HOST:PORT",
        help="Also serve GET /metrics over TCP here, for Prometheus (e.g. 127.0.0.1:9851).",
    )
    @click.option(
        "--api-read-group",
        default=None,
        help="Group (name or gid) whose members may read the API (GET: stat, events, "
        "metrics) but change nothing; the socket gets this group and mode 0660.",
    )
    @_api_limit_options
    @functools.wraps(f)
    def wrapper(
        *args: Any,
        api_socket: str | None,
        config_file: str | None,
        host_memory: str | None,
        policy_period: float | None,
        watch_cgroups: tuple[str, ...],
        backstop: bool | None,
        stop_file: str | None,
        policy: str | None,
        no_api: bool,
        api_read_group: str | None,
        metrics_address: str | None,
        **kwargs: Any,
    ) -> Any:
        from vdev.config import ControlConfig, load_config, parse_size
        from vdev.metrics import parse_metrics_address

        limits = {
            name: kwargs.pop(f"api_{name}")
            for name in LIMIT_RANGES
            if kwargs.get(f"api_{name}") is not None
        }
        for name in LIMIT_RANGES:
            kwargs.pop(f"api_{name}", None)

        try:
            cfg = load_config(config_file) if config_file else ControlConfig()
            cfg.override(
                api_socket=api_socket,
                host_memory=None
                if host_memory is None
                else parse_size(host_memory, "--host-memory"),
                policy_period=policy_period,
                watch_cgroups=list(watch_cgroups),
                backstop=backstop,
                stop_file=stop_file,
                policy=policy,
                api_read_group=api_read_group,
                api_limits=limits,
            )
            if cfg.watch_cgroups:
                from vdev.policy.cgroup import resolve_cgroup

                for path in cfg.watch_cgroups:
                    resolve_cgroup(path)  # refuse a path that is not a memory cgroup now
            if not no_api and not kwargs.get("print_capabilities"):
                # The API socket's path; `vdev serve` claims it (vdev.socket_files: a live
                # one is refused) before anything starts, and only then is a stale one removed.
                from vdev.api.serve import default_api_socket
                from vdev.listeners import socket_paths
                from vdev.socket_files import check_socket_path_length

                if cfg.api_socket is None and kwargs.get("socket_path"):
                    paths = socket_paths(kwargs["socket_path"], kwargs.get("socket_count"))
                    cfg.api_socket = default_api_socket(paths)
                if cfg.api_socket is not None:
                    check_socket_path_length(cfg.api_socket, "--api-socket")
            if cfg.stop_file is None and not kwargs.get("print_capabilities"):
                from vdev.listeners import socket_paths
                from vdev.policy.guard import default_stop_file

                own = (
                    socket_paths(kwargs["socket_path"], kwargs.get("socket_count"))
                    if kwargs.get("socket_path")
                    else []
                )
                cfg.stop_file = default_stop_file(
                    own, cfg.api_socket, os.environ.get("RUNTIME_DIRECTORY")
                )
            if metrics_address is not None:
                parse_metrics_address(metrics_address)
        except ConfigError as e:
            raise ConfigRefused(str(e)) from None
        ctx = click.get_current_context()
        ctx.meta[CONTROL_META] = (cfg, no_api)
        ctx.meta[METRICS_META] = metrics_address
        return f(*args, **kwargs)

    return cast(F, wrapper)


def preload_control_plane() -> None:
    """Import what :func:`start_control_plane` imports on first use (the API's web framework
    takes a second or more): a standby (``vdev supervise --standby``) does it before it
    waits, so that after a restart the API is back as soon as the guests are."""
    import vdev.api.serve
    import vdev.metrics
    import vdev.policy.control  # noqa: F401


async def start_control_plane(
    nursery: trio.Nursery, registry: GuestRegistry, socket_paths: list[str]
) -> None:
    """The hook ``vdev serve`` calls inside its nursery: starts the policy loop and the API.

    Does nothing when not called under ``vdev serve`` (no options in the click context)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or CONTROL_META not in ctx.meta:
        return
    from vdev.api.serve import default_api_socket, serve_api
    from vdev.policy.control import ControlPlane

    cfg, no_api = ctx.meta[CONTROL_META]
    control = ControlPlane(registry, cfg, initial_target_pages=registry.default_target)
    await nursery.start(control.run)
    metrics_address = ctx.meta.get(METRICS_META)
    if metrics_address is not None:
        from vdev.metrics import serve_metrics

        await nursery.start(serve_metrics, control, metrics_address)
    if no_api:
        return
    path = cfg.api_socket
    if path is None:
        if not socket_paths:
            click.echo("vdev serve: no --api-socket given with --fd: no management API", err=True)
            return
        path = default_api_socket(socket_paths)
    await nursery.start(
        functools.partial(
            serve_api,
            control,
            path,
            mode=cfg.api_socket_mode,
            limits=cfg.api_limits,
            read_group=cfg.api_read_group,
        )
    )


def _api_limit_options(f: F) -> F:
    """``--api-max-body-bytes`` & co: one option per :class:`vdev.api.limits.ApiLimits`
    field, with the range the config file's ``api_*`` keys get too."""
    from vdev.api.limits import ApiLimits

    defaults = ApiLimits()
    for name, (low, high) in reversed(LIMIT_RANGES.items()):
        default = getattr(defaults, name)
        kind = (
            click.IntRange(int(low), int(high))
            if isinstance(default, int)
            else click.FloatRange(low, high)
        )
        f = click.option(
            f"--api-{name.replace('_', '-')}",
            f"api_{name}",
            type=kind,
            default=None,
            help=f"{_LIMIT_HELP[name]} (default {default}; config [serve] api_{name}).",
        )(f)
    return f


_LIMIT_HELP = {
    "max_body_bytes": "Largest API request body; 413 beyond, never read",
    "max_header_bytes": "Largest API request line and headers; 431 beyond",
    "header_timeout": "Seconds for an API request's headers to arrive; 408 after",
    "body_timeout": "Seconds for an API request's body to arrive; 408 after",
    "idle_timeout": "Seconds an idle kept-alive API connection is kept",
    "write_timeout": "Seconds a write may wait on an API client that does not read",
    "max_connections": "Concurrent API connections; 503 beyond (at most RLIMIT_NOFILE/4)",
    "max_subscribers": "Concurrent GET /events streams; 503 beyond",
}


# ------------------------------------------------------------------------------ helpers


def api_option(f: F, *, required: bool = True) -> F:
    return click.option(
        "--api-socket",
        envvar="VDEV_API_SOCKET",
        type=click.Path(dir_okay=False),
        required=required,
        help="The vdev serve management socket (env VDEV_API_SOCKET).",
    )(f)


def _vm_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A VM argument follows the one name rule (:func:`vdev.registry.check_guest_name`) before
    it goes near a URL."""
    if value is None:
        return None
    try:
        return check_guest_name(value)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None


def _setting_path(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        setting_segments(value)
    except ConfigError as e:
        raise click.BadParameter(str(e)) from None
    return value


def _client(path: str) -> ApiClient:
    return ApiClient(path)


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(getattr(e, "message", e)))


def _call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ApiError as e:
        raise _fail(e) from None


#: Off a terminal (a pipe, a log, a README) nothing is wrapped: lines are as long as they are.
UNWRAPPED_WIDTH = 1000


def _console() -> Console:
    """The terminal's width on a terminal (or click's ``terminal_width`` when set); off a
    terminal a width no line reaches, so that tables and the host line keep their natural
    width."""
    ctx = click.get_current_context(silent=True)
    width = None if ctx is None else ctx.terminal_width
    if width is None and not sys.stdout.isatty():
        width = UNWRAPPED_WIDTH
    return Console(width=width, soft_wrap=False, highlight=False)


def _print(renderable: Any) -> None:
    """Print a table: on a terminal as rich renders it; off one (a pipe, a file) without the
    padding rich gives every line up to the widest cell (lines of 200 spaces and more)."""
    console = _console()
    if sys.stdout.isatty():
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


class Fields:
    """Text fields on one line, separated by two spaces; where the width is too small, the
    line breaks between fields (never inside one), continuation lines indented."""

    def __init__(self, fields: list[Text], indent: int = 5) -> None:
        self.fields = fields
        self.indent = indent

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        line = Text()
        for field in self.fields:
            sep = "  " if line.plain.strip() else ""
            if line.plain.strip() and line.cell_len + len(sep) + field.cell_len > width:
                yield line
                line, sep = Text(" " * self.indent), ""
            line.append(sep)
            line.append_text(field)
        if line.plain:
            yield line

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        total = sum(f.cell_len for f in self.fields) + 2 * max(0, len(self.fields) - 1)
        widest = max((f.cell_len for f in self.fields), default=0)
        return Measurement(min(widest, options.max_width), min(total, options.max_width))


def mb(nbytes: int | float | None) -> str:
    """esxtop prints MB with two decimals."""
    return "-" if nbytes is None else f"{nbytes / MIB:.2f}"


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _state_style(state: str | None) -> str:
    return {
        "high": "green",
        "clear": "cyan",
        "soft": "yellow",
        "hard": "red",
        "low": "bold red",
    }.get(state or "", "dim")


def stat_renderable(vms: list[dict[str, Any]], host: dict[str, Any]) -> Group:
    """The `vdev stat` screen: a host line, then one row per VM (esxtop memory view)."""
    cur = sum(v["size_bytes"] for v in vms)
    tgt = sum(v["target_bytes"] for v in vms)
    mx = sum(v["max_bytes"] for v in vms)
    state = host.get("state")
    fields = [
        Text.assemble(("HOST ", "bold"), (f"state {state or '-'}", _state_style(state))),
        Text(
            f"PMEM/MB total {mb(host.get('total_bytes'))} free {mb(host.get('free_bytes'))}"
            f" minFree {mb(host.get('min_free_bytes'))}"
        ),
    ]
    psi = host.get("psi") or {}
    some, full = psi.get("some_avg10"), psi.get("full_avg10")
    if some is not None or full is not None:
        fields.append(Text(f"PSI some {_dash(some)} full {_dash(full)}"))
    fields.append(Text(f"MEMCTL/MB {mb(cur)} curr, {mb(tgt)} target, {mb(mx)} max"))
    if host.get("simulated"):
        fields.append(Text("(simulated)", style="dim"))
    if host.get("error"):
        fields.append(Text(f"error: {host['error']}", style="red"))
    line = Fields(fields)

    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1))
    for column, justify in (
        ("VM", "left"),
        ("DEV", "left"),
        ("CONN", "left"),
        ("MCTL?", "left"),
        ("MEMSZ", "right"),
        ("MCTLSZ", "right"),
        ("MCTLTGT", "right"),
        ("MCTLMAX", "right"),
        ("CTRL", "left"),
        ("REASON", "left"),
        ("INFL/s", "right"),
        ("DEFL/s", "right"),
        ("FAIL", "right"),
    ):
        # On a narrow terminal only REASON wraps (at spaces); numbers are never cut.
        wraps = column == "REASON"
        table.add_column(
            column,
            justify=justify,  # type: ignore[arg-type]
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
        )
    for v in vms:
        rates = v["rates"]
        table.add_row(
            v["name"],
            v["personality"],
            "Y" if v["connected"] else "N",
            Text("Y", style="green") if v["driver_active"] else Text("N", style="dim"),
            mb(v["ram_bytes"]),
            mb(v["size_bytes"]),
            mb(v["target_bytes"]),
            mb(v["max_bytes"]),
            Text(v["control"], style="bold magenta" if v["control"] == "manual" else ""),
            v["reason"],
            f"{rates['inflate_pages_per_s']:.0f}",
            f"{rates['deflate_pages_per_s']:.0f}",
            str(v["failures"]),
        )
    guests = guest_memory_table(vms, host)
    return Group(line, table, guests) if guests is not None else Group(line, table)


def guest_memory_table(vms: list[dict[str, Any]], host: dict[str, Any]) -> Table | None:
    """The guests' own memory (virtio-balloon stats) next to what each VM holds on the
    host: RESID the RAM file's allocated MB (what vdev can really free), GFREE / GAVAIL /
    GCACHE the guest's free, available and cache MB, SWIN / SWOUT MB swapped, GOOM the
    guest's OOM kills, AGE seconds since its stats were new, PFAIL punches that failed (the
    guest gave pages the host did not get back), HOLD what keeps its balloon
    from growing. None when no connected guest has stats or a RAM file size."""
    rows = [
        v
        for v in vms
        if v.get("connected")
        and (
            v.get("ram_allocated_bytes")
            or any(x >= 0 for x in (v.get("guest_stats") or {}).values())
        )
    ]
    if not rows:
        return None
    info = host.get("guests") or {}
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1))
    for column in ("VM", "RESID", "GFREE", "GAVAIL", "GCACHE", "SWIN", "SWOUT", "GOOM", "AGE",
                   "PFAIL", "HOLD"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("VM", "HOLD") else "right")

    def stat_mb(stats: dict[str, Any], key: str) -> str:
        value = stats.get(key, -1)
        return "-" if value is None or value < 0 else mb(value)

    for v in rows:
        stats = v.get("guest_stats") or {}
        oom = stats.get("stat-oom-kills", -1)
        extra = info.get(v["name"]) or {}
        table.add_row(
            v["name"],
            mb(v.get("ram_allocated_bytes")),
            stat_mb(stats, "stat-free-memory"),
            stat_mb(stats, "stat-available-memory"),
            stat_mb(stats, "stat-disk-caches"),
            stat_mb(stats, "stat-swap-in"),
            stat_mb(stats, "stat-swap-out"),
            "-" if oom is None or oom < 0 else str(oom),
            _dash(extra.get("stats_age_s")),
            _dash(extra.get("reclaim_failures")),
            _dash(extra.get("hold")),
        )
    return table


# ------------------------------------------------------------------------------ commands


@click.command()
@api_option
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON instead.")
def stat(api_socket: str, as_json: bool) -> None:
    """Balloon state of every VM and the host, in esxtop's vocabulary (sizes in MB).

    MCTL? the balloon driver runs; MCTLSZ balloon size; MCTLTGT target; MCTLMAX the cap
    (Mem.CtlMaxPercent); CTRL policy or manual, REASON what decided the target; INFL/s and
    DEFL/s pages per second.

    FAIL counts the times the guest did something wrong, each once: bad frames (and bad
    ring chains), commands answered ERROR_CMD_INVALID, and pages refused PPN_INVALID,
    PPN_LOCKED or PPN_UNLOCKED (virtio-balloon: inflated PFNs that are not RAM or already
    in the balloon). Normal balloon flow is not a failure: ERROR_RESET (a command before
    START after a reset), ERROR_BUSY, PPN_NOTNEEDED (the target fell), PPN_PINNED (ring
    pages). The raw counters are in --json.
    """
    with _client(api_socket) as c:
        vms, host = _call(c.vms), _call(c.host)
    if as_json:
        click.echo(json.dumps({"host": host, "vms": vms}, indent=2))
        return
    _print(stat_renderable(vms, host))


@click.command()
@api_option
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Redraw at least this often (rates move without events).",
)
@click.option(
    "--iterations",
    "-n",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many redraws.",
)
def top(api_socket: str, interval: float, iterations: int | None) -> None:
    """`vdev stat`, live: redrawn on every event from the API, and every --interval."""
    changed = threading.Event()

    def listen() -> None:
        try:
            with _client(api_socket) as events_client:
                for _ in events_client.events():
                    changed.set()
        except Exception:  # the display loop reports connection trouble itself
            changed.set()

    threading.Thread(target=listen, daemon=True, name="vdev-top-events").start()
    count = 0
    with _client(api_socket) as c, Live(console=_console(), auto_refresh=False) as live:
        while iterations is None or count < iterations:
            changed.clear()
            live.update(stat_renderable(_call(c.vms), _call(c.host)), refresh=True)
            count += 1
            if iterations is not None and count >= iterations:
                break
            changed.wait(interval)
            time.sleep(0.05)  # coalesce bursts of events into one redraw


@click.command("set-target")
@api_option
@click.argument("vm", callback=_vm_name)
@click.argument("size")
def set_target(api_socket: str, vm: str, size: str) -> None:
    """Pin VM's balloon target to SIZE (512M, 1.5G, 4096, 0); SIZE "policy" hands it back."""
    body: dict[str, Any] = (
        {"policy": True} if size.lower() in ("policy", "auto") else {"target": size}
    )
    with _client(api_socket) as c:
        v = _call(lambda: c.set_target(vm, **body))
    if v["control"] == "policy":
        click.echo(f"{vm}: target under policy control ({mb(v['target_bytes'])} MB, {v['reason']})")
        return
    msg = f"{vm}: MCTLTGT {mb(v['target_bytes'])} MB (manual)"
    if v["reason"] != "manual":
        msg += f", {v['reason']}: requested {mb(v['manual_target_pages'] * PAGE_SIZE)} MB, MCTLMAX {mb(v['max_bytes'])} MB"
    click.echo(msg)


@click.command()
@api_option
@click.argument("vm", callback=_vm_name)
def reset(api_socket: str, vm: str) -> None:
    """Demand a balloon reset: the guest driver pops every page and starts over (vmw; a
    virtio-balloon guest cannot be told to, so vdev refuses: set the target to 0 instead)."""
    with _client(api_socket) as c:
        _call(lambda: c.reset(vm))
    click.echo(f"{vm}: reset demanded")


@click.command()
@api_option
@click.option("--set-free", default=None, help="Simulated host only: set free memory (e.g. 2G).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON instead.")
def host(api_socket: str, set_free: str | None, as_json: bool) -> None:
    """Host memory state: high / clear / soft / hard / low, free vs minFree, PSI."""
    with _client(api_socket) as c:
        h = _call(lambda: c.set_simulated_free(free=set_free)) if set_free else _call(c.host)
    if as_json:
        click.echo(json.dumps(h, indent=2))
        return
    table = _PlainTable(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    psi = h.get("psi") or {}
    for key, value in (
        ("state", Text(str(h.get("state")), style=_state_style(h.get("state")))),
        ("source", h["source"]),
        ("total MB", mb(h.get("total_bytes"))),
        ("free MB", mb(h.get("free_bytes"))),
        ("minFree MB", mb(h.get("min_free_bytes"))),
        ("PSI some/full avg10", f"{_dash(psi.get('some_avg10'))} / {_dash(psi.get('full_avg10'))}"),
        ("pressure pages", str(h.get("pressure_pages"))),
        ("unmet pages", str(h.get("unmet_pages"))),
        ("capped pages", _capped(h)),
        ("policy period s", str(h.get("policy_period_s"))),
        ("steps", str(h.get("steps"))),
    ):
        table.add_row(key, value)
    if h.get("source_why"):
        table.add_row("why", str(h["source_why"]))
    for cg in h.get("cgroups") or []:
        events = " ".join(f"{k}={v}" for k, v in sorted((cg.get("events") or {}).items()))
        table.add_row(
            f"cgroup v{cg['version']}",
            f"{cg['path']}: usage {mb(cg.get('usage_bytes'))} / limit"
            f" {mb(cg.get('limit_bytes')) if cg.get('limit_bytes') is not None else 'none'} MB"
            + (f", high {mb(cg['high_bytes'])} MB" if cg.get("high_bytes") is not None else "")
            + (f"; {events}" if events else ""),
        )
    notes = h.get("notifications") or {}
    for armed in notes.get("armed") or []:
        table.add_row("wakes on", str(armed))
    for skipped in notes.get("skipped") or []:
        table.add_row("not armed", Text(str(skipped), style="yellow"))
    if notes:
        table.add_row("notifications", str(notes.get("received", 0)))
    backstop = h.get("backstop") or {}
    if backstop.get("engaged"):
        table.add_row("backstop", f"engaged, {backstop.get('pauses', 0)} pauses")
        for p in backstop.get("paused") or []:
            table.add_row(
                "stopped", Text(f"{p.get('name')} (pid {p.get('pid')}) by the backstop", "yellow")
            )
    # the last actions, engaged or not (start-up continues QEMUs a killed vdev left stopped)
    for act in (backstop.get("actions") or [])[-5:]:
        table.add_row(f"backstop {act.get('action')}", str(act.get("detail")))
    if h.get("error"):
        table.add_row("error", Text(h["error"], style="red"))
    _print(table)


class _PlainTable(Table):
    """A table whose str cells are plain text: a value such as ``[serve] host_memory`` or a
    cgroup path is shown as it is, not read as rich markup."""

    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kwargs)


def _capped(h: dict[str, Any]) -> str:
    """Limit / manual requests the caps cut: the total, then by VM and by pool."""
    total = str(h.get("capped_pages", 0))
    capped = h.get("capped") or {}
    parts = [f"{n} {p}" for n, p in sorted((capped.get("vms") or {}).items())]
    parts += [f"pool {n} {p}" for n, p in sorted((capped.get("pools") or {}).items())]
    return f"{total} ({', '.join(parts)})" if parts else total


@click.command()
@api_option
def pools(api_socket: str) -> None:
    """Resource pools: reservation, limit, shares and member VMs."""
    with _client(api_socket) as c:
        ps = _call(c.pools)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("POOL", "PARENT", "RESV/MB", "LIMIT/MB", "SHARES", "EXPANDABLE", "VMS"):
        table.add_column(col)
    for p in ps:
        table.add_row(
            p["name"],
            p["parent"] or "-",
            mb(p["reservation_bytes"]),
            "unlimited" if p["limit_bytes"] is None else mb(p["limit_bytes"]),
            f"{p['shares']} ({p['share_count']:.0f})",
            "yes" if p["expandable_reservation"] else "no",
            ", ".join(p["vms"]) or "-",
        )
    if not ps:
        click.echo("no resource pools configured")
        return
    _print(table)


@click.group()
def config() -> None:
    """Advanced settings, ESXi style (/Mem/CtlMaxPercent, /Mem/IdleTax, /VBalloon/...)."""


@config.command("list")
@api_option
def config_list(api_socket: str) -> None:
    """Every setting and its value."""
    with _client(api_socket) as c:
        settings = _call(c.settings)
    width = max(len(p) for p in settings) if settings else 0
    for path, value in settings.items():
        click.echo(f"{path:<{width}}  {value}")


@config.command("get", short_help="Print one setting.")
@api_option
@click.argument("path", callback=_setting_path)
def config_get(api_socket: str, path: str) -> None:
    """Print one setting (e.g. /Mem/CtlMaxPercent or Mem.CtlMaxPercent)."""
    with _client(api_socket) as c:
        click.echo(_call(lambda: c.setting(path)))


@config.command("set")
@api_option
@click.argument("path", callback=_setting_path)
@click.argument("value", type=int)
def config_set(api_socket: str, path: str, value: int) -> None:
    """Change one setting; the policy applies it at once."""
    with _client(api_socket) as c:
        new = _call(lambda: c.set_setting(path, value))
    click.echo(f"/{path.strip('/').replace('.', '/')} = {new}")


_AUDIT_FIXED = {"type", "time", "monotonic", "name", "action", "peer"}


def format_event(event: dict[str, Any]) -> str:
    t = time.strftime("%H:%M:%S", time.localtime(event.get("time", time.time())))
    frac = f"{event.get('time', 0.0) % 1:.3f}"[1:]
    kind = event.get("type")
    name = event.get("name", "")
    if kind == "guest":
        what = event.get("kind")
        if what == "target":
            detail = f"MCTLTGT {mb(event['target_pages'] * PAGE_SIZE)} MB ({event.get('reason')})"
        elif what == "size":
            detail = f"MCTLSZ {mb(event['size_pages'] * PAGE_SIZE)} MB"
        else:
            detail = str(what)
    elif kind == "control":
        detail = (
            f"control -> {event['control']}" if "control" in event else str(event.get("action"))
        )
    elif kind == "host":
        if "state" in event:
            detail = f"host state {event.get('previous') or '-'} -> {event['state']} (free {mb(event.get('free_bytes'))} MB)"
        else:
            detail = f"host free set to {mb(event.get('free_bytes'))} MB"
    elif kind == "setting":
        detail = f"{event['path']} = {event['value']}"
    elif kind == "hello":
        detail = f"connected; VMs: {', '.join(event.get('vms', []))}"
    elif kind == "pressure":
        detail = "pressure: " + "; ".join(
            f"{n.get('kind')} {n.get('detail', '')}".strip() for n in event.get("notices", [])
        )
    elif kind == "backstop":
        detail = f"backstop {event.get('action')}: {event.get('detail')}"
    elif kind == "guest-backoff":
        detail = f"guest needs memory ({'; '.join(event.get('why', []))}): balloon held"
    elif kind == "futile":
        detail = (
            f"inflating returns nothing: balloon +{mb(event.get('balloon_grew_bytes'))} MB,"
            f" host regained {mb(event.get('host_regained_bytes'))} MB: balloon held"
        )
    elif kind == "audit":
        peer = event.get("peer") or {}
        what = {k: v for k, v in event.items() if k not in _AUDIT_FIXED}
        detail = (
            f"audit {event.get('action')} {json.dumps(what, separators=(',', ':'))} by uid "
            f"{peer.get('uid')} pid {peer.get('pid')} ({peer.get('cmdline')})"
        )
    else:
        detail = json.dumps(event)
    return f"{t}{frac} {name:<8} {detail}"


@click.command()
@api_option
@click.option("--vm", default=None, callback=_vm_name, help="Only this VM's events.")
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object per line (as the API sends)."
)
@click.option(
    "--count", "-n", type=click.IntRange(min=1), default=None, help="Stop after N events."
)
def events(api_socket: str, vm: str | None, as_json: bool, count: int | None) -> None:
    """Follow target, size, state, host and setting changes as they happen (no polling)."""
    seen = 0
    with _client(api_socket) as c:
        stream: Iterator[dict[str, Any]] = c.events(vm)
        try:
            for event in _call(lambda: _first(stream)):
                if event.get("type") == "heartbeat":
                    continue
                click.echo(json.dumps(event) if as_json else format_event(event))
                if event.get("type") != "hello":
                    seen += 1
                if count is not None and seen >= count:
                    break
        except KeyboardInterrupt:
            pass
        except ApiError as e:  # the server went away mid-stream
            raise _fail(e) from None


def _first(stream: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Pull the first event eagerly so that connection errors surface inside _call."""
    first = next(stream)

    def chain() -> Iterator[dict[str, Any]]:
        yield first
        yield from stream

    return chain()


def _output_file(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--output: a file in a directory that exists (checked before asking the API)."""
    parent = os.path.dirname(value) or "."
    if not os.path.isdir(parent):
        raise click.BadParameter(f"{parent} is not a directory: cannot write {value}")
    return value


def _write_png(write: Callable[[], int], output: str) -> int:
    try:
        return write()
    except OSError as e:
        raise click.ClickException(f"cannot write {output}: {e.strerror or e}") from None
    except ValueError as e:
        raise click.ClickException(str(e)) from None


@click.command()
@functools.partial(api_option, required=False)  # not for --recording
@click.argument("vm", callback=_vm_name, required=False)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    callback=_output_file,
    required=True,
    help="PNG file to write (its directory must exist).",
)
@click.option("--last", type=click.IntRange(min=1), default=None, help="Only the last N points.")
@click.option(
    "--recording",
    type=click.Path(dir_okay=False),
    default=None,
    help="Plot a recorded overcommit scenario (overcommit.json from scripts/overcommit)"
    " instead of a VM of the running vdev: cgroup usage vs limit, each VM's resident memory"
    " and balloon, every policy decision.",
)
def plot(
    api_socket: str | None, vm: str | None, output: str, last: int | None, recording: str | None
) -> None:
    """Plot VM's balloon target, size and MCTLMAX and the host's free memory over time (or,
    with --recording, a recorded overcommit scenario)."""
    if recording is not None:
        if vm is not None or last is not None:
            raise click.UsageError("--recording plots the file: give no VM and no --last")
        from vdev.cli.plot import load_recording, plot_recording

        try:
            runs = load_recording(recording)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        n = _write_png(lambda: plot_recording(runs, output), output)
        click.echo(f"{output}: {n} run(s) from {recording}")
        return
    if vm is None:
        raise click.UsageError("give the VM to plot (or --recording FILE)")
    if api_socket is None:
        raise click.UsageError("Missing option '--api-socket' (or $VDEV_API_SOCKET).")
    from vdev.cli.plot import plot_history

    with _client(api_socket) as c:
        history = _call(lambda: c.history(vm, last))
    n = _write_png(lambda: plot_history(history, output), output)
    click.echo(f"{output}: {n} points for {vm}")


OPERATOR_COMMANDS: tuple[click.Command, ...] = (
    stat,
    top,
    set_target,
    reset,
    host,
    pools,
    config,
    events,
    plot,
)


def register_operator_commands(group: click.Group) -> None:
    for command in OPERATOR_COMMANDS:
        group.add_command(command)
