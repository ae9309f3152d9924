"""vdev plot's figure: free memory on a symlog scale, short state spans not labelled (the
legend names the colours), no balloon line before the guest connected. ``vdev plot
--recording``: a recorded overcommit scenario, one panel per scenario and policy, with every
decision; a file that is not a recording is refused, naming what is wrong."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.lines import Line2D

from vdev.cli.main import main
from vdev.cli.plot import (
    RECORDING,
    history_figure,
    load_recording,
    plot_history,
    plot_recording,
    recording_figure,
)

MIB = 1 << 20


def history() -> dict[str, object]:
    points = []
    for i in range(300):
        connected = i >= 20  # the guest connects at t = 4 s
        free = 4096 if i < 100 else 150 if i < 103 else 40 if i < 105 else 300
        state = "high" if i < 100 else "hard" if i < 103 else "low" if i < 105 else "soft"
        points.append(
            {
                "t": 1_700_000_000.0 + i * 0.2,
                "target_pages": 20000 if i >= 100 else 0,
                "size_pages": min(max(0, (i - 100) * 500), 20000),
                "max_pages": 42598 if connected else 0,
                "host_free_bytes": free * MIB,
                "host_state": state,
                "connected": connected,
            }
        )
    return {"name": "vm0", "page_size": 4096, "points": points}


def test_figure() -> None:
    fig = history_figure(history())
    try:
        top, bottom = fig.axes
        assert bottom.get_yscale() == "symlog"
        assert bottom.get_ylim()[0] == 0  # a dip towards 0 is not cut off
        lines = {line.get_label(): line for line in top.get_lines()}
        mctlmax = [float(y) for y in lines["max (MCTLMAX)"].get_ydata()]
        assert all(math.isnan(y) for y in mctlmax[:20])  # no guest: a gap, not 0
        assert mctlmax[20] == pytest.approx(42598 * 4096 / MIB)
        labels = [text.get_text().strip() for text in bottom.texts]
        assert labels == ["high", "soft"]  # hard (0.6 s) and low (0.4 s) are too short...
        legend = bottom.get_legend()
        assert legend is not None
        names = [text.get_text() for text in legend.get_texts()]
        assert names == ["host free", "high", "hard", "low", "soft"]  # ...the legend names them
    finally:
        plt.close(fig)


def test_png(tmp_path: Path) -> None:
    png = tmp_path / "vm0.png"
    assert plot_history(history(), str(png)) == 300
    assert matplotlib.image.imread(str(png)).shape == (600, 900, 4)
    with pytest.raises(ValueError, match="no history for vm1"):
        plot_history({"name": "vm1", "points": []}, str(png))


def recording() -> list[dict[str, Any]]:
    """Two scenarios under two policies: under "ours" two decisions and a backstop pause; under
    "none" vm1 is killed at t = 5."""
    runs = []
    for scenario in ("b", "d"):
        for policy in ("ours", "none"):
            timeline = []
            for i in range(100):
                t = i * 0.1
                dead = policy == "none" and t >= 5
                vms = {
                    "vm0": {"resident": (100 + 3 * i) * MIB, "balloon": 0, "target": 0},
                    "vm1": {
                        "resident": 0 if dead else 250 * MIB,
                        "balloon": (40 * MIB if i > 30 else 0) if policy == "ours" else 0,
                        "target": 40 * MIB if policy == "ours" and i > 30 else 0,
                    },
                }
                usage = sum(v["resident"] for v in vms.values())
                timeline.append({"t": t, "usage": usage, "vms": vms})
            events: list[dict[str, Any]] = []
            if policy == "ours":
                events = [
                    {"t": 3.0, "type": "target", "name": "vm1", "target_pages": 10240,
                     "reason": "pressure"},
                    {"t": 3.5, "type": "host", "state": "low", "previous": "high"},
                    {"t": 4.0, "type": "backstop", "action": "paused", "cgroup": "/x"},
                    {"t": 6.0, "type": "target", "name": "vm1", "target_pages": 0,
                     "reason": "deflate"},
                    {"t": 7.0, "type": "futile", "name": "vm1"},
                ]  # fmt: skip
            else:
                events = [{"t": 5.0, "type": "killed", "name": "vm1"}]
            runs.append(
                {
                    "scenario": scenario,
                    "title": "burst" if scenario == "b" else "pressure ends",
                    "policy": policy,
                    "limit_bytes": 500 * MIB,
                    "cgroup_oom_kills": int(policy == "none"),
                    "guest_oom_kills": 0,
                    "killed": ["vm1"] if policy == "none" else [],
                    "busy_seconds": 4.2,  # extra fields (the table's) are kept, not drawn
                    "timeline": timeline,
                    "events": events,
                }
            )
    return runs


def _first_xy(line: Line2D) -> tuple[float, float]:
    x = np.asarray(line.get_xdata(), dtype=float)
    y = np.asarray(line.get_ydata(), dtype=float)
    return float(x[0]), float(y[0])


def test_recording_figure() -> None:
    fig = recording_figure(RECORDING.validate_python(recording()))
    try:
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert len(panels) == 4  # 2 scenarios x 2 policies
        ours, none = panels[0], panels[1]
        assert "ours: 2 decision(s), no OOM kill" in ours.get_title()
        assert "none: 0 decision(s), 1 OOM kill(s) vm1" in none.get_title()
        # usage, the limit, vm0 and vm1 resident and balloon, and the two decisions
        markers = [ln for ln in ours.get_lines() if ln.get_marker() == "o"]
        assert [_first_xy(m) for m in markers] == [
            (3.0, 40.0),
            (6.0, 0.0),
        ]
        limit = [ln for ln in ours.get_lines() if ln.get_linestyle() == "--"]
        assert _first_xy(limit[0])[1] == 500.0
        kills = [ln for ln in none.get_lines() if ln.get_marker() == "x"]
        assert len(kills) == 1 and _first_xy(kills[0])[0] == 5.0
        strip = [p for p in ours.patches if p.get_y() == pytest.approx(0.94)]
        assert [(p.get_x(), p.get_width()) for p in strip] == [
            (3.5, pytest.approx(9.9 - 3.5))  # the host state change, until the end
        ]
        legend = fig.legends[0]
        names = [t.get_text() for t in legend.get_texts()]
        for name in (
            "cgroup usage", "limit", "vm1 resident", "vm1 balloon", "policy target",
            "VM killed", "host low (top strip)",
        ):  # fmt: skip
            assert name in names
    finally:
        plt.close(fig)


def test_vdev_plot_recording(tmp_path: Path) -> None:
    src = tmp_path / "overcommit.json"
    src.write_text(json.dumps(recording()))
    png = tmp_path / "scenario.png"
    r = CliRunner().invoke(main, ["plot", "--recording", str(src), "-o", str(png)])
    assert r.exit_code == 0, r.output
    assert "4 run(s)" in r.output
    assert matplotlib.image.imread(str(png)).shape[2] == 4
    assert plot_recording(load_recording(str(src)), str(tmp_path / "again.png")) == 4


def _without_limit() -> list[dict[str, Any]]:
    runs = recording()
    del runs[1]["limit_bytes"]
    return runs


def _bad_point() -> list[dict[str, Any]]:
    runs = recording()
    runs[0]["timeline"][3]["vms"]["vm1"]["balloon"] = "lots"
    return runs


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "not a scenario recording"),
        ("{not json", "not a scenario recording"),
        (json.dumps({"scenario": "b"}), "not a scenario recording"),
        (json.dumps([]), "holds no run"),
        (json.dumps(_without_limit()), "at 1.limit_bytes: Field required"),
        (json.dumps(_bad_point()), "at 0.timeline.3.vms.vm1.balloon"),
    ],
)
def test_vdev_plot_bad_recording(tmp_path: Path, content: str, message: str) -> None:
    src = tmp_path / "bad.json"
    src.write_text(content)
    r = CliRunner().invoke(main, ["plot", "--recording", str(src), "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 1
    assert message in r.output and str(src) in r.output
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vm0", "--recording", "r.json"], "give no VM"),
        (["--last", "3", "--recording", "r.json"], "give no VM"),
        ([], "give the VM to plot"),
    ],
)
def test_vdev_plot_usage(tmp_path: Path, args: list[str], message: str) -> None:
    r = CliRunner().invoke(main, ["plot", *args, "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and message in r.output


def test_vdev_plot_missing_recording(tmp_path: Path) -> None:
    missing = tmp_path / "none.json"
    r = CliRunner().invoke(main, ["plot", "--recording", str(missing), "-o", "x.png"])
    assert r.exit_code == 1 and f"cannot read {missing}" in r.output


@pytest.mark.parametrize(
    ("output", "status", "message"),
    [
        ("/nonexistent-vballoon/p.png", 2, "/nonexistent-vballoon is not a directory"),
        ("{tmp}/file/p.png", 2, "/file is not a directory"),
        ("{tmp}/none/deeper/p.png", 2, "/none/deeper is not a directory"),
        ("/dev/full", 1, "cannot write /dev/full: No space left on device"),
    ],
)
def test_vdev_plot_unwritable_output(
    tmp_path: Path, output: str, status: int, message: str
) -> None:
    """A PNG that cannot be written is an error naming it, not a traceback."""
    src = tmp_path / "overcommit.json"
    src.write_text(json.dumps(recording()))
    (tmp_path / "file").write_text("")
    out = output.format(tmp=tmp_path)
    r = CliRunner().invoke(main, ["plot", "--recording", str(src), "-o", out])
    assert r.exit_code == status, (r.output, r.exception)
    assert isinstance(r.exception, SystemExit)
    assert message in r.output
    if status == 2:
        assert "'--output'" in r.output
