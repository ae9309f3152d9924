"""The virtio-pci transport's layout (virtio 1.x §4.1), declared once.

* PCI configuration space: the type-0 header registers a driver uses, its command and status
  bits, and the config mechanism #1 ports (``CF8``/``CFC``);
* the virtio vendor capability (:data:`CAP`, :data:`NOTIFY_CAP`) and its ``cfg_type`` ids;
* the common configuration structure (:data:`COMMON_CFG`) and each field's offset
  (:data:`COMMON_CFG_OFFSET`, and the ``CC_*`` names a driver indexes the BAR with);
* device status bits (:class:`DeviceStatus`), ISR bits (:class:`Isr`), the transport feature
  bits a PCI driver negotiates, and PCI ids (vendor, device id ranges).

Used by the qtest virtio-pci driver (:mod:`lab.qtest.virtio_pci`) and by anything else that
drives a virtio-pci function by hand. No I/O.
"""

from __future__ import annotations

import enum

import construct as cs

# ------------------------------------------------------------------------ PCI config space

#: Configuration mechanism #1: address port, data port.
CF8 = 0xCF8
CFC = 0xCFC

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_HEADER_TYPE = 0x0E
PCI_BAR0 = 0x10
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34

#: PCI_STATUS: the function has a capability list.
PCI_STATUS_CAP_LIST = 0x10
#: PCI_HEADER_TYPE: a multi-function device.
PCI_HEADER_MULTI_FUNCTION = 0x80
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
#: PCI_COMMAND: INTx masked (what uio_pci_generic toggles around each interrupt).
PCI_COMMAND_INTX_DISABLE = 0x400
#: A vendor-specific capability: virtio's.
PCI_CAP_ID_VNDR = 0x09

VIRTIO_VENDOR = 0x1AF4
#: Modern (virtio 1.x only) device ids: 0x1040 + the virtio device id.
MODERN_DEVICE_IDS = range(0x1040, 0x1080)
#: Transitional device ids; the virtio device id is the subsystem id.
TRANSITIONAL_DEVICE_IDS = range(0x1000, 0x1040)

# ------------------------------------------------------------------------ virtio capability

VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

#: ``struct virtio_pci_cap`` (16 bytes), at a capability pointer in config space.
CAP = cs.Struct(
    "cap_vndr" / cs.Int8ul,
    "cap_next" / cs.Int8ul,
    "cap_len" / cs.Int8ul,
    "cfg_type" / cs.Int8ul,
    "bar" / cs.Int8ul,
    "id" / cs.Int8ul,
    "padding" / cs.Bytes(2),
    "offset" / cs.Int32ul,
    "length" / cs.Int32ul,
)
#: ``struct virtio_pci_notify_cap``: the capability, then the notify offset multiplier.
NOTIFY_CAP = cs.Struct(*CAP.subcons, "notify_off_multiplier" / cs.Int32ul)

# ------------------------------------------------------------------------ common config

#: ``struct virtio_pci_common_cfg`` (virtio 1.x §4.1.4.3), 56 bytes.
COMMON_CFG = cs.Struct(
    "device_feature_select" / cs.Int32ul,
    "device_feature" / cs.Int32ul,
    "driver_feature_select" / cs.Int32ul,
    "driver_feature" / cs.Int32ul,
    "config_msix_vector" / cs.Int16ul,
    "num_queues" / cs.Int16ul,
    "device_status" / cs.Int8ul,
    "config_generation" / cs.Int8ul,
    "queue_select" / cs.Int16ul,
    "queue_size" / cs.Int16ul,
    "queue_msix_vector" / cs.Int16ul,
    "queue_enable" / cs.Int16ul,
    "queue_notify_off" / cs.Int16ul,
    "queue_desc" / cs.Int64ul,
    "queue_driver" / cs.Int64ul,
    "queue_device" / cs.Int64ul,
)


def field_offsets(struct: cs.Struct) -> dict[str, int]:
    """Each named member's byte offset in a fixed-size ``struct``."""
    out: dict[str, int] = {}
    offset = 0
    for member in struct.subcons:
        if member.name is not None:
            out[member.name] = offset
        offset += member.sizeof()
    return out


COMMON_CFG_OFFSET = field_offsets(COMMON_CFG)
CAP_OFFSET = field_offsets(NOTIFY_CAP)

CC_DFSELECT = COMMON_CFG_OFFSET["device_feature_select"]
CC_DF = COMMON_CFG_OFFSET["device_feature"]
CC_GFSELECT = COMMON_CFG_OFFSET["driver_feature_select"]
CC_GF = COMMON_CFG_OFFSET["driver_feature"]
CC_MSIX_CONFIG = COMMON_CFG_OFFSET["config_msix_vector"]
CC_NUM_QUEUES = COMMON_CFG_OFFSET["num_queues"]
CC_STATUS = COMMON_CFG_OFFSET["device_status"]
CC_CFG_GENERATION = COMMON_CFG_OFFSET["config_generation"]
CC_Q_SELECT = COMMON_CFG_OFFSET["queue_select"]
CC_Q_SIZE = COMMON_CFG_OFFSET["queue_size"]
CC_Q_MSIX = COMMON_CFG_OFFSET["queue_msix_vector"]
CC_Q_ENABLE = COMMON_CFG_OFFSET["queue_enable"]
CC_Q_NOTIFY_OFF = COMMON_CFG_OFFSET["queue_notify_off"]
CC_Q_DESC = COMMON_CFG_OFFSET["queue_desc"]
CC_Q_DRIVER = COMMON_CFG_OFFSET["queue_driver"]
CC_Q_DEVICE = COMMON_CFG_OFFSET["queue_device"]


class DeviceStatus(enum.IntFlag):
    """``device_status`` bits (virtio 1.x §2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 0x40
    FAILED = 0x80


class Isr(enum.IntFlag):
    """ISR status bits (read-to-clear; virtio 1.x §4.1.4.5)."""

    QUEUE = 0x1
    CONFIG = 0x2


#: Transport feature bits a PCI driver deals with.
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
#: A queue or config MSI-X vector of "none" (INTx is used).
VIRTIO_MSI_NO_VECTOR = 0xFFFF


def virtio_device_id(vendor: int, device: int, subsystem_id: int | None = None) -> int | None:
    """The virtio device id of a PCI function (modern ``0x1040 + id``, or transitional with
    the id in the subsystem id); None for a function that is not virtio."""
    if vendor != VIRTIO_VENDOR:
        return None
    if device in MODERN_DEVICE_IDS:
        return device - MODERN_DEVICE_IDS.start
    if device in TRANSITIONAL_DEVICE_IDS:
        return subsystem_id
    return None
