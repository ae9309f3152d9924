"""A QEMU the backstop stopped is never stranded, even when vdev and its guard die together:
the stop file (written before each SIGSTOP, read when ``vdev serve`` starts) and the guard's
own session (a SIGKILL to vdev's process group does not reach it). Real processes: a
``sleep`` plays QEMU, a Python child plays vdev, ``vdev serve`` runs as itself."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from proc_states import proc_state, wait_state

from lab.vdev_process import vdev_serve
from vdev.policy.guard import (
    MAX_STOP_FILE,
    GuardRecord,
    StopFile,
    StopGuard,
    StopRecord,
    boot_id,
    default_stop_file,
    parse_stop_file,
    render_stop_file,
    resume_left_stopped,
    start_time,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _wait_gone(pid: int, timeout: float = 20.0) -> bool:
    """Whether ``pid`` is gone or a zombie (it runs nothing any more) within ``timeout``."""
    end = time.monotonic() + timeout
    while True:  # looked at once at least, also with a timeout of 0
        try:
            if proc_state(pid) == "Z":
                return True
        except FileNotFoundError:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.01)


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


@pytest.fixture
def qemu() -> Iterator[subprocess.Popen[bytes]]:
    """The stand-in QEMU: a process to stop and continue."""
    proc = _sleeper()
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _vdev_child(qemu_pid: int, stop_file: Path | None) -> tuple[subprocess.Popen[bytes], int]:
    """A process playing vdev, in its own process group: starts its guard (with the stop file
    if given), stops ``qemu_pid`` through it (the backstop's path: Backstop._apply calls
    StopGuard.stop) and waits. Returns it and its guard's PID."""
    code = (
        "import sys, time\n"
        "from vdev.policy.guard import StopFile, StopGuard\n"
        f"g = StopGuard(StopFile({str(stop_file)!r}) if {stop_file is not None} else None)\n"
        "assert g.wait_ready()\n"
        f"assert g.stop({qemu_pid}, 'vm0', '/sys/fs/cgroup/memory/vms')\n"
        "print(g.proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    vdev = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=REPO_ROOT, start_new_session=True
    )
    assert vdev.stdout is not None
    line = vdev.stdout.readline()
    assert line.strip().isdigit(), f"the vdev stand-in failed: {line!r}"
    return vdev, int(line)


# --------------------------------------------------------------------------- the format

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+:@-]{0,20}", fullmatch=True)
cgroups = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.none(), st.uuids().map(str)),
    st.lists(
        st.tuples(st.integers(1, 4_194_304), st.integers(0, 2**63), names, cgroups),
        max_size=8,
    ),
    st.one_of(
        st.none(),
        st.builds(
            GuardRecord,
            st.integers(1, 4_194_304),
            st.integers(0, 2**63),
            st.integers(1, 4_194_304),
            st.integers(0, 2**63),
        ),
    ),
)
def test_the_stop_file_format_round_trips(
    boot: str | None, rows: list[tuple[int, int, str, str]], guard: GuardRecord | None
) -> None:
    records = [StopRecord(pid, started, name, cgroup) for pid, started, name, cgroup in rows]
    parsed = parse_stop_file(render_stop_file(boot, records, guard).encode())
    assert parsed.problems == []
    assert parsed.boot == boot
    assert parsed.guard == guard
    assert parsed.records == [
        StopRecord(r.pid, r.started, r.name, " ".join(r.cgroup.split()) or "-") for r in records
    ]


def test_the_default_stop_file_is_named_after_the_instances_own_socket(tmp_path: Path) -> None:
    sock = str(tmp_path / "vm0.sock")
    assert default_stop_file([sock, sock + "1"], None) == sock + ".stopped"
    assert default_stop_file([sock], "/elsewhere/x.api", "/run/vb:/run/other") == (
        "/run/vb/vm0.sock.stopped"
    )
    assert default_stop_file([], "/run/api/vdev.api") == "/run/api/vdev.api.stopped"
    assert default_stop_file([], None, "/run/vb") is None  # --fd without an API: no name


