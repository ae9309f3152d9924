"""``scripts/demo``: vdev and our guest driver, live, with rich progress bars.

Starts the device (a subprocess), then ``guest-driver run`` (a subprocess) with 4 GiB of
sparse guest RAM (a memfd) and a small workload, applies a schedule of balloon targets and
shows the balloon following the target and the guest RAM's host footprint (the memfd's
``st_blocks``) falling and rising. Ends by itself with a summary table.

How targets are changed: ``vdev serve`` has no way yet to change a running guest's target
from outside (the management API is not wired into it), so :class:`Vdev` runs vdev's real
server (``vdev.server.Server`` + ``vdev.registry.GuestRegistry``, the code ``vdev serve``
runs) in a subprocess that takes JSON-line commands on stdin (``python -m guest_driver.demo
vdev-helper``). When ``vdev serve`` grows ``--api-socket``, :meth:`Vdev.set_target` is
the one place to switch to ``PUT /vms/{name}/target``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import trio

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30


# ---------------------------------------------------------------------------------------
# The device, in a subprocess, driven over stdin (the one place that changes targets)


class Vdev:
    """A vdev server process serving one vmw guest ``vm0`` on ``socket_path``."""

    def __init__(self, proc: trio.Process, socket_path: str) -> None:
        self.proc = proc
        self.socket_path = socket_path
        self._buf = b""
        self._lock = trio.Lock()

    @classmethod
    async def start(cls, socket_path: str, target_pages: int = 0) -> Vdev:
        cmd = [sys.executable, "-m", "guest_driver.demo", "vdev-helper", socket_path,
               str(target_pages)]
        proc = await trio.lowlevel.open_process(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None
        )
        self = cls(proc, socket_path)
        assert (await self._line())["ready"]
        return self

    async def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self._buf:
            chunk = await self.proc.stdout.receive_some(65536)
            if not chunk:
                raise RuntimeError("vdev helper exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        assert isinstance(reply, dict)
        return reply

    async def call(self, **request: Any) -> dict[str, Any]:
        async with self._lock:
            assert self.proc.stdin is not None
            await self.proc.stdin.send_all(json.dumps(request).encode() + b"\n")
            return await self._line()

    async def set_target(self, pages: int) -> None:
        """Change vm0's balloon target (later: ``PUT /vms/vm0/target`` on the API)."""
        await self.call(cmd="target", pages=pages)

    async def reset(self) -> None:
        await self.call(cmd="reset")

    async def view(self) -> dict[str, Any]:
        return (await self.call(cmd="view"))["view"]

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            with trio.move_on_after(5):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


async def _helper(socket_path: str, target: int) -> None:
    """The subprocess side of :class:`Vdev`."""
    import dataclasses
    import signal

    from vdev.device import get_personality
    from vdev.registry import GuestRegistry
    from vdev.server import Server

    registry = GuestRegistry("vmw", target=target)
    server = Server(registry, get_personality("vmw"), socket_paths=[socket_path], names=["vm0"])
    out = trio.lowlevel.FdStream(os.dup(1))
    stdin = trio.lowlevel.FdStream(os.dup(0))

    async def reply(obj: dict[str, Any]) -> None:
        await out.send_all(json.dumps(obj, default=str).encode() + b"\n")

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await reply({"ready": True})

            async def on_signal() -> None:
                async for _ in signals:
                    await server.shutdown()
                    nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            buf = b""
            while True:
                chunk = await stdin.receive_some(65536)
                if not chunk:
                    await server.shutdown()
                    nursery.cancel_scope.cancel()
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    req = json.loads(line)
                    if req["cmd"] == "target":
                        registry.set_target("vm0", int(req["pages"]))
                        await reply({"ok": True})
                    elif req["cmd"] == "reset":
                        registry.demand_reset("vm0")
                        await reply({"ok": True})
                    else:
                        view = dataclasses.asdict(registry.view("vm0"))
                        await reply({"view": view})


# ---------------------------------------------------------------------------------------
# The demo


@dataclass
class Step:
    at: float  # seconds from start
    target: int  # bytes
    label: str


