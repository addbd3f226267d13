"""bench.compare: the statistics (A/A false positives, power against a 5% slowdown), case matching,
exit status, outputs, and a real CPU run against one with a provider slowed 10%."""
import json

import numpy as np
import pytest
from conftest import ROOT

from bench import compare as compare_cli
from bench.results import compare
from bench.run import main as run_main
from bench.results.store import RunWriter

H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "sm_count": 132, "memory_gb": 79.6,
        "max_sm_clock_mhz": 1980, "max_mem_clock_mhz": 2619}


def noisy(rng, n: int, scale: float = 1.0):
    """Timing-like samples: lognormal spread of 5% plus 2% outliers 2-9x slower (docs/regressions.md)."""
    x = np.exp(rng.normal(0, 0.05, n))
    out = rng.random(n) < 0.02
    x[out] *= rng.uniform(2, 9, out.sum())
    return x * scale


def record(provider="p", samples=(1.0, 1.0), status="ok", workload="w", **params):
    params = params or {"n": 1}
    return {"case_id": f"{workload}/{provider}{sorted(params.items())}", "workload": workload,
            "device": "cuda:0",
            "provider": provider, "baseline": "p", "params": params, "shape": dict(params),
            "status": status, "reason": "" if status == "ok" else f"it was {status}",
            "samples_ms": list(samples), "flops": None, "bytes": None, "telemetry": None}


def write_run(path, records, gpu=H100, threshold=0.03, sweep="s"):
    """A run directory as the runner writes it, from given records."""
    meta = {"run_id": path.name, "command": ["test"], "started_utc": "2026-01-01T00:00:00Z",
            "complete": True, "git": {"sha": "abc", "dirty": False},
            "sweep": {"name": sweep, "path": f"{sweep}.yaml", "workload": records[0]["workload"]
                      if records else "w", "baseline": "p", "profile": None,
                      "compare": {"threshold": threshold}},
            "env": {"device_kind": "cuda" if gpu else "cpu", "gpus": [gpu] if gpu else [],
                    "torch": "2.13", "python": "3.11"},
            "cases": len(records)}
    writer = RunWriter(path, meta, [])
    for rec in records:
        writer.append(rec)
    writer.close(True)
    return path


def flagged(base, cur, threshold=0.03, seed=0):
    return compare.verdict(*compare.ratio_ci(base, cur, seed=seed), threshold)


def test_aa_trials_rarely_flag():
    rng = np.random.default_rng(1234)
    hits = sum(flagged(noisy(rng, 100), noisy(rng, 100), seed=i) != "unchanged" for i in range(200))
    assert hits <= 2  # at most 1% of 200


def test_five_percent_slowdown_is_flagged():
    rng = np.random.default_rng(5678)
    hits = sum(flagged(noisy(rng, 100), noisy(rng, 100, 1.05), seed=i) == "regression" for i in range(200))
    assert hits >= 190  # at least 95% of 200


def test_noise_wider_than_the_change_is_not_a_regression():
    rng = np.random.default_rng(9)
    wide = [flagged(rng.lognormal(0, 0.5, 8), rng.lognormal(0, 0.5, 8) * 1.05, seed=i) for i in range(50)]
    assert wide.count("regression") <= 1
    assert flagged(np.ones(50), np.full(50, 1.02)) == "unchanged"  # exact, but under the threshold
    assert flagged(np.ones(50), np.full(50, 0.9)) == "improvement"


def test_ratio_ci_is_reproducible_and_brackets_the_ratio():
    rng = np.random.default_rng(3)
    a, b = noisy(rng, 60), noisy(rng, 60, 1.2)
    r1, r2 = compare.ratio_ci(a, b, seed=7), compare.ratio_ci(a, b, seed=7)
    assert r1 == r2
    ratio, lo, hi = r1
    assert lo < ratio < hi and lo > 1.1 and hi < 1.3
    assert np.isnan(compare.ratio_ci([1.0], [1.0])[1])


def runs_apart(rng, n: int, spread: float, shift: float, slowdown: float = 1.0):
    """Two runs' samples of one case: lognormal scatter `spread` within a run, and each whole run
    moved by a lognormal factor of sd `shift` (a shared machine's load differs from run to run)."""
    def one():
        return np.exp(rng.normal(rng.normal(0, shift), spread, n))
    return one(), one() * slowdown


def test_cpu_run_to_run_noise_is_not_called_a_regression():
    rng = np.random.default_rng(11)
    pairs = [runs_apart(rng, 300, 0.15, 0.05) for _ in range(300)]
    rows = [compare.compare_case(record(samples=b), record(samples=c), 0.03, "cpu") for b, c in pairs]
    assert sum(r["verdict"] != "unchanged" for r in rows) <= 3  # at most 1% of 300
    within_run_only = sum(flagged(b, c) != "unchanged" for b, c in pairs)
    assert within_run_only > 30  # the interval alone cries wolf on such a machine


