"""``vdev serve`` start-up errors: every bad command line and config value is a usage error
(exit status 2) with one ``Error:`` line naming the problem, never a traceback, and leaves
nothing behind (no socket, no lock file). Each case runs the real ``vdev serve`` process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from lab.vdev_process import REPO_ROOT

S = "vm.sock"  # the socket name in each case's directory

#: (id, extra command line, expected fragment of the Error line); "{d}" is the case's directory
COMMAND_LINES = [
    ("empty-socket-path", ["--socket-path", ""], "empty path"),
    ("long-socket-path", ["--socket-path", "{d}/" + "s" * 120], "a unix socket path has at most 107"),
    ("long-api-socket", ["--socket-path", "{d}/s", "--api-socket", "{d}/" + "a" * 110],
     "--api-socket: "),
    ("fd-9999", ["--fd", "9999"], "--fd 9999: not an open file descriptor"),
    ("fd-minus-1", ["--fd", "-1"], "--fd -1: not an open file descriptor"),
    ("fd-not-socket", ["--fd", "0"], "--fd 0: not a socket"),
    ("fd-and-path", ["--fd", "0", "--socket-path", "{d}/s"], "exactly one of"),
    ("stats-nan", ["--socket-path", "{d}/s", "--stats-interval", "nan"], "--stats-interval"),
    ("stats-negative", ["--socket-path", "{d}/s", "--stats-interval", "-1"], "--stats-interval"),
    ("missing-dir", ["--socket-path", "{d}/nosuchdir/s"], "does not exist"),
    ("not-a-socket", ["--socket-path", "{d}/plain"], "exists and is not a socket"),
    ("name-twice", ["--socket-path", "{d}/s", "--socket-count", "2", "--name", "a", "--name", "a"],
     "guest names must be distinct"),
    ("name-empty", ["--socket-path", "{d}/s", "--name", ""], "bad guest name ''"),
    ("name-slash", ["--socket-path", "{d}/s", "--name", "vm0/../vm1"], "bad guest name 'vm0/../vm1'"),
    ("name-dotdot", ["--socket-path", "{d}/s", "--name", ".."], "bad guest name '..'"),
    ("name-count", ["--socket-path", "{d}/s", "--socket-count", "2", "--name", "a"],
     "one per socket"),
    ("api-is-socket", ["--socket-path", "{d}/s", "--api-socket", "{d}/s"],
     "is also a vhost-user socket path"),
    ("api-is-socket-dot", ["--socket-path", "{d}/s", "--socket-count", "2",
                           "--api-socket", "{d}/./s1"], "is also a vhost-user socket path"),
    ("group", ["--socket-path", "{d}/s", "--socket-group", "nosuchgroup"], "nosuchgroup"),
    ("target-exponent", ["--socket-path", "{d}/s", "--target", "1e3"], "cannot parse size '1e3'"),
    ("target-negative", ["--socket-path", "{d}/s", "--target", "-5"], "cannot parse size '-5'"),
    ("target-huge", ["--socket-path", "{d}/s", "--target", "9" * 30 + "P"], "too large"),
    ("host-memory", ["--socket-path", "{d}/s", "--host-memory", "0x10"], "--host-memory"),
    ("policy-period", ["--socket-path", "{d}/s", "--policy-period", "0.0001"], "--policy-period"),
    ("policy-period-nan", ["--socket-path", "{d}/s", "--policy-period", "nan"], "policy_period"),
    ("no-config", ["--socket-path", "{d}/s", "--config", "{d}/nosuch.toml"], "nosuch.toml"),
]  # fmt: skip

#: (id, config file text, expected fragment)
CONFIGS = [
    ("policy-period", "[serve]\npolicy_period = 1e-9\n", "policy_period must be >= 0.001"),
    ("reservation-over-limit", '[vms.vm0]\nreservation = "2G"\nlimit = "1G"\n',
     "reservation (2G) is above limit (1G)"),
    ("memory-huge", '[vms.vm0]\nmemory = "999999999999P"\n', "memory: '999999999999P' is too large"),
    ("memory-negative", "[vms.vm0]\nmemory = -5\n", "memory: a size must be >= 0"),
    ("unknown-vm", '[vms.nosuchvm]\nmemory = "1G"\n',
     "no guest named 'nosuchvm'; the guests are vm0"),
    ("bad-vm-name", '[vms."a/b"]\nmemory = "1G"\n', "bad guest name 'a/b'"),
    ("history-float", "[serve]\nhistory = 1e13\n", "history: expected an integer"),
    ("history-huge", "[serve]\nhistory = 10000000000000\n", "history must keep 2 to 1000000"),
    ("mode-0777", '[serve]\napi_socket_mode = "0777"\n', "0777 is world-writable"),
    ("mode-0666", "[serve]\napi_socket_mode = 0o666\n", "0666 is world-writable"),
    ("mode-0200", '[serve]\napi_socket_mode = "0200"\n', "does not let the owner"),
    ("rate-window", "[serve]\nrate_window = inf\n", "rate_window must be"),
    ("socket-group", '[serve]\nsocket_group = ""\n', "socket_group"),
    ("unknown-key", "[serve]\nsocket_mode = 1\n", "unknown key(s) socket_mode"),
    ("not-utf8", b"[serve]\n# \xff\xfe\n", "not UTF-8"),
    ("not-toml", "[serve\n", "invalid TOML"),
]  # fmt: skip


def _run_all(
    cases: list[tuple[str, list[str]]], cwd: Path
) -> dict[str, subprocess.CompletedProcess[bytes]]:
    """Run every ``vdev serve`` case, four at a time (each is ~0.5 s of imports)."""
    out: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def main() -> None:
        limit = trio.CapacityLimiter(4)

        async def one(case_id: str, argv: list[str]) -> None:
            async with limit:
                out[case_id] = await trio.run_process(
                    [sys.executable, "-m", "vdev", "serve", *argv],
                    capture_stdout=True, capture_stderr=True, check=False, cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                )  # fmt: skip

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for case_id, argv in cases:
                    nursery.start_soon(one, case_id, argv)

    trio.run(main)
    return out


def _check(case_id: str, done: subprocess.CompletedProcess[bytes], fragment: str) -> None:
    err = done.stderr.decode(errors="replace")
    assert "Traceback" not in err, f"{case_id}: {err}"
    assert done.returncode == 2, f"{case_id}: exit {done.returncode}: {err}"
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], f"{case_id}: {err}"
    assert done.stdout == b""


def test_bad_command_lines_are_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a socket")
    before = sorted(os.listdir(tmp_path))
    cases = [
        (cid, [a.replace("{d}", str(tmp_path)) for a in argv]) for cid, argv, _ in COMMAND_LINES
    ]
    results = _run_all(cases, tmp_path)
    for case_id, _, fragment in COMMAND_LINES:
        _check(case_id, results[case_id], fragment)
    assert sorted(os.listdir(tmp_path)) == before  # no socket, no lock file left


def test_bad_config_values_are_usage_errors(tmp_path: Path) -> None:
    cases = []
    for case_id, text, _ in CONFIGS:
        config = tmp_path / f"{case_id}.toml"
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
        cases.append((case_id, ["--socket-path", str(tmp_path / S), "--config", str(config)]))
    before = sorted(os.listdir(tmp_path))
    results = _run_all(cases, tmp_path)
    for case_id, _, fragment in CONFIGS:
        _check(case_id, results[case_id], fragment)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["--socket-path", "s", "--name", "web-1.prod_2"],
        ["--socket-path", "s", "--name", "A" * 128],
        ["--socket-path", "s", "--name", "dom:a@b+c"],
    ],
)
def test_good_names_start(tmp_path: Path, argv: list[str]) -> None:
    """The name rule lets ordinary names through (the server starts; stopped at once)."""
    from lab.vdev_process import start_vdev

    name = argv[-1]
    with start_vdev(tmp_path / "s", extra=["--name", name], log_path=tmp_path / "log") as srv:
        from vdev.api.client import ApiClient

        with ApiClient(str(tmp_path / "s.api")) as c:
            assert [v["name"] for v in c.vms()] == [name]
        assert srv.stop() == 0
