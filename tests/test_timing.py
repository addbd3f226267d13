"""The timer and the statistics it stops on."""
import time

import numpy as np
import pytest
import torch

from bench.measure import timing
from bench.results import stats


def test_median_ci_covers_the_true_median_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    true_median = 1.0  # lognormal(0, s) has median exp(0)
    hits = 0
    for _ in range(400):
        lo, hi = stats.median_ci(rng.lognormal(0.0, 0.2, size=60))
        hits += lo <= true_median <= hi
    assert 0.90 <= hits / 400 <= 0.99


@pytest.mark.parametrize("n", [1, 2, 5, 6, 9, 20, 60, 61, 1000, 4097])
def test_the_order_statistics_ranks_are_scipy_stats_binomial_quantiles(n):
    """The ranks come from scipy.special (scipy.stats costs every worker 0.4 s to import): the
    same as scipy.stats' binomial ppf and isf and its t quantile."""
    from scipy import stats as sps
    for q in (0.0005, 0.005, 0.025, 0.05):
        assert stats._binom_half_ppf(q, n) == int(sps.binom.ppf(q, n, 0.5))
        assert stats._binom_half_isf(q, n) == int(sps.binom.isf(q, n, 0.5))
    d = np.linspace(-0.1, 0.3, max(n, 2))
    _, low, high = stats.paired_ratio_ci(np.ones_like(d), np.exp(d), 0.95)
    half = sps.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / d.size ** 0.5
    assert (low, high) == pytest.approx((np.exp(d.mean() - half), np.exp(d.mean() + half)), rel=1e-12)


def test_describe_and_ci_rel():
    x = [1.0, 2.0, 3.0, 4.0, 100.0]
    d = stats.describe(x)
    assert d["n"] == 5 and d["median"] == 3.0 and d["min"] == 1.0 and d["iqr"] == 2.0
    assert d["ci_low"] <= d["median"] <= d["ci_high"]
    assert stats.ci_rel([1.0]) == float("inf")
    assert stats.describe([])["n"] == 0


def test_measure_times_what_runs_and_stops_on_its_rule():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    out = timing.measure(fn, torch.device("cpu"), warmup_ms=5, min_reps=5, max_reps=40,
                         max_time_s=5.0, target_ci=0.5, l2_flush=True, cuda_graph=False)
    assert out["stop"] == "converged" and 5 <= len(out["samples_ms"]) <= 40
    assert min(out["samples_ms"]) >= 2.0 and out["host_ms"] >= 2.0
    assert len(calls) == out["warmup_reps"] + len(out["samples_ms"])

    out = timing.measure(fn, torch.device("cpu"), warmup_ms=0, min_reps=3, max_reps=7,
                         max_time_s=5.0, target_ci=0.0, l2_flush=False, cuda_graph=False)
    assert out["stop"] == "max_reps" and len(out["samples_ms"]) == 7

    out = timing.measure(fn, torch.device("cpu"), warmup_ms=0, min_reps=3, max_reps=10**6,
                         max_time_s=0.05, target_ci=0.0, l2_flush=False, cuda_graph=False)
    assert out["stop"] == "time_budget"



@pytest.mark.parametrize("path", ["cpu", "cuda"])
def test_every_batch_judges_the_rep_that_read_a_held_out_set_as_it_returned_it(monkeypatch, path):
    """One rep of each batch reads a held-out set, at a position drawn afresh per batch; what it
    returned is copied right after it, so a provider that reuses its output buffer is judged on
    that rep's result, not on the last rep's. Every rep is copied alike, so the time between calls
    does not mark the checked one; on a GPU, once the device is idle, so that work a call left on
    another stream is in the copy. The GPU path runs on the simulated GPU below."""
    draws = iter(range(7, 10**6, 5))
    buf, rep, fed, held, verdicts, idle = torch.zeros(1), [0], [], [], [], []
    sim = _SimulatedGPU(0.05, 1e-4)
    prims = sim.install(monkeypatch) if path == "cuda" else timing.PRIMITIVES
    prims = (*prims[:-1], lambda n: next(draws).to_bytes(n, "little"))

    def fn():  # slow in the 2 warm-up calls only, so that batches are min_reps long
        rep[0] += 1
        if path == "cuda":
            sim.call()
        else:
            time.sleep(0.05 if rep[0] <= 2 else 0)
        buf.fill_(rep[0])
        return buf

    def hold(out):
        held.append((fed[-1], out.clone()))
        idle.append(sim.now >= sim.free)
        return held[-1]

    out = timing.measure(fn, torch.device(path), warmup_ms=0, min_reps=6, max_reps=30,
                         max_time_s=0.4, target_ci=-1.0, l2_flush=False, cuda_graph=False,
                         feed=lambda check: fed.append((rep[0] + 1, check)), hold=hold,
                         verify=lambda h, *_: verdicts.append(h), prims=prims)
    checked = [f for f in fed if f[1]]
    profiled = path == "cuda"  # busy_ms's call, after the batches, reads a held-out set too
    # 30 reps in batches of 6
    assert out["checked"] == len(verdicts) - profiled == len(checked) - profiled == 5
    assert [r for (r, _), _ in verdicts] == [r for r, _ in checked]
    assert all(int(v.item()) == r for (r, _), v in verdicts)
    warm = out["warmup_reps"]
    assert [(r - warm - 1) % 6 for r, _ in checked[:5]] == [(7 + 5 * b) % 6 for b in range(5)]
    assert [r for (r, _), _ in held] == list(range(warm + 1, warm + 31 + profiled))
    assert path == "cpu" or all(idle)


