"""The vmmemctl transport over a virtio-pci function: cmdq and eventq (docs/PROTOCOL.md).

The driver core (:mod:`guest_driver.driver`) runs unchanged over it, wherever the function's
registers can be reached (:class:`guest_driver.virtio_pci.PciPort`): QEMU's qtest
(:mod:`lab.transport_qtest`) or a Linux guest's ``uio_pci_generic`` (:mod:`guest_driver.uio`).

* queue 0 ``cmdq``: one command = one chain [24-byte request (R), 24-byte response (W)];
  :meth:`VirtioPciTransport.command` posts it, notifies, and waits for the used element
  (INTx interrupt, ISR polled as a fallback);
* queue 1 ``eventq``: :data:`EVENT_BUFFERS` 8-byte buffers kept posted; each used one is a
  doorbell event (docs/PROTOCOL.md section 5), re-posted after it is read;
* the batch page and the request/response buffers are guest memory the port reads and
  writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from guest_driver.virtio_pci import Allocator, PortError, VirtioPciDevice
from guest_driver.virtq import Buffer
from protocol.errors import DeviceGone, FormatError
from protocol.virtio_pci import VIRTIO_F_EVENT_IDX as VIRTIO_RING_F_EVENT_IDX
from protocol.vmw import (
    EVENT_SIZE,
    REQUEST_SIZE,
    RESPONSE_SIZE,
    EventKind,
    Request,
    Response,
    parse_event,
)

log = logging.getLogger(__name__)

CMDQ = 0
EVENTQ = 1
EVENT_BUFFERS = 4

#: (context id, resource id) we register with VMCI_DOORBELL_SET (any valid pair will do)
DOORBELL_IDS = (3, 0x10)


@dataclass
class VirtioPciTransport:
    """:class:`guest_driver.transport.Transport` over one virtio-pci function (any port)."""

    dev: VirtioPciDevice
    mem: Allocator
    timeout: float = 10.0
    queue_size: int = 16
    events: bool = True
    _req: int = 0
    _resp: int = 0
    _event_pages: list[int] = field(default_factory=list)
    _event_bufs: dict[int, int] = field(default_factory=dict)  # head -> gpa
    _pending_events: list[EventKind] = field(default_factory=list)
    _lock: trio.Lock = field(default_factory=trio.Lock)
    commands: int = 0

    @classmethod
    async def open(
        cls,
        dev: VirtioPciDevice,
        mem: Allocator,
        *,
        timeout: float = 10.0,
        event_idx: bool = True,
        events: bool = True,
    ) -> VirtioPciTransport:
        """Initialise the device (features, cmdq, eventq, DRIVER_OK) and post event buffers."""
        t = cls(dev, mem, timeout=timeout, events=events)
        await t.init(event_idx=event_idx)
        return t

    async def init(self, *, event_idx: bool = True) -> None:
        """(Re)initialise the device from reset: what the driver does at probe time."""
        try:
            await self.dev.begin(VIRTIO_RING_F_EVENT_IDX if event_idx else 0)
            if not self._req:
                page = self.mem.alloc(4096)
                self._req, self._resp = page, page + 64
                self._event_pages = [page + 128 + 16 * i for i in range(EVENT_BUFFERS)]
            await self.dev.setup_queue(CMDQ, self.queue_size, self.mem)
            await self.dev.setup_queue(EVENTQ, self.queue_size, self.mem)
            await self.dev.driver_ok()
            self._event_bufs.clear()
            self._pending_events.clear()
            if self.events:
                for gpa in self._event_pages:
                    await self._post_event(gpa)
                await self.dev.kick(EVENTQ)
        except PortError as e:
            raise DeviceGone(f"{self.dev.name}: {e}") from e

    async def _post_event(self, gpa: int) -> None:
        head = await self.dev.queues[EVENTQ].add([Buffer(gpa, EVENT_SIZE, write=True)])
        self._event_bufs[head] = gpa

    # -- Transport ---------------------------------------------------------------------

    async def command(self, request: Request) -> Response:
        async with self._lock:
            try:
                await self.dev.port.write(self._req, request.build())
                q = self.dev.queues[CMDQ]
                head = await q.add(
                    [Buffer(self._req, REQUEST_SIZE), Buffer(self._resp, RESPONSE_SIZE, write=True)]
                )
                await self.dev.kick(CMDQ)
                while True:
                    elems = await self.dev.wait_used(CMDQ, self.timeout)
                    mine = [e for e in elems if e.id == head]
                    if mine:
                        break
                if mine[0].len < RESPONSE_SIZE:
                    raise DeviceGone(f"cmdq: response of {mine[0].len} bytes")
                raw = await self.dev.port.read(self._resp, RESPONSE_SIZE)
            except trio.TooSlowError as e:
                raise DeviceGone(f"no response to {request!r} in {self.timeout} s") from e
            except PortError as e:
                raise DeviceGone(f"{self.dev.name}: {e}") from e
            self.commands += 1
            return Response.parse(raw)

    async def read(self, gpa: int, n: int) -> bytes:
        try:
            return await self.dev.port.read(gpa, n)
        except PortError as e:
            raise DeviceGone(f"{self.dev.name}: {e}") from e

    async def write(self, gpa: int, data: bytes) -> None:
        try:
            await self.dev.port.write(gpa, data)
        except PortError as e:
            raise DeviceGone(f"{self.dev.name}: {e}") from e

    async def _collect_events(self) -> None:
        q = self.dev.queues[EVENTQ]
        elems = await q.poll_used()
        for e in elems:
            gpa = self._event_bufs.pop(e.id, None)
            if gpa is None:
                continue
            if e.len >= EVENT_SIZE:
                raw = await self.dev.port.read(gpa, EVENT_SIZE)
                try:
                    self._pending_events.append(parse_event(raw))
                except FormatError as exc:
                    log.warning("eventq: bad event %s: %s", raw.hex(), exc)
            await self._post_event(gpa)
        if elems:
            await self.dev.kick(EVENTQ)

    async def wait_event(self, timeout: float) -> EventKind | None:
        if not self.events:
            await trio.sleep(timeout)
            return None
        try:
            with trio.move_on_after(timeout):
                while True:
                    async with self._lock:
                        seen = self.dev.port.irq_raises
                        await self._collect_events()
                        if self._pending_events:
                            return self._pending_events.pop(0)
                        await self.dev.read_isr()
                        await self._collect_events()
                        if self._pending_events:
                            return self._pending_events.pop(0)
                    await self.dev.port.wait_irq(seen, 0.05)
        except PortError as e:
            raise DeviceGone(f"{self.dev.name}: {e}") from e
        return None

    @property
    def doorbell_ids(self) -> tuple[int, int] | None:
        return DOORBELL_IDS if self.events else None

    # -- config space (the carrier's 8 bytes: num_pages, actual) -----------------------

    async def config(self) -> tuple[int, int]:
        raw = await self.dev.config_bytes(0, 8)
        return int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little")
