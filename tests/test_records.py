"""The one record type and the run store: versions, the record chain, run directories unique
across processes, resume that trusts nothing it reads, and suspect cases that are never a win."""
import json
import multiprocessing
import subprocess
import sys

import pytest

from bench import run
from bench.present import console
from bench.results import record, store
from bench.results.compare import compare_runs
from bench.results.summary import summarize

SWEEP = """
workload: fmha
baseline: native
providers: [native, sdpa-math]
axes: {batch: [1], heads: [2], seq_len: [5, 9], head_dim: [8], dtype: [float32], mode: [fwd]}
timing: {warmup_ms: 0, min_reps: 5, max_reps: 50, max_time_s: 0.02}
"""


def rec(case_id, samples=(1.0, 1.0), provider="p", **changes):
    return {"case_id": case_id, "workload": "w", "provider": provider, "baseline": "p",
            "params": {"n": 1}, "shape": {"n": 1}, "device": "cpu", "status": "ok",
            "samples_ms": list(samples), **changes}


def test_a_record_has_a_version_and_an_unknown_one_is_refused():
    r = record.parse(rec("a"))
    assert r["schema_version"] == record.SCHEMA_VERSION and set(r) == record.FIELDS
    with pytest.raises(record.SchemaError, match="schema_version 99"):
        record.parse({**rec("a"), "schema_version": 99})
    with pytest.raises(record.SchemaError, match="unknown fields"):
        record.parse({**rec("a"), "speedup": 100.0, "schema_version": 2})
    with pytest.raises(record.SchemaError, match="samples_ms"):
        record.parse(rec("a", samples=[-1.0]))


@pytest.mark.parametrize("field,value", [("params", "seq_len=13"), ("shape", [1]), ("provider", 3),
                                         ("max_abs_err", "0"), ("rounds", True)])
def test_a_record_of_other_shapes_than_the_harness_writes_is_refused_in_one_line(field, value):
    """A record edited by hand and chained again was met by the report and compare as a traceback."""
    with pytest.raises(record.SchemaError, match=f"record a: {field} is of type {type(value).__name__}"):
        record.parse(rec("a", **{field: value}))


@pytest.mark.parametrize("part,value,says", [
    ("sweep", "fmha", "sweep is of type str"), ("env", [], "env is of type list"),
    ("env", {"gpus": "H100"}, "env.gpus is of type str"), ("workloads", {"fmha": 5}, "workloads.fmha is of type int"),
    ("sweep", {"compare": {"threshold": "abc"}}, "sweep.compare.threshold is of type str"),
])
def test_a_meta_json_of_other_shapes_than_the_harness_writes_is_refused_in_one_line(tmp_path, part, value, says):
    path = _write(tmp_path / "r", [rec("a")])
    meta = json.loads((path / store.META).read_text())
    (path / store.META).write_text(json.dumps({**meta, part: value}))
    with pytest.raises(record.SchemaError, match=says):
        store.load_run(path)
    (path / store.META).write_text(json.dumps(meta))
    (path / store.CASES).write_text(json.dumps({"a": 1}))
    with pytest.raises(record.SchemaError, match="not a list of cases"):
        store.load_run(path)


def test_version_1_records_upgrade_through_one_function():
    old = {k: v for k, v in rec("a").items()}  # no schema_version: written before it existed
    old["rounds"] = 2
    assert record.upgrade(old)["schema_version"] == record.SCHEMA_VERSION
    assert record.parse(old)["rounds"] == 2


def _write(path, records):
    w = store.RunWriter(path, {"run_id": path.name, "cases": len(records)}, [])
    for r in records:
        w.append(r)
    w.close(True)
    return path


def test_lines_off_the_chain_are_ignored_with_a_warning(tmp_path, capsys):
    path = _write(tmp_path / "r", [rec("a"), rec("b")])
    with open(path / store.SAMPLES, "a") as f:
        f.write(json.dumps(rec("b", samples=[1e-5])) + "\n")  # a bare record
        f.write(json.dumps({"prev": "0" * 64, "hash": "f" * 64, "record": rec("c")}) + "\n")
    records = {r["case_id"]: r for r in store.load_run(path).records}
    assert set(records) == {"a", "b"} and records["b"]["samples_ms"] == [1.0, 1.0]
    assert "ignored 2 line(s) the harness did not write" in capsys.readouterr().err