def test_a_failed_check_stops_timing_and_a_checked_case_runs_two_batches_at_least():
    calls = []
    out = timing.measure(lambda: calls.append(1), torch.device("cpu"), warmup_ms=0, min_reps=3,
                         max_reps=10**6, max_time_s=1e-6, target_ci=0.5, l2_flush=False,
                         cuda_graph=False, feed=lambda check: None, hold=lambda out: out,
                         verify=lambda held: None)
    assert out["checked"] == 2 and out["stop"] in ("converged", "time_budget")
    out = timing.measure(lambda: calls.append(1), torch.device("cpu"), warmup_ms=0, min_reps=3,
                         max_reps=10**6, max_time_s=1.0, target_ci=0.0, l2_flush=False,
                         cuda_graph=False, feed=lambda check: None, hold=lambda out: out,
                         verify=lambda held: "wrong")
    assert out["stop"] == "failed" and out["failed"] == "wrong" and out["checked"] == 1
    assert timing.checked_batches(0.01) == 2 and timing.checked_batches(0.2) == 4
    assert timing.checked_batches(60.0) == timing.MAX_CHECKS
    # references of 0.25 s: 4 batches of a 1 s budget, so that they cost no more than it
    assert timing.checked_batches(1.0, 0.25) == 4 and timing.checked_batches(1.0, 5.0) == 2


class _SimulatedGPU:
    """A host clock, one GPU stream and a side stream, for the timer's CUDA path on any machine: a
    launch starts when both the host has queued it and the GPU has finished what came before; an
    event completes when the GPU reaches it. The call queues 4 kernels of 5 us each over `host_s` of
    host time, which becomes `timed_host_s` once timing starts (a host that slows after the warm-up).
    `side(seconds)` queues work on the side stream once the current stream's work so far is done, as
    `wait_stream` does, and joins nothing: only a device-wide synchronize waits for it."""

    def __init__(self, host_s, timed_host_s):
        self.now = self.free = self.side_free = 0.0
        self.host_s, self.timed_host_s = host_s, timed_host_s

    def side(self, seconds):
        self.now += 1e-6
        self.side_free = max(self.now, self.free, self.side_free) + seconds

    def launch(self, seconds):
        self.now += 1e-6
        self.free = max(self.now, self.free) + seconds

    def call(self):
        for _ in range(4):
            self.now += self.host_s / 4
            self.launch(5e-6)

    def install(self, monkeypatch):
        """The timer's primitives on this GPU, to pass as `measure(prims=...)`."""
        sim = self

        class Event:
            def __init__(self, **_):
                sim.host_s = sim.timed_host_s  # events are made only by the timed batches
                self.at = None

        def record(ev):
            sim.now += 1e-6
            ev.at = max(sim.now, sim.free)

        def synchronize(*_):
            sim.now = max(sim.now, sim.free, sim.side_free)

        for name, value in dict(_synchronize=synchronize, busy_ms=lambda call, _: (call(), synchronize(), None)[2]).items():
            monkeypatch.setattr(timing, name, value)  # the warm-up's sync, and what follows timing
        return (None, lambda: sim.now, Event, record, lambda a, b: (b.at - a.at) * 1e3, synchronize,
                lambda ev: sim.now >= ev.at, lambda cycles: sim.launch(cycles / timing.SPIN_HZ),
                timing.PRIMITIVES[-1])


