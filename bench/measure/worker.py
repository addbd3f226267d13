"""Turns one case into one record, inside a worker process that owns one device.

The parent (bench.pool) sends cases over a pipe; a case that crashes the process, hangs or runs out
of memory costs only itself: the parent records it and starts a fresh worker.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
import traceback

import torch

from bench import workloads
from bench.cli import first_line
from bench.measure import check, env, leaks, timing
from bench.measure.sweep import Case
from bench.results.store import utc_now


# One thread per CPU worker: with two, every op waits at a barrier for both, and on a shared machine
# a descheduled thread made whole runs' medians 100x slower (docs/regressions.md).
CPU_THREADS = 1


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _seed(case: Case) -> int:
    return int(hashlib.sha1(case.case_id.encode()).hexdigest()[:8], 16)


def blank_record(case: Case, device: str) -> dict:
    """A case's record before anything is known; every record has these keys."""
    return {
        "case_id": case.case_id, "workload": case.workload, "provider": case.provider,
        "baseline": case.baseline, "params": case.params, "shape": case.shape,
        "status": "ok", "reason": "", "device": device, "samples_ms": [],
        "first_call_ms": None, "max_abs_err": None, "rel_err": None, "tolerance": None,
        "flops": None, "bytes": None, "telemetry": None, "stop": None, "host_ms": None,
        "busy_ms": None, "leaked": None, "log": None, "started_utc": utc_now(),
    }


def build(case: Case, device: torch.device):
    """(inputs, fn) for a case: seeded fresh inputs and the provider's callable over them."""
    wl = workloads.get(case.workload)
    factory = (workloads.load_user_provider(case.module) if case.module
               else wl.providers[case.provider])
    torch.manual_seed(_seed(case))
    inputs = wl.make_inputs(case.params, device)
    return inputs, factory(case.params, inputs)


def run_case(case: Case, device: torch.device) -> dict:
    """Build inputs, check the provider against the reference, then time it. Never raises."""
    rec = blank_record(case, str(device))
    gpu = device.index if device.type == "cuda" else None
    try:
        wl = workloads.get(case.workload)
        rec["flops"] = wl.flops(case.params) if wl.flops else None
        rec["bytes"] = wl.bytes(case.params) if wl.bytes else None
        with timing.nvtx_range(f"case {case.case_id} {case.label}"):
            inputs, fn = build(case, device)
            with timing.nvtx_range("check"):
                t0 = time.perf_counter()
                out = fn()
                timing.sync(device)
                rec["first_call_ms"] = (time.perf_counter() - t0) * 1e3
                err = check.errors(out, wl.reference(case.params, inputs))
                del out
            tol = check.tolerance_for(str(case.params.get("dtype", "float32")), case.tolerance)
            rec.update(max_abs_err=err["max_abs"], rel_err=err["rel"], tolerance=tol)
            if not check.passes(err, tol):
                rec["status"] = "incorrect"
                rec["reason"] = (f"max abs error {err['max_abs']:.3g} (tolerance {tol['max_abs']:g}), "
                                 f"relative error {err['rel']:.3g} (tolerance {tol['rel']:g})"
                                 + (f", worst in {err['worst']}" if err.get("worst") else ""))
            before = env.telemetry(gpu) if gpu is not None else None
            result = timing.measure(fn, device, **case.timing)
            after = env.telemetry(gpu) if gpu is not None else None
            rec.update(samples_ms=result["samples_ms"], stop=result["stop"], host_ms=result["host_ms"],
                       busy_ms=result["busy_ms"],
                       telemetry={"before": before, "after": after} if before or after else None)
    except workloads.Unavailable as e:
        rec.update(status="skipped", reason=str(e))
    except Exception as e:
        rec.update(status="oom" if _is_oom(e) else "error", reason=first_line(e))
        if rec["status"] == "error" and os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rec["ended_utc"] = utc_now()
    return rec


@contextlib.contextmanager
def captured(path: str):
    """Send everything written to stdout and stderr (by Python or by native code) to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)


def serve(conn, device_name: str) -> None:
    """Worker process main loop: receive (case dict, log file), send back its record, with the case's
    stdout and stderr in the log file; stop on None or EOF,
    or after a case that left the process changed (its record says what, under `leaked`)."""
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(CPU_THREADS)
    leaks.warm(device)
    clean = leaks.snapshot(device)
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg is None:
            return
        case, log = msg
        with captured(log):
            record = run_case(Case.from_dict(case), device)
        record["leaked"] = leaks.changes(clean, device)
        try:
            conn.send(record)
        except (BrokenPipeError, OSError):
            return
        if record["leaked"]:
            return
