"""bench.ab on the CPU: two trees whose providers spin for fixed times (tests/delay_provider.py), so
the verdicts do not depend on the machine's load. A revision that slows one provider by 10% fails
naming that case only; two identical trees pass. The paired-rounds statistic on seeded synthetic
rounds of a busy machine: a 20% slowdown is flagged, an A/A is not, and rounds continue while the
interval is wide."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bench import ab as ab_cli
from bench.measure import ab as interleaved
from bench.results import compare, stats
from conftest import ROOT, TESTS

SWEEP = """
name: ab
workload: layernorm
baseline: kept
providers:
  - {name: kept, module: "ab_provider:kept"}
  - {name: changed, module: "ab_provider:changed"}
axes: {rows: [4], hidden: [16], dtype: [float32], mode: [fwd]}
timing: {warmup_ms: 5, min_reps: 100, max_reps: 150, max_time_s: 0.5, target_ci: 0.0001, timeout_s: 60}
"""


@pytest.fixture(autouse=True)
def forget_providers():
    """Each test imports the providers of its own trees; none stays in sys.modules for the next
    (a test that passed only because an earlier one had imported them once hid a wrong error)."""
    yield
    for name in ("ab_provider", "delay_provider"):
        sys.modules.pop(name, None)


def tree(path, changed: str):
    """A copy of the project whose provider `changed` is delay_provider's `changed` function."""
    shutil.copytree(ROOT / "bench", path / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    (path / "ab_provider.py").write_text(
        f"from delay_provider import steady as kept, {changed} as changed  # noqa: F401\n")
    return path


def ab(tmp_path, monkeypatch, capsys, working_tree, *sides) -> tuple[int, list[dict], str]:
    """Run bench.ab as a user would from `working_tree`, whose providers the sweep is checked with."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the trees import delay_provider
    monkeypatch.syspath_prepend(str(working_tree))
    sweep = tmp_path / "ab.yaml"
    sweep.write_text(SWEEP)
    rc = ab_cli.main([*map(str, sides), str(sweep), "--out", str(tmp_path / "results")])
    out, err = capsys.readouterr()
    assert rc in (0, 1), err
    ab_dir = out.strip().splitlines()[-1]
    return rc, json.loads(open(f"{ab_dir}/compare.json").read())["cases"], out


@pytest.mark.cpu
def test_a_revision_that_slows_one_provider_fails_naming_it(tmp_path, monkeypatch, capsys):
    repo = tree(tmp_path / "repo", "steady")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    (repo / "ab_provider.py").write_text("from delay_provider import steady as kept, slowed as changed\n")
    subprocess.run([*git, "commit", "-qam", "slower"], check=True)
    monkeypatch.chdir(repo)  # revisions are looked up in the repository the command runs from
    rc, cases, out = ab(tmp_path, monkeypatch, capsys, repo, "HEAD~1", "HEAD")
    assert rc == 1, out
    assert [c["provider"] for c in cases if c["verdict"] != "unchanged"] == ["changed"], out
    assert [c["verdict"] for c in cases if c["provider"] == "changed"] == ["regression"]
    assert "layernorm/changed" in out and "+" in out
    html = next((tmp_path / "results").glob("*_ab_*/report.html")).read_text()
    assert "1 regression" in html  # the report's comparison section
    sha = {rev: subprocess.run([*git, "rev-parse", rev], capture_output=True, text=True).stdout[:12]
           for rev in ("HEAD~1", "HEAD")}
    top = html.split('id="headline"')[0]  # named at the top, before any result
    assert f"A: HEAD~1 ({sha['HEAD~1']}) vs B: HEAD ({sha['HEAD']})" in top


@pytest.mark.cpu
def test_identical_trees_pass(tmp_path, monkeypatch, capsys):
    a, b = tree(tmp_path / "a", "quick"), tree(tmp_path / "b", "quick")
    rc, cases, out = ab(tmp_path, monkeypatch, capsys, b, a, b)
    assert rc == 0, out
    assert sorted(c["verdict"] for c in cases) == ["unchanged", "unchanged"], out
    meta = json.loads(next((tmp_path / "results").glob("*_ab_*/head/meta.json")).read_text())
    assert meta["ab"]["max_rounds"] == 48  # a CPU's rounds may go on to 48 (a GPU's to 24)


def test_bad_revision_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """A sweep whose providers load, and a revision that does not exist: the line names the revision."""
    (tmp_path / "ab_provider.py").write_text("from delay_provider import steady as kept, quick as changed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sweep = tmp_path / "ab.yaml"
    sweep.write_text(SWEEP)
    assert ab_cli.main(["no-such-revision", str(sweep), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-revision" in err


@pytest.mark.parametrize("threshold", ["-1", "nan", "inf"])
def test_a_threshold_that_is_no_positive_number_is_refused_before_anything_runs(tmp_path, monkeypatch,
                                                                               capsys, threshold):
    """It was refused only once every round had run."""
    (tmp_path / "ab_provider.py").write_text("from delay_provider import steady as kept, quick as changed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sweep = tmp_path / "ab.yaml"
    sweep.write_text(SWEEP)
    assert ab_cli.main(["HEAD", str(sweep), "--out", str(tmp_path / "out"), "--threshold", threshold]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"threshold must be a positive number, got {threshold}" in err, err
    assert not (tmp_path / "out").exists()


def test_a_directory_that_is_not_a_tree_of_the_project_is_refused(tmp_path, monkeypatch, capsys):
    """Its side of the A/B ran the installed harness instead, without a word."""
    (tmp_path / "ab_provider.py").write_text("from delay_provider import steady as kept, quick as changed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "runs").mkdir()
    sweep = tmp_path / "ab.yaml"
    sweep.write_text(SWEEP)
    assert ab_cli.main([str(tmp_path / "runs"), str(sweep), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a tree of this project" in err, err


def rounds_of(rng, rounds: int, slowdown: float, reps: int = 30) -> tuple[dict, dict]:
    """Seeded A/B records of one case on a busy machine: each round's level moves by 30% (both
    sides of a round alike), each side's level within a round by 10% more, its samples by 5%."""
    def side(level):
        return np.exp(rng.normal(np.log(level) + rng.normal(0, 0.10), 0.05, reps))
    base, cur = [], []
    for _ in range(rounds):
        level = np.exp(rng.normal(0, 0.30))
        base.append(side(level))
        cur.append(side(level * slowdown))
    return tuple({"case_id": "c", "workload": "w", "provider": "p", "params": {}, "status": "ok",
                  "samples_ms": list(np.concatenate(r)), "round_reps": [reps] * rounds}
                 for r in (base, cur))


