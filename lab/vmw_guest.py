"""The Linux test guest with OUR vmw driver inside it (``guest-driver run-linux``).

The image is the Linux test guest (:mod:`lab.linux_image`) plus:

* an appended initramfs archive with ``uio``, ``uio_pci_generic`` and the virtio-9p modules
  (and their dependencies) from the same kernel package, and ``/bin/vb-vmw``, the script that
  loads them, mounts the Python root and the code over virtio-9p, and starts the driver in a
  chroot (its output on the console, ``@vbg drv ...`` lines);
* a Python root (Debian 13 minbase + python3, numpy, trio, construct, click from Debian),
  shared read-only over virtio-9p (``vbroot``); the project's ``guest_driver`` and
  ``protocol`` packages are staged per boot and shared as ``vbcode`` (mounted on
  ``/opt/vballoon`` in the root). numpy needs ``-cpu max`` under TCG (the default CPU model
  lacks instructions it uses).

Both are built by ``scripts/setup`` (``python -m lab.vmw_guest build``) and cached:
``$VBALLOON_CACHE/linux-guest-vmw`` (a complete :class:`lab.linux_image.LinuxImage` whose
initrd is the base one + the extras) and the root, inside the QEMU chroot where there is one
(QEMU must see it to share it): ``ROOT/srv/vballoon-guest-root``.

The device: ``vhost-user-test-device-pci,virtio-id=41,num_vqs=2,config_size=8`` (QEMU >=
10.2) in front of ``vdev serve --device vmw``: the guest sees ``1af4:1069``, which
``run-linux`` unbinds from ``virtio-pci`` and binds to ``uio_pci_generic``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import trio

from conformance.cases import Case, select
from conformance.cases import T as DEFAULT_TARGET
from conformance.inguest import GuestContext, parse_result_line
from conformance.runner import unsupported
from lab.linux_guest import (
    CHARDEV_ID,
    GuestFailure,
    LinuxGuest,
    balloon_device_arg,
    boot_guest,
)
from lab.linux_image import (
    MANIFEST,
    PREFIX,
    Cpio,
    LinuxImage,
    ProvisionError,
    choose_apt_source,
    default_image_dir,
    init_script,
    resolve_modules,
)
from lab.linux_image import build as build_base
from lab.qemu import ROOT_STAMP, QemuBinary, cache_root, chardev_socket_args, default_trixie_root

log = logging.getLogger(__name__)

EXTRA_MODULES = ("uio", "uio_pci_generic", "9pnet_virtio", "9p")
GUEST_PACKAGES = ("python3", "python3-numpy", "python3-trio", "python3-construct", "python3-click")
ROOT_NAME = "srv/vballoon-guest-root"
ROOT_DONE = ".vballoon-guest-root"
MIRROR = "http://deb.debian.org/debian"
#: vmw behind QEMU's generic vhost-user device: virtio id 41, cmdq + eventq, 8-byte config
VMW_DEVICE_ID, VMW_QUEUES, VMW_CONFIG_SIZE = 41, 2, 8
DRV_PREFIX = f"{PREFIX} drv "

START_SCRIPT = r"""#!/bin/sh
# vb-vmw [run-linux options...]: load the extra modules, mount the Python root and the code
# over virtio-9p, start `guest-driver run-linux` in a chroot; its lines go to the console
# (directly: the driver outlives the console command that started it).
say() { echo "@PREFIX@ $*" >/dev/console; }
for m in @MODULES@; do
    [ -d "/sys/module/$m" ] || insmod "/lib/modules/extra/$m.ko" || say "module $m FAILED"
