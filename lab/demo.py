"""``scripts/demo``: vballoon end to end, live, on built-in defaults; ends by itself.

Three acts, each against the real ``vdev serve`` (a child process) driven through its
management API (:mod:`lab.vdev_process`), as an operator would:

1. **One guest follows its target.** ``guest-driver run`` (our vmw_balloon.c-like driver
   over our vhost-user front-end) with 4 GiB of sparse guest RAM (a memfd) and a small
   workload; the target is changed through the API (``PUT /vms/vm0/target``) and the
   balloon follows it while the guest RAM's host footprint (the memfd's allocated size, as
   vdev reports it) falls and rises.
2. **The host policy under pressure.** ``vdev serve --socket-count 3 --host-memory 16G``
   (a simulated host) with three 1 GiB guests of high, normal and low shares; the host's
   free memory is lowered step by step (``PUT /host/simulated``) and the policy (ESXi's
   model: host states, min-funding revocation by shares) balloons the guests, low shares
   first. Ends with ``vdev stat`` and ``vdev plot`` PNGs in the run directory.
3. **A real VM.** With QEMU >= 10.2 (``vhost-user-test-device-pci``) and the cached Linux
   image from ``scripts/setup``: an unmodified Linux guest whose in-kernel
   ``virtio_balloon`` binds to ``vdev serve --device virtio-balloon``, inflates to a target
   set through the API, and QEMU's ``RssShmem`` falls. Otherwise the qtest guest on the
   host's QEMU 10 (the same vmw driver core, the device behind ``vhost-user-gpio-pci``).

``python -m lab.demo [--act N ...] [--quick] [--out DIR]``. Logs and pictures go
to ``runs/demo-<time>/`` (printed). The exit status is 1 if an act's own checks failed. The
last lines (``act N: ...``) are the numbers ``tests/test_demo.py`` checks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import trio

from lab.qemu import qemu_process
from lab.vdev_process import REPO_ROOT, vdev_serve
from protocol.units import PAGE_SIZE, PAGES_PER_MIB

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

PAGE = PAGE_SIZE
MiB = 1 << 20
GiB = 1 << 30


def mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.0f}"


@dataclass
class Demo:
    """What every act shares: the console, the run directory, the pace, the results."""

    console: Console
    run_dir: Path
    quick: bool
    qtest: bool = False  # act 3 on the qtest guest even when the Linux guest could run
    results: list[tuple[bool, str]] = field(default_factory=list)

    def result(self, ok: bool, line: str) -> None:
        self.results.append((ok, line))

    def header(self, title: str, what: str) -> None:
        self.console.line()
        self.console.rule(f"[bold]{title}")
        if what:
            self.console.print(what, highlight=False)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)


def make_console() -> Console:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log or a README: wide enough for the tables
        console = Console(width=max(console.width, 120))
    return console


async def call(fn: Any, *args: Any, **kw: Any) -> Any:
    """A synchronous API call in a worker thread."""
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


# =======================================================================================
# Act 1: one guest follows its target


@dataclass
class Step:
    target: int  # bytes
    label: str  # what is asked and why it matters
    short: str  # for the table


ACT1_STEPS = [
    Step(2 * GiB, "inflate to 2 GiB", "2 GiB"),
    Step(3 * GiB, "ask for 3 GiB: capped at 65 % of RAM (Mem.CtlMaxPercent)", "3 GiB (capped)"),
    Step(1 * GiB, "deflate to 1 GiB: the workload's page cache refills guest RAM", "1 GiB"),
    Step(int(2.5 * GiB), "inflate to 2.5 GiB: cache dropped, its pages reclaimed on the host",
         "2.5 GiB"),
    Step(0, "target 0: deflate everything", "0"),
]  # fmt: skip
ACT1_QUICK = [ACT1_STEPS[0], ACT1_STEPS[1], ACT1_STEPS[4]]
WORKLOAD = "256M:512M:12:1536M:128M"  # guest-driver run --workload: app base/swing, cache
ACT1_RAM = 4 * GiB
WARM = int(1.75 * GiB)  # host memory the guest's workload fills before the first step


def _query(control: str) -> dict[str, Any] | None:
    from guest_driver.cli import query_control

    try:
        return query_control(control, {"cmd": "stat"}, timeout=2)
    except (OSError, ValueError):
        return None


async def act1(demo: Demo) -> None:
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    console, ram = demo.console, ACT1_RAM
    steps = ACT1_QUICK if demo.quick else ACT1_STEPS
    dwell = 2.5 if demo.quick else 4.5  # seconds on each step at least
    demo.header(
        "Act 1: one guest follows its balloon target",
        f"vdev serve + guest-driver run (our vmw_balloon.c-like driver over our vhost-user "
        f"front-end), {ram // GiB} GiB of sparse guest RAM (a memfd), a workload with page "
        f"cache; each target is set through the API (PUT /vms/vm0/target, as `vdev set-target` "
        f"does).",
    )
    progress = Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(bar_width=50),
        TextColumn("{task.fields[text]}"),
        console=console,
    )
    t_target = progress.add_task("balloon target", total=ram, text="")
    t_size = progress.add_task("balloon size", total=ram, text="")
    t_host = progress.add_task("host memory", total=ram, text="")
    t_work = progress.add_task("guest app+cache", total=ram, text="")
    rows: list[tuple[str, int, int, int, float | None, int]] = []
    tmp = Path(tempfile.mkdtemp(prefix="vbdemo1-"))
    try:
        async with vdev_serve(tmp, log_path=demo.run_dir / "act1-vdev.log") as vdev:
            sock = str(vdev.socket_path)
            control = sock + ".guest"
            argv = [sys.executable, "-m", "guest_driver", "run", "--socket", sock,
                    "--memory", str(ram), "--workload", WORKLOAD, "--control", control]  # fmt: skip
            with open(demo.run_dir / "act1-guest.log", "ab") as glog:
                async with qemu_process(argv, stdout=glog.fileno(), stderr=glog.fileno()):
                    state: dict[str, Any] = {}

                    async def sample() -> dict[str, Any]:
                        vm = await vdev.vm()
                        stat = await trio.to_thread.run_sync(_query, control)
                        target, host = vm["target_bytes"], vm["ram_allocated_bytes"]
                        progress.update(t_target, completed=target, text=f"{mib(target):>6} MiB")
                        progress.update(t_host, completed=host, text=f"{mib(host):>6} MiB")
                        if stat is not None:
                            state["stat"] = stat
                            d, mi = stat["driver"], stat["meminfo"]
                            size = d["current"] * PAGE
                            used = (mi["app"] + mi["cache"]) * PAGE
                            progress.update(
                                t_size,
                                completed=size,
                                text=f"{mib(size):>6} MiB  ({d['size_2m']} x 2M, "
                                f"{d['size_4k']} x 4k)",
                            )
                            progress.update(t_work, completed=used, text=f"{mib(used):>6} MiB")
                        return vm

                    with Live(progress, console=console, refresh_per_second=10):
                        start = time.monotonic()
                        with trio.fail_after(20):  # the driver starts (MCTL? = Y)
                            while not (vm := await sample())["driver_active"]:
                                await trio.sleep(0.2)
                        # the workload warms up until the guest has used a good part of its RAM
                        # (app and cache), so that a balloon must take memory it touched
                        with trio.move_on_after(10):
                            while vm["ram_allocated_bytes"] < WARM:
                                await trio.sleep(0.25)
                                vm = await sample()
                        host_start = vm["ram_allocated_bytes"]
                        rows.append(("start", 0, 0, host_start, None, 0))
                        for step in steps:
                            t0 = time.monotonic()
                            got = await vdev.set_target(step.target // PAGE)
                            console.print(
                                f"[cyan]{t0 - start:5.1f}s[/] {step.label}  [dim]-> MCTLTGT "
                                f"{mib(got['target_bytes'])} MiB ({got['reason']})[/]",
                                highlight=False,
                            )
                            reached: float | None = None
                            while (now := time.monotonic()) - t0 < 30:
                                vm = await sample()
                                if reached is None and vm["size_pages"] == vm["target_pages"]:
                                    reached = now - t0
                                if reached is not None and now - t0 >= dwell:
                                    break
                                await trio.sleep(0.25)
                            lost = int(state.get("stat", {}).get("lost_pages", 0))
                            rows.append((step.short, vm["target_bytes"], vm["size_bytes"],
                                         vm["ram_allocated_bytes"], reached, lost))  # fmt: skip
                    final = state.get("stat")
            # the guest driver has exited (SIGTERM: START(0), balloon popped)
            after_exit = await vdev.vm()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    console.line()
    table = Table(title="Act 1: where each step ended (MiB)", title_justify="left")
    for col in ("target asked", "MCTLTGT", "balloon", "reached in", "host RAM", "lost pages"):
        table.add_column(col, justify="left" if col == "target asked" else "right")
    for short, target, size, host, reached, lost in rows:
        when = "-" if short == "start" else ("not" if reached is None else f"{reached:.1f}s")
        table.add_row(short, mib(target), mib(size), when, mib(host), str(lost))
    console.print(table)
    if final is not None:
        d = final["driver"]
        demo.note(
            f"driver: {d['general']['timer']} ticks, {d['general']['doorbell']} doorbells, "
            f"2m-lock {d['ops']['2m-lock']}, batchLock {d['ops']['batchLock']}; after the "
            f"driver exited vdev shows connected={after_exit['connected']}, balloon "
            f"{after_exit['size_pages']} pages"
        )
    steps_rows = rows[1:]
    reached_all = sum(r[4] is not None for r in steps_rows)
    fullest = max(steps_rows, key=lambda r: r[2])
    start_host, end_host = rows[0][3], steps_rows[-1][3]
    ok = (
        reached_all == len(steps_rows)
        and fullest[3] < start_host
        and end_host > fullest[3]
        and lost_ok(steps_rows)
    )
    demo.result(
        ok,
        f"act 1: balloon reached {reached_all}/{len(steps_rows)} targets "
        f"({', '.join(mib(r[1]) for r in steps_rows)} MiB); host RAM {mib(start_host)} MiB at "
        f"the start, {mib(fullest[3])} MiB with the {mib(fullest[2])} MiB balloon, "
        f"{mib(end_host)} MiB at the end",
    )


def lost_ok(rows: Sequence[tuple[Any, ...]]) -> bool:
    return all(r[5] == 0 for r in rows)


# =======================================================================================
# Act 2: the policy under pressure, three guests by their shares

ACT2_HOST = 16 * GiB
ACT2_GUEST = 1 * GiB
SHARES = {"vm0": "high", "vm1": "normal", "vm2": "low"}
#: (host free memory in MiB after the step, full run, quick run)
ACT2_STEPS = [
    (2048, True, False),
    (600, True, True),
    (350, True, False),
    (150, True, False),
    (100, False, True),
    (60, True, True),
    (40, True, True),
    (4096, True, True),
]
#: host state -> (when the host is in it, what the policy does there)
STATE_WHY = {
    "high": ("free above minFree", "no new ballooning; balloons deflate while free stays "
             "above 110 % of minFree"),
    "clear": ("free below minFree", "balloons held as they are (ESXi would break large pages)"),
    "soft": ("free below 64 % of minFree", "balloon until free is back at 74 %, rate-limited; "
             "lowest shares per page first"),
    "hard": ("free below 32 % of minFree", "balloon without the rate limit (ESXi would also "
             "compress and swap)"),
    "low": ("free below 16 % of minFree", "as in hard (ESXi would also block allocations)"),
}  # fmt: skip
STATE_STYLE = {"high": "green", "clear": "cyan", "soft": "yellow", "hard": "red", "low": "bold red"}


def act2_config() -> str:
    lines = ["# written by lab/demo.py: only the shares differ from the defaults"]
    for name, shares in SHARES.items():
        lines += [f"[vms.{name}]", f'shares = "{shares}"']
    return "\n".join(lines) + "\n"


def act2_view(host: dict[str, Any], vms: list[dict[str, Any]], note: str) -> RenderableType:
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    state = host.get("state") or "-"
    line = Text.assemble(
        ("host ", "bold"),
        (f"{state:<5}", STATE_STYLE.get(state, "")),
        f"  free {mib(host.get('free_bytes') or 0):>5} MiB of {mib(host.get('total_bytes') or 0)}"
        f"  minFree {mib(host.get('min_free_bytes') or 0)} MiB   {note}",
    )
    table = Table(box=None, padding=(0, 1), header_style="bold")
    for col in ("VM", "shares", "balloon (MCTLSZ of MCTLMAX)", "MCTLSZ", "MCTLTGT", "reason"):
        table.add_column(col, justify="right" if col.startswith("MCTL") else "left")
    for vm in vms:
        table.add_row(
            vm["name"],
            SHARES.get(vm["name"], "?"),
            ProgressBar(total=max(1, vm["max_bytes"]), completed=vm["size_bytes"], width=36),
            f"{mib(vm['size_bytes'])} MiB",
            f"{mib(vm['target_bytes'])} MiB",
            vm["reason"],
        )
    return Group(line, table)


async def act2(demo: Demo) -> None:
    from rich.live import Live
    from rich.markup import escape

    from vdev.api.client import ApiClient

    console = demo.console
    steps = [free for free, full, quick in ACT2_STEPS if (quick if demo.quick else full)]
    dwell = 1.5 if demo.quick else 3.0
    demo.header(
        "Act 2: host memory pressure, three guests ballooned by their shares",
        f"vdev serve --socket-count 3 --host-memory {ACT2_HOST // GiB}G (a simulated host, "
        f"policy on its defaults: Mem.CtlMaxPercent 65, minFree by ESXi's sliding scale); "
        f"three guest drivers with {ACT2_GUEST // GiB} GiB each, shares "
        + ", ".join(f"{n} {s}" for n, s in SHARES.items())
        + ". The host's free memory is lowered with PUT /host/simulated; the policy "
        "reclaims from the lowest shares per page first (Waldspurger's min-funding "
        "revocation) and ballooned pages come back as free host memory.",
    )
    tmp = Path(tempfile.mkdtemp(prefix="vbdemo2-"))
    config = demo.run_dir / "act2-vdev.toml"
    config.write_text(act2_config())
    extra = ["--host-memory", f"{ACT2_HOST // GiB}G", "--config", str(config)]
    peak: dict[str, Any] = {}
    released: list[dict[str, Any]] = []
    stat_text = ""
    pngs: list[Path] = []
    try:
        async with (  # sockets vm0..vm2 (guests vm0..vm2), every one listening
            vdev_serve(
                tmp,
                socket_name="vm",
                socket_count=3,
                extra=extra,
                log_path=demo.run_dir / "act2-vdev.log",
            ) as vdev,
            contextlib.AsyncExitStack() as stack,
        ):
            api = ApiClient(str(vdev.api_socket))
            stack.callback(api.close)
            for i in range(3):
                glog = stack.enter_context((demo.run_dir / f"act2-vm{i}-guest.log").open("ab"))
                argv = [sys.executable, "-m", "guest_driver", "run", "--socket",
                        str(vdev.socket_paths[i]), "--memory", str(ACT2_GUEST)]  # fmt: skip
                await stack.enter_async_context(
                    qemu_process(argv, stdout=glog.fileno(), stderr=glog.fileno())
                )
            with trio.fail_after(20):  # every driver running (MCTL? = Y)
                while not all(v["driver_active"] for v in await call(api.vms)):
                    await trio.sleep(0.2)
            # Every target the policy sets, with its reason, from the events stream: a
            # step can pass through a reason faster than the table is polled.
            told: list[tuple[str, str]] = []
            following = threading.Event()
            events_api = ApiClient(str(vdev.api_socket))
            stack.callback(events_api.close)

            def follow() -> None:
                # Ends when events_api is closed at the end of the act; how the stream then
                # fails is of no interest.
                with contextlib.suppress(Exception):
                    for event in events_api.events():
                        following.set()
                        if event.get("kind") == "target" and isinstance(event.get("name"), str):
                            told.append((event["name"], str(event.get("reason") or "")))

            threading.Thread(target=follow, name="act2-events", daemon=True).start()
            await trio.to_thread.run_sync(following.wait, 10)
            start = time.monotonic()
            note = "3 guests connected"
            with Live(console=console, refresh_per_second=8, transient=True) as live:

                async def refresh() -> tuple[dict[str, Any], list[dict[str, Any]]]:
                    host, vms = await call(api.host), await call(api.vms)
                    live.update(act2_view(host, vms, note))
                    return host, vms

                host, vms = await refresh()
                for n, free in enumerate(steps, 1):
                    before = {v["name"]: v["size_bytes"] for v in vms}
                    reasons: dict[str, list[str]] = {v["name"]: [] for v in vms}
                    told_before = len(told)
                    t0 = time.monotonic()
                    host = await call(api.set_simulated_free, free_mib=free)
                    entered = host["state"]
                    note = f"step {n}/{len(steps)}"
                    when, does = STATE_WHY[entered]
                    console.print(
                        f"[cyan]{t0 - start:5.1f}s[/] step {n}: PUT /host/simulated free={free} MiB"
                        f" -> host [{STATE_STYLE[entered]}]{entered}[/] ({when} "
                        f"{mib(host['min_free_bytes'])} MiB)\n{'':7}policy: {does}",
                        highlight=False,
                    )
                    # settled: every balloon at its target (the vmw driver moves in 2 MiB
                    # pages: within 512 pages) and nothing moved for a while
                    settled_since: float | None = None
                    last: tuple[Any, ...] = ()
                    while True:
                        host, vms = await refresh()
                        now = time.monotonic()
                        for v in vms:
                            if v["reason"] not in reasons[v["name"]]:
                                reasons[v["name"]].append(v["reason"])
                        snap = (host["state"], *((v["size_pages"], v["target_pages"]) for v in vms))
                        at_target = all(abs(v["size_pages"] - v["target_pages"]) < 512 for v in vms)
                        steady = at_target and snap == last
                        settled_since = (settled_since or now) if steady else None
                        last = snap
                        if settled_since and now - settled_since >= 1.0 and now - t0 >= dwell:
                            break
                        if now - t0 > 30:
                            console.print("[red]       (not settled after 30 s)[/]")
                            break
                        await trio.sleep(0.2)
                    settle_s = (settled_since or time.monotonic()) - t0
                    for name, polled in reasons.items():  # the policy's order first
                        from_events = [r for n, r in told[told_before:] if n == name]
                        reasons[name] = list(dict.fromkeys(from_events + polled))
                    moved = {v["name"]: v["size_bytes"] - before[v["name"]] for v in vms}
                    total = sum(moved.values())
                    what = (
                        f"{total / MiB:+.0f} MiB in {settle_s:.1f}s" if total else "nothing moved"
                    )
                    by_name = {v["name"]: v for v in vms}
                    per_vm = ", ".join(
                        f"{name}/{SHARES[name]} {mib(by_name[name]['size_bytes'])}"
                        + (f" ({why})" if (why := why_moved(reasons[name])) else "")
                        for name in sorted(SHARES, key=lambda n: SHARE_ORDER[SHARES[n]])
                    )
                    console.print(
                        f"{'':7}[bold]{what}[/]: {escape(per_vm)} MiB; host "
                        f"{host['state']}, free {mib(host['free_bytes'])} MiB",
                        highlight=False,
                    )
                    if free == steps[-2]:  # the last squeeze: the peak, before the release
                        peak = {"free": free, "host": host, "vms": vms}
                        stat_text = await vdev.cli("stat")
                    if free == steps[-1]:
                        released = vms
            for name in SHARES:
                png = demo.run_dir / f"{name}.png"
                await vdev.cli("plot", name, "-o", str(png))
                pngs.append(png)
            histories = {name: await call(api.history, name) for name in SHARES}
        combined = demo.run_dir / "act2.png"
        await trio.to_thread.run_sync(plot_act2, histories, combined)
        pngs.insert(0, combined)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    console.print(
        f"\n[bold]$ vdev stat[/]   [dim](at the peak, host free memory pushed to "
        f"{peak.get('free')} MiB; before the release)[/]"
    )
    console.print(stat_text, end="", markup=False, highlight=False, soft_wrap=True)
    console.print("[bold]$ vdev plot VM -o FILE[/]  (and a combined chart of the three):")
    for png in pngs:
        console.print(f"  {display_path(png)}", highlight=False)

    sizes = {v["name"]: v["size_bytes"] for v in peak.get("vms", [])}
    hi, no, lo = (sizes.get(n, 0) for n in ("vm0", "vm1", "vm2"))
    left = sum(v["size_bytes"] for v in released)
    ok = lo > no > hi > 0 and left == 0 and bool(released)
    demo.result(
        ok,
        f"act 2: at the peak the policy held {mib(lo + no + hi)} MiB by shares: vm2 (low) "
        f"{mib(lo)} MiB > vm1 (normal) {mib(no)} MiB > vm0 (high) {mib(hi)} MiB; after the "
        f"release {mib(left)} MiB ballooned; plots in {display_path(demo.run_dir)}",
    )


SHARE_ORDER = {"low": 0, "normal": 1, "high": 2}


def why_moved(reasons: list[str]) -> str:
    """The reasons the policy gave for a VM's target during a step: the first pressure
    state that moved it and any cap or rate limit (not hysteresis, none, or later states)."""
    told: list[str] = []
    for r in reasons:
        if r in ("hysteresis", "none") or r in told:
            continue
        if r.startswith("pressure:") and any(t.startswith("pressure:") for t in told):
            continue
        told.append(r)
    return ", ".join(told)


def display_path(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def plot_act2(histories: dict[str, dict[str, Any]], output: Path) -> None:
    """All three balloons (MCTLSZ, MCTLTGT dashed) over the host's free memory and state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vdev.cli.plot import STATE_COLOURS

    t0 = min(h["points"][0]["t"] for h in histories.values() if h["points"])
    colours = {"vm0": "tab:green", "vm1": "tab:blue", "vm2": "tab:red"}
    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(10, 6.5), dpi=100, gridspec_kw={"height_ratios": [2, 1]}
    )
    try:
        for name, h in histories.items():
            pts = h["points"]
            t = [p["t"] - t0 for p in pts]
            page = h.get("page_size", PAGE)
            c = colours.get(name, "black")
            top.plot(t, [p["size_pages"] * page / MiB for p in pts], color=c, lw=2,
                     label=f"{name} ({SHARES.get(name, '?')} shares): balloon")  # fmt: skip
            top.step(t, [p["target_pages"] * page / MiB for p in pts], where="post", color=c,
                     lw=1, ls="--", label=f"{name} target")  # fmt: skip
        top.set_ylabel("balloon MiB")
        top.set_title("vballoon act 2: three 1 GiB guests ballooned by their shares")
        top.grid(True, alpha=0.3)
        top.legend(loc="upper left", fontsize="small", ncol=2)
        pts = next(iter(histories.values()))["points"]
        t = [p["t"] - t0 for p in pts]
        bottom.plot(t, [p["host_free_bytes"] / MiB for p in pts], color="black", lw=1.5,
                    label="host free memory")  # fmt: skip
        states = [p["host_state"] for p in pts]
        start = 0
        for i in range(1, len(states) + 1):
            if i < len(states) and states[i] == states[start]:
                continue
            end = t[i] if i < len(t) else t[-1]
            bottom.axvspan(t[start], end, color=STATE_COLOURS.get(states[start], "white"), lw=0)
            wide = end - t[start] > 0.04 * (t[-1] - t[0] or 1)
            bottom.text(t[start], 0.96, states[start], fontsize="small" if wide else "x-small",
                        rotation=0 if wide else 90, va="top",
                        transform=bottom.get_xaxis_transform())  # fmt: skip
            start = i
        bottom.set_yscale("symlog", linthresh=100)
        bottom.set_ylabel("host free MiB")
        bottom.set_xlabel("seconds")
        bottom.grid(True, alpha=0.3)
        bottom.legend(loc="lower left", fontsize="small")
        fig.tight_layout()
        fig.savefig(output, format="png")
    finally:
        plt.close(fig)


