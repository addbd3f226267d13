"""The nightly regression job: run the nightly sweep set, compare each run with this GPU's blessed
baseline, render the reports, append every case to the history, render the trend page, and exit 1
on a regression (2 on bad input, the runner's status if a sweep could not finish). Without a GPU,
each sweep runs at its `cpu` profile.

    python -m bench.nightly [--config sweeps/nightly.yaml] [--out results]
                            [--baselines results/baselines] [--history results/history.sqlite | URL]
                            [--profile NAME] [--scheduler DASK_ADDRESS]
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path

from bench import assets, run as bench_run
from bench import bisect as bench_bisect
from bench.cli import BadInput, Parser, command
from bench.measure import ab, env, ncu, runner, sweep
from bench.measure.nightly_plan import load_plan
from bench.measure import bisect as bisection
from bench.present import report
from bench.present.trend import render_trend
from bench.results import changepoints, compare, history
from bench.results.baseline import baseline_dir, hardware, open_run, slug
from bench.results.nightly import (JUDGED, canaries, sensitivity, sensitivity_md,
                                   with_canaries)
from bench.results import store
from bench.results.stats import THRESHOLD
from bench.results.store import META


def profile_for(entry: dict, profile: str | None) -> str | None:
    """The sweep profile an entry runs at: --profile NAME, else `cpu` where there is no GPU and the
    sweep defines it; None for the sweep as written (--profile none or ncu, or a GPU here)."""
    if profile in ("none", runner.NCU):
        return None
    if profile:
        return profile
    return "cpu" if not runner.gpu_count() and sweep.has_profile(entry["sweep"], "cpu") else None


def run_argv(entry: dict, out: Path, profile: str | None, scheduler: str | None) -> list[str]:
    """bench.run's command line for an entry. Its set, filter and providers cut the sweep as
    written, down to GPU sizes; at a profile they are left out: the profile's own sizes stand."""
    argv = [entry["sweep"], "--out", str(out), "--strict"]
    at = profile_for(entry, profile)
    if at:
        argv += ["--profile", at]
    else:
        argv += [a for v in entry["set"] for a in ("--set", v)]
        argv += [a for v in entry["filter"] for a in ("--filter", v)]
        if entry["providers"]:
            argv += ["--providers", ",".join(entry["providers"])]
        if profile:
            argv += ["--profile", profile]
    if scheduler:
        argv += ["--executor", "dask", "--scheduler", scheduler]
    return argv


def load_sweeps(plan: list[dict], out: Path, profile: str | None,
                scheduler: str | None) -> list[sweep.Sweep]:
    """Each entry's sweep as bench.run will load it, so that a bad entry fails before any run."""
    device = "cuda:0" if runner.gpu_count() else "cpu"
    loaded = []
    for i, entry in enumerate(plan):
        try:
            loaded.append(runner.load_sweep(bench_run.parse_args(run_argv(entry, out, profile, scheduler)),
                                            device))
        except BadInput as e:
            raise BadInput(f"nightly sweeps[{i}]: {e}") from None
    return loaded


def run_sweep(entry: dict, out: Path, profile: str | None,
              scheduler: str | None) -> tuple[int, Path | None]:
    """Run one entry through bench.run; (exit status, its run directory)."""
    at = profile_for(entry, profile)
    if at and entry["set"] + entry["filter"] + entry["providers"]:
        print(f"nightly: {entry['sweep']} at its '{at}' profile (the plan's set, filter and "
              "providers are for the sweep as written)")
    argv = run_argv(entry, out, profile, scheduler)
    return bench_run.run(bench_run.parse_args(argv), ["-m", "bench.run", *argv])


def pinned(standing: list[changepoints.Step], gpu: str) -> str:
    """report.md's section of the lasting slowdowns on this GPU, each named by its commit."""
    lines = [f"- {s.case} ({s.sweep}): {s.describe()}; the change is in "
             f"{s.previous_sha[:10]}..{s.sha[:10]}" for s in standing if s.hardware == gpu]
    return "## Slower since a commit\n\n" + ("\n".join(lines) or "None on this GPU.") + "\n"


def bisect_regressions(entry: dict, run, base, cmp, out: Path, profile: str | None,
                       deadline: float) -> list[str]:
    """bench.bisect of each regression of `cmp` between the baseline's commit and this run's,
    while time is left before `deadline` (time.monotonic()); report.md lines of what each found."""
    good, bad = (base.meta.get("git") or {}).get("sha"), (run.meta.get("git") or {}).get("sha")
    lines = []
    for row in cmp.failing:
        left = deadline - time.monotonic()
        if row["verdict"] != "regression" or left <= 0 or not good or not bad or good == bad:
            continue
        ids = [r["case_id"] for r in run.records if compare.case_label(r) == row["case"]]
        if len(ids) != 1:
            continue
        argv = [a for a in run_argv(entry, out, profile, None) if a != "--strict"]
        argv += ["--case", ids[0], "--good", good, "--bad", bad, "--budget", f"{left:.0f}"]
        rc, result = bench_bisect.run(bench_bisect.parse_args(argv))
        found = bisection.report(result) if result else f"bisect exit status {rc}"
        lines.append(f"- {row['case']}: {found}")
    return lines


