"""The operator CLI (vdev stat/top/set-target/reset/host/pools/config/events/plot) on real
output: a real ``vdev serve`` process (simulated 4 GiB host) with a real guest driver on vm0,
and the commands run as an operator would run them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import matplotlib.image
import numpy as np
import pytest
import trio
from click.testing import CliRunner, Result
from control_fakes import GuestProcess, wait_until

from vdev.api.client import ApiClient, ApiError
from vdev.cli.main import main

T = TypeVar("T")

CONFIG = """
[settings]
"/VBalloon/InflateRatePagesPerSec" = 4096

[pools.gold]
limit = "8G"
shares = "high"

[vms.vm0]
pool = "gold"

[vms.vm1]
memory = "128M"
"""


@pytest.fixture
def served(vdev_process: Any, tmp_path: Path) -> Any:
    config = tmp_path / "vdev.toml"
    config.write_text(CONFIG)
    srv = vdev_process(
        "--config", str(config), "--host-memory", "4G", "--policy-period", "0.2", sockets=2
    )
    guest = GuestProcess(srv.paths[0], "64M", str(tmp_path / "guest0.log"))
    api = srv.paths[0] + ".api"
    with ApiClient(api) as client:
        wait_until(lambda: client.vm("vm0")["driver_active"], what="vm0's driver to start")
        yield api, client
    guest.stop()
    assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def _invoke(args: list[str], env: dict[str, str | None] | None = None) -> Result:
    return CliRunner(env=env).invoke(main, args, catch_exceptions=False)


async def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """Run one ``vdev`` command as the operator would (click's runner, in a worker thread so
    that the test's trio.fail_after still holds)."""
    return await trio.to_thread.run_sync(_invoke, list(args), env, abandon_on_cancel=True)


async def blocking(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


async def eventually(predicate: Callable[[], bool]) -> None:
    while not await blocking(predicate):
        await trio.sleep(0.02)


async def test_stat_set_target_config_host_pools(served: Any) -> None:
    with trio.fail_after(90):
        api, client = served
        r = await run("stat", "--api-socket", api)
        assert r.exit_code == 0, r.output
        lines = r.output.splitlines()
        assert lines[0].startswith("HOST state high")
        assert "total 4096.00 free 4096.00 minFree 245.76" in lines[0] and "(simulated)" in lines[0]
        assert lines[1].split() == [
            "VM", "DEV", "CONN", "MCTL?", "MEMSZ", "MCTLSZ", "MCTLTGT", "MCTLMAX", "CTRL",
            "REASON", "INFL/s", "DEFL/s", "FAIL",
        ]  # fmt: skip
        vm0, vm1 = (line.split() for line in lines[2:4])
        ram = (await blocking(lambda: client.vm("vm0")))["ram_pages"]  # 64M less any holes
        assert 15 * 1024 < ram <= 16 * 1024
        memsz = f"{ram / 256:.2f}"
        mctlmax = f"{ram * 65 // 100 / 256:.2f}"
        assert vm0[:8] == ["vm0", "vmw", "Y", "Y", memsz, "0.00", "0.00", mctlmax]
        assert vm1[:8] == ["vm1", "vmw", "N", "N", "0.00", "0.00", "0.00", "83.20"]  # configured

        r = await run("set-target", "--api-socket", api, "vm0", "16M")
        assert (r.exit_code, r.output) == (0, "vm0: MCTLTGT 16.00 MB (manual)\n")
        await eventually(lambda: client.vm("vm0")["size_pages"] == 4096)
        vm0 = (await run("stat", "--api-socket", api)).output.splitlines()[2].split()
        assert vm0[5:10] == ["16.00", "16.00", mctlmax, "manual", "manual"]
        assert float(vm0[10]) > 0  # inflating pages/s over the window

        r = await run("set-target", "--api-socket", api, "vm0", "50M")
        assert r.exit_code == 0
        assert r.output == (
            f"vm0: MCTLTGT {mctlmax} MB (manual), capped:CtlMaxPercent: requested 50.00 MB, "
            f"MCTLMAX {mctlmax} MB\n"
        )
        r = await run("set-target", "--api-socket", api, "vm0", "100M")
        assert r.exit_code == 1
        assert f"Error: target 25600 pages is more than the guest's RAM ({ram} pages, " in r.output
        r = await run("set-target", "--api-socket", api, "vm9", "1M")
        assert r.exit_code == 1 and "no VM named 'vm9'; known: vm0, vm1" in r.output
        r = await run("set-target", "--api-socket", api, "vm0", "lots")
        assert r.exit_code == 1 and "cannot parse size 'lots'" in r.output
        r = await run("set-target", "--api-socket", api, "vm0", "policy")
        assert (r.exit_code, r.output) == (0, "vm0: target under policy control (0.00 MB, none)\n")

        r = await run("config", "list", "--api-socket", api)
        assert r.exit_code == 0
        settings = dict(line.split() for line in r.output.splitlines())
        assert settings["/Mem/CtlMaxPercent"] == "65"
        assert settings["/VBalloon/InflateRatePagesPerSec"] == "4096"  # from the config file
        r = await run("config", "set", "--api-socket", api, "Mem.CtlMaxPercent", "50")
        assert (r.exit_code, r.output) == (0, "/Mem/CtlMaxPercent = 50\n")
        r = await run("config", "get", "--api-socket", api, "/Mem/CtlMaxPercent")
        assert (r.exit_code, r.output) == (0, "50\n")
        r = await run("config", "set", "--api-socket", api, "/Mem/CtlMaxPercent", "100")
        assert r.exit_code == 1 and "/Mem/CtlMaxPercent must be in 0..99, got 100" in r.output
        r = await run("config", "get", "--api-socket", api, "/Mem/Nope")
        assert r.exit_code == 1 and "no setting '/Mem/Nope'" in r.output

        r = await run("host", "--api-socket", api, "--set-free", "120M")
        assert r.exit_code == 0
        rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in r.output.splitlines())
        assert rows["state"] == "soft" and rows["free MB"] == "120.00"
        assert rows["source"] == "simulated" and rows["PSI some/full avg10"] == "- / -"
        # plain text, not rich markup ("[serve]" was eaten); no padding to the widest row
        assert rows["why"] == "--host-memory / [serve] host_memory", rows["why"]
        assert all(line == line.rstrip() for line in r.output.splitlines())
        r = await run("host", "--api-socket", api, "--json")
        assert json.loads(r.output)["total_bytes"] == 4 << 30

        r = await run("pools", "--api-socket", api)
        assert r.exit_code == 0
        assert r.output.splitlines()[1].split() == [
            "gold", "-", "0.00", "8192.00", "high", "(327680)", "yes", "vm0",
        ]  # fmt: skip

        r = await run("reset", "--api-socket", api, "vm0")
        assert (r.exit_code, r.output) == (0, "vm0: reset demanded\n")

        r = await run("stat", "--api-socket", api, "--json")
        doc = json.loads(r.output)
        assert [v["name"] for v in doc["vms"]] == ["vm0", "vm1"] and doc["host"]["simulated"]


async def test_events_top_and_plot(served: Any, tmp_path: Path) -> None:
    with trio.fail_after(90):
        api, client = served
        proc = subprocess.Popen(
            [sys.executable, "-m", "vdev", "events", "--api-socket", api, "--vm", "vm0", "-n", "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            hello = await blocking(proc.stdout.readline)
            assert "connected; VMs: vm0, vm1" in hello
            await blocking(lambda: client.set_target("vm0", target="8M"))
            out, err = await blocking(lambda: proc.communicate(timeout=20))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        lines = out.splitlines()
        assert len(lines) == 4, out
        # the change is audited in the stream: who did it (this test's pid runs the client)
        audit = [line for line in lines if " audit " in line]
        assert len(audit) == 1 and "audit target" in audit[0], out
        assert f"by uid {os.getuid()} pid {os.getpid()}" in audit[0], out
        lines = [line for line in lines if " audit " not in line]
        assert lines[0].split()[1:] == ["vm0", "control", "->", "manual"]
        assert lines[1].split()[1:] == ["vm0", "MCTLTGT", "8.00", "MB", "(manual)"]
        assert lines[2].split()[1:3] == ["vm0", "MCTLSZ"]  # the guest started inflating
        # (how soon is the machine's business: communicate's 20 s is the only bound)

        await eventually(lambda: client.vm("vm0")["size_pages"] == 2048)
        # Pressure: SOFT below 157 MiB free; the policy balloons vm0 (vm1 has no guest) until
        # the simulated host is back above 181 MiB.
        await blocking(lambda: client.set_simulated_free(free="150M"))
        await blocking(lambda: client.set_target("vm0", policy=True))
        await eventually(lambda: client.host()["state"] != "soft")

        r = await run("top", "--api-socket", api, "-n", "2", "--interval", "0.1")
        assert r.exit_code == 0, r.output
        assert r.output.count("MCTLTGT") >= 1 and "vm0" in r.output

        png = tmp_path / "vm0.png"
        r = await run("plot", "--api-socket", api, "vm0", "--output", str(png))
        assert r.exit_code == 0, r.output
        assert r.output.startswith(f"{png}: ") and r.output.rstrip().endswith("points for vm0")
        image = matplotlib.image.imread(str(png))
        assert image.shape == (600, 900, 4)  # 9 x 6 inches at 100 dpi, RGBA
        rgb = image[..., :3].reshape(-1, 3)
        assert rgb.std() > 0.05
        assert len(np.unique(rgb, axis=0)) > 20  # lines, shading, text: not a blank canvas

        r = await run("plot", "--api-socket", api, "vm9", "--output", str(png))
        assert r.exit_code == 1 and "no VM named 'vm9'" in r.output


async def test_unreachable_and_missing_socket(tmp_path: Path) -> None:
    with trio.fail_after(90):
        r = await run("stat", "--api-socket", str(tmp_path / "nothing.api"))
        assert r.exit_code == 1 and "cannot reach the vdev API" in r.output
        r = await run("stat", env={"VDEV_API_SOCKET": None})
        assert r.exit_code == 2 and "--api-socket" in r.output
        r = await run("stat", env={"VDEV_API_SOCKET": str(tmp_path / "env.api")})
        assert r.exit_code == 1 and "env.api" in r.output
        with pytest.raises(ApiError, match="cannot reach"), ApiClient(str(tmp_path / "x")) as c:
            c.host()


async def test_serve_refuses_a_live_api_socket(vdev_process: Any, tmp_path: Path) -> None:
    with trio.fail_after(90):
        srv = vdev_process("--host-memory", "1G")
        api = srv.paths[0] + ".api"
        second = await trio.run_process(
            [sys.executable, "-m", "vdev", "serve", "--socket-path", str(tmp_path / "other.sock"),
             "--api-socket", api],
            capture_stderr=True, check=False,
        )  # fmt: skip
        assert second.returncode == 2
        assert f"{api}: in use by a running vdev (pid {srv.pid})" in second.stderr.decode()
        bad = await trio.run_process(
            [sys.executable, "-m", "vdev", "serve", "--socket-path", str(tmp_path / "o.sock"),
             "--host-memory", "lots"],
            capture_stderr=True, check=False,
        )  # fmt: skip
        assert bad.returncode == 2
        assert "--host-memory: cannot parse size 'lots'" in bad.stderr.decode()
        assert os.path.exists(api)  # the first server's socket was left alone

        # `vdev events` follows until vdev serve goes away, then says so (exit 1).
        follower = subprocess.Popen(
            [sys.executable, "-m", "vdev", "events", "--api-socket", api],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert follower.stdout is not None
            assert "connected; VMs: vm0" in await blocking(follower.stdout.readline)
            assert await blocking(srv.stop) == 0
            _out, err = await blocking(lambda: follower.communicate(timeout=20))
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
        assert follower.returncode == 1
        assert "Error: the event stream ended (vdev serve stopped?)" in err, err
        assert "Traceback" not in err
        assert not os.path.exists(api)


# -- vdev stat's layout: natural width off a terminal, folded between fields on a narrow one

WIDE_HOST = {
    "state": "soft", "total_bytes": 16 << 30, "free_bytes": 174_483_374,
    "min_free_bytes": 1_234_567_890, "psi": {"some_avg10": 1.5, "full_avg10": 0.25},
    "simulated": True,
}  # fmt: skip
WIDE_VM = {
    "name": "vm0", "personality": "vmw", "connected": True, "driver_active": True,
    "ram_bytes": 1 << 30, "size_bytes": 1 << 29, "target_bytes": 1 << 29,
    "max_bytes": 166 << 20, "control": "policy", "reason": "pressure:soft capped:CtlMaxPercent",
    "rates": {"inflate_pages_per_s": 1234.0, "deflate_pages_per_s": 0.0}, "failures": 7,
}  # fmt: skip


class _FakeClient:
    def __init__(self, _path: str) -> None:
        pass

    def __enter__(self) -> _FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def vms(self) -> list[dict[str, Any]]:
        return [WIDE_VM, {**WIDE_VM, "name": "vm1"}]

    def host(self) -> dict[str, Any]:
        return WIDE_HOST


def test_stat_off_a_terminal_is_not_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vdev.cli.operator._client", _FakeClient)
    r = CliRunner().invoke(main, ["stat", "--api-socket", "x"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 4, r.output  # host line, header, two VMs
    assert lines[0].startswith("HOST state soft  PMEM/MB total 16384.00 free 166.40")
    assert lines[0].endswith("332.00 max  (simulated)") and len(lines[0]) > 132
    assert lines[2].split() == [
        "vm0", "vmw", "Y", "Y", "1024.00", "512.00", "512.00", "166.00", "policy",
        "pressure:soft", "capped:CtlMaxPercent", "1234", "0", "7",
    ]  # fmt: skip


def test_stat_on_a_narrow_terminal_breaks_between_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("vdev.cli.operator._client", _FakeClient)
    r = CliRunner().invoke(
        main, ["stat", "--api-socket", "x"], terminal_width=80, catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert all(len(line) <= 80 for line in lines), r.output
    assert lines[:3] == [
        "HOST state soft  PMEM/MB total 16384.00 free 166.40 minFree 1177.38",
        "     PSI some 1.5 full 0.25  MEMCTL/MB 1024.00 curr, 1024.00 target, 332.00 max",
        "     (simulated)",
    ]
