"""Timing one callable: warm-up by time, per-rep samples (CUDA events on a GPU, perf_counter_ns on
the CPU), an L2 flush between reps that leaves no dirty lines behind, optional CUDA-graph replay,
and a noise-based stop rule: reps continue until the median's 95% CI half-width is under
`target_ci` or the time budget ends.

With `hide_launch`, a spin kernel sized to the host's enqueue time of one call runs before each
rep's start event, so the whole rep is queued before the GPU reaches it: the events then measure GPU
time alone, not Python launch gaps (without it, a call whose host side takes longer than its kernels
measures the host, and its samples scatter by tens of percent)."""
from __future__ import annotations

import contextlib
import time

import torch

from bench.results.stats import ci_rel

try:
    import nvtx as _nvtx
except ImportError:  # fall back to torch's NVTX bindings
    _nvtx = None

FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2 (H100: 50 MB)
SPIN_HZ = 2.0e9  # cycles per second assumed for the spin kernel: at or above current boost clocks
MAX_SPIN_S = 0.01


@contextlib.contextmanager
def nvtx_range(name: str):
    """An NVTX range (visible in Nsight) around a case, a provider or a phase."""
    if _nvtx is not None:
        with _nvtx.annotate(name):
            yield
    elif torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _l2_flush(device: torch.device):
    """A callable that leaves L2 holding none of the timed call's data and no dirty lines: it writes
    a buffer larger than L2, then reads it back. After the write alone, L2 is full of the buffer's
    dirty lines, and their write-back lands in the next rep: on an H100 a copy of 25 MB measured
    13.9 us after a write-only flush (what triton.testing.do_bench does) and 10.5 us after this one."""
    buf = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    sink = torch.empty((), dtype=torch.int32, device=device)

    def flush():
        buf.zero_()
        torch.amax(buf, dim=0, out=sink)
    return flush


def _batch_cuda(call, n: int, flush, spin_cycles: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        if flush is not None:
            flush()
        if spin_cycles:
            torch.cuda._sleep(spin_cycles)
        s.record()
        call()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _batch_cpu(call, n: int, flush, spin_cycles: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        call()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def _graph_of(fn, device):
    """Capture fn into a CUDA graph (after a warm call on a side stream, as capture requires)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def busy_ms(call, device: torch.device) -> float | None:
    """The GPU-busy time of one call: the union of the intervals in which its kernels and copies ran
    (torch.profiler, through CUPTI). Beside the wall time it shows how much of a step the GPU worked:
    a step whose wall time is well above it is bound by the host. None on the CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        sync(device)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, -float("inf")
    for lo, hi in spans:
        busy += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    return busy / 1e3 if spans else None


def measure(fn, device: torch.device, warmup_ms: float, min_reps: int, max_reps: int,
            max_time_s: float, target_ci: float, l2_flush: bool, cuda_graph: bool,
            hide_launch: bool = True, **_) -> dict:
    """Samples of fn in milliseconds; how many warm-up calls ran; the host's median time to enqueue
    one call (`host_ms`: near or above the median sample, a case is launch-bound); why timing stopped;
    the GPU-busy time of one more call (`busy_ms`)."""
    on_gpu = device.type == "cuda"
    call = fn
    if cuda_graph and on_gpu:
        call = _graph_of(fn, device)
    flush = None
    if l2_flush and on_gpu:
        flush = _l2_flush(device)
    batch = _batch_cuda if on_gpu else _batch_cpu

    with nvtx_range("warmup"):
        warm, host, t0 = 0, [], time.perf_counter()
        while warm < 2 or (time.perf_counter() - t0) * 1e3 < warmup_ms:
            t1 = time.perf_counter()
            call()
            host.append(time.perf_counter() - t1)
            sync(device)
            warm += 1
        per_call = max((time.perf_counter() - t0) / warm, 1e-6)
    host_s = sorted(host)[len(host) // 2]
    spin = int(min(1.5 * host_s + 20e-6, MAX_SPIN_S) * SPIN_HZ) if hide_launch and on_gpu else 0

    samples: list[float] = []
    start, stop = time.perf_counter(), "max_reps"
    with nvtx_range("timed"):
        while len(samples) < max_reps:
            # batches of about 50 ms keep the check cheap and the budget honoured
            n = int(min(max_reps - len(samples), max(min_reps, 0.05 / per_call)))
            samples += batch(call, max(n, 1), flush, spin)
            if len(samples) >= min_reps and ci_rel(samples) <= target_ci:
                stop = "converged"
                break
            if time.perf_counter() - start >= max_time_s:
                stop = "time_budget"
                break
    return {"samples_ms": samples, "warmup_reps": warm, "host_ms": host_s * 1e3, "stop": stop,
            "busy_ms": busy_ms(call, device)}
