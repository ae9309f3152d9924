"""The guest registry: one per ``vdev serve``; the API, the CLI and the policy talk only to it.

Guests are named ``vm0``.. by socket index (or by explicit names). Each has a persistent
target (kept across connections) and, while a front-end is connected, a live device whose
state :meth:`GuestRegistry.view` snapshots into a :class:`GuestView`. Changes are published
as :class:`GuestEvent` on trio memory channels (:meth:`GuestRegistry.subscribe`): target
changes, balloon-size changes (one event per processed batch, not per page), connects,
disconnects and resets. A subscriber that does not keep up loses events (its channel is
closed, it re-subscribes and re-reads the views) rather than slowing the device down.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from protocol.errors import ConfigError

log = logging.getLogger(__name__)

#: Events a subscriber may have queued before it is dropped.
SUBSCRIBER_BUFFER = 4096


#: What a guest name may be: a libvirt domain name in practice (letters, digits, ``._+:@-``),
#: safe in a URL path segment, a Prometheus label value and a file name.
GUEST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+:@-]{0,127}")


def check_guest_name(name: str, what: str = "guest") -> str:
    """``name`` if it is a valid guest (or pool: ``what``) name (:data:`GUEST_NAME`), else
    :class:`ConfigError`."""
    if not GUEST_NAME.fullmatch(name):
        raise ConfigError(
            f"bad {what} name {name!r}: 1-128 characters, letters, digits and ._+:@- "
            "(not starting with punctuation)"
        )
    return name


def name_from_socket_path(path: str) -> str:
    """The guest name a socket path gives: its file name without the extension
    (``/run/vdev/web1.sock`` -> ``web1``), as when the socket is named after the libvirt
    domain."""
    base = os.path.basename(os.fspath(path))
    stem, ext = os.path.splitext(base)
    return check_guest_name(stem if ext and stem else base)


class LiveDevice(Protocol):
    """What the registry needs of a connected guest (implemented by the server)."""

    def status(self) -> Any: ...  # vdev.devices.base.DeviceStatus
    def ram_pages(self) -> int: ...
    def ram_allocated_bytes(self) -> int: ...
    def reclaimed_bytes_total(self) -> int: ...
    def request_target(self, pages: int) -> None: ...
    def request_reset(self) -> None: ...
    def request_stats(self) -> bool: ...  # optional: absent = no guest statistics


@dataclass(frozen=True)
class GuestView:
    """A snapshot of one guest (docs/ARCHITECTURE.md)."""

    name: str
    socket_path: str
    personality: str
    connected: bool
    ram_pages: int
    size_pages: int
    target_pages: int
    capabilities: int
    guest_type: int | None
    doorbell_registered: bool
    #: esxtop MCTL?: the balloon driver runs (vdev.devices.base.DeviceStatus.driver_active);
    #: never inferred from ``capabilities`` (a virtio driver may accept no feature bits).
    driver_active: bool = False
    #: A balloon reset was demanded and the guest has not started over yet
    #: (vdev.devices.base.DeviceStatus.reset_demanded).
    reset_demanded: bool = False
    counters: Mapping[str, int] = field(default_factory=dict)
    #: The names in ``counters`` that are gauges (levels), not monotonic counters.
    gauges: frozenset[str] = frozenset()
    guest_stats: Mapping[str, int] = field(default_factory=dict)
    ram_allocated_bytes: int = 0
    reclaimed_bytes_total: int = 0
    unreclaimable: tuple[str, ...] = ()  # RAM the front-end maps private (share=off)
    #: the front-end's PID (SO_PEERCRED of its vhost-user socket), None if unknown
    pid: int | None = None


@dataclass(frozen=True)
class GuestEvent:
    """``kind``: "target", "size", "connected", "disconnected" or "reset".

    ``monotonic``: when the registry published it, ``time.monotonic()`` of the vdev process
    (CLOCK_MONOTONIC, comparable across processes on the same Linux host). A "size" event is
    published when the device has finished a batch (reclaim done, completion on the used ring,
    guest notified), so this is when that batch was done; a "target" event, when the target
    was handed to the connection.
    """

    name: str
    kind: str
    target_pages: int = 0
    size_pages: int = 0
    connected: bool = False
    monotonic: float = field(default_factory=time.monotonic, compare=False)


@dataclass
class _Entry:
    name: str
    socket_path: str
    personality: str
    target: int
    device: LiveDevice | None = None
    last_size: int = 0


class GuestRegistry:
    def __init__(self, personality: str = "vmw", *, target: int = 0) -> None:
        self.personality = personality
        self.default_target = target
        self._entries: dict[str, _Entry] = {}
        self._subscribers: list[trio.MemorySendChannel[GuestEvent]] = []
        self.on_change: list[Callable[[GuestEvent], None]] = []
        #: The operator's manual targets by guest (the control plane's own dict, shared so
        #: that a hand-over keeps them: connections record theirs, a resumed one restores it).
        self.manual: dict[str, int] = {}
        #: Guests whose connection a restarted vdev resumed (the control plane leaves their
        #: recorded control mode alone instead of applying ``--target`` to them).
        self.resumed: set[str] = set()
        #: A final stop (``Server.deflate_all``) is deflating every guest: every target is 0
        #: from then on, whatever the control plane's next step (a manual target) would set.
        self.deflating_all = False

    # -- set-up (the server) -------------------------------------------------------------

    def add(self, name: str, socket_path: str, *, target: int | None = None) -> None:
        """A guest; ConfigError for a name :func:`check_guest_name` refuses, or one taken."""
        check_guest_name(name)
        if name in self._entries:
            raise ConfigError(f"guest name {name!r} used twice")
        self._entries[name] = _Entry(
            name=name,
            socket_path=os.fspath(socket_path),
            personality=self.personality,
            target=self.default_target if target is None else target,
        )

    def target_of(self, name: str) -> int:
        return self._entries[name].target

    def attach(self, name: str, device: LiveDevice) -> None:
        """A front-end connected to ``name``'s socket."""
        entry = self._entries[name]
        if entry.device is not None:
            raise ConfigError(f"{name} already has a connected front-end")
        entry.device = device
        entry.last_size = 0
        self._publish(GuestEvent(name, "connected", entry.target, 0, True))

    def detach(self, name: str, device: LiveDevice) -> None:
        """The front-end went away: the guest is forgotten (its counters go with it)."""
        entry = self._entries[name]
        if entry.device is not device:
            return
        entry.device = None
        entry.last_size = 0
        self._publish(GuestEvent(name, "disconnected", entry.target, 0, False))

    def busy(self, name: str) -> bool:
        return self._entries[name].device is not None

    def note_size(self, name: str, size: int) -> None:
        """The server processed a batch; publishes a size event if the size moved."""
        entry = self._entries[name]
        if size != entry.last_size:
            entry.last_size = size
            self._publish(GuestEvent(name, "size", entry.target, size, entry.device is not None))

    def note_reset(self, name: str) -> None:
        entry = self._entries[name]
        self._publish(GuestEvent(name, "reset", entry.target, 0, entry.device is not None))

    # -- the public interface ------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._entries)

    def view(self, name: str) -> GuestView:
        entry = self._entries[name]  # KeyError for an unknown guest
        dev = entry.device
        if dev is None:
            return GuestView(
                name=name,
                socket_path=entry.socket_path,
                personality=entry.personality,
                connected=False,
                ram_pages=0,
                size_pages=0,
                target_pages=entry.target,
                capabilities=0,
                guest_type=None,
                doorbell_registered=False,
            )
        st = dev.status()
        return GuestView(
            name=name,
            socket_path=entry.socket_path,
            personality=entry.personality,
            connected=True,
            ram_pages=dev.ram_pages(),
            size_pages=st.size_pages,
            target_pages=entry.target,
            capabilities=st.capabilities,
            guest_type=st.guest_type,
            driver_active=bool(st.driver_active),
            reset_demanded=bool(st.reset_demanded),
            doorbell_registered=st.doorbell_registered,
            counters=dict(st.counters),
            gauges=frozenset(st.gauges),
            guest_stats=dict(st.guest_stats),
            ram_allocated_bytes=dev.ram_allocated_bytes(),
            reclaimed_bytes_total=dev.reclaimed_bytes_total(),
            unreclaimable=tuple(getattr(dev, "unreclaimable", lambda: [])()),
            pid=getattr(dev, "peer_pid", lambda: None)(),
        )

    def set_target(self, name: str, pages: int) -> None:
        if pages < 0:
            raise ConfigError("the balloon target cannot be negative")
        entry = self._entries[name]
        entry.target = 0 if self.deflating_all else int(pages)
        if entry.device is not None:
            entry.device.request_target(entry.target)
        self._publish(
            GuestEvent(name, "target", entry.target, entry.last_size, entry.device is not None)
        )

    def demand_reset(self, name: str) -> None:
        """Ask the connected guest's device for a balloon reset; ConfigError when nothing is
        connected (there is nothing to reset: an answer of "demanded" would be a lie) or
        when the personality has none (virtio-balloon)."""
        entry = self._entries[name]
        if entry.device is None:
            raise ConfigError(f"{name}: no front-end is connected, nothing to reset")
        entry.device.request_reset()

    def request_stats(self, name: str) -> bool:
        """Ask the guest for fresh statistics (virtio-balloon: the held stats buffer goes back
        to the driver, which refills it; ``view().guest_stats`` shows them once it has).
        False when nothing is connected or the personality keeps no stats. ``vdev serve
        --stats-interval`` does this periodically."""
        dev = self._entries[name].device  # KeyError for an unknown guest
        request = getattr(dev, "request_stats", None)  # optional for other LiveDevices
        return request is not None and bool(request())

    def subscribe(self) -> trio.MemoryReceiveChannel[GuestEvent]:
        send, receive = trio.open_memory_channel[GuestEvent](SUBSCRIBER_BUFFER)
        self._subscribers.append(send)
        return receive

    def _publish(self, event: GuestEvent) -> None:
        log.debug("event %s", event)
        for hook in self.on_change:
            hook(event)
        alive = []
        for send in self._subscribers:
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                log.warning("event subscriber fell %d events behind: dropped", SUBSCRIBER_BUFFER)
                send.close()
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                continue
            alive.append(send)
        self._subscribers = alive
