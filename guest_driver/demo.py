"""``scripts/demo``: vdev and our guest driver, live, with rich progress bars.

Starts the device (``vdev serve`` with its management API, a child process) and then
``guest-driver run`` (a child process) with 4 GiB of sparse guest RAM (a memfd) and a small
workload, changes the balloon target on a schedule through the API (``PUT /vms/vm0/target``,
what ``vdev set-target`` does) and shows the balloon following the target and the guest RAM's
host footprint (the memfd's ``st_blocks``, as vdev reports it) falling and rising. Ends by
itself with a summary table and the operator's view, ``vdev stat``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .qemu import qemu_process
from .vdev_process import vdev_serve

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30


# ---------------------------------------------------------------------------------------
# The demo


@dataclass
class Step:
    at: float  # seconds from start
    target: int  # bytes
    label: str


SCHEDULE = [
    Step(2, 2 * GiB, "inflate to 2 GiB"),
    Step(9, 3 * GiB, "ask for 3 GiB: vdev caps a balloon at 65 % of RAM"),
    Step(16, 1 * GiB, "deflate to 1 GiB: the workload's page cache refills guest RAM"),
    Step(25, int(2.5 * GiB), "inflate to 2.5 GiB: cache dropped, reclaimed on the host"),
    Step(33, 0, "target 0: deflate everything"),
]
DURATION = 40.0
WORKLOAD = "256M:512M:12:1536M:128M"  # guest-driver run --workload: app base/swing, cache


def _query(control: str) -> dict[str, Any] | None:
    from .cli import query_control

    try:
        return query_control(control, {"cmd": "stat"}, timeout=2)
    except (OSError, ValueError):
        return None


async def demo(ram: int = 4 * GiB, duration: float = DURATION) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="vballoon-demo-"))
    console.print(
        f"[bold]vballoon demo[/]: vdev serve + guest driver, {ram // GiB} GiB guest RAM "
        f"(sparse memfd); sockets and logs in {tmp}"
    )
    rows: list[tuple[str, str, str, str, str]] = []
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
    async with vdev_serve(tmp) as vdev:
        sock = str(vdev.socket_path)
        control = sock + ".guest"
        console.print(f"vdev serve: vhost-user {sock}, API {vdev.api_socket}")
        argv = [sys.executable, "-m", "guest_driver", "run", "--socket", sock,
                "--memory", str(ram), "--workload", WORKLOAD, "--control", control]  # fmt: skip
        with open(tmp / "guest.log", "ab") as guest_log:
            async with qemu_process(argv, stdout=guest_log.fileno(), stderr=guest_log.fileno()):
                start = time.monotonic()
                pending = list(SCHEDULE)
                note = "starting"
                final: dict[str, Any] | None = None
                with Live(progress, console=console, refresh_per_second=10):
                    while (now := time.monotonic() - start) < duration:
                        if pending and now >= pending[0].at:
                            step = pending.pop(0)
                            got = await vdev.set_target(step.target // PAGE)
                            note = step.label
                            console.print(
                                f"[cyan]{now:5.1f}s[/] {step.label}  [dim]PUT /vms/vm0/target "
                                f"-> {got['target_bytes'] / MiB:.0f} MiB ({got['reason']})[/]"
                            )
                        vm = await vdev.vm()
                        stat = await trio.to_thread.run_sync(_query, control)
                        target, host = vm["target_bytes"], vm["ram_allocated_bytes"]
                        progress.update(t_target, completed=target, text=f"{target / MiB:8.0f} MiB")
                        progress.update(t_host, completed=host, text=f"{host / MiB:8.0f} MiB")
                        if stat is not None:
                            final = stat
                            d, mi = stat["driver"], stat["meminfo"]
                            size = d["current"] * PAGE
                            used = (mi["app"] + mi["cache"]) * PAGE
                            progress.update(
                                t_size,
                                completed=size,
                                text=f"{size / MiB:8.0f} MiB  ({d['size_2m']} x 2M, "
                                f"{d['size_4k']} x 4k)",
                            )
                            progress.update(t_work, completed=used, text=f"{used / MiB:8.0f} MiB")
                            if not rows or rows[-1][0] != note:
                                rows.append((note, "", "", "", ""))
                            rows[-1] = (note, f"{target / MiB:.0f}", f"{size / MiB:.0f}",
                                        f"{host / MiB:.0f}", f"{stat['lost_pages']}")  # fmt: skip
                        await trio.sleep(0.25)
                stat_cmd = f"vdev stat --api-socket {vdev.api_socket}"
                vdev_stat = await vdev.cli("stat")  # the host's view, guest still connected
        # the guest driver has exited (SIGTERM: START(0), balloon popped)
        after_exit = await vdev.vm()
    console.line()
    table = Table(title="vballoon demo: where each step ended")
    for col in ("step", "target MiB", "balloon MiB", "host RAM MiB", "lost pages"):
        table.add_column(col, justify="right" if col != "step" else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if final is not None:
        d = final["driver"]
        console.print(
            f"driver: {d['general']['timer']} ticks, {d['general']['doorbell']} doorbells, "
            f"2m-lock {d['ops']['2m-lock']}, batchLock {d['ops']['batchLock']}; "
            f"device after the driver exited: connected={after_exit['connected']}, "
            f"balloon {after_exit['size_pages']} pages"
        )
    console.print(f"\n[bold]$ {stat_cmd}[/]")
    console.print(vdev_stat, end="", markup=False, highlight=False, soft_wrap=True)
    return 0


def main() -> None:
    sys.exit(trio.run(demo))


if __name__ == "__main__":
    main()
