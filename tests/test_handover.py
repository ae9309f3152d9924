"""The hand-over: ``vdev serve`` under ``vdev supervise`` killed with SIGKILL at random moments
while a guest inflates and deflates without pause; every restart resumes the connection from
the fd store and the state file, and no guest notices.

Invariants checked after the storm (and the guest's own checks all along):

* every request is answered exactly once (a used element per buffer, none extra; the vmw
  driver never sees its device go away);
* vdev's balloon size equals the guest's;
* no page is both in the balloon and in use: the pages the guest gave are holes in the RAM
  file, the pages it took back (and wrote) are data: the RAM file's holes are vdev's map;
* the guest's own pages kept their contents.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import trio

from conformance.rawfrontend import FREE_START_PFN, BalloonGuest
from guest_driver.driver import DriverConfig
from guest_driver.guest_memory import PageSize, PageState
from guest_driver.transport_vhost_user import GuestOptions, run_guest
from lab.procfs import hole_mask
from lab.vdev_process import REPO_ROOT as REPO
from lab.vdev_process import (
    ApiVdev,
    serve_argv,
    served_pid,
    upgraded_argv,
    upgraded_tree,
    vdev_serve,
)
from protocol import handover as ho
from vdev.handover import HandoverError, StateFile
from vdev.pagemap import PageMap
from vdev.sdnotify import FdStore, listen_fds, notify, same_open_file
from vdev.supervise import Supervisor

T = TypeVar("T")
PAGE = 4096
MiB = 1 << 20
KILLS = 20


async def retry(fn: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """``fn()`` until it works: the API is down while vdev restarts."""
    with trio.fail_after(timeout):
        while True:
            try:
                return await fn()
            except Exception:
                await trio.sleep(0.05)


async def kill9(vdev: ApiVdev) -> int:
    """SIGKILL the vdev the supervisor runs; return once its successor answers the API with
    the guest connected (the connection resumed)."""
    pid = served_pid(vdev.proc.pid)
    assert pid is not None, "vdev supervise runs no vdev"
    os.kill(pid, signal.SIGKILL)
    with trio.fail_after(30):
        while served_pid(vdev.proc.pid) in (pid, None):
            await trio.sleep(0.01)

        async def resumed() -> dict[str, Any]:
            view = await vdev.vm()
            assert view["connected"]
            return view

        return int((await retry(resumed))["size_pages"])


def supervised(tmp_path: Path, device: str) -> Any:
    return vdev_serve(
        tmp_path,
        device=device,
        extra=["--host-memory", "64G", "--stats-interval", "0"],
        settings={"Mem/CtlMaxPercent": 99},
        supervised=True,
    )


async def test_kill9_storm_virtio_balloon(tmp_path: Path) -> None:
    """20 SIGKILLs while a virtio-balloon guest inflates and deflates 256-page buffers."""
    rng = random.Random(13)
    n = 4096  # the pages the guest plays with
    first = FREE_START_PFN
    with trio.fail_after(400):
        async with supervised(tmp_path, "virtio-balloon") as vdev:
            g = await BalloonGuest.attach(str(vdev.socket_path))
            try:
                g.fe.ram.fill(
                    first * PAGE, n * PAGE, 0xA5
                )  # every page in use (data) to begin with
                ballooned = np.zeros(n, dtype=bool)
                answered = 0
                done = trio.Event()

                async def guest() -> None:
                    nonlocal answered
                    while not done.is_set():
                        inflate = rng.random() < 0.6 or not ballooned.any()
                        pool = np.flatnonzero(~ballooned if inflate else ballooned)
                        if not pool.size:
                            continue
                        pick = np.sort(rng.sample(list(pool), min(256, pool.size)))
                        pfns = [int(first + p) for p in pick]
                        with trio.fail_after(60):  # answered, whatever the kills
                            used = await (g.inflate(pfns) if inflate else g.deflate(pfns))
                        assert used.len == 0
                        answered += 1
                        if inflate:
                            ballooned[pick] = True
                        else:
                            ballooned[pick] = False
                            for p in pfns:  # the guest uses its pages again
                                g.fe.ram.mm[p * PAGE : p * PAGE + 8] = struct.pack("<Q", p)
                        await trio.sleep(0)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(guest)
                    for _ in range(KILLS):
                        await trio.sleep(rng.uniform(0.05, 0.6))
                        await kill9(vdev)
                    done.set()
                # no extra used element on any ring (none answered twice)
                for q in (g.fe.queues[0], g.fe.queues[1]):
                    assert not await q.ring.poll_used()
                view = await retry(vdev.vm)
                assert answered > KILLS
                assert view["size_pages"] == int(ballooned.sum())
                holes = hole_mask(g.fe.ram.fd, first, n)
                assert np.array_equal(holes, ballooned), (
                    f"{int((holes & ~ballooned).sum())} holes not in the balloon, "
                    f"{int((ballooned & ~holes).sum())} ballooned pages still data"
                )
                for p in np.flatnonzero(~ballooned)[:64]:  # contents of pages in use kept
                    pfn = first + int(p)
                    data = bytes(g.fe.ram.mm[pfn * PAGE : pfn * PAGE + 8])
                    assert data in (struct.pack("<Q", pfn), b"\xa5" * 8)
                log = (tmp_path / "vdev.log").read_text()
                assert log.count("connection resumed") >= KILLS
            finally:
                g.close()


async def test_kill9_storm_vmw_driver(tmp_path: Path) -> None:
    """20 SIGKILLs while the vmw driver core inflates and deflates with batches (2 MiB and
    4 KiB) as the target swings: it never sees its device go away."""
    rng = random.Random(7)
    ram = 128 * MiB
    pages = ram // PAGE
    with trio.fail_after(400):
        async with supervised(tmp_path, "vmw") as vdev, trio.open_nursery() as nursery:
            options = GuestOptions(
                str(vdev.socket_path), ram, DriverConfig(poll_interval=0.05), control_path=None
            )
            guest = await nursery.start(run_guest, options)
            driver = guest.driver
            for _ in range(KILLS):
                target = rng.choice([0, pages // 8, pages // 3, pages // 2, pages * 3 // 4])
                await retry(lambda t=target: vdev.set_target(t))  # type: ignore[misc]
                await trio.sleep(rng.uniform(0.05, 0.5))
                await kill9(vdev)
            await retry(lambda: vdev.set_target(pages // 2))
            with trio.fail_after(60):
                while True:
                    view = await retry(vdev.vm)
                    if (
                        not driver.reset_required
                        and view["size_pages"] == driver.size
                        and abs(driver.size - pages // 2) < 512
                    ):
                        break
                    await trio.sleep(0.05)
            mem = guest.memory
            assert mem.count(PageState.BALLOON) == driver.size
            assert mem.verify_app() == 0
            holes = hole_mask(guest.transport.ram.fd, 0, pages)
            locked = np.zeros(pages, dtype=bool)
            locked[driver.pages(PageSize.SIZE_4K)] = True
            for f in driver.pages(PageSize.SIZE_2M):
                locked[int(f) : int(f) + 512] = True
            assert not (locked & ~holes).any(), "a ballooned page is still data"
            assert int(view["ram_allocated_bytes"]) <= (pages - driver.size) * PAGE
            nursery.cancel_scope.cancel()


async def test_sigterm_restart_upgrade_and_final_stop_vmw(tmp_path: Path) -> None:
    """SIGTERM (systemctl restart) and an upgrade to another build (the supervisor's command
    file, then SIGHUP) while the driver inflates: the same hand-over, the driver never
    notices. Then a final stop (the upgraded build runs with --deflate-on-stop): the guest is
    deflated to 0 first, the store is emptied and the supervisor exits."""
    ram = 64 * MiB
    pages = ram // PAGE
    cmd_file = tmp_path / "vdev.json"
    sock, api = tmp_path / "vm0.sock", tmp_path / "vdev.api"
    argv = serve_argv(
        sock, api_socket=api, device="vmw", extra=["--host-memory", "64G", "--stats-interval", "0"]
    )
    cmd_file.write_text(json.dumps(argv))
    with trio.fail_after(200):
        async with vdev_serve(
            tmp_path, device="vmw", supervised=True,
            supervisor_args=["--command-file", str(cmd_file)],
        ) as vdev, trio.open_nursery() as nursery:  # fmt: skip
            options = GuestOptions(
                str(vdev.socket_path), ram, DriverConfig(poll_interval=0.05), control_path=None
            )
            guest = await nursery.start(run_guest, options)
            driver = guest.driver
            await retry(lambda: vdev.set_target(pages // 2))
            await until(lambda: driver.size > 0)  # inflating now
            first = served_pid(vdev.proc.pid)
            assert first is not None
            os.kill(first, signal.SIGTERM)  # systemctl restart
            with trio.fail_after(30):
                while served_pid(vdev.proc.pid) in (first, None):
                    await trio.sleep(0.01)
            view = await settle(vdev, driver, pages // 2)
            log = (tmp_path / "vdev.log").read_text()
            assert "stopping for a hand-over" in log and "connection resumed" in log
            # the upgrade: another build, started by the supervisor on SIGHUP
            new = upgraded_tree(tmp_path)
            up = [*upgraded_argv(argv, new), "--deflate-on-stop"]
            cmd_file.write_text(json.dumps(up))
            await retry(lambda: vdev.set_target(pages // 4))
            second = served_pid(vdev.proc.pid)
            os.kill(vdev.proc.pid, signal.SIGHUP)
            with trio.fail_after(30):
                while served_pid(vdev.proc.pid) in (second, None):
                    await trio.sleep(0.01)
            view = await settle(vdev, driver, pages // 4)
            log = (tmp_path / "vdev.log").read_text()
            assert "vdev serve upgrade-test from " + str(new / "vdev") in log
            assert view["target_pages"] == pages // 4 and view["control"] == "manual"
            # the final stop: the guest is deflated before vdev leaves
            os.kill(vdev.proc.pid, signal.SIGTERM)
            with trio.fail_after(60):
                while vdev.proc.returncode is None:
                    await trio.sleep(0.05)
            assert vdev.proc.returncode == 0
            assert driver.size == 0
            log = (tmp_path / "vdev.log").read_text()
            assert "vm0: deflated" in log and "child exited with 0 (0 fds stored)" in log
            nursery.cancel_scope.cancel()


async def until(cond: Callable[[], bool]) -> None:
    with trio.fail_after(30):
        while not cond():
            await trio.sleep(0.01)


async def settle(vdev: ApiVdev, driver: Any, target: int) -> dict[str, Any]:
    """Driver and device agree, and the balloon is within a 2 MiB page of ``target``."""
    with trio.fail_after(60):
        while True:
            view = await retry(vdev.vm)
            if (
                view["connected"]
                and not driver.reset_required
                and view["size_pages"] == driver.size
                and abs(driver.size - target) < 512
            ):
                return view
            await trio.sleep(0.05)


# -- the pieces, without processes ------------------------------------------------------------


def test_state_file_rollback_and_commit() -> None:
    """Map edits after the last commit are undone; committed ones stay."""
    st = StateFile.create("t")
    try:
        m = PageMap(backing=st)
        m.set_4k(np.arange(100, 200, dtype=np.uint64))
        st.commit({"v": ho.RECORD_VERSION, "n": 1})
        m.set_4k(np.arange(5000, 5600, 3, dtype=np.uint64))  # scattered
        m.clear_4k(np.arange(100, 150, dtype=np.uint64))  # one span
        m.set_2m(np.array([40], dtype=np.uint64))
        again = StateFile.open(os.dup(st.fd))
        assert again.read_record() == {"v": 1, "n": 1}
        assert again.rollback() == 3
        back = PageMap(backing=again)
        assert back.size == 100 and back.count_2m == 0
        assert back.locked_4k().tolist() == list(range(100, 200))
        assert again.rollback() == 0  # nothing twice
        m2 = PageMap(backing=again)
        m2.clear()  # a full clear, journaled too
        again.commit({"v": 1, "n": 2})
        assert PageMap(backing=again).size == 0
        again.close()
    finally:
        st.close()


def test_state_file_refuses_foreign_layouts() -> None:
    fd = os.memfd_create("x")
    os.ftruncate(fd, 8192)
    with pytest.raises(HandoverError, match=r"layout|state"):
        StateFile.open(fd)


def test_sd_notify_and_listen_fds(tmp_path: Path) -> None:
    """The wire format both ends agree on, and LISTEN_* parsing (names, pid check)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    efd = os.eventfd(0)
    try:
        store = FdStore(path)
        store.store("conn.vm0", efd)
        msg, fds, _, _ = socket.recv_fds(sock, 4096, 4)
        assert msg == b"FDSTORE=1\nFDNAME=conn.vm0\n" and len(fds) == 1
        assert same_open_file(fds[0], efd) and not same_open_file(fds[0], os.eventfd(0))
        os.close(fds[0])
        with pytest.raises(ValueError):
            store.store("bad:name", efd)
        assert not notify({"READY": 1}, address=None) or os.environ.get("NOTIFY_SOCKET")
    finally:
        sock.close()
        os.close(efd)
    env = {"LISTEN_FDS": "0", "LISTEN_PID": str(os.getpid())}
    assert listen_fds(env) == {} and "LISTEN_FDS" not in env
    env = {"LISTEN_FDS": "2", "LISTEN_PID": "1", "LISTEN_FDNAMES": "a:b"}
    assert listen_fds(env) == {}  # not for us


