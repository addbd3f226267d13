"""--profile ncu: parsing Nsight Compute's CSV (a fixture in the documented `--csv --page raw` form:
header row, units row, one row per kernel), a stand-in ncu on PATH for the whole profiling path, and
the reasons recorded where nothing can be profiled."""
import json
import os
from pathlib import Path

import pytest

from bench.measure import ncu
from bench.measure.sweep import Case
from bench.run import main as run_main

FIXTURE = Path(__file__).parent / "data" / "ncu_raw.csv"
GMMA = "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"
CASE = Case("c1", "layernorm", "torch", "torch", {"rows": 4}, {"rows": 4}, {"timeout_s": 60})


def test_parse_csv_reads_each_kernel_in_common_units():
    flash, norm = ncu.parse_csv(FIXTURE.read_text())
    assert flash == {"name": "flash_fwd", "duration_ms": pytest.approx(1.2345), "dram_pct": 12.31,
                     "sm_pct": 71.85, "tensor_pct": 64.2, "occupancy_pct": 18.75, "registers": 168.0,
                     "spill_bytes": 0.0}
    assert norm["name"] == "layer_norm_fwd" and norm["duration_ms"] == pytest.approx(0.0081)
    assert norm["spill_bytes"] == 2500.0  # Kbyte


def test_parse_csv_without_a_table_is_empty():
    assert ncu.parse_csv("==PROF== Disconnected from process 1\n") == []


@pytest.fixture
def fake_ncu(tmp_path, monkeypatch):
    """An `ncu` on PATH that does not know the wgmma metric (as an older ncu would not) and
    otherwise prints the fixture; it records its arguments."""
    script = tmp_path / "bin" / "ncu"
    script.parent.mkdir()
    script.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path}/calls
case "$*" in *{GMMA}*) echo "==ERROR== Failed to find metric {GMMA}"; exit 1;; esac
cat {FIXTURE}
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "calls"


def test_profile_case_leaves_out_unknown_metrics_and_never_touches_clocks(fake_ncu):
    got = ncu.profile_case(CASE, {"status": "ok"}, "cuda:0")
    assert [k["name"] for k in got["kernels"]] == ["flash_fwd", "layer_norm_fwd"]
    assert got["unknown_metrics"] == [GMMA]
    calls = [line for line in fake_ncu.read_text().splitlines() if "--metrics" in line]
    assert len(calls) == 2 and all("--clock-control none" in c and "--nvtx-include timed/" in c
                                   for c in calls)


@pytest.mark.parametrize("device,record,path,reason", [
    ("cpu", {"status": "ok"}, None, "no GPU"),
    ("cuda:0", {"status": "skipped"}, None, "the case is skipped"),
    ("cuda:0", {"status": "ok"}, "", "ncu (Nsight Compute) not found on PATH"),
])
def test_why_a_case_has_no_counters(monkeypatch, device, record, path, reason):
    if path is not None:
        monkeypatch.setenv("PATH", path)
    assert reason in ncu.profile_case(CASE, record, device)["reason"]


def test_a_cpu_run_with_profile_ncu_records_why_per_case(tmp_path, write_sweep, capsys):
    sweep = write_sweep("""
workload: layernorm
baseline: steady
providers: [{name: steady, module: "delay_provider:quick"}]
axes: {rows: [4], hidden: [16, 32], dtype: [float32], mode: [fwd]}
timing: {warmup_ms: 1, min_reps: 3, max_reps: 5, max_time_s: 0.1}
""")
    argv = [str(sweep), "--out", str(tmp_path), "--profile", "ncu", "--filter", "hidden=16"]
    assert run_main(argv) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    counters = json.loads((run / "counters.json").read_text())
    assert len(counters) == 1 and "no GPU" in next(iter(counters.values()))["reason"]
