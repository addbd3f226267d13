"""Providers that try to fool the harness (tests/hostile_providers.py), each against the defence
docs/isolation.md names for its class. Every run here is a real bench.run, on this machine's
device."""
import contextlib
import io
import json
import os
import sys

import pytest
import torch

from bench import run
from bench.results import store

IN_CASE = ["zero_inputs", "output_in_input", "replay", "stale_buffer", "nan_after_first",
           "wrong_after_first", "fingerprint_memo", "patch_check", "loosen_tolerance",
           "raise_hidden_threshold", "agreeable_tensor", "predict_check_sets", "fix_secret_seed", "spot_the_check", "shrink_draws", "spy_loads",
           "lazy_after_first", "detach_on_output", "work_in_load", "detach_hides_inplace"]
# each leaves its worker changed; the probe after it must see a worker as it started
AFTER = ["patch_clock", "patch_gpu_clock", "patch_reference", "rewire_workload", "chdir_root", "poison_env",
         "forge_record", "forge_answer", "linger_thread", "patch_detach", "patch_serializer", "patch_record",
         "patch_builtin", "patch_bound_clock", "fix_randn", "oneshot_clock", "oneshot_measure",
         "oneshot_passes", "oneshot_record", "patch_manual_seed", "mode_agree", "dispatch_agree",
         "anomaly_rival", "patch_no_grad_exit", "python_dispatcher_agree", "zero_saved_tensors", "poison_softmax"]
SWEEP = """
workload: fmha
baseline: native
providers: [native, {providers}]
axes: {{batch: [1], heads: [2], seq_len: [13], head_dim: [16], dtype: [float32], mode: [{modes}]}}
timing: {{warmup_ms: 0, min_reps: 5, max_reps: 200, max_time_s: 0.05, timeout_s: 120}}
"""


# The module's one run starts over 40 fresh workers (each case that changes its worker costs one):
# a second on a CPU host, ten on a GPU host (import torch 4.2 s, the profiler's start 3.7-4.4 s;
# H100, 2026-12-05), where its 114 cases take about 11 minutes; a CPU keeps the suite's 300 s.
pytestmark = pytest.mark.timeout(1200 if torch.cuda.is_available() else 300)


