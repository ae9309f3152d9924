"""Nothing an API client does can hurt a guest: a real ``vdev serve`` process, a real guest
(our driver over our vhost-user front-end, in this process, as tests/test_e2e_driver.py
does) inflating and deflating through it, while this test attacks the API socket the way a
local user with access to it could (docs/SECURITY.md "API clients").

* aborted uploads (headers announce a body, the client goes away: this killed vdev with
  trio.BusyResourceError from hypercorn's trio worker) and 2,000 held connections closed at
  once: vdev stays up, the guest keeps inflating the whole time;
* 20,000 half-open connections (headers and one body byte each): vdev's fds stay within the
  API's budget and a new guest connects and inflates;
* a 100 MB body (Content-Length, and chunked): 413, vdev's RSS grows < 10 MB;
* SO_PEERCRED: uid 65534 in the read-only group can ``vdev stat`` but not ``vdev
  set-target`` (403), without the group it is refused even with the socket's mode opened,
  and the audit log names every change and who made it.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from guest_driver.driver import DriverConfig
from guest_driver.transport_vhost_user import Guest, GuestOptions, run_guest
from lab.vdev_process import REPO_ROOT, ApiVdev, vdev_serve
from protocol.errors import ApiError

MiB = 1 << 20
RAM = 64 * MiB
PAGES = RAM // 4096
CYCLE_PAGES = 4096  # 16 MiB in and out, over and over
#: vdev serve --api-max-connections for these tests.
MAX_CONNECTIONS = 32


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@asynccontextmanager
async def served(
    directory: Path, *, sockets: int = 1, target_pages: int = 0, extra: tuple[str, ...] = ()
) -> AsyncIterator[ApiVdev]:
    async with vdev_serve(
        directory,
        target=str(target_pages * 4096),
        socket_count=sockets if sockets > 1 else None,
        extra=[
            "--host-memory", "64G", "--api-max-connections", str(MAX_CONNECTIONS),
            "--api-body-timeout", "2", "--api-header-timeout", "2", *extra,
        ],
        settings={"Mem/CtlMaxPercent": 99},
    ) as vdev:  # fmt: skip
        yield vdev
        assert vdev.proc.alive(), vdev.proc.log()[-3000:]
    log = vdev.proc.log()
    assert "Traceback" not in log, log[-3000:]
    assert "API connection failed" not in log, log[-3000:]  # nothing escaped to the guard


async def start_guest(nursery: trio.Nursery, sock: str) -> Guest:
    options = GuestOptions(sock, RAM, DriverConfig(poll_interval=0.2))
    guest: Guest = await nursery.start(run_guest, options)
    return guest


async def retrying(fn: Callable[[], Any], deadline_s: float = 20.0) -> Any:
    """An API call retried while vdev answers 503 (its connection cap is full)."""
    with trio.fail_after(deadline_s):
        while True:
            try:
                return await fn()
            except ApiError as e:
                if e.status not in (0, 503):
                    raise
            await trio.sleep(0.05)


class Inflater:
    """Inflates the guest to CYCLE_PAGES and back to 0 through the API, over and over; each
    cycle must finish within ``cycle_limit`` seconds."""

    def __init__(self, vdev: ApiVdev, guest: Guest, cycle_limit: float = 15.0) -> None:
        self.vdev, self.guest, self.cycle_limit = vdev, guest, cycle_limit
        self.cycles = 0
        self.durations: list[float] = []

    def summary(self, since: int = 0) -> str:
        d = sorted(self.durations[since:]) or [0.0]
        return f"{len(d)} cycles, median {d[len(d) // 2]:.3f} s, max {d[-1]:.3f} s"

    async def run(self) -> None:
        while True:
            t0 = trio.current_time()
            with trio.fail_after(self.cycle_limit):
                for target in (CYCLE_PAGES, 0):
                    await retrying(lambda t=target: self.vdev.set_target(t))  # type: ignore[misc]
                    while not (
                        self.guest.driver.size >= target if target else self.guest.driver.size == 0
                    ):
                        await trio.sleep(0.01)
            self.durations.append(trio.current_time() - t0)
            self.cycles += 1

    async def cycles_while(self, attack: Callable[[], Any]) -> int:
        """Cycles completed while ``attack`` (blocking, run in a thread) runs."""
        before = self.cycles
        await trio.to_thread.run_sync(attack)
        return self.cycles - before


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)  # blocking: waits while vdev's backlog is full (a timeout would EAGAIN)
    s.settimeout(10)
    return s


def aborted_uploads(path: str, count: int) -> None:
    """curl --max-time 0.3 -X PUT -H 'Content-Length: 100' --data-binary '{' ..., count times."""
    for i in range(count):
        s = connect(path)
        try:
            s.sendall(b"PUT /vms/vm0/target HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            time.sleep((0.0, 0.001, 0.01, 0.05)[i % 4])
        finally:
            s.close()


def held_then_closed(path: str, count: int) -> None:
    """``count`` connections (some mid-request, some event subscribers) closed at once."""
    held = []
    try:
        for i in range(count):
            s = connect(path)
            held.append(s)
            try:
                if i % 3 == 0:
                    s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
                elif i % 3 == 1:
                    s.sendall(
                        b"PUT /vms/vm0/target HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"
                    )
            except OSError:
                pass  # refused over the cap (503) and closed already
    finally:
        for s in held:
            s.close()


async def test_api_storms_never_stop_a_guest_inflating(tmp_path: Path) -> None:
    with trio.fail_after(150):
        async with served(tmp_path) as vdev, trio.open_nursery() as nursery:
            guest = await start_guest(nursery, str(vdev.socket_path))
            inflater = Inflater(vdev, guest)
            nursery.start_soon(inflater.run)
            while inflater.cycles < 5:
                await trio.sleep(0.05)
            print(f"\nquiet API: {inflater.summary()}")
            api = str(vdev.api_socket)
            # the aborted-upload loop (it took 10-24 of these to kill vdev before)
            mark = len(inflater.durations)
            cycles = await inflater.cycles_while(lambda: aborted_uploads(api, 200))
            print(f"200 aborted uploads: {inflater.summary(mark)}")
            assert vdev.proc.alive()
            assert cycles >= 1, "the guest did not inflate during the aborted uploads"
            # 2,000 held connections closed at once, three times
            mark = len(inflater.durations)
            for _ in range(3):
                await trio.to_thread.run_sync(held_then_closed, api, 2000)
            print(f"3 x 2,000 held then closed: {inflater.summary(mark)}")
            before = inflater.cycles
            while inflater.cycles < before + 2:  # and the guest goes on
                await trio.sleep(0.05)
            assert vdev.proc.alive()
            view = await retrying(vdev.vm)
            assert view["connected"] and view["state"] == "active"
            nursery.cancel_scope.cancel()


HOLDER = """
import socket, sys
path, count = sys.argv[1], int(sys.argv[2])
held = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)  # blocking: waits while vdev's backlog is full
    try:
        s.sendall(b"PUT /vms/vm0/target HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 100\\r\\n\\r\\n{")
    except OSError:
        pass  # refused over the cap (503) and closed already
    held.append(s)
