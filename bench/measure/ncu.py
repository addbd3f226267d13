"""Why a case is as fast as it is: Nsight Compute's counters for the kernels of one timed call.

Each selected case runs once more in its own process under `ncu --clock-control none` (the GPU's
clocks are left as they are, as they were while the case was timed). The worker's NVTX range
`timed` aims ncu at the one call timed there (max_reps 1), after the warm-up calls that compile.
A case that cannot be profiled records why, instead of counters."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

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

# Runs the case in the profiled process: two warm-up calls (compiling), then one call in `timed`.
# NVTX ranges belong to a thread, and autograd runs a CUDA backward on a thread of its own, so the
# child runs backward on the calling thread: otherwise a fwd_bwd case's counters miss every
# backward kernel.
_CHILD = r"""
import json, sys
import torch
from bench.measure import timing
from bench.measure.sweep import Case
from bench.measure.worker import build
case, device = Case.from_dict(json.loads(sys.argv[1])), torch.device(sys.argv[2])
torch.autograd.set_multithreading_enabled(False)  # backward kernels launch inside the NVTX range
if device.type == "cuda":
    torch.cuda.set_device(device)
inputs, fn = build(case, device)
timing.measure(fn, device, **{**case.timing, "warmup_ms": 0, "min_reps": 1, "max_reps": 1,
                              "l2_flush": False, "cuda_graph": False, "hide_launch": False})
"""


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


def command(case: Case, device: str) -> list[str]:
    return ["ncu", "--clock-control", "none", "--nvtx", "--nvtx-include", "timed/", "--csv",
            "--page", "raw", "--metrics", ",".join(m for _, m in METRICS),
            sys.executable, "-c", _CHILD, json.dumps(case.to_dict()), device]


def profile_case(case: Case, record: dict, device: str) -> dict:
    """{"kernels": [...]} or {"reason": why there are no counters}."""
    if not device.startswith("cuda"):
        return {"reason": "no GPU: Nsight Compute profiles CUDA kernels"}
    if record.get("status") != "ok":
        return {"reason": f"not profiled: the case is {record.get('status')}"}
    if shutil.which("ncu") is None:
        return {"reason": "ncu (Nsight Compute) not found on PATH"}
    try:
        done = subprocess.run(command(case, device), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"reason": f"ncu did not finish within {TIMEOUT_S} s"}
    kernels = parse_csv(done.stdout)
    if not kernels:
        errors = [line for line in (done.stdout + done.stderr).splitlines() if "ERROR" in line]
        return {"reason": (errors[-1] if errors else "ncu saw no kernel in the NVTX range 'timed'")[:300]}
    return {"kernels": kernels}
