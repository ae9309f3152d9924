"""The sans-I/O vmmemctl device model: one ``BalloonModel`` per guest.

It implements docs/PROTOCOL.md sections 3, 4 and 6. It does no I/O of its own: the caller
hands it a parsed ``Request`` and the guest's RAM (``GuestRam``) and gets back an
``Outcome``: the ``Response`` plus the effects the caller must carry out (``Reclaim`` the
newly locked pages, deliver a ``DoorbellEvent``, note that the balloon was ``Forget``-ten).
The model reads and writes only the batch page (never a locked page).

Decisions (each is documented in docs/PROTOCOL.md terms; "ref" = the project's
vmw-balloon-protocol fact sheet):

* Frame checks, then BUSY, then RESET, then the command: a frame with the wrong magic is
  ``ERROR_CMD_INVALID`` (it is no command at all); while ``shutting_down`` every command,
  START included, is ``ERROR_BUSY`` with nothing changed; while a reset is demanded every
  command but START is ``ERROR_RESET`` (unknown numbers included: "every command but START",
  PROTOCOL.md section 4; ref section 6.2); then unknown numbers and commands whose
  capability was not granted are ``ERROR_CMD_INVALID``.
* Target reported: ``min(target, last non-zero GET_TARGET limit since START, guest RAM
  pages)``, then clamped to ``U32_MAX`` unless 64_BIT_TARGET was granted. The limit is the
  guest's "predicted maximum achievable balloon size" (ref section 2, GET_TARGET; section
  8.3 "Guest-supplied limit", 0 = "use config" = no limit); Linux sends ``totalram_pages()``.
  The device never asks for more than the guest can give. The limit persists until the next
  START so that every target-carrying response agrees with GET_TARGET (Linux stores the
  ``result`` of every target-carrying command, ref section 2). ``result`` carries this
  reported target on every target-carrying response, whatever its status, and 0 otherwise.
* NOTNEEDED compares against that reported target (the guest is never refused below the
  target it was told).
* A batch behaves exactly as its entries processed one at a time in order (this is what
  the vectorised code computes). Per-entry precedence, first match wins:
    LOCK (4K and 2M):   reserved bits 5..11 set, PFN not RAM, 2M PFN not 512-aligned or the
                        2 MiB range not wholly inside one RAM region -> ERROR_PPN_INVALID;
                        the page (range) overlaps a pinned range or the batch page itself
                        -> ERROR_PPN_PINNED;
                        already in the balloon (4K: locked as 4K or inside a locked 2M
                        page; 2M: locked as 2M or containing a locked 4K page), or a
                        duplicate of an entry locked earlier in the same batch
                        -> ERROR_PPN_LOCKED;
                        balloon size (with the earlier successes of this batch, 2M = 512)
                        at or above the target -> ERROR_PPN_NOTNEEDED; else SUCCESS.
    UNLOCK (4K and 2M): the same ERROR_PPN_INVALID checks; not in the balloon *at that size*
                        (4K unlock of a page that belongs to a locked 2M page, 2M unlock of a
                        range not locked as 2M, a duplicate of an entry unlocked earlier)
                        -> ERROR_PPN_UNLOCKED; else SUCCESS. Pinning never refuses an UNLOCK:
                        giving a page back is always allowed (PROTOCOL.md: PINNED = "the page
                        may not be *taken*").
  The non-batched LOCK/UNLOCK follow the same rules for their single PFN; without
  64_BIT_TARGET a PFN >= 2^32 is ERROR_PPN_INVALID (ref section 2 LOCK row, section 3).
* Batched commands, whole-command checks (-> ERROR_CMD_INVALID, nothing changed): count
  0 or > 512; the batch page is not RAM; the batch page is in the balloon (the device never
  reads a locked page); the batch page cannot be read or written.
* GUEST_ID accepts any value (the host-side meaning is undocumented, ref section 6.1); the
  ``guest_type`` property reports a ``GuestType`` when the value is known, else the int.
* VMCI_DOORBELL_SET with (0xffffffff, 0xffffffff) unregisters; anything else registers.
* START always answers SUCCESS_WITH_CAPABILITIES (START(0) included: it withdraws, the
  capabilities become 0), forgets every page, clears the doorbell registration and the
  GET_TARGET limit. The guest type is kept (the guest re-sends it after START anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from protocol.errors import ConfigError, GuestError
from protocol.units import PAGE_SHIFT
from protocol.vmw import (
    ALL_CAPABILITIES,
    BATCH_ENTRY_DTYPE,
    BATCH_MAX_ENTRIES,
    COMMAND_DEBUGFS_NAME,
    MAGIC,
    PAGES_PER_2M,
    REQUEST_SIZE,
    RESPONSE_SIZE,
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
    entry_pfns,
    entry_reserved,
    required_capabilities,
    with_statuses,
)
from vdev.pagemap import FRAME_SHIFT, PageMap, PinnedRanges

log = logging.getLogger(__name__)

U64Array = npt.NDArray[np.uint64]
BoolArray = npt.NDArray[np.bool_]

_OK_STATUSES = frozenset({Status.SUCCESS, Status.SUCCESS_WITH_CAPABILITIES})
#: The per-entry statuses a LOCK / UNLOCK can refuse with (for the counters).
_LOCK_REFUSALS = (
    Status.ERROR_PPN_INVALID,
    Status.ERROR_PPN_LOCKED,
    Status.ERROR_PPN_PINNED,
    Status.ERROR_PPN_NOTNEEDED,
)
_UNLOCK_REFUSALS = (Status.ERROR_PPN_INVALID, Status.ERROR_PPN_UNLOCKED)


class GuestRam(Protocol):
    """What the model needs of the guest's memory."""

    @property
    def total_pages(self) -> int:
        """4 KiB frames of RAM."""
        ...

    def ram_pfn_mask(self, pfns: U64Array, npages: int) -> BoolArray:
        """Per PFN (uint64 array): the ``npages``-long range at it lies wholly in one region."""
        ...

    def read(self, gpa: int, length: int) -> bytes:
        """Bytes of guest RAM; raises ``GuestError`` outside RAM."""
        ...

    def write(self, gpa: int, data: bytes) -> None:
        """Store bytes in guest RAM; raises ``GuestError`` outside RAM."""
        ...