print(len(held), flush=True)
sys.stdin.read()  # hold them until told
"""


def half_open(path: str, count: int, processes: int = 4) -> list[subprocess.Popen[str]]:
    """``count`` connections that sent their headers and one body byte and wait, held by
    ``processes`` children (one process may not hold 20,000 fds here)."""
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, path, str(count // processes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    for h in holders:
        assert h.stdout is not None
        assert int(h.stdout.readline()) == count // processes
    return holders


async def test_20000_half_open_connections_leave_room_for_a_new_guest(tmp_path: Path) -> None:
    with trio.fail_after(180):
        async with served(tmp_path, sockets=2, target_pages=CYCLE_PAGES) as vdev:
            pid = vdev.proc.pid
            baseline = fd_count(pid)
            holders: list[subprocess.Popen[str]] = []
            peak = baseline

            async def watch_fds() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, fd_count(pid))
                    await trio.sleep(0.02)

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch_fds)
                    t0 = time.monotonic()
                    holders = await trio.to_thread.run_sync(half_open, str(vdev.api_socket), 20000)
                    t_held = time.monotonic()
                    print(f"20,000 connections made in {t_held - t0:.1f} s")
                    # a guest connects now, while they are held, and inflates to --target
                    guest = await start_guest(nursery, str(vdev.socket_paths[1]))
                    while guest.driver.size < CYCLE_PAGES:
                        await trio.sleep(0.02)
                    t_inflated = time.monotonic()
                    vm1 = await retrying(lambda: vdev._call(vdev.client.vm, "vm1"))
                    assert vm1["connected"] and vm1["size_pages"] >= CYCLE_PAGES
                    nursery.cancel_scope.cancel()
            finally:
                for h in holders:
                    h.communicate("")
            # the API never held more than its cap (and the guest's own fds are few)
            assert peak <= baseline + MAX_CONNECTIONS + 16, (peak, baseline)
            assert vdev.proc.alive()
            print(f"guest inflated {t_inflated - t_held:.2f} s after 20,000 were held")


def big_upload(path: str, chunked: bool, total: int = 100 * MiB) -> bytes:
    """Try to send a ``total``-byte body; returns what vdev answered."""
    s = connect(path)
    try:
        if chunked:
            s.sendall(
                b"PUT /vms/vm0/target HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
        else:
            s.sendall(
                b"PUT /vms/vm0/target HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total
            )
        chunk = b"9" * MiB
        sent = 0
        try:
            while sent < total:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
        except OSError:
            pass  # vdev answered and closed: what we want
        s.settimeout(10)
        answer = b""
        try:
            while data := s.recv(65536):
                answer += data
        except OSError:
            pass
        return answer
    finally:
        s.close()


async def test_a_100mb_body_is_413_and_never_read(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with served(tmp_path) as vdev:
            pid = vdev.proc.pid
            await vdev.vm()  # the API has served once (its code paths loaded)
            before = rss_kib(pid)
            peak = before
            for chunked in (False, True, False, True):
                async with trio.open_nursery() as nursery:

                    async def sample() -> None:
                        nonlocal peak
                        while True:
                            peak = max(peak, rss_kib(pid))
                            await trio.sleep(0.01)

                    nursery.start_soon(sample)
                    answer = await trio.to_thread.run_sync(
                        big_upload, str(vdev.api_socket), chunked
                    )
                    nursery.cancel_scope.cancel()
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 413 "), answer[:300]
                assert "larger than 4096 bytes" in json.loads(body)["error"]
            assert (peak - before) * 1024 < 10 * MiB, (before, peak)
            assert vdev.proc.alive()


# ------------------------------------------------------------------------------ who may do what

READ_GID = 4242  # any gid will do: membership is what SO_PEERCRED and /proc tell
NOBODY = 65534


#: ``vdev ARGS`` run by uid 65534 with the given groups. The interpreter and the checkout
#: may live under a directory only root can read (root's 0700 home, a ``mktemp -d`` clone),
#: so the child starts as root and loads everything the command could need: one GET as root
#: warms the client's code paths, and every module of the CLI's packages is imported up
#: front (rich and click load some lazily, e.g. ``rich._emoji_codes``, ``click._textwrap``
#: on an error's path). Then it drops to uid 65534
#: before the command runs: the peer vdev sees on the command's connection is uid 65534.
AS_NOBODY = """
import importlib, json, os, pkgutil, sys
groups = json.loads(sys.argv[1])
api = sys.argv[2]
from vdev.cli.main import main
from vdev.api.client import ApiClient
import click, h11, httpcore, httpx, rich, vdev.api, vdev.cli
for pkg in (click, h11, httpcore, httpx, rich, vdev.cli, vdev.api):
    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        try:
            importlib.import_module(mod.name)
        except Exception:
            pass  # extras the CLI never uses (rich's Jupyter support, Windows-only modules)
