"""The `vdev serve` configuration file (TOML): control-plane options, advanced settings, pools
and per-VM memory configuration. Command-line flags override the file.

```toml
[serve]
api_socket = "/run/vballoon/vdev.api"   # default: <first vhost-user socket>.api
api_socket_mode = "0600"                # octal string or integer; never world-writable
socket_group = "qemu"                   # vhost-user sockets 0660 with this group (default 0600)
api_read_group = "monitoring"           # members may GET (stat, events, metrics); name or gid
api_max_body_bytes = 4096               # API bounds (vdev serve --api-*; docs/SECURITY.md):
api_max_connections = 64                # also api_max_header_bytes, api_header_timeout,
                                        # api_body_timeout, api_idle_timeout,
                                        # api_write_timeout, api_max_subscribers
policy_period = 1.0                     # seconds between policy steps (>= 0.001)
host_memory = "16G"                     # simulated host of this size; omit for the real host
history = 3600                          # points kept per VM for `vdev plot` (2..1000000)
rate_window = 10.0                      # seconds over which rates are computed (0..86400]
watch_cgroup = ["machine.slice"]        # memory cgroup(s) holding the VMs (v1 or v2; a path, or
                                        # relative to the memory controller's mount)
policy = "esxi"                         # esxi (ours) | mom (oVirt MoM's balloon rules)
backstop = false                        # v1: stop the allocating VM's QEMU near the limit; v2: memory.high
backstop_deadline = 30.0                # v1: longest a VM stays stopped before it is continued
stop_file = "/run/vballoon/vm0.stopped" # v1: where the stopped QEMUs are recorded (default:
                                        # $RUNTIME_DIRECTORY/<socket name>.stopped, else
                                        # <first vhost-user socket>.stopped)

[settings]                              # ESXi-style advanced settings (GET /settings)
"/Mem/CtlMaxPercent" = 65
[settings.VBalloon]                     # nested tables work too: /VBalloon/InflateRatePagesPerSec
InflateRatePagesPerSec = 16384

[pools.gold]                            # a resource pool (vSphere resource management)
parent = "prod"                         # optional
reservation = "1G"
limit = "8G"
shares = "high"                         # low | normal | high | an integer
expandable_reservation = true

[vms.vm0]                               # keyed by guest name (vm0.. or --name; must exist)
memory = "4G"                           # configured size when no guest is connected yet
reservation = "512M"
limit = "3G"                            # a limit balloons even on an idle host
shares = "normal"
maxmemctl = "1G"                        # sched.mem.maxmemctl
pool = "gold"
active_fraction = 0.5                   # fixed active-memory estimate (else from guest stats)
```

Sizes are bytes (integers) or strings with a binary suffix: ``512M``, ``4G``, ``4GiB``, ``1.5T``
(K/M/G/T/P are powers of 1024; a trailing ``B`` or ``iB`` is accepted): the one grammar of
:func:`protocol.units.parse_size`, shared with every command line and the API.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError
from protocol.units import PAGE_SIZE, format_size, parse_size
from vdev.api.limits import LIMIT_RANGES, ApiLimits, resolve_group
from vdev.policy.model import PolicyEngine, PolicySettings, PoolSpec, Shares, SharesLevel, VmSpec
from vdev.registry import check_guest_name

__all__ = [
    "ControlConfig",
    "VmConfig",
    "format_size",
    "load_config",
    "parse_config",
    "parse_shares",
    "parse_size",
]

#: ``--policy`` values
POLICIES = ("esxi", "mom")


def parse_shares(value: object, what: str = "shares") -> Shares:
    if isinstance(value, str):
        try:
            return SharesLevel[value.upper()]
        except KeyError:
            pass
        raise ConfigError(f"{what}: expected low, normal, high or an integer, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ConfigError(f"{what}: expected low, normal, high or an integer >= 0, got {value!r}")


def _pages(value: object, what: str) -> int:
    return parse_size(value, what) // PAGE_SIZE


def _octal(value: object, what: str) -> int:
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise ConfigError(
                f'{what}: expected an octal mode like "0600", got {value!r}'
            ) from None
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise ConfigError(f'{what}: expected an octal mode like "0600", got {value!r}')
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{what}: mode out of range: {oct(mode)}")
    if mode & 0o002:
        raise ConfigError(
            f"{what}: {mode:04o} is world-writable: every local user could change every "
            "guest's balloon (use 0600, or 0660 with a group)"
        )
    if mode & 0o600 != 0o600:
        raise ConfigError(f"{what}: {mode:04o} does not let the owner read and write it")
    return mode


@dataclass(frozen=True)
class VmConfig:
    """Per-VM configuration; sizes in pages. ``memory_pages`` None: use the guest's RAM."""

    memory_pages: int | None = None
    reservation_pages: int = 0
    limit_pages: int | None = None
    shares: Shares = SharesLevel.NORMAL
    max_memctl_pages: int | None = None
    pool: str | None = None
    active_fraction: float | None = None

    def spec(self, ram_pages: int) -> VmSpec | None:
        """The policy's VmSpec, sized by the guest's RAM if known, else by ``memory``.

        None when neither is known (a guest that never connected and has no ``memory``).
        """
        size = ram_pages if ram_pages > 0 else (self.memory_pages or 0)
        if size <= 0:
            return None
        return VmSpec(
            size_pages=size,
            reservation_pages=min(self.reservation_pages, size),
            limit_pages=self.limit_pages,
            shares=self.shares,
            max_memctl_pages=self.max_memctl_pages,
            pool=self.pool,
        )


