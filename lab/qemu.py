"""Finding and starting QEMU for vballoon's tests and tools.

``scripts/setup`` provides up to two QEMUs and records them in ``.cache/qemu.json``:

* the host's ``qemu-system-x86_64`` (>= 10, Debian backports), and
* on Debian 12 hosts, QEMU >= 10.2 from trixie-backports inside a cached Debian 13 root
  (``/var/cache/vballoon/qemu-trixie``), run as ``chroot ROOT qemu-system-x86_64``. Only
  QEMU >= 10.2 has ``vhost-user-test-device-pci`` (the generic vhost-user device, which lets
  a real Linux guest bind its virtio_balloon driver to our back-end).

A chroot QEMU sees the file system from ROOT down, so every path handed to it (sockets,
kernel, BIOS, logs) must live under ROOT and be spelled relative to it:
:meth:`QemuBinary.host_path` does that translation, :meth:`QemuBinary.scratch_dir` makes
a directory both sides can see, and :meth:`QemuBinary.stage` makes a file visible.

``python -m lab.qemu discover [--root DIR] [--out FILE]`` probes and writes the
JSON file (scripts/setup calls it); ``python -m lab.qemu list`` prints it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import trio

from protocol.errors import ConfigError, LocalError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
QEMU_JSON = REPO_ROOT / ".cache" / "qemu.json"
JSON_FORMAT = 1
QEMU_BINARY = "qemu-system-x86_64"
TEST_DEVICE = "vhost-user-test-device-pci"
ROOT_STAMP = ".vballoon-complete"  # written last by scripts/setup into a complete root
HLT_BIOS_SIZE = 64 * 1024
HLT = 0xF4


def cache_root() -> Path:
    """The machine-wide cache (``$VBALLOON_CACHE``, default ``/var/cache/vballoon``)."""
    return Path(os.environ.get("VBALLOON_CACHE", "/var/cache/vballoon"))


def default_trixie_root() -> Path:
    return cache_root() / "qemu-trixie"


class QemuNotFoundError(LocalError):
    """No usable QEMU on this machine (run scripts/setup).

    Raised by :func:`require_qemu`; caught by the QEMU tests (a skip, or a failure under
    CI)."""


@dataclass(frozen=True)
class QemuBinary:
    """One runnable QEMU: how to start it and what it offers."""

    name: str
    argv: tuple[str, ...]  # command prefix, e.g. ("chroot", ROOT, "qemu-system-x86_64")
    version: tuple[int, int, int]
    has_test_device: bool
    root: Path | None = None  # the chroot QEMU runs in, or None for the host's
    accels: tuple[str, ...] = ()
    description: str = ""  # first line of --version

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))

    def host_path(self, path: str | os.PathLike[str]) -> str:
        """``path`` (a host path) as the QEMU process sees it.

        Unchanged for a host QEMU. For a chroot QEMU the path must lie under :attr:`root`
        and is returned relative to it (``ROOT/tmp/x.sock`` -> ``/tmp/x.sock``).
        """
        p = Path(os.path.abspath(path))
        if self.root is None:
            return str(p)
        root = Path(os.path.abspath(self.root))
        try:
            rel = p.relative_to(root)
        except ValueError:
            raise ConfigError(
                f"{p} is not visible to {self.name} (chroot {root}); put it under the root"
            ) from None
        return "/" + rel.as_posix() if rel.parts else "/"

    def local_path(self, qemu_path: str) -> Path:
        """The inverse of :meth:`host_path`: a QEMU-side path as a host path."""
        if self.root is None:
            return Path(qemu_path)
        return self.root / qemu_path.lstrip("/")

    def scratch_dir(self, prefix: str = "vballoon-") -> Path:
        """A new private temporary directory visible to both us and this QEMU.

        The caller removes it (``shutil.rmtree``). Keep the path short: unix socket paths
        are limited to 107 bytes.
        """
        base = None if self.root is None else self.root / "tmp"
        if base is not None:
            base.mkdir(mode=0o1777, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=base))

    def stage(self, path: Path, into: Path) -> Path:
        """Make file ``path`` visible to this QEMU; ``into`` is a :meth:`scratch_dir`.

        Returns ``path`` itself when QEMU already sees it, else a hard link (or copy)
        inside ``into``.
        """
        if self.root is None:
            return path
        with contextlib.suppress(ConfigError):
            self.host_path(path)
            return path
        dest = into / path.name
        try:
            os.link(path, dest)
        except OSError:
            shutil.copyfile(path, dest)
        return dest

    def command(self, *args: str) -> list[str]:
        return [*self.argv, *args]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "argv": list(self.argv),
            "version": self.version_str,
            "description": self.description,
            "has_test_device": self.has_test_device,
            "accels": list(self.accels),
            "root": None if self.root is None else str(self.root),
            # how to spell a host path for this QEMU: strip host_prefix, prepend qemu_prefix
            "path_translation": (
                None if self.root is None else {"host_prefix": str(self.root), "qemu_prefix": "/"}
            ),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> QemuBinary:
        try:
            version = parse_version(str(d["version"]))
            return cls(
                name=str(d["name"]),
                argv=tuple(str(a) for a in d["argv"]),
                version=version,
                has_test_device=bool(d["has_test_device"]),
                root=None if d.get("root") is None else Path(d["root"]),
                accels=tuple(str(a) for a in d.get("accels", ())),
                description=str(d.get("description", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"bad QEMU entry in qemu.json: {d!r}: {e}") from e

    def usable(self) -> bool:
        """Cheap check that the recorded binary is still there."""
        if self.root is not None:
            return (self.root / ROOT_STAMP).is_file() and os.geteuid() == 0
        exe = self.argv[0]
        return Path(exe).is_file() if os.sep in exe else shutil.which(exe) is not None


# --------------------------------------------------------------------------- discovery

_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int]:
    """``"QEMU emulator version 10.0.2 (Debian ...)"`` or ``"10.0.2"`` -> ``(10, 0, 2)``."""
    m = _VERSION_RE.search(text) or re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not m:
        raise ValueError(f"no QEMU version in {text[:80]!r}")
    return int(m[1]), int(m[2]), int(m[3] or 0)


def _run(argv: Sequence[str], timeout: float = 30.0) -> str:
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if r.returncode != 0:
        raise OSError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()[:300]}")
    return r.stdout


def probe(name: str, argv: Sequence[str], root: Path | None = None) -> QemuBinary:
    """Ask one QEMU for its version, accelerators and whether it has the test device."""
    first = _run([*argv, "--version"]).splitlines()[0]
    devices = _run([*argv, "-device", "help"])
    accel_out = _run([*argv, "-accel", "help"])
    accels = tuple(
        line.strip()
        for line in accel_out.splitlines()[1:]
        if line.strip() and " " not in line.strip()
    )
    return QemuBinary(
        name=name,
        argv=tuple(argv),
        version=parse_version(first),
        has_test_device=f'name "{TEST_DEVICE}"' in devices,
        root=root,
        accels=accels,
        description=first.strip(),
    )


def discover(roots: Iterable[Path] = ()) -> list[QemuBinary]:
    """Probe the host QEMU and the QEMUs inside the given (complete) chroot roots."""
    found: list[QemuBinary] = []
    exe = shutil.which(QEMU_BINARY)
    if exe is not None:
        try:
            found.append(probe("host", [exe]))
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            log.warning("host %s does not run: %s", exe, e)
    for root in roots:
        root = Path(os.path.abspath(root))
        if not (root / ROOT_STAMP).is_file():
            log.info("%s is not a complete root (no %s)", root, ROOT_STAMP)
            continue
        if os.geteuid() != 0:
            log.warning("skipping chroot QEMU in %s: chroot needs root", root)
            continue
        try:
            found.append(probe(f"chroot:{root.name}", ["chroot", str(root), QEMU_BINARY], root))
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            log.warning("QEMU in %s does not run: %s", root, e)
    return found


def write_json(qemus: Sequence[QemuBinary], path: Path = QEMU_JSON) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": JSON_FORMAT, "qemus": [q.to_json() for q in qemus]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def load_json(path: Path = QEMU_JSON) -> list[QemuBinary]:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
        raise ConfigError(f"{path}: unknown format (want format {JSON_FORMAT})")
    return [QemuBinary.from_json(d) for d in doc.get("qemus", [])]


def find_qemus(path: Path = QEMU_JSON) -> list[QemuBinary]:
    """The QEMUs on this machine: from ``.cache/qemu.json`` if present, else probed now.

    Entries whose binary or root has since disappeared are dropped.
    """
    if path.is_file():
        return [q for q in load_json(path) if q.usable()]
    return discover([default_trixie_root()])


def best_qemu(
    need_test_device: bool, qemus: Sequence[QemuBinary] | None = None
) -> QemuBinary | None:
    """The QEMU to use: one with ``vhost-user-test-device-pci`` if asked for, preferring
    the host's (no path translation) and then the newest. ``None`` if there is none."""
    candidates = [
        q
        for q in (find_qemus() if qemus is None else qemus)
        if q.has_test_device or not need_test_device
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda q: (q.root is None, q.version))


