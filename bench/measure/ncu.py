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
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.cli import BadInput
from bench.measure.pool import OWN_TREE, worker_env
from bench.measure.sweep import TIMING_DEFAULTS, Case
from bench.results import counters
from bench.results.compare import Comparison, case_label
from bench.results.store import Run

# (field, metric), the one list of what a profile collects: the tensor pipe's hmma cycles count
# Hopper's HGMMA (wgmma) too; local-memory stores are register spills (and local arrays); the
# occupancy limits are the blocks per SM that registers, shared memory, warps and the block cap
# each allow (parse_csv keeps their minimum and what sets it)
METRICS = [
    ("duration_ms", "gpu__time_duration.sum"),
    ("dram_pct", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("l2_pct", "lts__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("sm_pct", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("tensor_pct", "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"),
    ("occupancy_pct", "sm__warps_active.avg.pct_of_peak_sustained_active"),
    ("registers", "launch__registers_per_thread"),
    ("spill_bytes", "l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum"),
    ("dram_read_bytes", "dram__bytes_read.sum"),
    ("dram_write_bytes", "dram__bytes_write.sum"),
    ("l2_bytes", "lts__t_bytes.sum"),
    ("theoretical_occupancy_pct", "sm__maximum_warps_per_active_cycle_pct"),
    ("smem_static_bytes", "launch__shared_mem_per_block_static"),
    ("smem_dynamic_bytes", "launch__shared_mem_per_block_dynamic"),
    ("limit_registers", "launch__occupancy_limit_registers"),
    ("limit_shared_mem", "launch__occupancy_limit_shared_mem"),
    ("limit_warps", "launch__occupancy_limit_warps"),
    ("limit_blocks", "launch__occupancy_limit_blocks"),
    ("sm_clock_mhz", "sm__cycles_elapsed.avg.per_second"),
]
FIELDS = [f for f, _ in METRICS]
# the WarpStateStats section's per-reason stall columns: cycles a warp spent stalled for that reason
# per instruction issued, which add up to the cycles between two of its instructions. Read by
# pattern, so whatever reasons this ncu names are kept; "selected" is issuing, not stalling.
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")
NOT_A_STALL = ("selected",)
LIMITS = ("limit_registers", "limit_shared_mem", "limit_warps", "limit_blocks")
UNITS = {  # to ms, bytes and MHz; ncu writes either the short or the long unit names, and scales
    "ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3, "nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0,
    "second": 1e3, "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12,
    "cycle/nsecond": 1e3, "cycle/usecond": 1.0, "cycle/msecond": 1e-3, "cycle/second": 1e-6,
    "Ghz": 1e3, "GHz": 1e3, "Mhz": 1.0, "MHz": 1.0, "Khz": 1e-3, "kHz": 1e-3, "hz": 1e-6, "Hz": 1e-6}
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
            scale = UNITS.get(unit.get(metric, "").removesuffix("/block"), 1.0)
            k[field] = None if value is None else value * scale
        kernels.append({**k, **occupancy_limit(k), **top_stall(_stalls(cells))})
    return kernels


def _stalls(cells: dict) -> dict:
    """{reason: stalled cycles per issued instruction} from one kernel's row."""
    found = {}
    for column, text in cells.items():
        match = STALL.fullmatch(column)
        value = _number(text) if match else None
        if value is not None and match.group(1) not in NOT_A_STALL:
            found[match.group(1).replace("_", " ")] = value
    return found


def top_stall(stalls: dict) -> dict:
    """What its warps waited on most (e.g. "long scoreboard": global memory), and that reason's
    share of all their stalled cycles; None where ncu gave no stall reasons."""
    total = sum(stalls.values())
    if not total:
        return {"top_stall": None, "top_stall_share": None}
    reason = max(stalls, key=stalls.get)
    return {"top_stall": reason, "top_stall_share": stalls[reason] / total}


def occupancy_limit(k: dict) -> dict:
    """The blocks per SM a launch allows (the least of its limits) and the limits that set it."""
    limits = {f: k[f] for f in LIMITS if k.get(f) is not None}
    if not limits:
        return {"blocks_per_sm": None, "limited_by": None}
    least = min(limits.values())
    return {"blocks_per_sm": least,
            "limited_by": ", ".join(f.removeprefix("limit_").replace("_", " ")
                                    for f, v in limits.items() if v == least)}


def command(device: str) -> list[str]:
    """ncu around the worker program of the tree on the PYTHONPATH, run by this interpreter."""
    return ["ncu", "--clock-control", "none", "--nvtx", "--nvtx-include", "timed/", "--csv",
            "--page", "raw", "--section", "WarpStateStats", "--metrics", ",".join(m for _, m in METRICS),
            sys.executable, "-m", "bench.measure.worker", device, "--profiled"]


def request(case: Case) -> str:
    """The worker's request: the case with one timed call, after two warm-up calls. Timing keys
    the case leaves out take their defaults, as a sweep file's do."""
    timing = {**TIMING_DEFAULTS, **case.timing, "warmup_ms": 0, "min_reps": 1, "max_reps": 1,
              "l2_flush": False, "cuda_graph": False, "hide_launch": False, "hygiene": "basic"}
    return json.dumps({"case": dataclasses.replace(case, timing=timing).to_dict()}) + "\n"


def unavailable(device: str) -> str | None:
    """Why nothing can be profiled here (no GPU, no ncu), or None."""
    if not device.startswith("cuda"):
        return "no GPU: Nsight Compute profiles CUDA kernels"
    if shutil.which("ncu") is None:
        return "ncu (Nsight Compute) not found on PATH"
    return None


def _profilable(tree: Path) -> bool:
    """Whether a tree's worker program takes --profiled (older trees' workers do not)."""
    try:
        return "--profiled" in (tree / "bench" / "measure" / "worker.py").read_text()
    except OSError:
        return False


COMPILE_LOG_CHARS = 20_000
# cuda-tile keeps each compiled kernel in its disk cache with tileiras's remarks (tileiras >= 13.4)
# and shows them with its `cutile-cache log` command
COMPILE_LOG = ["-m", "cutile_cache._cli", "log"]


def compile_log(env: dict, cwd: str) -> dict:
    """{"compile_log": text} of the kernels compiled into env's CUDA_TILE_CACHE_DIR, or
    {"compile_log_reason": why none}."""
    try:
        done = subprocess.run([sys.executable, *COMPILE_LOG], capture_output=True, text=True, timeout=60,
                              cwd=cwd, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"compile_log_reason": f"cutile-cache log did not run ({e})"[:300]}
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"compile_log_reason": f"no cuTile compile log: {last}"[:300]}
    if not done.stdout.strip():
        return {"compile_log_reason": "no cuTile kernel was compiled"}
    return {"compile_log": done.stdout[:COMPILE_LOG_CHARS]}


def profile_case(case: Case, record: dict, device: str, tree: Path = OWN_TREE,
                 with_compile_log: bool = False) -> dict:
    """{"kernels": [...]} or {"reason": why there are no counters}, from the worker program of
    `tree` run by this interpreter. With `with_compile_log`, the case's cuTile kernels compile
    afresh into a cache of their own, and their compile log (tileiras's remarks where it gives
    them) is kept."""
    if record.get("status") != "ok" and device.startswith("cuda"):
        return {"reason": f"not profiled: the case is {record.get('status')}"}
    why_not = unavailable(device)
    if why_not:
        return {"reason": why_not}
    if not _profilable(Path(tree)):
        return {"reason": f"not profiled: the worker of {tree} predates profiling"}
    with tempfile.TemporaryDirectory(prefix="bench-ncu-") as scratch:
        env = worker_env(Path(tree))
        if with_compile_log:
            env["CUDA_TILE_CACHE_DIR"] = str(Path(scratch) / "cutile-cache")
        try:
            done = subprocess.run(command(device), input=request(case), capture_output=True,
                                  text=True, timeout=TIMEOUT_S, cwd=scratch, env=env)
        except subprocess.TimeoutExpired:
            return {"reason": f"ncu did not finish within {TIMEOUT_S} s"}
        log = compile_log(env, scratch) if with_compile_log else {}
    kernels = parse_csv(done.stdout)
    if not kernels:
        return {"reason": why_no_kernels(done.stdout + "\n" + done.stderr)[:300]}
    return {"kernels": kernels, **log}


def why_no_kernels(output: str) -> str:
    """ncu's own last error (==ERROR==), else the profiled case's status and reason where it was
    not ok (its record, which the worker printed), else ncu's last warning (==WARNING==), else the
    worker's last exception line: not any line that mentions an error (torch's profiler prints
    advice naming CUPTI errors that did not happen)."""
    lines = output.splitlines()
    errors = [line for line in lines if line.startswith("==ERROR==")]
    if errors:
        return errors[-1]
    for line in lines:
        record = _record(line)
        if record and record.get("status") != "ok":
            return f"the profiled run of the case was {record.get('status')}: {record.get('reason')}"
    warnings = [line for line in lines if line.startswith("==WARNING==")]
    if warnings:
        return warnings[-1]
    raised = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    return raised[-1] if raised else "ncu saw no kernel in the NVTX range 'timed'"


def _record(line: str) -> dict | None:
    """The worker's record, where `line` is its answer (older trees answer the bare record)."""
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if isinstance(record, dict) and isinstance(record.get("record"), dict):
        record = record["record"]
    return record if isinstance(record, dict) and "status" in record else None


def explain(cmp: Comparison, cases: list[Case], base: Run, head: Run, trees: dict[str, Path],
            device: str, log=print) -> list[dict]:
    """The counter diff of each regression of `cmp`: the case profiled once on each side, with
    that side's own tree (`trees["base"]`, `trees["head"]`), its compile log kept."""
    ids = {case_label(r): r["case_id"] for r in head.records}
    by_id = {c.case_id: c for c in cases}
    records = {"base": {r["case_id"]: r for r in base.records},
               "head": {r["case_id"]: r for r in head.records}}
    out = []
    for row in cmp.rows:
        case = by_id.get(ids.get(row["case"], ""))
        if row["verdict"] != "regression" or case is None:
            continue
        log(f"ncu base and head: {case.label}")
        sides = {side: profile_case(case, records[side].get(case.case_id, {}), device, trees[side],
                                    with_compile_log=True)
                 for side in ("base", "head")}
        found = counters.diff(row["case"], sides["base"], sides["head"], row["ratio"])
        log(f"why {row['case']}: {found['text']}")
        out.append(found)
    return out


def explain_into(cmp: Comparison, cases: list[Case], base: Run, head: Run, trees, device: str,
                 who: str) -> None:
    """--counters of bench.ab and the nightly: `explain` into the head run's why.json (its report
    and the history read it), or the one reason there is none, also printed after `who`. `trees()`
    is a context manager giving both sides' trees; a BadInput it raises is that reason."""
    reason, diffs = unavailable(device), []
    if not reason:
        try:
            with trees() as sides:
                diffs = explain(cmp, cases, base, head, sides, device)
        except BadInput as e:
            reason = str(e)
    if reason:
        print(f"{who}: no counters: {reason}", file=sys.stderr)
    counters.write(head.path, diffs, reason)
