"""The standard virtio-balloon personality (virtio device id 5), sans-I/O.

QEMU attaches it with the generic vhost-user device
(``-device vhost-user-test-device-pci,chardev=c0,virtio-id=5,num_vqs=3,config_size=8``,
QEMU >= 10.2), so a stock Linux ``virtio_balloon`` driver binds to vdev.

Decisions:

* Queues (spec indices): 0 inflateq, 1 deflateq, 2 statsq. Three queues; statsq is used only
  when the front-end configures it and STATS_VQ was negotiated.
* Device features: STATS_VQ and DEFLATE_ON_OOM. Not MUST_TELL_HOST (we never need the guest
  to wait), not FREE_PAGE_HINT (a migration aid), not PAGE_REPORTING (reported ranges would
  need their own queue and a fourth/fifth queue index dance, see the reference §6.1), not
  PAGE_POISON: a poisoning guest expects ballooned pages to come back holding ``poison_val``,
  but a punched hole reads back as zeros, so honouring it is only possible for 0. Hence the
  config space is **8 bytes** (``num_pages``, ``actual``).
* Config: ``num_pages`` is the operator's target; ``actual`` is whatever the driver wrote.
  QEMU's generic front-end sends SET_CONFIG with the *whole* config space (stale
  ``num_pages`` included), so only ``actual`` is taken from a write.
* A target change returns ``True`` from :meth:`VirtioBalloon.set_target`: the server sends
  ``CONFIG_CHANGE_MSG`` on the back-end channel (QEMU raises the config interrupt, ISR bit 1).
* Inflate: the chain's device-readable bytes are an array of le32 PFNs (a trailing fragment
  of less than 4 bytes is ignored, as QEMU does). Every PFN that is guest RAM, not already
  in the balloon and not pinned (the rings, operator ranges) enters the same one-bit-per-page
  map the vmw personality uses (:class:`vdev.pagemap.PageMap`) and is reclaimed through the
  same path (a :class:`vdev.balloon.Reclaim` effect: coalesced runs, punched out of the RAM
  file). The rest is counted and ignored. The buffer is always used with length 0: a virtio
  balloon cannot refuse a page.
* Deflate: PFNs leave the map. Nothing is done on the host: the guest's next touch of a
  punched page faults in a zero page (QEMU only hints ``MADV_WILLNEED``).
* Stats: the driver's buffer is parsed (10-byte ``{le16 tag, le64 val}`` entries, unknown tags
  ignored) into QEMU's ``guest-stats`` shape (QOM keys, -1 for a stat the guest did not send
  this time; QEMU resets every stat before each update too), then **held**. :meth:`request_stats`
  gives it back (used length 0) so the driver refills it. A second buffer while one is held
  (a driver bug) returns the old one first, as QEMU does.
* ``vdev serve --stats-interval S`` (QEMU's ``guest-stats-polling-interval``) makes the
  server call :meth:`request_stats` every S seconds; ``GuestRegistry.request_stats`` and
  ``POST /vms/{name}/stats`` do it on demand.
* ``capabilities`` (the operator's view) are the device feature bits the driver accepted
  (SET_FEATURES, through :meth:`VirtioBalloonDevice.features_negotiated`); 0 until then.
* ``driver_active`` (esxtop MCTL?) is DRIVER_OK: the front-end starts the inflate and deflate
  rings only once the driver has set it (and stops them on reset or suspend), whatever
  feature bits were accepted (a driver may accept none).
* Stop hazard (reference §6.5): on ``GET_VRING_BASE`` for statsq while the buffer is held,
  :meth:`queue_stopped` returns 1: the server reports ``last_avail_idx - 1`` so that the
  held head is popped again after a restart. Otherwise the guest's only stats buffer would
  be lost and stats would stop forever.
* Operator reset (``vdev reset``): refused (:attr:`VirtioBalloonDevice.operator_reset` is
  False, the error says why). Virtio has no way to make a driver start over, and forgetting
  the map while the guest keeps its pages would leave pages the guest thinks are ballooned
  and vdev does not; a target of 0 takes the balloon back instead.
* Device reset (the guest reset the device or the VM rebooted; seen by
  ``vdev/vhost_user.py``): the device forgets its balloon, as a real one does. Linux's
  ``remove_common()`` deflates everything before it resets the device (unbind, freeze for
  hibernation), and after a reboot the new kernel's driver starts from an empty balloon:
  either way the guest holds no balloon pages any more. The pages vdev punched are zero
  pages the guest may use again (a touch faults one in); the map, ``actual`` and the held
  stats buffer start from zero, and what the new driver inflates is reclaimed anew, so the
  RAM file's holes follow the new balloon. The connection closing forgets everything too
  (the object goes away).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from protocol import virtio_balloon as vb
from protocol.errors import ConfigError
from vdev.balloon import Reclaim, coalesce
from vdev.devices.base import Device, DeviceContext, DeviceStatus, Work
from vdev.pagemap import PageMap, PinnedRanges

log = logging.getLogger(__name__)

U64Array = npt.NDArray[np.uint64]

DEVICE_ID = vb.DEVICE_ID
DEVICE_FEATURES = int(vb.Feature.STATS_VQ | vb.Feature.DEFLATE_ON_OOM)
CONFIG_SIZE = vb.BASIC_CONFIG_SIZE  # 8: num_pages, actual (no PAGE_POISON, no hinting)
NUM_QUEUES = 3
INFLATEQ = int(vb.Queue.INFLATE)
DEFLATEQ = int(vb.Queue.DEFLATE)
STATSQ = int(vb.Queue.STATS)
QUEUE_NAMES = {INFLATEQ: "inflateq", DEFLATEQ: "deflateq", STATSQ: "statsq"}
MISSING_STAT = -1
U32_MAX = 0xFFFF_FFFF

_ACTUAL = slice(4, 8)


class Ram(Protocol):
    """What the personality needs of guest memory (``vdev.memory.GuestMemory`` fits)."""

    @property
    def total_pages(self) -> int: ...

    def ram_pfn_mask(self, pfns: npt.NDArray[np.uint64], npages: int) -> npt.NDArray[np.bool_]: ...

    def read(self, gpa: int, length: int) -> bytes: ...


class ChainLike(Protocol):
    """A popped descriptor chain (``vdev.virtq.Chain`` fits)."""

    head: int
    readable: list[tuple[int, int]]
    error: str | None


def empty_stats() -> dict[str, int]:
    return dict.fromkeys(vb.STAT_QOM_KEY.values(), MISSING_STAT)


def parse_stats(data: bytes) -> dict[str, int]:
    """A stats buffer as QEMU's ``guest-stats`` dict: QOM keys, -1 where missing."""
    out = empty_stats()
    n = len(data) // vb.STAT_SIZE
    if n:
        entries = np.frombuffer(data, dtype=vb.STAT_DTYPE, count=n)
        for tag, val in zip(entries["tag"].tolist(), entries["val"].tolist(), strict=True):
            try:
                out[vb.STAT_QOM_KEY[vb.StatTag(tag)]] = int(val)
            except ValueError:
                continue  # unknown tags MUST be ignored
    return out


