"""Why a case got slower: Nsight Compute counters of two sides (synthetic captures in the documented
`--csv --page raw` form, tests/data/ncu_fmha_{base,head}.csv: the head's kernel takes 104 registers
instead of 80, which drops it from 3 to 2 blocks per SM), their diff in words, the profiling of
both sides' own trees by a stand-in ncu, the report section and the history rows; and bench.ab
--counters where nothing can be profiled."""
import json
import os
import shlex
import shutil
import subprocess
import sys
from html import escape
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench.measure import ncu, runner
from bench.measure.pool import worker_env
from bench.measure.sweep import Case
from bench.present import report
from bench.present.counters import section
from bench.present.trend import render_trend
from bench.results import counters, history, store
from bench.results.compare import case_label
from bench.results.store import load_run
from conftest import ROOT

DATA = Path(__file__).parent / "data"
BASE, HEAD = (ncu.parse_csv((DATA / f"ncu_fmha_{side}.csv").read_text()) for side in ("base", "head"))
FIXTURE_RUN = ROOT / "results" / "fixtures" / "h100_synthetic"
WHY = ("+6.1%: registers 80 -> 104, occupancy 3 -> 2 blocks/SM (limited by registers), theoretical "
       "occupancy 38% -> 25%, achieved occupancy 35% -> 24%, DRAM read +0.2% (512 MB -> 513 MB), "
       "tensor pipe 61% -> 59%, kernel time under ncu +6.2%, long scoreboard stalls 50% -> 65% of "
       "stalled cycles")


def test_parse_reads_bytes_clocks_and_occupancy_limits_in_common_units():
    (base,), (head,) = BASE, HEAD
    assert base["dram_read_bytes"] == 512e6 and base["l2_bytes"] == 2.1e9
    assert base["smem_dynamic_bytes"] == pytest.approx(49150)  # Kbyte/block
    # the same clock written as 1.98 cycle/nsecond and 1,980 cycle/usecond; ms and us alike
    assert base["sm_clock_mhz"] == pytest.approx(1980) and head["sm_clock_mhz"] == pytest.approx(1980)
    assert base["duration_ms"] == pytest.approx(1.23) and head["duration_ms"] == pytest.approx(1.3058)
    assert (base["blocks_per_sm"], base["limited_by"]) == (3, "registers")
    assert (head["blocks_per_sm"], head["registers"]) == (2, 104)
    # stalled cycles per issue: long scoreboard 4 of 8 ("selected", issuing, is not a stall)
    assert (base["top_stall"], base["top_stall_share"]) == ("long scoreboard", 0.5)


def test_a_new_top_stall_is_named_and_a_side_without_stall_reasons_names_none():
    mio = [{**HEAD[0], "top_stall": "mio throttle", "top_stall_share": 0.41}]
    text = counters.diff("c", {"kernels": HEAD}, {"kernels": mio}, 1.1)["text"]
    assert text == "+10.0%: top stall long scoreboard (65%) -> mio throttle (41%)"
    bare = [{**HEAD[0], "top_stall": None, "top_stall_share": None}]
    assert counters.diff("c", {"kernels": bare}, {"kernels": mio}, 1.1)["text"] == \
        "+10.0%: no counter collected changed"
    near = [{**HEAD[0], "top_stall_share": 0.62}]  # under 5 points: not a change
    assert counters.diff("c", {"kernels": HEAD}, {"kernels": near}, 1.0)["changes"] == []


def test_the_diff_says_what_changed_resources_first_and_skips_the_rest():
    d = counters.diff("fmha/cutile [x]", {"kernels": BASE}, {"kernels": HEAD}, 1.061)
    assert d["text"] == WHY
    fields = [c["field"] for c in d["changes"]]
    assert fields.index("registers") < fields.index("blocks_per_sm") < fields.index("dram_read_bytes") \
        < fields.index("tensor_pct")
    for same in ("spill_bytes", "smem_bytes", "dram_write_bytes", "l2_bytes", "sm_clock_mhz"):
        assert same not in fields


def test_spills_appearing_and_a_lower_clock_are_named():
    slow = [{**HEAD[0], "spill_bytes": 1536.0, "sm_clock_mhz": 1755.0}]
    text = counters.diff("c", {"kernels": HEAD}, {"kernels": slow}, 1.2)["text"]
    assert text == "+20.0%: spill stores new (0 B -> 1.54 KB), SM clock 1980 -> 1755 MHz"


def test_a_diff_of_equal_counters_says_so_and_one_without_counters_says_why():
    assert counters.diff("c", {"kernels": BASE}, {"kernels": BASE}, 1.04)["text"] == \
        "+4.0%: no counter collected changed"
    d = counters.diff("c", {"kernels": BASE}, {"reason": "not profiled: the case is crashed"}, 1.5)
    assert d["changes"] == [] and d["text"] == \
        "+50.0%: no counter diff (head: not profiled: the case is crashed)"