done
R=/mnt/root
mounted() { grep -qs " $1 " /proc/mounts; }
mkdir -p $R
mounted $R || mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose vbroot $R
mounted $R/opt/vballoon || mount -t 9p -o trans=virtio,version=9p2000.L,ro vbcode $R/opt/vballoon
mounted $R/proc || mount -t proc proc $R/proc
mounted $R/sys || mount -o bind /sys $R/sys
mounted $R/dev || mount -o bind /dev $R/dev
mounted $R/tmp || mount -t tmpfs tmpfs $R/tmp
mounted $R/run || mount -t tmpfs tmpfs $R/run
run_driver() {
    chroot $R env PYTHONPATH=/opt/vballoon PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
        python3 -m guest_driver run-linux "$@" 2>&1
    echo "exit $?"
}
# Detached from the console command that started it: no fd of ours stays on its pipe.
( run_driver "$@" 2>&1 | while IFS= read -r line; do say "drv $line"; done ) </dev/null >/dev/null 2>&1 &
say "vb-vmw started"
"""


AUTOSTART = r"""for arg in $(cat /proc/cmdline); do
    case $arg in vb.vmw=*) /bin/vb-vmw $(echo "${arg#*=}" | tr , ' ') ;; esac
done
say "ready"
"""


def vmw_init_script(modules: Sequence[str]) -> str:
    """The base image's init, starting the driver when ``vb.vmw=`` is on the command line."""
    text = init_script(modules)
    assert text.count('say "ready"\n') == 1
    return text.replace('say "ready"\n', AUTOSTART)


def image_dir() -> Path:
    return cache_root() / "linux-guest-vmw"


def root_dir() -> Path:
    """Where the guest's Python root lives: inside the QEMU chroot when there is one."""
    trixie = default_trixie_root()
    base = trixie if (trixie / ROOT_STAMP).is_file() else cache_root()
    return base / ROOT_NAME


@dataclass(frozen=True)
class VmwGuestImage:
    image: LinuxImage  # base kernel, initrd = base + extras
    root: Path  # the Python root shared as vbroot

    @classmethod
    def load(cls) -> VmwGuestImage | None:
        image = LinuxImage.load(image_dir())
        root = root_dir()
        if image is None or not (root / ROOT_DONE).is_file():
            return None
        return cls(image, root)


def build_extras(base: LinuxImage, outdir: Path) -> LinuxImage:
    """vmlinuz and initrd (base + the extra archive) into ``outdir``, for ``base``'s kernel."""
    recipe = hashlib.sha256(
        f"{START_SCRIPT}{EXTRA_MODULES}{vmw_init_script(base.modules)}".encode()
    ).hexdigest()[:16]
    existing = LinuxImage.load(outdir)
    if existing is not None and existing.kernel_version == base.kernel_version:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads((outdir / MANIFEST).read_text())["recipe"] == recipe:
                return existing
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / MANIFEST).unlink(missing_ok=True)
    apt = choose_apt_source()
    dl_base = (apt.root / "var" / "tmp") if apt.root is not None else None
    dl = Path(tempfile.mkdtemp(prefix="vballoon-debs-", dir=dl_base))
    try:
        try:
            debs = apt.download([base.kernel_package], dl)
        except ProvisionError:
            apt.update()
            debs = apt.download([base.kernel_package], dl)
        kf, order = resolve_modules(debs[base.kernel_package], required=EXTRA_MODULES, optional=())
    finally:
        shutil.rmtree(dl, ignore_errors=True)
    c = Cpio()
    for d in ("lib", "lib/modules", "lib/modules/extra", "mnt", "bin"):
        c.dir(d)
    for name in order:
        c.file(f"lib/modules/extra/{name}.ko", kf.modules[name])
    script = START_SCRIPT.replace("@PREFIX@", PREFIX).replace("@MODULES@", " ".join(order))
    c.file("bin/vb-vmw", script.encode(), 0o755)
    # The same init, which with vb.vmw=ARGS on the kernel command line (commas for spaces)
    # starts the driver before saying ready (this archive's /init replaces the base one).
    c.file("init", vmw_init_script(base.modules).encode(), 0o755)
    extras = c.finish()
    shutil.copyfile(base.kernel, outdir / "vmlinuz.tmp")
    (outdir / "vmlinuz.tmp").replace(outdir / "vmlinuz")
    (outdir / "initrd.img.tmp").write_bytes(base.initrd.read_bytes() + extras)
    (outdir / "initrd.img.tmp").replace(outdir / "initrd.img")
    manifest = {
        "format": json.loads((base.directory / MANIFEST).read_text())["format"],
        "kernel_version": base.kernel_version,
        "kernel_package": base.kernel_package,
        "source": base.source,
        "modules": [*base.modules, *order],
        "extras": order,
        "recipe": recipe,
        "base": str(base.directory),
    }
    (outdir / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=2) + "\n")
    (outdir / (MANIFEST + ".tmp")).replace(outdir / MANIFEST)
    image = LinuxImage.load(outdir)
    assert image is not None
    return image


