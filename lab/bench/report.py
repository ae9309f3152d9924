"""Ratios, targets, the table, the JSON clean-up and the charts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lab.bench.system import GIB
from protocol.units import PAGE_SIZE

KIB = 1024


def compiled(out: dict[str, Any]) -> bool:
    """Did every raw measurement of the run have the compiled helper's figures?"""
    runs = [out[k] for k in ("raw", "raw_end") if k in out]
    return bool(runs) and all(r.get("compiled", {}).get("available") for r in runs)


def _limit(out: dict[str, Any], kind: str) -> float:
    """A raw limit in pages/s: the largest measurement of the run (start and end; the
    compiled helper's and Python's), so that every ratio is conservative. The compiled
    figures are the kernel's; a Python figure can only be larger by the machine's noise."""
    runs = [out[k] for k in ("raw", "raw_end") if k in out]
    vals = [r[kind]["pages_per_s"] for r in runs]
    if compiled(out):
        vals += [r["compiled"][kind]["pages_per_s"] for r in runs]
    return max(vals)


def _ratio(x: float, y: float) -> float:
    return x / y if y and math.isfinite(x) and math.isfinite(y) else math.nan


def derive(out: dict[str, Any]) -> None:
    """Adds ``limits``, ``ratios`` and ``targets`` to the results."""
    contiguous = _limit(out, "contiguous")
    per_page = _limit(out, "per_page")
    out["limits"] = {
        "contiguous_pages_per_s": contiguous,
        "contiguous_gib_per_s": contiguous * PAGE_SIZE / GIB,
        "per_page_pages_per_s": per_page,
        "per_page_gib_per_s": per_page * PAGE_SIZE / GIB,
        "basis": "compiled" if compiled(out) else "python (no compiler: Python-loop limits)",
        "python_contiguous_pages_per_s": max(
            out[k]["contiguous"]["pages_per_s"] for k in ("raw", "raw_end") if k in out
        ),
        "python_per_page_pages_per_s": max(
            out[k]["per_page"]["pages_per_s"] for k in ("raw", "raw_end") if k in out
        ),
    }
    ratios: dict[str, float] = {}
    for mode, res in out.get("throughput", {}).items():
        for way in ("inflate", "deflate"):
            v = res[way]["pages_per_s"]
            ratios[f"{mode} {way} / contiguous"] = _ratio(v, contiguous)
            ratios[f"{mode} {way} / per-page"] = _ratio(v, per_page)
            res[way]["ratio_contiguous"] = ratios[f"{mode} {way} / contiguous"]
            res[way]["ratio_per_page"] = ratios[f"{mode} {way} / per-page"]
            near = res.get("limits_beside")
            if near:  # the limits measured just before and after this case
                for kind, key in (("contiguous", "contiguous"), ("per_page", "per-page")):
                    r = _ratio(v, near[f"{kind}_pages_per_s"])
                    ratios[f"{mode} {way} / {key} beside"] = r
                    res[way][f"ratio_{kind}_beside"] = r
    for row in out.get("batch_sweep", []) + out.get("size_sweep", []) + out.get("in_flight", []):
        row["inflate"]["ratio_contiguous"] = _ratio(row["inflate"]["pages_per_s"], contiguous)
        row["deflate"]["ratio_contiguous"] = _ratio(row["deflate"]["pages_per_s"], contiguous)
    scale = {row["guests"]: row for row in out.get("scale", [])}
    if scale:
        one = scale[min(scale)]["aggregate_pages_per_s"]
        for n, row in scale.items():
            row["aggregate_vs_one_guest"] = _ratio(row["aggregate_pages_per_s"], one)
            ratios[f"{n} guests aggregate / 1 guest"] = row["aggregate_vs_one_guest"]
    cost = out.get("cost", [])
    if len(cost) >= 2:
        g = np.array([c["guest_bytes"] / GIB for c in cost])
        rss = np.array([c["rss_after"] for c in cost], dtype=float)
        anon = np.array([c["rss_anon_after"] for c in cost], dtype=float)
        slope, base = np.polyfit(g, rss, 1)
        slope_anon, _ = np.polyfit(g, anon, 1)
        fixed = [c["fixed_vdev_cpu_s_per_gib"] for c in cost]
        out["cost_fit"] = {
            "rss_bytes_per_guest_gib": float(slope),
            "rss_anon_bytes_per_guest_gib": float(slope_anon),
            "rss_base_bytes": float(base),
            "fixed_cpu_s_per_gib_min": min(fixed),
            "fixed_cpu_s_per_gib_max": max(fixed),
            "fixed_cpu_spread": _ratio(max(fixed), min(fixed)),
        }
        ratios["vdev CPU per GiB, largest / smallest guest (same pages moved)"] = out["cost_fit"][
            "fixed_cpu_spread"
        ]
    out["ratios"] = ratios
    out["targets"] = targets(out)


