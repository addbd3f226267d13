"""The trend page: each case's median per nightly run on one GPU model, regressions and lasting
steps marked, the cases also measured on other GPU models side by side, and the history's own
sensitivity: false alarms expected of each run against those flagged, and the canary's record.
A failing case shows why it changed where the nightly profiled it (`--counters`)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.present import plots, report
from bench.results import compare
from bench.results.changepoints import Step
from bench.results.nightly import canary_line, sensitivity
from bench.results.store import utc_now


SENSITIVITY_RUNS = 30  # the latest runs listed in the sensitivity table


def render_trend(history: pd.DataFrame, steps: list[Step], gpu: str, out_html: Path,
                 why: list[dict] = ()) -> Path:
    """Median over time per case on this GPU model, regressions and steps marked, one section per
    sweep; then each case also measured on other GPU models, one line per model. `why`: the
    history's counter diffs (history.read_counter_diffs), each shown beside its failing case."""
    here = history[history["hardware"] == gpu]
    timed = here.dropna(subset=["median_ms"])  # a case skipped every night has nothing to draw
    sections = []
    for (sweep, workload), g in timed.groupby(["sweep", "workload"], sort=True):
        sections.append((f"{sweep}: {workload}",
                         plots.trend(g, f"{sweep} / {workload}: median per night", steps)))
    shared = history[history["case"].isin(set(here["case"]))]
    shared = shared[shared.groupby(["sweep", "case"])["hardware"].transform("nunique") > 1]
    for sweep, g in shared.groupby("sweep", sort=True):
        sections.append((f"{sweep}: across GPU models",
                         plots.trend(g, f"{sweep}: median per night on each GPU model", steps)))
    latest = here.sort_values("date", kind="stable").groupby(["sweep", "case"]).tail(1)
    flagged = latest[latest["verdict"].isin(sorted(compare.FAILING))].to_dict("records")
    texts = {(d["run_id"], d["case"]): d["text"] for d in why}
    for r in flagged:
        r["why"] = texts.get((r["run_id"], r["case"]), "")
    per_run = sensitivity(here)
    html = report.environment().get_template("trend.html.j2").render(
        sensitivity=per_run.iloc[::-1].head(SENSITIVITY_RUNS).to_dict("records"),
        canary=canary_line(per_run),
        hardware=gpu, updated=utc_now(), nights=here["run_id"].nunique(), sections=sections,
        flagged=flagged, steps=[s for s in steps if s.hardware == gpu])
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(html)
    return out_html
