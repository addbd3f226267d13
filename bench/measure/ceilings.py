"""Speed of light: how fast this GPU can move bytes and multiply matrices, measured through torch,
beside the vendor's datasheet peaks. A case is judged against the measured ceiling of its bound
(memory or compute, from its bytes and FLOPs), so "% of ceiling" says how much is left to win, and a
case faster than the ceiling is a measurement to distrust, not a win."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

# Vendor datasheets (NVIDIA H100, H200 and B200 product datasheets, SXM parts): HBM bandwidth in
# GB/s and dense (no sparsity) tensor-core rate in TFLOP/s, by a part of the GPU's name.
DATASHEET = {
    "H100 80GB HBM3": {"gbps": 3350.0, "tflops": {"float16": 989.0, "bfloat16": 989.0}},
    "H200": {"gbps": 4800.0, "tflops": {"float16": 989.0, "bfloat16": 989.0}},
    "B200": {"gbps": 8000.0, "tflops": {"float16": 2250.0, "bfloat16": 2250.0}},
}
SOURCE = "vendor datasheets (NVIDIA H100 / H200 / B200, SXM, dense)"
MAX_AGE_S = 24 * 3600  # a measurement of the same GPU younger than this is reused
CACHE = ".ceilings.json"  # under the results root: one entry per GPU
COPY_BYTES = 1 << 30
MATMUL_N = 8192


def datasheet(gpu_name: str) -> dict | None:
    return next((v for k, v in DATASHEET.items() if k in gpu_name), None)


def _median_ms(fn, reps: int) -> float:
    for _ in range(5):  # warm: clocks up, kernels chosen
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _copy_gbps(device) -> float:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / _median_ms(lambda: dst.copy_(src), 20) / 1e6


def _matmul_tflops(device, dtype: str) -> float:
    a = torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=getattr(torch, dtype))
    b = torch.randn_like(a)
    return 2 * MATMUL_N ** 3 / _median_ms(lambda: a @ b, 30) / 1e9


def measure(index: int) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and dense matmul rate per dtype."""
    device = torch.device("cuda", index)
    with torch.cuda.device(device):
        out = {"copy_gbps": _copy_gbps(device),
               "tflops": {name: _matmul_tflops(device, name) for name in ("float16", "bfloat16")},
               "measured_unix": time.time()}
        torch.cuda.empty_cache()
    return out


CPU_COPY_BYTES = 256 << 10  # stays in a core's cache: the fastest any CPU case can read its inputs


def cpu_copy_gbps(reps: int = 1000) -> float:
    """The fastest copy of a cache-resident buffer (bytes read + written) on one thread, times the
    host's cores: a rate no CPU case can beat when it reads its inputs, so a case faster than that
    is suspect. Best of `reps` on one thread, since a copy spread over threads on a loaded host
    measured 400x slower than on one."""
    src = torch.empty(CPU_COPY_BYTES, dtype=torch.uint8)
    dst = torch.empty_like(src)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            dst.copy_(src)
            best = min(best, time.perf_counter_ns() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2 * CPU_COPY_BYTES * (os.cpu_count() or 1) / max(best, 1)


def for_run(root: Path, gpus: list[dict]) -> dict:
    """The ceilings of the run's first GPU: measured now, or reused from ROOT/.ceilings.json when a
    measurement of the same GPU (model and index) is younger than MAX_AGE_S. Without a GPU, only a
    floor: the CPU's cache-resident copy rate, which marks impossible CPU times suspect."""
    if not gpus:
        return {"cpu": True, "measured": {"copy_gbps": cpu_copy_gbps(), "tflops": {}},
                "reason": "no GPU: on the CPU only a floor is measured (a cache-resident copy on "
                          "every core), against which a faster case is suspect"}
    gpu = gpus[0]
    key = f"{gpu['name']}#{gpu['index']}"
    path = Path(root) / CACHE
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    measured = cache.get(key)
    if not measured or time.time() - measured.get("measured_unix", 0) > MAX_AGE_S:
        measured = measure(gpu["index"])
        cache[key] = measured
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=2) + "\n")
    return {"gpu": gpu["name"], "measured": measured, "datasheet": datasheet(gpu["name"]),
            "datasheet_source": SOURCE}

