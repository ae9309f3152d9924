"""Watching the VMs' memory cgroup: parsers and resolution (v1 and v2), kernel notifications
and the backstop on a real cgroup v1 child of our own memory cgroup, the control plane's
source and wake-ups, MoM's rules, and the new config keys.

cgroup v2 has no memory controller on these machines, so the v2 reader runs on files laid
out as the kernel does (the parsers are the same code); everything v1 runs on the kernel.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from lab.vdev_process import REPO_ROOT
from protocol.errors import ConfigError, HostResourceError
from protocol.units import PAGE_SIZE
from vdev.config import ControlConfig, parse_config
from vdev.policy.backstop import Backstop
from vdev.policy.cgroup import (
    Mounts,
    own_memory_cgroup,
    parse_flat_keyed,
    parse_mountinfo,
    parse_single,
    read_cgroup,
    resolve_cgroup,
)
from vdev.policy.host import host_sample_from_readings
from vdev.policy.model import HostSample, HostState, VmSpec, VmState
from vdev.policy.mom import MomEngine
from vdev.policy.watch import PressureWatch

MiB = 1 << 20

MOUNTINFO = """\
25 30 0:22 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
31 25 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
32 25 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 25 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

# --------------------------------------------------------------------------- parsers


def test_parse_mountinfo_finds_both_hierarchies() -> None:
    m = parse_mountinfo(MOUNTINFO)
    assert m == Mounts(v2="/sys/fs/cgroup/unified", v1_memory="/sys/fs/cgroup/memory")
    assert parse_mountinfo("garbage\n") == Mounts(None, None)


def test_parse_single_values() -> None:
    assert parse_single("max\n", "memory.max") is None
    assert parse_single("9223372036854771712\n", "memory.limit_in_bytes") is None  # v1 "none"
    assert parse_single("1048576\n", "memory.max") == MiB


@pytest.mark.parametrize("text", ["", "1 2", "-5", "abc", "1.5"])
def test_parse_single_refuses(text: str) -> None:
    with pytest.raises(HostResourceError, match=r"memory\.max"):
        parse_single(text, "memory.max")


@pytest.mark.parametrize("text", ["oom", "oom 1 2", "oom x", "oom -1"])
def test_parse_flat_keyed_refuses(text: str) -> None:
    with pytest.raises(HostResourceError, match=r"memory\.events"):
        parse_flat_keyed(text, "memory.events")


def _v2_dir(root: Path, **files: str) -> Path:
    d = root / "machine.slice"
    d.mkdir(parents=True)
    base = {
        "memory.current": "629145600\n",
        "memory.max": "1073741824\n",
        "memory.high": "max\n",
        "memory.events": "low 0\nhigh 3\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n",
        "memory.pressure": "some avg10=1.50 avg60=0.20 avg300=0.00 total=12\n"
        "full avg10=0.50 avg60=0.00 avg300=0.00 total=3\n",
        "memory.stat": "anon 1000\nfile 5000\nshmem 4000\nsock 0\n",
    }
    base.update(files)
    for name, text in base.items():
        (d / name).write_text(text)
    return d


def test_resolve_and_read_v2(tmp_path: Path) -> None:
    d = _v2_dir(tmp_path / "unified")
    mounts = Mounts(v2=str(tmp_path / "unified"), v1_memory=None)
    src = resolve_cgroup("machine.slice", mounts)
    assert (src.version, src.path) == (2, str(d))
    r = read_cgroup(src)
    assert (r.usage_bytes, r.limit_bytes, r.high_bytes) == (600 * MiB, 1024 * MiB, None)
    assert r.oom_kills == 1 and r.events["high"] == 3
    assert r.stat == {"anon": 1000, "file": 5000, "shmem": 4000}
    assert (r.psi_some_avg10, r.psi_full_avg10) == (1.5, 0.5)
    host = HostSample(total_bytes=16 << 30, free_bytes=8 << 30)
    sample = host_sample_from_readings([r], host)
    assert (sample.total_bytes, sample.free_bytes) == (1024 * MiB, 424 * MiB)
    assert sample.psi_some_avg10 == 1.5
    # projected growth counts as used
    ahead = host_sample_from_readings([r], host, {src.path: 100 * MiB})
    assert ahead.free_bytes == 324 * MiB


