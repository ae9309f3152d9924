"""The harness inside a Linux guest: the guest-level vmw cases over the guest's own device.

Run as root in the vmw test guest (``python3 -m conformance --in-guest``, see README): the
cases whose ``needs`` are empty (:data:`conformance.context.Need`) talk to the back-end
the way a guest driver does, through the guest's virtio-pci function bound to
``uio_pci_generic`` (:class:`guest_driver.uio.UioPort`, the port ``guest-driver
run-linux`` uses), with QEMU's vhost-user device in between:

* a session (:meth:`GuestContext.guest`) resets the function and initialises it again
  (features with EVENT_IDX and INDIRECT_DESC, cmdq and eventq, DRIVER_OK): for the device
  this is a guest driver starting over, so the back-end answers ERROR_RESET until START
  (docs/PROTOCOL.md section 6), as a new connection does over the harness's own front-end;
* the rings, request/response buffers, the batch page and the pages the cases lock
  (:meth:`GuestContext.pfn`) are pages of this process, locked, with frames from
  ``/proc/self/pagemap`` (:class:`guest_driver.linux_memory.LockedPages`): a case never
  locks a page the guest kernel or another process owns;
* the first page frame past guest RAM comes from ``/proc/iomem`` (the top of "System RAM"
  rounded up to a MiB: the firmware reserves the last pages of RAM for its tables), or
  ``--ram-mib``;
* the operator target cannot be changed from inside: the run is told the target the host
  set (``--initial-target``), and a case that needs another is reported skipped. The host
  side (:func:`lab.vmw_guest.run_harness`) runs one pass per target the cases need.

The cases that need anything (vhost-user messages, the RAM file, a target change during
the case, hostile rings, adjacent 2 MiB frames) are reported skipped, with the reason.
At the end a last session starts (the back-end forgets whatever the cases locked) and
withdraws, and the function is reset, before the pages go back to the guest kernel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import trio

from conformance.cases import Case
from conformance.context import CaseFailed, Context, Need, Skipped, VmwSession, expect_status
from conformance.rawfrontend import BalloonGuest, Frontend, VmwCommands, VmwGuest
from conformance.runner import SKIP, Result, run_case, unsupported
from guest_driver.linux_memory import LockedPages, Pagemap, pin_settings, restore_settings
from guest_driver.uio import VMW_PCI_ID, UioPort, find_function
from guest_driver.virtio_pci import VirtioPciDevice, ring_layout
from guest_driver.virtq import Buffer, RingLayout, UsedElem
from protocol import vmw
from protocol.errors import LocalError
from protocol.units import PAGE_SIZE
from protocol.vhost_user import VirtioFeature as VF
from protocol.virtio_pci import VIRTIO_F_EVENT_IDX

CMDQ, EVENTQ = 0, 1
QUEUE_SIZE = 16
#: pages the cases may lock (``ctx.pfn(0)`` .. ``ctx.pfn(POOL_PAGES - 1)``)
POOL_PAGES = 16
#: what one JSON result line starts with on the guest's output
RESULT_PREFIX = "@vbh "
MIB = 1 << 20


def ram_end_pfn(iomem: str | None = None) -> int:
    """The first page frame past guest RAM: the top of "System RAM" in ``/proc/iomem``
    (root sees the addresses), rounded up to a MiB."""
    text = Path("/proc/iomem").read_text() if iomem is None else iomem
    ends = [
        int(m[1], 16) + 1
        for m in re.finditer(r"^[0-9a-f]+-([0-9a-f]+) : System RAM$", text, re.MULTILINE)
    ]
    if not ends or max(ends) <= 1:
        raise LocalError("no System RAM addresses in /proc/iomem (run as root, or --ram-mib)")
    return (max(ends) + MIB - 1) // MIB * MIB // PAGE_SIZE


@dataclass
class GuestDevice:
    """The guest's vmw function and the locked pages the cases use, for one run."""

    port: UioPort
    dev: VirtioPciDevice
    pagemap: Pagemap
    locked: LockedPages  # rings, request/response, batch page, scratch, indirect table
    pool: LockedPages  # the pages the cases lock
    ram_end_pfn: int
    layouts: dict[int, RingLayout] = field(default_factory=dict)
    pfns: list[int] = field(default_factory=list)
    req: int = 0
    batch_page: int = 0
    scratch: int = 0
    indirect_table: int = 0
    timeout: float = 5.0
    _settings: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(
        cls, *, ram_mib: int | None = None, pci_id: tuple[int, int] = VMW_PCI_ID
    ) -> GuestDevice:
        """Bind and map the function, lock the pages; :class:`protocol.errors.LocalError`
        (a :class:`guest_driver.virtio_pci.PortError` or
        :class:`guest_driver.linux_memory.GuestMemoryError`) when this guest cannot."""
        function = find_function(*pci_id)  # first: nothing is changed where there is none
        end = ram_mib * MIB // PAGE_SIZE if ram_mib else ram_end_pfn()
        settings = pin_settings()  # locked pages must stay at their frames
        pagemap = Pagemap()
        locked = LockedPages(pagemap, pages=16)
        pool = LockedPages(pagemap, pages=POOL_PAGES)
        try:
            port, dev = UioPort.open(function, locked)
        except BaseException:
            pool.close()
            locked.close()
            pagemap.close()
            restore_settings(settings)
            raise
        d = cls(port, dev, pagemap, locked, pool, end, _settings=settings)
        d.layouts = {q: ring_layout(locked, QUEUE_SIZE) for q in (CMDQ, EVENTQ)}
        d.req, d.batch_page, d.scratch, d.indirect_table = (
            locked.alloc(PAGE_SIZE) for _ in range(4)
        )
        d.pfns = [pool.alloc(PAGE_SIZE) // PAGE_SIZE for _ in range(POOL_PAGES)]
        return d

    async def session(self) -> GuestVmw:
        """Reset the function and set it up again: a driver starting over."""
        await self.dev.begin(VIRTIO_F_EVENT_IDX | int(VF.RING_INDIRECT_DESC))
        for q, layout in self.layouts.items():
            await self.dev.setup_queue(q, QUEUE_SIZE, self.locked, layout=layout)
        await self.dev.driver_ok()
        return GuestVmw(self)

    async def close(self) -> None:
        """Leave the back-end holding nothing, reset the function, free everything.

        The back-end learns of a reset only when the rings start again, so a last session
        starts (it forgets what the cases locked) and withdraws (START(0)) first."""
        try:
            with trio.move_on_after(5, shield=True):
                g = await self.session()
                await g.start(0)
                await self.dev.reset(timeout=5)
        finally:
            self.port.close()
            self.pool.close()
            self.locked.close()
            self.pagemap.close()
            restore_settings(self._settings)

    async def write(self, gpa: int, data: bytes) -> None:
        mem = self.pool if gpa // PAGE_SIZE in self.pfns else self.locked
        await mem.write(gpa, data)

    async def read(self, gpa: int, n: int) -> bytes:
        mem = self.pool if gpa // PAGE_SIZE in self.pfns else self.locked
        return await mem.read(gpa, n)


@dataclass
class GuestVmw(VmwCommands):
    """A :class:`conformance.context.VmwSession` over the guest's function."""

    d: GuestDevice

    @property
    def ram_end_pfn(self) -> int:
        return self.d.ram_end_pfn

    @property
    def batch_pfn(self) -> int:
        return self.d.batch_page // PAGE_SIZE

    @property
    def indirect(self) -> bool:
        return bool(self.d.dev.features & VF.RING_INDIRECT_DESC)

    @property
    def scratch(self) -> int:
        return self.d.scratch

    def ring_pfn_ranges(self) -> list[tuple[int, int]]:
        return [r for q in (CMDQ, EVENTQ) for r in self.d.layouts[q].pfn_ranges()]

    async def write(self, gpa: int, data: bytes) -> None:
        await self.d.write(gpa, data)

    async def read(self, gpa: int, n: int) -> bytes:
        return await self.d.read(gpa, n)

    async def post(self, buffers: Sequence[Buffer], *, indirect: bool = False) -> UsedElem:
        dev = self.d.dev
        head = await dev.queues[CMDQ].add(
            buffers, indirect_table=self.d.indirect_table if indirect else None
        )
        await dev.kick(CMDQ)
        with trio.fail_after(self.d.timeout):
            while True:
                for e in await dev.wait_used(CMDQ, self.d.timeout):
                    if e.id == head:
                        return e

    async def exchange(
        self, request: bytes, resp_len: int = vmw.RESPONSE_SIZE
    ) -> tuple[bytes, UsedElem]:
        req, resp = self.d.req, self.d.req + 64
        await self.write(req, request)
        await self.write(resp, b"\xee" * resp_len)
        bufs = [Buffer(req, len(request))]
        if resp_len:
            bufs.append(Buffer(resp, resp_len, write=True))
        used = await self.post(bufs)
        return await self.read(resp, resp_len), used

    async def batch(
        self,
        cmd: int,
        pfns: Sequence[int],
        *,
        raw_entries: Sequence[int] | None = None,
        count: int | None = None,
    ) -> tuple[vmw.Response, list[int]]:
        if raw_entries is None:
            page = vmw.build_batch(pfns)
        else:
            page = b"".join(e.to_bytes(8, "little") for e in raw_entries)
        await self.write(self.d.batch_page, page.ljust(PAGE_SIZE, b"\0"))
        n = len(page) // 8 if count is None else count
        resp = await self.command(cmd, self.batch_pfn, n)
        after = await self.read(self.d.batch_page, len(page))
        return resp, [int.from_bytes(after[i : i + 8], "little") for i in range(0, len(after), 8)]

    async def fill_page(self, pfn: int, byte: int) -> None:
        await self.write(pfn * PAGE_SIZE, bytes([byte]) * PAGE_SIZE)

    async def read_page(self, pfn: int) -> bytes:
        return await self.read(pfn * PAGE_SIZE, PAGE_SIZE)


@dataclass
class GuestContext(Context):
    """A case's context inside the guest: sessions are device resets of one function."""

    gdev: GuestDevice | None = None

    transport: ClassVar[str] = "in-guest"
    provides: ClassVar[frozenset[Need]] = frozenset()

    @property
    def _dev(self) -> GuestDevice:
        assert self.gdev is not None
        return self.gdev

    def pfn(self, i: int = 0) -> int:
        return self._dev.pfns[i]

    async def guest(self, *, start: bool = False) -> VmwSession:
        g = await self._dev.session()
        if start:
            expect_status(await g.start(), vmw.Status.SUCCESS_WITH_CAPABILITIES, "START")
        return g

    async def still_serving(self, what: str) -> None:
        try:
            await self.guest(start=True)
        except (OSError, trio.TooSlowError) as exc:
            raise CaseFailed(
                f"after {what}, the device did not serve a fresh driver: {exc!r}"
            ) from exc

    # what speaks vhost-user itself: nothing here (the case should have declared it)
    async def vmw(self, *, start: bool = False, **negotiate: Any) -> VmwGuest:
        raise Skipped(_NO_VHOST_USER)

    async def frontend(self, **kw: Any) -> Frontend:
        raise Skipped(_NO_VHOST_USER)

    async def balloon(self, **kw: Any) -> BalloonGuest:
        raise Skipped(_NO_VHOST_USER)


_NO_VHOST_USER = "needs vhost-user: the in-guest transport has only the guest's function"


async def run_in_guest(
    cases: Sequence[Case],
    *,
    initial_target: int | None,
    ram_mib: int | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run ``cases`` over the guest's function; those it cannot run are skipped (why)."""
    results: list[Result] = []

    def done(r: Result) -> None:
        results.append(r)
        if on_result is not None:
            on_result(r)

    runnable = []
    for c in cases:
        reason = unsupported(c, GuestContext)
        if reason is None and c.target is not None and c.target != initial_target:
            reason = f"needs target {c.target} pages; the host set {initial_target}"
        if reason is not None:
            done(Result(c, SKIP, reason))
        else:
            runnable.append(c)
    if not runnable:
        return results
    gdev = GuestDevice.open(ram_mib=ram_mib)
    try:
        for c in runnable:
            ctx = GuestContext(socket="", device="vmw", initial_target=initial_target, gdev=gdev)
            done(await run_case(c, ctx))
    finally:
        await gdev.close()
    return results


def result_line(r: Result) -> str:
    """One result as the JSON line the host reads back (:func:`parse_result_line`)."""
    body = {"case": r.case.name, "outcome": r.outcome, "message": r.message,
            "seconds": round(r.seconds, 3)}  # fmt: skip
    return RESULT_PREFIX + json.dumps(body, sort_keys=True)


def parse_result_line(line: str) -> dict[str, object] | None:
    """The result a :func:`result_line` carries, None for any other line."""
    if not line.startswith(RESULT_PREFIX):
        return None
    body = json.loads(line[len(RESULT_PREFIX) :])
    return body if isinstance(body, dict) else None
