"""The cuTile flash-attention kernel: config checks and ahead-of-time compiles on any machine,
parity with the fp32 reference (forward, log-sum-exp, gradients) on a GPU."""
import math
import os

import pytest
import torch

import kernels
from bench.measure.check import errors, passes, tolerance_for
from kernels import fmha, reference

GPU_OK, GPU_REASON = kernels.available()
gpu = pytest.mark.skipif(not GPU_OK, reason=GPU_REASON)

try:
    import cuda.tile  # noqa: F401
    CUTILE, CUTILE_REASON = True, ""
except Exception as e:
    CUTILE, CUTILE_REASON = False, f"cuda-tile is not importable ({e})"

# Compiling ahead of time takes 5-20 s a kernel on a small CPU: by default only the default config
# is compiled; FMHA_AOT_ALL=1 compiles every config of the sweep.
AOT_ALL = os.environ.get("FMHA_AOT_ALL") == "1"


def config_id(c: dict) -> str:
    return ("{tile_m}x{tile_n}-k{k_lat}v{v_lat}-o{occupancy}-c{num_ctas}-w{num_worker_warps}-g{head_group}"
            "-f{fused_dq}").format(**c)


# --- any machine -----------------------------------------------------------------------------

def test_sweep_configs_are_valid_and_distinct():
    assert 8 <= len(fmha.SWEEP_CONFIGS) <= 12
    assert fmha.DEFAULT_CONFIG in fmha.SWEEP_CONFIGS
    keys = {tuple(sorted(c.items())) for c in fmha.SWEEP_CONFIGS}
    assert len(keys) == len(fmha.SWEEP_CONFIGS)
    for c in fmha.SWEEP_CONFIGS:
        assert fmha.validate_config(c) == c


@pytest.mark.parametrize("bad", [
    {"tile_m": 96}, {"tile_n": 8}, {"tile_m": 512}, {"k_lat": 0}, {"v_lat": 11},
    {"occupancy": 0}, {"num_ctas": 3}, {"tile_m": 64.0}, {"occupancy": True}, {"block_m": 64},
    {"num_worker_warps": 2}, {"num_worker_warps": 6}, {"head_group": -1}, {"head_group": None},
    {"fused_dq": 2}, {"fused_dq": True},
])
def test_bad_config_is_a_value_error(bad):
    with pytest.raises(ValueError, match="fmha"):
        fmha.validate_config(bad)


def test_partial_config_fills_in_defaults():
    assert fmha.validate_config({"tile_n": 128}) == {**fmha.DEFAULT_CONFIG, "tile_n": 128}
    assert fmha.validate_config({"num_worker_warps": 8})["num_worker_warps"] == 8
    assert fmha.validate_config({"num_worker_warps": None})["num_worker_warps"] is None


@pytest.mark.parametrize("head_group, t, bh, grid", [
    (1, 1000, 48, (1, 16, 48)),     # each head's tiles together, longest first
    (0, 1000, 48, (48, 16, 1)),     # every head's longest tile first
    (8, 1000, 48, (8, 16, 6)),
    (8, 1000, 12, (6, 16, 2)),      # 8 does not divide 12: its largest divisor below 8
    (0, 1000, 1, (1, 16, 1)),
    (None, 1000, 96, (16, 16, 6)),  # as many heads as fill 132 SMs x 2 blocks: 264 // 16 tiles
    (None, 1000, 12, (12, 16, 1)),  # fewer heads than that: all of them
    (None, 4096, 48, (4, 64, 12)),
    (None, 20000, 48, (1, 313, 48)),  # one head's tiles fill the GPU: each head on its own
    (None, 512, 48, (16, 8, 3)),    # 33 heads would fill it: at most 16
    (None, 256, 384, (1, 4, 384)),  # under 8 tiles a head: each head on its own
])
def test_head_grid_covers_every_tile_of_every_head_once(monkeypatch, head_group, t, bh, grid):
    monkeypatch.setattr(fmha, "sm_count", lambda device: 132)
    g = fmha._head_grid(None, t, 64, bh, {"head_group": head_group, "occupancy": 2})
    assert g == grid
    # the kernels' _query_block: (tiles - 1 - bid(1), bid(2) * grid[0] + bid(0)); _key_block
    # the same with the tiles in order
    blocks = {(g[1] - 1 - y, z * g[0] + x) for x in range(g[0]) for y in range(g[1]) for z in range(g[2])}
    assert blocks == {(m, h) for m in range(g[1]) for h in range(bh)}


