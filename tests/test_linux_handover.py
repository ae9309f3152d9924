"""A real Linux guest never notices vdev restarting: SIGKILL, SIGTERM (systemctl restart) and an
upgrade to another vdev build, each while the guest's virtio_balloon driver is inflating.

One guest boot (TCG is slow) serves the three restarts: ``vdev serve --device virtio-balloon``
runs under ``vdev supervise`` (the fd store; ``--command-file`` names the build it starts);
QEMU 11.1.3's generic vhost-user device keeps its one connection throughout. After each
restart the balloon answers again (the in-flight inflation completes) within
:data:`ANSWER_BUDGET` of the stop (the supervisor's warm standby takes over: no Python
start-up in between), the guest's books, vdev's and the host's agree (QEMU's RssShmem and the
RAM file's blocks moved by what vdev holds). At the end a memory hog makes the guest deflate
on OOM: it completes, no task hangs, no OOM kill; the RAM file and vdev still agree.

Every phase has its own deadline (:func:`phase`, a failure names it) and the whole test one
well inside pytest's timeout, so that a stuck phase fails cleanly with the console, QEMU's
stderr and vdev's log, and QEMU and the supervisor are stopped on every way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from lab import linux_image
from lab.linux_guest import (
    MIB,
    QUIET_INTERVAL,
    VDEV_SOCKET_NAME,
    LinuxGuest,
    boot_guest,
    wait_agree,
    wait_balloon,
)
from lab.qemu import QemuBinary
from lab.vdev_process import (
    ApiVdev,
    serve_argv,
    served_pid,
    upgraded_argv,
    upgraded_tree,
    vdev_serve,
    warm_standby,
)
from protocol.units import PAGES_PER_MIB

QUIET = f"vb.interval={QUIET_INTERVAL}"
RAM_MIB = 512
#: RssShmem / the RAM file must move by at least this share of what the balloon moved (the
#: rest: kernel allocations between two readings, ballooned pages never touched).
SHARE = 0.85
#: What vdev itself may take to resume once its new process runs (Python's start excluded).
RESUME_BUDGET = 2.0
#: From the stop (the SIGKILL, or the SIGTERM the old vdev got) to the balloon answering the
#: guest's inflation again, end to end, as the guest sees it.
ANSWER_BUDGET = 2.0
#: The whole test (pytest's own timeout, larger, is the last resort).
TEST_BUDGET = 240


def qemu_threads(pid: int) -> str:
    """Each QEMU thread's name and what it waits in (a vCPU blocked on a vhost-user reply
    shows a recvmsg on the back-end's socket)."""
    out = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            name = (task / "comm").read_text().strip()
            wchan = (task / "wchan").read_text().strip()
            sysc = (task / "syscall").read_text().split()[:2]
        except OSError:
            continue
        out.append(f"  {task.name} {name}: {wchan} {' '.join(sysc)}")
    return "\n".join(out)


@contextlib.contextmanager
def phase(name: str, seconds: float) -> Iterator[None]:
    """A step of the test with its own deadline; running late fails naming the step."""
    t0 = time.monotonic()
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        pytest.fail(
            f"phase {name!r} timed out after {time.monotonic() - t0:.0f} s (its budget: "
            f"{seconds} s)"
        )
    print(f"phase {name}: {time.monotonic() - t0:.1f} s")