def test_a_case_of_several_kernels_sums_bytes_and_takes_resources_from_the_longest():
    small = {**BASE[0], "name": "small", "duration_ms": 0.1, "registers": 32.0, "dram_read_bytes": 1e6}
    s = counters.summarize([small, BASE[0]])
    assert s["kernels"] == 2 and s["registers"] == 80 and s["kernel"] == "fmha_fwd_kernel"
    assert s["dram_read_bytes"] == pytest.approx(513e6) and s["duration_ms"] == pytest.approx(1.33)
    assert counters.diff("c", {"kernels": BASE}, {"kernels": [small, BASE[0]]})["changes"][0]["text"] \
        == "kernels 1 -> 2"


LOG = """commit {key}
Kernel:     fmha_fwd_kernel
Date:       {date}
Duration:   {secs} s
CUBIN:      {size} bytes

Remarks:
    --- !Analysis
    Name: registers
    Value: {regs}
"""


def test_compile_logs_differ_only_where_the_compiles_do():
    a = LOG.format(key="aa", date="Mon", secs=1.2, size=9000, regs=80)
    b = LOG.format(key="bb", date="Tue", secs=1.9, size=9000, regs=80)
    assert counters.compile_diff(a, b) == ""
    c = LOG.format(key="cc", date="Tue", secs=1.0, size=9400, regs=104)
    lines = counters.compile_diff(a, c).splitlines()
    assert "-CUBIN:      9000 bytes" in lines and "+    Value: 104" in lines
    assert not any(line[1:].startswith(("commit", "Date", "Duration")) for line in lines)
    assert counters.compile_diff(a, None) is None


def fake_tree(path: Path, regs: int) -> Path:
    """A tree with a worker that takes --profiled and a stand-in `cutile-cache log`."""
    (path / "bench" / "measure").mkdir(parents=True)
    (path / "bench" / "measure" / "worker.py").write_text('# serve(..., "--profiled" in argv)\n')
    (path / "cutile_cache").mkdir()
    (path / "cutile_cache" / "__init__.py").write_text("")
    (path / "cutile_cache" / "_cli.py").write_text(
        f"print({LOG.format(key=path.name, date='now', secs=1, size=9000, regs=regs)!r})\n")
    return path


def test_explain_profiles_each_side_with_its_own_tree_and_keeps_the_compile_logs(tmp_path, monkeypatch):
    base_tree, head_tree = fake_tree(tmp_path / "base", 80), fake_tree(tmp_path / "head", 104)
    ncu_bin = tmp_path / "bin" / "ncu"
    ncu_bin.parent.mkdir()
    # the tree is first on the worker's PYTHONPATH: show that tree's capture, record the call
    ncu_bin.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\ncase "$PYTHONPATH" in\n'
                       f'  {head_tree}*) cat {DATA}/ncu_fmha_head.csv ;;\n'
                       f'  *) cat {DATA}/ncu_fmha_base.csv ;;\nesac\n')
    ncu_bin.chmod(0o755)
    monkeypatch.setenv("PATH", f"{ncu_bin.parent}{os.pathsep}{os.environ['PATH']}")
    case = Case("c1", "fmha", "cutile", "torch", {"seq_len": 1024}, {"seq_len": 1024}, {})
    rec = {"case_id": "c1", "workload": "fmha", "provider": "cutile", "params": {"seq_len": 1024},
           "status": "ok"}
    run = SimpleNamespace(records=[rec])
    row = {"case": case_label(rec), "verdict": "regression", "ratio": 1.061}
    other = {**row, "case": "fmha/torch [seq_len=1024]"}  # no such case: nothing to profile
    said = []
    diffs = ncu.explain(SimpleNamespace(rows=[other, row]), [case], run, run,
                        {"base": base_tree, "head": head_tree}, "cuda:0", log=said.append)
    assert [d["text"] for d in diffs] == [WHY]
    assert said[-1] == f"why {row['case']}: {WHY}"
    assert "+    Value: 104" in diffs[0]["compile_diff"].splitlines()
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and all("--clock-control none" in c for c in calls)


KINETO = ("INFO:2026-12-04 11:18:44 1550:1550 init.cpp:119] If you see CUPTI_ERROR_INSUFFICIENT_PRIVILEGES, "
          "refer to https://developer.nvidia.com/nvidia-development-tools-solutions-err-nvgpuctrperm-cupti")