def _providers(names):
    out = []
    for n in names:
        out.append(f'{{name: {n}, module: "hostile_providers:{n}"}}')
        if n in AFTER:
            out.append(f'{{name: probe_{n}, module: "hostile_providers:clock_probe"}}')
    return ", ".join(out)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One run of every hostile provider, each in the order the sweep names it, forward and
    forward+backward; (records by (provider, mode), what each probe saw, what the memo and the
    serializer's patch noted)."""
    tmp = tmp_path_factory.mktemp("hostile")
    sweep = tmp / "hostile.yaml"
    sweep.write_text(SWEEP.format(providers=_providers(IN_CASE + AFTER), modes="fwd, fwd_bwd"))
    env = {"BENCH_TEST_SEEN": tmp / "seen", "BENCH_TEST_RUNS": tmp / "runs"}
    os.environ.update({k: str(v) for k, v in env.items()})
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = run.main([str(sweep), "--out", str(tmp / "runs")])
        assert code == 0, f"bench.run exited {code}: {err.getvalue()[-3000:]}"
    finally:
        for k in env:
            os.environ.pop(k, None)
    records = store.load_run(tmp / "runs" / "latest").records
    lines = (tmp / "seen").read_text().splitlines()
    probes = [json.loads(x) for x in lines if x.startswith('{"builtin_clock"')]
    # what the other providers noted: the memo's hits per mode, and whether a record was rewritten
    notes = {m: json.loads((tmp / f"seen.memo-{m}").read_text()) for m in ("fwd", "fwd_bwd")}
    notes.update({(name, m): json.loads((tmp / f"seen.{name}-{m}").read_text())
                  for name in ("fix_secret_seed", "fix_randn") for m in ("fwd", "fwd_bwd")})
    notes.update({("shrink", m): json.loads(p.read_text())["blank"] if p.exists() else 0
                  for m in ("fwd", "fwd_bwd") for p in [tmp / f"seen.shrink-{m}"]})
    notes["rewritten"] = (tmp / "seen.rewritten").exists()
    notes["spied"] = (tmp / "seen.spy").exists()
    notes["copy_hook"] = (tmp / "seen.copy_hook").exists()
    return {(r["provider"], r["params"]["mode"]): r for r in records}, probes, notes


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("name,says", [
    ("zero_inputs", "changed its input q, k, v in place"),
    ("output_in_input", "changed its input v in place"),
])
def test_a_provider_that_changes_its_inputs_is_incorrect(hostile, name, says, mode):
    recs, *_ = hostile
    assert recs[name, mode]["status"] == "incorrect"
    assert says in recs[name, mode]["reason"]
    assert recs["native", mode]["status"] == "ok"


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("name", ["replay", "stale_buffer", "nan_after_first", "wrong_after_first",
                                  "predict_check_sets", "spot_the_check"])
def test_a_provider_right_only_on_some_calls_is_incorrect(hostile, name, mode):
    recs, *_ = hostile
    assert recs[name, mode]["status"] == "incorrect", recs[name, mode]
    assert recs[name, mode]["reason"].startswith("a timed rep on check set")
    assert recs["native", mode]["hygiene"]["rechecked_reps"] == 2


def test_a_memo_keyed_on_the_inputs_content_is_timed_computing(hostile):
    recs, _, memo = hostile
    # every timed rep reads inputs drawn afresh, so a memo never hits one: the provider computes
    # as the native path does and is timed doing so. It hits only in the two untimed warm-up
    # calls, which read the gate's inputs again.
    for mode in ("fwd", "fwd_bwd"):
        assert recs["fingerprint_memo", mode]["status"] == "ok"
        samples = recs["fingerprint_memo", mode]["samples_ms"]
        assert len(samples) >= 5
        assert memo[mode]["hits"] <= 2 and memo[mode]["calls"] - memo[mode]["hits"] >= len(samples)


def test_a_provider_that_makes_the_fresh_inputs_repeat_is_timed_computing_or_tampered(hostile):
    """It patches what draws the timed reps' inputs so that they repeat, stores their output, and
    computes only for the held-out sets. `secrets` and `random` patched: the harness reads the OS's
    randomness through its own binding, so the draws never repeat and the memo never hits.
    torch.randn patched (the memo hit 199 of 204 calls before the case ended): tampered."""
    recs, _, notes = hostile
    for mode in ("fwd", "fwd_bwd"):
        assert recs["fix_secret_seed", mode]["status"] == "ok"
        assert notes["fix_secret_seed", mode]["hits"] == 0
        assert notes["fix_secret_seed", mode]["calls"] > len(recs["fix_secret_seed", mode]["samples_ms"])
    _tampered(recs, "fix_randn", "torch.randn")


def test_a_provider_that_shrinks_its_parameters_changes_neither_its_inputs_nor_its_record(hostile):
    """It set seq_len to 1 in the parameters it was given, which were the case's own: every later
    draw came out one row long, broadcast into its inputs, and it computed only for inputs whose
    rows differed (the held-out sets, drawn before): ok at 12.9x the native path, its record
    saying seq_len 1. It now gets a copy; no draw is one row, so it never returns its buffer."""
    recs, _, notes = hostile
    for mode in ("fwd", "fwd_bwd"):
        assert recs["shrink_draws", mode]["status"] == "ok"
        assert recs["shrink_draws", mode]["params"]["seq_len"] == 13
        assert notes["shrink", mode] == 0


def test_a_tensor_a_provider_puts_in_its_inputs_never_sees_a_load(hostile):
    """It replaced q, in the inputs it was given, with a view of its own class: the harness loaded
    every rep's inputs through that dict, so its code ran on each load and saw the source (52
    loads in a run of 50 reps), whose reference count told a held-out set from a fresh draw. The
    harness now loads and checks through containers of its own."""
    recs, _, notes = hostile
    assert not notes["spied"]
    assert all(recs["spy_loads", mode]["status"] == "ok" for mode in ("fwd", "fwd_bwd"))


def test_a_wrapper_of_torchs_manual_seed_is_tampered_unless_torch_made_it(hostile):
    """torch's compiler wraps torch.manual_seed when it first loads, so the tamper check follows
    wrappers made by torch's own code back to what they wrap; one made by a case is held."""
    _tampered(hostile[0], "patch_manual_seed", "torch.manual_seed")


def test_a_provider_that_patches_the_clock_the_timer_bound_is_tampered(hostile):
    """Before, halving `bench.measure.timing._perf_counter_ns` (the time module's own, bound at
    import) was unseen: ok, and 2.08x the native path it is."""
    _tampered(hostile[0], "patch_bound_clock", "bench.measure.timing._perf_counter_ns")


@pytest.mark.parametrize("name,what", [("oneshot_clock", "bench.measure.timing._perf_counter_ns"),
                                       ("oneshot_measure", "bench.measure.timing.measure"),
                                       ("oneshot_passes", "bench.measure.check.passes"),
                                       ("oneshot_record", "bench.results.record.Record.to_dict")])
def test_a_name_replaced_until_its_first_call_is_never_called(hostile, name, what):
    """Each replaces a name the harness called once the provider had run with one that puts the
    original back when first called, so that nothing looked replaced when the case ended. Before,
    all four were ok: timed at 1 us, at a hundredth of their time, or right with zeros. The harness
    now calls what it bound at import: the replacement is never called, and stays to be seen."""
    _tampered(hostile[0], name, what)


def test_a_provider_right_only_while_the_first_batches_are_checked_is_incorrect(write_sweep):
    """Honest and slow for its first 13 calls, then a stored buffer: the harness used to check the
    last rep of the first two batches only, and the later reps made it ok and 180x the native path.
    Every batch is now checked, on a held-out set no rep read before."""
    import torch

    from bench.measure import sweep, worker

    text = SWEEP.format(providers=_providers(["honest_while_checked"]), modes="fwd")
    # a budget of reps, not of time, so that a loaded host cannot end timing within the 13 calls:
    # a first batch of 30 reps (calls 4-33), checked where the provider cannot know, then one more
    text = text.replace("max_reps: 200, max_time_s: 0.05", "max_reps: 30, max_time_s: 60, target_ci: 0.0001")
    case = next(c for c in sweep.load(write_sweep(text)).cases if c.provider == "honest_while_checked")
    rec = worker.run_case(case, torch.device("cpu"))
    # caught in the first batch or, at the latest, in the second
    assert rec["status"] == "incorrect" and rec["reason"].startswith("a timed rep on check set"), rec


def _tampered(recs, name: str, what: str) -> None:
    """`name`'s cases are tampered for replacing `what`, their workers were replaced, and the
    probe after each (where the sweep has one) is ok."""
    for mode in ("fwd", "fwd_bwd"):
        rec = recs[name, mode]
        assert rec["status"] == "tampered" and what in rec["reason"], rec
        assert what in rec["leaked"]["harness"]
        if name in AFTER:
            assert recs[f"probe_{name}", mode]["status"] == "ok"


def test_a_provider_that_patches_the_clock_is_tampered_and_the_next_case_is_not(hostile):
    recs, probes, _ = hostile
    _tampered(recs, "patch_clock", "time.perf_counter_ns")
    assert all(p["builtin_clock"] for p in probes)


def test_a_provider_that_patches_nvmls_clock_reading_is_tampered(hostile):
    """The reading is a CPU no-op here, but the same patch on a GPU would halve normalised times."""
    _tampered(hostile[0], "patch_gpu_clock", "pynvml.nvmlDeviceGetClockInfo")


def test_a_provider_that_patches_the_gate_is_never_ok(hostile):
    _tampered(hostile[0], "patch_check", "bench.measure.check.passes")


@pytest.mark.parametrize("name,changed", [("loosen_tolerance", "bench.measure.check.DEFAULT_TOLERANCE"),
                                          ("raise_hidden_threshold", "bench.measure.timing.HIDDEN_MS")])
def test_a_provider_that_changes_the_harnesss_data_is_tampered(hostile, name, changed):
    """A wider tolerance would pass its zeros; a higher threshold would let side-stream work escape."""
    _tampered(hostile[0], name, changed)


def test_a_tensor_subclass_is_not_judged(hostile):
    """Its zeros read as right before: its difference with the reference was zero by its own
    __torch_function__."""
    recs, *_ = hostile
    for mode in ("fwd", "fwd_bwd"):
        rec = recs["agreeable_tensor", mode]
        assert rec["status"] == "error" and "expected plain tensors, got a _Agreeable" in rec["reason"]
        assert not rec["samples_ms"]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_an_output_that_computes_when_read_is_refused_on_the_rep_that_returned_it(hostile, mode):
    """Right on its first call, then a list of its own class that computed when walked: its work
    ran in the harness's untimed copy and gate, ok at 87-190x the native path, before."""
    rec = hostile[0]["lazy_after_first", mode]
    assert rec["status"] == "error" and "tuple, list or dict of tensors, got _Lazy" in rec["reason"], rec


def test_a_method_set_on_a_providers_tensor_is_never_what_the_harness_calls(hostile):
    """Each was ok before: zeros whose own `detach` returned the true output; v written in place
    with a `detach` that showed it as it was; a `copy_` on v that did the work in the harness's
    load of each rep's inputs (7.7x the native path forward, 21.5x forward+backward, padded to
    look possible). The harness calls torch.Tensor's methods through the class."""
    recs, _, notes = hostile
    for mode in ("fwd", "fwd_bwd"):
        assert recs["detach_on_output", mode]["status"] == "incorrect", recs["detach_on_output", mode]
        rec = recs["detach_hides_inplace", mode]
        assert rec["status"] == "incorrect" and "changed its input v in place" in rec["reason"], rec
        assert recs["work_in_load", mode]["status"] == "ok"
    assert not notes["copy_hook"]


def test_a_torch_mode_left_on_is_refused_and_costs_the_next_case_nothing(hostile):
    """A function mode that made the gate's float64 differences zero, left on with zeros returned:
    ok before, and so was a wrong provider after it in its worker."""
    recs, *_ = hostile
    for mode in ("fwd", "fwd_bwd"):
        rec = recs["mode_agree", mode]
        assert rec["status"] == "error" and "left a torch mode on (_Agree)" in rec["reason"], rec
        assert rec["leaked"]["torch_function_modes"] == [0, 1]
        assert recs["probe_mode_agree", mode]["status"] == "ok"


def test_a_kernel_registered_for_an_op_the_gate_runs_is_tampered(hostile):
    """aten::sub made to return zeros in float64 (torch.library), with zeros returned: ok before."""
    _tampered(hostile[0], "dispatch_agree", "dispatch aten::sub.Tensor")


def test_anomaly_detection_left_on_costs_the_next_case_nothing(hostile):
    """Left on for the cases after it and off for its own calls, it made the native path's backward
    6.9x slower in the same worker, before."""
    recs, *_ = hostile
    for mode in ("fwd", "fwd_bwd"):
        assert recs["anomaly_rival", mode]["leaked"]["anomaly_detection"] == [False, True]
        assert recs["probe_anomaly_rival", mode]["status"] == "ok"


def test_a_grad_mode_method_replaced_is_tampered(hostile):
    """torch.no_grad's __exit__, in which the harness's load of each rep's inputs ended, made to
    compute the true output there: ok at about 200x the native path before."""
    _tampered(hostile[0], "patch_no_grad_exit", "torch.no_grad.__exit__")


@pytest.mark.parametrize("name,says,leaked", [
    ("python_dispatcher_agree", "left the dispatcher's keys changed", "dispatch_keys"),
    ("zero_saved_tensors", "left default hooks on saved tensors", "saved_tensor_hooks"),
])
def test_a_dispatcher_guard_or_saved_tensor_hooks_left_on_are_refused(hostile, name, says, leaked):
    """torch's Python dispatcher kept on with a Python kernel of aten::sub zeroing float64
    differences (ok at 0.00016 ms, zeros, before; the cases after it ran 3-6x slower); hooks that
    unpack zeros for every saved tensor (a later case's reference backward read zeros, and a
    provider with zero gradients after it was ok)."""
    recs, *_ = hostile
    for mode in ("fwd", "fwd_bwd"):
        rec = recs[name, mode]
        assert rec["status"] == "error" and says in rec["reason"], rec
        assert leaked in rec["leaked"] and recs[f"probe_{name}", mode]["status"] == "ok"


def test_a_kernel_registered_for_an_op_of_a_later_reference_costs_the_next_case_nothing(hostile):
    """aten::_softmax made to return zeros after its own gate: the next case's reference, computed
    through it, agreed with a provider that returned the same zeros, before."""
    recs, *_ = hostile
    for mode in ("fwd", "fwd_bwd"):
        then, now = recs["poison_softmax", mode]["leaked"]["aten_kernels"]
        assert [k for k in now if k not in then] == [f"aten/_softmax/{'CUDA' if torch.cuda.is_available() else 'CPU'}"]
        assert recs["probe_poison_softmax", mode]["status"] == "ok"


def test_the_dispatch_check_holds_every_op_the_harness_runs_on_a_providers_tensors():
    """leaks.JUDGED_OPS against what loading inputs, flushing L2, copying outputs and judging them
    dispatch, as torch's profiler records them."""
    from bench.measure import check, leaks, timing, worker

    x = {"q": torch.randn(2, 3, 5), "k": torch.randn(2, 3, 5, dtype=torch.float16),
         "n": [torch.ones(3, dtype=torch.bfloat16), 2]}
    out = (torch.randn(2, 3, 5, requires_grad=True), {"g": torch.randn(4, dtype=torch.float16)})
    flush = timing._l2_flush(torch.device("cpu"))
    wrong = (out[0] * 2, {"g": out[1]["g"] + float("nan")})
    with torch.autograd.profiler.profile() as prof:
        mine = worker._clone(x)
        worker._load(mine, x)
        worker._changed(mine, x)
        held = worker._copy_output(out)
        worker._judge(held, out, check.tolerance_for("float32"))
        worker._judge(out, wrong, check.tolerance_for("float16"))
        flush()
    ran = {e.name for e in prof.function_events if e.name.startswith("aten::")}
    assert "aten::sub" in ran and "aten::copy_" in ran and "aten::amax" in ran
    assert ran <= set(leaks.JUDGED_OPS), sorted(ran - set(leaks.JUDGED_OPS))


def test_a_provider_that_patches_a_tensor_method_is_tampered(hostile):
    """torch.Tensor.detach made to return zeros: the gate compares zeros with zeros. Before, the
    case and every later one in that worker read `incorrect`, their inputs looking changed."""
    _tampered(hostile[0], "patch_detach", "torch.Tensor.detach")


def test_a_provider_that_patches_the_reference_is_judged_against_the_true_one(hostile, write_sweep):
    """The references are computed before the provider is built, so its zeros are wrong against
    them (run in this process, where the case's own record is seen); the patch is seen, and the
    case after it gets a fresh worker."""
    import torch

    from bench.measure import sweep, worker
    from kernels import reference

    _tampered(hostile[0], "patch_reference", "kernels.reference.attention")
    cases = sweep.load(write_sweep(SWEEP.format(providers=_providers(["patch_reference"]), modes="fwd"))).cases
    real = reference.attention
    try:
        rec = worker.run_case(next(c for c in cases if c.provider == "patch_reference"), torch.device("cpu"))
    finally:
        reference.attention = real
    # zeros are off by the whole reference: a relative error of 1, to the last bit or so of the
    # fresh draw's norms (0.9999999999999999 on some draws)
    assert rec["status"] == "tampered" and rec["rel_err"] == pytest.approx(1.0, rel=1e-9)


def test_a_provider_that_rewrites_records_on_their_way_out_cannot(hostile):
    """json.dumps rewritten: the worker's answers no longer pass through it. The record type's
    to_dict or a builtin replaced: the case is tampered, and its record is the parent's, so
    nothing its code made is kept. Before, the first two were ok at a hundredth of their time, and
    so was every later case in their worker; the builtin went unseen (on a GPU it pairs the
    timer's start events with themselves)."""
    recs, _, notes = hostile
    assert not notes["rewritten"]
    for mode in ("fwd", "fwd_bwd"):
        assert recs["patch_serializer", mode]["status"] == "ok"
        assert recs["probe_patch_serializer", mode]["status"] == "ok"
    for name, what in [("patch_record", "bench.results.record.Record.to_dict"),
                       ("patch_builtin", "builtins.zip")]:
        _tampered(recs, name, what)
        assert not any(recs[name, mode]["samples_ms"] for mode in ("fwd", "fwd_bwd"))


def test_a_provider_that_rewires_its_workload_cannot_reach_the_next_case(hostile):
    _tampered(hostile[0], "rewire_workload", "workload fmha.reference")


def test_a_workload_cannot_be_changed_in_place():
    from dataclasses import FrozenInstanceError

    from bench import workloads
    wl = workloads.get("fmha")
    with pytest.raises(FrozenInstanceError):
        wl.reference = None
    with pytest.raises(TypeError):
        wl.providers["native"] = None


@pytest.mark.parametrize("name,what", [("chdir_root", "cwd"), ("poison_env", "environ")])
def test_a_changed_directory_or_environment_costs_the_next_case_nothing(hostile, name, what):
    recs, probes, _ = hostile
    assert what in recs[name, "fwd"]["leaked"]
    assert recs[f"probe_{name}", "fwd"]["status"] == "ok"
    assert all(p["cwd"] != "/" and p["env"] is None for p in probes)


def test_the_report_names_the_providers_that_left_their_worker_changed(hostile):
    from bench.results.summary import fresh_workers

    recs, *_ = hostile
    text = fresh_workers(list(recs.values()))
    assert "poison_env 2" in text and "chdir_root 2" in text and "BENCH_TEST_POISON" in text, text
    assert "cwd" in text and "in a fresh worker" in text, text
    assert "native" not in text, text


def test_a_record_written_into_the_workers_answer_pipe_is_tampered(hostile):
    """The forged answer names the case the parent waits on, ok and 0.00001 ms; without the nonce
    it was taken as the case's record, and the worker's own answer, read next, failed the case
    after it."""
    recs, *_ = hostile
    for mode in ("fwd", "fwd_bwd"):
        rec = recs["forge_answer", mode]
        assert rec["status"] == "tampered" and "answer pipe" in rec["reason"], rec
        assert not rec["samples_ms"]
        assert recs["probe_forge_answer", mode]["status"] == "ok"


def test_a_thread_that_outlives_its_case_costs_the_next_case_nothing(hostile):
    recs, probes, _ = hostile
    for mode in ("fwd", "fwd_bwd"):
        assert recs["linger_thread", mode]["status"] == "ok"  # its own work is honest
        then, now = recs["linger_thread", mode]["leaked"]["threads"]
        assert now == then + 1
        assert recs["probe_linger_thread", mode]["status"] == "ok"
    assert len(probes) == 2 * len(AFTER) and not any("linger" in p["threads"] for p in probes)


def test_a_record_the_harness_did_not_write_is_ignored(hostile):
    recs, *_ = hostile
    assert all(min(r["samples_ms"]) > 1e-4 for r in recs.values() if r["samples_ms"])
    assert len(recs) == 2 * (1 + len(IN_CASE) + 2 * len(AFTER))


@pytest.mark.parametrize("name,status", [("orphan", "ok"), ("orphan_daemon", "ok"),
                                         ("orphan_then_abort", "crashed")])
def test_a_process_a_provider_leaves_behind_ends_with_its_case(tmp_path, name, status, subprocess_env):
    """bench.run returns once its cases are done, although a provider's child holds the worker's
    pipes; the child is gone before the next case starts, even a daemon in a session of its own; a
    worker that dies after forking is `crashed`."""
    import subprocess
    import sys
    import time

    sweep = tmp_path / "s.yaml"
    probe = '{name: probe, module: "hostile_providers:alive_probe"}'
    sweep.write_text(SWEEP.format(providers=f"{_providers([name])}, {probe}", modes="fwd"))
    seen = tmp_path / "seen"
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "bench.run", str(sweep), "--out", str(tmp_path / "r")],
                          env={**subprocess_env, "BENCH_TEST_SEEN": str(seen)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.time() - t0 < 120  # not the child's 600 s
    pid = int(seen.read_text())
    if status == "ok":
        assert (tmp_path / "seen.alive").read_text() == "False\n"
    deadline = time.time() + 10
    while time.time() < deadline and os.path.exists(f"/proc/{pid}") and \
            "zombie" not in open(f"/proc/{pid}/status").read().lower():
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    recs = {r["provider"]: r for r in store.load_run(tmp_path / "r" / "latest").records}
    assert recs[name]["status"] == status
    assert recs["probe"]["status"] == "ok"
    if status == "ok":
        assert recs[name]["leaked"]["processes"] == [0, 1]


def test_a_changed_input_is_still_named_when_work_escapes_the_stream(write_sweep):
    """A case both incorrect and timed to a device-wide end says both: the device-wide note used to
    replace why it was incorrect (seen on a GPU that other processes were using)."""
    import torch

    from bench.measure import sweep, timing, worker

    def measure(*a, **k):
        return {**timing.measure(*a, **k), "device_wide": True, "hidden_ms": 1.0}
    cases = sweep.load(write_sweep(SWEEP.format(providers=_providers(["zero_inputs"]), modes="fwd"))).cases
    rec = worker.run_case(next(c for c in cases if c.provider == "zero_inputs"), torch.device("cpu"),
                          _measure=measure)
    assert rec["status"] == "incorrect", rec
    assert rec["reason"].startswith("the provider changed its input q, k, v in place; work ran outside "
                                    "the current stream (1 ms"), rec["reason"]


@pytest.mark.parametrize("name,changed", [
    ("rewrite_harness", "bench/measure/check.py"),
    ("rewrite_harness_same_size", "bench/measure/check.py"),
    ("rewrite_harness_cache", f"bench/measure/__pycache__/check.{sys.implementation.cache_tag}.pyc"),
])
def test_a_provider_that_rewrites_the_harness_on_disk_stops_the_run(tmp_path, subprocess_env, name, changed):
    """Every worker started after it would import the rewritten gate: a line appended; the
    tolerance rewritten at the same size with the file's mtime put back; or a compiled cache of
    other code whose header names the source as it is (the last two unseen before). The case is
    tampered, the run stops there with one line and exit status 2, and --resume finishes it once
    the tree is restored."""
    import shutil
    import subprocess

    from conftest import ROOT, TESTS

    tree = tmp_path / "tree"
    for sub in ("bench", "kernels", "model", "report_templates"):
        shutil.copytree(ROOT / sub, tree / sub, ignore=shutil.ignore_patterns("__pycache__"))
    gate = tree / "bench" / "measure" / "check.py"
    original = gate.read_bytes()
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP.format(providers=f'{{name: {name}, module: "hostile_providers:{name}"}}, '
                                            '{name: probe, module: "hostile_providers:clock_probe"}', modes="fwd"))
    env = {**subprocess_env, "PYTHONPATH": os.pathsep.join([str(tree), str(TESTS)]),
           "BENCH_TEST_SEEN": str(tmp_path / "seen")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "bench.run", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    done = run(str(sweep), "--out", str(tmp_path / "r"))
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert f"{changed} changed while the run ran" in last and "--resume" in last, last
    path = next(p for p in (tmp_path / "r").iterdir() if p.name != "latest")
    recs = {r["provider"]: r for r in store.read_records(path)}
    assert recs["native"]["status"] == "ok" and "probe" not in recs
    assert recs[name]["status"] == "tampered" and changed in recs[name]["reason"]
    gate.write_bytes(original)
    shutil.rmtree(gate.parent / "__pycache__", ignore_errors=True)
    done = run("--resume", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert {r["provider"]: r for r in store.read_records(path)}["probe"]["status"] == "ok"


def test_a_case_draws_as_many_held_out_sets_as_its_references_allow(write_sweep):
    """A 1 s budget is 8 checked batches when a reference is instant, 4 when one takes 0.25 s (the
    worker's clock says so here, whatever the host's load), and the timer is told to split the
    budget into that many batches, one held-out set each."""
    import itertools

    import torch

    from bench.measure import sweep, timing, worker

    text = SWEEP.format(providers="sdpa-math", modes="fwd").replace("max_time_s: 0.05", "max_time_s: 1.0")
    case = sweep.load(write_sweep(text)).cases[0]
    asked = []

    def spy(*args, **kw):
        asked.append(kw["batches"])
        return timing.measure(*args, **kw)
    quick = worker.run_case(case, torch.device("cpu"), _now=lambda: 0.0, _measure=spy)
    ticks = itertools.count()
    slow = worker.run_case(case, torch.device("cpu"), _now=lambda: next(ticks) * 0.25, _measure=spy)
    assert quick["status"] == slow["status"] == "ok"
    assert asked == [8, 4]
    # on a loaded host the timer may run more, shorter batches, each reading a set drawn then
    assert quick["hygiene"]["input_sets"] >= 1 + 8 and slow["hygiene"]["input_sets"] >= 1 + 4

