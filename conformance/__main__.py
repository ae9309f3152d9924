"""``python -m conformance`` (``scripts/harness``): vhost-user balloon conformance.

    scripts/harness --socket PATH [--device vmw|virtio-balloon] [--junit FILE] [-k PATTERN]
                    [--target-hook 'vdev set-target --api-socket API {vm} {bytes}']
    scripts/harness --spawn-vdev [--vdev CMD] [--device ...]   # start vdev serve per case target
    scripts/harness --spawn 'CMD {socket} {bytes}' [--target-hook ...]   # any back-end
    scripts/harness --list [--device ...]
    python3 -m conformance --in-guest --initial-target PAGES [-k ...]   # inside the vmw guest

--target-hook placeholders: {vm} {pages} {bytes} {socket}; --spawn placeholders: {socket}
{device} {pages} {bytes}. (``vdev set-target`` reads a bare number as bytes: give it
{bytes}; ``{pages}p`` would be pebibytes.)

Exit status: 0 when no case failed, 1 when one did, 2 on usage errors (checked before any
case runs: nothing listens at --socket, --junit not writable, a command that does not
exist...), 3 when the harness's own set-up failed mid-run (a --target-hook command exited
non-zero, a back-end it starts did not listen): the run stops there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import shutil
import socket as socketlib
import stat
import sys
from pathlib import Path

import click
import trio

from conformance.backend import BackendSpawner
from conformance.cases import Case, select
from conformance.context import SetupError
from conformance.runner import (
    ERROR,
    FAIL,
    PASS,
    SKIP,
    Result,
    render_table,
    run_all,
    write_junit,
)
from protocol.errors import LocalError


@click.command(
    name="harness",
    help=(__doc__ or "").splitlines()[0],
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option("--socket", help="the back-end's vhost-user socket (it listens)")
@click.option(
    "--device", type=click.Choice(["vmw", "virtio-balloon"]), default="vmw", show_default=True
)
@click.option("--junit", type=click.Path(path_type=Path), help="write JUnit XML here")
@click.option("--list", "list_", is_flag=True, help="list the cases and exit")
@click.option("-k", "pattern", help="only cases matching (glob or substring, a,b,c)")
@click.option(
    "--target-hook",
    help="shell command that sets the target: {vm} {pages} {bytes} {socket} substituted "
    "(vdev: 'vdev set-target --api-socket API {vm} {bytes}')",
)
@click.option("--vm", default="vm0", show_default=True, help="guest name passed to --target-hook")
@click.option("--spawn-vdev", is_flag=True, help="start vdev serve per case target")
@click.option("--vdev", help="(--spawn-vdev) command that runs vdev (default: this python -m vdev)")
@click.option(
    "--spawn",
    "spawn_cmd",
    metavar="CMD",
    help="start this back-end per case target: {socket} {device} {pages} {bytes} substituted; "
    "it must listen on {socket}",
)
@click.option(
    "--in-guest",
    is_flag=True,
    help="inside the vmw Linux guest (root): the guest-level cases over its virtio-pci "
    "function (uio_pci_generic); one JSON line per result",
)
@click.option(
    "--initial-target",
    type=int,
    help="(--in-guest) the target in pages the host set; cases needing another are skipped",
)
@click.option("--ram-mib", type=int, help="(--in-guest) guest RAM size (default: /proc/iomem)")
def cli(
    socket: str | None,
    device: str,
    junit: Path | None,
    list_: bool,
    pattern: str | None,
    target_hook: str | None,
    vm: str,
    spawn_vdev: bool,
    vdev: str | None,
    spawn_cmd: str | None,
    in_guest: bool,
    initial_target: int | None,
    ram_mib: int | None,
) -> int:
    cases = select(device, pattern)
    if list_:
        for c in cases:
            needs = ", ".join(sorted(n.value for n in c.needs)) or "guest-level (any transport)"
            click.echo(f"{c.name:40} {c.spec}\n{'':40} {c.checks}\n{'':40} needs: {needs}")
        click.echo(f"{len(cases)} cases for {device}")
        return 0
    if in_guest:
        return _in_guest(device, cases, initial_target, ram_mib)
    if not (socket or spawn_vdev or spawn_cmd):
        click.echo("harness: give --socket PATH or --spawn-vdev (or --spawn CMD)", err=True)
        return 2
    if not cases:
        click.echo("harness: no case matches", err=True)
        return 2
    problem = _usage_problem(socket, junit, target_hook, spawn_vdev, vdev, spawn_cmd)
    if problem is not None:
        click.echo(f"harness: {problem}", err=True)
        return 2

    async def go() -> list[Result]:
        if spawn_vdev or spawn_cmd:
            spawner = BackendSpawner(
                device, shlex.split(vdev) if vdev else None, command=spawn_cmd,
                target_hook=target_hook,
            )  # fmt: skip
            async with spawner.running():
                return await run_all(
                    cases, device=device, spawner=spawner, target_hook=spawner.target_hook, vm=vm
                )
        return await run_all(cases, device=device, socket=socket, target_hook=target_hook, vm=vm)

    try:
        results = trio.run(go)
    except SetupError as exc:
        if exc.results:
            render_table(exc.results, f"vhost-user balloon conformance: {device} (stopped)")
            if junit:
                write_junit(exc.results, junit, f"harness.{device}")
        left = len(cases) - len(exc.results)
        click.echo(f"harness: set-up failed, run stopped ({left} cases not run): {exc}", err=True)
        return 3
    where = socket or ("spawned vdev" if spawn_vdev else "spawned back-end")
    render_table(results, f"vhost-user balloon conformance: {device} at {where}")
    if junit:
        write_junit(results, junit, f"harness.{device}")
    return 1 if any(r.failed for r in results) else 0


#: what each template may name
HOOK_FIELDS = {"vm": "vm0", "pages": 1, "bytes": 4096, "socket": "S"}
SPAWN_FIELDS = {"socket": "S", "device": "vmw", "pages": 1, "bytes": 4096}


def _template_problem(option: str, template: str, fields: dict[str, object]) -> str | None:
    try:
        template.format(**fields)
    except KeyError as e:
        names = " ".join(f"{{{k}}}" for k in fields)
        return f"{option}: unknown placeholder {{{e.args[0]}}} (known: {names})"
    except (ValueError, IndexError) as e:
        return f"{option}: not a valid template ({e}; write a literal brace as {{{{ or }}}})"
    return None


def _command_problem(option: str, words: list[str]) -> str | None:
    """``words[0]`` is not a command that can be run."""
    if not words:
        return f"{option}: empty command"
    exe = words[0]
    if os.sep in exe:
        if not os.path.isfile(exe):
            return f"{option}: {exe}: no such file"
        if not os.access(exe, os.X_OK):
            return f"{option}: {exe}: not executable"
    elif shutil.which(exe) is None:
        return f"{option}: {exe}: command not found (not on PATH)"
    return None


def _socket_problem(path: str) -> str | None:
    """Why nothing listens at ``path`` (None: something accepted a connection)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"nothing listens at {path}: {e.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"nothing listens at {path}: it is not a unix socket"
    s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
    except OSError as e:
        return f"nothing listens at {path}: {e.strerror or e} (a socket file left behind?)"
    finally:
        s.close()
    return None


