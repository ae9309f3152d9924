"""A real Linux guest, side by side: vdev's virtio-balloon vs QEMU's built-in one.

``scripts/bench --linux [--quick]``. Two guests boot at once on the same QEMU (the one with
``vhost-user-test-device-pci``, :mod:`lab.linux_image`'s trixie kernel, TCG here): one with
QEMU's ``virtio-balloon-pci`` (driven over QMP), one with the generic vhost-user device and
``vdev serve --device virtio-balloon`` as a child process (driven over its API). Rounds
alternate between the two, so a change in the machine's load hits both alike. Each round,
for each balloon size:

1. the guest touches as much memory as the balloon will take (tmpfs ``workload``, then
   freed), so that the pages the balloon takes are resident on the host;
2. inflate: the target is set, the device's own count is polled (every ``POLL`` s: QMP
   ``query-balloon`` / ``GET /vms/vm0``) until it holds the target: time to target, pages/s,
   host RSS regained (QEMU's ``RssShmem``: the guest RAM memfd), CPU of QEMU and of vdev;
3. deflate to 0, timed the same way.

QEMU's count is polled over QMP every ``POLL`` s (a little of QEMU's CPU, counted); vdev's
arrives on its event stream (a size event per batch, pushed), so that polling its API does
not load the device being measured. The ratio vdev / QEMU of pages/s is per size, median over rounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from lab import linux_image
from lab.bench.system import MIB, proc_cpu_s
from lab.linux_guest import QUIET_INTERVAL, LinuxGuest, boot_guest
from lab.linux_image import run_guest
from lab.procfs import rss_shmem_kib
from lab.qemu import QemuBinary, Qmp, best_qemu, qmp_args
from lab.vdev_process import ApiVdev, vdev_serve
from protocol.errors import LocalError
from protocol.units import PAGE_SIZE

POLL = 0.01
APPEND = f"vb.interval={QUIET_INTERVAL}"


@dataclass
class Side:
    """One guest and the device under it."""

    name: str  # "qemu" | "vdev"
    guest: LinuxGuest
    ram_bytes: int
    set_pages: Callable[[int], Awaitable[None]]
    held_pages: Callable[[], Awaitable[int]]
    #: returns when the count may have changed (QEMU: after POLL s; vdev: on its event)
    changed: Callable[[], Awaitable[None]] = lambda: trio.sleep(POLL)
    vdev_pid: int | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def cpu(self) -> dict[str, float]:
        out = {"qemu": proc_cpu_s(self.guest.pid)}
        if self.vdev_pid is not None:
            out["vdev"] = proc_cpu_s(self.vdev_pid)
        return out


async def _wait_pages(side: Side, pages: int, timeout: float) -> float:
    """Seconds until the device holds ``pages`` (polled every POLL s)."""
    t0 = time.perf_counter()
    with trio.fail_after(timeout):
        while await side.held_pages() != pages:
            await side.changed()
    return time.perf_counter() - t0


async def _move(side: Side, pages: int, timeout: float) -> dict[str, Any]:
    before_cpu, before_rss = side.cpu(), rss_shmem_kib(side.guest.pid) * 1024
    held = await side.held_pages()
    t0 = time.perf_counter()
    await side.set_pages(pages)
    seconds = time.perf_counter() - t0 + await _wait_pages(side, pages, timeout)
    after_cpu, after_rss = side.cpu(), rss_shmem_kib(side.guest.pid) * 1024
    moved = abs(pages - held)
    return {
        "pages": moved,
        "seconds": seconds,
        "pages_per_s": moved / seconds if seconds > 0 else float("nan"),
        "rss_shmem_before": before_rss,
        "rss_shmem_after": after_rss,
        "cpu_s": {k: after_cpu[k] - before_cpu[k] for k in after_cpu},
    }


async def _round(side: Side, nbytes: int, timeout: float) -> dict[str, Any]:
    mib = nbytes // MIB
    held = await side.guest.workload(mib)  # make the pages the balloon takes resident
    await side.guest.workload(0)
    pages = nbytes // PAGE_SIZE
    inflate = await _move(side, pages, timeout)
    inflate["rss_regained"] = inflate["rss_shmem_before"] - inflate["rss_shmem_after"]
    deflate = await _move(side, 0, timeout)
    return {"balloon_bytes": nbytes, "touched_mib": held, "inflate": inflate, "deflate": deflate}


@contextlib.asynccontextmanager
async def qemu_side(
    qemu: QemuBinary, image: Any, ram_mib: int, workdir: Path
) -> AsyncIterator[Side]:
    qmp_path = workdir / "qemu-builtin.qmp"
    async with run_guest(
        qemu,
        image,
        ram_mib=ram_mib,
        append=APPEND,
        extra=["-device", "virtio-balloon-pci,id=balloon0", *qmp_args(qemu, qmp_path)],
        stderr_path=workdir / "qemu-builtin.err",
    ) as console:
        guest = LinuxGuest(console, qemu, workdir / "qemu-builtin.err")
        await guest.wait_ready()
        qmp = await Qmp.connect(qmp_path)
        ram = ram_mib * MIB

        async def set_pages(pages: int) -> None:
            await qmp.execute("balloon", {"value": ram - pages * PAGE_SIZE})

        async def held_pages() -> int:
            info = await qmp.execute("query-balloon")
            return (ram - int(info["actual"])) // PAGE_SIZE

        try:
            yield Side("qemu", guest, ram, set_pages, held_pages)
        finally:
            await qmp.aclose()


@contextlib.asynccontextmanager
async def vdev_side(
    qemu: QemuBinary, image: Any, ram_mib: int, workdir: Path, follow: str = "events"
) -> AsyncIterator[Side]:
    """``follow``: "events" (vdev's event stream, pushed) or "poll" (``GET /vms/vm0`` every
    ``POLL`` s, the way QEMU's side is followed)."""
    vdir = workdir / "vdev"
    vdir.mkdir(parents=True, exist_ok=True)
    async with (
        vdev_serve(
            vdir, device="virtio-balloon", extra=["--host-memory", "64G"], verbose=0
        ) as vdev,
        boot_guest(
            qemu, image, vdev.socket_path, ram_mib=ram_mib, append=APPEND,
            stderr_path=workdir / "qemu-vdev.err",
        ) as guest,
    ):  # fmt: skip
        api: ApiVdev = vdev
        # the bench sets manual targets up to 2/3 of the guest (1 GiB of 1536 MiB): above
        # the policy's default cap (Mem/CtlMaxPercent), which would hold the balloon short
        await api.set_setting("Mem/CtlMaxPercent", 99)

        async def set_pages(pages: int) -> None:
            await api.set_target(pages)

        if follow == "poll":
            yield Side(
                "vdev", guest, ram_mib * MIB, set_pages, api.size_pages,
                vdev_pid=vdev.proc.proc.pid,
            )  # fmt: skip
            return
        size = [await api.size_pages()]
        wake = [trio.Event()]

        async def follow_events(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            """vdev's event stream: a size event per batch, pushed (no polling load)."""
            transport = httpx.AsyncHTTPTransport(uds=str(api.api_socket))
            async with (
                httpx.AsyncClient(transport=transport, base_url="http://vdev", timeout=None) as c,
                c.stream("GET", f"/events?vm={api.name}") as stream,
            ):
                lines = stream.aiter_lines()
                await lines.__anext__()  # hello: subscribed
                size[0] = await api.size_pages()
                task_status.started()
                async for line in lines:
                    event = json.loads(line)
                    if event.get("kind") == "size":
                        size[0] = int(event["size_pages"])
                        wake[0].set()
                        wake[0] = trio.Event()

        async def held_pages() -> int:
            return size[0]

        async def changed() -> None:
            with trio.move_on_after(1.0):
                await wake[0].wait()

        async with trio.open_nursery() as nursery:
            await nursery.start(follow_events)
            yield Side(
                "vdev", guest, ram_mib * MIB, set_pages, held_pages, changed=changed,
                vdev_pid=vdev.proc.proc.pid,
            )  # fmt: skip
            nursery.cancel_scope.cancel()


def _summary(side: Side, size: int) -> dict[str, Any]:
    rows = [r for r in side.rounds if r["balloon_bytes"] == size]
    out: dict[str, Any] = {"rounds": len(rows)}
    for way in ("inflate", "deflate"):
        out[way] = {
            "pages_per_s": statistics.median(r[way]["pages_per_s"] for r in rows),
            "seconds": statistics.median(r[way]["seconds"] for r in rows),
            "qemu_cpu_s": statistics.median(r[way]["cpu_s"]["qemu"] for r in rows),
            "vdev_cpu_s": (
                statistics.median(r[way]["cpu_s"]["vdev"] for r in rows)
                if side.vdev_pid is not None
                else None
            ),
        }
    out["inflate"]["rss_regained"] = statistics.median(r["inflate"]["rss_regained"] for r in rows)
    return out


async def side_by_side(
    *,
    ram_mib: int,
    sizes: tuple[int, ...],
    rounds: int,
    timeout: float = 300.0,
    follow: str = "events",
) -> dict[str, Any]:
    """Both guests, ``rounds`` alternating rounds of every size; see the module docstring."""
    qemu = best_qemu(need_test_device=True)
    if qemu is None:
        raise LocalError("no QEMU with vhost-user-test-device-pci (run scripts/setup)")
    image = linux_image.build()
    kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
    workdir = qemu.scratch_dir("vb-linux-")  # sockets QEMU (maybe in a chroot) can see
    try:
        return await _run(qemu, image, ram_mib, sizes, rounds, workdir, timeout, kvm, follow)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _run(
    qemu: QemuBinary,
    image: Any,
    ram_mib: int,
    sizes: tuple[int, ...],
    rounds: int,
    workdir: Path,
    timeout: float,
    kvm: bool,
    follow: str = "events",
) -> dict[str, Any]:
    async with (
        qemu_side(qemu, image, ram_mib, workdir) as builtin,
        vdev_side(qemu, image, ram_mib, workdir, follow) as ours,
    ):
        for r in range(rounds):
            for size in sizes:
                pair = (builtin, ours) if r % 2 == 0 else (ours, builtin)
                for side in pair:
                    side.rounds.append(await _round(side, size, timeout))
        result: dict[str, Any] = {
            "qemu": qemu.version_str,
            "accel": "tcg",  # lab.linux_image boots every guest under TCG
            "vdev_followed_by": follow,
            "kvm_available": kvm,
            "guest_ram_mib": ram_mib,
            "rounds": rounds,
            "poll_s": POLL,
            "sizes": {},
        }
        for size in sizes:
            q, v = _summary(builtin, size), _summary(ours, size)
            result["sizes"][f"{size // MIB} MiB"] = {
                "qemu": q,
                "vdev": v,
                "ratio_vdev_over_qemu": {
                    way: v[way]["pages_per_s"] / q[way]["pages_per_s"]
                    for way in ("inflate", "deflate")
                },
            }
        result["raw_rounds"] = {"qemu": builtin.rounds, "vdev": ours.rounds}
        return result


def table(result: dict[str, Any]) -> str:
    """The side-by-side table as text (rich)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=(
            f"Linux guest ({result['guest_ram_mib']} MiB, {result['accel'].upper()}, QEMU "
            f"{result['qemu']}): vdev's virtio-balloon vs QEMU's virtio-balloon-pci, median of "
            f"{result['rounds']} alternating rounds"
        )
    )
    for col in ("balloon", "device", "inflate pages/s", "time", "RSS regained", "QEMU CPU",
                "vdev CPU", "deflate pages/s", "time", "vdev/QEMU inflate", "deflate"):  # fmt: skip
        t.add_column(col, justify="right")
    for label, row in result["sizes"].items():
        for dev in ("qemu", "vdev"):
            s = row[dev]
            i, d = s["inflate"], s["deflate"]
            vcpu = f"{i['vdev_cpu_s']:.2f} s" if i["vdev_cpu_s"] is not None else "-"
            ratio = row["ratio_vdev_over_qemu"]
            t.add_row(
                label,
                "QEMU built-in" if dev == "qemu" else "vdev",
                f"{i['pages_per_s'] / 1e3:.0f} k",
                f"{i['seconds']:.2f} s",
                f"{i['rss_regained'] / MIB:.0f} MiB",
                f"{i['qemu_cpu_s']:.2f} s",
                vcpu,
                f"{d['pages_per_s'] / 1e3:.0f} k",
                f"{d['seconds']:.2f} s",
                f"{ratio['inflate']:.2f}x" if dev == "vdev" else "",
                f"{ratio['deflate']:.2f}x" if dev == "vdev" else "",
            )
    console = Console(width=200)
    with console.capture() as cap:
        console.print(t)
    return cap.get()