@pytest.mark.parametrize("timed_host_us", [100, 300])
def test_a_rep_the_gpu_reached_before_the_host_had_queued_it_is_dropped(monkeypatch, timed_host_us):
    """The spin is sized to the warm-up's host time (100 us a call). Where the host then takes 300 us,
    the GPU runs out of spin inside each rep and waits for the host, so the first batch's samples
    time the host; they are dropped, the spin doubles, and what is kept is the GPU's 20 us. Where
    the host keeps its pace, no rep is dropped."""
    sim = _SimulatedGPU(100e-6, timed_host_us * 1e-6)
    out = timing.measure(sim.call, torch.device("cuda"), warmup_ms=1, min_reps=5, max_reps=60,
                         max_time_s=10.0, target_ci=0.0, l2_flush=False, cuda_graph=False,
                         prims=sim.install(monkeypatch))
    assert len(out["samples_ms"]) == 60
    assert out["samples_ms"] == pytest.approx([0.020] * 60, abs=1e-6)
    assert out["host_ms"] == pytest.approx(0.100, rel=0.05)
    sized = 1.5 * out["host_ms"] + 0.020
    if timed_host_us == 100:
        assert out["exposed_reps"] == 0 and out["spin_ms"] == pytest.approx(sized, rel=1e-3)
    else:
        assert out["exposed_reps"] == 60 and out["spin_ms"] == pytest.approx(2 * sized, rel=1e-3)


@pytest.mark.parametrize("hidden_us, checked, caught", [
    (0, True, False), (0, False, False), (600, True, True), (600, False, True), (100, True, False)])
