"""The backstop: when ballooning cannot keep up, slow the allocating VM instead of killing one.

``vdev serve --watch-cgroup PATH --backstop`` ([serve] backstop = true) uses what the kernel
offers on each watched cgroup:

* cgroup v1: ``memory.oom_control`` = 1 (``oom_kill_disable``). At the limit the kernel then
  puts the tasks that fault in a new page to sleep instead of SIGKILLing the largest QEMU
  (measured on these machines: the *idle* guest's QEMU was the one killed). The OOM eventfd
  wakes the policy (:mod:`vdev.policy.watch`), which is then in the LOW state: it inflates the
  other guests' balloons without rate limit, and every page they return wakes the sleepers.
  A deadline bounds the pause: if the cgroup is still under OOM after ``deadline`` seconds,
  the OOM killer is given back (``oom_kill_disable`` = 0) -- an explicit, reported choice,
  since a VM paused for ever is no better than a killed one -- and taken again once the
  cgroup has left OOM.
* cgroup v2: ``memory.high`` below ``memory.max`` (``max - margin``): above it the kernel
  throttles the cgroup and forces it into reclaim, and never OOM-kills.

What was set is restored on exit. Every change is reported (:attr:`Backstop.log` entries go
to the events stream and ``vdev host``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from protocol.errors import HostResourceError
from vdev.policy.cgroup import CgroupReading, CgroupSource, parse_flat_keyed, parse_single

log = logging.getLogger(__name__)

#: v2: memory.high = memory.max minus this share of it (at least MIN_MARGIN bytes).
V2_MARGIN_FRACTION = 0.05
MIN_MARGIN = 16 << 20
#: v1: the longest a cgroup may stay paused under OOM before the kernel may kill again.
DEFAULT_DEADLINE = 30.0


@dataclass
class _Held:
    source: CgroupSource
    restore: str  # the file's value before we changed it
    file: str
    paused_since: float | None = None
    killer_given_back: bool = False


@dataclass
class Backstop:
    sources: list[CgroupSource]
    deadline: float = DEFAULT_DEADLINE
    held: list[_Held] = field(default_factory=list)
    #: what was done, for events: (kind, cgroup path, detail)
    actions: list[tuple[str, str, str]] = field(default_factory=list)
    pauses = 0

    def _write(self, source: CgroupSource, file: str, value: str) -> None:
        path = os.path.join(source.path, file)
        try:
            with open(path, "w", encoding="ascii") as f:
                f.write(value)
        except OSError as e:
            raise HostResourceError(
                f"backstop: cannot write {value!r} to {path}: {e.strerror}"
            ) from e

    def _read(self, source: CgroupSource, file: str) -> str:
        path = os.path.join(source.path, file)
        try:
            with open(path, encoding="ascii") as f:
                return f.read()
        except OSError as e:
            raise HostResourceError(f"backstop: cannot read {path}: {e.strerror}") from e

    def engage(self) -> None:
        """Set the backstop on every source (HostResourceError if the kernel refuses)."""
        for source in self.sources:
            if source.version == 1:
                before = parse_flat_keyed(self._read(source, "memory.oom_control"), "oom_control")
                self._write(source, "memory.oom_control", "1")
                self.held.append(
                    _Held(source, str(before.get("oom_kill_disable", 0)), "memory.oom_control")
                )
                self._act(
                    "engaged",
                    source,
                    "memory.oom_control oom_kill_disable=1: at the"
                    " limit tasks sleep instead of being killed",
                )
            else:
                limit = parse_single(self._read(source, "memory.max"), "memory.max")
                if limit is None:
                    self._act("skipped", source, "memory.max is max: no limit to stay under")
                    continue
                before_text = self._read(source, "memory.high").strip()
                high = limit - max(MIN_MARGIN, int(limit * V2_MARGIN_FRACTION))
                self._write(source, "memory.high", str(max(0, high)))
                self.held.append(_Held(source, before_text, "memory.high"))
                self._act(
                    "engaged",
                    source,
                    f"memory.high={high}: above it the cgroup is throttled, never killed",
                )

    def _act(self, kind: str, source: CgroupSource, detail: str) -> None:
        log.warning("backstop %s on %s: %s", kind, source.path, detail)
        self.actions.append((kind, source.path, detail))

    def check(self, readings: list[CgroupReading], now: float) -> list[tuple[str, str, str]]:
        """After each reading: start/stop the pause clock, enforce the deadline. Returns the
        actions taken now."""
        start = len(self.actions)
        by_path = {r.source.path: r for r in readings}
        for held in self.held:
            if held.source.version != 1:
                continue
            reading = by_path.get(held.source.path)
            if reading is None:
                continue
            under = bool(reading.events.get("under_oom", 0))
            if under and held.paused_since is None:
                held.paused_since = now
                self.pauses += 1
                self._act(
                    "paused",
                    held.source,
                    "under OOM: allocating tasks sleep; freeing memory from the other guests",
                )
            elif not under and held.paused_since is not None:
                took = now - held.paused_since
                held.paused_since = None
                self._act("resumed", held.source, f"left OOM after {took:.3f}s")
                if held.killer_given_back:
                    self._write(held.source, "memory.oom_control", "1")
                    held.killer_given_back = False
                    self._act("engaged", held.source, "oom_kill_disable=1 again")
            if (
                held.paused_since is not None
                and not held.killer_given_back
                and now - held.paused_since > self.deadline
            ):
                self._write(held.source, "memory.oom_control", "0")
                held.killer_given_back = True
                self._act(
                    "deadline",
                    held.source,
                    f"still under OOM after {self.deadline:g}s:"
                    " the OOM killer is given back (oom_kill_disable=0)",
                )
        return self.actions[start:]

    def release(self) -> None:
        """Restore what :meth:`engage` changed."""
        for held in self.held:
            try:
                self._write(held.source, held.file, held.restore)
            except HostResourceError as e:
                log.warning("%s", e)
        self.held.clear()
