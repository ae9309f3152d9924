"""The error hierarchy (protocol/errors.py): one tree, every class in it says who raises it
and who catches it, and the fault is relative to the side that raises it."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import protocol.errors as errors
from protocol.errors import (
    BackendError,
    BackendHungUp,
    DeviceGone,
    FormatError,
    FrontendError,
    GuestError,
    LocalError,
    PeerClosed,
    PeerError,
    VballoonError,
)

PACKAGES = ("protocol", "vdev", "guest_driver", "lab", "conformance")


def _all_error_classes() -> list[type[BaseException]]:
    for pkg in PACKAGES:
        module = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(module.__path__, f"{pkg}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)

    def walk(cls: type[BaseException]) -> list[type[BaseException]]:
        return [c for sub in cls.__subclasses__() for c in (sub, *walk(sub))]

    return sorted(set(walk(VballoonError)) | {VballoonError}, key=lambda c: c.__qualname__)


@pytest.mark.parametrize("cls", _all_error_classes(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_error_says_who_raises_and_who_catches_it(cls: type[BaseException]) -> None:
    doc = " ".join((cls.__doc__ or "").lower().split())
    assert "raised by" in doc or "raised through" in doc, cls
    assert "caught" in doc, cls


def test_the_documented_tree_is_the_real_one() -> None:
    """Every class of protocol/errors.py appears in its module's tree drawing, under the
    parent it really has."""
    drawing = errors.__doc__ or ""
    classes = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, VballoonError)
    ]
    lines = {ln.split("── ")[-1].split()[0]: ln for ln in drawing.splitlines() if "── " in ln}
    for cls in classes:
        if cls is VballoonError:
            continue
        assert cls.__name__ in lines, cls
        depth = lines[cls.__name__].index("── ")
        parent = cls.__mro__[1]
        if parent is not VballoonError:
            assert lines[parent.__name__].index("── ") == depth - 4, cls


def test_fault_is_relative_to_the_raiser() -> None:
    # guest side: the back-end's faults
    assert issubclass(BackendHungUp, BackendError) and issubclass(DeviceGone, BackendError)
    assert not issubclass(BackendError, FrontendError | GuestError)
    # vdev side: the front-end's and the guest's
    assert issubclass(FormatError, GuestError) and issubclass(PeerClosed, PeerError)
    assert not issubclass(FrontendError, BackendError)
    for peer in (FrontendError, GuestError, BackendError, PeerClosed):
        assert issubclass(peer, PeerError) and not issubclass(peer, LocalError)