def test_the_most_constrained_cgroup_decides(tmp_path: Path) -> None:
    a = read_cgroup(resolve_cgroup(str(_v2_dir(tmp_path / "a"))))  # 424 of 1024 free
    b = read_cgroup(
        resolve_cgroup(str(_v2_dir(tmp_path / "b", **{"memory.max": str(700 * MiB)})))
    )  # 100 of 700 free
    host = HostSample(total_bytes=16 << 30, free_bytes=8 << 30)
    assert host_sample_from_readings([a, b], host).free_bytes == 100 * MiB
    assert host_sample_from_readings([], host) == host


def test_resolve_refuses_what_is_not_a_memory_cgroup(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_cgroup(str(tmp_path / "nope"))
    (tmp_path / "cpu-only").mkdir()
    with pytest.raises(ConfigError, match="no memory controller files"):
        resolve_cgroup(str(tmp_path / "cpu-only"))
    with pytest.raises(ConfigError, match="no cgroup v2 or v1 memory controller"):
        resolve_cgroup("machine.slice", Mounts(None, None))
    with pytest.raises(ConfigError, match="not a path"):
        resolve_cgroup("")


def test_read_reports_a_removed_cgroup(tmp_path: Path) -> None:
    d = _v2_dir(tmp_path)
    src = resolve_cgroup(str(d))
    (d / "memory.current").unlink()
    with pytest.raises(HostResourceError, match=r"memory\.current is gone"):
        read_cgroup(src)


# --------------------------------------------------------------------------- config


def test_config_keys() -> None:
    cfg = parse_config(
        {"serve": {"watch_cgroup": "machine.slice", "policy": "mom", "backstop": True,
                   "backstop_deadline": 5}}
    )  # fmt: skip
    assert (cfg.watch_cgroups, cfg.policy, cfg.backstop, cfg.backstop_deadline) == (
        ["machine.slice"], "mom", True, 5.0,
    )  # fmt: skip
    assert parse_config({"serve": {"watch_cgroup": ["a", "b"]}}).watch_cgroups == ["a", "b"]


@pytest.mark.parametrize(
    ("serve", "match"),
    [
        ({"watch_cgroup": 3}, "watch_cgroup: expected a cgroup path"),
        ({"watch_cgroup": ["a", ""]}, "watch_cgroup"),
        ({"policy": "drs"}, "policy: expected one of esxi, mom"),
        ({"backstop": "yes"}, "backstop: expected true or false"),
        ({"backstop": True}, "give --watch-cgroup too"),
        ({"watch_cgroup": "a", "backstop_deadline": 0}, "backstop_deadline must be > 0"),
    ],
)
def test_config_refuses(serve: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({"serve": serve})


# --------------------------------------------------------------------------- MoM's rules


def _mom_vm(size_mib: int, balloon_mib: int, free_mib: int) -> VmState:
    pages = size_mib * MiB // PAGE_SIZE
    return VmState(
        VmSpec(size_pages=pages),
        balloon_pages=balloon_mib * MiB // PAGE_SIZE,
        guest_free_pages=free_mib * MiB // PAGE_SIZE,
    )


def test_mom_shrinks_by_five_percent_under_pressure_and_respects_the_floor() -> None:
    eng = MomEngine(interval=10.0)
    host = HostSample(total_bytes=1000 * MiB, free_bytes=100 * MiB)  # 10 % free: shrink
    d = eng.step(0.0, host, {"idle": _mom_vm(1000, 0, 900), "busy": _mom_vm(1000, 0, 50)})
    assert d.state is HostState.SOFT
    # idle: guest size 1000 -> 950 (5 %): balloon 50 MiB
    assert d.vms["idle"].target_pages == 50 * MiB // PAGE_SIZE
    assert d.vms["idle"].reason == "mom:shrink"
    # busy: used 950 + 10 % of 1000 free floor = 1050 > 950: no smaller than it is
    assert d.vms["busy"].target_pages == 0
    # within the interval nothing is evaluated
    d2 = eng.step(5.0, host, {"idle": _mom_vm(1000, 50, 850), "busy": _mom_vm(1000, 0, 50)})
    assert d2.vms["idle"].reason == "mom:interval"


def test_mom_grows_back_without_pressure_and_critical_forces_swap() -> None:
    eng = MomEngine(interval=0.0)
    calm = HostSample(total_bytes=1000 * MiB, free_bytes=500 * MiB)
    d = eng.step(0.0, calm, {"vm": _mom_vm(1000, 400, 500)})
    assert d.state is HostState.HIGH and d.vms["vm"].reason == "mom:grow"
    assert d.vms["vm"].target_pages == 400 * MiB // PAGE_SIZE - 30 * MiB // PAGE_SIZE
    crit = MomEngine(interval=0.0)
    d = crit.step(0.0, HostSample(1000 * MiB, 10 * MiB), {"vm": _mom_vm(1000, 0, 0)})
    assert d.state is HostState.HARD
    # guest_free_percent = 0.01 - 0.05 < 0: the floor (used 1000 - 4 % of 1000 = 960 MiB)
    # lies below the guest's size, so even a guest with nothing free shrinks (swaps)
    assert d.vms["vm"].target_pages == 40 * MiB // PAGE_SIZE


# --------------------------------------------------------------------------- real cgroup v1


@pytest.fixture
def v1_child() -> Iterator[Path]:
    own = own_memory_cgroup()
    if own is None or own.version != 1 or os.geteuid() != 0:
        why = f"needs root and a cgroup v1 memory cgroup of our own (have {own})"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    path = Path(own.path) / f"vballoon-test-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    (path / "memory.limit_in_bytes").write_text(str(64 * MiB))
    try:
        yield path
    finally:
        for _ in range(100):
            with contextlib.suppress(OSError):
                path.rmdir()
                break
            time.sleep(0.05)


def _hog(cgroup: Path, *sizes_mib: int, hold: float = 0.5) -> list[str]:
    """A python child that joins ``cgroup`` and allocates (and touches) ``sizes`` MiB."""
    code = (
        "import os, sys, time\n"
        f"open({str(cgroup / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
        "keep = []\n"
        f"for mib in {list(sizes_mib)!r}:\n"
        "    keep.append(bytearray(mib << 20)); time.sleep(0.1)\n"
        f"time.sleep({hold})\n"
    )
    return [sys.executable, "-c", code]


async def test_v1_thresholds_and_oom_wake_us(v1_child: Path) -> None:
    src = resolve_cgroup(str(v1_child))
    assert src.version == 1
    watch = PressureWatch([src])
    assert any("threshold" in a for a in watch.armed), (watch.armed, watch.skipped)
    assert any(": oom" in a for a in watch.armed)
    got: list[tuple[float, str]] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                watch.run, lambda ns: got.extend((time.monotonic(), n.kind) for n in ns)
            )
            t0 = time.monotonic()
            proc = await trio.lowlevel.open_process(
                _hog(v1_child, 30, 40)
            )  # crosses 80 %, then the limit
            await proc.wait()
            nursery.cancel_scope.cancel()
    kinds = {k for _, k in got}
    assert "threshold" in kinds, got
    assert "oom" in kinds, got  # 70 MiB in 64 MiB: the kernel killed it
    assert proc.returncode == -9
    assert read_cgroup(src).oom_kills == 1
    assert min(t for t, _ in got) - t0 < 10


def _memfd_filler(cgroup: Path, mib: int, pace: float, out: str) -> list[str]:
    """A python child that joins ``cgroup`` and write()s ``mib`` MiB into a memfd, 1 MiB every
    ``pace`` s (a syscall-time charge: ENOMEM would fail it), then prints "full" and, on a
    line from stdin, truncates the memfd (frees it, as an inflated guest would) and ends."""
    code = (
        "import os, sys, time\n"
        f"open({str(cgroup / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
        "fd = os.memfd_create('ram')\n"
        f"print(fd, flush=True)\n"
        "chunk = b'x' * (1 << 20)\n"
        f"for i in range({mib}):\n"
        "    os.write(fd, chunk)\n"
        f"    time.sleep({pace})\n"
        "print('full', flush=True)\n"
        f"if {out == 'free'}:\n"
        "    sys.stdin.readline(); os.ftruncate(fd, 0); print('freed', flush=True)\n"
    )
    return [sys.executable, "-c", code]


def _allocated(pid: int, fd: int) -> int:
    try:
        return os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
    except OSError:
        return 0


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        text = f.read()
    return text[text.rindex(")") + 2]


async def _stopped(pid: int) -> bool:
    """Whether ``pid`` shows as stopped within 10 s (SIGSTOP is delivered asynchronously)."""
    with trio.move_on_after(10):
        while _proc_state(pid) != "T":
            await trio.sleep(0.01)
        return True
    return False


async def test_v1_backstop_stops_the_allocator_before_the_limit(v1_child: Path) -> None:
    """Two processes fill memfds in a real v1 cgroup (256 MiB): one holds 100 MiB, one writes
    150 MiB at ~100 MiB/s. Driven by the kernel's threshold eventfds (and a 0.2 s period, as
    the policy's), the backstop stops the writer before the limit, the holder frees its memfd,
    the writer is continued and finishes: nothing killed, no ENOMEM, no OOM."""
    from vdev.policy.backstop import margins

    limit = 256 * MiB
    (v1_child / "memory.limit_in_bytes").write_text(str(limit))
    src = resolve_cgroup(str(v1_child))
    pause_at, resume_below = margins(limit)
    backstop = Backstop([src], deadline=60.0)
    backstop.engage()
    assert backstop.guard is not None and backstop.guard.wait_ready()
    watch = PressureWatch([src])
    acts: list[tuple[float, str, str, str]] = []
    peak = 0
    with trio.fail_after(60):
        holder = await trio.lowlevel.open_process(
            _memfd_filler(v1_child, 100, 0.0, "free"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert holder.stdout is not None and holder.stdin is not None
        hold_out = b""
        while not hold_out.endswith(b"full\n"):
            hold_out += await holder.stdout.receive_some()
        hold_fd = int(hold_out.split()[0])
        writer = await trio.lowlevel.open_process(
            _memfd_filler(v1_child, 150, 0.01, "keep"), stdout=subprocess.PIPE
        )
        assert writer.stdout is not None
        write_fd = int((await writer.stdout.receive_some()).split()[0])

        def check() -> None:
            nonlocal peak
            r = read_cgroup(src)
            peak = max(peak, r.usage_bytes)
            vms = [
                ("holder", holder.pid, _allocated(holder.pid, hold_fd)),
                ("writer", writer.pid, _allocated(writer.pid, write_fd)),
            ]
            for kind, _, detail in backstop.check([r], time.monotonic(), vms):
                acts.append((time.monotonic(), kind, detail, _proc_state(writer.pid)))

        async def periodic() -> None:
            while True:
                check()
                await trio.sleep(0.2)

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(watch.run, lambda _ns: check())
                nursery.start_soon(periodic)
                while not any(k == "paused" for _, k, _, _ in acts):
                    await trio.sleep(0.01)
                assert "writer" in acts[-1][2], acts
                assert await _stopped(writer.pid)  # stopped, not asleep in the kernel
                usage = read_cgroup(src).usage_bytes
                assert usage < limit, (usage, limit)
                await holder.stdin.send_all(b"go\n")  # "inflate the other guest"
                while not any(k == "resumed" for _, k, _, _ in acts):
                    await trio.sleep(0.01)
                assert "back below" in acts[-1][2], acts
                assert await writer.wait() == 0, acts  # it finished: no ENOMEM, not killed
                assert await holder.wait() == 0
                nursery.cancel_scope.cancel()
        finally:
            backstop.release()
            for p in (holder, writer):
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
    r = read_cgroup(src)
    assert r.oom_kills == 0 and r.events.get("oom_kill_disable") == 0, r.events
    print(acts, r.events, peak >> 20)
    assert r.events.get("max", 0) == 0, r.events  # failcnt: the limit was never hit
    kinds = [k for _, k, _, _ in acts]
    assert kinds.count("paused") == kinds.count("resumed") >= 1, acts
    assert pause_at > resume_below


async def test_control_plane_watches_a_v1_cgroup_and_wakes_on_its_events(
    v1_child: Path,
) -> None:
    from tests.control_fakes import FakeGuest
    from vdev.policy.control import ControlPlane
    from vdev.registry import GuestRegistry

    registry = GuestRegistry("vmw")
    registry.add("vm0", "/nonexistent/vm0.sock")
    FakeGuest(registry, "vm0", 65536)
    cfg = ControlConfig(watch_cgroups=[str(v1_child)], policy_period=60.0)
    control = ControlPlane(registry, cfg)
    assert control.host_source == f"cgroup v1 {v1_child}"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.run)
            info = control.host_info()
            assert "--watch-cgroup" in info["source_why"]
            assert info["cgroups"][0]["limit_bytes"] == 64 * MiB
            assert info["total_bytes"] == 64 * MiB
            assert any("threshold" in a for a in info["notifications"]["armed"])
            from vdev.metrics import render_metrics

            text = render_metrics(control).decode()
            for line in (
                f'vballoon_cgroup_limit_bytes{{cgroup="{v1_child}"}} 6.7108864e+07',
                f'vballoon_cgroup_events_total{{cgroup="{v1_child}",event="oom_kill"}} 0.0',
                f'vballoon_cgroup_under_oom{{cgroup="{v1_child}"}} 0.0',
                "vballoon_backstop_engaged 0.0",
            ):
                assert line in text, text
            steps = control.steps
            proc = await trio.lowlevel.open_process(_hog(v1_child, 55, hold=1.0))
            # a 60 s period: only a notification can step the policy meanwhile
            while control.steps == steps:
                await trio.sleep(0.01)
            assert control.pressure_notices > 0
            assert control.last_notice is not None
            await proc.wait()
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- respecting the guest


async def test_a_guest_that_deflates_by_itself_is_backed_off_and_the_floor_holds() -> None:
    from tests.control_fakes import make_registry
    from vdev.policy.control import GUEST_BACKOFF, ControlPlane

    vm_pages = (1 << 30) // PAGE_SIZE
    with trio.fail_after(5):
        registry, guests = make_registry(vm_pages, vm_pages)
        for g in guests:
            g.has_stats = True
            g.request_stats()  # half of each guest free
        control = ControlPlane(registry, ControlConfig(host_memory=4 << 30))
        events = control.subscribe()
        control.set_simulated_free(100 * MiB)  # SOFT: ballooning
        d = control.step(now=1.0)
        assert d is not None and d.vms["vm0"].target_pages > 0
        for g in guests:
            g.settle()
        control.step(now=2.0)
        # vm0's driver gives pages back on its own (deflate-on-OOM): size below target
        g0 = guests[0]
        target = registry.view("vm0").target_pages
        g0.size = max(0, g0.size - 5000)
        registry.note_size("vm0", g0.size)
        d = control.step(now=3.0)
        assert d is not None
        assert d.vms["vm0"].target_pages <= g0.size  # its target falls to what it holds
        assert d.vms["vm0"].max_pages == g0.size
        assert d.vms["vm0"].target_pages < target
        seen = []
        while True:
            try:
                seen.append(events.receive_nowait())
            except trio.WouldBlock:
                break
        backoff = [e for e in seen if e.get("type") == "guest-backoff"]
        assert backoff and backoff[0]["name"] == "vm0" and backoff[0]["seconds"] == GUEST_BACKOFF
        assert "deflated by itself" in backoff[0]["why"][0]
        # the floor: a guest with 4 KiB free is not ballooned at all
        guests[1].guest_stats = {"stat-free-memory": 4096, "stat-total-memory": vm_pages * 4096}
        d = control.step(now=4.0)
        assert d is not None and d.vms["vm1"].max_pages == guests[1].size


def test_stat_shows_the_guests_own_memory_and_what_the_host_holds() -> None:
    from rich.console import Console

    from vdev.cli.operator import guest_memory_table

    vm = {
        "name": "vm1",
        "connected": True,
        "ram_allocated_bytes": 200 * MiB,
        "guest_stats": {"stat-free-memory": 150 * MiB, "stat-available-memory": 160 * MiB,
                        "stat-disk-caches": 5 * MiB, "stat-swap-in": 0, "stat-swap-out": -1,
                        "stat-oom-kills": 2},
    }  # fmt: skip
    host = {
        "guests": {"vm1": {"stats_age_s": 0.4, "hold": "guest-backoff 55s", "reclaim_failures": 3}}
    }
    table = guest_memory_table([vm, {"name": "vm2", "connected": False}], host)
    assert table is not None
    console = Console(width=200, record=True)
    console.print(table)
    lines = console.export_text().splitlines()
    assert lines[0].split() == [
        "VM", "RESID", "GFREE", "GAVAIL", "GCACHE", "SWIN", "SWOUT", "GOOM", "AGE", "PFAIL",
        "HOLD",
    ]  # fmt: skip
    assert lines[1].split() == [
        "vm1", "200.00", "150.00", "160.00", "5.00", "0.00", "-", "2", "0.4", "3",
        "guest-backoff", "55s",
    ]  # fmt: skip
    assert len(lines) == 2  # vm2 is not connected
    assert guest_memory_table([{"name": "v", "connected": True, "guest_stats": {}}], {}) is None


def test_a_failed_punch_is_counted() -> None:
    import fcntl

    import numpy as np

    from vdev.memory import GuestMemory, RegionSpec

    fd = os.memfd_create("sealed-ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4 * MiB)
    mem = GuestMemory("t")
    try:
        mem.set_table([RegionSpec(0, 4 * MiB, 0x7F00_0000_0000, 0)], [os.dup(fd)])
        mem.write(0, b"x" * (2 * MiB))
        # F_SEAL_FUTURE_WRITE: the kernel refuses to punch holes in this file from now on
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0x0010)
        with pytest.raises(HostResourceError):
            mem.reclaim(np.array([0], dtype=np.uint64), np.array([256], dtype=np.uint64))
        assert mem.reclaim_failures == 1
        with pytest.raises(HostResourceError):
            trio.run(
                mem.reclaim_async,
                np.array([0], dtype=np.uint64),
                np.array([256], dtype=np.uint64),
            )
        assert mem.reclaim_failures == 2 and mem.reclaimed_bytes_total == 0
    finally:
        mem.close()
        os.close(fd)


def test_private_guest_ram_is_detected() -> None:
    import mmap
    import socket

    from vdev.memory import RegionSpec
    from vdev.ramcheck import check_peer_regions, parse_maps, peer_pid, private_regions

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_pid(a) == os.getpid()
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, 4 * MiB)
    shared = mmap.mmap(fd, 2 * MiB, flags=mmap.MAP_SHARED)
    private = mmap.mmap(fd, 2 * MiB, flags=mmap.MAP_PRIVATE, offset=2 * MiB)
    try:
        import ctypes

        def addr(m: mmap.mmap) -> int:
            return ctypes.addressof(ctypes.c_char.from_buffer(m))

        regions = [
            RegionSpec(0, 2 * MiB, addr(shared), 0),
            RegionSpec(2 * MiB, 2 * MiB, addr(private), 2 * MiB),
        ]
        problems = check_peer_regions(os.getpid(), regions)
        assert len(problems) == 1 and "guest 0x200000+2 MiB is mapped private" in problems[0]
        assert check_peer_regions(None, regions) == []
    finally:
        shared.close()
        private.close()
        os.close(fd)
    maps = parse_maps(
        "7f0000000000-7f0000200000 rw-s 00000000 00:01 5 /memfd:mem (deleted)\n"
        "7f0000200000-7f0000400000 rw-p 00000000 00:01 6 /memfd:mem (deleted)\nbad line\n"
    )
    assert [m.shared for m in maps] == [True, False]
    region = RegionSpec(0, 2 * MiB, 0x7F0000200000, 0)
    assert "/memfd:mem (deleted)" in private_regions(maps, [region])[0]


def test_v2_backstop_sets_memory_high_below_max_and_restores_it(tmp_path: Path) -> None:
    d = _v2_dir(tmp_path)
    src = resolve_cgroup(str(d))
    backstop = Backstop([src])
    backstop.engage()
    assert int((d / "memory.high").read_text()) == 1024 * MiB - 1024 * MiB * 5 // 100
    assert backstop.actions[0][0] == "engaged" and "never killed" in backstop.actions[0][2]
    backstop.release()
    assert (d / "memory.high").read_text() == "max"
    (d / "memory.max").write_text("max\n")
    skipped = Backstop([src])
    skipped.engage()
    assert skipped.actions[0][0] == "skipped" and not skipped.held


def test_vdev_events_names_the_overcommit_events() -> None:
    from vdev.cli.operator import format_event

    t = {"time": 0.0}
    pressure = {**t, "type": "pressure",
                "notices": [{"source": "cg", "kind": "threshold", "detail": "9 x1"}]}  # fmt: skip
    assert format_event(pressure).endswith("pressure: threshold 9 x1")
    backstop = {**t, "type": "backstop", "action": "paused", "cgroup": "cg", "detail": "under OOM"}
    assert format_event(backstop).endswith("backstop paused: under OOM")
    backoff = {**t, "type": "guest-backoff", "name": "vm1", "why": ["OOM kills 0 -> 1"]}
    assert "vm1" in format_event(backoff) and "OOM kills 0 -> 1" in format_event(backoff)
    futile = {**t, "type": "futile", "name": "vm2", "balloon_grew_bytes": 8 << 20,
              "host_regained_bytes": 0}  # fmt: skip
    assert "+8.00 MB, host regained 0.00 MB" in format_event(futile)


class _ProcGuest:
    """A connected "guest" backed by a real process filling a memfd (LiveDevice): the
    control plane sees its PID and its RAM file's resident bytes, as for a QEMU."""

    def __init__(self, registry: Any, name: str, pid: int, fd: int) -> None:
        from vdev.devices.base import DeviceStatus

        self.pid, self.fd = pid, fd
        self._status = DeviceStatus(
            size_pages=0, target_pages=0, capabilities=0, driver_active=True, guest_type=1,
            doorbell_registered=True, counters={}, guest_stats={},
        )  # fmt: skip
        registry.attach(name, self)

    def status(self) -> Any:
        return self._status

    def ram_pages(self) -> int:
        return 256 * MiB // PAGE_SIZE

    def ram_allocated_bytes(self) -> int:
        return _allocated(self.pid, self.fd)

    def reclaimed_bytes_total(self) -> int:
        return 0

    def request_target(self, pages: int) -> None:
        pass

    def request_reset(self) -> None:
        pass

    def peer_pid(self) -> int:
        return self.pid


async def test_control_plane_backstop_stops_reports_and_continues_on_exit(
    v1_child: Path, tmp_path: Path
) -> None:
    """vdev's control plane with --backstop on a real v1 cgroup: the writer is stopped
    before the limit (events, `vdev host`, metrics, the stop file) and continued when the
    control plane exits (the stop file deleted); nothing is killed."""
    from vdev.metrics import render_metrics
    from vdev.policy.control import ControlPlane
    from vdev.registry import GuestRegistry

    (v1_child / "memory.limit_in_bytes").write_text(str(256 * MiB))
    registry = GuestRegistry("vmw")
    for name in ("holder", "writer"):
        registry.add(name, f"/nonexistent/{name}.sock")
    stop_file = tmp_path / "vm.sock.stopped"
    cfg = ControlConfig(
        watch_cgroups=[str(v1_child)], backstop=True, backstop_deadline=60.0, policy_period=0.2,
        stop_file=str(stop_file),
    )  # fmt: skip
    control = ControlPlane(registry, cfg)
    events = control.subscribe()
    procs = []
    try:
        with trio.fail_after(60):
            holder = await trio.lowlevel.open_process(
                _memfd_filler(v1_child, 100, 0.0, "free"),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )  # fmt: skip
            procs.append(holder)
            assert holder.stdout is not None
            out = b""
            while not out.endswith(b"full\n"):
                out += await holder.stdout.receive_some()
            _ProcGuest(registry, "holder", holder.pid, int(out.split()[0]))
            async with trio.open_nursery() as nursery:
                await nursery.start(control.run)
                writer = await trio.lowlevel.open_process(
                    _memfd_filler(v1_child, 150, 0.01, "keep"), stdout=subprocess.PIPE
                )
                procs.append(writer)
                assert writer.stdout is not None
                _ProcGuest(
                    registry,
                    "writer",
                    writer.pid,
                    int((await writer.stdout.receive_some()).split()[0]),
                )
                while not control.host_info()["backstop"]["paused"]:
                    await trio.sleep(0.01)
                info = control.host_info()["backstop"]
                assert info["engaged"] and info["pauses"] == 1
                assert [p["name"] for p in info["paused"]] == ["writer"]
                from vdev.api.models import Host

                api = Host(**control.host_info()).model_dump()  # what `vdev host` gets
                assert [p["name"] for p in api["backstop"]["paused"]] == ["writer"]
                assert api["cgroups"] and api["notifications"]["armed"]
                assert await _stopped(writer.pid)
                from vdev.policy.guard import parse_stop_file

                recorded = parse_stop_file(stop_file.read_bytes()).records
                assert [(r.pid, r.name, r.cgroup) for r in recorded] == [
                    (writer.pid, "writer", str(v1_child))
                ]
                text = render_metrics(control).decode()
                assert 'vballoon_backstop_vm_paused{vm="writer"} 1.0' in text, text
                assert "vballoon_backstop_engaged 1.0" in text
                # room again, and vdev stops: the writer must run on
                (v1_child / "memory.limit_in_bytes").write_text(str(512 * MiB))
                nursery.cancel_scope.cancel()
            assert control.backstop is not None and control.backstop.guard is None
            assert not stop_file.exists()
            assert await writer.wait() == 0  # continued: it finished
            assert holder.stdin is not None
            await holder.stdin.send_all(b"go\n")
            assert await holder.wait() == 0
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
    kinds = []
    while True:
        try:
            e = events.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        if e["type"] == "backstop":
            kinds.append(e["action"])
    assert kinds[0] == "engaged" and "paused" in kinds and kinds[-1] == "resumed", kinds
    assert read_cgroup(resolve_cgroup(str(v1_child))).oom_kills == 0


def test_a_stop_file_that_cannot_be_written_refuses_the_backstop_at_start(
    v1_child: Path, tmp_path: Path
) -> None:
    """``--backstop --stop-file PATH`` promises that a QEMU it stopped is recorded there, so
    that a later vdev continues it if vdev and its guard are killed together: a path that
    cannot be written is refused when vdev starts (it used to be accepted, the start-up line
    claiming it, and fail at the first pause), with one line naming it and no traceback."""
    bad = "/nonexistent-vballoon-dir/vm0.stopped"
    r = subprocess.run(
        [
            sys.executable, "-m", "vdev", "serve", "--socket-path", str(tmp_path / "vm0.sock"),
            "--watch-cgroup", str(v1_child), "--backstop", "--stop-file", bad,
        ],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert f"cannot write the stop file {bad} (--stop-file): No such file or directory" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "vm0.sock").exists()
