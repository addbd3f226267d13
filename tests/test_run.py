"""The runner end to end on the CPU: the correctness gate, failure isolation, kill -9 then --resume,
several workers, and the results store it leaves behind."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from bench import run
from bench.results import store

SMALL = """\
workload: fmha
baseline: native
providers:
{providers}
axes:
  batch: [1]
  heads: [2]
  seq_len: {seq_lens}
  head_dim: [16]
  dtype: [float32]
timing: {{warmup_ms: 1, min_reps: 3, max_reps: 20, max_time_s: 0.05, target_ci: 0.5, timeout_s: {timeout}}}
"""


def small(providers, seq_lens="[13, 33]", timeout=60):
    items = "\n".join(f"  - {p}" if ":" not in p else f"  - {{name: {p.split(':')[1]}, module: '{p}'}}"
                      for p in providers)
    return SMALL.format(providers=items, seq_lens=seq_lens, timeout=timeout)


def run_sweep(path, out, *args):
    code = run.main([str(path), "--out", str(out), *args])
    return code, store.load_run(out / "latest") if (out / "latest").exists() else None


def by_provider(records):
    return {(r["provider"], r["params"]["seq_len"]): r for r in records}


def test_gate_marks_a_wrong_provider_incorrect_and_keeps_it_out_of_speedups(write_sweep, tmp_path):
    path = write_sweep(small(["native", "sdpa-math", "faulty_providers:wrong"]))
    code, r = run_sweep(path, tmp_path)
    assert code == 0 and r.meta["complete"]
    recs = by_provider(r.records)
    assert recs[("wrong", 13)]["status"] == "incorrect"
    assert recs[("wrong", 13)]["max_abs_err"] == pytest.approx(1.0, rel=1e-6)
    assert recs[("wrong", 13)]["samples_ms"], "an incorrect provider is still timed"
    assert recs[("sdpa-math", 13)]["status"] == "ok" and recs[("sdpa-math", 13)]["rel_err"] < 1e-5
    summary = pd.read_csv(r.path / "summary.csv")
    wrong = summary[summary.provider == "wrong"]
    assert wrong.speedup.isna().all()
    ok = summary[summary.provider == "sdpa-math"]
    assert (ok.speedup > 0).all()
    native = summary[summary.provider == "native"]
    assert (native.speedup == 1.0).all()


def test_strict_exits_1_when_a_case_failed(write_sweep, tmp_path, capsys):
    path = write_sweep(small(["native", "faulty_providers:wrong"], seq_lens="[13]"))
    assert run.main([str(path), "--out", str(tmp_path / "a")]) == 0
    assert run.main([str(path), "--out", str(tmp_path / "b"), "--strict"]) == 1
    assert "strict: 1 case(s) incorrect; exit status 1" in capsys.readouterr().err
    assert store.load_run(tmp_path / "b" / "latest").meta["complete"]
    ok = write_sweep(small(["native"], seq_lens="[13]"), "ok.yaml")
    assert run.main([str(ok), "--out", str(tmp_path / "c"), "--strict"]) == 0


def test_crash_hang_and_oom_cost_only_their_own_case(write_sweep, tmp_path):
    path = write_sweep(small(["native", "faulty_providers:abort", "faulty_providers:hang",
                              "faulty_providers:oom", "sdpa-math"], seq_lens="[13]", timeout=3))
    t0 = time.time()
    code, r = run_sweep(path, tmp_path)
    assert code == 0 and r.meta["complete"]
    status = {p: rec["status"] for (p, _), rec in by_provider(r.records).items()}
    assert status == {"native": "ok", "abort": "crashed", "hang": "timeout", "oom": "oom",
                      "sdpa-math": "ok"}
    reasons = {rec["provider"]: rec["reason"] for rec in r.records}
    assert "exit code" in reasons["abort"] and "3 s" in reasons["hang"]
    assert "out of memory" in reasons["oom"]
    assert time.time() - t0 < 90


@pytest.mark.cpu
def test_store_layout(write_sweep, tmp_path):
    path = write_sweep(small(["native", "sdpa-math"]))
    code, r = run_sweep(path, tmp_path)
    assert code == 0
    assert r.path.parent == tmp_path and r.path.name.rsplit("_", 1)[0].endswith(r.meta["git"]["sha"][:10] if r.meta["git"]["sha"] else "nogit")
    meta = r.meta
    assert meta["sweep"]["sha256"] and meta["sweep"]["baseline"] == "native"
    assert meta["env"]["torch"] and meta["env"]["python"] and meta["env"]["device_kind"] == "cpu"
    assert meta["cases"] == 4 and len(r.records) == 4
    for rec in r.records:
        assert rec["status"] == "ok" and len(rec["samples_ms"]) >= 3
        assert all(x > 0 for x in rec["samples_ms"]) and rec["flops"] > 0 and rec["bytes"] > 0
    summary = pd.read_csv(r.path / "summary.csv")
    assert len(summary) == 4
    for col in ["median_ms", "iqr_ms", "ci_low_ms", "ci_high_ms", "tflops", "gbps", "speedup",
                "max_abs_err", "rel_err", "status", "seq_len"]:
        assert col in summary.columns
    assert (summary.ci_low_ms <= summary.median_ms).all() and (summary.median_ms <= summary.ci_high_ms).all()


def _case_ids(run_path):
    return sorted(rec["case_id"] for rec in store.read_records(run_path))


def _whole_lines(run_dir) -> int:
    """Records written so far (a record being written has no newline yet)."""
    p = run_dir / "samples.jsonl"
    return p.read_bytes().count(b"\n") if p.exists() else 0


def _stored(run_dir) -> int:
    """Records the run has stored: a line counts once meta.json's record chain names it (a line
    written but not yet chained is what a kill at that moment leaves, and a resume cuts)."""
    try:
        return len(store.load_run(run_dir).records)
    except (OSError, ValueError, KeyError):  # meta.json not written yet
        return 0


def _interruptible():
    """In the child before exec: SIGINT at its default, as in a foreground terminal. A suite run as
    a background job inherits SIGINT ignored, and so would bench.run, which then could not be
    interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_gated(path, out, env, gate, stored):
    """bench.run in a subprocess, returned once it stored `stored` records and is blocked at the
    gate (faulty_providers:gated): it cannot finish before the test opens the gate."""
    env = {**env, "BENCH_TEST_GATE": str(gate)}
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", str(path), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_interruptible)
    deadline = time.time() + 120
    while time.time() < deadline:
        dirs = [d for d in out.glob("*") if d.is_dir()] if out.exists() else []
        if dirs and _stored(dirs[0]) >= stored:
            return proc, dirs[0]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the run never stored {stored} cases")