def _target(name: str, value: float, goal: float, higher: bool, unit: str) -> dict[str, Any]:
    met = (value >= goal if higher else value <= goal) if math.isfinite(value) else False
    return {
        "target": name,
        "value": value,
        "goal": goal,
        "op": ">=" if higher else "<=",
        "unit": unit,
        "met": bool(met),
    }


def targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    t: list[dict[str, Any]] = []
    tp = out.get("throughput", {})
    # (case, way, limit, goal): issue 16's throughput goals; each against the run's limits
    # (start and end of the run) and, when measured, the limits taken beside the case
    goals = (
        ("2M", "inflate", "contiguous", 0.9),
        ("2M", "deflate", "contiguous", 0.5),
        ("4K-contiguous", "inflate", "contiguous", 0.6),
        ("4K-scattered", "inflate", "per_page", 1.0),
    )
    what = {"2M": "2 MiB", "4K-contiguous": "4 KiB contiguous", "4K-scattered": "4 KiB scattered"}
    for mode, way, kind, goal in goals:
        if mode not in tp:
            continue
        res = tp[mode][way]
        label = f"{what[mode]} {way} / {kind.replace('_', '-')} limit"
        t.append(_target(label, res[f"ratio_{kind}"], goal, True, "ratio"))
        if f"ratio_{kind}_beside" in res:
            t.append(
                _target(
                    f"{label} beside the case", res[f"ratio_{kind}_beside"], goal, True, "ratio"
                )
            )
    for r in out.get("reaction", {}).values():
        if r["mechanism"] != "doorbell":
            continue
        if r["page_size"] == "4K":
            t.append(
                _target(
                    "doorbell reaction p99 (API call -> first 2 MiB LOCK batch done)",
                    r["first_lock"]["p99_ms"],
                    5.0,
                    False,
                    "ms",
                )
            )
        else:
            t.append(
                _target(
                    f"doorbell: {r['balloon_bytes'] / GIB:g} GiB reclaimed, p99",
                    r["reached"]["p99_ms"],
                    1000.0,
                    False,
                    "ms",
                )
            )
    fit = out.get("cost_fit")
    if fit:
        t.append(
            _target(
                "vdev RSS per GiB of guest RAM (fit slope)",
                fit["rss_bytes_per_guest_gib"] / KIB,
                64.0,
                False,
                "KiB/GiB",
            )
        )
        t.append(
            _target(
                "vdev CPU/GiB independent of guest size (max/min, same pages)",
                fit["fixed_cpu_spread"],
                1.5,
                False,
                "ratio",
            )
        )
    scale = {row["guests"]: row for row in out.get("scale", [])}
    big = max(scale) if scale else None
    if big and big > 1:
        t.append(
            _target(
                f"{big} guests aggregate / 1 guest",
                scale[big]["aggregate_vs_one_guest"],
                0.7,
                True,
                "ratio",
            )
        )
        t.append(_target(f"{big} guests Jain fairness", scale[big]["jain"], 0.9, True, "index"))
    return t


# ---------------------------------------------------------------------------------------
# The table


def _fmt_rate(pages_s: float) -> str:
    if not math.isfinite(pages_s):
        return "-"
    return f"{pages_s / 1e3:,.0f}k p/s  {pages_s * PAGE_SIZE / GIB:.2f} GiB/s"


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %" if math.isfinite(x) else "-"


