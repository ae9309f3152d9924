"""``scripts/bench [--quick] [--json FILE] [--plots DIR]``: every case in one process tree.

This process is the guest side (front-ends, guest memory models, driver cores) and the
orchestrator; every ``vdev serve`` it starts is a child process. See docs/bench/README.md.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import trio

from guest_driver.driver import DEFAULT_IN_FLIGHT
from lab.bench import SCHEMA, e2e, limits, model, raw, report, system
from lab.bench.system import GIB, MIB

log = logging.getLogger("lab.bench")


@dataclass(frozen=True)
class Params:
    raw_bytes: int
    raw_per_page_pages: int
    raw_reps: int
    model_batches: int
    model_calls: int
    balloon_bytes: int
    reps: int
    batch_sizes: tuple[int, ...]
    batch_commands: int
    size_sweep_balloon: int
    size_sweep_guests: tuple[int, ...]
    reaction_bytes: int
    reaction_small_bytes: int
    doorbell_changes: int
    polling_changes: int
    polling_big_changes: int
    cost_guests: tuple[int, ...]
    cost_fixed: int
    scale_guests: tuple[int, ...]
    scale_bytes: int
    rtt_seconds: float
    in_flight: tuple[int, ...] = (1, 4, 8)
    in_flight_bytes: int = 256 * MIB
    in_flight_reps: int = 2
    extra: dict[str, Any] = field(default_factory=dict)


FULL = Params(
    raw_bytes=GIB,
    raw_per_page_pages=1 << 17,
    raw_reps=3,
    model_batches=400,
    model_calls=20000,
    balloon_bytes=GIB,
    reps=3,
    batch_sizes=(1, 8, 64, 512),
    batch_commands=256,
    size_sweep_balloon=512 * MIB,
    size_sweep_guests=(GIB, 4 * GIB, 16 * GIB),
    reaction_bytes=GIB,
    reaction_small_bytes=8 * MIB,
    doorbell_changes=200,
    polling_changes=200,
    polling_big_changes=50,
    cost_guests=(GIB, 16 * GIB, 64 * GIB),
    cost_fixed=512 * MIB,
    scale_guests=(1, 8, 32),
    scale_bytes=128 * MIB,
    rtt_seconds=3.0,
)

QUICK = Params(
    raw_bytes=256 * MIB,
    raw_per_page_pages=1 << 14,
    raw_reps=2,
    model_batches=100,
    model_calls=5000,
    balloon_bytes=256 * MIB,
    reps=1,
    batch_sizes=(8, 512),
    batch_commands=64,
    size_sweep_balloon=128 * MIB,
    size_sweep_guests=(512 * MIB, 2 * GIB),
    reaction_bytes=256 * MIB,
    reaction_small_bytes=8 * MIB,
    doorbell_changes=20,
    polling_changes=3,
    polling_big_changes=2,
    cost_guests=(GIB, 4 * GIB),
    cost_fixed=256 * MIB,
    scale_guests=(1, 8, 32),
    scale_bytes=16 * MIB,
    rtt_seconds=1.0,
    in_flight_bytes=32 * MIB,
    in_flight_reps=1,
)

SCALE_SOCKETS = 32


def _say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mode, in_flight): the repetition with the median inflate rate."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["in_flight"]), []).append(r)
    out = []
    for group in groups.values():
        group.sort(key=lambda r: r["inflate"]["pages_per_s"])
        out.append(group[len(group) // 2])
    return out


async def _basis_limits(p: Params) -> dict[str, Any]:
    """The compiled limits the ratios use (only those variants), in a worker thread."""
    _say("  limits (compiled, the ratios' variants)")
    return await trio.to_thread.run_sync(
        lambda: limits.measure_basis(
            size=p.raw_bytes, per_page_pages=p.raw_per_page_pages, reps=p.raw_reps
        )
    )


def _beside(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any] | None:
    """A case's limits from the measurements just before and after it: the larger of the
    two (conservative, as the run's limits are); None without the compiled helper."""
    if not (before.get("available") and after.get("available")):
        return None
    return {
        f"{kind}_pages_per_s": max(before[kind]["pages_per_s"], after[kind]["pages_per_s"])
        for kind in ("contiguous", "per_page")
    }


async def run_all(p: Params, quick: bool, workdir: Path | None) -> dict[str, Any]:
    t_start = time.time()
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "quick": quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_start)),
        "machine": system.machine(),
        "versions": system.versions(),
        "settings": {
            "nice": os.nice(0),
            "params": {k: v for k, v in p.__dict__.items() if k != "extra"},
        },
    }
    _say("raw limits")
    out["raw"] = raw.measure(size=p.raw_bytes, per_page_pages=p.raw_per_page_pages, reps=p.raw_reps)
    _say("device model alone")
    out["model"] = model.measure(batches=p.model_batches, calls=p.model_calls)

    async with e2e.running_vdev(SCALE_SOCKETS, workdir) as vdev, e2e.api_for(vdev) as api:
        out["vdev_pid_rss_idle"] = vdev.sample().vm_rss
        _say("throughput")
        out["throughput"] = {}
        # The limits the ratios use, measured again between the cases (before the first,
        # between each two, after the last), so each case has limits taken seconds before
        # and after it: the machine's own punch rate drifts over a run.
        beside = [await _basis_limits(p)]
        for mode in e2e.MODES:
            _say(f"  {mode}")
            # the driver as shipped (DEFAULT_IN_FLIGHT LOCK batches in flight); the sweeps
            # keep vmw_balloon's one at a time, comparable with earlier runs
            out["throughput"][mode] = await e2e.throughput(
                vdev, api, mode, p.balloon_bytes, p.reps, in_flight=DEFAULT_IN_FLIGHT
            )
            beside.append(await _basis_limits(p))
            out["throughput"][mode]["limits_beside"] = _beside(beside[-2], beside[-1])
        out["limits_beside_runs"] = beside
        _say("batch sizes")
        sweep = []
        for mode in ("2M", "4K-contiguous"):
            unit = 2 * MIB if mode == "2M" else 4096
            for b in p.batch_sizes:
                amount = min(p.balloon_bytes, b * unit * p.batch_commands)
                _say(f"  {mode} batch {b} ({amount >> 20} MiB)")
                sweep.append(await e2e.throughput(vdev, api, mode, amount, 1, batch=b))
        out["batch_sweep"] = sweep
        _say("LOCK batches in flight")
        rows = []
        for rep in range(p.in_flight_reps):  # interleaved, so a load change hits all alike
            for mode in ("4K-contiguous", "4K-scattered"):
                for k in p.in_flight:
                    _say(f"  {mode} in flight {k} ({p.in_flight_bytes >> 20} MiB, rep {rep})")
                    rows.append(
                        await e2e.throughput(vdev, api, mode, p.in_flight_bytes, 1, in_flight=k)
                    )
        out["in_flight"] = _median_rows(rows)
        _say("guest sizes")
        sizes = []
        for mode in ("2M", "4K-contiguous"):
            for g in p.size_sweep_guests:
                _say(f"  {mode} guest {g >> 20} MiB")
                sizes.append(
                    await e2e.throughput(vdev, api, mode, p.size_sweep_balloon, 1, guest_bytes=g)
                )
        out["size_sweep"] = sizes
        _say("GET_TARGET round trips")
        out["protocol"] = {"get_target_e2e": await e2e.get_target_rtt(vdev, api, p.rtt_seconds)}
        out["reaction"] = {}
        variants = [
            # (mechanism, huge pages, bytes per change, changes)
            ("doorbell", False, p.reaction_small_bytes, p.doorbell_changes),
            ("doorbell", True, p.reaction_bytes, p.doorbell_changes),
            ("polling", False, p.reaction_small_bytes, p.polling_changes),
            ("polling", True, p.reaction_bytes, p.polling_big_changes),
        ]
        for mech, huge, nbytes, changes in variants:
            key = f"{mech}, {'2 MiB' if huge else '4 KiB'} pages, {nbytes >> 20} MiB"
            _say(f"reaction latency: {key} ({changes} changes)")
            out["reaction"][key] = await e2e.reaction(
                vdev,
                api,
                doorbell=mech == "doorbell",
                changes=changes,
                balloon_bytes=nbytes,
                huge=huge,
            )
        _say("scale")
        out["scale"] = []
        for n in p.scale_guests:
            _say(f"  {n} guests")
            out["scale"].append(await e2e.scale(vdev, api, n, p.scale_bytes))
    _say("cost")
    out["cost"] = []
    for g in p.cost_guests:
        _say(f"  guest {g >> 30} GiB")
        out["cost"].append(await e2e.cost(g, fixed_bytes=p.cost_fixed))
    _say("raw limits again")
    out["raw_end"] = raw.measure(
        size=p.raw_bytes, per_page_pages=p.raw_per_page_pages, reps=p.raw_reps
    )
    out["machine"]["loadavg_at_end"] = system.loadavg()
    out["duration_s"] = time.time() - t_start
    report.derive(out)
    return out