@dataclass
class ControlConfig:
    """Everything the control plane needs, from the file and then the flags."""

    api_socket: str | None = None
    api_socket_mode: int = 0o600
    #: Group of the vhost-user sockets (mode 0660 then; None: 0600, owner only).
    socket_group: str | None = None
    #: gid whose members may read the API (None: only the owner and root may connect).
    api_read_group: int | None = None
    api_limits: ApiLimits = field(default_factory=ApiLimits)
    policy_period: float = 1.0
    host_memory: int | None = None  # bytes; None: sample the real host
    history: int = 3600
    rate_window: float = 10.0
    #: ``--watch-cgroup``: the memory cgroups where the VMs live (empty: the host, /proc)
    watch_cgroups: list[str] = field(default_factory=list)
    #: ``--backstop``: throttle (v2) the watched cgroups at their limit, or stop (v1) the
    #: allocating VM's QEMU before it, instead of letting the kernel kill a VM
    #: (:mod:`vdev.policy.backstop`)
    backstop: bool = False
    backstop_deadline: float = 30.0
    #: ``--stop-file``: where the QEMUs the backstop holds stopped are recorded, and read
    #: back at start-up (:mod:`vdev.policy.guard`; the CLI fills in the default)
    stop_file: str | None = None
    #: ``--policy``: ``esxi`` (the ESXi model, vdev/policy/model.py) or ``mom`` (oVirt MoM's
    #: balloon rules, vdev/policy/mom.py; it evaluates every policy period)
    policy: str = "esxi"
    settings: PolicySettings = field(default_factory=PolicySettings)
    pools: list[PoolSpec] = field(default_factory=list)
    vms: dict[str, VmConfig] = field(default_factory=dict)

    def vm(self, name: str) -> VmConfig:
        return self.vms.get(name, VmConfig())

    def check_vm_names(self, known: list[str]) -> None:
        """ConfigError for a ``[vms.NAME]`` table naming no guest of this ``vdev serve``."""
        unknown = sorted(set(self.vms) - set(known))
        if unknown:
            raise ConfigError(
                f"[vms.{unknown[0]}]: no guest named {unknown[0]!r}; "
                f"the guests are {', '.join(known) or 'none'} (--name sets them)"
            )

    def override(
        self,
        *,
        api_socket: str | None = None,
        host_memory: int | None = None,
        policy_period: float | None = None,
        watch_cgroups: list[str] | None = None,
        backstop: bool | None = None,
        stop_file: str | None = None,
        policy: str | None = None,
        api_read_group: str | None = None,
        api_limits: Mapping[str, float] | None = None,
    ) -> ControlConfig:
        """Flags win over the file (None: not given on the command line)."""
        if policy is not None:
            self.policy = policy
        if backstop is not None:
            self.backstop = backstop
        if stop_file is not None:
            self.stop_file = stop_file
        if watch_cgroups:
            self.watch_cgroups = list(watch_cgroups)
        if api_read_group is not None:
            self.api_read_group = resolve_group(api_read_group)
        if api_limits:
            self.api_limits = ApiLimits.from_mapping(
                {**dataclasses.asdict(self.api_limits), **api_limits}
            )
        if api_socket is not None:
            self.api_socket = api_socket
        if host_memory is not None:
            self.host_memory = host_memory
        if policy_period is not None:
            self.policy_period = policy_period
        self.check()
        return self

    def check(self) -> None:
        if not (math.isfinite(self.policy_period) and self.policy_period >= MIN_POLICY_PERIOD):
            raise ConfigError(
                f"policy_period must be >= {MIN_POLICY_PERIOD} seconds, got {self.policy_period}"
            )
        if not (math.isfinite(self.rate_window) and 0 < self.rate_window <= MAX_RATE_WINDOW):
            raise ConfigError(
                f"rate_window must be > 0 and <= {MAX_RATE_WINDOW} seconds, got {self.rate_window}"
            )
        if not 2 <= self.history <= MAX_HISTORY:
            raise ConfigError(
                f"history must keep 2 to {MAX_HISTORY} points per VM, got {self.history}"
            )
        if not (math.isfinite(self.backstop_deadline) and self.backstop_deadline > 0):
            raise ConfigError(
                f"backstop_deadline must be > 0 seconds, got {self.backstop_deadline}"
            )
        if self.policy not in POLICIES:
            raise ConfigError(f"policy: expected one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.backstop and not self.watch_cgroups:
            raise ConfigError("the backstop acts on watched cgroups: give --watch-cgroup too")
        if self.host_memory is not None and self.host_memory <= 0:
            raise ConfigError(f"host memory must be > 0, got {self.host_memory}")


#: The CLI's ``--policy-period`` floor: a shorter period only burns a core.
MIN_POLICY_PERIOD = 0.001
#: History points kept per VM at most (11 days at one a second; each point is ~200 bytes).
MAX_HISTORY = 1_000_000
MAX_RATE_WINDOW = 86400.0


def _flatten_settings(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        path = key if key.startswith("/") else f"{prefix}/{key}"
        if isinstance(value, Mapping):
            out.update(_flatten_settings(value, path))
        else:
            out[path] = value
    return out


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(allowed))}"
        )


