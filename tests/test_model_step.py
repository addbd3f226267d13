"""The model_step workload through the harness on the CPU: the graph axis, and a gate that checks
what a step computes (every gradient and updated parameter), not only its loss."""
import pytest
import torch

from bench import run
from bench.measure import sweep
from bench.results import store

SWEEP = """\
workload: model_step
baseline: torch-sdpa
providers:
  - torch-sdpa
  - {name: perturbed, module: "faulty_providers:perturbed_backward"}
axes:
  model: [tiny]
  batch: [2]
  seq_len: [13]
  mode: [fwd_bwd, train]
  dtype: [float32]
  graph: [false, true]
timing: {warmup_ms: 1, min_reps: 3, max_reps: 10, max_time_s: 0.05, target_ci: 0.5, timeout_s: 120}
"""


def test_graph_axis_expands_and_rejects_a_non_boolean(write_sweep):
    cases = sweep.load(write_sweep(SWEEP)).cases
    assert sorted({c.params["graph"] for c in cases}) == [False, True] and len(cases) == 8
    with pytest.raises(sweep.SweepError, match=r"sweep.yaml:\d+: axes.graph.0: expected one of"):
        sweep.load(write_sweep(SWEEP.replace("graph: [false, true]", "graph: [yes-please]")))


@pytest.mark.cpu
def test_perturbed_backward_is_incorrect_and_graphs_skip_on_cpu(write_sweep, tmp_path):
    assert run.main([str(write_sweep(SWEEP)), "--out", str(tmp_path)]) == 0
    records = store.load_run(tmp_path / "latest").records
    by = {(r["provider"], r["params"]["mode"], r["params"]["graph"]): r for r in records}
    for mode in ("fwd_bwd", "train"):
        assert by[("torch-sdpa", mode, False)]["status"] == "ok"
        bad = by[("perturbed", mode, False)]
        assert bad["status"] == "incorrect" and "worst in grad." in bad["reason"], bad["reason"]
        assert bad["rel_err"] > 5e-3  # the 1% error shows whole, not diluted across the gradients
        for provider in ("torch-sdpa", "perturbed"):
            rec = by[(provider, mode, True)]
            assert rec["status"] == "skipped" and "needs a CUDA GPU" in rec["reason"]


def _train_statuses(write_sweep, tmp_path):
    text = (SWEEP.replace("  - {name: perturbed, module: \"faulty_providers:perturbed_backward\"}",
                          "  - {name: rounding, module: \"faulty_providers:key_bias_rounding\"}\n"
                          "  - {name: too-far, module: \"faulty_providers:key_bias_moved_too_far\"}")
            .replace("mode: [fwd_bwd, train]", "mode: [train]").replace("graph: [false, true]", "graph: [false]"))
    assert run.main([str(write_sweep(text)), "--out", str(tmp_path)]) == 0
    return {r["provider"]: r for r in store.load_run(tmp_path / "latest").records}


def test_an_undetermined_first_adam_direction_is_judged_by_its_bound(write_sweep, tmp_path):
    """Where the exact gradient is zero, a correct step may move either way by lr: it passes; an
    element moved by 10 lr fails."""
    by = _train_statuses(write_sweep, tmp_path)
    assert by["torch-sdpa"]["status"] == "ok" and by["rounding"]["status"] == "ok", by["rounding"]["reason"]
    assert by["too-far"]["status"] == "incorrect" and "worst in param." in by["too-far"]["reason"]


def test_the_rounding_step_moves_key_biases_the_other_way(monkeypatch):
    """What the settling is for: judged element by element, the correct step with its rounding
    fails, its key biases moved by most of lr where the reference's, whose gradient there is far
    below AdamW's eps, stay put (an fp16 step against the float32 one: 2 lr apart at worst)."""
    import faulty_providers
    from bench.measure.check import errors, passes, tolerance_for
    from bench.workloads import model_step

    monkeypatch.setattr(model_step, "_settled", lambda name, q, x: q.detach())
    p = dict(model_step.DEFAULTS, mode="train", dtype="float32", seq_len=13)
    x = model_step.make_inputs(p, torch.device("cpu"))
    ref = model_step.reference(p, x)
    err = errors(dict(faulty_providers.key_bias_rounding(p, x)()), ref)
    assert not passes(err, tolerance_for("float32")) and "attn.c_attn.bias" in err["worst"], err
    assert err["max_abs"] > 0.5 * model_step.LR


@pytest.mark.parametrize("name", ["model", "model_fusions"])
def test_shipped_model_sweeps_run_the_tiny_preset_on_cpu(name):
    """bench.run takes a sweep's cpu profile without a GPU: GPT-2 steps would take minutes each."""
    from conftest import ROOT

    sw = sweep.load(ROOT / "sweeps" / f"{name}.yaml", profile="cpu")
    assert sw.cases and {c.params["model"] for c in sw.cases} == {"tiny"}
    assert {c.params["dtype"] for c in sw.cases} == {"float32"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_a_graphed_step_keeps_what_its_graph_writes_alive(monkeypatch):
    """The graph updates the optimizer's moments and the loss scale, made before the capture. Freed
    when the step was built, their memory went to what came next (the reference's gradients among
    them) and replays wrote into it: on an H200 a graphed shakespeare-char step's gradients came
    back zero, NaN or 4% off, differing from call to call."""
    import weakref

    from bench.measure.check import errors, passes, tolerance_for
    from bench.measure.worker import _clone
    from bench.workloads import model_step

    made = []

    class Tracked(model_step.ScaledAdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr(model_step, "ScaledAdamW", Tracked)
    p = dict(model_step.DEFAULTS, model="shakespeare-char", batch=8, seq_len=64, mode="train", graph=True)
    x = model_step.make_inputs(p, torch.device("cuda"))
    fn = model_step.WORKLOAD.providers["torch-sdpa"](p, _clone(x))
    assert made and made[0]() is not None, "the optimizer the graph updates was freed"
    poison = [torch.full_like(t, float("nan")) for t in x["state"].values() for _ in range(3)]
    poison += [torch.full((1,), float("nan"), device="cuda") for _ in range(256)]  # the scale's size
    ref = model_step.reference(p, _clone(x))
    err = errors(fn(), ref)
    del poison
    assert passes(err, tolerance_for("float16")), err
