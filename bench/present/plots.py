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

PER_PAGE = 8  # panels per figure
COLS = 2
DPI = 100
WIDTH = 9.6  # inches of a whole figure: about 960 px, the report's column


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


def _pages(facets, draw, title: str, width: float = WIDTH / COLS, height: float = 3.4,
           columns: int = COLS, shared_legend: bool = False) -> list[str]:
    """Draw each facet with draw(ax, key, group) on grids of PER_PAGE subplots; with
    `shared_legend` one legend for the figure, below it, instead of one crowding each panel."""
    images = []
    for start in range(0, len(facets), PER_PAGE):
        page = facets[start:start + PER_PAGE]
        cols = min(columns, len(page))
        rows = math.ceil(len(page) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False,
                                 layout="constrained")
        for ax, (key, group) in zip(axes.flat, page):
            draw(ax, key, group)
            if key:
                ax.set_title(textwrap.fill(facet_label(key), 70), fontsize=9)
        for ax in axes.flat[len(page):]:
            ax.set_visible(False)
        if shared_legend:
            handles = {}
            for ax in axes.flat[:len(page)]:
                for h, text in zip(*ax.get_legend_handles_labels()):
                    handles.setdefault(text, h)
            if handles:
                fig.legend(handles.values(), handles.keys(), loc="outside lower center",
                           ncol=min(len(handles), 5), fontsize=9)
        fig.suptitle(title, fontsize=11)
        images.append(to_base64(fig))
    return images


def _x_ticks(ax, group: pd.DataFrame, x: str, zipped: list[str]) -> None:
    """Ticks at the values the data has (on a log scale where they span more than 8x), each with
    the values of the axes zipped with x under it; slanted where they would collide."""
    ticks = group.drop_duplicates(x).sort_values(x)
    xs = list(ticks[x])
    if min(xs) > 0 and max(xs) / min(xs) > 8:
        ax.set_xscale("log")
    labels = [str(v) + "".join(f"\n{a}={r[a]}" for a in zipped) for v, (_, r) in zip(xs, ticks.iterrows())]
    ax.set_xticks(xs, labels, fontsize=8)
    ax.minorticks_off()
    left, right = ax.get_xlim()
    if ax.get_xscale() == "log" and min(xs) > 0:
        span = math.log(right / left) or 1.0
        gaps = [math.log(b / a) / span for a, b in zip(xs, xs[1:])]
    else:
        gaps = [(b - a) / ((right - left) or 1.0) for a, b in zip(xs, xs[1:])]
    widest = max(len(line) for text in labels for line in text.split("\n"))
    if gaps and min(gaps) * 60 < widest:  # about 60 characters across a half-width panel
        ax.tick_params(axis="x", labelrotation=35)
        for t in ax.get_xticklabels():
            t.set_horizontalalignment("right")


def _colours(providers: list[str], present) -> dict[str, str]:
    """One colour per provider by its place among all the run's providers, so that a provider keeps
    its colour from plot to plot (the speedup plot, which leaves out the baseline, would otherwise
    shift every colour after it)."""
    names = list(providers) + sorted(set(present) - set(providers))
    return {p: f"C{i % 10}" for i, p in enumerate(names)}


def lines(frame: pd.DataFrame, x: str, y: str, ylabel: str, facets: list[str], title: str,
          ref: float | None = None, ref_label: str = "", zipped: list[str] = (),
          providers: list[str] = ()) -> list[str]:
    """One line with markers per provider along the numeric axis x, each point the provider's
    best config there (the highest y), one panel per value of the `facets` axes; a dashed line at
    `ref` (1.0 for a speedup, 100 for % of ceiling). Axes zipped with x (batch shrinking as
    seq_len grows) label its ticks."""
    data = frame.dropna(subset=[y])
    if data.empty:
        return []
    order = [p for p in providers if p in set(data["provider"])] or sorted(data["provider"].unique())
    colour = _colours(providers, data["provider"].unique())

    def draw(ax, key, group):
        for provider in order:
            g = group[group["provider"] == provider]
            if not g.empty:
                best = g.groupby(x)[y].max().sort_index()
                ax.plot(best.index, best.values, marker="o", markersize=5, linewidth=1.8,
                        label=provider, color=colour[provider])
        if ref is not None:
            ax.axhline(ref, color="black", linestyle="--", linewidth=1, label=ref_label)
        _x_ticks(ax, group, x, list(zipped))
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)

    keyed = _facets(data, facets)
    cols = 1 if len(keyed) == 1 else COLS
    return _pages(keyed, draw, title, width=WIDTH / cols, height=4.2 if cols == 1 else 3.4,
                  columns=cols, shared_legend=True)


def bars(frame: pd.DataFrame, y: str, ylabel: str, facets: list[str], title: str,
         ref: float | None = None, ref_label: str = "", providers: list[str] = ()) -> list[str]:
    """Where no axis varies to draw a line along: one group of bars per value of the `facets`
    axes (in the frame's order), one bar per provider, the value written on each bar."""
    data = frame.dropna(subset=[y])
    if data.empty:
        return []
    order = [p for p in providers if p in set(data["provider"])] or sorted(data["provider"].unique())
    colour = _colours(providers, data["provider"].unique())
    groups = [(facet_label(k), g) for k, g in _facets(data, facets)] if facets else [("all", data)]
    groups = sorted(groups, key=lambda kg: natural(kg[0])) if facets else groups
    fig, ax = plt.subplots(figsize=(WIDTH, 4.2), layout="constrained")
    width = 0.8 / len(order)
    for i, provider in enumerate(order):
        xs, ys = [], []
        for j, (_, g) in enumerate(groups):
            v = g.loc[g["provider"] == provider, y]
            if not v.empty:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(float(v.max()))
        drawn = ax.bar(xs, ys, width, label=provider, color=colour[provider])
        ax.bar_label(drawn, fmt="%.3g", fontsize=7)
    if ref is not None:
        ax.axhline(ref, color="black", linestyle="--", linewidth=1, label=ref_label)
    names = [textwrap.fill(name, 24) for name, _ in groups]
    ax.set_xticks(range(len(groups)), names, fontsize=8,
                  rotation=0 if len(groups) * max(map(len, names)) < 120 else 35,
                  ha="center" if len(groups) * max(map(len, names)) < 120 else "right")
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=min(len(order) + (ref is not None), 5), fontsize=9)
    fig.suptitle(title, fontsize=11)
    return [to_base64(fig)]


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
    fig, ax = plt.subplots(figsize=(WIDTH, 5.0))
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
