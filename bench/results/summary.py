"""The summary table: one row per case, statistics recomputed from the stored samples, speedup
against the sweep's baseline provider for the same shape, and the share of the machine's measured
ceiling (meta.json's `ceilings`) that the case reaches; the cases that left their worker
changed, with what the fresh worker after each cost; and the reps dropped while cases settled."""
from __future__ import annotations

import json
import math
from collections import Counter
from datetime import datetime

import numpy as np
import pandas as pd

from bench.results.stats import describe

LEAD = ["case_id", "workload", "provider", "baseline", "status", "reason", "device"]
STATS = ["n", "median_ms", "mean_ms", "iqr_ms", "ci_low_ms", "ci_high_ms", "ci_rel", "min_ms",
         "tflops", "gbps", "bound", "ceiling_pct", "suspect", "suspect_reason", "speedup",
         "max_abs_err", "rel_err", "first_call_ms", "host_ms", "busy_ms", "extra_mib"]


def shape_key(record: dict) -> str:
    return record["workload"] + json.dumps(record.get("shape", {}), sort_keys=True)


def floor_ms(rec: dict, ceilings: dict | None) -> tuple[float, str] | None:
    """(the least time the case can take at the measured ceilings, its bound: memory or compute);
    None where nothing is known. FLOPs count against the matmul rate of the case's dtype only."""
    measured = (ceilings or {}).get("measured")
    if not measured:
        return None
    nbytes, flops = rec.get("bytes"), rec.get("flops")
    mem = nbytes / (measured["copy_gbps"] * 1e6) if nbytes else 0.0
    rate = measured["tflops"].get(str((rec.get("params") or {}).get("dtype")))
    comp = flops / (rate * 1e9) if flops and rate else 0.0
    if not mem and not comp:
        return None
    return (mem, "memory") if mem >= comp else (comp, "compute")


# a case whose GPU worked, over every stream, longer in one call (`busy_ms`, from CUPTI) than this
# share of its timed median plus these ms did work its timing events did not see. 62 honest cases on
# an H100 (fmha, LayerNorm, the model head; 2026-12-05) read 0.50-1.004 of their median; attention
# hidden on a side stream, under the timer's device-wide rule, 1.12-31 (docs/isolation.md)
BUSY_SHARE, BUSY_MS = 1.10, 0.001


def suspect_reason(rec: dict, ceilings: dict | None) -> str | None:
    """Why a case's time cannot be believed, or None: faster than the machine allows (its median
    under the floor of its bytes and FLOPs), or its GPU busier in one call than the timed median."""
    samples = rec.get("samples_ms") or []
    if not samples:
        return None
    median, floor, busy = float(np.median(samples)), floor_ms(rec, ceilings), rec.get("busy_ms")
    if floor and median < floor[0]:
        return "faster than the measured ceiling"
    if busy and busy > BUSY_SHARE * median + BUSY_MS:
        return f"its GPU was busy {busy:.3g} ms in one call, against a timed median of {median:.3g} ms"
    return None


def is_suspect(rec: dict, ceilings: dict | None) -> bool:
    return suspect_reason(rec, ceilings) is not None


