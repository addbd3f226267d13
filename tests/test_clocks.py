"""Clock-aware samples and in-run controls: a throttled batch is discarded and re-taken after a
pause, and counted; per-batch clocks normalise times; a change that the clocks or the run's control
provider explain is reported as such, not as a regression, while a change of the case alone is."""
import json
import time

import numpy as np
import pytest
import torch

from bench import compare as compare_cli
from bench.measure import ab, env, sweep, timing
from bench.results import clocks, compare
from bench.results.baseline import open_run
from test_compare import record, write_run

REF = 1980


def timed(probe, max_reps=12):
    """measure() on the CPU over a 20 ms call: batches are always of min_reps = 4 reps (a batch
    aims at 50 ms and never takes fewer than min_reps), whatever the machine's load."""
    events = []

    def fn():
        events.append("rep")
        time.sleep(0.02)

    def probed():
        events.append("probe")
        return probe()
    out = timing.measure(fn, torch.device("cpu"), warmup_ms=0, min_reps=4, max_reps=max_reps,
                         max_time_s=60, target_ci=0.0, l2_flush=False, cuda_graph=False, probe=probed)
    return out, events


def readings(*slowed_at, mhz=(1980, 1500, 1900, 1800, 1700, 1600)):
    """A fake clock probe: its n-th reading reports hw_slowdown when n is in slowed_at."""
    calls = iter(range(1, 100))

    def probe():
        n = next(calls)
        return {"sm_mhz": mhz[(n - 1) % len(mhz)], "slowed": ["hw_slowdown"] if n in slowed_at else []}
    return probe


def test_a_throttled_batch_is_discarded_and_retaken_after_a_pause(monkeypatch):
    paused = []
    monkeypatch.setattr(timing, "_sleep", lambda s: paused.append(s))
    out, events = timed(readings(2))
    c = out["clocks"]
    assert len(out["samples_ms"]) == 12 and out["stop"] == "max_reps"
    assert c["batch_reps"] == [4, 4, 4] and c["sm_mhz"] == [1980, 1900, 1800]  # the 1500 batch went
    assert c["discarded"] == 1 and c["discarded_for"] == {"hw_slowdown": 1} and c["throttled_kept"] == 0
    assert paused == [timing.THROTTLE_PAUSE_S]
    assert c["probe_ms"] is not None and c["probe_ms"] >= 0
    # one probe a batch, mid-batch: 4 batches of 4 reps were taken, one of them discarded
    assert events.count("probe") == 4 and events.count("rep") == 2 + 16  # 2 warm-up calls
    assert timing.measure(lambda: None, torch.device("cpu"), warmup_ms=0, min_reps=2,
                          max_reps=4, max_time_s=5, target_ci=0.0, l2_flush=False,
                          cuda_graph=False)["clocks"] is None  # no probe (the CPU, no NVML): no clocks


def test_the_pause_falls_between_the_throttled_batch_and_its_retake(monkeypatch):
    marks = []
    monkeypatch.setattr(timing, "_sleep", lambda s: marks.append("pause"))
    probe = readings(2)
    timed(lambda: (marks.append("probe"), probe())[1], max_reps=8)
    assert marks == ["probe", "probe", "pause", "probe"]


def test_throttled_batches_are_kept_and_counted_once_the_retries_are_spent(monkeypatch):
    monkeypatch.setattr(timing, "_sleep", lambda s: None)
    monkeypatch.setattr(timing, "THROTTLE_RETRIES", 2)
    out, _ = timed(readings(*range(1, 100)))
    c = out["clocks"]
    assert c["discarded"] == 2 and c["discarded_for"] == {"hw_slowdown": 2}
    assert c["throttled_kept"] == 3 and sum(c["batch_reps"]) == len(out["samples_ms"]) == 12


class FakeNvml:
    """pynvml as clock_probe uses it: idle and application clocks are reported, not slowing."""
    NVML_CLOCK_SM = 0

    def __init__(self, bits):
        self.bits = bits

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        return self.bits

    def nvmlDeviceGetClockInfo(self, h, which):
        return 1755

    def nvmlDeviceGetMaxClockInfo(self, h, which):
        return REF