def test_paired_rounds_flag_a_20_percent_slowdown_and_not_an_aa():
    rng = np.random.default_rng(2026)
    slow = [rounds_of(rng, interleaved.MAX_ROUNDS["cpu"], 1.2) for _ in range(100)]
    same = [rounds_of(rng, interleaved.MAX_ROUNDS["cpu"], 1.0) for _ in range(200)]
    judge = lambda pair: compare.compare_case(*pair, 0.03, "cpu")["verdict"]  # noqa: E731
    assert sum(judge(p) == "regression" for p in slow) >= 95
    assert sum(judge(p) == "regression" for p in same) <= 2  # false alarms: at most 1%
    pooled = [tuple({k: v for k, v in r.items() if k != "round_reps"} for r in p) for p in slow[:20]]
    assert sum(judge(p) == "regression" for p in pooled) <= 5, "the pooled samples drown it"


def test_detectable_change_follows_the_verdict_rule():
    """A change just above the stated detectable change is flagged, one just below it is not."""
    rng = np.random.default_rng(7)
    base, cur = rounds_of(rng, 12, 1.0)
    row = compare.compare_case(base, cur, 0.03, "cpu")
    at = row["detectable"]
    assert 0.03 < at < 1
    for factor, flagged in ((1.02, True), (0.98, False)):
        moved = dict(cur, samples_ms=list(np.asarray(cur["samples_ms"]) * (1 + at) * factor / row["ratio"]))
        assert (compare.compare_case(base, moved, 0.03, "cpu")["verdict"] == "regression") is flagged


def test_rounds_continue_while_the_paired_interval_is_wide():
    rng = np.random.default_rng(3)
    steady = [dict(r, samples_ms=list(np.asarray(r["samples_ms"]) ** 0.02)) for r in rounds_of(rng, 6, 1.0)]
    assert interleaved.enough_rounds(*steady, 6, 0.03, 6, 20)
    assert not interleaved.enough_rounds(*steady, 4, 0.03, 6, 20), "never fewer than --rounds"
    scattered = rounds_of(rng, 6, 1.0)
    assert not interleaved.enough_rounds(*scattered, 6, 0.03, 6, 20)
    assert interleaved.enough_rounds(*scattered, 20, 0.03, 6, 20)
    assert interleaved.enough_rounds(scattered[0], {**scattered[1], "status": "error"}, 2, 0.03, 6, 20)