def test_kill_9_then_resume_gives_the_same_cases(write_sweep, tmp_path, subprocess_env, monkeypatch):
    path = write_sweep(small(["native", "faulty_providers:gated"], seq_lens="[5, 9, 13, 17, 21, 25]"))
    out, gate = tmp_path / "killed", tmp_path / "gate"
    proc, run_dir = _start_gated(path, out, subprocess_env, gate, 5)  # blocked at gated seq_len=13
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    partial = store.load_run(run_dir)
    assert not partial.meta["complete"] and not (out / "latest").exists()
    assert len(partial.records) == 5

    gate.touch()
    monkeypatch.setenv("BENCH_TEST_GATE", str(gate))
    code = run.main(["--resume", str(run_dir)])
    assert code == 0
    resumed = store.load_run(run_dir)
    assert resumed.meta["complete"] and (out / "latest").resolve() == run_dir.resolve()
    assert _whole_lines(run_dir) == 12  # nothing finished was run again

    code, full = run_sweep(path, tmp_path / "full")
    assert code == 0
    assert _case_ids(run_dir) == _case_ids(full.path) and len(_case_ids(run_dir)) == 12


@pytest.mark.cpu
def test_two_workers_give_the_same_cases_as_one(write_sweep, tmp_path):
    path = write_sweep(small(["native", "sdpa-math"], seq_lens="[5, 9, 13]"))
    code1, one = run_sweep(path, tmp_path / "one")
    code2, two = run_sweep(path, tmp_path / "two", "--workers", "2")
    assert code1 == code2 == 0
    assert _case_ids(one.path) == _case_ids(two.path)
    assert all(rec["status"] == "ok" for rec in two.records)
    assert two.meta["devices"] == ["cpu", "cpu"]


