"""vdev/config.py: sizes, the TOML file, error messages naming the bad key, flag overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab.vdev_process import REPO_ROOT
from protocol.errors import ConfigError
from protocol.units import PAGE_SIZE
from vdev.config import (
    ControlConfig,
    VmConfig,
    format_size,
    load_config,
    parse_config,
    parse_shares,
    parse_size,
)
from vdev.policy.model import SharesLevel

MIB = 1 << 20
GIB = 1 << 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("512M", 512 * MIB),
        ("512MiB", 512 * MIB),
        ("512mb", 512 * MIB),
        ("4G", 4 * GIB),
        (" 1.5G ", 3 * GIB // 2),
        ("2K", 2048),
        ("1T", 1 << 40),
        (".5G", GIB // 2),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "G", "4X", "-1G", "1..5G", True, -5, None, [1], float("nan")])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match="size"):
        parse_size(bad, "size")


def test_format_size() -> None:
    assert format_size(0) == "0"
    assert format_size(1536 * MIB) == "1.5G"
    assert format_size(GIB) == "1G"
    assert format_size(512 * MIB) == "512M"
    assert format_size(3 * 1024) == "3K"


def test_parse_shares() -> None:
    assert parse_shares("high") is SharesLevel.HIGH
    assert parse_shares("Normal") is SharesLevel.NORMAL
    assert parse_shares(1234) == 1234
    for bad in ("lots", -1, True, 1.5):
        with pytest.raises(ConfigError, match="shares"):
            parse_shares(bad)


FULL = """
[serve]
api_socket = "/tmp/x.api"
api_socket_mode = "0660"
policy_period = 0.5
host_memory = "16G"
history = 100
rate_window = 5

[settings]
"/Mem/CtlMaxPercent" = 50
[settings.VBalloon]
InflateRatePagesPerSec = 1000

[pools.prod]
shares = "high"
[pools.gold]
parent = "prod"
reservation = "1G"
limit = "8G"
shares = 5000
expandable_reservation = false

[vms.vm0]
memory = "4G"
reservation = "512M"
limit = "3G"
shares = "low"
maxmemctl = "1G"
pool = "gold"
active_fraction = 0.25

