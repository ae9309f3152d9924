"""vdev serve owns its socket files and nothing else (issue: "Sockets it does not own").

* a second ``vdev serve`` on a path a running one holds is refused (exit 2, naming the
  owner's pid) while a guest inflates through the first, which keeps working;
* shutdown unlinks only the files it bound (a file put at the path since, a foreign
  ``.NAME~`` or ``NAME.lock`` stay); a socket left by a killed vdev is replaced;
* the sockets get their mode explicitly: 0600 under umask 000, and 0660 with the group of
  ``--socket-group``: uid 65534 cannot connect without, can with it.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from test_e2e_driver import PAGES, rig, settled

from lab.vdev_process import REPO_ROOT, start_vdev
from vdev import socket_files

NOBODY = 65534


def _serve(*argv: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "vdev", "serve", *argv],
        capture_output=True, cwd=cwd, stdin=subprocess.DEVNULL, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip


def _wait_socket(path: Path | str, srv: object) -> None:
    """The API socket listens a moment after the vhost-user ones: wait (with a deadline)."""
    deadline = time.monotonic() + 20
    while not Path(path).is_socket():
        assert time.monotonic() < deadline, getattr(srv, "log_tail", lambda: "")()
        time.sleep(0.02)


def _ident(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


async def test_second_vdev_is_refused_and_the_first_keeps_working(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with rig(tmp_path) as (vdev, guest, _):
            await vdev.set_target(5000)
            await settled(vdev, guest, 5000)
            sock = vdev.socket_path
            before = _ident(sock), _ident(vdev.api_socket)
            for extra in (
                ["--no-api"],
                ["--api-socket", str(tmp_path / "other.api")],
                ["--api-socket", str(vdev.api_socket), "--socket-path", str(tmp_path / "b")],
            ):
                argv = extra if "--socket-path" in extra else ["--socket-path", str(sock), *extra]
                done = await trio.to_thread.run_sync(lambda a=argv: _serve(*a, cwd=tmp_path))
                err = done.stderr.decode()
                assert done.returncode == 2, err
                assert "Traceback" not in err
                assert f"in use by a running vdev (pid {vdev.proc.pid})" in err or (
                    "is in use by another process" in err
                ), err
                # nothing of the first was touched; the refused one left nothing behind
                assert (_ident(sock), _ident(vdev.api_socket)) == before
                assert not (tmp_path / "other.api").exists()
                assert not (tmp_path / "b").exists() and not (tmp_path / "b.lock").exists()
            # The first still serves its guest, in both directions.
            await vdev.set_target(PAGES // 2)
            await settled(vdev, guest, PAGES // 2)
            await vdev.set_target(1000)
            await settled(vdev, guest, 1000)
            assert vdev.proc.alive()
    assert not sock.exists() and not Path(f"{sock}.lock").exists()  # removed at its stop


def test_shutdown_unlinks_only_what_it_bound(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    foreign_tmp = tmp_path / ".vm.sock~"  # the temporary name older vdevs used
    foreign_tmp.write_text("someone's file")
    with start_vdev(sock, socket_count=2, log_path=tmp_path / "log", timeout=20) as srv:
        paths = [Path(p) for p in srv.paths]
        api = Path(f"{paths[0]}.api")
        deadline = time.monotonic() + 20  # the API listens a moment after the vhost-user sockets
        while not api.is_socket():
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.02)
        assert all(p.is_socket() for p in [*paths, api])
        # Someone replaces vm.sock1 and the API socket with sockets of their own.
        squatters = []
        for p in (paths[1], api):
            p.unlink()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(p))
            s.listen(1)
            squatters.append(s)
        theirs = [_ident(paths[1]), _ident(api)]
        assert srv.stop() == 0
    try:
        assert not paths[0].exists()  # ours: removed
        assert [_ident(paths[1]), _ident(api)] == theirs  # theirs: kept
        assert foreign_tmp.read_text() == "someone's file"
        assert not any(
            p.name.startswith(".vm.sock") and p != foreign_tmp for p in tmp_path.iterdir()
        )
        assert not any(p.suffix == ".lock" for p in tmp_path.iterdir())
    finally:
        for s in squatters:
            s.close()


def test_stale_socket_and_lock_of_a_killed_vdev_are_taken_over(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    first = start_vdev(sock, log_path=tmp_path / "log1", timeout=20)
    first.stop(sig=9)  # SIGKILL: its socket and lock file stay
    assert sock.is_socket() and Path(f"{sock}.lock").exists()
    foreign_lock = tmp_path / "x.sock.lock"
    foreign_lock.write_text("not vdev's\n")
    with start_vdev(sock, log_path=tmp_path / "log2", timeout=20) as second:
        assert Path(f"{sock}.lock").read_text() == f"vdev pid {second.pid}\n"
        # A lock file that is not vdev's is used but never written to or removed.
        with start_vdev(tmp_path / "x.sock", no_api=True, log_path=tmp_path / "log3") as third:
            assert foreign_lock.read_text() == "not vdev's\n"
            assert third.stop() == 0
        assert foreign_lock.read_text() == "not vdev's\n"
        assert second.stop() == 0
    assert not sock.exists() and not Path(f"{sock}.lock").exists()


def test_another_program_listening_on_the_path_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(sock))
        other.listen(1)
        done = _serve("--socket-path", str(sock), "--no-api", cwd=tmp_path)
        assert done.returncode == 2
        assert "another program is listening on it" in done.stderr.decode()
        assert sock.is_socket()


def test_claims_in_process(tmp_path: Path) -> None:
    """The claim is per process and reference-counted; released, the lock file goes."""
    path = str(tmp_path / "s")
    with socket_files.claim(path) as a, socket_files.claim(path) as b:
        assert a is b
        assert Path(f"{path}.lock").exists()
    assert not Path(f"{path}.lock").exists()


# --------------------------------------------------------------------------------------------
# Modes and groups


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="vdev-sock-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _require_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("these checks switch to uid 65534: CI runs them as root")
        pytest.skip("needs root to switch to uid 65534")


def _connect_as_nobody(path: Path) -> str:
    """Connect to ``path`` as uid/gid 65534 (and only that group) in a child; "ok" or the
    error name."""
    code = (
        "import os, socket, sys\n"
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1]); print('ok')\n"
        "except OSError as e:\n"
        "    print(os.strerror(e.errno))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, timeout=30, check=True
    )
    return done.stdout.decode().strip()


def test_umask_000_still_gives_0600_sockets(open_dir: Path) -> None:
    _require_root()
    old = os.umask(0)
    try:
        srv = start_vdev(open_dir / "vm.sock", socket_count=2, log_path=open_dir / "log")
    finally:
        os.umask(old)
    with srv:
        api = Path(f"{srv.paths[0]}.api")
        _wait_socket(api, srv)
        for p in [*srv.paths, api, *(f"{q}.lock" for q in srv.paths)]:
            assert stat.S_IMODE(os.lstat(p).st_mode) == 0o600, p
        for p in [*srv.paths, api]:
            assert _connect_as_nobody(Path(p)) == os.strerror(13)  # EACCES
        assert srv.stop() == 0


def test_socket_group_lets_that_group_connect(open_dir: Path) -> None:
    _require_root()
    with start_vdev(
        open_dir / "vm.sock", extra=["--socket-group", str(NOBODY)], log_path=open_dir / "log"
    ) as srv:
        _wait_socket(f"{srv.paths[0]}.api", srv)
        st = os.lstat(srv.paths[0])
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY
        assert _connect_as_nobody(Path(srv.paths[0])) == "ok"
        # the API socket keeps its own mode (api_socket_mode, 0600)
        assert _connect_as_nobody(Path(f"{srv.paths[0]}.api")) == os.strerror(13)
        assert srv.stop() == 0


@pytest.mark.parametrize(
    ("setup", "why"),
    [
        ("symlink-lock", "cannot open the lock file"),
        ("dir-lock", "cannot open the lock file"),
        ("fifo-lock", "is not a regular file"),
        ("symlink-path", "exists and is not a socket"),
        ("file-path", "exists and is not a socket"),
        ("no-dir", "does not exist"),
    ],
)
def test_claim_refuses_what_is_not_ours_and_touches_nothing(
    tmp_path: Path, setup: str, why: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "s"
    lock = Path(f"{path}.lock")
    if setup == "symlink-lock":
        lock.symlink_to(victim)
    elif setup == "dir-lock":
        lock.mkdir()
    elif setup == "fifo-lock":
        os.mkfifo(lock)
    elif setup == "symlink-path":
        path.symlink_to(victim)
    elif setup == "file-path":
        path.write_text("precious")
    else:
        path = tmp_path / "nodir" / "s"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(socket_files.ConfigError, match=why):
        socket_files.claim(str(path))
    assert sorted(os.listdir(tmp_path)) == before
    assert victim.read_text() == "precious"


def test_remove_checks_the_inode_which_cannot_be_reused(tmp_path: Path) -> None:
    """The listener closed (as at shutdown), its file replaced by someone: the new file
    cannot get the old inode number (a duplicate fd keeps it allocated) and stays."""
    path = tmp_path / "s"
    with socket_files.claim(str(path)):
        listener = socket_files.bind_listener(str(path), mode=0o640)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640
        listener.sock.close()
        for _ in range(20):  # freed inode numbers are reused at once: try hard
            path.unlink()
            path.write_text("someone else's")
            assert _ident(path) != listener.ident
        assert not listener.remove()
        assert path.read_text() == "someone else's"
        listener = socket_files.bind_listener(str(tmp_path / "t"))
        assert listener.remove() and not (tmp_path / "t").exists()
        listener.sock.close()


def test_vdevs_racing_for_one_path_exactly_one_wins(tmp_path: Path) -> None:
    """Three ``vdev serve`` started at once on the same paths: one serves, the others exit 2
    naming it, and none of them removed a file of the winner's (its API answers)."""
    from conformance.backend import unix_listening
    from lab.vdev_process import spawn_vdev
    from vdev.api.client import ApiClient

    sock = tmp_path / "vm.sock"
    racers = [spawn_vdev(sock, log_path=tmp_path / f"log{i}", verbose=0) for i in range(3)]
    try:
        deadline = time.monotonic() + 60
        while sum(r.alive() for r in racers) > 1 or not unix_listening([str(sock), f"{sock}.api"]):
            assert time.monotonic() < deadline, [r.log_tail() for r in racers]
            time.sleep(0.05)
        (winner,) = [r for r in racers if r.alive()]
        for r in racers:
            if r is not winner:
                assert r.returncode == 2, r.log_tail()
                assert f"in use by a running vdev (pid {winner.pid})" in r.log(), r.log_tail()
        assert Path(f"{sock}.lock").read_text() == f"vdev pid {winner.pid}\n"
        with ApiClient(f"{sock}.api") as client:
            assert [v["name"] for v in client.vms()] == ["vm0"]
        assert winner.stop() == 0
    finally:
        for r in racers:
            r.stop()
    assert sorted(os.listdir(tmp_path)) == [f"log{i}" for i in range(3)]
