"""The driver core against the real sans-I/O device model (vdev.balloon.BalloonModel).

No mock: ``ModelTransport`` hands every request to the device model over a BytearrayRam
(guest RAM without I/O) and delivers its doorbell events, exactly what the vhost-user
server does minus the rings and sockets.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guest_driver.driver import MAX_REFUSED, BalloonDriver, DriverConfig, render_debugfs
from guest_driver.guest_memory import PAGES_PER_2M, GuestMemory, PageSize, PageState
from protocol.errors import DeviceGone
from protocol.vmw import (
    ALL_CAPABILITIES,
    VMCI_INVALID_ID,
    Capability,
    Command,
    EventKind,
    GuestType,
    Request,
    Response,
    batch_entries,
    entry_pfns,
)
from vdev.balloon import BalloonModel, DoorbellEvent
from vdev.ram import BytearrayRam

RAM_PAGES = 32768  # 128 MiB
DOORBELL = (7, 42)


class ModelTransport:
    """A Transport around the device model, in process."""

    def __init__(self, model: BalloonModel, ram: BytearrayRam, *, doorbell: bool = True) -> None:
        self.model = model
        self.ram = ram
        self.log: list[tuple[Request, Response]] = []
        self.send, self.receive = trio.open_memory_channel[EventKind](16)
        self._doorbell = doorbell
        #: Called after each command with (request, response); tests use it to act mid-flight.
        self.after: Callable[[Request, Response], None] | None = None

    async def command(self, request: Request) -> Response:
        outcome = self.model.handle(request, self.ram)
        self.deliver(outcome.effects)
        self.log.append((request, outcome.response))
        if self.after is not None:
            self.after(request, outcome.response)
        return outcome.response

    def deliver(self, effects: object) -> None:
        for effect in effects:  # type: ignore[attr-defined]
            if isinstance(effect, DoorbellEvent):
                self.send.send_nowait(effect.kind)

    async def read(self, gpa: int, n: int) -> bytes:
        return self.ram.read(gpa, n)

    async def write(self, gpa: int, data: bytes) -> None:
        self.ram.write(gpa, data)

    async def wait_event(self, timeout: float) -> EventKind | None:
        with trio.move_on_after(timeout):
            return await self.receive.receive()
        return None

    @property
    def doorbell_ids(self) -> tuple[int, int] | None:
        return DOORBELL if self._doorbell else None

    def commands(self) -> list[Command]:
        return [Command(r.command) for r, _ in self.log]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    target: int = 0,
    *,
    config: DriverConfig | None = None,
    supported: Capability = ALL_CAPABILITIES,
    clock: Callable[[], float] | None = None,
) -> tuple[BalloonDriver, ModelTransport, GuestMemory]:
    model = BalloonModel(supported=supported, target=target)
    ram = BytearrayRam([(0, RAM_PAGES * 4096)], record=False)
    transport = ModelTransport(model, ram)
    memory = GuestMemory(RAM_PAGES, kernel_pages=1024)
    driver = BalloonDriver(transport, memory, config, clock=clock or FakeClock())
    return driver, transport, memory


def consistent(driver: BalloonDriver, transport: ModelTransport, memory: GuestMemory) -> None:
    """Driver, device and guest memory agree on every ballooned page."""
    model = transport.model
    assert driver.size == model.size
    # held: the pages of LOCKs interrupted unanswered, not yet the guest's again
    assert memory.count(PageState.BALLOON) == driver.size + driver.held
    assert driver.count(PageSize.SIZE_4K) == model.count_4k
    assert driver.count(PageSize.SIZE_2M) == model.count_2m
    assert sorted(driver.pages(PageSize.SIZE_4K).tolist()) == sorted(
        int(p) for p in model.pages.locked_4k()
    )
    assert sorted(driver.pages(PageSize.SIZE_2M).tolist()) == sorted(
        int(f) * PAGES_PER_2M for f in model.pages.locked_2m()
    )


async def test_handshake_like_linux() -> None:
    driver, t, _ = make()
    with trio.fail_after(5):
        await driver.work()
    # vmballoon_reset: doorbell unset (refused: reset demanded), START, doorbell set,
    # GUEST_ID; then the tick's GET_TARGET.
    assert t.commands() == [
        Command.VMCI_DOORBELL_SET,
        Command.START,
        Command.VMCI_DOORBELL_SET,
        Command.GUEST_ID,
        Command.GET_TARGET,
    ]
    unset, start = t.log[0][0], t.log[1][0]
    assert (unset.arg1, unset.arg2) == (VMCI_INVALID_ID, VMCI_INVALID_ID)
    assert start.arg1 == 0x3E
    assert t.log[4][0].arg1 == RAM_PAGES
    assert t.model.capabilities == ALL_CAPABILITIES
    assert t.model.guest_type is GuestType.LINUX
    assert t.model.doorbell == DOORBELL
    assert driver.capabilities == ALL_CAPABILITIES
    assert not driver.reset_required and driver.batching and driver.doorbell_registered
    assert driver.max_page_size is PageSize.SIZE_2M
    assert driver.stats.general["reset"] == 1 and driver.stats.general["timer"] == 1
    assert driver.stats.ops[Command.VMCI_DOORBELL_SET] == [2, 1]
    assert driver.stats.ops[Command.START] == [1, 0]  # 0x03000000 is no failure


async def test_start_zero_when_batching_cannot_be_set_up() -> None:
    driver, t, memory = make()
    memory.batch_pfn = None  # no batch page: vmballoon_init_batching fails
    with trio.fail_after(5):
        await driver.work()
    starts = [r.arg1 for r, _ in t.log if r.command == Command.START]
    assert starts == [0x3E, 0]
    assert driver.reset_required
    assert t.model.capabilities == Capability.NONE


async def test_inflate_2m_then_4k_when_2m_allocation_fails() -> None:
    driver, t, memory = make()
    # Fragment memory: leave only 5 wholly free 2 MiB frames.
    free_frames = np.flatnonzero(memory.frame_free == PAGES_PER_2M)
    for frame in free_frames[5:]:
        memory._take(np.array([frame * PAGES_PER_2M + 7]), PageState.APP)
    target = 5 * PAGES_PER_2M + 300
    t.model.set_target(target)
    with trio.fail_after(5):
        await driver.work()
    assert driver.size == target
    assert driver.count(PageSize.SIZE_2M) == 5
    assert driver.count(PageSize.SIZE_4K) == 300
    assert driver.stats.pages["allocFail"][PageSize.SIZE_2M] == 1
    assert driver.stats.ops[Command.BATCHED_2M_LOCK][0] >= 1
    assert driver.stats.ops[Command.BATCHED_LOCK][0] == 1
    consistent(driver, t, memory)


async def test_2m_rounding_like_linux() -> None:
    # DIV_ROUND_UP: a target that is not a multiple of 512 is overshot with 2 MiB pages,
    # and the deflate hysteresis keeps it.
    driver, t, memory = make(target=3 * PAGES_PER_2M + 100)
    with trio.fail_after(5):
        await driver.work()
        await driver.work()
    assert driver.size == 4 * PAGES_PER_2M
    assert driver.count(PageSize.SIZE_4K) == 0
    consistent(driver, t, memory)


async def test_fallback_to_4k_after_16_refused_2m_pages() -> None:
    driver, t, memory = make()
    # Pin one page in each of the first 16 wholly free frames (the allocator's first picks).
    frames = np.flatnonzero(memory.frame_free == PAGES_PER_2M)[:MAX_REFUSED]
    pinned = [(int(f) * PAGES_PER_2M + 3, 1) for f in frames]
    t.model.set_pinned("test", pinned)
    target = 32 * PAGES_PER_2M
    t.model.set_target(target)
    with trio.fail_after(10):
        await driver.work()
        s = driver.stats.pages
        assert s["errAlloc"][PageSize.SIZE_2M] == MAX_REFUSED
        assert s["errFree"][PageSize.SIZE_2M] == 0  # split, not freed
        # 16 refused 2 MiB pages split into 8192 4 KiB candidates; the 16 pinned ones are
        # refused again and end this pass at 4 KiB.
        assert s["errAlloc"][PageSize.SIZE_4K] == MAX_REFUSED
        assert driver.count(PageSize.SIZE_2M) == 16
        assert driver.count(PageSize.SIZE_4K) == 16 * (PAGES_PER_2M - 1)
        # 16 frames short: the next tick starts at 2 MiB again and rounds up (Linux's
        # DIV_ROUND_UP); the 496-frame excess is inside the deflate slack and stays.
        for _ in range(3):
            await driver.work()
    assert driver.size == 17 * PAGES_PER_2M + 16 * (PAGES_PER_2M - 1) == target + 496
    ballooned = set(driver.pages(PageSize.SIZE_4K).tolist())
    assert not ballooned & {p for p, _ in pinned}
    consistent(driver, t, memory)


async def test_deflate_4k_first_then_2m_and_hysteresis() -> None:
    driver, t, memory = make()
    free_frames = np.flatnonzero(memory.frame_free == PAGES_PER_2M)
    for frame in free_frames[4:]:
        memory._take(np.array([frame * PAGES_PER_2M + 7]), PageState.APP)
    t.model.set_target(4 * PAGES_PER_2M + 1000)
    with trio.fail_after(5):
        await driver.work()
        assert (driver.count(PageSize.SIZE_2M), driver.count(PageSize.SIZE_4K)) == (4, 1000)
        # Within the 512-frame slack: nothing.
        t.model.set_target(driver.size - 511)
        n = len(t.log)
        await driver.work()
        assert [c for c in t.commands()[n:]] == [Command.GET_TARGET]
        assert driver.size == 4 * PAGES_PER_2M + 1000
        # 600 below: deflate one batch of 512 4 KiB pages; then 88 over is within the slack.
        t.model.set_target(driver.size - 600)
        n = len(t.log)
        await driver.work()
        assert Command.BATCHED_2M_UNLOCK not in t.commands()[n:]
        assert driver.count(PageSize.SIZE_4K) == 488 and driver.count(PageSize.SIZE_2M) == 4
        # Below every 4 KiB page: the 4 KiB pages go first, then 2 MiB pages.
        t.model.set_target(PAGES_PER_2M)
        n = len(t.log)
        await driver.work()
        unlocks = [
            c for c in t.commands()[n:] if c in (Command.BATCHED_UNLOCK, Command.BATCHED_2M_UNLOCK)
        ]
        assert unlocks == [Command.BATCHED_UNLOCK, Command.BATCHED_2M_UNLOCK]
        assert driver.count(PageSize.SIZE_4K) == 0
        assert driver.size == PAGES_PER_2M
        # Target 0 always deflates, even within the slack.
        t.model.set_target(0)
        await driver.work()
    assert driver.size == 0 and t.model.size == 0
    assert driver.stats.pages["free"] == [1000, 4]  # 4k, 2M
    consistent(driver, t, memory)


async def test_notneeded_refusals_when_target_drops_mid_inflation() -> None:
    driver, t, memory = make(target=3000)
    fragment = np.flatnonzero(memory.frame_free == PAGES_PER_2M)
    for frame in fragment:  # 4 KiB only
        memory._take(np.array([frame * PAGES_PER_2M]), PageState.APP)

    def lower(request: Request, response: Response) -> None:
        if request.command == Command.GET_TARGET and driver.size == 0:
            t.model.set_target(300)  # lands between GET_TARGET and the first LOCK

    t.after = lower
    with trio.fail_after(5):
        await driver.work()
    # The batch of 512 meets the lowered target: 300 fit, 212 are NOTNEEDED and released;
    # the LOCK response's target (300) is used at once, so inflation stops there.
    assert driver.size == 300
    assert driver.target == 300
    assert driver.stats.pages["errAlloc"][PageSize.SIZE_4K] == 212
    assert driver.stats.pages["errFree"][PageSize.SIZE_4K] == 1
    assert t.model.counters["lock refused ERROR_PPN_NOTNEEDED (4k)"] == 212
    consistent(driver, t, memory)


async def test_reset_mid_inflation_recovers_with_nothing_lost() -> None:
    driver, t, memory = make()
    # 4 KiB pages only, so that the pass takes several batches.
    t.model.set_target(2000)
    for frame in np.flatnonzero(memory.frame_free == PAGES_PER_2M):
        memory._take(np.array([frame * PAGES_PER_2M]), PageState.APP)
    free_before = memory.count(PageState.FREE)
    batches = 0

    def reset_after_second_batch(request: Request, response: Response) -> None:
        nonlocal batches
        if request.command == Command.BATCHED_LOCK:
            batches += 1
            if batches == 2:
                t.deliver(t.model.demand_reset())

    t.after = reset_after_second_batch
    with trio.fail_after(5):
        await driver.work()
        # The third batch met ERROR_RESET: the whole batch failed, inflation stopped.
        assert driver.reset_required
        assert driver.stats.ops[Command.BATCHED_LOCK][1] == 1
        assert driver.size == 1024  # what the driver believes is still ballooned
        assert memory.count(PageState.BALLOON) == 1024
        await driver.work()  # reset: pop without UNLOCK, START, then inflate again
    assert Command.BATCHED_UNLOCK not in t.commands()
    assert driver.stats.general["reset"] == 2
    assert driver.size == 2000 == t.model.size
    assert memory.count(PageState.FREE) == free_before - 2000
    assert memory.count(PageState.BALLOON) == 2000
    consistent(driver, t, memory)


async def test_start_zero_then_pop_on_exit() -> None:
    driver, t, memory = make(target=3 * PAGES_PER_2M)
    with trio.fail_after(5):
        await driver.work()
        assert driver.size == 3 * PAGES_PER_2M
        n = len(t.log)
        await driver.close()
    assert t.commands()[n:] == [Command.VMCI_DOORBELL_SET, Command.START]
    assert t.log[-1][0].arg1 == 0
    assert t.model.capabilities == Capability.NONE and t.model.size == 0
    # Popped, including the 2 MiB pages (Linux would loop here, see driver docstring).
    assert driver.size == 0 and memory.count(PageState.BALLOON) == 0
    assert Command.BATCHED_2M_UNLOCK not in t.commands()


async def test_shrinker_deflates_with_unlock_and_blocks_inflation() -> None:
    clock = FakeClock()
    driver, t, memory = make(
        target=2000,
        config=DriverConfig(shrinker=True, capabilities=Capability(0x36)),
        clock=clock,
    )
    with trio.fail_after(5):
        await driver.work()
        assert driver.size == 2000 and driver.max_page_size is PageSize.SIZE_4K
        freed = await driver.shrink(700)
        assert freed == 700
        assert t.model.size == 1300 and driver.size == 1300
        assert driver.stats.general["shrink"] == 1
        assert driver.stats.general["shrinkFree"] == 700
        await driver.work()
        assert driver.size == 1300  # no inflation for 5 s
        clock.now += 5.1
        await driver.work()
    assert driver.size == 2000
    consistent(driver, t, memory)


async def test_shrinker_off_by_default() -> None:
    driver, _, _ = make(target=100)
    with trio.fail_after(5):
        await driver.work()
        assert await driver.shrink(50) == 0
    assert driver.size == 512 and driver.stats.general["shrink"] == 0


async def test_basic_commands_without_batching() -> None:
    driver, t, memory = make(target=20, config=DriverConfig(capabilities=Capability(0x22)))
    with trio.fail_after(5):
        await driver.work()
        assert driver.batch_max_pages == 1 and not driver.batching
        assert driver.size == 20
        assert driver.stats.ops[Command.LOCK] == [20, 0]
        t.model.set_target(0)
        await driver.work()
    assert driver.size == 0 and driver.stats.ops[Command.UNLOCK] == [20, 0]
    consistent(driver, t, memory)


async def test_doorbell_wakes_the_worker_at_once() -> None:
    driver, t, _ = make(config=DriverConfig(poll_interval=30.0))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            while driver.reset_required:
                await trio.sleep(0.001)
            g = driver.stats.general  # "timer" counts every pass, "doorbell" those it woke
            timeouts = g["timer"] - g["doorbell"]
            t.deliver(t.model.set_target(1024))
            start = trio.current_time()
            while driver.size != 1024:
                await trio.sleep(0.001)
            # the doorbell did it, not the 30 s timer (whatever the machine's load)
            assert g["doorbell"] == 1 and g["timer"] - g["doorbell"] == timeouts
            assert trio.current_time() - start < 30.0
            await driver.close()
            nursery.cancel_scope.cancel()


async def test_polling_without_doorbell() -> None:
    driver, t, _ = make(
        config=DriverConfig(
            poll_interval=0.05, capabilities=ALL_CAPABILITIES & ~Capability.SIGNALLED_WAKEUP_CMD
        )
    )
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            await trio.sleep(0.1)
            assert t.model.doorbell is None
            t.deliver(t.model.set_target(1024))  # no event: nobody registered
            while driver.size != 1024:
                await trio.sleep(0.01)
            assert driver.stats.general["doorbell"] == 0
            assert driver.stats.general["timer"] >= 2
            nursery.cancel_scope.cancel()


async def test_debugfs_text_layout() -> None:
    driver, _, _ = make(target=600)
    with trio.fail_after(5):
        await driver.work()
    text = driver.render()
    lines = text.splitlines()
    assert len(lines) == 5 + 10 + 5 + 10
    assert lines[0] == "balloon capabilities  :             0x3e"
    assert lines[1] == "used capabilities     :             0x3e"
    assert lines[2] == "is resetting          :                n"
    assert lines[3] == "target                :              600"
    assert lines[4] == "current               :             1024"
    assert lines[5] == "start                 :                1 (0 failed)"
    assert "doorbellSet           :                2 (1 failed)" in lines
    assert "2m-lock               :                1 (0 failed)" in lines
    assert "timer                 :                1" in lines
    assert "alloc             (2M):                2" in lines
    assert lines[-1] == "free              (2M):                0"
    assert render_debugfs(driver.snapshot()) == text
    fresh = BalloonDriver(
        ModelTransport(BalloonModel(), BytearrayRam([(0, 4096 * 16)])), GuestMemory(16)
    )
    assert fresh.render().splitlines()[1] == "used capabilities     :                0"


@pytest.mark.parametrize("caps", [0x3E, 0x2E, 0x26, 0x22])
async def test_inflate_deflate_cycle_for_each_capability_set(caps: int) -> None:
    driver, t, memory = make(config=DriverConfig(capabilities=Capability(caps)))
    with trio.fail_after(10):
        for target in (3000, 5000, 1200, 0, 2100):
            t.model.set_target(target)
            for _ in range(3):
                await driver.work()
            consistent(driver, t, memory)
            assert abs(driver.size - target) < PAGES_PER_2M or target == 0
        await driver.close()
    assert memory.count(PageState.BALLOON) == 0


# ---------------------------------------------------------------------------------------
# Several LOCKs in flight: the inflate's sliding window


class GatedTransport(ModelTransport):
    """A device that answers each batched LOCK only when the test says so (by batch page),
    in any order: the driver's view of LOCKs in flight, with no timing in it. Every other
    command, and every LOCK while ``gated`` is off, is answered at once."""

    max_in_flight = 16

    def __init__(self, model: BalloonModel, ram: BytearrayRam) -> None:
        super().__init__(model, ram)
        self.gated = False
        #: the commands gated while ``gated`` is on
        self.gate_commands = {Command.BATCHED_LOCK, Command.BATCHED_2M_LOCK}
        self.waiting: dict[int, trio.Event] = {}  # batch page -> the gate of its LOCK
        self.failing: set[int] = set()  # batch pages whose LOCK fails with DeviceGone
        self.sent = 0  # gated LOCKs received
        self.most = 0  # most LOCKs waiting at once

    async def command(self, request: Request) -> Response:
        if not self.gated or request.command not in self.gate_commands:
            return await super().command(request)
        page = request.arg1
        assert page not in self.waiting, "two commands in flight share a batch page"
        gate = self.waiting[page] = trio.Event()
        self.sent += 1
        self.most = max(self.most, len(self.waiting))
        try:
            await gate.wait()
        finally:
            del self.waiting[page]
        if page in self.failing:
            raise DeviceGone("the device went away")
        return await super().command(request)  # the device sees the LOCK only now

    async def answer(self, *pages: int) -> None:
        """Let the LOCKs on these batch pages through; return when the driver waits again."""
        for page in pages:
            self.waiting[page].set()
        await trio.testing.wait_all_tasks_blocked()


def make_gated(in_flight: int) -> tuple[BalloonDriver, GatedTransport, GuestMemory]:
    """A driver with ``in_flight`` LOCKs in flight, reset, over 4 KiB pages only."""
    model = BalloonModel(target=0)
    ram = BytearrayRam([(0, RAM_PAGES * 4096)], record=False)
    transport = GatedTransport(model, ram)
    memory = GuestMemory(RAM_PAGES, kernel_pages=1024)
    config = DriverConfig(in_flight=in_flight, capabilities=Capability(0x36))  # no 2 MiB
    driver = BalloonDriver(transport, memory, config, clock=FakeClock())
    return driver, transport, memory


async def _start_gated_tick(driver: BalloonDriver, nursery: trio.Nursery) -> trio.CancelScope:
    """Start one tick in ``nursery`` (cancellable through the returned scope); return when
    it waits."""
    scope = trio.CancelScope()

    async def tick() -> None:
        with scope:
            await driver.work()

    nursery.start_soon(tick)
    await trio.testing.wait_all_tasks_blocked()
    return scope


async def _start_gated(
    driver: BalloonDriver, t: GatedTransport, nursery: trio.Nursery, target: int
) -> trio.CancelScope:
    """Reset the driver, set ``target``, and start one tick in ``nursery`` (cancellable
    through the returned scope); return when the driver waits on its LOCKs."""
    await driver.work()  # reset, nothing to inflate
    t.model.set_target(target)
    t.gated = True
    return await _start_gated_tick(driver, nursery)


async def test_sliding_window_sends_the_next_lock_when_the_oldest_is_answered() -> None:
    driver, t, memory = make_gated(4)
    target = 8 * 512 + 100  # 9 batches: 8 full, one of 100
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await _start_gated(driver, t, nursery, target)
            b0, b1, b2, b3 = driver._batch_pfns  # one batch page per LOCK in flight
            assert b0 == memory.batch_pfn
            assert set(t.waiting) == {b0, b1, b2, b3} and t.sent == 4  # the window is full
            await t.answer(b3)  # the newest answered: not taken before the oldest
            assert set(t.waiting) == {b0, b1, b2} and t.sent == 4
            await t.answer(b0)  # the oldest taken: one more goes out, on its batch page
            assert set(t.waiting) == {b1, b2, b0} and t.sent == 5
            assert driver.size == 512
            await t.answer(b1)
            assert set(t.waiting) == {b2, b0, b1} and t.sent == 6
            await t.answer(b2)  # b2 and the answered b3 taken: two more go out
            assert set(t.waiting) == {b0, b1, b2, b3} and t.sent == 8
            assert driver.size == 4 * 512
            await t.answer(b0)  # the last batch: 100 pages, counting the 3 * 512 in flight
            assert set(t.waiting) == {b1, b2, b3, b0} and t.sent == 9
            await t.answer(b1, b2, b3, b0)
            assert not t.waiting and t.sent == 9 and t.most == 4
    assert driver.size == target == t.model.size
    assert driver.stats.ops[Command.BATCHED_LOCK] == [9, 0]
    assert driver.stats.pages["alloc"][PageSize.SIZE_4K] == target  # nothing allocated twice
    consistent(driver, t, memory)


async def test_one_in_flight_is_one_lock_at_a_time_on_one_batch_page() -> None:
    driver, t, memory = make_gated(1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await _start_gated(driver, t, nursery, 3 * 512)
            (page,) = driver._batch_pfns  # the one batch page
            assert page == memory.batch_pfn
            for k in range(1, 4):
                assert list(t.waiting) == [page] and t.sent == k
                await t.answer(page)
            assert not t.waiting and t.most == 1
    assert driver.size == 3 * 512
    consistent(driver, t, memory)


async def test_target_lowered_with_locks_in_flight_stops_the_sending() -> None:
    driver, t, memory = make_gated(4)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await _start_gated(driver, t, nursery, 8 * 512)
            b0, b1, b2, b3 = driver._batch_pfns
            t.model.set_target(600)  # the device's target drops with 4 LOCKs in flight
            await t.answer(b0)  # 512 locked; its response carries 600: nothing more is sent
            assert driver.target == 600 and t.sent == 4
            await t.answer(b1)  # 88 locked, 424 refused NOTNEEDED: >= 16 refused, drain
            assert t.sent == 4
            await t.answer(b2, b3)  # refused whole
            assert not t.waiting and t.sent == 4
    assert driver.size == 600 == t.model.size
    s = driver.stats.pages
    assert s["errAlloc"][PageSize.SIZE_4K] == 424 + 2 * 512
    assert s["errFree"][PageSize.SIZE_4K] == 1
    assert t.model.counters["lock refused ERROR_PPN_NOTNEEDED (4k)"] == 424 + 2 * 512
    consistent(driver, t, memory)


async def test_reset_with_locks_in_flight_drains_them_then_recovers() -> None:
    driver, t, memory = make_gated(4)
    free_before = memory.count(PageState.FREE)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await _start_gated(driver, t, nursery, 8 * 512)
            b0, b1, b2, b3 = driver._batch_pfns
            await t.answer(b0)
            t.deliver(t.model.demand_reset())  # the next three meet ERROR_RESET
            await t.answer(b2)  # answered first: the sending stops before b1 is taken
            assert t.sent == 5 and driver.reset_required
            await t.answer(b1, b3, b0)
            assert not t.waiting
        assert driver.stats.ops[Command.BATCHED_LOCK][1] == 4  # b1, b2, b3 and the 5th
        assert driver.size == 512 == memory.count(PageState.BALLOON)
        t.gated = False
        await driver.work()  # reset: pop without UNLOCK, START, inflate again
    assert Command.BATCHED_UNLOCK not in t.commands()
    assert driver.size == 8 * 512 == t.model.size
    reserved = len(driver._batch_pfns) - 1  # the other batch pages, taken at the first reset
    assert memory.count(PageState.FREE) == free_before - reserved - 8 * 512
    consistent(driver, t, memory)


async def test_cancelled_with_locks_in_flight_keeps_driver_and_device_agreeing() -> None:
    driver, t, memory = make_gated(4)
    free_before = memory.count(PageState.FREE)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            scope = await _start_gated(driver, t, nursery, 8 * 512)
            b1 = driver._batch_pfns[1]
            await t.answer(b1)  # answered, not taken (b0 is older)
            scope.cancel()  # the driver stops: b0, b2, b3 never reach the device
        assert not t.waiting
        # the answered LOCK counts; the pages of the others are held (the driver cannot
        # know that they never reached the device) and the next tick resets
        assert driver.size == 512 and driver.held == 3 * 512 and driver.reset_required
        reserved = len(driver._batch_pfns) - 1  # the other batch pages, taken at the reset
        assert memory.count(PageState.FREE) == free_before - reserved - 4 * 512
        consistent(driver, t, memory)
        t.gated = False
        await driver.work()  # its first answer releases them; pop, START, inflate again
    assert driver.size == 8 * 512 and driver.held == 0
    assert memory.count(PageState.FREE) == free_before - reserved - 8 * 512
    consistent(driver, t, memory)


class RingTransport(GatedTransport):
    """A GatedTransport whose LOCK cancelled at its gate stays on the ring, as with vdev
    (the driver gave up waiting, the chain was posted): the device serves it, answering
    nobody, before any later command (ring order)."""

    def __init__(self, model: BalloonModel, ram: BytearrayRam) -> None:
        super().__init__(model, ram)
        self.ring: list[Request] = []

    def named(self) -> set[int]:
        """The PFNs the LOCKs on the ring name (4 KiB pages)."""
        out: set[int] = set()
        for r in self.ring:
            entries = batch_entries(self.ram.read(r.arg1 * 4096, r.arg2 * 8), r.arg2)
            out.update(int(p) for p in entry_pfns(entries))
        return out

    async def command(self, request: Request) -> Response:
        while self.ring:
            await ModelTransport.command(self, self.ring.pop(0))
        try:
            return await super().command(request)
        except trio.Cancelled:
            if self.gated and request.command in self.gate_commands:
                self.ring.append(request)
            raise


class WatchedMemory(GuestMemory):
    """Guest memory that notes every page given back while a LOCK on the ring names it."""

    transport: RingTransport
    lost: set[int]

    def free_balloon(self, size: PageSize, firsts: object) -> None:
        self.lost |= set(np.asarray(firsts).tolist()) & self.transport.named()
        super().free_balloon(size, firsts)  # type: ignore[arg-type]


async def test_pages_of_an_interrupted_lock_stay_held_until_the_device_served_it() -> None:
    """Cancelled with LOCKs posted and unanswered, whose chains the device serves later: no
    page of theirs is the guest's again before that (a guest writing one would lose what it
    wrote to the punch), and the reset of the next tick makes driver and device agree."""
    model = BalloonModel(target=0)
    ram = BytearrayRam([(0, RAM_PAGES * 4096)], record=False)
    t = RingTransport(model, ram)
    memory = WatchedMemory(RAM_PAGES, kernel_pages=1024)
    memory.transport, memory.lost = t, set()
    config = DriverConfig(in_flight=4, capabilities=Capability(0x36))
    driver = BalloonDriver(t, memory, config, clock=FakeClock())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            scope = await _start_gated(driver, t, nursery, 8 * 512)
            await t.answer(driver._batch_pfns[1])
            scope.cancel()
        assert len(t.ring) == 3 and len(t.named()) == 3 * 512  # b0, b2, b3: still posted
        assert driver.held == 3 * 512 and driver.reset_required
        t.gated = False
        await driver.work()  # the doorbell's unset is answered after the ring's LOCKs
    assert not memory.lost, f"{len(memory.lost)} pages given back before their LOCK was served"
    assert not t.ring and driver.held == 0
    assert driver.size == 8 * 512
    consistent(driver, t, memory)


async def test_an_interrupted_unlock_keeps_its_pages_in_the_balloon_then_resets() -> None:
    driver, t, memory = make_gated(1)
    with trio.fail_after(10):
        await driver.work()  # reset
        t.model.set_target(2 * 512)
        await driver.work()  # 1024 pages, ungated
        t.model.set_target(0)
        t.gated, t.gate_commands = True, {Command.BATCHED_UNLOCK}
        async with trio.open_nursery() as nursery:
            scope = await _start_gated_tick(driver, nursery)
            assert t.sent == 1  # the first UNLOCK waits
            scope.cancel()
        # the 512 pages of the unanswered UNLOCK are still the balloon's, and a reset is due
        assert driver.count(PageSize.SIZE_4K) == 2 * 512 == driver.size
        assert driver.reset_required
        consistent(driver, t, memory)
        t.gated = False
        await driver.work()  # reset: pop, START; the target is 0
    assert driver.size == 0 == t.model.size
    consistent(driver, t, memory)


async def test_device_gone_with_locks_in_flight_raises_it_plainly() -> None:
    driver, t, memory = make_gated(4)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await driver.work()  # reset
            t.model.set_target(8 * 512)
            t.gated = True
            raised: list[BaseException] = []

            async def tick() -> None:
                try:
                    await driver.work()
                except DeviceGone as exc:  # itself, not in an exception group
                    raised.append(exc)

            nursery.start_soon(tick)
            await trio.testing.wait_all_tasks_blocked()
            b0, b1, b2, _ = driver._batch_pfns
            t.failing.add(b2)
            await t.answer(b0, b2)  # b0 taken; b2 failed: no more sends, b1 awaited
            assert t.sent == 4 and not raised
            await t.answer(b1)  # b1 taken, then b2's error: b3 cancelled
            assert len(raised) == 1 and not t.waiting
    assert driver.size == 2 * 512 == t.model.size
    consistent(driver, t, memory)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_answer_order_target_reset_or_cancel_leaves_driver_and_device_agreeing(
    data: st.DataObject,
) -> None:
    """A window of LOCKs answered in any order, with the target moved, a reset demanded or
    the driver stopped at any point: never more LOCKs out than the window, never two on one
    batch page; afterwards driver, device and guest memory agree, and the balloon reaches
    the target."""
    in_flight = data.draw(st.sampled_from([1, 2, 4, 8]), label="in_flight")
    caps = data.draw(st.sampled_from([0x3E, 0x36]), label="capabilities")  # with 2 MiB or not
    whole = data.draw(st.integers(0, 8), label="whole 2 MiB frames left")
    target = data.draw(st.integers(1, 12 * 512), label="target")

    async def scenario() -> None:
        driver, t, memory = make_gated(in_flight)
        driver.config = DriverConfig(in_flight=in_flight, capabilities=Capability(caps))
        for frame in np.flatnonzero(memory.frame_free == PAGES_PER_2M)[whole:]:
            memory._take(np.array([frame * PAGES_PER_2M + 1]), PageState.APP)
        reset = False
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                scope = await _start_gated(driver, t, nursery, target)
                window = len(driver._batch_pfns) if driver.batching else 1
                assert window == in_flight
                while t.waiting:
                    assert len(t.waiting) <= window
                    action = data.draw(
                        st.sampled_from(["answer"] * 6 + ["target", "reset", "cancel"])
                    )
                    if action == "target":
                        t.model.set_target(data.draw(st.integers(0, 12 * 512), label="new"))
                    elif action == "reset":
                        t.model.demand_reset()
                        reset = True
                    elif action == "cancel":
                        scope.cancel()
                        await trio.testing.wait_all_tasks_blocked()
                    else:
                        page = data.draw(st.sampled_from(sorted(t.waiting)), label="answer")
                        await t.answer(page)
                assert t.most <= window
            if not reset:
                consistent(driver, t, memory)  # at once: no LOCK left half-known
            t.gated = False
            for _ in range(4):
                await driver.work()
        consistent(driver, t, memory)
        size, goal = driver.size, t.model.target
        assert goal <= size < goal + PAGES_PER_2M or (goal == 0 and size == 0)

    trio.run(scenario)