def table(out: dict[str, Any]) -> str:
    """Print the rich table to the terminal; return it as plain text."""
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=120)
    m, v = out["machine"], out["versions"]
    console.print(
        f"[bold]vballoon bench[/bold] {'(quick)' if out.get('quick') else '(full)'} "
        f"{out['started']}  {m['cpu_model']}, {m['cores']} cores, "
        f"{m['memory_bytes'] / GIB:.0f} GiB, Linux {m['kernel']}; Python {v['python']}, "
        f"numpy {v['numpy']}, trio {v['trio']}, QEMU {v['qemu']}; "
        f"load {m.get('loadavg_at_start')} -> {m.get('loadavg_at_end')}; "
        f"{out.get('duration_s', 0):.0f} s"
    )
    lim = out["limits"]
    t = Table(
        title=f"Raw limits (same run; max of start and end; ratios use: {lim['basis']})",
        show_lines=False,
    )
    t.add_column("limit")
    t.add_column("compiled", justify="right")
    t.add_column("Python", justify="right")
    t.add_column("detail")
    rc = out["raw"]["contiguous"]
    comp = out["raw"].get("compiled", {})
    cv = comp.get("variants", {}) if comp.get("available") else {}

    def c_rate(name: str) -> str:
        v = cv.get(name, {})
        if "pages_per_s" in v:
            return _fmt_rate(v["pages_per_s"])
        return v.get("error", "-")

    t.add_row(
        "contiguous (touched memfd, large ranges)",
        _fmt_rate(comp["contiguous"]["pages_per_s"]) if cv else "-",
        _fmt_rate(lim["python_contiguous_pages_per_s"]),
        f"best at start: {comp['contiguous']['best'] if cv else rc['best']}",
    )
    t.add_row(
        "one call per isolated 4 KiB page",
        _fmt_rate(comp["per_page"]["pages_per_s"]) if cv else "-",
        _fmt_rate(lim["python_per_page_pages_per_s"]),
        f"best at start: {comp['per_page']['best']}" if cv else "madvise, Python loop",
    )
    if cv:
        for name, what in (
            ("madvise_per_page", "  madvise per page"),
            ("fallocate_per_page", "  fallocate per page"),
            ("madvise_per_page_2_threads", "  madvise per page, 2 threads"),
            ("io_uring_madvise_per_page", "  io_uring MADVISE, 512 per submit"),
            ("process_madvise_per_page", "  process_madvise, 1024 per call"),
        ):
            t.add_row(what, c_rate(name), "", "")
        # the guest's topology: pages written through another process's mapping (not limits)
        for name, what in (
            ("fallocate_2MiB_guest_asleep", "2 MiB calls, pages written by a guest asleep"),
            ("fallocate_2MiB_guest_running", "  ... by a guest running on the other CPU"),
            ("fallocate_per_page_guest_asleep", "per page, written by a guest asleep"),
            ("fallocate_per_page_guest_running", "  ... by a guest running on the other CPU"),
            ("process_madvise_per_page_guest_running", "  ... process_madvise, guest running"),
        ):
            if name in comp["variants"]:
                t.add_row(what, c_rate(name), "", "TLB shootdowns: not a limit")
    else:
        t.add_row("compiled helper", "-", "", comp.get("reason", "not run"))
    console.print(t)

    t = Table(title="1. Throughput, end to end (median of reps)")
    for col in (
        "case",
        "inflate",
        "/contig",
        "/per-page",
        "deflate",
        "/contig",
        "vdev CPU s/GiB",
        "st_blocks",
    ):
        t.add_column(col, justify="right" if col != "case" else "left")
    for mode, r in out["throughput"].items():
        i, d = r["inflate"], r["deflate"]
        t.add_row(
            mode,
            _fmt_rate(i["pages_per_s"]),
            _pct(i["ratio_contiguous"]),
            _pct(i["ratio_per_page"]),
            _fmt_rate(d["pages_per_s"]),
            _pct(d["ratio_contiguous"]),
            f"{i['vdev_cpu_s_per_gib']:.2f}",
            "ok" if i["verified_st_blocks"] else "NOT FREED",
        )
    console.print(t)
    near = {m: r["limits_beside"] for m, r in out["throughput"].items() if r.get("limits_beside")}
    if near:
        t = Table(title="1a. The same cases against the limits measured just before and after each")
        for col in (
            "case",
            "contiguous limit",
            "inflate /contig",
            "per-page limit",
            "inflate /per-page",
            "deflate /contig",
        ):
            t.add_column(col, justify="right" if col != "case" else "left")
        for mode, lim in near.items():
            i, d = out["throughput"][mode]["inflate"], out["throughput"][mode]["deflate"]
            t.add_row(
                mode,
                _fmt_rate(lim["contiguous_pages_per_s"]),
                _pct(i["ratio_contiguous_beside"]),
                _fmt_rate(lim["per_page_pages_per_s"]),
                _pct(i["ratio_per_page_beside"]),
                _pct(d["ratio_contiguous_beside"]),
            )
        console.print(t)

    t = Table(title="1b. Inflate vs batch size and guest size")
    for col in ("mode", "batch", "guest", "balloon", "inflate", "/contig", "deflate"):
        t.add_column(col, justify="right" if col != "mode" else "left")
    for r in out.get("batch_sweep", []) + out.get("size_sweep", []):
        t.add_row(
            r["mode"],
            str(r["batch_entries"]),
            f"{r['guest_bytes'] / GIB:.2f} GiB",
            f"{r['balloon_bytes'] >> 20} MiB",
            _fmt_rate(r["inflate"]["pages_per_s"]),
            _pct(r["inflate"]["ratio_contiguous"]),
            _fmt_rate(r["deflate"]["pages_per_s"]),
        )
    console.print(t)

    if out.get("in_flight"):
        t = Table(
            title="1c. LOCK batches in flight (driver in_flight; 1 = vmw_balloon's one at a "
            "time), interleaved A/B in this run"
        )
        for col in ("mode", "in flight", "balloon", "inflate", "/contig", "/per-page",
                    "vdev CPU s/GiB", "st_blocks"):  # fmt: skip
            t.add_column(col, justify="right" if col != "mode" else "left")
        for r in out["in_flight"]:
            i = r["inflate"]
            t.add_row(
                r["mode"],
                str(r["in_flight"]),
                f"{r['balloon_bytes'] >> 20} MiB",
                _fmt_rate(i["pages_per_s"]),
                _pct(i["ratio_contiguous"]),
                _pct(_ratio(i["pages_per_s"], out["limits"]["per_page_pages_per_s"])),
                f"{i['vdev_cpu_s_per_gib']:.2f}",
                "ok" if i["verified_st_blocks"] else "NOT FREED",
            )
        console.print(t)

    t = Table(title="2. Reaction latency (API call -> device-side size events)")
    for col in (
        "mechanism",
        "changes",
        "first LOCK p50",
        "p99",
        "reached p50",
        "p99",
        "deflated p50",
        "p99",
    ):
        t.add_column(col, justify="right" if col != "mechanism" else "left")
    for mech, r in out.get("reaction", {}).items():
        t.add_row(
            mech,
            str(r["changes"]),
            f"{r['first_lock']['p50_ms']:.1f} ms",
            f"{r['first_lock']['p99_ms']:.1f} ms",
            f"{r['reached']['p50_ms']:.1f} ms",
            f"{r['reached']['p99_ms']:.1f} ms",
            f"{r['deflate_reached']['p50_ms']:.1f} ms",
            f"{r['deflate_reached']['p99_ms']:.1f} ms",
        )
    console.print(t)

    t = Table(title="3. Cost (fresh vdev per guest; sparse memfd; 4 KiB pages; half ballooned)")
    for col in (
        "guest",
        "RSS base",
        "RSS after",
        "RssAnon after",
        "delta/GiB guest",
        "CPU s/GiB (first fixed)",
        "CPU s/GiB (all)",
    ):
        t.add_column(col, justify="right")
    for c in out.get("cost", []):
        t.add_row(
            f"{c['guest_bytes'] / GIB:.0f} GiB",
            f"{c['rss_base'] / 2**20:.1f} MiB",
            f"{c['rss_after'] / 2**20:.1f} MiB",
            f"{c['rss_anon_after'] / 2**20:.1f} MiB",
            f"{c['rss_delta_per_guest_gib'] / KIB:.0f} KiB",
            f"{c['fixed_vdev_cpu_s_per_gib']:.2f}",
            f"{c['vdev_cpu_s_per_gib']:.2f}",
        )
    if "cost_fit" in out:
        f = out["cost_fit"]
        t.caption = (
            f"fit: {f['rss_bytes_per_guest_gib'] / KIB:.1f} KiB RSS per GiB of guest "
            f"(RssAnon {f['rss_anon_bytes_per_guest_gib'] / KIB:.1f}), "
            f"base {f['rss_base_bytes'] / 2**20:.1f} MiB"
        )
    console.print(t)

    t = Table(title="4. Scale: guests inflating at once on one vdev (4 KiB contiguous)")
    for col in ("guests", "aggregate", "vs 1 guest", "per-guest min", "per-guest max", "Jain"):
        t.add_column(col, justify="right")
    for r in out.get("scale", []):
        per = r["per_guest_pages_per_s"]
        t.add_row(
            str(r["guests"]),
            _fmt_rate(r["aggregate_pages_per_s"]),
            _pct(r.get("aggregate_vs_one_guest", math.nan)),
            f"{min(per) / 1e3:,.0f}k p/s",
            f"{max(per) / 1e3:,.0f}k p/s",
            f"{r['jain']:.3f}",
        )
    console.print(t)

    t = Table(title="5. Protocol overhead")
    t.add_column("figure")
    t.add_column("value", justify="right")
    pr = out["protocol"]["get_target_e2e"]
    t.add_row(
        "GET_TARGET round trips over vhost-user",
        f"{pr['per_s']:,.0f}/s (p50 {pr['p50_us']:.0f} us, p99 {pr['p99_us']:.0f} us)",
    )
    for kind, r in out["model"]["batched_lock"].items():
        t.add_row(
            f"model only: BATCHED_LOCK of 512 ({kind})",
            f"{r['lock_batches_per_s']:,.0f}/s ({r['lock_entries_per_s'] / 1e3:,.0f}k entries/s)",
        )
    t.add_row(
        "model only: GET_TARGET handle()", f"{out['model']['get_target']['handle_per_s']:,.0f}/s"
    )
    console.print(t)

    t = Table(title="Targets")
    for col in ("target", "value", "goal", "met"):
        t.add_column(col, justify="right" if col != "target" else "left")
    for x in out["targets"]:
        val = x["value"]
        shown = (
            _pct(val)
            if x["unit"] == "ratio" and "max/min" not in x["target"]
            else (f"{val:.3f}" if x["unit"] in ("ratio", "index") else f"{val:.1f} {x['unit']}")
        )
        goal = (
            f"{x['op']} {_pct(x['goal'])}"
            if x["unit"] == "ratio" and "max/min" not in x["target"]
            else f"{x['op']} {x['goal']:g} {x['unit']}"
        )
        t.add_row(
            x["target"], shown, goal, "[green]met[/green]" if x["met"] else "[red]MISSED[/red]"
        )
    console.print(t)
    return console.export_text()


