"""The fuzzers: engines, oracles, bounded smoke runs, and every saved reproducer replayed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lab.fuzz import frames
from lab.fuzz.corpus import REGRESSION_DIR, REPO, Draw, Finding, Reproducer
from lab.fuzz.engine import builtin_fuzz, load_target, minimise, run_one, signature

REPRODUCERS = sorted(REGRESSION_DIR.glob("*.json"))


def _known_open() -> set[str]:
    """Signatures of the findings we know of and have not fixed yet."""
    out = set()
    for path in REPRODUCERS:
        rep = Reproducer.load(path)
        if rep.status == "open":
            exc = run_one(load_target(rep.target), rep.data) if rep.target != "wire" else None
            if exc is not None:
                out.add(signature(exc))
    return out


def _replay_params() -> list[object]:
    params: list[object] = []
    for path in REPRODUCERS:
        rep = Reproducer.load(path)
        marks = []
        if rep.status == "open":
            marks.append(pytest.mark.xfail(strict=True, reason=rep.note or rep.error))
        params.append(pytest.param(path, marks=marks, id=path.stem))
    return params


@pytest.mark.parametrize("path", _replay_params())
def test_reproducer_replays_clean(path: Path) -> None:
    """Every saved reproducer: fixed ones must pass; open ones must still fail (xfail strict)."""
    rep = Reproducer.load(path)
    target = load_target(rep.target)
    session = getattr(target, "session", None)
    if session is not None:
        with session():
            exc = run_one(target, rep.data)
    else:
        exc = run_one(target, rep.data)
    if exc is not None:
        raise exc


def test_reproducer_json_roundtrip(tmp_path: Path) -> None:
    rep = Reproducer("frames", b"\x00\xff", error="E", note="n", status="fixed")
    assert Reproducer.load(rep.save(tmp_path)) == rep


def test_draw_is_total() -> None:
    d = Draw(b"\x05\x01")
    assert d.below(3) == 2
    assert d.u8() == 1
    assert d.u64() == 0  # past the end: zeros, never an exception
    assert d.choice("abc") == "a"
    assert d.between(7, 7) == 7
    assert d.remaining == 0


def test_frames_seeds_are_valid() -> None:
    """Each parser's seed is a well-formed input: it parses and builds back (check raises
    FormatError or Finding otherwise, which one_input would swallow or report), and every
    seed routes to its own parser."""
    seeds = frames.seeds()
    assert len(seeds) == len(frames.PARSERS) > 0
    for i, (seed, parser) in enumerate(zip(seeds, frames.PARSERS, strict=True)):
        assert seed[0] == i and frames.PARSERS[seed[0] % len(frames.PARSERS)] is parser
        parser.check(seed[1:])  # no FormatError: the seed is valid, not merely tolerated
        assert run_one(frames, seed) is None


def test_frames_oracle_accepts_declared_errors() -> None:
    for i in range(len(frames.PARSERS)):
        for tail in (b"", b"\x00", b"\xff" * 3, b"\xff" * 300):
            exc = run_one(frames, bytes([i]) + tail)
            assert exc is None or isinstance(exc, Finding), exc


def test_frames_oracle_flags_undeclared_exceptions(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(data: bytes) -> None:
        raise IndexError("x")

    bad = frames.Parser("bad", boom, b"")
    monkeypatch.setattr(frames, "PARSERS", [bad])
    with pytest.raises(Finding, match="undeclared IndexError"):
        frames.one_input(b"\x00abc")


def test_minimise_keeps_the_signature() -> None:
    class T:
        @staticmethod
        def one_input(data: bytes) -> None:
            if b"\x07" in data:
                raise Finding("seven: here")

    data = bytes(range(40))
    small = minimise(T, data, "Finding:seven")  # type: ignore[arg-type]
    assert small == b"\x07"


def test_builtin_engine_on_frames(tmp_path: Path) -> None:
    stats = builtin_fuzz(
        frames, seconds=2.0, corpus=frames.seeds(), seed=3, crash_dir=tmp_path, guided=True
    )
    assert stats.execs > 100
    assert int(stats.coverage.split()[0]) > 50
    known = _known_open()
    for path in stats.findings:
        rep = Reproducer.load(path)
        exc = run_one(frames, rep.data)
        assert exc is not None and signature(exc) in known, f"new finding: {rep.error}"


@pytest.mark.timeout(120)
def test_frames_smoke_atheris(tmp_path: Path) -> None:
    """A few seconds of the real CLI; anything it finds must be a known, still-open bug."""
    pytest.importorskip("atheris")
    proc = subprocess.run(
        [sys.executable, "-m", "lab.fuzz", "frames", "--time", "4",
         "--corpus", str(tmp_path / "corpus"), "--crashes", str(tmp_path / "crashes")],
        capture_output=True, text=True, cwd=REPO, timeout=100, check=False,
    )  # fmt: skip
    print(proc.stdout, proc.stderr[-2000:])
    assert "fuzz frames [atheris]" in proc.stdout
    execs = int(proc.stdout.split("]: ")[1].split()[0])
    assert execs > 1000
    known = _known_open()
    for path in (tmp_path / "crashes").glob("*.json"):
        rep = Reproducer.load(path)
        exc = run_one(frames, rep.data)
        assert exc is not None and signature(exc) in known, f"new finding: {rep.error}"


def test_replay_cli_reports_open_reproducer(tmp_path: Path) -> None:
    rep = Reproducer("frames", bytes([0]) + bytes(23), status="fixed")
    path = rep.save(tmp_path)
    proc = subprocess.run(
        [str(REPO / "scripts" / "fuzz"), "replay", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passes" in proc.stdout


BAD_REPRODUCERS = [
    (None, "missing.json: cannot read it: No such file or directory"),
    ("dir", "dir: cannot read it: Is a directory"),
    ("{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    ("[1, 2]", "not a reproducer: expected a JSON object"),
    ('{"target": "frames"}', "not a reproducer: no 'data' string"),
    ('{"data": ""}', "not a reproducer: no 'target' string"),
    ('{"target": "frames", "data": 5}', "no 'data' string"),
    ('{"target": "frames", "data": "@@@@"}', "'data' is not base64"),
    ('{"target": "frames", "data": "AAA"}', "'data' is not base64"),
    ('{"target": "frames", "data": "", "note": 3}', "'note' is not a string"),
    ('{"target": "nope", "data": ""}', "unknown target 'nope'"),
]


@pytest.mark.parametrize(("content", "message"), BAD_REPRODUCERS)
def test_replay_refuses_a_file_that_is_not_a_reproducer(
    tmp_path: Path, content: str | bytes | None, message: str
) -> None:
    """Status 2 and one line naming the file, not a traceback and not 1 ("still fails"); the
    other files are replayed all the same."""
    from click.testing import CliRunner

    from lab.fuzz.__main__ import cli

    bad = tmp_path / ("missing.json" if content is None else "bad.json")
    if content == "dir":
        bad = tmp_path / "dir"
        bad.mkdir()
    elif isinstance(content, bytes):
        bad.write_bytes(content)
    elif content is not None:
        bad.write_text(content)
    good = Reproducer("frames", bytes([0]) + bytes(23), status="fixed").save(tmp_path)
    r = CliRunner().invoke(cli, ["replay", str(bad), str(good)])
    assert r.exit_code == 2, (r.output, r.exception)
    assert isinstance(r.exception, SystemExit)
    assert f"fuzz replay: {bad}" in r.stderr and message in r.stderr, r.stderr
    assert "Traceback" not in r.output
    assert f"{good}: frames: passes" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay"], "Missing argument 'FILE...'"),
        (["device", "--time", "-5"], "'--time'"),
        (["device", "--time", "0"], "'--time'"),
        (["device", "--time", "nan"], "'--time'"),
        (["device", "--time", "soon"], "'--time'"),
        (["frames", "--corpus", "{file}"], "'--corpus'"),
        (["frames", "--crashes", "{file}"], "'--crashes'"),
        (["frames", "--seed", "x"], "'--seed'"),
        (["frames", "--engine", "afl"], "'--engine'"),
        (["nosuch"], "No such command 'nosuch'"),
        ([], "Usage: scripts/fuzz"),
    ],
)
def test_fuzz_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    from click.testing import CliRunner

    from lab.fuzz.__main__ import cli

    regular = tmp_path / "file"
    regular.write_text("")
    argv = [a.format(file=regular) for a in args]
    r = CliRunner().invoke(cli, argv, prog_name="scripts/fuzz")
    assert r.exit_code == 2, (r.output, r.exception)
    assert isinstance(r.exception, SystemExit)
    assert message in r.output
    assert regular.is_file()


def test_fuzz_help_names_every_command_and_default() -> None:
    proc = subprocess.run(
        [str(REPO / "scripts" / "fuzz"), "--help"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0
    out = proc.stdout
    assert out.startswith("Usage: scripts/fuzz ")
    for command in ("frames", "device", "wire", "api", "replay"):
        assert re.search(rf"^  {command} +\S", out, re.M), out
    assert "Status: 0" in out
    target = subprocess.run(
        [str(REPO / "scripts" / "fuzz"), "device", "-h"], capture_output=True, text=True, timeout=30
    ).stdout
    assert "[default: 60.0" in target  # --time
    assert re.search(r"--seed INTEGER +Random seed", target), target


def test_device_seeds_and_random_inputs_hold_the_invariants() -> None:
    import random

    from lab.fuzz import device

    rng = random.Random(7)
    inputs = device.seeds() + [bytes(rng.randrange(256) for _ in range(400)) for _ in range(60)]
    for data in inputs:
        exc = run_one(device, data)
        assert exc is None, f"{data.hex()}: {exc}"


def test_device_oracle_catches_a_broken_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle is not vacuous: a model that forgets the batch page pin is caught."""
    import random

    from lab.fuzz import device
    from vdev.balloon import BalloonModel

    orig = BalloonModel._pinned_mask
    monkeypatch.setattr(
        BalloonModel, "_pinned_mask", lambda self, pfns, n, batch: orig(self, pfns, n, None)
    )
    rng = random.Random(11)
    stats = builtin_fuzz(
        device, seconds=8.0, corpus=[bytes(rng.randrange(256) for _ in range(300))],
        seed=5, crash_dir=Path(__import__("tempfile").mkdtemp()), guided=False,
    )  # fmt: skip
    assert stats.findings, "the device oracle missed an unpinned batch page"
    rep = Reproducer.load(stats.findings[0])
    assert "PINNED" in rep.error or "status" in rep.error or "entries" in rep.error


