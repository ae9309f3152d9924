"""The conformance catalogue: one named case per obligation, each citing where it comes from.

``PROTOCOL.md`` references are to docs/PROTOCOL.md (section and line); ``vhost-user``
references are to QEMU's docs/interop/vhost-user.rst as summarised in the reference sheet
(``ref §N``: shared/reference/vhost-user-virtio.md); ``A.10`` cases are the hostile inputs
taken from other VMMs' bug history (shared/reference/anchors.md §A.10).

A case is an ``async def (ctx) -> None`` that raises :class:`CaseFailed` with a message that
says what the back-end did instead, or :class:`Skipped` with the reason it cannot run.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from conformance.context import (
    CaseFailed,
    Context,
    Need,
    Skipped,
    VmwSession,
    expect,
    expect_eq,
    expect_status,
)
from conformance.rawfrontend import (
    FREE_START_PFN,
    INDIRECT,
    PAGE,
    QVA_BASE,
    Frontend,
    VmwGuest,
    flat_ram,
    slot_gpa,
    status_of,
    table_payload,
    touch,
    vring_addr,
    vring_state,
)
from guest_driver.virtq import Buffer
from protocol import vhost_user as vu
from protocol import virtio_balloon as vb
from protocol import virtqueue as vq
from protocol import vmw
from protocol.errors import BackendHungUp
from protocol.vhost_user import FrontendRequest as R
from protocol.vhost_user import ProtocolFeature as PF
from protocol.vhost_user import VirtioFeature as VF
from protocol.vmw import Command as C
from protocol.vmw import Status as S

CaseFn = Callable[[Context], Awaitable[None]]
BOTH = ("vmw", "virtio-balloon")


@dataclass(frozen=True)
class Case:
    name: str
    spec: str
    checks: str
    fn: CaseFn
    devices: tuple[str, ...] = BOTH
    #: the operator target (pages) the case needs at connect time; None: any
    target: int | None = None
    timeout: float = 10.0
    #: what it needs beyond a guest's cmdq (:class:`conformance.context.Need`); a case with
    #: none runs over every transport, inside a guest too (it uses only ``ctx.guest()``)
    needs: frozenset[Need] = frozenset({Need.VHOST_USER})

    def missing(self, provides: frozenset[Need]) -> frozenset[Need]:
        """What this case needs that a transport providing ``provides`` lacks."""
        return self.needs - provides


CASES: list[Case] = []


def case(
    name: str,
    spec: str,
    checks: str,
    *,
    devices: tuple[str, ...] = BOTH,
    target: int | None = None,
    timeout: float = 10.0,
    needs: Sequence[Need] = (Need.VHOST_USER,),
) -> Callable[[CaseFn], CaseFn]:
    def register(fn: CaseFn) -> CaseFn:
        if any(c.name == name for c in CASES):
            raise ValueError(f"duplicate case {name}")
        CASES.append(Case(name, spec, checks, fn, devices, target, timeout, frozenset(needs)))
        return fn

    return register


VMW = ("vmw",)
VB = ("virtio-balloon",)
ALL_CAPS = int(vmw.ALL_CAPABILITIES)
T = 4096  # the target most lock cases run with (pages)


def _pfn(i: int = 0) -> int:
    return FREE_START_PFN + i


#: a guest-level case: it talks to the device only as a guest driver does (any transport)
GUEST: tuple[Need, ...] = ()


async def _started(ctx: Context, target: int | None = None) -> VmwSession:
    """A started guest session (any transport), the target ``target`` first."""
    if target is not None:
        await ctx.need_target(target)
    return await ctx.guest(start=True)


async def _handshake_vmw(ctx: Context, target: int | None = None) -> VmwGuest:
    """A started session of our own vhost-user front-end (for cases that reach past it)."""
    if target is not None:
        await ctx.need_target(target)
    return await ctx.vmw(start=True)


# =====================================================================================
# vhost-user: handshake, features, replies


@case(
    "vu.features-offered",
    "PROTOCOL.md §1 L23-25; ref §2.1",
    "GET_FEATURES offers VERSION_1 and PROTOCOL_FEATURES (and INDIRECT_DESC, EVENT_IDX for vmw), "
    "in an 8-byte reply",
)
async def vu_features(ctx: Context) -> None:
    fe = await ctx.frontend()
    reply = await fe.request(R.GET_FEATURES)
    assert reply is not None
    feats = reply.u64
    need = VF.VERSION_1 | VF.PROTOCOL_FEATURES
    if ctx.device == "vmw":
        need |= VF.RING_INDIRECT_DESC | VF.RING_EVENT_IDX
    expect(feats & need == need, f"features {feats:#x} lack {int(need & ~feats):#x}")
    expect(not feats & VF.ACCESS_PLATFORM, "offers ACCESS_PLATFORM (needs an IOTLB)")
    expect(not feats & VF.RING_PACKED, "offers RING_PACKED")


@case(
    "vu.reply-flags-0x5",
    "PROTOCOL.md §1 L18; vhost-user 'Header' (ref §1.2: QEMU requires exactly 0x5)",
    "every reply, including acks of NEED_REPLY requests, has flags exactly 0x5",
)
async def vu_reply_flags(ctx: Context) -> None:
    fe = await ctx.frontend()
    await fe.negotiate()
    await fe.set_mem_table()
    await fe.request(R.GET_FEATURES, need_reply=True, flags=vu.VERSION | vu.FLAG_NEED_REPLY)
    if fe.acked_protocol & PF.MQ:
        await fe.get_u64(R.GET_QUEUE_NUM)
    expect(fe.reply_flags_seen, "no replies were seen")
    bad = [(R(r).name, f"{f:#x}") for r, f in fe.reply_flags_seen if f != vu.REPLY_FLAGS]
    expect(not bad, f"replies with flags != 0x5: {bad}")


@case(
    "vu.reply-ack",
    "vhost-user 'REPLY_ACK' (ref §1.7)",
    "with REPLY_ACK, NEED_REPLY on SET_OWNER/SET_FEATURES/SET_MEM_TABLE/SET_VRING_* is acked "
    "with u64 0; a GET_* with NEED_REPLY gets only its own reply",
)
async def vu_reply_ack(ctx: Context) -> None:
    fe = await ctx.frontend()
    fe.features = await fe.get_u64(R.GET_FEATURES)
    offered = await fe.get_u64(R.GET_PROTOCOL_FEATURES)
    if not offered & PF.REPLY_ACK:
        raise Skipped("back-end does not offer REPLY_ACK")
    await fe.request(R.SET_PROTOCOL_FEATURES, vu.u64(offered), need_reply=False)
    fe.acked_protocol = offered
    for req, payload in [
        (R.SET_OWNER, b""),
        (R.SET_FEATURES, vu.u64(fe.features)),
    ]:
        expect_eq(await fe.ack(req, payload), 0, f"{req.name} ack")
    fe.acked = fe.features
    expect_eq(await fe.set_mem_table(), 0, "SET_MEM_TABLE ack")
    await fe.setup_queue(0)  # SET_VRING_NUM/BASE/ADDR/KICK/CALL/ENABLE, each acked 0 inside
    reply = await fe.request(R.GET_FEATURES, need_reply=True, flags=vu.VERSION | vu.FLAG_NEED_REPLY)
    assert reply is not None
    expect_eq(len(reply.payload), 8, "GET_FEATURES reply size under NEED_REPLY")
    # nothing else may follow (no extra ack): the next reply must belong to the next request
    reply = await fe.request(R.GET_PROTOCOL_FEATURES)
    assert reply is not None
    expect_eq(reply.u64, offered, "GET_PROTOCOL_FEATURES after a NEED_REPLY GET (stray ack?)")


@case(
    "vu.queue-num",
    "PROTOCOL.md §1 L20-22; ref §2.2 (MQ)",
    "GET_QUEUE_NUM answers the personality's queue count (vmw 2, virtio-balloon >= 3)",
)
async def vu_queue_num(ctx: Context) -> None:
    fe = await ctx.frontend()
    await fe.negotiate()
    if not fe.acked_protocol & PF.MQ:
        raise Skipped("MQ not offered")
    if ctx.device == "vmw":
        expect_eq(fe.queue_count, 2, "GET_QUEUE_NUM")
    else:
        expect(fe.queue_count >= 3, f"GET_QUEUE_NUM {fe.queue_count} < 3 (inflate, deflate, stats)")


@case(
    "vu.protocol-features-first",
    "vhost-user GET_PROTOCOL_FEATURES (ref §1.5 id 15)",
    "GET_PROTOCOL_FEATURES works before SET_FEATURES and SET_OWNER",
)
async def vu_pf_first(ctx: Context) -> None:
    fe = await ctx.frontend()
    pf = await fe.get_u64(R.GET_PROTOCOL_FEATURES)
    expect(pf & ~((1 << 20) - 1) == 0, f"offers protocol bits >= 20: {pf:#x}")


@case(
    "vu.no-protocol-features",
    "vhost-user 'Ring states' (ref §2.3)",
    "a front-end that does not ack PROTOCOL_FEATURES gets rings enabled at start, and served",
)
async def vu_no_pf(ctx: Context) -> None:
    if ctx.device == "vmw":
        fe = await ctx.frontend()
        await fe.start([0, 1], features=VF.VERSION_1)
        g = VmwGuest(fe)
        resp = await g.start()
        expect_status(resp, S.SUCCESS_WITH_CAPABILITIES, "START without protocol features")
    else:
        fe = await ctx.frontend()
        await fe.start([0, 1], features=VF.VERSION_1)
        await fe.mem.write(0x50000, struct.pack("<I", _pfn()))
        await fe.queues[0].ring.add([Buffer(0x50000, 4)])
        used = await fe.wait_used(fe.queues[0])
        expect_eq(used[0].len, 0, "inflate used length")


@case(
    "vu.ring-disabled-until-enable",
    "vhost-user 'Ring states' (ref §2.3): started + disabled = no side effects",
    "with PROTOCOL_FEATURES a ring is disabled until SET_VRING_ENABLE(1); "
    "a command posted meanwhile has no effect, and is served after enabling",
    devices=VMW,
)
async def vu_disabled(ctx: Context) -> None:
    fe = await ctx.frontend()
    await fe.negotiate()
    await fe.set_mem_table()
    await fe.setup_queue(0, enable=False)
    await fe.setup_queue(1, enable=False)
    g = VmwGuest(fe)
    req_gpa = slot_gpa(0, 0)
    await fe.mem.write(req_gpa, vmw.Request(C.START, ALL_CAPS).build())
    await g.cmdq.ring.add([Buffer(req_gpa, 24), Buffer(req_gpa + 32, 24, write=True)])
    g.slot = 1
    early = await fe.settle(g.cmdq)
    if early:
        # processed while disabled: acceptable only without side effects (nothing written)
        expect_eq(early[0].len, 0, "used length of a command on a disabled ring")
        return
    await fe.ack(R.SET_VRING_ENABLE, vring_state(0, 1))
    (used,) = await fe.wait_used(g.cmdq)
    expect_eq(used.len, 24, "used length after SET_VRING_ENABLE(1)")


@case(
    "vu.get-vring-base-stops",
    "vhost-user GET_VRING_BASE (ref §1.5 id 11, §2.3 'Stop')",
    "GET_VRING_BASE answers the next avail index and stops the ring (a later kick is not "
    "served); SET_VRING_BASE + restart serves the pending command",
    devices=VMW,
)
async def vu_get_vring_base(ctx: Context) -> None:
    g = await ctx.vmw(start=True)
    await g.command(C.GET_TARGET)
    index, num = await g.fe.get_vring_base(0)
    expect_eq(index, 0, "GET_VRING_BASE reply index")
    expect_eq(num, 2, "GET_VRING_BASE next avail index after 2 commands")
    req_gpa = slot_gpa(0, 10)
    await g.fe.mem.write(req_gpa, vmw.Request(C.GET_TARGET).build())
    await g.cmdq.ring.add([Buffer(req_gpa, 24), Buffer(req_gpa + 32, 24, write=True)])
    stray = await g.fe.settle(g.cmdq)
    expect(not stray, "a stopped ring was still processed after a kick")
    # restart: QEMU re-sends NUM, BASE, ADDR, KICK
    q = g.cmdq
    lay = q.ring.layout
    await g.fe.ack(R.SET_VRING_NUM, vring_state(0, lay.size))
    await g.fe.ack(R.SET_VRING_BASE, vring_state(0, num))
    await g.fe.ack(
        R.SET_VRING_ADDR,
        vring_addr(0, QVA_BASE + lay.desc, QVA_BASE + lay.used, QVA_BASE + lay.avail),
    )
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    await g.fe.ack(R.SET_VRING_KICK, vu.u64(0), [kick])
    if q.kick is not None:
        os.close(q.kick)
    q.kick = kick
    await g.fe.ack(R.SET_VRING_ENABLE, vring_state(0, 1))
    (used,) = await g.fe.wait_used(q)
    expect_eq(used.len, 24, "used length of the command posted while stopped")


@case(
    "vu.mem-table-replaced",
    "PROTOCOL.md §1 L26-28; vhost-user SET_MEM_TABLE (ref §3.1: replaces the map, may arrive "
    "while rings run)",
    "SET_MEM_TABLE replaced at runtime (same RAM, new fd and new front-end addresses): "
    "rings keep working",
    devices=VMW,
)
async def vu_mem_table_replaced(ctx: Context) -> None:
    g = await ctx.vmw(start=True)
    fe = g.fe
    region = fe.ram.vhost_regions()[0]
    region["userspace_addr"] += 0x1000_0000  # the front-end remapped its RAM elsewhere
    dup = os.dup(fe.ram.fd)
    try:
        ack = await fe.ack(R.SET_MEM_TABLE, table_payload([region]), [dup])
    finally:
        os.close(dup)
    expect_eq(ack, 0, "SET_MEM_TABLE (replacement) ack")
    resp = await g.command(C.GET_TARGET)
    expect_status(resp, S.SUCCESS, "GET_TARGET after the table was replaced")


@case(
    "vu.add-rem-mem-reg",
    "PROTOCOL.md §1 L26-28, §4 row ERROR_PPN_INVALID; vhost-user ADD/REM_MEM_REG (ref §1.5 "
    "id 37/38)",
    "with CONFIGURE_MEM_SLOTS: GET_MAX_MEM_SLOTS; a page of an added region can be locked; "
    "after REM_MEM_REG it is not RAM",
    devices=VMW,
    target=T,
)
async def vu_add_rem(ctx: Context) -> None:
    await ctx.need_target(T)
    g = await ctx.vmw(start=True)
    fe = g.fe
    if not fe.acked_protocol & PF.CONFIGURE_MEM_SLOTS:
        raise Skipped("CONFIGURE_MEM_SLOTS not offered")
    slots = await fe.get_u64(R.GET_MAX_MEM_SLOTS)
    expect(slots >= 2, f"GET_MAX_MEM_SLOTS {slots}")
    extra = flat_ram(4 << 20, gpa=1 << 32, name="harness-extra")
    fe.mem.rams.append(extra)
    payload = vu.build_payload(
        vu.SINGLE_REGION, {"padding": 0, "region": extra.vhost_regions()[0]}, "r"
    )
    expect_eq(await fe.ack(R.ADD_MEM_REG, payload, [extra.fd]), 0, "ADD_MEM_REG ack")
    pfn = extra.regions[0].gpa // PAGE + 3
    expect_status(await g.command(C.LOCK, pfn), S.SUCCESS, "LOCK in the added region")
    expect_status(await g.command(C.UNLOCK, pfn), S.SUCCESS, "UNLOCK in the added region")
    expect_eq(await fe.ack(R.REM_MEM_REG, payload), 0, "REM_MEM_REG ack")
    expect_status(await g.command(C.LOCK, pfn), S.ERROR_PPN_INVALID, "LOCK after REM_MEM_REG")


@case(
    "vu.reset-device",
    "PROTOCOL.md §6 L171-173 (device restart demands a reset); vhost-user RESET_DEVICE",
    "RESET_DEVICE forgets the balloon: after re-setup the first command gets ERROR_RESET",
    devices=VMW,
)
async def vu_reset_device(ctx: Context) -> None:
    g = await ctx.vmw(start=True)
    fe = g.fe
    if not fe.acked_protocol & PF.RESET_DEVICE:
        raise Skipped("RESET_DEVICE not offered")
    expect_eq(await fe.ack(R.RESET_DEVICE), 0, "RESET_DEVICE ack")
    # QEMU's restart after a device reset: SET_FEATURES, SET_MEM_TABLE, the rings
    expect_eq(await fe.ack(R.SET_FEATURES, vu.u64(fe.acked)), 0, "SET_FEATURES ack")
    expect_eq(await fe.set_mem_table(), 0, "SET_MEM_TABLE ack")
    for i in (0, 1):
        await fe.setup_queue(i)
    g.slot = 0
    resp = await g.command(C.GET_TARGET)
    expect_status(resp, S.ERROR_RESET, "GET_TARGET after RESET_DEVICE")


@case(
    "vu.reconnect-forgets",
    "PROTOCOL.md §6 L165, L171-177",
    "a new connection starts reset-demanded; pages locked by an old connection are forgotten",
    devices=VMW,
    target=T,
)
async def vu_reconnect(ctx: Context) -> None:
    await ctx.need_target(T)
    g = await ctx.vmw(start=True)
    expect_status(await g.command(C.LOCK, _pfn()), S.SUCCESS, "LOCK")
    g.close()
    g2 = await ctx.vmw()
    expect_status(await g2.command(C.GET_TARGET), S.ERROR_RESET, "first GET_TARGET")
    expect_status(await g2.start(), S.SUCCESS_WITH_CAPABILITIES, "START")
    expect_status(await g2.command(C.UNLOCK, _pfn()), S.ERROR_PPN_UNLOCKED, "UNLOCK of old page")


async def _expect_rejected(ctx: Context, fe: Frontend, what: str) -> None:
    """The back-end refused a broken message: nack, or closed; then it still serves others."""
    closed = await fe.chan.is_closed()
    if not closed and fe.reply_ack:
        # a refusal may also come as a non-zero ack on the same connection
        pass
    await ctx.still_serving(what)


@case(
    "vu.bad-header",
    "PROTOCOL.md §1 L18; vhost-user 'Header' (version 1, reserved flags)",
    "a header with version 2 or reserved flag bits is refused; the device keeps serving",
)
async def vu_bad_header(ctx: Context) -> None:
    for flags in (0x2, vu.VERSION | 0x10, vu.VERSION | vu.FLAG_REPLY):
        fe = await ctx.frontend()
        await fe.chan.send(R.GET_FEATURES, flags=flags)
        with trio.move_on_after(0.5):
            try:
                reply = await fe.chan.recv()
            except BackendHungUp:
                reply = None
            expect(reply is None, f"GET_FEATURES with flags {flags:#x} was answered")
        await _expect_rejected(ctx, fe, f"a header with flags {flags:#x}")


@case(
    "vu.oversized-payload",
    "vhost-user 'Header' size (ref §1.3: accept <= 4096)",
    "a header announcing a 1 MiB payload is refused without reading it; the device survives",
)
async def vu_oversized(ctx: Context) -> None:
    fe = await ctx.frontend()
    await fe.chan.send(R.SET_FEATURES, b"\0" * 8, size=1 << 20)
    expect(await fe.chan.is_closed(1.0), "connection stayed open after a 1 MiB size claim")
    await ctx.still_serving("an oversized header")


@case(
    "vu.unknown-request",
    "vhost-user front-end requests (ref §1.5; id 0 is not a message)",
    "request ids 0 and 99 are refused; the device survives",
)
async def vu_unknown(ctx: Context) -> None:
    for req in (0, 99):
        fe = await ctx.frontend()
        await fe.chan.send(req, vu.build_header(0, 0, 0)[:0], flags=vu.VERSION | vu.FLAG_NEED_REPLY)
        await _expect_rejected(ctx, fe, f"request id {req}")


@case(
    "vu.fd-count-mismatch",
    "vhost-user SET_MEM_TABLE ('1 fd per region', ref §3.3), GET_FEATURES carries no fd",
    "SET_MEM_TABLE with fewer fds than regions and GET_FEATURES with a stray fd are refused "
    "(nack or close); the device survives",
)
async def vu_fds(ctx: Context) -> None:
    fe = await ctx.frontend()
    await fe.negotiate()
    ok = True
    try:
        ack = await fe.ack(R.SET_MEM_TABLE, table_payload([fe.ram.vhost_regions()[0]]), [])
        ok = ack == 0
    except BackendHungUp:
        ok = False
    expect(not ok, "SET_MEM_TABLE without its fd was acked 0")
    await ctx.still_serving("SET_MEM_TABLE without fds")
    fe2 = await ctx.frontend()
    extra = os.eventfd(0)
    try:
        await fe2.chan.send(R.GET_FEATURES, b"", [extra])
    finally:
        os.close(extra)
    await _expect_rejected(ctx, fe2, "GET_FEATURES with an fd")


@case(
    "vu.mem-table-lies",
    "PROTOCOL.md §1 L26-28; ref §3.3 (region validation)",
    "memory tables that overlap, overflow (gpa + size > 2^64) or exceed the fd's size are "
    "refused or harmless; the device survives",
)
async def vu_mem_lies(ctx: Context) -> None:
    ram = flat_ram(1 << 20, name="harness-lie")
    try:
        tables = [
            [  # two regions covering the same guest-physical range
                ram.vhost_regions()[0],
                {**ram.vhost_regions()[0], "userspace_addr": ram.regions[0].uva + (1 << 30)},
            ],
            [
                {
                    **ram.vhost_regions()[0],
                    "guest_phys_addr": (1 << 64) - PAGE,
                    "memory_size": 2 * PAGE,
                }
            ],
            [{**ram.vhost_regions()[0], "memory_size": 1 << 40}],  # far larger than the memfd
            [{**ram.vhost_regions()[0], "memory_size": 0}],
            [{**ram.vhost_regions()[0], "mmap_offset": (1 << 64) - PAGE}],
        ]
        for regions in tables:
            fe = await ctx.frontend()
            await fe.negotiate()
            with contextlib.suppress(BackendHungUp):
                await fe.ack(R.SET_MEM_TABLE, table_payload(regions), [ram.fd] * len(regions))
            await ctx.still_serving(f"SET_MEM_TABLE {regions}")
    finally:
        ram.close()


@case(
    "vu.vring-addr-bogus",
    "PROTOCOL.md §1 L26-28 (never a crash); ref §3.2 (unknown address -> error)",
    "SET_VRING_ADDR outside every region (and misaligned) is refused or never followed; "
    "the device survives",
)
async def vu_vring_bogus(ctx: Context) -> None:
    for desc, used, avail in [
        (QVA_BASE + (1 << 40), QVA_BASE + (1 << 40) + 0x2000, QVA_BASE + (1 << 40) + 0x1000),
        (0xFFFF_FFFF_FFFF_F000, 0xFFFF_FFFF_FFFF_F800, 0xFFFF_FFFF_FFFF_FC00),
        (QVA_BASE + 3, QVA_BASE + 0x1001, QVA_BASE + 0x801),
    ]:
        fe = await ctx.frontend()
        await fe.negotiate()
        await fe.set_mem_table()
        try:
            await fe.ack(R.SET_VRING_NUM, vring_state(0, 64))
            await fe.ack(R.SET_VRING_BASE, vring_state(0, 0))
            await fe.ack(R.SET_VRING_ADDR, vring_addr(0, desc, used, avail))
            kick = os.eventfd(1)
            try:
                await fe.ack(R.SET_VRING_KICK, vu.u64(0), [kick])
                await fe.ack(R.SET_VRING_ENABLE, vring_state(0, 1))
                os.eventfd_write(kick, 1)
                await trio.sleep(0.1)
            finally:
                os.close(kick)
        except BackendHungUp:
            pass
        await ctx.still_serving(f"SET_VRING_ADDR desc={desc:#x}")


# =====================================================================================
# vmmemctl commands (PROTOCOL.md §2-§6)


@case(
    "vmw.reset-until-start",
    "PROTOCOL.md §6 L165; §4 row ERROR_RESET",
    "a new connection (in a guest: the function reset and set up again) answers ERROR_RESET "
    "to every command but START; START then succeeds",
    devices=VMW,
    needs=GUEST,
)
async def vmw_reset_until_start(ctx: Context) -> None:
    g = await ctx.guest()
    for cmd, a1 in [(C.GET_TARGET, 0), (C.GUEST_ID, 1), (C.LOCK, ctx.pfn())]:
        expect_status(await g.command(cmd, a1), S.ERROR_RESET, f"{cmd.name} before START")
    resp = await g.start()
    expect_status(resp, S.SUCCESS_WITH_CAPABILITIES, "START")
    expect_status(await g.command(C.GET_TARGET), S.SUCCESS, "GET_TARGET after START")


@case(
    "vmw.start-capabilities",
    "PROTOCOL.md §3 L126-129; §2 L52",
    "START answers SUCCESS_WITH_CAPABILITIES with offered AND supported; bit 0 never granted; "
    "only START carries capabilities",
    devices=VMW,
    needs=GUEST,
)
async def vmw_start_caps(ctx: Context) -> None:
    g = await ctx.guest()
    resp = await g.start(ALL_CAPS | 1)
    expect_status(resp, S.SUCCESS_WITH_CAPABILITIES, "START(0x3f)")
    expect(not resp.capabilities & 1, f"bit 0 granted: {resp.capabilities:#x}")
    expect(resp.capabilities & ~ALL_CAPS == 0, f"caps {resp.capabilities:#x} not offered")
    expect(resp.capabilities & vmw.Capability.BASIC_CMDS, "BASIC_CMDS not granted")
    resp = await g.start(int(vmw.Capability.BASIC_CMDS))
    expect_eq(resp.capabilities, int(vmw.Capability.BASIC_CMDS), "START(BASIC) capabilities")
    resp = await g.command(C.GET_TARGET)
    expect_eq(resp.capabilities, 0, "GET_TARGET capabilities field")
    expect_eq(resp.reserved, 0, "reserved response field")


@case(
    "vmw.start-withdraw",
    "PROTOCOL.md §3 L115; §6 L174-176",
    "START(0) withdraws: capabilities 0, LOCK is then ERROR_CMD_INVALID",
    devices=VMW,
    target=T,
    needs=GUEST,
)
async def vmw_start_withdraw(ctx: Context) -> None:
    g = await _started(ctx, T)
    resp = await g.start(0)
    expect(
        resp.status in (S.SUCCESS, S.SUCCESS_WITH_CAPABILITIES), f"START(0) status {resp.status}"
    )
    expect_eq(resp.capabilities, 0, "START(0) capabilities")
    expect_status(await g.command(C.LOCK, ctx.pfn()), S.ERROR_CMD_INVALID, "LOCK after START(0)")


@case(
    "vmw.guest-id",
    "PROTOCOL.md §3 L119",
    "GUEST_ID(Linux) succeeds with result 0",
    devices=VMW,
    needs=GUEST,
)
async def vmw_guest_id(ctx: Context) -> None:
    g = await _started(ctx)
    resp = await g.command(C.GUEST_ID, vmw.GuestType.LINUX)
    expect_status(resp, S.SUCCESS, "GUEST_ID")
    expect_eq(resp.result, 0, "GUEST_ID result")


@case(
    "vmw.unknown-command",
    "PROTOCOL.md §3 L126",
    "commands 5, 11 and 0xffffffff get ERROR_CMD_INVALID",
    devices=VMW,
    needs=GUEST,
)
async def vmw_unknown(ctx: Context) -> None:
    g = await _started(ctx)
    for cmd in (5, 11, 0xFFFF_FFFF):
        expect_status(await g.command(cmd), S.ERROR_CMD_INVALID, f"command {cmd:#x}")


@case(
    "vmw.bad-frames",
    "PROTOCOL.md §2 L54-58",
    "wrong magic, 23- and 25-byte requests get ERROR_CMD_INVALID (24 bytes written); a chain "
    "with no writable part is used with length 0",
    devices=VMW,
    needs=GUEST,
)
async def vmw_bad_frames(ctx: Context) -> None:
    g = await _started(ctx)
    good = vmw.Request(C.GET_TARGET).build()
    for what, req in [
        ("wrong magic", vmw.Request(C.GET_TARGET, magic=0x12345678).build()),
        ("23-byte request", good[:23]),
        ("25-byte request", good + b"\0"),
    ]:
        raw, used = await g.exchange(req)
        expect_eq(used.len, 24, f"{what}: used length")
        expect_eq(vmw.Response.parse(raw).status, S.ERROR_CMD_INVALID, f"{what}: status")
    raw, used = await g.exchange(good, resp_len=0)
    expect_eq(used.len, 0, "no writable buffer: used length")
    raw, used = await g.exchange(good, resp_len=23)
    expect_eq(used.len, 0, "23 writable bytes: used length")
    expect_status(await g.command(C.GET_TARGET), S.SUCCESS, "GET_TARGET afterwards")


@case(
    "vmw.chains-split",
    "PROTOCOL.md §2 L32-34 (readable bytes concatenated in chain order); A.10 (CH 52db3f865)",
    "a request split over three readable descriptors and a response over two writable ones "
    "is served; an indirect chain too",
    devices=VMW,
    needs=GUEST,
)
async def vmw_split(ctx: Context) -> None:
    g = await _started(ctx)
    req = vmw.Request(C.GUEST_ID, 1).build()
    base = g.scratch
    await g.write(base, req)
    await g.write(base + 0x100, b"\xee" * 24)
    used = await g.post(
        [
            Buffer(base, 5),
            Buffer(base + 5, 11),
            Buffer(base + 16, 8),
            Buffer(base + 0x100, 10, write=True),
            Buffer(base + 0x10A, 14, write=True),
        ]
    )
    expect_eq(used.len, 24, "split chain: used length")
    resp = vmw.Response.parse(await g.read(base + 0x100, 24))
    expect_status(resp, S.SUCCESS, "split GUEST_ID")
    if not g.indirect:
        raise Skipped("INDIRECT_DESC not negotiated (split part passed)")
    await g.write(base + 0x100, b"\xee" * 24)
    used = await g.post([Buffer(base, 24), Buffer(base + 0x100, 24, write=True)], indirect=True)
    expect_eq(used.len, 24, "indirect chain: used length")
    resp = vmw.Response.parse(await g.read(base + 0x100, 24))
    expect_status(resp, S.SUCCESS, "indirect GUEST_ID")


@case(
    "vmw.lock-unlock",
    "PROTOCOL.md §3 L117-118; §4 rows SUCCESS, PPN_LOCKED, PPN_UNLOCKED; §2 L51",
    "LOCK/UNLOCK answer SUCCESS then PPN_LOCKED/PPN_UNLOCKED, and carry the target in result",
    devices=VMW,
    target=T,
    needs=GUEST,
)
async def vmw_lock_unlock(ctx: Context) -> None:
    g = await _started(ctx, T)
    resp = await g.command(C.LOCK, ctx.pfn())
    expect_status(resp, S.SUCCESS, "LOCK")
    expect_eq(resp.result, T, "LOCK result (target)")
    expect_status(await g.command(C.LOCK, ctx.pfn()), S.ERROR_PPN_LOCKED, "second LOCK")
    resp = await g.command(C.UNLOCK, ctx.pfn())
    expect_status(resp, S.SUCCESS, "UNLOCK")
    expect_eq(resp.result, T, "UNLOCK result (target)")
    expect_status(await g.command(C.UNLOCK, ctx.pfn()), S.ERROR_PPN_UNLOCKED, "second UNLOCK")
    resp = await g.command(C.GET_TARGET, g.ram_end_pfn)
    expect_eq(resp.result, T, "GET_TARGET result")


@case(
    "vmw.lock-not-needed",
    "PROTOCOL.md §4 row ERROR_PPN_NOTNEEDED",
    "with target 0, LOCK answers ERROR_PPN_NOTNEEDED",
    devices=VMW,
    target=0,
    needs=GUEST,
)
async def vmw_not_needed(ctx: Context) -> None:
    g = await _started(ctx, 0)
    expect_status(await g.command(C.LOCK, ctx.pfn()), S.ERROR_PPN_NOTNEEDED, "LOCK at target 0")


@case(
    "vmw.size-counts-2m-as-512",
    "PROTOCOL.md §4 L150-151; §6 L166",
    "with target 512, one 2 MiB lock fills the balloon: the next LOCK is PPN_NOTNEEDED",
    devices=VMW,
    target=512,
    needs=(Need.HUGE_RUNS,),
)
async def vmw_2m_counts(ctx: Context) -> None:
    g = await _handshake_vmw(ctx, 512)
    resp, entries = await g.batch(C.BATCHED_2M_LOCK, [FREE_START_PFN * 2])
    expect_status(resp, S.SUCCESS, "BATCHED_2M_LOCK")
    expect_eq(status_of(entries[0]), S.SUCCESS, "2M entry status")
    expect_status(await g.command(C.LOCK, 3 * FREE_START_PFN), S.ERROR_PPN_NOTNEEDED, "LOCK")


@case(
    "vmw.ppn-outside-ram",
    "PROTOCOL.md §1 L26-28; §4 row ERROR_PPN_INVALID",
    "LOCK of a PFN beyond guest RAM answers ERROR_PPN_INVALID",
    devices=VMW,
    target=T,
    needs=GUEST,
)
async def vmw_outside(ctx: Context) -> None:
    g = await _started(ctx, T)
    end = g.ram_end_pfn
    for pfn in (end, end + 12345, 0xFFFF_FFFF):
        expect_status(await g.command(C.LOCK, pfn), S.ERROR_PPN_INVALID, f"LOCK {pfn:#x}")


@case(
    "vmw.pfn-32bit",
    "PROTOCOL.md §3 L130-131",
    "without 64_BIT_TARGET a non-batched PFN >= 2^32 is ERROR_PPN_INVALID",
    devices=VMW,
    target=T,
    needs=GUEST,
)
async def vmw_pfn32(ctx: Context) -> None:
    await ctx.need_target(T)
    g = await ctx.guest()
    caps = ALL_CAPS & ~vmw.Capability.BIT64_TARGET
    expect_status(await g.start(caps), S.SUCCESS_WITH_CAPABILITIES, "START")
    # a PFN that would alias a RAM page if truncated to 32 bits
    resp = await g.command(C.LOCK, (1 << 32) + ctx.pfn())
    expect_status(resp, S.ERROR_PPN_INVALID, "LOCK 2^32 + pfn")
    expect_status(
        await g.command(C.UNLOCK, ctx.pfn()), S.ERROR_PPN_UNLOCKED, "the alias is untouched"
    )


@case(
    "vmw.capability-gating",
    "PROTOCOL.md §3 L113-124, L126-127",
    "each command is ERROR_CMD_INVALID unless its capability was negotiated",
    devices=VMW,
    target=T,
    needs=GUEST,
)
async def vmw_gating(ctx: Context) -> None:
    await ctx.need_target(T)
    g = await ctx.guest()
    cap = vmw.Capability
    expect_status(await g.start(int(cap.BASIC_CMDS)), S.SUCCESS_WITH_CAPABILITIES, "START")
    page = g.batch_pfn
    for cmd, a1, a2 in [
        (C.BATCHED_LOCK, page, 1),
        (C.BATCHED_UNLOCK, page, 1),
        (C.BATCHED_2M_LOCK, page, 1),
        (C.VMCI_DOORBELL_SET, 1, 2),
    ]:
        expect_status(await g.command(cmd, a1, a2), S.ERROR_CMD_INVALID, f"{cmd.name} (BASIC)")
    expect_status(
        await g.start(int(cap.BASIC_CMDS | cap.BATCHED_2M_CMDS)),
        S.SUCCESS_WITH_CAPABILITIES,
        "START(BASIC|2M)",
    )
    expect_status(
        await g.command(C.BATCHED_2M_LOCK, page, 1), S.ERROR_CMD_INVALID, "2M without BATCHED"
    )
    expect_status(await g.start(int(cap.BATCHED_CMDS)), S.SUCCESS_WITH_CAPABILITIES, "START")
    expect_status(await g.command(C.LOCK, ctx.pfn()), S.ERROR_CMD_INVALID, "LOCK without BASIC")


@case(
    "vmw.target-32bit-clamp",
    "PROTOCOL.md §3 L130-131",
    "a target above 2^32 pages is reported clamped to 32 bits without 64_BIT_TARGET, and in "
    "full with it (the guest has 32 TiB of sparse RAM, so neither a RAM clamp nor a policy "
    "cap of at least 50 % of RAM can hide it)",
    devices=VMW,
    target=(1 << 32) + 5,
)
async def vmw_clamp(ctx: Context) -> None:
    # The target (16 TiB + 20 KiB) must be one the back-end keeps: a back-end may re-decide
    # targets at any time (vdev caps a manual one at Mem/CtlMaxPercent, 65 % of guest RAM,
    # at its next policy step), and the rule under test is the 32-bit clamp, not a policy.
    # With 16 TiB of RAM the cap (10.4 TiB) bound at a policy tick that could fall between
    # START and GET_TARGET, so the verdict depended on timing; with 32 TiB it cannot bind.
    big = (1 << 32) + 5
    fe = await ctx.frontend()
    huge = flat_ram((1 << 45) + (1 << 33), gpa=1 << 46, name="harness-huge")  # sparse
    fe.mem.rams.append(huge)
    await fe.start([0, 1])
    await ctx.need_target(big)  # with a hook: once the guest has the RAM for it
    g = VmwGuest(fe)
    await g.start(ALL_CAPS & ~vmw.Capability.BIT64_TARGET)
    resp = await g.command(C.GET_TARGET)
    expect_status(resp, S.SUCCESS, "GET_TARGET")
    expect_eq(resp.result, vmw.U32_MAX, "target reported to a 32-bit guest")
    resp = await g.command(C.LOCK, _pfn())
    expect(resp.result <= vmw.U32_MAX, f"LOCK result {resp.result:#x} for a 32-bit guest")
    await g.start(ALL_CAPS)
    resp = await g.command(C.GET_TARGET)
    expect_eq(resp.result, big, "target reported to a 64-bit guest")


@case(
    "vmw.batch-statuses",
    "PROTOCOL.md §4 L139, L148-150",
    "a batch with good, locked, outside-RAM and reserved-bit entries gets per-entry statuses, "
    "PFN bits untouched, and SUCCESS as a whole",
    devices=VMW,
    target=T,
    needs=GUEST,
)
async def vmw_batch_statuses(ctx: Context) -> None:
    g = await _started(ctx, T)
    expect_status(await g.command(C.LOCK, ctx.pfn(1)), S.SUCCESS, "LOCK")
    outside = g.ram_end_pfn + 7
    shift = vmw.ENTRY_PFN_SHIFT
    entries = [
        ctx.pfn(0) << shift,
        ctx.pfn(1) << shift,
        outside << shift,
        (ctx.pfn(2) << shift) | (1 << 5),
        (ctx.pfn(3) << shift) | 0x1F,  # stale status bits in the guest's entry: overwritten
    ]
    resp, after = await g.batch(C.BATCHED_LOCK, [], raw_entries=entries)
    expect_status(resp, S.SUCCESS, "BATCHED_LOCK as a whole")
    expect_eq(resp.result, T, "BATCHED_LOCK result (target)")
    want = [S.SUCCESS, S.ERROR_PPN_LOCKED, S.ERROR_PPN_INVALID, S.ERROR_PPN_INVALID, S.SUCCESS]
    got = [status_of(e) for e in after]
    expect_eq([S(s).name if s in set(S) else s for s in got], [w.name for w in want], "statuses")
    for i, (before_e, after_e) in enumerate(zip(entries, after, strict=True)):
        expect_eq(after_e >> 12, before_e >> 12, f"entry {i} PFN bits")
    resp, after = await g.batch(C.BATCHED_UNLOCK, [ctx.pfn(0), ctx.pfn(5)])
    expect_status(resp, S.SUCCESS, "BATCHED_UNLOCK")
    expect_eq([status_of(e) for e in after], [S.SUCCESS, S.ERROR_PPN_UNLOCKED], "unlock statuses")


@case(
    "vmw.batch-count",
    "PROTOCOL.md §3 L120; §4 row ERROR_CMD_INVALID",
    "entry count 0 or 513, and a batch page outside RAM, answer ERROR_CMD_INVALID",
    devices=VMW,
    target=T,
    needs=GUEST,
)
async def vmw_batch_count(ctx: Context) -> None:
    g = await _started(ctx, T)
    for n in (0, 513, 0xFFFF_FFFF):
        resp, _ = await g.batch(C.BATCHED_LOCK, [ctx.pfn()], count=n)
        expect_status(resp, S.ERROR_CMD_INVALID, f"BATCHED_LOCK count {n}")
    outside = g.ram_end_pfn + 1
    resp = await g.command(C.BATCHED_LOCK, outside, 1)
    expect_status(resp, S.ERROR_CMD_INVALID, "batch page outside RAM")


@case(
    "vmw.2m-alignment-and-overlap",
    "PROTOCOL.md §4 L139 (2 MiB PFN not 512-aligned), L151-152 (no overlap)",
    "an unaligned 2 MiB entry is PPN_INVALID; 4 KiB inside a locked 2 MiB page and 2 MiB over "
    "a locked 4 KiB page are both PPN_LOCKED",
    devices=VMW,
    target=T,
    needs=(Need.HUGE_RUNS,),
)
async def vmw_2m(ctx: Context) -> None:
    g = await _handshake_vmw(ctx, T)
    huge = FREE_START_PFN * 2  # 4 MiB, 2M-aligned
    _resp, after = await g.batch(C.BATCHED_2M_LOCK, [huge + 1])
    expect_eq(status_of(after[0]), S.ERROR_PPN_INVALID, "unaligned 2M entry")
    _resp, after = await g.batch(C.BATCHED_2M_LOCK, [huge])
    expect_eq(status_of(after[0]), S.SUCCESS, "aligned 2M entry")
    expect_status(await g.command(C.LOCK, huge + 7), S.ERROR_PPN_LOCKED, "4K inside locked 2M")
    expect_status(await g.command(C.LOCK, huge + 600), S.SUCCESS, "4K in the next 2M page")
    _resp, after = await g.batch(C.BATCHED_2M_LOCK, [huge + 512])
    expect_eq(status_of(after[0]), S.ERROR_PPN_LOCKED, "2M over a locked 4K page")
    _resp, after = await g.batch(C.BATCHED_2M_UNLOCK, [huge])
    expect_eq(status_of(after[0]), S.SUCCESS, "2M unlock")


@case(
    "vmw.pinned-ring-pages",
    "PROTOCOL.md §4 row ERROR_PPN_PINNED",
    "LOCK of a page holding a ring, and a batch that contains its own batch page, answer "
    "ERROR_PPN_PINNED",
    devices=VMW,
    target=T,
    needs=GUEST,
)
async def vmw_pinned(ctx: Context) -> None:
    g = await _started(ctx, T)
    for first, count in g.ring_pfn_ranges():
        for pfn in (first, first + count - 1):
            resp = await g.command(C.LOCK, pfn)
            expect_status(resp, S.ERROR_PPN_PINNED, f"LOCK of ring page {pfn:#x}")
    resp, after = await g.batch(C.BATCHED_LOCK, [g.batch_pfn, ctx.pfn()])
    expect_eq(status_of(after[0]), S.ERROR_PPN_PINNED, "batch page in its own batch")
    expect_eq(status_of(after[1]), S.SUCCESS, "the other entry")


@case(
    "vmw.reclaim-punches-ram",
    "PROTOCOL.md §6 L167-169",
    "locking 1024 resident pages frees them in the RAM file (st_blocks drops by >= 4 MiB)",
    devices=VMW,
    target=T,
    needs=(Need.RAM_FILE,),
)
async def vmw_reclaim(ctx: Context) -> None:
    g = await _handshake_vmw(ctx, T)
    n = 1024
    touch(g.fe.ram, _pfn(), n)
    before = g.fe.ram.allocated_bytes()
    for k in range(0, n, 512):
        resp, after = await g.batch(C.BATCHED_LOCK, [_pfn(k + i) for i in range(512)])
        expect_status(resp, S.SUCCESS, "BATCHED_LOCK")
        bad = [i for i, e in enumerate(after) if status_of(e) != S.SUCCESS]
        expect(not bad, f"entries refused: {bad[:5]}")
    freed = before - g.fe.ram.allocated_bytes()
    expect(freed >= n * PAGE, f"RAM file shrank by {freed} bytes, expected >= {n * PAGE}")


@case(
    "vmw.zeros-after-unlock",
    "PROTOCOL.md §6 L167-170",
    "a page written by the guest, locked and unlocked reads back as zeros",
    devices=VMW,
    target=T,
    needs=GUEST,
)
async def vmw_zeros(ctx: Context) -> None:
    g = await _started(ctx, T)
    pfn = ctx.pfn(9)
    await g.fill_page(pfn, 0x5A)
    expect_status(await g.command(C.LOCK, pfn), S.SUCCESS, "LOCK")
    expect_status(await g.command(C.UNLOCK, pfn), S.SUCCESS, "UNLOCK")
    data = await g.read_page(pfn)
    expect(data == bytes(PAGE), f"unlocked page holds {data[:8].hex()}... (not zeros)")


@case(
    "vmw.start-forgets",
    "PROTOCOL.md §6 L174-176",
    "every START begins a fresh balloon: pages locked before it can be locked again",
    devices=VMW,
    target=T,
    needs=GUEST,
)
async def vmw_start_forgets(ctx: Context) -> None:
    g = await _started(ctx, T)
    expect_status(await g.command(C.LOCK, ctx.pfn()), S.SUCCESS, "LOCK")
    expect_status(await g.start(), S.SUCCESS_WITH_CAPABILITIES, "second START")
    expect_status(await g.command(C.LOCK, ctx.pfn()), S.SUCCESS, "LOCK of the same page")


@case(
    "vmw.doorbell-target-change",
    "PROTOCOL.md §5 L156-160",
    "after DOORBELL_SET, a target change writes event kind 1 into an eventq buffer, uses it "
    "with length 8 and signals the call fd; an event with no buffer waits for one",
    devices=VMW,
    needs=(Need.TARGET_CHANGE,),
)
async def vmw_doorbell(ctx: Context) -> None:
    if not ctx.can_set_target:
        raise Skipped("needs --target-hook to change the target at runtime")
    await ctx.set_target(T)
    g = await ctx.vmw(start=True)
    expect_status(await g.command(C.VMCI_DOORBELL_SET, 1, 2), S.SUCCESS, "DOORBELL_SET")
    await g.post_event_buffer(0)
    await trio.sleep(0.05)
    g.eventq.drain_call()
    await ctx.set_target(T + 8)
    with trio.fail_after(3):
        while not (events := await g.events()):
            await trio.sleep(0.01)
    used, data = events[0]
    expect_eq(used.len, vmw.EVENT_SIZE, "event used length")
    expect_eq(vmw.parse_event(data), vmw.EventKind.TARGET_CHANGED, "event kind")
    expect(g.eventq.drain_call() or g.eventq.calls_seen, "eventq call fd not signalled")
    # no buffer available: remembered, delivered when one arrives
    await ctx.set_target(T + 16)
    await trio.sleep(0.1)
    await g.post_event_buffer(1)
    with trio.fail_after(3):
        while not (events := await g.events()):
            await trio.sleep(0.01)
    expect_eq(vmw.parse_event(events[0][1]), vmw.EventKind.TARGET_CHANGED, "late event kind")


@case(
    "vmw.doorbell-unregister",
    "PROTOCOL.md §3 L124; §5 L160-161",
    "DOORBELL_SET(0xffffffff, 0xffffffff) unregisters: a target change then posts no event",
    devices=VMW,
    needs=(Need.TARGET_CHANGE,),
)
async def vmw_doorbell_unregister(ctx: Context) -> None:
    if not ctx.can_set_target:
        raise Skipped("needs --target-hook to change the target at runtime")
    await ctx.set_target(T)
    g = await ctx.vmw(start=True)
    expect_status(await g.command(C.VMCI_DOORBELL_SET, 1, 2), S.SUCCESS, "DOORBELL_SET")
    inv = vmw.VMCI_INVALID_ID
    expect_status(await g.command(C.VMCI_DOORBELL_SET, inv, inv), S.SUCCESS, "unregister")
    await g.post_event_buffer(0)
    await ctx.set_target(T + 8)
    await trio.sleep(0.3)
    expect(not await g.events(), "an event was delivered after unregistering")
    expect_eq((await g.command(C.GET_TARGET)).result, T + 8, "polled target")


# =====================================================================================
# Hostile rings (PROTOCOL.md §2 L57-58; anchors A.10)


async def _raw_chain(
    g: VmwGuest, descs: dict[int, tuple[int, int, int, int]], head: int = 0
) -> list[int]:
    """Post raw descriptors, kick, return the used lengths that came back (maybe none)."""
    free = g.cmdq.ring._free
    base = free[0] if head == 0 and free else head
    shifted = {base + (i - head) if i >= 0 else i: row for i, row in descs.items()}
    fixed = {}
    for i, (addr, ln, fl, nxt) in shifted.items():
        fixed[i] = (addr, ln, fl, base + (nxt - head) if fl & vq.DescFlag.NEXT else nxt)
    await g.cmdq.ring.post_raw(base, fixed)
    used = await g.fe.settle(g.cmdq, 0.15)
    return [u.len for u in used]


async def _survives(ctx: Context, g: VmwGuest, what: str) -> None:
    if not await g.fe.chan.is_closed(0.05):
        # the same connection may legitimately have given up on this ring; only a fresh
        # connection is owed service
        pass
    await ctx.still_serving(what)


@case(
    "ring.oversized-descriptor",
    "PROTOCOL.md §2 L57-58; A.10 (CH cfec13077, FC ed96b50d2)",
    "a readable descriptor of length 0xffffffff is not followed (used length 0 or "
    "ERROR_CMD_INVALID); the device goes on serving",
    devices=VMW,
    needs=(Need.VHOST_USER, Need.RAW_RING),
)
async def ring_oversized(ctx: Context) -> None:
    g = await ctx.vmw(start=True)
    req = slot_gpa(0, 50)
    await g.fe.mem.write(req, vmw.Request(C.GET_TARGET).build())
    W = int(vq.DescFlag.WRITE)
    N = int(vq.DescFlag.NEXT)
    lens = await _raw_chain(g, {0: (req, 0xFFFF_FFFF, N, 1), 1: (req + 32, 24, W, 0)})
    expect(all(n in (0, 24) for n in lens), f"used lengths {lens}")
    if lens and lens[0] == 24:
        st = vmw.Response.parse(await g.fe.mem.read(req + 32, 24)).status
        expect_eq(st, S.ERROR_CMD_INVALID, "status for an oversized request")
    await _survives(ctx, g, "an oversized descriptor")


@case(
    "ring.writable-where-readable",
    "PROTOCOL.md §2 L32-33, L54-56; A.10 (CH c1b5b18d9)",
    "a request placed in a device-writable descriptor is not read as a request: "
    "ERROR_CMD_INVALID (or used length 0), never executed",
    devices=VMW,
    target=T,
    needs=(Need.VHOST_USER, Need.RAW_RING),
)
async def ring_writable(ctx: Context) -> None:
    g = await _handshake_vmw(ctx, T)
    req = slot_gpa(0, 51)
    await g.fe.mem.write(req, vmw.Request(C.LOCK, _pfn(20)).build())
    W, N = int(vq.DescFlag.WRITE), int(vq.DescFlag.NEXT)
    lens = await _raw_chain(g, {0: (req, 24, W | N, 1), 1: (req + 32, 24, W, 0)})
    expect(len(lens) == 1, f"chain not completed ({lens})")
    expect_status(await g.command(C.UNLOCK, _pfn(20)), S.ERROR_PPN_UNLOCKED, "page was not locked")


@case(
    "ring.address-overflow",
    "PROTOCOL.md §1 L26-28, §2 L57-58; A.10 (CH c1b5b18d9)",
    "descriptors at 0xffff_ffff_ffff_f000 (addr + len wraps) and beyond RAM are completed with "
    "used length 0; the device goes on serving",
    devices=VMW,
    needs=(Need.VHOST_USER, Need.RAW_RING),
)
async def ring_overflow(ctx: Context) -> None:
    g = await ctx.vmw(start=True)
    W, N = int(vq.DescFlag.WRITE), int(vq.DescFlag.NEXT)
    resp = slot_gpa(0, 52)
    for addr in (0xFFFF_FFFF_FFFF_F000, g.fe.ram.size + PAGE, g.fe.ram.size - 8):
        lens = await _raw_chain(g, {0: (addr, 0x2000 if addr > 1 << 40 else 24, N, 1),
                                    1: (resp, 24, W, 0)})  # fmt: skip
        expect(all(n == 0 for n in lens), f"request at {addr:#x}: used lengths {lens}")
    await _survives(ctx, g, "overflowing descriptor addresses")


@case(
    "ring.descriptor-loop",
    "PROTOCOL.md §2 L57-58 (loop)",
    "a chain that loops on itself is completed with used length 0 (not followed forever)",
    devices=VMW,
    needs=(Need.VHOST_USER, Need.RAW_RING),
)
async def ring_loop(ctx: Context) -> None:
    g = await ctx.vmw(start=True)
    req = slot_gpa(0, 53)
    await g.fe.mem.write(req, vmw.Request(C.GET_TARGET).build())
    N = int(vq.DescFlag.NEXT)
    lens = await _raw_chain(g, {0: (req, 8, N, 1), 1: (req + 8, 8, N, 0)})
    expect(all(n == 0 for n in lens), f"looping chain: used lengths {lens}")
    await _survives(ctx, g, "a looping chain")


@case(
    "ring.bad-indirect",
    "PROTOCOL.md §2 L34, L57-58; ref §5.3",
    "an indirect table whose length is not a multiple of 16, or nested INDIRECT, is not "
    "followed; the device goes on serving",
    devices=VMW,
    needs=(Need.VHOST_USER, Need.RAW_RING),
)
async def ring_bad_indirect(ctx: Context) -> None:
    g = await ctx.vmw(start=True)
    req = slot_gpa(0, 54)
    await g.fe.mem.write(req, vmw.Request(C.GET_TARGET).build())
    I = int(vq.DescFlag.INDIRECT)  # noqa: E741
    from guest_driver.virtq import build_descriptors

    await g.fe.mem.write(INDIRECT, build_descriptors([(INDIRECT, 32, I, 0), (req, 24, 0, 0)]))
    for row in [(INDIRECT, 20, I, 0), (INDIRECT, 16, I, 0), (INDIRECT, 0, I, 0)]:
        lens = await _raw_chain(g, {0: row})
        expect(all(n == 0 for n in lens), f"indirect {row}: used lengths {lens}")
    await _survives(ctx, g, "bad indirect tables")


@case(
    "ring.head-and-index-out-of-range",
    "PROTOCOL.md §2 L57-58; ref §5.2 (head >= Q, avail.idx jump > Q)",
    "an avail head >= queue size and an avail.idx that jumps by more than the queue size do "
    "not crash the device",
    devices=VMW,
    needs=(Need.VHOST_USER, Need.RAW_RING),
)
async def ring_head(ctx: Context) -> None:
    g = await ctx.vmw(start=True)
    await g.cmdq.ring.post_raw(0x1234, {})
    await g.fe.settle(g.cmdq, 0.1)
    await _survives(ctx, g, "an out-of-range head")
    g2 = await ctx.vmw(start=True)
    await g2.cmdq.ring.publish_avail_idx(g2.cmdq.ring.avail_idx + 1000)
    g2.cmdq.kick_now()
    await trio.sleep(0.1)
    await _survives(ctx, g2, "avail.idx jumping by 1000")


@case(
    "ring.duplicate-buffer",
    "PROTOCOL.md §2 L32-34; A.10 (FC 326fc46db, duplicate buffers)",
    "the same head made available twice is answered (or refused) without corrupting the "
    "device: the next command is served",
    devices=VMW,
    needs=(Need.VHOST_USER, Need.RAW_RING),
)
async def ring_duplicate(ctx: Context) -> None:
    g = await ctx.vmw(start=True)
    req = slot_gpa(0, 55)
    await g.fe.mem.write(req, vmw.Request(C.GET_TARGET).build())
    W, N = int(vq.DescFlag.WRITE), int(vq.DescFlag.NEXT)
    head = g.cmdq.ring._free[0]
    await g.cmdq.ring.post_raw(head, {head: (req, 24, N, head + 1), head + 1: (req + 32, 24, W, 0)})
    await g.cmdq.ring.post_raw(head, {})
    lens = await _raw_chain(g, {})
    expect(all(n in (0, 24) for n in lens), f"used lengths {lens}")
    await _survives(ctx, g, "a duplicated head")


# =====================================================================================
# virtio-balloon personality (reference §6; anchors A.10)


@case(
    "vb.config-and-features",
    "ref §6.2-§6.3 (config num_pages/actual, le32)",
    "device features include STATS_VQ and no transport bits in 0..23 beyond balloon ones; "
    "GET_CONFIG returns exactly the requested 8 bytes",
    devices=VB,
)
async def vb_config(ctx: Context) -> None:
    b = await ctx.balloon()
    fe = b.fe
    expect(fe.features & vb.Feature.STATS_VQ, f"features {fe.features:#x} lack STATS_VQ")
    if not fe.acked_protocol & PF.CONFIG:
        raise Skipped("CONFIG not offered")
    data = await fe.get_config(0, 8)
    expect_eq(len(data), 8, "GET_CONFIG size")


@case(
    "vb.num-pages-is-target",
    "ref §6.3-§6.4, §6.9; A.10 (FC test_api_balloon: target > RAM, u32 overflow)",
    "num_pages equals the operator target; a target above 2^32 pages does not wrap",
    devices=VB,
    target=T,
)
async def vb_num_pages(ctx: Context) -> None:
    await ctx.need_target(T)
    b = await ctx.balloon()
    num_pages, _ = await b.config()
    expect_eq(num_pages, T, "num_pages")
    if not ctx.can_set_target:
        return
    if await ctx.try_set_target((1 << 32) + 5) is not None:
        return  # the operator side refused a target beyond RAM: nothing can wrap
    num_pages, _ = await b.config()
    expect(num_pages != 5, "num_pages wrapped modulo 2^32 (target 2^32 + 5 read as 5)")


@case(
    "vb.inflate-reclaims",
    "PROTOCOL.md §6 L167-169 (same reclaim for both personalities); ref §6.4; A.10 (CH "
    "ff78eb8fb: used length 0)",
    "inflating 512 resident pages uses the buffer with length 0 and frees them in the RAM file; "
    "deflated pages read back as zeros",
    devices=VB,
)
async def vb_inflate(ctx: Context) -> None:
    b = await ctx.balloon()
    n = 512
    touch(b.fe.ram, _pfn(), n)
    before = b.fe.ram.allocated_bytes()
    for k in range(0, n, 256):
        used = await b.inflate([_pfn(k + i) for i in range(256)])
        expect_eq(used.len, 0, "inflate used length")
    freed = before - b.fe.ram.allocated_bytes()
    expect(freed >= n * PAGE, f"RAM file shrank by {freed} bytes, expected >= {n * PAGE}")
    used = await b.deflate([_pfn(i) for i in range(4)])
    expect_eq(used.len, 0, "deflate used length")
    expect(b.fe.ram.read(_pfn() * PAGE, PAGE) == bytes(PAGE), "deflated page not zeros")


@case(
    "vb.pfns-split-across-descriptors",
    "ref §6.4 (all readable descriptors, trailing fragment ignored); A.10 (CH 52db3f865)",
    "PFNs spread over chained descriptors (one split mid-PFN) are all inflated",
    devices=VB,
)
async def vb_split(ctx: Context) -> None:
    b = await ctx.balloon()
    pfns = [_pfn(100 + i) for i in range(6)]
    touch(b.fe.ram, pfns[0], 6)
    before = b.fe.ram.allocated_bytes()
    data = struct.pack("<6I", *pfns)
    gpa = 0x60000
    await b.fe.mem.write(gpa, data)
    q = b.fe.queues[0]
    await q.ring.add([Buffer(gpa, 6), Buffer(gpa + 6, 10), Buffer(gpa + 16, 8)])
    (used,) = await b.fe.wait_used(q)
    expect_eq(used.len, 0, "used length")
    freed = before - b.fe.ram.allocated_bytes()
    expect(freed >= 6 * PAGE, f"freed {freed} bytes, expected 6 pages")


@case(
    "vb.hostile-inflate",
    "PROTOCOL.md §1 L26-28; A.10 (CH c1b5b18d9: writable buffer, unaligned length, unmapped "
    "PFN; CH cfec13077: oversized)",
    "PFNs outside RAM, a writable inflate buffer, a 7-byte buffer and an oversized descriptor "
    "are all used (length 0) without effect or crash",
    devices=VB,
)
async def vb_hostile(ctx: Context) -> None:
    b = await ctx.balloon()
    end = b.fe.ram.size // PAGE
    used = await b.inflate([end, end + 1, 0xFFFF_FFFF])
    expect_eq(used.len, 0, "outside-RAM inflate used length")
    touch(b.fe.ram, _pfn(200), 1)
    before = b.fe.ram.allocated_bytes()
    used = await b.pfns(0, [_pfn(200)], write=True)
    expect_eq(b.fe.ram.allocated_bytes(), before, "a writable inflate buffer was reclaimed")
    gpa = 0x61000
    await b.fe.mem.write(gpa, struct.pack("<I", _pfn(201)) + b"\1\2\3")
    q = b.fe.queues[0]
    await q.ring.add([Buffer(gpa, 7)])
    await b.fe.wait_used(q)
    head = q.ring._free[0]
    await q.ring.post_raw(head, {head: (gpa, 0xFFFF_FFFF, 0, 0)})
    await b.fe.settle(q, 0.1)
    await ctx.still_serving("hostile inflate buffers")


@case(
    "vb.stats-unknown-tags-and-duplicates",
    "ref §6.5 (unknown tags MUST be ignored; one buffer outstanding); A.10 (FC #5516, FC "
    "326fc46db)",
    "a stats buffer with tags 0-15, 99 and 0xffff, then a second buffer while one is held, "
    "do not break the device",
    devices=VB,
)
async def vb_stats(ctx: Context) -> None:
    b = await ctx.balloon()
    entries = [(t, 1000 + t) for t in range(16)] + [(99, 1), (0xFFFF, 2)]
    await b.post_stats(entries)
    await trio.sleep(0.05)
    await b.post_stats(entries[:3], gpa=0xB1000)
    await trio.sleep(0.05)
    used = await b.inflate([_pfn(300)])
    expect_eq(used.len, 0, "inflate after stats")
    await ctx.still_serving("odd stats buffers")


@case(
    "vb.bogus-actual",
    "ref §6.3 (actual written by the driver), §1.5 SET_CONFIG; A.10 (CH 65073259c: actual > RAM)",
    "SET_CONFIG with actual = 0xffffffff (more than RAM) is harmless; a write to num_pages does "
    "not change the target",
    devices=VB,
    target=T,
)
async def vb_actual(ctx: Context) -> None:
    await ctx.need_target(T)
    b = await ctx.balloon()
    if not b.fe.acked_protocol & PF.CONFIG:
        raise Skipped("CONFIG not offered")
    await b.fe.set_config(4, struct.pack("<I", 0xFFFF_FFFF))
    await b.fe.set_config(0, struct.pack("<I", 7))
    num_pages, _actual = await b.config()
    expect_eq(num_pages, T, "num_pages after the driver wrote it")
    await ctx.still_serving("a bogus actual")


@case(
    "vb.queue-index-optional-off",
    "ref §6.1 (queue-index pitfall); A.10 (QEMU #3188)",
    "without STATS_VQ negotiated, only inflate/deflate are set up and served; a front-end that "
    "configures queue 3/4 anyway does not crash the device",
    devices=VB,
)
async def vb_queue_index(ctx: Context) -> None:
    b = await ctx.balloon(stats=False, device_features=0)
    used = await b.inflate([_pfn(400)])
    expect_eq(used.len, 0, "inflate without STATS_VQ")
    fe = b.fe
    for idx in (3, 4):
        try:
            await fe.ack(R.SET_VRING_NUM, vring_state(idx, 64))
        except BackendHungUp:
            break
    await ctx.still_serving("rings configured beyond the negotiated queues")


def select(device: str, pattern: str | None = None) -> list[Case]:
    import fnmatch

    out = [c for c in CASES if device in c.devices]
    if pattern:
        pats = [p.strip() for p in pattern.split(",") if p.strip()]
        out = [c for c in out if any(fnmatch.fnmatch(c.name, p) or p in c.name for p in pats)]
    return out


__all__ = ["CASES", "Case", "CaseFailed", "Skipped", "select"]
