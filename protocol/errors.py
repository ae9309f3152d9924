"""The vballoon error hierarchy: every error says whose fault it was, relative to the code
that raises it (as h11's LocalProtocolError and RemoteProtocolError do).

``PeerError`` means the other side broke a contract or went away: for vdev the peer is a
vhost-user front-end (:class:`FrontendError`) or the guest (:class:`GuestError`); for the
guest side (guest_driver, the conformance harness) it is the back-end (:class:`BackendError`).
``LocalError`` means our side or the host failed (configuration, resources). Code that
serves peers catches ``PeerError`` per connection and keeps serving everyone else.

::

    VballoonError
    ├── PeerError
    │   ├── FrontendError        vdev: a front-end broke vhost-user
    │   ├── GuestError           vdev: the guest broke virtio or vmmemctl
    │   │   └── FormatError      protocol: bytes that do not parse as the declared format
    │   ├── BackendError         guest side: the back-end broke vhost-user or the device
    │   │   ├── BackendHungUp    guest side: the back-end closed the connection
    │   │   └── DeviceGone       guest side: the device went away, the driver stops
    │   └── PeerClosed           vdev: the front-end closed the connection
    ├── LocalError
    │   ├── ConfigError          a setting, option or config file value is invalid
    │   ├── HostResourceError    mmap, fallocate, eventfd, a socket we own failed
    │   └── NotSimulated         the host is real: its free memory cannot be set
    └── ApiError                 the management API's error answer: HTTP status + message
                                 (4xx: the API client's fault; 5xx / 0: vdev's or transport's)

Errors outside this module (``RingBroken``, ``QtestError``, ``BackendStartError``, ...)
subclass one of these; the list is in docs/ARCHITECTURE.md ("Errors").
"""

from __future__ import annotations


class VballoonError(Exception):
    """Base of every error vballoon raises on purpose. Raised through its subclasses only;
    caught last by the command-line entry points, which print it (exit status 1 or 2)."""


class PeerError(VballoonError):
    """The other side is at fault: it broke a contract, or went away. Raised through its
    subclasses; caught per connection (vdev closes that one connection and serves the rest;
    a front-end gives up on its back-end)."""


class FrontendError(PeerError):
    """A vhost-user front-end broke the vhost-user protocol (header, size, fds, state).

    Raised by vdev (``vdev.vhost_user``, ``vdev.memory``); caught by vdev's connection
    reader, which closes that connection only."""


class GuestError(PeerError):
    """The guest broke the virtio or vmmemctl contract (bad chain, address outside RAM).

    Raised by vdev's rings, memory and device models; caught by the device (a bad chain is
    completed with length 0, a bad request gets an error status) or, for a broken ring, by
    vdev's connection, which stops serving that guest."""


class FormatError(GuestError):
    """Bytes that do not parse as the declared format.

    Raised by every parser in :mod:`protocol`; no construct exception escapes the package.
    Inside vdev the bytes came from the guest or a front-end: caught by the device (an
    error status) or the connection, as any :class:`GuestError`; a front-end that reads a
    back-end's reply catches it and raises :class:`BackendError` instead."""


class BackendError(PeerError):
    """The back-end (a vhost-user device) broke the vhost-user protocol or the device's
    contract, or refused a request: a bad reply header, a NACK, a response of the wrong size.

    Raised by the guest side's front-end (``guest_driver.frontend``) and the conformance
    harness's; caught by the driver's transport (which turns it into :class:`DeviceGone`)
    and by the harness (a failed case)."""


class BackendHungUp(BackendError):
    """The back-end closed (or reset) the vhost-user connection.

    Raised by the front-end's exact reads (``guest_driver.frontend``); caught by the
    transport (:class:`DeviceGone`), by the harness (a case that expected the close passes,
    any other fails) and by tests that make vdev drop a connection."""


class DeviceGone(BackendError):
    """The device went away (connection closed, ring broken, no answer); the driver cannot
    go on.

    Raised by the guest driver's transports (vhost-user, qtest); caught by the guest's run
    loop, which stops the driver and reports why."""


class PeerClosed(PeerError):
    """The peer closed the connection: the normal end of a session, not a broken contract.

    Raised by vdev's connection reader when a front-end hangs up; caught by the same
    connection, which logs it at info level and releases the guest's memory."""


class LocalError(VballoonError):
    """Our side or the host is at fault. Raised through its subclasses (and by the lab's
    rigs: QEMU missing, a child that did not start); caught by the command-line entry points
    and reported, or by tests."""


class ConfigError(LocalError, ValueError):
    """A setting, command-line value or configuration file entry is invalid; the message
    names it.

    Raised by the config and policy models and the CLIs' parsers; caught by the CLIs (usage
    error, exit 2) and by the API (a 4xx answer naming the field)."""


class HostResourceError(LocalError):
    """A host resource failed: mmap, fallocate, eventfd, a socket we own.

    Raised by vdev's memory and server; caught by vdev's connection (that connection is
    closed, the others go on) or at start-up (vdev exits with the reason)."""


class NotSimulated(LocalError):
    """The host is real: its free memory cannot be set (vdev was started without
    ``--host-memory``).

    Raised by ``vdev.policy.control.ControlPlane.set_simulated_free``; caught by the API,
    which answers 409."""


class ApiError(VballoonError):
    """An error answer of vdev's management API: an HTTP ``status`` and a ``message``.

    Raised by the API's handlers and its HTTP server (:mod:`vdev.api.app`,
    :mod:`vdev.api.serve`), which turn it into ``{"error": message}`` with that status; and
    by :class:`vdev.api.client.ApiClient` when the API answered one (``status`` 0: the API
    could not be reached at all). Caught by the API's exception handler on the server side
    and by the operator CLI (:mod:`vdev.cli.operator`), which prints the message.

    Whose fault: a 4xx status is the API client's (bad request, unknown name, refused
    access, too big or too slow); a 5xx or 0 is vdev's side or the transport's.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message if status == 0 else f"{message} (HTTP {status})")
        self.status = status
        self.message = message
