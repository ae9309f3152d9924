"""``guest-driver``: run our vmmemctl guest driver over vhost-user, and look at it.

    guest-driver run --socket PATH --memory SIZE [--poll S] [--no-doorbell] [--shrinker]
                     [--in-flight N]
                     [--workload BASE[:AMPLITUDE[:PERIOD[:CACHE]]]] [--control PATH]
    guest-driver stat  [--socket PATH | --control PATH]     # "N MB", like
                                                             # vmware-toolbox-cmd stat balloon
    guest-driver stat --all [...]                            # the debugfs vmmemctl table

The running driver answers on a small unix-socket control endpoint (default: the vhost-user
socket path plus ``.guest``): one JSON request line in, one JSON reply line out.
Requests: ``{"cmd": "stat"}`` -> the driver's snapshot (``render_debugfs`` input), the
guest memory's ``meminfo``, the debugfs text under ``"debugfs"`` and the command counters
under ``"transport"``; ``{"cmd": "pages"}`` -> where the balloon's and the kernel's pages are,
as ``[first pfn, count]`` runs (what the guest RAM file's holes must match).

``guest-driver run`` exits 0 when told to stop (SIGINT/SIGTERM), 1 when the device is gone
for good (or cannot be reached at start), 2 on a usage error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import signal
import socket
import stat as stat_module
import sys
from collections.abc import Callable
from typing import Any

import click
import trio

from guest_driver.driver import DEFAULT_IN_FLIGHT, DriverConfig
from guest_driver.frontend import RING_BASE
from guest_driver.guest_memory import WorkloadSpec
from protocol.errors import ConfigError, VballoonError
from protocol.units import PAGE_SIZE, format_size, parse_size
from protocol.version import package_version
from protocol.vmw import ALL_CAPABILITIES, Capability

log = logging.getLogger(__name__)

CONTROL_SUFFIX = ".guest"


def parse_workload(text: str) -> WorkloadSpec:
    """``BASE[:AMPLITUDE[:PERIOD[:CACHE[:CACHE_GROWTH_PER_S]]]]`` (``256M:512M:20:128M:64M``).

    PERIOD is seconds, finite and > 0 (default 20)."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 5 or not parts[0]:
        raise ConfigError(f"bad workload {text!r}: BASE[:AMPLITUDE[:PERIOD[:CACHE[:CACHE_PER_S]]]]")
    base = parse_size(parts[0], "workload BASE") // PAGE_SIZE
    amplitude = (
        parse_size(parts[1], "workload AMPLITUDE") // PAGE_SIZE
        if len(parts) > 1 and parts[1]
        else 0
    )
    period = 20.0
    if len(parts) > 2 and parts[2]:
        try:
            period = float(parts[2])
        except ValueError:
            period = math.nan
        if not (math.isfinite(period) and period > 0):
            raise ConfigError(f"workload PERIOD: expected seconds > 0 (e.g. 20), got {parts[2]!r}")
    cache = (
        parse_size(parts[3], "workload CACHE") // PAGE_SIZE if len(parts) > 3 and parts[3] else 0
    )
    growth = (
        parse_size(parts[4], "workload CACHE_GROWTH") // PAGE_SIZE
        if len(parts) > 4 and parts[4]
        else 0
    )
    return WorkloadSpec(
        base=base, amplitude=amplitude, period=period, cache=cache, cache_growth=growth
    )


# ---------------------------------------------------------------------------------------
# Option types: a bad value is a usage error (status 2) naming the option


