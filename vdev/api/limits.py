"""The management API's bounds and access settings, kept free of the HTTP stack so that the
config file parser can check them (``[serve] api_*``) with the same ranges as the CLI
(``vdev serve --api-*``). Enforced by :mod:`vdev.api.serve`; documented in docs/SECURITY.md.
"""

from __future__ import annotations

import grp
import math
from dataclasses import dataclass, fields
from typing import Any

from protocol.errors import ConfigError

#: Default cap on concurrent ``GET /events`` streams (``--api-max-subscribers``).
DEFAULT_MAX_SUBSCRIBERS = 16


@dataclass(frozen=True)
class ApiLimits:
    """The API's bounds; each is ``vdev serve --api-NAME`` and ``[serve] api_NAME``
    (``_`` for ``-``), with the range in :data:`LIMIT_RANGES`."""

    #: Largest request body; 413 beyond (decided from Content-Length, never read).
    max_body_bytes: int = 4096
    #: Largest request line + headers; 431 beyond.
    max_header_bytes: int = 8192
    #: Seconds for a request's line and headers to arrive once its first byte did; 408.
    header_timeout: float = 5.0
    #: Seconds for a request's body to arrive once its headers did; 408.
    body_timeout: float = 5.0
    #: Seconds a kept-alive connection may wait for its next request before it is closed.
    idle_timeout: float = 30.0
    #: Seconds a write may wait on a client that does not read before it is dropped.
    write_timeout: float = 10.0
    #: Concurrent API connections; more are answered 503 and closed.
    max_connections: int = 64
    #: Concurrent ``GET /events`` streams; more are answered 503.
    max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS

    def check(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            low, high = LIMIT_RANGES[f.name]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or (isinstance(value, float) and not math.isfinite(value))
                or (f.type == "int" and not isinstance(value, int))
                or not low <= value <= high
            ):
                raise ConfigError(f"api_{f.name}: must be in {low}..{high}, got {value!r}")

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = "") -> ApiLimits:
        """Limits from ``{"max_body_bytes": 4096, ...}`` (missing: defaults); ConfigError
        names the bad key, prefixed by ``where``."""
        try:
            limits = cls(**values)
            limits.check()
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{where}{e}") from None
        return limits


#: The accepted range of each :class:`ApiLimits` field (CLI and config file alike).
LIMIT_RANGES: dict[str, tuple[float, float]] = {
    "max_body_bytes": (256, 1 << 20),
    "max_header_bytes": (1024, 1 << 16),
    "header_timeout": (0.1, 300.0),
    "body_timeout": (0.1, 300.0),
    "idle_timeout": (0.1, 3600.0),
    "write_timeout": (0.1, 300.0),
    "max_connections": (1, 4096),
    "max_subscribers": (0, 1024),
}


def resolve_group(value: str | int | None) -> int | None:
    """A group name or number to its gid (ConfigError if there is no such group name)."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        gid = value
    elif isinstance(value, str) and value.isdigit():
        gid = int(value)
    elif isinstance(value, str):
        try:
            gid = grp.getgrnam(value).gr_gid
        except KeyError:
            raise ConfigError(f"api_read_group: no group named {value!r}") from None
    else:
        raise ConfigError(f"api_read_group: expected a group name or gid, got {value!r}")
    if not 0 <= gid < (1 << 32) - 1:
        raise ConfigError(f"api_read_group: gid out of range: {gid}")
    return gid
