"""What a night says of its own sensitivity: the false alarms its case count makes expected, and
whether it caught its canary (python -m bench.nightly runs the plan, bench.measure.nightly_plan)."""
from __future__ import annotations

import dataclasses
import math

import pandas as pd

from bench.results import compare, stats

# A canary pair (bench.workloads.canary, sweeps/canary.yaml): the providers so named, at equal
# parameters; the history keeps the canary's verdict against its twin as one of CANARY_VERDICTS.
CANARY, TWIN = "canary", "twin"
CANARY_VERDICTS = {True: "detected", False: "missed"}
JUDGED = ("regression", "improvement", "unchanged")  # verdicts of a case compared on both sides

def _key(rec: dict) -> tuple:
    return rec["workload"], tuple(sorted((rec.get("params") or {}).items()))


def canaries(records: list[dict], threshold: float, kind: str) -> list[dict]:
    """Each canary case of a run judged against its twin by the comparison's own rule, as a
    comparison row whose verdict says whether the known slowdown was caught."""
    twins = {_key(r): r for r in records if r["provider"] == TWIN}
    rows = []
    for rec in records:
        twin = twins.get(_key(rec)) if rec["provider"] == CANARY else None
        if twin is not None and twin["status"] == rec["status"] == "ok":
            row = compare.compare_case(twin, rec, threshold, kind)
            rows.append({**row, "verdict": CANARY_VERDICTS[row["verdict"] == "regression"]})
    return rows


def with_canaries(cmp: compare.Comparison | None, rows: list[dict], run_path: str,
                  threshold: float) -> compare.Comparison | None:
    """The comparison the history records: the canary cases' rows replaced by their verdicts
    against their twins (the baseline's say nothing of the sensitivity)."""
    if not rows:
        return cmp
    labels = {r["case"] for r in rows}
    if cmp is None:
        cmp = compare.Comparison("", run_path, ("", ""), threshold, compare.CONFIDENCE)
    return dataclasses.replace(cmp, rows=[r for r in cmp.rows if r["case"] not in labels] + rows)


def expected_false_alarms(compared: int, confidence: float = compare.CONFIDENCE) -> float:
    """How many of `compared` unchanged cases the verdict rule flags on an ordinary night."""
    return compared * stats.false_alarm_rate(confidence)


def sensitivity(history: pd.DataFrame) -> pd.DataFrame:
    """Per run of the history: cases compared with the baseline, regressions flagged, the false
    alarms expected of that many cases, and the canaries caught of those run; oldest first."""
    frame = history.assign(compared=history["verdict"].isin(JUDGED),
                           flagged=history["verdict"] == "regression",
                           canary=history["verdict"].isin(CANARY_VERDICTS.values()),
                           caught=history["verdict"] == CANARY_VERDICTS[True])
    per = frame.groupby(["date", "run_id", "sweep"], sort=True, dropna=False)[
        ["compared", "flagged", "canary", "caught"]].sum().reset_index()
    per["expected"] = per["compared"].map(expected_false_alarms)
    return per


def canary_line(per_run: pd.DataFrame) -> str:
    """The canary's detection rate over the history's runs: the fleet's measured sensitivity."""
    total, caught = int(per_run["canary"].sum()), int(per_run["caught"].sum())
    if not total:
        return "No canary in the history (add sweeps/canary.yaml to the nightly plan)."
    return (f"Canary detected {caught} of {total} times ({caught / total:.0%}) over "
            f"{int((per_run['canary'] > 0).sum())} runs.")


def sensitivity_md(compared: int, canary_rows: list[dict], per_run: pd.DataFrame) -> str:
    """report.md's section: tonight's expected false alarms, its canary, the canary's record."""
    rate = stats.false_alarm_rate(compare.CONFIDENCE)
    lines = ["## Sensitivity", "",
             f"- Expected false alarms tonight: {expected_false_alarms(compared):.2f} "
             f"({compared} cases compared x {rate:.1%}, the chance the verdict rule flags an "
             "unchanged case)."]
    for r in canary_rows:
        known = 1 / r["params"]["repeats"] if r["params"].get("repeats") else math.nan
        lines.append(f"- Canary {r['case']}: {r['verdict']}; slower by {known:.1%} by construction, "
                     f"measured {r['ratio'] - 1:+.1%} against its twin, could detect >= "
                     f"{r['detectable']:.1%}.")
    lines.append(f"- {canary_line(per_run)}")
    return "\n".join(lines) + "\n"
