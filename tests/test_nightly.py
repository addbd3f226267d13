"""bench.nightly and bench.baseline on CPU: a first night without a baseline, blessing it, then a
night with a provider slowed 10% that fails, names the case, and lands in the history and trend. A
night's sensitivity: its canary caught and recorded, and the false alarms its case count expects."""
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.measure import runner, sweep
from bench.measure.nightly_plan import load_plan
from bench import baseline as baseline_cli, nightly as nightly_cli
from bench.results import baseline, nightly
from bench.results.history import connect, read, write
from test_compare import SWEEP as COMPARE_SWEEP, exit_code, record, write_run
from test_history import nights
from test_report import Page

# the comparison tests' sweep, less their second fast provider: the assertions below count providers
SWEEP = COMPARE_SWEEP.replace("\nname: delay\n", "\nname: tiny\n").replace(
    '  - {{name: quick, module: "delay_provider:quick"}}\n', "")
assert SWEEP.count("name:") == 3


@pytest.fixture(autouse=True)
def without_a_gpu(monkeypatch):
    """Every night here is one on a machine without a GPU, on any machine: the tests name its
    hardware ("cpu") and its sweeps' cpu profiles."""
    monkeypatch.setattr(runner, "gpu_count", lambda: 0)


def night(tmp_path, write_sweep, delay: str) -> tuple[int, str]:
    sweep = write_sweep(SWEEP.format(delay=delay), "tiny.yaml")
    config = write_sweep(f"sweeps:\n  - sweep: {sweep}\n    set: ['hidden=[16]']\n", "nightly.yaml")
    rc = nightly_cli.main(["--config", str(config), "--out", str(tmp_path / "results"),
                       "--baselines", str(tmp_path / "baselines"),
                       "--history", str(tmp_path / "history.sqlite")])
    summaries = sorted((tmp_path / "results" / "nightly").glob("*/report.md"))
    return rc, summaries[-1].read_text()


def test_nightly_blesses_compares_and_keeps_history(tmp_path, write_sweep, capsys):
    rc, md = night(tmp_path, write_sweep, "steady")
    assert rc == 0 and "No baseline for cpu / tiny" in md
    latest = tmp_path / "results" / "latest"
    assert (latest / "report.html").exists()

    assert baseline_cli.main(["set", str(latest), "--root", str(tmp_path / "baselines")]) == 0
    stored = tmp_path / "baselines" / "cpu" / "tiny"
    assert {p.name for p in stored.iterdir()} == {"meta.json", "summary.csv", "samples.jsonl.gz",
                                                  "blessed.json"}
    with gzip.open(stored / "samples.jsonl.gz", "rt") as f:
        assert len(f.read().splitlines()) == 2
    assert len(baseline.open_run(stored).records) == 2

    capsys.readouterr()
    rc, md = night(tmp_path, write_sweep, "slowed")
    assert rc == 1, capsys.readouterr().out
    assert "Nightly benchmark: REGRESSION" in md and "layernorm/delay" in md
    assert "layernorm/steady" not in md.split("Regressions against the baseline")[1]

    history = read(connect(str(tmp_path / "history.sqlite")))
    assert len(history) == 4 and history["run_id"].nunique() == 2
    flagged = history[history["verdict"] == "regression"]
    assert list(flagged["provider"]) == ["delay"] and flagged["change"].iloc[0] > 0.05
    trends = sorted((tmp_path / "results" / "nightly").glob("*/trend.html"))
    page = Page(trends[-1].read_text())
    assert "flagged" in page.sections and len(page.images) == 1
    assert "regression: layernorm/delay" in trends[-1].read_text()


