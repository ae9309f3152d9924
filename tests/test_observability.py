"""What an operator's tools see: Prometheus rules (promtool), the Grafana dashboard, JSON logs,
guest names, and the series the rules and the dashboard read, checked against a live vdev."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import trio
import yaml  # type: ignore[import-untyped]
from conftest import missing_prerequisite
from control_fakes import GuestProcess
from observability_series import (
    RULE_TESTS,
    RULES,
    exposed,
    load_dashboard,
    missing_series,
)

from lab.vdev_process import REPO_ROOT, open_vdev
from protocol.version import package_version
from vdev.logs import current_vm, event, setup_logging
from vdev.registry import check_guest_name, name_from_socket_path

MIB = 1 << 20
JSON_KEYS = {"time", "level", "logger", "vm", "event", "message"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing_prerequisite("no promtool (scripts/setup installs Debian's prometheus package)")
    return path


def test_promtool_check_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_test_rules() -> None:
    """The unit tests fire every alert at the time it should and not before (or after)."""
    done = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        capture_output=True, text=True, timeout=120, cwd=RULE_TESTS.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert alerts == tested, f"alerts without a unit test: {alerts - tested}"


def test_dashboard_schema() -> None:
    schema = json.loads((Path(__file__).parent / "grafana_dashboard.schema.json").read_text())
    dash = load_dashboard()
    jsonschema.validate(dash, schema)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dash["panels"]:  # panels do not overlap on Grafana's 24-column grid
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
    cells = [
        (x, y)
        for p in dash["panels"]
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
        for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells)), "overlapping panels"


def test_dashboard_schema_rejects_a_broken_dashboard() -> None:
    """The schema is not a rubber stamp: the usual breakages are caught."""
    schema = json.loads((Path(__file__).parent / "grafana_dashboard.schema.json").read_text())
    for breakage in (
        lambda d: d.pop("uid"),
        lambda d: d["panels"][0].pop("gridPos"),
        lambda d: d["panels"][0]["targets"][0].pop("expr"),
        lambda d: d["panels"][0]["gridPos"].update(w=30),
        lambda d: d["panels"][0].update(type="graphh"),
    ):
        dash = load_dashboard()
        breakage(dash)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(dash, schema)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/run/vdev/web1.sock", "web1"),
        ("/run/vdev/db-2.prod.sock", "db-2.prod"),
        ("/tmp/vm7", "vm7"),
        ("/run/vdev/.sock", ".sock"),  # no stem: the whole name, refused below
    ],
)
def test_name_from_socket_path(path: str, name: str) -> None:
    if name.startswith("."):
        with pytest.raises(Exception, match="bad guest name"):
            name_from_socket_path(path)
    else:
        assert name_from_socket_path(path) == name


@pytest.mark.parametrize("bad", ["", "a/b", "web 1", "-x", "é", "x" * 129, "a\nb"])
def test_bad_guest_names_refused(bad: str) -> None:
    with pytest.raises(Exception, match="bad guest name"):
        check_guest_name(bad)


def test_serve_refuses_bad_names_clearly(tmp_path: Path) -> None:
    for args, message in (
        (["--name", "a/b"], "bad guest name"),
        (["--name", "x", "--name-from-socket"], "either --name or --name-from-socket"),
        (["--socket-count", "2", "--name", "x", "--name", "x"], "--name: guest names must be"),
        # s.sock0 and s.sock1 both say "s": the option that named them is the one blamed
        (["--socket-count", "2", "--name-from-socket"], "--name-from-socket: the sockets"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "vdev", "serve", "--socket-path", str(tmp_path / "s.sock"),
             *args],
            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        )  # fmt: skip
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_version() -> None:
    for cmd in (["vdev"], ["guest_driver"]):
        done = subprocess.run(
            [sys.executable, "-m", *cmd, "--version"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0
        assert done.stdout.split() == [cmd[0].replace("_", "-"), package_version()]


def _json_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.splitlines():
        obj = json.loads(line)  # every line is one JSON object
        assert set(obj) >= JSON_KEYS, obj
        lines.append(obj)
    return lines


async def test_live_names_logs_metrics(tmp_path: Path) -> None:
    """One real vdev serve (named after its socket, JSON logs, metrics over TCP) and one real
    guest-driver: the name is what stat, the API, the metrics and the logs say; the rules'
    and the dashboard's series all exist; the operator change and the policy's targets are
    logged once each with their reason."""
    sock = tmp_path / "web-1.sock"
    log_path = tmp_path / "vdev.log"
    extra = (
        "--name-from-socket", "--log-format", "json", "--metrics-address", "127.0.0.1:0",
        "--host-memory", "4G", "--policy-period", "0.2",
    )  # fmt: skip
    with trio.fail_after(90):
        async with open_vdev(
            sock, api_socket=tmp_path / "vdev.api", log_path=log_path, verbose=0, extra=extra
        ) as proc:
            guest = GuestProcess(str(sock), "64M", str(tmp_path / "guest.log"))
            try:
                async with httpx.AsyncClient(
                    transport=httpx.AsyncHTTPTransport(uds=str(tmp_path / "vdev.api")),
                    base_url="http://vdev",
                ) as api:
                    while True:
                        vms = (await api.get("/vms")).json()["vms"]
                        if vms and all(v["driver_active"] for v in vms):
                            break
                        await trio.sleep(0.05)
                    assert [v["name"] for v in vms] == ["web-1"]
                    r = await api.put("/vms/web-1/target", json={"target_mib": 16})
                    assert r.status_code == 200, r.text
                    while (await api.get("/vms/web-1")).json()["size_pages"] < 4096:
                        await trio.sleep(0.05)
                    r = await api.put("/settings/Mem/CtlMaxPercent", json={"value": 60})
                    assert r.status_code == 200, r.text
                    r = await api.put("/vms/web-1/target", json={"policy": True})
                    assert r.status_code == 200, r.text
                    # the idle simulated host wants no balloon: the policy deflates it
                    while (await api.get("/vms/web-1")).json()["target_pages"] != 0:
                        await trio.sleep(0.05)

                    port = None
                    while port is None:
                        for obj in _json_lines(proc.log()):
                            if obj["message"].startswith("metrics on http://127.0.0.1:"):
                                port = int(obj["message"].rsplit(":", 1)[1].split("/")[0])
                        await trio.sleep(0.05)
                    async with httpx.AsyncClient() as tcp:
                        r = await tcp.get(f"http://127.0.0.1:{port}/metrics")
                        assert r.status_code == 200
                        text = r.text
                        # read-only: nothing but /metrics there
                        assert (await tcp.get(f"http://127.0.0.1:{port}/vms")).status_code == 404
                        bad = await tcp.put(
                            f"http://127.0.0.1:{port}/vms/web-1/target", json={"target_mib": 1}
                        )
                        assert bad.status_code in (404, 405)

                stat = await trio.run_process(
                    [sys.executable, "-m", "vdev", "stat", "--api-socket", str(tmp_path / "vdev.api")],
                    capture_stdout=True, cwd=REPO_ROOT,
                )  # fmt: skip
                assert "web-1" in stat.stdout.decode()
            finally:
                guest.stop()

    have = exposed(text)
    for metric in ("vballoon_vm_balloon_size_bytes", "vballoon_vm_connected", "vballoon_vm_info"):
        assert {s["vm"] for s in have[metric]} == {"web-1"}, metric
    assert have["vballoon_vm_info"] == [{"vm": "web-1", "socket": str(sock)}]
    assert have["vballoon_build_info"] == [{"version": package_version()}]
    assert "process_start_time_seconds" in have
    # Every series the rules and the dashboard read exists (guest stats: a vmw guest reports
    # none; the Linux guest in tests/test_libvirt.py checks them).
    allow = ["vballoon_vm_guest_stat", "vballoon_vm_guest_events_total"]
    assert missing_series(text, allow_empty=allow) == []
    # what Prometheus' own linter says of the exposition (names, types, help)
    lint = subprocess.run(
        [promtool(), "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()

    lines = _json_lines(log_path.read_text())
    assert {o["level"] for o in lines} <= {"debug", "info", "warning", "error", "critical"}
    connected = [o for o in lines if "front-end connected" in o["message"]]
    assert connected and all(o["vm"] == "web-1" for o in connected)
    manual = [o for o in lines if o["event"] == "manual_target"]
    assert len(manual) == 1, manual
    assert manual[0]["vm"] == "web-1" and manual[0]["target_bytes"] == 16 * MIB
    assert manual[0]["source"] == "operator" and manual[0]["reason"] == "manual"
    settings = [o for o in lines if o["event"] == "setting"]
    assert len(settings) == 1 and settings[0]["path"] == "/Mem/CtlMaxPercent"
    assert settings[0]["value"] == 60 and settings[0]["reason"] == "operator"
    assert len([o for o in lines if o["event"] == "policy_target"]) == 1
    # the policy's own change back to 0, once, with its reason; no line for the manual
    # target (already logged as the operator's)
    targets = [o for o in lines if o["event"] == "target"]
    assert targets and all(o["source"] == "policy" and o["reason"] for o in targets), targets
    assert targets[-1]["target_bytes"] == 0
    assert not any(o["target_bytes"] == 16 * MIB for o in targets)
    assert [o["event"] for o in lines].count("host_state") >= 1
    # who changed what: structured, not only in the message
    audits = [o for o in lines if o["logger"] == "vdev.audit"]
    assert audits and all(o["event"] == "audit" for o in audits), audits
    manual_audit = [o for o in audits if o["action"] == "target" and "target_pages" in o]
    assert len(manual_audit) == 1 and manual_audit[0]["vm"] == "web-1", audits
    assert manual_audit[0]["target_pages"] == 16 * MIB // 4096
    assert manual_audit[0]["uid"] == os.getuid() and manual_audit[0]["pid"] > 0
    setting_audit = [o for o in audits if o["action"] == "setting"]
    assert setting_audit and setting_audit[0]["vm"] is None
    assert setting_audit[0]["path"] == "/Mem/CtlMaxPercent"


def test_journald_text_has_priorities(tmp_path: Path) -> None:
    """Under journald ($JOURNAL_STREAM = stderr's device:inode) text lines carry the syslog
    priority and no timestamp of their own."""
    err = tmp_path / "stderr"
    code = (
        "import logging, os, sys\n"
        "from vdev.logs import setup_logging\n"
        "st = os.fstat(2)\n"
        "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
        "setup_logging(logging.INFO, 'text')\n"
        "logging.getLogger('vdev.x').info('hello')\n"
        "logging.getLogger('vdev.x').warning('careful')\n"
        "logging.getLogger('vdev.x').debug('hidden')\n"
    )
    with open(err, "wb") as f:
        subprocess.run(
            [sys.executable, "-c", code], stderr=f, check=True, timeout=60, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip
    assert err.read_text().splitlines() == ["<6>vdev.x: hello", "<4>vdev.x: careful"]


def test_text_lines_name_their_guest() -> None:
    """The text format says which guest a line is about, as the JSON format's ``vm`` does:
    from ``extra``, or from the task's :data:`~vdev.logs.current_vm`; a message that already
    starts with the name is left alone; lines about no guest are unchanged."""
    out = io.StringIO()
    handler = setup_logging(logging.INFO, "text", stream=out)
    try:
        log = logging.getLogger("vdev.policy.control")
        event(log, logging.INFO, "target", "target 0 -> 7 MiB (policy: pressure:soft)", vm="web1")
        event(log, logging.INFO, "target", "target 0 -> 7 MiB (policy: pressure:soft)", vm="db-2")
        token = current_vm.set("web1")
        try:
            log.info("web1: deflated")
            log.warning("front-end connected")
        finally:
            current_vm.reset(token)
        log.info("serving vmw on a.sock")
    finally:
        logging.getLogger().removeHandler(handler)
    messages = [line.split(": ", 1)[1] for line in out.getvalue().splitlines()]
    assert messages == [
        "web1: target 0 -> 7 MiB (policy: pressure:soft)",
        "db-2: target 0 -> 7 MiB (policy: pressure:soft)",
        "web1: deflated",
        "web1: front-end connected",
        "serving vmw on a.sock",
    ]


def test_a_refused_start_under_journald_is_an_error_line(tmp_path: Path) -> None:
    """Under journald a start that fails on a bad option or config file is logged at
    priority 3 (``journalctl -p err`` shows it), not as plain text the journal files as info."""
    err = tmp_path / "stderr"
    config = tmp_path / "vdev.toml"
    config.write_text("[serve]\npolicy_period = 0\n")
    with open(err, "wb") as f:
        st = os.fstat(f.fileno())
        done = subprocess.run(
            [sys.executable, "-m", "vdev", "serve", "--socket-path", str(tmp_path / "s.sock"),
             "--config", str(config)],
            stderr=f, timeout=60, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                 "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        )  # fmt: skip
    assert done.returncode == 2
    assert err.read_text().splitlines() == [
        f"<3>Error: {config}: policy_period must be >= 0.001 seconds, got 0.0"
    ]