#: (guest RAM MiB, balloon sizes, rounds) of the Linux side by side
LINUX_FULL = (1536, (128 * MIB, GIB), 3)
LINUX_QUICK = (512, (64 * MIB,), 1)


def _linux(quick: bool, json_path: Path | None, table: Path | None) -> None:
    from lab.bench import linux

    ram_mib, sizes, rounds = LINUX_QUICK if quick else LINUX_FULL
    _say(f"Linux side by side: {ram_mib} MiB guests, {rounds} rounds")
    result = trio.run(lambda: linux.side_by_side(ram_mib=ram_mib, sizes=sizes, rounds=rounds))
    result["quick"] = quick
    result["machine"] = system.machine()
    result["machine"]["loadavg_at_end"] = system.loadavg()
    text = linux.table(result)
    print(text)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.clean(result), indent=1) + "\n")
    if table is not None:
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(text)


_PATH = click.Path(path_type=Path)


_HELP = {"help_option_names": ["-h", "--help"]}


@click.command(name="scripts/bench", help=__doc__, context_settings=_HELP)
@click.option("--quick", is_flag=True, help="small sizes (CI smoke, < 2 min)")
@click.option("--json", "json_path", type=_PATH, default=None, help="write the results here")
@click.option("--plots", type=_PATH, default=None, help="write PNG charts here")
@click.option("--table", type=_PATH, default=None, help="also write the table as text")
@click.option("--workdir", type=_PATH, default=None, help="sockets and vdev logs here")
@click.option(
    "--linux",
    is_flag=True,
    help="only the Linux-guest side by side (vdev vs QEMU's virtio-balloon-pci)",
)
@click.option("-v", "--verbose", is_flag=True)
def main(
    quick: bool,
    json_path: Path | None,
    plots: Path | None,
    table: Path | None,
    workdir: Path | None,
    linux: bool,
    verbose: bool,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    if linux:
        _linux(quick, json_path, table)
        return
    params = QUICK if quick else FULL
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    results = trio.run(run_all, params, quick, workdir)
    text = report.table(results)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.clean(results), indent=1, sort_keys=False) + "\n")
    if table is not None:
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(text)
    if plots is not None:
        report.plots(results, plots)
