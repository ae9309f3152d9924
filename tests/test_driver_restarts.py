"""``guest-driver run``, the process a user runs, rides out vdev restarts under ``vdev supervise``.

The supervisor keeps the vhost-user connection (its fd store), so the driver's socket never
drops: a restarted vdev resumes the rings where its predecessor stopped and the driver, whose
command stayed posted, carries on with its balloon. One driver process sees, while its balloon
moves: two kills in the middle of a BATCHED_LOCK (before vdev recorded it, and after it
reclaimed the pages but before it wrote the used ring), three SIGKILLs at random moments, a
SIGTERM (``systemctl restart``) and an upgrade to another vdev build. After each resume:

* the driver's balloon (its control socket, what ``guest-driver stat`` reads) == vdev's (API);
* the guest RAM file, opened from outside through ``/proc/PID/fd``, has a hole exactly where
  the guest's balloon is: every page the guest owns holds data (a workload keeps all free
  memory in its page cache), every ballooned page is punched;
* every command was answered once: none in flight, no answer for a command not in flight,
  no page of the workload lost.

Then the driver's own ends: SIGINT (or SIGTERM) stops it at once with a message (START(0), pages
given back, status 0); a second driver whose vdev hangs (SIGSTOP) gives up after
``--device-timeout`` saying so (status 1); a third, told to stop while vdev hangs, gives
START(0) its 5 s and exits saying so (status 0); a fourth whose supervisor stops for good (the
connection closes) exits at once saying the back-end hung up (status 1).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from guest_driver.cli import default_control_path, query_control
from guest_driver.transport_vhost_user import STOP_GRACE
from lab.procfs import hole_mask, open_memfd
from lab.vdev_process import (
    REPO_ROOT,
    UPGRADE_BUILD,
    ApiVdev,
    serve_argv,
    served_pid,
    upgraded_argv,
    upgraded_tree,
    vdev_serve,
)

PAGE = 4096
RAM = "64M"
PAGES = 64 * 256
#: No application memory; the page cache takes every free page at start and refills freed
#: ones at once (1 GiB/s): no page of the guest's is a hole unless it is in the balloon.
WORKLOAD = "0:0:20:64M:1G"
RAM_FILE = "vballoon-guest-ram"  # guest_driver.transport_vhost_user's memfd name
DEVICE_TIMEOUT = 3.0


class DriverProcess:
    """A ``guest-driver run`` child, its stderr in a file."""

    def __init__(self, proc: trio.Process, socket_path: Path, log: Path) -> None:
        self.proc = proc
        self.control = default_control_path(str(socket_path))
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def query(self, cmd: str) -> dict[str, Any]:
        return await trio.to_thread.run_sync(query_control, self.control, {"cmd": cmd})

    def stderr(self) -> str:
        return self.log.read_text()

    async def wait_exit(self, timeout: float) -> tuple[int, float]:
        """(exit status, seconds it took)."""
        t0 = time.monotonic()
        with trio.fail_after(timeout):
            code = await self.proc.wait()
        return code, time.monotonic() - t0


@asynccontextmanager
async def guest_driver(socket_path: Path, log: Path, *args: str) -> AsyncIterator[DriverProcess]:
    argv = [
        sys.executable, "-m", "guest_driver", "run", "--socket", str(socket_path),
        "--memory", RAM, "--poll", "0.1", "--workload", WORKLOAD, *args,
    ]  # fmt: skip
    with log.open("ab") as err:
        proc = await trio.lowlevel.open_process(argv, stderr=err, cwd=REPO_ROOT)
    drv = DriverProcess(proc, socket_path, log)
    try:
        with trio.fail_after(30):  # its control socket answers once it runs
            while True:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"guest-driver run exited {proc.returncode}:\n{drv.stderr()}"
                    )
                try:
                    await drv.query("stat")
                    break
                except OSError:
                    await trio.sleep(0.05)
        yield drv
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def retry_api(vdev: ApiVdev, fn: str, *args: Any) -> Any:
    """An API call, retried while vdev restarts (its API socket comes back with it)."""
    with trio.fail_after(30):
        while True:
            try:
                return await getattr(vdev, fn)(*args)
            except Exception:
                await trio.sleep(0.05)


async def vdev_replaced(vdev: ApiVdev, old: int | None) -> None:
    with trio.fail_after(30):
        while served_pid(vdev.proc.pid) in (old, None):
            await trio.sleep(0.01)


async def settled(
    vdev: ApiVdev, drv: DriverProcess, target: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Wait until vdev serves the driver again, both agree on a balloon within a 2 MiB page
    of ``target``, no command is in flight and the workload has refilled free memory."""
    with trio.fail_after(60):
        while True:
            view = await retry_api(vdev, "vm")
            st = await drv.query("stat")
            d = st["driver"]
            if (
                view["connected"]
                and not d["is resetting"]
                and d["current"] == view["size_pages"]
                and abs(d["current"] - target) < 512
                and st["meminfo"]["free"] == 0
                and st["transport"]["in_flight"] == 0
            ):
                return view, st
            await trio.sleep(0.05)


