"""Parity of the cuTile LayerNorm (forward, backward, both variants) with the reference.

The GPU tests compare with the reference in float64, so fp32 inputs with a large offset are judged
against the exact answer rather than against another fp32 rounding of it.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench.measure.check import errors, passes, tolerance_for
from kernels import layernorm, reference

OK, REASON = kernels.available()
gpu = pytest.mark.skipif(not OK, reason=REASON)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# std of the inputs that sit on an offset of 1e3: small next to the offset, large next to the
# rounding step of the dtype there
OFFSET_STD = {"float16": 8.0, "bfloat16": 64.0, "float32": 10.0}


def check_statistics(x, mean, rstd):
    """The saved fp32 mean and rstd of every row (what the backward reads) against float64."""
    xd = x.double().reshape(-1, x.shape[-1])
    assert (mean.reshape(-1) - xd.mean(-1)).abs().max().item() < 1e-5
    want = torch.rsqrt(xd.var(-1, unbiased=False) + 1e-5)
    assert (rstd.reshape(-1) / want - 1).abs().max().item() < 1e-5


def bwd(**config):
    """The backward's full config: its defaults updated with `config`."""
    return layernorm.validate_bwd_config(config)


def make(shape, dtype, device, offset=0.0, std=1.0, seed=0):
    """x with the given offset and std, weight in [0.5, 1), bias ~ 0.1 N(0, 1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = shape[-1]
    x = offset + std * torch.randn(shape, generator=g)
    w = 0.5 + 0.5 * torch.rand(n, generator=g)
    b = 0.1 * torch.randn(n, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, w, b))


def test_imports_and_reasons_without_cutile():
    """The module imports anywhere; without cuTile the public functions say why in one line."""
    assert callable(layernorm.layer_norm) and callable(layernorm.layer_norm_forward)
    if OK:
        pytest.skip("cuTile is available here")
    x, w, b = make((3, 8), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="cuTile not available"):
        layernorm.layer_norm_forward(x, w, b)
    with pytest.raises(RuntimeError, match="cuTile not available"):
        layernorm.layer_norm(x, w, b)


def test_export_compiles_every_kernel_for_sm90(exported_cubins):
    names = exported_cubins(layernorm)
    for kind in ("fwd", "bwd"):
        for dtype in DTYPES:
            assert any(f"layernorm_{kind}_{dtype}_" in s for s in names), (kind, dtype, names)
    assert any("_chunk256" in s for s in names), names
    # the column sum's tiles of narrow (16 columns a block) and wide rows (32)
    assert {s.split(".")[0].rsplit("_", 1)[1] for s in names if s.startswith("layernorm_colsum_")} == {"16", "32"}, names
    assert any(s.startswith("layernorm_bwd_") and "_add" in s for s in names), names
    # block 0's ln_1: a float32 stream normalised into fp16, its own gradient added to dx
    assert any(s.startswith("layernorm_fwd_float16_768_stream.") for s in names), names
    assert any(s.startswith("layernorm_bwd_float16_768_stream.") for s in names), names
    # the backward's partial rows both ways: as 1-D sums (768 columns) and as they are (384)
    assert any(s.startswith("layernorm_bwd_float16_768.") for s in names), names
    assert any(s.startswith("layernorm_bwd_float16_384.") for s in names), names
    # the forward as each grid launches it: the persistent one with its occupancy hint, and the plain
    assert any(s.startswith("layernorm_fwd_float16_768.") for s in names), names
    assert any(s.startswith("layernorm_fwd_float16_768_plain.") for s in names), names
    assert any(s.startswith("layernorm_fwd_float16_768_nostats.") for s in names), names


@pytest.mark.parametrize("n, x_size, chunk, as_vector", [
    (384, 2, None, False), (512, 2, None, False), (513, 2, None, True), (768, 2, None, True),
    (768, 4, None, True), (4096, 2, None, True), (768, 2, 256, False), (1000, 2, 256, True)])
def test_backward_stores_partial_rows_as_vectors_from_1024_padded_columns(n, x_size, chunk, as_vector):
    """The 1-D store is taken where a row's padded width reaches 1024 (faster there, slower at 384)."""
    block_m, width, nchunk, vec = layernorm._bwd_shape(n, bwd(chunk=chunk), x_size, 8192, 132)
    assert vec is as_vector and width * nchunk >= n and block_m * width * nchunk * x_size <= 16 << 10


@pytest.mark.parametrize("n, x_size, bwd_rows, fwd_rows", [
    (13, 2, 64, 64), (13, 4, 64, 64), (64, 2, 64, 64), (128, 2, 64, 64), (256, 2, 32, 32),
    (768, 2, 8, 8), (768, 4, 4, 8)])
