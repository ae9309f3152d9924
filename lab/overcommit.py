"""Overcommit scenarios with real Linux guests in a real memory cgroup.

Three Linux guests (QEMU under TCG, guest RAM in shared memfds, vdev's virtio-balloon
personality in this process) run with their QEMUs in a child memory cgroup whose limit is
below the sum of their RAM. ``vm0`` is busy, ``vm1`` and ``vm2`` idle. Each scenario runs
the same workload under each policy:

* ``none``: no balloon policy (vdev serves the balloons, nobody sets a target);
* ``mom``: oVirt MoM's balloon rules (``vdev serve --policy mom``);
* ``ours``: the ESXi-model policy watching the cgroup (``--watch-cgroup``: kernel
  notifications wake it) with the backstop (``--backstop``: near the limit the busy guest's
  QEMU is stopped instead of a VM being OOM-killed, while the policy frees memory from the
  idle guests).

Scenarios: ``a`` slow growth (the busy guest writes in small steps), ``b`` a burst (it
writes it all at once, as fast as the guest can), ``c`` a burst next to one idle guest whose
free memory is host-resident (it touched and freed it) and one whose free memory was never
touched, ``d`` the busy guest stops (frees its memory) and the balloons must come back.

Recorded per run (:class:`RunResult`): cgroup OOM kills (``memory.oom_control`` oom_kill),
guest OOM kills (``oom_kill`` in each guest's ``/proc/vmstat``), peak usage vs limit
(``memory.max_usage_in_bytes``), the busy workload's completion time, memory regained
(bytes vdev punched out of the guests' RAM files during the run), backstop pauses.

Every phase (booting a guest, preparing a run, the workload, the deflation, recording,
tearing down) has its own deadline (:data:`PHASE_SECONDS`) and the whole of one scenario
another (:func:`scenario_budget`): past one, :class:`PhaseTimeout` names the phase and the
guest and carries diagnostics (console and QEMU stderr tails, the balloons, the cgroup's
usage/limit/OOM state, vdev's last log lines). Every QEMU started is killed and reaped and
the child cgroup removed on any exit (:meth:`Lab.close`).

The cgroup is a child of this process's own cgroup v1 memory cgroup (root needed);
``python -m lab.overcommit`` / ``scripts/overcommit`` print the table and draw the chart
(``overcommit.json`` is the recording ``vdev plot --recording`` draws: one drawing path).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from lab.linux_guest import MIB, GuestFailure, LinuxGuest, boot_guest, device_class
from lab.linux_image import LinuxImage
from lab.qemu import QemuBinary
from protocol.errors import LocalError
from protocol.units import PAGES_PER_MIB
from vdev.policy.cgroup import CgroupSource, own_memory_cgroup, read_cgroup, resolve_cgroup

log = logging.getLogger(__name__)

POLICIES = ("ours", "mom", "none")
SCENARIOS = ("a", "b", "c", "d")
SCENARIO_TITLES = {
    "a": "slow growth",
    "b": "burst",
    "c": "burst, one idle guest never touched its memory",
    "d": "busy guest stops, pressure ends",
}
#: guest RAM (MiB): the busy guest and the two idle ones
BUSY_RAM_MIB = 384
IDLE_RAM_MIB = 256
#: what the busy guest writes into its tmpfs, and what an idle guest touches and frees
WORKLOAD_MIB = 256
TOUCH_MIB = 180
#: the cgroup limit leaves this much above the usage before the workload: the workload
#: needs WORKLOAD_MIB - HEADROOM_MIB more than the limit allows
HEADROOM_MIB = 112
SLOW_STEP_MIB = 16
SLOW_STEP_PAUSE = 0.4
#: seconds between the limit (and the policy) and the workload
SETTLE = 3.0
#: the busy workload may take this long (TCG on 2 shared cores); past it the run records
#: that it did not finish (busy_seconds None)
RUN_TIMEOUT = 60.0
#: (d): the idle guests' balloons must be back below this (MiB in total) this long after the
#: workload ends (the policy holds pressure balloons DEFLATE_HOLD = 10 s first)
DEFLATED_MIB = 32
DEFLATE_TIMEOUT = 60.0
#: (d): ours must have inflated the idle guests by at least this much (MiB in total) while
#: the busy guest was working, or the deflation proves nothing
INFLATED_MIB = 64
#: the deadline of each phase (seconds); a phase past it is a PhaseTimeout
PHASE_SECONDS = {
    "boot": 120.0,  # the guests side by side, until their drivers are active (TCG, 2 cores)
    "prepare": 60.0,  # deflate, flush, touch
    "workload": SETTLE + RUN_TIMEOUT + 15.0,  # the run itself (bounded again inside)
    "deflate": DEFLATE_TIMEOUT + 15.0,
    "record": 45.0,  # OOM counters from the guests, clean-up in the busy guest
    "teardown": 30.0,
}


class ScenarioError(LocalError):
    """The scenario could not be set up (no memory cgroup of our own to nest one in, or not
    cgroup v1).

    Raised by :class:`ChildCgroup`; caught by ``scripts/overcommit`` (exit 1 with the reason)
    and by the overcommit test (which fails, saying why)."""


class PhaseTimeout(ScenarioError):
    """A phase of a scenario (or the whole scenario) passed its deadline: the message names
    the phase, the guest, and carries the diagnostics (:meth:`Lab.diagnostics`).

    Raised by :meth:`Lab.phase`; caught like :class:`ScenarioError`."""


@contextlib.contextmanager
def first_scenario_error() -> Iterator[None]:
    """A nursery's exception group that holds a :class:`ScenarioError` becomes that error
    (the first one), so that callers catch ``ScenarioError`` and see what went wrong."""
    try:
        yield
    except BaseExceptionGroup as group:
        found = group.subgroup(ScenarioError)
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]  # type: ignore[assignment]
        if isinstance(found, ScenarioError):
            raise found from group
        raise


# --------------------------------------------------------------------------- the cgroup


class ChildCgroup:
    """A child of this process's own memory cgroup (v1), removed on :meth:`remove`."""

    def __init__(self, name: str) -> None:
        own = own_memory_cgroup()
        if own is None:
            raise ScenarioError("this process has no memory cgroup of its own to nest one in")
        if own.version != 1:
            raise ScenarioError(f"the scenarios need a cgroup v1 memory controller, got {own}")
        path = Path(own.path) / name
        try:
            path.mkdir()
        except OSError as e:
            raise ScenarioError(f"cannot create memory cgroup {path}: {e.strerror}") from e
        self.path = path
        self.source: CgroupSource = resolve_cgroup(str(path))

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def set_limit(self, nbytes: int | None) -> None:
        self._write("memory.limit_in_bytes", "-1" if nbytes is None else str(nbytes))

    def set_oom_kill_disable(self, on: bool) -> None:
        self._write("memory.oom_control", "1" if on else "0")

    def reset_peak(self) -> None:
        self._write("memory.max_usage_in_bytes", "0")

    def usage(self) -> int:
        return int((self.path / "memory.usage_in_bytes").read_text())

    def peak(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def oom_kills(self) -> int:
        return read_cgroup(self.source).oom_kills

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self.procs.read_text().split()]
        except OSError:
            return []

    def state(self) -> str:
        """usage/limit/peak and the OOM state, for diagnostics (never raises)."""
        try:
            oom = " ".join((self.path / "memory.oom_control").read_text().split())
            return (
                f"cgroup {self.path}: usage {self.usage() / MIB:.0f} MiB, limit "
                f"{int((self.path / 'memory.limit_in_bytes').read_text()) / MIB:.0f} MiB, peak "
                f"{self.peak() / MIB:.0f} MiB, {oom}, procs {self.pids()}"
            )
        except (OSError, ValueError) as e:
            return f"cgroup {self.path}: unreadable ({e})"

    def release(self) -> None:
        """No limit, the OOM killer back: whatever sleeps in the cgroup can run (and die)."""
        for name, value in (("memory.oom_control", "0"), ("memory.limit_in_bytes", "-1")):
            with contextlib.suppress(OSError):
                self._write(name, value)

    def kill_all(self) -> list[int]:
        """SIGKILL every process still in the cgroup (only our QEMUs are ever put there)."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def remove(self) -> bool:
        try:
            self.path.rmdir()
        except FileNotFoundError:
            return True
        except OSError as e:
            log.warning("cannot remove memory cgroup %s: %s", self.path, e.strerror)
            return False
        return True


# --------------------------------------------------------------------------- results


@dataclass
class RunResult:
    scenario: str
    policy: str
    cgroup_oom_kills: int
    guest_oom_kills: int
    limit_bytes: int
    peak_bytes: int
    busy_seconds: float | None  # None: the workload did not finish (its QEMU died)
    regained_bytes: int
    backstop_pauses: int
    killed: list[str] = field(default_factory=list)
    #: guests whose vhost-user connection to vdev dropped while their QEMU ran on (QEMU's
    #: generic vhost-user device does not survive that: the guest's balloon is dead)
    dropped: list[str] = field(default_factory=list)
    deflated_seconds: float | None = None  # (d): until the balloons came back
    decisions: int = 0
    #: (d): the idle guests' largest balloon total (bytes) while the busy guest worked
    idle_balloon_peak_bytes: int = 0
    #: samples every 0.1 s: {"t", "usage", "vms": {name: {"resident", "balloon", "target"}}}
    timeline: list[dict[str, Any]] = field(default_factory=list)
    #: the policy's decisions (targets with their reasons), host states, backstop actions,
    #: and the guests killed: {"t", "type", ...}
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def oom_kills(self) -> int:
        return self.cgroup_oom_kills + self.guest_oom_kills

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("timeline")
        d.pop("events")
        return d

    def record(self) -> dict[str, Any]:
        """The run as ``overcommit.json`` holds it (what ``vdev plot --recording`` reads)."""
        return {**asdict(self), "title": SCENARIO_TITLES[self.scenario]}


def format_table(results: Sequence[RunResult]) -> str:
    head = (
        f"{'scenario':<10}{'policy':<7}{'cgOOM':>6}{'guestOOM':>9}{'peak/limit MB':>16}"
        f"{'busy s':>8}{'regained MB':>12}{'pauses':>7}{'back s':>7}  killed"
    )
    lines = [head]
    for r in results:
        busy = "-" if r.busy_seconds is None else f"{r.busy_seconds:.1f}"
        back = "-" if r.deflated_seconds is None else f"{r.deflated_seconds:.1f}"
        lines.append(
            f"{r.scenario:<10}{r.policy:<7}{r.cgroup_oom_kills:>6}{r.guest_oom_kills:>9}"
            f"{f'{r.peak_bytes / MIB:.0f}/{r.limit_bytes / MIB:.0f}':>16}{busy:>8}"
            f"{r.regained_bytes / MIB:>12.0f}{r.backstop_pauses:>7}{back:>7}"
            f"  {','.join(r.killed) or '-'}"
            + (f" dropped:{','.join(r.dropped)}" if r.dropped else "")
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the lab


@dataclass
class Vm:
    name: str
    ram_mib: int
    guest: LinuxGuest | None = None
    scope: trio.CancelScope | None = None
    dead: bool = False
    died_at: float | None = None  # time.monotonic() when its QEMU ended
    reaped: trio.Event = field(default_factory=trio.Event)  # its task has ended
    boots: int = 0


class _LogTail(logging.Handler):
    """vdev's last log lines, for the diagnostics of a phase that timed out."""

    def __init__(self, size: int = 30) -> None:
        super().__init__(logging.INFO)
        self.lines: deque[str] = deque(maxlen=size)
        self.setFormatter(logging.Formatter("%(relativeCreated)9.0fms %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.lines.append(self.format(record))


@contextlib.contextmanager
def vdev_log_tail() -> Iterator[_LogTail]:
    """Keep vdev's INFO-and-above log lines (the last 30) while inside."""
    logger = logging.getLogger("vdev")
    tail = _LogTail()
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(tail)
    try:
        yield tail
    finally:
        logger.removeHandler(tail)
        logger.setLevel(level)


class Lab:
    """vdev (in this process) with three sockets, three guests in one child cgroup."""

    def __init__(
        self,
        qemu: QemuBinary,
        image: LinuxImage,
        workdir: Path,
        nursery: trio.Nursery,
        log_tail: _LogTail | None = None,
    ) -> None:
        from vdev.registry import GuestRegistry
        from vdev.server import Server

        self.qemu, self.image, self.workdir, self.nursery = qemu, image, workdir, nursery
        self.log_tail = log_tail
        self.where = "setting up"  # "scenario x, policy y": for the diagnostics
        self.vms = [Vm("vm0", BUSY_RAM_MIB), Vm("vm1", IDLE_RAM_MIB), Vm("vm2", IDLE_RAM_MIB)]
        cls = device_class()
        self.registry = GuestRegistry(cls.name)
        self.scratch = qemu.scratch_dir("vbo-")  # sockets QEMU can see (it may be chrooted)
        self.sockets = [self.scratch / f"{vm.name}.sock" for vm in self.vms]
        self.server = Server(
            self.registry,
            cls,
            socket_paths=[str(s) for s in self.sockets],
            names=[vm.name for vm in self.vms],
            stats_interval=1.0,
        )
        try:
            # a new one per lab: never one a previous lab could not remove
            self.cgroup = ChildCgroup(f"vballoon-overcommit-{os.getpid()}-{time.monotonic_ns()}")
        except BaseException:
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise

    async def start(self) -> None:
        await self.nursery.start(self.server.run)

    # ------------------------------------------------------------------ deadlines

    @contextlib.contextmanager
    def phase(self, name: str, seconds: float, vm: Vm | None = None) -> Iterator[None]:
        """``trio.fail_after(seconds)``; past it, a :class:`PhaseTimeout` naming the phase
        (and the guest) with :meth:`diagnostics`."""
        t0 = time.monotonic()
        what = f"{self.where}: {name}" + (f" ({vm.name})" if vm else "")
        try:
            with trio.fail_after(seconds):
                yield
        except trio.TooSlowError:
            raise PhaseTimeout(
                f"{what}: not done after {seconds:g}s\n{self.diagnostics()}"
            ) from None
        log.info("%s took %.1fs", what, time.monotonic() - t0)

    def diagnostics(self) -> str:
        """Every guest's state, console and QEMU stderr tails, the balloons, the cgroup and
        vdev's last log lines (never raises, never waits)."""
        out = [self.cgroup.state()]
        for vm in self.vms:
            view = self.registry.view(vm.name)
            guest = vm.guest
            proc = "not started" if guest is None else (
                f"QEMU pid {guest.pid} "
                + ("running" if guest.proc.returncode is None else f"exit {guest.proc.returncode}")
            )  # fmt: skip
            out.append(
                f"{vm.name}: {proc}{', dead' if vm.dead else ''}; vdev: connected="
                f"{view.connected} driver_active={view.driver_active} balloon "
                f"{int(view.size_pages) * 4096 / MIB:.0f} MiB target "
                f"{int(view.target_pages) * 4096 / MIB:.0f} MiB resident "
                f"{int(view.ram_allocated_bytes) / MIB if view.connected else 0:.0f} MiB"
            )
            if guest is not None:
                out += [f"  console| {line}" for line in guest.console.lines[-12:]]
                out += [f"  stderr | {line}" for line in guest.stderr().splitlines()[-8:]]
        if self.log_tail is not None:
            out += [f"  vdev   | {line}" for line in self.log_tail.lines]
        return "\n".join(out)

    # ------------------------------------------------------------------ teardown

    async def close(self) -> None:
        """Kill and reap every QEMU, stop vdev, remove the cgroup; on any exit (shielded)."""
        with trio.CancelScope(shield=True):
            self.cgroup.release()  # nothing sleeps at the limit while it is told to stop
            for vm in self.vms:
                if vm.scope is not None:
                    vm.scope.cancel()  # its task stops QEMU (SIGTERM, SIGKILL) and reaps it
            with trio.move_on_after(PHASE_SECONDS["teardown"]):
                for vm in self.vms:
                    if vm.scope is not None:
                        await vm.reaped.wait()
            killed = self.cgroup.kill_all()  # anything left over (never expected)
            if killed:
                log.warning("killed %s left in %s", killed, self.cgroup.path)
            with trio.move_on_after(10):
                while self.cgroup.pids():
                    await trio.sleep(0.05)
            with trio.move_on_after(10):
                await self.server.shutdown()
            with trio.move_on_after(5):
                while not self.cgroup.remove():
                    await trio.sleep(0.2)
            shutil.rmtree(self.scratch, ignore_errors=True)

    def vm(self, name: str) -> Vm:
        return next(v for v in self.vms if v.name == name)

    async def _guest_task(
        self, vm: Vm, index: int, *, task_status: trio.TaskStatus[LinuxGuest]
    ) -> None:
        try:
            with trio.CancelScope() as scope:
                vm.scope = scope
                try:
                    async with boot_guest(
                        self.qemu,
                        self.image,
                        self.sockets[index],
                        ram_mib=vm.ram_mib,
                        append="vb.interval=100000",
                        # one file per boot: a killed QEMU's last words survive its reboot
                        stderr_path=self.workdir / f"{vm.name}.{vm.boots}.qemu.err",
                        cgroup_procs=self.cgroup.procs,
                        wait_ready=False,
                    ) as guest:
                        vm.guest = guest
                        try:
                            await guest.wait_ready()
                        except EOFError:
                            await guest.proc.wait()
                            raise GuestFailure(
                                f"{vm.name}: QEMU ended (exit {guest.proc.returncode}) before the"
                                f" guest was ready; stderr: {guest.stderr().strip()[-2000:]!r}"
                            ) from None
                        task_status.started(guest)
                        await guest.proc.wait()
                finally:
                    vm.dead = True
                    vm.died_at = time.monotonic()
        finally:
            vm.reaped.set()

    async def ensure_guests(self) -> None:
        """Boot the guests that are not running (all at first; those killed since), side by
        side.

        A QEMU that ends before its guest is ready is booted once more (logged with its exit
        status and the cgroup's state: it is not what the scenarios measure); twice is a
        :class:`ScenarioError`."""
        self.cgroup.set_limit(None)
        for name in self.dropped():  # its balloon is dead: a new QEMU
            log.warning("%s: %s lost its vhost-user connection: rebooting it", self.where, name)
            vm = self.vm(name)
            if vm.scope is not None:
                vm.scope.cancel()
            with self.phase("stop", PHASE_SECONDS["teardown"], vm):
                await vm.reaped.wait()
        with first_scenario_error():
            async with trio.open_nursery() as nursery:
                for index, vm in enumerate(self.vms):
                    if vm.guest is None or vm.dead:
                        nursery.start_soon(self._boot, vm, index)

    async def _boot(self, vm: Vm, index: int) -> None:
        with self.phase("boot", PHASE_SECONDS["boot"], vm):
            for attempt in (1, 2):
                if vm.scope is not None:  # a QEMU before: reaped first
                    await vm.reaped.wait()
                while self.registry.view(vm.name).connected:
                    await trio.sleep(0.05)  # vdev lets go of the dead QEMU's RAM first
                vm.dead, vm.died_at, vm.reaped = False, None, trio.Event()
                vm.boots += 1
                try:
                    await self.nursery.start(self._guest_task, vm, index)
                    break
                except GuestFailure as e:
                    if attempt == 2:
                        raise ScenarioError(
                            f"{self.where}: boot ({vm.name}) failed twice: {e}\n"
                            f"{self.diagnostics()}"
                        ) from None
                    log.warning("%s: %s; %s; booting it again", self.where, e,
                                self.cgroup.state())  # fmt: skip
            while not self.registry.view(vm.name).driver_active:
                await trio.sleep(0.1)

    def dropped(self) -> list[str]:
        """The guests whose QEMU runs but whose vhost-user connection is gone."""
        return [vm.name for vm in self.alive() if not self.registry.view(vm.name).connected]

    def alive(self) -> list[Vm]:
        return [vm for vm in self.vms if vm.guest is not None and not vm.dead]

    async def deflate_all(self) -> None:
        for vm in self.vms:
            self.registry.set_target(vm.name, 0)
        for vm in self.alive():
            while self.registry.view(vm.name).size_pages > 0 and not vm.dead:
                await trio.sleep(0.1)

    def reclaimed(self) -> dict[str, int]:
        """Bytes vdev punched out of each guest's RAM file so far (per connection)."""
        return {vm.name: int(self.registry.view(vm.name).reclaimed_bytes_total) for vm in self.vms}

    async def guest_oom_kills(self) -> int:
        total = 0
        for vm in self.alive():
            assert vm.guest is not None
            with trio.move_on_after(15):
                total += (await vm.guest.vmstat("oom_kill")).get("oom_kill", 0)
        return total


# --------------------------------------------------------------------------- one run


@contextlib.asynccontextmanager
async def policy_running(lab: Lab, policy: str) -> AsyncIterator[Any]:
    """The control plane for ``policy`` (None for ``none``), running until exit."""
    if policy == "none":
        yield None
        return
    from vdev.config import ControlConfig
    from vdev.policy.control import ControlPlane

    if policy == "ours":
        cfg = ControlConfig(
            watch_cgroups=[str(lab.cgroup.path)],
            backstop=True,
            backstop_deadline=20.0,  # a stopped busy guest runs again within RUN_TIMEOUT
            policy_period=0.5,
        )
    else:
        cfg = ControlConfig(watch_cgroups=[str(lab.cgroup.path)], policy="mom", policy_period=1.0)
    cfg.check()
    control = ControlPlane(lab.registry, cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.run)
        try:
            yield control
        finally:
            nursery.cancel_scope.cancel()


def _sample(lab: Lab, t0: float) -> dict[str, Any]:
    vms: dict[str, dict[str, int]] = {}
    for vm in lab.vms:
        view = lab.registry.view(vm.name)
        vms[vm.name] = {
            "resident": int(view.ram_allocated_bytes) if view.connected else 0,
            "balloon": int(view.size_pages) * 4096,
            "target": int(view.target_pages) * 4096,
        }
    return {"t": round(time.monotonic() - t0, 3), "usage": lab.cgroup.usage(), "vms": vms}


async def _timeline(lab: Lab, out: list[dict[str, Any]], t0: float) -> None:
    while True:
        out.append(_sample(lab, t0))
        await trio.sleep(0.1)


#: the control plane's events a recording keeps: the decisions and what explains them
RECORDED_EVENTS = ("host", "backstop", "guest-backoff", "futile")


async def _decisions(
    events: trio.MemoryReceiveChannel[dict[str, Any]], out: list[dict[str, Any]], t0: float
) -> None:
    """The policy's decisions (every target it set, with its reason), host state changes
    and backstop actions, as the control plane publishes them."""
    async with events:
        async for event in events:
            kind = event.get("type")
            if kind == "guest" and event.get("kind") == "target":
                keep = {k: event.get(k) for k in ("name", "target_pages", "reason")}
                keep["type"] = "target"
            elif kind in RECORDED_EVENTS:
                keep = {k: v for k, v in event.items() if k not in ("time", "monotonic")}
            else:
                continue
            keep["t"] = round(float(event.get("monotonic", time.monotonic())) - t0, 3)
            out.append(keep)


async def flush(lab: Lab, vm: Vm) -> None:
    """Make the guest's free memory non-resident on the host, as if never touched: inflate
    its balloon over (almost) all of its free memory (vdev punches the pages out of the RAM
    file), then deflate (the pages come back as holes until the guest writes them)."""
    assert vm.guest is not None
    free_mib = (await vm.guest.report()).kib("MemFree") // 1024
    target = max(0, free_mib - 24) * PAGES_PER_MIB
    lab.registry.set_target(vm.name, target)
    last, still = -1, 0
    while still < 5:  # until the balloon stops growing (it may not reach the target)
        size = lab.registry.view(vm.name).size_pages
        still = still + 1 if size == last else 0
        last = size
        if size >= target:
            break
        await trio.sleep(0.1)
    lab.registry.set_target(vm.name, 0)
    while lab.registry.view(vm.name).size_pages > 0:
        await trio.sleep(0.1)


async def prepare(lab: Lab, scenario: str) -> None:
    """The busy guest's free memory non-resident (its workload needs new host memory); the
    idle guests' free memory host-resident (they touched and freed it), except vm2's in
    ``c`` (never touched)."""
    with lab.phase("prepare: deflate", PHASE_SECONDS["prepare"]):
        await lab.deflate_all()
    busy = lab.vm("vm0")
    assert busy.guest is not None
    with lab.phase("prepare: flush", PHASE_SECONDS["prepare"], busy):
        await busy.guest.workload(0)
        await flush(lab, busy)
    touch = ["vm1"] if scenario == "c" else ["vm1", "vm2"]
    if scenario == "c":
        with lab.phase("prepare: flush", PHASE_SECONDS["prepare"], lab.vm("vm2")):
            await flush(lab, lab.vm("vm2"))
    for name in touch:
        vm = lab.vm(name)
        assert vm.guest is not None
        with lab.phase("prepare: touch", PHASE_SECONDS["prepare"], vm):
            await vm.guest.workload(TOUCH_MIB)
            await vm.guest.workload(0)


async def busy_workload(guest: LinuxGuest, scenario: str) -> None:
    if scenario == "a":
        steps = WORKLOAD_MIB // SLOW_STEP_MIB
        await guest.run(
            f"for i in $(seq {steps}); do dd if=/dev/zero of=/tmp/slow$i bs=1M"
            f" count={SLOW_STEP_MIB} 2>/dev/null; sleep {SLOW_STEP_PAUSE}; done"
        )
    else:
        await guest.workload(WORKLOAD_MIB)


def _idle_balloon(lab: Lab) -> int:
    return sum(int(lab.registry.view(v.name).size_pages) for v in lab.vms if v.name != "vm0")


async def run_one(lab: Lab, scenario: str, policy: str) -> RunResult:
    lab.where = f"scenario {scenario}, policy {policy}"
    await lab.ensure_guests()
    await prepare(lab, scenario)
    with lab.phase("record", PHASE_SECONDS["record"]):
        kills_before = lab.cgroup.oom_kills()
        guest_ooms_before = await lab.guest_oom_kills()
    limit = lab.cgroup.usage() + HEADROOM_MIB * MIB
    lab.cgroup.set_limit(limit)
    lab.cgroup.reset_peak()
    regained_before = lab.reclaimed()
    timeline: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    busy_seconds: float | None = None
    deflated: float | None = None
    idle_peak = 0
    pauses = decisions = 0
    busy = lab.vm("vm0")
    assert busy.guest is not None
    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_timeline, lab, timeline, t0)
        async with policy_running(lab, policy) as control:
            if control is not None:
                nursery.start_soon(_decisions, control.subscribe(), events, t0)
            with lab.phase("workload", PHASE_SECONDS["workload"], busy):
                await trio.sleep(SETTLE)  # every policy gets the same look before the workload
                with trio.move_on_after(RUN_TIMEOUT):
                    try:
                        await busy_workload(busy.guest, scenario)
                        busy_seconds = time.monotonic() - t0
                    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # its QEMU was killed
                idle_peak = max(
                    (sum(p["vms"][n]["balloon"] for n in p["vms"] if n != "vm0")
                     for p in timeline), default=0,
                )  # fmt: skip
            if scenario == "d" and busy_seconds is not None and not busy.dead:
                with lab.phase("deflate", PHASE_SECONDS["deflate"], busy):
                    await busy.guest.workload(0)  # the busy guest stops: pressure ends
                    t1 = time.monotonic()
                    with trio.move_on_after(DEFLATE_TIMEOUT):
                        while _idle_balloon(lab) > DEFLATED_MIB * PAGES_PER_MIB:
                            await trio.sleep(0.2)
                        deflated = time.monotonic() - t1
            await trio.sleep(0.5)  # the kernel's kill, if any, lands
            if control is not None:
                decisions = control.steps
                if control.backstop is not None:
                    pauses = control.backstop.pauses
        nursery.cancel_scope.cancel()
    timeline.append(_sample(lab, t0))
    for vm in lab.vms:
        if vm.died_at is not None and vm.died_at >= t0:
            events.append({"t": round(vm.died_at - t0, 3), "type": "killed", "name": vm.name})
    events.sort(key=lambda e: e["t"])
    result = RunResult(
        scenario=scenario,
        policy=policy,
        cgroup_oom_kills=lab.cgroup.oom_kills() - kills_before,
        guest_oom_kills=0,
        limit_bytes=limit,
        peak_bytes=lab.cgroup.peak(),
        busy_seconds=busy_seconds,
        regained_bytes=sum(
            max(0, after - regained_before.get(name, 0))  # a rebooted guest starts at 0
            for name, after in lab.reclaimed().items()
        ),
        backstop_pauses=pauses,
        killed=[vm.name for vm in lab.vms if vm.dead],
        dropped=lab.dropped(),
        deflated_seconds=deflated,
        decisions=decisions,
        idle_balloon_peak_bytes=idle_peak,
        timeline=timeline,
        events=events,
    )
    lab.cgroup.set_limit(None)
    with lab.phase("record", PHASE_SECONDS["record"]):
        result.guest_oom_kills = max(0, await lab.guest_oom_kills() - guest_ooms_before)
        if busy.guest is not None and not busy.dead:
            await busy.guest.run("rm -f /tmp/slow*")
    return result


def scenario_budget(n_policies: int = len(POLICIES)) -> float:
    """The deadline of one scenario under ``n_policies`` policies (seconds): generous against
    its usual 1-1.5 min on 2 cores (3.5 min with two more busy loops and other work)."""
    return 120.0 + 70.0 * n_policies


async def run_suite(
    qemu: QemuBinary,
    image: LinuxImage,
    workdir: Path,
    scenarios: Sequence[str] = SCENARIOS,
    policies: Sequence[str] = POLICIES,
) -> list[RunResult]:
    """Every scenario under every policy, on one set of guests (rebooted after a kill).

    Each scenario is bounded by :func:`scenario_budget`, each phase by :data:`PHASE_SECONDS`
    (:class:`PhaseTimeout`). Whatever happens (BaseException included), every QEMU is
    killed and reaped, vdev stopped and the cgroup removed before this returns or raises."""
    results: list[RunResult] = []
    with vdev_log_tail() as tail, first_scenario_error():
        async with trio.open_nursery() as nursery:
            lab = Lab(qemu, image, workdir, nursery, tail)
            try:
                await lab.start()
                for scenario in scenarios:
                    lab.where = f"scenario {scenario}"
                    with lab.phase("the whole scenario", scenario_budget(len(policies))):
                        for policy in policies:
                            r = await run_one(lab, scenario, policy)
                            log.info("scenario %s policy %s: %s", scenario, policy, r.row())
                            results.append(r)
            finally:
                await lab.close()
                nursery.cancel_scope.cancel()
    (workdir / "overcommit.json").write_text(json.dumps([r.record() for r in results], indent=1))
    return results


# --------------------------------------------------------------------------- chart and CLI


def plot_results(results: Sequence[RunResult], path: Path) -> Path:
    """The chart of the runs: ``vdev plot --recording`` 's drawing (one panel per scenario
    and policy: cgroup usage vs limit, each VM's resident memory and balloon, every policy
    decision, the kills)."""
    from vdev.cli.plot import plot_recording

    plot_recording([r.record() for r in results], str(path))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys
    import tempfile

    from lab import linux_image
    from lab import qemu as qemu_mod

    ap = argparse.ArgumentParser(
        prog="scripts/overcommit",
        description="Overcommit scenarios with real Linux guests in a memory cgroup: no"
        " policy, MoM's and ours, side by side (needs root and a cgroup v1 memory cgroup).",
    )
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="e.g. b,c")
    ap.add_argument("--policies", default=",".join(POLICIES), help="e.g. ours,none")
    ap.add_argument("--out", type=Path, default=None, help="directory for the JSON and chart")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("vdev", "lab.linux_guest", "lab.linux_image"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    scenarios = [s for s in args.scenarios.split(",") if s]
    policies = [p for p in args.policies.split(",") if p]
    bad = [s for s in scenarios if s not in SCENARIOS] + [p for p in policies if p not in POLICIES]
    if bad:
        ap.error(f"unknown scenario or policy: {', '.join(bad)}")
    q = qemu_mod.best_qemu(need_test_device=True)
    if q is None:
        print("overcommit: no QEMU >= 10.2 with the generic vhost-user device (scripts/setup)",
              file=sys.stderr)  # fmt: skip
        return 1
    image = linux_image.build()
    out = args.out or Path(tempfile.mkdtemp(prefix="overcommit-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        results = trio.run(run_suite, q, image, out, scenarios, policies)
    except ScenarioError as e:
        print(f"overcommit: {e}", file=sys.stderr)
        return 1
    table = format_table(results)
    (out / "overcommit.txt").write_text(table + "\n")
    chart = plot_results(results, out / "overcommit.png")
    print(table)
    print(f"results: {out / 'overcommit.json'}\nchart:   {chart}")
    print(f"(the same chart: vdev plot --recording {out / 'overcommit.json'} -o FILE.png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