def test_the_stop_file_follows_the_stops_and_is_replaced_whole(
    tmp_path: Path, qemu: subprocess.Popen[bytes]
) -> None:
    path = tmp_path / "vm0.sock.stopped"
    guard = StopGuard(StopFile(str(path)))
    try:
        assert guard.stop(qemu.pid, "vm0", "/cg")
        assert wait_state(qemu.pid, {"T"}) == "T"
        parsed = parse_stop_file(path.read_bytes())
        assert parsed.problems == [] and parsed.boot == boot_id()
        assert parsed.records == [StopRecord(qemu.pid, start_time(qemu.pid) or -1, "vm0", "/cg")]
        guard.cont(qemu.pid)
        assert wait_state(qemu.pid, {"S", "R"}) in {"S", "R"}
        assert not path.exists()  # nothing stopped: no file
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left
    finally:
        guard.close()


def test_a_stop_file_that_cannot_be_written_is_reported_and_the_guard_still_covers(
    tmp_path: Path, qemu: subprocess.Popen[bytes]
) -> None:
    stops = StopFile(str(tmp_path / "missing-dir" / "vm0.sock.stopped"))
    guard = StopGuard(stops)
    try:
        assert guard.stop(qemu.pid)
        assert stops.error is not None and "missing-dir" in stops.error
        assert wait_state(qemu.pid, {"T"}) == "T"
    finally:
        guard.close()  # the guard continues it
    assert wait_state(qemu.pid, {"S", "R"}) in {"S", "R"}


# --------------------------------------------------------------------------- start-up


BAD_STOP_FILES = [
    (b"garbage\n", "line 1 is not 'PID STARTTIME"),
    (b"123\n", "line 1 is not 'PID STARTTIME"),
    (b"12x 456\n", "line 1 is not 'PID STARTTIME"),
    (b"-5 10\n", "line 1 is not 'PID STARTTIME"),
    (b"0 10 vm0\n", "line 1 is not 'PID STARTTIME"),
    (b"\xff\xfe\x00\x01\n", "line 1 is not 'PID STARTTIME"),
    (b"# header\nboot 1234\n77 88 vm0 /cg\n77 8", "line 4 is incomplete"),
    (b"123 456", "line 1 is incomplete"),
    (b"9" * (MAX_STOP_FILE + 1), f"larger than {MAX_STOP_FILE} bytes"),
]


@pytest.mark.parametrize(("data", "problem"), BAD_STOP_FILES)
def test_a_corrupt_or_partial_stop_file_is_reported_and_cleared(
    tmp_path: Path, data: bytes, problem: str
) -> None:
    path = tmp_path / "vm0.sock.stopped"
    path.write_bytes(data)
    actions = resume_left_stopped(str(path))
    assert actions, "a bad stop file must be reported"
    assert all(kind == "skipped" for kind, _, _ in actions)
    assert any(problem in detail and str(path) in detail for _, _, detail in actions), actions
    assert not path.exists()


def test_what_is_not_a_stop_file_is_reported_and_never_waited_on(tmp_path: Path) -> None:
    """A directory, a FIFO (reading it would block start-up) or a symlink at the stop file's
    path: reported, not read, left alone."""
    target = tmp_path / "elsewhere"
    target.write_text("1 2\n")
    cases = {"dir": "is not a regular file", "fifo": "is not a regular file", "link": "cannot read"}
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(target)
    for name, problem in cases.items():
        path = tmp_path / name
        [(kind, _, detail)] = resume_left_stopped(str(path))  # a blocked open hangs here
        assert kind == "skipped" and problem in detail and str(path) in detail, detail
        assert path.is_symlink() or path.exists()
    assert target.read_text() == "1 2\n"
    assert resume_left_stopped(str(tmp_path / "none")) == []  # no file: nothing to do