def test_a_line_that_is_not_json_amid_a_chained_run_is_ignored_with_a_warning(tmp_path, capsys):
    """It made the run unreadable, and the advice was to --resume, which cuts only a torn last line:
    report, compare and --resume refused it alike. The chain still names every record."""
    path = _write(tmp_path / "r", [rec("a"), rec("b")])
    first, second = (path / store.SAMPLES).read_text().splitlines(keepends=True)
    (path / store.SAMPLES).write_text(first + "{not a record\n" + second)
    assert {r["case_id"] for r in store.load_run(path).records} == {"a", "b"}
    assert "ignored 1 line(s) the harness did not write (line 2)" in capsys.readouterr().err


def test_a_run_of_an_unknown_version_is_refused_in_one_line(tmp_path):
    path = _write(tmp_path / "r", [rec("a")])
    meta = json.loads((path / store.META).read_text())
    (path / store.META).write_text(json.dumps({**meta, "schema_version": 7}))
    with pytest.raises(record.SchemaError, match="run schema_version 7"):
        store.load_run(path)


def test_a_changed_record_breaks_the_chain(tmp_path):
    path = _write(tmp_path / "r", [rec("a"), rec("b")])
    lines = (path / store.SAMPLES).read_text().splitlines()
    last = json.loads(lines[-1])
    last["record"]["samples_ms"] = [1e-5]
    (path / store.SAMPLES).write_text("\n".join([lines[0], json.dumps(last)]) + "\n")
    with pytest.raises(record.SchemaError, match="chain"):
        store.load_run(path)


def _make_run(args):
    """One process's run: a directory of its own under a shared root, its own records."""
    root, n = args
    from bench.results import store as s
    path = s.Path(root) / s.run_dir_name("same", "abc")
    w = s.RunWriter(path, {"run_id": path.name, "cases": 3}, [])
    for i in range(3):
        w.append(rec(f"{n}-{i}"))
    w.close(True)
    return path.name


@pytest.mark.parametrize("processes", [2, 8])
def test_runs_started_together_never_share_a_directory(tmp_path, processes):
    with multiprocessing.get_context("spawn").Pool(processes) as p:
        names = p.map(_make_run, [(str(tmp_path), n) for n in range(processes)])
    assert len(set(names)) == processes
    for n, name in enumerate(names):  # each run holds its own 3 records, nobody else's
        assert sorted(r["case_id"] for r in store.load_run(tmp_path / name).records) == \
            [f"{n}-{i}" for i in range(3)]


