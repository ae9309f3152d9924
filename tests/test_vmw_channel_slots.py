"""VmwChannel's command slots against the real vdev (in the test's loop): a command cancelled
after it was posted leaves its slot parked until the device answers its chain (or cmdq's
ring is reset), so no later command overwrites a request the device has not read yet; a
stop with every slot parked still finishes.

The device is held back by a gate on cmdq's kick: the front-end's kick eventfd is swapped
for one nobody reads, so vdev sees the chains only when the test kicks the real one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
from server_helpers import started_vmw

from guest_driver.frontend import (
    COMMAND_SLOTS,
    FrontendQueue,
    VmwChannel,
)
from protocol.errors import LocalError
from protocol.vmw import ALL_CAPABILITIES, REQUEST_SIZE, Command, Request, Status

FIRST = 0x1000  # PFN 0x1000 = 16 MiB: ordinary RAM, far above the rings and the channel


class KickGate:
    """cmdq's kicks go nowhere until :meth:`open`, which hands the device one kick."""

    def __init__(self, q: FrontendQueue) -> None:
        self.q = q
        self.real = q.kick_fd
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        q.kick_fd = self.fd

    def open(self) -> None:
        if self.q.kick_fd == self.fd:
            self.q.kick_fd = self.real
            os.eventfd_write(self.real, 1)

    def close(self) -> None:
        self.open()
        os.close(self.fd)


@contextlib.contextmanager
def gated(ch: VmwChannel) -> Iterator[KickGate]:
    gate = KickGate(ch.cmdq)
    try:
        yield gate
    finally:
        gate.close()


def slot_request(ch: VmwChannel, slot: int) -> bytes:
    return ch.fe.ram.read(ch.slot_gpa(slot), REQUEST_SIZE)


async def park_commands(ch: VmwChannel, requests: list[Request]) -> None:
    """Post ``requests`` (the device held back), then cancel them all: their slots park."""
    posted = ch.posted
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            for r in requests:
                nursery.start_soon(ch.command, r)
            await trio.testing.wait_all_tasks_blocked()
            assert ch.posted == posted + len(requests)
            scope.cancel()


async def test_a_cancelled_commands_slot_waits_for_the_devices_answer(
    vdev_inproc: Any, guest_ram: Any
) -> None:
    with trio.fail_after(20):
        async with started_vmw(vdev_inproc, guest_ram, 1000) as (_, ch, registry):
            cancelled = Request(Command.LOCK, FIRST)
            later = [Request(Command.LOCK, FIRST + 1 + i) for i in range(COMMAND_SLOTS)]
            statuses: dict[int, int] = {}

            async def send(i: int) -> None:
                statuses[i] = (await ch.call(later[i].command, later[i].arg1)).status

            with gated(ch) as gate:
                await park_commands(ch, [cancelled])
                assert ch.parked_slots == [0]
                async with trio.open_nursery() as nursery:
                    for i in range(COMMAND_SLOTS):  # one more than the free slots
                        nursery.start_soon(send, i)
                    await trio.testing.wait_all_tasks_blocked()
                    # slots 1.. are taken, the last command waits: the parked slot still
                    # holds the request the device has not read
                    assert ch.posted == 1 + 1 + COMMAND_SLOTS - 1
                    assert slot_request(ch, 0) == cancelled.build()
                    assert ch.cmdq.driver.in_flight == COMMAND_SLOTS
                    taken = {slot_request(ch, slot) for slot in range(1, COMMAND_SLOTS)}
                    (waiting,) = {r.build() for r in later} - taken
                    gate.open()  # the device answers all; slot 0 comes back, is reused
            assert statuses == dict.fromkeys(range(COMMAND_SLOTS), Status.SUCCESS)
            assert slot_request(ch, 0) == waiting  # the waiting one got slot 0
            assert ch.parked_slots == [] and ch.cmdq.driver.in_flight == 0
            assert ch.posted == ch.answered and ch.cmdq.driver.stray_used == 0
            # the device read the cancelled request as it was written: its page is in
            view = registry.view("vm0")
            assert view.size_pages == 1 + COMMAND_SLOTS


async def test_every_slot_parked_then_a_stop_finishes(vdev_inproc: Any, guest_ram: Any) -> None:
    """Every slot parked, the device late: START(0) (the driver's stop) polls the used ring
    itself and gets a slot once the device answers; parked slots then come back as the
    device answers, or at once when cmdq's ring is reset (a reboot: never answered)."""
    with trio.fail_after(20):
        async with started_vmw(vdev_inproc, guest_ram, 1000) as (fe, ch, registry):
            locks = [Request(Command.LOCK, FIRST + i) for i in range(COMMAND_SLOTS)]

            # the device answers late
            with gated(ch) as gate:
                await park_commands(ch, locks)
                assert ch.parked_slots == list(range(COMMAND_SLOTS))
                stopped: list[int] = []
                async with trio.open_nursery() as nursery:

                    async def stop() -> None:
                        stopped.append((await ch.call(Command.START, 0)).status)

                    nursery.start_soon(stop)
                    await trio.testing.wait_all_tasks_blocked()
                    assert not stopped and ch.posted == 1 + COMMAND_SLOTS  # no slot yet
                    gate.open()
            assert stopped == [Status.SUCCESS_WITH_CAPABILITIES]
            assert ch.parked_slots == [] and ch.posted == ch.answered
            # START(0) forgot the pages of all the LOCKs: every parked request read intact
            assert registry.view("vm0").counters["forgotten (4k)"] == COMMAND_SLOTS

            # the device never answers: the ring is reset under the parked chains (and under
            # one command still waiting, which is told so instead of waiting for ever)
            assert (await ch.call(Command.START, int(ALL_CAPABILITIES))).status == (
                Status.SUCCESS_WITH_CAPABILITIES
            )
            locks_seen = registry.view("vm0").counters["lock"]
            with gated(ch) as gate:
                more = [Request(Command.LOCK, FIRST + 100 + i) for i in range(COMMAND_SLOTS)]
                await park_commands(ch, more[:-1])
                assert ch.parked_slots == list(range(COMMAND_SLOTS - 1))
                answered: list[int] = []
                lost: list[str] = []
                async with trio.open_nursery() as nursery:

                    async def waiting() -> None:
                        with pytest.raises(LocalError, match="reset") as reset:
                            await ch.command(more[-1])
                        lost.append(str(reset.value))

                    async def get_target() -> None:
                        answered.append((await ch.call(Command.GET_TARGET)).status)

                    nursery.start_soon(waiting)
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.start_soon(get_target)  # no slot free
                    await trio.testing.wait_all_tasks_blocked()
                    assert not answered and ch.cmdq.driver.in_flight == COMMAND_SLOTS
                    # the reset hands vdev the real kick fd: these chains never reach it
                    fe.queues[0].kick_fd = gate.real
                    await fe.reboot()
                    assert ch.parked_slots == []
            assert answered == [Status.ERROR_RESET]  # a new device: START first
            assert len(lost) == 1 and ch.cmdq.driver.in_flight == 0
            assert registry.view("vm0").counters["lock"] == locks_seen  # none of them reached it