def test_interrupt_leaves_a_partial_run_that_resumes(write_sweep, tmp_path, subprocess_env, monkeypatch):
    path = write_sweep(small(["native", "faulty_providers:gated"], seq_lens="[5, 9, 13, 17]"))
    gate = tmp_path / "gate"
    proc, run_dir = _start_gated(path, tmp_path / "r", subprocess_env, gate, 1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "--resume" in stderr
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["complete"] is False
    gate.touch()
    monkeypatch.setenv("BENCH_TEST_GATE", str(gate))
    assert run.main(["--resume", str(run_dir)]) == 0
    assert len(store.read_records(run_dir)) == 8


def test_resume_cuts_a_torn_last_record_and_runs_that_case_again(write_sweep, tmp_path):
    path = write_sweep(small(["native", "sdpa-math"]))
    code, r = run_sweep(path, tmp_path)
    samples = r.path / "samples.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    torn_id = json.loads(lines[-1])["record"]["case_id"]
    samples.write_text("".join(lines[:-1]) + lines[-1][:40])  # killed in the middle of a write
    with pytest.raises(store.TornSamples, match="samples.jsonl:4"):
        store.load_run(r.path)
    meta = json.loads((r.path / "meta.json").read_text())
    meta["records"] = {"count": 3, "head": json.loads(lines[-1])["prev"]}  # not yet named when killed
    (r.path / "meta.json").write_text(json.dumps({**meta, "complete": False}))

    assert run.main(["--resume", str(r.path)]) == 0
    resumed = store.load_run(r.path)
    assert resumed.meta["complete"] and resumed.meta["resumed"][-1]["cut_torn_record"]
    assert len(resumed.records) == 4 and torn_id in resumed.done_ids
    assert _whole_lines(r.path) == 4


def test_a_run_missing_a_case_is_not_complete(write_sweep, tmp_path, capsys):
    path = write_sweep(small(["native", "sdpa-math"]))
    code, r = run_sweep(path, tmp_path / "a")
    # killed after its last record was written, before meta.json named it: that record is off the
    # chain, so its case is lost, and resuming runs it again
    last = json.loads((r.path / "samples.jsonl").read_text().splitlines()[-1])
    meta = json.loads((r.path / "meta.json").read_text())
    meta["records"] = {"count": meta["records"]["count"] - 1, "head": last["prev"]}
    (r.path / "meta.json").write_text(json.dumps(meta))
    from bench.measure import runner

    writer, todo = runner.resume_run(r.path, ["test"])
    assert len(todo) == 1
    assert runner.execute(writer, [], ["cpu"], tmp_path / "a") == 130  # the lost case was not run
    assert not store.load_run(r.path).meta["complete"]
    assert "incomplete: 3 of 4 cases stored" in capsys.readouterr().err


def test_resuming_an_older_run_leaves_latest_on_the_newest(write_sweep, tmp_path):
    path = write_sweep(small(["native"], seq_lens="[13]"))
    _, old = run_sweep(path, tmp_path)
    time.sleep(1.1)  # run directories are named by the second
    _, new = run_sweep(path, tmp_path)
    assert old.path != new.path and (tmp_path / "latest").resolve() == new.path
    assert run.main(["--resume", str(old.path)]) == 0
    assert (tmp_path / "latest").resolve() == new.path


@pytest.mark.cpu
@pytest.mark.parametrize("culprit", ["threads", "leak"])
def test_a_case_that_changes_its_worker_does_not_change_the_next(write_sweep, tmp_path, monkeypatch,
                                                               culprit):
    seen = tmp_path / "seen.jsonl"
    monkeypatch.setenv("BENCH_TEST_SEEN", str(seen))
    path = write_sweep(small(["native", "faulty_providers:seen", f"faulty_providers:{culprit}"],
                             seq_lens="[5, 9]"))
    code, r = run_sweep(path, tmp_path / "r")
    assert code == 0
    first, second = [json.loads(line) for line in seen.read_text().splitlines()]
    assert (first["seq_len"], second["seq_len"]) == (5, 9)  # the culprit ran between them
    assert second["threads"] == first["threads"] and second["grad"] is True
    assert second["rss_mb"] < first["rss_mb"] + 384
    leaked = {rec["params"]["seq_len"]: rec["leaked"] for rec in r.records if rec["provider"] == culprit}
    if culprit == "threads":
        assert leaked[5]["num_threads"] == [1, 2] and leaked[5]["grad_enabled"] == [True, False]
    else:
        assert leaked[5]["rss_mb"][1] - leaked[5]["rss_mb"][0] >= 700
    assert all(not rec["leaked"] for rec in r.records if rec["provider"] == "seen")


def test_case_output_goes_to_the_run_directory_and_a_failure_shows_its_tail(write_sweep, tmp_path,
                                                                          subprocess_env):
    path = write_sweep(small(["native", "faulty_providers:chatty", "faulty_providers:last_words"],
                             seq_lens="[13]"))
    proc = subprocess.run([sys.executable, "-m", "bench.run", str(path), "--out", str(tmp_path)],
                          env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert "chatter" not in proc.stdout + proc.stderr and len(proc.stdout) < 20_000
    assert "the reason it is about to die" in proc.stderr
    r = store.load_run(tmp_path / "latest")
    logs = {rec["provider"]: rec["log"] for rec in r.records}
    assert logs["native"] is None  # nothing written, no file kept
    chatter = (r.path / logs["chatty"]).read_text()
    assert chatter.count("chatter ") >= 300_000 and chatter.count("native chatter") == 1000
    assert "about to die" in (r.path / logs["last_words"]).read_text()


def test_dry_run_lists_cases_and_writes_nothing(write_sweep, tmp_path, capsys):
    path = write_sweep(small(["native", "sdpa-math"]))
    assert run.main([str(path), "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    assert "4 cases" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()


def test_profile_none_shows_the_sweep_as_written_on_a_cpu_machine(write_sweep, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: no profile is applied by default")
    path = write_sweep(small(["native"]) + "profiles:\n  cpu: {axes: {seq_len: [5]}}\n")
    assert run.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 cases" in out and "profile: cpu (no GPU here; --profile none" in out
    assert run.main([str(path), "--dry-run", "--profile", "none"]) == 0
    out = capsys.readouterr().out
    assert "2 cases" in out and "profile:" not in out


def test_unavailable_provider_is_skipped_with_its_reason(write_sweep, tmp_path, capsys):
    path = write_sweep(small(["native", "cutile"]))
    code, r = run_sweep(path, tmp_path)
    assert code == 0
    skipped = [rec for rec in r.records if rec["provider"] == "cutile"]
    import kernels

    ok, reason = kernels.available()
    if ok:
        pytest.skip("cuTile runs here; nothing is skipped")
    assert all(rec["status"] == "skipped" and reason in rec["reason"] for rec in skipped)
    out = capsys.readouterr().out
    assert f"skipped cutile (2 cases): cuTile not available: {reason}" in out
    assert "Traceback" not in out


def test_median_is_finite_and_speedup_matches_samples(write_sweep, tmp_path):
    path = write_sweep(small(["native", "sdpa-math"], seq_lens="[13]"))
    code, r = run_sweep(path, tmp_path)
    recs = by_provider(r.records)
    import numpy as np

    expect = np.median(recs[("native", 13)]["samples_ms"]) / np.median(recs[("sdpa-math", 13)]["samples_ms"])
    summary = pd.read_csv(r.path / "summary.csv").set_index("provider")
    assert math.isclose(summary.loc["sdpa-math", "speedup"], expect, rel_tol=1e-9)