def test_two_bench_runs_started_in_the_same_second_keep_both(write_sweep, tmp_path, subprocess_env):
    path = write_sweep(SWEEP)
    cmd = [sys.executable, "-m", "bench.run", str(path), "--out", str(tmp_path / "out")]
    procs = [subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    codes = [p.wait(300) for p in procs]
    assert codes == [0, 0]
    runs = [d for d in (tmp_path / "out").iterdir() if d.is_dir() and not d.is_symlink()]
    assert len(runs) == 2  # expected 2 runs of 4 records each
    assert [len(store.load_run(d).records) for d in runs] == [4, 4]


@pytest.fixture
def done_run(write_sweep, tmp_path):
    assert run.main([str(write_sweep(SWEEP)), "--out", str(tmp_path / "out")]) == 0
    return (tmp_path / "out" / "latest").resolve()


@pytest.mark.parametrize("spoil,says", [
    (lambda d: (d / store.CASES).unlink(), "not a run directory"),
    (lambda d: (d / store.CASES).write_text("[]"), "lists no case"),
    (lambda d: (d / store.META).write_text("{not json"), "--resume"),
    (lambda d: (d / store.CASES).write_text(json.dumps(
        [dict(c, params={**c["params"], "seq_len": -5}) for c in json.loads((d / store.CASES).read_text())])),
     "seq_len"),
    (lambda d: (d / store.CASES).write_text(json.dumps(json.loads((d / store.CASES).read_text()) * 2)),
     "case_id"),
])
def test_resume_refuses_a_run_it_cannot_trust_in_one_line(done_run, capsys, spoil, says):
    spoil(done_run)
    assert run.main(["--resume", str(done_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err


def _meta(d, **change):
    meta = json.loads((d / store.META).read_text())
    for key, value in change.items():
        part, _, name = key.partition("__")
        meta[part] = {**meta[part], name: value} if name else value
    (d / store.META).write_text(json.dumps({**meta, "complete": False}))


@pytest.mark.parametrize("change,says", [
    (dict(git={"sha": "0123456789abcdef", "dirty": False}), "it was measured at 0123456789, this tree is"),
    (dict(git__dirty=True, git__diff_sha256="0" * 64), "with uncommitted changes, this tree is"),
    (dict(env__torch="2.0.0"), "its torch was 2.0.0, here it is"),
    (dict(env__host="elsewhere"), "its host was elsewhere"),
    (dict(devices=["cuda:7"]), "it ran on cuda:7, which this machine lacks"),
])
def test_resume_refuses_to_mix_code_or_machines_in_one_run(done_run, capsys, change, says):
    """A case left over, measured by other code or on another machine than the rest, would be mixed
    with them in one run: resuming says so in one line and writes nothing."""
    _meta(done_run, **change)
    before = (done_run / store.SAMPLES).read_bytes(), (done_run / store.META).read_bytes()
    assert run.main(["--resume", str(done_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "finish it where it started" in err, err
    assert ((done_run / store.SAMPLES).read_bytes(), (done_run / store.META).read_bytes()) == before


def test_a_run_left_elsewhere_is_finished_as_a_run_of_its_own_with_whole_shapes(done_run, tmp_path, capsys):
    """--rest-of measures, as a new run here, every shape the old run left unfinished with all of
    that shape's providers (the baseline too, so its speedups need nothing from the old run), where
    --resume refuses to mix another tree's cases in; the old run is left as it was."""
    lines = (done_run / store.SAMPLES).read_text().splitlines()
    last = json.loads(lines[-1])["record"]
    _meta(done_run, records={"count": 3, "head": json.loads(lines[-1])["prev"]},  # its last record lost
          git={"sha": "0123456789abcdef", "dirty": False})
    before = sorted((p.name, p.read_bytes()) for p in done_run.iterdir() if p.is_file())
    assert run.main(["--resume", str(done_run)]) == 2
    assert run.main(["--rest-of", str(done_run), "--out", str(tmp_path / "rest")]) == 0
    rest = store.load_run(tmp_path / "rest" / "latest")
    assert sorted((r["provider"], r["params"]["seq_len"], r["status"]) for r in rest.records) == \
        [("native", last["params"]["seq_len"], "ok"), ("sdpa-math", last["params"]["seq_len"], "ok")]
    assert rest.meta["complete"] and rest.meta["command"][-4:-2] == ["--rest-of", str(done_run)]
    assert sorted((p.name, p.read_bytes()) for p in done_run.iterdir() if p.is_file()) == before
    capsys.readouterr()
    assert run.main(["--rest-of", str(tmp_path / "rest" / "latest")]) == 2
    assert "nothing is left to run" in capsys.readouterr().err
    assert run.main([str(done_run / store.CASES), "--rest-of", str(done_run)]) == 2
    assert "name one of a sweep file" in capsys.readouterr().err


def test_resume_dry_run_runs_nothing(done_run, capsys):
    lines = (done_run / store.SAMPLES).read_text().splitlines()
    meta = json.loads((done_run / store.META).read_text())
    meta["records"] = {"count": 3, "head": json.loads(lines[-1])["prev"]}  # the last record lost
    (done_run / store.META).write_text(json.dumps({**meta, "complete": False}))
    before = (done_run / store.SAMPLES).read_bytes(), (done_run / store.META).read_bytes()
    assert run.main(["--resume", str(done_run), "--dry-run"]) == 0
    assert "would run these 1 case(s)" in capsys.readouterr().out
    assert ((done_run / store.SAMPLES).read_bytes(), (done_run / store.META).read_bytes()) == before


CPU_FLOOR = {"cpu": True, "measured": {"copy_gbps": 100.0, "tflops": {}}}


def test_a_case_faster_than_the_cpu_floor_is_suspect_and_never_best(tmp_path):
    # 1 MB at 100 GB/s takes 0.01 ms at the least: 0.001 ms is impossible
    fast = rec("fast", samples=[0.001] * 5, provider="q", bytes=1e6)
    base = rec("base", samples=[0.05] * 5, provider="p", bytes=1e6)
    frame = summarize([record.parse(base), record.parse(fast)], CPU_FLOOR)
    row = frame.set_index("case_id").loc["fast"]
    assert row["suspect"] and row["speedup"] != row["speedup"]  # no speedup: NaN
    table = console.best_table(frame, [record.parse(base), record.parse(fast)])
    rendered = console.Console(width=200, record=True)
    rendered.print(table)
    text = rendered.export_text()
    assert " q " not in text and " p " in text


def test_a_run_without_its_baseline_says_why_it_has_no_speedups():
    """A run whose --providers left the baseline out has no speedups: the run's end says why and
    how to name another baseline, instead of a column of dashes."""
    recs = [record.parse(rec(c, samples=[ms] * 5, provider=p)) for c, p, ms in
            (("a", "q", 2.0), ("b", "r", 1.0))]
    note = console.missing_baseline(summarize(recs, CPU_FLOOR))
    assert note.startswith("no speedups over p:") and "--set baseline=PROVIDER" in note
    recs.append(record.parse(rec("c", samples=[3.0] * 5, provider="p")))
    frame = summarize(recs, CPU_FLOOR)
    assert console.missing_baseline(frame) is None
    assert frame.set_index("case_id").loc["b", "speedup"] == pytest.approx(3.0)


def test_compare_never_calls_a_suspect_case_an_improvement(tmp_path):
    meta = {"cases": 1, "complete": True, "ceilings": CPU_FLOOR, "env": {"device_kind": "cpu"}}
    paths = []
    for name, ms in (("base", 0.05), ("cur", 0.0001)):
        w = store.RunWriter(tmp_path / name, {**meta, "run_id": name}, [])
        w.append(rec("a", samples=[ms] * 30, bytes=1e6))
        w.close(True)
        paths.append(tmp_path / name)
    cmp = compare_runs(store.load_run(paths[0]), store.load_run(paths[1]))
    assert [r["verdict"] for r in cmp.rows] == ["not compared"]
    assert "suspect" in cmp.rows[0]["reason"]


def test_run_directory_names_are_unique_in_one_second():
    names = {store.run_dir_name("s", "abc") for _ in range(1000)}
    assert len(names) == 1000
    assert all(n.split("_")[1] == "s" for n in names)


def test_an_out_that_cannot_be_written_is_one_line(write_sweep, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a file, not a directory")
    assert run.main([str(write_sweep(SWEEP)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err


def test_a_dry_run_shows_a_bounded_table(write_sweep, capsys):
    sweep = write_sweep(SWEEP.replace(
        "head_dim: [8]", "head_dim: [" + ", ".join(str(8 + i) for i in range(300)) + "]"))
    assert run.main([str(sweep), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1200 cases" in out and "... and 1000 more, not shown" in out


def test_a_run_being_written_is_not_resumed_beside_it(done_run, capsys):
    """Two resumes of one run at once timed their cases against each other on one machine, and
    each chained its records on a head the other had moved: every reader then warned of lines the
    harness did not write. The second is refused in one line while the first holds the run."""
    _meta(done_run)
    held = store.lock_run(done_run)
    try:
        assert run.main(["--resume", str(done_run)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "another process is writing this run" in err, err
    finally:
        held.close()
    assert run.main(["--resume", str(done_run)]) == 0
    assert store.load_run(done_run).meta["complete"] is True


@pytest.mark.parametrize("flag", ["--resume", "--rest-of"])
def test_options_that_choose_cases_are_refused_beside_a_run_to_finish(done_run, capsys, flag):
    """They were ignored without a word: the run finishes the cases it lists, as it chose them."""
    argv = [flag, str(done_run), "--set", "timing.max_time_s=abc", "--filter", "nosuch=1",
            "--providers", "bogus", "--profile", "nope"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--set, --filter, --providers, --profile: {flag} runs" in err, err
