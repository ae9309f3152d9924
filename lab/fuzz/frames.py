"""Fuzz target ``frames``: every construct parser declared in :mod:`protocol`.

The first input byte picks a parser, the rest is the bytes it parses. Oracle (the h11
precedent, docs/ARCHITECTURE.md "Errors"): the parser either raises
:class:`protocol.errors.FormatError`, or returns a value that builds back to exactly the
bytes it consumed. Where a numpy view is derived from a declaration (batch entries,
descriptors, used elements, stats) the two readings must agree (a differential oracle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import construct as cs
import numpy as np

from lab.fuzz.corpus import Draw, Finding
from protocol import _derive, virtio_balloon, virtqueue, vmw
from protocol import vhost_user as vu
from protocol.errors import FormatError


@dataclass(frozen=True)
class Parser:
    name: str
    check: Callable[[bytes], None]  # parse, then verify; raises FormatError or Finding
    seed: bytes


def _roundtrip(name: str, data: bytes, built: bytes) -> None:
    if built != data:
        raise Finding(f"{name}: {data.hex()} parsed, but builds back to {built.hex()}")


def _exact(name: str, fmt: cs.Construct) -> Callable[[bytes], None]:
    """A parser that must consume its whole input (vhost-user payloads)."""

    def check(data: bytes) -> None:
        value = vu.parse_payload(fmt, data, name)
        _roundtrip(name, data, vu.build_payload(fmt, value, name))

    return check


def _prefix(name: str, fmt: cs.Construct) -> Callable[[bytes], None]:
    """A parser that reads a prefix: the consumed bytes must build back."""

    def check(data: bytes) -> None:
        value = _derive.parse(fmt, data, name)
        built = _derive.build(fmt, value, name)
        _roundtrip(name, data[: len(built)], built)

    return check


def _check_request(data: bytes) -> None:
    _roundtrip("vmw.Request", data, vmw.Request.parse(data).build())


def _check_response(data: bytes) -> None:
    _roundtrip("vmw.Response", data, vmw.Response.parse(data).build())


def _check_event(data: bytes) -> None:
    kind = vmw.parse_event(data)
    _roundtrip("vmw.parse_event", data, vmw.build_event(kind))


def _check_header(data: bytes) -> None:
    h = vu.parse_header(data)
    _roundtrip("vhost_user.header", data, vu.build_header(h.request, h.flags, h.size))


def _check_batch(data: bytes) -> None:
    """batch_entries (numpy) against the BitStruct declaration, entry by entry."""
    d = Draw(data)
    count = d.below(vmw.BATCH_MAX_ENTRIES + 8)
    page = d.rest()
    entries = vmw.batch_entries(page, count)
    if entries.tobytes() != page[: count * 8]:
        raise Finding("batch_entries does not view the page's bytes")
    pfns, statuses = vmw.entry_pfns(entries), vmw.entry_statuses(entries)
    reserved = vmw.entry_reserved(entries)
    parsed = _derive.parse(vmw.batch(count), page, "batch")
    for i, entry in enumerate(parsed):
        got = (int(pfns[i]), int(reserved[i]) >> 5, int(statuses[i]))
        want = (entry.pfn, entry.reserved, entry.status)
        if got != want:
            raise Finding(f"batch entry {i}: numpy view {got} != declaration {want}")
    rebuilt = vmw.with_statuses(entries, statuses)
    if not np.array_equal(rebuilt, entries):
        raise Finding("with_statuses(entries, entry_statuses(entries)) changed the entries")
    if count and not reserved.any():
        _roundtrip("vmw.build_batch", page[: count * 8], vmw.build_batch(pfns, statuses))


def _check_dtype(name: str, fmt: cs.Construct, dtype: np.dtype[Any]) -> Callable[[bytes], None]:
    size = fmt.sizeof()

    def check(data: bytes) -> None:
        n = len(data) // size
        if n == 0:
            raise FormatError("too short")
        view = np.frombuffer(data, dtype, n)
        parsed = _derive.parse(cs.Array(n, fmt), data, name)
        for i, item in enumerate(parsed):
            for field in dtype.names or ():
                if int(view[i][field]) != item[field]:
                    raise Finding(f"{name}[{i}].{field}: numpy {view[i][field]} != {item[field]}")
        _roundtrip(name, data[: n * size], _derive.build(cs.Array(n, fmt), parsed, name))

    return check


def _check_ring(kind: str) -> Callable[[bytes], None]:
    def check(data: bytes) -> None:
        d = Draw(data)
        size = 1 << d.below(6)
        fmt = virtqueue.avail_ring(size) if kind == "avail" else virtqueue.used_ring(size)
        body = d.rest()
        expected = (
            virtqueue.avail_ring_size(size) if kind == "avail" else virtqueue.used_ring_size(size)
        )
        if fmt.sizeof() != expected:
            raise Finding(f"{kind}_ring({size}).sizeof() {fmt.sizeof()} != {expected}")
        _prefix(f"{kind}_ring", fmt)(body)

    return check


def _seed(fmt: cs.Construct, value: Any) -> bytes:
    return bytes(fmt.build(value))


def _parsers() -> list[Parser]:
    out = [
        Parser("vmw.Request", _check_request, vmw.Request(vmw.Command.LOCK, 0x1234).build()),
        Parser("vmw.Response", _check_response, vmw.Response(0x0300_0000, 0, 0x3E).build()),
        Parser("vmw.event", _check_event, vmw.build_event(vmw.EventKind.TARGET_CHANGED)),
        # the count is a 2-byte Draw.below(BATCH_MAX_ENTRIES + 8), then the page
        Parser("vmw.batch", _check_batch, b"\x03\x00" + vmw.build_batch([1, 2, 3], [0, 3, 2])),
        Parser("vmw.BATCH_ENTRY", _prefix("BATCH_ENTRY", vmw.BATCH_ENTRY), bytes(8)),
        Parser("vhost_user.header", _check_header, vu.build_header(1, 1, 0)),
        Parser(
            "virtqueue.DESCRIPTOR",
            _check_dtype("DESCRIPTOR", virtqueue.DESCRIPTOR, virtqueue.DESCRIPTOR_DTYPE),
            bytes(16),
        ),
        Parser(
            "virtqueue.USED_ELEM",
            _check_dtype("USED_ELEM", virtqueue.USED_ELEM, virtqueue.USED_ELEM_DTYPE),
            bytes(8),
        ),
        Parser("virtqueue.avail_ring", _check_ring("avail"), b"\x02" + bytes(14)),
        Parser("virtqueue.used_ring", _check_ring("used"), b"\x02" + bytes(40)),
        Parser(
            "virtio_balloon.CONFIG",
            _prefix("balloon config", virtio_balloon.CONFIG),
            bytes(16),
        ),
        Parser(
            "virtio_balloon.STAT",
            _check_dtype("STAT", virtio_balloon.STAT, virtio_balloon.STAT_DTYPE),
            bytes(10),
        ),
    ]
    seen: set[int] = set()
    payloads = list(vu.REQUEST_PAYLOAD.items()) + list(vu.REPLY_PAYLOAD.items())
    for request, fmt in payloads:
        if fmt is None or id(fmt) in seen:
            continue
        seen.add(id(fmt))
        name = f"vhost_user.{request.name}"
        out.append(Parser(name, _exact(name, fmt), _example(fmt)))
    return out


def _example(fmt: cs.Construct) -> bytes:
    if fmt is vu.MEMORY_TABLE:
        region = {
            "guest_phys_addr": 0,
            "memory_size": 1 << 20,
            "userspace_addr": 0,
            "mmap_offset": 0,
        }
        return _seed(fmt, {"nregions": 1, "padding": 0, "regions": [region]})
    if fmt is vu.CONFIG:
        return _seed(fmt, {"offset": 0, "size": 8, "flags": 0, "data": bytes(8)})
    return bytes(fmt.sizeof())


PARSERS: list[Parser] = _parsers()


def one_input(data: bytes) -> None:
    if not data:
        return
    parser = PARSERS[data[0] % len(PARSERS)]
    try:
        parser.check(data[1:])
    except FormatError:
        pass
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"{parser.name}: undeclared {type(exc).__name__}: {exc}") from exc


def seeds() -> list[bytes]:
    return [bytes([i]) + p.seed for i, p in enumerate(PARSERS)]