[vms.vm1]
maxmemctl = -1
"""


def test_full_file(tmp_path: Path) -> None:
    path = tmp_path / "vdev.toml"
    path.write_text(FULL)
    cfg = load_config(path)
    assert cfg.api_socket == "/tmp/x.api"
    assert cfg.api_socket_mode == 0o660
    assert cfg.policy_period == 0.5
    assert cfg.host_memory == 16 * GIB
    assert cfg.history == 100
    assert cfg.rate_window == 5.0
    assert cfg.settings.get("/Mem/CtlMaxPercent") == 50
    assert cfg.settings.get("/VBalloon/InflateRatePagesPerSec") == 1000
    pools = {p.name: p for p in cfg.pools}
    assert pools["gold"].parent == "prod"
    assert pools["gold"].reservation_pages == GIB // PAGE_SIZE
    assert pools["gold"].limit_pages == 8 * GIB // PAGE_SIZE
    assert pools["gold"].shares == 5000
    assert pools["gold"].expandable_reservation is False
    assert pools["prod"].shares is SharesLevel.HIGH
    vm0 = cfg.vm("vm0")
    assert vm0 == VmConfig(
        memory_pages=4 * GIB // PAGE_SIZE,
        reservation_pages=512 * MIB // PAGE_SIZE,
        limit_pages=3 * GIB // PAGE_SIZE,
        shares=SharesLevel.LOW,
        max_memctl_pages=GIB // PAGE_SIZE,
        pool="gold",
        active_fraction=0.25,
    )
    assert cfg.vm("vm1").max_memctl_pages is None
    assert cfg.vm("unconfigured") == VmConfig()


def test_vm_spec_sizes_from_guest_ram_first() -> None:
    vm = VmConfig(memory_pages=1000, reservation_pages=100)
    spec = vm.spec(ram_pages=2000)
    assert spec is not None and spec.size_pages == 2000
    spec = vm.spec(ram_pages=0)
    assert spec is not None and spec.size_pages == 1000
    assert VmConfig().spec(0) is None  # never connected, no memory configured


def test_empty_file_is_defaults() -> None:
    cfg = parse_config({})
    assert cfg.api_socket is None
    assert cfg.api_socket_mode == 0o600
    assert cfg.host_memory is None
    assert cfg.settings.get("/Mem/CtlMaxPercent") == 65


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"serve": {"bogus": 1}}, r"\[serve\]: unknown key\(s\) bogus"),
        ({"whatever": {}}, "unknown key"),
        ({"serve": {"policy_period": 0}}, "policy_period must be >= 0.001"),
        ({"serve": {"policy_period": "fast"}}, "policy_period: expected a number"),
        ({"serve": {"api_socket_mode": "rw"}}, "octal"),
        ({"serve": {"api_socket_mode": 0o1777}}, "out of range"),
        ({"serve": {"host_memory": "lots"}}, "host_memory: cannot parse size"),
        ({"serve": {"history": 1}}, "history"),
        ({"settings": {"/Mem/Nope": 1}}, "unknown setting '/Mem/Nope'"),
        ({"settings": {"/Mem/CtlMaxPercent": 100}}, r"CtlMaxPercent must be in 0..99"),
        ({"settings": {"Mem": {"CtlMaxPercent": "x"}}}, "must be an integer"),
        ({"pools": {"a": {"parent": "b"}}}, "parent 'b' does not exist"),
        ({"pools": {"a": {"shares": "lots"}}}, r"\[pools.a\] shares"),
        ({"pools": {"a": {"colour": "red"}}}, r"\[pools.a\]: unknown key"),
        ({"pools": {"bad pool/x": {}}}, r"\[pools.bad pool/x\]: bad pool name 'bad pool/x'"),
        ({"pools": {".hidden": {}}}, "bad pool name"),
        ({"vms": {"vm0": {"pool": "nope"}}}, "no pool named 'nope'"),
        ({"vms": {"vm0": {"memory": "1G", "reservation": "2G"}}}, "reservation"),
        ({"vms": {"vm0": {"active_fraction": 2}}}, "active_fraction"),
        ({"vms": {"vm0": {"limit": "1Q"}}}, r"\[vms.vm0\] limit"),
        ({"vms": {"vm0": 5}}, "expected a table"),
    ],
)
def test_errors_name_the_key(doc: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(doc)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[serve\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")


def test_flags_override_file() -> None:
    cfg = parse_config({"serve": {"api_socket": "/a", "host_memory": "1G", "policy_period": 2}})
    cfg.override(api_socket="/b", host_memory=None, policy_period=0.25)
    assert (cfg.api_socket, cfg.host_memory, cfg.policy_period) == ("/b", GIB, 0.25)
    cfg.override(host_memory=2 * GIB)
    assert cfg.host_memory == 2 * GIB
    with pytest.raises(ConfigError, match="policy_period"):
        ControlConfig().override(policy_period=-1)


@pytest.mark.parametrize(
    ("serve", "match"),
    [
        ({"api_max_body_bytes": 100}, r"api_max_body_bytes: must be in 256\.\.1048576, got 100"),
        ({"api_max_body_bytes": 4096.5}, "api_max_body_bytes: must be in"),
        ({"api_max_connections": 0}, "api_max_connections: must be in 1..4096"),
        ({"api_max_connections": True}, "api_max_connections: must be in"),
        ({"api_header_timeout": float("nan")}, "api_header_timeout: must be in"),
        ({"api_body_timeout": float("inf")}, "api_body_timeout: must be in"),
        ({"api_idle_timeout": 0}, "api_idle_timeout: must be in"),
        ({"api_max_subscribers": "many"}, "api_max_subscribers: must be in"),
        ({"api_read_group": "no-such-group-here"}, "api_read_group: no group named"),
        ({"api_read_group": 1.5}, "api_read_group: expected a group name or gid"),
        ({"api_max_bodybytes": 1}, "api_max_bodybytes"),
    ],
)
def test_api_bounds_and_read_group_are_checked(serve: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({"serve": serve})


def test_api_bounds_from_file_and_flags() -> None:
    cfg = parse_config(
        {"serve": {"api_max_body_bytes": 8192, "api_read_group": 4242, "api_body_timeout": 1}}
    )
    assert (cfg.api_limits.max_body_bytes, cfg.api_limits.body_timeout) == (8192, 1)
    assert cfg.api_read_group == 4242 and cfg.api_limits.max_connections == 64
    cfg.override(api_limits={"max_connections": 10}, api_read_group="0")
    assert (cfg.api_limits.max_connections, cfg.api_limits.max_body_bytes) == (10, 8192)
    assert cfg.api_read_group == 0
    with pytest.raises(ConfigError, match="api_max_connections"):
        cfg.override(api_limits={"max_connections": 100000})


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--api-max-body-bytes", "10"], "256<=x<=1048576"),
        (["--api-header-timeout", "nan"], "api_header_timeout: must be in"),
        (["--api-max-connections", "-1"], "1<=x<=4096"),
        (["--api-read-group", "no-such-group-here"], "api_read_group: no group named"),
    ],
)
def test_api_bounds_on_the_command_line_are_usage_errors(
    tmp_path: Path, args: list[str], match: str
) -> None:
    from click.testing import CliRunner

    from vdev.cli.main import main

    result = CliRunner().invoke(main, ["serve", "--socket-path", str(tmp_path / "s"), *args])
    assert result.exit_code == 2, result.output
    assert match in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[serve]\npolicy_period = 0\n", "policy_period must be >= 0.001 seconds"),
        ('[pools.a]\nparent = "a"\n', "pool tree has a cycle through a"),
        ("[settings]\n'/Mem/CtlMaxPercent' = 150\n", "CtlMaxPercent must be in 0..99"),
        ("[serve\n", "invalid TOML"),
    ],
)
def test_a_bad_config_file_stops_serve_with_one_line_naming_the_file(
    tmp_path: Path, text: str, message: str
) -> None:
    """Exit status 2 and one line that names the file (also for the checks across keys,
    which know no file), without click's usage banner: the command line is not at fault."""
    config = tmp_path / "vdev.toml"
    config.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "vdev", "serve", "--socket-path", str(tmp_path / "s.sock"),
         "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {config}: "), lines
    assert message in done.stderr and "Usage:" not in done.stderr
