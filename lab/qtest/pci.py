"""PCI over qtest: configuration space (mechanism #1), bus enumeration, BAR sizing and
assignment (what firmware would do). The register layout is :mod:`protocol.virtio_pci`'s."""

from __future__ import annotations

from dataclasses import dataclass

from lab.qtest.client import Qtest
from protocol.errors import LocalError
from protocol.virtio_pci import (
    CF8,
    CFC,
    PCI_BAR0,
    PCI_COMMAND,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_HEADER_MULTI_FUNCTION,
    PCI_HEADER_TYPE,
    PCI_VENDOR_ID,
)


@dataclass(frozen=True)
class PciFunction:
    bus: int
    dev: int
    fn: int
    vendor: int
    device: int

    def cfg_addr(self, reg: int) -> int:
        return 0x8000_0000 | self.bus << 16 | self.dev << 11 | self.fn << 8 | (reg & 0xFC)

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.dev:02x}.{self.fn} {self.vendor:04x}:{self.device:04x}"


async def cfg_read(qt: Qtest, f: PciFunction | tuple[int, int, int], reg: int, size: int) -> int:
    bus, dev, fn = (f.bus, f.dev, f.fn) if isinstance(f, PciFunction) else f
    await qt.outl(CF8, 0x8000_0000 | bus << 16 | dev << 11 | fn << 8 | (reg & 0xFC))
    port = CFC + (reg & 3)
    if size == 1:
        return await qt.inb(port)
    if size == 2:
        return await qt.inw(port)
    return await qt.inl(port)


async def cfg_write(qt: Qtest, f: PciFunction, reg: int, size: int, value: int) -> None:
    await qt.outl(CF8, f.cfg_addr(reg))
    port = CFC + (reg & 3)
    if size == 1:
        await qt.outb(port, value)
    elif size == 2:
        await qt.outw(port, value)
    else:
        await qt.outl(port, value)


async def pci_scan(qt: Qtest, bus: int = 0) -> list[PciFunction]:
    """Every function present on ``bus``."""
    out: list[PciFunction] = []
    for dev in range(32):
        for fn in range(8):
            ids = await cfg_read(qt, (bus, dev, fn), PCI_VENDOR_ID, 4)
            if ids & 0xFFFF in (0xFFFF, 0):
                if fn == 0:
                    break
                continue
            out.append(PciFunction(bus, dev, fn, ids & 0xFFFF, ids >> 16))
            if (
                fn == 0
                and not await cfg_read(qt, (bus, dev, 0), PCI_HEADER_TYPE, 1)
                & PCI_HEADER_MULTI_FUNCTION
            ):
                break
    return out


@dataclass
class BarAllocator:
    """Hands out MMIO / I/O windows for BARs (what firmware would do)."""

    mmio: int = 0xC000_0000
    mmio_end: int = 0xFE00_0000
    io: int = 0xC000
    io_end: int = 0x10000

    def take_mmio(self, size: int) -> int:
        addr = (self.mmio + size - 1) // size * size
        if addr + size > self.mmio_end:
            raise LocalError("out of PCI MMIO space")
        self.mmio = addr + size
        return addr

    def take_io(self, size: int) -> int:
        addr = (self.io + size - 1) // size * size
        if addr + size > self.io_end:
            raise LocalError("out of PCI I/O space")
        self.io = addr + size
        return addr


@dataclass(frozen=True)
class Bar:
    index: int
    addr: int
    size: int
    io: bool


async def assign_bars(qt: Qtest, f: PciFunction, alloc: BarAllocator) -> dict[int, Bar]:
    """Size and assign every BAR of a type-0 function; enable I/O, memory and bus mastering."""
    bars: dict[int, Bar] = {}
    cmd = await cfg_read(qt, f, PCI_COMMAND, 2)
    await cfg_write(qt, f, PCI_COMMAND, 2, cmd & ~0x7)  # decode off while sizing
    i = 0
    while i < 6:
        reg = PCI_BAR0 + 4 * i
        orig = await cfg_read(qt, f, reg, 4)
        await cfg_write(qt, f, reg, 4, 0xFFFF_FFFF)
        probe = await cfg_read(qt, f, reg, 4)
        if probe == 0:
            i += 1
            continue
        if orig & 1:  # I/O
            size = (~(probe & ~0x3) & 0xFFFF) + 1
            addr = alloc.take_io(size)
            await cfg_write(qt, f, reg, 4, addr)
            bars[i] = Bar(i, addr, size, io=True)
            i += 1
            continue
        is64 = (orig >> 1) & 3 == 2
        low = probe & ~0xF
        if is64:
            await cfg_write(qt, f, reg + 4, 4, 0xFFFF_FFFF)
            high = await cfg_read(qt, f, reg + 4, 4)
            mask = high << 32 | low
            size = (~mask & 0xFFFF_FFFF_FFFF_FFFF) + 1
        else:
            size = (~low & 0xFFFF_FFFF) + 1
        addr = alloc.take_mmio(size)
        await cfg_write(qt, f, reg, 4, addr & 0xFFFF_FFFF)
        if is64:
            await cfg_write(qt, f, reg + 4, 4, addr >> 32)
        bars[i] = Bar(i, addr, size, io=False)
        i += 2 if is64 else 1
    await cfg_write(
        qt, f, PCI_COMMAND, 2, cmd | PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
    )
    return bars
