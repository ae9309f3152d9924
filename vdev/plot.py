"""`vdev plot`: a VM's balloon over time from the history ``vdev serve`` keeps in memory
(``GET /vms/{name}/history``), drawn with matplotlib's Agg backend (no display needed).

Top panel: MCTLTGT (target), MCTLSZ (balloon size) and MCTLMAX, in MiB. Bottom panel: the
host's free memory, with the background shaded by host state (high/clear/soft/hard/low).
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

MIB = 1 << 20

STATE_COLOURS = {
    "high": "#e8f5e9",
    "clear": "#e0f7fa",
    "soft": "#fff8e1",
    "hard": "#ffebee",
    "low": "#ffcdd2",
}


def plot_history(history: dict[str, Any], output: str) -> int:
    """Write the PNG; returns the number of points drawn (ValueError if there are none)."""
    points = history.get("points") or []
    if not points:
        raise ValueError(f"no history for {history.get('name')} yet (the policy has not run)")
    page = int(history.get("page_size", 4096))
    t0 = points[0]["t"]
    t = [p["t"] - t0 for p in points]
    target = [p["target_pages"] * page / MIB for p in points]
    size = [p["size_pages"] * page / MIB for p in points]
    maximum = [p["max_pages"] * page / MIB for p in points]
    free = [p["host_free_bytes"] / MIB for p in points]

    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(9, 6), dpi=100, gridspec_kw={"height_ratios": [2, 1]}
    )
    try:
        top.step(t, target, where="post", label="target (MCTLTGT)", color="tab:orange", lw=2)
        top.plot(t, size, label="balloon size (MCTLSZ)", color="tab:blue", lw=2)
        top.plot(t, maximum, label="max (MCTLMAX)", color="tab:gray", ls="--", lw=1)
        top.set_ylabel("MiB")
        top.set_title(f"{history.get('name', '?')}: balloon")
        top.grid(True, alpha=0.3)
        top.legend(loc="upper left", fontsize="small")

        bottom.plot(t, free, color="tab:green", lw=2, label="host free")
        _shade_states(bottom, t, [p["host_state"] for p in points])
        bottom.set_ylabel("host free MiB")
        bottom.set_xlabel(f"seconds since {_clock(t0)}")
        bottom.grid(True, alpha=0.3)
        bottom.legend(loc="upper left", fontsize="small")
        fig.tight_layout()
        fig.savefig(output, format="png")
    finally:
        plt.close(fig)
    return len(points)


def _shade_states(ax: Any, t: list[float], states: list[str]) -> None:
    """Shade each run of equal host states and label it."""
    start = 0
    for i in range(1, len(states) + 1):
        if i < len(states) and states[i] == states[start]:
            continue
        end = t[i] if i < len(t) else t[-1]
        if end > t[start]:
            ax.axvspan(t[start], end, color=STATE_COLOURS.get(states[start], "white"), lw=0)
        ax.text(
            t[start], 0.02, states[start], transform=ax.get_xaxis_transform(), fontsize="x-small"
        )
        start = i


def _clock(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
