"""Speed of light: % of the measured ceiling per case, `suspect` above it, and the once-per-GPU
measurement reused while fresh."""
import math

import pandas as pd

from bench.measure import ceilings
from bench.results.summary import summarize
from test_compare import record

CEILINGS = {"measured": {"copy_gbps": 1000.0, "tflops": {"float16": 500.0}}}


def case(provider, ms, nbytes=None, flops=None, dtype="float16"):
    rec = record(provider, samples=(ms, ms, ms), n=1, dtype=dtype)
    return {**rec, "bytes": nbytes, "flops": flops}


def test_percent_of_the_ceiling_of_the_bound():
    # 1 GB at 1000 GB/s takes 1 ms at least; 1 TFLOP at 500 TFLOP/s takes 2 ms at least
    rows = summarize([case("p", 4.0, nbytes=1e9), case("q", 4.0, nbytes=1e9, flops=1e12),
                      case("r", 4.0, flops=1e12, dtype="float32")], CEILINGS)
    assert list(rows["bound"][:2]) == ["memory", "compute"]
    assert list(rows["ceiling_pct"][:2]) == [25.0, 50.0]
    assert pd.isna(rows["bound"][2]) and math.isnan(rows["ceiling_pct"][2])  # no float32 rate known


def test_a_case_faster_than_its_ceiling_is_suspect_and_never_a_speedup():
    rows = summarize([case("p", 2.0, nbytes=1e9), case("fast", 0.5, nbytes=1e9),
                      case("fine", 1.25, nbytes=1e9)], CEILINGS)
    assert list(rows["suspect"]) == [False, True, False]
    assert math.isnan(rows["speedup"][1])
    assert rows["speedup"][2] == 1.6


def test_a_case_whose_gpu_was_busier_than_its_timed_median_is_suspect():
    """busy_ms, the GPU's work over every stream in one call, against the timed median: an honest
    case is busy for at most about its median (an H100's honest cases: 0.50-1.004 of it); one that
    hid work on a side stream is busier (1.12-31), with or without ceilings."""
    recs = [case("p", 2.0), {**case("honest", 1.0), "busy_ms": 1.004}, {**case("hid", 0.1), "busy_ms": 1.0},
            {**case("half", 1.0), "busy_ms": 1.12}, {**case("cpu", 1.0), "busy_ms": None}]
    for ceil in (CEILINGS, None):
        rows = summarize(recs, ceil)
        assert list(rows["suspect"]) == [False, False, True, True, False]
        assert list(rows["speedup"].isna()) == [False, False, True, True, False]
        assert rows["suspect_reason"][2] == ("its GPU was busy 1 ms in one call, against a timed "
                                             "median of 0.1 ms")


def test_compare_never_judges_a_case_whose_gpu_was_busier_than_its_time(tmp_path):
    from bench.results import compare, store
    from test_compare import write_run
    base = write_run(tmp_path / "base", [case("p", 1.0)])
    cur = write_run(tmp_path / "cur", [{**case("p", 0.5), "busy_ms": 1.0}])
    row = compare.compare_runs(store.load_run(base), store.load_run(cur)).rows[0]
    assert row["verdict"] == "not compared" and row["reason"].startswith("suspect: its GPU was busy 1 ms")


def test_without_ceilings_nothing_is_suspect():
    rows = summarize([case("p", 0.001, nbytes=1e9)], {"reason": "no GPU"})
    assert not rows["suspect"][0] and rows["speedup"][0] == 1.0


def test_no_gpu_has_no_ceilings_and_a_fresh_measurement_is_reused(tmp_path, monkeypatch):
    assert "no GPU" in ceilings.for_run(tmp_path, [])["reason"]
    calls = []
    monkeypatch.setattr(ceilings, "measure", lambda index: calls.append(index) or
                        {"copy_gbps": 3000.0, "tflops": {}, "measured_unix": ceilings.time.time()})
    gpu = {"index": 0, "name": "NVIDIA H100 80GB HBM3"}
    first = ceilings.for_run(tmp_path, [gpu])
    second = ceilings.for_run(tmp_path, [gpu])
    assert calls == [0] and first == second
    assert first["datasheet"]["gbps"] == 3350.0
    monkeypatch.setattr(ceilings, "MAX_AGE_S", -1)  # stale: measured again
    ceilings.for_run(tmp_path, [gpu])
    assert calls == [0, 0]
