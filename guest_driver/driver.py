"""The guest balloon driver core: Linux ``drivers/misc/vmw_balloon.c``, without the kernel.

Sans-I/O: the core owns the balloon's state (reset flag, negotiated capabilities, target,
size, the ballooned pages, the statistics) and the algorithm; every exchange with the
device goes through an injected :class:`~guest_driver.transport.Transport` (``command``,
guest-RAM ``read``/``write`` for the batch page, ``wait_event``), and pages come from an
injected :class:`PageSource` (the guest memory model). The core never touches a socket, a
file or a clock of its own (the clock is injected too); it uses trio only for the tasks of
the LOCKs an inflate keeps in flight (one nursery per inflate).

Shape: ``await driver.work()`` is ``vmballoon_work()`` (one tick: reset when required,
GET_TARGET, inflate or deflate); ``await driver.run()`` repeats it every ``poll_interval``
seconds or as soon as the doorbell rings; ``await driver.close()`` is ``vmballoon_exit()``;
``await driver.shrink(n)`` is the optional shrinker's ``scan_objects``.

Behaviour followed from vmw_balloon.c (the newest mainline version), function by function:

* ``_reset``      = vmballoon_reset: doorbell unset, pop (no UNLOCK), START(caps), batching
                    set-up or START(0), ``reset`` stat, flag cleared, doorbell set, GUEST_ID.
* ``_change``     = vmballoon_change: 0 while resetting; 512-frame deflate hysteresis unless
                    the target is 0; no inflation within 5 s of a shrink.
* ``_inflate``    = vmballoon_inflate: largest page size first, batches of up to 512 pages,
                    ``>= 16`` refused pages or an allocation failure -> next smaller size, the
                    refused 2 MiB pages split into 4 KiB candidates; whole-batch error stops.
                    With ``in_flight`` > 1, a sliding window of LOCKs whose results are
                    taken in order, as if they had been sent one by one.
* ``_deflate``    = vmballoon_deflate: 4 KiB first, then 2 MiB; pages the host refused to
                    unlock go back into the balloon.
* ``_lock``       = vmballoon_lock: whole-batch failure overrides every entry's status.
* ``_cmd``        = __vmballoon_cmd: per-command counters, the target taken from every
                    successful target-carrying response at once, ERROR_RESET sets the flag.

Deliberate differences (see also ``render_debugfs``):

* Statistics are always counted (Linux counts only after debugfs was first read).
* ``_pop`` releases both page sizes whatever the negotiated capabilities are. Linux's pop
  calls vmballoon_deflate, which stops at ``max_page_size``; after the START(0) of module
  exit that is 4 KiB, so a balloon still holding 2 MiB pages would loop for ever.
* The shrinker bails out (like ``down_read_trylock`` failing) whenever a tick is running,
  not only during a reset: here one task could otherwise interleave with another between
  the write of the shared batch page and the command that consumes it.
* Entry PFNs are taken from the driver's own list, not read back from the batch page.
* Inflation keeps up to ``in_flight`` batched LOCKs in flight (default 8, each on its own
  batch page; 1 is vmw_balloon's one at a time). Linux cannot be interrupted there; this
  driver can (a stop, or the device failing), and then it cannot know what the device did
  with the LOCKs it did not see answered: their chains may still be on the ring, to be
  served later. So their pages are *held*, neither ballooned nor the guest's, until the
  device answers a command sent after them (it serves the ring in order and answers a LOCK
  only once its pages are gone: docs/PROTOCOL.md section 2, rules 2 and 3), or until the
  device is gone for good (:meth:`BalloonDriver.abandon`, or a ``close`` that found it
  gone); and the driver resets on its next tick (START forgets the device's balloon), so
  driver and device agree again whatever the device did with them. An UNLOCK interrupted
  likewise puts its pages back into the balloon and asks for the reset. Before, the pages
  of an unanswered LOCK went back to the guest at once: a guest writing one before the
  device served the LOCK lost what it wrote to the punch.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt
import trio

from guest_driver.guest_memory import PAGES_PER_2M, PageSize
from guest_driver.transport import Transport
from protocol import vmw
from protocol.errors import DeviceGone
from protocol.units import PAGE_SIZE
from protocol.vmw import (
    ALL_CAPABILITIES,
    COMMAND_DEBUGFS_NAME,
    Capability,
    Command,
    EventKind,
    GuestType,
    Request,
    Response,
    Status,
)

log = logging.getLogger(__name__)

I64Array = npt.NDArray[np.int64]

MAX_REFUSED = 16  # VMW_BALLOON_MAX_REFUSED
SHRINK_DELAY = 5.0  # VMBALLOON_SHRINK_DELAY, seconds
BATCH_MAX_PAGES = vmw.BATCH_MAX_ENTRIES  # PAGE_SIZE / sizeof(struct vmballoon_batch_entry)

STAT_NAMES = ("timer", "doorbell", "reset", "shrink", "shrinkFree")
PAGE_STAT_NAMES = ("alloc", "allocFail", "errAlloc", "errFree", "free")

_EMPTY = np.empty(0, dtype=np.int64)
_SUCCESS = int(Status.SUCCESS)  # a plain int: numpy compares it without the enum


class PageSource(Protocol):
    """What the core needs of the guest's memory (see guest_memory.GuestMemory)."""

    @property
    def total_pages(self) -> int: ...

    @property
    def batch_pfn(self) -> int | None: ...

    def alloc_balloon(self, size: PageSize, n: int) -> I64Array: ...

    def free_balloon(self, size: PageSize, firsts: npt.ArrayLike) -> None: ...