def require_qemu(need_test_device: bool = False) -> QemuBinary:
    q = best_qemu(need_test_device)
    if q is None:
        what = f"QEMU with {TEST_DEVICE} (>= 10.2)" if need_test_device else "QEMU"
        raise QemuNotFoundError(f"no {what} found; run scripts/setup")
    return q


# --------------------------------------------------------------------------- files and argv


def hlt_bios() -> bytes:
    """64 KiB of HLT: the vCPU halts at the reset vector, so only qtest touches devices."""
    return bytes([HLT]) * HLT_BIOS_SIZE


def write_hlt_bios(path: Path) -> Path:
    path.write_bytes(hlt_bios())
    return path


def opt_escape(value: str) -> str:
    """Escape a value for a QEMU ``key=value,...`` option (commas are doubled)."""
    return value.replace(",", ",,")


def machine_args(
    *, ram_mib: int = 128, accel: str = "tcg", machine: str = "q35", memdev: str = "mem"
) -> list[str]:
    """q35, TCG, guest RAM as a shared memfd (what a vhost-user back-end needs), no
    default devices, no display."""
    return [
        "-M", machine,
        "-accel", accel,
        "-m", f"{ram_mib}M",
        "-object", f"memory-backend-memfd,id={memdev},size={ram_mib}M,share=on",
        "-numa", f"node,memdev={memdev}",
        "-nodefaults", "-no-user-config",
        "-display", "none",
    ]  # fmt: skip