@pytest.mark.timeout(120)
def test_device_smoke_atheris(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    proc = subprocess.run(
        [sys.executable, "-m", "lab.fuzz", "device", "--time", "4",
         "--corpus", str(tmp_path / "corpus"), "--crashes", str(tmp_path / "crashes")],
        capture_output=True, text=True, cwd=REPO, timeout=100, check=False,
    )  # fmt: skip
    print(proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stdout
    assert "fuzz device [atheris]" in proc.stdout


@pytest.mark.timeout(90)
def test_wire_smoke_against_vdev(tmp_path: Path) -> None:
    """A few seconds of the live attack; vdev must survive and stay accountable."""
    from lab.fuzz import wire

    with wire.session():
        stats = builtin_fuzz(
            wire, seconds=5.0, corpus=wire.seeds(), seed=4, crash_dir=tmp_path, guided=False
        )
    assert stats.execs >= 10
    assert not stats.findings, [Reproducer.load(p).error for p in stats.findings]


@pytest.mark.timeout(90)
def test_wire_reports_the_coverage_reached_inside_vdev(tmp_path: Path) -> None:
    """`scripts/fuzz wire --vdev-coverage FILE`: vdev runs under coverage.py and the campaign
    says how much of vdev and protocol its attacks reached (the fuzzer cannot see it)."""
    data = tmp_path / "vdev.coverage"
    run = subprocess.run(
        [sys.executable, "-m", "lab.fuzz", "wire", "--time", "3", "--seed", "2",
         "--corpus", str(tmp_path / "corpus"), "--crashes", str(tmp_path / "crashes"),
         "--vdev-coverage", str(data)],
        cwd=REPO, capture_output=True, text=True, timeout=80,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    m = re.search(r"vdev coverage: ([0-9.]+) % of lines in (\d+) files", run.stdout)
    assert m, run.stdout
    assert 10 < float(m[1]) < 100 and int(m[2]) >= 10  # the server, rings, model were reached
    assert data.stat().st_size > 0
    # Both personalities are attacked, and the arcs measured inside vdev guide the corpus.
    assert "fuzz wire [builtin+vdev-arcs]" in run.stdout
    arcs = re.search(r"coverage (\d+) arcs inside vdev", run.stdout)
    assert arcs and int(arcs[1]) > 1000, run.stdout
    devices = dict(re.findall(r"(virtio_balloon|vmw) ([0-9.]+) %", run.stdout))
    assert float(devices["virtio_balloon"]) > 20 and float(devices["vmw"]) > 20, run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "lab.fuzz", "frames", "--vdev-coverage", str(data)],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "needs a target that runs vdev under coverage" in bad.stderr


@pytest.mark.timeout(90)
def test_wire_oracle_catches_a_vdev_that_does_not_reclaim() -> None:
    from lab.fuzz import wire

    mutant = [sys.executable, str(REPO / "tests" / "test_harness.py"), "no-reclaim"]
    with wire.session(vdev_cmd=mutant):
        for seed in (wire.seeds()[0], wire.seeds()[4]):  # a vmw input, a virtio-balloon one
            exc = run_one(wire, seed)
            assert isinstance(exc, Finding) and "accounting" in str(exc), exc


def test_remote_coverage_keeps_inputs_that_reach_new_arcs(tmp_path: Path) -> None:
    """The engine's rule for out-of-process targets (wire under --vdev-coverage): an input
    joins the corpus when the arcs measured in vdev grew while it ran, and only then."""
    import types

    from lab.fuzz.engine import builtin_fuzz as engine

    arcs = [100]
    runs: list[bytes] = []

    def one_input(data: bytes) -> None:
        runs.append(data)
        if data.startswith(b"new") and data not in runs[:-1]:
            arcs[0] += 1  # a first run of a "new..." input reaches new code

    target = types.SimpleNamespace(
        __name__="lab.fuzz.fake", one_input=one_input, seeds=lambda: [b"a"],
        coverage_count=lambda: arcs[0],
    )  # fmt: skip
    kept: list[bytes] = []
    stats = engine(
        target, seconds=0.3, corpus=[b"old", b"new1", b"new2"], seed=1, crash_dir=tmp_path,
        guided=False, on_new=kept.append,
    )  # fmt: skip
    assert stats.engine == "builtin+vdev-arcs"
    assert arcs[0] > 102 and stats.coverage == f"{arcs[0]} arcs inside vdev"
    assert all(k.startswith(b"new") for k in kept)  # only inputs that moved the count
    assert len(kept) == arcs[0] - 100 - 2  # the two seeds were in the corpus already


@pytest.mark.timeout(90)
def test_api_smoke_against_vdev(tmp_path: Path) -> None:
    """A few seconds of hostile HTTP against a live vdev's API socket: vdev stays up, every
    answer is well-formed JSON with a 2xx/4xx status, no fd leaks."""
    from lab.fuzz import api

    with api.session():
        stats = builtin_fuzz(
            api, seconds=6.0, corpus=api.seeds(), seed=5, crash_dir=tmp_path, guided=False
        )
    assert stats.execs >= 10
    assert not stats.findings, [Reproducer.load(p).error for p in stats.findings]


@pytest.mark.timeout(90)
def test_api_campaign_from_the_command_line(tmp_path: Path) -> None:
    """`scripts/fuzz api` as the README gives it (it failed at start-up: the wire target's
    coverage option was passed to every target's session)."""
    run = subprocess.run(
        [sys.executable, "-m", "lab.fuzz", "api", "--time", "3", "--seed", "3",
         "--corpus", str(tmp_path / "corpus"), "--crashes", str(tmp_path / "crashes")],
        cwd=REPO, capture_output=True, text=True, timeout=80,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    m = re.search(r"fuzz api \[builtin\]: (\d+) execs", run.stdout)
    assert m and int(m[1]) >= 5, run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "lab.fuzz", "api", "--vdev-coverage", str(tmp_path / "c")],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "needs a target that runs vdev under coverage" in bad.stderr


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 2\r\n\r\n{}", "answered 500"),
        (b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n", "without a JSON body"),
        (b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\nnop", "not JSON"),
        (b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n[]", "is not {'error'"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}", "malformed HTTP response"),
        (b"HTTP/1.1 20x OK\r\n\r\n", "malformed HTTP response"),
    ],
)
def test_api_oracle_flags_bad_answers(raw: bytes, problem: str) -> None:
    from lab.fuzz.api import check_responses

    with pytest.raises(Finding, match=re.escape(problem)):
        check_responses(raw, [b"GET"])
    ok = b'HTTP/1.1 404 Not Found\r\ncontent-length: 13\r\n\r\n{"error":"x"}'
    assert check_responses(ok + ok, [b"GET", b"PUT"]) == 2
