"""Timing one callable: warm-up by time, per-rep samples (CUDA events on a GPU, perf_counter_ns on
the CPU), an L2 flush between reps that leaves no dirty lines behind, optional CUDA-graph replay,
and a noise-based stop rule: reps continue until the median's 95% CI half-width is under
`target_ci` or the time budget ends. On a GPU a case must also have settled: where the later half of
its batches is timed apart from the earlier, the earlier half was still warming up (clocks, power,
heat) and is dropped, so the median is of the steady time, not of a run that moved under it.

With `hide_launch`, a spin kernel sized to the host's enqueue time of one call runs before each
rep's start event, so the whole rep is queued before the GPU reaches it: the events then measure GPU
time alone, not Python launch gaps (without it, a call whose host side takes longer than its kernels
measures the host, and its samples scatter by tens of percent). The host's time varies (a thread
that wakes late, a slower host), so the spin is not trusted to cover it: once a rep is queued, the
host asks whether its start event has passed. If it has, the GPU reached the rep before the host
had queued all of it; that sample is dropped and the spin doubled.

Against providers that game a timer (docs/isolation.md): the clocks, CUDA event calls and batch
loops are bound at import where no name reaches them (`PRIMITIVES`, default arguments, and this
module's own copy of the builtins), so a provider that replaces `time.perf_counter_ns`,
`torch.cuda.Event` or this module's names, even for a moment, times nothing with them; `feed` puts
new inputs in place before every rep (a provider that replays a stored result then returns a stale
one, which the gate's re-checks see); one rep of every batch, at a position drawn from the OS's
randomness, reads a held-out input set it has never seen and its output is judged, so a provider
right only at first, or only where a check used to fall, is caught; and each batch ends by waiting
for the whole device, so work a provider hides on another stream shows as time after the last
rep's end event. Where it does, the case is timed again with every rep ending only once the whole
device is idle."""
from __future__ import annotations

import builtins
import collections
import contextlib
import math
import os
import time

import torch
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from bench.results.stats import ci_rel

__builtins__ = dict(vars(builtins))  # this module's own: a case that replaces zip does not reach it

# what a sample is made of, in one tuple bound as a default argument of `measure`: a case that
# replaces one of these names, or this module's, is never timed with it, even one that puts the
# original back before the case ends. The last is the OS's randomness (the checked rep's place),
# which `random` and `secrets` read through a name a case can patch.
PRIMITIVES = (time.perf_counter_ns, time.perf_counter, torch.cuda.Event, torch.cuda.Event.record,
              torch.cuda.Event.elapsed_time, torch.cuda.synchronize, torch.cuda.Event.query,
              torch.cuda._sleep, os.urandom)
_perf_counter_ns, _perf_counter, _Event, _record, _elapsed, _synchronize, _query, _spin, _ = PRIMITIVES
# work still running on the device after a batch's last end event was hidden from the events when
# it is beyond this share of the median rep and this many ms: a host's wake-up from a blocking sync
# alone measured 0.08-0.15 ms past the idle-device calibration on an H200 host
HIDDEN_SHARE, HIDDEN_MS = 0.25, 0.5

try:
    import nvtx as _nvtx
except ImportError:  # fall back to torch's NVTX bindings
    _nvtx = None

# a batch timed while the GPU reported a SLOWING reason (bench.measure.env) is discarded and, after
# this pause, re-taken; after this many discards in one case the batches are kept and counted
THROTTLE_PAUSE_S, THROTTLE_RETRIES = 0.1, 5
_sleep = time.sleep

# reps run in batches of at least this many seconds, each ended by a device-wide wait and, when
# checked, by judging one of its reps; a checked case's budget is split into MIN_CHECKS to
# MAX_CHECKS batches (each checked rep's reference is a cost), and MIN_CHECKS run, budget or not
BATCH_S = 0.05
MAX_CHECKS, MIN_CHECKS = 8, 2