# =======================================================================================
# Act 3: a real VM


async def act3(demo: Demo) -> None:
    from lab import linux_image
    from lab.qemu import TEST_DEVICE, best_qemu

    demo.header("Act 3: a real VM", "")
    try:
        q = best_qemu(need_test_device=True)
    except Exception as e:  # a broken .cache/qemu.json: say so and fall back
        q, why = None, f"cannot read the QEMU list ({e})"
    else:
        why = f"no QEMU >= 10.2 with {TEST_DEVICE} (scripts/setup installs one)"
    image = linux_image.LinuxImage.load(linux_image.default_image_dir()) if q else None
    if q is not None and image is None:
        why = f"no Linux guest image in {linux_image.default_image_dir()} (scripts/setup)"
    if demo.qtest:
        why = "--qtest asked for the qtest guest"
    elif q is not None and image is not None:
        await act3_linux(demo, q, image)
        return
    demo.note(f"[yellow]fallback:[/] {why}: the qtest guest on the host's QEMU instead.")
    await act3_qtest(demo, why)


ACT3_RAM_MIB = 256


async def act3_linux(demo: Demo, q: Any, image: Any) -> None:
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.text import Text

    from lab.linux_guest import QUIET_INTERVAL, VDEV_SOCKET_NAME, boot_guest, wait_agree

    console = demo.console
    target_mib = 64 if demo.quick else 128
    demo.note(
        f"QEMU {q.version_str} ({q.name}, TCG) boots Linux {image.kernel_version} with "
        f"{ACT3_RAM_MIB} MiB of shared memfd RAM; its balloon is `vdev serve --device "
        f"virtio-balloon` behind -device vhost-user-test-device-pci,virtio-id=5, so the "
        f"guest's own virtio_balloon driver binds to vdev. 'guest>' lines are the guest's "
        f"console."
    )

    def guest_says(rep: Any, *kinds: str) -> None:
        for line in rep.lines:
            if any(f" {k} " in line for k in kinds):
                console.print(Text.assemble(("  guest> ", "dim"), line))

    scratch = q.scratch_dir("vbd-")
    t_boot = time.monotonic()
    try:
        async with (
            vdev_serve(
                scratch,
                device="virtio-balloon",
                socket_name=VDEV_SOCKET_NAME,
                extra=["--stats-interval", "1"],
                log_path=demo.run_dir / "act3-vdev.log",
            ) as vdev,
            boot_guest(
                q,
                image,
                vdev.socket_path,
                ram_mib=ACT3_RAM_MIB,
                append=f"vb.interval={QUIET_INTERVAL}",
                stderr_path=demo.run_dir / "act3-qemu.err",
            ) as guest,
        ):
            boot_s = time.monotonic() - t_boot
            rep0 = await guest.report()
            demo.note(f"{boot_s:.1f}s: the guest is up; it reports its balloon device and memory:")
            guest_says(rep0, "virtio", "meminfo", "vmstat")
            # the guest touches its free memory, so QEMU holds it (RssShmem) before ballooning
            touch = rep0.kib("MemAvailable") // 1024 - 24
            await guest.workload(touch)
            await guest.workload(0)
            rss0 = guest.rss_shmem_kib()
            demo.note(
                f"the guest touched {touch} MiB and freed it: QEMU RssShmem {rss0 // 1024} MiB"
            )
            progress = Progress(
                TextColumn("{task.description:<22}"),
                BarColumn(bar_width=40),
                TextColumn("{task.fields[text]}"),
                console=console,
            )
            t_bal = progress.add_task("balloon (vdev MCTLSZ)", total=ACT3_RAM_MIB, text="")
            t_rss = progress.add_task("QEMU RssShmem", total=ACT3_RAM_MIB, text="")

            async def follow(pages: int) -> tuple[float, Any]:
                """Live bars until vdev and the guest's driver both hold ``pages``."""
                t0 = time.monotonic()
                with Live(progress, console=console, transient=True), trio.fail_after(60):
                    while True:
                        vm = await vdev.vm()
                        rss = guest.rss_shmem_kib()
                        progress.update(t_bal, completed=vm["size_bytes"] / MiB,
                                        text=f"{mib(vm['size_bytes']):>4} MiB")  # fmt: skip
                        progress.update(t_rss, completed=rss / 1024, text=f"{rss // 1024:>4} MiB")
                        if vm["size_pages"] == pages:
                            rep = await guest.report()
                            if rep.balloon_pages == pages:
                                return time.monotonic() - t0, rep
                        await trio.sleep(0.1)

            got = await vdev.set_target(target_mib * PAGES_PER_MIB)
            demo.note(f"PUT /vms/vm0/target {target_mib} MiB ({got['reason']}): the guest inflates")
            inflate_s, rep1 = await follow(target_mib * PAGES_PER_MIB)
            rss1 = guest.rss_shmem_kib()
            vm1 = await vdev.vm()
            demo.note(
                f"inflated in {inflate_s:.1f}s: QEMU RssShmem {rss0 // 1024} -> {rss1 // 1024} MiB"
                f" (vdev punched {mib(vm1['reclaimed_bytes_total'])} MiB out of the RAM file);"
                f" the guest:"
            )
            guest_says(rep1, "meminfo", "vmstat")
            # DEFLATE_ON_OOM: a workload bigger than free memory takes pages from the balloon
            want = rep1.kib("MemAvailable") // 1024 + 32
            await guest.workload(want)
            agreed = await wait_agree(guest, vdev)
            oom = (await guest.vmstat("oom_kill")).get("oom_kill", -1)
            vm2 = agreed.view
            demo.note(
                f"the guest asks for {want} MiB, more than it has free: its driver deflates on "
                f"OOM to {mib(vm2['size_bytes'])} MiB (vdev follows; target still "
                f"{mib(vm2['target_bytes'])} MiB), oom_kill={oom}; vdev's stats of the guest: "
                f"{mib(max(0, vm2['guest_stats'].get('stat-free-memory', 0)))} MiB free"
            )
            guest_says(agreed.report, "vmstat")
            await guest.workload(0)
            await vdev.set_target(0)
            deflate_s, _ = await follow(0)
            await guest.workload(touch)  # the guest uses its memory again
            await guest.workload(0)
            rss2 = guest.rss_shmem_kib()
            demo.note(
                f"target 0: deflated in {deflate_s:.1f}s; the guest touches its memory again: "
                f"QEMU RssShmem {rss2 // 1024} MiB"
            )
            stat = await vdev.cli("stat")
            await guest.poweroff()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    console.print("[bold]$ vdev stat[/]  (the real host; after the deflate)")
    console.print(stat, end="", markup=False, highlight=False, soft_wrap=True)
    inflated = rep1.balloon_pages
    ok = (
        inflated == target_mib * PAGES_PER_MIB
        and rss0 - rss1 >= 0.8 * target_mib * 1024
        and rss2 - rss1 >= 0.6 * target_mib * 1024
        and oom == 0
        and vm2["size_pages"] < target_mib * PAGES_PER_MIB
    )
    demo.result(
        ok,
        f"act 3: Linux {image.kernel_version} virtio_balloon inflated to "
        f"{inflated // PAGES_PER_MIB} MiB (balloon_inflate={rep1.vmstat.get('balloon_inflate', 0)}"
        f") in {inflate_s:.1f}s; QEMU RssShmem {rss0 // 1024} -> {rss1 // 1024} MiB, "
        f"{rss2 // 1024} MiB after deflate and touch; deflate on OOM to "
        f"{mib(vm2['size_bytes'])} MiB, oom_kill={oom}; QEMU {q.version_str}",
    )


