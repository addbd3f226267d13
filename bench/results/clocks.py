"""Whether the machine, not the code, explains a change that bench.compare flags.

Every flagged case (regression or improvement) is checked against two explanations, in order:

- clocks: each timed batch's samples scaled by the SM clock read during that batch over the GPU's
  maximum SM clock (the time the batch would have taken at the reference clock; for a compute-bound
  kernel, cycles). When the change of those medians is not flagged and the clock ratio accounts for
  at least half of the raw change, in its direction, both the case's own and the median of the other
  cases at its shape, the clocks explain it. The shape's other cases must agree because a clock that
  moved for one case alone is that case's doing (a kernel that draws more power runs at a lower
  clock: a real regression) or the scatter of one reading a batch: between two H200s, unchanged
  cases' clock ratios ranged 0.96-1.15 with their times within 1%, and 5 of 24 cases made 5% slower
  read clocks 4.5-11% lower (docs/regressions.md).
- the machine: the run's control provider at the same shape (the sweep's `compare.control`, else its
  baseline provider). The case's current samples are divided by the control's ratio of medians, a
  ratio of ratios; when that is not flagged and the control moved the same way by at least half the
  change, the machine explains it. The control itself is held against the median change of the other
  providers at its shape. A change shared by the case and its control (a library both call) is
  explained away too: the control separates only what it does not share.

An explained case's verdict becomes `unchanged`; `raw_verdict` keeps what the raw times said.
docs/regressions.md ("Clocks and controls") says what is stored and why.
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import numpy as np

FLAGGED = ("regression", "improvement")
OTHERS = "other providers"  # what the control provider itself is held against


def normalised(rec: dict) -> list[float] | None:
    """The record's samples at the reference clock: each batch's times x its SM clock / the
    GPU's maximum SM clock. None where a batch has no clock or the batches do not cover the samples."""
    c = rec.get("clocks") or {}
    reps, mhz, ref = c.get("batch_reps") or [], c.get("sm_mhz") or [], c.get("ref_mhz")
    samples = rec.get("samples_ms") or []
    if not ref or not reps or len(reps) != len(mhz) or sum(reps) != len(samples) or not all(mhz):
        return None
    scale = np.repeat(np.asarray(mhz, dtype=float) / ref, reps)
    return list(np.asarray(samples, dtype=float) * scale)


def median_clock(rec: dict) -> float | None:
    """The SM clock of the median rep: each batch's clock counted once per rep."""
    c = rec.get("clocks") or {}
    reps, mhz = c.get("batch_reps") or [], c.get("sm_mhz") or []
    if not reps or len(reps) != len(mhz) or not all(mhz):
        return None
    return float(np.median(np.repeat(np.asarray(mhz, dtype=float), reps)))


def pooled(a: dict | None, b: dict | None) -> dict | None:
    """The clocks of a record whose samples are a's followed by b's (A/B rounds pooled); None
    unless both have clocks, since a part without them cannot be normalised."""
    if not a or not b:
        return None
    return {**a, "batch_reps": a["batch_reps"] + b["batch_reps"], "sm_mhz": a["sm_mhz"] + b["sm_mhz"],
            "discarded": a["discarded"] + b["discarded"],
            "discarded_for": dict(Counter(a["discarded_for"]) + Counter(b["discarded_for"])),
            "throttled_kept": a["throttled_kept"] + b["throttled_kept"]}


def _accounts(factor: float, ratio: float) -> bool:
    """A time factor explains at least half of a change (both as logs), in its direction."""
    if not (factor > 0 and ratio > 0) or ratio == 1:
        return False
    f, r = math.log(factor), math.log(ratio)
    return f * r > 0 and abs(f) >= abs(r) / 2


def _median_ratio(rows: list[dict]) -> float:
    ratios = [r["ratio"] for r in rows if r["ratio"] > 0]  # nan fails the test
    return float(np.median(ratios)) if ratios else math.nan


def _shape_clock(others: list[dict]) -> float:
    """The median clock ratio of the other cases at a shape; nan with fewer than two of them,
    since one other case's reading cannot tell the machine from its own scatter."""
    ratios = [r["clock_ratio"] for r in others if r["clock_ratio"] > 0]  # nan fails the test
    return float(np.median(ratios)) if len(ratios) >= 2 else math.nan


def _shape(rec: dict) -> tuple[str, str]:
    return rec["workload"], json.dumps(rec.get("shape") or {}, sort_keys=True, default=str)


def explain(rows: list[dict], pairs: list[tuple[dict, dict]], judge, control: str | None = None) -> None:
    """Add to each row (bench.compare's row for pairs[i] = (base record, current record)) the clock
    ratio, the clock-normalised ratio, its control and the ratio against it; turn a flagged verdict
    that clocks or the machine explain into `unchanged`, naming which in `explained`.
    `judge(base, cur)` is compare's row for two records."""
    at_shape = defaultdict(list)
    for row, (base, cur) in zip(rows, pairs):
        at_shape[_shape(cur)].append((cur["provider"], row))
        cb, cc = median_clock(base), median_clock(cur)
        row["clock_ratio"] = cc / cb if cb and cc else math.nan
    for row, (base, cur) in zip(rows, pairs):
        name = control or cur.get("baseline")
        peers = at_shape[_shape(cur)]
        if cur["provider"] == name:
            ref, factor = OTHERS, _median_ratio([r for p, r in peers if p != name])
        else:
            ref, factor = name, _median_ratio([r for p, r in peers if p == name])
        nb, nc = normalised(base), normalised(cur)
        shape_clock = _shape_clock([r for r in (r for _, r in peers) if r is not row])
        row.update(shape_clock_ratio=shape_clock,
                   norm_ratio=float(np.median(nc) / np.median(nb)) if nb and nc else math.nan,
                   control=ref if factor > 0 else None, control_ratio=factor,
                   controlled_ratio=row["ratio"] / factor, raw_verdict=row["verdict"], explained=None)
        if row["verdict"] not in FLAGGED:
            continue
        if nb and nc and _accounts(1 / row["clock_ratio"], row["ratio"]) \
                and _accounts(1 / shape_clock, row["ratio"]) and judge(
                {**base, "samples_ms": nb}, {**cur, "samples_ms": nc})["verdict"] == "unchanged":
            row.update(verdict="unchanged", explained="clocks")
        elif _accounts(factor, row["ratio"]) and judge(
                base, {**cur, "samples_ms": [s / factor for s in cur["samples_ms"]]})["verdict"] == "unchanged":
            row.update(verdict="unchanged", explained="machine")


def _pct(x: float) -> str:
    return f"{(x - 1) * 100:+.1f}%"


def note(row: dict) -> str:
    """What explains a row's change, for its verdict cell: '' when nothing does."""
    if row.get("explained") == "clocks":
        return f" (clocks: SM clock {_pct(row['clock_ratio'])}, at equal clocks {_pct(row['norm_ratio'])})"
    if row.get("explained") == "machine":
        return (f" (machine: {row['control']} {_pct(row['control_ratio'])}, "
                f"relative to it {_pct(row['controlled_ratio'])})")
    return ""


def summary(rows: list[dict]) -> str:
    """'N flagged by raw times explained by clocks (a) or the machine (b)', or ''."""
    n = Counter(r.get("explained") for r in rows)
    if not n["clocks"] + n["machine"]:
        return ""
    return (f"{n['clocks'] + n['machine']} flagged by raw times explained by clocks ({n['clocks']}) "
            f"or the machine ({n['machine']})")
