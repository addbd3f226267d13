"""Matching two runs' cases and judging each: the ratio of medians with a bootstrap interval (or, for
an A/B's interleaved rounds, the mean ratio of its pairs of rounds with a t interval; on a CPU their
median with the sign test's interval), and a verdict that needs the change to clear the threshold,
the run-to-run noise expected of the case (its sample spread times a factor per device kind; none
for pairs of rounds) and the interval. The command is bench.compare; docs/regressions.md says why
each rule is there."""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.results import clocks
from bench.results import stats
from bench.results.baseline import hardware
from bench.cli import BadInput
from bench.results.store import FAILED, Run
from bench.results.summary import suspect_reason

CONFIDENCE = 0.99
# Run-to-run noise, in units of a case's own sample spread, per device kind: the bootstrap interval
# covers the noise within one run only, and a shared CPU's load moves whole runs by more than its
# samples scatter within one (docs/regressions.md has the measurements behind these numbers).
RUN_NOISE = {"cpu": 5.0, "cuda": 1.0}
N_BOOT = 2000
FAILING = {"regression", "broken"}  # verdicts that make the comparison fail
INTERVALS = {"bootstrap": "bootstrap CI of the ratio of medians",
             "paired": "t interval of the mean ratio of paired A/B rounds",
             "sign": "sign-test interval of the median ratio of paired A/B rounds"}