def test_supervisor_store_rules() -> None:
    """FDSTORE / FDSTOREREMOVE / duplicates / FDPOLL, as systemd applies them."""
    sup = Supervisor(["true"], notify_name=f"vballoon-test-{os.getpid()}")
    try:
        a, b = os.eventfd(0), os.eventfd(0)
        sup._apply("FDSTORE=1\nFDNAME=one\n", [a])
        sup._apply("FDSTORE=1\nFDNAME=dup\n", [os.dup(a)])  # same open file: dropped
        sup._apply("FDSTORE=1\nFDNAME=two\nFDPOLL=0\n", [b])
        assert [(e.name, e.poll) for e in sup.store] == [("one", True), ("two", False)]
        sup._apply("FDSTOREREMOVE=1\nFDNAME=one\n", [])
        assert [e.name for e in sup.store] == ["two"]
        x, y = socket.socketpair()
        sup._apply("FDSTORE=1\nFDNAME=conn\n", [x.detach()])
        y.close()  # the peer hangs up: a polled entry goes
        sup._poll_store()
        assert [e.name for e in sup.store] == ["two"]
        extra = os.eventfd(0)
        sup._apply("READY=1\n", [extra])  # fds without FDSTORE=1 are closed
        with pytest.raises(OSError):
            os.fstat(extra)
    finally:
        sup._close([e.fd for e in sup.store])
        sup.sock.close()


