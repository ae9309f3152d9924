"""Round trips and cross-checks for every format declared in protocol/.

For each construct declaration: parse(build(x)) == x, build(parse(b)) == b, sizeof; the
numpy views derived from the declarations agree with construct; bad input raises
FormatError and nothing else.
"""

from __future__ import annotations

import contextlib
from typing import Any

import construct as cs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import vhost_user as vu
from protocol import virtio_balloon as vb
from protocol import virtqueue as vq
from protocol import vmw
from protocol.errors import FormatError

FAST = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------------------------------
# A strategy for values of a construct declaration (the subset protocol/ uses)


def _int_range(field: cs.FormatField) -> tuple[int, int]:
    bits = field.sizeof() * 8
    if field.fmtstr[1].isupper() or field.fmtstr[1] == "?":
        return 0, (1 << bits) - 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def values(con: cs.Construct) -> st.SearchStrategy[Any]:
    """Values for a fixed-layout struct of integer fields (arrays of fixed count included)."""
    if isinstance(con, cs.Renamed):
        return values(con.subcon)
    if isinstance(con, cs.FormatField):
        lo, hi = _int_range(con)
        return st.integers(lo, hi)
    if isinstance(con, cs.Struct):
        return st.fixed_dictionaries({m.name: values(m) for m in con.subcons})
    if isinstance(con, cs.Array) and isinstance(con.count, int):
        return st.lists(values(con.subcon), min_size=con.count, max_size=con.count)
    raise TypeError(f"no strategy for {con!r}")


