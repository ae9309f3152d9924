"""The VMware-style balloon personality: vmmemctl over two virtqueues (docs/PROTOCOL.md).

* queue 0, ``cmdq``: every chain is one command. Its device-readable bytes are the request,
  its device-writable bytes receive the response (``BalloonModel.answer_frame``); the used
  length is the number of response bytes written (24), or 0 for a chain the model does not
  answer or a chain that is malformed at the ring level.
* queue 1, ``eventq``: the doorbell. When the model asks to ring it, one buffer is taken,
  the 8-byte event is written, and the buffer is used. Without a buffer (or before the ring
  runs) the event is remembered (one per kind) and delivered when buffers arrive.
* config space, 8 bytes: ``num_pages`` (the reported target) and ``actual`` (the balloon
  size), both le32, read-only. It lets a carrier device with a config space
  (``vhost-user-gpio-pci``, 8 bytes) work; a target change also raises a config change.
* the ring pages (descriptor tables, avail and used rings) are pinned in the model under
  the owner ``"rings"``: the guest can never lock them.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Mapping
from typing import Any

from protocol.errors import GuestError
from protocol.vmw import EVENT_SIZE, U32_MAX, EventKind, build_event
from vdev.balloon import BalloonModel, DoorbellEvent, Effect, Reclaim
from vdev.devices.base import Device, DeviceContext, DeviceStatus, Work

log = logging.getLogger(__name__)

CMDQ = 0
EVENTQ = 1
_CONFIG = struct.Struct("<II")


class VmwDevice(Device):
    name = "vmw"
    backend_type = "balloon"
    num_queues = 2
    features = 0
    config_size = _CONFIG.size
    gauges = frozenset({"events pending"})

    def __init__(self, ctx: DeviceContext, *, target: int = 0) -> None:
        super().__init__(ctx, target=target)
        self.model = BalloonModel(target=target, pages=ctx.pages)
        self.pending: deque[EventKind] = deque()
        self.events_delivered = 0

    # -- guest side ----------------------------------------------------------------------

    def kick(self, index: int) -> Work:
        if index == CMDQ:
            return self._serve_cmdq()
        if index == EVENTQ:
            return self._deliver()
        return Work()

    def _serve_cmdq(self) -> Work:
        q, mem = self.ctx.queues[CMDQ], self.ctx.memory
        work = Work()
        chains = q.pop(mem)
        work.popped = len(chains)
        for chain in chains:
            written = 0
            if chain.error is None:
                try:
                    response, effects = self.model.answer_frame(
                        chain.read(mem), chain.writable_len, mem
                    )
                    if response is not None:
                        written = chain.write(mem, response)
                    work.merge(self._apply(effects))
                except GuestError as exc:  # the table changed under the chain
                    log.warning("%s: cmdq chain %d: %s", self.ctx.name, chain.head, exc)
            work.completions.append((CMDQ, chain.head, written))
        return work

    def _apply(self, effects: tuple[Effect, ...] | list[Effect]) -> Work:
        work = Work()
        for effect in effects:
            if isinstance(effect, Reclaim):
                if effect.pfn_starts.size:
                    work.reclaims.append(effect)
            elif isinstance(effect, DoorbellEvent):
                if effect.kind not in self.pending:
                    self.pending.append(effect.kind)
                work.merge(self._deliver())
        return work

    def _deliver(self) -> Work:
        """Put pending doorbell events into eventq buffers, as far as buffers go."""
        work = Work()
        q, mem = self.ctx.queues[EVENTQ], self.ctx.memory
        while self.pending and q.ready:
            chains = q.pop(mem, limit=1)
            if not chains:
                break
            work.popped += 1
            chain = chains[0]
            written = 0
            if chain.error is None and chain.writable_len >= EVENT_SIZE:
                try:
                    written = chain.write(mem, build_event(self.pending[0]))
                except GuestError as exc:
                    log.warning("%s: eventq chain %d: %s", self.ctx.name, chain.head, exc)
                if written == EVENT_SIZE:
                    self.pending.popleft()
                    self.events_delivered += 1
            work.completions.append((EVENTQ, chain.head, written))
        return work

    def rings_changed(self) -> None:
        ranges = [r for q in self.ctx.queues for r in q.pinned_pfns()]
        self.model.set_pinned("rings", ranges)

    def read_config(self, offset: int, size: int) -> bytes:
        target = min(self.model.reported_target(self.ctx.memory.total_pages or None), U32_MAX)
        raw = _CONFIG.pack(target, min(self.model.size, U32_MAX))
        return (raw[offset : offset + size]).ljust(size, b"\0")

    # -- operator side -------------------------------------------------------------------

    def set_target(self, pages: int) -> Work:
        work = self._apply(self.model.set_target(pages))
        work.config_changed = True
        return work

    def demand_reset(self) -> Work:
        self.pending.clear()
        work = self._apply(self.model.demand_reset())
        work.config_changed = True
        return work

    def save_state(self) -> dict[str, Any]:
        return {
            **self.model.export_state(),
            "pending": [int(k) for k in self.pending],
            "events_delivered": self.events_delivered,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.model.import_state(dict(state))
        self.pending = deque(
            EventKind(k) for k in state.get("pending", ()) if k in {int(e) for e in EventKind}
        )
        self.events_delivered = int(state.get("events_delivered", 0))

    def shutdown(self) -> None:
        self.model.shutting_down = True

    def size_pages(self) -> int:
        return self.model.size

    def status(self) -> DeviceStatus:
        m = self.model
        counters = dict(m.counters)
        counters["events delivered"] = self.events_delivered
        counters["events pending"] = len(self.pending)
        gt = m.guest_type
        return DeviceStatus(
            size_pages=m.size,
            target_pages=m.target,
            capabilities=int(m.capabilities),
            driver_active=bool(m.capabilities) and not m.reset_demanded,
            # the operator's reset, pending until the driver STARTs again (a driver that
            # never STARTed is "inactive", not resetting: the model also waits for it)
            reset_demanded=m.reset_demanded and bool(m.capabilities),
            guest_type=None if gt is None else int(gt),
            doorbell_registered=m.doorbell is not None,
            counters=counters,
            gauges=self.gauges,
        )