def test_narrow_rows_fill_a_tile_with_at_most_64_of_them(n, x_size, bwd_rows, fwd_rows):
    """At 13 columns a tile would hold 512 rows, 4-5x slower than 64 (H100)."""
    assert layernorm._bwd_shape(n, bwd(), x_size, 8192, 132)[0] == bwd_rows
    assert layernorm._shape(n, None, None, layernorm.FWD_TILE_ELEMS)[0] == fwd_rows


@pytest.mark.parametrize("m, n, sms, rows", [
    (257, 13, 132, 16),  # 5 tiles of 64 rows: 17 of 16
    (4096, 13, 132, 32),  # 64 tiles of 64 rows: 128 of 32
    (8192, 13, 132, 64),  # 128 tiles: as many as pay
    (129, 64, 132, 16), (1, 13, 132, 16),
    (257, 768, 132, 8),  # already under 16 rows
    (257, 13, 8, 64),  # a small GPU: 5 tiles fill half its SMs
])
def test_a_short_inputs_backward_takes_fewer_rows_a_tile(m, n, sms, rows):
    assert layernorm._bwd_shape(n, bwd(), 2, m, sms)[0] == rows
    assert layernorm._bwd_shape(n, bwd(rows_per_block=32), 2, m, sms)[0] == 32  # asked for: as asked


@pytest.mark.parametrize("m, n, rows", [
    (257, 13, 16), (1024, 128, 16), (8192, 13, 16),  # 128 tiles of 64 rows for 264 blocks: 512 of 16
    (65536, 13, 64),  # 1024 tiles: full ones
    (8192, 768, 8), (2048, 768, 8),  # under 16 rows already
    (16384, 384, 16), (8192, 256, 16), (16384, 256, 32),
])
def test_a_short_inputs_forward_takes_fewer_rows_a_tile(m, n, rows):
    cfg = dict(layernorm.FWD_CONFIG)
    assert cfg["blocks_per_sm"] == 2
    assert layernorm._fwd_shape(n, cfg, m, 132)[0] == rows
    assert layernorm._fwd_shape(n, {**cfg, "rows_per_block": 64}, m, 132)[0] == 64  # asked for: as asked


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_check_tells_a_wrong_layernorm_apart(dtype):
    """The gate the GPU tests use passes torch's own LayerNorm and fails a near miss (eps 1e-3)."""
    x, w, b = make((129, 1000), DTYPES[dtype], "cpu", offset=1e3, std=OFFSET_STD[dtype])
    ref = reference.layer_norm(x, w, b)
    tol = tolerance_for(dtype)
    good = F.layer_norm(x.float(), (1000,), w.float(), b.float()).to(DTYPES[dtype])
    assert passes(errors(good, ref), tol)
    eps = 0.05 * OFFSET_STD[dtype] ** 2  # an eps that matters at this variance
    bad = F.layer_norm(x.float(), (1000,), w.float(), b.float(), eps).to(DTYPES[dtype])
    assert not passes(errors(bad, ref), tol)


FWD_CASES = (
    [((129, n), d, p, 0.0) for n in (384, 768, 1000, 1600, 4096) for d in DTYPES for p in (False, True)]
    + [((r, 768), "float16", p, 0.0) for r in (1, 7, 8192) for p in (False, True)]
    + [((2, 13, 1000), "bfloat16", True, 0.0), ((65536, 384), "bfloat16", True, 0.0),
       ((65536, 384), "float16", False, 0.0)]
    + [((257, n), d, False, 1e3) for n in (768, 1600) for d in DTYPES]
    + [((257, 1400), d, True, 0.0) for d in DTYPES]
    # narrow rows: a tile holds at most MAX_BLOCK_ROWS of them
    + [((r, n), d, p, 0.0) for r, n in ((257, 13), (8192, 64)) for d in DTYPES for p in (False, True)]
)


@gpu
@pytest.mark.parametrize("shape,dtype,persistent,offset", FWD_CASES)
def test_forward_matches_reference(poisoned, shape, dtype, persistent, offset):
    std = OFFSET_STD[dtype] if offset else 1.0
    x, w, b = make(shape, DTYPES[dtype], "cuda", offset, std, seed=len(shape) + shape[-1])
    y, mean, rstd = layernorm.layer_norm_forward(x, w, b, persistent=persistent)
    ref = reference.layer_norm(x, w, b, dtype=torch.float64)
    err = errors(y, ref)
    assert y.dtype == x.dtype and passes(err, tolerance_for(dtype)), err
    xd = x.double()
    ref_mean = xd.mean(-1)
    ref_rstd = torch.rsqrt(xd.var(-1, unbiased=False) + 1e-5)
    assert errors(mean, ref_mean)["rel"] < 1e-6
    assert errors(rstd, ref_rstd)["rel"] < 1e-4


