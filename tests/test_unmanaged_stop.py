"""A ``vdev serve`` that no manager runs (no fd store: not systemd, not ``vdev supervise``)
cannot hand its connections to a successor, and QEMU's device cannot reconnect: a stop that
left the balloons inflated would keep that memory from the guests for the rest of their
lives. So SIGTERM (or SIGINT) deflates first, bounded by ``--stop-timeout``; a second signal
ends the wait. A bare vdev says at start-up what a crash of it would cost."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import trio

from conformance.rawfrontend import FREE_START_PFN, VmwGuest
from guest_driver.driver import DriverConfig
from guest_driver.transport_vhost_user import GuestOptions, run_guest
from lab.vdev_process import vdev_serve
from protocol.vmw import Command, Status

PAGE = 4096
MiB = 1 << 20
#: A stop that does not wait for a guest: most of it the interpreter's teardown; the margin
#: is for a loaded 2-core CI host (tests/test_server_shutdown.py).
PROMPT = 5.0


async def _exited(proc: object, timeout: float) -> int:
    with trio.fail_after(timeout):
        while proc.returncode is None:  # type: ignore[attr-defined]
            await trio.sleep(0.02)
    return int(proc.returncode)  # type: ignore[attr-defined]


async def test_sigterm_deflates_the_guests_of_an_unmanaged_vdev(tmp_path: Path) -> None:
    ram = 64 * MiB
    pages = ram // PAGE
    with trio.fail_after(120):
        async with (
            vdev_serve(tmp_path, device="vmw", extra=["--host-memory", "64G"]) as vdev,
            trio.open_nursery() as nursery,
        ):
            options = GuestOptions(
                str(vdev.socket_path), ram, DriverConfig(poll_interval=0.05), control_path=None
            )
            guest = await nursery.start(run_guest, options)
            driver = guest.driver
            await vdev.set_target(pages // 2)
            with trio.fail_after(60):
                while driver.size < pages // 2 - 512:
                    await trio.sleep(0.02)
            log = (tmp_path / "vdev.log").read_text()
            assert "no fd store (not run by systemd or vdev supervise)" in log
            os.kill(vdev.proc.pid, signal.SIGTERM)
            assert await _exited(vdev.proc, 60) == 0
            with trio.fail_after(10):  # the driver reads the last UNLOCK's answer
                while driver.size:
                    await trio.sleep(0.01)
            log = (tmp_path / "vdev.log").read_text()
            assert "deflating the guests before stopping" in log
            assert "vm0: deflated" in log
            assert "Traceback" not in log
            nursery.cancel_scope.cancel()


async def test_a_second_signal_stops_without_waiting_for_a_silent_guest(tmp_path: Path) -> None:
    """The guest locked pages and then went silent (it never answers the doorbell nor asks
    for its target): the first SIGTERM waits for it (here up to 120 s), the second ends the
    wait, and the log says how many pages were left in its balloon."""
    with trio.fail_after(60):
        async with vdev_serve(
            tmp_path, device="vmw", extra=["--host-memory", "64G", "--stop-timeout", "120"]
        ) as vdev:
            g = await VmwGuest.attach(str(vdev.socket_path))
            try:
                assert (await g.start()).status == Status.SUCCESS_WITH_CAPABILITIES
                await vdev.set_target(64)
                pfns = list(range(FREE_START_PFN, FREE_START_PFN + 16))
                resp, statuses = await g.batch(Command.BATCHED_LOCK, pfns)
                assert resp.status == Status.SUCCESS and not any(s & 0x1F for s in statuses)
                os.kill(vdev.proc.pid, signal.SIGTERM)
                await trio.sleep(1.0)
                assert vdev.proc.returncode is None  # waiting for the guest to deflate
                t0 = time.monotonic()
                os.kill(vdev.proc.pid, signal.SIGTERM)
                assert await _exited(vdev.proc, 30) == 0
                took = time.monotonic() - t0
            finally:
                g.close()
    assert took < PROMPT, f"the second signal took {took:.2f} s to stop vdev"
    log = (tmp_path / "vdev.log").read_text()
    assert "signal 15 again: stopping now" in log
    assert "vm0: 16 pages still ballooned, not waiting (a second signal)" in log
    assert "Traceback" not in log
