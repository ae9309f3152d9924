"""End to end: the vdev server in a subprocess, our driver over the real vhost-user front-end.

The device is a real ``vdev serve`` process (:func:`lab.vdev_process.vdev_serve`),
driven only through its management API: ``PUT /vms/vm0/target``, ``POST /vms/vm0/reset``,
``GET /vms/vm0``. It simulates a roomy host (``--host-memory``) so that the policy never sets
a target of its own, and lets a manual target go up to 99 % of the guest's RAM. The guest
runs in-process (``run_guest``) so that the tests can look at the driver and the guest memory
model; one test runs the ``guest-driver`` CLI as a process too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import trio

from guest_driver.driver import DriverConfig
from guest_driver.guest_memory import PAGES_PER_2M, PageSize, PageState, WorkloadSpec
from guest_driver.transport_vhost_user import DEVICE_TIMEOUT, Guest, GuestOptions, run_guest
from lab.bench.system import proc_cpu_s
from lab.vdev_process import ApiVdev, vdev_serve
from protocol.vmw import ALL_CAPABILITIES, Capability, Command, Request, Response

MiB = 1 << 20
RAM = 256 * MiB
PAGES = RAM // 4096


def device(tmp_path: Path, target: int = 0) -> Any:
    """``vdev serve`` for vm0 on ``tmp_path/vm0.sock``; ``target`` in pages."""
    return vdev_serve(
        tmp_path,
        target=str(target * 4096),
        extra=["--host-memory", "64G"],
        settings={"Mem/CtlMaxPercent": 99},
    )


@asynccontextmanager
async def rig(
    tmp_path: Any,
    *,
    target: int = 0,
    config: DriverConfig | None = None,
    workload: WorkloadSpec | None = None,
    device_timeout: float = DEVICE_TIMEOUT,
) -> AsyncIterator[tuple[ApiVdev, Guest, trio.Nursery]]:
    async with device(tmp_path, target) as vdev, trio.open_nursery() as nursery:
        sock = str(vdev.socket_path)
        options = GuestOptions(
            sock,
            RAM,
            config or DriverConfig(poll_interval=0.2),
            workload=workload,
            control_path=sock + ".guest",
            workload_interval=0.05,
            device_timeout=device_timeout,
            rekick_interval=0.2,
        )
        guest = await nursery.start(run_guest, options)
        yield vdev, guest, nursery
        nursery.cancel_scope.cancel()


async def until(cond: Callable[[], bool], step: float = 0.005) -> None:
    while not cond():
        await trio.sleep(step)


async def settled(vdev: ApiVdev, guest: Guest, target: int) -> dict[str, Any]:
    """Wait until driver and device agree and the balloon is within the slack of target."""
    while True:
        view = await vdev.vm()
        d = guest.driver
        if (
            not d.reset_required
            and view["size_pages"] == d.size
            and d.size >= target
            and (d.size - target < PAGES_PER_2M or target == 0)
            and (target != 0 or d.size == 0)
        ):
            return view
        await trio.sleep(0.02)


def data_pages(fd: int, pages: int) -> npt.NDArray[np.bool_]:
    """Which 4 KiB pages of the file hold data (SEEK_DATA / SEEK_HOLE: per extent)."""
    mask = np.zeros(pages, dtype=np.bool_)
    end, pos = pages * 4096, 0
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        stop = os.lseek(fd, start, os.SEEK_HOLE)
        mask[start // 4096 : -(-stop // 4096)] = True
        pos = stop
    return mask


def check_consistent(guest: Guest, view: dict[str, Any]) -> None:
    """Driver size == vdev size == the guest's balloon pages, every one of them a hole in
    the RAM file (vdev punched it), the guest's own pages intact, and vdev's and the guest's
    readings of the RAM file's blocks the same."""
    assert view["size_pages"] == guest.driver.size
    assert guest.memory.count(PageState.BALLOON) == guest.driver.size
    assert guest.memory.verify_app() == 0
    balloon = guest.memory.pages(PageState.BALLOON)
    held = data_pages(guest.ram.fd, PAGES)[balloon]
    assert not held.any(), f"{int(held.sum())} ballooned pages still hold data"
    assert view["ram_allocated_bytes"] == guest.ram.allocated_bytes()


