"""Fuzz target ``device``: the sans-I/O vmmemctl model driven by command sequences.

The input bytes decide a guest RAM layout, the supported capabilities and the initial
target, then a sequence of steps: mostly well-formed commands whose PFNs come from a pool of
interesting values (recently locked pages, 2 MiB-aligned frames, region edges, outside RAM,
beyond 2^32), with mutations (reserved bits, stale statuses, wrong counts, raw frames), and
operator actions (target, reset, pinning, shutdown).

After every step the oracle checks, against an independent, one-entry-at-a-time reference
written from docs/PROTOCOL.md (§3-§6) and the model's documented decisions:

* the response status is the one the reference predicts (so always legal for the state),
  ``result`` / ``capabilities`` / ``reserved`` are right for the command;
* per-entry batch statuses are the reference's, and the PFN and reserved bits are untouched;
* the locked pages equal the reference's, ``size`` equals locked 4 KiB + 512 x locked 2 MiB,
  nothing is locked outside RAM, 4 KiB and 2 MiB pages never overlap;
* ``Reclaim`` effects name exactly the newly locked pages, coalesced and sorted;
* the model touched guest RAM only at the batch page, never a locked page.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from lab.fuzz.corpus import Draw, Finding
from protocol import vmw
from protocol.units import PAGE_SIZE
from protocol.vmw import Capability as Cap
from protocol.vmw import Command as C
from protocol.vmw import Status as S
from vdev.balloon import BalloonModel, DoorbellEvent, Forget, Reclaim
from vdev.ram import BytearrayRam

INSTRUMENT = ("vdev.balloon", "vdev.pagemap", "vdev.ram", "protocol.vmw")
PAGE = PAGE_SIZE
HUGE = vmw.PAGES_PER_2M
MAX_STEPS = 40


@dataclass
class Ref:
    """The reference: sets of locked pages, and the rules applied one entry at a time."""

    regions: list[tuple[int, int]]  # (first pfn, end pfn)
    supported: int
    target: int
    locked4: set[int] = field(default_factory=set)
    locked2: set[int] = field(default_factory=set)  # 2 MiB frame numbers (pfn >> 9)
    pinned: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    caps: int = 0
    reset: bool = True
    busy: bool = False
    hint: int | None = None
    doorbell: tuple[int, int] | None = None

    @property
    def ram_pages(self) -> int:
        return sum(e - s for s, e in self.regions)

    @property
    def size(self) -> int:
        return len(self.locked4) + HUGE * len(self.locked2)

    def reported(self) -> int:
        value = self.target
        if self.hint is not None:
            value = min(value, self.hint)
        value = min(value, self.ram_pages)
        if not self.caps & Cap.BIT64_TARGET:
            value = min(value, vmw.U32_MAX)
        return value

    def in_ram(self, pfn: int, n: int) -> bool:
        return any(s <= pfn and pfn + n <= e for s, e in self.regions)

    def covered(self, pfn: int) -> bool:
        return pfn in self.locked4 or pfn >> 9 in self.locked2

    def is_pinned(self, pfn: int, n: int, batch: int | None) -> bool:
        if batch is not None and pfn <= batch < pfn + n:
            return True
        return any(s < pfn + n and pfn < s + c for spans in self.pinned.values() for s, c in spans)

    def forget(self) -> None:
        self.locked4.clear()
        self.locked2.clear()

    def entry(self, lock: bool, huge: bool, pfn: int, reserved: bool, batch: int | None) -> S:
        n = HUGE if huge else 1
        if reserved or not self.in_ram(pfn, n) or (huge and pfn % HUGE):
            return S.ERROR_PPN_INVALID
        frame = pfn >> 9
        if lock:
            if self.is_pinned(pfn, n, batch):
                return S.ERROR_PPN_PINNED
            if huge:
                present = frame in self.locked2 or any(p >> 9 == frame for p in self.locked4)
            else:
                present = self.covered(pfn)
            if present:
                return S.ERROR_PPN_LOCKED
            if self.size >= self.reported():
                return S.ERROR_PPN_NOTNEEDED
            (self.locked2.add(frame) if huge else self.locked4.add(pfn))
            return S.SUCCESS
        present = frame in self.locked2 if huge else pfn in self.locked4
        if not present:
            return S.ERROR_PPN_UNLOCKED
        (self.locked2.discard(frame) if huge else self.locked4.discard(pfn))
        return S.SUCCESS


def _required(cmd: int) -> int:
    c = C.lookup(cmd)
    return -1 if c is None else int(vmw.required_capabilities(c))


@dataclass
class World:
    model: BalloonModel
    ram: BytearrayRam
    ref: Ref
    pool: list[int]
    batch_pfns: list[int]
    log: list[str] = field(default_factory=list)


def _make_world(d: Draw) -> World:
    size0 = d.between(2, 48) * (1 << 20) + d.below(8) * PAGE  # not always 2 MiB-multiple
    regions = [(0, size0)]
    if d.chance(1, 2):
        gpa1 = (1 << 32) + d.below(4) * PAGE + d.below(2) * (1 << 21)
        regions.append((gpa1, d.between(1, 8) * (1 << 20) + d.below(4) * PAGE))
    supported = int(vmw.ALL_CAPABILITIES) if d.chance(3, 4) else d.u8() & 0x3F
    target = d.choice([0, 1, 8, 511, 512, 600, 4096, 1 << 20, (1 << 32) + 3])
    ram = BytearrayRam(regions, record=True)
    model = BalloonModel(supported=Cap(supported), target=target)
    pfn_regions = [(g >> 12, (g + s) >> 12) for g, s in regions]
    ref = Ref(pfn_regions, supported & int(vmw.ALL_CAPABILITIES), target)
    pool = []
    for s, e in pfn_regions:
        pool += [s, s + 1, e - 1, e, e + HUGE, (s + HUGE - 1) // HUGE * HUGE, e - HUGE, s + 700]
    pool += [0x1_0000_0000, (1 << 52) - 1, 0xFFFF_FFFF]
    batch_pfns = [3, pfn_regions[0][1] - 1, pfn_regions[-1][0], pfn_regions[0][1], 1 << 40]
    return World(model, ram, ref, pool, batch_pfns)


def _pfn(d: Draw, w: World, huge: bool = False) -> int:
    k = d.below(8)
    if k < 3 and w.pool:
        pfn = d.choice(w.pool)
    elif k < 5:
        s, e = d.choice(w.ref.regions)
        pfn = s + d.below(max(1, e - s))
    elif k < 6:
        pfn = d.choice([*w.ref.locked4, *(f * HUGE for f in w.ref.locked2)] or [0])
    else:
        pfn = d.u32() if d.chance(1, 4) else d.below(1 << 16)
    if huge and d.chance(7, 8):
        pfn -= pfn % HUGE
    return pfn


# --------------------------------------------------------------------------------------
# steps


def _expect(cond: object, w: World, msg: str) -> None:
    if not cond:
        trail = "; ".join(w.log[-6:])
        raise Finding(f"{msg} [after: {trail}]")


def _command(d: Draw, w: World) -> None:
    ref, _model = w.ref, w.model
    weights = [C.START] * 2 + [C.GET_TARGET, C.GUEST_ID, C.VMCI_DOORBELL_SET] + [C.LOCK] * 4
    weights += [C.UNLOCK] * 3 + [C.BATCHED_LOCK] * 4 + [C.BATCHED_UNLOCK] * 2
    weights += [C.BATCHED_2M_LOCK] * 2 + [C.BATCHED_2M_UNLOCK]
    cmd: int = d.choice(weights)
    if d.chance(1, 32):
        cmd = d.choice([5, 11, 0xFFFF_FFFF, d.u32()])
    arg1 = arg2 = 0
    entries: list[int] = []
    batch_pfn: int | None = None
    huge = cmd in (C.BATCHED_2M_LOCK, C.BATCHED_2M_UNLOCK)
    if cmd == C.START:
        arg1 = int(vmw.ALL_CAPABILITIES) if d.chance(2, 3) else d.u8() & 0x3F
    elif cmd == C.GET_TARGET:
        arg1 = d.choice([0, ref.ram_pages, 1, 100, 1 << 33])
    elif cmd == C.GUEST_ID:
        arg1 = d.below(9)
    elif cmd == C.VMCI_DOORBELL_SET:
        arg1, arg2 = (vmw.VMCI_INVALID_ID,) * 2 if d.chance(1, 3) else (d.u32(), d.u32())
    elif cmd in (C.LOCK, C.UNLOCK):
        arg1 = _pfn(d, w) if d.chance(7, 8) else d.u64()
    elif cmd in (C.BATCHED_LOCK, C.BATCHED_UNLOCK, C.BATCHED_2M_LOCK, C.BATCHED_2M_UNLOCK):
        batch_pfn = d.choice(w.batch_pfns) if d.chance(7, 8) else _pfn(d, w)
        n = d.between(1, 12) if d.chance(7, 8) else d.choice([0, 512, 513, d.below(600)])
        for _ in range(min(n, 512)):
            e = _pfn(d, w, huge) << vmw.ENTRY_PFN_SHIFT
            if d.chance(1, 16):
                e |= d.below(1 << 7) << 5  # reserved bits
            if d.chance(1, 8):
                e |= d.below(32)  # stale status bits
            entries.append(e & 0xFFFF_FFFF_FFFF_FFFF)
        arg1, arg2 = batch_pfn, n
        if ref.in_ram(batch_pfn, 1) and entries:
            w.ram.write(batch_pfn * PAGE, np.array(entries, dtype="<u8").tobytes())
    if d.chance(1, 64):
        arg2 = d.u64()
    _run_command(w, vmw.Request(cmd, arg1 & (2**64 - 1), arg2 & (2**64 - 1)), entries, batch_pfn)


def _run_command(w: World, req: vmw.Request, entries: list[int], batch_pfn: int | None) -> None:
    ref, model, ram = w.ref, w.model, w.ram
    w.log.append(f"cmd {req.command} {req.arg1:#x} {req.arg2:#x} n={len(entries)}")
    before4, before2 = set(ref.locked4), set(ref.locked2)
    ram.accesses.clear()
    outcome = model.handle(req, ram)
    resp = outcome.response
    cmd = C.lookup(req.command)
    # -- what the reference expects --------------------------------------------------
    want_entries: list[int] | None = None
    caps_field = 0
    if ref.busy:
        want = S.ERROR_BUSY
    elif ref.reset and cmd is not C.START:
        want = S.ERROR_RESET
    elif cmd is None or _required(req.command) & ~ref.caps:
        want = S.ERROR_CMD_INVALID
    elif cmd is C.START:
        ref.forget()
        ref.caps = req.arg1 & ref.supported & ~1
        ref.reset = False
        ref.doorbell = None
        ref.hint = None
        want = S.SUCCESS_WITH_CAPABILITIES
        caps_field = ref.caps
    elif cmd is C.GET_TARGET:
        ref.hint = req.arg1 or None
        want = S.SUCCESS
    elif cmd is C.GUEST_ID:
        want = S.SUCCESS
    elif cmd is C.VMCI_DOORBELL_SET:
        invalid = req.arg1 == req.arg2 == vmw.VMCI_INVALID_ID
        ref.doorbell = None if invalid else (req.arg1, req.arg2)
        want = S.SUCCESS
    elif cmd in (C.LOCK, C.UNLOCK):
        if not ref.caps & Cap.BIT64_TARGET and req.arg1 > vmw.U32_MAX:
            want = S.ERROR_PPN_INVALID
        else:
            want = ref.entry(cmd is C.LOCK, False, req.arg1, False, None)
    else:
        lock = cmd in (C.BATCHED_LOCK, C.BATCHED_2M_LOCK)
        huge = cmd in (C.BATCHED_2M_LOCK, C.BATCHED_2M_UNLOCK)
        page = req.arg1
        if (
            not 1 <= req.arg2 <= vmw.BATCH_MAX_ENTRIES
            or not ref.in_ram(page, 1)
            or ref.covered(page)
        ):
            want = S.ERROR_CMD_INVALID
        else:
            raw = ram._pages.get(page)
            data = bytes(raw) if raw is not None else bytes(PAGE)
            current = np.frombuffer(data, "<u8", req.arg2)
            want_entries = []
            for e in (int(x) for x in current):
                st = ref.entry(lock, huge, e >> 12, bool(e & vmw.ENTRY_RESERVED_MASK), page)
                want_entries.append((e & ~0x1F) | int(st))
            want = S.SUCCESS
    # -- compare ---------------------------------------------------------------------
    _expect(resp.status == want, w, f"status {resp.status:#x}, reference says {want.name}")
    target_carrying = cmd in vmw.TARGET_CARRYING
    if target_carrying:
        _expect(resp.result == ref.reported(), w, f"result {resp.result} != {ref.reported()}")
        if not ref.caps & Cap.BIT64_TARGET:
            _expect(resp.result <= vmw.U32_MAX, w, "32-bit guest got a 64-bit target")
    else:
        _expect(resp.result == 0, w, f"result {resp.result} on a non-target command")
    _expect(resp.capabilities == caps_field, w, f"capabilities field {resp.capabilities:#x}")
    _expect(resp.reserved == 0, w, "reserved response field")
    if want_entries is not None:
        page_now = ram.read(req.arg1 * PAGE, 8 * req.arg2)
        got = [int(x) for x in np.frombuffer(page_now, "<u8")]
        _expect(got == want_entries, w, f"batch entries {got[:4]} != reference {want_entries[:4]}")
    # -- effects and memory accesses -------------------------------------------------
    new4 = ref.locked4 - before4
    new2 = ref.locked2 - before2
    reclaimed: list[tuple[int, int]] = []
    for eff in outcome.effects:
        if isinstance(eff, Reclaim):
            reclaimed += eff.runs()
        else:
            _expect(isinstance(eff, (Forget, DoorbellEvent)), w, f"unknown effect {eff!r}")
    expect_pages = set(new4) | {p for f in new2 for p in range(f * HUGE, f * HUGE + HUGE)}
    got_pages = {p for s, c in reclaimed for p in range(s, s + c)}
    _expect(got_pages == expect_pages, w, f"reclaimed {sorted(got_pages)[:4]}.. != newly locked")
    starts = [s for s, _ in reclaimed]
    _expect(starts == sorted(starts), w, "reclaim runs not sorted")
    for (s1, c1), (s2, _) in itertools.pairwise(reclaimed):
        _expect(s1 + c1 < s2, w, f"reclaim runs not coalesced: {reclaimed[:4]}")
    for kind, gpa, length in ram.accesses:
        first, last = gpa >> 12, (gpa + max(length, 1) - 1) >> 12
        _expect(batch_pfn is not None and first == last == req.arg1, w,
                f"model accessed RAM {kind} {gpa:#x}+{length} outside the batch page")  # fmt: skip
        for pfn in (first, last):
            was = pfn in before4 or pfn >> 9 in before2
            _expect(not was and not ref.covered(pfn), w, f"model touched locked page {pfn:#x}")


def _operator(d: Draw, w: World) -> None:
    ref, model = w.ref, w.model
    k = d.below(10)
    if k < 5:
        pages = d.choice([0, 1, 511, 512, 513, 4096, ref.ram_pages, ref.ram_pages + 1, 1 << 33])
        w.log.append(f"set_target {pages}")
        effects = model.set_target(pages)
        changed = pages != ref.target
        ref.target = pages
        want = changed and ref.doorbell is not None
        got = any(isinstance(e, DoorbellEvent) for e in effects)
        _expect(got == want, w, f"doorbell on target change: {got}, expected {want}")
    elif k < 7:
        w.log.append("demand_reset")
        model.demand_reset()
        ref.forget()
        ref.reset = True
    elif k < 9:
        owner = d.choice(["rings", "operator"])
        ranges = [(_pfn(d, w), d.below(600)) for _ in range(d.below(3))]
        w.log.append(f"set_pinned {owner} {ranges}")
        model.set_pinned(owner, ranges)
        cleaned = [(s, c) for s, c in ranges if c]
        if cleaned:
            ref.pinned[owner] = cleaned
        else:
            ref.pinned.pop(owner, None)
    else:
        ref.busy = not ref.busy
        w.log.append(f"shutting_down={ref.busy}")
        model.shutting_down = ref.busy


def _raw_frame(d: Draw, w: World) -> None:
    readable = d.blob(40)
    writable = d.choice([0, 23, 24, 100])
    w.log.append(f"frame {readable.hex()} w={writable}")
    before = (set(w.ref.locked4), set(w.ref.locked2))
    if len(readable) == vmw.REQUEST_SIZE and vmw.Request.parse(readable).magic == vmw.MAGIC:
        if writable < 24:
            out, effects = w.model.answer_frame(readable, writable, w.ram)
            _expect(out is None and not effects, w, "a request with < 24 writable bytes ran")
            return
        # a well-formed request: the reference runs it like any command
        req = vmw.Request.parse(readable)
        ok_cmds = (C.START, C.GET_TARGET, C.GUEST_ID, C.VMCI_DOORBELL_SET, C.LOCK, C.UNLOCK)
        if C.lookup(req.command) in ok_cmds or C.lookup(req.command) is None:
            _run_command(w, req, [], None)
        return
    out, effects = w.model.answer_frame(readable, writable, w.ram)
    if writable < 24:
        _expect(out is None, w, "a malformed frame without room was answered")
    else:
        _expect(out is not None and len(out) == 24, w, "a malformed frame got no 24-byte answer")
        assert out is not None
        _expect(vmw.Response.parse(out).status == S.ERROR_CMD_INVALID, w, "bad frame status")
    _expect(not effects and before == (w.ref.locked4, w.ref.locked2), w, "bad frame had effects")


def _invariants(w: World) -> None:
    st = w.model.state()
    l4, l2 = set(st.locked_4k), set(st.locked_2m)
    _expect(l4 == w.ref.locked4, w, f"locked 4K pages differ: model-ref {sorted(l4 - w.ref.locked4)[:4]}, ref-model {sorted(w.ref.locked4 - l4)[:4]}")  # fmt: skip
    _expect(l2 == w.ref.locked2, w, f"locked 2M frames differ: {sorted(l2)[:4]} vs {sorted(w.ref.locked2)[:4]}")  # fmt: skip
    _expect(st.size == len(l4) + HUGE * len(l2), w, f"size {st.size} != locked pages")
    _expect(w.model.size == st.size, w, "size property disagrees with state()")
    _expect(all(w.ref.in_ram(p, 1) for p in l4), w, "a locked 4K page is outside RAM")
    _expect(all(w.ref.in_ram(f * HUGE, HUGE) for f in l2), w, "a locked 2M page is outside RAM")
    _expect(not any(p >> 9 in l2 for p in l4), w, "4K and 2M locked pages overlap")
    _expect(st.reset_demanded == w.ref.reset, w, "reset_demanded differs")
    _expect(int(st.capabilities) == w.ref.caps, w, "capabilities differ")


def one_input(data: bytes) -> None:
    d = Draw(data)
    w = _make_world(d)
    steps = 0
    while d.remaining and steps < MAX_STEPS:
        steps += 1
        k = d.below(16)
        if k < 11:
            _command(d, w)
        elif k < 14:
            _operator(d, w)
        else:
            _raw_frame(d, w)
        _invariants(w)


def seeds() -> list[bytes]:
    # a START then a few locks/unlocks, in the Draw encoding (roughly; the fuzzer refines it)
    return [
        bytes([4, 0, 0, 0, 0, 0]) + bytes([0, 0, 0, 0]) * 3 + bytes(range(64)),
        bytes(8) + bytes([1, 0, 2]) * 30,
        bytes(range(256)),
    ]