def test_the_probe_names_only_reasons_that_slow_the_gpu(monkeypatch):
    monkeypatch.setattr(env, "_nvml", lambda: FakeNvml(0x1 | 0x2 | 0x8 | 0x4))
    assert env.clock_probe(0)() == {"sm_mhz": 1755, "slowed": ["sw_power_cap", "hw_slowdown"]}
    assert env.max_sm_clock_mhz(0) == REF
    monkeypatch.setattr(env, "_nvml", lambda: FakeNvml(0x1 | 0x2))
    assert env.clock_probe(0)()["slowed"] == []
    monkeypatch.setattr(env, "_nvml", lambda: None)
    assert env.clock_probe(0) is None and env.max_sm_clock_mhz(0) is None


class FakeNvmlPower(FakeNvml):
    """pynvml as telemetry uses it, with a power limit and an energy counter that reads `joules`."""
    NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 0

    def __init__(self, joules):
        super().__init__(0x4)
        self.joules = joules

    def nvmlDeviceGetTemperature(self, h, which):
        return 60

    def nvmlDeviceGetPowerUsage(self, h):
        return 650_000

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return self.joules * 1000


class FakeNvmlNoEnergy(FakeNvmlPower):
    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        raise RuntimeError("not supported")


def test_telemetry_reads_the_power_limit_and_energy_counter_for_a_mean_power(monkeypatch):
    monkeypatch.setattr(env, "_nvml", lambda: FakeNvmlPower(1000.0))
    before = env.telemetry(0)
    assert before["power_limit_w"] == 700 and before["energy_j"] == 1000 and before["throttle"] == ["sw_power_cap"]
    monkeypatch.setattr(env, "_nvml", lambda: FakeNvmlPower(1690.0))
    assert env.mean_power_w(before, env.telemetry(0), 1.0) == 690
    monkeypatch.setattr(env, "_nvml", lambda: FakeNvmlNoEnergy(0))
    older = env.telemetry(0)
    assert "energy_j" not in older and older["power_w"] == 650  # the rest is still read
    assert env.mean_power_w(before, older, 1.0) is None
    assert env.mean_power_w(None, before, 1.0) is None and env.mean_power_w(before, before, 0.0) is None


def test_the_report_counts_the_cases_that_ran_at_the_power_limit():
    from bench.present.report import power_seen

    def rec(mean, limit=700.0):
        return {"telemetry": {"before": {}, "after": {"power_limit_w": limit}, "mean_power_w": mean}}
    assert power_seen([rec(690.0), rec(400.5), {"telemetry": None}, {}]) == (
        "400.5 - 690; 1 of 2 cases averaged within 5% of the power limit (700 W)")
    assert power_seen([rec(600.0), rec(None)]) == "600 - 600"
    assert power_seen([{"telemetry": None}]) is None


def test_the_report_counts_the_batches_the_gpu_slowed_by_reason():
    from bench.present.report import slowed_batches

    def rec(discarded_for, kept=0):
        return {"clocks": {"batch_reps": [4], "sm_mhz": [1980], "discarded": sum(discarded_for.values()),
                           "discarded_for": discarded_for, "throttled_kept": kept}}
    assert slowed_batches([rec({"sw_power_cap": 5}), rec({"sw_power_cap": 4, "hw_slowdown": 1}, kept=2),
                           rec({}), {"clocks": None}]) == (
        "re-taken: sw_power_cap 9, hw_slowdown 1; kept throttled: 2; in 2 of 3 cases")
    assert slowed_batches([rec({}, kept=3)]) == "re-taken: none; kept throttled: 3; in 1 of 1 cases"
    assert slowed_batches([rec({})]) == "none"
    assert slowed_batches([{"clocks": None}, {}]) is None  # a CPU run: no per-batch clocks


