"""``scripts/fuzz`` (``python -m lab.fuzz``): fuzz vballoon and replay what was found.

    scripts/fuzz TARGET [--time SECONDS] [--corpus DIR] [--seed N] [--engine E] [--crashes DIR]
    scripts/fuzz replay FILE [FILE...]

TARGET is ``frames``, ``device``, ``wire`` or ``api`` (the management API socket). Findings are
minimised and written as reproducer JSON files (default ``.cache/fuzz/TARGET/crashes``); the run
exits 1 when it found anything. ``replay`` exits 1 when any file still reproduces, 2 when a file
is not a reproducer (each other file is replayed all the same); 2 is also any usage error.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from lab.fuzz.corpus import (
    REPO,
    SEED_DIR,
    BadReproducer,
    Reproducer,
    load_corpus,
    write_corpus,
)
from lab.fuzz.engine import TARGETS, Stats, builtin_fuzz, load_target, minimise, run_one, signature


def _atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def _atheris_child(argv: list[str]) -> None:
    """Runs inside the child process: instrument the target's packages, then fuzz forever."""
    import importlib

    import atheris

    name, libfuzzer_args = argv[0], argv[1:]
    module_name = TARGETS[name]
    include = ["protocol", "vdev", "lab.fuzz", "construct"]
    with atheris.instrument_imports(include=include):
        target = importlib.import_module(module_name)
    session = getattr(target, "session", None)
    stack = contextlib.ExitStack()
    if session is not None:
        stack.enter_context(session())

    artifacts = Path(next(a for a in libfuzzer_args if a.startswith("-artifact_prefix="))[17:])
    seen: set[str] = set()

    def test_one_input(data: bytes) -> None:
        # keep going after a finding: save the first input of each signature, fuzz on
        try:
            target.one_input(data)
        except Exception as exc:
            sig = signature(exc)
            if sig not in seen:
                seen.add(sig)
                (artifacts / f"finding-{len(seen)}").write_bytes(data)
                print(f"fuzz: finding {sig}", file=sys.stderr)

    atheris.Setup([sys.argv[0], *libfuzzer_args], test_one_input)
    atheris.Fuzz()


_STAT = re.compile(r"stat::(\w+):\s*(\d+)")
_PROGRESS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")


def _run_atheris(
    name: str, seconds: float, corpus: Path, seed: int, crash_dir: Path
) -> tuple[Stats, list[Path]]:
    artifacts = crash_dir / "raw"
    artifacts.mkdir(parents=True, exist_ok=True)
    before = set(artifacts.iterdir())
    cmd = [
        sys.executable,
        "-m",
        "lab.fuzz",
        "_atheris",
        name,
        f"-max_total_time={max(1, int(seconds))}",
        f"-seed={seed}",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
        "-max_len=4096",
        "-timeout=10",
        "-rss_limit_mb=2048",
        str(corpus),
    ]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    stats = Stats(target=name, engine="atheris", seconds=time.monotonic() - t0)
    finals = dict(_STAT.findall(proc.stderr))
    progress = _PROGRESS.findall(proc.stderr)
    stats.execs = int(finals.get("number_of_executed_units", 0))
    if progress:
        _, cov, ft, corp = progress[-1]
        stats.coverage = f"libFuzzer cov {cov} edges, ft {ft}"
        stats.corpus = int(corp)
    new = sorted(set(artifacts.iterdir()) - before)
    if proc.returncode != 0 and not new:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"atheris child exited {proc.returncode} without an artifact")
    return stats, new


@dataclass(frozen=True)
class FuzzArgs:
    """A campaign's options (``scripts/fuzz TARGET ...``)."""

    target: str
    time: float = 60.0
    corpus: str | None = None
    seed: int = 1
    engine: str | None = None
    crashes: str | None = None
    vdev_coverage: str | None = None


