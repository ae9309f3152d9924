"""The one rule for guest (VM) names, used by ``vdev serve --name``, the config file's
``[vms.NAME]`` tables, the registry every guest is added to (so the API only ever knows names
that follow it) and the operator CLI before a name goes into a URL.

A name is 1 to 64 characters: ASCII letters, digits, ``_``, ``.`` and ``-``, starting with a
letter or a digit. So it is one URL path segment that needs no escaping and is never ``.`` or
``..``, one file-name component, and one Prometheus label value without quoting surprises.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from protocol.errors import ConfigError

__all__ = ["NAME_PATTERN", "check_name", "check_names"]

#: The rule as a regular expression (also the API's path parameter pattern).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_NAME_RE = re.compile(NAME_PATTERN, re.ASCII)
_RULE = "1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit"


def check_name(name: object, what: str = "VM name") -> str:
    """``name`` if it follows the rule, else a :class:`ConfigError` naming it and the rule."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:80] + "..."
        raise ConfigError(f"{what}: bad name {shown} ({_RULE})")
    return name


def check_names(names: Iterable[object], what: str = "VM name") -> list[str]:
    """Every name checked, and none given twice."""
    seen: list[str] = []
    for name in names:
        checked = check_name(name, what)
        if checked in seen:
            raise ConfigError(f"{what}: {checked!r} given twice")
        seen.append(checked)
    return seen
