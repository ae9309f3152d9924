"""A tiny Linux guest for real-driver tests: a Debian kernel plus a busybox initramfs.

The image is made from Debian packages only (``apt-get download`` + ``dpkg-deb``): the
release's ``linux-image-*-amd64``, ``busybox-static``, and the virtio modules the kernel
does not build in (at least ``virtio_balloon``; decompressed, loaded with ``insmod`` in
dependency order). On a Debian 12 host the packages come from the cached trixie root (the
one that carries QEMU >= 10.2, see :mod:`lab.qemu`), so the guest kernel is
trixie's 6.12 on Debian 12 and 13 hosts alike; without that root the host's own apt is used.

The guest's ``/init`` (busybox sh) reports on the serial console, every line prefixed
``@vbg ``::

    @vbg boot kernel=6.12.117+deb13-amd64 interval=2 autooff=30 workload=
    @vbg module virtio_balloon loaded
    @vbg tick 1 uptime=1.52
    @vbg virtio virtio0 vendor=0x1af4 device=0x0005 driver=virtio_balloon status=0x0000000f features=...
    @vbg meminfo MemTotal=226364 MemFree=... MemAvailable=... Cached=... Shmem=...   (kB)
    @vbg vmstat balloon_inflate=0 balloon_deflate=0 balloon_migrate=0
    @vbg ready

It reports every ``vb.interval`` seconds (default 2) and reads commands from the console:
``report``, ``workload MB`` (hold MB of tmpfs-backed memory; 0 frees it), ``interval S``,
``run SHELL-COMMAND`` (output prefixed ``@vbg out``), ``poweroff``. Kernel command line:
``vb.interval=S``, ``vb.workload=MB`` (at boot), ``vb.autooff=S`` (``poweroff -f`` S seconds
after init starts).

``python -m lab.linux_image build OUTDIR`` builds (cached: nothing is done when
OUTDIR already holds a complete image); ``... boot-check OUTDIR`` boots it under QEMU's
built-in ``virtio-balloon-pci`` and checks the report.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import trio

from lab.qemu import (
    ROOT_STAMP,
    QemuBinary,
    best_qemu,
    cache_root,
    default_trixie_root,
    machine_args,
    qemu_process,
)
from protocol.errors import LocalError

log = logging.getLogger(__name__)

PREFIX = "@vbg"
IMAGE_FORMAT = 1
MANIFEST = "image.json"  # written last: the image is complete
REQUIRED_MODULES = ("virtio_balloon",)
# Loaded too when the kernel has them as modules rather than built in.
OPTIONAL_MODULES = ("virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci")  # fmt: skip
BALLOON_DEVICE_ID = "0x0005"


class ProvisionError(LocalError):
    """The image cannot be made on this machine (no apt source, download failed...).

    Raised by the image builder; caught by its own retry (stale package lists), by
    ``scripts/setup`` (reported, exit 1) and by the tests' ``linux_env`` fixture (a skip, or
    a failure under CI)."""


def default_image_dir() -> Path:
    return cache_root() / "linux-guest"


@dataclass(frozen=True)
class LinuxImage:
    """A built image: kernel + initramfs, and what went into them."""

    directory: Path
    kernel_version: str
    kernel_package: str
    source: str
    modules: tuple[str, ...]

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @classmethod
    def load(cls, directory: Path) -> LinuxImage | None:
        """The image in ``directory``, or None if there is no complete one."""
        try:
            doc = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("format") != IMAGE_FORMAT:
            return None
        image = cls(
            directory=directory,
            kernel_version=str(doc["kernel_version"]),
            kernel_package=str(doc["kernel_package"]),
            source=str(doc["source"]),
            modules=tuple(doc["modules"]),
        )
        if not (image.kernel.is_file() and image.initrd.is_file()):
            return None
        return image


# --------------------------------------------------------------------------- apt


@dataclass(frozen=True)
class AptSource:
    """Where packages come from: the host's apt, or apt inside a chroot root."""

    root: Path | None

    @property
    def label(self) -> str:
        return "host apt" if self.root is None else f"apt in {self.root}"

    def _argv(self, argv: Sequence[str], cwd: Path | None) -> list[str]:
        if self.root is None:
            return list(argv)
        qemu_side_cwd = "/" + cwd.relative_to(self.root).as_posix() if cwd else "/"
        return ["chroot", str(self.root), "sh", "-c", 'cd "$0" && exec "$@"', qemu_side_cwd, *argv]

    def run(self, argv: Sequence[str], cwd: Path | None = None, timeout: float = 600) -> str:
        full = self._argv(argv, cwd)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
        try:
            r = subprocess.run(
                full,
                cwd=cwd if self.root is None else None,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise ProvisionError(f"{self.label}: {' '.join(argv)}: {e}") from e
        if r.returncode != 0:
            raise ProvisionError(
                f"{self.label}: {' '.join(argv)} exited {r.returncode}: {r.stderr.strip()[-500:]}"
            )
        return r.stdout

    def update(self) -> None:
        log.info("%s: apt-get update", self.label)
        self.run(["apt-get", "-o", "Acquire::Retries=3", "-o", "DPkg::Lock::Timeout=600", "update"])

    def kernel_package(self) -> str:
        """The real package behind the ``linux-image-amd64`` metapackage."""
        out = self.run(["apt-cache", "depends", "--no-recommends", "linux-image-amd64"])
        for line in out.splitlines():
            m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
            if m:
                return m[1]
        raise ProvisionError(f"{self.label}: linux-image-amd64 has no linux-image dependency")

    def download(self, packages: Sequence[str], into: Path) -> dict[str, Path]:
        """``apt-get download`` into ``into`` (under the root for a chroot source)."""
        self.run(
            ["apt-get", "-o", "APT::Sandbox::User=root", "-o", "Acquire::Retries=3",
             "download", *packages],
            cwd=into,
        )  # fmt: skip
        found: dict[str, Path] = {}
        for deb in into.glob("*.deb"):
            name = deb.name.split("_", 1)[0]
            found[name] = deb
        missing = [p for p in packages if p not in found]
        if missing:
            raise ProvisionError(f"{self.label}: apt-get download did not fetch {missing}")
        return found


def choose_apt_source() -> AptSource:
    """The trixie root if it is there (so Debian 12 hosts get trixie's kernel too), else
    the host's own apt."""
    root = default_trixie_root()
    if (root / ROOT_STAMP).is_file() and os.geteuid() == 0:
        return AptSource(root)
    if shutil.which("apt-get") is None:
        raise ProvisionError("no apt-get on this machine and no trixie root: cannot fetch a kernel")
    return AptSource(None)


# --------------------------------------------------------------------------- package contents

_MODULE_RE = re.compile(r"^\.?/?(?:usr/)?lib/modules/([^/]+)/(.+)$")
_KO_RE = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")


def module_name(path: str) -> str:
    return _KO_RE.sub("", path.rsplit("/", 1)[-1]).replace("-", "_")


def decompress_module(name: str, data: bytes) -> bytes:
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        try:
            return subprocess.run(
                ["zstd", "-dc"], input=data, capture_output=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise ProvisionError(f"cannot decompress {name} (needs zstd): {e}") from e
    return data


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` entry of a module's .modinfo section."""
    m = re.search(rb"\x00depends=([^\x00]*)\x00", ko)
    if not m or not m[1]:
        return []
    return [d.decode().replace("-", "_") for d in m[1].split(b",") if d]


@dataclass
class KernelFiles:
    version: str = ""
    vmlinuz: bytes = b""
    builtin: set[str] = field(default_factory=set)
    all_modules: dict[str, str] = field(default_factory=dict)  # name -> path in package
    modules: dict[str, bytes] = field(default_factory=dict)  # name -> decompressed .ko


def _stream_deb(deb: Path) -> Iterable[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                yield member, tar
    finally:
        proc.stdout.close()
        rc = proc.wait()
    if rc != 0:
        raise ProvisionError(f"dpkg-deb --fsys-tarfile {deb} exited {rc}")


def read_kernel_package(deb: Path, wanted: set[str], kf: KernelFiles | None = None) -> KernelFiles:
    """One pass over the kernel package: vmlinuz, modules.builtin, the list of modules,
    and the bytes of the modules named in ``wanted``."""
    kf = kf or KernelFiles()
    for member, tar in _stream_deb(deb):
        name = member.name
        if not member.isfile():
            continue
        if re.match(r"^\.?/?boot/vmlinuz-", name):
            f = tar.extractfile(member)
            assert f is not None
            kf.vmlinuz = f.read()
            kf.version = name.split("vmlinuz-", 1)[1]
            continue
        m = _MODULE_RE.match(name)
        if not m:
            continue
        rel = m[2]
        if rel == "modules.builtin":
            f = tar.extractfile(member)
            assert f is not None
            kf.builtin = {module_name(line) for line in f.read().decode().split()}
        elif _KO_RE.search(rel):
            mod = module_name(rel)
            kf.all_modules[mod] = rel
            if mod in wanted and mod not in kf.modules:
                f = tar.extractfile(member)
                assert f is not None
                kf.modules[mod] = decompress_module(rel, f.read())
    if not kf.vmlinuz:
        raise ProvisionError(f"{deb.name} has no /boot/vmlinuz-*")
    return kf


def resolve_modules(
    deb: Path,
    required: Sequence[str] = REQUIRED_MODULES,
    optional: Sequence[str] = OPTIONAL_MODULES,
) -> tuple[KernelFiles, list[str]]:
    """The kernel and the modules to insmod, dependencies first."""
    wanted = set(required) | set(optional)
    kf = read_kernel_package(deb, wanted)
    for _ in range(5):  # another pass only if a dependency was not in ``wanted``
        missing_deps = {
            dep
            for ko in kf.modules.values()
            for dep in module_depends(ko)
            if dep not in kf.modules and dep in kf.all_modules
        }
        if not missing_deps:
            break
        wanted |= missing_deps
        kf = read_kernel_package(deb, wanted, kf)
    for req in required:
        if req not in kf.modules and req not in kf.builtin:
            raise ProvisionError(f"{deb.name}: {req} is neither a module nor built in")
    order: list[str] = []

    def visit(mod: str, depth: int = 0) -> None:
        if mod in order or mod not in kf.modules or depth > 50:
            return
        for dep in module_depends(kf.modules[mod]):
            visit(dep, depth + 1)
        order.append(mod)

    for mod in (*optional, *required):
        visit(mod)
    return kf, order


def read_busybox(deb: Path) -> bytes:
    for member, tar in _stream_deb(deb):
        if member.isfile() and re.search(r"(^|/)bin/busybox$", member.name):
            f = tar.extractfile(member)
            assert f is not None
            return f.read()
    raise ProvisionError(f"{deb.name} has no bin/busybox")


# --------------------------------------------------------------------------- initramfs

INIT_SCRIPT = r"""#!/bin/busybox sh
# vballoon test guest init. Every line it prints starts with "@PREFIX@ ".
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o size=95% tmpfs /tmp
mkdir -p /run && mount -t tmpfs tmpfs /run

say() { echo "@PREFIX@ $*"; }

interval=2 autooff= workload=
for arg in $(cat /proc/cmdline); do
    case $arg in
        vb.interval=*) interval=${arg#*=} ;;
        vb.autooff=*) autooff=${arg#*=} ;;
        vb.workload=*) workload=${arg#*=} ;;
    esac
done
echo "$interval" >/run/interval
say "boot kernel=$(uname -r) interval=$interval autooff=$autooff workload=$workload"

for m in @MODULES@; do
    if insmod "/lib/modules/$m.ko"; then say "module $m loaded"; else say "module $m FAILED"; fi
done

report() { # report TAG
    say "tick $1 uptime=$(cut -d' ' -f1 /proc/uptime)"
    for d in /sys/bus/virtio/devices/*; do
        [ -e "$d/device" ] || continue
        drv=none
        [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
        say "virtio $(basename "$d") vendor=$(cat "$d/vendor") device=$(cat "$d/device")" \
            "driver=$drv status=$(cat "$d/status" 2>/dev/null) features=$(cat "$d/features")"
    done
    say "meminfo $(awk '/^(MemTotal|MemFree|MemAvailable|Cached|Shmem):/ {sub(":", "", $1); printf "%s%s=%s", sep, $1, $2; sep=" "}' /proc/meminfo)"
    say "vmstat $(awk '/^balloon_/ {printf "%s%s=%s", sep, $1, $2; sep=" "}' /proc/vmstat)"
}

workload() { # workload MB: hold MB of tmpfs-backed (unreclaimable without swap) memory
    rm -f /tmp/workload
    mb=$1
    case $mb in '' | *[!0-9]*) say "error workload wants a number of MiB, got '$mb'"; return ;; esac
    if [ "$mb" -gt 0 ]; then
        dd if=/dev/zero of=/tmp/workload bs=1M count="$mb" 2>/dev/null
    fi
    say "workload mb=$mb held=$(($(stat -c %s /tmp/workload 2>/dev/null || echo 0) / 1048576))"
}

if [ -n "$autooff" ]; then
    (sleep "$autooff"; say "autooff after ${autooff}s"; sync; poweroff -f) &
fi
[ -n "$workload" ] && workload "$workload"

report 0
(n=1; while :; do sleep "$(cat /run/interval)"; report $n; n=$((n + 1)); done) &

stty -echo 2>/dev/null
say "ready"
while read -r cmd arg; do
    case $cmd in
        '') ;;
        report) report cmd ;;
        workload) workload "$arg" ;;
        interval) echo "$arg" >/run/interval; say "interval $arg" ;;
        run) (eval "$arg") 2>&1 | while IFS= read -r line; do say "out $line"; done ;;
        poweroff) say "poweroff"; sync; poweroff -f ;;
        *) say "error unknown command '$cmd'" ;;
    esac
done
say "console closed"
while :; do sleep 3600; done
"""


def init_script(modules: Sequence[str]) -> str:
    return INIT_SCRIPT.replace("@PREFIX@", PREFIX).replace("@MODULES@", " ".join(modules))


class Cpio:
    """A gzip'd newc cpio archive (what the kernel unpacks as initramfs), in memory."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + name.encode() + b"\0")
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return gzip.compress(self._out.getvalue(), compresslevel=6, mtime=0)


def build_initramfs(busybox: bytes, modules: Sequence[tuple[str, bytes]]) -> bytes:
    c = Cpio()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "run", "sys", "tmp"):
        c.dir(d, 0o1777 if d == "tmp" else 0o755)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", busybox, 0o755)
    c.symlink("bin/sh", "busybox")
    for name, ko in modules:
        c.file(f"lib/modules/{name}.ko", ko)
    c.file("init", init_script([n for n, _ in modules]).encode(), 0o755)
    return c.finish()


# --------------------------------------------------------------------------- build


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build(
    outdir: Path | None = None, *, force: bool = False, apt: AptSource | None = None
) -> LinuxImage:
    """Build the image into ``outdir`` unless a complete one is already there."""
    outdir = Path(os.path.abspath(outdir or default_image_dir()))
    image = None if force else LinuxImage.load(outdir)
    if image is not None:
        return image
    with _locked(outdir):
        image = None if force else LinuxImage.load(outdir)
        if image is not None:
            return image
        return _build(outdir, apt or choose_apt_source())


def _build(outdir: Path, apt: AptSource) -> LinuxImage:
    t0 = time.monotonic()
    (outdir / MANIFEST).unlink(missing_ok=True)
    try:
        kernel_pkg = apt.kernel_package()
    except ProvisionError:
        apt.update()
        kernel_pkg = apt.kernel_package()
    dl_base = (apt.root / "var" / "tmp") if apt.root is not None else None
    dl = Path(tempfile.mkdtemp(prefix="vballoon-debs-", dir=dl_base))
    try:
        try:
            debs = apt.download([kernel_pkg, "busybox-static"], dl)
        except ProvisionError:  # stale package lists (404): refresh once
            apt.update()
            debs = apt.download([kernel_pkg, "busybox-static"], dl)
        log.info("downloaded %s and busybox-static via %s", kernel_pkg, apt.label)
        kf, order = resolve_modules(debs[kernel_pkg])
        busybox = read_busybox(debs["busybox-static"])
    finally:
        shutil.rmtree(dl, ignore_errors=True)
    initrd = build_initramfs(busybox, [(m, kf.modules[m]) for m in order])
    for name, data in (("vmlinuz", kf.vmlinuz), ("initrd.img", initrd)):
        tmp = outdir / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(outdir / name)
    (outdir / "init").write_text(init_script(order))  # for reading, not used at boot
    manifest = {
        "format": IMAGE_FORMAT,
        "kernel_version": kf.version,
        "kernel_package": kernel_pkg,
        "source": apt.label,
        "modules": order,
        "builtin_virtio": sorted(m for m in kf.builtin if m.startswith("virtio")),
        "initrd_bytes": len(initrd),
        "kernel_bytes": len(kf.vmlinuz),
        "build_seconds": round(time.monotonic() - t0, 1),
    }
    (outdir / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=2) + "\n")
    (outdir / (MANIFEST + ".tmp")).replace(outdir / MANIFEST)
    image = LinuxImage.load(outdir)
    assert image is not None
    return image


# --------------------------------------------------------------------------- booting


def guest_argv(
    qemu: QemuBinary,
    image: LinuxImage,
    staged: tuple[Path, Path],
    *,
    ram_mib: int = 256,
    accel: str = "tcg",
    append: str = "",
    extra: Sequence[str] = (),
) -> list[str]:
    """QEMU command line for the guest: q35, shared memfd RAM (ready for vhost-user
    devices in ``extra``), serial console on stdio, no reboot (a panic ends QEMU)."""
    kernel, initrd = staged
    return qemu.command(
        *machine_args(ram_mib=ram_mib, accel=accel),
        "-serial", "stdio",
        "-kernel", qemu.host_path(kernel),
        "-initrd", qemu.host_path(initrd),
        "-append", f"console=ttyS0 quiet panic=-1 {append}".strip(),
        "-no-reboot",
        *extra,
    )  # fmt: skip


class GuestConsole:
    """The guest's serial console: lines out (``@vbg`` reports), commands in."""

    def __init__(self, proc: trio.Process) -> None:
        assert proc.stdout is not None and proc.stdin is not None
        self.proc = proc
        self._stdout = proc.stdout
        self._stdin = proc.stdin
        self._buf = b""
        self.lines: list[str] = []  # everything read so far

    async def readline(self) -> str | None:
        """The next console line (without CR/LF), or None when QEMU closed the console."""
        while b"\n" not in self._buf:
            data = await self._stdout.receive_some(65536)
            if not data:
                if self._buf:
                    line, self._buf = self._buf, b""
                    return self._record(line)
                return None
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return self._record(line)

    def _record(self, raw: bytes) -> str:
        line = raw.decode(errors="replace").rstrip("\r")
        self.lines.append(line)
        log.debug("guest: %s", line)
        return line

    async def expect(self, pattern: str) -> re.Match[str]:
        """Read lines until one matches ``pattern`` (a regex searched in the line)."""
        rx = re.compile(pattern)
        while True:
            line = await self.readline()
            if line is None:
                raise EOFError(f"console closed while waiting for {pattern!r}")
            m = rx.search(line)
            if m:
                return m

    async def send(self, command: str) -> None:
        await self._stdin.send_all(command.encode() + b"\n")


@contextlib.asynccontextmanager
async def run_guest(
    qemu: QemuBinary,
    image: LinuxImage,
    *,
    ram_mib: int = 256,
    append: str = "",
    extra: Sequence[str] = (),
    stderr_path: Path | None = None,
    cgroup_procs: Path | None = None,
) -> AsyncIterator[GuestConsole]:
    """Boot the guest; yields its console. QEMU is stopped (by PID) on exit.

    ``cgroup_procs``: a ``cgroup.procs`` file QEMU joins before it starts (a shell writes its
    own PID there and execs QEMU), so every page QEMU touches is charged to that cgroup."""
    scratch = qemu.scratch_dir("vbg-")
    try:
        staged = (qemu.stage(image.kernel, scratch), qemu.stage(image.initrd, scratch))
        argv = guest_argv(qemu, image, staged, ram_mib=ram_mib, append=append, extra=extra)
        if cgroup_procs is not None:
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup_procs), *argv]
        err_path = stderr_path or scratch / "qemu.err"
        with open(err_path, "wb") as err:
            async with qemu_process(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err.fileno()
            ) as proc:
                yield GuestConsole(proc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class BootResult:
    ok: bool
    seconds_to_ready: float | None
    seconds_total: float
    balloon_line: str | None
    returncode: int | None
    lines: list[str]


async def boot_check(
    qemu: QemuBinary, image: LinuxImage, *, autooff: int = 3, timeout: float = 90
) -> BootResult:
    """Boot under QEMU's built-in virtio-balloon-pci; the guest must report the balloon
    (device 0x0005, bound to virtio_balloon) and then power itself off (vb.autooff)."""
    t0 = time.monotonic()
    ready: float | None = None
    balloon: str | None = None
    rc: int | None = None
    lines: list[str] = []
    with trio.move_on_after(timeout):
        async with run_guest(
            qemu, image, append=f"vb.autooff={autooff}", extra=["-device", "virtio-balloon-pci"]
        ) as con:
            lines = con.lines
            while (line := await con.readline()) is not None:
                if f"device={BALLOON_DEVICE_ID}" in line and "driver=virtio_balloon" in line:
                    balloon = balloon or line
                if line == f"{PREFIX} ready":
                    ready = time.monotonic() - t0
            rc = await con.proc.wait()
    ok = balloon is not None and ready is not None and rc == 0
    return BootResult(ok, ready, time.monotonic() - t0, balloon, rc, lines)


# --------------------------------------------------------------------------- CLI


def _built(outdir: Path | None, force: bool) -> LinuxImage:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t0 = time.monotonic()
    try:
        image = build(outdir, force=force)
    except ProvisionError as e:
        print(f"linux_image: cannot build the image: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(
        f"linux_image: {image.directory}: kernel {image.kernel_version} ({image.source}),"
        f" modules {' '.join(image.modules) or '-'} [{time.monotonic() - t0:.1f}s]"
    )
    return image


_OUTDIR = click.argument("outdir", type=click.Path(path_type=Path), required=False)


_HELP = {"help_option_names": ["-h", "--help"]}


@click.group(name="python -m lab.linux_image", context_settings=_HELP)
def main() -> None:
    """The Linux guest image: build it (cached), or boot-check it."""


@main.command(name="build", help="build the image (cached)")
@_OUTDIR
@click.option("--force", is_flag=True, help="rebuild even if present")
def build_cmd(outdir: Path | None, force: bool) -> None:
    _built(outdir, force)


@main.command(name="boot-check", help="boot it with QEMU's built-in virtio-balloon-pci")
@_OUTDIR
@click.option("--any-qemu", is_flag=True, help="do not insist on QEMU >= 10.2")
def boot_check_cmd(outdir: Path | None, any_qemu: bool) -> None:
    image = _built(outdir, False)
    qemu = best_qemu(need_test_device=not any_qemu)
    if qemu is None:
        print("linux_image: no suitable QEMU (run scripts/setup)", file=sys.stderr)
        raise SystemExit(1)
    result = trio.run(boot_check, qemu, image)
    for line in result.lines:
        print(f"  | {line}")
    print(
        f"linux_image: boot-check with QEMU {qemu.version_str} ({qemu.name}):"
        f" {'OK' if result.ok else 'FAILED'}; ready after {result.seconds_to_ready or 0:.1f}s,"
        f" QEMU exited {result.returncode} after {result.seconds_total:.1f}s"
    )
    raise SystemExit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
