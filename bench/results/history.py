"""The nightly history: one row per case per run (median, its CI, the verdict against the
baseline), appended after every nightly run and read by the trend page."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.results import compare
from bench.results.baseline import hardware
from bench.results.store import Run
from bench.results.summary import summarize

HISTORY_COLUMNS = ["date", "run_id", "sweep", "hardware", "git_sha", "case", "workload", "provider",
                   "params", "status", "median_ms", "ci_low_ms", "ci_high_ms", "verdict", "change"]


def history_rows(run: Run, cmp: compare.Comparison | None) -> pd.DataFrame:
    """One row per case of the run, with its verdict against the baseline when there was one."""
    verdicts = {compare.case_label(r): r for r in (cmp.rows if cmp else [])}
    frame = summarize(run.records)
    rows = []
    for rec, (_, s) in zip(run.records, frame.iterrows()):
        label = compare.case_label(rec)
        judged = verdicts.get(label) or {}
        rows.append({
            "date": run.meta.get("started_utc"), "run_id": run.meta.get("run_id") or run.path.name,
            "sweep": (run.meta.get("sweep") or {}).get("name"), "hardware": hardware(run.meta),
            "git_sha": (run.meta.get("git") or {}).get("sha"), "case": label,
            "workload": rec["workload"], "provider": rec["provider"],
            "params": json.dumps(rec.get("params") or {}, sort_keys=True), "status": rec.get("status"),
            "median_ms": s["median_ms"], "ci_low_ms": s["ci_low_ms"], "ci_high_ms": s["ci_high_ms"],
            "verdict": judged.get("verdict", ""), "change": judged.get("ratio", float("nan")) - 1,
        })
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def append_history(path: Path, rows: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(path, mode="a", header=not path.exists() or path.stat().st_size == 0, index=False)
