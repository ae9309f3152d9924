"""Build hooks only (everything else is in pyproject.toml): vdev's native reclaim loop.

``vdev/native/punch.c`` is compiled into the wheel as ``vdev/native/libvbpunch.so``, the path
``vdev.memory`` loads with ctypes (the same file scripts/setup builds in a checkout). It is a
plain shared object, not a Python extension module (no ``PyInit``, no Python ABI), so the
wheel is tagged ``py3-none-<platform>``: any Python 3, this platform only.

Without a working C compiler the build still succeeds, saying so (a warning): the wheel then
lacks the library and vdev reclaims with its Python loop (slower; ``vdev.memory.NATIVE_PUNCH``
is False and vdev logs why at start).
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

NATIVE = "vdev.native.libvbpunch"
NATIVE_FILE = os.path.join("vdev", "native", "libvbpunch.so")


class BuildNative(build_ext):
    """build_ext for a ctypes library: its own file name, never fatal; not in a checkout."""

    def run(self) -> None:
        if self.inplace or getattr(self, "editable_mode", False):
            # a checkout (pip install -e, as scripts/setup does): scripts/setup builds it there
            self.extensions = [e for e in self.extensions if e.name != NATIVE]
        super().run()

    def get_ext_filename(self, fullname: str) -> str:
        name = str(super().get_ext_filename(fullname))  # called with dotted and bare names
        if fullname.rsplit(".", 1)[-1] == NATIVE.rsplit(".", 1)[-1]:
            return os.path.join(os.path.dirname(name), os.path.basename(NATIVE_FILE))
        return name

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # no compiler, no headers: the Python loop instead
            if ext.name != NATIVE:
                raise
            msg = (
                f"WARNING: vballoon: could not build {NATIVE_FILE} from {ext.sources[0]} "
                f"({type(exc).__name__}: {exc}); the package is built without it and vdev "
                "reclaims with its slower Python loop (install a C compiler and the libc and "
                "Linux headers, e.g. gcc libc6-dev linux-libc-dev, then build again)"
            )
            print(msg, file=sys.stderr, flush=True)


class PlatformWheel(bdist_wheel):
    """Any Python 3 (the library is loaded with ctypes), this platform only."""

    def get_tag(self) -> tuple[str, str, str]:
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(
    ext_modules=[
        Extension(
            NATIVE,
            sources=["vdev/native/punch.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ],
    cmdclass={"build_ext": BuildNative, "bdist_wheel": PlatformWheel},
)
