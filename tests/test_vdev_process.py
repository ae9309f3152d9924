"""``lab.vdev_process`` (the one way to run ``vdev serve`` as a child) and the
front-end's connection handling: no socket leaked on a failed connect, ``retry`` while vdev
still holds the previous front-end, the back-end's hang-up seen at once (``DeviceGone``
within a second, not after the 10 s command timeout)."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
import trio

from conformance.backend import socket_identity, unix_listening
from guest_driver.driver import DriverConfig
from guest_driver.frontend import GuestRamFile, VmwChannel, connect_frontend
from guest_driver.transport_vhost_user import GuestOptions, connect_transport, run_guest
from lab.vdev_process import (
    VdevStartError,
    open_vdev,
    serve_argv,
    start_vdev,
    vdev_serve,
)
from protocol.errors import BackendHungUp, DeviceGone
from protocol.vmw import ALL_CAPABILITIES, Command, Request, Status

MiB = 1 << 20


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_serve_argv() -> None:
    argv = serve_argv("/s", socket_count=2, no_api=True, device="vmw", target="1M", verbose=2,
                      extra=["--x"], vdev_cmd=["vd"])  # fmt: skip
    assert argv == [
        "vd", "serve", "--device", "vmw", "--socket-path", "/s", "--socket-count", "2",
        "--no-api", "--target", "1M", "-vv", "--x",
    ]  # fmt: skip


def test_unix_listening_means_listen_not_just_bound(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)  # the file exists, a connect would be refused
        assert Path(path).is_socket() and not unix_listening([path])
        sock.listen(1)
        assert unix_listening([path])
    assert not unix_listening([str(tmp_path / "none")])


def test_unix_listening_ignores_a_stale_socket_file(tmp_path: Path) -> None:
    """A socket file left by a back-end that is gone (nothing in /proc/net/unix holds it)
    does not count once recorded as stale; the new back-end's socket, renamed onto the path
    once listening (vdev's way), does."""
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(path)
        old.listen(1)
    stale = {path: socket_identity(path)}
    assert Path(path).is_socket() and not unix_listening([path], stale=stale)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as new:
        new.bind(str(tmp_path / ".s~"))
        new.listen(1)
        os.rename(tmp_path / ".s~", path)
        assert unix_listening([path], stale=stale)


def test_start_vdev_sync_stop_returns_the_exit_code(tmp_path: Path) -> None:
    with start_vdev(tmp_path / "vm", socket_count=2, log_path=tmp_path / "log", timeout=15) as vdev:
        assert vdev.alive() and vdev.returncode is None
        assert [Path(p).is_socket() for p in vdev.paths] == [True, True]
        assert vdev.stop() == 0
    assert not vdev.alive() and vdev.returncode == 0
    assert "Traceback" not in vdev.log()


def test_start_vdev_reports_a_process_that_exits(tmp_path: Path) -> None:
    with pytest.raises(VdevStartError, match="exited 2"):
        start_vdev(tmp_path / "vm", extra=["--host-memory", "lots"], log_path=tmp_path / "log")


async def test_vdev_serve_socket_count(tmp_path: Path) -> None:
    """``socket_count=3``: sockets vm0..vm2 for guests vm0..vm2, all listening when it yields."""
    with trio.fail_after(30):
        async with vdev_serve(tmp_path, socket_name="vm", socket_count=3) as vdev:
            assert vdev.socket_paths == [tmp_path / f"vm{i}" for i in range(3)]
            assert vdev.socket_path == tmp_path / "vm0"
            assert unix_listening([str(p) for p in vdev.socket_paths])
            assert [v["name"] for v in await trio.to_thread.run_sync(vdev.client.vms)] == [
                "vm0", "vm1", "vm2",
            ]  # fmt: skip
            assert "--socket-count" in vdev.proc.args
        assert vdev.proc.returncode == 0


async def test_open_vdev_stops_on_exit_and_kills_a_stubborn_one(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_vdev(tmp_path / "vm", log_path=tmp_path / "log") as vdev:
            assert vdev.alive()
        assert vdev.returncode == 0
        async with open_vdev(tmp_path / "vm2", log_path=tmp_path / "log2") as vdev:
            vdev.proc.send_signal(signal.SIGSTOP)  # ignores SIGTERM until killed
            assert await vdev.stop_async(timeout=0.5) == -signal.SIGKILL


async def test_connect_frontend_closes_its_socket_when_connect_fails(tmp_path: Path) -> None:
    ram = GuestRamFile(4 * MiB)
    try:
        before = _fds()
        for _ in range(20):
            with pytest.raises(FileNotFoundError):
                async with connect_frontend(str(tmp_path / "nobody"), ram):
                    pass
        with trio.fail_after(5), pytest.raises(FileNotFoundError):
            async with connect_frontend(str(tmp_path / "nobody"), ram, retry=0.2):
                pass
        assert _fds() == before
    finally:
        ram.close()


async def test_connect_frontend_retries_while_vdev_holds_the_previous_one(
    tmp_path: Path,
) -> None:
    """vdev serves one front-end per socket: a second one waits ~2 s, then is refused; with
    ``retry`` it gets in once the first has gone."""
    ram1, ram2 = GuestRamFile(16 * MiB), GuestRamFile(16 * MiB)
    try:
        with trio.fail_after(30):
            async with open_vdev(tmp_path / "vm", log_path=tmp_path / "log") as vdev:
                path = vdev.paths[0]
                async with connect_frontend(path, ram1):
                    with pytest.raises(BackendHungUp):
                        async with connect_frontend(path, ram2):
                            pass

                async def second(task_status: trio.TaskStatus[None]) -> None:
                    task_status.started()
                    async with connect_frontend(path, ram2, retry=10) as fe:
                        start = await VmwChannel(fe).call(Command.START, int(ALL_CAPABILITIES))
                        assert start.status == Status.SUCCESS_WITH_CAPABILITIES

                async with trio.open_nursery() as nursery, connect_frontend(path, ram1):
                    await nursery.start(second)
                    await trio.sleep(3)  # longer than vdev's grace: refused at least once
                assert "refused" in vdev.log()
    finally:
        ram1.close()
        ram2.close()


async def test_device_gone_at_once_when_vdev_is_killed(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with (
            open_vdev(tmp_path / "vm", log_path=tmp_path / "log") as vdev,
            connect_transport(vdev.paths[0], 32 * MiB) as transport,
        ):
            response = await transport.command(Request(Command.START, int(ALL_CAPABILITIES)))
            assert response.status == Status.SUCCESS_WITH_CAPABILITIES

            async def kill_soon() -> None:
                await trio.sleep(0.2)
                vdev.proc.kill()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_soon)
                t0 = time.monotonic()
                with pytest.raises(DeviceGone, match="hung up"):
                    await transport.wait_event(30)  # the device can no longer answer
                # "hung up", not the 30 s wait running out: the hang-up ended the wait
                assert time.monotonic() - t0 < 30
            with pytest.raises(DeviceGone):  # and every later command (the deadline bounds it)
                await transport.command(Request(Command.GET_TARGET))


async def test_running_driver_stops_when_vdev_is_killed(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with vdev_serve(tmp_path, extra=["--host-memory", "64G"]) as vdev:
            # a 300 s poll: ending inside the test's 30 s deadline proves the hang-up ended
            # the driver, not a poll; how soon within it is the machine's load, not the code
            options = GuestOptions(str(vdev.socket_path), 64 * MiB, DriverConfig(poll_interval=300))
            async with trio.open_nursery() as nursery:
                guest = await nursery.start(run_guest, options)
                while guest.driver.snapshot()["is resetting"]:
                    await trio.sleep(0.05)
                await trio.sleep(0.3)  # the driver is now waiting for a doorbell (300 s poll)
                vdev.proc.proc.kill()
            # run_guest returned: DeviceGone ended the driver, close() did not wait either
