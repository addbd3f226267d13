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



def test_peak_memory_is_not_read_on_a_cpu():
    with timing.PeakMemory(torch.device("cpu")) as peak:
        torch.ones(1000)
    assert peak.extra_mib is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU is visible to torch")
def test_peak_memory_is_the_working_memory_of_the_call():
    """A call that holds a 64 MiB temporary and returns 1 MiB: 64 MiB, counting neither its input
    nor what it returned."""
    dev = torch.device("cuda")
    x = torch.ones(1 << 18, device=dev)  # 1 MiB of input

    def call():
        tmp = torch.empty(16 << 20, device=dev)  # 64 MiB of working memory
        tmp.fill_(1.0)
        return x + tmp[:1 << 18]
    with timing.PeakMemory(dev) as peak:
        out = call()
        torch.cuda.synchronize()
    assert out.numel() == 1 << 18 and peak.extra_mib == 64.0