#: see :attr:`DriverConfig.in_flight`
DEFAULT_IN_FLIGHT = 8


@dataclass(frozen=True)
class DriverConfig:
    capabilities: Capability = ALL_CAPABILITIES  # VMW_BALLOON_CAPABILITIES, 0x3e
    poll_interval: float = 1.0  # the work item's period (round_jiffies_relative(HZ))
    guest_type: GuestType = GuestType.LINUX
    shrinker: bool = False  # vmwballoon_shrinker_enable
    shrink_delay: float = SHRINK_DELAY
    #: batched LOCK commands kept in flight while inflating, each with its own batch page
    #: (PROTOCOL.md section 2, "Several commands in flight"), as a sliding window: the next
    #: batch is allocated and sent while earlier ones are in flight. 1 is vmw_balloon's own
    #: discipline (one command at a time, still available); more needs a transport that
    #: can carry them (``max_in_flight``) and a page source that can spare the batch pages
    #: (``reserve_page``), else the driver stays at 1. The default 8 is measured (A/B
    #: interleaved in one session, 256 MiB, 3 reps per run, 5-8 paired runs in each of
    #: four sessions, load 1-1.8, see docs/bench/README.md 1c): with the sliding window,
    #: 4 KiB contiguous inflate 8 in flight against 4 +12 / +23 / +14 / +17 % pages/s
    #: (median of the paired ratios), against the lock-step window of 4 it replaced
    #: +19 / +8 / +14 / +33 %, vdev CPU per GiB the same (0.31-0.43 s); 4 KiB scattered
    #: 8 against 4 +2 / +8 / +13 %. A sliding 4 was within the noise of the lock-step 4.
    in_flight: int = DEFAULT_IN_FLIGHT


@dataclass
class Stats:
    """The counters of Linux's debugfs file, by the names it prints."""

    ops: dict[Command, list[int]] = field(
        default_factory=lambda: {c: [0, 0] for c in COMMAND_DEBUGFS_NAME}
    )
    general: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAT_NAMES, 0))
    pages: dict[str, list[int]] = field(
        default_factory=lambda: {n: [0, 0] for n in PAGE_STAT_NAMES}
    )

    def page_inc(self, name: str, size: PageSize, n: int = 1) -> None:
        self.pages[name][size] += n


class _PfnStack:
    """A LIFO of PFNs (Linux's balloon page lists are LIFO), kept as numpy chunks."""

    def __init__(self) -> None:
        self._chunks: list[I64Array] = []
        self.count = 0

    def push(self, pfns: I64Array) -> None:
        if pfns.size:
            self._chunks.append(pfns)
            self.count += int(pfns.size)

    def pop(self, n: int) -> I64Array:
        out: list[I64Array] = []
        need = n
        while need > 0 and self._chunks:
            last = self._chunks[-1]
            if last.size <= need:
                out.append(self._chunks.pop())
                need -= int(last.size)
            else:
                out.append(last[last.size - need :])
                self._chunks[-1] = last[: last.size - need]
                need = 0
        got = np.concatenate(out) if out else _EMPTY
        self.count -= int(got.size)
        return got

    def all(self) -> I64Array:
        return np.concatenate(self._chunks) if self._chunks else _EMPTY