class Seconds(click.FloatRange):
    """A finite number of seconds in ``[min, max]`` (``click.FloatRange`` lets ``nan`` by)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not math.isfinite(_float_or_zero(value)):
            self.fail(f"{value!r} is not a finite number of seconds.", param, ctx)
        return super().convert(value, param, ctx)


def _float_or_zero(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0  # not a number at all: FloatRange says so


class Capabilities(click.ParamType):
    """A vmmemctl capability mask: an integer in 0..0xffffffff (``0x3e``, ``62``, ``0o76``)."""

    name = "mask"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Capability):
            return value
        try:
            number = value if isinstance(value, int) else int(str(value).strip(), 0)
        except ValueError:
            self.fail(f"{value!r} is not an integer (e.g. 0x3e).", param, ctx)
        if not 0 <= number <= 0xFFFFFFFF:
            self.fail(f"{value!r} is not in 0..0xffffffff (a 32-bit mask).", param, ctx)
        return Capability(number)


class Size(click.ParamType):
    """A size (``512M``, ``4G``, ``4096``: :func:`protocol.units.parse_size`) in bytes, at
    least ``min_bytes`` and, with ``page_aligned``, a whole number of 4 KiB pages."""

    name = "size"

    def __init__(self, min_bytes: int = 0, *, page_aligned: bool = False) -> None:
        self.min_bytes = min_bytes
        self.page_aligned = page_aligned

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        try:
            nbytes = parse_size(value, "size")
        except ConfigError as exc:
            self.fail(str(exc).removeprefix("size: "), param, ctx)
        if nbytes < self.min_bytes:
            self.fail(f"{value!r} is less than {format_size(self.min_bytes)}.", param, ctx)
        if self.page_aligned and nbytes % PAGE_SIZE:
            self.fail(f"{value!r} is not a whole number of 4 KiB pages.", param, ctx)
        return nbytes


#: guest RAM laid out like QEMU's: the low MiB (ROM holes) and the rings' MiB
MIN_GUEST_RAM = 2 * RING_BASE
#: ``--poll``'s floor: Linux's vmw_balloon polls once a second; shorter periods are for tests,
#: and 0 would ask the device for its target in a busy loop.
MIN_POLL = 0.01


def default_control_path(vhost_user_socket: str) -> str:
    return vhost_user_socket + CONTROL_SUFFIX


# ---------------------------------------------------------------------------------------
# The control endpoint (server side runs inside the driver's trio loop)


async def serve_control(
    path: str,
    handler: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer JSON-line requests on a unix socket at ``path`` until cancelled."""
    if os.path.exists(path):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        async with listener, trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(_serve_one, stream, handler)
    finally:
        with trio.CancelScope(shield=True), contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _serve_one(
    stream: trio.SocketStream, handler: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    async with stream:
        data = b""
        with trio.move_on_after(5):
            while b"\n" not in data and len(data) < 65536:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        try:
            request = json.loads(data.split(b"\n", 1)[0] or b"{}")
            reply = handler(request if isinstance(request, dict) else {})
        except (ValueError, VballoonError) as exc:
            reply = {"error": str(exc)}
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(json.dumps(reply).encode() + b"\n")


def query_control(path: str, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Blocking client for ``serve_control`` (used by ``guest-driver stat`` and the demo)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise ConfigError("bad reply from the guest driver")
    return reply


def format_stat_balloon(snapshot: dict[str, Any]) -> str:
    """``vmware-toolbox-cmd stat balloon``: the ballooned memory as ``N MB``."""
    return f"{int(snapshot['current']) * PAGE_SIZE // (1 << 20)} MB"


# ---------------------------------------------------------------------------------------
# click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    package_version(), "--version", prog_name="guest-driver", message="%(prog)s %(version)s"
)
def main() -> None:
    """vballoon guest side: the vmmemctl guest driver."""


@main.command()
@click.option(
    "--socket",
    "socket_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The vdev vhost-user socket to connect to.",
)
@click.option(
    "--memory",
    "memory",
    type=Size(MIN_GUEST_RAM, page_aligned=True),
    default="1G",
    show_default=True,
    help="Guest RAM size (a sparse memfd), e.g. 4G: whole 4 KiB pages, at least 2M.",
)
@click.option(
    "--poll",
    "poll",
    type=Seconds(min=MIN_POLL, max=3600),
    default=1.0,
    show_default=True,
    help="Seconds between work ticks (Linux: 1; at least 0.01).",
)
@click.option("--no-doorbell", is_flag=True, help="Do not offer SIGNALLED_WAKEUP: poll only.")
@click.option(
    "--capabilities",
    "caps",
    type=Capabilities(),
    default=hex(int(ALL_CAPABILITIES)),
    show_default=True,
    help="Capabilities offered at START: a 32-bit mask (0x3e, 62).",
)
@click.option(
    "--shrinker",
    is_flag=True,
    help="Deflate under guest memory pressure (vmwballoon_shrinker_enable).",
)
@click.option(
    "--in-flight",
    "in_flight",
    type=click.IntRange(1, 16),
    default=DEFAULT_IN_FLIGHT,
    show_default=True,
    help="LOCK batches kept in flight while inflating (1: vmw_balloon's one at a time).",
)
@click.option(
    "--workload",
    default=None,
    help="Synthetic workload BASE[:AMPLITUDE[:PERIOD[:CACHE[:CACHE_PER_S]]]], e.g. 256M:512M:20 "
    "(PERIOD in seconds, > 0; BASE+AMPLITUDE at most --memory).",
)
@click.option(
    "--control",
    "control",
    default=None,
    type=click.Path(dir_okay=False),
    help="Control socket (default: SOCKET.guest).",
)
@click.option(
    "--device-timeout",
    "device_timeout",
    type=Seconds(min=0, min_open=True),
    default=None,
    help="Seconds a command may stay unanswered (a vdev restarting) before the "
    "device is taken as gone and the driver exits (default 30).",
)
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug (default: warnings).")
def run(
    socket_path: str,
    memory: int,
    poll: float,
    no_doorbell: bool,
    caps: Capability,
    shrinker: bool,
    in_flight: int,
    workload: str | None,
    control: str | None,
    device_timeout: float | None,
    verbose: int,
) -> None:
    """Connect to vdev as a vhost-user front-end and run the balloon driver.

    A device that stops answering (vdev restarting under `vdev supervise` or systemd keeps
    the connection) is waited for, balloon kept, up to --device-timeout seconds; then it
    carries on where it was. A device that closes the connection is gone at once. Either
    way a device gone for good makes the driver give its pages back to the guest, say why
    and exit with status 1. SIGINT/SIGTERM: START(0) (at most 5 s), pop, say so, exit 0."""
    from guest_driver.transport_vhost_user import (
        DEVICE_TIMEOUT,
        Guest,
        GuestOptions,
        run_guest,
    )

    logging.basicConfig(
        level=logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    capabilities = caps
    if no_doorbell:
        capabilities &= ~Capability.SIGNALLED_WAKEUP_CMD
    try:
        spec = parse_workload(workload) if workload else None
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="'--workload'") from None
    if spec is not None and (spec.base + spec.amplitude) * PAGE_SIZE > memory:
        raise click.BadParameter(
            f"its peak, BASE+AMPLITUDE = {format_size((spec.base + spec.amplitude) * PAGE_SIZE)}"
            f", is more than the guest's --memory ({format_size(memory)})",
            param_hint="'--workload'",
        )
    options = GuestOptions(
        socket_path=socket_path,
        ram_bytes=memory,
        config=DriverConfig(
            capabilities=capabilities,
            poll_interval=poll,
            shrinker=shrinker,
            in_flight=in_flight,
        ),
        workload=spec,
        control_path=control or default_control_path(socket_path),
        device_timeout=DEVICE_TIMEOUT if device_timeout is None else device_timeout,
    )

    stopped_by: list[str] = []

    async def main_task() -> Guest | None:
        guest: Guest | None = None  # None: stopped before the device was set up
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def guest_task(task_status: trio.TaskStatus[Guest]) -> None:
                    try:
                        await run_guest(options, task_status=task_status)
                    finally:
                        nursery.cancel_scope.cancel()  # the guest ended: stop listening

                async def stop() -> None:
                    async for signum in signals:
                        stopped_by.append(signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()  # run_guest sends START(0), pops

                nursery.start_soon(stop)
                guest = await nursery.start(guest_task)
        return guest

    try:
        guest = trio.run(main_task)
    except KeyboardInterrupt:
        return
    except (VballoonError, OSError) as exc:
        click.echo(f"guest-driver run: {_explain(exc, socket_path)}", err=True)
        sys.exit(1)
    except BaseExceptionGroup as group:  # from the nursery: e.g. nothing listens there
        known, _ = group.split((VballoonError, OSError))
        if known is None:
            raise
        click.echo(f"guest-driver run: {_explain(_first(known), socket_path)}", err=True)
        sys.exit(1)
    if guest is None:
        if stopped_by:
            click.echo(f"guest-driver run: stopped by {stopped_by[0]} while starting", err=True)
        return
    released = f"{guest.released} ballooned pages given back to the guest"
    if guest.gone is not None:
        click.echo(f"guest-driver run: the device is gone: {guest.gone}; {released}", err=True)
        sys.exit(1)
    if stopped_by:
        click.echo(
            f"guest-driver run: stopped by {stopped_by[0]}: {guest.stop_note}; {released}",
            err=True,
        )


def _explain(exc: BaseException, socket_path: str) -> str:
    """``exc`` as one line; failing to connect to ``socket_path`` names it and says why."""
    if not isinstance(exc, OSError) or exc.filename != socket_path:
        return str(exc)
    if exc.errno == errno.ENOENT:
        why = "no such file"
    elif not stat_module.S_ISSOCK(_mode(socket_path)):
        why = "not a socket"
    elif exc.errno == errno.ECONNREFUSED:
        why = "connection refused (a stale socket file)"
    else:
        return f"cannot connect to {socket_path}: {exc.strerror}"
    return (
        f"cannot connect to {socket_path}: {why}: nothing listens there "
        "(is `vdev serve` running, on this socket?)"
    )


def _mode(path: str) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0


def _first(exc: BaseException) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@main.command("run-linux")
@click.option(
    "--pci-id",
    default="1af4:1069",
    show_default=True,
    help="vendor:device of the balloon's PCI function (vmw behind "
    "vhost-user-test-device-pci,virtio-id=41).",
)
@click.option(
    "--poll",
    "poll",
    type=Seconds(min=MIN_POLL, max=3600),
    default=1.0,
    show_default=True,
    help="Seconds between work ticks (Linux: 1; at least 0.01).",
)
@click.option("--no-doorbell", is_flag=True, help="Do not offer SIGNALLED_WAKEUP: poll only.")
@click.option("--no-huge", is_flag=True, help="4 KiB pages only (no transparent huge pages).")
@click.option(
    "--reserve",
    type=Size(),
    default=None,
    help="Never inflate below this much MemAvailable (default: --high; at least --low, "
    "or inflating would set off the deflation it undoes).",
)
@click.option(
    "--low",
    type=Size(),
    default="32M",
    show_default=True,
    help="Deflate when MemAvailable falls below this...",
)
@click.option(
    "--high",
    type=Size(),
    default="64M",
    show_default=True,
    help="...until this much is available again (at least --low).",
)
@click.option(
    "--control",
    "control",
    default="/run/guest-driver.sock",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Control socket (guest-driver stat --control).",
)
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug (default: warnings).")
def run_linux(
    pci_id: str,
    poll: float,
    no_doorbell: bool,
    no_huge: bool,
    reserve: int | None,
    low: int,
    high: int,
    control: str,
    verbose: int,
) -> None:
    """Inside a Linux guest: drive the vmw device's PCI function from userspace (root)."""
    from guest_driver.run_linux import LinuxOptions, available, run_in_guest

    logging.basicConfig(
        level=logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    if high < low:
        raise click.BadParameter(
            f"{format_size(high)} is less than --low ({format_size(low)})", param_hint="'--high'"
        )
    if reserve is None:
        reserve = high
    elif reserve < low:
        raise click.BadParameter(
            f"{format_size(reserve)} is less than --low ({format_size(low)}): inflating down "
            "to it would set off the deflation that undoes it",
            param_hint="'--reserve'",
        )
    try:
        vendor, _, device = pci_id.partition(":")
        pci = (int(vendor, 16), int(device, 16))
    except ValueError:
        raise click.BadParameter(
            f"{pci_id!r} is not VENDOR:DEVICE in hex (e.g. 1af4:1069)", param_hint="'--pci-id'"
        ) from None
    why = available()
    if why:
        raise click.UsageError(why)
    capabilities = ALL_CAPABILITIES
    if no_doorbell:
        capabilities &= ~Capability.SIGNALLED_WAKEUP_CMD
    options = LinuxOptions(
        config=DriverConfig(capabilities=capabilities, poll_interval=poll, shrinker=True),
        pci_id=pci,
        control_path=control,
        reserve_bytes=reserve,
        low_bytes=low,
        high_bytes=high,
        huge=not no_huge,
    )

    async def main_task() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(run_in_guest, options)

                async def stop() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(stop)

    from guest_driver.run_linux import PagesMoved

    try:
        trio.run(main_task)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:  # from the nursery: e.g. no such PCI function
        known, _ = group.split((VballoonError, OSError))
        if known is None:
            raise
        exc = _first(known)
        click.echo(f"guest-driver run-linux: {exc}", err=True)
        sys.exit(3 if isinstance(exc, PagesMoved) else 1)
    except PagesMoved as exc:
        click.echo(f"guest-driver run-linux: {exc}", err=True)
        sys.exit(3)
    except (VballoonError, OSError) as exc:
        click.echo(f"guest-driver run-linux: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.option(
    "--socket",
    "socket_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="The vhost-user socket the driver runs on (control = SOCKET.guest).",
)
@click.option(
    "--control",
    "control",
    default=None,
    type=click.Path(dir_okay=False),
    help="The driver's control socket.",
)
@click.option("--all", "show_all", is_flag=True, help="The whole debugfs-style table.")
@click.option("--json", "as_json", is_flag=True, help="The raw snapshot as JSON.")
def stat(socket_path: str | None, control: str | None, show_all: bool, as_json: bool) -> None:
    """Print the balloon size (``N MB``) or, with --all, the vmmemctl debugfs table."""
    path = control or (default_control_path(socket_path) if socket_path else None)
    if path is None:
        path = os.environ.get("GUEST_DRIVER_CONTROL")
    if path is None:
        raise click.UsageError("give --socket or --control (or set GUEST_DRIVER_CONTROL)")
    try:
        reply = query_control(path, {"cmd": "stat"})
    except (OSError, ValueError) as exc:
        click.echo(f"Failed to get ballooned memory: {exc}", err=True)
        sys.exit(75)  # EX_TEMPFAIL, as vmware-toolbox-cmd
    if "error" in reply:
        click.echo(f"Failed to get ballooned memory: {reply['error']}", err=True)
        sys.exit(75)
    if as_json:
        click.echo(json.dumps(reply, indent=2, sort_keys=True))
    elif show_all:
        click.echo(reply["debugfs"], nl=False)
    else:
        click.echo(format_stat_balloon(reply["driver"]))
