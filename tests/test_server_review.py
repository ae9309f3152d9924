"""Server review fixes: the public stats verb and polling interval, negotiated features in
``capabilities``, isolation of one connection's bugs, no stall when a disconnected guest's
RAM is freed, vectorised reclaim planning, and no fd leak over many hostile connections."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
import trio
from control_fakes import FakeGuest, make_registry

from guest_driver.frontend import WANTED_FEATURES, VmwChannel, connect_frontend
from guest_driver.virtq import Buffer
from protocol import vhost_user as vu
from protocol import virtio_balloon as vb
from protocol.errors import FrontendError
from protocol.vhost_user import FrontendRequest as R
from protocol.vmw import ALL_CAPABILITIES, Command, Status
from vdev.api.app import OPENAPI
from vdev.api.serve import serve_api
from vdev.config import ControlConfig
from vdev.devices.base import get_personality
from vdev.devices.virtio_balloon import STATSQ, build_stats
from vdev.devices.vmw import VmwDevice
from vdev.memory import GuestMemory, RegionSpec
from vdev.policy.control import ControlPlane
from vdev.registry import GuestRegistry
from vdev.server import Server

MiB = 1 << 20
BALLOON_FEATURES = int(vb.Feature.STATS_VQ | vb.Feature.DEFLATE_ON_OOM)
STATS_GPA = 0x200000


async def start_server(
    nursery: trio.Nursery,
    tmp_path: Path,
    device: str | type = "virtio-balloon",
    *,
    sockets: int = 1,
    stats_interval: float = 0.0,
) -> tuple[Server, GuestRegistry, list[str]]:
    cls = get_personality(device) if isinstance(device, str) else device
    registry = GuestRegistry(cls.name)
    paths = [str(tmp_path / f"r{i}.sock") for i in range(sockets)]
    server = Server(registry, cls, socket_paths=paths, stats_interval=stats_interval)
    await nursery.start(server.run)
    return server, registry, paths


async def wait_for(pred: Any, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)


async def post_stats(fe: Any, free: int) -> int:
    fe.ram.write(STATS_GPA, build_stats({vb.StatTag.MEMFREE: free}))
    q = fe.queues[STATSQ]
    head = await q.driver.add([Buffer(STATS_GPA, 10)])
    await q.kick()
    return int(head)


async def returned(fe: Any, head: int) -> None:
    """The device used the stats buffer ``head`` (gave it back)."""
    q = fe.queues[STATSQ]
    with trio.fail_after(5):
        while True:
            if any(u.id == head for u in await q.driver.poll_used()):
                return
            with trio.move_on_after(0.05):
                await q.wait_call()


# ------------------------------------------------------------------------------ features


async def test_negotiated_features_reach_capabilities(nursery, tmp_path, guest_ram) -> None:
    with trio.fail_after(20):
        _, registry, [path] = await start_server(nursery, tmp_path)
        assert registry.view("vm0").capabilities == 0
        ram = guest_ram(32 * MiB)
        wanted = int(WANTED_FEATURES) | int(vb.Feature.DEFLATE_ON_OOM)
        async with connect_frontend(path, ram, wanted_features=wanted) as fe:
            await wait_for(lambda: registry.view("vm0").connected)
            assert registry.view("vm0").capabilities == int(vb.Feature.DEFLATE_ON_OOM)
            await fe.request(R.RESET_DEVICE)  # the acked features are gone
            assert registry.view("vm0").capabilities == 0
        async with connect_frontend(
            path, ram, wanted_features=int(WANTED_FEATURES) | BALLOON_FEATURES
        ):
            await wait_for(lambda: registry.view("vm0").connected)
            assert registry.view("vm0").capabilities == BALLOON_FEATURES


async def test_driver_active_follows_the_driver_not_the_features(
    nursery, tmp_path, guest_ram
) -> None:
    """MCTL?: virtio-balloon is active once its rings run (DRIVER_OK), even with no device
    feature accepted; vmw once START granted capabilities, and not while a reset is due."""
    with trio.fail_after(20):
        _, registry, [path] = await start_server(nursery, tmp_path)
        ram = guest_ram(32 * MiB)
        async with connect_frontend(path, ram, start=False) as fe:
            await wait_for(lambda: registry.view("vm0").connected)
            assert not registry.view("vm0").driver_active  # features, no DRIVER_OK yet
            await fe.start()
            view = registry.view("vm0")
            assert view.driver_active and view.capabilities == 0
            assert view.gauges == {"actual", "stats held"}  # the personality's, passed on
            await fe.request(R.RESET_DEVICE)
            assert not registry.view("vm0").driver_active
        assert not registry.view("vm0").driver_active  # disconnected

    with trio.fail_after(20):
        (tmp_path / "vmw").mkdir()
        _, registry, [path] = await start_server(nursery, tmp_path / "vmw", "vmw")
        async with connect_frontend(path, guest_ram(32 * MiB)) as fe:
            ch = VmwChannel(fe)
            await wait_for(lambda: registry.view("vm0").connected)
            assert not registry.view("vm0").driver_active  # rings run, no START yet
            await ch.call(Command.START, int(ALL_CAPABILITIES))
            assert registry.view("vm0").driver_active
            registry.demand_reset("vm0")
            await wait_for(lambda: not registry.view("vm0").driver_active)
            assert registry.view("vm0").capabilities != 0  # still granted, but reset pending
            await ch.call(Command.START, int(ALL_CAPABILITIES))
            assert registry.view("vm0").driver_active


# ------------------------------------------------------------------------------ stats


async def test_request_stats_public_verb(nursery, tmp_path, guest_ram) -> None:
    with trio.fail_after(20):
        _, registry, [path] = await start_server(nursery, tmp_path)
        assert not registry.request_stats("vm0")  # nothing connected
        with pytest.raises(KeyError):
            registry.request_stats("nope")
        ram = guest_ram(32 * MiB)
        wanted = int(WANTED_FEATURES) | BALLOON_FEATURES
        async with connect_frontend(path, ram, wanted_features=wanted) as fe:
            head = await post_stats(fe, 5)
            await wait_for(lambda: registry.view("vm0").counters["stats held"] == 1)
            assert registry.view("vm0").guest_stats["stat-free-memory"] == 5
            await trio.sleep(0.3)  # no interval: the buffer stays held
            assert registry.view("vm0").counters["stats held"] == 1
            assert registry.request_stats("vm0")
            await returned(fe, head)
            assert registry.view("vm0").counters["stats requests"] == 1
            head = await post_stats(fe, 7)  # the driver refills it
            await wait_for(lambda: registry.view("vm0").guest_stats["stat-free-memory"] == 7)


async def test_stats_interval_polls_the_guest(nursery, tmp_path, guest_ram) -> None:
    with trio.fail_after(20):
        _, registry, [path] = await start_server(nursery, tmp_path, stats_interval=0.1)
        ram = guest_ram(32 * MiB)
        wanted = int(WANTED_FEATURES) | BALLOON_FEATURES
        async with connect_frontend(path, ram, wanted_features=wanted) as fe:
            for free in (11, 12, 13):  # each buffer comes back without anyone asking
                head = await post_stats(fe, free)
                await returned(fe, head)
                assert registry.view("vm0").guest_stats["stat-free-memory"] == free
            assert registry.view("vm0").counters["stats requests"] >= 3


async def test_request_stats_on_vmw_is_false(nursery, tmp_path, guest_ram) -> None:
    with trio.fail_after(20):
        server, registry, [path] = await start_server(nursery, tmp_path, "vmw", stats_interval=0.05)
        async with connect_frontend(path, guest_ram(32 * MiB)):
            await wait_for(lambda: registry.view("vm0").connected)
            assert not registry.request_stats("vm0")
            [conn] = server.connections
            assert not await conn.refresh_stats()


def test_server_rejects_bad_stats_interval() -> None:
    with pytest.raises(ValueError):
        Server(GuestRegistry(), VmwDevice, stats_interval=-1)


class StatsGuest(FakeGuest):
    requested = 0

    def request_stats(self) -> bool:
        self.requested += 1
        return True


async def test_api_post_stats(tmp_path: Path) -> None:
    registry, [_plain] = make_registry(1 << 18)
    registry.add("vm1", "/nonexistent/vm1.sock")
    guest = StatsGuest(registry, "vm1", 1 << 18)
    registry.add("vm2", "/nonexistent/vm2.sock")  # never connected
    control = ControlPlane(registry, ControlConfig(host_memory=4 << 30))
    declared = OPENAPI["paths"]["/vms/{name}/stats"]["post"]["responses"]

    def check(r: httpx.Response) -> None:
        assert str(r.status_code) in declared, r.status_code
        schema = declared[str(r.status_code)]["content"]["application/json"]["schema"]
        jsonschema.Draft202012Validator({**schema, "components": OPENAPI["components"]}).validate(
            r.json()
        )

    api = tmp_path / "api"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.run)
            await nursery.start(
                lambda task_status: serve_api(control, str(api), task_status=task_status)
            )
            async with httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(api)), base_url="http://vdev"
            ) as c:
                r = await c.post("/vms/vm1/stats")
                check(r)
                assert r.status_code == 202 and r.json()["name"] == "vm1"
                assert guest.requested == 1
                for name in ("vm0", "vm2"):  # no request_stats / not connected
                    r = await c.post(f"/vms/{name}/stats")
                    check(r)
                    assert r.status_code == 409 and "statistics" in r.json()["error"]
                r = await c.post("/vms/nope/stats")
                check(r)
                assert r.status_code == 404
                assert (await c.get("/vms/vm1/stats")).status_code == 405
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ isolation


class BuggyVmw(VmwDevice):
    """A personality with a bug that only guest vm1 triggers."""

    def kick(self, index: int) -> Any:
        if self.ctx.name.startswith("vm1"):
            raise RuntimeError("a bug")
        return super().kick(index)


async def test_a_bug_in_one_connection_spares_the_others(nursery, tmp_path, guest_ram) -> None:
    with trio.fail_after(20):
        server, registry, paths = await start_server(nursery, tmp_path, BuggyVmw, sockets=2)
        async with connect_frontend(paths[0], guest_ram(32 * MiB)) as good:
            ch = VmwChannel(good)
            assert (await ch.call(Command.START, int(ALL_CAPABILITIES))).status == (
                Status.SUCCESS_WITH_CAPABILITIES
            )
            async with connect_frontend(paths[1], guest_ram(32 * MiB), start=False) as bad:
                with contextlib.suppress(OSError, FrontendError):
                    await bad.start()  # the first kick hits the bug
                await wait_for(lambda: not registry.view("vm1").connected)  # kicked on start
                with trio.fail_after(5), contextlib.suppress(OSError):  # the back-end closed it
                    while await bad.sock.recv(4096):
                        pass
            r = await ch.call(Command.GET_TARGET)
            assert r.status == Status.SUCCESS
            # the bad connection leaves the set once its RAM is released (in a thread)
            await wait_for(lambda: len(server.connections) == 1)


# ------------------------------------------------------------------------------ stalls


async def test_freeing_a_gone_guests_ram_does_not_stall_others(
    nursery, tmp_path, guest_ram
) -> None:
    """The front-end died: vdev holds the last fd of 2 GiB of populated RAM. Closing it
    frees the RAM synchronously (~0.7 s here); that must not happen in the trio thread."""
    size = 2 << 30
    with trio.fail_after(60):
        _, registry, [path] = await start_server(nursery, tmp_path, "vmw")
        ram = guest_ram(size, layout="flat")
        os.posix_fallocate(ram.fd, 0, size)  # populated shmem, nothing mapped
        worst = 0.0
        stop = trio.Event()

        async def ticker() -> None:
            nonlocal worst
            last = time.monotonic()
            while not stop.is_set():
                await trio.sleep(0.005)
                now = time.monotonic()
                worst = max(worst, now - last)
                last = now

        async with connect_frontend(path, ram) as fe:
            await wait_for(lambda: registry.view("vm0").ram_pages == size // 4096)
            ram.close()  # our copy of the RAM goes: vdev's is the last
            await trio.sleep(0.1)
            async with trio.open_nursery() as inner:
                inner.start_soon(ticker)
                fe.close()
                await wait_for(lambda: not registry.view("vm0").connected)
                deadline = time.monotonic() + 5
                while os.statvfs("/dev/shm") and time.monotonic() < deadline:
                    await trio.sleep(0.05)
                    if _shmem_kib() < size // 2048:  # freed (less than half of it left)
                        break
                await trio.sleep(0.1)
                stop.set()
        assert worst < 0.2, f"the trio thread stalled {worst:.3f} s"


@pytest.mark.parametrize("request_", [R.SET_MEM_TABLE, R.ADD_MEM_REG, R.REM_MEM_REG])
async def test_replacing_a_populated_table_does_not_stall_others(
    nursery, tmp_path, guest_ram, request_: R
) -> None:
    """A hostile front-end hands over its only copy of 2 GiB of populated RAM, then replaces
    (or removes) that region: vdev closing the last reference frees it synchronously
    (~0.7 s here). Another guest's round trips, and the trio thread, never stall for it."""
    size = 2 << 30
    with trio.fail_after(60):
        _, registry, paths = await start_server(nursery, tmp_path, "vmw", sockets=2)
        async with connect_frontend(paths[1], guest_ram(32 * MiB)) as other:
            ch = VmwChannel(other)
            await ch.call(Command.START, int(ALL_CAPABILITIES))
            ram = guest_ram(size, layout="flat")
            os.posix_fallocate(ram.fd, 0, size)  # populated shmem, nothing mapped
            [big] = ram.regions
            region = {
                "guest_phys_addr": big.gpa,
                "memory_size": big.size,
                "userspace_addr": big.uva,
                "mmap_offset": big.offset,
            }
            async with connect_frontend(paths[0], ram) as hostile:
                await wait_for(lambda: registry.view("vm0").ram_pages == size // 4096)
                shmem_before = _shmem_kib()
                ram.close()  # our copy of the RAM goes: vdev's is the last
                replacement = os.memfd_create("replacement", os.MFD_CLOEXEC)
                os.ftruncate(replacement, size)  # sparse: nothing to free
                worst_tick = worst_call = 0.0
                stop = trio.Event()

                async def ticker() -> None:
                    nonlocal worst_tick
                    last = time.monotonic()
                    while not stop.is_set():
                        await trio.sleep(0.005)
                        now = time.monotonic()
                        worst_tick = max(worst_tick, now - last)
                        last = now

                async def pinger() -> None:
                    nonlocal worst_call
                    while not stop.is_set():
                        t0 = time.monotonic()
                        assert (await ch.call(Command.GET_TARGET)).status == Status.SUCCESS
                        worst_call = max(worst_call, time.monotonic() - t0)
                        await trio.sleep(0.005)

                try:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(ticker)
                        inner.start_soon(pinger)
                        await trio.sleep(0.1)
                        if request_ is R.SET_MEM_TABLE:
                            small = {**region, "memory_size": 32 * MiB}
                            body = {"nregions": 1, "padding": 0, "regions": [small]}
                            await hostile.request(request_, body, [replacement])
                        elif request_ is R.ADD_MEM_REG:  # the same region again: replaces it
                            body = {"padding": 0, "region": region}
                            await hostile.request(request_, body, [replacement])
                        else:  # with an fd, which is allowed and closed unused
                            body = {"padding": 0, "region": region}
                            await hostile.request(request_, body, [os.dup(replacement)])
                        deadline = time.monotonic() + 10
                        while time.monotonic() < deadline:
                            await trio.sleep(0.05)
                            if _shmem_kib() < shmem_before - size // 2048:  # half freed
                                break
                        else:
                            raise AssertionError("the replaced RAM was never freed")
                        await trio.sleep(0.1)
                        stop.set()
                finally:
                    os.close(replacement)
                assert registry.view("vm0").connected  # replacing a table is legal
        assert worst_tick < 0.2, f"the trio thread stalled {worst_tick:.3f} s"
        assert worst_call < 0.2, f"another guest's round trip took {worst_call:.3f} s"


def _shmem_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    return 0


def test_plan_is_vectorised_and_merges(tmp_path) -> None:
    fd = os.memfd_create("plan")
    os.ftruncate(fd, 256 * MiB)
    mem = GuestMemory("t")
    try:
        mem.set_table(
            [RegionSpec(0, 32 * MiB, 0x7000_0000_0000, 0), RegionSpec(64 * MiB, 128 * MiB, 0x7000_1000_0000, 32 * MiB)],
            [fd, os.dup(fd)],
        )  # fmt: skip
        r0, _ = mem.regions
        starts = np.array([5, 3, 4, 8000, 8191, 16384, 2**60], np.uint64)
        counts = np.array([1, 1, 1, 2, 2, 3, 5], np.uint64)
        pieces = mem._plan(starts, counts)
        assert [(r is r0, o // 4096, n // 4096) for r, o, n in pieces] == [
            (True, 3, 3),
            (True, 8000, 2),
            (True, 8191, 1),
            (False, 0, 3),
        ]
        pfns = np.arange(0, 16384 + 32768, 2, dtype=np.uint64)  # scattered pages
        assert len(mem._plan(pfns, np.ones_like(pfns))) == 4096 + 16384
    finally:
        mem.close()


async def test_many_scattered_runs_reclaim_in_a_thread(monkeypatch) -> None:
    fd = os.memfd_create("scatter")
    os.ftruncate(fd, 64 * MiB)
    mem = GuestMemory("t")
    mem.set_table([RegionSpec(0, 64 * MiB, 0x7000_0000_0000, 0)], [fd])
    used: list[bool] = []
    planned_in: list[bool] = []  # planning thousands of runs is work too: in the thread
    real, real_plan = trio.to_thread.run_sync, GuestMemory._plan
    main = threading.get_ident()

    async def spy(fn: Any, *args: Any, **kw: Any) -> Any:
        used.append(True)
        return await real(fn, *args, **kw)

    def plan_spy(self: GuestMemory, *args: Any) -> Any:
        planned_in.append(threading.get_ident() == main)
        return real_plan(self, *args)

    monkeypatch.setattr(GuestMemory, "_plan", plan_spy)

    monkeypatch.setattr(trio.to_thread, "run_sync", spy)
    try:
        with trio.fail_after(10):
            pfns = np.arange(0, 8192, 2, dtype=np.uint64)  # 16 MiB in 4096 runs
            await mem.reclaim_async(pfns, np.ones_like(pfns))
            assert used == [True] and planned_in == [False]
            assert mem.reclaimed_bytes_total == 4096 * 4096
            await mem.reclaim_async(np.array([0], np.uint64), np.array([16], np.uint64))
            assert used == [True] and planned_in == [False, True]  # small: inline
    finally:
        mem.close()


# ------------------------------------------------------------------------------ fd leaks


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _hostile(path: str, i: int, ram: Any) -> None:
    """One of several ways of leaving a connection with fds in flight."""
    kind = i % 7
    if kind in (5, 6):
        async with connect_frontend(path, ram, start=False) as fe:
            if kind == 5:  # an fd together with the "no fd" flag
                request, body = R.SET_VRING_KICK, vu.u64(0 | vu.VRING_NOFD_MASK)
                extra = [os.eventfd(0)]
            else:  # a datagram socket as the back-end channel
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                a.close()
                request, body, extra = R.SET_BACKEND_REQ_FD, b"", [b.detach()]
            try:
                await fe.send_raw(vu.build_header(request, vu.VERSION, len(body)) + body, extra)
            finally:
                for fd in extra:
                    os.close(fd)
            with trio.move_on_after(1), contextlib.suppress(OSError):
                while await fe.sock.recv(4096):
                    pass
        return
    if kind == 0:  # fds with a header, then the connection dies inside the payload
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await s.connect(path)
        fds = [os.eventfd(0) for _ in range(3)]
        try:
            hdr = vu.build_header(R.SET_MEM_TABLE, vu.VERSION, 200)
            await s.sendmsg(
                [hdr + b"\0" * 10],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, np.array(fds, np.int32).tobytes())],
            )
        finally:
            for fd in fds:
                os.close(fd)
        s.close()
        return
    if kind == 1:  # too many fds
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await s.connect(path)
        fds = [os.eventfd(0) for _ in range(12)]
        try:
            hdr = vu.build_header(R.SET_VRING_CALL, vu.VERSION, 8)
            await s.sendmsg(
                [hdr + vu.u64(0)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, np.array(fds, np.int32).tobytes())],
            )
        finally:
            for fd in fds:
                os.close(fd)
        with trio.move_on_after(2), contextlib.suppress(OSError):
            while await s.recv(4096):
                pass
        s.close()
        return
    async with connect_frontend(path, ram, start=kind != 2) as fe:
        if kind == 3:  # a running device, a memory table, kick/call fds, then a bad message
            await fe.send_raw(vu.build_header(99, vu.VERSION, 0))
            with trio.move_on_after(2), contextlib.suppress(OSError):
                while await fe.sock.recv(4096):
                    pass
        elif kind == 4:  # a bad region with its fd
            fd = os.eventfd(0)
            try:
                region = {
                    "guest_phys_addr": 1 << 40,
                    "memory_size": 1 << 30,
                    "userspace_addr": 0,
                    "mmap_offset": 0,
                }
                payload = vu.build_payload(
                    vu.SINGLE_REGION, {"padding": 0, "region": region}, "region"
                )
                await fe.send_raw(
                    vu.build_header(R.ADD_MEM_REG, vu.VERSION, len(payload)) + payload, [fd]
                )
            finally:
                os.close(fd)
            with trio.move_on_after(2), contextlib.suppress(OSError):
                while await fe.sock.recv(4096):
                    pass