def test_work_left_on_a_side_stream_past_half_a_millisecond_is_timed(monkeypatch, hidden_us, checked, caught):
    """A call that queues 20 us on its stream and then `hidden_us` on a side stream it never joins.
    Past HIDDEN_MS (0.5 ms) after a batch's last end event, twice, every rep ends only once the whole
    device is idle: 20 + hidden_us, whether its reps are checked (each followed by a device-wide wait)
    or run back to back. Under it, the work escapes: the floor a host's wake-up from a blocking sync
    sets (docs/isolation.md), kept here so that a change to it is seen."""
    sim = _SimulatedGPU(50e-6, 50e-6)

    def call():
        sim.call()
        if hidden_us:
            sim.side(hidden_us * 1e-6)
    check = dict(feed=lambda check: None, hold=lambda out: out, verify=lambda held, *_: None) if checked else {}
    out = timing.measure(call, torch.device("cuda"), warmup_ms=1, min_reps=5, max_reps=60,
                         max_time_s=10.0, target_ci=0.0, l2_flush=False, cuda_graph=False,
                         prims=sim.install(monkeypatch), **check)
    median = sorted(out["samples_ms"])[len(out["samples_ms"]) // 2]
    assert len(out["samples_ms"]) >= 60  # a checked case runs 2 batches at least
    assert out["device_wide"] == caught, out["hidden_ms"]
    assert median == pytest.approx(0.020 + caught * hidden_us / 1e3, abs=2e-3)
    if checked or not hidden_us:  # back to back, a batch's reps leave their side work queued
        assert out["hidden_ms"] == pytest.approx(hidden_us / 1e3, abs=2e-3)


@pytest.mark.parametrize("skips_while_profiled", [False, True])
def test_the_profiled_call_reads_a_held_out_set_and_is_judged(monkeypatch, skips_while_profiled):
    """busy_ms, the GPU's work over every stream, is read from one more call under torch's profiler;
    that call reads a held-out set and is judged like a checked rep, so a provider that does less
    while the profiler is on (and so looks to have hidden nothing) fails the case."""
    sim = _SimulatedGPU(50e-6, 50e-6)
    prims = sim.install(monkeypatch)
    profiling, fed = [False], []

    def busy_ms(call, device):
        profiling[0] = True
        call()
        profiling[0] = False
        return 0.02
    monkeypatch.setattr(timing, "busy_ms", busy_ms)

    def call():
        if profiling[0] and skips_while_profiled:
            return None
        sim.call()
        return fed[-1] if fed else None
    out = timing.measure(call, torch.device("cuda"), warmup_ms=1, min_reps=5, max_reps=20,
                         max_time_s=10.0, target_ci=0.0, l2_flush=False, cuda_graph=False,
                         feed=lambda check: fed.append(check), hold=lambda out: out,
                         verify=lambda held, call="a rep": None if held is True else f"{call}: returned {held}", prims=prims)
    assert fed[-1] is True and out["busy_ms"] == 0.02
    assert out["failed"] == ("the profiled call: returned None" if skips_while_profiled else None)


def _timed_on_gpu(monkeypatch, kernel_s, **timing_args):
    """measure() over a simulated GPU whose one kernel a call takes kernel_s(now) seconds: 25 us of
    host time a call, hidden by the spin; every rep's sample is its kernel's time."""
    sim = _SimulatedGPU(25e-6, 25e-6)
    launched = []

    def call():
        sim.now += 25e-6
        launched.append(kernel_s(sim.now))
        sim.launch(launched[-1])
    args = dict(warmup_ms=1, min_reps=5, max_reps=10**6, max_time_s=10.0, target_ci=0.01)
    return timing.measure(call, torch.device("cuda"), l2_flush=False, cuda_graph=False,
                          prims=sim.install(monkeypatch), **{**args, **timing_args}), launched


def test_a_gpu_case_is_timed_at_its_steady_time_once_its_earlier_batches_have_settled(monkeypatch):
    """20 us a call for its first 95 ms, 24 us after (a GPU that has warmed up), a step early in the
    second batch: the two batches pooled would have a median of 20 us. The first batch is dropped,
    a third is timed, and the median is the steady 24 us."""
    out, _ = _timed_on_gpu(monkeypatch, lambda now: 20e-6 if now < 0.095 else 24e-6)
    assert out["stop"] == "converged" and out["settled"] is True and out["still_moving"] is None
    assert out["unsettled_reps"] > 0 and out["drift"] == pytest.approx(0.0, abs=0.01)
    assert sorted(out["samples_ms"])[len(out["samples_ms"]) // 2] == pytest.approx(0.024, abs=1e-6)


def test_a_steady_gpu_case_keeps_every_batch(monkeypatch):
    """+-2% of scatter a call around 20 us, drawn from a seeded generator: nothing to drop."""
    noise = np.random.default_rng(0)
    out, _ = _timed_on_gpu(monkeypatch, lambda now: 20e-6 * (1 + 0.02 * noise.uniform(-1, 1)))
    assert out["stop"] == "converged" and out["settled"] is True and out["unsettled_reps"] == 0
    assert abs(out["drift"]) < timing.SETTLE_FLOOR


def test_a_gpu_case_still_moving_when_its_budget_ends_keeps_its_later_half_and_says_so(monkeypatch):
    """A call 1% slower every 10 ms, for 0.3 s: it never settles. Its earlier batches are dropped,
    so its median sits above that of every call it made, and its record says it moved."""
    out, launched = _timed_on_gpu(monkeypatch, lambda now: 20e-6 * (1 + now), max_time_s=0.3)
    assert out["stop"] == "time_budget" and out["settled"] is False and out["drift"] > timing.SETTLE_FLOOR
    assert out["unsettled_reps"] > 0 and "still moving" in out["still_moving"]
    assert np.median(out["samples_ms"]) > 1e3 * np.median(launched)


def test_on_the_cpu_nothing_is_dropped_as_settling():
    """A host's load moves CPU batches by tens of percent: the halves test is the GPU's alone."""
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.001 if len(calls) < 40 else 0.004)
    out = timing.measure(fn, torch.device("cpu"), warmup_ms=0, min_reps=5, max_reps=10**6,
                         max_time_s=0.4, target_ci=0.0, l2_flush=False, cuda_graph=False)
    assert out["settled"] is None and out["unsettled_reps"] == 0 and out["still_moving"] is None
    assert len(out["samples_ms"]) + out["warmup_reps"] == len(calls)


def test_the_first_calls_memory_is_not_read_on_a_cpu():
    out, ms, extra_mib = timing.first_call(lambda: torch.ones(1000), torch.device("cpu"))
    assert out.numel() == 1000 and ms > 0 and extra_mib is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU is visible to torch")
def test_the_first_calls_memory_is_its_working_memory():
    """A call that holds a 64 MiB temporary and returns 1 MiB: 64 MiB, counting neither its input
    nor what it returned."""
    dev = torch.device("cuda")
    x = torch.ones(1 << 18, device=dev)  # 1 MiB of input

    def call():
        tmp = torch.empty(16 << 20, device=dev)  # 64 MiB of working memory
        tmp.fill_(1.0)
        return x + tmp[:1 << 18]
    out, _, extra_mib = timing.first_call(call, dev)
    assert out.numel() == 1 << 18 and extra_mib == 64.0
