"""A real Linux guest with vdev as its virtio-balloon: the end-to-end proof.

An unmodified Linux kernel (trixie's 6.12, see :mod:`lab.linux_image`) boots in
QEMU >= 10.2 (TCG) with guest RAM in a shared memfd and the generic vhost-user device
standing in for the balloon::

    -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem
    -chardev socket,id=c0,path=VDEV_SOCKET
    -device vhost-user-test-device-pci,chardev=c0,virtio-id=5,num_vqs=3,config_size=8

so its in-kernel ``virtio_balloon`` driver binds to ``vdev serve --device virtio-balloon``.
Queue count and config size are taken from the personality (:func:`balloon_device_arg`).
vdev is either run in-process (:func:`serve_vdev`, the server in the caller's nursery and
controlled through its registry: what the tests use) or as a ``vdev serve`` child process
(:func:`lab.vdev_process.vdev_serve`, driven through its API: the next-VM test;
:func:`lab.vdev_process.start_vdev`, blocking: ``scripts/run-qemu --linux``).

What can be observed:

* the guest, through its console (:class:`LinuxGuest`): ``@vbg`` reports of the virtio
  devices, ``/proc/meminfo`` and the ``balloon_*`` counters of ``/proc/vmstat``
  (:class:`Report`), workloads, shell commands;
* vdev, through its registry (:class:`InProcessVdev`): balloon size, target, counters,
  guest stats in QEMU's ``guest-stats`` shape, the RAM file's allocated bytes;
* the host: QEMU's ``RssShmem`` (:func:`rss_shmem_kib`), which falls when vdev punches the
  ballooned pages out of the memfd and rises again when the guest touches deflated memory.

``python -m lab.linux_guest run [--target 64M] [--ram 256]`` boots the guest
attached to a ``vdev serve`` child process with the serial console on the terminal
(``Ctrl-A x`` quits QEMU); ``scripts/run-qemu --linux`` calls it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import click
import trio

from lab.linux_image import PREFIX, GuestConsole, LinuxImage, run_guest
from lab.procfs import rss_shmem_kib
from lab.qemu import TEST_DEVICE, QemuBinary, chardev_socket_args, require_qemu
from lab.vdev_inprocess import InProcessVdev
from lab.vdev_process import start_vdev, vdev_serve_argv
from protocol import virtio_balloon as vb
from protocol.errors import LocalError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
KIB = 1024
MIB = 1 << 20
CHARDEV_ID = "vb0"
VDEV_SOCKET_NAME = "vdev.sock"
BALLOON_DRIVER = "virtio_balloon"
BALLOON_DEVICE_ID = f"0x{vb.DEVICE_ID:04x}"
#: Periodic reports would interleave with command output; tests ask for reports instead.
QUIET_INTERVAL = 100000

T = TypeVar("T")


class GuestFailure(LocalError):
    """The guest did not do what was asked (or its console said something unexpected).

    Raised by the Linux guest rig (:class:`LinuxGuest`'s commands); caught by nothing: the
    test or the demo act that drove the guest fails with it."""


# --------------------------------------------------------------------------- QEMU side


def balloon_device_arg(
    chardev: str = CHARDEV_ID,
    *,
    num_queues: int | None = None,
    config_size: int | None = None,
    device_id: int = vb.DEVICE_ID,
) -> str:
    """The ``-device`` value for QEMU's generic vhost-user device as a virtio-balloon.

    Queue count and config size default to vdev's virtio-balloon personality: QEMU creates
    exactly ``num_vqs`` queues and a ``config_size`` config space, and sends GET_CONFIG for
    all of it, so they must match what the back-end serves.
    """
    if num_queues is None or config_size is None:
        from vdev.devices.virtio_balloon import VirtioBalloonDevice

        num_queues = VirtioBalloonDevice.num_queues if num_queues is None else num_queues
        config_size = VirtioBalloonDevice.config_size if config_size is None else config_size
    return (
        f"{TEST_DEVICE},chardev={chardev},virtio-id={device_id},"
        f"num_vqs={num_queues},config_size={config_size}"
    )


def balloon_qemu_args(
    qemu: QemuBinary,
    socket_path: Path,
    chardev: str = CHARDEV_ID,
    *,
    num_queues: int | None = None,
) -> list[str]:
    """``-chardev`` + ``-device`` for a vdev virtio-balloon listening on ``socket_path``
    (``num_queues``: the personality's, e.g. 4 with free page reporting)."""
    if not qemu.has_test_device:
        raise LocalError(f"QEMU {qemu.version_str} ({qemu.name}) has no {TEST_DEVICE} (>= 10.2)")
    return [
        *chardev_socket_args(qemu, chardev, socket_path),
        "-device",
        balloon_device_arg(chardev, num_queues=num_queues),
    ]


# --------------------------------------------------------------------------- guest reports


def _kv(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


@dataclass
class VirtioDevice:
    name: str
    vendor: str
    device: str
    driver: str
    status: int
    features: str  # sysfs: one '0'/'1' per bit, bit 0 first

    def has_feature(self, bit: int) -> bool:
        return len(self.features) > bit and self.features[bit] == "1"

    @classmethod
    def parse(cls, rest: str) -> VirtioDevice:
        name, _, tail = rest.partition(" ")
        kv = _kv(tail)
        return cls(
            name=name,
            vendor=kv.get("vendor", ""),
            device=kv.get("device", ""),
            driver=kv.get("driver", ""),
            status=int(kv.get("status") or "0", 16),
            features=kv.get("features", ""),
        )


@dataclass
class Report:
    """One ``@vbg`` report: virtio devices, meminfo (kB), vmstat balloon counters."""

    tag: str
    uptime: float
    virtio: list[VirtioDevice] = field(default_factory=list)
    meminfo: dict[str, int] = field(default_factory=dict)
    vmstat: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    @property
    def balloon(self) -> VirtioDevice | None:
        for d in self.virtio:
            if d.device == BALLOON_DEVICE_ID:
                return d
        return None

    @property
    def balloon_pages(self) -> int:
        """Pages in the guest's balloon: ``balloon_inflate - balloon_deflate`` (4 KiB on
        x86; the counters count guest pages)."""
        return self.vmstat.get("balloon_inflate", 0) - self.vmstat.get("balloon_deflate", 0)

    def kib(self, key: str) -> int:
        return self.meminfo[key]


_TICK_RE = re.compile(rf"^{PREFIX} tick (\S+) uptime=([\d.]+)")


# --------------------------------------------------------------------------- the guest


class LinuxGuest:
    """The booted guest: its console, its QEMU process, helpers for the ``@vbg`` protocol."""

    def __init__(self, console: GuestConsole, qemu: QemuBinary, stderr_path: Path) -> None:
        self.console = console
        self.qemu = qemu
        self.stderr_path = stderr_path
        self._serial = 0

    @property
    def proc(self) -> trio.Process:
        return self.console.proc

    @property
    def pid(self) -> int:
        """QEMU's PID (``chroot`` execs QEMU, so it is the same process)."""
        return self.proc.pid

    def rss_shmem_kib(self) -> int:
        return rss_shmem_kib(self.pid)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    async def expect(self, pattern: str) -> re.Match[str]:
        return await self.console.expect(pattern)

    async def wait_ready(self) -> list[str]:
        """Until init says ``ready``; the console lines so far."""
        await self.console.expect(rf"^{PREFIX} ready$")
        return list(self.console.lines)

    async def send(self, command: str) -> None:
        await self.console.send(command)

    async def report(self) -> Report:
        """A fresh report (console command ``report``)."""
        await self.send("report")
        m = await self.console.expect(rf"^{PREFIX} tick cmd uptime=([\d.]+)")
        rep = Report(tag="cmd", uptime=float(m[1]), lines=[m.string])
        while True:
            line = await self.console.readline()
            if line is None:
                raise EOFError("console closed inside a report")
            if not line.startswith(PREFIX + " "):
                continue  # kernel messages
            rep.lines.append(line)
            kind, _, rest = line[len(PREFIX) + 1 :].partition(" ")
            if kind == "virtio":
                rep.virtio.append(VirtioDevice.parse(rest))
            elif kind == "meminfo":
                rep.meminfo = {k: int(v) for k, v in _kv(rest).items()}
            elif kind == "vmstat":
                rep.vmstat = {k: int(v) for k, v in _kv(rest).items()}
                return rep

    async def workload(self, mib: int) -> int:
        """Hold ``mib`` MiB of tmpfs memory in the guest (0 frees it); MiB actually held."""
        await self.send(f"workload {mib}")
        m = await self.console.expect(rf"^{PREFIX} workload mb={mib} held=(\d+)$")
        return int(m[1])

    async def run(self, command: str) -> list[str]:
        """Run a shell command in the guest; its output lines (stdout and stderr)."""
        self._serial += 1
        end = f"__vbg_end_{self._serial}__"
        await self.send(f"run {command}; echo {end}")
        out: list[str] = []
        prefix = f"{PREFIX} out "
        while True:
            line = await self.console.readline()
            if line is None:
                raise EOFError(f"console closed while running {command!r}")
            if not line.startswith(prefix):
                continue
            text = line[len(prefix) :]
            if text == end:
                return out
            out.append(text)

    async def vmstat(self, *keys: str) -> dict[str, int]:
        """Selected ``/proc/vmstat`` counters (missing ones are absent)."""
        pattern = "|".join(re.escape(k) for k in keys)
        lines = await self.run(f"grep -E '^({pattern}) ' /proc/vmstat")
        return {k: int(v) for k, v in (ln.split() for ln in lines if len(ln.split()) == 2)}

    async def poweroff(self, timeout: float = 30) -> int:
        """``poweroff -f`` in the guest; QEMU's exit code."""
        await self.send("poweroff")
        await self.console.expect(rf"^{PREFIX} poweroff$")
        with trio.fail_after(timeout):
            return await self.proc.wait()


@contextlib.asynccontextmanager
async def boot_guest(
    qemu: QemuBinary,
    image: LinuxImage,
    vdev_socket: Path,
    *,
    ram_mib: int = 256,
    append: str = "",
    extra: Sequence[str] = (),
    stderr_path: Path | None = None,
    wait_ready: bool = True,
    cgroup_procs: Path | None = None,
    num_queues: int | None = None,
    device: str | None = None,
) -> AsyncIterator[LinuxGuest]:
    """Boot the guest with vdev (listening on ``vdev_socket``) as its balloon (``device``:
    another ``-device`` value for the vhost-user device than the virtio-balloon one).

    QEMU is stopped (by PID) on exit. With ``wait_ready`` the guest's init has said
    ``ready`` when this yields.
    """
    err = stderr_path or vdev_socket.parent / f"qemu-{time.monotonic_ns()}.err"
    async with run_guest(
        qemu,
        image,
        ram_mib=ram_mib,
        append=append,
        extra=[
            *(
                balloon_qemu_args(qemu, vdev_socket, num_queues=num_queues)
                if device is None
                else [*chardev_socket_args(qemu, CHARDEV_ID, vdev_socket), "-device", device]
            ),
            *extra,
        ],
        stderr_path=err,
        cgroup_procs=cgroup_procs,
    ) as console:
        guest = LinuxGuest(console, qemu, err)
        if wait_ready:
            try:
                await guest.wait_ready()
            except EOFError:
                raise GuestFailure(
                    f"QEMU ended before the guest was ready: {guest.stderr().strip()[-2000:]}"
                ) from None
        yield guest


# --------------------------------------------------------------------------- vdev


class VdevLike(Protocol):
    """What the waiting helpers need: :class:`InProcessVdev` or
    :class:`lab.vdev_process.ApiVdev` (``vdev serve`` through its API)."""

    async def size_pages(self) -> int: ...
    async def snapshot(self) -> Any: ...  # GuestView, or the API's GET /vms/{name} dict


async def fresh_stats(
    vdev: VdevLike, request: Callable[[], Any], *, poll: float = 0.05
) -> dict[str, int]:
    """Ask for guest stats (``request``) and wait until vdev counted a new stats buffer;
    the guest stats it holds then (QEMU's ``guest-stats`` keys)."""

    def buffers(view: Any) -> int:
        counters = view["counters"] if isinstance(view, Mapping) else view.counters
        return int(counters.get("stats buffers", 0))

    before = buffers(await vdev.snapshot())
    if inspect.isawaitable(done := request()):
        await done
    while True:
        view = await vdev.snapshot()
        if buffers(view) > before:
            stats = view["guest_stats"] if isinstance(view, Mapping) else view.guest_stats
            return dict(stats)
        await trio.sleep(poll)


def device_class(*, deflate_on_oom: bool = True) -> type[Any]:
    """vdev's virtio-balloon personality, optionally without offering DEFLATE_ON_OOM.

    Without DEFLATE_ON_OOM Linux takes ballooned pages off ``MemTotal``
    (``adjust_managed_page_count``); with it, MemTotal stays and the OOM notifier may
    deflate.
    """
    from vdev.devices.virtio_balloon import VirtioBalloonDevice

    if deflate_on_oom:
        return VirtioBalloonDevice
    return type(
        "VirtioBalloonNoDeflateOnOom",
        (VirtioBalloonDevice,),
        {"features": VirtioBalloonDevice.features & ~int(vb.Feature.DEFLATE_ON_OOM)},
    )


@contextlib.asynccontextmanager
async def serve_vdev(
    directory: Path,
    *,
    device_cls: type[Any] | None = None,
    target_pages: int = 0,
    name: str = "vm0",
) -> AsyncIterator[InProcessVdev]:
    """Run vdev in-process (:mod:`lab.vdev_inprocess`; the virtio-balloon personality, or
    ``device_cls``) on ``directory/vdev.sock``; shut down on exit."""
    from lab.vdev_inprocess import open_inprocess_vdev

    async with open_inprocess_vdev(
        [directory / VDEV_SOCKET_NAME], device=device_cls or device_class(),
        target_pages=target_pages, names=[name],
    ) as vdev:  # fmt: skip
        yield vdev


# --------------------------------------------------------------------------- waiting


async def wait_until(
    probe: Callable[[], Awaitable[T]],
    ok: Callable[[T], bool],
    *,
    poll: float = 0.3,
) -> T:
    """Call ``probe`` until ``ok(result)``; the last result. Bound it with trio.fail_after."""
    while True:
        value = await probe()
        if ok(value):
            return value
        await trio.sleep(poll)


@dataclass
class Settled:
    """The balloon once guest and vdev agree (see :func:`wait_balloon`)."""

    report: Report
    view: Any  # GuestView (in-process) or the API's dict (vdev serve)
    seconds: float


async def wait_balloon(
    guest: LinuxGuest, vdev: VdevLike, pages: int, *, poll: float = 0.3
) -> Settled:
    """Wait until vdev holds ``pages`` pages and the guest's driver counts the same."""
    t0 = time.monotonic()
    while True:
        if await vdev.size_pages() == pages:
            rep = await guest.report()
            if rep.balloon_pages == pages and await vdev.size_pages() == pages:
                return Settled(rep, await vdev.snapshot(), time.monotonic() - t0)
        await trio.sleep(poll)


async def wait_agree(guest: LinuxGuest, vdev: VdevLike, *, poll: float = 0.3) -> Settled:
    """Wait until vdev's balloon and the guest's driver count the same pages, whatever the
    number (e.g. while the guest deflates on OOM by itself)."""
    t0 = time.monotonic()
    while True:
        before = await vdev.size_pages()
        rep = await guest.report()
        if rep.balloon_pages == before == await vdev.size_pages():
            return Settled(rep, await vdev.snapshot(), time.monotonic() - t0)
        await trio.sleep(poll)


def format_guest_stats(stats: Mapping[str, int], updated: float | None = None) -> str:
    """Like QEMU's ``qom-get /machine/peripheral/balloon0 guest-stats``."""
    import json

    doc = {"last-update": int(updated or 0), "stats": dict(sorted(stats.items()))}
    return json.dumps(doc, indent=2)


# --------------------------------------------------------------------------- interactive


def interactive(
    qemu: QemuBinary,
    image: LinuxImage,
    *,
    ram_mib: int,
    target: str,
    append: str,
    vdev_log: Path | None,
    keep: bool,
    dry_run: bool = False,
    device: str = "virtio-balloon",
) -> int:
    """Boot the guest attached to a ``vdev serve`` child; console on this terminal.

    ``device`` vmw: the vmw guest (:mod:`lab.vmw_guest`), our driver started inside it."""
    from lab.linux_image import guest_argv

    scratch = qemu.scratch_dir("vbl-")
    log_path = vdev_log or scratch / "vdev.log"
    api = scratch / "vdev.api"

    def device_args(sock: Path) -> list[str]:
        if device == "virtio-balloon":
            return balloon_qemu_args(qemu, sock)
        from lab.vmw_guest import vmw_qemu_args

        return vmw_qemu_args(qemu, sock, scratch)

    if device == "vmw":
        from lab.vmw_guest import VmwGuestImage

        vmw = VmwGuestImage.load()
        if vmw is None:
            raise LocalError("the vmw guest image is not built: python -m lab.vmw_guest build")
        image = vmw.image
        append = f"{append} vb.vmw=-v".strip()
    if dry_run:
        staged = (qemu.stage(image.kernel, scratch), qemu.stage(image.initrd, scratch))
        vdev_line = vdev_serve_argv(scratch / VDEV_SOCKET_NAME, api, device=device, target=target)
        qemu_line = guest_argv(
            qemu, image, staged, ram_mib=ram_mib, append=append,
            extra=device_args(scratch / VDEV_SOCKET_NAME),
        )  # fmt: skip
        qemu_line[qemu_line.index("-serial") + 1] = "mon:stdio"
        print(shlex.join(vdev_line))
        print(shlex.join(qemu_line))
        if keep:
            print(f"# (files staged in {scratch}, kept)")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
            print(f"# (files staged in {scratch}, removed again: --keep keeps them)")
        return 0
    # SIGTERM/SIGHUP stop QEMU, then vdev, and remove the scratch directory, as Ctrl-A x does
    # (the default action would leave both running and the directory behind).
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        sock = scratch / VDEV_SOCKET_NAME
        with start_vdev(
            sock, api_socket=api, device=device, target=target, log_path=log_path
        ) as vdev:
            staged = (qemu.stage(image.kernel, scratch), qemu.stage(image.initrd, scratch))
            argv = guest_argv(
                qemu, image, staged, ram_mib=ram_mib, append=append, extra=device_args(sock)
            )
            # the console multiplexed with the monitor: Ctrl-A x quits, Ctrl-A c for (qemu)
            argv[argv.index("-serial") + 1] = "mon:stdio"
            vdev_cmd = f"{REPO_ROOT}/.venv/bin/vdev"
            print(
                f"run-qemu: vdev serve (pid {vdev.pid}) on {sock}, log {log_path}\n"
                f"run-qemu: from another terminal:\n"
                f"run-qemu:   export VDEV_API_SOCKET={api}\n"
                f"run-qemu:   {vdev_cmd} set-target vm0 64M    # the guest inflates\n"
                f"run-qemu:   {vdev_cmd} stat                  # vdev's view\n"
                f"run-qemu: QEMU {qemu.version_str} ({qemu.name}), {ram_mib} MiB, TCG; guest"
                f" console below: type 'report', 'workload MB', 'poweroff'; Ctrl-A x quits",
                file=sys.stderr,
                flush=True,
            )
            log.debug("QEMU: %s", " ".join(argv))
            return _run_qemu(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _run_qemu(argv: list[str]) -> int:
    """Run QEMU to its end; on the way out (a signal) terminate it, kill it after 5 s."""
    proc = subprocess.Popen(argv, cwd=REPO_ROOT)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_HELP = {"help_option_names": ["-h", "--help"]}


def check_size_option(value: str, param: click.Parameter) -> str:
    """A size option (``--target 256M``) kept as text, refused as a usage error when it is
    not a size (``protocol.units``)."""
    from protocol.units import parse_size

    try:
        parse_size(value, "size")
    except LocalError as exc:
        raise click.BadParameter(str(exc).removeprefix("size: "), param=param) from None
    return value


@click.group(
    name="python -m lab.linux_guest", help=(__doc__ or "").split("\n\n")[0], context_settings=_HELP
)
def main() -> None:
    pass


@main.command(name="run", help="boot the Linux guest with vdev as its balloon (interactive)")
@click.option(
    "--ram", type=click.IntRange(64, 1 << 20), default=256, help="guest RAM in MiB (default 256)"
)
@click.option(
    "--device",
    type=click.Choice(["virtio-balloon", "vmw"]),
    default="virtio-balloon",
    help="virtio-balloon: the guest's own driver; vmw: ours, inside the guest",
)
@click.option(
    "--target",
    default="0",
    callback=lambda ctx, param, value: check_size_option(value, param),
    help="initial balloon target, e.g. 64M (default 0)",
)
@click.option(
    "--interval", type=click.IntRange(1, 3600), default=2, help="guest report interval, seconds"
)
@click.option("--append", default="", help="more kernel command line")
@click.option("--vdev-log", type=click.Path(path_type=Path), default=None, help="vdev's log file")
@click.option("--keep", is_flag=True, help="keep the scratch directory")
@click.option("--dry-run", is_flag=True, help="print the vdev and QEMU lines only")
@click.option("-v", "--verbose", is_flag=True, help="log at debug level")
def run_cmd(
    ram: int,
    device: str,
    target: str,
    interval: int,
    append: str,
    vdev_log: Path | None,
    keep: bool,
    dry_run: bool,
    verbose: bool,
) -> None:
    from lab import linux_image

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(name)s: %(message)s"
    )
    qemu = require_qemu(need_test_device=True)
    image = linux_image.build()
    code = interactive(
        qemu, image, ram_mib=ram, target=target,
        append=f"vb.interval={interval} {append}".strip(), vdev_log=vdev_log, keep=keep,
        dry_run=dry_run, device=device,
    )  # fmt: skip
    raise SystemExit(code)


@main.command(name="print-device", help="print the -device argument for vdev's balloon")
def print_device_cmd() -> None:
    print(balloon_device_arg())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()


__all__ = [
    "BALLOON_DEVICE_ID",
    "InProcessVdev",
    "LinuxGuest",
    "Report",
    "balloon_device_arg",
    "balloon_qemu_args",
    "boot_guest",
    "device_class",
    "format_guest_stats",
    "fresh_stats",
    "rss_shmem_kib",
    "serve_vdev",
    "wait_agree",
    "wait_balloon",
    "wait_until",
]
