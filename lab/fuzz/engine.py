"""Fuzz engines: atheris (libFuzzer, coverage-guided) and a built-in mutation loop.

A target is a module with ``one_input(data: bytes) -> None`` (raises on a finding),
``seeds() -> list[bytes]``, and optionally ``INSTRUMENT`` (module prefixes atheris
instruments), ``ENGINE`` (``"atheris"`` or ``"builtin"``) and ``session()`` (a context
manager that sets up what every input needs, e.g. a live ``vdev serve``).

atheris never returns from ``Fuzz()``, so the CLI runs it in a child process and reads its
statistics and crash artifacts afterwards. The built-in loop runs in-process; with
``guided=True`` it keeps inputs that reach new (file, line) pairs of the instrumented
packages (``sys.settrace``), which is slow but needs nothing beyond CPython.
"""

from __future__ import annotations

import contextlib
import importlib
import random
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from lab.fuzz.corpus import REPO, Reproducer

TARGETS = {
    "frames": "lab.fuzz.frames",
    "device": "lab.fuzz.device",
    "wire": "lab.fuzz.wire",
    "api": "lab.fuzz.api",
}

INTERESTING = [
    0,
    1,
    2,
    3,
    7,
    8,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x1FF,
    0x200,
    0xFFFF,
    0x10000,
    0x7FFF_FFFF,
    0xFFFF_FFFF,
    0x1_0000_0000,
    0xFFFF_FFFF_FFFF_FFFF,
]


def load_target(name: str) -> ModuleType:
    if name not in TARGETS:
        raise SystemExit(f"unknown fuzz target {name!r}; choose from {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[name])


def signature(exc: BaseException) -> str:
    """What makes two failures "the same bug" for minimisation: type + message head."""
    msg = str(exc).splitlines()[0] if str(exc) else ""
    head = re.split(r"[:0-9]", msg, maxsplit=1)[0]
    return f"{type(exc).__name__}:{head}"


def run_one(target: ModuleType, data: bytes) -> BaseException | None:
    try:
        target.one_input(data)
    except Exception as exc:
        return exc
    return None


def minimise(target: ModuleType, data: bytes, sig: str, budget: float = 10.0) -> bytes:
    """Delta-debug ``data`` down while the failure keeps the same signature."""
    deadline = time.monotonic() + budget

    def same(candidate: bytes) -> bool:
        exc = run_one(target, candidate)
        return exc is not None and signature(exc) == sig

    best = data
    chunk = max(1, len(best) // 2)
    while chunk >= 1 and time.monotonic() < deadline:
        i = 0
        progressed = False
        while i < len(best) and time.monotonic() < deadline:
            candidate = best[:i] + best[i + chunk :]
            if candidate and same(candidate):
                best = candidate
                progressed = True
            else:
                i += chunk
        if not progressed:
            chunk //= 2
    # then try zeroing bytes (simpler values read better in a reproducer)
    for i in range(len(best)):
        if time.monotonic() >= deadline:
            break
        if best[i]:
            candidate = best[:i] + b"\0" + best[i + 1 :]
            if same(candidate):
                best = candidate
    return best


def mutate(rng: random.Random, data: bytes, corpus: list[bytes], max_len: int) -> bytes:
    buf = bytearray(data)
    for _ in range(1 + rng.randrange(4)):
        op = rng.randrange(8)
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = bytes(rng.randrange(256) for _ in range(1 + rng.randrange(8)))
        elif op == 3 and len(buf) > 1:
            i = rng.randrange(len(buf))
            del buf[i : i + 1 + rng.randrange(8)]
        elif op == 4 and buf:
            width = rng.choice([1, 2, 4, 8])
            i = rng.randrange(len(buf))
            value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            buf[i : i + width] = value.to_bytes(width, "little")
        elif op == 5 and corpus:
            other = rng.choice(corpus)
            i = rng.randrange(len(buf) + 1)
            j = rng.randrange(len(other) + 1)
            buf = buf[:i] + other[j:]
        elif op == 6 and buf:
            i = rng.randrange(len(buf))
            n = 1 + rng.randrange(16)
            buf[i:i] = buf[i : i + n]
        elif op == 7 and buf:
            i = rng.randrange(len(buf))
            buf[i] = (buf[i] + rng.choice([1, -1, 16, -16])) & 0xFF
    return bytes(buf[:max_len])


@dataclass
class Stats:
    target: str
    engine: str
    seconds: float = 0.0
    execs: int = 0
    corpus: int = 0
    coverage: str = ""
    findings: list[Path] = field(default_factory=list)

    @property
    def execs_per_second(self) -> float:
        return self.execs / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (
            f"fuzz {self.target} [{self.engine}]: {self.execs} execs in {self.seconds:.1f}s "
            f"({self.execs_per_second:.0f}/s), corpus {self.corpus}, coverage {self.coverage}, "
            f"findings {len(self.findings)}"
        )


class LineCoverage:
    """(file, line) pairs executed in files under ``roots`` (a sys.settrace tracer)."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = tuple(str(r) for r in roots)
        self.seen: set[tuple[str, int]] = set()
        self.new = 0
        self._decision: dict[str, bool] = {}

    def _wanted(self, filename: str) -> bool:
        got = self._decision.get(filename)
        if got is None:
            got = self._decision[filename] = filename.startswith(self.roots)
        return got

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        if not self._wanted(frame.f_code.co_filename):
            return None
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            key = (frame.f_code.co_filename, frame.f_lineno)
            if key not in self.seen:
                self.seen.add(key)
                self.new += 1
        return self._local

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        self.new = 0
        sys.settrace(self._global)
        try:
            yield
        finally:
            sys.settrace(None)


def instrument_roots(target: ModuleType) -> list[Path]:
    prefixes: list[str] = list(getattr(target, "INSTRUMENT", ("protocol",)))
    return [REPO / p.replace(".", "/") for p in prefixes]


def builtin_fuzz(
    target: ModuleType,
    *,
    seconds: float,
    corpus: list[bytes],
    seed: int,
    crash_dir: Path,
    guided: bool = True,
    max_len: int = 4096,
    max_findings: int = 5,
    on_new: Callable[[bytes], None] | None = None,
) -> Stats:
    """The fallback engine (and the one for ``wire``): mutate, run, keep what is new."""
    rng = random.Random(seed)
    name = target.__name__.rsplit(".", 1)[-1]
    stats = Stats(target=name, engine="builtin+lines" if guided else "builtin")
    cov = LineCoverage(instrument_roots(target)) if guided else None
    pool = list(corpus) or list(target.seeds()) or [b""]
    signatures: set[str] = set()
    t0 = time.monotonic()
    queue = list(pool)
    while time.monotonic() - t0 < seconds:
        data = queue.pop(0) if queue else mutate(rng, rng.choice(pool), pool, max_len)
        if cov is not None:
            with cov.tracing():
                exc = run_one(target, data)
            if cov.new:
                pool.append(data)
                if on_new:
                    on_new(data)
        else:
            exc = run_one(target, data)
        stats.execs += 1
        if exc is not None:
            sig = signature(exc)
            if sig in signatures:
                continue
            signatures.add(sig)
            small = minimise(target, data, sig)
            err = "".join(traceback.format_exception_only(exc)).strip()
            rep = Reproducer(name, small, error=err, note=f"found by builtin engine, seed {seed}")
            stats.findings.append(rep.save(crash_dir))
            if len(stats.findings) >= max_findings:
                break
    stats.seconds = time.monotonic() - t0
    stats.corpus = len(pool)
    stats.coverage = f"{len(cov.seen)} lines" if cov is not None else "n/a (out of process)"
    return stats
