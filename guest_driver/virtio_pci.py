"""A modern (virtio 1.x) PCI device, driver side, over any way of reaching its registers.

The same driver runs wherever something can read and write the function's BAR registers and
the guest memory its rings live in:

* over QEMU's qtest (:mod:`lab.qtest.virtio_pci`: QEMU with a HLT BIOS, we are the guest;
  BARs at the addresses we assigned, guest memory through ``b64read``/``b64write``);
* inside a real Linux guest (:mod:`guest_driver.uio`: the function bound to
  ``uio_pci_generic``, its BAR mmap'd from sysfs, rings in pages we locked and whose
  physical addresses we read from ``/proc/self/pagemap``).

Both give a :class:`PciPort`: MMIO accessors at absolute "addresses" (whatever the port
chose for each BAR: ``bar_addr``), a :class:`guest_driver.virtq.MemoryPort` for guest
memory, and INTx interrupts (``irq_raises`` counts them; ``wait_irq`` sleeps for the next).
MSI-X is left off (``VIRTIO_MSI_NO_VECTOR``): interrupts are INTx and the ISR register says
why. The register layout is declared in :mod:`protocol.virtio_pci`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from guest_driver.virtq import DriverQueue, MemoryPort, RingLayout, UsedElem
from protocol import virtio_pci as vp
from protocol.errors import LocalError
from protocol.units import PAGE_SIZE
from protocol.virtio_pci import (
    CC_CFG_GENERATION,
    CC_DF,
    CC_DFSELECT,
    CC_GF,
    CC_GFSELECT,
    CC_MSIX_CONFIG,
    CC_NUM_QUEUES,
    CC_Q_DESC,
    CC_Q_DEVICE,
    CC_Q_DRIVER,
    CC_Q_ENABLE,
    CC_Q_MSIX,
    CC_Q_NOTIFY_OFF,
    CC_Q_SELECT,
    CC_Q_SIZE,
    CC_STATUS,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
    DeviceStatus,
)


class PortError(LocalError):
    """The way to the device failed (qtest connection lost, a sysfs or mmap access failed).

    Raised by :class:`PciPort` implementations (:class:`lab.qtest.client.Qtest`,
    :class:`guest_driver.uio.UioPort`); caught by
    :class:`guest_driver.transport_virtio_pci.VirtioPciTransport`, which turns it into
    :class:`protocol.errors.DeviceGone`.
    """


class PciPort(MemoryPort, Protocol):
    """MMIO registers, guest memory and INTx of one PCI function (see the module doc)."""

    async def readb(self, addr: int) -> int: ...
    async def readw(self, addr: int) -> int: ...
    async def readl(self, addr: int) -> int: ...
    async def writeb(self, addr: int, v: int) -> None: ...
    async def writew(self, addr: int, v: int) -> None: ...
    async def writel(self, addr: int, v: int) -> None: ...

    @property
    def irq_raises(self) -> int:
        """How many times the interrupt line was raised so far."""
        ...

    async def wait_irq(self, after: int, timeout: float | None = None) -> bool:
        """Wait until ``irq_raises`` exceeds ``after``; False after ``timeout``."""
        ...


class Allocator(Protocol):
    """Guest memory for rings and buffers: returns a guest-physical address.

    ``contiguous``: whether an allocation may span pages (False inside a real guest, where
    consecutive virtual pages are not consecutive frames: each ring area gets its own page).
    """

    contiguous: bool

    def alloc(self, size: int, align: int = PAGE_SIZE) -> int: ...


def ring_layout(mem: Allocator, size: int) -> RingLayout:
    """Where queue areas go: one block when ``mem`` is contiguous, else a page per area."""
    if mem.contiguous:
        return RingLayout.contiguous(mem.alloc(RingLayout.footprint(size)), size)
    desc, avail, used = (mem.alloc(n) for _, n in RingLayout.contiguous(0, size).areas())
    return RingLayout(size=size, desc=desc, avail=avail, used=used)


@dataclass(frozen=True)
class VirtioCap:
    """One virtio vendor capability: ``cfg_type`` lives in ``bar`` at ``offset``."""

    cfg_type: int
    bar: int
    offset: int
    length: int
    multiplier: int = 0


def parse_virtio_caps(config: bytes) -> list[VirtioCap]:
    """The virtio vendor capabilities in a PCI configuration space image, in list order
    (:data:`protocol.virtio_pci.CAP` / :data:`protocol.virtio_pci.NOTIFY_CAP`)."""

    def u(off: int, size: int) -> int:
        if off + size > len(config):
            return 0
        return int.from_bytes(config[off : off + size], "little")

    if not u(vp.PCI_STATUS, 2) & vp.PCI_STATUS_CAP_LIST:
        return []
    caps: list[VirtioCap] = []
    ptr = u(vp.PCI_CAPABILITY_LIST, 1) & 0xFC
    seen: set[int] = set()
    while ptr and ptr not in seen and ptr + vp.CAP.sizeof() <= len(config):
        seen.add(ptr)
        if u(ptr, 1) == vp.PCI_CAP_ID_VNDR:
            is_notify = u(ptr + vp.CAP_OFFSET["cfg_type"], 1) == vp.VIRTIO_PCI_CAP_NOTIFY_CFG
            fmt = (
                vp.NOTIFY_CAP
                if is_notify and ptr + vp.NOTIFY_CAP.sizeof() <= len(config)
                else vp.CAP
            )
            cap = fmt.parse(config[ptr : ptr + fmt.sizeof()])
            mult = cap.notify_off_multiplier if fmt is vp.NOTIFY_CAP else 0
            caps.append(VirtioCap(cap.cfg_type, cap.bar, cap.offset, cap.length, mult))
        ptr = u(ptr + 1, 1) & 0xFC
    return caps


class VirtioPciDevice:
    """A modern virtio-pci function (INTx interrupts, MSI-X off) driven through a port."""

    def __init__(
        self,
        port: PciPort,
        name: str,
        bar_addr: Mapping[int, int],
        caps: Sequence[VirtioCap],
        device_id: int,
    ) -> None:
        self.port = port
        self.name = name
        self.caps = list(caps)
        self.device_id = device_id
        by_type = {c.cfg_type: c for c in reversed(self.caps)}  # first of each type wins
        try:
            common = by_type[vp.VIRTIO_PCI_CAP_COMMON_CFG]
            notify = by_type[vp.VIRTIO_PCI_CAP_NOTIFY_CFG]
            isr = by_type[vp.VIRTIO_PCI_CAP_ISR_CFG]
        except KeyError as e:
            raise LocalError(f"{name}: not a modern virtio device (no capability {e})") from None
        self.common = bar_addr[common.bar] + common.offset
        self.notify_base = bar_addr[notify.bar] + notify.offset
        self.notify_mult = notify.multiplier
        self.isr = bar_addr[isr.bar] + isr.offset
        dev = by_type.get(vp.VIRTIO_PCI_CAP_DEVICE_CFG)
        self.device_cfg = None if dev is None else bar_addr[dev.bar] + dev.offset
        self.device_cfg_len = 0 if dev is None else dev.length
        self.features = 0  # negotiated
        self.queues: dict[int, DriverQueue] = {}
        self._notify_addr: dict[int, int] = {}
        #: ISR bits read but not yet consumed (ISR is read-to-clear; several waiters share it)
        self.isr_pending = 0
        self.interrupts = 0

    # -- common configuration ----------------------------------------------------------

    async def status(self) -> int:
        return await self.port.readb(self.common + CC_STATUS)

    async def set_status(self, status: int) -> None:
        await self.port.writeb(self.common + CC_STATUS, status)

    async def add_status(self, bits: int) -> int:
        status = await self.status() | bits
        await self.set_status(status)
        return status

    async def device_features(self) -> int:
        await self.port.writel(self.common + CC_DFSELECT, 0)
        lo = await self.port.readl(self.common + CC_DF)
        await self.port.writel(self.common + CC_DFSELECT, 1)
        hi = await self.port.readl(self.common + CC_DF)
        return hi << 32 | lo

    async def write_driver_features(self, features: int) -> None:
        await self.port.writel(self.common + CC_GFSELECT, 0)
        await self.port.writel(self.common + CC_GF, features & 0xFFFF_FFFF)
        await self.port.writel(self.common + CC_GFSELECT, 1)
        await self.port.writel(self.common + CC_GF, features >> 32)

    async def num_queues(self) -> int:
        return await self.port.readw(self.common + CC_NUM_QUEUES)

    async def config_generation(self) -> int:
        return await self.port.readb(self.common + CC_CFG_GENERATION)

    async def reset(self, *, timeout: float = 5.0) -> None:
        """Write status 0 and wait until the device reads back 0 (the spec's reset)."""
        await self.set_status(0)
        with trio.fail_after(timeout):
            while await self.status() != 0:
                await trio.sleep(0.001)
        self.features = 0
        self.queues.clear()
        self._notify_addr.clear()
        self.isr_pending = 0

    async def begin(self, wanted: int) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, negotiate ``wanted`` & offered (VERSION_1 required),
        FEATURES_OK. Returns the negotiated features."""
        await self.reset()
        await self.set_status(DeviceStatus.ACKNOWLEDGE)
        await self.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        offered = await self.device_features()
        if not offered & VIRTIO_F_VERSION_1:
            raise LocalError(f"{self.name}: device does not offer VERSION_1")
        features = offered & (wanted | VIRTIO_F_VERSION_1)
        if offered & VIRTIO_F_ACCESS_PLATFORM:
            features |= VIRTIO_F_ACCESS_PLATFORM  # identity-mapped: we are the "IOMMU"
        await self.write_driver_features(features)
        status = await self.add_status(DeviceStatus.FEATURES_OK)
        if not await self.status() & DeviceStatus.FEATURES_OK:
            await self.set_status(status | DeviceStatus.FAILED)
            raise LocalError(f"{self.name}: device refused FEATURES_OK for {features:#x}")
        self.features = features
        return features

    async def queue_max_size(self, index: int) -> int:
        await self.port.writew(self.common + CC_Q_SELECT, index)
        return await self.port.readw(self.common + CC_Q_SIZE)

    async def setup_queue(
        self,
        index: int,
        size: int,
        mem: Allocator,
        *,
        event_idx: bool | None = None,
        layout: RingLayout | None = None,
    ) -> DriverQueue:
        """Allocate, zero and program queue ``index`` (size clamped to the device maximum);
        enable it. Returns the driver-side ring."""
        c = self.common
        await self.port.writew(c + CC_Q_SELECT, index)
        max_size = await self.port.readw(c + CC_Q_SIZE)
        if max_size == 0:
            raise LocalError(f"{self.name}: queue {index} does not exist")
        size = min(size, max_size)
        if layout is None:
            layout = ring_layout(mem, size)
        if event_idx is None:
            event_idx = bool(self.features & VIRTIO_F_EVENT_IDX)
        q = DriverQueue(self.port, layout, event_idx=event_idx)
        await q.init()
        await self.port.writew(c + CC_Q_SIZE, layout.size)
        await self.port.writew(c + CC_Q_MSIX, VIRTIO_MSI_NO_VECTOR)
        for off, addr in ((CC_Q_DESC, layout.desc), (CC_Q_DRIVER, layout.avail),
                          (CC_Q_DEVICE, layout.used)):  # fmt: skip
            await self.port.writel(c + off, addr & 0xFFFF_FFFF)
            await self.port.writel(c + off + 4, addr >> 32)
        notify_off = await self.port.readw(c + CC_Q_NOTIFY_OFF)
        await self.port.writew(c + CC_Q_ENABLE, 1)
        self._notify_addr[index] = self.notify_base + notify_off * self.notify_mult
        self.queues[index] = q
        return q

    async def driver_ok(self) -> None:
        """Set DRIVER_OK. With a vhost-user device QEMU starts the back-end inside this write."""
        await self.port.writew(self.common + CC_MSIX_CONFIG, VIRTIO_MSI_NO_VECTOR)
        await self.add_status(DeviceStatus.DRIVER_OK)

    # -- notifications and interrupts --------------------------------------------------

    async def notify(self, index: int) -> None:
        await self.port.writew(self._notify_addr[index], index)

    async def kick(self, index: int) -> None:
        """Notify the device if the ring asks for it."""
        if await self.queues[index].needs_kick():
            await self.notify(index)

    async def read_isr(self) -> int:
        """Read (and thereby clear) the ISR; bits accumulate in :attr:`isr_pending`."""
        isr = await self.port.readb(self.isr)
        if isr:
            self.interrupts += 1
            self.isr_pending |= isr
        return isr

    def take_isr(self, mask: int) -> int:
        got = self.isr_pending & mask
        self.isr_pending &= ~mask
        return got

    async def wait_isr(self, mask: int, timeout: float, *, poll: float = 0.05) -> int:
        """Wait for an interrupt with one of ``mask``'s ISR bits; consume and return them.

        Uses the intercepted IRQ line when there is one, and polls every ``poll`` s as a
        fallback. Raises ``trio.TooSlowError`` after ``timeout``.
        """
        with trio.fail_after(timeout):
            while True:
                seen = self.port.irq_raises
                if got := self.take_isr(mask):
                    return got
                await self.read_isr()
                if got := self.take_isr(mask):
                    return got
                await self.port.wait_irq(seen, poll)

    async def wait_used(self, index: int, timeout: float, *, poll: float = 0.05) -> list[UsedElem]:
        """Collect used elements of queue ``index``, waiting for at least one."""
        q = self.queues[index]
        with trio.fail_after(timeout):
            while True:
                seen = self.port.irq_raises
                if elems := await q.poll_used():
                    return elems
                await self.read_isr()  # lower the line; the bit stays for other waiters
                if elems := await q.poll_used():
                    return elems
                await self.port.wait_irq(seen, poll)

    # -- device configuration space ----------------------------------------------------

    def _cfg(self, offset: int, size: int) -> int:
        if self.device_cfg is None:
            raise LocalError(f"{self.name}: no device configuration space")
        if offset + size > self.device_cfg_len:
            raise LocalError(f"config access {offset}+{size} beyond {self.device_cfg_len}")
        return self.device_cfg + offset

    async def config_read(self, offset: int, size: int) -> int:
        addr = self._cfg(offset, size)
        if size == 1:
            return await self.port.readb(addr)
        if size == 2:
            return await self.port.readw(addr)
        if size == 4:
            return await self.port.readl(addr)
        raise LocalError(f"config read of {size} bytes")

    async def config_write(self, offset: int, size: int, value: int) -> None:
        addr = self._cfg(offset, size)
        if size == 1:
            await self.port.writeb(addr, value)
        elif size == 2:
            await self.port.writew(addr, value)
        elif size == 4:
            await self.port.writel(addr, value)
        else:
            raise LocalError(f"config write of {size} bytes")

    async def config_bytes(self, offset: int, length: int) -> bytes:
        """A consistent snapshot of ``length`` bytes (config_generation retry loop)."""
        while True:
            gen = await self.config_generation()
            out = bytearray()
            for off in range(offset, offset + length, 4):
                out += struct.pack("<I", await self.config_read(off, 4))
            if await self.config_generation() == gen:
                return bytes(out[:length])
