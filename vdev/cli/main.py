"""``vdev``: the device side's command line. ``vdev serve`` runs the vhost-user back-end.

``main`` is a click group; other modules add their subcommands to it (``vdev.api.app`` & co).
Back-end program conventions (QEMU vhost-user.rst): ``--socket-path``, ``--fd``,
``--print-capabilities``; rust-vmm's ``--socket-count``.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys

import click
import trio

from protocol.errors import ConfigError
from protocol.units import PAGE_SIZE
from protocol.version import package_version
from vdev.cli.operator import register_operator_commands, serve_options, start_control_plane
from vdev.devices.base import PERSONALITIES, get_personality
from vdev.logs import LOG_FORMATS, setup_logging, verbosity_level
from vdev.registry import GuestRegistry, check_guest_name, name_from_socket_path
from vdev.server import Server, socket_paths

log = logging.getLogger("vdev")

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``512M``, ``2G``, ``4096``, ``1.5G`` (bytes; binary units; optional ``iB``/``B``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"not a size: {text!r} (examples: 512M, 2G, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def size_to_pages(text: str) -> int:
    return parse_size(text) // PAGE_SIZE


@click.group()
@click.version_option(
    package_version(), "--version", prog_name="vdev", message="%(prog)s %(version)s"
)
def main() -> None:
    """vballoon device side."""


@main.command()
@click.option(
    "--socket-path",
    "socket_path",
    type=click.Path(dir_okay=False),
    help="UNIX socket to listen on.",
)
@click.option(
    "--socket-count",
    type=click.IntRange(1, 1024),
    default=None,
    help="Listen on PATH0..PATH(N-1), one guest each.",
)
@click.option("--fd", type=int, default=None, help="Serve an already-connected socket on this fd.")
@click.option(
    "--print-capabilities", is_flag=True, help="Print the back-end capabilities as JSON and exit."
)
@click.option(
    "--device", "device", type=click.Choice(sorted(PERSONALITIES)), default="vmw", show_default=True
)
@click.option(
    "--target", default="0", show_default=True, help="Initial balloon target (e.g. 512M)."
)
@click.option(
    "--name", "names", multiple=True, help="Guest names instead of vm0.. (one per socket)."
)
@click.option(
    "--stats-interval",
    type=click.FloatRange(min=0, max=1e9),
    default=5.0,
    show_default=True,
    help="Seconds between guest statistics refreshes, 0 = only on request "
    "(QEMU's guest-stats-polling-interval; personalities with a stats queue: virtio-balloon).",
)
@click.option("-v", "--verbose", count=True, help="Default info; -vv debug.")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only.")
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    help="json: one object a line (time, level, logger, vm, event, message).",
)
@click.option(
    "--name-from-socket",
    is_flag=True,
    help="Name each guest after its socket file (/run/vdev/DOMAIN.sock -> DOMAIN).",
)
@serve_options
def serve(
    socket_path: str | None,
    socket_count: int | None,
    fd: int | None,
    print_capabilities: bool,
    device: str,
    target: str,
    names: tuple[str, ...],
    stats_interval: float,
    verbose: int,
    quiet: bool,
    log_format: str,
    name_from_socket: bool,
) -> None:
    """Run the vhost-user back-end."""
    try:
        device_cls = get_personality(device)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if print_capabilities:
        click.echo(json.dumps({"type": device_cls.backend_type}))
        return
    if (socket_path is None) == (fd is None):
        raise click.UsageError("give exactly one of --socket-path and --fd")
    if fd is not None and socket_count is not None:
        raise click.UsageError("--socket-count needs --socket-path")
    try:
        target_pages = size_to_pages(target)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--target") from None
    setup_logging(verbosity_level(verbose, quiet), log_format)
    registry = GuestRegistry(device, target=target_pages)
    paths = socket_paths(socket_path, socket_count) if socket_path is not None else []
    if names and name_from_socket:
        raise click.UsageError("give either --name or --name-from-socket")
    if name_from_socket:
        if not paths:
            raise click.UsageError("--name-from-socket needs --socket-path")
        names = tuple(name_from_socket_path(p) for p in paths)
    if names and len(names) != max(len(paths), 1):
        raise click.UsageError("give one --name per socket")
    for name in names:
        try:
            check_guest_name(name)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--name") from None
    if len(set(names)) != len(names):
        raise click.BadParameter("guest names must be distinct", param_hint="--name")
    try:
        trio.run(_serve, registry, device_cls, paths, list(names) or None, fd, stats_interval)
    except OSError as exc:
        click.echo(f"vdev serve: {exc}", err=True)
        sys.exit(1)


async def _serve(
    registry: GuestRegistry,
    device_cls: type,
    paths: list[str],
    names: list[str] | None,
    fd: int | None,
    stats_interval: float = 0.0,
) -> None:
    server = Server(
        registry,
        device_cls,
        socket_paths=paths,
        names=names if paths else None,
        stats_interval=stats_interval,
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for signum in signals:
                    log.info("signal %d: stopping", signum)
                    await server.shutdown()
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(on_signal)
            await start_control_plane(nursery, registry, paths)
            if fd is not None:
                await server.serve_fd(fd, (names or ["vm0"])[0])
                nursery.cancel_scope.cancel()
            else:
                await nursery.start(server.run)


register_operator_commands(main)