def test_only_the_same_process_still_stopped_is_continued(tmp_path: Path) -> None:
    """Of four records: the same process and stopped (continued); a PID now another process
    (start time differs), one written in another boot, one gone (none signalled); a bad line
    beside them does not stop the good one."""
    procs = [_sleeper() for _ in range(3)]
    same, reused, other_boot = procs
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        for p in procs:
            os.kill(p.pid, signal.SIGSTOP)
            assert wait_state(p.pid, {"T"}) == "T"

        def started(p: subprocess.Popen[bytes]) -> int:
            value = start_time(p.pid)
            assert value is not None
            return value

        path = tmp_path / "vm0.sock.stopped"
        path.write_text(
            render_stop_file(
                boot_id(),
                [
                    StopRecord(same.pid, started(same), "vm0", "/cg/a"),
                    StopRecord(reused.pid, started(reused) + 1, "vm1", "/cg/a"),
                    StopRecord(gone.pid, 12345, "vm2", "/cg/a"),
                ],
            )
            + "not a record\n"
        )
        other = tmp_path / "other-boot.stopped"
        other.write_text(
            render_stop_file(
                "00000000-0000-0000-0000-000000000000",
                [StopRecord(other_boot.pid, started(other_boot), "vm3", "/cg/b")],
            )
        )
        actions = resume_left_stopped(str(path)) + resume_left_stopped(str(other))
        assert wait_state(same.pid, {"S", "R"}) in {"S", "R"}
        resumed = [a for a in actions if a[0] == "resumed"]
        assert resumed == [
            (
                "resumed",
                "/cg/a",
                f"vm0 (pid {same.pid}) continued: left stopped by a previous vdev"
                f" (recorded in {path})",
            )
        ]
        assert [a[0] for a in actions if a[0] != "resumed"] == ["skipped"]  # the bad line
        time.sleep(0.1)  # a SIGCONT, had one been sent, is delivered by now
        assert proc_state(reused.pid) == "T" and proc_state(other_boot.pid) == "T"
        assert not path.exists() and not other.exists()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_stalled_guard_of_a_dead_vdev_is_ended_before_the_new_vdev_stops_again(
    tmp_path: Path, qemu: subprocess.Popen[bytes]
) -> None:
    """The old vdev dies while its guard is stalled (stopped here; under memory pressure it
    can sit in reclaim): the guard has not read the end of its pipe yet. The starting vdev
    continues the QEMU from the stop file and ends that guard first: had it lived, it would
    wake up later and continue the QEMU the new vdev stopped again meanwhile."""
    path = tmp_path / "vm0.sock.stopped"
    vdev, guard_pid = _vdev_child(qemu.pid, path)
    try:
        assert wait_state(qemu.pid, {"T"}) == "T"
        assert parse_stop_file(path.read_bytes()).guard == GuardRecord(
            guard_pid, start_time(guard_pid) or -1, vdev.pid, start_time(vdev.pid) or -1
        )
        os.kill(guard_pid, signal.SIGSTOP)  # the guard stalls ...
        assert wait_state(guard_pid, {"T"}) == "T"
        vdev.kill()  # ... and its vdev dies: the pipe's end is there, unread
        vdev.wait()
        actions = resume_left_stopped(str(path))  # the new vdev starts
        assert [a[0] for a in actions] == ["resumed"]
        assert wait_state(qemu.pid, {"S", "R"}) in {"S", "R"}
        new = StopGuard(StopFile(str(path)))  # the new vdev's backstop stops it again
        try:
            assert new.wait_ready()
            assert new.stop(qemu.pid, "vm0", "/cg")
            assert wait_state(qemu.pid, {"T"}) == "T"
            with contextlib.suppress(ProcessLookupError):
                os.kill(guard_pid, signal.SIGCONT)  # the old guard, had it lived, wakes up
            time.sleep(0.3)  # and its SIGCONT to the QEMU would have come by now
            assert proc_state(qemu.pid) == "T"
            with contextlib.suppress(FileNotFoundError):  # it had ended before, or is a zombie
                assert proc_state(guard_pid) == "Z"
        finally:
            new.close()
        assert wait_state(qemu.pid, {"S", "R"}) in {"S", "R"}
    finally:
        vdev.kill()
        vdev.wait()
        if not _wait_gone(guard_pid, 0.0):
            os.kill(guard_pid, signal.SIGKILL)


