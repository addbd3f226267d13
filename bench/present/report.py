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

from bench import assets
from bench.present import plots, tuned
from bench.present.counters import section as why_section
from bench.results import compare
from bench.results.counters import stall_words
from bench.results.baseline import hardware
from bench.results.store import Run
from bench.results.summary import fresh_workers, settling, summarize

TEMPLATES = assets.folder("report_templates")
HOST_BOUND = 1.25  # a call whose median exceeds its GPU-busy time by this factor waits on the host
COUNTER_COLUMNS = {"ncu": "ncu", "ncu_ms": "ncu ms", "dram_pct": "DRAM %", "l2_pct": "L2 %",
                   "sm_pct": "SM %", "tensor_pct": "tensor %", "occupancy_pct": "occupancy %",
                   "registers": "regs", "spill_bytes": "local st B", "top_stall": "top stall"}


def hints(meta: dict, name: str) -> dict:
    """How to lay out workload `name`: the hints its run recorded (Workload.hints), each missing
    one empty. A run from before hints were recorded gets the generic layout: x along the numeric
    axis with the most values, regimes from the flag and word axes, the non-baseline providers as
    the headline's subject."""
    got = ((meta.get("workloads") or {}).get(name)) or {}
    return {"x_axes": list(got.get("x_axes") or ()), "regimes": list(got.get("regimes") or ()),
            "panels": list(got.get("panels") or ()), "subject": list(got.get("subject") or ()),
            "note": got.get("note") or ""}


def label(params: dict, skip=()) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if k not in skip)


def counters_of(entry: dict | None) -> dict:
    """One case's Nsight Compute counters as table cells: the kernels' summed time, the rest from
    its longest kernel; or why there are none."""
    if not entry:
        return {}
    kernels = entry.get("kernels") or []
    if not kernels:
        return {"ncu": entry.get("reason", "")}
    top = max(kernels, key=lambda k: k.get("duration_ms") or 0)
    stall = top.get("top_stall")  # what its warps waited on most, with its share of their stalls
    return {**{k: top.get(k) for k in list(COUNTER_COLUMNS)[2:]},
            "ncu": f"{len(kernels)} kernel{'s' * (len(kernels) > 1)}: {top['name']}"[:80],
            "ncu_ms": sum(k.get("duration_ms") or 0 for k in kernels),
            "top_stall": stall and stall_words(stall, top["top_stall_share"])}