@pytest.mark.parametrize("in_flight", [1, 4], ids=["one-at-a-time", "4-in-flight"])
async def test_inflate_2m_and_4k_deflate_and_target_changes(tmp_path: Any, in_flight: int) -> None:
    config = DriverConfig(poll_interval=0.2, in_flight=in_flight)
    with trio.fail_after(30):
        async with rig(tmp_path, config=config) as (vdev, guest, _):
            mem = guest.memory
            # Leave few whole 2 MiB frames: one used page in all but 20 of them.
            frames = np.flatnonzero(mem.frame_free == PAGES_PER_2M)
            used = frames[20:].astype(np.int64) * PAGES_PER_2M + 1
            mem._take(used, PageState.APP)
            mem._touch(used)
            target = 20 * PAGES_PER_2M + 5000
            await until(lambda: not guest.driver.reset_required)
            watch = guest.driver.transport = InFlight(guest)
            await vdev.set_target(target)
            view = await settled(vdev, guest, target)
            # one batch page per LOCK in flight (vmw_balloon's discipline: exactly one), and
            # the window filled: the 10 batches of 4 KiB pages went out in_flight at a time
            assert len(guest.driver._batch_pfns) == in_flight
            assert watch.most == in_flight
            assert watch.pages == set(guest.driver._batch_pfns)
            assert guest.driver.count(PageSize.SIZE_2M) == 20
            assert guest.driver.count(PageSize.SIZE_4K) == 5000
            assert guest.driver.stats.pages["allocFail"][PageSize.SIZE_2M] >= 1
            check_consistent(guest, view)
            # Both directions while the driver is busy: inflate, then down before it is done.
            await vdev.set_target(PAGES - 20000)
            await trio.sleep(0.01)
            await vdev.set_target(3000)
            view = await settled(vdev, guest, 3000)
            check_consistent(guest, view)
            await vdev.set_target(40000)
            await trio.sleep(0.01)
            await vdev.set_target(60000)
            view = await settled(vdev, guest, 60000)
            check_consistent(guest, view)
            await vdev.set_target(0)
            view = await settled(vdev, guest, 0)
            check_consistent(guest, view)
            assert guest.driver.stats.ops[Command.BATCHED_UNLOCK][0] > 0
            assert guest.driver.stats.ops[Command.BATCHED_2M_UNLOCK][0] > 0


async def test_doorbell_wakes_the_driver_polling_waits_for_a_tick(tmp_path: Any) -> None:
    with trio.fail_after(30):
        async with rig(tmp_path, config=DriverConfig(poll_interval=5.0)) as (vdev, guest, _):
            await until(lambda: guest.driver.doorbell_registered)
            g = guest.driver.stats.general  # "timer" counts every pass, "doorbell" those it woke
            await until(lambda: not guest.driver._busy)
            timeouts = g["timer"] - g["doorbell"]
            t0 = trio.current_time()
            await vdev.set_target(4 * PAGES_PER_2M)
            await until(lambda: guest.driver.size == 4 * PAGES_PER_2M)
            # the doorbell woke it, not the 5 s timer: a mechanism, not a machine's speed
            assert g["doorbell"] >= 1 and g["timer"] - g["doorbell"] == timeouts
            assert trio.current_time() - t0 < 5.0
    caps = ALL_CAPABILITIES & ~Capability.SIGNALLED_WAKEUP_CMD
    config = DriverConfig(poll_interval=1.0, capabilities=caps)
    with trio.fail_after(30):
        async with rig(tmp_path, config=config) as (vdev, guest, _):
            await until(lambda: guest.driver.stats.general["timer"] >= 1)
            assert not guest.driver.doorbell_registered
            await until(lambda: not guest.driver._busy)  # no pass in flight: the next is new
            ticks = guest.driver.stats.general["timer"]
            await vdev.set_target(4 * PAGES_PER_2M)
            await until(lambda: guest.driver.size == 4 * PAGES_PER_2M)
            # only a later tick of the 1 s timer moved it (nothing rang)
            assert guest.driver.stats.general["timer"] > ticks
            assert guest.driver.stats.general["doorbell"] == 0


