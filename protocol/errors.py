"""The vballoon error hierarchy: every error says whose fault it was.

``PeerError`` means the other side broke a contract (a vhost-user front-end, or the guest);
``LocalError`` means our side or the host failed (configuration, resources). Code that
serves peers catches ``PeerError`` per connection and keeps serving everyone else.
"""

from __future__ import annotations


class VballoonError(Exception):
    """Base of every error vballoon raises on purpose."""


class PeerError(VballoonError):
    """The other side is at fault."""


class FrontendError(PeerError):
    """A vhost-user front-end broke the vhost-user protocol (header, size, fds, state)."""


class GuestError(PeerError):
    """The guest broke the virtio or vmmemctl contract (bad chain, address outside RAM)."""


class FormatError(GuestError):
    """Bytes that do not parse as the declared format.

    Raised by every parser in :mod:`protocol`; no construct exception escapes the package.
    """


class LocalError(VballoonError):
    """Our side or the host is at fault."""


class ConfigError(LocalError, ValueError):
    """A setting or command-line value is invalid."""


class HostResourceError(LocalError):
    """A host resource failed: mmap, fallocate, eventfd, a socket we own."""


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
