"""protocol/units.py: the one size grammar, shared by vdev's CLI, the config file, the API and
guest-driver (each caller below gets the same answer and the same error)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest_driver.cli import parse_workload
from protocol.errors import ConfigError, LocalError
from protocol.units import GIB, MAX_SIZE, MIB, PAGE_SIZE, PIB, format_size, parse_size
from vdev import config as vdev_config
from vdev.cli.main import size_to_pages

GOOD = [
    ("0", 0),
    ("4096", 4096),
    ("4096B", 4096),
    ("512M", 512 * MIB),
    ("512MiB", 512 * MIB),
    ("512mb", 512 * MIB),
    ("1g", GIB),
    ("1GiB", GIB),
    ("1GB", GIB),
    (" 1G", GIB),
    ("1G ", GIB),
    ("1 G", GIB),
    ("1.5G", 3 * GIB // 2),
    (".5G", GIB // 2),
    ("1.", 1),
    ("1.3G", 1395864371),  # the fraction of a byte is dropped
    ("1P", PIB),
    ("8191P", 8191 * PIB),
    (4096, 4096),
    (0, 0),
    (4096.0, 4096),
    (MAX_SIZE - 1, MAX_SIZE - 1),
]

BAD = [
    ("-5", "cannot parse size"),
    ("-1G", "cannot parse size"),
    ("+5", "cannot parse size"),
    ("1e3", "cannot parse size"),
    ("1E3", "cannot parse size"),
    ("0x10", "cannot parse size"),
    ("", "cannot parse size"),
    ("   ", "cannot parse size"),
    ("G", "cannot parse size"),
    ("1X", "cannot parse size"),
    ("1Gi", "cannot parse size"),
    ("1iB", "cannot parse size"),
    ("1..5G", "cannot parse size"),
    ("1_000", "cannot parse size"),
    ("nan", "cannot parse size"),
    ("inf", "cannot parse size"),
    ("1G1", "cannot parse size"),
    ("\uff11G", "cannot parse size"),  # a full-width digit: ASCII only
    ("9" * 30 + "P", "too large"),
    ("8192P", "too large"),
    (str(MAX_SIZE), "too large"),
    ("9" * 5000, "cannot parse size"),  # refused before any arithmetic
    (MAX_SIZE, "too large"),
    (10**400, "too large"),
    (-5, ">= 0"),
    (-0.5, ">= 0"),
    (float("nan"), "finite"),
    (float("inf"), "finite"),
    (1e300, "too large"),
    (True, "expected a size"),
    (None, "expected a size"),
    ([1], "expected a size"),
]


@pytest.mark.parametrize(("value", "expected"), GOOD)
def test_parse_size_accepts(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(("value", "why"), BAD)
def test_parse_size_refuses_naming_the_value(value: object, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(value, "--target")
    message = str(info.value)
    assert message.startswith("--target: ")
    assert why in message
    assert len(message) < 200  # a 5000-digit value is cut, not echoed
    assert isinstance(info.value, LocalError)


@pytest.mark.parametrize("text", ["-5", "1e3", "1P", "", "0x10", " 1G", "1.5G", "1GiB", "1g"])
def test_every_caller_agrees(text: str) -> None:
    """vdev's --target, the config file, guest-driver's workload and the API (vdev.config's
    re-export, which the API uses) give the same bytes or the same error."""

    def outcome(fn: object) -> object:
        try:
            return fn()  # type: ignore[operator]
        except ConfigError as e:
            return ("error", str(e).split(": ", 1)[1])

    expected = outcome(lambda: parse_size(text, "x") // PAGE_SIZE)
    assert outcome(lambda: size_to_pages(text)) == expected
    assert outcome(lambda: vdev_config.parse_size(text, "x") // PAGE_SIZE) == expected
    if text:  # an empty workload spec is refused before any size is parsed
        assert outcome(lambda: parse_workload(text).base) == expected
    assert vdev_config.parse_size is parse_size


def test_config_file_uses_the_grammar() -> None:
    with pytest.raises(ConfigError, match=r"\[vms.vm0\] memory: .* is too large"):
        vdev_config.parse_config({"vms": {"vm0": {"memory": "9" * 20 + "P"}}})
    with pytest.raises(ConfigError, match=r"\[serve\] host_memory: cannot parse size '1e3'"):
        vdev_config.parse_config({"serve": {"host_memory": "1e3"}})


@given(st.integers(min_value=0, max_value=MAX_SIZE - 1))
def test_round_trip_bytes(n: int) -> None:
    assert parse_size(str(n)) == n
    assert parse_size(f"{n}B") == n


@given(st.integers(min_value=0, max_value=8191), st.sampled_from("KMGTP"))
def test_units_are_powers_of_1024(n: int, unit: str) -> None:
    factor = 1024 ** ("KMGTP".index(unit) + 1)
    assert parse_size(f"{n}{unit}") == parse_size(f"{n}{unit.lower()}iB") == n * factor


def test_format_size() -> None:
    assert format_size(1536 * MIB) == "1.5G"
    assert parse_size(format_size(1536 * MIB)) == 1536 * MIB