with ApiClient(api) as c:
    c.vms(); c.host()
os.setgroups(groups)
os.setgid(65534)
os.setuid(65534)
assert os.getuid() == 65534 and os.geteuid() == 65534
main([*sys.argv[3:], "--api-socket", api])
"""


def vdev_cli(api: str, groups: list[int], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", AS_NOBODY, json.dumps(groups), api, *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid 65534 needs root")
async def test_read_only_group_reads_others_are_refused_and_changes_are_audited() -> None:
    # a directory uid 65534 can reach (pytest's tmp_path is root's alone)
    directory = Path(tempfile.mkdtemp(prefix="vdev-api-auth-"))
    os.chmod(directory, 0o755)
    try:
        with trio.fail_after(120):
            async with served(directory, extra=("--api-read-group", str(READ_GID))) as vdev:
                api = str(vdev.api_socket)
                st = os.stat(api)
                assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, READ_GID)

                # the read-only group reads...
                r = await trio.to_thread.run_sync(lambda: vdev_cli(api, [READ_GID], "stat"))
                assert r.returncode == 0, r.stderr
                assert "vm0" in r.stdout
                r = await trio.to_thread.run_sync(
                    lambda: vdev_cli(api, [READ_GID], "config", "get", "Mem/CtlMaxPercent")
                )
                assert r.returncode == 0 and "99" in r.stdout, r.stderr
                # ...and changes nothing
                r = await trio.to_thread.run_sync(
                    lambda: vdev_cli(api, [READ_GID], "set-target", "vm0", "16M")
                )
                assert r.returncode != 0
                assert "read-only group 4242: PUT refused" in r.stderr, r.stderr
                assert (await vdev.vm())["target_pages"] == 0

                # everyone else: the mode keeps them out; opened, SO_PEERCRED still does
                r = await trio.to_thread.run_sync(lambda: vdev_cli(api, [], "stat"))
                assert r.returncode != 0, r.stdout
                assert "not readable" in r.stderr or "cannot reach" in r.stderr, r.stderr
                os.chmod(api, 0o666)
                r = await trio.to_thread.run_sync(lambda: vdev_cli(api, [], "stat"))
                assert r.returncode != 0
                assert f"uid {NOBODY}" in r.stderr and "may not use this API" in r.stderr

                # the owner (root here) changes things; each change is audited
                await vdev.set_target(1000)
                with pytest.raises(ApiError, match="no front-end is connected"):
                    await vdev.reset()  # nothing to reset: refused, not audited as done
                await vdev.set_setting("Mem/CtlMaxPercent", 90)
                audit = [line for line in vdev.proc.log().splitlines() if "vdev.audit" in line]
                me = f"by uid=0 pid={os.getpid()} cmdline="
                assert any("target vm0 " + me in line for line in audit), audit
                assert not any("reset vm0 " in line for line in audit), audit
                assert any("setting /Mem/CtlMaxPercent " + me in line for line in audit), audit
                assert all("pytest" in line or "python" in line for line in audit), audit
                # the read-only group's refused attempt is logged too, and changed nothing
                assert "refused PUT" in vdev.proc.log()
    finally:
        for p in directory.iterdir():
            p.unlink()
        directory.rmdir()