async def test_an_idle_guest_costs_vdev_no_cpu(tmp_path: Any) -> None:
    """A guest with its doorbell registered leaves an eventq buffer on the ring until the
    next event; vdev must not serve that ring in a loop (it did: a core per idle guest)."""
    with trio.fail_after(60):
        async with rig(tmp_path, config=DriverConfig(poll_interval=5.0)) as (vdev, guest, _):
            await until(lambda: guest.driver.doorbell_registered)
            for target in (0, 4 * PAGES_PER_2M, 0):  # idle at first, and after moves
                await vdev.set_target(target)
                await settled(vdev, guest, target)
                await until(lambda: not guest.driver._busy)
                await trio.sleep(0.2)
                before, t0 = proc_cpu_s(vdev.proc.pid), time.monotonic()
                await trio.sleep(2.0)
                used = proc_cpu_s(vdev.proc.pid) - before
                # a few 10 ms API polls at most; the spinning ring took the whole 2 s
                assert used < 0.25 * (time.monotonic() - t0), (target, used)
                assert guest.driver.doorbell_registered


async def test_pinned_ring_pages_are_refused_and_released(tmp_path: Any) -> None:
    config = DriverConfig(poll_interval=0.2, capabilities=Capability(0x36))  # 4 KiB only
    with trio.fail_after(30):
        async with rig(tmp_path, config=config) as (vdev, guest, _):
            await until(lambda: not guest.driver.reset_required)
            mem = guest.memory
            # The front-end's ring pages (cmdq's and eventq's), pinned by the device.
            rings = sorted(
                {
                    first + i
                    for q in guest.transport.channel.fe.queues
                    for first, count in q.layout.pfn_ranges()
                    for i in range(count)
                }
            )
            assert len(rings) == 4
            # Make the guest forget that its ring pages are reserved: the balloon is offered
            # them (the allocator picks the most fragmented frame first: frame 0). Not the
            # channel's request and event pages nor the batch pages: those must stay.
            end = guest.transport.channel.end // 4096
            batch_pages = set(guest.driver._batch_pfns)
            after = [p for p in range(end, end + 16) if p not in batch_pages][:12]
            offered = np.array(rings + after, dtype=np.int64)
            mem.alloc_app(mem.count(PageState.FREE) - 584, 3)
            mem._give(offered)  # 16 + 584 free 4 KiB pages
            await vdev.set_target(300)
            view = await settled(vdev, guest, 300)
            s = guest.driver.stats.pages
            assert s["errAlloc"][PageSize.SIZE_4K] == 4
            assert s["errFree"][PageSize.SIZE_4K] == 1
            assert view["counters"]["lock refused ERROR_PPN_PINNED (4k)"] == 4
            assert not set(guest.driver.pages(PageSize.SIZE_4K).tolist()) & set(rings)
            assert mem.state[rings].tolist() == [PageState.FREE] * 4  # released
            check_consistent(guest, view)


class InFlight:
    """Wraps the transport: counts the batched LOCKs in flight (entered, not returned), and
    checks that no two of them share a batch page."""

    def __init__(self, guest: Guest) -> None:
        self.inner = guest.transport
        self.read, self.write = self.inner.read, self.inner.write
        self.wait_event = self.inner.wait_event
        self.outstanding: set[int] = set()  # their batch pages
        self.pages: set[int] = set()  # every batch page used
        self.most = 0

    @property
    def doorbell_ids(self) -> tuple[int, int] | None:
        return self.inner.doorbell_ids

    async def command(self, request: Request) -> Response:
        if request.command not in (Command.BATCHED_LOCK, Command.BATCHED_2M_LOCK):
            return await self.inner.command(request)
        page = request.arg1
        assert page not in self.outstanding, "two LOCKs in flight share a batch page"
        self.outstanding.add(page)
        self.pages.add(page)
        self.most = max(self.most, len(self.outstanding))
        try:
            return await self.inner.command(request)
        finally:
            self.outstanding.discard(page)


