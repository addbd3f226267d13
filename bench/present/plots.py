"""Report figures, each returned as a base64 PNG so the report is one self-contained file.

Every function takes a tidy frame (one row per case, as bench.report prepares it) and returns a
list of images: large sweeps are split into facets and pages rather than overplotted.
"""
from __future__ import annotations

import base64
import io
import math
import re
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

PER_PAGE = 12  # facets per figure
COLS = 3
DPI = 80


def natural(text) -> tuple:
    """Sort key that orders the numbers inside a label by value: tile=64 before tile=128."""
    parts = re.split(r"(\d+(?:\.\d+)?)", str(text))
    return tuple(float(p) if i % 2 else p for i, p in enumerate(parts))


def to_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def facet_label(key: dict) -> str:
    return ", ".join(f"{k}={v}" if k else str(v) for k, v in key.items()) or "all cases"


def _facets(frame: pd.DataFrame, by: list[str]) -> list[tuple[dict, pd.DataFrame]]:
    if not by:
        return [({}, frame)]
    return [(dict(zip(by, k if isinstance(k, tuple) else (k,))), g)
            for k, g in frame.groupby(by, sort=True, dropna=False)]


def _pages(facets, draw, title: str, width: float = 4.2, height: float = 3.0,
           columns: int = COLS) -> list[str]:
    """Draw each facet with draw(ax, key, group) on grids of PER_PAGE subplots."""
    images = []
    for start in range(0, len(facets), PER_PAGE):
        page = facets[start:start + PER_PAGE]
        cols = min(columns, len(page))
        rows = math.ceil(len(page) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
        for ax, (key, group) in zip(axes.flat, page):
            draw(ax, key, group)
            ax.set_title(textwrap.fill(facet_label(key), 60), fontsize=8)
        for ax in axes.flat[len(page):]:
            ax.set_visible(False)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        images.append(to_base64(fig))
    return images


def lines_vs_axis(frame: pd.DataFrame, x: str, y: str, ylabel: str, facets: list[str],
                  title: str, ceiling: float | None = None, logy: bool = False,
                  zipped: list[str] = ()) -> list[str]:
    """One line per provider (its best config at each point), log x, one subplot per facet;
    facets with a single x value (nothing to draw a line along) are left out. Axes `zipped` with x
    change along it (batch shrinking as seq_len grows): the points are then not joined, since
    neighbours differ in more than x, and each x tick names its zipped values."""
    data = frame.dropna(subset=[y])
    facets = [(k, g) for k, g in _facets(data, facets) if g[x].nunique() > 1]
    if not facets:
        return []

    def draw(ax, key, group):
        for provider, g in group.groupby("provider", sort=True):
            best = g.groupby(x)[y].max() if y != "median_ms" else g.groupby(x)[y].min()
            ax.plot(best.index, best.values, marker="o", markersize=4, label=provider,
                    linestyle="none" if zipped else "-")
        if ceiling:
            ax.axhline(ceiling, color="black", linestyle="--", linewidth=1,
                       label=f"measured ceiling {ceiling:g}")
        ax.set_xscale("log", base=2)
        if zipped:
            ticks = group.drop_duplicates(x).sort_values(x)
            ax.set_xticks(ticks[x], [f"{v}\n" + "\n".join(f"{a}={r[a]}" for a in zipped)
                                     for v, (_, r) in zip(ticks[x], ticks.iterrows())], fontsize=7)
            ax.minorticks_off()
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)

    return _pages(facets, draw, title)


def tile_heatmaps(frame: pd.DataFrame, shape_cols: list[str], facets: list[str], title: str) -> list[str]:
    """Speedup of each tile config (rows) at each shape (columns, in numeric order), one heatmap per
    provider and facet; the best config of each shape is boxed."""
    data = frame.dropna(subset=["speedup"])
    data = data[data["config"] != ""]
    if data.empty:
        return []

    def draw(ax, key, group):
        group = group.sort_values(shape_cols).assign(
            shape=[", ".join(f"{c}={r[c]}" for c in shape_cols) or "all" for _, r in group.iterrows()])
        shapes = list(dict.fromkeys(group["shape"]))
        configs = sorted(group["config"].unique(), key=natural)
        grid = group.pivot_table(index="config", columns="shape", values="speedup",
                                 aggfunc="max").reindex(index=configs, columns=shapes)
        values = grid.to_numpy(dtype=float)
        im = ax.imshow(values, aspect="auto", cmap="RdYlGn",
                       norm=matplotlib.colors.TwoSlopeNorm(1.0, min(np.nanmin(values), 0.99),
                                                           max(np.nanmax(values), 1.01)))
        ax.set_xticks(range(len(shapes)), shapes, fontsize=7, rotation=90 if len(shapes) > 4 else 0)
        ax.set_yticks(range(len(configs)), configs, fontsize=7)
        for (i, j), v in np.ndenumerate(values):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
        for j in range(values.shape[1]):
            if not np.isnan(values[:, j]).all():
                i = int(np.nanargmax(values[:, j]))
                ax.add_patch(matplotlib.patches.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                                          edgecolor="black", linewidth=2))
        ax.figure.colorbar(im, ax=ax, shrink=0.8, label="speedup (best per shape boxed)")

    keyed = [(dict(provider=p, **k), g) for p, pg in data.groupby("provider")
             for k, g in _facets(pg, facets)]
    height = max(3.5, 0.4 * data["config"].nunique() + 3.0)
    shapes = data.groupby(facets)["shape_short"].nunique().max() if facets else data["shape_short"].nunique()
    return _pages(keyed, draw, title, width=min(max(7.0, 0.6 * shapes + 3), 16),
                  height=height, columns=1)