def _fuzz(args: FuzzArgs) -> int:
    name: str = args.target
    target = load_target(name)
    crash_dir = Path(args.crashes or REPO / ".cache" / "fuzz" / name / "crashes")
    corpus_dir = Path(args.corpus or REPO / ".cache" / "fuzz" / name / "corpus")
    if not load_corpus(corpus_dir):
        write_corpus(corpus_dir, load_corpus(SEED_DIR / name) + list(target.seeds()))
    engine = args.engine or getattr(target, "ENGINE", "atheris")
    if engine == "atheris" and not _atheris_available():
        print("fuzz: atheris is not installed; using the built-in engine", file=sys.stderr)
        engine = "builtin"
    if engine == "atheris":
        stats, raw = _run_atheris(name, args.time, corpus_dir, args.seed, crash_dir)
        for path in raw:
            data = path.read_bytes()
            exc = run_one(target, data)
            if exc is None:
                print(f"fuzz: {path} does not reproduce in-process (flaky?)", file=sys.stderr)
                rep = Reproducer(name, data, error="did not reproduce", note="atheris artifact")
            else:
                small = minimise(target, data, signature(exc))
                err = "".join(traceback.format_exception_only(exc)).strip()
                rep = Reproducer(name, small, error=err, note=f"atheris, seed {args.seed}")
            stats.findings.append(rep.save(crash_dir))
    else:
        session: Any = getattr(target, "session", None)
        live = None
        if session is not None:  # only wire's measures coverage (its command checked the option)
            live = session(coverage_file=args.vdev_coverage) if args.vdev_coverage else session()
        with live if live is not None else contextlib.nullcontext():
            stats = builtin_fuzz(
                target,
                seconds=args.time,
                corpus=load_corpus(corpus_dir),
                seed=args.seed,
                crash_dir=crash_dir,
                guided=engine == "builtin" and getattr(target, "GUIDED", True),
                on_new=lambda data: write_corpus(corpus_dir, [data]),
            )
    print(stats.summary())
    if args.vdev_coverage:
        print(_coverage_summary(args.vdev_coverage))
    for path in stats.findings:
        rep = Reproducer.load(path)
        print(f"  finding: {path}\n    {rep.error.splitlines()[-1] if rep.error else ''}")
    return 1 if stats.findings else 0


def _coverage_summary(data_file: str) -> str:
    """The coverage reached inside vdev during the campaign: every vdev's data file (written
    when it exited) combined into ``data_file``; overall lines, and each personality's own
    device module."""
    import coverage

    from lab.fuzz.wire import coverage_data_files

    parts = [str(p) for p in coverage_data_files(data_file) if p.exists()]
    cov = coverage.Coverage(data_file=data_file, config_file=False)
    cov.combine(parts, keep=True)
    cov.save()
    cov.load()
    with open(os.devnull, "w") as sink:
        percent = cov.report(file=sink)
        measured = cov.get_data().measured_files()
        devices = []
        for f in sorted(measured):
            if "/vdev/devices/" in f and not f.endswith(("__init__.py", "base.py")):
                pct = cov.report(morfs=[f], file=sink)
                devices.append(f"{Path(f).stem} {pct:.1f} %")
    return (
        f"vdev coverage: {percent:.1f} % of lines in {len(measured)} files (vdev, protocol; "
        f"branch coverage, arcs guide the corpus); devices: {', '.join(devices) or 'none'}; "
        f"data {data_file}"
    )


def _replay(files: list[str]) -> int:
    """0: every file passes; 1: one still fails; 2: a file is not a reproducer (said on
    stderr; the other files are replayed all the same)."""
    failed = bad = 0
    for file in files:
        try:
            rep = Reproducer.load(Path(file))
            if rep.target not in TARGETS:
                raise BadReproducer(
                    f"{file}: unknown target {rep.target!r} (one of {', '.join(TARGETS)})"
                )
        except BadReproducer as why:
            print(f"fuzz replay: {why}", file=sys.stderr)
            bad += 1
            continue
        target = load_target(rep.target)
        session: Any = getattr(target, "session", None)
        with session() if session is not None else contextlib.nullcontext():
            exc = run_one(target, rep.data)
        if exc is None:
            print(f"{file}: {rep.target}: passes (fixed)")
        else:
            failed += 1
            print(f"{file}: {rep.target}: FAILS")
            traceback.print_exception(exc)
    return 2 if bad else 1 if failed else 0


_HELP = {"help_option_names": ["-h", "--help"]}

