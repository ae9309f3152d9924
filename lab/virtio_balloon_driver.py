"""A guest-side virtio-balloon driver, modelled on Linux's drivers/virtio/virtio_balloon.c.

It runs over :class:`lab.qtest.virtio_pci.VirtioPci` (our qtest "guest"), against QEMU's
built-in ``virtio-balloon-pci`` or vdev's virtio-balloon personality behind a vhost-user
device. What it does, as Linux does:

* queues: inflateq (0), deflateq (1), statsq (2) when STATS_VQ is negotiated;
* inflate / deflate: arrays of le32 PFNs of 4 KiB pages, at most 256 per buffer
  (``VIRTIO_BALLOON_ARRAY_PFNS_MAX``); the driver waits for each buffer to be used before
  the next (``tell_host``); deflate releases the most recently inflated pages first;
* ``actual`` is written back (one 4-byte write) after each round of balloon work
  (``update_balloon_size``);
* a config-change interrupt makes it re-read ``num_pages`` and work towards it;
* statsq: one stats buffer queued at start; when the device returns it, fresh stats are
  written and the buffer is queued again (``stats_handle_request``);
* DEFLATE_ON_OOM: :meth:`VirtioBalloonDriver.oom` gives back up to 256 pages
  (``VIRTIO_BALLOON_OOM_NR_PAGES``), only when negotiated.

The pages the balloon takes come from a :class:`PagePool` (the guest's "page allocator":
one PFN range of guest RAM the test owns).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import trio

from guest_driver.virtq import Buffer
from lab.qtest.virtio_pci import GuestAllocator, VirtioPci
from protocol import virtio_balloon as vb
from protocol.errors import LocalError
from protocol.units import PAGE_SIZE
from protocol.virtio_pci import Isr

log = logging.getLogger(__name__)

OOM_NR_PAGES = 256  # VIRTIO_BALLOON_OOM_NR_PAGES
#: Linux's order of stats in the buffer (update_balloon_stats), the subset it always sends
LINUX_STATS_ORDER: tuple[vb.StatTag, ...] = (
    vb.StatTag.SWAP_IN,
    vb.StatTag.SWAP_OUT,
    vb.StatTag.MAJFLT,
    vb.StatTag.MINFLT,
    vb.StatTag.MEMFREE,
    vb.StatTag.MEMTOT,
    vb.StatTag.AVAIL,
    vb.StatTag.CACHES,
    vb.StatTag.HTLB_PGALLOC,
    vb.StatTag.HTLB_PGFAIL,
)
DEFAULT_FEATURES = vb.Feature.STATS_VQ | vb.Feature.DEFLATE_ON_OOM


class PagePool:
    """Free 4 KiB guest pages the balloon may take: ``count`` pages from ``first_pfn``.

    ``take`` hands out the lowest free pages; ``give`` returns pages.
    """

    def __init__(self, first_pfn: int, count: int) -> None:
        self.first_pfn = first_pfn
        self.count = count
        self._used = np.zeros(count, dtype=bool)

    @property
    def free(self) -> int:
        return int(self.count - np.count_nonzero(self._used))

    def take(self, n: int) -> np.ndarray:
        idx = np.flatnonzero(~self._used)[:n]
        self._used[idx] = True
        return (idx + self.first_pfn).astype(np.uint64)

    def give(self, pfns: np.ndarray) -> None:
        idx = pfns.astype(np.int64) - self.first_pfn
        if np.any((idx < 0) | (idx >= self.count)):
            raise LocalError("page returned to a pool it did not come from")
        self._used[idx] = False

    def contains(self, pfns: np.ndarray) -> np.ndarray:
        idx = pfns.astype(np.int64) - self.first_pfn
        return (idx >= 0) & (idx < self.count)


StatsProvider = Callable[[], Mapping[vb.StatTag, int]]


@dataclass
class DriverCounters:
    inflate_buffers: int = 0
    deflate_buffers: int = 0
    inflated_pages: int = 0
    deflated_pages: int = 0
    stats_requests: int = 0
    config_changes: int = 0
    oom_deflated: int = 0


@dataclass
class VirtioBalloonDriver:
    dev: VirtioPci
    mem: GuestAllocator
    pool: PagePool
    wanted: int = int(DEFAULT_FEATURES)
    stats: StatsProvider | None = None
    queue_size: int = 64
    timeout: float = 10.0
    #: pages in the balloon, oldest first (Linux keeps a list; we pop from the end)
    pages: list[int] = field(default_factory=list)
    counters: DriverCounters = field(default_factory=DriverCounters)
    features: int = 0
    has_stats: bool = False
    #: the target differed from the balloon at probe time: balloon work is due
    work_pending: bool = False
    _pfn_buf: int = 0
    _stats_buf: int = 0

    INFLATE = int(vb.Queue.INFLATE)
    DEFLATE = int(vb.Queue.DEFLATE)
    STATSQ = int(vb.Queue.STATS)

    @property
    def num_pages(self) -> int:
        """Pages in the balloon (what ``actual`` reports)."""
        return len(self.pages)

    # -- probe / remove ----------------------------------------------------------------

    async def start(self) -> None:
        """virtballoon_probe: negotiate, set up the queues, DRIVER_OK, queue the stats buffer."""
        wanted = self.wanted
        if await self.dev.num_queues() <= self.STATSQ:
            wanted &= ~vb.Feature.STATS_VQ  # a carrier device without a third queue
        self.features = await self.dev.begin(wanted)
        self.has_stats = bool(self.features & vb.Feature.STATS_VQ)
        if not self._pfn_buf:
            self._pfn_buf = self.mem.alloc(vb.MAX_PFNS_PER_BUFFER * vb.PFN.sizeof())
            self._stats_buf = self.mem.alloc(len(vb.StatTag) * vb.STAT_SIZE)
        for q in (self.INFLATE, self.DEFLATE) + ((self.STATSQ,) if self.has_stats else ()):
            await self.dev.setup_queue(q, self.queue_size, self.mem)
        await self.dev.driver_ok()
        if self.has_stats:
            await self._post_stats()
        # virtballoon_probe: "if (towards_target(vb)) virtballoon_changed(vdev)"
        self.work_pending = await self.towards_target() != 0

    def reboot(self) -> None:
        """The guest rebooted (the device was reset under the driver): the new kernel's
        driver starts with an empty balloon and every page is the guest's again."""
        if self.pages:
            self.pool.give(np.array(self.pages, dtype=np.uint64))
            self.pages.clear()

    async def remove(self) -> None:
        """remove_common: give every page back, report, reset the device."""
        while self.pages:
            await self.leak(len(self.pages))
        await self.update_balloon_size()
        await self.dev.reset()

    # -- config ------------------------------------------------------------------------

    async def target(self) -> int:
        """num_pages from the config space (the device's target)."""
        return await self.dev.config_read(0, 4)

    async def read_actual(self) -> int:
        return await self.dev.config_read(4, 4)

    async def update_balloon_size(self) -> None:
        await self.dev.config_write(4, 4, self.num_pages)

    async def towards_target(self) -> int:
        return await self.target() - self.num_pages

    # -- inflate / deflate ---------------------------------------------------------------

    async def _tell_host(self, queue: int, pfns: np.ndarray) -> None:
        data = pfns.astype(vb.PFN_DTYPE).tobytes()
        await self.dev.qt.write(self._pfn_buf, data)
        q = self.dev.queues[queue]
        head = await q.add([Buffer(self._pfn_buf, len(data))])
        await self.dev.kick(queue)
        while True:  # the device acks by using the buffer (len 0)
            elems = await self.dev.wait_used(queue, self.timeout)
            if any(e.id == head for e in elems):
                return

    async def fill(self, num: int) -> int:
        """fill_balloon: inflate by at most ``num`` pages (and 256 per call). Returns pages taken."""
        num = min(num, vb.MAX_PFNS_PER_BUFFER)
        pfns = self.pool.take(num)
        if len(pfns) == 0:
            return 0
        await self._tell_host(self.INFLATE, pfns)
        self.pages.extend(int(p) for p in pfns)
        self.counters.inflate_buffers += 1
        self.counters.inflated_pages += len(pfns)
        return len(pfns)

    async def leak(self, num: int) -> int:
        """leak_balloon: deflate by at most ``num`` pages (and 256 per call), newest first."""
        num = min(num, vb.MAX_PFNS_PER_BUFFER, len(self.pages))
        if num <= 0:
            return 0
        taken = self.pages[-num:]
        pfns = np.array(taken[::-1], dtype=np.uint64)
        await self._tell_host(self.DEFLATE, pfns)
        del self.pages[-num:]
        self.pool.give(pfns)
        self.counters.deflate_buffers += 1
        self.counters.deflated_pages += num
        return num

    async def inflate(self, num: int) -> int:
        """Inflate by ``num`` pages in 256-page buffers, then report ``actual``."""
        done = 0
        while done < num:
            got = await self.fill(num - done)
            if got == 0:
                break
            done += got
        await self.update_balloon_size()
        return done

    async def deflate(self, num: int) -> int:
        done = 0
        while done < num:
            got = await self.leak(num - done)
            if got == 0:
                break
            done += got
        await self.update_balloon_size()
        return done

    async def balloon_work(self) -> int:
        """update_balloon_size_func, run to completion: reach the target, report ``actual``.

        Returns the signed number of pages moved (positive = inflated).
        """
        moved = 0
        while diff := await self.towards_target():
            got = await self.fill(diff) if diff > 0 else -await self.leak(-diff)
            if got == 0:
                break  # out of pages (Linux retries later)
            moved += got
            if abs(moved) % (16 * vb.MAX_PFNS_PER_BUFFER) == 0:
                await self.update_balloon_size()
        await self.update_balloon_size()
        return moved

    async def oom(self, num: int = OOM_NR_PAGES) -> int:
        """virtio_balloon_oom_notify: with DEFLATE_ON_OOM, give back up to ``num`` pages."""
        if not self.features & vb.Feature.DEFLATE_ON_OOM:
            return 0
        freed = await self.leak(num)
        await self.update_balloon_size()
        self.counters.oom_deflated += freed
        return freed

    # -- stats -------------------------------------------------------------------------

    def current_stats(self) -> dict[vb.StatTag, int]:
        if self.stats is not None:
            return dict(self.stats())
        total = self.pool.count * PAGE_SIZE
        free = self.pool.free * PAGE_SIZE
        return {
            vb.StatTag.SWAP_IN: 0,
            vb.StatTag.SWAP_OUT: 0,
            vb.StatTag.MAJFLT: 0,
            vb.StatTag.MINFLT: self.counters.inflated_pages,
            vb.StatTag.MEMFREE: free,
            vb.StatTag.MEMTOT: total,
            vb.StatTag.AVAIL: free,
            vb.StatTag.CACHES: 0,
            vb.StatTag.HTLB_PGALLOC: 0,
            vb.StatTag.HTLB_PGFAIL: 0,
        }

    async def _post_stats(self) -> None:
        stats = self.current_stats()
        order = [t for t in LINUX_STATS_ORDER if t in stats] + [
            t for t in stats if t not in LINUX_STATS_ORDER
        ]
        data = vb.pack_stats((t, stats[t]) for t in order)
        await self.dev.qt.write(self._stats_buf, data)
        await self.dev.queues[self.STATSQ].add([Buffer(self._stats_buf, len(data))])
        await self.dev.kick(self.STATSQ)

    async def stats_handle_request(self) -> bool:
        """If the device returned the stats buffer, refill it and queue it again."""
        if not self.has_stats:
            return False
        if not await self.dev.queues[self.STATSQ].poll_used():
            return False
        self.counters.stats_requests += 1
        await self._post_stats()
        return True

    # -- the interrupt handler ---------------------------------------------------------

    async def service(self, timeout: float) -> int:
        """Wait for one interrupt and act on it, as vp_interrupt + the vq callbacks do:
        any interrupt checks statsq (the device may have returned the stats buffer); a
        config change runs the balloon work. Returns the ISR bits handled (Isr.CONFIG for
        balloon work that was already due at probe time, without waiting)."""
        if self.work_pending:
            self.work_pending = False
            await self.balloon_work()
            return Isr.CONFIG
        bits = await self.dev.wait_isr(Isr.CONFIG | Isr.QUEUE, timeout)
        await self.stats_handle_request()
        if bits & Isr.CONFIG:
            self.counters.config_changes += 1
            await self.balloon_work()
        return bits

    async def on_config_change(self, timeout: float) -> int:
        """Serve interrupts until balloon work ran for a config change (or was due since
        probe); returns the pages moved (negative: deflated)."""
        with trio.fail_after(timeout):
            before = self.counters.inflated_pages - self.counters.deflated_pages
            while not await self.service(timeout) & Isr.CONFIG:
                pass
            return self.counters.inflated_pages - self.counters.deflated_pages - before

    async def run(self) -> None:
        """Serve interrupts forever (cancel to stop)."""
        while True:
            try:
                await self.service(3600.0)
            except trio.TooSlowError:  # pragma: no cover - an hour without interrupts
                continue