SCHEDULE = [
    Step(2, 2 * GiB, "inflate to 2 GiB"),
    Step(9, 3 * GiB, "inflate to 3 GiB"),
    Step(16, 1 * GiB, "deflate to 1 GiB: the workload's page cache refills guest RAM"),
    Step(25, int(2.5 * GiB), "inflate to 2.5 GiB: cache dropped, reclaimed on the host"),
    Step(33, 0, "target 0: deflate everything"),
]
DURATION = 40.0


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
    tmp = tempfile.mkdtemp(prefix="vballoon-demo-")
    sock = os.path.join(tmp, "vm0.sock")
    control = sock + ".guest"
    console.print(f"[bold]vballoon demo[/]: vdev + guest driver, {ram // GiB} GiB guest RAM "
                  f"(sparse memfd), sockets in {tmp}")
    vdev = await Vdev.start(sock, 0)
    guest = await trio.lowlevel.open_process(
        [sys.executable, "-m", "guest_driver", "run", "--socket", sock, "--memory", str(ram),
         "--workload", "256M:512M:12:1536M:128M", "--control", control],
    )
    rows: list[tuple[str, str, str, str, str]] = []
    progress = Progress(
        TextColumn("{task.description:<16}"), BarColumn(bar_width=50),
        TextColumn("{task.fields[text]}"), console=console,
    )
    t_target = progress.add_task("balloon target", total=ram, text="")
    t_size = progress.add_task("balloon size", total=ram, text="")
    t_host = progress.add_task("host memory", total=ram, text="")
    t_work = progress.add_task("guest app+cache", total=ram, text="")
    start = time.monotonic()
    pending = list(SCHEDULE)
    note = "starting"
    try:
        with Live(progress, console=console, refresh_per_second=10):
            while (now := time.monotonic() - start) < duration:
                if pending and now >= pending[0].at:
                    step = pending.pop(0)
                    await vdev.set_target(step.target // PAGE)
                    note = step.label
                    console.print(f"[cyan]{now:5.1f}s[/] {step.label}")
                stat = await trio.to_thread.run_sync(_query, control)
                if stat is not None:
                    d, mi = stat["driver"], stat["meminfo"]
                    size, target = d["current"] * PAGE, d["target"] * PAGE
                    host = stat["ram_allocated_bytes"]
                    used = (mi["app"] + mi["cache"]) * PAGE
                    progress.update(t_target, completed=target, text=f"{target / MiB:8.0f} MiB")
                    progress.update(t_size, completed=size,
                                    text=f"{size / MiB:8.0f} MiB  ({d['size_2m']} x 2M, "
                                         f"{d['size_4k']} x 4k)")
                    progress.update(t_host, completed=host, text=f"{host / MiB:8.0f} MiB")
                    progress.update(t_work, completed=used, text=f"{used / MiB:8.0f} MiB")
                    if not rows or rows[-1][0] != note:
                        rows.append((note, "", "", "", ""))
                    rows[-1] = (note, f"{target / MiB:.0f}", f"{size / MiB:.0f}",
                                f"{host / MiB:.0f}", f"{stat['lost_pages']}")
                await trio.sleep(0.25)
        final = await trio.to_thread.run_sync(_query, control)
    finally:
        if guest.returncode is None:
            guest.terminate()
            with trio.move_on_after(5):
                await guest.wait()
        view = await vdev.view()
        await vdev.stop()
    table = Table(title="vballoon demo: where each step ended")
    for col in ("step", "target MiB", "balloon MiB", "host RAM MiB", "lost pages"):
        table.add_column(col, justify="right" if col != "step" else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if final is not None:
        d = final["driver"]
        console.print(f"driver: {d['general']['timer']} ticks, {d['general']['doorbell']} "
                      f"doorbells, 2m-lock {d['ops']['2m-lock']}, "
                      f"batchLock {d['ops']['batchLock']}; "
                      f"device after exit: connected={view['connected']}")
    return 0


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "vdev-helper":
        trio.run(_helper, sys.argv[2], int(sys.argv[3]))
        return
    sys.exit(trio.run(demo))


if __name__ == "__main__":
    main()