CHUNK_CASES = (
    [((257, n), "float16", chunk, 0.0) for n in (384, 768, 1000, 1600) for chunk in (128, 256)]
    + [((257, n), d, 256, 1e3) for n in (768, 1000) for d in DTYPES]
    + [((1, 768), "float16", 256, 0.0), ((8192, 768), "float16", 256, 0.0),
       ((3, 5, 4096), "bfloat16", 512, 0.0), ((130, 100), "float32", 16, 0.0)]
)


@gpu
@pytest.mark.parametrize("shape,dtype,chunk,offset", CHUNK_CASES)
def test_forward_in_column_chunks_matches_reference(poisoned, shape, dtype, chunk, offset):
    """Rows read as several chunks, the last one ragged where chunk does not divide N."""
    std = OFFSET_STD[dtype] if offset else 1.0
    x, w, b = make(shape, DTYPES[dtype], "cuda", offset, std, seed=shape[-1] + chunk)
    y, mean, _ = layernorm.layer_norm_forward(x, w, b, persistent=True, chunk=chunk)
    assert passes(errors(y, reference.layer_norm(x, w, b, dtype=torch.float64)), tolerance_for(dtype))
    assert errors(mean, x.double().mean(-1))["rel"] < 1e-6


@gpu
@pytest.mark.parametrize("config", [
    {"rows_per_block": 1}, {"rows_per_block": 2}, {"rows_per_block": 16},
    {"blocks_per_sm": 1, "occupancy": 1, "num_worker_warps": 8},
    {"chunk": 256, "latency": 8, "num_worker_warps": 8, "rows_per_block": 4},
])
@pytest.mark.parametrize("persistent", [False, True])
def test_forward_launch_config_knobs(poisoned, config, persistent):
    x, w, b = make((13, 1000), torch.float16, "cuda")
    y, mean, rstd = layernorm.layer_norm_forward(x, w, b, persistent=persistent, **config)
    assert passes(errors(y, reference.layer_norm(x, w, b)), tolerance_for("float16"))
    check_statistics(x, mean, rstd)


@gpu
@pytest.mark.parametrize("config", [
    {"rows_per_block": 8, "chunk": 256, "blocks_per_sm": 3, "num_worker_warps": 4},
    {"rows_per_block": 8, "chunk": 256, "blocks_per_sm": 2, "num_worker_warps": 4},
    {"rows_per_block": 16, "chunk": 256, "blocks_per_sm": 2, "num_worker_warps": 8, "latency": 5},
])
@pytest.mark.parametrize("rows", [8192, 16384])
def test_chunked_configs_keep_every_rows_statistics(poisoned, config, rows):
    """Persistent blocks looping over many row tiles, called again and again. With the statistics
    stored by TMA, the first and last of these configs stored wrong statistics for some rows at
    16384 rows, a different few on 29 and 18 of 100 calls (H200, 2026-12-01), while y was right."""
    x, w, b = make((rows, 768), torch.float16, "cuda", seed=rows)
    for _ in range(20):
        y, mean, rstd = layernorm.layer_norm_forward(x, w, b, persistent=True, **config)
        check_statistics(x, mean, rstd)
    assert passes(errors(y, reference.layer_norm(x, w, b)), tolerance_for("float16"))


@gpu
def test_layer_norm_takes_a_forward_config_and_its_backward_reads_its_statistics(poisoned):
    config = {"rows_per_block": 4, "chunk": 256, "blocks_per_sm": 3}
    x, w, b = make((257, 768), torch.float16, "cuda", seed=3)
    dy = torch.randn(x.shape, device="cuda").half()
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    layernorm.layer_norm(*leaves, **config).backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    reference.layer_norm(*ref_leaves, dtype=torch.float64).backward(dy.double())
    for name, got, want in zip(("dx", "dw", "db"), leaves, ref_leaves):
        assert errors(got.grad, want.grad)["rel"] < 2e-2, name