@pytest.mark.parametrize("d", [16, 32, 64, 128, 256])
def test_backward_kernels_get_their_own_configs(d):
    cfgs = fmha._bwd_config(d)
    assert set(cfgs) == {"delta", "dkdv", "dq", "dkdv_dq", "dq_scale"}
    for name, c in cfgs.items():
        assert c["num_ctas"] == 1 and c["block"] * c["step"] * d <= 128 * 64 * 128, name
    # dK/dV's heads go in groups that fill the GPU once (dQ's too, but at D=64: all heads at once)
    assert cfgs["dkdv"]["head_group"] is None and cfgs["dkdv"]["num_worker_warps"] is None
    assert cfgs["dq"]["head_group"] == (0 if d == 64 else None)
    assert cfgs["dq"]["num_worker_warps"] == (8 if d == 128 else None)
    # the fused dK/dV kernel adds a dQ share of 64 query rows at a time; at D=64 from 128-key
    # blocks of 8 warps, elsewhere from dK/dV's own blocks
    wide = {"block": 128, "occupancy": 1, "num_worker_warps": 8} if d == 64 else {}
    assert cfgs["dkdv_dq"] == {**cfgs["dkdv"], "step": 64, **wide}
    assert cfgs["delta"] == cfgs["dkdv"]


@pytest.mark.parametrize("shapes, dtype, scale", [
    ([(1, 2, 8, 64), (1, 2, 9, 64), (1, 2, 8, 64)], torch.float16, None),
    ([(2, 8, 64)] * 3, torch.float16, None),
    ([(1, 2, 8, 64)] * 3, torch.float32, None),
    ([(1, 2, 8, 48)] * 3, torch.float16, None),
    ([(1, 2, 8, 64)] * 3, torch.float16, -1.0),
])
def test_bad_inputs_are_value_errors(shapes, dtype, scale):
    q, k, v = (torch.zeros(s, dtype=dtype) for s in shapes)
    with pytest.raises(ValueError):
        fmha.fmha_forward(q, k, v, scale=scale)


@pytest.mark.skipif(GPU_OK, reason="cuTile can run here")
def test_public_functions_say_why_they_cannot_run():
    q = torch.randn(1, 2, 8, 64).half()
    for fn in (fmha.flash_attention, fmha.fmha_forward):
        with pytest.raises(RuntimeError, match="^cuTile not available: "):
            fn(q, q, q)


@pytest.mark.skipif(not CUTILE, reason=CUTILE_REASON)
@pytest.mark.parametrize("config", fmha.SWEEP_CONFIGS, ids=config_id)
def test_every_kernel_compiles_ahead_of_time_for_sm90(config, tmp_path):
    if not AOT_ALL and config != fmha.DEFAULT_CONFIG:
        pytest.skip("set FMHA_AOT_ALL=1 to compile every sweep config")
    causal = config is fmha.DEFAULT_CONFIG  # the other configs build the non-causal paths
    paths = fmha.export_for_check(config, torch.float16, 64, causal, str(tmp_path))
    assert len(paths) == 3  # forward, dK/dV, dQ (which writes delta)
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(4) == b"\x7fELF"


@pytest.mark.skipif(not CUTILE, reason=CUTILE_REASON)
def test_head_dim_128_kernels_with_worker_warps_compile_for_sm90(tmp_path):
    """The two-warpgroup forward the tuned file picks at D=128, and the D=128 dQ kernel."""
    config = fmha.validate_config({"tile_m": 128, "tile_n": 128, "occupancy": 1, "num_worker_warps": 8})
    paths = fmha.export_for_check(config, torch.bfloat16, 128, True, str(tmp_path), only=("fwd", "dq"))
    assert len(paths) == 2
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(4) == b"\x7fELF"


@pytest.mark.skipif(not CUTILE, reason=CUTILE_REASON)
@pytest.mark.parametrize("d", [64, 128])
def test_fused_dq_backward_compiles_for_sm90(d, tmp_path):
    """The dK/dV kernel that adds dQ by bulk reduce-adds, and the kernel that scales it, at both
    GPT head dims."""
    config = fmha.validate_config({"fused_dq": 1})
    paths = fmha.export_for_check(config, torch.bfloat16, d, True, str(tmp_path), only=("dkdv", "dq_scale"))
    names = [os.path.basename(p) for p in paths]
    assert len(names) == 2 and names[0].startswith("fmha_dkdv_fused_dq1") \
        and names[1].startswith("fmha_dq_scale_fused_dq1"), names
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(4) == b"\x7fELF"