def ratio_ci(base, cur, confidence: float = CONFIDENCE, n_boot: int = N_BOOT,
             seed: int = 0) -> tuple[float, float, float]:
    """(median(cur)/median(base), low, high): percentile bootstrap, each side resampled on its own.

    Seeded, so a comparison is reproducible. With fewer than 2 samples on a side the interval is
    (nan, nan): nothing can be said about the noise.
    """
    b, c = np.asarray(base, dtype=float), np.asarray(cur, dtype=float)
    if b.size == 0 or c.size == 0:
        return math.nan, math.nan, math.nan
    ratio = float(np.median(c) / np.median(b))
    if b.size < 2 or c.size < 2:
        return ratio, math.nan, math.nan
    rng = np.random.default_rng(seed)
    mb = np.median(b[rng.integers(0, b.size, (n_boot, b.size))], axis=1)
    mc = np.median(c[rng.integers(0, c.size, (n_boot, c.size))], axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(mc / mb, [alpha / 2, 1 - alpha / 2])
    return ratio, float(lo), float(hi)


def spread(samples) -> float:
    """A robust standard deviation of the log samples (IQR / 1.349): their relative scatter."""
    x = np.asarray(samples, dtype=float)
    if x.size < 2 or not (x > 0).all():
        return 0.0
    q1, q3 = np.percentile(np.log(x), [25, 75])
    return float((q3 - q1) / 1.349)


def verdict(ratio: float, lo: float, hi: float, threshold: float, noise: float = 0.0) -> str:
    """regression / improvement when the change passes both the threshold and the expected
    run-to-run noise (a change of the log median), and the interval excludes 1."""
    if not (lo > 0 and hi > 0):
        return "unchanged"
    margin = max(math.log1p(threshold), noise)
    if math.log(ratio) > margin and lo > 1:
        return "regression"
    if -math.log(ratio) > margin and hi < 1:
        return "improvement"
    return "unchanged"


def run_noise(base: dict, cur: dict, kind: str) -> float:
    """How far a case's log median may move between two runs of the same code: its larger sample
    spread times the device kind's factor."""
    factor = RUN_NOISE.get(kind, max(RUN_NOISE.values()))
    return factor * max(spread(base.get("samples_ms") or []), spread(cur.get("samples_ms") or []))


def case_label(rec: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in sorted((rec.get("params") or {}).items()))
    return f"{rec['workload']}/{rec['provider']} [{params}]"


def _median(rec: dict) -> float:
    s = rec.get("samples_ms") or []
    return float(np.median(s)) if s else math.nan


def compare_case(base: dict, cur: dict, threshold: float, kind: str = "cuda") -> dict:
    """One row of the comparison table."""
    b_ok, c_ok = base.get("status") == "ok", cur.get("status") == "ok"
    ratio = lo = hi = math.nan
    noise = run_noise(base, cur, kind)
    interval = None
    if b_ok and c_ok:
        rounds = [stats.round_times(r.get("samples_ms"), r.get("round_reps"), kind) for r in (base, cur)]
        if len(rounds[0]) >= 2 and len(rounds[0]) == len(rounds[1]):  # A/B: pairs of rounds
            ratio, lo, hi = stats.paired_ratio_ci(*rounds, CONFIDENCE, kind)
            noise = 0.0  # the pairs cancel the machine's drift; what is left widens the interval
            interval = "sign" if kind == "cpu" else "paired"
        else:
            interval = "bootstrap"
            seed = zlib.crc32(cur["case_id"].encode())
            ratio, lo, hi = ratio_ci(base.get("samples_ms") or [], cur.get("samples_ms") or [], seed=seed)
        result = verdict(ratio, lo, hi, threshold, noise)
    elif b_ok and cur.get("status") in FAILED:
        result = "broken"
    elif c_ok:
        result = "fixed"
    else:
        result = "not compared"
    noisy = bool(hi - lo > 2 * threshold) if b_ok and c_ok and not math.isnan(lo) else False
    return {
        "case": case_label(cur), "workload": cur["workload"], "provider": cur["provider"],
        "params": cur.get("params", {}), "base_status": base.get("status"),
        "cur_status": cur.get("status"), "base_ms": _median(base), "cur_ms": _median(cur),
        "ratio": ratio, "ci_low": lo, "ci_high": hi, "run_noise": noise, "verdict": result,
        "noisy": noisy or noise > math.log1p(threshold),
        "detectable": stats.detectable_change(ratio, lo, threshold, noise),
        "reason": "" if c_ok else (cur.get("reason") or ""), "interval": interval,
    }


@dataclass
class Comparison:
    base: str
    cur: str
    hardware: tuple[str, str]
    threshold: float
    confidence: float
    rows: list[dict] = field(default_factory=list)
    only_base: list[str] = field(default_factory=list)
    only_cur: list[str] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(r["verdict"] == kind for r in self.rows)

    @property
    def failing(self) -> list[dict]:
        return [r for r in self.rows if r["verdict"] in FAILING]


def sweep_threshold(meta: dict) -> float | None:
    value = ((meta.get("sweep") or {}).get("compare") or {}).get("threshold")
    return float(value) if value is not None else None


def checked_threshold(threshold: float) -> float:
    """A relative change that counts: a positive, finite number; BadInput otherwise, before
    anything is measured where a command measures first (bench.ab, bench.bisect)."""
    if not 0 < threshold < math.inf:
        raise BadInput(f"threshold must be a positive number, got {threshold}")
    return threshold


def compare_runs(base: Run, cur: Run, threshold: float | None = None,
                 allow_different_hardware: bool = False) -> Comparison:
    """Match the two runs' cases and judge each; BadInput for runs from different GPU models."""
    hw = (hardware(base.meta), hardware(cur.meta))
    if hw[0] != hw[1] and not allow_different_hardware:
        raise BadInput(f"runs are from different hardware ({hw[0]} vs {hw[1]}); "
                       "pass --allow-different-hardware to compare anyway")
    if threshold is None:
        threshold = sweep_threshold(cur.meta) or sweep_threshold(base.meta) or stats.THRESHOLD
    checked_threshold(threshold)
    if not cur.meta.get("complete", False):
        raise BadInput(f"{cur.path}: the run is incomplete (interrupted?); finish it with "
                       f"python -m bench.run --resume {cur.path}")
    b = {r["case_id"]: r for r in base.records}
    c = {r["case_id"]: r for r in cur.records}
    if not any(k in b for k in c):
        raise BadInput(f"no case of {cur.path} is in {base.path} "
                       f"({len(cur.records)} against {len(base.records)} cases): nothing to compare")
    kind = (cur.meta.get("env") or {}).get("device_kind", "cuda")
    out = Comparison(str(base.path), str(cur.path), hw, threshold, CONFIDENCE)
    suspect = {id(r): why for run in (base, cur) for r in run.records
               if (why := suspect_reason(r, run.meta.get("ceilings")))}
    out.rows = [compare_case(b[k], c[k], threshold, kind) for k in c if k in b]
    for row, k in zip(out.rows, [k for k in c if k in b]):
        why = suspect.get(id(c[k])) or suspect.get(id(b[k]))
        if why:  # an unbelievable time is no change to judge
            row.update(verdict="not compared", reason=f"suspect: {why}")
    clocks.explain(out.rows, [(b[k], c[k]) for k in c if k in b],
                   lambda x, y: compare_case(x, y, threshold, kind),
                   ((cur.meta.get("sweep") or {}).get("compare") or {}).get("control"))
    out.only_base = sorted(case_label(b[k]) for k in b if k not in c)
    out.only_cur = sorted(case_label(c[k]) for k in c if k not in b)
    return out


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{(x - 1) * 100:+.1f}%"


def _at_least(change: float) -> str:
    """The smallest slowdown a case's verdict would flag (stats.detectable_change), for people."""
    return "-" if change is None or math.isnan(change) else f">= {change * 100:.3g}%"


def _noisy(row: dict) -> str:
    """A noisy case's verdict says what it could still detect, not only that it is noisy."""
    if not row["noisy"]:
        return ""
    at_least = _at_least(row.get("detectable", math.nan))
    return " (noisy)" if at_least == "-" else f" (could detect {at_least})"


def table_rows(cmp: Comparison) -> list[dict]:
    """Rows for people: failing verdicts first, then by the size of the change."""
    def order(r):
        rank = {"broken": 0, "regression": 1, "improvement": 2, "fixed": 3}.get(r["verdict"], 4)
        return rank, -abs((r["ratio"] if not math.isnan(r["ratio"]) else 1) - 1)

    return [{
        "verdict": r["verdict"] + clocks.note(r) + _noisy(r), "case": r["case"],
        "base_ms": r["base_ms"], "cur_ms": r["cur_ms"], "change": _pct(r["ratio"]),
        "ci": f"[{_pct(r['ci_low'])}, {_pct(r['ci_high'])}]" if not math.isnan(r["ci_low"]) else "-",
        "detects": _at_least(r.get("detectable", math.nan)),
        "status": r["cur_status"] if r["base_status"] == r["cur_status"]
        else f"{r['base_status']} -> {r['cur_status']}", "explained": r.get("explained"),
    } for r in sorted(cmp.rows, key=order)]


def headline(cmp: Comparison) -> str:
    parts = [f"{cmp.count(k)} {k}" for k in ("regression", "broken", "improvement", "unchanged",
                                              "fixed", "not compared") if cmp.count(k)]
    one_side = len(cmp.only_base) + len(cmp.only_cur)
    if one_side:
        parts.append(f"{one_side} on one side only")
    explained = clocks.summary(cmp.rows)
    if explained:
        parts.append(explained)
    methods = {r.get("interval") for r in cmp.rows} & set(INTERVALS)
    how = " and ".join(INTERVALS[m] for m in sorted(methods)) or INTERVALS["bootstrap"]
    return (", ".join(parts) or "no cases") + f" (threshold {cmp.threshold:.1%}, " \
        f"{cmp.confidence:.0%} {how})"


def noisy_note(cmp: Comparison) -> str:
    """One sentence on what "noisy" means, with the smallest change the noisy cases could have
    shown where the rows carry it; "" when no case is noisy."""
    noisy = [r for r in cmp.rows if r["noisy"]]
    if not noisy:
        return ""
    text = (f'{len(noisy)} of {len(cmp.rows)} cases are "noisy": their confidence interval or '
            f"run-to-run spread is wider than the {cmp.threshold:.1%} threshold, so a change of that "
            "size could be neither shown nor ruled out; noisy is not a regression and not a win")
    seen = [r["detectable"] for r in noisy if isinstance(r.get("detectable"), float)
            and not math.isnan(r["detectable"])]
    if seen:
        text += f" (the median of what they could detect: {_at_least(float(np.median(seen)))})"
    return text + "."


MD_LIST = 10


def to_markdown(cmp: Comparison, only_changes: bool = False) -> str:
    """A markdown table; `only_changes` keeps regressions, breakages, improvements and the changes
    that clocks or the machine explain."""
    rows = [r for r in table_rows(cmp) if not only_changes or r["explained"] or
            r["verdict"].split(" ")[0] in ("regression", "broken", "improvement")]
    lines = [f"**{headline(cmp)}**", ""] + ([noisy_note(cmp), ""] if noisy_note(cmp) else [])
    if cmp.hardware[0] != cmp.hardware[1]:
        lines += [f"Different hardware: {cmp.hardware[0]} vs {cmp.hardware[1]}.", ""]
    if rows:
        lines += ["| verdict | case | base ms | current ms | change | CI | detects | status |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['verdict']} | {r['case']} | {r['base_ms']:.4g} | {r['cur_ms']:.4g} | "
                  f"{r['change']} | {r['ci']} | {r['detects']} | {r['status']} |" for r in rows]
    for title, cases in (("Only in the baseline", cmp.only_base), ("Only in the current run", cmp.only_cur)):
        if cases:  # a nightly subset of a full baseline leaves hundreds: list a few, count the rest
            lines += ["", f"{title} ({len(cases)}):", *[f"- {c}" for c in cases[:MD_LIST]]]
            if len(cases) > MD_LIST:
                lines.append(f"- ... and {len(cases) - MD_LIST} more (compare.json lists them all)")
    return "\n".join(lines) + "\n"


def to_text(cmp: Comparison) -> str:
    rows = table_rows(cmp)
    cols = ["verdict", "change", "ci", "detects", "base_ms", "cur_ms", "status", "case"]
    cells = [[c for c in cols]] + [[r[c] if isinstance(r[c], str) else f"{r[c]:.4g}" for c in cols]
                                   for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols) - 1)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) + "  " + row[-1] for row in cells]
    for title, cases in (("only in BASE", cmp.only_base), ("only in CUR", cmp.only_cur)):
        lines += [f"{title}: {c}" for c in cases]
    return "\n".join(lines + [headline(cmp)] + ([noisy_note(cmp)] if noisy_note(cmp) else []))


def clean(v):
    """NaN as None: JSON has no NaN."""
    return None if isinstance(v, float) and math.isnan(v) else v


def to_json(cmp: Comparison) -> dict:
    return {
        "base": cmp.base, "current": cmp.cur, "hardware": list(cmp.hardware),
        "threshold": cmp.threshold, "confidence": cmp.confidence,
        "counts": {k: cmp.count(k) for k in ("regression", "broken", "improvement", "unchanged",
                                             "fixed", "not compared")},
        "cases": [{k: clean(v) for k, v in r.items()} for r in cmp.rows],
        "only_base": cmp.only_base, "only_current": cmp.only_cur,
    }


def write(cmp: Comparison, out_dir) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(to_json(cmp), indent=2) + "\n")
    (out / "compare.md").write_text(to_markdown(cmp))
