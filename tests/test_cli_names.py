"""The operator CLI and the API client put names into URLs only after the one name rule and
percent-escaping: ``vdev set-target 'vm0/../vm1' 1G`` cannot set vm1, ``../settings`` cannot
reach ``PUT /settings/target`` (a real ``vdev serve`` with two guests, vm0 and vm1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from protocol.errors import ConfigError
from vdev.api.client import ApiClient, setting_segments, vm_path
from vdev.cli.main import main

HOSTILE = ["vm0/../vm1", "../vm1", "..", ".", "vm1/", "/vm1", "vm1?x=1", "vm1#", "vm%31", "",
           "../settings", "../settings/Mem", "vm1\n", "vm 1", "v" * 129]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE)
def test_vm_path_refuses_what_the_name_rule_refuses(name: str) -> None:
    with pytest.raises(ConfigError, match="bad guest name"):
        vm_path(name, "target")


def test_vm_path_and_setting_paths() -> None:
    assert vm_path("web-1.a_b", "target") == "/vms/web-1.a_b/target"
    assert setting_segments("/Mem/CtlMaxPercent") == ["Mem", "CtlMaxPercent"]
    assert setting_segments("Mem.CtlMaxPercent") == ["Mem.CtlMaxPercent"]
    for bad in ("../vms/vm1/target", "Mem/../x", "Mem//x", "", "/", "Mem/./x", "Mem/\x00"):
        with pytest.raises(ConfigError, match="setting path"):
            setting_segments(bad)


def test_cli_never_reaches_another_resource(vdev_process: Any, tmp_path: Path) -> None:
    srv = vdev_process("--host-memory", "4G", sockets=2)
    api = srv.paths[0] + ".api"
    runner = CliRunner()
    with ApiClient(api) as client:
        settings_before = client.settings()
        for name in HOSTILE:
            for argv in (
                ["set-target", name, "1G"],
                ["reset", name],
                ["plot", name, "-o", "x.png"],
            ):
                r = runner.invoke(main, [argv[0], "--api-socket", api, *argv[1:]])
                assert r.exit_code == 2, (argv, r.output)
                assert "bad guest name" in r.output and "Traceback" not in r.output
            r = runner.invoke(main, ["events", "--api-socket", api, "--vm", name])
            assert r.exit_code == 2 and "bad guest name" in r.output
        for path in ("../vms/vm1/target", "Mem/../../vms/vm1/target", "..", "Mem//x"):
            r = runner.invoke(main, ["config", "set", "--api-socket", api, path, "1"])
            assert r.exit_code == 2 and "setting path" in r.output, r.output
            r = runner.invoke(main, ["config", "get", "--api-socket", api, path])
            assert r.exit_code == 2 and "setting path" in r.output, r.output
        # Nothing changed: no manual target on either VM, the settings as they were.
        for vm in client.vms():
            assert vm["control"] == "policy", vm
        assert client.settings() == settings_before
        # A good name still works.
        r = runner.invoke(main, ["set-target", "--api-socket", api, "vm1", "0"])
        assert r.exit_code == 0, r.output
        assert client.vm("vm1")["control"] == "manual"
        assert client.vm("vm0")["control"] == "policy"
