"""``vdev``: the device side's command line. ``vdev serve`` runs the vhost-user back-end.

``main`` is a click group; other modules add their subcommands to it (``vdev.api.app`` & co).
Back-end program conventions (QEMU vhost-user.rst): ``--socket-path``, ``--fd``,
``--print-capabilities``; rust-vmm's ``--socket-count``.
"""

from __future__ import annotations

import functools
import gc
import grp
import json
import logging
import math
import os
import signal
import socket
import stat
import sys

import click
import trio

from protocol.errors import ConfigError, HostResourceError
from protocol.units import PAGE_SIZE, parse_size
from protocol.version import package_version
from vdev import socket_files
from vdev.cli.operator import (
    CONTROL_META,
    ConfigRefused,
    preload_control_plane,
    register_operator_commands,
    serve_options,
    start_control_plane,
)
from vdev.config import ControlConfig
from vdev.devices.base import PERSONALITIES, get_personality
from vdev.handover import Handover
from vdev.listeners import socket_paths
from vdev.logs import LOG_FORMATS, error_line, setup_logging, verbosity_level
from vdev.registry import GuestRegistry, check_guest_name, name_from_socket_path
from vdev.sdnotify import FdStore, StandbyDismissed, is_standby, listen_fds
from vdev.server import Server

log = logging.getLogger("vdev")