def pfn_array(data: bytes) -> U64Array:
    """le32 PFNs from an inflate/deflate buffer; a trailing fragment < 4 bytes is ignored."""
    n = len(data) // vb.PFN.sizeof()
    return np.frombuffer(data, dtype=vb.PFN_DTYPE, count=n).astype(np.uint64)


@dataclass
class Processed:
    """What one batch of chains on one queue produced."""

    completions: list[tuple[int, int]] = field(default_factory=list)  # (head, used length)
    reclaim: Reclaim | None = None


class VirtioBalloon:
    """The virtio-balloon device state of one guest connection (sans-I/O)."""

    device_id = DEVICE_ID
    num_queues = NUM_QUEUES
    config_size = CONFIG_SIZE
    features = DEVICE_FEATURES

    def __init__(self, *, target: int = 0, pages: PageMap | None = None) -> None:
        if target < 0:
            raise ConfigError("the balloon target cannot be negative")
        self._target = int(target)
        self.actual = 0
        self.pages = PageMap() if pages is None else pages
        self.negotiated = 0  # device feature bits the driver accepted
        self.guest_stats: dict[str, int] = empty_stats()
        self.stats_last_update: float | None = None  # host time of the last stats buffer
        self.held_stats: int | None = None  # head of the statsq buffer we hold
        self._pinned = PinnedRanges()
        self._config_key: tuple[int, int] | None = None
        self._config = b""
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "inflate buffers",
                "deflate buffers",
                "stats buffers",
                "stats requests",
                "inflated (4k)",
                "deflated (4k)",
                "inflate ignored: not RAM",
                "inflate ignored: pinned",
                "inflate ignored: already in balloon",
                "deflate ignored: not in balloon",
                "bad chains",
                "target set",
                "config writes",
                "resets",
            ),
            0,
        )

    # ------------------------------------------------------------------ observable state

    @property
    def target(self) -> int:
        return self._target

    @property
    def size(self) -> int:
        """Pages the device holds in its map (what it has reclaimed and not given back)."""
        return self.pages.size

    # ------------------------------------------------------------------ operator side

    def set_target(self, pages: int) -> bool:
        """Set ``num_pages``; True when it changed (send CONFIG_CHANGE_MSG)."""
        if pages < 0:
            raise ConfigError("the balloon target cannot be negative")
        pages = min(int(pages), U32_MAX)
        self.counters["target set"] += 1
        changed = pages != self._target
        self._target = pages
        return changed

    def set_pinned(self, owner: str, ranges: Iterable[tuple[int, int]]) -> None:
        """Replace ``owner``'s pinned (first PFN, count) ranges: pages never reclaimed."""
        self._pinned.set(owner, ranges)

    # ------------------------------------------------------------------ config space

    def config(self) -> bytes:
        # read and written once per balloon request by Linux, each a synchronous vhost-user
        # round trip while the vCPU waits: built once per (target, actual)
        key = (self._target, self.actual)
        if self._config_key != key:
            full = vb.CONFIG.build(
                {"num_pages": self._target, "actual": self.actual, "free_page_hint_cmd_id": 0,
                 "poison_val": 0}
            )  # fmt: skip
            self._config_key, self._config = key, full[: self.config_size]
        return self._config

    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes ``offset .. offset+size`` of the config space (zero beyond it)."""
        data = self.config()[offset : offset + size]
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write: only ``actual`` is the driver's to write."""
        self.counters["config writes"] += 1
        cur = bytearray(self.config())
        end = min(len(cur), offset + len(data))
        if offset >= end:
            return
        cur[offset:end] = data[: end - offset]
        self.actual = int.from_bytes(cur[_ACTUAL], "little")

    def set_features(self, features: int) -> None:
        self.negotiated = features & self.features

    # ------------------------------------------------------------------ guest side

    def inflate(self, pfns: U64Array, ram: Ram) -> Reclaim | None:
        """Put ``pfns`` into the balloon; the pages to reclaim (None if none)."""
        new = self._inflate(pfns, ram)
        return coalesce(new, 1) if new.size else None

    def _inflate(self, pfns: U64Array, ram: Ram) -> U64Array:
        """The PFNs that newly entered the balloon (sorted)."""
        if not pfns.size:
            return pfns
        pfns = np.unique(pfns)
        ok = np.asarray(ram.ram_pfn_mask(pfns, 1), dtype=np.bool_)
        self.counters["inflate ignored: not RAM"] += int(np.count_nonzero(~ok))
        pinned = ok & self._pinned.overlaps(pfns)
        self.counters["inflate ignored: pinned"] += int(np.count_nonzero(pinned))
        ok &= ~pinned
        present = ok & self.pages.covered(pfns)
        self.counters["inflate ignored: already in balloon"] += int(np.count_nonzero(present))
        new = pfns[ok & ~present]
        if new.size:
            self.pages.set_4k(new)
            self.counters["inflated (4k)"] += int(new.size)
        return new

    def deflate(self, pfns: U64Array) -> int:
        """Take ``pfns`` out of the balloon; returns how many were in it."""
        if not pfns.size:
            return 0
        pfns = np.unique(pfns)
        present = self.pages.test_4k(pfns)
        gone = pfns[present]
        self.counters["deflate ignored: not in balloon"] += int(pfns.size - gone.size)
        if gone.size:
            self.pages.clear_4k(gone)
            self.counters["deflated (4k)"] += int(gone.size)
        return int(gone.size)

    def process(self, queue: int, chains: Sequence[ChainLike], ram: Ram, now: float) -> Processed:
        """Handle chains popped from ``queue``: what to complete and what to reclaim."""
        out = Processed()
        new: list[U64Array] = []
        for chain in chains:
            if chain.error is not None:
                self.counters["bad chains"] += 1
                out.completions.append((chain.head, 0))
                continue
            data = b"".join(ram.read(a, n) for a, n in chain.readable)
            if queue == INFLATEQ:
                self.counters["inflate buffers"] += 1
                new.append(self._inflate(pfn_array(data), ram))
                out.completions.append((chain.head, 0))
            elif queue == DEFLATEQ:
                self.counters["deflate buffers"] += 1
                self.deflate(pfn_array(data))
                out.completions.append((chain.head, 0))
            elif queue == STATSQ:
                self.counters["stats buffers"] += 1
                if self.held_stats is not None:
                    # a second buffer while one is held: give the old one back (as QEMU does)
                    out.completions.append((self.held_stats, 0))
                self.guest_stats = parse_stats(data)
                self.stats_last_update = now
                self.held_stats = chain.head
            else:  # a queue we do not serve: complete it so the guest is not stuck
                out.completions.append((chain.head, 0))
        if new and (pfns := np.concatenate(new)).size:
            out.reclaim = coalesce(pfns, 1)
        return out

    def request_stats(self) -> int | None:
        """Give the held stats buffer back (complete it with length 0): its head, or None."""
        head, self.held_stats = self.held_stats, None
        if head is not None:
            self.counters["stats requests"] += 1
        return head

    def queue_stopped(self, queue: int) -> int:
        """GET_VRING_BASE on ``queue``: how far to rewind the reported avail index."""
        if queue == STATSQ and self.held_stats is not None:
            self.held_stats = None
            return 1
        return 0

    def reset(self) -> int:
        """The device was reset: forget the balloon (the guest holds none any more: see the
        module docstring), ``actual`` and the held stats buffer (its ring is gone). Returns
        the number of pages forgotten. The negotiated features are the transport's business
        (:meth:`set_features`)."""
        self.counters["resets"] += 1
        forgotten = self.pages.size
        self.pages.clear()
        self.actual = 0
        self.held_stats = None
        return forgotten

    # ------------------------------------------------------------------ hand-over

    def export_state(self) -> dict[str, Any]:
        """Everything but the page map (own storage) and pinned ranges (from the rings)."""
        return {
            "target": self._target,
            "actual": self.actual,
            "negotiated": self.negotiated,
            "guest_stats": dict(self.guest_stats),
            "stats_last_update": self.stats_last_update,
            "held_stats": self.held_stats,
            "counters": dict(self.counters),
        }

    def import_state(self, state: Mapping[str, Any]) -> None:
        """Take back :meth:`export_state` (unknown keys ignored, missing ones defaulted)."""
        g = state.get
        self._target = int(g("target", self._target))
        self.actual = int(g("actual", 0))
        self.negotiated = int(g("negotiated", 0)) & self.features
        stats = g("guest_stats")
        if isinstance(stats, dict):
            self.guest_stats.update({k: int(v) for k, v in stats.items() if k in self.guest_stats})
        slu = g("stats_last_update")
        self.stats_last_update = float(slu) if isinstance(slu, int | float) else None
        held = g("held_stats")
        self.held_stats = int(held) if isinstance(held, int) else None
        counters = g("counters")
        if isinstance(counters, dict):
            for key, value in counters.items():
                if key in self.counters and isinstance(value, int):
                    self.counters[key] = value

    # ------------------------------------------------------------------ helpers

    def snapshot(self) -> dict[str, Any]:
        return {
            "target": self._target,
            "actual": self.actual,
            "size": self.size,
            "guest_stats": dict(self.guest_stats),
            "stats_last_update": self.stats_last_update,
            "counters": dict(self.counters),
        }