# a GPU case has settled when the median of the later half of its kept batches is within the
# largest of target_ci, SETTLE_FLOOR and twice the pooled median's CI of the earlier half's (two
# halves of one steady distribution differ by more than twice that CI about 5% of the time); until
# then the earlier half is warm-up and is dropped. A graphed GPT-2 step's batch medians rose 16.21 ->
# 16.73 -> 16.78 ms through one case (H100) while torch.compile's first two were level: the pooled
# median charged ours less than its steady time. Batches a clock step apart differ by up to about 1%.
SETTLE_FLOOR = 0.01

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


class ModeLeftOn(RuntimeError):
    """A provider returned with one of torch's function or dispatch modes still on."""


# the dispatcher's thread-local key sets as torch leaves them between calls: a guard a provider
# keeps alive (torch's Python dispatcher, whose Python kernels of any op then run) changes them
_DISPATCH_TLS = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


def no_modes_left(_functions=torch._C._len_torch_function_stack, _dispatches=torch._C._len_torch_dispatch_stack,
                  _stacks=(_get_current_function_mode_stack, _get_current_dispatch_mode_stack),
                  _tls=(torch._C._dispatch_tls_local_include_set, torch._C._dispatch_tls_local_exclude_set),
                  _clean=_DISPATCH_TLS, _saved_hooks=torch._C._autograd._top_saved_tensors_default_hooks) -> None:
    """Raise ModeLeftOn where a provider left a mode of torch's on, the dispatcher's keys changed
    or default hooks on saved tensors: what the harness runs between its calls (drawing and loading
    inputs, flushing L2, copying and judging its outputs, the next case's references) would go
    through it, which could do the provider's work there, untimed, or make a wrong output read
    right. Called before each of those; what a provider enters and leaves within its call is its
    own business."""
    if _functions() or _dispatches():
        modes = ", ".join(type(m).__name__ for stack in _stacks for m in stack())
        raise ModeLeftOn(f"the provider left a torch mode on ({modes}): the harness's own operations "
                         "between its calls would run through it")
    if (_tls[0](), _tls[1]()) != _clean:
        raise ModeLeftOn(f"the provider left the dispatcher's keys changed ({_tls[0]()}): the harness's "
                         "own operations between its calls would run through them")
    if _saved_hooks(False) is not None:
        raise ModeLeftOn("the provider left default hooks on saved tensors: the harness's backward "
                         "passes would run through them")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        _synchronize(device)


def _l2_flush(device: torch.device):
    """A callable that leaves L2 holding none of the timed call's data and no dirty lines: it writes
    a buffer larger than L2, then reads it back. After the write alone, L2 is full of the buffer's
    dirty lines, and their write-back lands in the next rep: on an H100 a copy of 25 MB measured
    13.9 us after a write-only flush (what triton.testing.do_bench does) and 10.5 us after this one."""
    buf = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    sink = torch.empty((), dtype=torch.int32, device=device)

    def flush(_no_modes_left=no_modes_left):
        _no_modes_left()
        buf.zero_()
        torch.amax(buf, dim=0, out=sink)
    return flush