def build_root(root: Path) -> None:
    """Debian 13 minbase with Python and the driver's dependencies (debootstrap, once)."""
    if (root / ROOT_DONE).is_file():
        return
    if shutil.which("debootstrap") is None:
        raise ProvisionError("debootstrap is not installed (scripts/setup installs it)")
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(GUEST_PACKAGES)}",
            "trixie", str(root), MIRROR]  # fmt: skip
    log_path = root.parent / "vballoon-guest-root.log"
    with open(log_path, "w") as logf:
        r = subprocess.run(argv, stdout=logf, stderr=subprocess.STDOUT, check=False)
    if r.returncode != 0:
        tail = log_path.read_text()[-1500:]
        raise ProvisionError(f"debootstrap of the guest root failed ({r.returncode}): {tail}")
    for d in ("opt/vballoon", "proc", "sys", "dev", "tmp", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        shutil.rmtree(root / "var" / "cache" / "apt" / "archives")
    (root / ROOT_DONE).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))


def build() -> VmwGuestImage:
    base = build_base(default_image_dir())
    image = build_extras(base, image_dir())
    root = root_dir()
    build_root(root)
    return VmwGuestImage(image, root)


def stage_code(into: Path) -> Path:
    """A copy of ``guest_driver``, ``protocol`` and ``conformance`` (no caches) for the
    guest's ``vbcode`` (the harness runs in the guest too: :func:`run_harness`)."""
    repo = Path(__file__).resolve().parents[1]
    dest = into / "code"
    for pkg in ("guest_driver", "protocol", "conformance"):
        shutil.copytree(repo / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def qemu_args(qemu: QemuBinary, root: Path, code: Path) -> list[str]:
    """``-cpu max`` and the two read-only 9p shares."""
    out = ["-cpu", "max"]
    for tag, path in (("vbroot", root), ("vbcode", code)):
        out += [
            "-fsdev", f"local,id={tag},path={qemu.host_path(path)},security_model=none,readonly=on",
            "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}",
        ]  # fmt: skip
    return out


def vmw_qemu_args(qemu: QemuBinary, vdev_socket: Path, scratch: Path) -> list[str]:
    """Everything the vmw guest needs beyond the base guest's command line: vdev's chardev
    and device, ``-cpu max``, the Python root and the code (staged into ``scratch``)."""
    vmw = VmwGuestImage.load()
    if vmw is None:
        raise ProvisionError("the vmw guest image is not built: python -m lab.vmw_guest build")
    return [
        *chardev_socket_args(qemu, CHARDEV_ID, vdev_socket),
        "-device", vmw_device_arg(),
        *qemu_args(qemu, vmw.root, stage_code(scratch)),
    ]  # fmt: skip


def vmw_device_arg() -> str:
    return balloon_device_arg(
        num_queues=VMW_QUEUES, config_size=VMW_CONFIG_SIZE, device_id=VMW_DEVICE_ID
    )


@contextlib.asynccontextmanager
async def boot_vmw_guest(
    qemu: QemuBinary,
    vmw: VmwGuestImage,
    vdev_socket: Path,
    *,
    ram_mib: int = 512,
    append: str = "",
) -> AsyncIterator[LinuxGuest]:
    """Boot the guest with vdev (``--device vmw``, listening on ``vdev_socket``) as its
    balloon device; the driver is not started yet (:func:`start_driver`)."""
    scratch = qemu.scratch_dir("vbw-")
    try:
        code = stage_code(scratch)
        async with boot_guest(
            qemu,
            vmw.image,
            vdev_socket,
            ram_mib=ram_mib,
            append=append,
            device=vmw_device_arg(),
            extra=qemu_args(qemu, vmw.root, code),
        ) as guest:
            yield guest
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def start_driver(
    guest: LinuxGuest, args: Sequence[str] = ("-v",), timeout: float = 180
) -> None:
    """Run ``/bin/vb-vmw`` and wait until the driver has bound the device and said so."""
    await guest.send("run /bin/vb-vmw " + " ".join(args))
    with trio.fail_after(timeout):
        await guest.console.expect(rf"^{PREFIX} vb-vmw started$")
        m = await guest.console.expect(r"drv .*(driver running|exit \d+)")
    if "exit" in m[1]:
        raise GuestFailure(
            "guest-driver run-linux exited:\n" + "\n".join(guest.console.lines[-30:])
        )


async def guest_driver_stat(guest: LinuxGuest, *args: str) -> list[str]:
    """``guest-driver stat`` run inside the guest (in the chroot)."""
    return await guest.run(
        "chroot /mnt/root env PYTHONPATH=/opt/vballoon PYTHONDONTWRITEBYTECODE=1 "
        "python3 -m guest_driver stat --control /run/guest-driver.sock " + " ".join(args)
    )


IN_CHROOT = "chroot /mnt/root env PYTHONPATH=/opt/vballoon PYTHONDONTWRITEBYTECODE=1 HOME=/tmp"


async def mount_root(guest: LinuxGuest) -> None:
    """Load the extra modules and mount the Python root and the code, without starting the
    driver: ``/bin/vb-vmw`` up to where it defines the driver's start (idempotent; the
    driver's start later mounts nothing twice)."""
    out = await guest.run(
        "sed '/^run_driver() {/,$d' /bin/vb-vmw > /tmp/vb-mount && sh /tmp/vb-mount && "
        "test -f /mnt/root/opt/vballoon/conformance/inguest.py && echo mounted"
    )
    if out[-1:] != ["mounted"]:
        raise GuestFailure("mounting the Python root failed: " + "\n".join(out[-20:]))


def guest_level_cases() -> list[Case]:
    """The vmw cases the in-guest transport runs (they need nothing but the guest's cmdq)."""
    return [c for c in select("vmw") if unsupported(c, GuestContext) is None]


async def run_harness(
    guest: LinuxGuest,
    set_target: Callable[[int], Awaitable[object]],
    cases: Sequence[Case] | None = None,
) -> list[dict[str, Any]]:
    """Run ``cases`` (default: every guest-level vmw case) inside the guest, one pass per
    operator target they need (``set_target`` sets it on the host, through vdev's API);
    the results, read back from the console (:func:`conformance.inguest.result_line`).
    The driver must not be running (the harness binds the same function)."""
    chosen = list(guest_level_cases() if cases is None else cases)
    passes: dict[int, list[str]] = {}
    for c in chosen:  # cases that take any target run with the most common one
        passes.setdefault(DEFAULT_TARGET if c.target is None else c.target, []).append(c.name)
    await mount_root(guest)
    results: list[dict[str, Any]] = []
    for target, names in sorted(passes.items(), reverse=True):
        await set_target(target)
        out = await guest.run(
            f"{IN_CHROOT} python3 -m conformance --in-guest --initial-target {target} "
            f"-k {','.join(names)} 2>&1"
        )
        got = [r for r in map(parse_result_line, out) if r is not None]
        if {r["case"] for r in got} != set(names):
            raise GuestFailure(
                f"the in-guest harness (target {target}) reported {len(got)} of {len(names)} "
                "cases:\n" + "\n".join(out[-30:])
            )
        results += got
    return results


@click.group()
def main() -> None:
    """The vmw Linux guest: build its image and Python root."""


@main.command("build")
def build_cmd() -> None:
    """Build (or find cached) the vmw guest image and its Python root."""
    logging.basicConfig(level=logging.INFO, format="vmw_guest: %(message)s", stream=sys.stderr)
    t0 = time.monotonic()
    try:
        vmw = build()
    except (ProvisionError, OSError) as exc:
        click.echo(f"vmw_guest: {exc}", err=True)
        sys.exit(1)
    click.echo(
        f"vmw_guest: {vmw.image.directory} (extras {' '.join(vmw.image.modules)}), Python root "
        f"{vmw.root} [{time.monotonic() - t0:.1f}s]"
    )


if __name__ == "__main__":
    main()
