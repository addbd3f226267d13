"""Peers a user would pick instead of ours (Liger-Kernel, flash-attn 2, FlashAttention-4) are
optional providers: where they cannot run, a real run records them `skipped` with the reason. And
the model_head workload: its reference against a hand calculation, its torch provider through the
gate at awkward sizes, gradients included."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from bench import run
from bench.measure import check
from bench.results import store
from bench.workloads import model_head

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.cpu  # the skips asserted are a CPU's

TIMING = "timing: {warmup_ms: 1, min_reps: 3, max_reps: 10, max_time_s: 0.05, target_ci: 0.5, timeout_s: 120}"

LAYERNORM = f"""\
workload: layernorm
baseline: torch
providers: [torch, liger-triton, liger-cutile]
axes: {{rows: [13], hidden: [40], dtype: [float16], mode: [fwd, fwd_bwd]}}
{TIMING}
"""

FMHA = f"""\
workload: fmha
baseline: native
providers: [native, flash-attn, flash-attn-4]
axes: {{batch: [1], heads: [2], seq_len: [13], head_dim: [16], dtype: [float16, float32], causal: [true],
       mode: [fwd, fwd_bwd]}}
{TIMING}
"""

HEAD = f"""\
workload: model_head
baseline: torch
providers: [torch, liger-triton, liger-cutile]
axes: {{tokens: [13], hidden: [16], vocab: [257], dtype: [float32, bfloat16]}}
{TIMING}
"""


def records(write_sweep, tmp_path, text):
    path = write_sweep(text)
    out = tmp_path / "out"
    assert run.main([str(path), "--out", str(out)]) == 0
    return store.load_run(out / "latest").records


def missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


def liger_reason(what: str) -> str:
    if missing("liger_kernel"):
        return f"Liger-Kernel not installed (liger-kernel==0.8.5 has {what})"
    return f"Liger-Kernel's {what}"  # installed here: not importable, or no CUDA GPU


def test_liger_layernorm_providers_skip_with_the_reason(write_sweep, tmp_path):
    recs = records(write_sweep, tmp_path, LAYERNORM)
    assert {r["provider"] for r in recs} == {"torch", "liger-triton", "liger-cutile"}
    for r in recs:
        if r["provider"] == "torch":
            assert r["status"] == "ok"
            continue
        assert r["status"] == "skipped", r
        what = "Triton LayerNorm" if r["provider"] == "liger-triton" else "cuTile LayerNorm"
        assert r["reason"].startswith(liger_reason(what)), r["reason"]
        assert "\n" not in r["reason"]


def test_flash_attention_providers_skip_with_the_reason(write_sweep, tmp_path):
    recs = records(write_sweep, tmp_path, FMHA)
    peers = [r for r in recs if r["provider"] != "native"]
    assert len(peers) == 8 and all(r["status"] == "skipped" for r in peers)
    for r in peers:
        package = r["provider"]
        if r["params"]["dtype"] == "float32":
            assert r["reason"] == f"{package} takes float16 or bfloat16 only, not float32"
        elif package == "flash-attn" and missing("flash_attn"):
            assert r["reason"] == "flash-attn not installed"
        elif package == "flash-attn-4" and missing("flash_attn"):
            assert r["reason"] == "flash-attn-4 not installed"
        else:  # flash_attn is here (one of the two, or a broken one): it says which and why
            assert r["reason"].startswith(package + " "), r["reason"]
    assert all(r["status"] == "ok" for r in recs if r["provider"] == "native")


def test_liger_fused_head_providers_skip_with_the_reason(write_sweep, tmp_path):
    recs = records(write_sweep, tmp_path, HEAD)
    by = {(r["provider"], r["params"]["dtype"]): r for r in recs}
    assert all(by[("torch", dt)]["status"] == "ok" for dt in ("float32", "bfloat16"))
    assert all(r["status"] == "skipped" for r in recs if r["provider"] != "torch")
    assert by[("liger-cutile", "float32")]["reason"] == (
        "Liger-Kernel's cuTile fused linear cross-entropy takes bfloat16 only, not float32")
    assert by[("liger-cutile", "bfloat16")]["reason"].startswith(
        liger_reason("cuTile fused linear cross-entropy"))
    for dt in ("float32", "bfloat16"):
        assert by[("liger-triton", dt)]["reason"].startswith(
            liger_reason("Triton fused linear cross-entropy"))


def test_model_head_cpu_profile_passes_the_gate_at_awkward_sizes(tmp_path):
    out = tmp_path / "out"
    assert run.main([str(ROOT / "sweeps" / "model_head.yaml"), "--profile", "cpu", "--out", str(out)]) == 0
    recs = store.load_run(out / "latest").records
    mine = [r for r in recs if r["provider"] == "torch"]
    assert {(r["params"]["tokens"], r["params"]["vocab"]) for r in mine} >= {(13, 257)}
    assert all(r["status"] == "ok" and r["rel_err"] < 1e-5 for r in mine), mine
    assert all(r["flops"] == 6 * r["params"]["tokens"] * r["params"]["vocab"] * r["params"]["hidden"]
               for r in mine)
    cut = [r for r in recs if r["provider"] == "cutile"]
    assert cut and all(r["status"] == "skipped" and r["reason"].startswith("cuTile not available")
                       for r in cut)


def test_model_head_reference_is_the_hand_calculation():
    """x = [[1, 0], [0, 2]], W = [[1, 0], [0, 1], [1, 1]], targets [2, 0]: logits [1, 0, 1] and
    [0, 2, 2]; loss = mean(lse - picked); d loss / d logits = (softmax - onehot) / 2."""
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t = dict(x=x, w=w, targets=torch.tensor([2, 0]))
    ref = model_head.reference_output({}, t)
    e = math.e
    loss = (math.log(2 * e + 1) - 1 + math.log(1 + 2 * e * e)) / 2
    p0 = [e / (2 * e + 1), 1 / (2 * e + 1), e / (2 * e + 1)]
    p1 = [1 / (1 + 2 * e * e), e * e / (1 + 2 * e * e), e * e / (1 + 2 * e * e)]
    g0 = [(p0[0]) / 2, p0[1] / 2, (p0[2] - 1) / 2]
    g1 = [(p1[0] - 1) / 2, p1[1] / 2, p1[2] / 2]
    dx = [[g0[0] + g0[2], g0[1] + g0[2]], [g1[0] + g1[2], g1[1] + g1[2]]]  # g @ W
    dw = [[g0[v] * 1 + g1[v] * 0, g0[v] * 0 + g1[v] * 2] for v in range(3)]  # g^T @ x
    assert ref["loss"].item() == pytest.approx(loss, rel=1e-6)
    assert torch.allclose(ref["grad"]["x"], torch.tensor(dx), atol=1e-6)
    assert torch.allclose(ref["grad"]["weight"], torch.tensor(dw), atol=1e-6)


def test_model_head_torch_provider_matches_the_reference_with_an_ignored_target():
    """Gradients of both inputs are part of the output, and a target of -100 (torch's and Liger's
    ignore_index) counts neither in the loss nor in the mean."""
    p = dict(tokens=13, hidden=24, vocab=257, dtype="float32")
    torch.manual_seed(0)
    t = model_head.make_inputs(p, torch.device("cpu"))
    t["targets"][3] = -100
    out = model_head.WORKLOAD.providers["torch"](p, t)()
    assert set(out) == {"loss", "grad"} and set(out["grad"]) == {"x", "weight"}
    assert out["grad"]["x"].shape == (13, 24) and out["grad"]["weight"].shape == (257, 24)
    ref = model_head.reference_output(p, t)
    err = check.errors(out, ref)
    assert err["rel"] < 1e-5, err
    assert out["grad"]["x"][3].abs().max() == 0