def _table(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table, got {value!r}")
    return value


_SERVE_KEYS = {
    "api_read_group",
    *(f"api_{name}" for name in LIMIT_RANGES),
    "api_socket",
    "api_socket_mode",
    "socket_group",
    "policy_period",
    "host_memory",
    "history",
    "rate_window",
    "watch_cgroup",
    "backstop",
    "backstop_deadline",
    "stop_file",
    "policy",
}
_POOL_KEYS = {"parent", "reservation", "limit", "shares", "expandable_reservation"}
_VM_KEYS = {"memory", "reservation", "limit", "shares", "maxmemctl", "pool", "active_fraction"}


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what}: expected a number, got {value!r}")
    return float(value)


def parse_config(doc: Mapping[str, Any], source: str = "config") -> ControlConfig:
    """A ControlConfig from a parsed TOML document; ConfigError names the bad key."""
    _check_keys(doc, {"serve", "settings", "pools", "vms"}, source)
    cfg = ControlConfig()
    serve = _table(doc.get("serve", {}), f"{source} [serve]")
    _check_keys(serve, _SERVE_KEYS, f"{source} [serve]")
    if "api_socket" in serve:
        if not isinstance(serve["api_socket"], str) or not serve["api_socket"]:
            raise ConfigError(f"{source} [serve] api_socket: expected a path")
        cfg.api_socket = serve["api_socket"]
    if "api_socket_mode" in serve:
        cfg.api_socket_mode = _octal(serve["api_socket_mode"], f"{source} [serve] api_socket_mode")
    if "socket_group" in serve:
        group = serve["socket_group"]
        if not isinstance(group, str | int) or isinstance(group, bool) or group == "":
            raise ConfigError(f"{source} [serve] socket_group: expected a group name or id")
        cfg.socket_group = str(group)
    if "api_read_group" in serve:
        try:
            cfg.api_read_group = resolve_group(serve["api_read_group"])
        except ConfigError as e:
            raise ConfigError(f"{source} [serve] {e}") from None
    limits = {k[4:]: v for k, v in serve.items() if k.startswith("api_") and k[4:] in LIMIT_RANGES}
    if limits:
        cfg.api_limits = ApiLimits.from_mapping(limits, f"{source} [serve] ")
    if "policy_period" in serve:
        cfg.policy_period = _number(serve["policy_period"], f"{source} [serve] policy_period")
    if "host_memory" in serve:
        cfg.host_memory = parse_size(serve["host_memory"], f"{source} [serve] host_memory")
    if "history" in serve:
        h = serve["history"]
        if isinstance(h, bool) or not isinstance(h, int):
            raise ConfigError(f"{source} [serve] history: expected an integer, got {h!r}")
        cfg.history = h
    if "rate_window" in serve:
        cfg.rate_window = _number(serve["rate_window"], f"{source} [serve] rate_window")
    if "watch_cgroup" in serve:
        watch = serve["watch_cgroup"]
        watch = [watch] if isinstance(watch, str) else watch
        if not isinstance(watch, list) or not all(isinstance(w, str) and w for w in watch):
            raise ConfigError(
                f"{source} [serve] watch_cgroup: expected a cgroup path or a list of them,"
                f" got {serve['watch_cgroup']!r}"
            )
        cfg.watch_cgroups = list(watch)
    if "policy" in serve:
        if not isinstance(serve["policy"], str):
            raise ConfigError(f"{source} [serve] policy: expected one of {', '.join(POLICIES)}")
        cfg.policy = serve["policy"]
    if "backstop" in serve:
        if not isinstance(serve["backstop"], bool):
            raise ConfigError(f"{source} [serve] backstop: expected true or false")
        cfg.backstop = serve["backstop"]
    if "backstop_deadline" in serve:
        cfg.backstop_deadline = _number(
            serve["backstop_deadline"], f"{source} [serve] backstop_deadline"
        )
    if "stop_file" in serve:
        if not isinstance(serve["stop_file"], str) or not serve["stop_file"]:
            raise ConfigError(f"{source} [serve] stop_file: expected a path")
        cfg.stop_file = serve["stop_file"]

    settings = PolicySettings()
    for path, value in _flatten_settings(_table(doc.get("settings", {}), "[settings]")).items():
        settings.set(path, value)  # ConfigError names the path
    cfg.settings = settings

    pools = _table(doc.get("pools", {}), f"{source} [pools]")
    for name, raw in pools.items():
        where = f"{source} [pools.{name}]"
        try:
            check_guest_name(name, "pool")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        t = _table(raw, where)
        _check_keys(t, _POOL_KEYS, where)
        parent = t.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise ConfigError(f"{where} parent: expected a pool name")
        expandable = t.get("expandable_reservation", True)
        if not isinstance(expandable, bool):
            raise ConfigError(f"{where} expandable_reservation: expected true or false")
        cfg.pools.append(
            PoolSpec(
                name=name,
                parent=parent,
                reservation_pages=_pages(t.get("reservation", 0), f"{where} reservation"),
                limit_pages=None if "limit" not in t else _pages(t["limit"], f"{where} limit"),
                shares=parse_shares(t.get("shares", "normal"), f"{where} shares"),
                expandable_reservation=expandable,
            )
        )

    vms = _table(doc.get("vms", {}), f"{source} [vms]")
    for name, raw in vms.items():
        where = f"{source} [vms.{name}]"
        try:
            check_guest_name(name)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        t = _table(raw, where)
        _check_keys(t, _VM_KEYS, where)
        pool = t.get("pool")
        if pool is not None and not isinstance(pool, str):
            raise ConfigError(f"{where} pool: expected a pool name")
        active = t.get("active_fraction")
        if active is not None:
            active = _number(active, f"{where} active_fraction")
            if not 0.0 <= active <= 1.0:
                raise ConfigError(f"{where} active_fraction: must be in 0..1, got {active}")
        vm = VmConfig(
            memory_pages=None if "memory" not in t else _pages(t["memory"], f"{where} memory"),
            reservation_pages=_pages(t.get("reservation", 0), f"{where} reservation"),
            limit_pages=None if "limit" not in t else _pages(t["limit"], f"{where} limit"),
            shares=parse_shares(t.get("shares", "normal"), f"{where} shares"),
            max_memctl_pages=None
            if t.get("maxmemctl", -1) == -1
            else _pages(t["maxmemctl"], f"{where} maxmemctl"),
            pool=pool,
            active_fraction=active,
        )
        if vm.limit_pages is not None and vm.reservation_pages > vm.limit_pages:
            raise ConfigError(
                f"{where}: reservation ({format_size(vm.reservation_pages * PAGE_SIZE)}) is "
                f"above limit ({format_size(vm.limit_pages * PAGE_SIZE)})"
            )
        if vm.memory_pages is not None:  # reservation and limit against the configured size
            VmSpec(
                size_pages=max(1, vm.memory_pages),
                reservation_pages=vm.reservation_pages,
                limit_pages=vm.limit_pages,
                max_memctl_pages=vm.max_memctl_pages,
            )
        cfg.vms[name] = vm
    known_pools = {p.name for p in cfg.pools}
    for name, vm in cfg.vms.items():
        if vm.pool is not None and vm.pool not in known_pools:
            raise ConfigError(f"{source} [vms.{name}] pool: no pool named {vm.pool!r}")
    PolicyEngine(cfg.settings, cfg.pools)  # validates parents, cycles and reservations
    cfg.check()
    return cfg


def load_config(path: str | Path) -> ControlConfig:
    p = Path(path)
    try:
        with p.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}): a TOML file is UTF-8") from e
    except RecursionError as e:
        raise ConfigError(f"{p}: nested too deeply") from e
    try:
        return parse_config(doc, str(p))
    except ConfigError as e:  # the checks across keys (pools, settings) name no file
        if str(e).startswith(str(p)):
            raise
        raise ConfigError(f"{p}: {e}") from None