def _junit_problem(path: Path) -> str | None:
    """Why ``path`` cannot be written (checked by opening it; a file created is removed)."""
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as e:
        return f"--junit {path}: cannot write it: {e.strerror or e}"
    if not existed:
        with contextlib.suppress(OSError):
            path.unlink()
    return None


def _usage_problem(
    socket: str | None,
    junit: Path | None,
    target_hook: str | None,
    spawn_vdev: bool,
    vdev: str | None,
    spawn_cmd: str | None,
) -> str | None:
    """What is wrong with the command line, checked before any case runs."""
    if spawn_vdev and spawn_cmd:
        return "--spawn-vdev and --spawn CMD exclude each other (give one back-end)"
    if socket and (spawn_vdev or spawn_cmd):
        which = "--spawn-vdev" if spawn_vdev else "--spawn"
        return f"--socket and {which} exclude each other ({which} makes its own sockets)"
    if vdev and not spawn_vdev:
        return "--vdev goes with --spawn-vdev"
    if target_hook is not None:
        problem = _template_problem("--target-hook", target_hook, HOOK_FIELDS)
        if problem:
            return problem
    try:
        if vdev:
            problem = _command_problem("--vdev", shlex.split(vdev))
            if problem:
                return problem
        if spawn_cmd:
            problem = _template_problem("--spawn", spawn_cmd, SPAWN_FIELDS)
            if problem:
                return problem
            words = [w.format(**SPAWN_FIELDS) for w in shlex.split(spawn_cmd)]
            problem = _command_problem("--spawn", words)
            if problem:
                return problem
    except ValueError as e:  # shlex: an unclosed quote
        return f"cannot split the command line: {e}"
    if junit is not None:
        problem = _junit_problem(junit)
        if problem:
            return problem
    if socket:
        return _socket_problem(socket)
    return None


def _in_guest(
    device: str, cases: list[Case], initial_target: int | None, ram_mib: int | None
) -> int:
    """The in-guest run: a JSON line per result (the host reads them off the console) and
    a plain summary (the guest's Python root has no rich)."""
    from conformance.inguest import result_line, run_in_guest

    if device != "vmw":
        click.echo("harness: --in-guest runs the vmw cases only", err=True)
        return 2
    if not cases:
        click.echo("harness: no case matches", err=True)
        return 2

    def show(r: Result) -> None:
        click.echo(result_line(r))

    try:
        results = trio.run(
            functools.partial(
                run_in_guest, cases, initial_target=initial_target, ram_mib=ram_mib, on_result=show
            )
        )
    except LocalError as exc:  # no such function, no uio, not root, no pagemap...
        click.echo(f"harness: cannot reach the guest's vmw function: {exc}", err=True)
        return 1
    counts = {k: sum(1 for r in results if r.outcome == k) for k in (PASS, FAIL, ERROR, SKIP)}
    click.echo(
        f"in-guest: {counts[PASS]} passed, {counts[FAIL] + counts[ERROR]} failed, "
        f"{counts[SKIP]} skipped"
    )
    return 1 if any(r.failed for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    """Run the harness; its exit status (2 on usage errors, as click reports them)."""
    try:
        return int(cli.main(args=argv, prog_name="harness", standalone_mode=False) or 0)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:  # --help
        return int(e.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