def mask(runs: list[list[int]], total: int) -> npt.NDArray[np.bool_]:
    out = np.zeros(total, dtype=bool)
    for first, count in runs:
        out[first : first + count] = True
    return out


async def check_books(vdev: ApiVdev, drv: DriverProcess, target: int, where: str) -> int:
    """driver size == vdev size == the RAM file's holes (outside the kernel's own pages);
    every command answered once. Returns the balloon size."""
    for _ in range(20):
        view, st = await settled(vdev, drv, target)
        runs = await drv.query("pages")
        fd = open_memfd(drv.pid, RAM_FILE)
        try:
            holes = hole_mask(fd, 0, runs["total_pages"])
        finally:
            os.close(fd)
        again = await drv.query("stat")
        if again["driver"]["current"] == st["driver"]["current"] and again["meminfo"]["free"] == 0:
            break  # nothing moved while we looked
    else:
        raise AssertionError(f"{where}: the balloon never held still")
    size = int(st["driver"]["current"])
    balloon = mask(runs["balloon"], runs["total_pages"])
    own = ~mask(runs["reserved"], runs["total_pages"])  # the pages the guest's kernel hands out
    t = st["transport"]
    msg = (
        f"{where}: driver {size}, vdev {view['size_pages']}, guest balloon "
        f"{int(balloon.sum())}, holes {int(holes[own].sum())} "
        f"({int((holes & own & ~balloon).sum())} not ballooned, "
        f"{int((balloon & ~holes).sum())} ballooned but data); commands {t}"
    )
    print(msg)
    assert size == view["size_pages"] == int(balloon.sum()), msg
    assert np.array_equal(holes[own], balloon[own]), msg
    assert st["lost_pages"] == 0, msg
    assert t["stray_answers"] == 0 and t["posted"] - t["answered"] == t["in_flight"], msg
    return size


