"""Why a case is as fast as it is: Nsight Compute's counters for the kernels of one timed call.

Each selected case runs once more in the worker program (bench.measure.worker), started under
`ncu --clock-control none` (the GPU's clocks are left as they are, as they were while the case was
timed). The worker's NVTX range `timed` aims ncu at the one call timed there (max_reps 1, no L2
flush, no fresh inputs: the case was judged when it was timed), after the gate and the warm-up
calls that compile. A case that cannot be profiled records why, instead of counters."""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile

from bench.measure.pool import worker_env
from bench.measure.sweep import Case

# (field, metric): the tensor pipe's hmma cycles count Hopper's HGMMA (wgmma) too; local-memory
# stores are register spills (and local arrays)
METRICS = [
    ("duration_ms", "gpu__time_duration.sum"),
    ("dram_pct", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("l2_pct", "lts__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("sm_pct", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("tensor_pct", "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"),
    ("occupancy_pct", "sm__warps_active.avg.pct_of_peak_sustained_active"),
    ("registers", "launch__registers_per_thread"),
    ("spill_bytes", "l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum"),
]
FIELDS = [f for f, _ in METRICS]
UNITS = {  # to ms and bytes; ncu writes either the short or the long unit names
    "ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3, "nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0,
    "second": 1e3, "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}
TIMEOUT_S = 600

def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_csv(text: str) -> list[dict]:
    """Per kernel {name, duration_ms, dram_pct, ...} from `ncu --csv --page raw` output: a header
    row (ID, ..., Kernel Name, ..., one column per metric), a row of units, one row per kernel.
    ncu's own `==PROF==` lines and the program's output around the table are skipped."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = list(csv.reader(lines))
    start = next((i for i, r in enumerate(rows) if "Kernel Name" in r and "ID" in r), None)
    if start is None:
        return []
    header, units = rows[start], rows[start + 1] if start + 1 < len(rows) else []
    unit = dict(zip(header, units))
    kernels = []
    for row in rows[start + 1:]:
        cells = dict(zip(header, row))
        if not cells.get("ID", "").strip().isdigit():
            continue  # the units row
        k = {"name": cells["Kernel Name"]}
        for field, metric in METRICS:  # a metric this ncu does not know is missing: None
            value = _number(cells.get(metric, ""))
            k[field] = None if value is None else value * UNITS.get(unit.get(metric, ""), 1.0)
        kernels.append(k)
    return kernels


def command(device: str) -> list[str]:
    return ["ncu", "--clock-control", "none", "--nvtx", "--nvtx-include", "timed/", "--csv",
            "--page", "raw", "--metrics", ",".join(m for _, m in METRICS),
            sys.executable, "-m", "bench.measure.worker", device, "--profiled"]


def request(case: Case) -> str:
    """The worker's request: the case with one timed call, after two warm-up calls."""
    timing = {**case.timing, "warmup_ms": 0, "min_reps": 1, "max_reps": 1, "l2_flush": False,
              "cuda_graph": False, "hide_launch": False, "hygiene": "basic"}
    return json.dumps({"case": dataclasses.replace(case, timing=timing).to_dict()}) + "\n"


def profile_case(case: Case, record: dict, device: str) -> dict:
    """{"kernels": [...]} or {"reason": why there are no counters}."""
    if not device.startswith("cuda"):
        return {"reason": "no GPU: Nsight Compute profiles CUDA kernels"}
    if record.get("status") != "ok":
        return {"reason": f"not profiled: the case is {record.get('status')}"}
    if shutil.which("ncu") is None:
        return {"reason": "ncu (Nsight Compute) not found on PATH"}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ncu-") as scratch:
            done = subprocess.run(command(device), input=request(case), capture_output=True, text=True,
                                  timeout=TIMEOUT_S, cwd=scratch, env=worker_env())
    except subprocess.TimeoutExpired:
        return {"reason": f"ncu did not finish within {TIMEOUT_S} s"}
    kernels = parse_csv(done.stdout)
    if not kernels:
        errors = [line for line in (done.stdout + done.stderr).splitlines() if "ERROR" in line]
        return {"reason": (errors[-1] if errors else "ncu saw no kernel in the NVTX range 'timed'")[:300]}
    return {"kernels": kernels}
