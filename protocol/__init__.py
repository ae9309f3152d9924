"""Every binary format vballoon speaks, declared once with construct. No I/O, no state."""

from .errors import (
    BackendError,
    BackendHungUp,
    ConfigError,
    DeviceGone,
    FormatError,
    FrontendError,
    GuestError,
    HostResourceError,
    LocalError,
    NotSimulated,
    PeerClosed,
    PeerError,
    VballoonError,
)

__all__ = [
    "BackendError",
    "BackendHungUp",
    "ConfigError",
    "DeviceGone",
    "FormatError",
    "FrontendError",
    "GuestError",
    "HostResourceError",
    "LocalError",
    "NotSimulated",
    "PeerClosed",
    "PeerError",
    "VballoonError",
]
