"""The memory cgroup(s) where the VMs live: finding them, reading them, on cgroup v1 and v2.

``vdev serve --watch-cgroup PATH`` (repeatable; config ``[serve] watch_cgroup``) points the
policy at the cgroups that hold the VMs' QEMUs (``machine.slice`` under libvirt + systemd, or
any cgroup). ``PATH`` is a directory, or a path relative to the memory controller's mount
(``machine.slice``, ``machine/qemu-1-vm0.libvirt-qemu``). Each is resolved once to a
:class:`CgroupSource`: its version, found from the files present, not assumed:

* cgroup v2: ``memory.max``, ``memory.high``, ``memory.current``, ``memory.pressure`` (PSI),
  ``memory.events`` (``high``/``max``/``oom``/``oom_kill`` counters), ``memory.stat``;
* cgroup v1: ``memory.limit_in_bytes``, ``memory.usage_in_bytes``, ``memory.stat``,
  ``memory.oom_control`` (``oom_kill_disable``/``under_oom``/``oom_kill``), ``memory.failcnt``;
  notifications go through ``cgroup.event_control`` (:mod:`vdev.policy.watch`).

The parsers take text; :func:`read_cgroup` is the only function here that reads a cgroup.
Malformed text raises :class:`protocol.errors.HostResourceError`; a watch path that is not a
memory cgroup raises :class:`protocol.errors.ConfigError` naming the path and why.

Sources: Documentation/admin-guide/cgroup-v2.rst, Documentation/admin-guide/cgroup-v1/memory.rst.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from protocol.errors import ConfigError, HostResourceError

#: cgroup v1 prints "no limit" as the largest page-aligned signed 64-bit value.
V1_UNLIMITED = (1 << 63) - 4096
#: memory.stat keys kept in a reading (both versions; v1 spells some differently).
STAT_KEYS = ("anon", "file", "shmem", "rss", "cache", "mapped_file", "file_mapped")


@dataclass(frozen=True)
class CgroupSource:
    """A watched memory cgroup: its directory, version, and how it was found."""

    path: str
    version: int  # 1 or 2
    asked: str  # what the operator wrote

    @property
    def label(self) -> str:
        return f"cgroup v{self.version} {self.path}"


@dataclass(frozen=True)
class CgroupReading:
    """One reading of a memory cgroup (bytes). ``limit_bytes`` None: no limit."""

    source: CgroupSource
    usage_bytes: int
    limit_bytes: int | None
    high_bytes: int | None = None  # v2 memory.high (None: max or v1)
    #: v2 memory.events; v1: oom_kill, under_oom, oom_kill_disable from memory.oom_control
    #: and ``max`` from memory.failcnt (times the limit was hit)
    events: dict[str, int] = field(default_factory=dict)
    stat: dict[str, int] = field(default_factory=dict)
    psi_some_avg10: float | None = None
    psi_full_avg10: float | None = None

    @property
    def oom_kills(self) -> int:
        return self.events.get("oom_kill", 0)

    @property
    def headroom_bytes(self) -> int | None:
        if self.limit_bytes is None:
            return None
        return max(0, self.limit_bytes - self.usage_bytes)


# --------------------------------------------------------------------------------------------
# parsers


def non_negative_int(word: str, what: str) -> int:
    """A kernel counter or size word: a non-negative integer, else HostResourceError."""
    try:
        value = int(word)
    except ValueError:
        raise HostResourceError(f"{what}: not a number: {word!r}") from None
    if value < 0:
        raise HostResourceError(f"{what}: negative: {value}")
    return value


def parse_single(text: str, what: str) -> int | None:
    """A one-value file: bytes, or None for ``max`` (v2) / the v1 "unlimited" value."""
    words = text.split()
    if len(words) != 1:
        raise HostResourceError(f"{what}: expected one value, got {text!r}")
    if words[0] == "max":
        return None
    value = non_negative_int(words[0], what)
    return None if value >= V1_UNLIMITED else value


def parse_flat_keyed(text: str, what: str) -> dict[str, int]:
    """``key value`` lines (memory.events, memory.stat, memory.oom_control)."""
    out: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        words = line.split()
        if len(words) != 2:
            raise HostResourceError(f"{what} line {number}: expected 'key value', got {line!r}")
        out[words[0]] = non_negative_int(words[1], f"{what} {words[0]}")
    return out


# --------------------------------------------------------------------------------------------
# finding cgroups


@dataclass(frozen=True)
class Mounts:
    """Where the cgroup hierarchies are mounted: the v2 mount (if any) and the v1 memory one."""

    v2: str | None
    v1_memory: str | None


def parse_mountinfo(text: str) -> Mounts:
    """From /proc/self/mountinfo: the first cgroup2 mount and the cgroup v1 memory mount."""
    v2 = v1 = None
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, after = pre.split(), post.split()
        if len(fields) < 5 or len(after) < 1:
            continue
        mount_point = fields[4].replace("\\040", " ")
        fstype = after[0]
        options = after[2].split(",") if len(after) >= 3 else []
        if fstype == "cgroup2" and v2 is None:
            v2 = mount_point
        elif fstype == "cgroup" and "memory" in options and v1 is None:
            v1 = mount_point
    return Mounts(v2=v2, v1_memory=v1)


def read_mounts(proc: str = "/proc") -> Mounts:
    try:
        with open(os.path.join(proc, "self", "mountinfo"), encoding="utf-8") as f:
            return parse_mountinfo(f.read())
    except OSError:
        return Mounts(v2=None, v1_memory=None)


def cgroup_version(path: str) -> int | None:
    """2 if ``path`` has v2 memory files, 1 if v1 memory files, None if neither."""
    if os.path.isfile(os.path.join(path, "memory.current")) and os.path.isfile(
        os.path.join(path, "memory.max")
    ):
        return 2
    if os.path.isfile(os.path.join(path, "memory.usage_in_bytes")) and os.path.isfile(
        os.path.join(path, "memory.limit_in_bytes")
    ):
        return 1
    return None


def resolve_cgroup(asked: str, mounts: Mounts | None = None) -> CgroupSource:
    """A ``--watch-cgroup`` value to a source. Absolute paths are taken as they are; others
    are looked up under the cgroup v2 mount (if it has a memory controller there) and then
    the v1 memory mount. ConfigError says what was tried."""
    if not asked or "\0" in asked:
        raise ConfigError(f"--watch-cgroup: not a path: {asked!r}")
    candidates: list[str] = []
    if os.path.isabs(asked):
        candidates.append(asked)
    else:
        m = mounts if mounts is not None else read_mounts()
        rel = asked.strip("/")
        for root in (m.v2, m.v1_memory):
            if root is not None:
                candidates.append(os.path.join(root, rel))
    tried: list[str] = []
    for path in candidates:
        if not os.path.isdir(path):
            tried.append(f"{path}: no such directory")
            continue
        version = cgroup_version(path)
        if version is None:
            tried.append(
                f"{path}: no memory controller files (memory.current/memory.max or "
                "memory.usage_in_bytes/memory.limit_in_bytes)"
            )
            continue
        return CgroupSource(path=os.path.normpath(path), version=version, asked=asked)
    if not tried:
        tried.append("no cgroup v2 or v1 memory controller is mounted")
    raise ConfigError(f"--watch-cgroup {asked}: not a memory cgroup ({'; '.join(tried)})")


def own_memory_cgroup(proc: str = "/proc", mounts: Mounts | None = None) -> CgroupSource | None:
    """This process's own memory cgroup (v2 if its memory controller is there, else v1), if
    it is not a root cgroup and has a limit file; None otherwise."""
    try:
        with open(os.path.join(proc, "self", "cgroup"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    m = mounts if mounts is not None else read_mounts(proc)
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hid == "0" and controllers == "" and m.v2 is not None:
            root = m.v2
        elif "memory" in controllers.split(",") and m.v1_memory is not None:
            root = m.v1_memory
        else:
            continue
        rel = rel.strip()
        if rel in ("", "/"):
            continue
        path = os.path.join(root, rel.lstrip("/"))
        version = cgroup_version(path)
        if version is not None:
            return CgroupSource(path=path, version=version, asked="own cgroup")
    return None


# --------------------------------------------------------------------------------------------
# reading


def read_text(path: str) -> str | None:
    """A kernel file's text; None when it does not exist, HostResourceError otherwise."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise HostResourceError(f"cannot read {path}: {e.strerror}") from e


