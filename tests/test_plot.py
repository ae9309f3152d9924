"""vdev plot's figure: free memory on a symlog scale, short state spans not labelled (the
legend names the colours), no balloon line before the guest connected."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import pytest

from vdev.cli.plot import history_figure, plot_history

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
