"""Render a run as one self-contained HTML report (plots embedded) plus a short report.md for CI
job summaries. Reads the results store only; never re-runs anything."""
from __future__ import annotations

import math
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import pandas as pd

from bench.present import plots, tuned
from bench.results import compare
from bench.results.baseline import hardware
from bench.results.store import Run
from bench.results.summary import summarize

TEMPLATES = Path(__file__).resolve().parents[2] / "report_templates"
X_AXES = ("seq_len", "hidden")  # the axis a workload's plots run along, first one that varies
# measured device-to-device copy bandwidth (bytes read + written), GB/s, by GPU model
COPY_CEILING_GBPS = {"H100 80GB HBM3": 3000.0}
SEED_NOTE = ("The seed reports 2.8 ms (cuTile) vs 7.4 ms (native PyTorch) per step, 2.64x, measured on a "
             "Blackwell GPU with an unstated config: reported on other hardware, not comparable "
             "number for number.")


def label(params: dict, skip=()) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if k not in skip)


def case_frame(records: list[dict]) -> pd.DataFrame:
    """summarize()'s table plus labels: the tile config (the provider-only parameters), the shape
    and all parameters of each case."""
    frame = summarize(records)
    frame["config"] = [label(r.get("params") or {}, r.get("shape") or {}) for r in records]
    frame["shape_label"] = [label(r.get("shape") or {}) for r in records]
    frame["params_label"] = [label(r.get("params") or {}) for r in records]
    return frame


def shape_axes(records: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(r.get("shape") or {}))
    return list(keys)


def varying(frame: pd.DataFrame, cols: list[str]) -> list[str]:
    return [c for c in cols if c in frame and frame[c].astype(str).nunique() > 1]


def fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


@dataclass
class Table:
    """A table for the template: each cell is (text, sort key)."""
    columns: list[str]
    rows: list[list[tuple[str, object]]] = field(default_factory=list)

    @staticmethod
    def of(frame: pd.DataFrame, columns: dict[str, str]) -> "Table":
        table = Table(list(columns.values()))
        for _, row in frame.iterrows():
            cells = []
            for col in columns:
                v = row.get(col)
                num = isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))
                cells.append((fmt(v), v if num else fmt(v)))
            table.rows.append(cells)
        return table


@dataclass
class Section:
    name: str
    fixed: str
    table: Table
    images: list[tuple[str, str]]  # (caption, base64 png)


def metric(frame: pd.DataFrame) -> tuple[str, str] | None:
    for col, label in (("tflops", "TFLOP/s"), ("gbps", "GB/s")):
        if col in frame and frame[col].notna().any():
            return col, label
    return None


def copy_ceiling(meta: dict) -> float | None:
    gpu = hardware(meta)
    return next((v for k, v in COPY_CEILING_GBPS.items() if k in gpu), None)


def workload_section(name: str, frame: pd.DataFrame, records: list[dict], meta: dict) -> Section:
    """Table and plots of one workload; plots only where an x axis varies."""
    axes = shape_axes(records)
    vary = varying(frame, axes)
    fixed = ", ".join(f"{a}={frame[a].iloc[0]}" for a in axes if a not in vary and a in frame)
    m = metric(frame)
    cols = {"provider": "provider"}
    if frame["config"].ne("").any():
        cols["config"] = "config"
    cols.update({a: a for a in vary})
    frame["ci_pct"] = frame["ci_rel"] * 100
    cols.update(status="status", median_ms="median ms", ci_pct="CI ± %")
    if m:
        cols[m[0]] = m[1]
    cols.update(speedup="speedup", rel_err="rel err", max_abs_err="max abs err")
    if "host_ms" in frame and frame["host_ms"].notna().any():
        # the host's time to enqueue one call: at or above the median, a caller is host-bound
        cols["host_ms"] = "host ms per call"
    ordered = frame.sort_values([*vary, "provider", "config"], kind="stable")
    images = []
    x = next((a for a in X_AXES if a in vary), None)
    ok = frame[frame["status"] == "ok"]  # an incorrect result's time is not worth drawing
    if x is not None and not ok.empty:
        # an axis zipped with x (batch shrinking as seq_len grows) is part of the x point, not a facet
        facets = [a for a in vary if a != x and ok.groupby(x)[a].nunique().max() > 1]
        images += [("median time vs " + x, img) for img in plots.lines_vs_axis(
            ok, x, "median_ms", "median ms", facets, f"{name}: time per call", logy=True)]
        if m:
            ceiling = copy_ceiling(meta) if m[0] == "gbps" else None
            images += [(f"{m[1]} vs {x}", img) for img in plots.lines_vs_axis(
                ok, x, m[0], m[1], facets, f"{name}: {m[1]}", ceiling=ceiling)]
        images += [("tile config speedup", img) for img in plots.tile_heatmaps(
            ok, x, facets, f"{name}: speedup of each tile config vs the baseline")]
    return Section(name, fixed, Table.of(ordered, cols), images)


