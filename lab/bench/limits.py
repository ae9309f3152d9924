"""The kernel's reclaim limits measured by a compiled helper (``limits.c`` beside this file).

A Python loop of one ``madvise`` per page measures Python as much as the kernel; the helper,
built at bench time with the machine's C compiler (``$CC``, else ``cc``), times the same
calls from C on a touched shared memfd (see the C file's header for the variants, among them
the options for fewer kernel calls per isolated page: two threads, one io_uring batch, one
process_madvise call per 1024 pages).

:func:`measure` returns ``{"available": True, "compiler": ..., "variants": {...},
"contiguous": {...}, "per_page": {...}}``, or ``{"available": False, "reason": ...}`` when
there is no compiler or the helper fails: the bench then falls back to the Python figures
and marks its ratios as such.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("limits.c")
CONTIGUOUS = ("fallocate_whole", "fallocate_2MiB", "madvise_whole", "madvise_2MiB")
#: one kernel call per isolated page: the limit the scattered case is compared with
ONE_CALL_PER_PAGE = ("madvise_per_page", "fallocate_per_page")


def compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def build(dest: Path) -> Path:
    """Compile the helper into ``dest`` (a directory); raises RuntimeError on failure."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc) on this machine")
    exe = dest / "vballoon-limits"
    proc = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(exe), str(SOURCE), "-lpthread"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
    return exe


#: the directories of the helpers built by this process (removed at exit, by their finalizers)
_BUILT: list[tempfile.TemporaryDirectory[str]] = []


@functools.cache
def _helper(cc: str | None) -> Path:
    """The helper built with ``cc``, once per process: a full bench measures its limits six
    times (start, beside each throughput case, end). Raises RuntimeError (not cached)."""
    del cc  # the cache key: another $CC builds anew
    tmp = tempfile.TemporaryDirectory(prefix="vballoon-limits-")
    try:
        exe = build(Path(tmp.name))
    except BaseException:
        tmp.cleanup()
        raise
    _BUILT.append(tmp)
    return exe


def _best(variants: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    ok = {n: variants[n] for n in names if "pages_per_s" in variants.get(n, {})}
    if not ok:
        raise RuntimeError(f"none of {', '.join(names)} ran")
    best = max(ok, key=lambda n: ok[n]["pages_per_s"])
    return {
        "best": best,
        "pages_per_s": ok[best]["pages_per_s"],
        "verified_st_blocks": all(v["verified"] for v in ok.values()),
    }


#: the variants the ratios' limits are the best of (what :func:`measure_basis` runs)
BASIS = CONTIGUOUS + ONE_CALL_PER_PAGE


def measure_basis(*, size: int, per_page_pages: int, reps: int) -> dict[str, Any]:
    """Only the variants the limits are taken from (:data:`BASIS`): the bench measures them
    again beside each throughput case, so a ratio's two sides are seconds apart."""
    return measure(size=size, per_page_pages=per_page_pages, reps=reps, only=BASIS)


def measure(
    *, size: int, per_page_pages: int, reps: int, only: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Run the helper (built on first use) for every variant, or those named in ``only``; see
    the module docstring."""
    try:
        exe = _helper(compiler())
        proc = subprocess.run(
            [str(exe), str(size), str(per_page_pages), str(reps)]
            + ([",".join(only)] if only else []),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"helper exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        variants: dict[str, Any] = json.loads(proc.stdout)
        return {
            "available": True,
            "compiler": compiler(),
            "variants": variants,
            "contiguous": _best(variants, CONTIGUOUS),
            "per_page": _best(variants, ONE_CALL_PER_PAGE),
        }
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return {"available": False, "reason": str(exc)}
