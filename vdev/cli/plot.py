"""`vdev plot`: a VM's balloon over time from the history ``vdev serve`` keeps in memory
(``GET /vms/{name}/history``), drawn with matplotlib's Agg backend (no display needed).

Top panel: MCTLTGT (target), MCTLSZ (balloon size) and MCTLMAX, in MiB, only while a guest
was connected (points without one are gaps, not zeros). Bottom panel: the host's free
memory on a symlog scale (linear below :data:`LINTHRESH_MIB`, logarithmic above), so that
short dips towards minFree show as clearly as the plateaus, with the background shaded by
host state (high/clear/soft/hard/low): a legend names the colours, and only spans wide
enough for their name are labelled.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Patch

MIB = 1 << 20
#: The free-memory axis is linear below this many MiB (symlog), logarithmic above.
LINTHRESH_MIB = 100
#: A state span gets a text label only if it is at least this fraction of the time axis.
LABEL_MIN_FRACTION = 0.06

STATE_COLOURS = {
    "high": "#e8f5e9",
    "clear": "#e0f7fa",
    "soft": "#fff8e1",
    "hard": "#ffebee",
    "low": "#ffcdd2",
}


def plot_history(history: dict[str, Any], output: str) -> int:
    """Write the PNG; returns the number of points drawn (ValueError if there are none)."""
    fig = history_figure(history)
    try:
        fig.savefig(output, format="png")
    finally:
        plt.close(fig)
    return len(history["points"])


def history_figure(history: dict[str, Any]) -> Figure:
    """The two-panel figure (the caller closes it: ``plt.close(fig)``)."""
    points = history.get("points") or []
    if not points:
        raise ValueError(f"no history for {history.get('name')} yet (the policy has not run)")
    page = int(history.get("page_size", 4096))
    t0 = points[0]["t"]
    t = [p["t"] - t0 for p in points]

    def balloon(key: str) -> list[float]:  # NaN (a gap) while no guest was connected
        return [p[key] * page / MIB if p.get("connected", True) else math.nan for p in points]

    free = [p["host_free_bytes"] / MIB for p in points]

    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(9, 6), dpi=100, gridspec_kw={"height_ratios": [2, 1]}
    )
    try:
        top.step(
            t, balloon("target_pages"), where="post", label="target (MCTLTGT)",
            color="tab:orange", lw=2,
        )  # fmt: skip
        top.plot(t, balloon("size_pages"), label="balloon size (MCTLSZ)", color="tab:blue", lw=2)
        top.plot(t, balloon("max_pages"), label="max (MCTLMAX)", color="tab:gray", ls="--", lw=1)
        top.set_ylabel("MiB")
        top.set_title(f"{history.get('name', '?')}: balloon")
        top.grid(True, alpha=0.3)
        top.legend(loc="best", fontsize="small")

        bottom.plot(t, free, color="tab:green", lw=2, label="host free")
        shown = _shade_states(bottom, t, [p["host_state"] for p in points])
        bottom.set_yscale("symlog", linthresh=LINTHRESH_MIB)
        bottom.set_ylim(0, max(max(free), LINTHRESH_MIB) * 2)  # 0 at the bottom: no dip cut
        bottom.set_ylabel("host free MiB")
        bottom.set_xlabel(f"seconds since {_clock(t0)}")
        bottom.grid(True, alpha=0.3)
        handles, _ = bottom.get_legend_handles_labels()
        handles += [
            Patch(facecolor=STATE_COLOURS.get(s, "white"), edgecolor="#999999", lw=0.5, label=s)
            for s in shown
        ]
        bottom.legend(handles=handles, loc="best", fontsize="x-small", ncol=len(handles))
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return fig


def _shade_states(ax: Any, t: list[float], states: list[str]) -> list[str]:
    """Shade each run of equal host states; label the runs wide enough for their name.
    Returns the states shaded, in order of first appearance (for the legend)."""
    span = (t[-1] - t[0]) or 1.0
    shown: list[str] = []
    start = 0
    for i in range(1, len(states) + 1):
        if i < len(states) and states[i] == states[start]:
            continue
        state = states[start]
        end = t[i] if i < len(t) else t[-1]
        if end > t[start]:
            ax.axvspan(t[start], end, color=STATE_COLOURS.get(state, "white"), lw=0)
            if state not in shown:
                shown.append(state)
            if (end - t[start]) / span >= LABEL_MIN_FRACTION:
                ax.text(
                    t[start], 0.96, f" {state}", transform=ax.get_xaxis_transform(),
                    fontsize="x-small", va="top",
                )  # fmt: skip
        start = i
    return shown


def _clock(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