def best_speedups(frame: pd.DataFrame) -> Table:
    """Per workload, the provider (and config) with the largest speedup over the baseline."""
    table = Table(["workload", "best provider", "config", "shape", "median ms", "speedup"])
    for name, g in frame.groupby("workload", sort=True):
        cand = g[(g["provider"] != g["baseline"]) & g["speedup"].notna()]
        if cand.empty:
            table.rows.append([(name, name), ("-", ""), ("-", ""),
                               ("no provider was compared with the baseline", ""), ("-", 0), ("-", 0)])
            continue
        row = cand.loc[cand["speedup"].idxmax()]
        shape = row["shape_label"]
        table.rows.append([(name, name), (row["provider"], row["provider"]),
                           (row["config"] or "-", row["config"]), (shape, shape),
                           (fmt(row["median_ms"]), row["median_ms"]),
                           (f"{row['speedup']:.2f}x", row["speedup"])])
    return table


def model_step(frame: pd.DataFrame) -> tuple[Table, list[str]] | None:
    """The per-step comparison: cuTile model vs the native PyTorch model, per size and mode."""
    data = frame[frame["status"] == "ok"].copy()
    if data.empty:
        return None
    data["group"] = [f"{r.get('model', '')} {r.get('batch', '')}x{r.get('seq_len', '')} {r.get('dtype', '')}"
                     for _, r in data.iterrows()]
    providers = sorted(data["provider"].unique(), key=lambda p: (p != "torch-naive", p != "cutile", p))
    by = [k for k in ("group", "mode") if k in data]
    wide = data.pivot_table(index=by, columns="provider", values="median_ms", aggfunc="min")
    table = Table(by + [f"{p} ms" for p in providers] + ["cutile vs torch-naive"])
    for idx, row in wide.iterrows():
        idx = idx if isinstance(idx, tuple) else (idx,)
        ms = [row.get(p, math.nan) for p in providers]
        naive, cut = row.get("torch-naive", math.nan), row.get("cutile", math.nan)
        ratio = naive / cut if naive == naive and cut == cut else math.nan
        table.rows.append([(str(v), v) for v in idx] + [(fmt(v), v) for v in ms]
                          + [(fmt(ratio, 3) + ("x" if ratio == ratio else ""), ratio)])
    return table, plots.model_step_bars(data, providers)