def test_merge_keeps_each_rounds_sample_count():
    rec = {"status": "ok", "samples_ms": [1.0, 2.0]}
    merged = interleaved.merge(interleaved.merge(None, rec), {"status": "ok", "samples_ms": [3.0]})
    assert merged["samples_ms"] == [1.0, 2.0, 3.0] and merged["round_reps"] == [2, 1]
    assert list(stats.round_times(merged["samples_ms"], merged["round_reps"])) == [1.5, 3.0]
    assert list(stats.round_times(merged["samples_ms"], merged["round_reps"], "cpu")) == [1.0, 3.0]


# Per-round ratios B/A of one recorded A/A trial of `bench.ab` (the same code on both sides; the
# layernorm case of tests/detection_rate.py, 48 rounds) on a shared 2-core machine: in a few rounds
# one side met a burst of load.
RECORDED_AA = [1.098, 0.981, 0.990, 1.000, 1.192, 0.984, 1.084, 0.744, 0.998, 1.097, 1.005, 0.988,
               0.855, 1.003, 1.001, 0.882, 1.012, 0.728, 0.713, 0.691, 0.973, 1.019, 0.968, 0.965,
               0.952, 0.993, 0.966, 0.935, 0.993, 1.011, 1.011, 0.840, 0.983, 0.858, 0.815, 0.959,
               0.971, 0.991, 0.979, 1.022, 1.032, 0.960, 0.996, 0.998, 1.018, 1.010, 0.979, 0.989]


def test_a_cpu_aa_with_outlier_rounds_is_not_flagged():
    """A CPU's rounds are judged by their median ratio and the sign test's interval: the outliers
    that pull the geometric mean (and the t interval a GPU uses) to -4% leave it at -1%."""
    base, cur = ({"case_id": "c", "workload": "w", "provider": "p", "params": {}, "status": "ok",
                  "samples_ms": times, "round_reps": [1] * len(times)}
                 for times in ([1.0] * len(RECORDED_AA), RECORDED_AA))
    cpu = compare.compare_case(base, cur, 0.03, "cpu")
    assert cpu["verdict"] == "unchanged" and cpu["interval"] == "sign"
    assert abs(cpu["ratio"] - 0.988) < 0.001 and cpu["ci_low"] < 1 < cpu["ci_high"]
    gpu = compare.compare_case(base, cur, 0.03, "cuda")
    assert gpu["verdict"] == "improvement" and gpu["ratio"] < 0.96


def test_the_sign_interval_needs_enough_rounds_for_its_confidence():
    """At 99% the sign test needs 8 rounds (2 / 2^8 < 1%): fewer give no interval, so no verdict
    and no stop."""
    for n, has_interval in ((7, False), (8, True)):
        _, low, high = stats.paired_ratio_ci([1.0] * n, [1.2] * n, 0.99, "cpu")
        assert (low == low and high == high) is has_interval  # NaN when it has none
    ratio, low, high = stats.paired_ratio_ci([1.0] * 20, [1.0 + i / 100 for i in range(20)], 0.99, "cpu")
    assert (round(low, 2), round(ratio, 3), round(high, 2)) == (1.03, 1.095, 1.16)


class FakeWorker:
    """Stands in for pool.Worker: counts the processes it would have started."""
    started = 0

    def __init__(self, device, tree, python=None):
        self.device, self.proc = device, None

    def start(self):
        FakeWorker.started += 1
        self.proc = "a process"
        return True

    def run(self, case, log=None):
        assert self.proc, "started before its round"
        return {"case_id": case.case_id, "status": "ok", "samples_ms": [1.0], "device": self.device}

    def stop(self):
        self.proc = None


def test_a_cpu_round_gets_fresh_workers_and_a_gpu_keeps_its_own(monkeypatch):
    """A CPU worker's own bias lasts as long as it lives, so each round starts a fresh pair; a
    GPU's workers (no such bias, slow to start) serve every round."""
    monkeypatch.setattr(interleaved, "Worker", FakeWorker)
    case = type("C", (), {"case_id": "c"})()
    for device, starts in (("cpu", 2 * 6), ("cuda:0", 2)):
        FakeWorker.started = 0
        out = interleaved.interleave([case], {"base": ROOT, "head": ROOT}, device, 6)
        assert out["head"]["c"]["rounds"] == 6 and FakeWorker.started == starts, device