def test_times_are_normalised_per_batch_to_the_reference_clock():
    rec = {"samples_ms": [1.0, 1.0, 2.0, 2.0],
           "clocks": {"batch_reps": [2, 2], "sm_mhz": [1980, 990], "ref_mhz": REF}}
    assert clocks.normalised(rec) == [1.0, 1.0, 1.0, 1.0]
    assert clocks.median_clock(rec) == pytest.approx(1485)
    assert clocks.normalised({**rec, "samples_ms": [1.0]}) is None  # batches do not cover the samples
    assert clocks.normalised({**rec, "clocks": {**rec["clocks"], "sm_mhz": [1980, None]}}) is None
    assert clocks.normalised({"samples_ms": [1.0]}) is None  # no clocks: a CPU, or an older record
    a = {"batch_reps": [2], "sm_mhz": [1980], "discarded": 1, "discarded_for": {"hw_slowdown": 1},
         "throttled_kept": 0, "ref_mhz": REF}
    both = clocks.pooled(a, {**a, "sm_mhz": [990], "discarded_for": {"sw_thermal": 1}})
    assert both["batch_reps"] == [2, 2] and both["sm_mhz"] == [1980, 990] and both["discarded"] == 2
    assert both["discarded_for"] == {"hw_slowdown": 1, "sw_thermal": 1} and clocks.pooled(a, None) is None
    merged = ab.merge(ab.merge(None, {"status": "ok", "samples_ms": [1.0, 1.0], "clocks": a}),
                      {"status": "ok", "samples_ms": [2.0, 2.0], "clocks": {**a, "sm_mhz": [990]}})
    assert clocks.normalised(merged) == [1.0] * 4  # A/B rounds pooled keep each batch's clock