def test_a_guard_that_ignores_sigterm_is_killed(
    tmp_path: Path, qemu: subprocess.Popen[bytes]
) -> None:
    """A process named as the guard that does not end on SIGTERM within the timeout is
    SIGKILLed and reported; the QEMU is continued from the file all the same."""
    hold = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
         "print('ready', flush=True)\n"
         "time.sleep(60)\n",
         "vdev.policy.guard"],  # in its argv, as a guard's: taken for one
        stdout=subprocess.PIPE,
    )  # fmt: skip
    dead_vdev = subprocess.Popen(["true"])
    dead_vdev.wait()
    try:
        assert hold.stdout is not None and hold.stdout.readline() == b"ready\n"
        os.kill(qemu.pid, signal.SIGSTOP)
        assert wait_state(qemu.pid, {"T"}) == "T"
        started_q, started_h = start_time(qemu.pid), start_time(hold.pid)
        assert started_q is not None and started_h is not None
        path = tmp_path / "vm0.sock.stopped"
        path.write_text(
            render_stop_file(
                boot_id(),
                [StopRecord(qemu.pid, started_q, "vm0", "/cg")],
                GuardRecord(hold.pid, started_h, dead_vdev.pid, 12345),
            )
        )
        actions = resume_left_stopped(str(path))
        assert hold.wait(timeout=5) == -signal.SIGKILL
        kinds = sorted(a[0] for a in actions)
        assert kinds == ["resumed", "skipped"]
        [(_, _, detail)] = [a for a in actions if a[0] == "skipped"]
        assert f"guard (pid {hold.pid}) did not end on SIGTERM" in detail
        assert wait_state(qemu.pid, {"S", "R"}) in {"S", "R"}
    finally:
        hold.kill()
        hold.wait()


def test_only_a_guard_whose_vdev_is_gone_is_ended(
    tmp_path: Path, qemu: subprocess.Popen[bytes]
) -> None:
    """What the file names as the guard is signalled only if it is a guard and its vdev is
    gone: a process that is not a guard is reported and left alone; a live vdev's guard is
    left alone (the QEMUs the file names are continued either way)."""
    path = tmp_path / "vm0.sock.stopped"
    vdev, guard_pid = _vdev_child(qemu.pid, path)  # a live vdev and its guard
    other = _sleeper()
    dead_vdev = subprocess.Popen(["true"])
    dead_vdev.wait()
    try:
        assert wait_state(qemu.pid, {"T"}) == "T"
        resume_left_stopped(str(path))
        assert wait_state(qemu.pid, {"S", "R"}) in {"S", "R"}
        time.sleep(0.1)
        assert proc_state(guard_pid) in {"S", "R"}  # the live vdev's guard: untouched
        os.kill(qemu.pid, signal.SIGSTOP)
        assert wait_state(qemu.pid, {"T"}) == "T"
        started_q, started_o = start_time(qemu.pid), start_time(other.pid)
        assert started_q is not None and started_o is not None
        path.write_text(
            render_stop_file(
                boot_id(),
                [StopRecord(qemu.pid, started_q, "vm0", "/cg")],
                GuardRecord(other.pid, started_o, dead_vdev.pid, 12345),  # not a guard
            )
        )
        actions = resume_left_stopped(str(path))
        assert sorted(a[0] for a in actions) == ["resumed", "skipped"]
        assert any(f"pid {other.pid}, named as the guard, is not one" in a[2] for a in actions)
        time.sleep(0.1)
        assert proc_state(other.pid) in {"S", "R"}  # not signalled
    finally:
        for p in (vdev, other):
            p.kill()
            p.wait()
        if not _wait_gone(guard_pid, 5.0):
            os.kill(guard_pid, signal.SIGKILL)


# --------------------------------------------------------------------------- killed together


def test_the_guard_survives_a_sigkill_of_vdevs_process_group(
    qemu: subprocess.Popen[bytes],
) -> None:
    """The guard has its own session: ``killpg(vdev's group, SIGKILL)`` kills vdev only; the
    guard sees the pipe close and continues the stopped QEMU (a killed guard could not)."""
    vdev, guard_pid = _vdev_child(qemu.pid, None)
    try:
        assert wait_state(qemu.pid, {"T"}) == "T"
        vdev_pgid = os.getpgid(vdev.pid)
        assert os.getsid(guard_pid) == guard_pid != vdev_pgid
        os.killpg(vdev_pgid, signal.SIGKILL)
        assert vdev.wait(timeout=20) == -signal.SIGKILL
        assert wait_state(qemu.pid, {"S", "R"}) in {"S", "R"}
        assert _wait_gone(guard_pid)  # its work done, it exited
    finally:
        vdev.kill()
        vdev.wait()
        if not _wait_gone(guard_pid, 0.0):
            os.kill(guard_pid, signal.SIGKILL)