class VirtioBalloonDevice(Device):
    """:class:`VirtioBalloon` behind the server's :class:`~vdev.devices.base.Device` interface."""

    name = "virtio-balloon"
    backend_type = "balloon"
    num_queues = NUM_QUEUES
    features = DEVICE_FEATURES
    config_size = CONFIG_SIZE
    supports_stats = True
    operator_reset = False
    #: ``actual`` is what the driver last wrote; ``stats held`` is 0 or 1.
    gauges = frozenset({"actual", "stats held"})

    def __init__(self, ctx: DeviceContext, *, target: int = 0) -> None:
        super().__init__(ctx, target=target)
        self.core = VirtioBalloon(target=target, pages=ctx.pages)
        self.core.features = self.features  # a subclass may offer fewer bits
        self.shutting_down = False
        self.forgotten = 0

    # -- guest side ----------------------------------------------------------------------

    def kick(self, index: int) -> Work:
        if not 0 <= index < len(self.ctx.queues):
            return Work()
        q, mem = self.ctx.queues[index], self.ctx.memory
        chains = q.pop(mem)
        work = Work(popped=len(chains))
        if not chains:
            return work
        out = self.core.process(index, chains, mem, now=_now())
        work.completions = [(index, head, n) for head, n in out.completions]
        if out.reclaim is not None:
            work.reclaims.append(out.reclaim)
        return work

    def rings_changed(self) -> None:
        self.core.set_pinned("rings", [r for q in self.ctx.queues for r in q.pinned_pfns()])

    def queue_stopped(self, index: int) -> None:
        rewind = self.core.queue_stopped(index)
        if rewind and index < len(self.ctx.queues):
            q = self.ctx.queues[index]
            q.last_avail_idx = (q.last_avail_idx - rewind) & 0xFFFF
            log.info(
                "%s: statsq stopped holding the stats buffer: rewound by %d", self.ctx.name, rewind
            )

    def read_config(self, offset: int, size: int) -> bytes:
        return self.core.read_config(offset, size)

    def write_config(self, offset: int, data: bytes, *, migration: bool) -> Work:
        self.core.write_config(offset, data)
        return Work()

    def features_negotiated(self, features: int) -> None:
        """Report the accepted device bits (STATS_VQ, DEFLATE_ON_OOM) as ``capabilities``."""
        self.core.set_features(features)

    # -- operator side -------------------------------------------------------------------

    def set_target(self, pages: int) -> Work:
        return Work(config_changed=self.core.set_target(pages))

    def request_stats(self) -> Work:
        """Give the held stats buffer back so the driver sends fresh stats."""
        head = self.core.request_stats()
        return Work() if head is None else Work(completions=[(STATSQ, head, 0)])

    def demand_reset(self) -> Work:
        raise ConfigError(f"{self.ctx.name}: virtio-balloon has no operator reset")

    def device_reset(self) -> Work:
        self.forgotten += self.core.reset()
        return Work()

    def save_state(self) -> dict[str, Any]:
        return {**self.core.export_state(), "forgotten": self.forgotten}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.core.import_state(state)
        self.forgotten = int(state.get("forgotten", 0))

    def shutdown(self) -> None:
        # a virtio balloon cannot answer BUSY: buffers keep being acked until the end
        self.shutting_down = True

    def driver_active(self) -> bool:
        """DRIVER_OK reached: the front-end starts the rings only once the driver set
        DRIVER_OK (and stops them on reset or suspend), whatever features were accepted."""
        queues = self.ctx.queues
        return all(queues[i].ready for i in (INFLATEQ, DEFLATEQ) if i < len(queues))

    def size_pages(self) -> int:
        return self.core.size  # asked after every batch: not the whole status()

    def status(self) -> DeviceStatus:
        c = self.core
        counters = dict(c.counters)
        counters["actual"] = c.actual
        counters["forgotten (4k)"] = self.forgotten
        counters["stats held"] = int(c.held_stats is not None)
        return DeviceStatus(
            size_pages=c.size,
            target_pages=c.target,
            capabilities=c.negotiated,
            driver_active=self.driver_active(),
            counters=counters,
            gauges=self.gauges,
            guest_stats=dict(c.guest_stats),
        )


