"""--profile ncu: parsing Nsight Compute's CSV (a fixture in the documented `--csv --page raw` form:
header row, units row, one row per kernel), a stand-in ncu on PATH for the whole profiling path, and
the reasons recorded where nothing can be profiled."""
import json
import os
from pathlib import Path

import pytest

from bench.measure import ncu, pool
from bench.measure.sweep import Case
from bench.run import main as run_main
from conftest import TESTS

FIXTURE = Path(__file__).parent / "data" / "ncu_raw.csv"  # an H100 capture, columns trimmed
CASE = Case("c1", "layernorm", "torch", "torch", {"rows": 4}, {"rows": 4}, {"timeout_s": 60})
GEMM = "nvjet_sm90_hsh_256x128_64x4_1x2_h_bz_coopA_NNT"


def test_parse_csv_reads_each_kernel_in_common_units():
    gemm, norm = ncu.parse_csv(FIXTURE.read_text())
    # the capture predates the L2, bytes, occupancy-limit and clock columns: a metric missing
    # from the table reads as None
    assert {k: v for k, v in gemm.items() if v is not None} == {
        "name": GEMM, "duration_ms": pytest.approx(0.176736), "dram_pct": 21.99, "sm_pct": 90.02,
        "tensor_pct": 94.65, "occupancy_pct": 14.61, "registers": 168.0, "spill_bytes": 0.0}
    assert set(gemm) == {"name", *ncu.FIELDS, "blocks_per_sm", "limited_by", "top_stall", "top_stall_share"}
    assert gemm["top_stall"] is None  # a capture without the warp-state section: no stall reasons
    assert norm["name"].startswith("void at::<unnamed>::vectorized_layer_norm_kernel")
    assert norm["duration_ms"] == pytest.approx(0.028384) and norm["tensor_pct"] == 0.89


def test_parse_csv_leaves_a_metric_ncu_did_not_give_empty():
    text = FIXTURE.read_text().replace("l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum", "other")
    assert all(k["spill_bytes"] is None and k["registers"] for k in ncu.parse_csv(text))


def test_parse_csv_without_a_table_is_empty():
    assert ncu.parse_csv("==PROF== Disconnected from process 1\n") == []


@pytest.fixture
def fake_ncu(tmp_path, monkeypatch):
    """An `ncu` on PATH that prints the fixture and records its arguments."""
    script = tmp_path / "bin" / "ncu"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\ncat {FIXTURE}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "calls"


def test_profile_case_aims_at_the_timed_range_and_never_touches_clocks(fake_ncu):
    got = ncu.profile_case(CASE, {"status": "ok"}, "cuda:0")
    assert [k["name"] for k in got["kernels"]][0] == GEMM
    calls = [line for line in fake_ncu.read_text().splitlines() if "--metrics" in line]
    assert len(calls) == 1 and "--clock-control none" in calls[0]
    assert "--nvtx --nvtx-include timed/" in calls[0]
    assert "--section WarpStateStats" in calls[0]  # the stall reasons


@pytest.mark.parametrize("device,record,path,reason", [
    ("cpu", {"status": "ok"}, None, "no GPU"),
    ("cuda:0", {"status": "skipped"}, None, "the case is skipped"),
    ("cuda:0", {"status": "ok"}, "", "ncu (Nsight Compute) not found on PATH"),
])
def test_why_a_case_has_no_counters(monkeypatch, device, record, path, reason):
    if path is not None:
        monkeypatch.setenv("PATH", path)
    assert reason in ncu.profile_case(CASE, record, device)["reason"]


def test_a_sweep_profile_named_ncu_is_refused(tmp_path, write_sweep, capsys):
    sweep = write_sweep("workload: layernorm\nbaseline: torch\nproviders: [torch]\n"
                        "axes: {rows: [4], hidden: [16]}\nprofiles: {ncu: {axes: {rows: [8]}}}\n")
    assert run_main([str(sweep), "--out", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reserved" in err


@pytest.mark.cpu
def test_profile_ncu_without_a_gpu_is_refused_at_once(tmp_path, write_sweep, capsys):
    sweep = write_sweep("""
workload: layernorm
baseline: steady
providers: [{name: steady, module: "delay_provider:quick"}]
axes: {rows: [4], hidden: [16, 32], dtype: [float32], mode: [fwd]}
""")
    assert run_main([str(sweep), "--out", str(tmp_path / "r"), "--profile", "ncu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a CUDA GPU" in err
    assert not (tmp_path / "r").exists()  # nothing written


def test_the_profiled_program_runs_a_backward_on_its_own_thread(tmp_path):
    """The program ncu profiles runs one fwd_bwd call with autograd's multithreading off (NVTX
    ranges are per thread, and a CUDA backward would run on autograd's thread, outside `timed`)."""
    import subprocess
    import sys

    params = {"rows": 8, "hidden": 16, "dtype": "float32", "mode": "fwd_bwd"}
    case = Case("c2", "layernorm", "probe", "probe", params, params,
                {"timeout_s": 60, "max_time_s": 0.1, "target_ci": 0.5, "warmup_ms": 0, "min_reps": 1,
                 "max_reps": 1, "l2_flush": False, "cuda_graph": False, "hide_launch": False},
                module="faulty_providers:threading_probe")
    seen = tmp_path / "seen"
    env = {**pool.worker_env(), "BENCH_TEST_SEEN": str(seen)}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env["PYTHONPATH"]])
    done = subprocess.run(ncu.command("cpu")[ncu.command("cpu").index(sys.executable):],
                          input=json.dumps({"case": case.to_dict()}) + "\n", capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1])["record"]["status"] == "ok", done.stdout
    assert seen.read_text() == "multithreaded backward: False"


@pytest.mark.parametrize("answer", [{"nonce": None, "record": {"status": "incorrect", "reason": "off"}},
                                    {"status": "incorrect", "reason": "off"}])  # an older tree's
def test_no_kernels_names_the_profiled_cases_failure(answer):
    out = "==PROF== Connected\n" + json.dumps(answer) + "\n"
    assert ncu.why_no_kernels(out) == "the profiled run of the case was incorrect: off"
