"""The backstop: when ballooning cannot keep up, slow the allocating VM instead of killing one.

``vdev serve --watch-cgroup PATH --backstop`` ([serve] backstop = true) uses, on each watched
cgroup:

* cgroup v1: pause the allocating VM *before* the limit. ``memory.oom_control`` is left
  alone: with ``oom_kill_disable`` = 1 the kernel puts faulting tasks to sleep at the limit,
  but syscall-time charges then fail with ENOMEM, and a QEMU at a paused limit broke (its
  vhost-user connection dropped, or it exited). Instead, when the usage reaches
  ``limit - pause margin`` (a ``memory.usage_in_bytes`` threshold eventfd wakes vdev within
  milliseconds, :mod:`vdev.policy.watch`), the VMs in that cgroup whose RAM file grew over
  the last :data:`GROWTH_WINDOW` (the largest grower at least) get SIGSTOP -- their QEMU's PID
  from SO_PEERCRED on the vhost-user socket -- while the policy, now in its LOW state,
  inflates the other guests without rate limit. A stopped QEMU makes no syscalls, so it
  cannot meet an ENOMEM. It is continued (SIGCONT) when the usage is back below
  ``limit - resume margin``, or after ``deadline`` seconds regardless (reported; it may be
  paused again after :data:`REPAUSE_GRACE` if it is still growing at the threshold), when
  it disconnects, and when vdev exits. A ``kill -9`` of vdev cannot strand it:
  :mod:`vdev.policy.guard` continues every recorded PID when vdev's pipe closes, and a kill
  of vdev and its guard together leaves it stopped only until vdev starts again (the stop
  file, :func:`vdev.policy.guard.resume_left_stopped`).
  vdev never waits on a stopped QEMU: replies and config-change notices go out through
  that connection's own tasks, without NEED_REPLY. Without the pause (a VM not seen
  growing, a burst faster than the warning), the kernel's OOM killer stays in place.
* cgroup v2: ``memory.high`` below ``memory.max`` (``max - margin``): above it the kernel
  throttles the cgroup and forces it into reclaim, and never OOM-kills.

What was set is restored on exit. Every change is reported (:attr:`Backstop.actions`
entries go to the events stream and ``vdev host``).

The v1 decisions are sans-I/O (:class:`PauseDecider`); :class:`Backstop` does the I/O.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from protocol.errors import HostResourceError
from vdev.policy.cgroup import CgroupReading, CgroupSource, need_text, parse_single
from vdev.policy.guard import StopFile, StopGuard

log = logging.getLogger(__name__)

#: v2: memory.high = memory.max minus this share of it (at least MIN_MARGIN bytes).
V2_MARGIN_FRACTION = 0.05
MIN_MARGIN = 16 << 20
#: v1: pause at limit - max(PAUSE_MIN, PAUSE_FRACTION * limit); resume below the pause level
#: minus max(RESUME_GAP_MIN, RESUME_GAP_FRACTION * limit). At ~300 MiB/s (a TCG guest writing
#: tmpfs) 48 MiB is ~150 ms of warning; the threshold eventfd fires within milliseconds.
#: The margins follow fill rates, not the limit's size: the fractions are small.
PAUSE_MIN = 48 << 20
PAUSE_FRACTION = 0.02
RESUME_GAP_MIN = 32 << 20
RESUME_GAP_FRACTION = 0.02
#: v1: the longest a VM stays paused before it is continued anyway.
DEFAULT_DEADLINE = 30.0
#: while VMs are stopped, the usage must fall by PROGRESS_BYTES within STALL seconds (the
#: other guests are giving memory back); if not, nothing more can be freed now and holding
#: the VM only delays it: it is continued ("stalled").
STALL = 2.0
PROGRESS_BYTES = 4 << 20
#: after a deadline or stall resume, the VM runs at least this long before it may be paused again
REPAUSE_GRACE = 1.0
#: RAM file growth is measured over this window; a VM that grew at least BUSY_BYTES in it
#: is allocating.
GROWTH_WINDOW = 2.0
BUSY_BYTES = 8 << 20


def margins(limit: int) -> tuple[int, int]:
    """(pause at, resume below) for a v1 limit, in bytes of usage."""
    pause_at = max(0, limit - max(PAUSE_MIN, int(limit * PAUSE_FRACTION)))
    resume_below = pause_at - max(RESUME_GAP_MIN, int(limit * RESUME_GAP_FRACTION))
    return pause_at, max(0, resume_below)


@dataclass(frozen=True)
class VmSample:
    """A connected VM of a watched cgroup: its QEMU's PID and its RAM file's resident bytes."""

    name: str
    pid: int
    allocated_bytes: int


@dataclass(frozen=True)
class PauseAction:
    kind: str  # "stop" | "cont"
    name: str
    pid: int
    detail: str


@dataclass
class PauseDecider:
    """Sans-I/O: which VMs of one v1 cgroup to stop and continue, from readings."""

    deadline: float = DEFAULT_DEADLINE
    #: name -> (pid, stopped at)
    paused: dict[str, tuple[int, float]] = field(default_factory=dict)
    _trail: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)
    _grace_until: dict[str, float] = field(default_factory=dict)
    #: while stopped: the lowest usage seen and when it last fell by PROGRESS_BYTES
    _best: tuple[int, float] | None = None

    def growth(self, name: str) -> int:
        trail = self._trail.get(name)
        return trail[-1][1] - trail[0][1] if trail else 0

    def observe(
        self, now: float, usage: int, limit: int | None, vms: Sequence[VmSample]
    ) -> list[PauseAction]:
        out: list[PauseAction] = []
        present = {vm.name: vm for vm in vms}
        for name in list(self._trail):
            if name not in present:
                del self._trail[name]
        for vm in vms:
            trail = self._trail.setdefault(vm.name, deque(maxlen=256))
            trail.append((now, vm.allocated_bytes))
            while len(trail) > 2 and now - trail[1][0] >= GROWTH_WINDOW:
                trail.popleft()
        stalled = False
        if not self.paused:
            self._best = None
        elif self._best is None or usage <= self._best[0] - PROGRESS_BYTES:
            self._best = (usage, now)
        elif now - self._best[1] >= STALL:
            stalled = True
        # continue: gone (or restarted with another PID), back under, the deadline, or
        # nothing freed any more
        for name, (pid, since) in list(self.paused.items()):
            now_vm = present.get(name)
            why = None
            if now_vm is None or now_vm.pid != pid:
                why = "disconnected"
            elif limit is None or usage < margins(limit)[1]:
                why = (
                    f"usage {usage >> 20} MiB back below the resume level after {now - since:.3f}s"
                )
            elif now - since >= self.deadline:
                why = f"deadline: still near the limit after {now - since:.3f}s, continued anyway"
                self._grace_until[name] = now + REPAUSE_GRACE
            elif stalled:
                why = (
                    f"stalled: the usage did not fall {PROGRESS_BYTES >> 20} MiB in {STALL:g}s"
                    f" (nothing more to free now), continued after {now - since:.3f}s"
                )
                self._grace_until[name] = now + REPAUSE_GRACE
            if why is not None:
                del self.paused[name]
                out.append(PauseAction("cont", name, pid, why))
        if limit is None:
            return out
        pause_at, _ = margins(limit)
        if not self.paused:
            self._best = None
        if usage < pause_at:
            return out
        running = [
            vm
            for vm in vms
            if vm.name not in self.paused and now >= self._grace_until.get(vm.name, 0.0)
        ]
        growing = sorted(
            (vm for vm in running if self.growth(vm.name) > 0),
            key=lambda vm: self.growth(vm.name),
            reverse=True,
        )
        chosen = [vm for vm in growing if self.growth(vm.name) >= BUSY_BYTES] or growing[:1]
        if chosen and not self.paused:
            self._best = (usage, now)
        for vm in chosen:
            self.paused[vm.name] = (vm.pid, now)
            out.append(
                PauseAction(
                    "stop",
                    vm.name,
                    vm.pid,
                    f"usage {usage >> 20} MiB >= pause level {pause_at >> 20} MiB of limit"
                    f" {limit >> 20} MiB; its RAM file grew {self.growth(vm.name) >> 20} MiB"
                    f" in {GROWTH_WINDOW:g}s",
                )
            )
        return out

    def release(self) -> list[PauseAction]:
        out = [PauseAction("cont", n, pid, "vdev stops") for n, (pid, _) in self.paused.items()]
        self.paused.clear()
        return out


def _v1_mount(path: str) -> str:
    """The root of the v1 hierarchy ``path`` is in: its topmost ancestor with cgroup.procs."""
    path = os.path.realpath(path)
    root = path
    while True:
        parent = os.path.dirname(root)
        if parent == root or not os.path.exists(os.path.join(parent, "cgroup.procs")):
            return root
        root = parent


def pid_in_cgroup(pid: int, source: CgroupSource, proc: str = "/proc") -> bool:
    """Whether process ``pid`` is in the v1 memory cgroup ``source`` or below it."""
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    mount = _v1_mount(source.path)
    want = os.path.realpath(source.path)
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            where = os.path.normpath(os.path.join(mount, parts[2].lstrip("/")))
            return where == want or where.startswith(want + os.sep)
    return False


@dataclass
class _Held:
    source: CgroupSource
    restore: str  # the file's value before we changed it
    file: str


@dataclass
class Backstop:
    sources: list[CgroupSource]
    deadline: float = DEFAULT_DEADLINE
    held: list[_Held] = field(default_factory=list)
    #: what was done, for events: (kind, cgroup path, detail)
    actions: list[tuple[str, str, str]] = field(default_factory=list)
    pauses = 0
    #: v1 cgroup path -> its decider
    deciders: dict[str, PauseDecider] = field(default_factory=dict)
    guard: StopGuard | None = None
    #: where the QEMUs held stopped are recorded (:class:`vdev.policy.guard.StopFile`;
    #: None: only the guard records them)
    stop_file: str | None = None
    _members: dict[tuple[str, int], bool] = field(default_factory=dict)
    _fresh: list[tuple[str, str, str]] = field(default_factory=list)

    def _write(self, source: CgroupSource, file: str, value: str) -> None:
        path = os.path.join(source.path, file)
        try:
            with open(path, "w", encoding="ascii") as f:
                f.write(value)
        except OSError as e:
            raise HostResourceError(
                f"backstop: cannot write {value!r} to {path}: {e.strerror}"
            ) from e

    def engage(self) -> None:
        """Set the backstop on every source (HostResourceError if the kernel refuses)."""
        for source in self.sources:
            if source.version == 1:
                limit = parse_single(
                    need_text(source, "memory.limit_in_bytes"), "memory.limit_in_bytes"
                )
                if self.guard is None:
                    stops = StopFile(self.stop_file) if self.stop_file else None
                    try:
                        if stops is not None:
                            stops.probe()
                    except OSError as e:
                        raise HostResourceError(
                            f"backstop: cannot write the stop file {self.stop_file} "
                            f"(--stop-file): {e.strerror}"
                        ) from e
                    try:
                        self.guard = StopGuard(stops)
                    except OSError as e:
                        raise HostResourceError(f"backstop: cannot start the guard: {e}") from e
                self.deciders[source.path] = PauseDecider(self.deadline)
                level = ""
                if limit is not None:
                    pause_at, resume_below = margins(limit)
                    level = f" (now: pause at {pause_at >> 20} MiB, resume below"
                    level += f" {resume_below >> 20} MiB)"
                where = (
                    f"; recorded in {self.stop_file}"
                    if self.stop_file
                    else "; no stop file (--stop-file), so a kill of vdev and its guard"
                    " together leaves it stopped until someone continues it"
                )
                self._act(
                    "engaged",
                    source,
                    "near the limit the allocating VM's QEMU is stopped (SIGSTOP) until the"
                    f" other guests have given memory back, at most {self.deadline:g}s"
                    f"{level}{where}",
                )
            else:
                limit = parse_single(need_text(source, "memory.max"), "memory.max")
                if limit is None:
                    self._act("skipped", source, "memory.max is max: no limit to stay under")
                    continue
                before_text = need_text(source, "memory.high").strip()
                high = limit - max(MIN_MARGIN, int(limit * V2_MARGIN_FRACTION))
                self._write(source, "memory.high", str(max(0, high)))
                self.held.append(_Held(source, before_text, "memory.high"))
                self._act(
                    "engaged",
                    source,
                    f"memory.high={high}: above it the cgroup is throttled, never killed",
                )

    @property
    def engaged(self) -> bool:
        return bool(self.held) or bool(self.deciders)

    def paused(self) -> list[dict[str, object]]:
        """The VMs stopped now: name, pid, cgroup, since (monotonic)."""
        return [
            {"name": n, "pid": pid, "cgroup": path, "since": since}
            for path, d in self.deciders.items()
            for n, (pid, since) in d.paused.items()
        ]

    def is_paused(self, name: str) -> bool:
        return any(name in d.paused for d in self.deciders.values())

    def demand_bytes(self, path: str, limit: int) -> int:
        """While a VM of cgroup ``path`` is stopped: the growth the policy is to count as
        used (limit - resume level), so that it frees memory from the other guests until the
        usage is below the resume level; else 0."""
        decider = self.deciders.get(path)
        if decider is None or not decider.paused:
            return 0
        return limit - margins(limit)[1]

    def _act(self, kind: str, source: CgroupSource | str, detail: str) -> None:
        path = source if isinstance(source, str) else source.path
        log.warning("backstop %s on %s: %s", kind, path, detail)
        self.actions.append((kind, path, detail))
        self._fresh.append((kind, path, detail))
        del self.actions[:-200]  # what vdev host shows; the events stream has them all

    def _in(self, source: CgroupSource, pid: int) -> bool:
        key = (source.path, pid)
        if key not in self._members:
            self._members[key] = pid_in_cgroup(pid, source)
        return self._members[key]

    def check(
        self,
        readings: list[CgroupReading],
        now: float,
        vms: Iterable[tuple[str, int | None, int]] = (),
    ) -> list[tuple[str, str, str]]:
        """After each reading, with the connected VMs (name, QEMU pid, RAM file resident
        bytes): stop and continue VMs of v1 cgroups. Returns the actions taken now."""
        self._fresh.clear()
        vm_list = [(n, pid, b) for n, pid, b in vms if pid is not None]
        live = {pid for _, pid, _ in vm_list}
        self._members = {k: v for k, v in self._members.items() if k[1] in live}
        by_path = {r.source.path: r for r in readings}
        for path, decider in self.deciders.items():
            reading = by_path.get(path)
            if reading is None:
                continue
            source = reading.source
            samples = [VmSample(n, pid, b) for n, pid, b in vm_list if self._in(source, pid)]
            for action in decider.observe(now, reading.usage_bytes, reading.limit_bytes, samples):
                self._apply(path, action)
        return list(self._fresh)

    def _apply(self, path: str, action: PauseAction) -> None:
        assert self.guard is not None
        who = f"{action.name} (pid {action.pid})"
        if action.kind == "stop":
            if self.guard.stop(action.pid, action.name, path):
                self.pauses += 1
                stops = self.guard.stop_file
                unrecorded = f" ({stops.error})" if stops is not None and stops.error else ""
                self._act("paused", path, f"{who} stopped: {action.detail}{unrecorded}")
            else:
                self.deciders[path].paused.pop(action.name, None)
                self._act("skipped", path, f"{who} not stopped: it or the stop guard is gone")
        else:
            self.guard.cont(action.pid)
            self._act("resumed", path, f"{who} continued: {action.detail}")

    def release(self) -> list[tuple[str, str, str]]:
        """Continue every stopped VM; restore what :meth:`engage` changed. Returns the
        actions taken."""
        self._fresh.clear()
        for path, decider in self.deciders.items():
            for action in decider.release():
                self._apply(path, action)
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        self.deciders.clear()
        for held in self.held:
            try:
                self._write(held.source, held.file, held.restore)
            except HostResourceError as e:
                log.warning("%s", e)
        self.held.clear()
        return list(self._fresh)
