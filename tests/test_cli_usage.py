"""Bad command-line input gets a message naming the option and status 2 (click's usage error),
never a Python traceback; a driver that cannot reach its device says where it looked."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import click
import pytest
import trio
from click.testing import CliRunner, Result

from guest_driver.cli import main as guest_driver
from vdev.cli.main import main as vdev

MISSING = "/nonexistent-vballoon/vm0.sock"


def invoke(cli: Any, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def assert_usage_error(result: Result, *words: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # not a traceback
    for word in words:
        assert word in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------
# guest-driver run

RUN_BAD = [
    (["--poll", "-1"], "'--poll'"),
    (["--poll", "nan"], "'--poll'"),
    (["--poll", "inf"], "'--poll'"),
    (["--poll", "0"], "'--poll'"),  # 0 busy-loops GET_TARGET: the floor is 10 ms
    (["--poll", "0.001"], "'--poll'"),
    (["--poll", "soon"], "'--poll'"),
    (["--workload", "1G:2G:0"], "'--workload'"),  # was a ZeroDivisionError
    (["--workload", "1G:2G:-5"], "PERIOD"),
    (["--workload", "1G:2G:nan"], "PERIOD"),
    (["--workload", "1G:2G:x"], "PERIOD"),
    (["--workload", "1Q"], "'--workload'"),
    (["--workload", "8G", "--memory", "1G"], "more than the guest's --memory"),
    (["--workload", "512M:768M", "--memory", "1G"], "more than the guest's --memory"),
    (["--capabilities", "zz"], "'--capabilities'"),
    (["--capabilities", "-1"], "'--capabilities'"),
    (["--capabilities", "0xffffffffff"], "'--capabilities'"),
    (["--capabilities", "0x100000000"], "'--capabilities'"),
    (["--memory", "0"], "'--memory'"),
    (["--memory", "1.5K"], "'--memory'"),
    (["--memory", "1M"], "'--memory'"),
    (["--memory", "2099999"], "4 KiB pages"),
    (["--memory", "lots"], "'--memory'"),
    (["--memory", "-1G"], "'--memory'"),
    (["--device-timeout", "0"], "'--device-timeout'"),
    (["--device-timeout", "-3"], "'--device-timeout'"),
    (["--device-timeout", "nan"], "'--device-timeout'"),
    (["--in-flight", "0"], "'--in-flight'"),
]


@pytest.mark.parametrize(("args", "word"), RUN_BAD, ids=[" ".join(a) for a, _ in RUN_BAD])
def test_run_refuses_bad_options(args: list[str], word: str) -> None:
    assert_usage_error(invoke(guest_driver, "run", "--socket", MISSING, *args), word)


@pytest.mark.parametrize(
    "args",
    [
        ["--poll", "0.01"],
        ["--capabilities", "0xffffffff"],
        ["--capabilities", "0"],
        ["--capabilities", "62"],
        ["--memory", "2M"],
        ["--workload", "256M:512M:20:128M", "--memory", "1G"],
        ["--workload", "1G", "--memory", "1G"],
    ],
)
def test_run_takes_good_options_to_the_socket(args: list[str]) -> None:
    """Good values get as far as connecting (and fail there, with status 1)."""
    result = invoke(guest_driver, "run", "--socket", MISSING, *args)
    assert result.exit_code == 1, result.output
    assert MISSING in result.stderr


def _stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("x"), "not a socket"),
        (_stale_socket, "connection refused (a stale socket file)"),
    ],
    ids=["missing", "regular-file", "stale-socket"],
)
def test_run_names_a_socket_nothing_listens_on(tmp_path: Path, make: Any, why: str) -> None:
    path = tmp_path / "vm0.sock"
    make(path)
    result = invoke(guest_driver, "run", "--socket", str(path))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    line = result.stderr.strip()
    assert line.startswith(f"guest-driver run: cannot connect to {path}: {why}: "), line
    assert "nothing listens there" in line and "vdev serve" in line


# ---------------------------------------------------------------------------------------
# guest-driver run-linux

LINUX_BAD = [
    (["--poll", "0"], "'--poll'"),
    (["--poll", "nan"], "'--poll'"),
    (["--reserve", "8M"], "'--reserve'"),  # below --low: inflation would set off deflation
    (["--reserve", "lots"], "'--reserve'"),
    (["--low", "128M"], "'--high'"),  # --high below --low
    (["--high", "-1"], "'--high'"),
    (["--pci-id", "zz"], "'--pci-id'"),
    (["--pci-id", "1af4"], "'--pci-id'"),
]


@pytest.mark.parametrize(("args", "word"), LINUX_BAD, ids=[" ".join(a) for a, _ in LINUX_BAD])
def test_run_linux_refuses_bad_options(
    monkeypatch: pytest.MonkeyPatch, args: list[str], word: str
) -> None:
    import guest_driver.run_linux as run_linux

    monkeypatch.setattr(run_linux, "available", lambda: None)
    assert_usage_error(invoke(guest_driver, "run-linux", "--control", "", *args), word)


def _fake_run_in_guest(seen: list[Any]) -> Any:
    async def fake(options: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from guest_driver.virtio_pci import PortError

        seen.append(options)
        raise PortError("no PCI function 1af4:1069 in /sys/bus/pci/devices")

    return fake


def test_run_linux_without_the_device_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import guest_driver.run_linux as run_linux

    seen: list[Any] = []
    monkeypatch.setattr(run_linux, "available", lambda: None)
    monkeypatch.setattr(run_linux, "run_in_guest", _fake_run_in_guest(seen))
    result = invoke(guest_driver, "run-linux")
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # not the nursery's ExceptionGroup
    assert result.stderr == (
        "guest-driver run-linux: no PCI function 1af4:1069 in /sys/bus/pci/devices\n"
    )
    # The floor for inflating is --reserve, --high (64M) unless given.
    assert seen[0].reserve_bytes == seen[0].high_bytes == 64 << 20


@pytest.mark.parametrize(
    ("args", "reserve"),
    [([], 64 << 20), (["--reserve", "48M"], 48 << 20), (["--high", "96M"], 96 << 20),
     (["--reserve", "32M"], 32 << 20), (["--reserve", "1G"], 1 << 30)],
)  # fmt: skip
def test_run_linux_reserve_is_the_floor(
    monkeypatch: pytest.MonkeyPatch, args: list[str], reserve: int
) -> None:
    import guest_driver.run_linux as run_linux

    seen: list[Any] = []
    monkeypatch.setattr(run_linux, "available", lambda: None)
    monkeypatch.setattr(run_linux, "run_in_guest", _fake_run_in_guest(seen))
    assert invoke(guest_driver, "run-linux", *args).exit_code == 1
    assert seen[0].reserve_bytes == reserve


# ---------------------------------------------------------------------------------------
# Help: -h everywhere, every option explained, summaries not cut at "e.g."


def _commands(group: click.Group, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    out: list[tuple[tuple[str, ...], Any]] = [(path, group)]
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*path, name))
        else:
            out.append(((*path, name), cmd))
    return out


COMMANDS = _commands(vdev, ("vdev",)) + _commands(guest_driver, ("guest-driver",))
IDS = [" ".join(path) for path, _ in COMMANDS]


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=IDS)
def test_dash_h_is_help(path: tuple[str, ...], cmd: Any) -> None:
    root = vdev if path[0] == "vdev" else guest_driver
    result = invoke(root, *path[1:], "-h")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")
    assert "-h, --help" in result.output


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=IDS)
def test_every_option_has_help(path: tuple[str, ...], cmd: Any) -> None:
    bare = [p.opts for p in cmd.params if isinstance(p, click.Option) and not p.help]
    assert not bare, f"{' '.join(path)}: options without help: {bare}"


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=IDS)
def test_summary_is_not_cut_mid_sentence(path: tuple[str, ...], cmd: Any) -> None:
    summary = cmd.get_short_help_str(limit=45)
    assert not summary.rstrip(".").endswith(("e.g", "i.e", "(")), summary