# ---------------------------------------------------------------------------------------
# Effects


@dataclass(frozen=True, eq=False)
class Reclaim:
    """Pages newly locked: reclaim them on the host. Sorted, coalesced runs (uint64)."""

    pfn_starts: U64Array
    pfn_counts: U64Array

    @property
    def pages(self) -> int:
        return int(self.pfn_counts.sum())

    def runs(self) -> list[tuple[int, int]]:
        return [(int(s), int(c)) for s, c in zip(self.pfn_starts, self.pfn_counts, strict=True)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reclaim):
            return NotImplemented
        return bool(
            np.array_equal(self.pfn_starts, other.pfn_starts)
            and np.array_equal(self.pfn_counts, other.pfn_counts)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Reclaim({self.runs()})"


@dataclass(frozen=True)
class DoorbellEvent:
    """Ring the guest's doorbell (an 8-byte event on ``eventq``)."""

    kind: EventKind


@dataclass(frozen=True)
class Forget:
    """The balloon was forgotten (reset or START): the guest pops its pages without UNLOCK."""


Effect = Reclaim | DoorbellEvent | Forget


@dataclass(frozen=True)
class Outcome:
    response: Response
    effects: tuple[Effect, ...] = ()


@dataclass(frozen=True)
class ModelState:
    """Everything observable about a model except its counters (tests compare these)."""

    reset_demanded: bool
    shutting_down: bool
    capabilities: Capability
    guest_type: GuestType | int | None
    target: int
    limit_hint: int | None
    doorbell: tuple[int, int] | None
    size: int
    locked_4k: tuple[int, ...]
    locked_2m: tuple[int, ...] = field(default=())
    pinned: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = field(default=())


def coalesce(starts: U64Array, length: int) -> Reclaim:
    """Runs of sorted, distinct, ``length``-page blocks starting at ``starts``."""
    starts = np.asarray(starts, dtype=np.uint64).reshape(-1)
    if not starts.size:
        return Reclaim(np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    if starts.size > 1 and not (starts[1:] > starts[:-1]).all():  # batches usually are
        starts = np.sort(starts)
    step = np.uint64(length)
    breaks = np.flatnonzero(np.diff(starts) != step) + 1
    if not breaks.size:  # one run (a contiguous batch): the common case
        return Reclaim(starts[:1].copy(), np.array([starts.size * length], dtype=np.uint64))
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks - 1, [starts.size - 1]))
    run_starts = starts[first]
    run_counts = starts[last] - run_starts + step
    return Reclaim(run_starts, run_counts.astype(np.uint64))