def test_gpu_five_percent_slowdown_is_still_flagged():
    rng = np.random.default_rng(12)
    pairs = [runs_apart(rng, 50, 0.01, 0.002, slowdown=1.05) for _ in range(300)]
    hits = sum(compare.compare_case(record(samples=b), record(samples=c), 0.03, "cuda")["verdict"]
               == "regression" for b, c in pairs)
    assert hits >= 0.95 * 300
    same = [runs_apart(rng, 50, 0.01, 0.002) for _ in range(300)]
    assert sum(compare.compare_case(record(samples=b), record(samples=c), 0.03, "cuda")["verdict"]
               != "unchanged" for b, c in same) <= 3


def test_a_gate_that_compared_nothing_fails(tmp_path, capsys):
    base = write_run(tmp_path / "base", [record("a", [1.0] * 30), record("b", [1.0] * 30)])
    empty = write_run(tmp_path / "empty", [])
    other = write_run(tmp_path / "other", [record("a", [1.0] * 30, workload="x")], sweep="t")
    partial = write_run(tmp_path / "partial", [record("a", [1.0] * 30)])
    meta = json.loads((partial / "meta.json").read_text())
    (partial / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    torn = write_run(tmp_path / "torn", [record("a", [1.0] * 30), record("b", [1.0] * 30)])
    text = (torn / "samples.jsonl").read_text()
    (torn / "samples.jsonl").write_text(text[:-30])
    for cur, says in ((empty, "nothing to compare"), (other, "nothing to compare"),
                      (partial, "incomplete"), (torn, "not a whole record")):
        assert compare_cli.main([str(base), str(cur)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err


def test_matching_one_side_and_status_changes(tmp_path):
    base = write_run(tmp_path / "base", [
        record("a", [1.0] * 30), record("b", [1.0] * 30), record("c", [1.0] * 30),
        record("gone", [1.0] * 30), record("a", [1.0] * 30, n=2), record("d", status="error")])
    cur = write_run(tmp_path / "cur", [
        record("a", [1.2] * 30), record("b", [1.0] * 30), record("c", status="incorrect"),
        record("new", [1.0] * 30), record("a", [1.0] * 30, n=2), record("d", [1.0] * 30)])
    rc = compare_cli.main([str(base), str(cur), "-o", str(tmp_path / "out")])
    assert rc == 1
    data = json.loads((tmp_path / "out" / "compare.json").read_text())
    verdicts = {(c["provider"], c["params"]["n"]): c["verdict"] for c in data["cases"]}
    assert verdicts == {("a", 1): "regression", ("b", 1): "unchanged", ("c", 1): "broken",
                        ("a", 2): "unchanged", ("d", 1): "fixed"}
    assert [c.split("/")[1].split(" ")[0] for c in data["only_base"]] == ["gone"]
    assert [c.split("/")[1].split(" ")[0] for c in data["only_current"]] == ["new"]
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "regression" in md and "Only in the baseline" in md and "w/gone" in md


def test_unchanged_runs_exit_zero_and_print_the_table(tmp_path, capsys):
    recs = [record("a", [1.0, 1.01, 0.99] * 10)]
    rc = compare_cli.main([str(write_run(tmp_path / "x", recs)), str(write_run(tmp_path / "y", recs))])
    assert rc == 0
    out = capsys.readouterr().out
    assert "unchanged" in out and "w/a [n=1]" in out
    assert (tmp_path / "y" / "compare.json").exists()


def test_threshold_comes_from_the_sweep_and_the_command_line(tmp_path):
    base = write_run(tmp_path / "b", [record("a", [1.0] * 30)])
    cur = write_run(tmp_path / "c", [record("a", [1.05] * 30)], threshold=0.10)
    assert compare_cli.main([str(base), str(cur)]) == 0  # 5% is under the sweep's 10%
    assert compare_cli.main([str(base), str(cur), "--threshold", "0.03"]) == 1


def test_different_hardware_is_refused_unless_allowed(tmp_path, capsys):
    other = dict(H100, name="NVIDIA H200")
    base = write_run(tmp_path / "b", [record("a", [1.0] * 30)])
    cur = write_run(tmp_path / "c", [record("a", [1.0] * 30)], gpu=other)
    assert compare_cli.main([str(base), str(cur)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different hardware" in err
    assert compare_cli.main([str(base), str(cur), "--allow-different-hardware"]) == 0


def exit_code(main, argv) -> int:
    """main's return value, or the status argparse exits with."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("args", [["missing_a", "missing_b"], ["--threshold", "x", "a", "b"],
                                  ["--threshold", "inf", "fixture", "fixture"],
                                  ["--bogus", "a", "b"], ["malformed", "malformed"], ["empty", "empty"]])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "malformed").mkdir()
    (tmp_path / "malformed" / "meta.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    (tmp_path / "fixture").symlink_to(ROOT / "results" / "fixtures" / "h100_synthetic")
    assert exit_code(compare_cli.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:")


SWEEP = """
name: delay
workload: layernorm
baseline: steady
providers:
  - {{name: steady, module: "delay_provider:steady"}}
  - {{name: quick, module: "delay_provider:quick"}}
  - {{name: delay, module: "delay_provider:{delay}"}}
axes: {{rows: [4], hidden: [16], dtype: [float32], mode: [fwd]}}
timing: {{warmup_ms: 5, min_reps: 200, max_reps: 300, max_time_s: 1.0, target_ci: 0.0001, timeout_s: 60}}
"""


@pytest.mark.cpu
def test_real_cpu_run_with_a_slowed_provider(tmp_path, write_sweep, capsys):
    runs = []
    for delay in ("steady", "slowed"):
        path = write_sweep(SWEEP.format(delay=delay), f"{delay}.yaml")
        assert run_main([str(path), "--out", str(tmp_path / "results")]) == 0
        runs.append(capsys.readouterr().out.strip().splitlines()[-1])
    rc = compare_cli.main([runs[0], runs[1], "-o", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert rc == 1, out
    cases = json.loads((tmp_path / "cmp" / "compare.json").read_text())["cases"]
    flagged_cases = [c["provider"] for c in cases if c["verdict"] != "unchanged"]
    assert flagged_cases == ["delay"], out
    assert "layernorm/delay" in out


def test_detectable_change_is_the_verdicts_own_boundary():
    """Moving the current run to just above the stated detectable change flags it; just below
    does not: the statistic is derived from the verdict rule, on a GPU and a CPU alike."""
    rng = np.random.default_rng(21)
    for kind, spread in (("cuda", 0.01), ("cpu", 0.05)):
        b, c = runs_apart(rng, 100, spread, 0.0)
        base, cur = record(samples=b), record(samples=c)
        row = compare.compare_case(base, cur, 0.03, kind)
        at = row["detectable"]
        # a GPU's is set by the threshold or interval, a CPU's by its run-to-run noise bound
        assert 0.03 <= at < 0.1 if kind == "cuda" else at == pytest.approx(np.expm1(row["run_noise"]))
        for factor, verdict in ((1.01, "regression"), (0.99, "unchanged")):
            moved = record(samples=np.asarray(c) * (1 + at) / row["ratio"] * factor)
            assert compare.compare_case(base, moved, 0.03, kind)["verdict"] == verdict


def test_a_noisy_cpu_comparison_says_what_it_could_detect(tmp_path, capsys):
    """Separate CPU runs of a case slowed 20% whose samples scatter by 15%: unchanged, and the row
    says which change it could have caught instead of only 'noisy'."""
    b, c = runs_apart(np.random.default_rng(11), 300, 0.15, 0.05, slowdown=1.2)
    base = write_run(tmp_path / "b", [record("a", b)], gpu=None)
    cur = write_run(tmp_path / "c", [record("a", c)], gpu=None)
    assert compare_cli.main([str(base), str(cur)]) == 0
    out = capsys.readouterr().out
    case = json.loads((cur / "compare.json").read_text())["cases"][0]
    assert case["verdict"] == "unchanged" and case["noisy"] and case["detectable"] > 0.2
    stated = f"could detect >= {case['detectable'] * 100:.3g}%"
    assert f"unchanged ({stated})" in out and "(noisy)" not in out
    assert "| detects |" in (cur / "compare.md").read_text()


def test_the_headline_names_the_interval_each_kind_of_comparison_used(tmp_path, capsys):
    """Separate runs: a bootstrap interval of the medians; an A/B's rounds: the pairs' t interval."""
    pooled = [record("a", [1.0, 1.01, 0.99] * 4)]
    rounds = [{**r, "round_reps": [3, 3, 3, 3]} for r in pooled]
    for recs, says in [(pooled, "bootstrap CI of the ratio of medians"),
                       (rounds, "t interval of the mean ratio of paired A/B rounds")]:
        base, cur = write_run(tmp_path / f"b{len(says)}", recs), write_run(tmp_path / f"c{len(says)}", recs)
        assert compare_cli.main([str(base), str(cur)]) == 0
        out = capsys.readouterr().out
        assert says in out, out
