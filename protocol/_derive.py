"""Derive numpy views from construct declarations, so hot paths never restate a layout."""

from __future__ import annotations

import struct
from typing import Any

import construct as cs
import numpy as np

from .errors import FormatError


def field_dtype(struct: cs.Construct) -> np.dtype[Any]:
    """A packed numpy structured dtype with the same fields, order and offsets as ``struct``.

    Only structs made of fixed-size ``FormatField`` members (Int16ul, Int64ul, ...) qualify.
    """
    names: list[str] = []
    formats: list[str] = []
    offsets: list[int] = []
    offset = 0
    for member in struct.subcons:
        inner = member.subcon if isinstance(member, cs.Renamed) else member
        if not isinstance(inner, cs.FormatField):
            raise TypeError(f"{member!r} is not a fixed-size integer field")
        order, code = inner.fmtstr[0], inner.fmtstr[1]
        # struct's letters are C types ('L' is 4 bytes there, 8 in numpy): go by size instead.
        kind = "u" if code.isupper() else "i"
        names.append(member.name)
        formats.append(f"{order}{kind}{inner.sizeof()}")
        offsets.append(offset)
        offset += inner.sizeof()
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": offset})
    assert dtype.itemsize == struct.sizeof()
    return dtype


def parse(fmt: cs.Construct, data: bytes | bytearray | memoryview, what: str) -> Any:
    """Parse with construct, turning its exceptions into :class:`FormatError`."""
    try:
        return fmt.parse(bytes(data))
    except (cs.ConstructError, struct.error) as exc:
        raise FormatError(f"malformed {what}: {exc}") from None


def build(fmt: cs.Construct, value: Any, what: str) -> bytes:
    """Build with construct, turning its exceptions into :class:`FormatError`."""
    try:
        return bytes(fmt.build(value))
    except (cs.ConstructError, struct.error, ValueError, TypeError, OverflowError) as exc:
        # compiled structs (``.compile()``) raise struct.error for out-of-range integers
        raise FormatError(f"cannot build {what}: {exc}") from None