def _batch_cuda(call, n: int, flush, spin_cycles: int, feed, after, device_wide: bool, probe, prims):
    """(samples, ms the device kept working after the last end event, the probe's reading, per rep
    whether the GPU reached it before the host had queued it whole). `feed(i)` runs before rep i and
    `after(i, output)` after it, both outside its time; `after` once the whole device is idle, so
    that work a call left on another stream is in what it reads. With `device_wide`, every rep's
    end event waits for that too. The probe runs once, between two reps in the middle of the batch."""
    _, _, event, _record, _elapsed, _synchronize, _query, _spin, _ = prims
    starts = [event(enable_timing=True) for _ in range(n)]
    ends = [event(enable_timing=True) for _ in range(n)]
    reading = None
    exposed = []
    for i, (s, e) in enumerate(zip(starts, ends)):
        out = None
        if i == n // 2:
            reading = probe()
        if feed is not None:
            feed(i)
        if flush is not None:
            flush()
        if spin_cycles:
            _spin(spin_cycles)
        _record(s)
        out = call()
        if device_wide:
            _synchronize()
        _record(e)
        # the spin still running now means the whole rep was queued before the GPU reached it
        exposed.append(bool(spin_cycles) and not device_wide and _query(s))
        if after is not None and i < n - 1:
            # what the call left on other streams is done before its output is read
            _synchronize()
            after(i, out)
    # the host's wake-up after a sync is the gap between two events around an idle device; beyond
    # it, the gap after the last end event is work the events did not see
    idle = [event(enable_timing=True), event(enable_timing=True)]
    for e in idle:
        _synchronize()
        _record(e)
    _synchronize()
    late = _elapsed(ends[-1], idle[0]) - _elapsed(idle[0], idle[1])
    if after is not None:  # the last rep's, once the gap is read: what it copies is not hidden work
        after(n - 1, out)
    return [_elapsed(s, e) for s, e in zip(starts, ends)], max(late, 0.0), reading, exposed


def _batch_cpu(call, n: int, flush, spin_cycles: int, feed, after, device_wide: bool, probe, prims):
    _perf_counter_ns = prims[0]
    samples, reading = [], None
    for i in range(n):
        out = None
        if i == n // 2:
            reading = probe()
        if feed is not None:
            feed(i)
        t0 = _perf_counter_ns()
        out = call()
        samples.append((_perf_counter_ns() - t0) / 1e6)
        if after is not None:
            after(i, out)
    return samples, 0.0, reading, [False] * n