class Lowering:
    """Wraps the transport: lowers the device's target right after a GET_TARGET."""

    def __init__(self, guest: Guest, vdev: ApiVdev, to: int) -> None:
        self.inner, self.vdev, self.to, self.armed = guest.transport, vdev, to, False
        self.read, self.write = self.inner.read, self.inner.write
        self.wait_event = self.inner.wait_event

    @property
    def doorbell_ids(self) -> tuple[int, int] | None:
        return self.inner.doorbell_ids

    async def command(self, request: Request) -> Response:
        response = await self.inner.command(request)
        if self.armed and request.command == Command.GET_TARGET and response.result == 5000:
            self.armed = False
            await self.vdev.set_target(self.to)
        return response


@pytest.mark.parametrize("in_flight", [1, 4], ids=["one-at-a-time", "4-in-flight"])
async def test_notneeded_when_the_target_drops_between_get_target_and_lock(
    tmp_path: Any, in_flight: int
) -> None:
    caps = Capability.BASIC_CMDS | Capability.BATCHED_CMDS | Capability.BIT64_TARGET
    # in_flight batches of 512 go out for the target of 5000 before the first answer says
    # 200: the device locks the first 200 pages it sees and refuses every other one; the
    # driver sends nothing more (in flight already covers the lowered target), takes the
    # refusals in order, and stops at 200 with the device
    config = DriverConfig(poll_interval=0.2, capabilities=caps, in_flight=in_flight)
    with trio.fail_after(30):
        async with rig(tmp_path, config=config) as (vdev, guest, _):
            await until(lambda: not guest.driver.reset_required)
            wrapper = Lowering(guest, vdev, 200)
            guest.driver.transport = wrapper
            wrapper.armed = True
            await vdev.set_target(5000)
            view = await settled(vdev, guest, 200)
            refused = in_flight * 512 - 200
            assert guest.driver.size == 200
            assert guest.driver.stats.ops[Command.BATCHED_LOCK][0] == in_flight
            assert guest.driver.stats.pages["errAlloc"][PageSize.SIZE_4K] == refused
            assert view["counters"]["lock refused ERROR_PPN_NOTNEEDED (4k)"] == refused
            check_consistent(guest, view)


async def test_reset_mid_inflation_recovered_with_nothing_lost(tmp_path: Any) -> None:
    caps = Capability.BASIC_CMDS | Capability.BATCHED_CMDS | Capability.SIGNALLED_WAKEUP_CMD
    config = DriverConfig(poll_interval=0.2, capabilities=caps | Capability.BIT64_TARGET)
    work = WorkloadSpec(base=4000, cache=2000)
    with trio.fail_after(30):
        async with rig(tmp_path, config=config, workload=work) as (vdev, guest, _):
            await until(lambda: not guest.driver.reset_required)
            target = PAGES - 12000
            await vdev.set_target(target)
            await until(lambda: guest.driver.size > 10 * 512)
            await vdev.reset()
            await until(lambda: guest.driver.stats.general["reset"] >= 2)
            view = await settled(vdev, guest, target)
            assert guest.driver.size == target
            assert guest.driver.stats.ops[Command.BATCHED_UNLOCK][0] == 0  # popped, no UNLOCK
            check_consistent(guest, view)
            info = guest.memory.meminfo()
            assert info.free + info.cache + info.app + info.balloon + info.reserved == PAGES


async def test_driver_keeps_its_balloon_through_a_silent_device_and_leaves_a_gone_one(
    tmp_path: Any,
) -> None:
    """vdev stops answering mid-inflation (SIGSTOP: the connection stays, as when a
    restarting vdev keeps it) for longer than a command used to be given: the driver keeps
    its balloon, kicks again, and carries on when vdev does; sizes and holes agree after.
    Then vdev goes silent for longer than the device timeout: the driver stops within the
    timeout (and one re-kick), saying why, and gives its pages back to the guest."""
    timeout = 3.0
    with trio.fail_after(40):
        async with rig(tmp_path, device_timeout=timeout) as (vdev, guest, _):
            await until(lambda: not guest.driver.reset_required)
            pid = vdev.proc.pid
            transport = guest.transport
            target = PAGES - 16000
            await vdev.set_target(target)
            await until(lambda: guest.driver.size > 10 * PAGES_PER_2M)
            os.kill(pid, signal.SIGSTOP)
            try:
                size = guest.driver.size
                await until(lambda: transport.stalls == 1)  # a command waits, the kick redone
                await trio.sleep(1.5)
                assert guest.driver.size == size and guest.gone is None  # kept, waiting
                assert guest.memory.count(PageState.BALLOON) == size
            finally:
                os.kill(pid, signal.SIGCONT)
            view = await settled(vdev, guest, target)
            assert guest.driver.stats.general["reset"] == 1  # vdev kept its state: no reset
            assert transport.channel.rekicks >= 1
            check_consistent(guest, view)

            t0 = time.monotonic()
            os.kill(pid, signal.SIGSTOP)
            try:  # the driver's next tick (0.2 s) finds nobody answering
                await until(lambda: guest.gone is not None, step=0.05)
                waited = time.monotonic() - t0
            finally:
                os.kill(pid, signal.SIGCONT)
            assert guest.gone is not None and "device timeout" in guest.gone
            assert waited < timeout + 2
            assert guest.driver.closed and guest.driver.size == 0
            assert guest.memory.count(PageState.BALLOON) == 0  # the guest's pages again


