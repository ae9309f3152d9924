"""A virtio-pci function reached from inside a Linux guest, through ``uio_pci_generic``.

What it takes (the guest must allow it): root, ``/sys`` and ``/dev`` mounted, the
``uio`` and ``uio_pci_generic`` modules, no kernel lockdown (``CONFIG_IO_STRICT_DEVMEM``
only bars mapping a BAR a kernel driver holds, so the function is unbound first) and no
IOMMU (the device is given guest-physical addresses as they are).

:meth:`UioPort.open`:

1. finds the function by vendor:device in ``/sys/bus/pci/devices`` (``1af4:1069`` for vmw
   behind ``vhost-user-test-device-pci,virtio-id=41``);
2. unbinds whatever driver holds it (``virtio-pci``) and binds ``uio_pci_generic``
   (``new_id``; ``bind`` when the id is already known);
3. enables memory decoding and bus mastering in the command register (``uio_pci_generic``
   does neither);
4. maps every memory BAR a virtio capability points at from ``resourceN``, and reads the
   capabilities from the ``config`` file (:func:`guest_driver.virtio_pci.parse_virtio_caps`);
5. opens ``/dev/uioN`` for the interrupt: reading it returns the interrupt count;
   ``uio_pci_generic`` masks INTx (``INTX_DISABLE``) on each interrupt and writing 1
   unmasks it. The virtio ISR register (read by the device driver) lowers the line. Where
   the function has no interrupt line assigned (uio then has no ``irqcontrol``: ENOSYS) the
   rings are polled every :data:`POLL_NO_IRQ` s. The file stays open while the driver runs:
   closing it (or the driver dying) makes ``uio_pci_generic`` clear bus mastering, QEMU then
   stops the device, and vdev sees the rings stop (a device reset: the balloon is forgotten).

MMIO is done with exact-width loads and stores (ctypes scalars at the mapped address):
QEMU dispatches a register access by its size, so a 2-byte field must be one 2-byte access.
BAR ``n`` appears at address ``n << 32`` to :class:`guest_driver.virtio_pci.VirtioPciDevice`.
Guest memory (rings, buffers, the batch page) is :class:`guest_driver.linux_memory.LockedPages`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from guest_driver.linux_memory import LockedPages
from guest_driver.virtio_pci import PortError, VirtioPciDevice, parse_virtio_caps
from protocol.virtio_pci import (
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    VIRTIO_PCI_CAP_PCI_CFG,
    virtio_device_id,
)

log = logging.getLogger(__name__)

SYS_PCI = Path("/sys/bus/pci")
UIO_DRIVER = "uio_pci_generic"
#: vmw behind vhost-user-test-device-pci,virtio-id=41 (modern virtio id 41 = 0x1040 + 41)
VMW_PCI_ID = (0x1AF4, 0x1069)
BAR_SHIFT = 32
#: Ring polling period when the function has no interrupt line (uio has no irqcontrol)
POLL_NO_IRQ = 0.002


def _read_hex(path: Path) -> int:
    return int(path.read_text().strip(), 16)


def find_function(vendor: int, device: int, root: Path = SYS_PCI) -> Path:
    """The sysfs directory of the first PCI function with ``vendor:device``."""
    try:
        devices = sorted((root / "devices").iterdir())
    except OSError as exc:
        raise PortError(f"cannot list PCI functions in {root / 'devices'}: {exc}") from exc
    for dev in devices:
        try:
            if _read_hex(dev / "vendor") == vendor and _read_hex(dev / "device") == device:
                return dev
        except (OSError, ValueError):
            continue
    raise PortError(f"no PCI function {vendor:04x}:{device:04x} in {root / 'devices'}")


def bind_uio(dev: Path, root: Path = SYS_PCI) -> None:
    """Hand ``dev`` to ``uio_pci_generic`` (unbinding its current driver first)."""
    driver = dev / "driver"
    if driver.exists():
        current = os.path.basename(os.readlink(driver))
        if current == UIO_DRIVER:
            return
        log.info("%s: unbinding %s", dev.name, current)
        (driver / "unbind").write_text(dev.name)
    uio = root / "drivers" / UIO_DRIVER
    if not uio.is_dir():
        raise PortError(f"{UIO_DRIVER} is not loaded (modprobe uio_pci_generic)")
    vendor, device = _read_hex(dev / "vendor"), _read_hex(dev / "device")
    try:
        (uio / "new_id").write_text(f"{vendor:04x} {device:04x}")
    except OSError:  # the id is known already: bind by address
        (uio / "bind").write_text(dev.name)
    deadline = time.monotonic() + 5
    while not (dev / "uio").is_dir():
        if time.monotonic() > deadline:
            raise PortError(f"{dev.name}: {UIO_DRIVER} did not bind")
        time.sleep(0.01)


@dataclass
class UioPort:
    """:class:`guest_driver.virtio_pci.PciPort` over sysfs + ``/dev/uioN``."""

    dev: Path
    memory: LockedPages
    uio_fd: int = -1
    has_irq: bool = False
    _maps: dict[int, tuple[mmap.mmap, int]] = field(default_factory=dict)  # bar -> (map, addr)
    _irqs: int = 0
    _config_fd: int = -1

    @classmethod
    def open(cls, dev: Path, memory: LockedPages) -> tuple[UioPort, VirtioPciDevice]:
        """Bind, map and wrap ``dev``; returns the port and the (not yet reset) device."""
        bind_uio(dev)
        port = cls(dev, memory)
        try:
            port._config_fd = os.open(dev / "config", os.O_RDWR | os.O_CLOEXEC)
            config = os.pread(port._config_fd, 256, 0)
            command = int.from_bytes(config[PCI_COMMAND : PCI_COMMAND + 2], "little")
            command |= PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
            command &= ~PCI_COMMAND_INTX_DISABLE
            os.pwrite(port._config_fd, struct.pack("<H", command), PCI_COMMAND)
            caps = parse_virtio_caps(config)
            # (the PCI_CFG capability's bar field is the driver's to set, not a BAR in use)
            for bar in sorted({c.bar for c in caps if c.cfg_type != VIRTIO_PCI_CAP_PCI_CFG}):
                port._map_bar(bar)
            uio_name = next(iter(sorted((dev / "uio").iterdir()))).name
            port.uio_fd = os.open(f"/dev/{uio_name}", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            # Kept open for the driver's life even without an interrupt: closing it makes
            # uio_pci_generic clear bus mastering, and QEMU then stops the device.
            try:
                port._unmask()
                port.has_irq = True
            except OSError as exc:  # ENOSYS: no INTx line assigned (uio has no irqcontrol)
                log.warning("%s: no interrupt (%s): polling the rings every %.0f ms",
                            dev.name, exc, POLL_NO_IRQ * 1000)  # fmt: skip
            vendor, device = _read_hex(dev / "vendor"), _read_hex(dev / "device")
            did = virtio_device_id(vendor, device)
            if did is None:
                raise PortError(f"{dev.name}: {vendor:04x}:{device:04x} is not virtio")
            bar_addr = {bar: bar << BAR_SHIFT for bar in port._maps}
            return port, VirtioPciDevice(port, dev.name, bar_addr, caps, did)
        except BaseException:
            port.close()
            raise

    def _map_bar(self, bar: int) -> None:
        path = self.dev / f"resource{bar}"
        size = path.stat().st_size
        fd = os.open(path, os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
        try:
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise PortError(f"cannot map {path} ({exc}): is a kernel driver holding it?") from exc
        finally:
            os.close(fd)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        self._maps[bar] = (mm, addr)

    def close(self) -> None:
        if self.uio_fd >= 0:
            os.close(self.uio_fd)
            self.uio_fd = -1
        if self._config_fd >= 0:
            os.close(self._config_fd)
            self._config_fd = -1
        for mm, _ in self._maps.values():
            with contextlib.suppress(BufferError):  # ctypes views may still point in
                mm.close()
        self._maps.clear()

    # -- MMIO ------------------------------------------------------------------------------

    def _at(self, addr: int, size: int) -> int:
        bar, offset = addr >> BAR_SHIFT, addr & ((1 << BAR_SHIFT) - 1)
        entry = self._maps.get(bar)
        if entry is None or offset + size > len(entry[0]):
            raise PortError(f"{self.dev.name}: access {addr:#x}+{size} outside the mapped BARs")
        return entry[1] + offset

    async def readb(self, addr: int) -> int:
        return int(ctypes.c_uint8.from_address(self._at(addr, 1)).value)

    async def readw(self, addr: int) -> int:
        return int(ctypes.c_uint16.from_address(self._at(addr, 2)).value)

    async def readl(self, addr: int) -> int:
        return int(ctypes.c_uint32.from_address(self._at(addr, 4)).value)

    async def writeb(self, addr: int, v: int) -> None:
        ctypes.c_uint8.from_address(self._at(addr, 1)).value = v

    async def writew(self, addr: int, v: int) -> None:
        ctypes.c_uint16.from_address(self._at(addr, 2)).value = v

    async def writel(self, addr: int, v: int) -> None:
        ctypes.c_uint32.from_address(self._at(addr, 4)).value = v

    # -- guest memory ----------------------------------------------------------------------

    async def read(self, gpa: int, n: int) -> bytes:
        return await self.memory.read(gpa, n)

    async def write(self, gpa: int, data: bytes) -> None:
        await self.memory.write(gpa, data)

    # -- INTx through /dev/uioN ------------------------------------------------------------

    def _unmask(self) -> None:
        os.write(self.uio_fd, struct.pack("<i", 1))

    @property
    def irq_raises(self) -> int:
        return self._irqs

    async def wait_irq(self, after: int, timeout: float | None = None) -> bool:
        if self._irqs > after:
            return True
        if not self.has_irq:  # no interrupt line: the caller re-polls the rings
            await trio.sleep(min(POLL_NO_IRQ, timeout if timeout is not None else POLL_NO_IRQ))
            return False
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            while self._irqs <= after:
                await trio.lowlevel.wait_readable(self.uio_fd)
                try:
                    raw = os.read(self.uio_fd, 4)
                except BlockingIOError:
                    continue
                self._irqs = max(self._irqs + 1, struct.unpack("<i", raw)[0])
                self._unmask()
            return True
        return False