def settling(samples: list, batch_reps: list, target_ci: float) -> tuple[int, float | None]:
    """(how many leading batches are still settling: none, or the earlier half; the drift, the later
    half's median over the earlier half's less one, None under two batches)."""
    k = len(batch_reps)
    if k < 2:
        return 0, None
    cut = sum(batch_reps[:k // 2])
    early, late = sorted(samples[:cut])[cut // 2], sorted(samples[cut:])[(len(samples) - cut) // 2]
    if early <= 0:
        return 0, None
    drift = late / early - 1
    return (k // 2 if abs(drift) > max(target_ci, SETTLE_FLOOR, 2 * ci_rel(samples)) else 0), drift


def checked_batches(max_time_s: float, reference_s: float = 0.0) -> int:
    """How many checked batches a time budget holds, each at least BATCH_S and at least one
    reference long, so that the references of the held-out sets (one a batch) cost no more than
    the budget: a reference of a long attention can take longer than a batch."""
    return min(MAX_CHECKS, max(MIN_CHECKS, math.ceil(max_time_s / max(BATCH_S, reference_s))))


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


def first_call(call, device: torch.device, prims=PRIMITIVES, _reset=torch.cuda.reset_peak_memory_stats,
               _held=torch.cuda.memory_allocated, _peak=torch.cuda.max_memory_allocated) -> tuple:
    """(what call returned, its time in ms to the device's end, its working memory in MiB): the
    peak of torch's caching allocator during it less what was still allocated when it ended, so
    neither its inputs nor what it returned count; None on a CPU. The gate's call, compile
    included."""
    _, perf_counter, _, _, _, synchronize, _, _, _ = prims
    gpu = device.type == "cuda"
    if gpu:
        _reset(device)
    t0 = perf_counter()
    out = call()
    if gpu:
        synchronize(device)
    ms = (perf_counter() - t0) * 1e3
    return out, ms, (_peak(device) - _held(device)) / 2 ** 20 if gpu else None


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
            hide_launch: bool = True, feed=None, hold=None, verify=None, batches: int = 0, probe=None,
            prims=PRIMITIVES, _own=(_batch_cpu, _batch_cuda, _graph_of, _l2_flush), **_) -> dict:
    """Samples of fn in milliseconds; how many warm-up calls ran; the host's median time to enqueue
    one call (`host_ms`: near or above the median sample, a case is launch-bound); why timing stopped;
    the GPU-busy time of one more call, judged on a held-out set where reps are (`busy_ms`);
    `hidden_ms`, the most work any batch left running after its last end event, and `device_wide`
    when that made every rep wait for the whole device;
    `exposed_reps`, the reps dropped because the GPU reached them before the host had queued them
    whole, and `spin_ms`, the spin they left; on a GPU, `unsettled_reps` (dropped as still
    settling), `drift` and `settled` (the last halves test: `settling`), and `still_moving`, the
    words a record gets where timing ended before the case settled.

    `feed(check)` runs before each rep, outside its time, to put inputs in place. With `verify`, every
    batch is checked: one rep, at a position the provider cannot know, reads a held-out input set
    (`check` true), `hold(output)` copies what it returned (and its inputs) right after it, before
    later reps reuse the buffers, and `verify(held)` judges the copy once the batch is done. Every
    rep is copied alike and the checked one kept, so that the time between its calls tells a
    provider nothing of which rep was checked; on a GPU the copy waits for the whole device. A
    reason from `verify` stops timing and comes back as `failed`; the one profiled call (busy_ms) reads
    a held-out set too, judged by `verify(held, "the profiled call")`. `checked` says how many batches were;
    `batches`, how many the budget is split into (checked_batches: the held-out sets drawn).

    `probe()` (bench.measure.env.clock_probe) is read once per batch; with it, `clocks` holds each
    kept batch's rep count and SM clock, the batches discarded because the GPU reported a slowing
    throttle reason (and which), those kept throttled once THROTTLE_RETRIES were spent, and the
    probe's median cost in ms. Without it `clocks` is None."""
    batch_cpu, batch_cuda, graph_of, l2_flush_of = _own
    _perf_counter, urandom = prims[1], prims[8]
    on_gpu = device.type == "cuda"
    call = fn
    if cuda_graph and on_gpu:
        call = graph_of(fn, device)
    flush = None
    if l2_flush and on_gpu:
        flush = l2_flush_of(device)
    batch = batch_cuda if on_gpu else batch_cpu

    with nvtx_range("warmup"):
        warm, host, t0 = 0, [], _perf_counter()
        while warm < 2 or (_perf_counter() - t0) * 1e3 < warmup_ms:
            t1 = _perf_counter()
            call()
            host.append(_perf_counter() - t1)
            sync(device)
            warm += 1
        per_call = max((_perf_counter() - t0) / warm, 1e-6)
    host_s = sorted(host)[len(host) // 2]
    spin = int(min(1.5 * host_s + 20e-6, MAX_SPIN_S) * SPIN_HZ) if hide_launch and on_gpu else 0
    exposed_reps = 0

    costs: list[float] = []

    def timed_probe():
        if probe is None:
            return None
        t = _perf_counter()
        reading = probe()
        costs.append(_perf_counter() - t)
        return reading

    samples: list[float] = []
    batch_reps: list[int] = []
    batch_mhz: list = []
    slowed_by: collections.Counter = collections.Counter()
    discarded = throttled_kept = 0
    start, stop, batches, hidden, suspected, device_wide = _perf_counter(), "max_reps", 0, 0.0, 0, False
    failed = None
    unsettled_reps = 0

    def drop_unsettled() -> tuple[int, float | None]:
        """Drop the leading batches still settling (`settling`); what it said. On the CPU, batches
        scatter with the host's load (microsecond calls' halves -43% to +44% apart on a busy
        host), which no warm-up settles: there nothing is dropped."""
        nonlocal samples, batch_reps, batch_mhz, unsettled_reps
        if not on_gpu:
            return 0, None
        settling_batches, drift = settling(samples, batch_reps, target_ci)
        cut = sum(batch_reps[:settling_batches])
        samples, batch_reps, batch_mhz = samples[cut:], batch_reps[settling_batches:], batch_mhz[settling_batches:]
        unsettled_reps += cut
        return settling_batches, drift

    checking = verify is not None
    least = MIN_CHECKS if checking else 0  # batches that run, budget or not
    batch_s = max(BATCH_S, max_time_s / (batches or checked_batches(max_time_s))) if checking else BATCH_S
    with nvtx_range("timed"):
        while len(samples) < max_reps or batches < least:
            n = max(int(min(max_reps - len(samples), max(min_reps, batch_s / per_call))), 1)
            at = int.from_bytes(urandom(8), "little") % n if checking else -1
            held = []
            fed = (lambda i: feed(i == at)) if feed is not None else None

            def after(i, out, at=at, held=held):
                copy = hold(out)  # after every rep alike: the time it takes marks none of them
                if i == at:
                    held.append(copy)
            got, left, reading, exposed = batch(call, n, flush, spin, fed, after if checking else None,
                                                device_wide, timed_probe, prims)
            batches += 1
            if checking:
                failed = verify(held.pop())
            if failed:
                stop = "failed"
                break
            hidden = max(hidden, left)
            if not device_wide and left > max(HIDDEN_MS, HIDDEN_SHARE * sorted(got)[len(got) // 2]):
                suspected += 1
                if suspected >= 2:  # twice: not a host that woke late once
                    device_wide, samples, start = True, [], _perf_counter()
                    batch_reps, batch_mhz, unsettled_reps = [], [], 0
                continue
            suspected = 0
            if any(exposed) and spin < MAX_SPIN_S * SPIN_HZ:  # past the longest spin, they are kept
                exposed_reps += sum(exposed)
                got = [t for t, bad in zip(got, exposed) if not bad]
                spin = int(min(2 * spin, MAX_SPIN_S * SPIN_HZ))
                if not got:
                    continue
            slowed = (reading or {}).get("slowed")
            if slowed and discarded < THROTTLE_RETRIES:
                discarded += 1
                slowed_by.update(slowed)
                _sleep(THROTTLE_PAUSE_S)
                continue
            throttled_kept += bool(slowed)
            samples += got
            batch_reps.append(len(got))
            batch_mhz.append((reading or {}).get("sm_mhz"))
            if len(samples) >= min_reps and ci_rel(samples) <= target_ci and batches >= least:
                if not drop_unsettled()[0] and (len(batch_reps) >= 2 or not on_gpu):
                    stop = "converged"
                    break
            if _perf_counter() - start >= max_time_s and batches >= least:
                stop = "time_budget"
                break
    # still moving when timing ended, the later half is the nearer to its steady time
    moving, drift = (0, None) if failed else drop_unsettled()
    settled = (drift is not None and not moving) if on_gpu else None
    busy = None
    if not failed and checking and on_gpu:
        # the profiled call reads a held-out set and is judged like a checked rep, so that a provider
        # that does less while torch's profiler is on is seen, not taken for a case that hid nothing
        feed(True)
        outs: list = []
        busy = busy_ms(lambda: outs.append(call()), device)
        failed = verify(hold(outs[0]), "the profiled call")
    elif not failed:
        busy = busy_ms(call, device)
    clocks = None if probe is None else {
        "batch_reps": batch_reps, "sm_mhz": batch_mhz, "discarded": discarded,
        "discarded_for": dict(slowed_by), "throttled_kept": throttled_kept,
        "probe_ms": sorted(costs)[len(costs) // 2] * 1e3 if costs else None}
    return {"samples_ms": samples, "clocks": clocks, "warmup_reps": warm, "host_ms": host_s * 1e3, "stop": stop,
            "busy_ms": busy, "hidden_ms": hidden,
            "device_wide": device_wide, "checked": batches if checking else 0,
            "failed": failed, "exposed_reps": exposed_reps, "spin_ms": spin / SPIN_HZ * 1e3,
            "unsettled_reps": unsettled_reps, "drift": drift, "settled": settled,
            "still_moving": None if settled or not unsettled_reps else (
                "its time was still moving when timing ended"
                + (f" (the later half of its batches {drift:+.1%} from the earlier)" if drift is not None else "")
                + ": its earlier batches were dropped")}