@pytest.mark.parametrize("printed, reason", [
    ([KINETO, "==WARNING== No kernels were profiled."], "==WARNING== No kernels were profiled."),
    (["==ERROR== ERR_NVGPUCTRPERM - The user does not have permission", KINETO, "==WARNING== x"],
     "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission"),
    (["Traceback (most recent call last):", KINETO, "ModuleNotFoundError: No module named 'x'"],
     "ModuleNotFoundError: No module named 'x'"),
    ([KINETO], "ncu saw no kernel in the NVTX range 'timed'"),
    (['{"case_id": "c1", "status": "error", "reason": "TypeError: measure() missing 1 argument"}',
      "==WARNING== No kernels were profiled."],
     "the profiled run of the case was error: TypeError: measure() missing 1 argument"),
])
def test_no_counters_says_what_ncu_or_the_worker_said(tmp_path, monkeypatch, printed, reason):
    """ncu's own error or warning, else the worker's exception: not torch's advice about a CUPTI
    error, which once stood in for the reason a GPU profile had no kernels."""
    ncu_bin = tmp_path / "bin" / "ncu"
    ncu_bin.parent.mkdir()
    ncu_bin.write_text("#!/bin/sh\ncat > /dev/null\n" + "".join(f"echo {shlex.quote(line)} >&2\n" for line in printed))
    ncu_bin.chmod(0o755)
    monkeypatch.setenv("PATH", f"{ncu_bin.parent}{os.pathsep}{os.environ['PATH']}")
    case = Case("c1", "w", "p", "p", {}, {}, {})
    got = ncu.profile_case(case, {"status": "ok"}, "cuda:0", fake_tree(tmp_path / "tree", 80))
    assert got == {"reason": reason}


def test_explain_skips_what_is_not_a_regression_and_a_tree_too_old_to_profile(tmp_path):
    rec = {"case_id": "c1", "workload": "w", "provider": "p", "params": {}, "status": "ok"}
    case = Case("c1", "w", "p", "p", {}, {}, {})
    run = SimpleNamespace(records=[rec])
    row = {"case": case_label(rec), "verdict": "improvement", "ratio": 0.9}
    assert ncu.explain(SimpleNamespace(rows=[row]), [case], run, run, {}, "cuda:0") == []
    (tmp_path / "bench" / "measure").mkdir(parents=True)
    (tmp_path / "bench" / "measure" / "worker.py").write_text("# serves cases\n")
    if ncu.unavailable("cuda:0") is None:
        assert "predates profiling" in ncu.profile_case(case, rec, "cuda:0", tmp_path)["reason"]


def with_why(tmp_path, diffs, reason=None):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE_RUN, run_dir)
    counters.write(run_dir, diffs, reason)
    return load_run(run_dir)


def test_the_report_shows_why_each_case_changed(tmp_path):
    run = with_why(tmp_path, [])
    case = case_label(run.records[0])
    d = counters.diff(case, {"kernels": BASE, "compile_log": "a\nb"}, {"kernels": HEAD, "compile_log": "a\nc"},
                      1.061)
    run = with_why(tmp_path / "again", [d])
    html, md = report.render(run, tmp_path / "out" / "report.html")
    md_text, html_text = md.read_text(), html.read_text()
    assert f"### Why it changed\n\n- {case}: {WHY}\n" in md_text
    assert 'id="why"' in html_text and "<td>registers</td><td class=\"num\">80</td>" in html_text
    assert "<td>top stall</td><td class=\"num\">long scoreboard 50%</td>" in html_text
    assert "+c" in html_text  # the compile-log diff
    assert section(tmp_path / "out") is None  # no why.json: no section


def test_the_report_table_gives_each_profiled_case_its_top_stall(tmp_path):
    run = with_why(tmp_path, [])
    store.write_counters(run.path, {run.records[0]["case_id"]: {"kernels": HEAD}})
    html, md = report.render(load_run(run.path), tmp_path / "out" / "report.html")
    text = html.read_text()
    assert ">top stall</th>" in text and '<td data-sort="long scoreboard 65%">long scoreboard 65%</td>' in text


def test_the_report_says_why_there_are_no_counters(tmp_path):
    html, md = report.render(with_why(tmp_path, [], "no GPU: Nsight Compute profiles CUDA kernels"),
                             tmp_path / "out" / "report.html")
    assert "### Why it changed\n\nNo counters: no GPU: Nsight Compute profiles CUDA kernels." in md.read_text()


def test_the_history_keeps_each_counter_diff_with_its_run(tmp_path):
    run = with_why(tmp_path, [])
    case = case_label(run.records[0])
    run = with_why(tmp_path / "b", [counters.diff(case, {"kernels": BASE}, {"kernels": HEAD}, 1.061),
                                    counters.diff("not/in [this run]", {}, {}, 1.1)])
    db = history.connect(str(tmp_path / "h.sqlite"))
    rid = history.record_run(db, run, None)
    history.record_run(db, run, None)  # written twice: stored once
    stored = history.read_counter_diffs(db)
    assert [(s["run_id"], s["case"], s["text"]) for s in stored] == [(rid, case, WHY)]
    assert stored[0]["diff"]["head"]["registers"] == 104
    past = history.read(db)
    past["verdict"] = past["case"].map({case: "regression"}).fillna("")
    gpu = past["hardware"].iloc[0]
    page = render_trend(past, [], gpu, tmp_path / "trend.html", stored).read_text()
    assert f"regression: {escape(case)} " in page and f"why: {escape(WHY)}" in page
    assert "why:" not in render_trend(past, [], gpu, tmp_path / "bare.html").read_text()


