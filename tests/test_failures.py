"""The FAIL column (vdev.policy.control.failures): the guest did something wrong, each time once;
normal balloon flow (ERROR_RESET, ERROR_BUSY, PPN_NOTNEEDED, PPN_PINNED) is not a failure."""

from __future__ import annotations

from protocol.vmw import (
    ALL_CAPABILITIES,
    MAGIC,
    REQUEST_SIZE,
    RESPONSE_SIZE,
    VMCI_INVALID_ID,
    Command,
    Request,
    Status,
    build_batch,
)
from vdev.balloon import BalloonModel
from vdev.policy.control import failures
from vdev.ram import BytearrayRam

MiB = 1 << 20
BATCH_PFN = 10


class Guest:
    def __init__(self, target: int = 100) -> None:
        self.model = BalloonModel(target=target)
        self.ram = BytearrayRam([(0, 64 * MiB)])

    def cmd(self, command: int, arg1: int = 0, arg2: int = 0) -> Status:
        return Status(
            self.model.handle(Request(command, arg1, arg2, MAGIC), self.ram).response.status
        )

    def batch(self, command: Command, pfns: list[int]) -> Status:
        self.ram.write(BATCH_PFN << 12, build_batch(pfns))
        return self.cmd(command, BATCH_PFN, len(pfns))

    def fail(self) -> int:
        return failures(self.model.counters)


def started(target: int = 100) -> Guest:
    g = Guest(target)
    assert g.cmd(Command.START, int(ALL_CAPABILITIES)) == Status.SUCCESS_WITH_CAPABILITIES
    return g


def test_linux_like_first_reset_is_not_a_failure() -> None:
    g = Guest()
    g.model.demand_reset()
    # vmw_balloon.c's reset: unregister the doorbell first, START after
    assert g.cmd(Command.VMCI_DOORBELL_SET, VMCI_INVALID_ID, VMCI_INVALID_ID) == Status.ERROR_RESET
    assert g.cmd(Command.START, int(ALL_CAPABILITIES)) == Status.SUCCESS_WITH_CAPABILITIES
    assert g.cmd(Command.GUEST_ID, 1) == Status.SUCCESS
    assert g.cmd(Command.GET_TARGET) == Status.SUCCESS
    assert g.model.counters["doorbellSet failed"] == 1  # debugfs still says so
    assert g.fail() == 0


def test_normal_flow_refusals_are_not_failures() -> None:
    g = started(target=2)
    g.model.set_pinned("rings", [(20, 1)])
    statuses = g.batch(Command.BATCHED_LOCK, [100, 101, 102, 20])
    assert statuses == Status.SUCCESS
    c = g.model.counters
    assert c["lock refused ERROR_PPN_NOTNEEDED (4k)"] == 1
    assert c["lock refused ERROR_PPN_PINNED (4k)"] == 1
    assert g.cmd(Command.LOCK, 103) == Status.ERROR_PPN_NOTNEEDED  # also "lock failed"
    g.model.shutting_down = True
    assert g.cmd(Command.GET_TARGET) == Status.ERROR_BUSY
    assert g.fail() == 0


def test_guest_mistakes_count_once_each() -> None:
    g = started(target=1000)
    assert g.cmd(Command.LOCK, 100) == Status.SUCCESS
    assert g.cmd(Command.LOCK, 100) == Status.ERROR_PPN_LOCKED  # a refused single LOCK: 1
    assert g.fail() == 1
    assert g.cmd(Command.UNLOCK, 200) == Status.ERROR_PPN_UNLOCKED
    assert g.fail() == 2
    assert g.cmd(Command.LOCK, 1 << 30) == Status.ERROR_PPN_INVALID  # not RAM
    assert g.fail() == 3
    # a batch: one page LOCKED, one INVALID, one fine: 2 pages, the command itself succeeded
    assert g.batch(Command.BATCHED_LOCK, [100, 1 << 30, 300]) == Status.SUCCESS
    assert g.fail() == 5
    assert g.batch(Command.BATCHED_UNLOCK, [300, 300]) == Status.SUCCESS  # duplicate: UNLOCKED
    assert g.fail() == 6
    assert g.cmd(Command.BATCHED_LOCK, BATCH_PFN, 0) == Status.ERROR_CMD_INVALID  # count 0
    assert g.cmd(99) == Status.ERROR_CMD_INVALID  # unknown command
    assert g.fail() == 8


def test_bad_frames_count_once_answered_or_not() -> None:
    g = started()
    answer, _ = g.model.answer_frame(b"\0" * 5, RESPONSE_SIZE, g.ram)  # answered CMD_INVALID
    assert answer is not None
    assert g.model.counters["status ERROR_CMD_INVALID"] == 1
    assert g.fail() == 1
    answer, _ = g.model.answer_frame(b"\0" * 5, 4, g.ram)  # no room for the answer
    assert answer is None
    assert g.fail() == 2
    good = Request(Command.GET_TARGET, 0, 0, MAGIC).build()
    assert len(good) == REQUEST_SIZE
    answer, _ = g.model.answer_frame(good, 4, g.ram)  # well-formed, unanswerable
    assert answer is None
    assert g.fail() == 3
    g.model.handle(Request(Command.GET_TARGET, 0, 0, 0xBAD), g.ram)  # wrong magic
    assert g.fail() == 4
    answer, _ = g.model.answer_frame(good, RESPONSE_SIZE, g.ram)
    assert g.fail() == 4


def test_ring_bad_chains_and_virtio_balloon_counters() -> None:
    counters = {
        "q0 bad_chains": 2,  # the ring code's count...
        "bad chains": 2,  # ...and virtio-balloon's own count of the same chains
        "q1 chains": 9,
        "inflate ignored: not RAM": 3,
        "inflate ignored: already in balloon": 4,
        "inflate ignored: pinned": 5,  # ring pages: normal
        "deflate ignored: not in balloon": 6,  # after an operator reset: normal
        "inflated (4k)": 100,
    }
    assert failures(counters) == 2 + 3 + 4
