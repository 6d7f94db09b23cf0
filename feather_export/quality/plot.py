"""The eval's plot: accuracy vs budget per method, by question type and row band.

matplotlib when installed (``pip install 'feather-export[bench]'``); otherwise a plain Pillow chart
of the same panels, so ``feather-export eval`` always writes a PNG.
"""
from __future__ import annotations

from pathlib import Path

PANELS = (("all", "all questions"), ("type:colour", "colour"), ("type:count", "count"),
          ("type:where", "where"), ("band:top", "object in top band"),
          ("band:middle", "object in middle band"), ("band:bottom", "object in bottom band"),
          ("objkept:top", "top-band object keeps a patch (1st stage)"))
COLOURS = {"feather": (31, 119, 180), "fastv": (214, 39, 40), "fastervlm": (44, 160, 44),
           "btp": (148, 103, 189), "none": (90, 90, 90)}


def _value(engine_row: dict, key: str):
    if key == "all":
        return engine_row["all"]["accuracy"]
    kind, name = key.split(":")
    if kind == "type":
        return engine_row["by_type"][name]["accuracy"]
    if kind == "band":
        return engine_row["by_band"][name]["accuracy"]
    return (engine_row.get("object_kept_by_band_first") or {}).get(name)


def series(results: dict, engine: str | None = None) -> tuple[dict, dict]:
    """{panel: {method: [(budget, value)]}} and {panel: value of none} for one engine."""
    engine = engine or results["engines"][0]
    lines: dict = {key: {} for key, _ in PANELS}
    baseline: dict = {}
    for row in results["configs"]:
        r = row["engines"].get(engine)
        if r is None:
            continue
        for key, _ in PANELS:
            value = _value(r, key)
            if row["method"] == "none":
                baseline[key] = 1.0 if key.startswith("objkept") else value
            elif value is not None and row.get("schedule") is None:   # schedules: table only
                lines[key].setdefault(row["method"], []).append((row["budget"], value))
    for per_method in lines.values():
        for points in per_method.values():
            points.sort()
    return lines, baseline


def plot_accuracy(results: dict, out_png: str | Path) -> Path:
    out = Path(out_png)
    try:
        import matplotlib
    except ImportError:
        return _plot_pillow(results, out)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines, baseline = series(results)
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), sharex=True, sharey=True)
    for ax, (key, title) in zip(axes.flat, PANELS):
        for method, points in lines[key].items():
            xs, ys = zip(*points)
            rgb = tuple(c / 255 for c in COLOURS.get(method, (0, 0, 0)))
            ax.plot(xs, [100 * y for y in ys], "o-", color=rgb, label=method)
        if baseline.get(key) is not None:
            ax.axhline(100 * baseline[key], color="0.35", ls="--", lw=1, label="none (unpruned)")
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["budgets"])
        ax.set_xticklabels([str(b) for b in results["budgets"]])
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel(f"first-stage budget (of {results['num_image_tokens']} image tokens)")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    axes.flat[0].legend(fontsize=8, loc="lower right")
    engine = results["engines"][0]
    fig.suptitle(f"tiny-shapes: exact-match accuracy vs budget ({results['n']} {results['split']} samples, "
                 f"{engine} engine)", fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_pillow(results: dict, out: Path) -> Path:
    """A dependency-free fallback: the same panels as small line charts."""
    from PIL import Image, ImageDraw

    lines, baseline = series(results)
    pw, ph, pad = 300, 220, 36
    sheet = Image.new("RGB", (4 * pw, 2 * ph + 24), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), f"accuracy (%) vs budget, {results['n']} {results['split']} samples "
              "(matplotlib not installed: simple chart)", fill=(0, 0, 0))
    budgets = sorted(results["budgets"])
    for n, (key, title) in enumerate(PANELS):
        x0, y0 = (n % 4) * pw, 24 + (n // 4) * ph
        left, right, top, bottom = x0 + pad, x0 + pw - 10, y0 + 20, y0 + ph - pad

        def xy(budget, value):
            i = budgets.index(budget)
            x = left + (right - left) * (i / max(1, len(budgets) - 1))
            return x, bottom - (bottom - top) * value

        draw.text((x0 + pad, y0 + 4), title, fill=(0, 0, 0))
        draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
        for b in budgets:
            draw.text((xy(b, 0)[0] - 6, bottom + 4), str(b), fill=(0, 0, 0))
        for v in (0, 0.5, 1):
            draw.text((x0 + 4, xy(budgets[0], v)[1] - 5), f"{int(100 * v)}", fill=(0, 0, 0))
        if baseline.get(key) is not None:
            y = xy(budgets[0], baseline[key])[1]
            draw.line((left, y, right, y), fill=COLOURS["none"], width=1)
        for method, points in lines[key].items():
            pts = [xy(b, v) for b, v in points]
            colour = COLOURS.get(method, (0, 0, 0))
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for x, y in pts:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    for i, method in enumerate(["none", *lines["all"]]):
        draw.text((4 * pw - 90, 30 + 12 * i), method, fill=COLOURS.get(method, (0, 0, 0)))
    sheet.save(out, format="PNG")
    return out
