"""vdev.balloon.BalloonModel: one table row per rule of docs/PROTOCOL.md sections 3, 4, 6."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from protocol.errors import ConfigError
from protocol.units import PAGE_SHIFT
from protocol.vmw import (
    ALL_CAPABILITIES,
    COMMAND_DEBUGFS_NAME,
    MAGIC,
    TARGET_CARRYING,
    U32_MAX,
    VMCI_INVALID_ID,
    Capability,
    Command,
    EventKind,
    GuestType,
    Request,
    Response,
    Status,
    batch_entries,
    build_batch,
    entry_pfns,
    entry_reserved,
    entry_statuses,
)
from vdev.balloon import (
    BalloonModel,
    DoorbellEvent,
    Forget,
    GuestRam,
    Outcome,
    Reclaim,
    coalesce,
)
from vdev.memory import GuestMemory
from vdev.ram import BytearrayRam

MiB = 1 << 20
# Two RAM regions with a hole: PFNs 0..16383 and 32768..49151 (32768 pages of RAM).
REGIONS = [(0, 64 * MiB), (128 * MiB, 64 * MiB)]
RAM_PAGES = 32768
LOW_END = 16384
HIGH_START, HIGH_END = 32768, 49152
BATCH_PFN = 10
C = Capability


@dataclass
class Harness:
    model: BalloonModel
    ram: BytearrayRam
    effects: list[object] = field(default_factory=list)

    def cmd(self, command: int, arg1: int = 0, arg2: int = 0, magic: int = MAGIC) -> Response:
        outcome = self.model.handle(Request(command, arg1, arg2, magic), self.ram)
        assert isinstance(outcome, Outcome)
        self.effects.extend(outcome.effects)
        return outcome.response

    def status(self, command: int, arg1: int = 0, arg2: int = 0) -> int:
        return self.cmd(command, arg1, arg2).status

    def batch(
        self,
        command: Command,
        pfns: Sequence[int],
        *,
        raw: Sequence[int] | None = None,
        batch_pfn: int = BATCH_PFN,
        count: int | None = None,
    ) -> tuple[Response, list[int]]:
        """Write a batch page, run the command, return (response, per-entry statuses)."""
        data = (
            np.asarray(raw, dtype="<u8").tobytes()
            if raw is not None
            else build_batch(np.asarray(pfns, dtype=np.uint64))
        )
        n = len(data) // 8
        if n:
            self.ram.write(batch_pfn << PAGE_SHIFT, data)
        response = self.cmd(command, batch_pfn, n if count is None else count)
        if not n:
            return response, []
        page = self.ram.read(batch_pfn << PAGE_SHIFT, n * 8)
        return response, entry_statuses(batch_entries(page, n)).tolist()

    def lock(self, *pfns: int) -> list[int]:
        response, statuses = self.batch(Command.BATCHED_LOCK, pfns)
        assert response.status == Status.SUCCESS
        return statuses

    def lock2m(self, *pfns: int) -> list[int]:
        response, statuses = self.batch(Command.BATCHED_2M_LOCK, pfns)
        assert response.status == Status.SUCCESS
        return statuses


def harness(
    *,
    caps: int = int(ALL_CAPABILITIES),
    target: int = 10_000,
    supported: Capability = ALL_CAPABILITIES,
    regions: Sequence[tuple[int, int]] = REGIONS,
    start: bool = True,
) -> Harness:
    h = Harness(BalloonModel(supported=supported, target=target), BytearrayRam(regions))
    if start:
        assert h.status(Command.START, caps) == Status.SUCCESS_WITH_CAPABILITIES
        h.effects.clear()
    return h


def test_guest_ram_protocol_is_satisfied() -> None:
    ram: GuestRam = BytearrayRam(REGIONS)
    assert ram.total_pages == RAM_PAGES


def _static_check_guest_memory(memory: GuestMemory) -> GuestRam:
    """mypy checks that the mmap-backed GuestMemory satisfies the GuestRam protocol."""
    return memory


# ---------------------------------------------------------------------------------------
# One scenario per status rule: each returns the status the model gave.

Scenario = Callable[[], int]
SCENARIOS: list[tuple[str, Scenario, Status]] = []


def scenario(expected: Status) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS.append((fn.__name__, fn, expected))
        return fn

    return register


# SUCCESS -------------------------------------------------------------------------------
@scenario(Status.SUCCESS)
def lock_one_page() -> int:
    return harness().status(Command.LOCK, 100)


@scenario(Status.SUCCESS)
def unlock_a_locked_page() -> int:
    h = harness()
    h.status(Command.LOCK, 100)
    return h.status(Command.UNLOCK, 100)


@scenario(Status.SUCCESS)
def batch_lock_entry() -> int:
    return harness().lock(200)[0]


@scenario(Status.SUCCESS)
def batch_lock_in_high_region() -> int:
    return harness().lock(HIGH_END - 1)[0]


@scenario(Status.SUCCESS)
def batch_2m_lock_entry() -> int:
    return harness().lock2m(HIGH_START)[0]


@scenario(Status.SUCCESS)
def batch_2m_unlock_entry() -> int:
    h = harness()
    h.lock2m(1024)
    return h.batch(Command.BATCHED_2M_UNLOCK, [1024])[1][0]


@scenario(Status.SUCCESS)
def batch_unlock_entry() -> int:
    h = harness()
    h.lock(300)
    return h.batch(Command.BATCHED_UNLOCK, [300])[1][0]


@scenario(Status.SUCCESS)
def get_target() -> int:
    return harness().status(Command.GET_TARGET, RAM_PAGES)


@scenario(Status.SUCCESS)
def guest_id() -> int:
    return harness().status(Command.GUEST_ID, 1)


@scenario(Status.SUCCESS)
def doorbell_set() -> int:
    return harness().status(Command.VMCI_DOORBELL_SET, 7, 8)


@scenario(Status.SUCCESS)
def batch_command_with_failing_entries_is_success() -> int:
    return harness(target=0).batch(Command.BATCHED_LOCK, [100, LOW_END])[0].status


@scenario(Status.ERROR_PPN_NOTNEEDED)
def lock_pfn_above_4g_with_64bit_target() -> int:
    # NOTNEEDED (target 0), not INVALID: the PFN passed validation. (Actually locking a
    # PFN >= 2^32 would need a 512 MiB page map: one bit per page up to that PFN.)
    h = harness(regions=[(0, 1 << 45)], target=0)
    return h.status(Command.LOCK, 1 << 32)


@scenario(Status.SUCCESS)
def unpinned_range_locks_again() -> int:
    h = harness()
    h.model.set_pinned("ring", [(100, 4)])
    h.model.set_pinned("ring", [])
    return h.status(Command.LOCK, 101)


@scenario(Status.SUCCESS)
def unlock_of_a_pinned_locked_page() -> int:
    h = harness()
    h.status(Command.LOCK, 100)
    h.model.set_pinned("ring", [(100, 1)])  # pinning never refuses giving a page back
    return h.status(Command.UNLOCK, 100)


# SUCCESS_WITH_CAPABILITIES ---------------------------------------------------------------
@scenario(Status.SUCCESS_WITH_CAPABILITIES)
def start() -> int:
    return harness(start=False).status(Command.START, 0x3E)


@scenario(Status.SUCCESS_WITH_CAPABILITIES)
def start_zero() -> int:
    return harness().status(Command.START, 0)


# ERROR_CMD_INVALID -----------------------------------------------------------------------
@scenario(Status.ERROR_CMD_INVALID)
def command_5() -> int:
    return harness().status(5)


@scenario(Status.ERROR_CMD_INVALID)
def command_11() -> int:
    return harness().status(11)


@scenario(Status.ERROR_CMD_INVALID)
def command_u32_max() -> int:
    return harness().status(U32_MAX)


@scenario(Status.ERROR_CMD_INVALID)
def wrong_magic() -> int:
    return harness().cmd(Command.GET_TARGET, magic=MAGIC ^ 1).status


@scenario(Status.ERROR_CMD_INVALID)
def lock_without_basic() -> int:
    return harness(caps=C.BATCHED_CMDS).status(Command.LOCK, 100)


@scenario(Status.ERROR_CMD_INVALID)
def batch_count_zero() -> int:
    return harness().cmd(Command.BATCHED_LOCK, BATCH_PFN, 0).status


@scenario(Status.ERROR_CMD_INVALID)
def batch_count_513() -> int:
    return harness().cmd(Command.BATCHED_LOCK, BATCH_PFN, 513).status


@scenario(Status.ERROR_CMD_INVALID)
def batch_count_huge() -> int:
    return harness().cmd(Command.BATCHED_UNLOCK, BATCH_PFN, 2**64 - 1).status


@scenario(Status.ERROR_CMD_INVALID)
def batch_page_in_hole() -> int:
    return harness().cmd(Command.BATCHED_LOCK, LOW_END, 1).status


@scenario(Status.ERROR_CMD_INVALID)
def batch_page_beyond_ram() -> int:
    return harness().cmd(Command.BATCHED_LOCK, 2**64 - 1, 1).status


@scenario(Status.ERROR_CMD_INVALID)
def batch_page_is_locked() -> int:
    h = harness()
    h.status(Command.LOCK, 99)
    return h.batch(Command.BATCHED_LOCK, [100], batch_pfn=99)[0].status


@scenario(Status.ERROR_CMD_INVALID)
def batch_page_inside_locked_2m() -> int:
    h = harness()
    h.lock2m(512)
    return h.cmd(Command.BATCHED_UNLOCK, 700, 1).status


@scenario(Status.ERROR_CMD_INVALID)
def doorbell_without_capability() -> int:
    return harness(caps=0x0E).status(Command.VMCI_DOORBELL_SET, 1, 2)


# ERROR_PPN_INVALID -----------------------------------------------------------------------
@scenario(Status.ERROR_PPN_INVALID)
def lock_pfn_in_hole() -> int:
    return harness().status(Command.LOCK, LOW_END)


@scenario(Status.ERROR_PPN_INVALID)
def lock_pfn_beyond_ram() -> int:
    return harness().status(Command.LOCK, HIGH_END)


@scenario(Status.ERROR_PPN_INVALID)
def unlock_pfn_beyond_ram() -> int:
    return harness().status(Command.UNLOCK, 2**40)


@scenario(Status.ERROR_PPN_INVALID)
def lock_pfn_above_4g_without_64bit_target() -> int:
    return harness(caps=0x1E, regions=[(0, 1 << 45)]).status(Command.LOCK, 1 << 32)


@scenario(Status.ERROR_PPN_INVALID)
def batch_entry_beyond_ram() -> int:
    return harness().lock(HIGH_END + 5)[0]


@scenario(Status.ERROR_PPN_INVALID)
def batch_entry_reserved_bits() -> int:
    return harness().batch(Command.BATCHED_LOCK, [], raw=[100 << 12 | 1 << 5])[1][0]


@scenario(Status.ERROR_PPN_INVALID)
def batch_entry_reserved_bit_11() -> int:
    return harness().batch(Command.BATCHED_LOCK, [], raw=[100 << 12 | 1 << 11])[1][0]


@scenario(Status.ERROR_PPN_INVALID)
def batch_unlock_reserved_bits() -> int:
    h = harness()
    h.lock(100)
    return h.batch(Command.BATCHED_UNLOCK, [], raw=[100 << 12 | 0x40])[1][0]


@scenario(Status.ERROR_PPN_INVALID)
def batch_2m_misaligned() -> int:
    return harness().lock2m(513)[0]


@scenario(Status.ERROR_PPN_INVALID)
def batch_2m_unlock_misaligned() -> int:
    h = harness()
    h.lock2m(1024)
    return h.batch(Command.BATCHED_2M_UNLOCK, [1025])[1][0]


@scenario(Status.ERROR_PPN_INVALID)
def batch_2m_crossing_region_end() -> int:
    return harness(regions=[(0, 3 * MiB)]).lock2m(512)[0]  # PFNs 512..1023, RAM ends at 768


@scenario(Status.ERROR_PPN_INVALID)
def batch_2m_in_hole() -> int:
    return harness().lock2m(LOW_END)[0]


# ERROR_PPN_LOCKED ------------------------------------------------------------------------
@scenario(Status.ERROR_PPN_LOCKED)
def lock_twice() -> int:
    h = harness()
    h.status(Command.LOCK, 100)
    return h.status(Command.LOCK, 100)


@scenario(Status.ERROR_PPN_LOCKED)
def batch_duplicate_in_same_batch() -> int:
    return harness().lock(100, 101, 100)[2]


@scenario(Status.ERROR_PPN_LOCKED)
def batch_lock_already_locked() -> int:
    h = harness()
    h.lock(100)
    return h.lock(100)[0]


@scenario(Status.ERROR_PPN_LOCKED)
def lock_4k_inside_locked_2m() -> int:
    h = harness()
    h.lock2m(1024)
    return h.lock(1024 + 77)[0]


@scenario(Status.ERROR_PPN_LOCKED)
def single_lock_4k_inside_locked_2m() -> int:
    h = harness()
    h.lock2m(1024)
    return h.status(Command.LOCK, 1535)


@scenario(Status.ERROR_PPN_LOCKED)
def lock_2m_containing_locked_4k() -> int:
    h = harness()
    h.lock(1024 + 511)
    return h.lock2m(1024)[0]


@scenario(Status.ERROR_PPN_LOCKED)
def lock_2m_twice() -> int:
    h = harness()
    h.lock2m(1024)
    return h.lock2m(1024)[0]


@scenario(Status.ERROR_PPN_LOCKED)
def lock_2m_duplicate_in_batch() -> int:
    return harness().lock2m(1024, 1024)[1]


# ERROR_PPN_UNLOCKED ----------------------------------------------------------------------
@scenario(Status.ERROR_PPN_UNLOCKED)
def unlock_never_locked() -> int:
    return harness().status(Command.UNLOCK, 100)


@scenario(Status.ERROR_PPN_UNLOCKED)
def batch_unlock_never_locked() -> int:
    return harness().batch(Command.BATCHED_UNLOCK, [100])[1][0]


@scenario(Status.ERROR_PPN_UNLOCKED)
def unlock_4k_part_of_locked_2m() -> int:
    h = harness()
    h.lock2m(1024)
    return h.batch(Command.BATCHED_UNLOCK, [1030])[1][0]


@scenario(Status.ERROR_PPN_UNLOCKED)
def single_unlock_4k_part_of_locked_2m() -> int:
    h = harness()
    h.lock2m(1024)
    return h.status(Command.UNLOCK, 1024)


@scenario(Status.ERROR_PPN_UNLOCKED)
def unlock_2m_of_4k_locked_pages() -> int:
    h = harness()
    h.lock(*range(1024, 1536))
    return h.batch(Command.BATCHED_2M_UNLOCK, [1024])[1][0]


@scenario(Status.ERROR_PPN_UNLOCKED)
def unlock_duplicate_in_same_batch() -> int:
    h = harness()
    h.lock(100)
    return h.batch(Command.BATCHED_UNLOCK, [100, 100])[1][1]


@scenario(Status.ERROR_PPN_UNLOCKED)
def unlock_after_unlock() -> int:
    h = harness()
    h.status(Command.LOCK, 100)
    h.status(Command.UNLOCK, 100)
    return h.status(Command.UNLOCK, 100)


# ERROR_PPN_PINNED ------------------------------------------------------------------------
@scenario(Status.ERROR_PPN_PINNED)
def lock_pinned_ring_page() -> int:
    h = harness()
    h.model.set_pinned("ring", [(100, 4)])
    return h.status(Command.LOCK, 103)


@scenario(Status.ERROR_PPN_PINNED)
def batch_lock_pinned() -> int:
    h = harness()
    h.model.set_pinned("operator", [(HIGH_START, 10)])
    return h.lock(HIGH_START + 9)[0]


@scenario(Status.ERROR_PPN_PINNED)
def batch_lock_of_the_batch_page() -> int:
    return harness().lock(BATCH_PFN)[0]


@scenario(Status.ERROR_PPN_PINNED)
def batch_2m_lock_containing_the_batch_page() -> int:
    return harness().lock2m(0)[0]  # the batch page is PFN 10


@scenario(Status.ERROR_PPN_PINNED)
def batch_2m_lock_overlapping_pinned() -> int:
    h = harness()
    h.model.set_pinned("ring", [(2047, 2)])  # 2047..2048: overlaps frames 3 and 4
    return h.lock2m(2048)[0]


@scenario(Status.ERROR_PPN_PINNED)
def pinned_by_second_owner() -> int:
    h = harness()
    h.model.set_pinned("a", [(100, 1)])
    h.model.set_pinned("b", [(200, 1)])
    h.model.set_pinned("a", [])
    return h.status(Command.LOCK, 200)


@scenario(Status.ERROR_PPN_PINNED)
def pinned_beats_locked() -> int:
    h = harness()
    h.status(Command.LOCK, 100)
    h.model.set_pinned("ring", [(100, 1)])
    return h.status(Command.LOCK, 100)


# ERROR_PPN_NOTNEEDED ---------------------------------------------------------------------
@scenario(Status.ERROR_PPN_NOTNEEDED)
def lock_with_target_zero() -> int:
    return harness(target=0).status(Command.LOCK, 100)


@scenario(Status.ERROR_PPN_NOTNEEDED)
def lock_at_target() -> int:
    h = harness(target=2)
    h.lock(100, 101)
    return h.status(Command.LOCK, 102)


@scenario(Status.ERROR_PPN_NOTNEEDED)
def batch_crossing_target() -> int:
    return harness(target=3).lock(100, 101, 102, 103)[3]


@scenario(Status.ERROR_PPN_NOTNEEDED)
def batch_2m_after_target() -> int:
    return harness(target=513).lock2m(1024, 2048, 3072)[2]


@scenario(Status.ERROR_PPN_NOTNEEDED)
def lock_above_guest_limit_hint() -> int:
    h = harness(target=1000)
    h.status(Command.GET_TARGET, 1)
    h.status(Command.LOCK, 100)
    return h.status(Command.LOCK, 101)


@scenario(Status.ERROR_PPN_NOTNEEDED)
def duplicate_of_notneeded_is_notneeded() -> int:
    return harness(target=1).lock(100, 101, 101)[2]


# ERROR_RESET -----------------------------------------------------------------------------
@scenario(Status.ERROR_RESET)
def first_command_not_start() -> int:
    return harness(start=False).status(Command.GET_TARGET)


@scenario(Status.ERROR_RESET)
def after_demand_reset() -> int:
    h = harness()
    h.model.demand_reset()
    return h.status(Command.LOCK, 100)


@scenario(Status.ERROR_RESET)
def unknown_command_while_reset() -> int:
    return harness(start=False).status(11)


# ERROR_BUSY ------------------------------------------------------------------------------
@scenario(Status.ERROR_BUSY)
def shutting_down() -> int:
    h = harness()
    h.model.shutting_down = True
    return h.status(Command.LOCK, 100)


@scenario(Status.ERROR_BUSY)
def shutting_down_start() -> int:
    h = harness(start=False)
    h.model.shutting_down = True
    return h.status(Command.START, 0x3E)


@pytest.mark.parametrize(
    ("fn", "expected"), [(fn, exp) for _, fn, exp in SCENARIOS], ids=[n for n, _, _ in SCENARIOS]
)
def test_status_rule(fn: Scenario, expected: Status) -> None:
    assert fn() == expected


def test_every_status_has_a_scenario() -> None:
    assert {exp for _, _, exp in SCENARIOS} == set(Status)


# ---------------------------------------------------------------------------------------
# Capability gating

GATED = [
    Command.LOCK,
    Command.UNLOCK,
    Command.BATCHED_LOCK,
    Command.BATCHED_UNLOCK,
    Command.BATCHED_2M_LOCK,
    Command.BATCHED_2M_UNLOCK,
    Command.VMCI_DOORBELL_SET,
]
OFFERS = [0, 0x01, 0x02, 0x04, 0x06, 0x08, 0x0A, 0x0E, 0x10, 0x1E, 0x3E, 0x3F, 0xFFFF_FFFF]


@pytest.mark.parametrize("offer", OFFERS, ids=[hex(o) for o in OFFERS])
@pytest.mark.parametrize("command", GATED, ids=[c.name for c in GATED])
def test_capability_gating(offer: int, command: Command) -> None:
    h = harness(caps=offer, target=0)
    granted = offer & int(ALL_CAPABILITIES)
    assert h.model.capabilities == granted
    needed = {
        Command.LOCK: 0x02,
        Command.UNLOCK: 0x02,
        Command.BATCHED_LOCK: 0x04,
        Command.BATCHED_UNLOCK: 0x04,
        Command.BATCHED_2M_LOCK: 0x0C,
        Command.BATCHED_2M_UNLOCK: 0x0C,
        Command.VMCI_DOORBELL_SET: 0x10,
    }[command]
    if command in (Command.LOCK, Command.UNLOCK):
        status = h.status(command, 100)
    elif command is Command.VMCI_DOORBELL_SET:
        status = h.status(command, 1, 2)
    else:
        status = h.batch(command, [1024])[0].status
    if needed & ~granted:
        assert status == Status.ERROR_CMD_INVALID
    else:
        # target 0: a LOCK is refused as NOTNEEDED, an UNLOCK as UNLOCKED, never CMD_INVALID
        assert status in (Status.SUCCESS, Status.ERROR_PPN_NOTNEEDED, Status.ERROR_PPN_UNLOCKED)


@pytest.mark.parametrize(
    ("offered", "supported", "granted"),
    [
        (0x3E, ALL_CAPABILITIES, 0x3E),
        (0x3F, ALL_CAPABILITIES, 0x3E),  # bit 0 is never granted
        (0x01, ALL_CAPABILITIES, 0x00),
        (0x02, ALL_CAPABILITIES, 0x02),  # legacy protocol v2 START
        (0x3E, C.BASIC_CMDS | C.BATCHED_CMDS, 0x06),
        (0x0E, ALL_CAPABILITIES, 0x0E),  # open-vm-tools Linux
        (2**64 - 1, ALL_CAPABILITIES, 0x3E),
        (0, ALL_CAPABILITIES, 0),
    ],
)
def test_start_negotiation(offered: int, supported: Capability, granted: int) -> None:
    h = harness(start=False, supported=supported)
    response = h.cmd(Command.START, offered)
    assert response == Response(Status.SUCCESS_WITH_CAPABILITIES, result=0, capabilities=granted)
    assert h.model.capabilities == granted
    assert h.effects == [Forget()]


def test_start_zero_withdraws() -> None:
    h = harness()
    h.lock(100)
    assert h.status(Command.START, 0) == Status.SUCCESS_WITH_CAPABILITIES
    assert h.model.capabilities == 0
    assert h.model.size == 0
    assert h.status(Command.LOCK, 100) == Status.ERROR_CMD_INVALID
    assert h.status(Command.GET_TARGET) == Status.SUCCESS


# ---------------------------------------------------------------------------------------
# Targets: 32-bit clamping, the guest's limit, result on every target-carrying response

BIG = [(0, 1 << 45)]  # 2^33 pages of (sparse) RAM


@pytest.mark.parametrize(
    ("caps", "target", "hint", "expected"),
    [
        (0x1E, 2**33, 0, U32_MAX),
        (0x3E, 2**33, 0, 2**33),
        (0x1E, U32_MAX, 0, U32_MAX),
        (0x1E, 2**32, 0, U32_MAX),
        (0x3E, 2**40, 0, 2**33),  # never more than the guest's RAM
        (0x3E, 2**33, 1000, 1000),  # the guest's limit hint
        (0x1E, 2**33, 2**32 + 5, U32_MAX),
        (0x3E, 500, 1000, 500),
        (0x3E, 0, 1000, 0),
    ],
)
def test_target_clamping(caps: int, target: int, hint: int, expected: int) -> None:
    h = harness(caps=caps, target=target, regions=BIG)
    assert h.cmd(Command.GET_TARGET, hint).result == expected
    assert h.cmd(Command.LOCK, 100).result == expected
    assert h.model.target == target
    assert h.model.reported_target() == expected
    assert h.model.pages.nbytes < 4096  # the map covers what is locked, not 2^33 pages


def test_target_clamped_to_ram() -> None:
    h = harness(target=10**9)
    assert h.cmd(Command.GET_TARGET, 0).result == RAM_PAGES


def test_limit_hint_persists_until_start() -> None:
    h = harness(target=5000)
    assert h.cmd(Command.GET_TARGET, 100).result == 100
    assert h.batch(Command.BATCHED_LOCK, [200])[0].result == 100
    assert h.model.limit_hint == 100
    assert h.cmd(Command.GET_TARGET, 0).result == 5000  # 0 = "use the host's configuration"
    h.cmd(Command.GET_TARGET, 100)
    h.cmd(Command.START, 0x3E)
    assert h.model.limit_hint is None
    assert h.cmd(Command.LOCK, 100).result == 5000


@pytest.mark.parametrize("command", list(Command), ids=[c.name for c in Command])
@pytest.mark.parametrize("state", ["ok", "reset", "busy", "not-negotiated"])
def test_result_field(command: Command, state: str) -> None:
    h = harness(target=1234, caps=0 if state == "not-negotiated" else 0x3E)
    if state == "reset":
        h.model.demand_reset()
    if state == "busy":
        h.model.shutting_down = True
    arg1 = {Command.START: 0x3E, Command.GET_TARGET: 0}.get(command, BATCH_PFN)
    response = h.cmd(command, arg1, 1)
    assert response.result == (1234 if command in TARGET_CARRYING else 0)
    assert response.reserved == 0
    if command is not Command.START or state in ("busy",):
        assert response.capabilities == 0


def test_batched_pfns_above_4g_need_no_64bit_cap() -> None:
    # target 0: NOTNEEDED shows the entries passed validation, without a 512 MiB page map
    h = harness(caps=0x1E, regions=BIG, target=0)
    assert h.lock((1 << 32) + 7, (1 << 33) + 1) == [
        Status.ERROR_PPN_NOTNEEDED,
        Status.ERROR_PPN_INVALID,
    ]
    assert h.lock2m((1 << 33) - 512)[0] == Status.ERROR_PPN_NOTNEEDED
    assert h.model.pages.nbytes < 4096


# ---------------------------------------------------------------------------------------
# Reset, START, doorbell, BUSY


def test_starts_reset_demanded() -> None:
    h = harness(start=False)
    assert h.model.reset_demanded
    for command in Command:
        if command is not Command.START:
            assert h.status(command, 100, 1) == Status.ERROR_RESET
    assert h.status(Command.START, 0x3E) == Status.SUCCESS_WITH_CAPABILITIES
    assert not h.model.reset_demanded


def test_demand_reset_forgets_and_rings() -> None:
    h = harness()
    h.lock(100, 101)
    h.lock2m(1024)
    assert h.model.demand_reset() == [Forget()]  # no doorbell registered
    assert h.model.size == 0
    assert h.status(Command.GET_TARGET) == Status.ERROR_RESET
    h.status(Command.START, 0x3E)
    h.status(Command.VMCI_DOORBELL_SET, 3, 4)
    assert h.model.demand_reset() == [Forget(), DoorbellEvent(EventKind.RESET)]
    assert h.model.counters["reset"] == 2
    assert h.model.counters["forgotten (4k)"] == 2
    assert h.model.counters["forgotten (2M)"] == 1


def test_start_forgets_pages_and_doorbell() -> None:
    h = harness()
    h.status(Command.VMCI_DOORBELL_SET, 3, 4)
    h.lock(100, 200)
    h.effects.clear()
    h.status(Command.START, 0x3E)
    assert h.effects == [Forget()]
    assert h.model.size == 0
    assert h.model.doorbell is None
    assert h.lock(100, 200) == [0, 0]  # the pages are free again


def test_doorbell_registration() -> None:
    h = harness()
    assert h.model.set_target(20) == []  # not registered
    assert h.status(Command.VMCI_DOORBELL_SET, 0x1234, 0x5678) == Status.SUCCESS
    assert h.model.doorbell == (0x1234, 0x5678)
    assert h.model.set_target(30) == [DoorbellEvent(EventKind.TARGET_CHANGED)]
    assert h.model.set_target(30) == []  # unchanged
    h.status(Command.VMCI_DOORBELL_SET, VMCI_INVALID_ID, VMCI_INVALID_ID)
    assert h.model.doorbell is None
    assert h.model.set_target(40) == []
    h.status(Command.VMCI_DOORBELL_SET, VMCI_INVALID_ID, 5)  # only both-invalid unregisters
    assert h.model.doorbell == (VMCI_INVALID_ID, 5)
    assert h.model.counters["doorbell"] == 1


def test_busy_changes_nothing() -> None:
    h = harness()
    h.lock(100)
    before = h.model.state()
    h.model.shutting_down = True
    for command in range(12):
        assert h.status(command, 200, 1) == Status.ERROR_BUSY
    h.model.shutting_down = False
    assert h.model.state() == before
    assert h.status(Command.LOCK, 200) == Status.SUCCESS


def test_guest_id() -> None:
    h = harness()
    assert h.model.guest_type is None
    h.status(Command.GUEST_ID, 1)
    assert h.model.guest_type is GuestType.LINUX
    h.status(Command.GUEST_ID, 99)
    assert h.model.guest_type == 99
    h.status(Command.START, 0x3E)
    assert h.model.guest_type == 99


def test_set_target_and_pins_validate() -> None:
    m = BalloonModel()
    with pytest.raises(ConfigError):
        m.set_target(-1)
    with pytest.raises(ConfigError):
        m.set_pinned("x", [(-1, 3)])
    with pytest.raises(ConfigError):
        BalloonModel(target=-5)
    m.set_pinned("x", [(5, 0)])
    assert m.pinned == {}


# ---------------------------------------------------------------------------------------
# Bad input: its status and nothing else changes

BAD_INPUTS: list[tuple[str, Callable[[Harness], int], Status]] = [
    ("unknown 5", lambda h: h.status(5, 100, 1), Status.ERROR_CMD_INVALID),
    ("unknown 11", lambda h: h.status(11), Status.ERROR_CMD_INVALID),
    ("wrong magic", lambda h: h.cmd(Command.LOCK, 100, magic=0).status, Status.ERROR_CMD_INVALID),
    ("count 0", lambda h: h.status(Command.BATCHED_LOCK, BATCH_PFN, 0), Status.ERROR_CMD_INVALID),
    (
        "count 513",
        lambda h: h.status(Command.BATCHED_LOCK, BATCH_PFN, 513),
        Status.ERROR_CMD_INVALID,
    ),
    (
        "batch page outside RAM",
        lambda h: h.status(Command.BATCHED_LOCK, HIGH_END, 1),
        Status.ERROR_CMD_INVALID,
    ),
    ("LOCK PFN beyond RAM", lambda h: h.status(Command.LOCK, HIGH_END), Status.ERROR_PPN_INVALID),
    ("UNLOCK in hole", lambda h: h.status(Command.UNLOCK, LOW_END + 1), Status.ERROR_PPN_INVALID),
    ("batch PFN beyond RAM", lambda h: h.lock(HIGH_END)[0], Status.ERROR_PPN_INVALID),
    ("misaligned 2M", lambda h: h.lock2m(1025)[0], Status.ERROR_PPN_INVALID),
    (
        "reserved bits",
        lambda h: h.batch(Command.BATCHED_LOCK, [], raw=[200 << 12 | 0xFE0])[1][0],
        Status.ERROR_PPN_INVALID,
    ),
    ("LOCK locked", lambda h: h.status(Command.LOCK, 100), Status.ERROR_PPN_LOCKED),
    ("UNLOCK free", lambda h: h.status(Command.UNLOCK, 300), Status.ERROR_PPN_UNLOCKED),
    ("batch of the batch page", lambda h: h.lock(BATCH_PFN)[0], Status.ERROR_PPN_PINNED),
]


@pytest.mark.parametrize(
    ("what", "action", "expected"), BAD_INPUTS, ids=[w for w, _, _ in BAD_INPUTS]
)
def test_bad_input_changes_nothing(
    what: str, action: Callable[[Harness], int], expected: Status
) -> None:
    h = harness()
    h.status(Command.LOCK, 100)
    h.lock2m(2048)
    h.effects.clear()
    before = h.model.state()
    assert action(h) == expected
    assert h.model.state() == before
    assert h.effects == []


FRAMES: list[tuple[str, bytes, int, bytes | None]] = [
    ("short", bytes(23), 24, Response(Status.ERROR_CMD_INVALID).build()),
    ("long", Request(Command.GET_TARGET).build() + b"\0", 24, Response(1).build()),
    ("empty", b"", 24, Response(Status.ERROR_CMD_INVALID).build()),
    ("wrong magic", Request(Command.GET_TARGET, magic=0).build(), 24, Response(1).build()),
    ("wrong magic, big writable", Request(1, magic=7).build(), 4096, Response(1).build()),
    ("short, no room", bytes(10), 23, None),
    ("wrong magic, no room", Request(1, magic=0).build(), 0, None),
    ("good, no room", Request(Command.LOCK, 200).build(), 23, None),
]


@pytest.mark.parametrize(
    ("what", "readable", "writable", "expected"), FRAMES, ids=[f[0] for f in FRAMES]
)
def test_answer_frame_bad(
    what: str, readable: bytes, writable: int, expected: bytes | None
) -> None:
    h = harness()
    before = h.model.state()
    answer, effects = h.model.answer_frame(readable, writable, h.ram)
    assert answer == expected
    assert effects == ()
    assert h.model.state() == before
    assert h.model.counters["bad frame"] == 1


def test_answer_frame_good() -> None:
    h = harness(target=77)
    answer, effects = h.model.answer_frame(Request(Command.LOCK, 200).build(), 24, h.ram)
    assert answer is not None
    assert Response.parse(answer) == Response(Status.SUCCESS, result=77)
    assert effects == (Reclaim(np.array([200], np.uint64), np.array([1], np.uint64)),)
    answer, _ = h.model.answer_frame(Request(Command.GET_TARGET).build(), 100, h.ram)
    assert answer is not None and len(answer) == 24


# ---------------------------------------------------------------------------------------
# Effects, batch page write-back, accounting, counters


def test_reclaim_runs_are_sorted_and_coalesced() -> None:
    h = harness()
    h.lock(9, 7, 5, 6, 100, 8, 300, 301)
    assert [e.runs() for e in h.effects if isinstance(e, Reclaim)] == [[(5, 5), (100, 1), (300, 2)]]
    h.effects.clear()
    h.lock2m(4096, 3584, 5120)
    assert [e.runs() for e in h.effects if isinstance(e, Reclaim)] == [[(3584, 1024), (5120, 512)]]
    h.effects.clear()
    h.batch(Command.BATCHED_UNLOCK, [5, 6])
    h.batch(Command.BATCHED_2M_UNLOCK, [4096])
    assert h.effects == []  # unlocking reclaims nothing


def test_no_reclaim_when_nothing_locked() -> None:
    h = harness(target=0)
    h.lock(100, 101)
    assert h.effects == []


@pytest.mark.parametrize(
    ("starts", "length", "runs"),
    [
        ([], 1, []),
        ([3], 1, [(3, 1)]),
        ([1, 2, 3, 5], 1, [(1, 3), (5, 1)]),
        ([5, 3, 4], 1, [(3, 3)]),
        ([0, 512, 1536], 512, [(0, 1024), (1536, 512)]),
    ],
)
def test_coalesce(starts: list[int], length: int, runs: list[tuple[int, int]]) -> None:
    reclaim = coalesce(np.asarray(starts, dtype=np.uint64), length)
    assert reclaim.runs() == runs
    assert reclaim.pfn_starts.dtype == reclaim.pfn_counts.dtype == np.uint64


def test_batch_write_back_keeps_pfn_and_reserved_bits() -> None:
    h = harness(target=2)
    raw = [100 << 12 | 0x1F, 101 << 12 | 0x20, 102 << 12 | 0x3, 103 << 12, LOW_END << 12 | 0x7]
    response, statuses = h.batch(Command.BATCHED_LOCK, [], raw=raw)
    assert response.status == Status.SUCCESS
    assert statuses == [0, 2, 0, 6, 2]  # stale status bits in the input are ignored
    page = h.ram.read(BATCH_PFN << PAGE_SHIFT, 8 * len(raw))
    entries = batch_entries(page, len(raw))
    assert entry_pfns(entries).tolist() == [100, 101, 102, 103, LOW_END]
    assert entry_reserved(entries).tolist() == [0, 0x20, 0, 0, 0]
    # nothing beyond the used entries is written
    assert h.ram.read((BATCH_PFN << PAGE_SHIFT) + 8 * len(raw), 8) == bytes(8)


def test_model_touches_only_the_batch_page() -> None:
    h = harness()
    h.ram.accesses.clear()
    h.lock(*range(200, 400))
    h.lock2m(1024, 1536)
    h.status(Command.LOCK, 900)
    h.batch(Command.BATCHED_UNLOCK, list(range(200, 300)), batch_pfn=11)
    touched = h.ram.touched_pfns()
    assert touched == {BATCH_PFN, 11}
    assert not h.model.pages.covered(sorted(touched)).any()


def test_size_accounting() -> None:
    h = harness(target=100_000)
    h.lock(*range(100, 612))
    h.lock2m(1024, 1536, HIGH_START)
    h.status(Command.LOCK, 5000)
    assert h.model.size == 513 + 3 * 512
    assert (h.model.count_4k, h.model.count_2m) == (513, 3)
    h.batch(Command.BATCHED_2M_UNLOCK, [1536])
    h.batch(Command.BATCHED_UNLOCK, list(range(100, 200)))
    assert h.model.size == 413 + 2 * 512
    assert h.model.pages.recount() == (413, 2)


def test_page_map_sized_to_ram() -> None:
    h = harness(target=RAM_PAGES, regions=[(0, 64 * MiB)])
    h.lock(5)
    h.lock(LOW_END - 1)
    h.lock(LOW_END // 2)
    assert h.model.pages.capacity == LOW_END  # exactly the RAM: 1 bit per page
    h = harness(target=RAM_PAGES)
    h.lock(LOW_END - 1)
    h.lock(HIGH_END - 1)  # above the hole: grows to the highest locked PFN
    assert HIGH_END <= h.model.pages.capacity <= HIGH_END + 512


def test_full_batch_of_512() -> None:
    h = harness(target=RAM_PAGES)
    pfns = list(range(HIGH_START, HIGH_START + 512))
    response, statuses = h.batch(Command.BATCHED_LOCK, pfns)
    assert response.status == Status.SUCCESS and statuses == [0] * 512
    response, statuses = h.batch(Command.BATCHED_UNLOCK, pfns)
    assert statuses == [0] * 512
    assert h.model.size == 0


def test_counters() -> None:
    h = harness(target=3)
    h.status(Command.GET_TARGET, RAM_PAGES)
    h.status(Command.GUEST_ID, 1)
    h.lock(100, 101, 102, 103, LOW_END)
    h.status(Command.LOCK, 100)
    h.status(Command.UNLOCK, 100)
    h.status(Command.UNLOCK, 100)
    h.status(11)
    c = h.model.counters
    for name in COMMAND_DEBUGFS_NAME.values():
        assert name in c and f"{name} failed" in c
    assert c["start"] == 1 and c["start failed"] == 0
    assert c["target"] == 1 and c["guestType"] == 1
    assert c["batchLock"] == 1 and c["batchLock failed"] == 0
    assert c["lock"] == 1 and c["lock failed"] == 1
    assert c["unlock"] == 2 and c["unlock failed"] == 1
    assert c["unknown"] == 1 and c["unknown failed"] == 1
    assert c["locked (4k)"] == 3 and c["unlocked (4k)"] == 1
    assert c["lock refused ERROR_PPN_NOTNEEDED (4k)"] == 1
    assert c["lock refused ERROR_PPN_INVALID (4k)"] == 1
    assert c["lock refused ERROR_PPN_LOCKED (4k)"] == 1
    assert c["unlock refused ERROR_PPN_UNLOCKED (4k)"] == 1
    assert c["status SUCCESS_WITH_CAPABILITIES"] == 1
    assert c["status ERROR_CMD_INVALID"] == 1
    # the copy is a copy
    c["start"] = 99
    assert h.model.counters["start"] == 1


def test_sequential_equivalence_of_a_mixed_batch() -> None:
    # Entry by entry: invalid, pinned (batch page), ok, duplicate, ok, notneeded, dup-of-notneeded
    h = harness(target=2)
    statuses = h.lock(LOW_END, BATCH_PFN, 100, 100, 101, 102, 102)
    assert statuses == [2, 5, 0, 3, 0, 6, 6]
    assert h.model.size == 2
