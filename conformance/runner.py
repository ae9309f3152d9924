"""Run conformance cases against a back-end; report as a table and as JUnit XML."""

from __future__ import annotations

import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from conformance.backend import BackendSpawner
from conformance.cases import Case
from conformance.context import CaseFailed, Context, SetupError, Skipped
from protocol.errors import BackendHungUp

PASS, FAIL, SKIP, ERROR = "pass", "fail", "skip", "error"


@dataclass(frozen=True)
class Result:
    case: Case
    outcome: str
    message: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.outcome in (FAIL, ERROR)


def unsupported(c: Case, context: type[Context]) -> str | None:
    """Why ``c`` cannot run over ``context``'s transport (what it needs that the transport
    lacks, :class:`conformance.context.Need`), or None."""
    missing = c.missing(context.provides)
    if not missing:
        return None
    why = "; ".join(f"{n.value} ({n.why})" for n in sorted(missing, key=lambda n: n.value))
    return f"needs {why}: not over the {context.transport} transport"


async def run_case(c: Case, ctx: Context) -> Result:
    t0 = time.monotonic()
    try:
        with trio.fail_after(c.timeout):
            await c.fn(ctx)
    except Skipped as exc:
        return Result(c, SKIP, str(exc), time.monotonic() - t0)
    except SetupError:
        raise  # the harness's own failure: not a verdict on the back-end
    except CaseFailed as exc:
        return Result(c, FAIL, str(exc), time.monotonic() - t0)
    except trio.TooSlowError:
        return Result(c, FAIL, f"no answer within {c.timeout:g}s", time.monotonic() - t0)
    except BackendHungUp as exc:
        return Result(c, FAIL, f"back-end closed the connection: {exc}", time.monotonic() - t0)
    except (AssertionError, OSError) as exc:
        return Result(c, FAIL, f"{type(exc).__name__}: {exc}", time.monotonic() - t0)
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(tb.filename).name}:{tb.lineno}"
        msg = f"{type(exc).__name__}: {exc} (at {where})"
        return Result(c, ERROR, msg, time.monotonic() - t0)
    finally:
        ctx.close_all()
    return Result(c, PASS, "", time.monotonic() - t0)


async def run_all(
    cases: Sequence[Case],
    *,
    device: str,
    socket: str | None = None,
    target_hook: str | None = None,
    spawner: BackendSpawner | None = None,
    vm: str = "vm0",
    on_result: object = None,
) -> list[Result]:
    """Run ``cases`` one after the other; their results. A :class:`SetupError` (a target
    hook or a back-end to start failed) stops the run: it is raised with ``results`` set to
    those so far, the case it stopped at last, as an error."""
    results: list[Result] = []
    for c in cases:
        initial = None
        reason = unsupported(c, Context)
        if reason is not None:
            results.append(Result(c, SKIP, reason))
            continue
        try:
            if spawner is not None:
                path = await spawner.socket_for(c.target)
                initial = c.target
            else:
                assert socket is not None
                path = socket
            ctx = Context(
                socket=path, device=device, vm=vm, target_hook=target_hook, initial_target=initial
            )
            result = await run_case(c, ctx)
        except CaseFailed as exc:  # the spawned back-end died in an earlier case
            result = Result(c, FAIL, str(exc))
        except SetupError as exc:
            # the harness could not set up what the case needs: stop the run, and fail it
            results.append(Result(c, ERROR, f"harness set-up failed: {exc}"))
            exc.results = results
            raise
        results.append(result)
        if callable(on_result):
            on_result(result)
    return results


def render_table(results: Sequence[Result], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    style = {PASS: "green", FAIL: "bold red", ERROR: "bold red", SKIP: "yellow"}
    table = Table(title=title, show_lines=False)
    table.add_column("case", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("spec")
    table.add_column("detail")
    for r in results:
        table.add_row(
            r.case.name,
            f"[{style[r.outcome]}]{r.outcome}[/]",
            r.case.spec,
            r.message or r.case.checks,
        )
    console = Console(width=max(140, Console().width))
    console.print(table)
    counts = {k: sum(1 for r in results if r.outcome == k) for k in (PASS, FAIL, ERROR, SKIP)}
    secs = sum(r.seconds for r in results)
    console.print(
        f"{counts[PASS]} passed, {counts[FAIL] + counts[ERROR]} failed, {counts[SKIP]} skipped "
        f"in {secs:.1f}s"
    )


def write_junit(results: Sequence[Result], path: Path, suite: str) -> None:
    root = ET.Element(
        "testsuite",
        name=suite,
        tests=str(len(results)),
        failures=str(sum(1 for r in results if r.outcome == FAIL)),
        errors=str(sum(1 for r in results if r.outcome == ERROR)),
        skipped=str(sum(1 for r in results if r.outcome == SKIP)),
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for r in results:
        tc = ET.SubElement(
            root, "testcase", classname=suite, name=r.case.name, time=f"{r.seconds:.3f}"
        )
        ET.SubElement(tc, "properties").append(
            ET.Element("property", name="spec", value=r.case.spec)
        )
        if r.outcome == FAIL:
            ET.SubElement(tc, "failure", message=r.message).text = f"{r.case.checks}\n{r.message}"
        elif r.outcome == ERROR:
            ET.SubElement(tc, "error", message=r.message).text = r.message
        elif r.outcome == SKIP:
            ET.SubElement(tc, "skipped", message=r.message)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