#: each target's one-line summary (``scripts/fuzz --help``; README "Fuzzing" has the oracles)
SUMMARIES = {
    "frames": "Every construct parser in protocol/ (atheris, coverage-guided).",
    "device": "The sans-I/O device model: vmmemctl command sequences (atheris).",
    "wire": "Live vdev processes over their vhost-user sockets (built-in mutator).",
    "api": "A live vdev's management API: hostile HTTP (built-in mutator).",
}


def _measures_vdev(target: Any) -> bool:
    """Does the target's session run vdev under coverage.py (``coverage_file``)?"""
    session = getattr(target, "session", None)
    return session is not None and "coverage_file" in inspect.signature(session).parameters


class Seconds(click.FloatRange):
    """A finite duration > 0 (``click.FloatRange`` alone lets ``nan`` by)."""

    name = "seconds"

    def __init__(self) -> None:
        super().__init__(min=0, min_open=True, max=365 * 86400)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if number != number:  # nan
            self.fail(f"{value!r} is not a number of seconds.", param, ctx)
        return number


@click.group(
    name="fuzz",
    help="Fuzz one TARGET (frames, device, wire, api) for --time seconds, or replay the "
    "reproducers a campaign saved (replay FILE...). Findings are minimised and saved as "
    "reproducer JSON files (default .cache/fuzz/TARGET/crashes).",
    epilog="Each target's options: scripts/fuzz TARGET --help. Status: 0 nothing found, "
    "1 a finding (or a reproducer that still fails), 2 a usage error or a bad reproducer file.",
    context_settings=_HELP,
)
def cli() -> None:
    pass


def _target_command(target: str) -> click.Command:
    @click.pass_context
    def run(ctx: click.Context, **options: Any) -> None:
        if options["vdev_coverage"] and not _measures_vdev(load_target(target)):
            raise click.UsageError(
                f"--vdev-coverage needs a target that runs vdev under coverage (wire), not {target}"
            )
        raise SystemExit(_fuzz(FuzzArgs(target, **options)))

    run.__doc__ = (
        f"{SUMMARIES[target]} Fuzz for --time seconds, growing the corpus; each finding is "
        "minimised and saved as a reproducer (status 1)."
    )
    params: list[click.Parameter] = [
        click.Option(["--time"], type=Seconds(), default=60.0, show_default=True,
                     help="Seconds to fuzz (> 0)."),
        click.Option(["--corpus"], type=click.Path(file_okay=False), metavar="DIR",
                     help=f"Corpus directory, kept between runs [default: .cache/fuzz/{target}/corpus]."),
        click.Option(["--seed"], type=int, default=lambda: int(os.environ.get("FUZZ_SEED", "1")),
                     show_default="$FUZZ_SEED or 1",
                     help="Random seed (the same seed and corpus give the same run)."),
        click.Option(["--engine"], type=click.Choice(["atheris", "builtin"]),
                     help="Fuzzing engine [default: the target's; builtin without atheris]."),
        click.Option(["--crashes"], type=click.Path(file_okay=False), metavar="DIR",
                     help=f"Where reproducers go [default: .cache/fuzz/{target}/crashes]."),
        click.Option(["--vdev-coverage"], metavar="FILE",
                     help="wire: run vdev under coverage.py, write its data here and report the "
                     "line coverage reached in vdev and protocol."),
    ]  # fmt: skip
    return click.Command(
        target,
        callback=run,
        params=params,
        help=run.__doc__,
        short_help=SUMMARIES[target].split(" (")[0] + ".",
        context_settings=_HELP,
    )


for _name in TARGETS:
    cli.add_command(_target_command(_name))


@cli.command(
    context_settings=_HELP, short_help="Replay reproducer files (status 1: one still fails)."
)
@click.argument("files", nargs=-1, required=True, type=click.Path(), metavar="FILE...")
def replay(files: tuple[str, ...]) -> None:
    """Run each reproducer's target on its input once: status 0 when every file passes, 1 when
    one still fails, 2 when a file is not a reproducer."""
    raise SystemExit(_replay(list(files)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_atheris"]:
        _atheris_child(argv[1:])
        return 0
    cli.main(args=argv, prog_name="scripts/fuzz")  # exits
    return 0


if __name__ == "__main__":
    sys.exit(main())
