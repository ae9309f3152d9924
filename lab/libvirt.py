"""Debian 13's libvirt, in the root scripts/setup builds for it, running guests whose balloon
is vdev.

``scripts/setup`` builds ``$VBALLOON_CACHE/libvirt-trixie``: a copy of the QEMU root (QEMU
11.1 from trixie-backports) plus ``libvirtd``, ``virsh`` and ``virt-xml-validate``, with the
``qemu.conf`` settings a daemon without systemd needs on these hosts (``stdio_handler =
"file"``, ``namespaces = [ ]``, QEMU as root). :class:`LibvirtRoot` runs it:

* :meth:`LibvirtRoot.session` takes the root's lock (one user at a time: it has one ``/run``),
  mounts ``/proc``, ``/sys``, ``/dev`` (rbind, rslave) and a tmpfs on ``/run``, starts
  ``chroot ROOT libvirtd`` and waits for its socket; on the way out it destroys what it
  started, stops the daemon and unmounts everything (lazily if something still holds it);
* :meth:`LibvirtRoot.virsh` runs ``virsh -c qemu:///system`` inside the root;
  :meth:`LibvirtRoot.validate` runs ``virt-xml-validate``.

:func:`lab_domain_xml` derives, from the operator's template
``contrib/libvirt/vballoon-domain.xml``, a domain that boots lab's Linux guest image (direct
kernel boot, serial console to a file) with vdev as its balloon: the same memory backing,
``memballoon``, chardev and device arguments the template gives operators.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.qemu import ROOT_STAMP, cache_root
from protocol.errors import LocalError

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_ROOT / "contrib" / "libvirt" / "vballoon-domain.xml"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
URI = "qemu:///system"
#: The chardev id the template uses for vdev's socket.
CHARDEV = "vballoon0"
DAEMON_TIMEOUT = 60.0
LOCK_TIMEOUT = 600.0


class LibvirtError(LocalError):
    """libvirt (its root, daemon or virsh) did not do what was asked.

    Raised by :class:`LibvirtRoot` and :class:`LibvirtSession` (daemon, mounts, ``virsh``);
    caught by the libvirt test (which reports it with the daemon's log) and by nothing else:
    it ends the run."""


def default_libvirt_root() -> Path:
    return cache_root() / "libvirt-trixie"


@dataclass(frozen=True)
class VirshResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class LibvirtRoot:
    """The libvirt root (see the module docstring)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or default_libvirt_root())

    def present(self) -> bool:
        return (self.root / ROOT_STAMP).is_file()

    def path(self, inside: str) -> Path:
        """A path inside the root (``/tmp/x`` -> ``ROOT/tmp/x``)."""
        return self.root / inside.lstrip("/")

    def inside(self, path: Path) -> str:
        """A host path under the root, as processes in the root see it."""
        return "/" + Path(os.path.abspath(path)).relative_to(self.root).as_posix()

    def chroot(self, *argv: str, timeout: float = 120, check: bool = False) -> VirshResult:
        done = subprocess.run(
            ["chroot", str(self.root), *argv],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        result = VirshResult(done.returncode, done.stdout, done.stderr)
        if check and not result.ok:
            raise LibvirtError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return result

    def virsh(self, *args: str, timeout: float = 120, check: bool = True) -> VirshResult:
        return self.chroot("virsh", "-c", URI, *args, timeout=timeout, check=check)

    def validate(self, xml: Path) -> VirshResult:
        """``virt-xml-validate FILE domain`` (``xml`` is a host path under the root)."""
        return self.chroot("virt-xml-validate", self.inside(xml), "domain")

    def version(self) -> str:
        return self.chroot("libvirtd", "--version", check=True).stdout.strip()

    # -- mounts and the daemon ----------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / ".vballoon-lock", "w") as f:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LibvirtError(
                            f"{self.root} stayed in use for {LOCK_TIMEOUT}s"
                        ) from None
                    time.sleep(0.5)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _mounted(self) -> list[str]:
        prefix = str(self.root) + "/"
        with open("/proc/self/mounts") as f:
            targets = [line.split()[1].replace("\\040", " ") for line in f]
        return [t for t in targets if t.startswith(prefix)]

    def _unmount_all(self) -> None:
        for target in sorted(self._mounted(), key=len, reverse=True):
            if subprocess.run(["umount", target], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", target], capture_output=True)

    @contextlib.contextmanager
    def _mounts(self) -> Iterator[None]:
        self._unmount_all()  # left by an interrupted run (we hold the lock)
        steps: Sequence[Sequence[str]] = (
            ("mount", "-t", "proc", "proc", str(self.path("/proc"))),
            ("mount", "-t", "sysfs", "sysfs", str(self.path("/sys"))),
            ("mount", "--rbind", "/dev", str(self.path("/dev"))),
            ("mount", "--make-rslave", str(self.path("/dev"))),
            ("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", str(self.path("/run"))),
        )
        try:
            for argv in steps:
                done = subprocess.run(argv, capture_output=True, text=True)
                if done.returncode != 0:
                    raise LibvirtError(f"{' '.join(argv)}: {done.stderr.strip()}")
            yield
        finally:
            self._unmount_all()
            if self._mounted():
                raise LibvirtError(f"still mounted under {self.root}: {self._mounted()}")

    @contextlib.contextmanager
    def session(self, log_path: Path) -> Iterator[LibvirtSession]:
        """Mounts, ``libvirtd`` running (its output in ``log_path``); everything undone on
        exit. Yields a :class:`LibvirtSession`."""
        if not self.present():
            raise LibvirtError(f"no libvirt root at {self.root} (scripts/setup builds it)")
        with self._lock(), self._mounts():
            sock = self.path("/run/libvirt/libvirt-sock")
            with open(log_path, "ab") as log:
                daemon = subprocess.Popen(
                    ["chroot", str(self.root), "/usr/sbin/libvirtd"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                )  # fmt: skip
            session = LibvirtSession(self, daemon, log_path)
            try:
                deadline = time.monotonic() + DAEMON_TIMEOUT
                while not sock.is_socket():
                    if daemon.poll() is not None:
                        raise LibvirtError(
                            f"libvirtd exited {daemon.returncode}: {session.log()[-2000:]}"
                        )
                    if time.monotonic() > deadline:
                        raise LibvirtError(f"libvirtd: no {sock} after {DAEMON_TIMEOUT}s")
                    time.sleep(0.05)
                yield session
            finally:
                session.close()


class LibvirtSession:
    """A running ``libvirtd`` in a mounted root; domains defined through it are destroyed
    and undefined when it closes."""

    def __init__(self, root: LibvirtRoot, daemon: subprocess.Popen[bytes], log: Path) -> None:
        self.root = root
        self.daemon = daemon
        self.log_path = log
        self.domains: list[str] = []

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def virsh(self, *args: str, timeout: float = 120, check: bool = True) -> VirshResult:
        return self.root.virsh(*args, timeout=timeout, check=check)

    def define(self, xml: Path) -> str:
        """``virsh define`` (``xml`` a host path under the root); the domain's name."""
        name = ET.parse(xml).getroot().findtext("name") or ""
        self.virsh("define", self.root.inside(xml))
        self.domains.append(name)
        return name

    def qemu_pid(self, name: str) -> int | None:
        try:
            return int(self.root.path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        pids = [p for p in (self.qemu_pid(n) for n in self.domains) if p]
        for name in self.domains:
            self.virsh("destroy", name, check=False, timeout=60)
            self.virsh("undefine", name, check=False, timeout=60)
        if self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(20)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(10)
        for pid in pids:  # a QEMU libvirt started and did not stop (by its PID only)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _qemu_args(root: ET.Element) -> list[ET.Element]:
    cmdline = root.find(f"{{{QEMU_NS}}}commandline")
    if cmdline is None:
        raise LibvirtError("the template has no qemu:commandline")
    return cmdline.findall(f"{{{QEMU_NS}}}arg")


def template_device_arg(template: Path = TEMPLATE) -> str:
    """The ``-device`` value the template passes (checked against lab's in the tests)."""
    args = [a.get("value", "") for a in _qemu_args(ET.parse(template).getroot())]
    return args[args.index("-device") + 1]


def lab_domain_xml(
    *,
    name: str,
    memory_mib: int,
    vdev_socket: str,
    kernel: str,
    initrd: str,
    cmdline: str,
    serial_log: str,
    domain_type: str = "qemu",
    template: Path = TEMPLATE,
) -> str:
    """The template with lab's guest in it: ``name``, ``memory_mib``, vdev's socket, direct
    kernel boot of ``kernel``/``initrd`` with ``cmdline``, serial console to ``serial_log``,
    no disk, ``domain_type`` (``qemu`` = TCG: these hosts have no working KVM). Paths are
    as libvirt's QEMU sees them. Everything about the balloon is the template's."""
    ET.register_namespace("qemu", QEMU_NS)
    root = ET.parse(template).getroot()
    root.set("type", domain_type)
    root.find("name").text = name  # type: ignore[union-attr]
    for tag in ("memory", "currentMemory"):
        el = root.find(tag)
        assert el is not None
        el.set("unit", "MiB")
        el.text = str(memory_mib)
    vcpu = root.find("vcpu")
    assert vcpu is not None
    vcpu.text = "1"
    os_el = root.find("os")
    assert os_el is not None
    for child in list(os_el):
        if child.tag != "type":
            os_el.remove(child)
    for tag, text in (("kernel", kernel), ("initrd", initrd), ("cmdline", cmdline)):
        ET.SubElement(os_el, tag).text = text
    devices = root.find("devices")
    assert devices is not None
    for child in list(devices):
        if child.tag in ("disk", "serial", "console"):
            devices.remove(child)
    serial = ET.Element("serial", type="file")
    ET.SubElement(serial, "source", path=serial_log)
    ET.SubElement(serial, "target", port="0")
    devices.insert(0, serial)
    for arg in _qemu_args(root):
        value = arg.get("value", "")
        if value.startswith(f"socket,id={CHARDEV},"):
            arg.set("value", f"socket,id={CHARDEV},path={vdev_socket}")
    return ET.tostring(root, encoding="unicode") + "\n"


def stage_boot_files(root: LibvirtRoot, files: Sequence[Path], into: str) -> list[str]:
    """Copy ``files`` under the root's ``into`` (e.g. ``/var/lib/libvirt/boot``); the paths
    as QEMU sees them."""
    dest = root.path(into)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        shutil.copyfile(f, dest / f.name)
        out.append(f"{into.rstrip('/')}/{f.name}")
    return out