# -- a vhost-user message in flight at the crash --------------------------------------------


@pytest.mark.parametrize(
    "point", ["before-commit", "before-send", "before-consume", "in-consume", "after-read"]
)
async def test_message_in_flight_at_the_crash_is_answered_once(tmp_path: Path, point: str) -> None:
    """QEMU waits for each reply: vdev killed while it handles GET_CONFIG (before recording
    it, after recording it but before replying, after replying but before consuming it, or
    while consuming it, or just after consuming it, before recording that) must answer it
    once after the restart: the front-end gets exactly
    one GET_CONFIG reply, then the reply to its next request (a second, stale one would come
    back instead; a vdev that took the next request for the one it had consumed would leave
    it unanswered)."""
    from protocol.vhost_user import FrontendRequest as R

    flag = tmp_path / "armed"
    sock, api = tmp_path / "vm0.sock", tmp_path / "vdev.api"
    argv = serve_argv(
        sock, api_socket=api, device="virtio-balloon", target=str(3 * PAGE * 1000),
        extra=["--stats-interval", "0"],
    )  # fmt: skip
    crash = [
        "/usr/bin/env", f"VBALLOON_CRASH_AT={point}", f"VBALLOON_CRASH_REQUEST={int(R.GET_CONFIG)}",
        f"VBALLOON_CRASH_FLAG={flag}", argv[0], str(REPO / "tests" / "crashing_vdev.py"),
        *argv[3:],
    ]  # fmt: skip
    cmd_file = tmp_path / "vdev.json"
    cmd_file.write_text(json.dumps(crash))
    with trio.fail_after(120):
        async with vdev_serve(
            tmp_path, device="virtio-balloon", supervised=True,
            supervisor_args=["--command-file", str(cmd_file)],
        ) as vdev:  # fmt: skip
            g = await BalloonGuest.attach(str(vdev.socket_path))
            try:
                first = served_pid(vdev.proc.pid)
                flag.touch()
                num_pages, actual = await g.config()  # the crash, the restart, the answer
                assert (num_pages, actual) == (3000, 0)
                if point == "in-consume":
                    # no task runs between reading a message off the socket and recording
                    # that (a vdev killed there left a successor that took the next request
                    # for the consumed one and never answered it: this one): the point
                    # never fires, the same vdev answers
                    assert await g.fe.get_u64(R.GET_FEATURES) & (1 << 32)
                    assert flag.exists(), "a task ran while a message was half consumed"
                    assert served_pid(vdev.proc.pid) == first
                else:
                    with trio.fail_after(30):  # (the reply may have left just before the kill)
                        while flag.exists() or served_pid(vdev.proc.pid) in (first, None):
                            await trio.sleep(0.01)
                    # the next reply is GET_FEATURES' own (request() checks the reply's type)
                    assert await g.fe.get_u64(R.GET_FEATURES) & (1 << 32)
                used = await g.inflate([FREE_START_PFN + i for i in range(8)])
                assert used.len == 0
                assert (await retry(vdev.vm))["size_pages"] == 8
                log = (tmp_path / "vdev.log").read_text()
                assert ("connection resumed" in log) == (point != "in-consume")
                if point == "before-send":
                    assert "sending the reply to message" in log
                if point == "after-read":
                    assert "had been consumed" in log
            finally:
                g.close()