# --- GPU ---------------------------------------------------------------------------------------

def _qkv(b, h, t, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, h, t, d, device="cuda", dtype=dtype, generator=g) for _ in range(3)]


def _check_forward(q, k, v, causal, scale=None, **config):
    out, lse = fmha.fmha_forward(q, k, v, causal=causal, scale=scale, **config)
    torch.cuda.synchronize()
    ref = reference.attention(q, k, v, causal=causal, scale=scale)
    ref_lse = reference.attention_lse(q, k, v, causal=causal, scale=scale)
    tol = tolerance_for(str(q.dtype).removeprefix("torch."))
    err, lse_err = errors(out, ref), errors(lse, ref_lse)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert passes(err, tol), f"out {err} vs {tol}"
    assert passes(lse_err, tol), f"lse {lse_err} vs {tol}"


FWD_CASES = [(b, h, t, d) for (b, h), t in zip([(2, 3), (1, 4), (3, 2), (1, 2)] * 2,
                                                   [1, 13, 64, 127, 128, 257, 1024, 4096])
             for d in (64, 128)]


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", FWD_CASES, ids=str)
def test_forward_matches_reference(shape, causal, dtype, poisoned):
    _check_forward(*_qkv(*shape, dtype), causal)


@gpu
@pytest.mark.parametrize("case", ["sharp", "identical_rows", "large_negative", "non_contiguous"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_forward_extreme_inputs(case, causal, poisoned):
    b, h, t, d = 2, 3, 257, 64
    q, k, v = _qkv(b, h, t, d, torch.float16, seed=1)
    scale = None
    if case == "sharp":  # scores around +-1e3: the softmax is almost one-hot
        scale = 1e3 / math.sqrt(d)
    elif case == "identical_rows":
        q, k = q[:, :, :1].expand_as(q).contiguous(), k[:, :, :1].expand_as(k).contiguous()
    elif case == "large_negative":  # every score about -1e3, far below zero
        q, k = q.abs() + 4.0, -(k.abs() + 4.0)
    else:  # (B, T, H, D) storage seen as (B, H, T, D), as a model's fused qkv gives it
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    _check_forward(q, k, v, causal, scale)


def _check_backward(q, k, v, causal, scale=None, **config):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fmha.flash_attention(q, k, v, causal=causal, scale=scale, **config)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = reference.attention(qf, kf, vf, causal=causal, scale=scale)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), dout.float())
    for name, g, r in zip("qkv", grads, ref_grads):
        err = errors(g, r)
        assert g.dtype == q.dtype and err["rel"] < 2e-2, f"d{name}: {err}"


BWD_CASES = [(2, 3, 1, 64), (1, 2, 13, 128), (2, 2, 127, 64), (1, 3, 257, 128), (1, 2, 1024, 64),
             (1, 1, 4096, 64)]


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", BWD_CASES, ids=str)
def test_backward_matches_reference(shape, causal, dtype, poisoned):
    _check_backward(*_qkv(*shape, dtype, seed=2), causal)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", BWD_CASES, ids=str)
def test_fused_dq_backward_matches_reference(shape, causal, dtype, poisoned):
    """dQ added by the dK/dV kernel's bulk reduce-adds, then scaled: every gradient checked."""
    _check_backward(*_qkv(*shape, dtype, seed=5), causal, fused_dq=1)


@gpu
@pytest.mark.parametrize("fused_dq", [0, 1])
@pytest.mark.parametrize("case", ["sharp", "large_negative"])
def test_backward_extreme_inputs(case, fused_dq, poisoned):
    q, k, v = _qkv(1, 2, 257, 64, torch.float16, seed=3)
    if case == "sharp":
        _check_backward(q, k, v, True, scale=30.0 / 8, fused_dq=fused_dq)
    else:
        _check_backward(q.abs() + 4.0, -(k.abs() + 4.0), v, False, fused_dq=fused_dq)


@gpu
@pytest.mark.parametrize("config", fmha.SWEEP_CONFIGS, ids=config_id)
def test_every_sweep_config_passes_parity(config, poisoned):
    for t, d, causal in [(127, 64, True), (257, 64, True), (200, 128, False)]:
        q, k, v = _qkv(2, 2, t, d, torch.float16, seed=t)
        _check_forward(q, k, v, causal, **config)
        _check_backward(q, k, v, causal, **config)