# ---------------------------------------------------------------------------------------
# JSON


def clean(x: Any) -> Any:
    """NaN/inf to None, private keys dropped, numpy scalars to Python."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, list | tuple):
        return [clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---------------------------------------------------------------------------------------
# Charts


def plots(out: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    lim = out["limits"]
    written: list[Path] = []

    def limits(ax: Any) -> None:
        ax.axhline(lim["contiguous_gib_per_s"], color="k", ls="--", lw=1, label="raw contiguous")
        ax.axhline(lim["per_page_gib_per_s"], color="grey", ls=":", lw=1, label="raw 1 call/page")

    def save(fig: Any, name: str) -> None:
        path = outdir / name
        fig.tight_layout()
        fig.savefig(path, dpi=72)
        plt.close(fig)
        written.append(path)

    gib_s = PAGE_SIZE / GIB
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for mode in ("2M", "4K-contiguous"):
        rows = [r for r in out.get("batch_sweep", []) if r["mode"] == mode]
        if rows:
            ax.plot(
                [r["batch_entries"] for r in rows],
                [r["inflate"]["pages_per_s"] * gib_s for r in rows],
                "o-",
                label=f"{mode} inflate",
            )
            ax.plot(
                [r["batch_entries"] for r in rows],
                [r["deflate"]["pages_per_s"] * gib_s for r in rows],
                "x:",
                label=f"{mode} deflate",
            )
    limits(ax)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("entries per batch")
    ax.set_ylabel("GiB/s")
    ax.set_title("Throughput vs batch size")
    ax.legend(fontsize=7)
    save(fig, "throughput_vs_batch.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for mode in ("2M", "4K-contiguous"):
        rows = [r for r in out.get("size_sweep", []) if r["mode"] == mode]
        if rows:
            ax.plot(
                [r["guest_bytes"] / GIB for r in rows],
                [r["inflate"]["pages_per_s"] * gib_s for r in rows],
                "o-",
                label=f"{mode} inflate",
            )
    limits(ax)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("guest RAM (GiB), same balloon size")
    ax.set_ylabel("GiB/s")
    ax.set_title("Throughput vs guest size")
    ax.legend(fontsize=7)
    save(fig, "throughput_vs_guest_size.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    rows = out.get("scale", [])
    if rows:
        n = [r["guests"] for r in rows]
        ax.plot(n, [r["aggregate_pages_per_s"] * gib_s for r in rows], "o-", label="aggregate")
        for r in rows:
            ax.scatter(
                [r["guests"]] * len(r["per_guest_pages_per_s"]),
                np.array(r["per_guest_pages_per_s"]) * gib_s,
                s=6,
                color="C1",
            )
            ax.annotate(
                f"Jain {r['jain']:.2f}",
                (r["guests"], r["aggregate_pages_per_s"] * gib_s),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, 4),
            )
        ax.scatter([], [], s=6, color="C1", label="per guest")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel("guests inflating at once")
    ax.set_ylabel("GiB/s")
    ax.set_title("Throughput vs guest count (4 KiB contiguous)")
    ax.legend(fontsize=7)
    save(fig, "throughput_vs_guests.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (mech, r) in enumerate(out.get("reaction", {}).items()):
        # 2 MiB pages: one LOCK batch is the whole change (first == reached)
        whats = (("reached", "--"),) if r["page_size"] == "2M" else (("first_lock", "-"),)
        for what, ls in whats:
            xs = np.sort(np.asarray(r[what]["samples_ms"], dtype=float))
            if xs.size:
                ax.plot(
                    xs,
                    np.arange(1, xs.size + 1) / xs.size,
                    ls,
                    color=f"C{i}",
                    label=f"{mech}: {what.replace('_', ' ')}",
                    lw=1,
                )
    ax.set_xscale("log")
    ax.set_xlabel("ms after the API call")
    ax.set_ylabel("fraction of changes")
    ax.set_title("Reaction latency (CDF)")
    ax.legend(fontsize=7)
    save(fig, "latency.png")

    cost = out.get("cost", [])
    if cost:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        g = [c["guest_bytes"] / GIB for c in cost]
        ax.plot(g, [c["rss_after"] / 2**20 for c in cost], "o-", label="VmRSS")
        ax.plot(g, [c["rss_anon_after"] / 2**20 for c in cost], "x--", label="RssAnon")
        ax.plot(g, [c["rss_base"] / 2**20 for c in cost], ":", color="grey", label="before guest")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("guest RAM (GiB), half ballooned")
        ax.set_ylabel("vdev MiB")
        ax.set_title("vdev resident memory")
        ax.legend(fontsize=7)
        save(fig, "cost_rss.png")
    return written