@pytest.fixture
def scratch(linux_env: tuple[QemuBinary, linux_image.LinuxImage]) -> Iterator[Path]:
    d = linux_env[0].scratch_dir("vbh-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def api(vdev: ApiVdev) -> dict[str, Any]:
    """GET /vms/vm0, retried while vdev restarts (its API socket comes back with it)."""
    with trio.fail_after(60):
        while True:
            try:
                return await vdev.vm()
            except Exception:
                await trio.sleep(0.05)


class Books:
    """vdev's balloon and the host's view of the guest's memory at one moment."""

    def __init__(self, guest: LinuxGuest, view: dict[str, Any]) -> None:
        self.size = int(view["size_pages"])
        self.alloc = int(view["ram_allocated_bytes"])
        self.rss_kib = guest.rss_shmem_kib()

    def check_moved_with(self, before: Books, where: str) -> None:
        grown = (self.size - before.size) * 4096
        msg = (
            f"{where}: balloon {before.size} -> {self.size} pages, RAM file "
            f"{before.alloc >> 20} -> {self.alloc >> 20} MiB, RssShmem "
            f"{before.rss_kib >> 10} -> {self.rss_kib >> 10} MiB"
        )
        print(msg)
        assert before.alloc - self.alloc >= SHARE * grown, msg
        assert (before.rss_kib - self.rss_kib) * 1024 >= SHARE * grown, msg
        assert self.alloc <= RAM_MIB * MIB - self.size * 4096, msg


async def restart_during_inflation(
    guest: LinuxGuest,
    vdev: ApiVdev,
    how: str,
    target: int,
    restart: Callable[[int], Awaitable[float]],
) -> None:
    """Raise the target, let the inflation start, restart vdev ``how`` (``restart(pid)``
    returns the wall-clock time the old vdev stopped); the balloon must answer again within
    :data:`ANSWER_BUDGET` and reach the target, with the books in step."""
    await standby_warm(vdev)
    await touch_free_memory(guest)  # so the pages the balloon takes were resident
    start = Books(guest, await api(vdev))
    await vdev.set_target(target)
    with trio.fail_after(60):
        while (size := int((await api(vdev))["size_pages"])) <= start.size:
            await trio.sleep(0.01)
    assert size < target, f"{how}: inflation finished before the restart"
    old = served_pid(vdev.proc.pid)
    assert old is not None
    stopped = await restart(old)
    with trio.fail_after(60):
        while served_pid(vdev.proc.pid) in (old, None):
            await trio.sleep(0.005)
        while True:
            view = await api(vdev)
            if view["connected"] and int(view["size_pages"]) > size:
                break
            await trio.sleep(0.01)
    answered = time.time()
    own = resume_seconds(vdev)
    print(
        f"{how}: balloon answered again {answered - stopped:.2f} s after the stop; the new "
        f"vdev resumed the connection {own:.3f} s after its start-up"
    )
    assert own <= RESUME_BUDGET, how
    assert answered - stopped <= ANSWER_BUDGET, (
        f"{how}: answered {answered - stopped:.2f} s after the stop"
    )
    s = await wait_balloon(guest, vdev, target)
    assert s.report.balloon_pages == target
    Books(guest, s.view).check_moved_with(start, how)


async def standby_warm(vdev: ApiVdev) -> None:
    """Wait until the supervisor's next standby is warm (it starts when a vdev is ready)."""
    with trio.fail_after(60):
        while warm_standby(vdev.proc.pid, vdev.proc.log()) is None:
            await trio.sleep(0.05)


async def touch_free_memory(guest: LinuxGuest) -> None:
    rep = await guest.report()
    mib = rep.kib("MemAvailable") // 1024 - 32
    assert await guest.workload(mib) == mib
    assert await guest.workload(0) == 0


def resume_seconds(vdev: ApiVdev) -> float:
    """From the last vdev's first log line (its imports done) to its "connection resumed":
    the part of a restart that is vdev's, whatever the host's load does to Python's start."""
    log = (vdev.socket_path.parent / "vdev.log").read_text().splitlines()

    started = max(i for i, ln in enumerate(log) if " vdev serve " in ln)
    resumed = next(ln for ln in log[started:] if "connection resumed" in ln)
    return log_stamp(resumed) - log_stamp(log[started])


def log_stamp(line: str) -> float:
    """The wall-clock time of a vdev log line."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


async def last_stop_stamp(vdev: ApiVdev, after: int) -> float:
    """When the last vdev got its SIGTERM (its "signal 15: stopping" line, the ``after``-th
    or later)."""
    log_path = vdev.socket_path.parent / "vdev.log"
    with trio.fail_after(60):
        while True:
            lines = [
                ln for ln in log_path.read_text().splitlines() if "vdev: signal 15: stopping" in ln
            ]
            if len(lines) > after:
                return log_stamp(lines[-1])
            await trio.sleep(0.01)


@pytest.mark.qemu
@pytest.mark.linux_guest
@pytest.mark.linux_handover
@pytest.mark.timeout(TEST_BUDGET + 60)
async def test_linux_guest_survives_kill9_sigterm_and_upgrade(
    linux_env: tuple[QemuBinary, linux_image.LinuxImage], scratch: Path
) -> None:
    q, image = linux_env
    sock, api_sock = scratch / VDEV_SOCKET_NAME, scratch / "vdev.api"
    argv = serve_argv(
        sock, api_socket=api_sock, device="virtio-balloon", extra=["--stats-interval", "0"]
    )
    cmd_file = scratch / "vdev.json"
    cmd_file.write_text(json.dumps(argv))
    new = upgraded_tree(scratch)
    guest: LinuxGuest | None = None
    with trio.fail_after(TEST_BUDGET):
        async with contextlib.AsyncExitStack() as stack:
            try:
                with phase("start vdev and boot the guest", 120):
                    vdev = await stack.enter_async_context(vdev_serve(
                        scratch, device="virtio-balloon", socket_name=VDEV_SOCKET_NAME,
                        supervised=True, supervisor_args=["--command-file", str(cmd_file)],
                    ))  # fmt: skip
                    guest = await stack.enter_async_context(
                        boot_guest(q, image, sock, ram_mib=RAM_MIB, append=QUIET)
                    )
                    rep0 = await guest.report()
                    assert rep0.balloon is not None

                async def kill9(pid: int) -> float:
                    os.kill(pid, signal.SIGKILL)
                    return time.time()

                async def sigterm(pid: int) -> float:
                    os.kill(pid, signal.SIGTERM)  # systemctl restart
                    return time.time()

                async def upgrade(pid: int) -> float:
                    cmd_file.write_text(json.dumps(upgraded_argv(argv, new)))
                    os.kill(vdev.proc.pid, signal.SIGHUP)  # the supervisor restarts it
                    # once the new build's standby is warm, the supervisor stops the old vdev
                    return await last_stop_stamp(vdev, after=1)

                restarts = [("kill -9", kill9), ("SIGTERM", sigterm), ("upgrade", upgrade)]
                for i, (how, restart) in enumerate(restarts):
                    if i:
                        with phase(f"deflate to 64 MiB before {how}", 60):
                            await vdev.set_target(64 * PAGES_PER_MIB)
                            await wait_balloon(guest, vdev, 64 * PAGES_PER_MIB)
                    with phase(f"{how} while inflating to 256 MiB", 90):
                        await restart_during_inflation(
                            guest, vdev, how, 256 * PAGES_PER_MIB, restart
                        )
                log = (scratch / "vdev.log").read_text()
                assert f"vdev serve upgrade-test from {new / 'vdev'}" in log
                assert log.count("connection resumed") == 3
                assert log.count(" took over ") == 3, "a restart did not use the warm standby"

                with phase("deflate on OOM", 90):
                    # after all that, a hog bigger than free memory completes
                    before = Books(guest, await api(vdev))
                    s = await wait_agree(guest, vdev)
                    want = s.report.kib("MemAvailable") // 1024 + 48
                    assert await guest.workload(want) == want
                    agreed = await wait_agree(guest, vdev)
                    vm = await guest.vmstat("oom_kill", "balloon_deflate")
                assert vm["oom_kill"] == 0
                assert agreed.view["size_pages"] < before.size  # it did deflate
                assert agreed.view["size_pages"] == agreed.report.balloon_pages
                assert agreed.view["counters"]["actual"] == agreed.report.balloon_pages
                assert int(agreed.view["ram_allocated_bytes"]) <= (
                    RAM_MIB * MIB - int(agreed.view["size_pages"]) * 4096
                )
                hung = [ln for ln in guest.console.lines if "blocked for more than" in ln]
                assert not hung, hung
                with phase("power off", 40):
                    assert await guest.workload(0) == 0
                    assert await guest.poweroff() == 0
            except BaseException:
                if guest is not None:
                    print("console tail:\n" + "\n".join(guest.console.lines[-30:]))
                    print("QEMU stderr:\n" + guest.stderr()[-1500:])
                    print("QEMU threads:\n" + qemu_threads(guest.pid))
                with contextlib.suppress(BaseException), trio.move_on_after(5):
                    print("vdev's view:", json.dumps(await vdev.vm()))
                log_path = scratch / "vdev.log"
                print(
                    "vdev log tail:\n"
                    + (log_path.read_text()[-4000:] if log_path.exists() else "-")
                )
                raise