def size_to_pages(text: str) -> int:
    return parse_size(text, "--target") // PAGE_SIZE


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    "--device",
    "device",
    type=click.Choice(sorted(PERSONALITIES)),
    default="vmw",
    show_default=True,
    help="The balloon device the guests see: vmw (vmmemctl over a virtio transport) or "
    "virtio-balloon (with free page reporting: virtio-balloon-reporting).",
)
@click.option(
    "--target", default="0", show_default=True, help="Initial balloon target (e.g. 512M)."
)
@click.option(
    "--name", "names", multiple=True, help="Guest names instead of vm0.. (one per socket)."
)
@click.option(
    "--socket-group",
    default=None,
    help="Group of the vhost-user sockets (name or id): mode 0660 and that group, for a "
    "front-end running as another user (libvirt's qemu). Default: mode 0600, owner only.",
)
@click.option(
    "--stats-interval",
    type=click.FloatRange(min=0, max=1e9),
    default=5.0,
    show_default=True,
    help="Seconds between guest statistics refreshes, 0 = only on request "
    "(QEMU's guest-stats-polling-interval; personalities with a stats queue: virtio-balloon).",
)
@click.option(
    "--deflate-on-stop",
    is_flag=True,
    help="Make SIGTERM a final stop: deflate every guest (target 0, at most --stop-timeout s, "
    "reported), then leave the fd store and exit. Without it, SIGTERM under systemd or "
    "vdev supervise is a hand-over: the next vdev resumes every guest. SIGUSR1 is always a "
    "final stop (vdev supervise sends it when it is stopped itself), and so is any stop of a "
    "vdev whose manager is gone or that runs without one (nothing could resume its guests); "
    "a second signal ends the wait.",
)
@click.option(
    "--stop-timeout",
    type=click.FloatRange(min=0, max=3600),
    default=30.0,
    show_default=True,
    help="Seconds a final stop (see --deflate-on-stop) waits for the guests to deflate.",
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
    socket_group: str | None,
    stats_interval: float,
    deflate_on_stop: bool,
    stop_timeout: float,
    verbose: int,
    quiet: bool,
    log_format: str,
    name_from_socket: bool,
) -> None:
    """Run the vhost-user back-end.

    Under systemd (Type=notify, FileDescriptorStoreMax=) or ``vdev supervise`` it keeps
    everything QEMU gave it, and its state, in the manager's fd store: a crash, SIGTERM or
    an upgrade is a hand-over the guests do not notice. Without a manager, SIGTERM and
    SIGINT deflate every guest before it exits (a final stop); so does SIGUSR1 always."""
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
    if not math.isfinite(stats_interval):
        raise click.BadParameter(f"{stats_interval} is not a number", param_hint="--stats-interval")
    try:
        target_pages = size_to_pages(target)
    except ConfigError as exc:
        raise ConfigRefused(str(exc)) from None
    paths = socket_paths(socket_path, socket_count) if socket_path is not None else []
    ctx = click.get_current_context()
    cfg, no_api = ctx.meta.get(CONTROL_META, (ControlConfig(), True))
    if names and name_from_socket:
        raise click.UsageError("give either --name or --name-from-socket")
    try:
        if name_from_socket:
            if not paths:
                raise ConfigError("--name-from-socket needs --socket-path")
            names = tuple(name_from_socket_path(p) for p in paths)
        if names and len(names) != max(len(paths), 1):
            raise ConfigError(f"--name: give one per socket ({max(len(paths), 1)})")
        option = "--name-from-socket" if name_from_socket else "--name"
        for name in names:
            try:
                check_guest_name(name)
            except ConfigError as exc:
                raise ConfigError(f"{option}: {exc}") from None
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            if name_from_socket:
                raise ConfigError(
                    f"--name-from-socket: the sockets {', '.join(paths)} give the guests "
                    f"the names {', '.join(names)}, {', '.join(twice)} more than once (name each socket "
                    "file after its guest, or give --name once per socket)"
                )
            raise ConfigError(f"--name: guest names must be distinct ({', '.join(twice)} twice)")
        cfg.check_vm_names(list(names) or [f"vm{i}" for i in range(max(len(paths), 1))])
        if fd is not None:
            _check_fd(fd)
        gid = _group_id(socket_group or cfg.socket_group)
        api = None if no_api else cfg.api_socket
        for i, p in enumerate(paths):
            if api is not None and socket_files.same_path(api, p):
                raise ConfigError(f"--api-socket {api} is also a vhost-user socket path")
            for q in paths[:i]:
                if socket_files.same_path(p, q):
                    raise ConfigError(f"--socket-path: {p} given twice")
        # Every path this process will listen on is ours before anything starts. Under a
        # manager with an fd store the listeners may be a previous vdev's, handed over (it
        # has exited: the locks are free, the sockets still listen): no connect probe then.
        if is_standby():
            preload_control_plane()
        _freeze_heap(collect=True)  # what imports allocated (a standby: before it waits)
        try:
            fds = listen_fds()  # a standby (vdev supervise --standby) waits here
        except StandbyDismissed:
            return
        handover = Handover(FdStore(), fds)
        probe = not handover.enabled
        claims = socket_files.claim_all(paths, "--socket-path", probe=probe)
        if api is not None:
            try:
                claims.enter_context(socket_files.claim(api, "--api-socket", probe=probe))
            except BaseException:
                claims.close()
                raise
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    setup_logging(verbosity_level(verbose, quiet), log_format)
    registry = GuestRegistry(device, target=target_pages)
    import vdev as package

    log.info(
        "vdev serve %s from %s (pid %d)",
        getattr(package, "BUILD", "-"), os.path.dirname(package.__file__), os.getpid(),
    )  # fmt: skip
    stop = StopMode(deflate=deflate_on_stop, timeout=stop_timeout)
    handed_over = False
    with claims:
        try:
            handed_over = trio.run(
                functools.partial(
                    _serve, registry, device_cls, paths, list(names) or None, fd,
                    stats_interval, handover=handover, stop=stop,
                    socket_mode=0o660 if gid is not None else 0o600, socket_gid=gid,
                )
            )  # fmt: skip
        except* (OSError, ConfigError, HostResourceError) as group:
            for leaf in _leaves(group):
                click.echo(error_line(f"vdev serve: {leaf}"), err=True)
            sys.exit(1)
    if handed_over:
        # Everything the next vdev needs is in the manager's fd store: leave now, without
        # the interpreter's finalization (most of a second, the guests waiting meanwhile).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def _check_fd(fd: int) -> None:
    """``--fd``: an open, connected unix stream socket (QEMU passes one end of a
    socketpair)."""
    try:
        st = os.fstat(fd)
    except (OSError, OverflowError):
        raise ConfigError(f"--fd {fd}: not an open file descriptor") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"--fd {fd}: not a socket")
    with socket.socket(fileno=fd) as s:
        try:
            family, kind = s.family, s.type
        finally:
            s.detach()
    if family != socket.AF_UNIX or kind != socket.SOCK_STREAM:
        raise ConfigError(f"--fd {fd}: not a unix stream socket")