async def test_a_qemu_left_stopped_by_a_killed_vdev_and_guard_runs_when_vdev_starts(
    tmp_path: Path, qemu: subprocess.Popen[bytes]
) -> None:
    """vdev's side stops the stand-in QEMU (guard + stop file), then it and its guard are
    SIGKILLed together: the QEMU stays stopped. ``vdev serve`` then starts on the same
    socket path (the stop file's default place, with a partial line appended): the QEMU runs
    again, ``vdev host`` reports it, the bad line is reported, and vdev serves."""
    sock = tmp_path / "vm0.sock"
    path = Path(
        default_stop_file([str(sock)], None, os.environ.get("RUNTIME_DIRECTORY")) or "missing"
    )
    vdev, guard_pid = _vdev_child(qemu.pid, path)
    try:
        assert wait_state(qemu.pid, {"T"}) == "T"
        assert [r.pid for r in parse_stop_file(path.read_bytes()).records] == [qemu.pid]
        os.kill(guard_pid, signal.SIGKILL)  # both, the guard first: it continues nothing
        os.killpg(os.getpgid(vdev.pid), signal.SIGKILL)
        assert vdev.wait(timeout=20) == -signal.SIGKILL
        assert _wait_gone(guard_pid)
    finally:
        vdev.kill()
        vdev.wait()
    assert proc_state(qemu.pid) == "T"  # stranded: nothing left that would continue it
    with path.open("ab") as f:
        f.write(b"4242 99")  # and a partial last line
    with trio.fail_after(60):
        async with vdev_serve(tmp_path, extra=["--host-memory", "4G"]) as api:
            while proc_state(qemu.pid) == "T":
                await trio.sleep(0.01)
            info = json.loads(await api.cli("host", "--json"))
            details = {(a["action"], a["detail"]) for a in info["backstop"]["actions"]}
            want = f"vm0 (pid {qemu.pid}) continued: left stopped by a previous vdev"
            assert any(k == "resumed" and want in d for k, d in details), details
            assert any(k == "skipped" and "incomplete" in d for k, d in details), details
            assert "backstop resumed" in await api.cli("host")  # the table shows it too
            assert (await api.vm())["name"] == "vm0"  # it serves
    assert not path.exists()
    log = (tmp_path / "vdev.log").read_text()
    assert f"vm0 (pid {qemu.pid}) continued: left stopped by a previous vdev" in log, log[-3000:]


# --------------------------------------------------------------------------- where it is


def test_stop_file_config_and_the_serve_options_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import click
    from click.testing import CliRunner

    from protocol.errors import ConfigError
    from vdev.cli.operator import CONTROL_META, serve_options
    from vdev.config import parse_config

    assert parse_config({"serve": {"stop_file": "/run/x.stopped"}}).stop_file == "/run/x.stopped"
    for bad in ("", 3):
        with pytest.raises(ConfigError, match=r"\[serve\] stop_file: expected a path"):
            parse_config({"serve": {"stop_file": bad}})

    @click.command()
    @click.option("--socket-path", default=None)
    @click.option("--socket-count", type=int, default=None)
    @serve_options
    def probe(socket_path: str | None, socket_count: int | None) -> None:
        click.echo(str(click.get_current_context().meta[CONTROL_META][0].stop_file))

    def stop_file(*args: str) -> str:
        done = CliRunner().invoke(probe, list(args), catch_exceptions=False)
        assert done.exit_code == 0, done.output
        return done.output.strip()

    sock = str(tmp_path / "vm.sock")
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    assert stop_file("--socket-path", sock) == sock + ".stopped"
    assert stop_file("--socket-path", sock, "--socket-count", "2") == sock + "0.stopped"
    assert stop_file("--socket-path", sock, "--no-api") == sock + ".stopped"
    assert stop_file("--api-socket", "/a/b.api") == "/a/b.api.stopped"  # --fd: the API's
    assert stop_file("--no-api") == "None"  # --fd and no API: nothing to name it after
    assert stop_file("--socket-path", sock, "--stop-file", "/s/f") == "/s/f"
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/vballoon")
    assert stop_file("--socket-path", sock) == "/run/vballoon/vm.sock.stopped"
