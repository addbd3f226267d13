"""The nightly job: run the plan's sweeps, compare each with this GPU's blessed baseline, render
the reports, append the history and render the trend page (entry point: python -m bench.nightly)."""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import yaml

from bench.present import report
from bench.present.trend import render_trend
from bench.results import changepoints, history
from bench.measure.sweep import COMPARE_DEFAULTS
from bench.results import compare
from bench.results.baseline import baseline_dir, hardware, open_run
from bench.cli import BadInput
from bench.run import main as run_main
from bench.results.store import META, utc_now

ENTRY_KEYS = {"sweep", "set", "filter", "providers"}


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


def run_sweep(entry: dict, out: Path, profile: str | None,
              scheduler: str | None) -> tuple[int, str]:
    """Run one entry through bench.run; (exit status, run directory it printed last)."""
    argv = [entry["sweep"], "--out", str(out), "--strict"]
    argv += [a for v in entry["set"] for a in ("--set", v)]
    argv += [a for v in entry["filter"] for a in ("--filter", v)]
    if entry["providers"]:
        argv += ["--providers", ",".join(entry["providers"])]
    if profile:
        argv += ["--profile", profile]
    if scheduler:
        argv += ["--executor", "dask", "--scheduler", scheduler]
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        rc = run_main(argv)
    text = captured.getvalue()
    sys.stdout.write(text)
    lines = text.strip().splitlines()
    return rc, lines[-1] if lines else ""








def pinned(standing: list[changepoints.Step], gpu: str) -> str:
    """report.md's section of the lasting slowdowns on this GPU, each named by its commit."""
    lines = [f"- {s.case} ({s.sweep}): {s.describe()}; the change is in "
             f"{s.previous_sha[:10]}..{s.sha[:10]}" for s in standing if s.hardware == gpu]
    return "## Slower since a commit\n\n" + ("\n".join(lines) or "None on this GPU.") + "\n"


def nightly(plan: list[dict], out: Path, baselines: Path, db, profile: str | None,
            scheduler: str | None = None) -> int:
    """Run the plan; write reports, history, trend page and a combined report.md."""
    night = out / "nightly" / utc_now()[:19].replace(":", "").replace("-", "")
    night.mkdir(parents=True, exist_ok=True)
    summary, failing, gpu = [], False, None
    for entry in plan:
        rc, run_path = run_sweep(entry, out, profile, scheduler)
        if rc not in (0, 1):
            print(f"error: {entry['sweep']} did not finish (bench.run exit status {rc})", file=sys.stderr)
            return rc
        failing = failing or rc == 1  # a case failed (bench.run --strict): report it, then fail
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
        history.record_run(db, run, cmp)
    past = history.read(db)
    steps = changepoints.find_steps(past, COMPARE_DEFAULTS["threshold"])
    trend = render_trend(past, steps, gpu, night / "trend.html")
    summary.append(pinned(changepoints.standing_regressions(steps), gpu))
    verdict = "REGRESSION" if failing else "no regression"
    (night / "report.md").write_text(f"# Nightly benchmark: {verdict}\n\n" + "\n".join(summary))
    print(f"nightly: {verdict}; summary {night / 'report.md'}, trend {trend}")
    return 1 if failing else 0