def plain(value: Any) -> Any:
    """A parsed Container / ListContainer as plain dicts and lists (no ``_io`` keys)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def check_round_trip(con: cs.Construct, value: Any) -> None:
    data = con.build(value)
    assert plain(con.parse(data)) == plain(value)
    assert con.build(con.parse(data)) == data
    try:
        size = con.sizeof()
    except cs.SizeofError:
        return
    assert len(data) == size


# ---------------------------------------------------------------------------------------
# vmw: fixed frames

FIXED_STRUCTS = {
    "vmw.REQUEST": vmw.REQUEST,
    "vmw.RESPONSE": vmw.RESPONSE,
    "vmw.EVENT": vmw.EVENT,
    "vhost_user.HEADER": vu.HEADER,
    "vhost_user.U64": vu.U64,
    "vhost_user.VRING_STATE": vu.VRING_STATE,
    "vhost_user.VRING_ADDRESS": vu.VRING_ADDRESS,
    "vhost_user.MEMORY_REGION": vu.MEMORY_REGION,
    "vhost_user.SINGLE_REGION": vu.SINGLE_REGION,
    "vhost_user.LOG": vu.LOG,
    "vhost_user.VRING_AREA": vu.VRING_AREA,
    "vhost_user.INFLIGHT": vu.INFLIGHT,
    "vhost_user.DEVICE_STATE_TRANSFER": vu.DEVICE_STATE_TRANSFER,
    "virtqueue.DESCRIPTOR": vq.DESCRIPTOR,
    "virtqueue.USED_ELEM": vq.USED_ELEM,
    "virtqueue.RING_HEADER": vq.RING_HEADER,
    "virtio_balloon.CONFIG": vb.CONFIG,
    "virtio_balloon.STAT": vb.STAT,
}

EXPECTED_SIZES = {
    "vmw.REQUEST": 24,
    "vmw.RESPONSE": 24,
    "vmw.EVENT": 8,
    "vhost_user.HEADER": 12,
    "vhost_user.U64": 8,
    "vhost_user.VRING_STATE": 8,
    "vhost_user.VRING_ADDRESS": 40,
    "vhost_user.MEMORY_REGION": 32,
    "vhost_user.SINGLE_REGION": 40,
    "vhost_user.LOG": 16,
    "vhost_user.VRING_AREA": 24,
    "vhost_user.INFLIGHT": 24,
    "vhost_user.DEVICE_STATE_TRANSFER": 8,
    "virtqueue.DESCRIPTOR": 16,
    "virtqueue.USED_ELEM": 8,
    "virtqueue.RING_HEADER": 4,
    "virtio_balloon.CONFIG": 16,
    "virtio_balloon.STAT": 10,
}


@pytest.mark.parametrize("name", sorted(FIXED_STRUCTS))
def test_fixed_struct_round_trip(name: str) -> None:
    con = FIXED_STRUCTS[name]
    assert con.sizeof() == EXPECTED_SIZES[name]

    @FAST
    @given(values(con))
    def from_value(value: Any) -> None:
        check_round_trip(con, value)

    @FAST
    @given(st.binary(min_size=con.sizeof(), max_size=con.sizeof()))
    def from_bytes(data: bytes) -> None:
        assert con.build(con.parse(data)) == data

    from_value()
    from_bytes()


def test_every_payload_is_covered() -> None:
    declared = {v for v in vu.REQUEST_PAYLOAD.values() if v is not None}
    declared |= set(vu.REPLY_PAYLOAD.values())
    covered = set(FIXED_STRUCTS.values()) | {vu.MEMORY_TABLE, vu.CONFIG}
    assert declared <= covered


# ---------------------------------------------------------------------------------------
# vmw: Request / Response / event


@FAST
@given(
    st.integers(0, vmw.U32_MAX),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, vmw.U32_MAX),
)
def test_request_round_trip(command: int, arg1: int, arg2: int, magic: int) -> None:
    request = vmw.Request(command, arg1, arg2, magic)
    data = request.build()
    assert len(data) == vmw.REQUEST_SIZE == 24
    assert vmw.Request.parse(data) == request
    assert plain(vmw.REQUEST.parse(data)) == {
        "magic": magic,
        "command": command,
        "arg1": arg1,
        "arg2": arg2,
    }


@FAST
@given(st.binary(min_size=24, max_size=24))
def test_request_from_bytes(data: bytes) -> None:
    assert vmw.Request.parse(data).build() == data


@FAST
@given(
    st.integers(0, vmw.U32_MAX),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, vmw.U32_MAX),
)
def test_response_round_trip(status: int, result: int, caps: int, reserved: int) -> None:
    response = vmw.Response(status, result, caps, reserved)
    data = response.build()
    assert len(data) == vmw.RESPONSE_SIZE == 24
    assert vmw.Response.parse(data) == response
    assert vmw.Response.parse(data).build() == data


def test_request_layout_is_little_endian() -> None:
    data = vmw.Request(vmw.Command.BATCHED_LOCK, 0x1122334455, 512).build()
    assert data[:4] == bytes.fromhex("6f6d6c45")  # "omlE": 0x456c6d6f little-endian
    assert data[4:8] == (6).to_bytes(4, "little")
    assert int.from_bytes(data[8:16], "little") == 0x1122334455
    assert int.from_bytes(data[16:24], "little") == 512


@pytest.mark.parametrize("kind", list(vmw.EventKind))
def test_event_round_trip(kind: vmw.EventKind) -> None:
    data = vmw.build_event(kind)
    assert len(data) == vmw.EVENT_SIZE == 8
    assert vmw.parse_event(data) is kind
    assert data[4:] == bytes(4)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(23),
        bytes(25),
        bytes(48),
    ],
)
@pytest.mark.parametrize("parser", [vmw.Request.parse, vmw.Response.parse])
def test_frame_wrong_size_is_format_error(parser: Any, data: bytes) -> None:
    with pytest.raises(FormatError):
        parser(data)


@pytest.mark.parametrize(
    "data", [b"", bytes(7), (0).to_bytes(8, "little"), (3).to_bytes(8, "little")]
)
def test_bad_event_is_format_error(data: bytes) -> None:
    with pytest.raises(FormatError):
        vmw.parse_event(data)


@pytest.mark.parametrize(
    "fields",
    [
        {"command": -1},
        {"command": 2**32},
        {"arg1": 2**64},
        {"arg2": -5},
        {"magic": 2**32},
    ],
)
def test_request_unbuildable_is_format_error(fields: dict[str, int]) -> None:
    base = {"command": 0, "arg1": 0, "arg2": 0, "magic": vmw.MAGIC} | fields
    with pytest.raises(FormatError):
        vmw.Request(**base).build()


def test_response_unbuildable_is_format_error() -> None:
    with pytest.raises(FormatError):
        vmw.Response(status=-1).build()
    with pytest.raises(FormatError):
        vmw.Response(status=0, result=2**64).build()


# ---------------------------------------------------------------------------------------
# vmw: the batch page

entry_value = st.fixed_dictionaries(
    {
        "pfn": st.integers(0, 2**52 - 1),
        "reserved": st.integers(0, 2**7 - 1),
        "status": st.integers(0, 31),
    }
)


@FAST
@given(entry_value)
def test_batch_entry_round_trip(entry: dict[str, int]) -> None:
    check_round_trip(vmw.BATCH_ENTRY, entry)
    raw = int.from_bytes(vmw.BATCH_ENTRY.build(entry), "little")
    assert raw == entry["pfn"] << 12 | entry["reserved"] << 5 | entry["status"]


def test_batch_entry_bit_masks() -> None:
    assert vmw.ENTRY_PFN_SHIFT == 12
    assert vmw.ENTRY_STATUS_MASK == 0x1F
    assert vmw.ENTRY_RESERVED_MASK == 0xFE0
    assert vmw.ENTRY_PFN_MASK == 0xFFFF_FFFF_FFFF_F000
    assert vmw.BATCH_MAX_ENTRIES == 512
    assert vmw.BATCH_PAGE.sizeof() == 4096


@FAST
@given(st.lists(entry_value, min_size=0, max_size=512))
def test_batch_numpy_view_agrees_with_construct(entries: list[dict[str, int]]) -> None:
    con = vmw.batch(len(entries))
    data = con.build(entries)
    assert len(data) == 8 * len(entries) == con.sizeof()
    check_round_trip(con, entries)
    view = vmw.batch_entries(data, len(entries))
    parsed = con.parse(data)
    assert vmw.entry_pfns(view).tolist() == [e.pfn for e in parsed]
    assert vmw.entry_statuses(view).tolist() == [e.status for e in parsed]
    assert (vmw.entry_reserved(view) >> np.uint64(5)).tolist() == [e.reserved for e in parsed]


@settings(max_examples=15, deadline=None)  # construct parses 512 bit-structs slowly
@given(st.integers(0, 2**32 - 1), st.integers(0, 512))
def test_batch_page_bytes_view_agrees(seed: int, count: int) -> None:
    page = np.random.default_rng(seed).bytes(4096)
    assert vmw.BATCH_PAGE.build(vmw.BATCH_PAGE.parse(page)) == page
    view = vmw.batch_entries(page, count)
    parsed = vmw.BATCH_PAGE.parse(page)[:count]
    assert vmw.entry_pfns(view).tolist() == [e.pfn for e in parsed]
    assert vmw.entry_statuses(view).tolist() == [e.status for e in parsed]


@FAST
@given(
    st.lists(st.tuples(entry_value, st.integers(0, 31)), min_size=1, max_size=512),
)
def test_with_statuses_keeps_pfn_and_reserved(items: list[tuple[dict[str, int], int]]) -> None:
    entries = [e for e, _ in items]
    new = [s for _, s in items]
    data = vmw.batch(len(entries)).build(entries)
    out = vmw.with_statuses(vmw.batch_entries(data, len(entries)), new)
    parsed = vmw.batch(len(entries)).parse(out.astype(vmw.BATCH_ENTRY_DTYPE).tobytes())
    assert [(p.pfn, p.reserved, p.status) for p in parsed] == [
        (e["pfn"], e["reserved"], s) for e, s in zip(entries, new, strict=True)
    ]


@FAST
@given(st.lists(st.tuples(st.integers(0, 2**52 - 1), st.integers(0, 31)), min_size=0, max_size=512))
def test_build_batch_agrees_with_construct(items: list[tuple[int, int]]) -> None:
    pfns = [p for p, _ in items]
    statuses = [s for _, s in items]
    data = vmw.build_batch(pfns, statuses)
    assert data == vmw.batch(len(items)).build(
        [{"pfn": p, "reserved": 0, "status": s} for p, s in items]
    )
    assert vmw.build_batch(pfns) == vmw.batch(len(items)).build(
        [{"pfn": p, "reserved": 0, "status": 0} for p in pfns]
    )


@pytest.mark.parametrize(
    ("page", "count"),
    [(bytes(4096), 513), (bytes(4096), -1), (bytes(8), 2), (b"", 1)],
)
def test_batch_entries_bad_input(page: bytes, count: int) -> None:
    with pytest.raises(FormatError):
        vmw.batch_entries(page, count)


@pytest.mark.parametrize("pfns", [list(range(513)), [2**52], [2**63]])
def test_build_batch_bad_input(pfns: list[int]) -> None:
    with pytest.raises(FormatError):
        vmw.build_batch(pfns)


def test_required_capabilities_table() -> None:
    cap = vmw.Capability
    expected = {
        vmw.Command.START: cap.NONE,
        vmw.Command.GET_TARGET: cap.NONE,
        vmw.Command.GUEST_ID: cap.NONE,
        vmw.Command.LOCK: cap.BASIC_CMDS,
        vmw.Command.UNLOCK: cap.BASIC_CMDS,
        vmw.Command.BATCHED_LOCK: cap.BATCHED_CMDS,
        vmw.Command.BATCHED_UNLOCK: cap.BATCHED_CMDS,
        vmw.Command.BATCHED_2M_LOCK: cap.BATCHED_CMDS | cap.BATCHED_2M_CMDS,
        vmw.Command.BATCHED_2M_UNLOCK: cap.BATCHED_CMDS | cap.BATCHED_2M_CMDS,
        vmw.Command.VMCI_DOORBELL_SET: cap.SIGNALLED_WAKEUP_CMD,
    }
    assert {c: vmw.required_capabilities(c) for c in vmw.Command} == expected
    assert int(vmw.ALL_CAPABILITIES) == 0x3E
    assert vmw.Command.lookup(5) is None
    assert vmw.Command.lookup(11) is None
    assert set(vmw.COMMAND_DEBUGFS_NAME) == set(vmw.Command)


# ---------------------------------------------------------------------------------------
# vhost-user


@FAST
@given(values(vu.HEADER))
def test_vhost_header_helpers(header: dict[str, int]) -> None:
    data = vu.build_header(header["request"], header["flags"], header["size"])
    assert len(data) == vu.HEADER_SIZE == 12
    assert plain(vu.parse_header(data)) == header


@pytest.mark.parametrize("size", [0, 11, 13, 24])
def test_vhost_header_wrong_size(size: int) -> None:
    with pytest.raises(FormatError):
        vu.parse_header(bytes(size))


PAYLOAD_CASES = sorted(
    {
        (f"request {r.name}", fmt)
        for r, fmt in vu.REQUEST_PAYLOAD.items()
        if fmt is not None and fmt not in (vu.MEMORY_TABLE, vu.CONFIG)
    }
    | {
        (f"reply {r.name}", fmt)
        for r, fmt in vu.REPLY_PAYLOAD.items()
        if fmt not in (vu.MEMORY_TABLE, vu.CONFIG)
    },
    key=lambda item: item[0],
)


@pytest.mark.parametrize(("what", "fmt"), PAYLOAD_CASES, ids=[w for w, _ in PAYLOAD_CASES])
def test_vhost_payload_round_trip(what: str, fmt: cs.Construct) -> None:
    @settings(max_examples=25, deadline=None)
    @given(values(fmt))
    def run(value: Any) -> None:
        data = vu.build_payload(fmt, value, what)
        assert len(data) == fmt.sizeof()
        assert plain(vu.parse_payload(fmt, data, what)) == plain(value)

    run()
    with pytest.raises(FormatError):
        vu.parse_payload(fmt, bytes(fmt.sizeof() + 1), what)
    with pytest.raises(FormatError):
        vu.parse_payload(fmt, bytes(fmt.sizeof() - 1), what)


region_value = values(vu.MEMORY_REGION)


@pytest.mark.parametrize("nregions", range(9))
def test_memory_table_round_trip(nregions: int) -> None:
    @settings(max_examples=15, deadline=None)
    @given(st.lists(region_value, min_size=nregions, max_size=nregions), st.integers(0, 2**32 - 1))
    def run(regions: list[dict[str, int]], padding: int) -> None:
        table = {"nregions": nregions, "padding": padding, "regions": regions}
        data = vu.build_payload(vu.MEMORY_TABLE, table, "mem table")
        assert len(data) == 8 + 32 * nregions
        assert plain(vu.parse_payload(vu.MEMORY_TABLE, data, "mem table")) == table
        assert vu.MEMORY_TABLE.build(vu.MEMORY_TABLE.parse(data)) == data
        with pytest.raises(FormatError):
            vu.parse_payload(vu.MEMORY_TABLE, data + bytes(1), "mem table")
        with pytest.raises(FormatError):
            vu.parse_payload(vu.MEMORY_TABLE, data[:-1], "mem table")

    run()


def test_memory_table_count_mismatch_is_format_error() -> None:
    with pytest.raises(FormatError):
        vu.build_payload(vu.MEMORY_TABLE, {"nregions": 2, "padding": 0, "regions": []}, "t")


@pytest.mark.parametrize("size", [0, 1, 4, 8, 16, 100, 255, 256])
def test_config_round_trip(size: int) -> None:
    @settings(max_examples=10, deadline=None)
    @given(
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.binary(min_size=size, max_size=size),
    )
    def run(offset: int, flags: int, blob: bytes) -> None:
        value = {"offset": offset, "size": size, "flags": flags, "data": blob}
        data = vu.build_payload(vu.CONFIG, value, "config")
        assert len(data) == vu.CONFIG_HEADER_SIZE + size
        assert plain(vu.parse_payload(vu.CONFIG, data, "config")) == value
        assert vu.CONFIG.build(vu.CONFIG.parse(data)) == data

    run()


def test_config_short_data_is_format_error() -> None:
    data = vu.build_payload(vu.CONFIG, {"offset": 0, "size": 8, "flags": 0, "data": bytes(8)}, "c")
    with pytest.raises(FormatError):
        vu.parse_payload(vu.CONFIG, data[:-1], "config")


def test_u64_helper() -> None:
    assert vu.u64(0x0102030405060708) == bytes.fromhex("0807060504030201")
    with pytest.raises(FormatError):
        vu.u64(2**64)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([fmt for _, fmt in PAYLOAD_CASES] + [vu.MEMORY_TABLE, vu.CONFIG]),
    st.binary(max_size=300),
)
def test_vhost_payload_garbage_raises_only_format_error(fmt: cs.Construct, data: bytes) -> None:
    with contextlib.suppress(FormatError):
        vu.parse_payload(fmt, data, "garbage")


# ---------------------------------------------------------------------------------------
# virtqueue


@pytest.mark.parametrize("size", [1, 2, 4, 16, 256])
def test_rings_round_trip(size: int) -> None:
    avail = vq.avail_ring(size)
    used = vq.used_ring(size)
    assert avail.sizeof() == vq.avail_ring_size(size) == 6 + 2 * size
    assert used.sizeof() == vq.used_ring_size(size) == 6 + 8 * size
    assert vq.used_event_offset(size) == 4 + 2 * size
    assert vq.avail_event_offset(size) == 4 + 8 * size
    assert vq.desc_table_size(size) == 16 * size

    @settings(max_examples=10, deadline=None)
    @given(values(avail), values(used))
    def run(a: dict[str, Any], u: dict[str, Any]) -> None:
        check_round_trip(avail, a)
        check_round_trip(used, u)
        # the offsets helpers agree with the declarations
        data = used.build(u)
        off = vq.avail_event_offset(size)
        assert int.from_bytes(data[off : off + 2], "little") == u["avail_event"]
        data = avail.build(a)
        off = vq.used_event_offset(size)
        assert int.from_bytes(data[off : off + 2], "little") == a["used_event"]
        slot = size - 1
        off = vq.avail_entry_offset(slot)
        assert int.from_bytes(data[off : off + 2], "little") == a["ring"][slot]

    run()


@FAST
@given(st.integers(0, 64).flatmap(lambda n: st.binary(min_size=16 * n, max_size=16 * n)))
def test_descriptor_dtype_view_equals_construct(data: bytes) -> None:
    view = np.frombuffer(data, vq.DESCRIPTOR_DTYPE)
    parsed = cs.Array(len(data) // 16, vq.DESCRIPTOR).parse(data)
    assert [
        {
            "addr": int(r["addr"]),
            "len": int(r["len"]),
            "flags": int(r["flags"]),
            "next": int(r["next"]),
        }
        for r in view
    ] == plain(parsed)


@FAST
@given(st.integers(0, 64).flatmap(lambda n: st.binary(min_size=8 * n, max_size=8 * n)))
def test_used_elem_dtype_view_equals_construct(data: bytes) -> None:
    view = np.frombuffer(data, vq.USED_ELEM_DTYPE)
    parsed = cs.Array(len(data) // 8, vq.USED_ELEM).parse(data)
    assert [{"id": int(r["id"]), "len": int(r["len"])} for r in view] == plain(parsed)


@FAST
@given(st.integers(0, 32).flatmap(lambda n: st.binary(min_size=10 * n, max_size=10 * n)))
def test_stat_dtype_view_equals_construct(data: bytes) -> None:
    view = np.frombuffer(data, vb.STAT_DTYPE)
    parsed = cs.Array(len(data) // 10, vb.STAT).parse(data)
    assert [{"tag": int(r["tag"]), "val": int(r["val"])} for r in view] == plain(parsed)
    assert vb.STAT_DTYPE.itemsize == vb.STAT_SIZE == 10


@FAST
@given(st.lists(st.tuples(st.integers(0, 2**16 - 1), st.integers(-(2**64), 2**65)), max_size=32))
def test_pack_stats_is_the_declared_entry(entries: list[tuple[int, int]]) -> None:
    data = vb.pack_stats(entries)
    expect = [{"tag": t, "val": v % 2**64} for t, v in entries]
    assert plain(cs.Array(len(entries), vb.STAT).parse(data)) == expect
    assert len(data) == vb.STAT_SIZE * len(entries)


@FAST
@given(st.lists(st.integers(0, 2**32 - 1), max_size=256))
def test_balloon_pfn_dtype(pfns: list[int]) -> None:
    data = cs.Array(len(pfns), vb.PFN).build(pfns)
    assert np.frombuffer(data, vb.PFN_DTYPE).tolist() == pfns
    assert np.asarray(pfns, dtype=np.uint64).astype(vb.PFN_DTYPE).tobytes() == data
    assert vb.PFN_DTYPE.itemsize == vb.PFN.sizeof() == 4


NEED_EVENT_TABLE = [
    # (event_idx, new_idx, old_idx, expected)
    (0, 1, 0, True),  # crossed event 0
    (1, 1, 0, False),  # event 1 not yet passed (new == event)
    (0, 0, 0, False),  # nothing moved
    (5, 10, 0, True),
    (10, 10, 0, False),
    (9, 10, 0, True),
    (10, 20, 11, False),  # event behind old
    (0xFFFF, 0, 0xFFFF, True),  # wrap: 0xffff -> 0 crosses 0xffff
    (0, 1, 0xFFFF, True),  # wrap: 0xffff -> 1 crosses 0
    (2, 1, 0xFFFF, False),
    (0xFFFE, 0, 0xFFFF, False),
    (3, 3, 3, False),
]


@pytest.mark.parametrize(("event", "new", "old", "expected"), NEED_EVENT_TABLE)
def test_need_event_table(event: int, new: int, old: int, expected: bool) -> None:
    assert vq.need_event(event, new, old) is expected


@FAST
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_need_event_means_event_in_old_new_window(event: int, new: int, old: int) -> None:
    # The event index lies in the half-open window [old, new) modulo 2^16.
    expected = (event - old) % 65536 < (new - old) % 65536
    assert vq.need_event(event, new, old) is expected


# ---------------------------------------------------------------------------------------
# virtio-balloon


def test_virtio_balloon_constants() -> None:
    assert vb.CONFIG_SIZE == 16
    assert vb.BASIC_CONFIG_SIZE == 8
    assert set(vb.STAT_QOM_KEY) == set(vb.StatTag)
    assert len(set(vb.STAT_QOM_KEY.values())) == len(vb.StatTag)


@FAST
@given(values(vb.CONFIG))
def test_virtio_balloon_config_layout(config: dict[str, int]) -> None:
    data = vb.CONFIG.build(config)
    assert int.from_bytes(data[0:4], "little") == config["num_pages"]
    assert int.from_bytes(data[4:8], "little") == config["actual"]


# ---------------------------------------------------------------------------------------
# Garbage in, FormatError out


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64))
def test_vmw_parsers_raise_only_format_error(data: bytes) -> None:
    for parser in (vmw.Request.parse, vmw.Response.parse, vmw.parse_event, vu.parse_header):
        with contextlib.suppress(FormatError):
            parser(data)


def test_virtio_pci_layout_matches_the_spec() -> None:
    """virtio 1.x §4.1.4.3 and §4.1.4: the offsets drivers hard-code (Linux's
    ``include/uapi/linux/virtio_pci.h`` VIRTIO_PCI_COMMON_*), derived from the declarations."""
    from protocol import virtio_pci as vp

    spec = {
        "device_feature_select": 0, "device_feature": 4, "driver_feature_select": 8,
        "driver_feature": 12, "config_msix_vector": 16, "num_queues": 18, "device_status": 20,
        "config_generation": 21, "queue_select": 22, "queue_size": 24, "queue_msix_vector": 26,
        "queue_enable": 28, "queue_notify_off": 30, "queue_desc": 32, "queue_driver": 40,
        "queue_device": 48,
    }  # fmt: skip
    assert spec == vp.COMMON_CFG_OFFSET and vp.COMMON_CFG.sizeof() == 56
    assert (vp.CC_STATUS, vp.CC_Q_NOTIFY_OFF, vp.CC_Q_DEVICE) == (0x14, 0x1E, 0x30)
    assert vp.CAP.sizeof() == 16 and vp.NOTIFY_CAP.sizeof() == 20
    assert {k: vp.CAP_OFFSET[k] for k in ("cfg_type", "bar", "offset", "length")} == {
        "cfg_type": 3, "bar": 4, "offset": 8, "length": 12,
    }  # fmt: skip
    assert vp.CAP_OFFSET["notify_off_multiplier"] == 16
    cap = vp.NOTIFY_CAP.parse(bytes([9, 0x40, 20, 2, 4, 0, 0, 0]) + bytes.fromhex(
        "00300000" "00100000" "04000000"))  # fmt: skip
    assert (cap.cfg_type, cap.bar, cap.offset, cap.length, cap.notify_off_multiplier) == (
        vp.VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0x3000, 0x1000, 4)  # fmt: skip
    assert vp.virtio_device_id(vp.VIRTIO_VENDOR, 0x1045) == 5
    assert vp.virtio_device_id(vp.VIRTIO_VENDOR, 0x1002, 5) == 5
    assert vp.virtio_device_id(0x8086, 0x1045) is None
    assert vp.virtio_device_id(vp.VIRTIO_VENDOR, 0x1100) is None