async def test_fifty_hostile_connections_leak_no_fd(vdev_process, guest_ram) -> None:
    server = vdev_process(sockets=2, verbose=1)
    pid = server.proc.pid
    with trio.fail_after(120):
        # one clean connection first so lazily opened fds (threads, imports) exist
        async with connect_frontend(server.paths[0], guest_ram(32 * MiB)) as fe:
            await VmwChannel(fe).call(Command.START, int(ALL_CAPABILITIES))
        await trio.sleep(0.3)
        before = _fd_count(pid)
        for i in range(50):
            await _hostile(server.paths[i % 2], i, guest_ram(32 * MiB))
        deadline = time.monotonic() + 10
        while _fd_count(pid) > before and time.monotonic() < deadline:
            await trio.sleep(0.05)
        after = _fd_count(pid)
    assert server.alive()
    assert after <= before, (before, after, sorted(os.listdir(f"/proc/{pid}/fd")))
    assert "Traceback" not in server.log()


# ------------------------------------------------------------------------------ exit time


def _time_sigterm(srv: Any) -> tuple[float, int]:
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    while srv.proc.poll() is None and time.monotonic() - t0 < 10:
        time.sleep(0.002)
    return time.monotonic() - t0, srv.proc.wait(5)


async def test_sigterm_exit_is_quick(vdev_process, guest_ram) -> None:
    """``vdev serve`` exits promptly on SIGTERM: with no guest (~0.1 s here, most of it the
    interpreter's own teardown), and with guests connected, one of them keeping its command
    ring busy (shutdown answers what is queued once, it does not serve until it goes quiet)."""
    with trio.fail_after(60):
        idle = vdev_process(sockets=2, verbose=1)
        await trio.sleep(0.3)
        took, code = await trio.to_thread.run_sync(_time_sigterm, idle)
        assert code == 0 and took < 1.5, f"exit took {took:.2f} s with no guest"

        busy = vdev_process(sockets=2, verbose=1)
        async with (
            connect_frontend(busy.paths[0], guest_ram(64 * MiB)) as a,
            connect_frontend(busy.paths[1], guest_ram(64 * MiB)) as b,
        ):
            channels = [VmwChannel(a), VmwChannel(b)]
            for ch in channels:
                await ch.call(Command.START, int(ALL_CAPABILITIES))
            calls = 0

            async def hammer() -> None:
                nonlocal calls
                with contextlib.suppress(Exception):  # until the back-end goes away
                    while True:
                        await channels[0].call(Command.GET_TARGET)
                        calls += 1

            async with trio.open_nursery() as inner:
                inner.start_soon(hammer)
                await trio.sleep(0.3)
                took, code = await trio.to_thread.run_sync(_time_sigterm, busy)
                inner.cancel_scope.cancel()
        assert calls > 0
        assert code == 0 and took < 1.5, f"exit took {took:.2f} s with busy guests"
        assert "Traceback" not in busy.log()
