"""The nightly regression job: run the nightly sweep set, compare each run with this GPU's blessed
baseline, render the reports, append every case to the history, render the trend page, and exit 1
on a regression (2 on bad input, the runner's status if a sweep could not finish).

    python -m bench.nightly [--config sweeps/nightly.yaml] [--out results]
                            [--baselines results/baselines] [--history results/history.csv]
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from bench import compare, plots, report
from bench.baseline import baseline_dir, hardware, open_run
from bench.cli import BadInput, Parser
from bench.run import main as run_main
from bench.store import META, Run, utc_now
from bench.summary import summarize

ENTRY_KEYS = {"sweep", "set", "filter", "providers"}
HISTORY_COLUMNS = ["date", "run_id", "sweep", "hardware", "git_sha", "case", "workload", "provider",
                   "params", "status", "median_ms", "ci_low_ms", "ci_high_ms", "verdict", "change"]


def load_plan(path) -> list[dict]:
    """The sweeps to run: [{sweep, set, filter, providers}], checked so a typo fails before any run."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    entries = data.get("sweeps") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise BadInput(f"{path}: expected a non-empty list under 'sweeps'")
    plan = []
    for i, entry in enumerate(entries):
        where = f"{path}: sweeps[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sweep"), str):
            raise BadInput(f"{where}: expected a mapping with 'sweep: FILE'")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise BadInput(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                           f"(known: {', '.join(sorted(ENTRY_KEYS))})")
        for key in ("set", "filter", "providers"):
            if not all(isinstance(v, str) for v in entry.get(key) or []):
                raise BadInput(f"{where}.{key}: expected a list of strings")
        if not Path(entry["sweep"]).is_file():
            raise BadInput(f"{where}: no sweep file {entry['sweep']}")
        plan.append({"sweep": entry["sweep"], "set": entry.get("set") or [],
                     "filter": entry.get("filter") or [], "providers": entry.get("providers") or []})
    return plan


def run_sweep(entry: dict, out: Path, profile: str | None) -> tuple[int, str]:
    """Run one entry through bench.run; (exit status, run directory it printed last)."""
    argv = [entry["sweep"], "--out", str(out)]
    argv += [a for v in entry["set"] for a in ("--set", v)]
    argv += [a for v in entry["filter"] for a in ("--filter", v)]
    if entry["providers"]:
        argv += ["--providers", ",".join(entry["providers"])]
    if profile:
        argv += ["--profile", profile]
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        rc = run_main(argv)
    text = captured.getvalue()
    sys.stdout.write(text)
    lines = text.strip().splitlines()
    return rc, lines[-1] if lines else ""


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


def render_trend(history_path: Path, gpu: str, out_html: Path) -> Path:
    """Median over time per case on this GPU model, regressions marked; one section per sweep."""
    history = pd.read_csv(history_path, keep_default_na=False, na_values=[""])
    history = history[history["hardware"] == gpu]
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


def nightly(plan: list[dict], out: Path, baselines: Path, history: Path,
            profile: str | None) -> int:
    """Run the plan; write reports, history, trend page and a combined report.md."""
    night = out / "nightly" / utc_now()[:19].replace(":", "").replace("-", "")
    night.mkdir(parents=True, exist_ok=True)
    summary, failing, gpu = [], False, None
    for entry in plan:
        rc, run_path = run_sweep(entry, out, profile)
        if rc != 0:
            print(f"error: {entry['sweep']} did not finish (bench.run exit status {rc})", file=sys.stderr)
            return rc
        run = open_run(run_path)
        gpu = hardware(run.meta)
        base = baseline_dir(baselines, run.meta)
        cmp = compare.compare_runs(open_run(base), run) if (base / META).exists() else None
        if cmp:
            compare.write(cmp, run.path)
            failing = failing or bool(cmp.failing)
        _, md = report.render(run, run.path / "report.html", cmp)
        summary.append(md.read_text())
        if cmp is None:
            summary.append(f"No baseline for {gpu} / {(run.meta.get('sweep') or {}).get('name')}: "
                           f"bless one with `python -m bench.baseline set {run.path}`.\n")
        append_history(history, history_rows(run, cmp))
    trend = render_trend(history, gpu, night / "trend.html")
    verdict = "REGRESSION" if failing else "no regression"
    (night / "report.md").write_text(f"# Nightly benchmark: {verdict}\n\n" + "\n".join(summary))
    print(f"nightly: {verdict}; summary {night / 'report.md'}, trend {trend}")
    return 1 if failing else 0


def main(argv=None) -> int:
    parser = Parser(prog="python -m bench.nightly", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="sweeps/nightly.yaml", help="default: %(default)s")
    parser.add_argument("--out", default="results", help="results root (default: %(default)s)")
    parser.add_argument("--baselines", default="results/baselines", help="default: %(default)s")
    parser.add_argument("--history", default="results/history.csv", help="default: %(default)s")
    parser.add_argument("--profile", help="sweep profile for every run (default: bench.run's choice)")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.config)
        return nightly(plan, Path(args.out), Path(args.baselines), Path(args.history), args.profile)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