@gpu
@pytest.mark.parametrize("rows", [1, 13, 127, 257])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_inference_skips_the_statistics_and_gives_the_training_forwards_bits(poisoned, rows, dtype):
    """Under no_grad no backward reads the mean and rstd, so the kernel stores none; y, and with
    the residual add s, are the same bits as in a forward that stores them."""
    x, w, b = make((rows, 1000), DTYPES[dtype], "cuda", seed=rows)
    r = torch.randn(x.shape, device="cuda")
    y_train, mean, rstd, _ = layernorm._forward(x, w, b, 1e-5, True, layernorm.tuned_config(x))
    y_infer, none_mean, none_rstd, _ = layernorm._forward(x, w, b, 1e-5, True, layernorm.tuned_config(x),
                                                          stats=False)
    check_statistics(x, mean, rstd)
    assert none_mean is None and none_rstd is None and torch.equal(y_infer, y_train)
    leaves = [t.detach().requires_grad_() for t in (r, x, w, b)]
    s_train, h_train = layernorm.add_layer_norm(leaves[1], leaves[0], *leaves[2:])
    with torch.no_grad():
        assert torch.equal(layernorm.layer_norm(x, w, b), y_train)
        s_infer, h_infer = layernorm.add_layer_norm(x, r, w, b)
    assert torch.equal(s_infer, s_train) and torch.equal(h_infer, h_train)


def test_add_layer_norm_without_a_residual_sums_x_gradients_in_its_backward(monkeypatch):
    """Block 0's ln_1 (model.gpt.LayerNorm.stream): (x, LayerNorm of x) from one node whose backward
    gives x the LayerNorm's gradient plus the stream's. The autograd Function's wiring, on CPU,
    with the two kernels' entry points stood in for by torch's LayerNorm."""
    def forward(x, weight, bias, eps, persistent, cfg, residual=None, y_dtype=None, residual_bias=None,
                stats=True):
        assert residual is None and residual_bias is None
        mean, var = x.mean(-1), x.var(-1, unbiased=False)
        y = F.layer_norm(x, x.shape[-1:], weight, bias, eps).to(y_dtype or x.dtype)
        return y, mean.reshape(-1), torch.rsqrt(var + eps).reshape(-1), x

    def backward(dy, x, weight, mean, rstd, grad_dtype, dres=None, dr_dtype=None, sum_dx=False):
        assert dr_dtype is None and not sum_dx
        xl, wl, bl = (t.detach().requires_grad_() for t in (x, weight, torch.zeros_like(weight)))
        with torch.enable_grad():
            y = F.layer_norm(xl, x.shape[-1:], wl, bl, 1e-5)
        dx, dw, db = torch.autograd.grad(y, (xl, wl, bl), dy.to(y.dtype))
        dx = dx if dres is None else dx + dres
        return dx, dw, db, dx, None

    monkeypatch.setattr(kernels, "require", lambda: None)
    monkeypatch.setattr(layernorm, "tuned_config", lambda *a, **k: {})
    monkeypatch.setattr(layernorm, "_forward", forward)
    monkeypatch.setattr(layernorm, "layer_norm_backward", backward)
    x, w, b = make((2, 5, 16), torch.float64, "cpu")
    ds, dy = torch.randn_like(x), torch.randn_like(x)
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    s, y = layernorm.add_layer_norm(*leaves[:1], None, *leaves[1:])
    assert s.data_ptr() == x.data_ptr() or torch.equal(s, x)
    torch.autograd.backward([s, y], [ds, dy])
    ref = [t.detach().requires_grad_() for t in (x, w, b)]
    torch.autograd.backward([ref[0] * 1, F.layer_norm(ref[0], (16,), ref[1], ref[2], 1e-5)], [ds, dy])
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad, want.grad)
    s, y = layernorm.add_layer_norm(leaves[0], None, *leaves[1:])  # the stream unused: y's gradient only
    leaves[0].grad = None
    y.backward(dy)
    want = torch.autograd.grad(F.layer_norm(ref[0], (16,), ref[1], ref[2], 1e-5), ref[0], dy)[0]
    torch.testing.assert_close(leaves[0].grad, want)


@pytest.mark.parametrize("bad", [{"chunk": 100}, {"chunk": 8}, {"latency": 11}, {"occupancy": 0},
                                 {"num_worker_warps": 3}, {"rows_per_block": 2.0}, {"tile_m": 64}])