def _group_id(group: str | None) -> int | None:
    """``--socket-group``: a group name or numeric id (None: no group)."""
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        pass
    if group.isdigit():
        return int(group)
    raise ConfigError(f"--socket-group: no group named {group!r}")


#: ``vdev serve``'s signal for a final stop whatever runs it (``vdev supervise`` sends it when
#: it is stopped itself: its fd store goes with it, so a hand-over would reach nobody).
FINAL_STOP_SIGNAL = signal.SIGUSR1


class StopMode:
    """What SIGTERM/SIGINT does (``vdev serve --deflate-on-stop``, ``--stop-timeout``)."""

    def __init__(self, *, deflate: bool = False, timeout: float = 30.0) -> None:
        self.deflate = deflate
        self.timeout = timeout


async def _watchdog(store: FdStore) -> None:
    """WATCHDOG=1 every half of WATCHDOG_USEC (systemd's WatchdogSec=), from the trio
    loop itself: a loop that hangs stops the pings."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        pid = int(os.environ.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return
    if usec <= 0 or pid != os.getpid():
        return
    while True:
        store.send({"WATCHDOG": 1})
        await trio.sleep(usec / 2e6)


def _freeze_heap(*, collect: bool = False) -> None:
    """Move what start-up allocated (modules, the API app and its schemas, the device
    classes: most of the heap) out of the garbage collector's reach, so that a full
    collection walks only what serving allocates. Without it every gen-2 collection held the
    event loop, and so every guest's requests, for 15-45 ms here (a doorbell reaction's
    worst cases); frozen, under 1 ms. ``collect``: first a full collection, ~30 ms, so that
    start-up's garbage is not kept for ever: done once, after the imports and before any
    guest is served (a standby does it before it waits); the freeze after the API started
    is instant (``gc.freeze`` moves lists, it does not walk them)."""
    if collect:
        gc.collect()
    gc.freeze()


async def _serve(
    registry: GuestRegistry,
    device_cls: type,
    paths: list[str],
    names: list[str] | None,
    fd: int | None,
    stats_interval: float = 0.0,
    socket_mode: int = 0o600,
    socket_gid: int | None = None,
    handover: Handover | None = None,
    stop: StopMode | None = None,
) -> bool:
    """Serve until a signal; True when it stopped for a hand-over."""
    stop = stop or StopMode()
    server = Server(
        registry,
        device_cls,
        socket_paths=paths,
        names=names if paths else None,
        stats_interval=stats_interval,
        socket_mode=socket_mode,
        socket_gid=socket_gid,
        handover=handover if fd is None else None,
    )
    managed = server.handover is not None
    handed_over: list[bool] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, FINAL_STOP_SIGNAL) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_now(signum: int) -> None:
                final = stop.deflate or signum == FINAL_STOP_SIGNAL
                store = server.handover.store if server.handover is not None else None
                if store is None:
                    # nothing could resume these connections: a stop that left the
                    # balloons inflated would strand that memory for the guests' lives
                    log.info(
                        "signal %d: deflating the guests before stopping (no fd store to "
                        "hand over to; a second signal stops without waiting)", signum
                    )  # fmt: skip
                    final = True
                elif not final and not store.send({"STATUS": "stopping"}):
                    final = True  # the manager is gone (FdStore logged it): nobody to hand to
                if final:
                    left = await server.final_stop(stop.timeout)
                    if store is not None:
                        held = sum(left.values())
                        store.send({"STOPPING": 1, "STATUS": f"final stop, {held} pages left"})
                else:
                    await server.hand_over()
                    handed_over.append(True)
                nursery.cancel_scope.cancel()

            async def on_signal() -> None:
                stopping = False
                async for signum in signals:
                    if stopping:
                        log.warning("signal %d again: stopping now", signum)
                        server.stop_waiting()
                        continue
                    log.info("signal %d: stopping", signum)
                    stopping = True
                    nursery.start_soon(stop_now, signum)

            nursery.start_soon(on_signal)
            if not managed:
                log.warning(
                    "no fd store (not run by systemd or vdev supervise): a crash or kill -9 of "
                    "this vdev leaves the guests' balloons inflated for good, QEMU cannot "
                    "reconnect; SIGTERM deflates them before it exits"
                )
            if fd is not None:
                await start_control_plane(nursery, registry, paths)
                _freeze_heap()
                await server.serve_fd(fd, (names or ["vm0"])[0])
                nursery.cancel_scope.cancel()
            else:
                # the sockets (and the connections a previous vdev handed over) first: a
                # resumed guest is answered before the control plane and the API start
                await nursery.start(server.run)
                await trio.sleep(0.01)
                await start_control_plane(nursery, registry, paths)
                _freeze_heap()
                if managed:
                    store = server.handover.store  # type: ignore[union-attr]
                    store.send({"READY": 1, "STATUS": f"serving {len(paths)} guests"})
                    nursery.start_soon(_watchdog, store)
    return bool(handed_over)


register_operator_commands(main)


@main.command(
    context_settings={"ignore_unknown_options": True},
    short_help="Run COMMAND (vdev serve ...) as systemd would: fd store, restarts.",
)
@click.option(
    "--command-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="JSON list: the command to start, re-read at every (re)start (point it at a new "
    "build, then SIGHUP the supervisor: an upgrade).",
)
@click.option("--max-fds", type=click.IntRange(1, 65536), default=4096, show_default=True,
              help="FileDescriptorStoreMax=.")  # fmt: skip
@click.option("--restart-delay", type=click.FloatRange(0, 60), default=0.1, show_default=True,
              help="RestartSec=: seconds between an exit and the restart.")  # fmt: skip
@click.option("--watchdog-sec", type=click.FloatRange(0, 3600), default=0.0, show_default=True,
              help="WatchdogSec=: SIGABRT the child when it does not ping for this long (0: off).")  # fmt: skip
@click.option("--standby", is_flag=True,
              help="Keep the next vdev started and imported, waiting for the store: a restart "
              "costs no Python start-up (vdev serve only).")  # fmt: skip
@click.option("--pid-file", type=click.Path(dir_okay=False), default=None,
              help="Write the pid of the child serving now here (MAINPID).")  # fmt: skip
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def supervise(
    command_file: str | None,
    max_fds: int,
    restart_delay: float,
    watchdog_sec: float,
    standby: bool,
    pid_file: str | None,
    verbose: int,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND (e.g. ``-- vdev serve ...``) as systemd would: notify socket, fd store,
    restart on exit. For tests, CI and containers; under systemd use contrib/systemd."""
    from vdev.supervise import supervise as run_supervisor

    setup_logging(max(verbose, 1))
    try:
        code = run_supervisor(
            list(command),
            command_file=command_file,
            max_fds=max_fds,
            restart_delay=restart_delay,
            watchdog_sec=watchdog_sec,
            standby=standby,
            pid_file=pid_file,
        )
    except (OSError, ValueError) as exc:
        click.echo(f"vdev supervise: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)