async def act3_qtest(demo: Demo, why: str) -> None:
    from guest_driver.driver import BalloonDriver, DriverConfig
    from guest_driver.guest_memory import GuestMemory
    from lab.qemu import best_qemu
    from lab.qtest.launcher import qtest_vm
    from lab.qtest.virtio_pci import GuestAllocator, VirtioPci
    from lab.transport_qtest import QtestTransport, vhost_user_device

    q = best_qemu(need_test_device=False)
    if q is None:
        demo.note("[yellow]no QEMU at all here (scripts/setup installs one): act 3 skipped[/]")
        demo.result(True, f"act 3: skipped, no QEMU ({why})")
        return
    target_mib = 64 if demo.quick else 128
    touch = (4 * MiB, 220 * MiB)
    demo.note(
        f"QEMU {q.version_str} ({q.name}) with a HLT BIOS: no guest kernel, we are the guest "
        f"through qtest; vdev serve --device vmw sits behind vhost-user-gpio-pci (two "
        f"queues, an 8-byte config: vmw's shape) and the same vmw driver core as act 1 "
        f"drives it."
    )
    scratch = q.scratch_dir("vbd-")
    try:
        async with (
            vdev_serve(scratch, log_path=demo.run_dir / "act3-vdev.log") as vdev,
            qtest_vm(
                q, devices=[vhost_user_device("vmw", q)[0]],
                chardevs={"c0": vdev.socket_path}, scratch=scratch, ram_mib=ACT3_RAM_MIB,
            ) as vm,
        ):  # fmt: skip
            _, vid = vhost_user_device("vmw", q)
            dev = await VirtioPci.find(vm.qt, vid)
            t = await QtestTransport.open(dev, GuestAllocator())
            pages = GuestMemory(ACT3_RAM_MIB * MiB // PAGE, kernel_pages=1024)
            drv = BalloonDriver(t, pages, DriverConfig(poll_interval=0.1))
            await drv.work()  # START, doorbell, GUEST_ID, GET_TARGET
            await vm.qt.memset(touch[0], touch[1] - touch[0], 0x5A)
            rss0 = vm.rss_shmem_kib()

            async def fill() -> float:
                t0 = time.monotonic()
                with trio.fail_after(30):
                    while True:
                        await drv.work()
                        if drv.size == drv.target and (await vdev.vm())["size_pages"] == drv.size:
                            return time.monotonic() - t0
                        await t.wait_event(0.05)

            await vdev.set_target(target_mib * 256)
            inflate_s = await fill()
            rss1 = vm.rss_shmem_kib()
            size1 = drv.size
            demo.note(
                f"PUT /vms/vm0/target {target_mib} MiB: the driver locked {size1 // 256} MiB "
                f"in {inflate_s:.2f}s; QEMU RssShmem {rss0 // 1024} -> {rss1 // 1024} MiB"
            )
            await vdev.set_target(0)
            await fill()
            await vm.qt.memset(touch[0], touch[1] - touch[0], 0x5A)
            rss2 = vm.rss_shmem_kib()
            demo.note(f"target 0 and the memory touched again: RssShmem {rss2 // 1024} MiB")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ok = size1 == target_mib * 256 and rss0 - rss1 >= 0.8 * target_mib * 1024
    demo.result(
        ok,
        f"act 3: fell back to the qtest guest ({why}); vmw driver over QEMU {q.version_str} "
        f"inflated to {size1 // 256} MiB in {inflate_s:.2f}s; QEMU RssShmem "
        f"{rss0 // 1024} -> {rss1 // 1024} MiB, {rss2 // 1024} MiB after deflate and touch",
    )


# =======================================================================================


ACTS = {1: act1, 2: act2, 3: act3}


async def run(acts: Sequence[int], quick: bool, out: Path | None, qtest: bool = False) -> int:
    console = make_console()
    run_dir = out or REPO_ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    demo = Demo(console, run_dir, quick, qtest)
    t0 = time.monotonic()
    console.print(
        f"[bold]vballoon demo[/]{' (quick)' if quick else ''}: act"
        f"{'s' if len(acts) > 1 else ''} {', '.join(map(str, acts))}; logs and pictures in "
        f"{display_path(run_dir)}",
        highlight=False,
    )
    for n in acts:
        t_act = time.monotonic()
        try:
            await ACTS[n](demo)
        except Exception as e:  # one act failing does not hide the others
            console.print_exception(max_frames=8)
            demo.result(False, f"act {n}: FAILED: {type(e).__name__}: {e}")
        console.print(f"[dim]act {n} took {time.monotonic() - t_act:.0f}s[/]")
    console.line()
    console.rule(f"[bold]Summary ({time.monotonic() - t0:.0f}s)")
    for ok, line in demo.results:
        mark = "[green]ok[/]  " if ok else "[red]FAIL[/]"
        console.print(f"{mark} {line}", highlight=False)
    return 0 if all(ok for ok, _ in demo.results) else 1


_HELP = {"help_option_names": ["-h", "--help"]}


@click.command(name="scripts/demo", help=(__doc__ or "").split("\n\n")[0], context_settings=_HELP)
@click.option(
    "--act", "act", type=click.Choice([str(a) for a in sorted(ACTS)]), multiple=True,
    help="run only this act (repeatable); default all",
)  # fmt: skip
@click.option("--quick", is_flag=True, help="fewer, shorter steps")
@click.option(
    "--out", type=click.Path(path_type=Path), default=None,
    help="run directory for logs and PNGs (default runs/demo-<time>)",
)  # fmt: skip
@click.option(
    "--qtest", is_flag=True, help="act 3 on the qtest guest even when the Linux guest could run"
)
def main(act: tuple[str, ...], quick: bool, out: Path | None, qtest: bool) -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    acts = sorted({int(a) for a in act}) if act else sorted(ACTS)
    sys.exit(trio.run(run, acts, quick, out, qtest))


if __name__ == "__main__":
    main(prog_name="scripts/demo")
