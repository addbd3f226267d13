"""Report figures, each returned as a base64 PNG so the report is one self-contained file.

Every function takes a tidy frame (one row per case, as bench.report prepares it) and returns a
list of images: large sweeps are split into facets and pages rather than overplotted.
"""
from __future__ import annotations

import base64
import io
import math
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

PER_PAGE = 12  # facets per figure
COLS = 3
DPI = 80


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
                  title: str, ceiling: float | None = None, logy: bool = False) -> list[str]:
    """One line per provider (its best config at each point), log x, one subplot per facet;
    facets with a single x value (nothing to draw a line along) are left out."""
    data = frame.dropna(subset=[y])
    facets = [(k, g) for k, g in _facets(data, facets) if g[x].nunique() > 1]
    if not facets:
        return []

    def draw(ax, key, group):
        for provider, g in group.groupby("provider", sort=True):
            best = g.groupby(x)[y].max() if y != "median_ms" else g.groupby(x)[y].min()
            ax.plot(best.index, best.values, marker="o", markersize=3, label=provider)
        if ceiling:
            ax.axhline(ceiling, color="black", linestyle="--", linewidth=1,
                       label=f"copy ceiling {ceiling:g}")
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)

    return _pages(facets, draw, title)


def tile_heatmaps(frame: pd.DataFrame, x: str, facets: list[str], title: str) -> list[str]:
    """Speedup of each tile config (rows) at each value of x (columns), one heatmap per facet."""
    data = frame.dropna(subset=["speedup"])
    data = data[data["config"] != ""]
    if data.empty:
        return []

    def draw(ax, key, group):
        grid = group.pivot_table(index="config", columns=x, values="speedup", aggfunc="max")
        values = grid.to_numpy(dtype=float)
        im = ax.imshow(values, aspect="auto", cmap="RdYlGn",
                       norm=matplotlib.colors.TwoSlopeNorm(1.0, min(np.nanmin(values), 0.99),
                                                           max(np.nanmax(values), 1.01)))
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], fontsize=7)
        ax.set_yticks(range(grid.shape[0]), list(grid.index), fontsize=7)
        ax.set_xlabel(x)
        for (i, j), v in np.ndenumerate(values):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
        ax.figure.colorbar(im, ax=ax, shrink=0.8, label="speedup")

    keyed = [(dict(provider=p, **k), g) for p, pg in data.groupby("provider")
             for k, g in _facets(pg, facets)]
    height = max(3.0, 0.25 * data["config"].nunique() + 1.5)
    return _pages(keyed, draw, title, width=7.0, height=height, columns=2)


SEED = {"cutile": 2.8, "torch-naive": 7.4}  # ms per step, as the seed reports them


def model_step_bars(frame: pd.DataFrame, providers: list[str]) -> list[str]:
    """Step time per model size and shape, one bar per provider, one subplot per mode; the seed's
    reported numbers drawn beside ours in their own, hatched, panel."""
    data = frame.dropna(subset=["median_ms"])
    modes = sorted(data["mode"].unique()) if "mode" in data and not data.empty else []
    fig, axes = plt.subplots(1, len(modes) + 1, figsize=(5.0 * len(modes) + 3.0, 3.6),
                             squeeze=False, gridspec_kw={"width_ratios": [5] * len(modes) + [2]})
    width = 0.8 / max(len(providers), 1)
    for ax, mode in zip(axes[0], modes):
        g = data[data["mode"] == mode]
        groups = sorted(g["group"].unique())
        for i, provider in enumerate(providers):
            ms = g[g["provider"] == provider].groupby("group")["median_ms"].min()
            xs = [j + i * width for j, grp in enumerate(groups) if grp in ms.index]
            ax.bar(xs, [ms[grp] for grp in groups if grp in ms.index], width, label=provider)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=7,
                      rotation=20, ha="right")
        ax.set_ylabel("ms per step")
        ax.set_title(f"this run, mode={mode}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    seed_ax = axes[0][-1]
    seed_ax.bar(list(SEED), list(SEED.values()), color="lightgrey", edgecolor="black", hatch="//")
    for i, v in enumerate(SEED.values()):
        seed_ax.text(i, v, f"{v} ms", ha="center", va="bottom", fontsize=8)
    seed_ax.set_title("seed, reported on other hardware\n(Blackwell, config unstated)", fontsize=8)
    seed_ax.set_ylabel("ms per step")
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
