"""``vdev supervise`` never takes a working device away from a guest: a broken upgrade (a
command file that cannot be read, a command that fails before it is ready) is refused or
rolled back while the guest keeps its device; stopping the supervisor itself, or a vdev
whose supervisor was killed, deflates the guests instead of handing them over to nobody."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from supervise_helpers import alive, cmdline, retry, supervised_from_file

from guest_driver.driver import DriverConfig
from guest_driver.transport_vhost_user import GuestOptions, run_guest
from lab.vdev_process import ApiVdev, served_pid, vdev_serve, warm_standby

PAGE = 4096
MiB = 1 << 20


async def until(cond: Callable[[], bool], timeout: float = 60) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.02)


def log_of(tmp_path: Path) -> str:
    return (tmp_path / "vdev.log").read_text()


async def test_a_broken_upgrade_is_refused_and_the_serving_vdev_stays(tmp_path: Path) -> None:
    with trio.fail_after(180):
        async with supervised_from_file(tmp_path) as (vdev, argv, cmd_file):
            first = served_pid(vdev.proc.pid)
            assert first is not None
            await until(lambda: warm_standby(vdev.proc.pid, vdev.proc.log()) is not None)
            # 1. a command file that is not JSON: refused at once, naming the file
            cmd_file.write_text("not json")
            os.kill(vdev.proc.pid, signal.SIGHUP)
            await until(lambda: "SIGHUP refused" in log_of(tmp_path))
            assert f"--command-file {cmd_file}: not JSON" in log_of(tmp_path)
            # 2. a command that cannot start (a bad option): its standby exits, refused
            cmd_file.write_text(json.dumps([*argv, "--no-such-option"]))
            os.kill(vdev.proc.pid, signal.SIGHUP)
            await until(lambda: "standby exited before it was ready" in log_of(tmp_path))
            await trio.sleep(0.5)
            assert served_pid(vdev.proc.pid) == first and alive(first)
            assert (await retry(vdev.vm))["name"] == "vm0"  # the same vdev serves on
            # 3. fixed: the upgrade goes through
            cmd_file.write_text(json.dumps([*argv, "--stats-interval", "0"]))
            os.kill(vdev.proc.pid, signal.SIGHUP)
            await until(lambda: served_pid(vdev.proc.pid) not in (first, None))
            new = served_pid(vdev.proc.pid)
            assert new is not None and cmdline(new)[-2:] == ["--stats-interval", "0"]
            assert (await retry(vdev.vm))["name"] == "vm0"


async def test_a_command_that_fails_before_ready_falls_back_to_the_last_good_one(
    tmp_path: Path,
) -> None:
    """The command file names a broken build and then vdev crashes: the warm standby ran the
    previous command, so a cold start of the new one follows; it fails before it is ready,
    and the supervisor goes back to the command that served instead of leaving the guest
    without a device until someone notices."""
    with trio.fail_after(180):
        async with supervised_from_file(tmp_path) as (vdev, argv, cmd_file):
            first = served_pid(vdev.proc.pid)
            assert first is not None
            # its command is the last good one once it said READY=1 (its API may answer
            # a moment before: killed in between, there would be no good command to go back to)
            await until(lambda: "child ready" in log_of(tmp_path))
            cmd_file.write_text(json.dumps([*argv, "--no-such-option"]))
            os.kill(first, signal.SIGKILL)
            await until(lambda: "going back to the last command that served" in log_of(tmp_path))
            assert (await retry(vdev.vm))["name"] == "vm0"  # served again
            now = served_pid(vdev.proc.pid)
            assert now is not None and "--no-such-option" not in cmdline(now)


async def _inflated_guest(
    vdev: ApiVdev, nursery: trio.Nursery, ram: int
) -> Any:  # the guest's BalloonDriver
    options = GuestOptions(
        str(vdev.socket_path), ram, DriverConfig(poll_interval=0.05), control_path=None
    )
    guest = await nursery.start(run_guest, options)
    await retry(lambda: vdev.set_target(ram // PAGE // 2))
    await until(lambda: guest.driver.size >= ram // PAGE // 2 - 512)
    return guest.driver


async def test_stopping_the_supervisor_deflates_the_guests(tmp_path: Path) -> None:
    """SIGTERM to ``vdev supervise`` ends the service: its fd store goes with it, so vdev is
    asked for a final stop (SIGUSR1), not a hand-over that would leave the balloon
    inflated with nothing left to deflate it."""
    with trio.fail_after(180):
        async with (
            vdev_serve(tmp_path, device="vmw", supervised=True) as vdev,
            trio.open_nursery() as nursery,
        ):
            driver = await _inflated_guest(vdev, nursery, 64 * MiB)
            os.kill(vdev.proc.pid, signal.SIGTERM)
            await until(lambda: vdev.proc.returncode is not None)
            assert vdev.proc.returncode == 0
            await until(lambda: driver.size == 0, 10)
            log = log_of(tmp_path)
            assert "vm0: deflated" in log and "stopping for a hand-over" not in log
            nursery.cancel_scope.cancel()


async def test_a_vdev_whose_supervisor_was_killed_deflates_when_stopped(tmp_path: Path) -> None:
    """The supervisor is SIGKILLed: vdev serves on (the connection is its own), and its
    next SIGTERM finds the notify socket gone: it deflates the guests and exits, where it
    used to 'hand over' to nobody and drop the guest's device with its balloon inflated."""
    with trio.fail_after(180):
        async with (
            vdev_serve(tmp_path, device="vmw", supervised=True) as vdev,
            trio.open_nursery() as nursery,
        ):
            driver = await _inflated_guest(vdev, nursery, 64 * MiB)
            child = served_pid(vdev.proc.pid)
            assert child is not None
            os.kill(vdev.proc.pid, signal.SIGKILL)
            await until(lambda: vdev.proc.returncode is not None)
            assert alive(child)
            assert (await retry(vdev.vm))["size_pages"] == driver.size  # still serving
            os.kill(child, signal.SIGTERM)
            await until(lambda: not alive(child))
            await until(lambda: driver.size == 0, 10)
            log = log_of(tmp_path)
            assert "notify socket" in log and "does not answer" in log, log[-2000:]
            assert "vm0: deflated" in log
            nursery.cancel_scope.cancel()
