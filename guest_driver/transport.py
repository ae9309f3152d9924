"""What the driver core needs of a transport (the guest's view of the device).

The driver core (:mod:`guest_driver.driver`) does no I/O of its own; everything goes through
one object implementing :class:`Transport`, injected at construction:

* ``command(request)``: issue one vmmemctl request (docs/PROTOCOL.md section 2) and await
  its response. In the real protocol this is one ``IN`` on port 0x5670; here it is one
  descriptor chain on ``cmdq``.
* ``read(gpa, n)`` / ``write(gpa, data)``: guest-physical memory. The batch page lives in
  guest RAM at a PFN the guest memory model reserves (like the Linux driver's batch page);
  the core writes the entries there before a batched command and reads the statuses back.
* ``wait_event(timeout)``: sleep until the doorbell rings (an ``eventq`` event) or
  ``timeout`` seconds pass; this is also the driver's only notion of time passing.
* ``doorbell_ids``: the (context id, resource id) pair to register with
  ``VMCI_DOORBELL_SET``, or ``None`` when the transport cannot receive events.

Implementations: :mod:`guest_driver.transport_vhost_user` (our vhost-user front-end) and
:mod:`lab.transport_qtest` (QEMU's qtest). Tests use an in-process transport around
the real sans-I/O device model.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from protocol.vmw import EventKind, Request, Response


@runtime_checkable
class Transport(Protocol):
    """The edge the driver core talks through. All awaits; no other I/O in the core."""

    async def command(self, request: Request) -> Response:
        """Send one request and return the device's response. Raises :class:`~protocol.errors.DeviceGone`."""
        ...

    async def read(self, gpa: int, n: int) -> bytes:
        """``n`` bytes of guest-physical memory at ``gpa``."""
        ...

    async def write(self, gpa: int, data: bytes) -> None:
        """Write ``data`` to guest-physical memory at ``gpa``."""
        ...

    async def wait_event(self, timeout: float) -> EventKind | None:
        """Return the next doorbell event, or ``None`` after ``timeout`` seconds without one."""
        ...

    @property
    def doorbell_ids(self) -> tuple[int, int] | None:
        """(context, resource) for ``VMCI_DOORBELL_SET``; ``None``: no event channel."""
        ...