def case_frame(records: list[dict], meta: dict | None = None,
               counters: dict | None = None) -> pd.DataFrame:
    """summarize()'s table plus labels: the tile config (the provider-only parameters), the shape
    and all parameters of each case; GPU-busy time and ncu counters where the run has them."""
    frame = summarize(records, (meta or {}).get("ceilings"))
    frame["config"] = [label(r.get("params") or {}, r.get("shape") or {}) for r in records]
    frame["shape_label"] = [label(r.get("shape") or {}) for r in records]
    frame["params_label"] = [label(r.get("params") or {}) for r in records]
    frame["busy_ms"] = [r.get("busy_ms") for r in records]
    vary = varying(frame, shape_axes(records))  # what tells this run's shapes apart
    frame["shape_short"] = [label({k: v for k, v in (r.get("shape") or {}).items() if k in vary})
                            or "all" for r in records]
    if counters:
        cells = [counters_of(counters.get(r["case_id"])) for r in records]
        for col in COUNTER_COLUMNS:
            frame[col] = [c.get(col) for c in cells]
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
    """A table for the template: each cell is (text, sort key). `groups`, where given, holds a
    label per row: a header row names it wherever it changes (one group per shape)."""
    columns: list[str]
    rows: list[list[tuple[str, object]]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    @staticmethod
    def of(frame: pd.DataFrame, columns: dict[str, str], group: str | None = None) -> "Table":
        table = Table(list(columns.values()))
        if group:
            table.groups = [str(v) for v in frame[group]]
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
    note: str = ""  # the workload's own note (Workload.note), printed under its results


def metric(frame: pd.DataFrame) -> tuple[str, str] | None:
    for col, label in (("tflops", "TFLOP/s"), ("gbps", "GB/s")):
        if col in frame and frame[col].notna().any():
            return col, label
    return None


def roof(meta: dict) -> dict | None:
    """The ceilings a case's rate is drawn against: a GPU's; the CPU's floor is no roofline."""
    c = meta.get("ceilings") or {}
    return None if c.get("cpu") else c


def numeric_order(frame: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Rows sorted by `cols`, numbers by value and labels with numbers in them by those values."""
    return frame.sort_values(cols, kind="stable", key=lambda c: c if pd.api.types.is_numeric_dtype(c)
                             else c.map(plots.natural))


def x_axis(hint: dict, frame: pd.DataFrame, vary: list[str]) -> str | None:
    """The axis plots run along: the first of the workload's x_axes that varies; without hints,
    the varying numeric axis with the most values."""
    if hint["x_axes"]:
        return next((a for a in hint["x_axes"] if a in vary), None)
    numeric = [a for a in vary if pd.api.types.is_numeric_dtype(frame[a])
               and not pd.api.types.is_bool_dtype(frame[a])]
    return max(numeric, key=lambda a: frame[a].nunique(), default=None)


def axis_order(hint: dict, vary: list[str], x: str | None) -> list[str]:
    """The varying axes as rows and panels group them: regimes, then panels, then x, then the
    rest in the sweep's order."""
    return list(dict.fromkeys([a for a in (*hint["regimes"], *hint["panels"]) if a in vary]
                              + ([x] if x else []) + vary))


def host_bound(frame: pd.DataFrame) -> list[str]:
    """Per case: "host-bound" where its median exceeds its GPU-busy time (the summed kernel time
    of one call) by HOST_BOUND, "no" where it does not, "-" where no busy time was recorded."""
    return ["-" if busy is None or busy != busy else "host-bound" if med > HOST_BOUND * busy else "no"
            for med, busy in zip(frame["median_ms"], frame["busy_ms"])]


def workload_section(name: str, frame: pd.DataFrame, records: list[dict], meta: dict,
                     providers: list[str] = ()) -> Section:
    """Table and plots of one workload, laid out by the hints its run recorded: the case table
    grouped by shape (regimes and panels first, then x, then the sweep's order), and per panel the
    speedup over the baseline and the % of the measured ceiling along x (bars where x is fixed)."""
    hint = hints(meta, name)
    axes = shape_axes(records)
    vary = varying(frame, axes)
    x = x_axis(hint, frame, vary)
    order = axis_order(hint, vary, x)
    fixed = ", ".join(f"{a}={frame[a].iloc[0]}" for a in axes if a not in vary and a in frame)
    m = metric(frame)
    cols = {"provider": "provider"}
    if frame["config"].ne("").any():
        cols["config"] = "config"
    cols.update({a: a for a in order})
    frame["ci_pct"] = frame["ci_rel"] * 100
    cols.update(status="status", median_ms="median ms", ci_pct="CI ± %")
    if m:
        cols[m[0]] = m[1]
    if frame["ceiling_pct"].notna().any():
        cols.update(bound="bound", ceiling_pct="% of ceiling")
    if frame["suspect"].any():
        frame["suspect_text"] = frame["suspect"].map({True: "suspect", False: ""})
        cols["suspect_text"] = "suspect"
    cols.update(speedup="speedup", rel_err="rel err", max_abs_err="max abs err")
    if frame["busy_ms"].notna().any():
        frame["host_bound"] = host_bound(frame)
        cols.update(busy_ms="GPU-busy ms", host_bound="host-bound")
    if "extra_mib" in frame and frame["extra_mib"].notna().any():
        cols["extra_mib"] = "extra MiB"  # the call's working memory beyond its inputs and outputs
    if "host_ms" in frame and frame["host_ms"].notna().any():
        # the host's time to enqueue one call: at or above the median, a caller is host-bound
        cols["host_ms"] = "host ms per call"
    if "ncu" in frame and frame["ncu"].notna().any():
        cols.update(COUNTER_COLUMNS)
    rank = {p: i for i, p in enumerate(dict.fromkeys([*providers, *sorted(frame["provider"])]))}
    frame["provider_rank"] = frame["provider"].map(rank)
    frame["shape_group"] = [label({a: r[a] for a in order}) or "all" for _, r in frame.iterrows()]
    # skipped cases are counted by reason in a section of their own
    ordered = numeric_order(frame[frame["status"] != "skipped"], [*order, "provider_rank", "config"])
    usable = frame[(frame["status"] == "ok") & ~frame["suspect"]]  # neither wrong nor impossible
    baseline = str(frame["baseline"].iloc[0]) if not frame.empty else ""
    ordered_providers = sorted(usable["provider"].unique(), key=rank.get)
    others = usable[usable["provider"] != baseline]
    images = []
    # an axis that varies within one x point gets panels of its own, as do the hinted panels and
    # words (a model is no point along x); a number that changes only with x labels its ticks
    facets = [a for a in order if a != x and (a in hint["panels"] or a in hint["regimes"] or
                                              not pd.api.types.is_numeric_dtype(frame[a]) or
                                              usable.groupby(x)[a].nunique().max() > 1)] \
        if x is not None and not usable.empty else []
    if x is not None and facets and usable.groupby(facets)[x].nunique().max() < 2:
        x = None  # no panel has two points to join: bars per shape instead
    if x is not None and not usable.empty:
        zipped = [a for a in order if a != x and a not in facets]
        images += [(f"speedup over {baseline} vs {x}", img) for img in plots.lines(
            others, x, "speedup", f"speedup over {baseline} (x)", facets,
            f"{name}: speedup over the baseline ({baseline})", ref=1.0, ref_label=baseline,
            zipped=zipped, providers=ordered_providers)]
        if roof(meta):
            images += [(f"% of the measured ceiling vs {x}", img) for img in plots.lines(
                usable, x, "ceiling_pct", "% of ceiling", facets, f"{name}: % of the measured ceiling",
                ref=100.0, ref_label="ceiling", zipped=zipped, providers=ordered_providers)]
    elif not usable.empty:
        images += [(f"speedup over {baseline} per shape", img) for img in plots.bars(
            others, "speedup", f"speedup over {baseline} (x)", order,
            f"{name}: speedup over the baseline ({baseline})", ref=1.0, ref_label=baseline,
            providers=ordered_providers)]
        if roof(meta):
            images += [("% of the measured ceiling per shape", img) for img in plots.bars(
                usable, "ceiling_pct", "% of ceiling", order, f"{name}: % of the measured ceiling",
                ref=100.0, ref_label="ceiling", providers=ordered_providers)]
    if not usable.empty:
        facets = [a for a in order if a in hint["panels"] or a in hint["regimes"]]
        images += [("tile config x shape: speedup over the baseline", img) for img in
                    plots.tile_heatmaps(usable, [a for a in order if a not in facets], facets,
                                        f"{name}: speedup of each tile config vs the baseline")]
    images += [("roofline: achieved TFLOP/s against FLOPs per byte under the measured ceilings",
                img) for img in plots.roofline(frame[frame["status"] == "ok"], roof(meta),
                                               f"{name}: roofline")]
    grouped = ordered["shape_group"].nunique() > 1  # a single shape needs no header row
    return Section(name, fixed, Table.of(ordered, cols, "shape_group" if grouped else None), images,
                   hint["note"])


def times(ratio: float) -> str:
    """A speedup for people: a loss reads as a loss."""
    if ratio != ratio:
        return "-"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def best_row(frame: pd.DataFrame):
    return frame.loc[frame["median_ms"].idxmin()] if not frame.empty else None


def why_not_run(rows: pd.DataFrame) -> str:
    if rows.empty:
        return "not part of this run"
    reasons = Counter(f"suspect: {r['suspect_reason']}" if r["status"] == "ok"
                      else f"{r['status']}: {r['reason']}" if r["reason"] else r["status"]
                      for _, r in rows.iterrows())
    return "; ".join(f"{reason} ({n} case{'s' * (n > 1)})" for reason, n in reasons.most_common(3))


@dataclass
class Headline:
    """How the workload's subject (its own kernels) did in one regime: per shape against the best
    other provider and the sweep's baseline, and the geometric mean, worst and best of each."""
    name: str
    missing: str = ""
    summary: Table | None = None
    shapes: Table | None = None


def regime_axes(hint: dict, g: pd.DataFrame) -> list[str]:
    """The axes whose values are regimes never mixed in one verdict: the workload's `regimes`
    hint, else every varying axis of flags or words (graph=True and False, mode=fwd and fwd_bwd),
    dtype aside."""
    if hint["regimes"]:
        return [a for a in hint["regimes"] if a in g.columns and g[a].nunique(dropna=True) > 1]
    axes = []
    for col in g.columns:
        if col != "dtype" and col not in LEAD_COLS and g[col].nunique(dropna=True) > 1:
            vals = g[col]
            if vals.notna().all() and vals.map(lambda v: isinstance(v, (bool, str))).all():
                axes.append(col)
    return axes


LEAD_COLS = {"case_id", "workload", "provider", "baseline", "status", "reason", "device", "bound",
             "config", "shape_label", "params_label", "shape_short", "suspect", "suspect_text",
             "shape_group", "host_bound", "ncu"}


def headlines(name: str, g: pd.DataFrame, hint: dict | None = None) -> list[Headline]:
    """One verdict per regime (fwd and fwd_bwd, eager and graphed apart): a geometric mean never
    mixes them."""
    hint = hint or hints({}, name)
    axes = regime_axes(hint, g)
    if not axes:
        return [headline(name, g, hint["subject"])]
    keyed = g.assign(_regime=[", ".join(f"{a}={r[a]}" for a in axes) for _, r in g.iterrows()])
    heads = [headline(f"{name} ({regime})", sg.drop(columns="_regime"), hint["subject"])
             for regime, sg in numeric_order(keyed, axes).groupby("_regime", sort=False)]
    if all(h.missing for h in heads):  # nothing to judge in any regime: the reasons, said once
        return [headline(f"{name} (every {', '.join(axes)})", g, hint["subject"])]
    return heads


def headline(name: str, g: pd.DataFrame, subject_names: list[str] = ()) -> Headline:
    """The subject's best config at each shape against the best other provider and against the
    baseline; suspect cases (faster than the machine allows) count for neither side. Without a
    subject hint, every provider but the baseline is the subject."""
    baseline = str(g["baseline"].iloc[0])
    names = set(subject_names) or set(g["provider"]) - {baseline}
    who = ", ".join(sorted(subject_names)) if subject_names else "the non-baseline providers"
    is_subject = g["provider"].isin(names)
    usable = g[(g["status"] == "ok") & ~g["suspect"].astype(bool)]
    subject = g[is_subject]
    if usable[usable["provider"].isin(names)].empty:
        ran = subject["status"].eq("ok").any()
        return Headline(name, f"{who} {'gave no usable time' if ran else 'did not run'}: "
                              f"{why_not_run(subject)}.")
    rivals = {"other": "vs the best other provider", "base": f"vs the baseline ({baseline})"}
    if not (set(g["provider"]) - names - {baseline}):
        del rivals["other"]  # the baseline is the only other provider
    shapes = Table(["shape", "best config", "ms"]
                   + (["best other", "other ms", "vs best other"] if "other" in rivals else [])
                   + [f"{baseline} ms", f"vs {baseline}"])
    ratios: dict[str, list[tuple[float, str]]] = {k: [] for k in rivals}
    for shape, sg in numeric_order(subject, ["shape_short"]).groupby("shape_short", sort=False):
        ok = usable[usable["shape_short"] == shape]
        best = best_row(ok[ok["provider"].isin(names)])
        if best is None:
            shapes.rows.append([(shape, shape), (f"did not run: {why_not_run(sg)}", "")]
                               + [("-", "")] * (len(shapes.columns) - 2))
            continue
        row = [(shape, shape), (best["provider"] + (f", {best['config']}" if best["config"] else ""),
                                best["config"]),
               (fmt(best["median_ms"]), best["median_ms"])]
        for key in rivals:
            pool = ok[~ok["provider"].isin(names)] if key == "other" else ok[ok["provider"] == baseline]
            other = best_row(pool)
            ratio = other["median_ms"] / best["median_ms"] if other is not None else math.nan
            if ratio == ratio:
                ratios[key].append((ratio, shape))
            if key == "other":
                row.append((other["provider"], other["provider"]) if other is not None else ("-", ""))
            row += [(fmt(other["median_ms"]) if other is not None else "-",
                     other["median_ms"] if other is not None else ""), (times(ratio), ratio)]
        shapes.rows.append(row)
    summary = Table([f"best of {who}", "shapes", "geometric mean", "worst", "best"])
    for key, text in rivals.items():
        rs = ratios[key]
        if not rs:
            summary.rows.append([(text, text), ("0", 0), ("no shape to compare", "")] + [("-", "")] * 2)
            continue
        geo = math.exp(sum(math.log(r) for r, _ in rs) / len(rs))
        worst, best = min(rs), max(rs)
        summary.rows.append([(text, text), (str(len(rs)), len(rs)), (times(geo), geo),
                             (f"{times(worst[0])} at {worst[1]}", worst[0]),
                             (f"{times(best[0])} at {best[1]}", best[0])])
    return Headline(name, "", summary, shapes)


NEAR_POWER_LIMIT = 0.95  # a case whose mean power while measured reached this share of the limit


def power_seen(records) -> str | None:
    """The range of the cases' mean power while measured (warm-up, flushes and pauses included), and
    how many averaged near the power limit, where a GPU's time follows the energy its work takes
    rather than its clock; None without readings."""
    seen = [(t.get("mean_power_w"), (t.get("after") or {}).get("power_limit_w"))
            for t in ((rec.get("telemetry") or {}) for rec in records) if t.get("mean_power_w") is not None]
    if not seen:
        return None
    means = [m for m, _ in seen]
    near = [lim for m, lim in seen if lim and m >= NEAR_POWER_LIMIT * lim]
    text = f"{min(means):g} - {max(means):g}"
    if near:
        text += (f"; {len(near)} of {len(seen)} cases averaged within {1 - NEAR_POWER_LIMIT:.0%} of the "
                 f"power limit ({max(near):g} W)")
    return text


def slowed_batches(records) -> str | None:
    """Timed batches the GPU slowed, by reason: re-taken after a pause, or kept once a case's
    retries were spent. Read once per batch, unlike the clocks and power above, which are read
    around each case; None where no case has per-batch clocks (no NVML)."""
    clocked = [rec["clocks"] for rec in records if rec.get("clocks")]
    if not clocked:
        return None
    why = sum((Counter(c.get("discarded_for") or {}) for c in clocked), Counter())
    kept = sum(c.get("throttled_kept") or 0 for c in clocked)
    cases = sum(bool(c.get("discarded_for") or c.get("throttled_kept")) for c in clocked)
    if not cases:
        return "none"
    text = ", ".join(f"{k} {n}" for k, n in why.most_common()) or "none"
    return f"re-taken: {text}; kept throttled: {kept}; in {cases} of {len(clocked)} cases"


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
    power = power_seen(run.records)
    if power:
        items.append(("mean power while measured (W)", power))
    slowed = slowed_batches(run.records)
    if slowed:
        items.append(("timed batches the GPU slowed", slowed))
    settled = settling(run.records)
    if settled:
        items.append(("settling", settled))
    fresh = fresh_workers(run.records)
    if fresh:
        items.append(("cases that left their worker changed", fresh))
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
    bad = frame[~frame["status"].isin(["ok", "skipped"])]
    return Table.of(numeric_order(bad, ["status", "workload", "provider", "params_label"]),
                    {"status": "status", "workload": "workload", "provider": "provider",
                     "params_label": "parameters", "reason": "reason"})


LOG_TAIL_LINES = 30


def log_tails(run: Run) -> list[tuple[str, str]]:
    """(case, the last lines of its log) for each case that did not end ok or skipped and left a
    log (a path relative to the run dir): the device-side assert, not only "worker died"."""
    out = []
    for rec in run.records:
        if rec.get("status") in ("ok", "skipped") or not rec.get("log"):
            continue
        path = Path(run.path) / rec["log"]
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError as e:
            lines = [f"(log not readable: {e.strerror or e})"]
        tail = "\n".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"
        out.append((f"{rec.get('status')} {rec.get('case_id')}", tail))
    return out


def skipped(frame: pd.DataFrame) -> Table:
    """One row per distinct reason a provider was skipped, with how many cases it cost."""
    table = Table(["workload", "provider", "reason", "cases"])
    rows = frame[frame["status"] == "skipped"]
    for (w, p, reason), g in rows.groupby(["workload", "provider", "reason"], sort=True):
        table.rows.append([(w, w), (p, p), (reason, reason), (str(len(g)), len(g))])
    return table


def comparison_table(cmp: compare.Comparison) -> Table:
    table = Table(["verdict", "case", "base ms", "current ms", "change", "CI", "detects", "status"])
    for r in compare.table_rows(cmp):
        table.rows.append([(r["verdict"], r["verdict"]), (r["case"], r["case"]),
                           (fmt(r["base_ms"]), r["base_ms"]), (fmt(r["cur_ms"]), r["cur_ms"]),
                           (r["change"], r["change"]), (r["ci"], r["ci"]),
                           (r["detects"], r["detects"]), (r["status"], r["status"])])
    return table


def ceilings_note(meta: dict) -> str:
    """What the % of ceiling is measured against, or why there is none."""
    c = meta.get("ceilings") or {}
    measured = c.get("measured")
    if not measured:
        why = c.get("reason") or "this run did not measure them"
        return f"No ceilings: {why}; no case has a % of ceiling."
    if c.get("cpu"):
        return (f"No GPU: the floor is this host's cache-resident copy rate on every core, "
                f"{measured['copy_gbps']:.0f} GB/s. A case faster than moving its bytes at that rate "
                "is suspect and never counted as a speedup.")
    rates = ", ".join(f"{k} {v:.0f}" for k, v in measured["tflops"].items())
    text = (f"Measured ceilings of this {c.get('gpu')}: device-to-device copy "
            f"{measured['copy_gbps'] / 1e3:.2f} TB/s"
            + (f", dense matmul TFLOP/s {rates}." if rates else "."))
    sheet = c.get("datasheet")
    if sheet:
        text += (f" Datasheet peaks ({c.get('datasheet_source')}): {sheet['gbps'] / 1e3:.2f} TB/s, "
                 + ", ".join(f"{k} {v:.0f}" for k, v in sheet["tflops"].items()) + " TFLOP/s.")
    return text + (" A case above 100% of the measured ceiling, or whose GPU was busier in one call "
                   "than its timed median (work its timing did not see), is suspect and never counted "
                   "as a speedup.")


def ab_header(meta: dict) -> str:
    """"A: <revision> (<sha>) vs B: <revision> (<sha>)" for a side of an A/B run, else ""."""
    ab = meta.get("ab") or {}
    if "base" not in ab or "head" not in ab:
        return ""

    def side(s: dict) -> str:
        sha = (s.get("sha") or "")[:12]
        return s.get("revision", "?") + (f" ({sha}{', dirty' if s.get('dirty') else ''})" if sha else "")
    return f"A: {side(ab['base'])} vs B: {side(ab['head'])}"


def provider_order(run: Run) -> list[str]:
    """The providers in the order the sweep lists them (its cases' order), else the records'."""
    return list(dict.fromkeys(c.get("provider") for c in (run.cases or run.records)))


def build(run: Run, cmp: compare.Comparison | None = None) -> dict:
    """Everything the templates need."""
    frame = case_frame(run.records, run.meta, run.counters)
    counts = Counter(frame["status"]) if not frame.empty else Counter()
    by_workload: dict[str, list[dict]] = {}
    for rec in run.records:
        by_workload.setdefault(rec["workload"], []).append(rec)
    frames = {name: case_frame(recs, run.meta, run.counters) for name, recs in by_workload.items()}
    order = provider_order(run)
    sections = [workload_section(name, frames[name], recs, run.meta, order)
                for name, recs in sorted(by_workload.items())]
    skips = skipped(frame) if counts.get("skipped") else None
    return {
        "run_id": run.meta.get("run_id") or run.path.name, "hardware": hardware(run.meta),
        "ab": ab_header(run.meta),
        "env": env_card(run), "counts": dict(counts), "sections": sections,
        "headlines": [h for name in sorted(frames)
                      for h in headlines(name, frames[name], hints(run.meta, name))],
        "ceilings_note": ceilings_note(run.meta),
        "tuned": tuned.section(run.meta),
        "failures": failures(frame) if len(frame) - counts.get("ok", 0) - counts.get("skipped", 0)
        else None,
        "failure_logs": log_tails(run),
        "skipped": skips,
        "compare": cmp, "compare_table": comparison_table(cmp) if cmp else None,
        "compare_headline": compare.headline(cmp) if cmp else None,
        "compare_md": compare.to_markdown(cmp, only_changes=True) if cmp else None,
        "noisy_note": compare.noisy_note(cmp) if cmp else "",
        "why": why_section(run.path),  # bench.ab / bench.nightly --counters
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
