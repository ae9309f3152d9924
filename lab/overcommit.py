"""Overcommit scenarios with real Linux guests in a real memory cgroup.

Three Linux guests (QEMU under TCG, guest RAM in shared memfds, vdev's virtio-balloon
personality in this process) run with their QEMUs in a child memory cgroup whose limit is
below the sum of their RAM. ``vm0`` is busy, ``vm1`` and ``vm2`` idle. Each scenario runs
the same workload under each policy:

* ``none``: no balloon policy (vdev serves the balloons, nobody sets a target);
* ``mom``: oVirt MoM's balloon rules (``vdev serve --policy mom``);
* ``ours``: the ESXi-model policy watching the cgroup (``--watch-cgroup``: kernel
  notifications wake it) with the backstop (``--backstop``: at the limit the cgroup pauses
  instead of being OOM-killed, and the policy frees memory from the idle guests).

Scenarios: ``a`` slow growth (the busy guest writes in small steps), ``b`` a burst (it
writes it all at once, as fast as the guest can), ``c`` a burst next to one idle guest whose
free memory is host-resident (it touched and freed it) and one whose free memory was never
touched, ``d`` the busy guest stops (frees its memory) and the balloons must come back.

Recorded per run (:class:`RunResult`): cgroup OOM kills (``memory.oom_control`` oom_kill),
guest OOM kills (``oom_kill`` in each guest's ``/proc/vmstat``), peak usage vs limit
(``memory.max_usage_in_bytes``), the busy workload's completion time, memory regained
(bytes vdev punched out of the guests' RAM files during the run), backstop pauses.

The cgroup is a child of this process's own cgroup v1 memory cgroup (root needed);
``python -m lab.overcommit`` / ``scripts/overcommit`` print the table and draw the chart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from lab.linux_guest import MIB, LinuxGuest, boot_guest, device_class
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
#: one run may take this long (TCG on 2 shared cores); the suite fails past it
RUN_TIMEOUT = 120.0
#: (d): the balloons must be back below this (MiB in total) this long after the workload ends
DEFLATED_MIB = 32
DEFLATE_TIMEOUT = 60.0


class ScenarioError(LocalError):
    """The scenario could not be set up (no memory cgroup of our own to nest one in, or not
    cgroup v1).

    Raised by :class:`ChildCgroup`; caught by ``scripts/overcommit`` (exit 1 with the reason)
    and by the overcommit test (which fails, saying why)."""


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
            path.mkdir(exist_ok=True)
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

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


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
    deflated_seconds: float | None = None  # (d): until the balloons came back
    decisions: int = 0
    timeline: list[dict[str, Any]] = field(default_factory=list)  # for the chart

    @property
    def oom_kills(self) -> int:
        return self.cgroup_oom_kills + self.guest_oom_kills

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("timeline")
        return d


def format_table(results: Sequence[RunResult]) -> str:
    head = (
        f"{'scenario':<10}{'policy':<7}{'cgOOM':>6}{'guestOOM':>9}{'peak/limit MB':>16}"
        f"{'busy s':>8}{'regained MB':>12}{'pauses':>7}  killed"
    )
    lines = [head]
    for r in results:
        busy = "-" if r.busy_seconds is None else f"{r.busy_seconds:.1f}"
        lines.append(
            f"{r.scenario:<10}{r.policy:<7}{r.cgroup_oom_kills:>6}{r.guest_oom_kills:>9}"
            f"{f'{r.peak_bytes / MIB:.0f}/{r.limit_bytes / MIB:.0f}':>16}{busy:>8}"
            f"{r.regained_bytes / MIB:>12.0f}{r.backstop_pauses:>7}  {','.join(r.killed) or '-'}"
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


class Lab:
    """vdev (in this process) with three sockets, three guests in one child cgroup."""

    def __init__(
        self, qemu: QemuBinary, image: LinuxImage, workdir: Path, nursery: trio.Nursery
    ) -> None:
        from vdev.registry import GuestRegistry
        from vdev.server import Server

        self.qemu, self.image, self.workdir, self.nursery = qemu, image, workdir, nursery
        self.cgroup = ChildCgroup(f"vballoon-overcommit-{os.getpid()}")
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

    async def start(self) -> None:
        await self.nursery.start(self.server.run)

    async def close(self) -> None:
        for vm in self.vms:
            if vm.scope is not None:
                vm.scope.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await self.server.shutdown()
            while self.cgroup.procs.read_text().strip():
                await trio.sleep(0.05)
        self.cgroup.remove()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def vm(self, name: str) -> Vm:
        return next(v for v in self.vms if v.name == name)

    async def _guest_task(
        self, vm: Vm, index: int, *, task_status: trio.TaskStatus[LinuxGuest]
    ) -> None:
        with trio.CancelScope() as scope:
            vm.scope = scope
            try:
                async with boot_guest(
                    self.qemu,
                    self.image,
                    self.sockets[index],
                    ram_mib=vm.ram_mib,
                    append="vb.interval=100000",
                    stderr_path=self.workdir / f"{vm.name}.qemu.err",
                    cgroup_procs=self.cgroup.procs,
                ) as guest:
                    task_status.started(guest)
                    await guest.proc.wait()
            finally:
                vm.dead = True

    async def ensure_guests(self) -> None:
        """Boot the guests that are not running (all at first; those killed since)."""
        self.cgroup.set_limit(None)
        for index, vm in enumerate(self.vms):
            if vm.guest is None or vm.dead:
                with trio.fail_after(30):  # vdev lets go of the dead QEMU's RAM first
                    while self.registry.view(vm.name).connected:
                        await trio.sleep(0.05)
                vm.dead = False
                with trio.fail_after(120):
                    vm.guest = await self.nursery.start(self._guest_task, vm, index)
        with trio.fail_after(60):
            for vm in self.vms:
                while not self.registry.view(vm.name).driver_active:
                    await trio.sleep(0.1)

    def alive(self) -> list[Vm]:
        return [vm for vm in self.vms if vm.guest is not None and not vm.dead]

    async def deflate_all(self) -> None:
        for vm in self.vms:
            self.registry.set_target(vm.name, 0)
        with trio.fail_after(60):
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
            with trio.move_on_after(20):
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
            backstop_deadline=60.0,
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


async def _timeline(lab: Lab, out: list[dict[str, Any]], t0: float) -> None:
    while True:
        point: dict[str, Any] = {"t": time.monotonic() - t0, "usage": lab.cgroup.usage()}
        for vm in lab.vms:
            view = lab.registry.view(vm.name)
            point[vm.name] = {
                "resident": int(view.ram_allocated_bytes) if view.connected else 0,
                "balloon": int(view.size_pages) * 4096,
                "target": int(view.target_pages) * 4096,
            }
        out.append(point)
        await trio.sleep(0.1)


async def flush(lab: Lab, vm: Vm) -> None:
    """Make the guest's free memory non-resident on the host, as if never touched: inflate
    its balloon over (almost) all of its free memory (vdev punches the pages out of the RAM
    file), then deflate (the pages come back as holes until the guest writes them)."""
    assert vm.guest is not None
    free_mib = (await vm.guest.report()).kib("MemFree") // 1024
    target = max(0, free_mib - 24) * PAGES_PER_MIB
    lab.registry.set_target(vm.name, target)
    with trio.fail_after(60):
        last, still = -1, 0
        while still < 5:  # until the balloon stops growing (it may not reach the target)
            size = lab.registry.view(vm.name).size_pages
            still = still + 1 if size == last else 0
            last = size
            if size >= target:
                break
            await trio.sleep(0.1)
    lab.registry.set_target(vm.name, 0)
    with trio.fail_after(60):
        while lab.registry.view(vm.name).size_pages > 0:
            await trio.sleep(0.1)


async def prepare(lab: Lab, scenario: str) -> None:
    """The busy guest's free memory non-resident (its workload needs new host memory); the
    idle guests' free memory host-resident (they touched and freed it), except vm2's in
    ``c`` (never touched)."""
    await lab.deflate_all()
    busy = lab.vm("vm0")
    assert busy.guest is not None
    await busy.guest.workload(0)
    await flush(lab, busy)
    touch = ["vm1"] if scenario == "c" else ["vm1", "vm2"]
    if scenario == "c":
        await flush(lab, lab.vm("vm2"))
    for name in touch:
        guest = lab.vm(name).guest
        assert guest is not None
        with trio.fail_after(60):
            await guest.workload(TOUCH_MIB)
            await guest.workload(0)


async def busy_workload(guest: LinuxGuest, scenario: str) -> None:
    if scenario == "a":
        steps = WORKLOAD_MIB // SLOW_STEP_MIB
        await guest.run(
            f"for i in $(seq {steps}); do dd if=/dev/zero of=/tmp/slow$i bs=1M"
            f" count={SLOW_STEP_MIB} 2>/dev/null; sleep {SLOW_STEP_PAUSE}; done"
        )
    else:
        await guest.workload(WORKLOAD_MIB)


async def run_one(lab: Lab, scenario: str, policy: str) -> RunResult:
    await lab.ensure_guests()
    await prepare(lab, scenario)
    kills_before = lab.cgroup.oom_kills()
    guest_ooms_before = await lab.guest_oom_kills()
    limit = lab.cgroup.usage() + HEADROOM_MIB * MIB
    lab.cgroup.set_limit(limit)
    lab.cgroup.reset_peak()
    regained_before = lab.reclaimed()
    timeline: list[dict[str, Any]] = []
    busy_seconds: float | None = None
    deflated: float | None = None
    pauses = decisions = 0
    busy = lab.vm("vm0")
    assert busy.guest is not None
    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_timeline, lab, timeline, t0)
        async with policy_running(lab, policy) as control:
            await trio.sleep(SETTLE)  # every policy gets the same look before the workload
            with trio.move_on_after(RUN_TIMEOUT):
                try:
                    await busy_workload(busy.guest, scenario)
                    busy_seconds = time.monotonic() - t0
                except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # its QEMU was killed
            if scenario == "d" and busy_seconds is not None and not busy.dead:
                await busy.guest.workload(0)
                t1 = time.monotonic()
                with trio.move_on_after(DEFLATE_TIMEOUT):
                    while (
                        sum(lab.registry.view(v.name).size_pages for v in lab.vms)
                        > DEFLATED_MIB * PAGES_PER_MIB
                    ):
                        await trio.sleep(0.2)
                    deflated = time.monotonic() - t1
            await trio.sleep(0.5)  # the kernel's kill, if any, lands
            if control is not None:
                decisions = control.steps
                if control.backstop is not None:
                    pauses = control.backstop.pauses
        nursery.cancel_scope.cancel()
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
        deflated_seconds=deflated,
        decisions=decisions,
        timeline=timeline,
    )
    lab.cgroup.set_limit(None)
    result.guest_oom_kills = max(0, await lab.guest_oom_kills() - guest_ooms_before)
    if busy.guest is not None and not busy.dead:
        with trio.move_on_after(30):
            await busy.guest.run("rm -f /tmp/slow*")
    return result


async def run_suite(
    qemu: QemuBinary,
    image: LinuxImage,
    workdir: Path,
    scenarios: Sequence[str] = SCENARIOS,
    policies: Sequence[str] = POLICIES,
) -> list[RunResult]:
    """Every scenario under every policy, on one set of guests (rebooted after a kill)."""
    results: list[RunResult] = []
    async with trio.open_nursery() as nursery:
        lab = Lab(qemu, image, workdir, nursery)
        await lab.start()
        try:
            for scenario in scenarios:
                for policy in policies:
                    r = await run_one(lab, scenario, policy)
                    log.info("scenario %s policy %s: %s", scenario, policy, r.row())
                    results.append(r)
        finally:
            await lab.close()
            nursery.cancel_scope.cancel()
    (workdir / "overcommit.json").write_text(
        json.dumps([{**r.row(), "timeline": r.timeline} for r in results], indent=1)
    )
    return results


# --------------------------------------------------------------------------- chart and CLI


def plot_results(results: Sequence[RunResult], path: Path) -> Path:
    """One panel per (scenario, policy): the cgroup's usage against its limit, each VM's
    host-resident memory (its RAM file) and balloon, and every target the policy set
    (markers where a target changed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({r.scenario for r in results})
    policies = [p for p in POLICIES if any(r.policy == p for r in results)]
    fig, axes = plt.subplots(
        len(scenarios), len(policies), figsize=(5.2 * len(policies), 3.4 * len(scenarios)),
        squeeze=False, sharey=True,
    )  # fmt: skip
    colours = {"vm0": "tab:red", "vm1": "tab:blue", "vm2": "tab:green"}
    for r in results:
        ax = axes[scenarios.index(r.scenario)][policies.index(r.policy)]
        t = [p["t"] for p in r.timeline]
        ax.plot(
            t, [p["usage"] / MIB for p in r.timeline], color="black", lw=2, label="cgroup usage"
        )
        ax.axhline(r.limit_bytes / MIB, color="black", ls="--", lw=1, label="limit")
        for name, colour in colours.items():
            res = [p[name]["resident"] / MIB for p in r.timeline]
            bal = [p[name]["balloon"] / MIB for p in r.timeline]
            tgt = [p[name]["target"] / MIB for p in r.timeline]
            ax.plot(t, res, color=colour, lw=1.2, label=f"{name} resident")
            ax.plot(t, bal, color=colour, lw=1, ls=":", label=f"{name} balloon")
            changes = [i for i in range(1, len(tgt)) if tgt[i] != tgt[i - 1]]
            ax.plot([t[i] for i in changes], [tgt[i] for i in changes], ls="none",
                    marker="|", color=colour, ms=6)  # fmt: skip
        kills = r.cgroup_oom_kills + r.guest_oom_kills
        ax.set_title(
            f"({r.scenario}) {SCENARIO_TITLES[r.scenario]}\n{r.policy}: "
            + (f"{kills} OOM kill(s), {','.join(r.killed)}" if kills else "no OOM kill"),
            fontsize=9, color="red" if kills else "black",
        )  # fmt: skip
        ax.set_xlabel("s")
        ax.set_ylabel("MiB")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
