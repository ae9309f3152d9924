"""The set-up infrastructure: QEMU discovery, the HLT BIOS, a qtest VM, the Linux guest."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import trio

from lab import linux_image, qemu
from lab.linux_image import BALLOON_DEVICE_ID, PREFIX
from lab.qemu import QemuBinary

# --------------------------------------------------------------------------- pure


def test_hlt_bios_is_64k_of_hlt(tmp_path: Path) -> None:
    path = qemu.write_hlt_bios(tmp_path / "hlt.bin")
    data = path.read_bytes()
    assert len(data) == 65536
    assert set(data) == {0xF4}


def test_version_parsing() -> None:
    assert qemu.parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)") == (10, 0, 2)
    assert qemu.parse_version("QEMU emulator version 11.1") == (11, 1, 0)
    assert qemu.parse_version("10.2.0") == (10, 2, 0)
    with pytest.raises(ValueError):
        qemu.parse_version("no version here")


def test_chroot_path_translation(tmp_path: Path) -> None:
    root = tmp_path / "root"
    q = QemuBinary("chroot:x", ("chroot", str(root), "qemu-system-x86_64"), (11, 1, 3), True, root)
    assert q.host_path(root / "tmp" / "a.sock") == "/tmp/a.sock"
    assert q.host_path(root) == "/"
    assert q.local_path("/tmp/a.sock") == root / "tmp" / "a.sock"
    with pytest.raises(ValueError, match="not visible"):
        q.host_path(tmp_path / "elsewhere.sock")
    host = QemuBinary("host", ("qemu-system-x86_64",), (10, 0, 2), False)
    assert host.host_path(tmp_path / "a.sock") == str(tmp_path / "a.sock")
    # the argv builder translates every path and escapes commas in option values
    argv = qemu.build_argv(
        q,
        bios=root / "tmp" / "hlt.bin",
        qtest_socket=root / "tmp" / "q.sock",
        qmp_socket=root / "tmp" / "m,p.sock",
        chardevs={"c0": root / "tmp" / "vu.sock"},
        devices=["vhost-user-test-device-pci,chardev=c0"],
    )
    assert argv[:3] == ["chroot", str(root), "qemu-system-x86_64"]
    assert argv[argv.index("-bios") + 1] == "/tmp/hlt.bin"
    assert argv[argv.index("-qtest") + 1] == "unix:/tmp/q.sock"
    assert argv[argv.index("-qmp") + 1] == "unix:/tmp/m,,p.sock,server=on,wait=off"
    assert "socket,id=c0,path=/tmp/vu.sock" in argv
    assert "memory-backend-memfd,id=mem,size=128M,share=on" in argv
    assert argv[argv.index("-accel") + 1] == "tcg"


def test_best_qemu_preference() -> None:
    host = QemuBinary("host", ("qemu-system-x86_64",), (10, 0, 2), False)
    new = QemuBinary("chroot:t", ("chroot", "/r", "q"), (11, 1, 3), True, Path("/r"))
    assert qemu.best_qemu(False, [host, new]) == host
    assert qemu.best_qemu(True, [host, new]) == new
    assert qemu.best_qemu(True, [host]) is None
    assert QemuBinary.from_json(new.to_json()) == new


def test_initramfs_cpio_layout() -> None:
    import gzip

    blob = linux_image.build_initramfs(b"\x7fELF-busybox", [("virtio_balloon", b"ko")])
    raw = gzip.decompress(blob)
    names = []
    off = 0
    while True:
        assert raw[off : off + 6] == b"070701"
        fields = [int(raw[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = raw[off + 110 : off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        off = (off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            break
        names.append(name)
    assert {"init", "bin/busybox", "dev/console", "lib/modules/virtio_balloon.ko"} <= set(names)
    assert off == len(raw)
    assert "insmod" in linux_image.init_script(["virtio_balloon"])


# --------------------------------------------------------------------------- discovery


@pytest.mark.qemu
def test_qemu_json_discovery() -> None:
    found = qemu.discover([qemu.default_trixie_root()])
    assert found, "no QEMU at all: run scripts/setup"
    host = [q for q in found if q.root is None]
    assert host and host[0].version >= (10, 0, 0), "scripts/setup provides host QEMU >= 10"
    for q in found:
        assert "tcg" in q.accels
        if q.version >= (10, 2, 0):
            assert q.has_test_device, f"{q.name} {q.version_str} lacks {qemu.TEST_DEVICE}"
    if qemu.QEMU_JSON.is_file():
        recorded = {q.name: q for q in qemu.load_json()}
        for q in found:
            assert q.name in recorded, f"{q.name} missing from {qemu.QEMU_JSON}"
            assert recorded[q.name].version == q.version
            assert recorded[q.name].has_test_device == q.has_test_device
        doc = json.loads(qemu.QEMU_JSON.read_text())
        assert doc["format"] == qemu.JSON_FORMAT
    assert qemu.find_qemus()
    assert qemu.best_qemu(need_test_device=False) is not None


# --------------------------------------------------------------------------- a qtest VM


def _qemus() -> list[QemuBinary]:
    try:
        return qemu.find_qemus()
    except Exception:  # reported by test_qemu_json_discovery
        return []


async def _qtest_cmd(stream: trio.SocketStream, buf: bytearray, cmd: str) -> str:
    await stream.send_all(cmd.encode() + b"\n")
    while True:
        while b"\n" not in buf:
            data = await stream.receive_some(4096)
            assert data, f"qtest closed after {cmd!r}"
            buf += data
        line, _, rest = bytes(buf).partition(b"\n")
        buf[:] = rest
        text = line.decode()
        if not text.startswith("IRQ"):  # asynchronous interrupt notices
            return text


@pytest.mark.qemu
@pytest.mark.parametrize("q", _qemus() or [None], ids=lambda q: q.name if q else "none")
async def test_qemu_answers_qtest(q: QemuBinary | None) -> None:
    if q is None:
        pytest.fail("no QEMU found: run scripts/setup")
    scratch = q.scratch_dir("vbq-")
    try:
        qtest_sock = scratch / "qtest.sock"
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(str(qtest_sock))
        listener.listen(1)
        argv = qemu.build_argv(
            q,
            ram_mib=64,
            bios=qemu.write_hlt_bios(scratch / "hlt.bin"),
            qtest_socket=qtest_sock,
            qtest_log=scratch / "qtest.log",
            qmp_socket=scratch / "qmp.sock",
        )
        with trio.fail_after(20), (scratch / "qemu.err").open("wb") as err:
            async with qemu.qemu_process(argv, stderr=err.fileno()) as proc:
                conn, _ = await listener.accept()
                stream = trio.SocketStream(conn)
                buf = bytearray()
                reply = await _qtest_cmd(stream, buf, "readb 0x0")
                assert reply.startswith("OK 0x"), reply
                assert await _qtest_cmd(stream, buf, "writel 0x100000 0xdeadbeef") == "OK"
                reply = await _qtest_cmd(stream, buf, "readl 0x100000")
                assert int(reply.split()[1], 16) == 0xDEADBEEF
                # the reset vector page is the HLT BIOS
                reply = await _qtest_cmd(stream, buf, "readb 0xfffffff0")
                assert int(reply.split()[1], 16) == 0xF4
                qmp = await qemu.Qmp.connect(scratch / "qmp.sock")
                status = await qmp.execute("query-status")
                assert status["status"] == "running"
                version = await qmp.execute("query-version")
                assert (version["qemu"]["major"], version["qemu"]["minor"]) == q.version[:2]
                await qmp.execute("quit")
                assert await proc.wait() == 0
                await qmp.aclose()
                await stream.aclose()
        listener.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------- Linux guest


@pytest.mark.qemu
@pytest.mark.linux_guest
async def test_linux_guest_binds_builtin_balloon(
    linux_env: tuple[QemuBinary, linux_image.LinuxImage],
) -> None:
    """A real Linux binds virtio_balloon to QEMU's own virtio-balloon-pci, runs a workload
    on request and powers off when told to."""
    q, image = linux_env
    with trio.fail_after(60):
        async with linux_image.run_guest(
            q, image, append="vb.autooff=55 vb.interval=30", extra=["-device", "virtio-balloon-pci"]
        ) as con:
            await con.expect(rf"^{PREFIX} module virtio_balloon loaded$")
            m = await con.expect(
                rf"^{PREFIX} virtio (virtio\d+) vendor=0x1af4 device=(0x[0-9a-f]+)"
            )
            assert m[2] == BALLOON_DEVICE_ID
            assert "driver=virtio_balloon" in m.string
            before = await con.expect(rf"^{PREFIX} meminfo .*Shmem=(\d+)")
            await con.expect(rf"^{PREFIX} ready$")
            await con.send("workload 32")
            await con.expect(rf"^{PREFIX} workload mb=32 held=32$")
            await con.send("report")
            after = await con.expect(rf"^{PREFIX} meminfo .*Shmem=(\d+)")
            assert int(after[1]) - int(before[1]) >= 32 * 1024 - 64  # kB
            await con.send("run cat /sys/bus/virtio/drivers/virtio_balloon/virtio0/device")
            await con.expect(rf"^{PREFIX} out {BALLOON_DEVICE_ID}$")
            await con.send("poweroff")
            await con.expect(rf"^{PREFIX} poweroff$")
            assert await con.proc.wait() == 0


@pytest.mark.qemu
@pytest.mark.linux_guest
async def test_linux_guest_powers_off_by_itself(
    linux_env: tuple[QemuBinary, linux_image.LinuxImage],
) -> None:
    q, image = linux_env
    with trio.fail_after(60):
        result = await linux_image.boot_check(q, image, autooff=2, timeout=55)
    assert result.ok, "\n".join(result.lines)
    assert f"{PREFIX} autooff after 2s" in result.lines