def env_card(run: Run) -> list[tuple[str, str]]:
    """(label, value) pairs: hardware, clocks and throttling seen, versions, provenance."""
    meta, env = run.meta, run.meta.get("env") or {}
    items = [("hardware", hardware(meta))]
    for g in env.get("gpus") or []:
        items.append((f"GPU {g.get('index')}", f"{g.get('name')}, {g.get('sm_count')} SMs, "
                      f"{fmt(g.get('memory_gb'), 3)} GB, max clocks SM {g.get('max_sm_clock_mhz')} MHz "
                      f"/ memory {g.get('max_mem_clock_mhz')} MHz"))
    seen: dict[str, list[float]] = {}
    throttle: Counter = Counter()
    for rec in run.records:
        for point in ((rec.get("telemetry") or {}).get("before"), (rec.get("telemetry") or {}).get("after")):
            for k, v in (point or {}).items():
                if k == "throttle":
                    throttle.update(v or [])
                elif isinstance(v, (int, float)):
                    seen.setdefault(k, []).append(v)
    for k, label in (("sm_clock_mhz", "SM clock seen (MHz)"), ("mem_clock_mhz", "memory clock seen (MHz)"),
                     ("temp_c", "temperature seen (C)"), ("power_w", "power seen (W)")):
        if k in seen:
            items.append((label, f"{min(seen[k]):g} - {max(seen[k]):g}"))
    if env.get("gpus"):
        items.append(("throttling seen", ", ".join(f"{k} ({n} readings)" for k, n in throttle.items())
                      or "none"))
    for k in ("driver", "cuda", "torch", "cuda_tile", "tileiras", "python", "platform", "host"):
        items.append((k, fmt(env.get(k))))
    git = meta.get("git") or {}
    items.append(("git sha", f"{git.get('sha') or '-'}" + (" (dirty tree)" if git.get("dirty") else "")))
    sweep = meta.get("sweep") or {}
    items.append(("sweep", f"{sweep.get('name')} ({sweep.get('path')}), profile {sweep.get('profile')}"))
    items.append(("date (UTC)", f"{meta.get('started_utc')} - {meta.get('ended_utc')}"))
    items.append(("complete", str(meta.get("complete"))))
    items.append(("command", "python " + shlex.join(str(a) for a in meta.get("command") or [])))
    return items


def failures(frame: pd.DataFrame) -> Table:
    bad = frame[frame["status"] != "ok"]
    return Table.of(bad.sort_values(["status", "workload", "provider"], kind="stable"),
                    {"status": "status", "workload": "workload", "provider": "provider",
                     "params_label": "parameters", "reason": "reason"})


def comparison_table(cmp: compare.Comparison) -> Table:
    table = Table(["verdict", "case", "base ms", "current ms", "change", "CI", "status"])
    for r in compare.table_rows(cmp):
        table.rows.append([(r["verdict"], r["verdict"]), (r["case"], r["case"]),
                           (fmt(r["base_ms"]), r["base_ms"]), (fmt(r["cur_ms"]), r["cur_ms"]),
                           (r["change"], r["change"]), (r["ci"], r["ci"]), (r["status"], r["status"])])
    return table


def build(run: Run, cmp: compare.Comparison | None = None) -> dict:
    """Everything the templates need."""
    frame = case_frame(run.records)
    counts = Counter(frame["status"]) if not frame.empty else Counter()
    by_workload = {}
    for rec in run.records:
        by_workload.setdefault(rec["workload"], []).append(rec)
    sections = [workload_section(name, case_frame(recs), recs, run.meta)
                for name, recs in sorted(by_workload.items())]
    steps = model_step(case_frame(by_workload["model_step"])) if "model_step" in by_workload else None
    return {
        "run_id": run.meta.get("run_id") or run.path.name, "hardware": hardware(run.meta),
        "env": env_card(run), "counts": dict(counts), "sections": sections,
        "best": best_speedups(frame) if not frame.empty else None,
        "model_step": steps, "seed_note": SEED_NOTE, "tuned": tuned.section(run.meta),
        "failures": failures(frame) if counts.get("ok", 0) < len(frame) else None,
        "compare": cmp, "compare_table": comparison_table(cmp) if cmp else None,
        "compare_headline": compare.headline(cmp) if cmp else None,
        "compare_md": compare.to_markdown(cmp, only_changes=True) if cmp else None,
    }


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=jinja2.select_autoescape(
        ["html", "html.j2"]), undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["md_cell"] = lambda s: str(s).replace("|", "\\|")
    return env


def render(run: Run, out_html: Path, cmp: compare.Comparison | None = None) -> tuple[Path, Path]:
    """Write the HTML report and report.md beside it."""
    ctx = build(run, cmp)
    env = environment()
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(env.get_template("report.html.j2").render(**ctx))
    md = out_html.with_name("report.md")
    md.write_text(env.get_template("report.md.j2").render(**ctx))
    return out_html, md
