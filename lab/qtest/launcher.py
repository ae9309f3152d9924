"""A qtest VM: QEMU (TCG, HLT BIOS, memfd RAM ``share=on``, ``-qtest``) started and
connected (:func:`qtest_vm`), with its QMP client and the /proc views of its guest RAM."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from lab.procfs import memfd_allocated_bytes, rss_shmem_kib
from lab.qemu import QemuBinary, Qmp, build_argv, qemu_process, write_hlt_bios
from lab.qtest.client import Qtest, listen_unix
from protocol.errors import LocalError

log = logging.getLogger(__name__)


def socket_path_ok(path: Path) -> bool:
    """Unix socket paths are limited to 107 bytes."""
    return len(os.fsencode(path)) < 108


@dataclass
class QtestVm:
    """A QEMU whose only "CPU" is us: HLT BIOS, qtest connected, QMP optional."""

    qemu: QemuBinary
    argv: list[str]
    proc: trio.Process
    qt: Qtest
    qmp: Qmp | None
    dir: Path
    started: float  # trio.current_time() at exec

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_shmem_kib(self) -> int:
        return rss_shmem_kib(self.pid)

    def memfd_bytes(self) -> int:
        return memfd_allocated_bytes(self.pid)


@contextlib.asynccontextmanager
async def qtest_vm(
    qemu: QemuBinary,
    *,
    devices: Sequence[str] = (),
    chardevs: Mapping[str, Path] | None = None,
    ram_mib: int = 256,
    qmp: bool = True,
    extra: Sequence[str] = (),
    scratch: Path | None = None,
    stderr: int | None = None,
    timeout: float = 15.0,
) -> AsyncIterator[QtestVm]:
    """Start QEMU (TCG, HLT BIOS, memfd RAM share=on, ``-qtest``) and connect to it.

    ``scratch`` is a :meth:`QemuBinary.scratch_dir` (made and removed here when None);
    chardev sockets must already be listening. QEMU is stopped (SIGTERM) on exit.
    """
    own = scratch is None
    d = qemu.scratch_dir("vbq-") if scratch is None else scratch
    try:
        bios = d / "hlt.bin"
        if not bios.exists():
            write_hlt_bios(bios)
        qsock = d / "qtest.sock"
        listener = await listen_unix(qsock)
        qmp_sock = d / "qmp.sock" if qmp else None
        argv = build_argv(
            qemu,
            ram_mib=ram_mib,
            bios=bios,
            qtest_socket=qsock,
            qmp_socket=qmp_sock,
            chardevs=chardevs,
            devices=devices,
            extra=extra,
        )
        log.info("qtest VM: %s", " ".join(argv))
        t0 = trio.current_time()
        try:
            async with qemu_process(argv, stderr=stderr) as proc:
                stream: trio.SocketStream | None = None
                with trio.fail_after(timeout):
                    while stream is None:
                        # QEMU exiting before it connects (bad argv) must not hang us
                        if proc.poll() is not None:
                            raise LocalError(
                                f"QEMU exited {proc.returncode} before qtest connected"
                            )
                        with trio.move_on_after(0.05):
                            stream = await listener.accept()
                async with Qtest.open(stream) as qt:
                    client = await Qmp.connect(qmp_sock) if qmp_sock is not None else None
                    try:
                        yield QtestVm(qemu, argv, proc, qt, client, d, t0)
                    finally:
                        if client is not None:
                            with trio.CancelScope(shield=True):
                                await client.aclose()
        finally:
            await listener.aclose()
    finally:
        if own:
            shutil.rmtree(d, ignore_errors=True)