@pytest.mark.parametrize(
    "point", ["batch-before-commit", "batch-before-punch", "batch-before-push"]
)
async def test_mid_batch_kill_vmw_driver(tmp_path: Path, point: str) -> None:
    """vdev killed in the middle of a BATCHED_LOCK (after the model locked the pages, before
    anything was recorded; after recording, before the punch; or after recording and
    reclaiming, before the used ring): the driver's command is answered once after the
    restart, with the statuses it would have had, and not before the pages it locked are
    gone (the resumed vdev finishes the reclaim first); driver size == vdev size, every
    ballooned page a hole in the RAM file."""
    flag = tmp_path / "armed"
    sock, api = tmp_path / "vm0.sock", tmp_path / "vdev.api"
    argv = serve_argv(
        sock, api_socket=api, device="vmw", extra=["--host-memory", "64G", "--stats-interval", "0"]
    )
    crash = [
        "/usr/bin/env", f"VBALLOON_CRASH_AT={point}", f"VBALLOON_CRASH_FLAG={flag}",
        argv[0], str(REPO / "tests" / "crashing_vdev.py"), *argv[3:],
    ]  # fmt: skip
    cmd_file = tmp_path / "vdev.json"
    cmd_file.write_text(json.dumps(crash))
    ram = 64 * MiB
    pages = ram // PAGE
    with trio.fail_after(120):
        async with vdev_serve(
            tmp_path, device="vmw", supervised=True,
            supervisor_args=["--command-file", str(cmd_file)],
        ) as vdev, trio.open_nursery() as nursery:  # fmt: skip
            options = GuestOptions(
                str(vdev.socket_path), ram, DriverConfig(poll_interval=0.05), control_path=None
            )
            guest = await nursery.start(run_guest, options)
            driver = guest.driver
            await until(lambda: not driver.reset_required)
            first = served_pid(vdev.proc.pid)
            flag.touch()
            await retry(lambda: vdev.set_target(pages // 2))
            with trio.fail_after(30):
                while flag.exists():
                    await trio.sleep(0.01)
                while served_pid(vdev.proc.pid) in (first, None):
                    await trio.sleep(0.01)
            view = await settle(vdev, driver, pages // 2)
            mem = guest.memory
            assert mem.count(PageState.BALLOON) == driver.size == view["size_pages"]
            assert mem.verify_app() == 0
            holes = hole_mask(guest.transport.ram.fd, 0, pages)
            locked = np.zeros(pages, dtype=bool)
            locked[driver.pages(PageSize.SIZE_4K)] = True
            for f in driver.pages(PageSize.SIZE_2M):
                locked[int(f) : int(f) + 512] = True
            assert not (locked & ~holes).any(), "a ballooned page is still data"
            log = (tmp_path / "vdev.log").read_text()
            assert "connection resumed" in log
            assert "an answer written again before the reclaim was finished" not in log
            if point == "batch-before-commit":
                assert "rolled back an unfinished batch" in log
            nursery.cancel_scope.cancel()