async def test_guest_driver_run_rides_out_vdev_restarts(tmp_path: Path) -> None:
    rng = random.Random(5)
    sock, api = tmp_path / "vm0.sock", tmp_path / "vdev.api"
    argv = serve_argv(
        sock, api_socket=api, device="vmw", extra=["--host-memory", "64G", "--stats-interval", "0"]
    )
    flag = tmp_path / "armed"  # its existence arms the crash (removed when it fires)

    def crashing(point: str) -> list[str]:
        return [
            "/usr/bin/env", f"VBALLOON_CRASH_AT={point}", f"VBALLOON_CRASH_FLAG={flag}",
            argv[0], str(REPO_ROOT / "tests" / "crashing_vdev.py"), *argv[3:],
        ]  # fmt: skip

    cmd_file = tmp_path / "vdev.json"
    cmd_file.write_text(json.dumps(crashing("batch-before-commit")))
    vdev_log = tmp_path / "vdev.log"
    drv_log = tmp_path / "guest-driver.log"
    upgrade: list[Path] = []

    async def build_upgrade() -> None:  # in a thread, while the rest runs
        upgrade.append(await trio.to_thread.run_sync(upgraded_tree, tmp_path))

    with trio.fail_after(150):
        async with vdev_serve(
            tmp_path, device="vmw", supervised=True,
            supervisor_args=["--command-file", str(cmd_file)],
        ) as vdev, trio.open_nursery() as nursery:  # fmt: skip
            nursery.start_soon(build_upgrade)
            try:
                # the next start crashes after recording and reclaiming, before the used ring
                cmd_file.write_text(json.dumps(crashing("batch-before-push")))
                async with guest_driver(sock, drv_log, "--device-timeout", "30") as drv:
                    await check_books(vdev, drv, 0, "start")

                    # 1, 2: killed in the middle of a BATCHED_LOCK
                    for point, target in (
                        ("batch-before-commit", PAGES // 4),
                        ("batch-before-push", PAGES // 2),
                    ):
                        old = served_pid(vdev.proc.pid)
                        flag.touch()
                        await retry_api(vdev, "set_target", target)
                        with trio.fail_after(30):
                            while flag.exists():
                                await trio.sleep(0.01)
                        await vdev_replaced(vdev, old)
                        await check_books(vdev, drv, target, f"kill -9 at {point}")
                    assert "rolled back an unfinished batch" in vdev_log.read_text()

                    # 3: SIGKILLs at random moments while the target swings
                    for i in range(3):
                        target = rng.choice([PAGES // 8, PAGES // 3, PAGES * 3 // 5])
                        await retry_api(vdev, "set_target", target)
                        await trio.sleep(rng.uniform(0.0, 0.4))
                        old = served_pid(vdev.proc.pid)
                        assert old is not None
                        os.kill(old, signal.SIGKILL)
                        await vdev_replaced(vdev, old)
                        await check_books(vdev, drv, target, f"random kill -9 #{i + 1}")

                    # 4: SIGTERM (systemctl restart) while inflating
                    await retry_api(vdev, "set_target", PAGES // 8)
                    before = await check_books(vdev, drv, PAGES // 8, "before SIGTERM")
                    target = PAGES * 3 // 5
                    await retry_api(vdev, "set_target", target)
                    with trio.fail_after(30):
                        while (await drv.query("stat"))["driver"]["current"] == before:
                            await trio.sleep(0.01)
                    old = served_pid(vdev.proc.pid)
                    assert old is not None
                    os.kill(old, signal.SIGTERM)
                    await vdev_replaced(vdev, old)
                    await check_books(vdev, drv, target, "SIGTERM")
                    assert "stopping for a hand-over" in vdev_log.read_text()

                    # 5: an upgrade to another build (the command file, then SIGHUP) while
                    # deflating
                    with trio.fail_after(60):
                        while not upgrade:
                            await trio.sleep(0.05)
                    cmd_file.write_text(json.dumps(upgraded_argv(argv, upgrade[0])))
                    target = PAGES // 8
                    await retry_api(vdev, "set_target", target)
                    old = served_pid(vdev.proc.pid)
                    os.kill(vdev.proc.pid, signal.SIGHUP)
                    await vdev_replaced(vdev, old)
                    size = await check_books(vdev, drv, target, "upgrade")
                    log = vdev_log.read_text()
                    assert f"vdev serve {UPGRADE_BUILD} from {upgrade[0] / 'vdev'}" in log
                    assert log.count("connection resumed") >= 7
                    stat = await trio.run_process(
                        [sys.executable, "-m", "guest_driver", "stat", "--socket", str(sock)],
                        capture_stdout=True, cwd=REPO_ROOT,
                    )  # fmt: skip
                    assert stat.stdout.decode() == f"{size * PAGE >> 20} MB\n"
                    # vdev kept the balloon: no resync beyond the first START
                    assert (await drv.query("stat"))["driver"]["general"]["reset"] == 1

                    # the driver told to stop: at once, START(0), pages given back, status 0
                    drv.proc.send_signal(signal.SIGINT)  # Ctrl-C (SIGTERM: the same)
                    code, took = await drv.wait_exit(15)
                    err = drv.stderr()
                    print(f"SIGINT: the driver exited {code} in {took:.2f} s")
                    assert code == 0, err
                    assert (
                        "guest-driver run: stopped by SIGINT: the device took START(0); "
                        f"{size} ballooned pages given back to the guest"
                    ) in err, err

                # a vdev that hangs: the driver waits --device-timeout, then gives up
                with trio.fail_after(30):  # vdev let the first driver go
                    while (await retry_api(vdev, "vm"))["connected"]:
                        await trio.sleep(0.05)
                drv_log.write_text("")
                async with guest_driver(
                    sock, drv_log, "--device-timeout", str(DEVICE_TIMEOUT)
                ) as drv:
                    await retry_api(vdev, "set_target", PAGES // 8)
                    await check_books(vdev, drv, PAGES // 8, "second driver")
                    hung = served_pid(vdev.proc.pid)
                    assert hung is not None
                    os.kill(hung, signal.SIGSTOP)
                    try:
                        code, took = await drv.wait_exit(DEVICE_TIMEOUT + 15)
                    finally:
                        os.kill(hung, signal.SIGCONT)
                    err = drv.stderr()
                    print(f"hung vdev: the driver exited {code} after {took:.2f} s")
                    assert code == 1, err
                    # (timed from our SIGSTOP: its command may have gone out a moment before)
                    assert took >= DEVICE_TIMEOUT - 0.2, err
                    assert "guest-driver run: the device is gone: no answer to" in err, err
                    assert f"(device timeout {DEVICE_TIMEOUT:g} s)" in err, err
                    assert "ballooned pages given back to the guest" in err, err

                # told to stop while vdev hangs: START(0) is given STOP_GRACE, then it exits
                with trio.fail_after(30):
                    while (await retry_api(vdev, "vm"))["connected"]:
                        await trio.sleep(0.05)
                drv_log.write_text("")
                async with guest_driver(sock, drv_log) as drv:
                    await check_books(vdev, drv, PAGES // 8, "third driver")
                    hung = served_pid(vdev.proc.pid)
                    assert hung is not None
                    os.kill(hung, signal.SIGSTOP)
                    try:
                        await trio.sleep(0.5)  # (a command of its is waiting now)
                        drv.proc.send_signal(signal.SIGTERM)
                        code, took = await drv.wait_exit(STOP_GRACE + 15)
                    finally:
                        os.kill(hung, signal.SIGCONT)
                    err = drv.stderr()
                    print(f"SIGTERM, vdev hung: the driver exited {code} after {took:.2f} s")
                    assert code == 0, err
                    assert (
                        "guest-driver run: stopped by SIGTERM: the device did not take START(0) "
                        f"within {STOP_GRACE:g} s"
                    ) in err, err

                # the supervisor stopped for good: the connection closes, the driver exits
                with trio.fail_after(30):
                    while (await retry_api(vdev, "vm"))["connected"]:
                        await trio.sleep(0.05)
                drv_log.write_text("")
                async with guest_driver(sock, drv_log) as drv:
                    await check_books(vdev, drv, PAGES // 8, "fourth driver")
                    os.kill(vdev.proc.pid, signal.SIGTERM)
                    code, took = await drv.wait_exit(30)
                    err = drv.stderr()
                    print(f"supervisor stopped: the driver exited {code} after {took:.2f} s")
                    assert code == 1, err
                    assert "guest-driver run: the device is gone:" in err, err
                    assert "hung up" in err, err
                supervisor = vdev.proc.proc
                assert await trio.to_thread.run_sync(supervisor.wait, 30) == 0
            except BaseException:
                for path in (vdev_log, drv_log):
                    text = path.read_text() if path.exists() else "-"
                    print(f"--- {path.name} (tail) ---\n{text[-4000:]}")
                raise
            nursery.cancel_scope.cancel()