@contextlib.contextmanager
def trees_since(base):
    """The baseline's commit, checked out for the length of the block, and this tree."""
    sha = (base.meta.get("git") or {}).get("sha")
    if not sha:
        raise BadInput("the baseline records no commit")
    with tempfile.TemporaryDirectory(prefix="bench-why-") as tmp:
        yield {"base": ab.checkout(sha, Path.cwd(), Path(tmp))[0], "head": env.ROOT}


def nightly(plan: list[dict], out: Path, baselines: Path, db, profile: str | None,
            scheduler: str | None = None, bisect_budget: float | None = None,
            with_counters: bool = False) -> int:
    """Run the plan; write reports, history, trend page and a combined report.md. With a bisect
    budget (seconds), each new regression is bisected (bench.bisect) while the budget lasts; with
    counters, each regression gets its counter diff (report and history)."""
    deadline = time.monotonic() + (bisect_budget or 0)
    sweeps = load_sweeps(plan, out, profile, scheduler)
    for sw in sweeps:  # a baseline that cannot be read is said now, not once its sweep has run
        for base in Path(baselines).glob(f"*/{slug(sw.name)}"):
            if (base / META).exists():
                open_run(base)
    night = out / "nightly" / store.run_dir_name("night", None)  # two nights never share one
    night.mkdir(parents=True)
    summary, failing, gpu = [], False, None
    compared, caught = 0, []  # cases judged against a baseline; canary rows
    for entry, sw in zip(plan, sweeps):
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
        if cmp and with_counters and any(r["verdict"] == "regression" for r in cmp.rows):
            baseline = open_run(base)
            ncu.explain_into(cmp, sw.cases, baseline, run, lambda: trees_since(baseline),
                             "cuda:0" if runner.gpu_count() else "cpu", "nightly --counters")
        _, md = report.render(run, run.path / "report.html", cmp)
        summary.append(md.read_text())
        if cmp is None:
            summary.append(f"No baseline for {gpu} / {(run.meta.get('sweep') or {}).get('name')}: "
                           f"bless one with `python -m bench.baseline set {run.path}`.\n")
        if cmp and bisect_budget:
            found = bisect_regressions(entry, run, open_run(base), cmp, out, profile, deadline)
            if found:
                summary.append("## Bisected\n\n" + "\n".join(found) + "\n")
        threshold = cmp.threshold if cmp else compare.sweep_threshold(run.meta) or THRESHOLD
        found = canaries(run.records, threshold, (run.meta.get("env") or {}).get("device_kind", "cuda"))
        compared += sum(r["verdict"] in JUDGED for r in cmp.rows) if cmp else 0
        caught += found
        history.record_run(db, run, with_canaries(cmp, found, str(run.path), threshold))
    past = history.read(db)
    steps = changepoints.find_steps(past, THRESHOLD)
    trend = render_trend(past, steps, gpu, night / "trend.html", history.read_counter_diffs(db))
    summary.append(pinned(changepoints.standing_regressions(steps), gpu))
    summary.append(sensitivity_md(compared, caught, sensitivity(past[past["hardware"] == gpu])))
    verdict = "REGRESSION" if failing else "no regression"
    (night / "report.md").write_text(f"# Nightly benchmark: {verdict}\n\n" + "\n".join(summary))
    print(f"nightly: {verdict}; summary {night / 'report.md'}, trend {trend}")
    return 1 if failing else 0


@command
def main(argv=None) -> int:
    parser = Parser(prog="python -m bench.nightly", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sweeps/nightly.yaml", help="default: %(default)s")
    parser.add_argument("--out", default="results", help="results root (default: %(default)s)")
    parser.add_argument("--baselines", default="results/baselines", help="default: %(default)s")
    parser.add_argument("--history", default=history.DEFAULT,
                        help="a SQLite file or any SQLAlchemy URL, e.g. postgresql+psycopg://host/db "
                             "(default: %(default)s)")
    parser.add_argument("--profile", help="sweep profile for every run, in place of the plan's sizes "
                                          "(default: 'cpu' on a machine without a GPU)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="run the sweeps on this Dask cluster (bench.run --executor dask)")
    parser.add_argument("--counters", action="store_true",
                        help="profile each regression at the baseline's commit and here with Nsight "
                             "Compute and say which counters changed (report and history)")
    parser.add_argument("--bisect-budget", type=float, default=0, metavar="SECONDS",
                        help="bisect each new regression (bench.bisect, between the baseline's commit "
                             "and this one) while this many seconds last (default: 0, none)")
    args = parser.parse_args(argv)
    if not 0 <= args.bisect_budget < 7 * 86400:
        raise BadInput(f"--bisect-budget {args.bisect_budget:g}: expected 0 to a week of seconds")
    plan = load_plan(assets.sweep_file(args.config), assets.sweep_file)
    return nightly(plan, Path(args.out), Path(args.baselines), history.connect(args.history),
                   args.profile, args.scheduler, bisect_budget=args.bisect_budget,
                   with_counters=args.counters)


if __name__ == "__main__":
    sys.exit(main())
