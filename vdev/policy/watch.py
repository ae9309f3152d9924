"""Kernel memory-pressure notifications that wake the policy within milliseconds.

A period alone misses a burst: 400 MiB written in a second fills a cgroup between two 1 s
steps. :class:`PressureWatch` registers, for each watched cgroup (and for the host when none
is watched), the notifications the kernel offers, and calls back as soon as one fires:

* cgroup v2: a PSI trigger on ``memory.pressure`` (``some STALL WINDOW``, written to the
  file opened read-write; the kernel signals ``POLLPRI``), and ``memory.events`` (kernfs
  "file modified": ``POLLPRI``/``POLLERR`` until the file is read again);
* cgroup v1 (``cgroup.event_control``, one eventfd per registration): usage thresholds at
  80, 90 and 95 % of ``memory.limit_in_bytes`` and the backstop's pause and resume levels
  (:func:`vdev.policy.backstop.margins`; they fire in both directions; re-registered when
  the limit changes), ``memory.oom_control`` (fires once the cgroup is under OOM),
  ``memory.pressure_level`` at ``medium`` (it floods near OOM: read coalesced);
* no cgroup: a PSI trigger on ``/proc/pressure/memory``.

Everything is registered in one ``epoll`` set whose own fd trio waits on
(``trio.lowlevel.wait_readable``): trio's poller asks only for readability, and PSI and
kernfs signal ``POLLPRI``. A registration the kernel refuses (no PSI, not root, the root
cgroup has no OOM notifier) is skipped and listed in :attr:`PressureWatch.skipped`.

Sources: Documentation/accounting/psi.rst, Documentation/admin-guide/cgroup-v2.rst
("memory.events ... a value change in this file generates a file modified event"),
Documentation/admin-guide/cgroup-v1/memory.rst (sections 9-11: thresholds, OOM control,
memory pressure).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
from collections.abc import Callable
from dataclasses import dataclass

import trio

from vdev.policy.backstop import margins
from vdev.policy.cgroup import CgroupSource, parse_flat_keyed, parse_single

log = logging.getLogger(__name__)

#: PSI trigger: wake when tasks stalled on memory for STALL us within a WINDOW us window.
#: The kernel allows windows of 0.5-10 s (unprivileged: multiples of 2 s on Linux >= 6.5),
#: so a refused 1 s window is retried with 2 s.
PSI_STALL_US = 100_000
PSI_WINDOWS_US = (1_000_000, 2_000_000)
#: cgroup v1 usage thresholds, as fractions of the limit.
V1_THRESHOLDS = (0.80, 0.90, 0.95)
#: cgroup v1 memory.pressure_level registration (level,mode).
V1_PRESSURE_LEVEL = "medium"
#: After a wake-up, notifications are gathered this long before the callback (pressure_level
#: sends thousands per second near OOM).
COALESCE = 0.002


@dataclass(frozen=True)
class Notice:
    """One kernel notification: where it came from and what it was."""

    source: str  # a CgroupSource label, or "host"
    kind: str  # psi | events | threshold | oom | pressure_level
    detail: str = ""


@dataclass
class _Reg:
    fd: int
    source: str
    kind: str
    detail: str = ""
    keep: tuple[int, ...] = ()  # fds that must stay open with it (v1: the watched file)
    eventfd: bool = False


class PressureWatch:
    """Owns the notification fds; :meth:`run` waits on them. Close with :meth:`close`."""

    def __init__(self, sources: list[CgroupSource], proc: str = "/proc") -> None:
        self.sources = sources
        self.proc = proc
        self.skipped: list[str] = []
        self.armed: list[str] = []
        self.notices = 0
        self._epoll = select.epoll()
        self._regs: dict[int, _Reg] = {}
        self._limits: dict[str, int | None] = {}
        if not sources:
            self._psi_trigger("host", os.path.join(proc, "pressure", "memory"))
        for source in sources:
            if source.version == 2:
                self._psi_trigger(source.label, os.path.join(source.path, "memory.pressure"))
                self._events_file(source)
            else:
                self._v1_register(source, "oom", "memory.oom_control", "")
                self._v1_register(
                    source, "pressure_level", "memory.pressure_level", V1_PRESSURE_LEVEL
                )
                self.rearm_thresholds(source)

    # ------------------------------------------------------------------ registrations

    def _add(self, reg: _Reg, mask: int) -> None:
        self._epoll.register(reg.fd, mask)
        self._regs[reg.fd] = reg
        self.armed.append(f"{reg.source}: {reg.kind}{' ' + reg.detail if reg.detail else ''}")

    def _psi_trigger(self, label: str, path: str) -> None:
        last = ""
        for window in PSI_WINDOWS_US:
            try:
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                self.skipped.append(f"{label}: PSI trigger: cannot open {path}: {e.strerror}")
                return
            try:
                os.write(fd, f"some {PSI_STALL_US} {window}\0".encode())
            except OSError as e:
                os.close(fd)
                last = e.strerror or str(e)
                continue
            self._add(_Reg(fd, label, "psi", f"some {PSI_STALL_US}us/{window}us"), select.EPOLLPRI)
            return
        self.skipped.append(f"{label}: PSI trigger refused by the kernel: {last}")

    def _events_file(self, source: CgroupSource) -> None:
        path = os.path.join(source.path, "memory.events")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            os.read(fd, 4096)  # the "seen" generation is the one at the last read
        except OSError as e:
            self.skipped.append(f"{source.label}: memory.events: {e.strerror}")
            return
        self._add(_Reg(fd, source.label, "events"), select.EPOLLPRI | select.EPOLLERR)

    def _v1_register(self, source: CgroupSource, kind: str, file: str, args: str) -> int | None:
        """``cgroup.event_control``: "<eventfd> <fd of file> [args]"; the eventfd or None."""
        control = os.path.join(source.path, "cgroup.event_control")
        watched = efd = -1
        try:
            watched = os.open(os.path.join(source.path, file), os.O_RDONLY | os.O_CLOEXEC)
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            with open(control, "w", encoding="ascii") as f:
                f.write(f"{efd} {watched} {args}".strip())
        except OSError as e:
            for fd in (efd, watched):
                if fd >= 0:
                    os.close(fd)
            self.skipped.append(f"{source.label}: {kind} {args}: {e.strerror}")
            return None
        self._add(
            _Reg(efd, source.label, kind, args, keep=(watched,), eventfd=True), select.EPOLLIN
        )
        return efd

    def rearm_thresholds(self, source: CgroupSource) -> None:
        """(Re)register the v1 usage thresholds for the cgroup's current limit."""
        if source.version != 1:
            return
        try:
            with open(os.path.join(source.path, "memory.limit_in_bytes"), encoding="ascii") as f:
                limit = parse_single(f.read(), "memory.limit_in_bytes")
        except OSError as e:
            self.skipped.append(f"{source.label}: thresholds: {e.strerror}")
            return
        if source.label in self._limits and self._limits[source.label] == limit:
            return
        self._limits[source.label] = limit
        for fd, reg in list(self._regs.items()):
            if reg.source == source.label and reg.kind == "threshold":
                self._drop(fd)
        self.armed = [a for a in self.armed if not a.startswith(f"{source.label}: threshold")]
        if limit is None:
            return
        levels = {int(limit * fraction) for fraction in V1_THRESHOLDS}
        levels.update(margins(limit))  # the backstop's pause and resume levels
        for level in sorted(levels):
            self._v1_register(source, "threshold", "memory.usage_in_bytes", str(level))

    def _drop(self, fd: int) -> None:
        reg = self._regs.pop(fd)
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        for f in (reg.fd, *reg.keep):
            with contextlib.suppress(OSError):
                os.close(f)

    def close(self) -> None:
        for fd in list(self._regs):
            self._drop(fd)
        self._epoll.close()

    # ------------------------------------------------------------------ waiting

    def drain(self) -> list[Notice]:
        """The notifications pending now (non-blocking); clears them."""
        notices: list[Notice] = []
        for fd, mask in self._epoll.poll(0):
            reg = self._regs.get(fd)
            if reg is None:
                continue
            detail = reg.detail
            if reg.eventfd:
                with contextlib.suppress(BlockingIOError):
                    count = int.from_bytes(os.read(fd, 8), "little")
                    detail = f"{detail} x{count}".strip()
            elif reg.kind == "events":
                try:
                    os.lseek(fd, 0, os.SEEK_SET)
                    values = parse_flat_keyed(os.read(fd, 4096).decode("ascii"), "memory.events")
                    detail = " ".join(f"{k}={v}" for k, v in values.items() if v)
                except (OSError, ValueError) as e:
                    detail = f"unreadable: {e}"
            if mask & select.EPOLLERR and reg.kind == "psi":
                # the event source is gone (the cgroup was removed)
                self.skipped.append(f"{reg.source}: PSI trigger gone")
                self._drop(fd)
            notices.append(Notice(reg.source, reg.kind, detail))
        self.notices += len(notices)
        return notices

    async def run(
        self,
        on_notice: Callable[[list[Notice]], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Wait for notifications forever; ``on_notice`` gets each coalesced batch."""
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                await trio.sleep(COALESCE)
                notices = self.drain()
                if notices:
                    on_notice(notices)
        finally:
            self.close()
