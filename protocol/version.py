"""The vballoon package's version, for ``vdev --version`` and ``guest-driver --version``.

Read from the installed distribution's metadata (pyproject.toml's ``version``), so a wheel, an
sdist install and an editable install all report the version they were built from.
"""

from __future__ import annotations

import importlib.metadata

DISTRIBUTION = "vballoon"


def package_version() -> str:
    """The installed vballoon version, or ``0+unknown`` for a tree that was never installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