async def test_start_zero_on_exit_and_host_memory_reclaim(tmp_path: Any) -> None:
    work = WorkloadSpec(base=2000, cache=PAGES - 12000)
    with trio.fail_after(30):
        async with rig(tmp_path, workload=work) as (vdev, guest, _):
            await until(lambda: not guest.driver.reset_required)
            await trio.sleep(0.1)
            before = guest.ram.allocated_bytes()
            assert before > (PAGES - 12000) * 4096
            await vdev.set_target(PAGES // 2)
            view = await settled(vdev, guest, PAGES // 2)
            after = guest.ram.allocated_bytes()
            # Cache was dropped for the balloon and punched out on the host.
            assert before - after > 80 * MiB  # ~90 MiB: 128 MiB minus the free pages
            assert view["ram_allocated_bytes"] == after
            check_consistent(guest, view)
            await guest.driver.close()
            view = await vdev.vm()
            assert view["connected"] and view["capabilities"] == 0 and view["size_pages"] == 0
            assert guest.driver.stats.ops[Command.START] == [2, 0]
            assert guest.memory.count(PageState.BALLOON) == 0


async def test_guest_driver_cli_run_and_stat(tmp_path: Any) -> None:
    with trio.fail_after(30):
        async with device(tmp_path, 64 * MiB // 4096) as vdev:
            sock = str(vdev.socket_path)
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "guest_driver", "run", "--socket", sock, "--memory", "256M"]
            )
            try:
                env = dict(os.environ)
                while True:
                    r = subprocess.run(
                        [sys.executable, "-m", "guest_driver", "stat", "--socket", sock],
                        capture_output=True,
                        text=True,
                        env=env,
                    )
                    if r.returncode == 0 and r.stdout == "64 MB\n":
                        break
                    await trio.sleep(0.1)
                r = subprocess.run(
                    [sys.executable, "-m", "guest_driver", "stat", "--all", "--socket", sock],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                assert "current               :            16384" in r.stdout
                assert r.stdout.splitlines()[0] == "balloon capabilities  :             0x3e"
                proc.terminate()
                await proc.wait()
                assert proc.returncode == 0
                view = await vdev.vm()
                assert not view["connected"]
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def test_guest_driver_cli_exits_at_once_with_a_message_when_vdev_dies(
    tmp_path: Any,
) -> None:
    """``guest-driver run`` whose vdev is killed: the connection is gone for good, so the
    process ends within a couple of seconds, status 1, saying so (it used to wait for a
    signal that never came)."""
    with trio.fail_after(30):
        async with device(tmp_path, 16 * MiB // 4096) as vdev:
            sock = str(vdev.socket_path)
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "guest_driver", "run", "--socket", sock, "--memory", "64M"],
                stderr=subprocess.PIPE,
            )
            try:
                while (await vdev.vm())["size_pages"] != 16 * MiB // 4096:
                    await trio.sleep(0.05)
                vdev.proc.proc.kill()
                t0 = time.monotonic()
                await proc.wait()
                assert time.monotonic() - t0 < 3
                assert proc.returncode == 1
                assert proc.stderr is not None
                raw = b""
                while chunk := await proc.stderr.receive_some(65536):
                    raw += chunk
                err = raw.decode()
                assert "guest-driver run: the device is gone" in err and "hung up" in err, err
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