def roofline(frame: pd.DataFrame, ceilings: dict, title: str) -> list[str]:
    """Achieved TFLOP/s against arithmetic intensity (FLOPs per byte moved), one colour per
    provider, under the measured memory and matmul ceilings of the case dtypes."""
    data = frame.dropna(subset=["tflops", "gbps"])
    measured = (ceilings or {}).get("measured")
    if data.empty or not measured:
        return []
    data = data.assign(intensity=data["tflops"] * 1e3 / data["gbps"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for provider, g in data.groupby("provider", sort=True):
        ax.scatter(g["intensity"], g["tflops"], s=14, label=provider,
                   marker="x" if g["suspect"].any() else "o")
    lo, hi = data["intensity"].min() / 4, data["intensity"].max() * 4
    xs = np.geomspace(lo, hi, 200)
    bw = measured["copy_gbps"] / 1e3  # TB/s: TFLOP/s per FLOP/byte
    for dtype in sorted(data["dtype"].astype(str).unique()) if "dtype" in data else []:
        peak = measured["tflops"].get(dtype)
        ax.plot(xs, np.minimum(bw * xs, peak or np.inf), linestyle="--", linewidth=1,
                label=f"ceiling {dtype}: {bw:.2f} TB/s" + (f", {peak:.0f} TFLOP/s" if peak else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs per byte")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return [to_base64(fig)]


def model_step_bars(frame: pd.DataFrame, providers: list[str]) -> list[str]:
    """Step time per model size and shape (and CUDA graph or not), one bar per provider, one
    subplot per mode. Only this run's measurements: numbers reported elsewhere are a note."""
    data = frame.dropna(subset=["median_ms"])
    modes = sorted(data["mode"].unique()) if "mode" in data and not data.empty else []
    if not modes:
        return []
    fig, axes = plt.subplots(1, len(modes), figsize=(6.0 * len(modes), 3.8), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for ax, mode in zip(axes[0], modes):
        g = data[data["mode"] == mode]
        groups = sorted(g["group"].unique(), key=natural)
        for i, provider in enumerate(providers):
            ms = g[g["provider"] == provider].groupby("group")["median_ms"].min()
            xs = [j + i * width for j, grp in enumerate(groups) if grp in ms.index]
            ax.bar(xs, [ms[grp] for grp in groups if grp in ms.index], width, label=provider)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=7,
                      rotation=20, ha="right")
        ax.set_ylabel("ms per step")
        ax.set_title(f"mode={mode}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return [to_base64(fig)]


def trend(history: pd.DataFrame, title: str, steps=()) -> list[str]:
    """Median (with its CI) over time, one subplot per case and one line per GPU model;
    regressions against the baseline in red, lasting steps (bench.results.changepoints) as dashed
    lines labelled with the first commit on the new level."""
    def draw(ax, key, group):
        for gpu, g in group.sort_values("date").groupby("hardware", sort=True):
            t = pd.to_datetime(g["date"], utc=True)
            line, = ax.plot(t, g["median_ms"], marker="o", markersize=3, label=gpu)
            ax.fill_between(t, g["ci_low_ms"], g["ci_high_ms"], alpha=0.2, color=line.get_color())
            bad = g["verdict"].isin(["regression", "broken"])
            ax.scatter(t[bad], g["median_ms"][bad], color="red", zorder=3)
            for s in steps:
                if (s.case, s.hardware) == (key[""], gpu):
                    ax.axvline(pd.to_datetime(s.date, utc=True), color=line.get_color(), linestyle="--")
                    ax.annotate(f"{s.change:+.1%} {s.sha[:8]}", (pd.to_datetime(s.date, utc=True), 1),
                                xycoords=("data", "axes fraction"), fontsize=6, va="top", rotation=90)
        if group["hardware"].nunique() > 1:
            ax.legend(fontsize=6)
        ax.set_ylabel("median ms")
        ax.tick_params(axis="x", labelsize=6, rotation=30)
        ax.grid(True, alpha=0.3)

    facets = [({"": case}, g) for case, g in history.groupby("case", sort=True)]
    return _pages(facets, draw, title)