@pytest.mark.parametrize("fn", ["layer_norm_forward", "layer_norm"])
def test_bad_forward_config_is_a_value_error_before_anything_runs(bad, fn):
    x, w, b = make((3, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match="layer_norm forward"):
        getattr(layernorm, fn)(x, w, b, **bad)


@pytest.mark.parametrize("bad", [{"chunk": 100}, {"blocks_per_sm": 0}, {"rows_per_block": 3},
                                 {"latency": 5}])
def test_bad_backward_config_is_a_value_error_before_anything_runs(bad):
    x, w, b = make((3, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match="layer_norm backward"):
        layernorm.layer_norm(x, w, b, backward=bad)
    mean, rstd = x.mean(-1), x.var(-1).rsqrt()
    with pytest.raises(ValueError, match="layer_norm backward"):
        layernorm.layer_norm_backward(torch.ones_like(x), x, w, mean, rstd, **bad)


@gpu
@pytest.mark.parametrize("shape", [(257, 13), (8192, 13), (1000, 64), (129, 768)])
@pytest.mark.parametrize("backward", [
    {"rows_per_block": 8, "blocks_per_sm": 1}, {"rows_per_block": 1, "blocks_per_sm": 3},
    {"rows_per_block": 64, "blocks_per_sm": 2}, {"blocks_per_sm": 4}, {"chunk": 256, "rows_per_block": 4},
])
def test_layer_norm_takes_a_backward_config(poisoned, shape, backward):
    """Every backward knob gives the reference's gradients, through autograd as through the
    plain function, and the same bits from both."""
    x, w, b = make(shape, torch.float16, "cuda", seed=shape[0])
    dy = torch.randn(shape, device="cuda").half()
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    layernorm.layer_norm(*leaves, backward=backward).backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    reference.layer_norm(*ref_leaves, dtype=torch.float64).backward(dy.double())
    for name, got, want in zip(("dx", "dw", "db"), leaves, ref_leaves):
        assert errors(got.grad, want.grad)["rel"] < 2e-2, name
    _, mean, rstd = layernorm.layer_norm_forward(x, w, b)
    plain = layernorm.layer_norm_backward(dy, x, w, mean, rstd, w.dtype, **backward)
    for got, leaf in zip(plain, leaves):
        assert torch.equal(got, leaf.grad)


@gpu
@pytest.mark.parametrize("affine", ["weight", "bias", "none"])
def test_forward_without_weight_or_bias(poisoned, affine):
    x, w, b = make((7, 768), torch.float32, "cuda")
    w = w if affine == "weight" else None
    b = b if affine == "bias" else None
    y = layernorm.layer_norm(x, w, b)
    assert passes(errors(y, reference.layer_norm(x, w, b)), tolerance_for("float32"))


BWD_CASES = (
    [((257, n), d, 0.0) for n in (384, 768, 1000, 1600, 4096) for d in DTYPES]
    + [((1, 768), "float16", 0.0), ((4, 127, 768), "bfloat16", 0.0), ((8192, 768), "float16", 0.0),
       ((129, 1000), "float32", 1e3), ((257, 1400), "float16", 0.0), ((257, 1400), "float32", 1e3),
       ((33, 1536), "bfloat16", 0.0)]  # 1400: three 512-column chunks, the last one ragged
    + [((r, n), d, 0.0) for r, n in ((257, 13), (8192, 16), (129, 64)) for d in DTYPES]  # narrow rows
)


@gpu
@pytest.mark.parametrize("shape,dtype,offset", BWD_CASES)
def test_backward_matches_autograd_of_reference(poisoned, shape, dtype, offset):
    std = OFFSET_STD[dtype] if offset else 1.0
    x, w, b = make(shape, DTYPES[dtype], "cuda", offset, std, seed=shape[-1])
    dy = torch.randn(shape, device="cuda").to(DTYPES[dtype])
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    layernorm.layer_norm(*leaves).backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    reference.layer_norm(*ref_leaves, dtype=torch.float64).backward(dy.double())
    for name, got, want in zip(("dx", "dw", "db"), leaves, ref_leaves):
        assert got.grad.dtype == got.dtype
        err = errors(got.grad, want.grad)
        assert err["rel"] < 2e-2, (name, err)


@gpu
@pytest.mark.parametrize("shape,chunk", [((257, 768), 256), ((129, 1400), 512), ((65, 384), 128)])
def test_backward_in_column_chunks_matches_autograd_of_reference(shape, chunk):
    x, w, b = make(shape, torch.float32, "cuda", seed=chunk)
    dy = torch.randn(shape, device="cuda")
    _, mean, rstd = layernorm.layer_norm_forward(x, w, b)
    got = layernorm.layer_norm_backward(dy, x, w, mean, rstd, chunk=chunk)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    reference.layer_norm(*ref_leaves, dtype=torch.float64).backward(dy.double())
    for name, g, want in zip(("dx", "dw", "db"), got, ref_leaves):
        assert errors(g, want.grad)["rel"] < 1e-4, name