def test_ab_counters_without_a_gpu_says_why_in_one_line_and_completes(tmp_path, monkeypatch, capsys):
    from bench import ab as ab_cli
    monkeypatch.setattr(runner, "gpu_count", lambda: 0)  # a machine without one, wherever this runs
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "bench", tree / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    sweep = tmp_path / "ab.yaml"
    sweep.write_text("name: ab\nworkload: layernorm\nbaseline: q\n"
                     "providers: [{name: q, module: \"delay_provider:quick\"}]\n"
                     "axes: {rows: [4], hidden: [16], dtype: [float32], mode: [fwd]}\n"
                     "timing: {warmup_ms: 1, min_reps: 5, max_reps: 10, max_time_s: 0.1, timeout_s: 60}\n")
    rc = ab_cli.main([str(tree), str(tree), str(sweep), "--out", str(tmp_path / "r"), "--counters",
                      "--rounds", "1", "--max-rounds", "1"])
    out, err = capsys.readouterr()
    assert rc in (0, 1), err
    lines = [line for line in err.splitlines() if "--counters" in line]
    assert lines == ["--counters: no counters: no GPU: Nsight Compute profiles CUDA kernels"]
    ab_dir = Path(out.strip().splitlines()[-1])
    assert json.loads((ab_dir / "head" / counters.WHY).read_text())["reason"].startswith("no GPU")
    assert "No counters: no GPU" in (ab_dir / "report.md").read_text()


def test_nightly_counters_without_the_baselines_commit_say_why_and_profile_nothing(tmp_path, monkeypatch,
                                                                                   capsys):
    """Where ncu could profile but the baseline names no commit to check out, the nightly writes
    that reason into the run's why.json and profiles nothing."""
    from bench import nightly
    monkeypatch.setattr(ncu, "unavailable", lambda device: None)
    monkeypatch.setattr(ncu, "explain", lambda *a, **k: pytest.fail("profiled without a base tree"))
    base, head = SimpleNamespace(meta={"git": {"sha": None}}), SimpleNamespace(path=tmp_path)
    ncu.explain_into(None, [], base, head, lambda: nightly.trees_since(base), "cuda:0", "nightly --counters")
    assert capsys.readouterr().err == "nightly --counters: no counters: the baseline records no commit\n"
    assert counters.read(tmp_path) == {"reason": "the baseline records no commit", "cases": []}


def test_the_profiled_request_runs_a_case_whose_timing_names_only_its_timeout(tmp_path):
    """The request ncu's worker gets fills the timing keys a case leaves out: a case built with
    only a timeout once failed in the profiled worker (measure() missing max_time_s), and ncu then
    reported only that it saw no kernel."""
    params = {"rows": 64, "hidden": 256, "dtype": "float32", "mode": "fwd"}
    case = Case("g1", "layernorm", "torch", "torch", params, params, {"timeout_s": 120})
    done = subprocess.run([sys.executable, "-m", "bench.measure.worker", "cpu", "--profiled"],
                          input=ncu.request(case), capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=worker_env())
    record = json.loads(done.stdout.splitlines()[-1])["record"]
    assert (record["status"], record["reason"], len(record["samples_ms"])) == ("ok", "", 1)


NO_PROFILE = ncu.unavailable("cuda:0" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(NO_PROFILE is not None, reason=f"needs a GPU and ncu: {NO_PROFILE}")
def test_gpu_profile_has_every_counter_a_diff_reads():
    """On a GPU with ncu: a torch layernorm profiled twice gives registers, bytes, occupancy limits,
    the SM clock and its top stall reason, and its diff with itself names no resource change."""
    params = {"rows": 4096, "hidden": 1024, "dtype": "float16", "mode": "fwd"}
    case = Case("g1", "layernorm", "torch", "torch", params, params, {"timeout_s": 120})
    entries = [ncu.profile_case(case, {"status": "ok"}, "cuda:0") for _ in range(2)]
    for e in entries:
        assert e.get("kernels"), e.get("reason")
        k = e["kernels"][0]
        for field in ("registers", "dram_read_bytes", "l2_bytes", "blocks_per_sm", "sm_clock_mhz",
                      "top_stall"):
            assert k[field] is not None, field
    d = counters.diff("layernorm", *entries, 1.0)
    assert not {"registers", "blocks_per_sm", "smem_bytes"} & {c["field"] for c in d["changes"]}