def _now() -> float:
    return time.time()  # host epoch seconds, like QEMU's guest-stats "last-update"


#: The reporting queue's index: queues are numbered consecutively over the ones that exist,
#: and this personality offers REPORTING but not FREE_PAGE_HINT (reference §4.2).
REPORTQ = 3


class VirtioBalloonReportingDevice(VirtioBalloonDevice):
    """virtio-balloon with free page reporting (``VIRTIO_BALLOON_F_REPORTING``):
    ``vdev serve --device virtio-balloon-reporting``; QEMU's generic device needs
    ``num_vqs=4``.

    A Linux guest reports free blocks (``PAGE_SIZE << page_reporting_order``, 2 MiB on
    x86-64) about 2 s after they are freed, up to 32 per request, as device-writable
    descriptors on the reporting queue (index 3: after inflateq, deflateq, statsq). Each
    reported range that is guest RAM and not pinned (the rings) is punched out of the RAM
    file at once, through the same reclaim path as the balloon; the buffer is then used with
    length 0 (the guest blocks until then). Reported pages are not in the balloon: the guest
    uses them again whenever it likes and each next touch faults in a zero page (allowed
    without ``PAGE_POISON``, which this device does not offer).

    Left out: free page hinting (``FREE_PAGE_HINT``: a live-migration aid with its own
    command-id protocol; nothing here migrates) and ``PAGE_POISON`` (a poisoning guest
    expects reported pages to keep ``poison_val``; a punched hole reads back zeros, so only
    a zero value could be honoured, and Linux then also needs init_on_free).
    """

    name = "virtio-balloon-reporting"
    num_queues = NUM_QUEUES + 1
    features = DEVICE_FEATURES | int(vb.Feature.PAGE_REPORTING)

    def __init__(self, ctx: DeviceContext, *, target: int = 0) -> None:
        super().__init__(ctx, target=target)
        for key in ("report buffers", "reported (4k)", "report ignored: not RAM",
                    "report ignored: pinned"):  # fmt: skip
            self.core.counters[key] = 0

    def kick(self, index: int) -> Work:
        if index != REPORTQ:
            return super().kick(index)
        if not 0 <= index < len(self.ctx.queues):
            return Work()
        q, mem = self.ctx.queues[index], self.ctx.memory
        chains = q.pop(mem)
        work = Work(popped=len(chains))
        counters = self.core.counters
        starts: list[int] = []
        counts: list[int] = []
        for chain in chains:
            work.completions.append((index, chain.head, 0))
            if chain.error is not None:
                counters["bad chains"] += 1
                continue
            counters["report buffers"] += 1
            for gpa, length in chain.writable:
                first, last = -(-gpa // PAGE), (gpa + length) // PAGE  # whole pages only
                if last > first:
                    starts.append(first)
                    counts.append(last - first)
        if starts:
            pfn_starts = np.asarray(starts, dtype=np.uint64)
            pfn_counts = np.asarray(counts, dtype=np.uint64)
            ok = np.zeros(pfn_starts.shape, dtype=np.bool_)
            pinned = np.zeros(pfn_starts.shape, dtype=np.bool_)
            for n in np.unique(pfn_counts).tolist():  # ranges are blocks of a few sizes
                sel = pfn_counts == n
                ok[sel] = mem.ram_pfn_mask(pfn_starts[sel], int(n))
                pinned[sel] = self.core._pinned.overlaps(pfn_starts[sel], int(n))
            counters["report ignored: not RAM"] += int(pfn_counts[~ok].sum())
            pinned &= ok
            counters["report ignored: pinned"] += int(pfn_counts[pinned].sum())
            ok &= ~pinned
            if ok.any():
                counters["reported (4k)"] += int(pfn_counts[ok].sum())
                work.reclaims.append(Reclaim(pfn_starts[ok], pfn_counts[ok]))
        return work


PAGE = 4096
