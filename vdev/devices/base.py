"""The interface between the vhost-user server and a device personality.

The server (``vdev/connection.py``) is personality-agnostic. Per connection it creates one
:class:`Device` (``cls(ctx, target=pages)``), hands it a :class:`DeviceContext` (the
connection's :class:`~vdev.memory.GuestMemory` and :class:`~vdev.virtq.VirtQueue` objects),
and calls it *sans-I/O*: every call that can change guest-visible state returns a
:class:`Work` that the server then carries out, in this order:

1. ``reclaims``: punch the pages out of the guest-RAM files (awaited, maybe in a thread);
2. ``completions``: publish (queue, head, written length) on the used rings;
3. signal each touched queue's call eventfd when the driver wants an interrupt;
4. ``config_changed``: send BACKEND_CONFIG_CHANGE_MSG on the back-end channel.

So reclaim is complete before the guest can see the answer. A personality may write into
the device-writable buffers of the chains it popped (responses, batch pages, events); it
never touches a used ring or an fd itself.

Personalities register in :data:`PERSONALITIES` (name -> "module:Class", imported lazily);
``vdev serve --device NAME`` picks one.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from protocol.errors import ConfigError
from vdev.memory import GuestMemory
from vdev.pagemap import PageMap
from vdev.virtq import VirtQueue


@dataclass(slots=True)
class Work:
    """What the server must do after a device call (see the module docstring for order)."""

    completions: list[tuple[int, int, int]] = field(default_factory=list)  # (queue, head, len)
    reclaims: list[Any] = field(default_factory=list)  # objects with pfn_starts / pfn_counts
    config_changed: bool = False
    popped: int = 0  # chains taken off avail rings (the server re-polls while > 0)

    def merge(self, other: Work) -> Work:
        self.completions += other.completions
        self.reclaims += other.reclaims
        self.config_changed |= other.config_changed
        self.popped += other.popped
        return self

    def __bool__(self) -> bool:
        return bool(self.completions or self.reclaims or self.config_changed or self.popped)


@dataclass(slots=True)
class DeviceContext:
    """What a personality may use of its connection."""

    name: str  # the guest's name, for log lines
    memory: GuestMemory
    queues: list[VirtQueue]
    #: The page map to keep the balloon in (the hand-over's, in the state file), or None
    #: for a fresh in-memory one.
    pages: PageMap | None = None


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """What the registry shows of a connected device (docs/ARCHITECTURE.md GuestView)."""

    size_pages: int = 0
    target_pages: int = 0
    capabilities: int = 0
    #: esxtop MCTL?: the guest's balloon driver is running and can be asked for memory
    #: (vmw: START granted capabilities and no reset is pending; virtio-balloon: the driver
    #: reached DRIVER_OK, i.e. the front-end started its inflate and deflate rings).
    driver_active: bool = False
    #: The operator demanded a balloon reset the guest has not started over from yet (vmw:
    #: no START since); the API reports the VM as ``resetting``.
    reset_demanded: bool = False
    guest_type: int | None = None
    doorbell_registered: bool = False
    counters: Mapping[str, int] = field(default_factory=dict)
    #: The names in ``counters`` that are gauges (levels that go up and down, e.g. "events
    #: pending"), not monotonic totals: :attr:`Device.gauges`. /metrics exports them as gauges.
    gauges: frozenset[str] = frozenset()
    guest_stats: Mapping[str, int] = field(default_factory=dict)


class Device(ABC):
    """A device personality on top of the vhost-user server (one instance per connection)."""

    #: ``vdev serve --device`` name.
    name: ClassVar[str]
    #: ``--print-capabilities`` type (QEMU's vhost-user.json VHostUserBackendType).
    backend_type: ClassVar[str] = "balloon"
    #: Number of virtqueues (GET_QUEUE_NUM, and the highest ring index accepted).
    num_queues: ClassVar[int]
    #: Device-specific virtio feature bits offered on top of the transport bits.
    features: ClassVar[int] = 0
    #: Size of the config space (GET_CONFIG windows must fit in it).
    config_size: ClassVar[int] = 0
    #: The device holds a guest statistics buffer that :meth:`request_stats` gives back
    #: (the server polls it every ``--stats-interval`` seconds).
    supports_stats: ClassVar[bool] = False
    #: The operator's reset (``vdev reset``) is possible: the device can make its driver
    #: start over (vmw: ERROR_RESET). A virtio driver cannot be told to (False).
    operator_reset: ClassVar[bool] = True
    #: The entries of ``status().counters`` that are gauges (current levels), not totals that
    #: only grow; every other entry is a counter. Reported in :attr:`DeviceStatus.gauges`.
    gauges: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, ctx: DeviceContext, *, target: int = 0) -> None:
        self.ctx = ctx

    # -- guest side ----------------------------------------------------------------------

    @abstractmethod
    def kick(self, index: int) -> Work:
        """Queue ``index`` may have new buffers (it is ready: started, enabled, addressed)."""

    def rings_changed(self) -> None:  # noqa: B027 - optional hook
        """A ring was (re)configured or stopped, or the memory table changed."""

    def queue_stopped(self, index: int) -> None:  # noqa: B027 - optional hook
        """GET_VRING_BASE is about to stop ring ``index`` (rewind held buffers here)."""

    def read_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: ``size`` bytes at ``offset`` (zero-padded beyond ``config_size``)."""
        return bytes(size)

    def write_config(self, offset: int, data: bytes, *, migration: bool) -> Work:
        """SET_CONFIG: the front-end wrote ``data`` at ``offset``."""
        return Work()

    def features_negotiated(self, features: int) -> None:  # noqa: B027 - optional hook
        """SET_FEATURES: the virtio feature bits the driver accepted (transport bits
        included; 0 after a device reset). Report the device's share in ``capabilities``."""

    # -- operator / front-end side -------------------------------------------------------

    @abstractmethod
    def set_target(self, pages: int) -> Work:
        """The operator changed the balloon target (4 KiB pages)."""

    @abstractmethod
    def demand_reset(self) -> Work:
        """The operator's reset: forget the balloon and make the guest start over (only
        called when :attr:`operator_reset`)."""

    def device_reset(self) -> Work:
        """The front-end reset the device (the guest reset or rebooted it, RESET_DEVICE):
        forget the balloon, as a real device does. The default is :meth:`demand_reset`
        (the driver, if it is still there, is told to start over)."""
        return self.demand_reset()

    def request_stats(self) -> Work:
        """Give the held guest statistics buffer back so the driver refills it
        (:attr:`supports_stats`; QEMU's ``guest-stats-polling-interval`` timer)."""
        return Work()

    def save_state(self) -> dict[str, Any]:
        """The personality's state for the hand-over record, JSON-able, without the page
        map (kept in :attr:`DeviceContext.pages`) and pinned ranges (re-derived by
        :meth:`rings_changed`). Keys are the personality's; :meth:`load_state` of another
        vdev build must accept a record with keys it does not know or misses."""
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Take back what :meth:`save_state` returned (a restarted vdev)."""

    @abstractmethod
    def shutdown(self) -> None:
        """The server is stopping: answer everything from now on with BUSY."""

    def size_pages(self) -> int:
        """The balloon size in 4 KiB frames (``status().size_pages``; personalities override
        it with something cheaper: the server asks after every batch)."""
        return self.status().size_pages

    @abstractmethod
    def status(self) -> DeviceStatus:
        """Snapshot for the registry."""


#: name -> "module:Class". The virtio-balloon personality lives in its own module.
PERSONALITIES: dict[str, str] = {
    "vmw": "vdev.devices.vmw:VmwDevice",
    "virtio-balloon": "vdev.devices.virtio_balloon:VirtioBalloonDevice",
    "virtio-balloon-reporting": "vdev.devices.virtio_balloon:VirtioBalloonReportingDevice",
}


def get_personality(name: str) -> type[Device]:
    """The Device class registered as ``name``; ConfigError when missing or broken."""
    try:
        spec = PERSONALITIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown device personality {name!r} (known: {', '.join(sorted(PERSONALITIES))})"
        ) from None
    module_name, _, cls_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"device personality {name!r} is not available: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Device)):
        raise ConfigError(f"{spec} is not a vdev.devices.base.Device")
    return cls
