"""The trend page: each case's median per nightly run on one GPU model, regressions marked."""
from __future__ import annotations

from pathlib import Path


from bench.present import plots, report
from bench.results import compare
from bench.results.history import read
from bench.results.store import utc_now


def render_trend(db, gpu: str, out_html: Path) -> Path:
    """Median over time per case on this GPU model, regressions marked; one section per sweep."""
    history = read(db, gpu)
    sections = []
    for (sweep, workload), g in history.groupby(["sweep", "workload"], sort=True):
        sections.append((f"{sweep}: {workload}", plots.trend(g, f"{sweep} / {workload}: median per night")))
    latest = history.sort_values("date", kind="stable").groupby(["sweep", "case"]).tail(1)
    flagged = latest[latest["verdict"].isin(sorted(compare.FAILING))]
    html = report.environment().get_template("trend.html.j2").render(
        hardware=gpu, updated=utc_now(), nights=history["run_id"].nunique(), sections=sections,
        flagged=flagged.to_dict("records"))
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(html)
    return out_html
