"""BalloonModel driven by random command sequences against a plain-Python reference model.

The reference processes every batch entry one at a time with Python sets; the real model
works on numpy arrays. After every step: statuses, results, effects and the whole state
agree, and the balloon invariants hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from protocol.units import PAGE_SHIFT
from protocol.vmw import (
    MAGIC,
    TARGET_CARRYING,
    U32_MAX,
    VMCI_INVALID_ID,
    Capability,
    Command,
    EventKind,
    Request,
    Status,
    batch_entries,
    entry_pfns,
    entry_reserved,
    entry_statuses,
    required_capabilities,
)
from vdev.balloon import BalloonModel, DoorbellEvent, Forget, Reclaim
from vdev.ram import BytearrayRam

MiB = 1 << 20
# PFNs 0..1023 and 2048..3071: RAM with a hole, and room for 2 MiB pages on both sides.
REGIONS = [(0, 4 * MiB), (8 * MiB, 4 * MiB)]
RAM_PAGES = 2048

pfns = st.one_of(
    st.integers(0, 3200),
    st.sampled_from([0, 511, 512, 1023, 1024, 2047, 2048, 3071, 3072, 2**32, 2**40]),
)
frames = st.one_of(
    st.integers(0, 6).map(lambda f: f * 512),
    st.sampled_from([1, 513, 2049, 2**30]),
)
batch_pages = st.sampled_from([3, 7, 1000, 2050, 1500, 3100, 2**52 - 1])
offers = st.sampled_from([0, 0x02, 0x06, 0x0E, 0x1E, 0x3E, 0x3F, 0x16])
reserved_bits = st.one_of(st.just(0), st.just(0), st.just(0), st.integers(1, 127))


@dataclass
class Reference:
    """The protocol, written the obvious way."""

    target: int = 0
    caps: int = 0
    reset: bool = True
    busy: bool = False
    hint: int | None = None
    doorbell: tuple[int, int] | None = None
    guest_type: int | None = None
    small: set[int] = field(default_factory=set)
    huge: set[int] = field(default_factory=set)  # first PFN of each locked 2 MiB page
    pins: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.small) + 512 * len(self.huge)

    def reported(self) -> int:
        value = min(self.target, RAM_PAGES)
        if self.hint is not None:
            value = min(value, self.hint)
        if not self.caps & Capability.BIT64_TARGET:
            value = min(value, U32_MAX)
        return value

    @staticmethod
    def is_ram(pfn: int, n: int) -> bool:
        return any(gpa >> 12 <= pfn and pfn + n <= (gpa + size) >> 12 for gpa, size in REGIONS)

    def in_balloon(self, pfn: int) -> bool:
        return pfn in self.small or (pfn // 512) * 512 in self.huge

    def pinned(self, pfn: int, n: int, batch: int | None) -> bool:
        spans = [s for spans in self.pins.values() for s in spans]
        if batch is not None:
            spans.append((batch, 1))
        return any(start < pfn + n and pfn < start + count for start, count in spans)

    def entry(
        self, lock: bool, huge: bool, pfn: int, reserved: int, batch: int | None
    ) -> tuple[int, list[int]]:
        """One page, as the protocol describes it. Returns (status, newly locked PFNs)."""
        n = 512 if huge else 1
        if reserved or not self.is_ram(pfn, n) or (huge and pfn % 512):
            return Status.ERROR_PPN_INVALID, []
        if lock:
            if self.pinned(pfn, n, batch):
                return Status.ERROR_PPN_PINNED, []
            if huge:
                taken = pfn in self.huge or any(p in self.small for p in range(pfn, pfn + 512))
            else:
                taken = self.in_balloon(pfn)
            if taken:
                return Status.ERROR_PPN_LOCKED, []
            if self.size >= self.reported():
                return Status.ERROR_PPN_NOTNEEDED, []
            (self.huge if huge else self.small).add(pfn)
            return Status.SUCCESS, [pfn]
        pages = self.huge if huge else self.small
        if pfn not in pages:
            return Status.ERROR_PPN_UNLOCKED, []
        pages.remove(pfn)
        return Status.SUCCESS, []

    def command(
        self, command: int, arg1: int, arg2: int, entries: list[tuple[int, int]] | None
    ) -> tuple[int, list[int] | None, list[int], list[str]]:
        """(status, per-entry statuses or None, newly locked PFNs, other effects)."""
        cmd = Command.lookup(command)
        if self.busy:
            return Status.ERROR_BUSY, None, [], []
        if self.reset and cmd is not Command.START:
            return Status.ERROR_RESET, None, [], []
        if cmd is None or required_capabilities(cmd) & ~self.caps:
            return Status.ERROR_CMD_INVALID, None, [], []
        if cmd is Command.START:
            self.small.clear()
            self.huge.clear()
            self.caps = arg1 & 0x3E
            self.reset = False
            self.doorbell = None
            self.hint = None
            return Status.SUCCESS_WITH_CAPABILITIES, None, [], ["forget"]
        if cmd is Command.GET_TARGET:
            self.hint = arg1 or None
            return Status.SUCCESS, None, [], []
        if cmd is Command.GUEST_ID:
            self.guest_type = arg1
            return Status.SUCCESS, None, [], []
        if cmd is Command.VMCI_DOORBELL_SET:
            both_invalid = (arg1, arg2) == (VMCI_INVALID_ID, VMCI_INVALID_ID)
            self.doorbell = None if both_invalid else (arg1, arg2)
            return Status.SUCCESS, None, [], []
        lock = cmd in (Command.LOCK, Command.BATCHED_LOCK, Command.BATCHED_2M_LOCK)
        if cmd in (Command.LOCK, Command.UNLOCK):
            if not self.caps & Capability.BIT64_TARGET and arg1 > U32_MAX:
                return Status.ERROR_PPN_INVALID, None, [], []
            status, new = self.entry(lock, False, arg1, 0, None)
            return status, None, new, []
        huge = cmd in (Command.BATCHED_2M_LOCK, Command.BATCHED_2M_UNLOCK)
        if not 1 <= arg2 <= 512 or not self.is_ram(arg1, 1) or self.in_balloon(arg1):
            return Status.ERROR_CMD_INVALID, None, [], []
        assert entries is not None
        statuses: list[int] = []
        locked: list[int] = []
        for pfn, reserved in entries:
            status, new = self.entry(lock, huge, pfn, reserved, arg1)
            statuses.append(status)
            locked += new
        return Status.SUCCESS, statuses, locked, []


class BalloonMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = BalloonModel(target=0)
        self.ref = Reference()
        self.ram = BytearrayRam(REGIONS)

    # ------------------------------------------------------------------ driving both

    def run(
        self,
        command: int,
        arg1: int = 0,
        arg2: int = 0,
        entries: list[tuple[int, int]] | None = None,
    ) -> None:
        page_before = None
        if entries is not None and self.ref.is_ram(arg1, 1):
            raw = np.array([p << 12 | r << 5 for p, r in entries], dtype="<u8").tobytes()
            self.ram.write(arg1 << PAGE_SHIFT, raw)
            page_before = raw
        size_before = self.ref.size
        reported_before = self.ref.reported()
        status, statuses, locked, other = self.ref.command(command, arg1, arg2, entries)
        huge = command in (Command.BATCHED_2M_LOCK, Command.BATCHED_2M_UNLOCK)

        outcome = self.model.handle(Request(command, arg1, arg2), self.ram)
        response = outcome.response
        assert response.status == status, (Command.lookup(command), arg1, arg2, entries)
        cmd = Command.lookup(command)
        expected_result = self.ref.reported() if cmd in TARGET_CARRYING else 0
        assert response.result == expected_result
        if cmd is Command.START and status == Status.SUCCESS_WITH_CAPABILITIES:
            assert response.capabilities == self.ref.caps
        else:
            assert response.capabilities == 0

        if page_before is not None:
            page = self.ram.read(arg1 << PAGE_SHIFT, len(page_before))
            original = batch_entries(page_before, len(page_before) // 8)
            written = batch_entries(page, len(page) // 8)
            # PFN and reserved bits are never changed
            assert np.array_equal(entry_pfns(written), entry_pfns(original))
            assert np.array_equal(entry_reserved(written), entry_reserved(original))
            if statuses is None:
                assert page == page_before  # not processed: untouched
            else:
                assert entry_statuses(written).tolist() == statuses
                # NOTNEEDED never while the size (as it was at that entry) was below target
                running = size_before
                for s in statuses:
                    if s == Status.ERROR_PPN_NOTNEEDED:
                        assert running >= reported_before
                    if s == Status.SUCCESS and cmd in (
                        Command.BATCHED_LOCK,
                        Command.BATCHED_2M_LOCK,
                    ):
                        running += 512 if huge else 1

        reclaimed = [e for e in outcome.effects if isinstance(e, Reclaim)]
        if locked:
            n = 512 if huge else 1
            pages = sorted(p for q in locked for p in range(q, q + n))
            (reclaim,) = reclaimed
            got = [p for s, c in reclaim.runs() for p in range(s, s + c)]
            assert got == pages
            starts = reclaim.pfn_starts
            assert np.all(
                np.diff(starts.astype(np.int64)) > reclaim.pfn_counts[:-1].astype(np.int64)
            )
        else:
            assert reclaimed == []
        forgets = [e for e in outcome.effects if isinstance(e, Forget)]
        assert len(forgets) == other.count("forget")
        assert not [e for e in outcome.effects if isinstance(e, DoorbellEvent)]

    # ------------------------------------------------------------------ guest rules

    @rule(offer=offers)
    def start(self, offer: int) -> None:
        self.run(Command.START, offer)

    @rule(hint=st.sampled_from([0, 0, 1, 100, 1500, 2048, 10**6, 2**33]))
    def get_target(self, hint: int) -> None:
        self.run(Command.GET_TARGET, hint)

    @rule(kind=st.integers(0, 9))
    def guest_id(self, kind: int) -> None:
        self.run(Command.GUEST_ID, kind)

    @rule(pfn=pfns, lock=st.booleans())
    def single(self, pfn: int, lock: bool) -> None:
        self.run(Command.LOCK if lock else Command.UNLOCK, pfn)

    @rule(
        command=st.sampled_from([Command.BATCHED_LOCK, Command.BATCHED_UNLOCK]),
        batch=batch_pages,
        entries=st.lists(st.tuples(pfns, reserved_bits), min_size=1, max_size=40),
    )
    def batched_4k(self, command: Command, batch: int, entries: list[tuple[int, int]]) -> None:
        self.run(command, batch, len(entries), entries)

    @rule(
        command=st.sampled_from([Command.BATCHED_2M_LOCK, Command.BATCHED_2M_UNLOCK]),
        batch=batch_pages,
        entries=st.lists(st.tuples(frames, reserved_bits), min_size=1, max_size=8),
    )
    def batched_2m(self, command: Command, batch: int, entries: list[tuple[int, int]]) -> None:
        self.run(command, batch, len(entries), entries)

    @rule(
        command=st.sampled_from(
            [Command.BATCHED_LOCK, Command.BATCHED_UNLOCK, Command.BATCHED_2M_LOCK]
        ),
        count=st.sampled_from([0, 513, 2**64 - 1]),
    )
    def batched_bad_count(self, command: Command, count: int) -> None:
        self.run(command, 3, count, [])

    @rule(
        ids=st.sampled_from(
            [(1, 2), (VMCI_INVALID_ID, VMCI_INVALID_ID), (VMCI_INVALID_ID, 0), (0, 0)]
        )
    )
    def doorbell_set(self, ids: tuple[int, int]) -> None:
        self.run(Command.VMCI_DOORBELL_SET, *ids)

    @rule(command=st.sampled_from([5, 11, 12, 255, U32_MAX]))
    def unknown(self, command: int) -> None:
        self.run(command, 1, 1)

    @rule()
    def wrong_magic(self) -> None:
        before = self.model.state()
        outcome = self.model.handle(Request(Command.GET_TARGET, 0, 0, MAGIC + 1), self.ram)
        assert outcome.response.status == Status.ERROR_CMD_INVALID
        assert outcome.effects == ()
        assert self.model.state() == before

    # --------------------------------------------------------------- operator rules

    @rule(pages=st.sampled_from([0, 1, 5, 40, 512, 600, 1500, 2048, 5000, 2**32 + 1]))
    def set_target(self, pages: int) -> None:
        effects = self.model.set_target(pages)
        changed = pages != self.ref.target
        self.ref.target = pages
        if changed and self.ref.doorbell is not None:
            assert effects == [DoorbellEvent(EventKind.TARGET_CHANGED)]
        else:
            assert effects == []

    @rule()
    def demand_reset(self) -> None:
        effects = self.model.demand_reset()
        expected: list[object] = [Forget()]
        if self.ref.doorbell is not None:
            expected.append(DoorbellEvent(EventKind.RESET))
        assert effects == expected
        self.ref.small.clear()
        self.ref.huge.clear()
        self.ref.reset = True

    @rule(
        owner=st.sampled_from(["ring", "operator"]),
        ranges=st.lists(st.tuples(pfns, st.integers(0, 600)), max_size=3),
    )
    def set_pinned(self, owner: str, ranges: list[tuple[int, int]]) -> None:
        self.model.set_pinned(owner, ranges)
        kept = [(s, c) for s, c in ranges if c]
        if kept:
            self.ref.pins[owner] = kept
        else:
            self.ref.pins.pop(owner, None)

    @rule(busy=st.booleans())
    def shutting_down(self, busy: bool) -> None:
        self.model.shutting_down = busy
        self.ref.busy = busy

    # ------------------------------------------------------------------ invariants

    @invariant()
    def same_state(self) -> None:
        m, r = self.model, self.ref
        small = m.pages.locked_4k().tolist()
        huge = [f * 512 for f in m.pages.locked_2m().tolist()]
        assert small == sorted(r.small)
        assert huge == sorted(r.huge)
        assert m.size == len(small) + 512 * len(huge) == r.size
        assert (m.count_4k, m.count_2m) == m.pages.recount()
        assert m.reset_demanded == r.reset
        assert int(m.capabilities) == r.caps
        assert m.doorbell == r.doorbell
        assert m.limit_hint == r.hint
        assert m.target == r.target

    @invariant()
    def balloon_is_sane(self) -> None:
        small = self.ref.small
        huge = self.ref.huge
        # no 4K page is both locked on its own and part of a locked 2M page
        assert not any((p // 512) * 512 in huge for p in small)
        # nothing locked outside RAM
        assert all(Reference.is_ram(p, 1) for p in small)
        assert all(Reference.is_ram(p, 512) and p % 512 == 0 for p in huge)


BalloonMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBalloonStateful = BalloonMachine.TestCase


def test_reference_agrees_on_a_long_deterministic_run() -> None:
    """A fixed long run with many more pages than the hypothesis runs (no shrinking)."""
    machine = BalloonMachine()
    rng = np.random.default_rng(2024)
    machine.set_target(1800)
    machine.start(0x3E)
    machine.set_pinned("ring", [(2060, 2)])
    for step in range(300):
        choice = rng.integers(0, 6)
        if choice < 2:
            entries = [(int(p), 0) for p in rng.integers(0, 3100, size=rng.integers(1, 200))]
            machine.batched_4k(
                Command.BATCHED_LOCK if choice == 0 else Command.BATCHED_UNLOCK, 7, entries
            )
        elif choice < 4:
            entries = [(int(f) * 512, 0) for f in rng.integers(0, 7, size=rng.integers(1, 6))]
            machine.batched_2m(
                Command.BATCHED_2M_LOCK if choice == 2 else Command.BATCHED_2M_UNLOCK, 3, entries
            )
        elif choice == 4:
            machine.single(int(rng.integers(0, 3100)), bool(rng.integers(0, 2)))
        else:
            machine.set_target(int(rng.integers(0, 2100)))
        if step % 50 == 49:
            machine.demand_reset()
            machine.start(0x3E)
        machine.same_state()
        machine.balloon_is_sane()
