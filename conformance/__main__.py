"""``python -m conformance`` (``scripts/harness``): vhost-user balloon conformance.

    scripts/harness --socket PATH [--device vmw|virtio-balloon] [--junit FILE] [-k PATTERN]
                    [--target-hook 'vdev set-target {vm} {pages}p']
    scripts/harness --spawn-vdev [--device ...]     # start vdev serve itself, per case target
    scripts/harness --list [--device ...]

Exit status: 0 when no case failed, 1 when one did, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import trio

from conformance.cases import select
from conformance.runner import VdevSpawner, render_table, run_all, write_junit


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    p.add_argument("--socket", help="the back-end's vhost-user socket (it listens)")
    p.add_argument("--device", choices=["vmw", "virtio-balloon"], default="vmw")
    p.add_argument("--junit", type=Path, help="write JUnit XML here")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("-k", dest="pattern", help="only cases matching (glob or substring, a,b,c)")
    p.add_argument(
        "--target-hook",
        help="shell command that sets the target: {vm} {pages} {bytes} {socket} substituted",
    )
    p.add_argument("--vm", default="vm0", help="guest name passed to --target-hook")
    p.add_argument("--spawn-vdev", action="store_true", help="start vdev serve per case target")
    p.add_argument("--vdev", help="command that runs vdev (default: this python -m vdev)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cases = select(args.device, args.pattern)
    if args.list:
        for c in cases:
            print(f"{c.name:40} {c.spec}\n{'':40} {c.checks}")
        print(f"{len(cases)} cases for {args.device}")
        return 0
    if not args.socket and not args.spawn_vdev:
        print("harness: give --socket PATH or --spawn-vdev", file=sys.stderr)
        return 2
    if not cases:
        print("harness: no case matches", file=sys.stderr)
        return 2

    async def go() -> list[object]:
        if args.spawn_vdev:
            spawner = VdevSpawner(args.device, shlex.split(args.vdev) if args.vdev else None)
            async with spawner.running():
                return list(
                    await run_all(
                        cases, device=args.device, spawner=spawner,
                        target_hook=args.target_hook or spawner.target_hook, vm=args.vm,
                    )
                )  # fmt: skip
        return list(
            await run_all(
                cases, device=args.device, socket=args.socket,
                target_hook=args.target_hook, vm=args.vm,
            )
        )  # fmt: skip

    results = trio.run(go)
    title = f"vhost-user balloon conformance: {args.device} at {args.socket or 'spawned vdev'}"
    render_table(results, title)  # type: ignore[arg-type]
    if args.junit:
        write_junit(results, args.junit, f"harness.{args.device}")  # type: ignore[arg-type]
    return 1 if any(r.failed for r in results) else 0  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