# ---------------------------------------------------------------------------------------
# The model


class BalloonModel:
    """The vmmemctl device state of one guest (docs/PROTOCOL.md sections 3, 4, 6)."""

    def __init__(
        self,
        *,
        supported: Capability = ALL_CAPABILITIES,
        target: int = 0,
        pages: PageMap | None = None,
    ) -> None:
        """``pages``: the map to keep locked pages in (the hand-over's, living in the state
        file); a fresh in-memory one by default."""
        if target < 0:
            raise ConfigError("the balloon target cannot be negative")
        self._supported = Capability(int(supported) & int(ALL_CAPABILITIES))
        self._target = int(target)
        self._caps = Capability.NONE
        self._reset_demanded = True
        self._guest_type: int | None = None
        self._limit_hint: int | None = None
        self._doorbell: tuple[int, int] | None = None
        self._ram_pages: int | None = None
        self._pages = PageMap() if pages is None else pages
        self._pinned = PinnedRanges()
        #: Set by the server on SIGTERM: every command then answers ERROR_BUSY.
        self.shutting_down = False
        self._counters: dict[str, int] = dict.fromkeys(_counter_names(), 0)

    # ------------------------------------------------------------------------ properties

    @property
    def size(self) -> int:
        """Balloon size in 4 KiB frames (a 2 MiB page counts 512)."""
        return self._pages.size

    @property
    def count_4k(self) -> int:
        return self._pages.count_4k

    @property
    def count_2m(self) -> int:
        return self._pages.count_2m

    @property
    def target(self) -> int:
        """The target the operator / policy set, in 4 KiB frames (before clamping)."""
        return self._target

    @property
    def limit_hint(self) -> int | None:
        """The guest's last non-zero GET_TARGET limit since START, if any."""
        return self._limit_hint

    def reported_target(self, ram_pages: int | None = None) -> int:
        """The target the guest is told (and NOTNEEDED compares with); see module doc."""
        value = self._target
        if self._limit_hint is not None:
            value = min(value, self._limit_hint)
        pages = self._ram_pages if ram_pages is None else ram_pages
        if pages is not None:
            value = min(value, pages)
        if not self._caps & Capability.BIT64_TARGET:
            value = min(value, U32_MAX)
        return value

    @property
    def capabilities(self) -> Capability:
        """Capabilities granted by the last START (NONE before it)."""
        return self._caps

    @property
    def supported(self) -> Capability:
        return self._supported

    @property
    def guest_type(self) -> GuestType | int | None:
        """The last GUEST_ID value (a GuestType when known), None if never sent."""
        if self._guest_type is None:
            return None
        try:
            return GuestType(self._guest_type)
        except ValueError:
            return self._guest_type

    @property
    def doorbell(self) -> tuple[int, int] | None:
        """The registered (context id, resource id), or None."""
        return self._doorbell

    @property
    def reset_demanded(self) -> bool:
        return self._reset_demanded

    @property
    def counters(self) -> dict[str, int]:
        """A copy of the counters (Linux debugfs names for the per-command ones)."""
        return dict(self._counters)

    @property
    def pages(self) -> PageMap:
        """The locked-page map (read it, do not change it)."""
        return self._pages

    @property
    def pinned(self) -> dict[str, tuple[tuple[int, int], ...]]:
        return self._pinned.by_owner()

    def state(self) -> ModelState:
        """A snapshot of everything but the counters (O(pages covered); for tests)."""
        return ModelState(
            reset_demanded=self._reset_demanded,
            shutting_down=self.shutting_down,
            capabilities=self._caps,
            guest_type=self.guest_type,
            target=self._target,
            limit_hint=self._limit_hint,
            doorbell=self._doorbell,
            size=self.size,
            locked_4k=tuple(int(p) for p in self._pages.locked_4k()),
            locked_2m=tuple(int(f) for f in self._pages.locked_2m()),
            pinned=tuple(sorted(self._pinned.by_owner().items())),
        )

    # ----------------------------------------------------------------- hand-over

    def export_state(self) -> dict[str, object]:
        """Everything but the page map (which lives in its own storage) and the pinned
        ranges (re-derived from the rings), as JSON-able values (the hand-over record)."""
        return {
            "supported": int(self._supported),
            "target": self._target,
            "caps": int(self._caps),
            "reset_demanded": self._reset_demanded,
            "guest_type": self._guest_type,
            "limit_hint": self._limit_hint,
            "doorbell": list(self._doorbell) if self._doorbell is not None else None,
            "ram_pages": self._ram_pages,
            "counters": dict(self._counters),
        }

    def import_state(self, state: dict[str, object]) -> None:
        """Take back what :meth:`export_state` gave (unknown keys ignored, missing ones keep
        their defaults: a record from another vdev build)."""
        g = state.get
        self._target = int(g("target", self._target))  # type: ignore[call-overload]
        self._caps = Capability(int(g("caps", 0)) & int(self._supported))  # type: ignore[call-overload]
        self._reset_demanded = bool(g("reset_demanded", True))
        gt, lh, db, rp = g("guest_type"), g("limit_hint"), g("doorbell"), g("ram_pages")
        self._guest_type = int(gt) if isinstance(gt, int) else None
        self._limit_hint = int(lh) if isinstance(lh, int) else None
        self._doorbell = (int(db[0]), int(db[1])) if isinstance(db, list) and len(db) == 2 else None
        self._ram_pages = int(rp) if isinstance(rp, int) else None
        counters = g("counters")
        if isinstance(counters, dict):
            for key, value in counters.items():
                if key in self._counters and isinstance(value, int):
                    self._counters[key] = value

    # ----------------------------------------------------------------- operator side

    def set_target(self, pages: int) -> list[Effect]:
        """Set the balloon target (4 KiB frames); rings the doorbell if it changed."""
        if pages < 0:
            raise ConfigError("the balloon target cannot be negative")
        pages = int(pages)
        changed = pages != self._target
        self._target = pages
        self._counters["target set"] += 1
        if changed and self._doorbell is not None:
            self._counters["doorbell"] += 1
            return [DoorbellEvent(EventKind.TARGET_CHANGED)]
        return []

    def demand_reset(self) -> list[Effect]:
        """Forget every page and answer ERROR_RESET until START; rings the doorbell."""
        effects: list[Effect] = [self._forget()]
        self._reset_demanded = True
        self._counters["reset"] += 1
        if self._doorbell is not None:
            self._counters["doorbell"] += 1
            effects.append(DoorbellEvent(EventKind.RESET))
        return effects

    def set_pinned(self, owner: str, ranges: Iterable[tuple[int, int]]) -> None:
        """Replace ``owner``'s pinned ranges ((first PFN, count) pairs); [] removes them."""
        self._pinned.set(owner, ranges)

    # -------------------------------------------------------------------- guest side

    def answer_frame(
        self, readable: bytes | bytearray | memoryview, writable_len: int, ram: GuestRam
    ) -> tuple[bytes | None, tuple[Effect, ...]]:
        """PROTOCOL.md section 2: the response bytes for one chain (None: used length 0).

        A readable part that is not exactly 24 bytes, or a wrong magic, is ERROR_CMD_INVALID
        when at least 24 bytes are writable, else unanswered. A well-formed request with
        fewer than 24 writable bytes is not executed (the guest could not see the outcome)
        and is unanswered.
        """
        bad = len(readable) != REQUEST_SIZE
        request = None if bad else Request.parse(readable)
        if request is not None and request.magic != MAGIC:
            bad = True
        if bad or request is None:
            self._counters["bad frame"] += 1
            if writable_len < RESPONSE_SIZE:
                return None, ()
            self._count_status(Status.ERROR_CMD_INVALID)
            return Response(Status.ERROR_CMD_INVALID).build(), ()
        if writable_len < RESPONSE_SIZE:
            self._counters["bad frame"] += 1
            return None, ()
        outcome = self.handle(request, ram)
        return outcome.response.build(), outcome.effects

    def handle(self, request: Request, ram: GuestRam) -> Outcome:
        """Execute one command for this guest."""
        command = Command.lookup(request.command)
        if request.magic != MAGIC:
            self._counters["bad frame"] += 1
            self._count_status(Status.ERROR_CMD_INVALID)
            return Outcome(Response(Status.ERROR_CMD_INVALID))
        self._ram_pages = int(ram.total_pages)
        effects: tuple[Effect, ...] = ()
        capabilities = 0
        if self.shutting_down:
            status = Status.ERROR_BUSY
        elif self._reset_demanded and command is not Command.START:
            status = Status.ERROR_RESET
        elif command is None or required_capabilities(command) & ~self._caps:
            status = Status.ERROR_CMD_INVALID
        elif command is Command.START:
            status, effects = self._start(request.arg1)
            capabilities = int(self._caps)
        elif command is Command.GET_TARGET:
            self._limit_hint = request.arg1 or None
            status = Status.SUCCESS
        elif command is Command.GUEST_ID:
            self._guest_type = request.arg1
            status = Status.SUCCESS
        elif command is Command.VMCI_DOORBELL_SET:
            if request.arg1 == VMCI_INVALID_ID and request.arg2 == VMCI_INVALID_ID:
                self._doorbell = None
            else:
                self._doorbell = (request.arg1, request.arg2)
            status = Status.SUCCESS
        elif command in (Command.LOCK, Command.UNLOCK):
            status, effects = self._single(command, request.arg1, ram)
        else:
            status, effects = self._batched(command, request.arg1, request.arg2, ram)

        result = self.reported_target() if command in TARGET_CARRYING else 0
        name = COMMAND_DEBUGFS_NAME[command] if command is not None else "unknown"
        self._counters[name] += 1
        if status not in _OK_STATUSES:
            self._counters[f"{name} failed"] += 1
        self._count_status(status)
        return Outcome(Response(int(status), result=result, capabilities=capabilities), effects)

    # ------------------------------------------------------------------ the commands

    def _start(self, offered: int) -> tuple[Status, tuple[Effect, ...]]:
        forget = self._forget()
        self._caps = Capability(offered & int(self._supported) & ~1 & int(ALL_CAPABILITIES))
        self._reset_demanded = False
        self._doorbell = None
        self._limit_hint = None
        log.debug("START offered %#x granted %#x", offered, int(self._caps))
        return Status.SUCCESS_WITH_CAPABILITIES, (forget,)

    def _single(
        self, command: Command, pfn: int, ram: GuestRam
    ) -> tuple[Status, tuple[Effect, ...]]:
        lock = command is Command.LOCK
        if not self._caps & Capability.BIT64_TARGET and pfn > U32_MAX:
            status = Status.ERROR_PPN_INVALID
            self._counters[f"{'lock' if lock else 'unlock'} refused {status.name} (4k)"] += 1
            return status, ()
        pfns = np.array([pfn], dtype=np.uint64)
        statuses, plan = self._plan(
            pfns, np.zeros(1, np.bool_), lock=lock, huge=False, batch_pfn=None, ram=ram
        )
        effects = self._commit(statuses, plan, lock=lock, huge=False)
        return Status(int(statuses[0])), effects

    def _batched(
        self, command: Command, batch_pfn: int, count: int, ram: GuestRam
    ) -> tuple[Status, tuple[Effect, ...]]:
        lock = command in (Command.BATCHED_LOCK, Command.BATCHED_2M_LOCK)
        huge = command in (Command.BATCHED_2M_LOCK, Command.BATCHED_2M_UNLOCK)
        if not 1 <= count <= BATCH_MAX_ENTRIES:
            return Status.ERROR_CMD_INVALID, ()
        if not _page_is_ram(ram, batch_pfn) or self._pages.covered_pfn(batch_pfn):
            return Status.ERROR_CMD_INVALID, ()
        gpa = batch_pfn << PAGE_SHIFT
        try:
            data = ram.read(gpa, count * BATCH_ENTRY_DTYPE.itemsize)
            entries = batch_entries(data, count)
        except GuestError:
            return Status.ERROR_CMD_INVALID, ()
        pfns = entry_pfns(entries)
        reserved = entry_reserved(entries) != 0
        statuses, plan = self._plan(
            pfns, reserved, lock=lock, huge=huge, batch_pfn=batch_pfn, ram=ram
        )
        answered = with_statuses(entries, statuses)
        # Write the statuses back unless the page already holds exactly these entries (every
        # entry SUCCESS and sent with status 0, the common case: the write would change no
        # byte). The check is on values, so it is exact.
        if not np.array_equal(answered, entries):
            try:
                ram.write(gpa, answered.astype(BATCH_ENTRY_DTYPE).tobytes())
            except GuestError:
                return Status.ERROR_CMD_INVALID, ()
        effects = self._commit(statuses, plan, lock=lock, huge=huge)
        return Status.SUCCESS, effects

    # ------------------------------------------------------------ the batch engine

    def _plan(
        self,
        pfns: U64Array,
        reserved: BoolArray,
        *,
        lock: bool,
        huge: bool,
        batch_pfn: int | None,
        ram: GuestRam,
    ) -> tuple[npt.NDArray[np.uint8], U64Array]:
        """Per-entry statuses and the PFNs to (un)lock, without changing anything.

        Equivalent to processing the entries one at a time in order (module docstring).
        Written for the common batch (every entry valid, new and distinct): each refusal
        class costs its masked assignments only when it occurs.
        """
        n = pfns.size
        npages = PAGES_PER_2M if huge else 1
        statuses = np.zeros(n, dtype=np.uint8)  # Status.SUCCESS

        invalid = reserved | ~np.asarray(ram.ram_pfn_mask(pfns, npages), dtype=np.bool_)
        if huge:
            invalid |= (pfns & np.uint64(PAGES_PER_2M - 1)) != 0
        todo: BoolArray | None = None  # None: every entry still a candidate
        if invalid.any():
            statuses[invalid] = Status.ERROR_PPN_INVALID
            todo = ~invalid

        frames = pfns >> np.uint64(FRAME_SHIFT)  # used for 2M only (one cheap shift)
        pages = self._pages
        if lock:
            pinned = self._pinned_mask(pfns, npages, batch_pfn)
            if todo is not None:
                pinned &= todo
            if pinned.any():
                statuses[pinned] = Status.ERROR_PPN_PINNED
                todo = ~pinned if todo is None else todo & ~pinned
            if huge:
                present = pages.test_2m(frames) | pages.any_4k_in_2m(frames)
            else:
                present = pages.covered(pfns)
            refused = Status.ERROR_PPN_LOCKED
            # Refused because of what the balloon holds now: LOCK of a page in it ...
            already = present
        else:
            present = pages.test_2m(frames) if huge else pages.test_4k(pfns)
            refused = Status.ERROR_PPN_UNLOCKED
            already = ~present  # ... UNLOCK of one not in it (at that size)
        if todo is not None:
            already &= todo
        if already.any():
            statuses[already] = refused
            todo = ~already if todo is None else todo & ~already

        # Duplicates among the remaining candidates: the first occurrence decides.
        idx = np.arange(n) if todo is None else np.flatnonzero(todo)
        values = pfns if todo is None else pfns[idx]
        if values.size < 2 or (values[1:] > values[:-1]).all():
            distinct = True  # strictly increasing (what a driver sends): no duplicates
        else:
            ordered = np.sort(values)
            distinct = bool((ordered[1:] != ordered[:-1]).all())
        if distinct:
            candidates = idx
            first_of = is_first = None
        else:
            _, first_pos, group = np.unique(values, return_index=True, return_inverse=True)
            first_of = idx[first_pos[group.reshape(-1)]]  # per candidate: its first occurrence
            is_first = first_of == idx
            candidates = idx[is_first]

        if lock:
            target = self.reported_target(int(ram.total_pages))
            room = target - pages.size
            allowed = max(0, -(-room // npages))  # candidates that may still lock
            if allowed < candidates.size:
                statuses[candidates[allowed:]] = Status.ERROR_PPN_NOTNEEDED
                ok = candidates[:allowed]
            else:
                ok = candidates
        else:
            ok = candidates
        if first_of is not None and is_first is not None:
            success = np.zeros(n, dtype=np.bool_)
            success[ok] = True
            # A duplicate of a success finds the page taken (LOCKED) / already gone
            # (UNLOCKED); a duplicate of a NOTNEEDED candidate is NOTNEEDED too (the size
            # only grew).
            dup_first = first_of[~is_first]
            statuses[idx[~is_first]] = np.where(success[dup_first], refused, statuses[dup_first])
        if ok.size == n:
            return statuses, pfns
        return statuses, pfns[ok]

    def _pinned_mask(self, pfns: U64Array, npages: int, batch_pfn: int | None) -> BoolArray:
        """Per entry: ``[pfn, pfn + npages)`` overlaps a pinned range or the batch page."""
        mask = self._pinned.overlaps(pfns, npages)
        if batch_pfn is not None:
            page = np.uint64(batch_pfn)
            mask |= (pfns <= page) & (page < pfns + np.uint64(npages))
        return mask

    def _commit(
        self, statuses: npt.NDArray[np.uint8], pfns: U64Array, *, lock: bool, huge: bool
    ) -> tuple[Effect, ...]:
        unit = "2M" if huge else "4k"
        refusals = _LOCK_REFUSALS if lock else _UNLOCK_REFUSALS
        counts = np.bincount(statuses, minlength=int(Status.ERROR_BUSY) + 1)
        op = "lock" if lock else "unlock"
        for status in refusals:
            if counts[status]:
                self._counters[f"{op} refused {status.name} ({unit})"] += int(counts[status])
        if not pfns.size:
            return ()
        frames = pfns >> np.uint64(FRAME_SHIFT)
        if lock:
            # Grow the map to what is locked; geometric growth stops at the RAM size so a
            # guest without holes ends up with an exact map (1 bit per page).
            end = int(pfns.max()) + (PAGES_PER_2M if huge else 1)
            self._pages.ensure(end, limit=self._ram_pages)
            if huge:
                self._pages.set_2m(frames)
            else:
                self._pages.set_4k(pfns)
            self._counters[f"locked ({unit})"] += int(pfns.size)
            return (coalesce(pfns, PAGES_PER_2M if huge else 1),)
        if huge:
            self._pages.clear_2m(frames)
        else:
            self._pages.clear_4k(pfns)
        self._counters[f"unlocked ({unit})"] += int(pfns.size)
        return ()

    # -------------------------------------------------------------------- helpers

    def _forget(self) -> Forget:
        self._counters["forgotten (4k)"] += self._pages.count_4k
        self._counters["forgotten (2M)"] += self._pages.count_2m
        self._pages.clear()
        return Forget()

    def _count_status(self, status: Status) -> None:
        self._counters[f"status {status.name}"] += 1

    def __repr__(self) -> str:
        return (
            f"BalloonModel(size={self.size}, target={self._target}, caps={int(self._caps):#x}, "
            f"reset_demanded={self._reset_demanded})"
        )


def _page_is_ram(ram: GuestRam, pfn: int) -> bool:
    """``ram.ram_pfn_mask([pfn], 1)[0]``, through the RAM's scalar ``contains(gpa, length)``
    when it has one (vdev's GuestMemory: the same test, without arrays)."""
    contains = getattr(ram, "contains", None)
    if contains is not None:
        return bool(contains(pfn << PAGE_SHIFT, 1 << PAGE_SHIFT))
    return bool(ram.ram_pfn_mask(np.array([pfn], dtype=np.uint64), 1)[0])


def _counter_names() -> list[str]:
    names: list[str] = []
    for name in COMMAND_DEBUGFS_NAME.values():
        names += [name, f"{name} failed"]
    names += ["unknown", "unknown failed", "bad frame"]
    names += [f"status {status.name}" for status in Status]
    for unit in ("4k", "2M"):
        names += [f"locked ({unit})", f"unlocked ({unit})", f"forgotten ({unit})"]
        names += [f"lock refused {s.name} ({unit})" for s in _LOCK_REFUSALS]
        names += [f"unlock refused {s.name} ({unit})" for s in _UNLOCK_REFUSALS]
    names += ["reset", "doorbell", "target set"]
    return names