def test_a_baseline_that_cannot_be_read_is_said_before_anything_runs(tmp_path, write_sweep, capsys):
    """It was found once its sweep had run, and the sweeps after it and the history were skipped."""
    stored = tmp_path / "baselines" / "cpu" / "tiny"
    stored.mkdir(parents=True)
    (stored / "meta.json").write_text("{not json")
    sweep = write_sweep(SWEEP.format(delay="steady"), "tiny.yaml")
    config = write_sweep(f"sweeps:\n  - sweep: {sweep}\n", "nightly.yaml")
    assert exit_code(nightly_cli.main, ["--config", str(config), "--out", str(tmp_path / "results"),
                                        "--baselines", str(tmp_path / "baselines"),
                                        "--history", str(tmp_path / "h.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(stored) in err, err
    assert not (tmp_path / "results").exists()


def test_bless_refuses_an_incomplete_run(tmp_path, capsys):
    run = write_run(tmp_path / "run", [record("a", [1.0, 1.0])])
    meta = (run / "meta.json").read_text().replace('"complete": true', '"complete": false')
    (run / "meta.json").write_text(meta)
    assert baseline_cli.main(["set", str(run), "--root", str(tmp_path / "b")]) == 2
    assert "incomplete" in capsys.readouterr().err


def test_bless_never_deletes_a_folder_that_is_not_a_baseline(tmp_path, capsys):
    """Blessing replaced the folder its GPU and sweep name, whatever it held (a notes file went)."""
    run = write_run(tmp_path / "run", [record("a", [1.0, 1.0])])
    dest = baseline.baseline_dir(tmp_path / "b", json.loads((run / "meta.json").read_text()))
    dest.mkdir(parents=True)
    (dest / "notes.txt").write_text("mine")
    assert baseline_cli.main(["set", str(run), "--root", str(tmp_path / "b")]) == 2
    assert "not a blessed baseline" in capsys.readouterr().err
    assert (dest / "notes.txt").read_text() == "mine"
    (dest / "notes.txt").unlink()
    assert baseline_cli.main(["set", str(run), "--root", str(tmp_path / "b")]) == 0
    assert baseline_cli.main(["set", str(run), "--root", str(tmp_path / "b")]) == 0  # a baseline: replaced


def test_a_baseline_keeps_the_command_less_its_out_folder(tmp_path):
    run = write_run(tmp_path / "run", [record("a", [1.0, 1.0])])
    meta = json.loads((run / "meta.json").read_text())
    meta["command"] = ["-m", "bench.run", "s.yaml", "--out", str(tmp_path / "out"), "--filter", "n=1",
                       f"--out={tmp_path}"]
    (run / "meta.json").write_text(json.dumps(meta))
    stored = baseline.bless(run, tmp_path / "b")
    assert json.loads((stored / "meta.json").read_text())["command"] == [
        "-m", "bench.run", "s.yaml", "--filter", "n=1"]
    assert str(tmp_path) not in (stored / "meta.json").read_text()


@pytest.mark.parametrize("text,line", [
    ("sweeps: []", 1), ("sweeps: [{sweep: nowhere.yaml}]", 1), ("# plan\nsweeps: [1, 2", 3),
    ("sweeps:\n  - {sweep: SWEEP, sizes: 3}", 2), ("sweeps: [{sweep: SWEEP, set: [1]}]", 1),
    ("sweeps:\n  - sweep: SWEEP\n    set: seq_len=13", 3),  # a string: a traceback, and an empty night's folder
    ("sweeps: [{sweep: SWEEP}]\nsweeps: [{sweep: SWEEP}]", 2),  # was 'expected a non-empty list'
])
def test_bad_config_is_one_line_with_its_line_and_exit_2(tmp_path, write_sweep, capsys, text, line):
    sweep = write_sweep(SWEEP.format(delay="steady"), "tiny.yaml")
    config = write_sweep(text.replace("SWEEP", str(sweep)), "nightly.yaml")
    assert exit_code(nightly_cli.main, ["--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {config}:{line}: "), err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "nightly").exists()


def test_shipped_nightly_config_is_valid(monkeypatch):
    """Every entry loads as the GPU machine would run it (no CPU profile), at the sizes in the file."""
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    plan = load_plan("sweeps/nightly.yaml")
    counts = {p["sweep"]: len(sweep.load(p["sweep"], None, p["set"], p["filter"], p["providers"] or None).cases)
              for p in plan}
    assert set(counts) == {"sweeps/fmha.yaml", "sweeps/layernorm.yaml", "sweeps/model.yaml",
                           "sweeps/canary.yaml"}
    assert all(n > 0 for n in counts.values())
    assert sum(counts.values()) <= 400, "the nightly set is sized for about 20 minutes on one H100"


def test_nightly_names_the_commit_of_a_lasting_step_and_shows_cases_across_gpus(tmp_path, write_sweep):
    db = connect(str(tmp_path / "history.sqlite"))
    write(db, nights(13, hardware="cpu", medians=np.r_[np.ones(8), np.full(5, 1.08)]))
    write(db, nights(13, hardware="NVIDIA H100 80GB HBM3", prefix="h100-"))
    rc, md = night(tmp_path, write_sweep, "steady")
    assert rc == 0
    pinned = md.split("## Slower since a commit")[1]
    assert "layernorm/torch" in pinned and "slower by 8.0% since 0008ffffff (2026-01-09)" in pinned
    assert "NVIDIA" not in pinned, "only this GPU's steps"
    html = sorted((tmp_path / "results" / "nightly").glob("*/trend.html"))[-1].read_text()
    assert "the change is in 0007ffffff..0008ffffff" in html
    page = Page(html)
    assert "steps" in page.sections and "nightly: across GPU models" in html
    assert len(page.images) == 4, "the tiny sweep, two synthetic workloads, the synthetic cases across GPUs"


def test_the_fleet_workflow_runs_the_nightly_on_every_gpu_model_into_one_history():
    import yaml
    workflow = yaml.safe_load((Path(__file__).resolve().parent.parent / ".github" / "workflows" /
                               "nightly-perf.yml").read_text())
    job = workflow["jobs"]["nightly"]
    assert job["strategy"]["matrix"]["gpu"] == ["h100", "h200", "b200"]
    assert job["strategy"]["fail-fast"] is False
    assert "${{ matrix.gpu }}" in job["runs-on"]
    assert job["env"]["PERF_HISTORY_URL"] == "${{ secrets.PERF_HISTORY_URL }}"
    script = "\n".join(step.get("run", "") for step in job["steps"])
    assert 'python -m bench.nightly --history "$history"' in script and ".[cutile,postgres]" in script


def test_a_failed_case_fails_the_nightly_after_its_reports(tmp_path, write_sweep, capsys):
    rc, md = night(tmp_path, write_sweep, "off")
    assert rc == 1
    assert "strict: 1 case(s) incorrect" in capsys.readouterr().err
    assert "Nightly benchmark" in md
    history = read(connect(str(tmp_path / "history.sqlite")))
    assert "incorrect" in set(history["status"]), "the failed night is in the history"


# a sweep whose GPU sizes are far too big for a CPU, with a provider axis its cpu profile drops
PROFILED = """
name: profiled
workload: layernorm
baseline: steady
providers:
  - {name: steady, module: "delay_provider:steady"}
  - {name: tiled, module: "delay_provider:tiled", axes: {rows_per_block: [2, 4]}}
axes: {rows: [65536], hidden: [4096], dtype: [float32], mode: [fwd]}
timing: {warmup_ms: 5, min_reps: 5, max_time_s: 0.2, timeout_s: 60}
profiles:
  cpu:
    providers: [{name: steady, module: "delay_provider:steady"}]
    axes: {rows: [4], hidden: [16]}
"""


def test_without_a_gpu_each_sweep_runs_at_its_cpu_profile(tmp_path, write_sweep, capsys):
    """The plan's set, filter and providers cut the sweep as written to GPU sizes; a filter on an
    axis the cpu profile drops would fail, and its sizes would run for hours."""
    sweep_path = write_sweep(PROFILED, "profiled.yaml")
    config = write_sweep(f"sweeps:\n  - sweep: {sweep_path}\n    set: ['rows=[65536]']\n"
                         "    filter: ['rows_per_block=2']\n", "nightly.yaml")
    rc = nightly_cli.main(["--config", str(config), "--out", str(tmp_path / "results"),
                           "--baselines", str(tmp_path / "baselines"),
                           "--history", str(tmp_path / "history.sqlite")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "profiled.yaml at its 'cpu' profile" in out
    history = read(connect(str(tmp_path / "history.sqlite")))
    assert list(history["provider"]) == ["steady"]
    assert len(list((tmp_path / "results" / "nightly").glob("*/trend.html"))) == 1


def test_the_shipped_nightly_plan_loads_at_cpu_sizes_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    sweeps = nightly_cli.load_sweeps(load_plan("sweeps/nightly.yaml"), tmp_path, None, None)
    assert [s.profile for s in sweeps] == ["cpu"] * 4
    assert all(c.params.get("seq_len", 0) <= 256 and c.params.get("rows", 0) <= 1000
               for s in sweeps for c in s.cases)


def test_a_bad_entry_fails_before_any_sweep_runs(tmp_path, write_sweep, capsys):
    sweep_path = write_sweep(SWEEP.format(delay="steady"), "tiny.yaml")
    config = write_sweep(f"sweeps:\n  - sweep: {sweep_path}\n  - sweep: {sweep_path}\n"
                         "    filter: ['nothing=1']\n", "nightly.yaml")
    assert nightly_cli.main(["--config", str(config), "--out", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: nightly sweeps[1]: --filter nothing: not an axis of this sweep"
    assert not (tmp_path / "results").exists()


CANARY = """
name: canary
workload: layernorm
baseline: twin
providers:
  - {name: twin, module: "bench.workloads.canary:twin",
     axes: {wraps: ["delay_provider:steady"], repeats: [4]}}
  - {name: canary, module: "bench.workloads.canary:canary",
     axes: {wraps: ["delay_provider:steady"], repeats: [4]}}
axes: {rows: [4], hidden: [16], dtype: [float32], mode: [fwd]}
timing: {warmup_ms: 5, min_reps: 100, max_reps: 150, max_time_s: 0.5, target_ci: 0.0001, timeout_s: 60}
"""


def test_the_canary_is_judged_recorded_and_never_fails_the_night(tmp_path, write_sweep):
    """A spin-wait provider wrapped 4 and 5 times a rep (25% slower by construction): whether it is
    caught depends on the machine's load, so this checks that the verdict against its twin is what
    the report, the history and the trend page all say; canaries() below checks the verdict."""
    config = write_sweep(f"sweeps:\n  - sweep: {write_sweep(CANARY, 'canary.yaml')}\n", "nightly.yaml")
    rc = nightly_cli.main(["--config", str(config), "--out", str(tmp_path / "results"),
                           "--baselines", str(tmp_path / "baselines"),
                           "--history", str(tmp_path / "history.sqlite")])
    assert rc == 0, "a canary is no regression, caught or not"
    history = read(connect(str(tmp_path / "history.sqlite")))
    verdicts = dict(zip(history["provider"], history["verdict"]))
    assert verdicts["twin"] == "" and verdicts["canary"] in ("detected", "missed")
    md = next((tmp_path / "results" / "nightly").glob("*/report.md")).read_text()
    section = md.split("## Sensitivity")[1]
    assert "Expected false alarms tonight: 0.00 (0 cases compared" in section
    assert ("Canary layernorm/canary [" in section
            and f": {verdicts['canary']}; slower by 25.0% by construction" in section)
    html = next((tmp_path / "results" / "nightly").glob("*/trend.html")).read_text()
    caught = int(verdicts["canary"] == "detected")
    assert f"Canary detected {caught} of 1 times ({caught:.0%}) over 1 runs." in html
    assert "sensitivity" in Page(html).sections


def test_a_canary_is_judged_against_its_twin_by_the_verdict_rule():
    rng = np.random.default_rng(5)

    def rec(provider, scale, status="ok", hidden=16):
        return {**record(provider, np.exp(rng.normal(0, 0.01, 50)) * scale, status, workload="w",
                         hidden=hidden, repeats=4), "case_id": f"{provider}{hidden}"}
    runs = [rec("twin", 1.0), rec("canary", 1.25), rec("twin", 1.0, hidden=32),
            rec("canary", 1.01, hidden=32), rec("twin", 1.0, "error", hidden=64),
            rec("canary", 1.25, hidden=64), rec("other", 2.0)]
    rows = nightly.canaries(runs, 0.03, "cuda")
    assert [(r["params"]["hidden"], r["verdict"]) for r in rows] == [(16, "detected"), (32, "missed")]
    assert rows[0]["ratio"] == pytest.approx(1.25, rel=0.01)


def test_expected_false_alarms_and_the_canary_record_per_run():
    rows = []
    for run, verdicts in (("r1", ["unchanged"] * 150 + ["regression"] + ["detected", "twin"]),
                          ("r2", ["unchanged"] * 40 + ["", "missed", "twin"])):
        rows += [{"date": f"2026-12-0{run[1]}", "run_id": run, "sweep": "s", "verdict":
                  "" if v == "twin" else v} for v in verdicts]
    per = nightly.sensitivity(pd.DataFrame(rows))
    assert list(per["compared"]) == [151, 40] and list(per["flagged"]) == [1, 0]
    assert list(per["canary"]) == [1, 1] and list(per["caught"]) == [1, 0]
    assert list(per["expected"]) == pytest.approx([151 * 0.005, 40 * 0.005])
    assert nightly.canary_line(per) == "Canary detected 1 of 2 times (50%) over 2 runs."
    md = nightly.sensitivity_md(200, [], per)
    assert "Expected false alarms tonight: 1.00 (200 cases compared x 0.5%" in md
