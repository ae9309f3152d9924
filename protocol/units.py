"""Units every layer shares: the page, binary size constants, and the one size grammar every
command line, config file and API request uses.

vballoon's pages are 4 KiB everywhere: vmmemctl PPNs, virtio-balloon PFNs
(``VIRTIO_BALLOON_PFN_SHIFT``), vhost-user region offsets, the policy's page counts.

The grammar (case-insensitive, surrounding whitespace ignored)::

    size    := number [ws] [unit]
    number  := digits [ "." [digits] ] | "." digits          (decimal only)
    unit    := ("K" | "M" | "G" | "T" | "P") ["B" | "iB"]     (powers of 1024)
             | "B"                                            (bytes)

``4096``, ``4096B``, ``512M``, ``512MiB``, ``512mb``, ``1.5G``, ``.5G``, ``1P``. Refused, with a
:class:`~protocol.errors.ConfigError` naming what was being parsed and the value: signs
(``-5``), exponents (``1e3``), hex (``0x10``), an empty string, units other than the above
(``1X``, ``1Gi``), and anything of :data:`MAX_SIZE` bytes or more (sizes are signed 64-bit
byte counts on the wire and in the kernel). A fraction of a byte is dropped (``1.3G`` is
1395864371 bytes). Integers (TOML, JSON) are taken as bytes; non-negative finite floats too.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from protocol.errors import ConfigError

__all__ = [
    "GIB",
    "KIB",
    "MAX_SIZE",
    "MIB",
    "PAGES_PER_MIB",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PIB",
    "TIB",
    "format_size",
    "parse_size",
]

#: log2 of the page size.
PAGE_SHIFT = 12
#: The page, in bytes (4 KiB).
PAGE_SIZE = 1 << PAGE_SHIFT
KIB = 1 << 10
MIB = 1 << 20
#: Pages in a MiB (256).
PAGES_PER_MIB = MIB // PAGE_SIZE
GIB = 1 << 30
TIB = 1 << 40
PIB = 1 << 50
#: Sizes are below 2**63 bytes (8 EiB): they fit a signed 64-bit integer.
MAX_SIZE = 1 << 63

_UNITS = {"": 1, "B": 1, "K": KIB, "M": MIB, "G": GIB, "T": TIB, "P": PIB}
_SIZE_RE = re.compile(
    r"\s*(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:(?P<unit>[KMGTP])(?:I?B)?|(?P<b>B))?\s*",
    re.IGNORECASE | re.ASCII,
)
#: Longer strings are refused before parsing (no size needs more than a few dozen digits).
_MAX_TEXT = 64
_EXAMPLES = "examples: 4096, 512M, 4G, 1.5GiB"


def parse_size(value: object, what: str = "size") -> int:
    """Bytes from a size string (see the module docstring) or a non-negative number.

    :raises ConfigError: naming ``what`` and the value when it is not a size below
        :data:`MAX_SIZE`.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        nbytes = Fraction(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{what}: a size must be a finite number, got {value!r}")
        nbytes = Fraction(value)
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value) if len(value) <= _MAX_TEXT else None
        if m is None:
            shown = value if len(value) <= _MAX_TEXT else value[:_MAX_TEXT] + "..."
            raise ConfigError(f"{what}: cannot parse size {shown!r} ({_EXAMPLES})")
        unit = (m.group("unit") or m.group("b") or "").upper()
        nbytes = Fraction(m.group("num")) * _UNITS[unit]
    else:
        raise ConfigError(f"{what}: expected a size, got {type(value).__name__} {value!r}")
    if nbytes < 0:
        raise ConfigError(f"{what}: a size must be >= 0, got {value!r}")
    if nbytes >= MAX_SIZE:
        shown = repr(value) if len(repr(value)) <= _MAX_TEXT else repr(value)[:_MAX_TEXT] + "..."
        raise ConfigError(f"{what}: {shown} is too large (the limit is 8E, 2**63 bytes)")
    return math.floor(nbytes)


def format_size(nbytes: int | float) -> str:
    """``1536 MiB`` -> ``"1.5G"``: the shortest binary-suffixed form, for tables."""
    value = float(nbytes)
    for suffix in ("", "K", "M", "G", "T"):
        if abs(value) < 1024 or suffix == "T":
            if suffix == "":
                return f"{int(value)}"
            return f"{value:.1f}{suffix}".replace(".0" + suffix, suffix)
        value /= 1024
    raise AssertionError("unreachable")
