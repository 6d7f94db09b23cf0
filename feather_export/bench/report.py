"""Presenting a bench report: the terminal table and the PNG plots (matplotlib, optional extra)."""
from __future__ import annotations

from pathlib import Path

from feather_export.errors import FeatherError


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:,.1f}"


def _x(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def format_table(report: dict) -> str:
    """Measured (median, p10-p90) next to FLOPs, roofline prediction, measured/predicted and the
    speed-up against ``none`` (measured, and predicted from FLOPs / roofline)."""
    dev = report["device"]
    peak = dev["peak_flops"].get(report["dtype"]) or next(iter(dev["peak_flops"].values()))
    lines = [
        f"model {report['model']} ({report['dtype']}), backend {report['backend']}, "
        f"{report['prompt_tokens']} prompt tokens ({report['text_tokens']} text), "
        f"{report['options']['repeats']} repeats after {report['options']['warmup']} warm-up, "
        f"interleaved",
        f"roofline device: {dev['name']}: peak {peak / 1e9:,.1f} GFLOP/s, "
        f"bandwidth {dev['bandwidth'] / 1e9:,.1f} GB/s ({dev['key']})",
    ]
    cont = report.get("contention") or {}
    if cont.get("loadavg_1m") and cont.get("process_cpu_per_wall_s"):
        lines.append(f"machine load during runs: load average {cont['loadavg_1m']['median']:.2f} "
                     f"(median) on {cont['cpus']} CPUs; this process used "
                     f"{cont['process_cpu_per_wall_s']['median']:.2f} CPU-s per wall-s")
    lines.append("")
    header = (f"{'target':<16} {'row':<24} {'n':>3} {'median ms':>11} {'p10-p90 ms':>19} "
              f"{'GFLOP':>9} {'pred ms':>9} {'meas/pred':>9} {'speed-up':>9} "
              f"{'p10-p90':>13} {'FLOPs pred':>10} {'roofl pred':>10}")
    lines += [header, "-" * len(header)]
    for r in report["rows"]:
        if r.get("not_measured"):
            lines.append(f"{r['target']:<16} {r['row']:<24} {r['n']:>3} not measured: "
                         f"{r['not_measured']}")
            continue
        if r["kind"] == "decode_rate":
            med = f"{r['median']:.2f} t/s" if r.get("median") else "-"
            spread = (f"{r['p10']:.2f}-{r['p90']:.2f} t/s" if r.get("median") else "-")
            pred = (f"{r['predicted_tokens_per_s']:.2f}t/s"
                    if r.get("predicted_tokens_per_s") else "-")
        else:
            med = _ms(r.get("median"))
            spread = f"{_ms(r.get('p10'))}-{_ms(r.get('p90'))}" if r.get("median") else "-"
            pred = _ms(r.get("predicted_s"))
        gflop = "-" if r.get("flops") is None else f"{r['flops'] / 1e9:,.2f}"
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        sp_spread = (f"{r['speedup_p10']:.2f}-{r['speedup_p90']:.2f}"
                     if r.get("speedup") is not None else "-")
        lines.append(f"{r['target']:<16} {r['row']:<24} {r['n']:>3} {med:>11} {spread:>19} "
                     f"{gflop:>9} {pred:>9} {ratio:>9} {_x(r.get('speedup')):>9} "
                     f"{sp_spread:>13} {_x(r.get('flops_speedup')):>10} "
                     f"{_x(r.get('roofline_speedup')):>10}")
    lines.append("")
    for label, info in report["per_target"].items():
        parts = []
        share = info.get("selection_share")
        if share:
            parts.append(f"selection {share['median'] * 100:.2f}% of prefill "
                         f"(p10-p90 {share['p10'] * 100:.2f}-{share['p90'] * 100:.2f}%, "
                         f"roofline {info['selection_share_predicted'] * 100:.2f}%, "
                         f"FLOPs {info['selection_flops_share'] * 100:.2f}%)")
        sc = info.get("decode_scaling")
        if sc and sc.get("measured_slope_s_per_token") is not None:
            parts.append(f"decode step {sc['median_step_s'] * 1e3:.1f} ms over cache "
                         f"{sc['cache_min']}-{sc['cache_max']}: slope "
                         f"{sc['measured_slope_s_per_token'] * 1e6:.1f}±"
                         f"{sc['slope_stderr'] * 1e6:.1f} us/token vs attention "
                         f"{sc['predicted_slope_s_per_token'] * 1e6:.2f} us/token: {sc['verdict']}")
        elif sc:
            parts.append(sc["verdict"])
        sw = info.get("cache_sweep")
        if sw and sw.get("slope_s_per_token") is not None:
            steps = ", ".join(f"{p}: {m * 1e3:.1f} ms" for p, m in
                              zip(sw["lengths"], sw["measured_s"]))
            parts.append(f"decode step vs cache length ({steps}): "
                         f"{sw['slope_s_per_token'] * 1e6:.1f} us per cached token vs attention "
                         f"term {sw['predicted_slope_s_per_token'] * 1e6:.2f}: {sw['verdict']}")
        if parts:
            lines.append(f"{label}: " + "; ".join(parts))
    return "\n".join(lines)


def write_plots(report: dict, out_dir) -> list[Path]:
    """latency_vs_budget.png, speedup_vs_budget.png, decode_step_vs_cache.png."""
    try:
        import matplotlib
    except ImportError:
        raise FeatherError("--plot needs matplotlib: pip install 'feather-export[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{report['model']} {report['dtype']} on {report['device']['name']} " \
            f"({report['backend']})"
    ttft = {r["target"]: r for r in report["rows"] if r["kind"] == "ttft"}
    by_method: dict[str, list] = {}
    for t in report["targets"]:
        by_method.setdefault(t["method"], []).append(t)
    curves = report["curves"]
    none = curves["none"]
    none_row = next((ttft[t["label"]] for t in by_method.get("none", [])), None)
    calib = none_row["median"] / none["roofline_s"] if none_row and none_row.get("median") else 1.0
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (method, points) in enumerate(sorted(curves["methods"].items())):
        c = colors[i % len(colors)]
        xs = [p["budget"] for p in points]
        ax.plot(xs, [p["roofline_s"] * calib for p in points], "-", color=c, alpha=0.6,
                label=f"{method}: roofline x {calib:.2f} (none's measured/predicted)")
        ax.plot(xs, [p["roofline_s"] for p in points], ":", color=c, alpha=0.5,
                label=f"{method}: roofline bound")
        _points(ax, [ttft[t["label"]] for t in by_method.get(method, [])],
                [t["budget"] for t in by_method.get(method, [])], c, f"{method}: measured")
    if none_row:
        _points(ax, [none_row], [none["budget"]], "k", "none: measured")
    _finish(ax, "image tokens kept by the first stage (budget)", "time to first token (s)", title, zero_based=True)
    paths.append(_save(fig, out / "latency_vs_budget.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (method, points) in enumerate(sorted(curves["methods"].items())):
        c = colors[i % len(colors)]
        xs = [p["budget"] for p in points]
        ax.plot(xs, [p["flops_speedup"] for p in points], "-", color=c,
                label=f"{method}: FLOPs prediction")
        ax.plot(xs, [p["roofline_speedup"] for p in points], "--", color=c, alpha=0.6,
                label=f"{method}: roofline prediction")
        rows = [ttft[t["label"]] for t in by_method.get(method, [])]
        xs_m = [t["budget"] for t in by_method.get(method, [])]
        for x, r in zip(xs_m, rows):
            if r.get("speedup") is not None:
                ax.errorbar([x], [r["speedup"]], yerr=[[r["speedup"] - r["speedup_p10"]],
                                                        [r["speedup_p90"] - r["speedup"]]],
                            fmt="o", color=c, capsize=3)
        ax.plot([], [], "o", color=c, label=f"{method}: measured (p10-p90)")
    ax.axhline(1.0, color="k", lw=0.8)
    _finish(ax, "image tokens kept by the first stage (budget)", "TTFT speed-up vs none", title)
    paths.append(_save(fig, out / "speedup_vs_budget.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, info) in enumerate(report["per_target"].items()):
        sc = info.get("decode_scaling")
        if not sc:
            continue
        c = colors[i % len(colors)]
        pts = sc["per_cache_length"]
        ax.errorbar([p["past"] for p in pts], [p["median"] * 1e3 for p in pts],
                    yerr=[[(p["median"] - p["p10"]) * 1e3 for p in pts],
                          [(p["p90"] - p["median"]) * 1e3 for p in pts]],
                    fmt="o", ms=3, color=c, label=f"{label}: measured step (p10-p90)")
        offsets = sorted(p["median"] - p["predicted_s"] for p in pts)
        offset = offsets[len(offsets) // 2]
        ax.plot([p["past"] for p in pts], [(p["predicted_s"] + offset) * 1e3 for p in pts], "-",
                color=c, alpha=0.6,
                label=f"{label}: roofline step + median overhead (slope = attention term)")
    _finish(ax, "unpruned cache length (tokens)", "decode step (ms)", title)
    paths.append(_save(fig, out / "decode_step_vs_cache.png"))

    sweeps = {k: v["cache_sweep"] for k, v in report["per_target"].items()
              if v.get("cache_sweep")}
    if sweeps:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (label, sw) in enumerate(sweeps.items()):
            c = colors[i % len(colors)]
            ax.plot(sw["lengths"], [m * 1e3 for m in sw["measured_s"]], "o-", color=c,
                    label=f"{label}: measured (synthetic cache)")
            ax.plot(sw["lengths"], [p * 1e3 for p in sw["predicted_s"]], "--", color=c,
                    alpha=0.6, label=f"{label}: roofline (weights + K/V read once)")
        _finish(ax, "cache length of every span (tokens)", "decode step, decoder spans (ms)", title, zero_based=True)
        paths.append(_save(fig, out / "decode_step_cache_sweep.png"))
    return paths


def _finish(ax, xlabel: str, ylabel: str, title: str, zero_based: bool = False) -> None:
    """Labels, title, legend and grid shared by every report plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if zero_based:
        ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _points(ax, rows, xs, color, label):
    """Median and p10-p90 of every measured row (rows marked "not measured" have no median)."""
    for x, r in zip(xs, rows):
        if r.get("median") is None:
            continue
        ax.errorbar([x], [r["median"]], yerr=[[r["median"] - r["p10"]], [r["p90"] - r["median"]]],
                    fmt="o", color=color, capsize=3, label=label)
        label = None                                  # one legend entry per series


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
