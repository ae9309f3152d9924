"""`vdev plot`: a VM's balloon over time from the history ``vdev serve`` keeps in memory
(``GET /vms/{name}/history``), or a recorded overcommit scenario (``--recording``, see
:func:`recording_figure`), drawn with matplotlib's Agg backend (no display needed).

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
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

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
#: the same states as lines on a white background (a recording's host state changes)
STATE_EDGE = {"high": "#2e7d32", "clear": "#00838f", "soft": "#f9a825", "hard": "#c62828",
              "low": "#b71c1c"}  # fmt: skip


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


# --------------------------------------------------------------------------- recordings
#
# A recording (``overcommit.json``, written by the overcommit scenarios: lab/overcommit.py)
# is a list of runs: one scenario under one policy, sampled every 0.1 s, with the policy's
# decisions. ``vdev plot --recording FILE`` draws it; the scenarios draw their chart with
# the same function.


class RecordedVm(BaseModel):
    resident: int  # bytes of the guest's RAM file resident on the host
    balloon: int  # bytes
    target: int  # bytes


class RecordedPoint(BaseModel):
    t: float  # seconds since the run started
    usage: int  # the cgroup's memory usage, bytes
    vms: dict[str, RecordedVm]


class RecordedEvent(BaseModel):
    """``type``: "target" (a decision: ``name``, ``target_pages``, ``reason``), "host" (a
    host state change: ``state``), "backstop" (``action``), "killed" (``name``'s QEMU
    ended), or another control-plane event (kept, drawn as nothing)."""

    model_config = ConfigDict(extra="allow")
    t: float
    type: str
    name: str | None = None
    target_pages: int | None = None
    reason: str | None = None
    state: str | None = None
    action: str | None = None


class RecordedRun(BaseModel):
    model_config = ConfigDict(extra="allow")
    scenario: str
    title: str = ""
    policy: str
    limit_bytes: int
    cgroup_oom_kills: int = 0
    guest_oom_kills: int = 0
    killed: list[str] = []
    timeline: list[RecordedPoint]
    events: list[RecordedEvent] = []


RECORDING = TypeAdapter(list[RecordedRun])
#: one colour per VM, in the order they first appear
VM_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")
BACKSTOP_COLOURS = {"paused": "tab:red", "resumed": "tab:green", "deadline": "black"}


def load_recording(path: str) -> list[RecordedRun]:
    """Read and check a recording; ValueError naming the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    try:
        runs = RECORDING.validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "top level"
        raise ValueError(
            f"{path} is not a scenario recording (a JSON list of runs): at {where}: "
            f"{first['msg']} ({e.error_count()} error(s))"
        ) from None
    if not runs:
        raise ValueError(f"{path}: the recording holds no run")
    return runs


def plot_recording(runs: list[RecordedRun] | list[dict[str, Any]], output: str) -> int:
    """Write the PNG of a recording (one panel per scenario and policy); the panels drawn."""
    checked = RECORDING.validate_python(runs)
    fig = recording_figure(checked)
    try:
        fig.savefig(output, format="png", dpi=90)
    finally:
        plt.close(fig)
    return len(checked)


def recording_figure(runs: list[RecordedRun]) -> Figure:
    """A row per scenario, a column per policy (in the order they first appear). Each panel:
    the cgroup's usage against its limit, each VM's host-resident memory (solid) and balloon
    (dotted), every target the policy set (a marker at the new target, the VM's colour),
    the host state the policy saw (a strip along the top), backstop actions (dash-dotted
    lines), kills (a cross)."""
    if not runs:
        raise ValueError("the recording holds no run")
    scenarios = list(dict.fromkeys(r.scenario for r in runs))
    policies = list(dict.fromkeys(r.policy for r in runs))
    names = list(dict.fromkeys(n for r in runs for p in r.timeline for n in p.vms))
    colour = {n: VM_COLOURS[i % len(VM_COLOURS)] for i, n in enumerate(names)}
    fig, axes = plt.subplots(
        len(scenarios), len(policies), figsize=(5.2 * len(policies), 3.6 * len(scenarios)),
        squeeze=False, sharey=True,
    )  # fmt: skip
    try:
        for ax in axes.flat:
            ax.set_visible(False)
        for r in runs:
            _draw_run(axes[scenarios.index(r.scenario)][policies.index(r.policy)], r, colour)
        handles = [
            Line2D([], [], color="black", lw=2, label="cgroup usage"),
            Line2D([], [], color="black", ls="--", lw=1, label="limit"),
            *(Line2D([], [], color=c, lw=1.2, label=f"{n} resident") for n, c in colour.items()),
            *(Line2D([], [], color=c, ls=":", lw=1, label=f"{n} balloon") for n, c in colour.items()),
            Line2D([], [], color="grey", ls="none", marker="o", ms=3, label="policy target"),
            Line2D([], [], color="grey", ls="none", marker="x", ms=7, label="VM killed"),
            *(Patch(color=c, alpha=0.7, label=f"host {s} (top strip)") for s, c in STATE_EDGE.items()
              if any(e.type == "host" and e.state == s for r in runs for e in r.events)),
        ]  # fmt: skip
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7)
        fig.tight_layout(rect=(0, 0.06 if len(scenarios) > 1 else 0.12, 1, 1))
    except BaseException:
        plt.close(fig)
        raise
    return fig


def _draw_run(ax: Any, r: RecordedRun, colour: dict[str, str]) -> None:
    ax.set_visible(True)
    t = [p.t for p in r.timeline]
    ax.plot(t, [p.usage / MIB for p in r.timeline], color="black", lw=2)
    ax.axhline(r.limit_bytes / MIB, color="black", ls="--", lw=1)
    for name, c in colour.items():
        vms = [p.vms.get(name) for p in r.timeline]
        ax.plot(t, [v.resident / MIB if v else math.nan for v in vms], color=c, lw=1.2)
        ax.plot(t, [v.balloon / MIB if v else math.nan for v in vms], color=c, lw=1, ls=":")
    for e in r.events:
        c = colour.get(e.name or "", "grey")
        if e.type == "target" and e.target_pages is not None:
            ax.plot([e.t], [e.target_pages * 4096 / MIB], ls="none", marker="o", ms=3, color=c)
        elif e.type == "killed":
            ax.plot([e.t], [0], ls="none", marker="x", ms=9, mew=2, color=c, clip_on=False)
        elif e.type == "backstop" and e.action in BACKSTOP_COLOURS:
            ax.axvline(e.t, color=BACKSTOP_COLOURS[e.action], lw=0.8, ls="-.")
    # the host state the policy saw, as a strip along the top (from each change to the next)
    changes = [e for e in r.events if e.type == "host" and e.state]
    end = t[-1] if t else 0.0
    for i, e in enumerate(changes):
        until = changes[i + 1].t if i + 1 < len(changes) else end
        if until > e.t:
            ax.axvspan(e.t, until, ymin=0.94, ymax=1.0, lw=0,
                       color=STATE_EDGE.get(e.state or "", "grey"), alpha=0.7)  # fmt: skip
    kills = r.cgroup_oom_kills + r.guest_oom_kills
    decisions = sum(e.type == "target" for e in r.events)
    ax.set_title(
        f"({r.scenario}) {r.title}\n{r.policy}: {decisions} decision(s), "
        + (f"{kills} OOM kill(s) {','.join(r.killed)}" if kills else "no OOM kill"),
        fontsize=9, color="red" if kills else "black",
    )  # fmt: skip
    ax.set_xlabel("s")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