def draw(seed, scale=1.0, mhz=None, n=200):
    """Synthetic samples (1% lognormal spread), and per-batch clocks of 4 batches when mhz is given."""
    samples = list(np.exp(np.random.default_rng(seed).normal(0, 0.01, n)) * scale)
    if mhz is None:
        return {"samples_ms": samples}
    return {"samples_ms": samples, "clocks": {"batch_reps": [n // 4] * 4, "sm_mhz": [mhz] * 4,
                                              "ref_mhz": REF}}


def pair(tmp_path, case_cur, control_cur, case_base=1.0, control_base=1.0, other=1.0, control=None,
         other_base=1.0):
    """(rows by provider, comparison, exit status) of two runs of a case ('cutile'), its control
    ('torch', the baseline provider) and a third provider ('other', moved by `other`) at one shape;
    each given as a scale or a (scale, mhz) draw."""
    def run(name, case, ctrl, oth, seed):
        recs = []
        for i, (prov, spec) in enumerate((("cutile", case), ("torch", ctrl), ("other", oth))):
            scale, mhz = spec if isinstance(spec, tuple) else (spec, None)
            rec = {**record(prov), **draw(seed + i, scale, mhz), "baseline": "torch"}
            recs.append(rec)
        path = write_run(tmp_path / name, recs)
        if control:
            meta = json.loads((path / "meta.json").read_text())
            meta["sweep"]["compare"]["control"] = control
            (path / "meta.json").write_text(json.dumps(meta))
        return path
    base, cur = run("base", case_base, control_base, other_base, 0), run("cur", case_cur, control_cur, other, 10)
    cmp = compare.compare_runs(open_run(base), open_run(cur))
    code = compare_cli.main([str(base), str(cur), "-o", str(tmp_path / "out")])
    return {r["provider"]: r for r in cmp.rows}, cmp, code


def test_a_case_and_its_control_both_slower_is_the_machine_not_a_regression(tmp_path, capsys):
    rows, cmp, code = pair(tmp_path, 1.04, 1.04, other=1.04)
    for prov in ("cutile", "torch", "other"):  # the control is held against the other providers
        assert rows[prov]["raw_verdict"] == "regression"
        assert rows[prov]["verdict"] == "unchanged" and rows[prov]["explained"] == "machine"
    assert rows["cutile"]["control"] == "torch" and rows["cutile"]["control_ratio"] == pytest.approx(1.04, abs=0.01)
    assert abs(rows["cutile"]["controlled_ratio"] - 1) < 0.01
    assert code == 0 and not cmp.failing
    out = capsys.readouterr().out
    assert "unchanged (machine: torch +4.0%" in out and "explained by clocks (0) or the machine (3)" in out
    md = compare.to_markdown(cmp, only_changes=True)
    assert "unchanged (machine: torch" in md  # report.md lists what the machine explained
    case = next(c for c in compare.to_json(cmp)["cases"] if c["provider"] == "cutile")
    assert case["explained"] == "machine" and case["raw_verdict"] == "regression"


def test_only_the_case_slower_is_flagged(tmp_path):
    rows, cmp, code = pair(tmp_path, 1.05, 1.0)
    assert rows["cutile"]["verdict"] == "regression" and rows["cutile"]["explained"] is None
    assert rows["torch"]["verdict"] == "unchanged" and code == 1
    # a control that moved a little (within run-to-run noise) explains none of a 5% slowdown
    rows, _, code = pair(tmp_path / "b", 1.05, 1.01)
    assert rows["cutile"]["verdict"] == "regression" and code == 1
    # a regression of the control alone is held against the other providers, and stays flagged
    rows, _, code = pair(tmp_path / "c", 1.0, 1.05)
    assert rows["torch"]["verdict"] == "regression" and rows["torch"]["control"] == clocks.OTHERS


def test_a_slowdown_that_the_sm_clock_explains_is_reported_as_clocks(tmp_path):
    # the second machine ran the whole shape at 1900 MHz instead of 1980 MHz: the compute-bound case
    # stretched by exactly that, the other two (memory-bound) did not
    at_ref, at_1900 = (1.0, REF), (1.0, 1900)
    same_shape = dict(control_base=at_ref, other_base=at_ref, other=at_1900, case_base=at_ref)
    rows, cmp, code = pair(tmp_path, (REF / 1900, 1900), at_1900, **same_shape)
    r = rows["cutile"]
    assert r["raw_verdict"] == "regression" and r["verdict"] == "unchanged" and r["explained"] == "clocks"
    assert r["clock_ratio"] == pytest.approx(1900 / REF) and abs(r["norm_ratio"] - 1) < 0.01
    assert r["shape_clock_ratio"] == pytest.approx(1900 / REF)
    assert code == 0 and "unchanged (clocks: SM clock -4.0%" in compare.to_text(cmp)
    # the same clocks under a real 8% slowdown: still a regression at equal clocks
    rows, _, code = pair(tmp_path / "b", (1.08 * REF / 1900, 1900), at_1900, **same_shape)
    assert rows["cutile"]["verdict"] == "regression" and code == 1


def test_a_clock_that_moved_for_the_case_alone_explains_nothing(tmp_path):
    # only the case read a lower clock (its own power draw, or one reading's scatter): between two
    # H200s, cases 5% slower read clocks 4-24% lower while the other cases at their shapes did not
    at_ref = (1.0, REF)
    rows, _, code = pair(tmp_path, (REF / 1900, 1900), at_ref, case_base=at_ref, control_base=at_ref,
                         other=at_ref, other_base=at_ref)
    r = rows["cutile"]
    assert r["clock_ratio"] == pytest.approx(1900 / REF) and r["shape_clock_ratio"] == pytest.approx(1.0)
    assert r["verdict"] == "regression" and r["explained"] is None and code == 1
    # nor does it with no other case at the shape to read the machine's clock from
    rows, _, code = pair(tmp_path / "b", (REF / 1900, 1900), 1.0, case_base=at_ref)
    assert rows["cutile"]["verdict"] == "regression" and code == 1


def test_a_control_named_in_the_sweep_is_used(tmp_path):
    rows, _, code = pair(tmp_path, 1.04, 1.0, control="other")
    assert rows["cutile"]["verdict"] == "regression"  # 'other' did not move
    assert rows["cutile"]["control"] == "other" and code == 1


def test_a_sweep_control_must_be_one_of_its_providers(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("workload: fmha\nbaseline: native\nproviders: [native, sdpa-math]\n"
                    "axes: {seq_len: [16]}\ncompare: {control: cudnn}\n")
    with pytest.raises(sweep.SweepError, match="compare.control: control 'cudnn' is not one of"):
        sweep.load(str(path))
    path.write_text(path.read_text().replace("cudnn", "sdpa-math"))
    assert sweep.load(str(path)).compare["control"] == "sdpa-math"


def test_the_environment_card_counts_the_reps_dropped_as_warm_up_and_the_cases_still_moving():
    from bench.results.summary import settling

    def rec(dropped, settled, drift=0.0):
        return {"hygiene": {"unsettled_reps": dropped, "settled": settled, "drift": drift}}
    assert settling([rec(0, True), rec(120, True), rec(40, False, 0.031), rec(10, False, None)]) == (
        "170 reps dropped as warm-up in 3 of 4 cases; still moving at the end: 2 (halves +3.1% to +3.1% apart)")
    assert settling([rec(0, True), rec(0, False, 0.002)]) == "0 reps dropped as warm-up in 0 of 2 cases"
    assert settling([rec(0, None), {"hygiene": None}, {}]) is None  # a CPU run: nothing judged