@dataclass
class _Ctl:
    """vmballoon_ctl: the state of one inflate or deflate pass."""

    size: PageSize
    inflate: bool
    refused: list[I64Array] = field(default_factory=list)
    n_refused: int = 0
    prealloc: I64Array = field(default_factory=lambda: _EMPTY)


@dataclass(eq=False)
class _Flight:
    """One LOCK of the inflate's window: its pages, its batch page, its result once
    answered (or the error its task met)."""

    size: PageSize
    pages: I64Array
    batch_pfn: int | None
    done: trio.Event = field(default_factory=trio.Event)
    result: tuple[bool, I64Array] | None = None
    error: Exception | None = None

    @property
    def failed(self) -> bool:
        """Answered with a failed LOCK, or its task failed."""
        return self.error is not None or (self.result is not None and not self.result[0])


class BalloonDriver:
    """One balloon, one device. Not safe for concurrent ``work``/``close``; see ``shrink``."""

    def __init__(
        self,
        transport: Transport,
        memory: PageSource,
        config: DriverConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.memory = memory
        self.config = config or DriverConfig()
        self.clock = clock
        self.reset_required = True  # both drivers start with the flag set
        self.capabilities = Capability.NONE
        self.max_page_size = PageSize.SIZE_4K
        self.batch_max_pages = 1
        self.batching = False
        self.target = 0
        self.size = 0
        self.shrink_timeout = float("-inf")
        self.doorbell_registered = False
        self.stats = Stats()
        self.closed = False
        self._pages = {PageSize.SIZE_4K: _PfnStack(), PageSize.SIZE_2M: _PfnStack()}
        self._busy = False
        self._batch_pfns: list[int] = []  # batch pages, one per LOCK in flight (in_flight)
        #: pages of LOCKs interrupted unanswered: the guest's again once the device answers
        #: a later command (module docstring)
        self._held: list[tuple[PageSize, I64Array]] = []

    # ------------------------------------------------------------------------------------
    # public

    async def run(self) -> None:
        """The work item: a tick now, then every ``poll_interval`` s or on the doorbell."""
        while not self.closed:
            await self.work()
            event = await self.transport.wait_event(self.config.poll_interval)
            if event is not None:
                # vmballoon_doorbell: count, then run the work at once.
                self.stats.general["doorbell"] += 1
                log.debug("doorbell: %s", event.name)

    async def work(self) -> None:
        """vmballoon_work(): one pass."""
        if self._busy or self.closed:
            return
        self._busy = True
        try:
            if self.reset_required:
                await self._reset()
            self.stats.general["timer"] += 1
            change = 0
            if await self._send_get_target():
                change = self._change()
            if change > 0:
                await self._inflate()
            elif change < 0:
                await self._deflate(0, coordinated=True)
        finally:
            self._busy = False

    async def close(self) -> None:
        """vmballoon_exit(): doorbell unset, START(0), then pop every page."""
        if self.closed:
            return
        self.closed = True
        self._busy = True
        try:
            await self._vmci_cleanup()
            await self._send_start(Capability.NONE)
        except DeviceGone:
            self._release_held()  # nobody left to punch them
            raise
        finally:
            self._pop()
            self._busy = False

    def abandon(self) -> None:
        """The device is gone for good: stop, and release every ballooned page to the guest
        without a word to the device (there is nobody to tell), held ones too. :meth:`close`
        without its commands."""
        self.closed = True
        self._pop()
        self._release_held()

    @property
    def held(self) -> int:
        """Frames held back from the guest: the pages of LOCKs interrupted unanswered."""
        return sum(int(pages.size) * size.frames for size, pages in self._held)

    async def shrink(self, nr_frames: int) -> int:
        """vmballoon_shrinker_scan(): deflate (with UNLOCK) under guest memory pressure."""
        if not self.config.shrinker or nr_frames <= 0:
            return 0
        self.stats.general["shrink"] += 1
        if self._busy or self.closed:
            return 0
        self._busy = True
        try:
            deflated = await self._deflate(nr_frames, coordinated=True)
        finally:
            self._busy = False
        self.stats.general["shrinkFree"] += deflated
        self.shrink_timeout = self.clock() + self.config.shrink_delay
        return deflated

    def pages(self, size: PageSize) -> I64Array:
        """The first PFNs of the ballooned pages of ``size``."""
        return self._pages[size].all()

    def count(self, size: PageSize) -> int:
        return self._pages[size].count

    def snapshot(self) -> dict[str, object]:
        """Everything ``render_debugfs`` prints, as plain data (JSON-able)."""
        return {
            "balloon capabilities": int(self.config.capabilities),
            "used capabilities": int(self.capabilities),
            "is resetting": self.reset_required,
            "target": self.target,
            "current": self.size,
            "ops": {COMMAND_DEBUGFS_NAME[c]: list(v) for c, v in self.stats.ops.items()},
            "general": dict(self.stats.general),
            "pages": {k: list(v) for k, v in self.stats.pages.items()},
            "size_4k": self.count(PageSize.SIZE_4K),
            "size_2m": self.count(PageSize.SIZE_2M),
            "doorbell registered": self.doorbell_registered,
        }

    def render(self) -> str:
        return render_debugfs(self.snapshot())

    # ------------------------------------------------------------------------------------
    # commands

    async def _cmd(self, command: Command, arg1: int = 0, arg2: int = 0) -> Response:
        """__vmballoon_cmd(): count, send, take the target, note a demanded reset."""
        ops = self.stats.ops[command]
        ops[0] += 1
        response = await self.transport.command(Request(int(command), arg1, arg2))
        if self._held:  # answered after every interrupted LOCK: those are served
            self._release_held()
        status = response.status
        if status == Status.SUCCESS and command in vmw.TARGET_CARRYING:
            self.target = response.result
        if status not in (Status.SUCCESS, Status.SUCCESS_WITH_CAPABILITIES):
            ops[1] += 1
            log.debug("command %s failed: status %#x", command.name, status)
        if status == Status.ERROR_RESET:
            self.reset_required = True
        return response

    async def _send_start(self, caps: Capability) -> bool:
        response = await self._cmd(Command.START, int(caps))
        if response.status == Status.SUCCESS_WITH_CAPABILITIES:
            self.capabilities = Capability(response.capabilities & int(ALL_CAPABILITIES))
        elif response.status == Status.SUCCESS:
            self.capabilities = Capability.BASIC_CMDS
        else:
            return False
        # 2 MiB pages only with batching (vmballoon_send_start).
        self.max_page_size = PageSize.SIZE_4K
        if Capability.BATCHED_2M_CMDS in self.capabilities and (
            Capability.BATCHED_CMDS in self.capabilities
        ):
            self.max_page_size = PageSize.SIZE_2M
        return True

    async def _send_get_target(self) -> bool:
        limit = self.memory.total_pages
        if Capability.BIT64_TARGET not in self.capabilities and limit > vmw.U32_MAX:
            return False
        response = await self._cmd(Command.GET_TARGET, limit)
        return response.status == Status.SUCCESS

    async def _vmci_cleanup(self) -> None:
        await self._cmd(Command.VMCI_DOORBELL_SET, vmw.VMCI_INVALID_ID, vmw.VMCI_INVALID_ID)
        self.doorbell_registered = False

    async def _vmci_init(self) -> bool:
        if Capability.SIGNALLED_WAKEUP_CMD not in self.capabilities:
            return True
        ids = self.transport.doorbell_ids
        if ids is not None:
            response = await self._cmd(Command.VMCI_DOORBELL_SET, ids[0], ids[1])
            if response.status == Status.SUCCESS:
                self.doorbell_registered = True
                return True
        await self._vmci_cleanup()
        return False

    # ------------------------------------------------------------------------------------
    # reset

    def _init_batching(self) -> bool:
        if self.memory.batch_pfn is None:
            return False
        self.batching = True
        self.batch_max_pages = BATCH_MAX_PAGES
        if not self._batch_pfns:
            self._batch_pfns = [self.memory.batch_pfn]
            want = min(self.config.in_flight, getattr(self.transport, "max_in_flight", 1))
            reserve = getattr(self.memory, "reserve_page", None)
            while reserve is not None and len(self._batch_pfns) < want:
                pfn = reserve()
                if pfn is None:
                    break
                self._batch_pfns.append(int(pfn))
        return True

    def _deinit_batching(self) -> None:
        self.batching = False
        self.batch_max_pages = 1

    async def _reset(self) -> None:
        """vmballoon_reset()."""
        await self._vmci_cleanup()
        self._pop()  # free every page, skipping the monitor unlock
        if not await self._send_start(self.config.capabilities):
            return
        if Capability.BATCHED_CMDS in self.capabilities:
            if not self._init_batching():
                # Tell the monitor with a null capability; retry on the next tick.
                await self._send_start(Capability.NONE)
                return
        elif Capability.BASIC_CMDS in self.capabilities:
            self._deinit_batching()
        self.stats.general["reset"] += 1
        self.reset_required = False
        if not await self._vmci_init():
            log.warning(
                "failed to initialize the doorbell; polling every %ss", self.config.poll_interval
            )
        response = await self._cmd(Command.GUEST_ID, int(self.config.guest_type))
        if response.status != Status.SUCCESS:
            log.warning("failed to send the guest ID to the host")

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for size, pages in held:
            self.memory.free_balloon(size, pages)

    def _pop(self) -> None:
        """vmballoon_pop(): release every ballooned page without telling the host."""
        for size in PageSize:
            pfns = self._pages[size].pop(self._pages[size].count)
            if pfns.size:
                self.size -= int(pfns.size) * size.frames
                self.stats.page_inc("free", size, int(pfns.size))
                self.memory.free_balloon(size, pfns)

    # ------------------------------------------------------------------------------------
    # the algorithm

    def _change(self) -> int:
        """vmballoon_change()."""
        size, target = self.size, self.target
        if self.reset_required:
            return 0
        if target < size and target != 0 and size - target < PAGES_PER_2M:
            return 0  # a 2 MiB slack on deflate, unless the balloon is emptied
        if target > size and self.clock() < self.shrink_timeout:
            return 0  # a shrink happened recently: no inflation
        return target - size

    def _alloc_page_list(self, ctl: _Ctl, n: int) -> tuple[I64Array, bool]:
        """vmballoon_alloc_page_list(): pre-allocated (split) pages first, then fresh ones."""
        take = min(n, int(ctl.prealloc.size))
        pre, ctl.prealloc = ctl.prealloc[:take], ctl.prealloc[take:]
        want = n - take
        fresh = self.memory.alloc_balloon(ctl.size, want) if want else _EMPTY
        failed = fresh.size < want
        # Linux counts every allocation attempt, the failing one included.
        self.stats.page_inc("alloc", ctl.size, int(fresh.size) + int(failed))
        if failed:
            self.stats.page_inc("allocFail", ctl.size)
        pages = np.concatenate([pre, fresh]) if take else fresh
        return pages, failed

    async def _lock(
        self, size: PageSize, inflate: bool, pfns: I64Array, batch_pfn: int | None = None
    ) -> tuple[bool, I64Array]:
        """vmballoon_lock(): one (un)lock operation; returns (batch ok, per-entry ok mask).
        ``batch_pfn``: the batch page to use (default the first)."""
        n = int(pfns.size)
        if self.batching:
            page = self.memory.batch_pfn if batch_pfn is None else batch_pfn
            gpa = int(page or 0) * PAGE_SIZE
            if inflate:
                cmd = Command.BATCHED_2M_LOCK if size else Command.BATCHED_LOCK
            else:
                cmd = Command.BATCHED_2M_UNLOCK if size else Command.BATCHED_UNLOCK
            await self.transport.write(gpa, vmw.build_batch(pfns))
            response = await self._cmd(cmd, gpa // PAGE_SIZE, n)
            batch_status = response.status
            if batch_status == Status.SUCCESS:
                entries = vmw.batch_entries(await self.transport.read(gpa, n * 8), n)
                statuses = vmw.entry_statuses(entries)
            else:
                statuses = np.full(n, batch_status, dtype=np.uint64)
        else:
            pfn = int(pfns[0])
            if pfn > vmw.U32_MAX:  # non-batched PFNs must fit in 32 bits
                batch_status = Status.ERROR_PPN_INVALID
            else:
                cmd = Command.LOCK if inflate else Command.UNLOCK
                batch_status = (await self._cmd(cmd, pfn, n)).status
            statuses = np.full(n, batch_status, dtype=np.uint64)
        ok = statuses == _SUCCESS
        refused = n - int(np.count_nonzero(ok))
        if refused:
            self.stats.page_inc("errAlloc", size, refused)
        return batch_status == Status.SUCCESS, ok

    def _apply(self, ctl: _Ctl, pages: I64Array, ok: I64Array) -> None:
        """Take one LOCK's result: its locked pages into the balloon, the refused ones aside."""
        bad = pages[~ok]
        if bad.size:
            ctl.refused.append(bad)
            ctl.n_refused += int(bad.size)
        good = pages[ok]
        self.size += int(good.size) * ctl.size.frames
        self._pages[ctl.size].push(good)

    async def _fly(self, flight: _Flight) -> None:
        """One LOCK in flight, as a task: its result (or its error) goes to ``flight``."""
        try:
            flight.result = await self._lock(flight.size, True, flight.pages, flight.batch_pfn)
        except Exception as exc:  # raised by the inflate when it takes this one, in order
            flight.error = exc
        finally:
            flight.done.set()

    async def _inflate(self) -> None:
        """vmballoon_inflate(), with a sliding window of up to ``in_flight`` LOCKs.

        A page list is allocated and its LOCK sent at once; the next one is allocated while
        it is in flight, until the window is full or the target (less what is in flight) is
        reached. The results are taken oldest first and applied exactly as if the commands
        had been sent one by one: a failed LOCK (any batch status but SUCCESS: a reset, a
        lowered target in a non-batched LOCK) stops the sending, an allocation failure or
        ``MAX_REFUSED`` refused pages stops the sending at this page size; in both cases
        what is in flight is drained (and applied) first, then inflation stops or, for
        2 MiB pages, the refused ones are split into 4 KiB candidates and it goes on with
        4 KiB. The target each LOCK response carries is taken as it arrives (``_cmd``), so a
        lowered target stops new sends at once. With a window of 1 (``in_flight=1``, or no
        batching) each LOCK is awaited where it is sent: vmw_balloon's one-at-a-time path.

        Cancelled (the driver stopped) or failed (the device gone) with LOCKs in flight:
        those in flight are cancelled, the answered ones are applied, the pages of the
        unanswered ones are held until the device has answered a later command, and the
        driver resets on its next tick (module docstring); the error propagates as it came,
        not in a group.
        """
        ctl = _Ctl(size=self.max_page_size, inflate=True)
        # the batch pages not in use, the first on top (None: the first, when alone)
        free: list[int | None] = [None]
        if self.batching and len(self._batch_pfns) > 1:
            free = list(reversed(self._batch_pfns))
        flights: deque[_Flight] = deque()
        error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._inflate_window(ctl, free, flights, nursery)
                except Exception as exc:  # raised below, out of the nursery: not in a group
                    error = exc
                    nursery.cancel_scope.cancel()
        finally:
            # Only when cancelled or failed: the answered LOCKs are applied; the others may
            # still be served, so their pages are held and the device's view is settled by
            # the reset of the next tick.
            for flight in flights:
                if flight.result is not None:
                    self._apply(ctl, flight.pages, flight.result[1])
                else:
                    self._held.append((flight.size, flight.pages))
                    self.reset_required = True
            if ctl.n_refused:
                # vmballoon_release_refused_pages: one errFree per release, not per page.
                self.stats.page_inc("errFree", ctl.size)
                self.memory.free_balloon(ctl.size, np.concatenate(ctl.refused))
            if ctl.prealloc.size:
                self.memory.free_balloon(PageSize.SIZE_4K, ctl.prealloc)
        if error is not None:
            raise error

    async def _inflate_window(
        self,
        ctl: _Ctl,
        free: list[int | None],
        flights: deque[_Flight],
        nursery: trio.Nursery,
    ) -> None:
        """The inflate's loop: send while the window (``free`` batch pages) has room, take
        the oldest LOCK's result, repeat. ``flights`` holds the LOCKs sent and not taken."""
        window = len(free)
        in_flight = 0  # frames of the pages in flight (self._change() knows only taken ones)
        stop = False  # a LOCK failed: send nothing more
        size_done = False  # no more sends at this page size
        while True:
            while not (stop or size_done) and len(flights) < window:
                if any(f.failed for f in flights):
                    break  # taken in order below, it stops the sending
                frames = ctl.size.frames
                to_inflate = self._change() - in_flight
                if to_inflate <= 0:
                    break
                n = min(self.batch_max_pages, -(-to_inflate // frames))
                pages, size_done = self._alloc_page_list(ctl, n)
                if not pages.size:
                    continue
                flight = _Flight(ctl.size, pages, free.pop())
                flights.append(flight)
                in_flight += int(pages.size) * frames
                if window == 1:
                    await self._fly(flight)  # vmw_balloon: one at a time
                else:
                    nursery.start_soon(self._fly, flight)
            if not flights:
                if stop or not size_done or ctl.size is PageSize.SIZE_4K:
                    return
                # Split the refused 2 MiB pages into 4 KiB candidates.
                split = [_expand(r) for r in ctl.refused]
                ctl.prealloc = np.concatenate([ctl.prealloc, *split])
                ctl.refused, ctl.n_refused = [], 0
                ctl.size = PageSize.SIZE_4K
                size_done = False
                continue
            flight = flights[0]
            if window > 1:
                await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            flights.popleft()
            in_flight -= int(flight.pages.size) * flight.size.frames
            free.append(flight.batch_pfn)
            lock_ok, ok = flight.result
            self._apply(ctl, flight.pages, ok)
            stop |= not lock_ok  # something serious went wrong: stop inflating
            size_done |= ctl.n_refused >= MAX_REFUSED

    async def _deflate(self, n_frames: int, coordinated: bool) -> int:
        """vmballoon_deflate(): 4 KiB pages first, then 2 MiB; returns frames deflated."""
        size = PageSize.SIZE_4K
        deflated = tried = 0
        while True:
            frames = size.frames
            to_deflate = n_frames - tried if n_frames else -self._change()
            if to_deflate <= 0:
                break
            n = min(self.batch_max_pages, -(-to_deflate // frames))
            pages = self._pages[size].pop(n)
            tried += int(pages.size) * frames
            refused = _EMPTY
            if coordinated and pages.size:
                try:
                    _, ok = await self._lock(size, False, pages)
                except BaseException:
                    # unanswered: still ours from the balloon's side (an UNLOCK served
                    # later punches nothing); the reset of the next tick settles the device
                    self._pages[size].push(pages)
                    self.reset_required = True
                    raise
                refused = pages[~ok]
                pages = pages[ok]
            deflated_all = pages.size == n
            self.size -= int(pages.size) * frames
            deflated += int(pages.size) * frames
            self.stats.page_inc("free", size, int(pages.size))
            if pages.size:
                self.memory.free_balloon(size, pages)
            self._pages[size].push(refused)  # the host refused: back into the balloon
            if not deflated_all:
                if size >= self.max_page_size:
                    break
                size = PageSize.SIZE_2M
        return deflated


def _expand(firsts: I64Array) -> I64Array:
    return (firsts[:, None] + np.arange(PAGES_PER_2M, dtype=np.int64)[None, :]).reshape(-1)


# ---------------------------------------------------------------------------------------
# debugfs


def _hex(value: int) -> str:
    return f"{value:#x}" if value else "0"  # C's %#x prints a bare 0


def render_debugfs(snap: dict[str, object]) -> str:
    """The text of Linux's ``/sys/kernel/debug/vmmemctl`` (vmballoon_debug_show)."""
    ops = snap["ops"]
    general = snap["general"]
    pages = snap["pages"]
    assert isinstance(ops, dict) and isinstance(general, dict) and isinstance(pages, dict)
    lines = [
        f"{'balloon capabilities':<22}: {_hex(int(snap['balloon capabilities'])):>16}",  # type: ignore[call-overload]
        f"{'used capabilities':<22}: {_hex(int(snap['used capabilities'])):>16}",  # type: ignore[call-overload]
        f"{'is resetting':<22}: {'y' if snap['is resetting'] else 'n':>16}",
        f"{'target':<22}: {snap['target']:>16}",
        f"{'current':<22}: {snap['current']:>16}",
    ]
    for command in sorted(COMMAND_DEBUGFS_NAME):
        name = COMMAND_DEBUGFS_NAME[command]
        count, failed = ops[name]
        lines.append(f"{name:<22}: {count:>16} ({failed} failed)")
    for name in STAT_NAMES:
        lines.append(f"{name:<22}: {general[name]:>16}")
    for name in PAGE_STAT_NAMES:
        for size in PageSize:
            lines.append(f"{name:<18}({size.label}): {pages[name][size]:>16}")
    return "\n".join(lines) + "\n"


__all__ = [
    "BalloonDriver",
    "DriverConfig",
    "EventKind",
    "PageSource",
    "Stats",
    "render_debugfs",
]
