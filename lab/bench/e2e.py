"""End-to-end cases: our guests in this process, ``vdev serve`` in its own.

* :class:`Vdev` starts ``python -m vdev serve --socket-path DIR/vm --socket-count N
  --api-socket DIR/api.sock`` (simulated host, so the policy never interferes; a manual
  target set through the API wins) and reads its ``/proc`` figures.
* :class:`Api` talks to the management API over its unix socket (``PUT
  /vms/{name}/target``, ``PUT /settings/...``) and follows ``GET /events`` (NDJSON).
* :class:`BenchGuest` is one guest: the vhost-user front-end of
  :mod:`guest_driver.transport_vhost_user` (guest RAM = a memfd at GPA 0), the guest memory
  model of :mod:`guest_driver.guest_memory` and the vmw_balloon-faithful driver core of
  :mod:`guest_driver.driver`. ``scatter=True`` reserves every odd page, so the guest
  allocator can only hand out isolated 4 KiB pages (the worst case for the device).

Before every inflate the pages the allocator will hand out are written (one byte each), so
they are really allocated in the memfd; ``st_blocks`` of the memfd is read before and after
to check that the device really gave the memory back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio

from guest_driver.driver import BalloonDriver, DriverConfig
from guest_driver.guest_memory import GuestMemory, PageSize, PageState
from guest_driver.transport_vhost_user import VhostUserTransport, connect_transport
from lab.bench.system import GIB, MIB, ProcSample, proc_sample, self_cpu_s
from lab.vdev_process import VdevProcess, spawn_vdev
from protocol.units import PAGE_SIZE
from protocol.vmw import ALL_CAPABILITIES, Capability, Command, Request

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CAPS_2M = ALL_CAPABILITIES
CAPS_4K = ALL_CAPABILITIES & ~Capability.BATCHED_2M_CMDS
CAPS_POLL = ALL_CAPABILITIES & ~Capability.SIGNALLED_WAKEUP_CMD
#: Guest RAM beyond what a case balloons: the first 2 MiB are the "kernel" (rings, batch
#: page), and a little slack keeps every target below 99 % of RAM (Mem.CtlMaxPercent).
GUEST_SLACK = 32 * MIB


def guest_ram_for(balloon_bytes: int, *, scatter: bool = False) -> int:
    ram = balloon_bytes * (2 if scatter else 1) + GUEST_SLACK
    return -(-ram // (2 * MIB)) * (2 * MIB)


# ---------------------------------------------------------------------------------------
# vdev serve


class Vdev:
    """``vdev serve`` in a subprocess (own session), with its API socket."""

    def __init__(self, workdir: Path, sockets: int, *, log_path: Path | None = None) -> None:
        self.dir = workdir
        self.sockets = sockets
        self.sock_base = str(workdir / "vm")
        self.api_path = str(workdir / "api.sock")
        self.log_path = log_path or workdir / "vdev.log"
        self.proc: VdevProcess | None = None

    def socket_path(self, i: int) -> str:
        return f"{self.sock_base}{i}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 30.0) -> None:
        # VBALLOON_BENCH_VDEV: a script to run instead of ``-m vdev`` (A/B experiments)
        alt = os.environ.get("VBALLOON_BENCH_VDEV")
        self.proc = spawn_vdev(
            self.sock_base,
            socket_count=self.sockets,
            api_socket=self.api_path,
            log_path=self.log_path,
            verbose=0,
            target="0",
            extra=["--host-memory", "1T", "--policy-period", "3600"],
            vdev_cmd=[sys.executable, alt] if alt else None,
        )
        await self.proc.wait_listening_async(timeout)

    def sample(self) -> ProcSample:
        return proc_sample(self.pid)

    def log_tail(self, n: int = 2000) -> str:
        return self.proc.log_tail(n) if self.proc is not None else ""

    async def stop(self) -> None:
        if self.proc is not None:
            await self.proc.stop_async()


@contextlib.asynccontextmanager
async def running_vdev(sockets: int, workdir: Path | None = None) -> AsyncIterator[Vdev]:
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vbbench-")))
        vdev = Vdev(workdir, sockets)
        try:
            await vdev.start()
            yield vdev
        finally:
            with trio.CancelScope(shield=True):
                await vdev.stop()


# ---------------------------------------------------------------------------------------
# The management API


class Api:
    """The bits of the management API the cases use (async httpx over the unix socket)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=path), base_url="http://vdev", timeout=30.0
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _check(self, r: httpx.Response) -> Any:
        if r.is_error:
            raise RuntimeError(f"API {r.request.method} {r.request.url.path}: {r.text}")
        return r.json()

    async def set_target(self, name: str, pages: int) -> dict[str, Any]:
        r = await self.client.put(f"/vms/{name}/target", json={"target_pages": int(pages)})
        out: dict[str, Any] = await self._check(r)
        return out

    async def set_setting(self, path: str, value: int) -> None:
        await self._check(await self.client.put(f"/settings/{path}", json={"value": value}))

    async def vm(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = await self._check(await self.client.get(f"/vms/{name}"))
        return out

    async def follow_events(
        self,
        send: trio.MemorySendChannel[dict[str, Any]],
        vm: str | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Forward every event of ``GET /events`` (each with ``_recv``, our receive time)."""
        params = {"vm": vm} if vm else None
        async with (
            send,
            self.client.stream("GET", "/events", params=params, timeout=None) as response,
        ):
            started = False
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                event["_recv"] = time.time()
                if not started:  # the "hello" line: the stream is live
                    started = True
                    task_status.started()
                await send.send(event)


@contextlib.asynccontextmanager
async def api_for(vdev: Vdev) -> AsyncIterator[Api]:
    api = Api(vdev.api_path)
    try:
        # Let every target the cases need through (at most 99 % of a guest's RAM).
        await api.set_setting("Mem/CtlMaxPercent", 99)
        yield api
    finally:
        with trio.CancelScope(shield=True):
            await api.aclose()


# ---------------------------------------------------------------------------------------
# One guest


@dataclass
class BenchGuest:
    name: str
    transport: VhostUserTransport
    memory: GuestMemory
    driver: BalloonDriver
    u8: np.ndarray[Any, np.dtype[np.uint8]]
    batch: int | None = None

    @property
    def total_pages(self) -> int:
        return self.memory.total_pages

    def allocated(self) -> int:
        return self.transport.ram.allocated_bytes()

    def touch_free(self, pages: int) -> int:
        """Write the lowest ``pages`` free pages (what the allocator hands out next)."""
        free = np.flatnonzero(self.memory.state[: self.memory.total_pages] == PageState.FREE)
        pfns = free[:pages]
        self.u8[pfns.astype(np.int64) * PAGE_SIZE] = 0xA5
        return int(pfns.size)

    async def device_target(self) -> int:
        r = await self.transport.command(Request(int(Command.GET_TARGET), self.total_pages))
        return int(r.result)

    async def wait_device_target(self, pages: int, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while await self.device_target() != pages:
                await trio.sleep(0.0005)

    async def settle(self) -> None:
        """Reset and negotiate (one driver tick) and apply the batch-size override."""
        await self.driver.work()
        if self.batch is not None and self.driver.batching:
            self.driver.batch_max_pages = self.batch


@contextlib.asynccontextmanager
async def open_guest(
    name: str,
    path: str,
    ram_bytes: int,
    *,
    caps: Capability = CAPS_2M,
    scatter: bool = False,
    poll_interval: float = 1.0,
    batch: int | None = None,
    in_flight: int = 1,  # the bench's cases measure vmw_balloon's way unless told
) -> AsyncIterator[BenchGuest]:
    """One guest on ``path``: front-end, guest memory model, driver (reset done)."""
    async with connect_transport(path, ram_bytes) as transport:
        total = ram_bytes // PAGE_SIZE
        reserved = list(transport.reserved_ranges())
        if scatter:
            reserved += [(p, 1) for p in range(1, total, 2)]
        view = memoryview(transport.ram.mm)
        memory = GuestMemory(total, reserved=reserved, ram=view)
        config = DriverConfig(capabilities=caps, poll_interval=poll_interval, in_flight=in_flight)
        driver = BalloonDriver(transport, memory, config)
        guest = BenchGuest(name, transport, memory, driver, np.frombuffer(view, np.uint8), batch)
        try:
            await guest.settle()
            yield guest
        finally:
            with trio.move_on_after(5, shield=True):
                with contextlib.suppress(Exception):
                    await driver.close()
            memory.detach_ram()
            del guest.u8
            with contextlib.suppress(BufferError):
                view.release()


@contextlib.asynccontextmanager
async def guests(
    vdev: Vdev, api: Api, specs: Sequence[dict[str, Any]]
) -> AsyncIterator[list[BenchGuest]]:
    """Guests on sockets vm0.. (each slot's target set to 0 first: targets persist)."""
    async with contextlib.AsyncExitStack() as stack:
        opened: list[BenchGuest] = []
        for i, spec in enumerate(specs):
            await api.set_target(f"vm{i}", 0)
            opened.append(
                await stack.enter_async_context(open_guest(f"vm{i}", vdev.socket_path(i), **spec))
            )
        yield opened


# ---------------------------------------------------------------------------------------
# Inflate / deflate measurements


@dataclass
class Move:
    """One timed inflate or deflate of one guest."""

    pages: int  # 4 KiB frames moved
    seconds: float
    vdev_cpu_s: float
    guest_cpu_s: float
    freed_bytes: int  # st_blocks drop of the guest RAM file (inflate)
    touched_bytes: int
    commands: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds if self.seconds > 0 else math.nan


def _commands(driver: BalloonDriver) -> int:
    return sum(v[0] for v in driver.stats.ops.values())


async def set_and_wait(api: Api, guest: BenchGuest, pages: int) -> None:
    await api.set_target(guest.name, pages)
    await guest.wait_device_target(pages)


async def timed_move(vdev: Vdev, guest: BenchGuest, target: int) -> Move:
    """Run driver ticks until the balloon is at ``target`` (already set on the device)."""
    d = guest.driver
    start_size = d.size
    v0, c0, a0, n0 = vdev.sample().cpu_s, self_cpu_s(), guest.allocated(), _commands(d)
    t0 = time.perf_counter()
    for _ in range(1000):
        await d.work()
        if abs(d.size - target) < 512 or d.size == target:
            break
    dt = time.perf_counter() - t0
    v1, c1, a1, n1 = vdev.sample().cpu_s, self_cpu_s(), guest.allocated(), _commands(d)
    return Move(
        pages=abs(d.size - start_size),
        seconds=dt,
        vdev_cpu_s=v1 - v0,
        guest_cpu_s=c1 - c0,
        freed_bytes=a0 - a1,
        touched_bytes=0,
        commands=n1 - n0,
    )


async def inflate_deflate(vdev: Vdev, api: Api, guest: BenchGuest, pages: int) -> tuple[Move, Move]:
    """Touch, inflate ``pages`` frames, check st_blocks; then deflate to 0."""
    touched = guest.touch_free(pages + 1024)
    await set_and_wait(api, guest, pages)
    up = await timed_move(vdev, guest, pages)
    up.touched_bytes = touched * PAGE_SIZE
    await set_and_wait(api, guest, 0)
    down = await timed_move(vdev, guest, 0)
    return up, down


def move_summary(moves: Sequence[Move], *, inflate: bool) -> dict[str, Any]:
    rates = [m.pages_per_s for m in moves]
    pages = sum(m.pages for m in moves)
    gib = pages * PAGE_SIZE / GIB
    med = float(np.median(rates)) if rates else math.nan
    out: dict[str, Any] = {
        "pages_per_s": med,
        "gib_per_s": med * PAGE_SIZE / GIB,
        "samples_pages_per_s": rates,
        "pages_per_rep": [m.pages for m in moves],
        "seconds": [m.seconds for m in moves],
        "commands_per_rep": [m.commands for m in moves],
        "vdev_cpu_s_per_gib": sum(m.vdev_cpu_s for m in moves) / gib if gib else math.nan,
        "guest_cpu_s_per_gib": sum(m.guest_cpu_s for m in moves) / gib if gib else math.nan,
    }
    if inflate:
        freed = sum(m.freed_bytes for m in moves)
        out["freed_bytes"] = freed
        out["ballooned_bytes"] = pages * PAGE_SIZE
        out["touched_bytes"] = sum(m.touched_bytes for m in moves)
        # every ballooned page had been touched, and st_blocks dropped by all of them
        out["verified_st_blocks"] = bool(
            pages > 0 and freed >= 0.99 * pages * PAGE_SIZE and out["touched_bytes"] >= freed
        )
    return out


# ---------------------------------------------------------------------------------------
# Case 1: throughput


MODES: dict[str, dict[str, Any]] = {
    "2M": {"caps": CAPS_2M, "scatter": False},
    "4K-contiguous": {"caps": CAPS_4K, "scatter": False},
    "4K-scattered": {"caps": CAPS_4K, "scatter": True},
}


async def throughput(
    vdev: Vdev,
    api: Api,
    mode: str,
    balloon_bytes: int,
    reps: int,
    *,
    guest_bytes: int | None = None,
    batch: int | None = None,
    slot: int = 0,
    in_flight: int = 1,
) -> dict[str, Any]:
    spec = MODES[mode]
    ram = guest_bytes or guest_ram_for(balloon_bytes, scatter=spec["scatter"])
    pages = balloon_bytes // PAGE_SIZE
    await api.set_target(f"vm{slot}", 0)
    async with open_guest(
        f"vm{slot}",
        vdev.socket_path(slot),
        ram,
        caps=spec["caps"],
        scatter=spec["scatter"],
        batch=batch,
        in_flight=in_flight,
    ) as g:
        ups, downs = [], []
        for _ in range(reps):
            up, down = await inflate_deflate(vdev, api, g, pages)
            ups.append(up)
            downs.append(down)
        info = {
            "mode": mode,
            "guest_bytes": ram,
            "balloon_bytes": balloon_bytes,
            "batch_entries": g.driver.batch_max_pages,
            "in_flight": in_flight,
            "page_size": "2M" if g.driver.max_page_size is PageSize.SIZE_2M else "4K",
            "reps": reps,
            "inflate": move_summary(ups, inflate=True),
            "deflate": move_summary(downs, inflate=False),
        }
    return info


# ---------------------------------------------------------------------------------------
# Case 2: reaction latency


async def _next_size_event(
    recv: trio.MemoryReceiveChannel[dict[str, Any]],
    name: str,
    pred: Callable[[int], bool],
    timeout: float,
    seen: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The next ``size`` event of ``name`` whose size satisfies ``pred`` (others go to
    ``seen``)."""
    with trio.fail_after(timeout):
        async for ev in recv:
            if ev.get("name") == name and ev.get("kind") == "size" and pred(int(ev["size_pages"])):
                return ev
            if seen is not None:
                seen.append(ev)
    raise RuntimeError("event stream ended")


def _now() -> tuple[float, float]:
    """(monotonic, wall) now: the start of a reaction measurement."""
    return time.monotonic(), time.time()


def _since(event: dict[str, Any], start: tuple[float, float]) -> float:
    """Milliseconds from ``start`` to the device-side stamp of ``event``: vdev's monotonic
    stamp when it has one, else the control plane's wall-clock ``time``."""
    if "monotonic" in event:
        return (float(event["monotonic"]) - start[0]) * 1e3
    return (float(event["time"]) - start[1]) * 1e3


async def reaction(
    vdev: Vdev,
    api: Api,
    *,
    doorbell: bool,
    changes: int,
    balloon_bytes: int,
    huge: bool = True,
    poll_interval: float = 1.0,
    slot: int = 0,
) -> dict[str, Any]:
    """``changes`` target changes 0 -> ``balloon_bytes`` (each followed by a return to 0),
    the driver running its own loop (``BalloonDriver.run``: doorbell, or a GET_TARGET poll
    every ``poll_interval`` s as Linux does). The pages are touched before every change.

    Latencies are from just before the ``PUT /vms/{name}/target`` call (our
    ``time.monotonic()``) to the device-side ``monotonic`` stamp of ``GET /events`` entries
    (vdev's ``time.monotonic()``, CLOCK_MONOTONIC: the same clock in both processes; a size
    event is stamped when the device has finished the batch, its reclaim done and its
    completion given to the guest): the first balloon-size event (the first LOCK batch done:
    with 2 MiB pages one batch is up to 1 GiB, with 4 KiB pages 2 MiB) and the size event
    that reaches the target. A vdev without the stamp (``VBALLOON_BENCH_VDEV`` A/B runs of an
    older one) is measured with the wall-clock ``time`` its control plane stamps when it
    forwards the event (later than the device finished, by a scheduling round or more).
    """
    pages = balloon_bytes // PAGE_SIZE
    name = f"vm{slot}"
    caps = CAPS_2M if huge else CAPS_4K
    if not doorbell:
        caps &= ~Capability.SIGNALLED_WAKEUP_CMD
    await api.set_target(name, 0)
    first_ms: list[float] = []
    reached_ms: list[float] = []
    deflate_ms: list[float] = []
    first_batch_pages: list[int] = []
    target_ms: list[float] = []
    clocks: set[str] = set()
    verified = True
    async with (
        open_guest(
            name,
            vdev.socket_path(slot),
            guest_ram_for(balloon_bytes),
            caps=caps,
            poll_interval=poll_interval,
        ) as g,
        trio.open_nursery() as nursery,
    ):
        send, recv = trio.open_memory_channel[dict[str, Any]](math.inf)
        await nursery.start(api.follow_events, send, name)
        nursery.start_soon(g.driver.run)
        for _ in range(changes):
            g.touch_free(pages + 1024)
            a0 = g.allocated()
            while True:  # drop stale events
                try:
                    recv.receive_nowait()
                except trio.WouldBlock:
                    break
            t_api = _now()
            await api.set_target(name, pages)
            seen: list[dict[str, Any]] = []
            first = await _next_size_event(recv, name, lambda s: s > 0, 30, seen)
            reached = (
                first
                if int(first["size_pages"]) >= pages
                else await _next_size_event(recv, name, lambda s: s >= pages, 30)
            )
            for ev in seen:
                if ev.get("kind") == "target" and int(ev.get("target_pages", -1)) == pages:
                    target_ms.append(_since(ev, t_api))
                    break
            verified &= a0 - g.allocated() >= 0.99 * pages * PAGE_SIZE
            first_ms.append(_since(first, t_api))
            reached_ms.append(_since(reached, t_api))
            first_batch_pages.append(int(first["size_pages"]))
            clocks.add("monotonic" if "monotonic" in first else "wall")
            t_api = _now()
            await api.set_target(name, 0)
            gone = await _next_size_event(recv, name, lambda s: s == 0, 30)
            deflate_ms.append(_since(gone, t_api))
            # the device is empty once it answered the last UNLOCK; the driver gives those
            # pages back to the guest's pool when it reads that answer, a moment later: the
            # next change's touch_free must see them free, or it touches other pages
            with trio.fail_after(30):
                while g.driver.size:
                    await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
        poll = g.driver.config.poll_interval

    def dist(xs: list[float]) -> dict[str, Any]:
        a = np.asarray(xs, dtype=float)
        return {
            "n": int(a.size),
            "p50_ms": float(np.percentile(a, 50)),
            "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max()),
            "mean_ms": float(a.mean()),
            "samples_ms": [round(x, 3) for x in xs],
        }

    return {
        "mechanism": "doorbell" if doorbell else "polling",
        "poll_interval_s": poll if not doorbell else None,
        "changes": changes,
        "balloon_bytes": balloon_bytes,
        "page_size": "2M" if huge else "4K",
        "first_batch_pages_p50": float(np.median(first_batch_pages)),
        "clock": "+".join(sorted(clocks)),
        "verified_st_blocks": bool(verified),
        "target_event": dist(target_ms) if target_ms else None,
        "first_lock": dist(first_ms),
        "reached": dist(reached_ms),
        "deflate_reached": dist(deflate_ms),
    }


# ---------------------------------------------------------------------------------------
# Case 3: cost


async def cost(
    guest_bytes: int, *, fixed_bytes: int, workdir: Path | None = None
) -> dict[str, Any]:
    """A fresh vdev; one sparse guest of ``guest_bytes``; 4 KiB pages (the largest page map
    and the most commands); first ``fixed_bytes`` then half the guest ballooned."""
    async with running_vdev(1, workdir) as vdev, api_for(vdev) as api:
        await trio.sleep(0.5)
        base = vdev.sample()
        async with open_guest("vm0", vdev.socket_path(0), guest_bytes, caps=CAPS_4K) as g:
            connected = vdev.sample()
            fixed_pages = fixed_bytes // PAGE_SIZE
            await set_and_wait(api, g, fixed_pages)
            m1 = await timed_move(vdev, g, fixed_pages)
            half = guest_bytes // 2 // PAGE_SIZE
            await set_and_wait(api, g, half)
            m2 = await timed_move(vdev, g, half)
            await trio.sleep(0.2)
            after = vdev.sample()
    gib = guest_bytes / GIB
    moved_gib = (m1.pages + m2.pages) * PAGE_SIZE / GIB
    return {
        "guest_bytes": guest_bytes,
        "ballooned_bytes": (m1.pages + m2.pages) * PAGE_SIZE,
        "rss_base": base.vm_rss,
        "rss_anon_base": base.rss_anon,
        "rss_connected": connected.vm_rss,
        "rss_after": after.vm_rss,
        "rss_anon_after": after.rss_anon,
        "rss_shmem_after": after.rss_shmem,
        "rss_delta_per_guest_gib": (after.vm_rss - base.vm_rss) / gib,
        "rss_anon_delta_per_guest_gib": (after.rss_anon - base.rss_anon) / gib,
        "fixed_bytes": m1.pages * PAGE_SIZE,
        "fixed_vdev_cpu_s": m1.vdev_cpu_s,
        "fixed_vdev_cpu_s_per_gib": m1.vdev_cpu_s / (m1.pages * PAGE_SIZE / GIB),
        "vdev_cpu_s": m1.vdev_cpu_s + m2.vdev_cpu_s,
        "vdev_cpu_s_per_gib": (m1.vdev_cpu_s + m2.vdev_cpu_s) / moved_gib,
        "inflate_pages_per_s": (m1.pages + m2.pages) / (m1.seconds + m2.seconds),
    }


# ---------------------------------------------------------------------------------------
# Case 4: scale


def jain(xs: Sequence[float]) -> float:
    a = np.asarray(xs, dtype=float)
    return float(a.sum() ** 2 / (a.size * (a**2).sum())) if a.size else math.nan


async def scale(
    vdev: Vdev, api: Api, n: int, per_guest_bytes: int, *, mode: str = "4K-contiguous"
) -> dict[str, Any]:
    """``n`` guests (sockets vm0..) inflate ``per_guest_bytes`` each, all at once."""
    spec = MODES[mode]
    ram = guest_ram_for(per_guest_bytes, scatter=spec["scatter"])
    pages = per_guest_bytes // PAGE_SIZE
    specs = [{"ram_bytes": ram, "caps": spec["caps"], "scatter": spec["scatter"]}] * n
    async with guests(vdev, api, specs) as gs:
        touched = sum(g.touch_free(pages + 1024) for g in gs)
        a0 = [g.allocated() for g in gs]
        for g in gs:
            await api.set_target(g.name, pages)
        for g in gs:
            await g.wait_device_target(pages)
        ends: dict[str, float] = {}
        v0, c0 = vdev.sample().cpu_s, self_cpu_s()
        t0 = time.perf_counter()

        async def one(g: BenchGuest) -> None:
            for _ in range(100):
                await g.driver.work()
                if g.driver.size >= pages:
                    break
            ends[g.name] = time.perf_counter()

        async with trio.open_nursery() as nursery:
            for g in gs:
                nursery.start_soon(one, g)
        t1 = max(ends.values())
        v1, c1 = vdev.sample().cpu_s, self_cpu_s()
        freed = sum(a - g.allocated() for a, g in zip(a0, gs, strict=True))
        per = [pages / (ends[g.name] - t0) for g in gs]
    total = pages * n
    return {
        "guests": n,
        "mode": mode,
        "per_guest_bytes": per_guest_bytes,
        "aggregate_pages_per_s": total / (t1 - t0),
        "aggregate_gib_per_s": total * PAGE_SIZE / GIB / (t1 - t0),
        "per_guest_pages_per_s": per,
        "jain": jain(per),
        "seconds": t1 - t0,
        "vdev_cpu_s": v1 - v0,
        "guest_cpu_s": c1 - c0,
        "verified_st_blocks": bool(freed >= 0.99 * total * PAGE_SIZE and touched >= total),
    }


# ---------------------------------------------------------------------------------------
# Case 5: GET_TARGET round trips


async def get_target_rtt(vdev: Vdev, api: Api, seconds: float) -> dict[str, Any]:
    await api.set_target("vm0", 0)
    async with open_guest("vm0", vdev.socket_path(0), 64 * MIB) as g:
        req = Request(int(Command.GET_TARGET), g.total_pages)
        n = 0
        lat: list[float] = []
        t_end = time.perf_counter() + seconds
        t0 = time.perf_counter()
        while (now := time.perf_counter()) < t_end:
            await g.transport.command(req)
            lat.append(time.perf_counter() - now)
            n += 1
        dt = time.perf_counter() - t0
    a = np.asarray(lat) * 1e6
    return {
        "round_trips": n,
        "seconds": dt,
        "per_s": n / dt,
        "p50_us": float(np.percentile(a, 50)),
        "p99_us": float(np.percentile(a, 99)),
    }
