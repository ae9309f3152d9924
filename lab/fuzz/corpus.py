"""Fuzz inputs, seed corpora and reproducer files.

Every fuzz target is a function of one byte string. :class:`Draw` turns those bytes into
structured decisions (integers, choices, blobs) the way libFuzzer's FuzzedDataProvider
does, but in pure Python, so a saved input replays identically with or without atheris.

A reproducer is a small JSON file::

    {"target": "device", "data": "<base64>", "error": "...", "note": "...", "status": "open"}

``scripts/fuzz replay FILE`` runs the file's target on ``data`` once and reports.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
SEED_DIR = REPO / "tests" / "fuzz_corpus"
REGRESSION_DIR = REPO / "tests" / "regressions"


class Finding(AssertionError):
    """An oracle said no: the input exposes a bug (not merely a declared rejection)."""


class Draw:
    """Consume a fuzz input as a stream of decisions; past the end every draw is 0."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return max(0, len(self.data) - self.pos)

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out + bytes(n - len(out))

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def below(self, n: int) -> int:
        """An integer in ``0..n-1`` (n >= 1)."""
        if n <= 1:
            return 0
        width = (n - 1).bit_length() + 7 >> 3
        return self.uint(width) % n

    def between(self, lo: int, hi: int) -> int:
        return lo + self.below(hi - lo + 1)

    def boolean(self) -> bool:
        return bool(self.u8() & 1)

    def chance(self, numerator: int, denominator: int) -> bool:
        """True with probability about numerator/denominator (for "mostly valid" streams)."""
        return self.u8() % denominator < numerator

    def choice(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def rest(self, limit: int | None = None) -> bytes:
        end = len(self.data) if limit is None else min(len(self.data), self.pos + limit)
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def blob(self, limit: int) -> bytes:
        """A length-prefixed byte string of at most ``limit`` bytes."""
        return self.take(self.below(limit + 1))


class BadReproducer(ValueError):
    """A file that is not a reproducer (unreadable, not JSON, no ``data``, bad base64)."""


_OPTIONAL = {"error": "", "note": "", "status": "open"}


@dataclass(frozen=True)
class Reproducer:
    target: str
    data: bytes
    error: str = ""
    note: str = ""
    #: ``open``: still reproduces (a regression test expects the failure, strictly);
    #: ``fixed``: must pass now.
    status: str = "open"

    def to_json(self) -> str:
        body = {
            "target": self.target,
            "data": base64.b64encode(self.data).decode(),
            "error": self.error,
            "note": self.note,
            "status": self.status,
        }
        return json.dumps(body, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Reproducer:
        """:raises BadReproducer: saying what is wrong (not JSON, a key missing, bad base64)."""
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise BadReproducer(f"not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise BadReproducer("not a reproducer: expected a JSON object")
        for key in ("target", "data"):
            if not isinstance(body.get(key), str):
                raise BadReproducer(f"not a reproducer: no {key!r} string")
        texts = {key: body.get(key, default) for key, default in _OPTIONAL.items()}
        for key, value in texts.items():
            if not isinstance(value, str):
                raise BadReproducer(f"{key!r} is not a string")
        try:
            data = base64.b64decode(body["data"], validate=True)
        except ValueError as exc:
            raise BadReproducer(f"'data' is not base64 ({exc})") from None
        return cls(target=body["target"], data=data, **texts)

    @classmethod
    def load(cls, path: Path) -> Reproducer:
        """:raises BadReproducer: naming ``path`` (unreadable, or not a reproducer)."""
        try:
            return cls.from_json(path.read_text())
        except OSError as exc:
            raise BadReproducer(f"{path}: cannot read it: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise BadReproducer(f"{path}: not JSON (not UTF-8 text)") from None
        except BadReproducer as exc:
            raise BadReproducer(f"{path}: {exc}") from None

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(self.data).hexdigest()[:12]
        path = directory / f"{self.target}-{digest}.json"
        path.write_text(self.to_json())
        return path


def load_corpus(directory: Path) -> list[bytes]:
    """Every file of a libFuzzer-style corpus directory (one input per file)."""
    if not directory.is_dir():
        return []
    return [p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()]


def write_corpus(directory: Path, inputs: Sequence[bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for data in inputs:
        (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)