def summarize(records: list[dict], ceilings: dict | None = None) -> pd.DataFrame:
    """Rows in record order; speedup = baseline median / median, only where both are `ok` and
    neither is `suspect` (faster than the measured ceiling: a broken measurement, not a win)."""
    rows, base_median = [], {}
    for rec in records:
        d = describe(rec.get("samples_ms") or [])
        med = d["median"]
        row = {k: rec.get(k) for k in LEAD}
        row.update(rec.get("params", {}))
        row.update(
            n=d["n"], median_ms=med, mean_ms=d["mean"], iqr_ms=d["iqr"],
            ci_low_ms=d["ci_low"], ci_high_ms=d["ci_high"],
            ci_rel=(d["ci_high"] - d["ci_low"]) / 2 / med if med and med > 0 else math.nan,
            min_ms=d["min"],
            tflops=rec["flops"] / med / 1e9 if rec.get("flops") and med > 0 else math.nan,
            gbps=rec["bytes"] / med / 1e6 if rec.get("bytes") and med > 0 else math.nan,
            max_abs_err=rec.get("max_abs_err"), rel_err=rec.get("rel_err"),
            first_call_ms=rec.get("first_call_ms"), host_ms=rec.get("host_ms"),
            busy_ms=rec.get("busy_ms"), extra_mib=rec.get("extra_mib"),
        )
        floor = floor_ms(rec, ceilings)
        row["bound"] = floor[1] if floor else None
        row["ceiling_pct"] = floor[0] / med * 100 if floor and med > 0 else math.nan
        row["suspect_reason"] = suspect_reason(rec, ceilings)
        row["suspect"] = row["suspect_reason"] is not None
        rows.append(row)
        if rec.get("status") == "ok" and rec["provider"] == rec.get("baseline") and not row["suspect"]:
            base_median[shape_key(rec)] = med
    for rec, row in zip(records, rows):
        base = base_median.get(shape_key(rec))
        ok = (rec.get("status") == "ok" and base is not None and row["median_ms"] > 0
              and not row["suspect"])
        row["speedup"] = base / row["median_ms"] if ok else math.nan
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=LEAD + STATS)
    params = [c for c in frame.columns if c not in LEAD and c not in STATS]
    return frame[LEAD + params + STATS]


def _seconds(since, until) -> float | None:
    """Seconds between two records' UTC timestamps; None for one that is not a timestamp."""
    try:
        then, now = (datetime.fromisoformat(t.rstrip("Z")) for t in (since, until))
        return (now - then).total_seconds()
    except (AttributeError, TypeError, ValueError):
        return None


def fresh_workers(records) -> str | None:
    """The cases that left their worker changed (torch.compile sets environment variables and
    starts threads and a compile process, for one), by provider and what they changed: the next
    case on that device took a fresh worker, whose start is the median gap given. None if none did."""
    left = [r for r in records if r.get("leaked")]
    if not left:
        return None
    who = Counter(r["provider"] for r in left)
    names = sorted({str(n) for r in left if isinstance(r["leaked"].get("environ"), list)
                    for n in r["leaked"]["environ"]})
    what = sorted(f"environ ({', '.join(names)})" if k == "environ" and names else k
                  for k in {k for r in left for k in r["leaked"]})
    by_device: dict = {}
    for r in records:
        by_device.setdefault(r.get("device"), []).append(r)
    gaps = []
    for recs in by_device.values():
        recs.sort(key=lambda r: str(r.get("started_utc")))
        gaps += [_seconds(a.get("ended_utc"), b.get("started_utc")) for a, b in zip(recs, recs[1:])
                 if a.get("leaked")]
    gaps = sorted(g for g in gaps if g is not None)
    text = (f"{len(left)} of {len(records)} cases ({', '.join(f'{p} {n}' for p, n in who.most_common())}) "
            f"changed {'; '.join(what)}")
    if gaps:
        text += f"; the next case began {gaps[len(gaps) // 2]:.1f} s later (median), in a fresh worker"
    return text


def settling(records) -> str | None:
    """Reps dropped as warm-up because a case's later batches were timed apart from its earlier
    ones, and the cases still moving when their time ran out; None where no case was judged (a CPU)."""
    judged = [h for h in (rec.get("hygiene") or {} for rec in records) if h.get("settled") is not None]
    if not judged:
        return None
    dropped = [h["unsettled_reps"] for h in judged if h.get("unsettled_reps")]
    moving = [h["drift"] for h in judged if not h["settled"] and h.get("unsettled_reps")]
    text = f"{sum(dropped)} reps dropped as warm-up in {len(dropped)} of {len(judged)} cases"
    if moving:
        known = [d for d in moving if d is not None]
        text += f"; still moving at the end: {len(moving)}" + (
            f" (halves {min(known):+.1%} to {max(known):+.1%} apart)" if known else "")
    return text
