"""Every binary format vballoon speaks, declared once with construct. No I/O, no state."""

from .errors import (
    ConfigError,
    FormatError,
    FrontendError,
    GuestError,
    HostResourceError,
    LocalError,
    PeerError,
    VballoonError,
)

__all__ = [
    "ConfigError",
    "FormatError",
    "FrontendError",
    "GuestError",
    "HostResourceError",
    "LocalError",
    "PeerError",
    "VballoonError",
]