def need_text(source: CgroupSource, name: str) -> str:
    """A file of the cgroup ``source`` that must be there (HostResourceError if not)."""
    text = read_text(os.path.join(source.path, name))
    if text is None:
        raise HostResourceError(f"{source.label}: {name} is gone (cgroup removed?)")
    return text


def read_cgroup(source: CgroupSource) -> CgroupReading:
    """Read the cgroup's usage, limit, events and stat (raises HostResourceError)."""
    from vdev.policy.host import parse_psi  # host imports this module

    join = os.path.join
    stat_text = read_text(join(source.path, "memory.stat"))
    all_stat = parse_flat_keyed(stat_text, f"{source.path}/memory.stat") if stat_text else {}
    stat = {k: all_stat[k] for k in STAT_KEYS if k in all_stat}
    if source.version == 2:
        usage = parse_single(need_text(source, "memory.current"), "memory.current")
        limit = parse_single(need_text(source, "memory.max"), "memory.max")
        high_text = read_text(join(source.path, "memory.high"))
        high = parse_single(high_text, "memory.high") if high_text else None
        ev_text = read_text(join(source.path, "memory.events"))
        events = parse_flat_keyed(ev_text, "memory.events") if ev_text else {}
        psi_text = read_text(join(source.path, "memory.pressure"))
        psi = parse_psi(psi_text) if psi_text else None
        return CgroupReading(
            source=source,
            usage_bytes=usage or 0,
            limit_bytes=limit,
            high_bytes=high,
            events=events,
            stat=stat,
            psi_some_avg10=psi.some.avg10 if psi else None,
            psi_full_avg10=psi.full.avg10 if psi and psi.full else None,
        )
    usage = parse_single(need_text(source, "memory.usage_in_bytes"), "memory.usage_in_bytes")
    limit = parse_single(need_text(source, "memory.limit_in_bytes"), "memory.limit_in_bytes")
    events = {}
    oom_text = read_text(join(source.path, "memory.oom_control"))
    if oom_text:
        events.update(parse_flat_keyed(oom_text, "memory.oom_control"))
    fail_text = read_text(join(source.path, "memory.failcnt"))
    if fail_text:
        events["max"] = parse_single(fail_text, "memory.failcnt") or 0
    return CgroupReading(
        source=source, usage_bytes=usage or 0, limit_bytes=limit, events=events, stat=stat
    )