def chardev_socket_args(
    qemu: QemuBinary, chardev_id: str, path: Path, *, server: bool = False
) -> list[str]:
    """A unix-socket chardev. Client mode (default) needs the socket listening already."""
    spec = f"socket,id={chardev_id},path={opt_escape(qemu.host_path(path))}"
    if server:
        spec += ",server=on,wait=on"
    return ["-chardev", spec]


def qtest_args(qemu: QemuBinary, socket: Path, log_file: Path | None = None) -> list[str]:
    """qtest over a unix socket QEMU connects to (listen first). The qtest log goes to
    stderr unless redirected, so it always gets a file (``/dev/null`` by default)."""
    log_path = "/dev/null" if log_file is None else qemu.host_path(log_file)
    return ["-qtest", f"unix:{qemu.host_path(socket)}", "-qtest-log", log_path]


def qmp_args(qemu: QemuBinary, socket: Path) -> list[str]:
    """QMP on a unix socket QEMU listens on (connect with :meth:`Qmp.connect`)."""
    return ["-qmp", f"unix:{opt_escape(qemu.host_path(socket))},server=on,wait=off"]


def build_argv(
    qemu: QemuBinary,
    *,
    ram_mib: int = 128,
    accel: str = "tcg",
    machine: str = "q35",
    bios: Path | None = None,
    qtest_socket: Path | None = None,
    qtest_log: Path | None = None,
    qmp_socket: Path | None = None,
    chardevs: Mapping[str, Path] | None = None,
    devices: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> list[str]:
    """The whole command line for a test VM. Paths are host paths; they are translated
    for a chroot QEMU (and must then lie under its root)."""
    argv = qemu.command(*machine_args(ram_mib=ram_mib, accel=accel, machine=machine))
    if bios is not None:
        argv += ["-bios", qemu.host_path(bios)]
    if qtest_socket is not None:
        argv += qtest_args(qemu, qtest_socket, qtest_log)
    if qmp_socket is not None:
        argv += qmp_args(qemu, qmp_socket)
    for chardev_id, path in (chardevs or {}).items():
        argv += chardev_socket_args(qemu, chardev_id, path)
    for device in devices:
        argv += ["-device", device]
    argv += list(extra)
    return argv


# --------------------------------------------------------------------------- processes


@contextlib.asynccontextmanager
async def qemu_process(
    argv: Sequence[str],
    *,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = None,
    stop_timeout: float = 5.0,
) -> AsyncIterator[trio.Process]:
    """Start QEMU; on exit stop that process (SIGTERM, then SIGKILL) and reap it."""
    log.debug("starting %s", " ".join(argv))
    proc = await trio.lowlevel.open_process(list(argv), stdin=stdin, stdout=stdout, stderr=stderr)
    try:
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(stop_timeout):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            for s in (proc.stdin, proc.stdout, proc.stderr):
                if s is not None:
                    await s.aclose()


# --------------------------------------------------------------------------- QMP


class QmpError(LocalError):
    """A QMP command failed, or QMP spoke nonsense.

    Raised by :class:`Qmp`; caught by nothing in the lab: the rig or test using QMP fails."""


@dataclass
class Qmp:
    """A minimal QMP client (trio): greeting, ``qmp_capabilities``, ``execute``."""

    stream: trio.SocketStream
    events: list[dict[str, Any]] = field(default_factory=list)
    _buf: bytearray = field(default_factory=bytearray)
    _next_id: int = 0

    @classmethod
    async def connect(cls, path: Path, *, wait: float = 10.0) -> Qmp:
        """Connect to QEMU's QMP socket (a host path), waiting for QEMU to create it."""
        with trio.fail_after(wait):
            while True:
                try:
                    stream = await trio.open_unix_socket(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await trio.sleep(0.02)
        qmp = cls(stream)
        greeting = await qmp._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting!r}")
        await qmp.execute("qmp_capabilities")
        return qmp

    async def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise QmpError("QMP connection closed")
            self._buf += data
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise QmpError(f"QMP sent {msg!r}")
        return msg

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        self._next_id += 1
        req: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            req["arguments"] = dict(arguments)
        await self.stream.send_all(json.dumps(req).encode() + b"\n")
        while True:
            msg = await self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != self._next_id:
                raise QmpError(f"unexpected QMP reply {msg!r}")
            if "error" in msg:
                raise QmpError(f"{command}: {msg['error'].get('desc', msg['error'])}")
            return msg.get("return")

    async def aclose(self) -> None:
        await self.stream.aclose()


# --------------------------------------------------------------------------- CLI


_HELP = {"help_option_names": ["-h", "--help"]}


@click.group(name="python -m lab.qemu", help=(__doc__ or "").split("\n")[0], context_settings=_HELP)
def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")


@main.command(name="discover", help="probe the QEMUs and write qemu.json")
@click.option(
    "--root", "roots", type=click.Path(path_type=Path), multiple=True,
    help="a chroot root with QEMU",
)  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), default=QEMU_JSON, show_default=True)
def discover_cmd(roots: tuple[Path, ...], out: Path) -> None:
    qemus = discover(list(roots))
    write_json(qemus, out)
    for q in qemus:
        print(
            f"setup: QEMU {q.version_str} {' '.join(q.argv)}"
            f" ({TEST_DEVICE}: {'yes' if q.has_test_device else 'no'})"
        )
    print(f"setup: wrote {out}")
    raise SystemExit(0 if qemus else 1)


@main.command(name="list", help="print the QEMUs found")
def list_cmd() -> None:
    for q in find_qemus():
        print(json.dumps(q.to_json()))


if __name__ == "__main__":
    main()
