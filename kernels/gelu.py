"""GELU (exact erf form, or the tanh form) as cuTile kernels, fused with an optional bias add, in
the epilogue of the matmul that feeds it (linear_gelu), and its backward in the epilogue of the
matmul that gives its output's gradient (matmul_gelu_backward).

cuTile has no erf, so the exact form computes the normal CDF from its tail q = Phi(-|x|):
Phi(x) = q for x < 0 and 1 - q otherwise, which keeps the negative tail free of cancellation. The
forward takes q = 2^(P(|x|) - log2(e) x^2 / 2) with P a polynomial fit: one exp2 and no division.
The backward needs the normal density too, so it takes q by Abramowitz & Stegun 7.1.26
(|error| < 1.5e-7), q = 0.5 * t * P(t) * exp(-x^2 / 2) with t = 1 / (1 + p |x| / sqrt(2)), and
reuses exp(-x^2 / 2) for the density.
"""
import functools
import math

import torch
import torch.nn.functional as F

import kernels
from kernels.aot import array_param, ct_dtype, dtype_name, export
from kernels.launch import grid_size, launch, rows, rows_to_fill, sm_count
from kernels.linear import column_block, column_grid, sum_partials, tile_matmul_fits
from kernels.tile_ops import matmul_tile

try:
    import cuda.tile as ct
except Exception:  # no cuda-tile here: the public functions raise through kernels.require()
    ct = None

# the forward's default block_m * block_n and occupancy hint: 8 blocks per SM, one block per tile (a
# persistent grid measured slower). With the exp2 form below, 8192-element tiles took 38.0-39.7 us
# in fp16 at GPT-2's (8192, 3072) and shakespeare-char's (16384, 1536) against 43.6-44.7 with 4096,
# and 4096 x 768 10.9 against 9.7 (H200, 2026-12-04); bf16 the same or better
TILE_ELEMS = 8192
MAX_BLOCK_N = 1024
# narrow or short inputs take smaller tiles, so that the grid has at least 2 of them an SM (_tiles)
MIN_TILES_PER_SM = 2
OCCUPANCY = 8
# the backward: a persistent grid of (column tile, row group) blocks, 2 or 4 per SM, each over (16, 256)
# tiles (the column sum's grid, kernels.linear.column_grid), summing the bias gradient's columns
# as it writes dx. At GPT-2's (8192, 3072) fp16 on an H100 that took 58 us for both, against 61 us
# for the one-block-per-tile backward plus 22 us for a separate column sum; 4 or 8 blocks per SM
# and (4..8, 512..1024) tiles took 61-92 us. Without the sum, 4 blocks per SM: 48 us against 65 at
# 2 (16384 x 1536 and 8192 x 3072 fp16, H200, 2026-12-04); with it, 4 took 55.6 against 48.5
BWD_BLOCK_M = 16
BWD_BLOCKS_PER_SM = {True: 2, False: 4}  # by whether the block sums the bias gradient
# linear_gelu's matmul: persistent, one block of 8 warps an SM over (128, 256) tiles in 32-deep steps.
# At GPT-2's c_fc (8192 x 768 by 3072 x 768) fp16 on an H200 it took 82-84 us against 96 for cuBLAS
# (59.5) and the GELU kernel (36.6); at shakespeare-char's (16384 x 384 by 1536 x 384) 59-60 against
# 76; bf16 the same. 64-deep steps took 86 / 65, and six other tiles or occupancies 90-210 us.
# matmul_gelu_backward's (dm @ W_proj with GELU' and the bias gradient's column sums after it) takes
# the same tiles: on an H100, 106 us against 119.5 for cuBLAS and the backward kernel at GPT-2's
# shape, 88 against 100 at shakespeare-char's; 64-deep steps 121 / 101, (128, 128) tiles two an SM
# 117 / 96 (docs/PERF.md). On an H200 (2026-12-04) 105-107 against 104: its memory makes the
# separate backward kernel cheaper.
LINEAR_TILE = (128, 256, 32)
LINEAR_WARPS = 8

# Abramowitz & Stegun 7.1.26
_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_K = math.sqrt(2.0 / math.pi)  # tanh form: tanh(K * (x + C x^3))
# the forward's Phi(-|x|) = 2^(P(|x|) - log2(e) x^2 / 2), P fitted (Chebyshev, degree 11) to
# log2 Phi(-a) + log2(e) a^2 / 2 on [0, 8]: one exp2 and no division, where the form above takes an
# exponential and a division (16384 x 1536 bf16 on an H200: 37.0 against 44.4 us); in fp32 a
# relative error of 2.3e-6 where |x| < 6 (A&S: 3.6e-3 in the tail); 0 below -8
_PHI_P = (-0.9999974987662807, -1.1511547007148428, 0.2623767057094971, -0.05297008183358918,
          0.007537333939544302, -0.0003844253943278499, -0.00012714296302208174,
          3.944494331872246e-05, -5.715205322764746e-06, 4.849265953367357e-07,
          -2.3075618472439053e-08, 4.771559192348708e-10)
_PHI_MAX = 8.0
_HALF_LOG2E = 0.5 / math.log(2.0)
_C = 0.044715

if ct is not None:
    ConstInt = ct.Constant[int]
    ConstBool = ct.Constant[bool]
    ZERO = ct.PaddingMode.ZERO

    def _cdf_pdf(x):
        """(Phi(x), phi(x)) of the standard normal, in fp32."""
        # exp2 with flush-to-zero, one MUFU op: with ct.exp the backward took 48-51 against 44-46 us
        # at 16384 x 1536 and 8192 x 3072 (H200)
        e = ct.exp2(-_HALF_LOG2E * x * x, flush_to_zero=True)
        # div.full (2 ulp) instead of IEEE division: far below the approximation's own error
        t = ct.truediv(1.0, 1.0 + (_P * _INV_SQRT2) * ct.abs(x), rounding_mode=ct.RoundingMode.FULL)
        poly = t * (_A[0] + t * (_A[1] + t * (_A[2] + t * (_A[3] + t * _A[4]))))
        q = 0.5 * poly * e
        return ct.where(x < 0.0, q, 1.0 - q), e * _INV_SQRT_2PI

    def _gelu_and_grad(x, TANH, GRAD):
        """GELU(x), or its derivative when GRAD."""
        if TANH:
            th = ct.tanh(_K * (x + _C * x * x * x))
            if GRAD:
                return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * _K * (1.0 + 3.0 * _C * x * x)
            return 0.5 * x * (1.0 + th)
        if GRAD:
            cdf, pdf = _cdf_pdf(x)
            return cdf + x * pdf
        a = ct.minimum(ct.abs(x), _PHI_MAX)
        p = _PHI_P[11] * a + _PHI_P[10]
        p = p * a + _PHI_P[9]
        p = p * a + _PHI_P[8]
        p = p * a + _PHI_P[7]
        p = p * a + _PHI_P[6]
        p = p * a + _PHI_P[5]
        p = p * a + _PHI_P[4]
        p = p * a + _PHI_P[3]
        p = p * a + _PHI_P[2]
        p = p * a + _PHI_P[1]
        p = p * a + _PHI_P[0]
        h = ct.where(a < _PHI_MAX, ct.exp2(p - _HALF_LOG2E * a * a, flush_to_zero=True), 0.0)
        return x * ct.where(x < 0.0, h, 1.0 - h)

    def _plus_bias(x, Bias, j, BLOCK_N, HAS_BIAS):
        """x (fp32, column tile j) + Bias's tile j, or x without a bias."""
        if not HAS_BIAS:
            return x
        b = ct.astype(ct.load(Bias, (j,), (BLOCK_N,), padding_mode=ZERO), ct.float32)
        return x + ct.reshape(b, (1, BLOCK_N))

    def _input(X, Bias, i, j, BLOCK_M, BLOCK_N, HAS_BIAS):
        """The (BLOCK_M, BLOCK_N) tile (i, j) of X (+ Bias), in fp32."""
        x = ct.astype(ct.load(X, (i, j), (BLOCK_M, BLOCK_N), padding_mode=ZERO), ct.float32)
        return _plus_bias(x, Bias, j, BLOCK_N, HAS_BIAS)

    @ct.kernel
    def _fwd_kernel(X, Bias, Y, HAS_BIAS: ConstBool, TANH: ConstBool, BLOCK_M: ConstInt,
                    BLOCK_N: ConstInt):
        """Over the (row tile, column tile) pairs in row-major order: a grid smaller than the number
        of tiles is persistent."""
        tiles_n = ct.cdiv(X.shape[1], BLOCK_N)
        for t in range(ct.bid(0), ct.cdiv(X.shape[0], BLOCK_M) * tiles_n, ct.num_blocks(0)):
            i, j = t // tiles_n, t % tiles_n
            z = _input(X, Bias, i, j, BLOCK_M, BLOCK_N, HAS_BIAS)
            ct.store(Y, (i, j), ct.astype(_gelu_and_grad(z, TANH, False), Y.dtype))

    @ct.kernel
    def _linear_fwd_kernel(X, W, Bias, FC, Y, HAS_BIAS: ConstBool, TANH: ConstBool, TILE_M: ConstInt,
                           TILE_N: ConstInt, TILE_K: ConstInt):
        """FC = X @ W^T, and Y = GELU(FC + Bias) from FC's tile as stored, so both are what a matmul
        and _fwd_kernel would give. Each block loops over every num_blocks-th tile, down a column
        of tiles at a time (W's tile stays in L2 for the next)."""
        tiles_m = ct.cdiv(X.shape[0], TILE_M)
        for t in range(ct.bid(0), tiles_m * ct.cdiv(W.shape[0], TILE_N), ct.num_blocks(0)):
            i, j = t % tiles_m, t // tiles_m
            fc = ct.astype(matmul_tile(X, W, i, j, TILE_M, TILE_N, TILE_K, True), FC.dtype)
            ct.store(FC, (i, j), fc)
            z = _plus_bias(ct.astype(fc, ct.float32), Bias, j, TILE_N, HAS_BIAS)
            ct.store(Y, (i, j), ct.astype(_gelu_and_grad(z, TANH, False), Y.dtype))

    @ct.kernel
    def _matmul_bwd_kernel(DY, W, X, Bias, DX, Part, HAS_BIAS: ConstBool, SUMS: ConstBool, TANH: ConstBool,
                           TILE_M: ConstInt, TILE_N: ConstInt, TILE_K: ConstInt):
        """DX = (DY @ W, rounded to DY's dtype as a matmul stores it) * GELU'(X + Bias): what a matmul
        and _bwd_kernel give, without the product's trip through memory. With SUMS, Part[i] gets
        row tile i's fp32 column sums of DX as written. Tiles in _linear_fwd_kernel's order."""
        tiles_m = ct.cdiv(DY.shape[0], TILE_M)
        for t in range(ct.bid(0), tiles_m * ct.cdiv(W.shape[1], TILE_N), ct.num_blocks(0)):
            i, j = t % tiles_m, t // tiles_m
            dy = ct.astype(ct.astype(matmul_tile(DY, W, i, j, TILE_M, TILE_N, TILE_K, False), DY.dtype), ct.float32)
            z = _input(X, Bias, i, j, TILE_M, TILE_N, HAS_BIAS)
            dx = ct.astype(dy * _gelu_and_grad(z, TANH, True), DX.dtype)
            ct.store(DX, (i, j), dx)
            if SUMS:
                ct.store(Part, (i, j), ct.sum(ct.astype(dx, ct.float32), axis=0, keepdims=True))

    @ct.kernel
    def _bwd_kernel(DY, X, Bias, DX, Part, HAS_BIAS: ConstBool, SUMS: ConstBool, TANH: ConstBool,
                    BLOCK_M: ConstInt, BLOCK_N: ConstInt):
        """dx = dy * GELU'(x + bias) over column tile j and row tiles g, g + G, ...; with SUMS,
        Part[g] gets the fp32 column sums of those rows of dx (as written), the bias gradient's share."""
        j, g = ct.bid(0), ct.bid(1)
        acc = ct.zeros((BLOCK_M, BLOCK_N), dtype=ct.float32)
        for i in range(g, ct.cdiv(X.shape[0], BLOCK_M), ct.num_blocks(1)):
            z = _input(X, Bias, i, j, BLOCK_M, BLOCK_N, HAS_BIAS)
            dy = ct.astype(ct.load(DY, (i, j), (BLOCK_M, BLOCK_N), padding_mode=ZERO), ct.float32)
            dx = ct.astype(dy * _gelu_and_grad(z, TANH, True), DX.dtype)
            ct.store(DX, (i, j), dx)
            if SUMS:
                acc += ct.astype(dx, ct.float32)
        if SUMS:
            ct.store(Part, (g, j), ct.sum(acc, axis=0, keepdims=True))


def _tiles(m: int, n: int, tile, sms: int) -> tuple[int, int]:
    """(block_m, block_n): `tile` if given, else block_n covers N up to MAX_BLOCK_N, or, where a
    row is no whole number of such tiles and 256 divides N, 256: 1536 = 6 x 256 measured 50 / 59 us
    forward / backward at 16384 x 1536 fp16 on an H100 (occupancy 8), against 50 / 64 us with
    512 columns and 65 / 82 us for the previous default (two rows of 512, no hint). block_m fills
    TILE_ELEMS, halved (to 16) while that leaves fewer than MIN_TILES_PER_SM tiles an SM:
    at 8192 x 13, 8192 x 128 and 257 x 13 fp16 (H200) 16-row tiles took 5.9, 6.5 and 5.5 us
    against 25.0, 9.3 and 17.3 for full ones."""
    if tile is not None:
        return tile
    block_n = min(MAX_BLOCK_N, 1 << max(0, n - 1).bit_length())
    if n % block_n and n % 256 == 0:
        block_n = 256
    block_m = rows_to_fill(max(1, TILE_ELEMS // block_n), m, -(-n // block_n), MIN_TILES_PER_SM * sms)
    return block_m, block_n


@functools.lru_cache(maxsize=None)
def _hinted(kernel):
    return kernel.replace_hints(occupancy=OCCUPANCY)


@functools.lru_cache(maxsize=None)
def _bwd_hinted(sums: bool):
    return _bwd_kernel.replace_hints(occupancy=BWD_BLOCKS_PER_SM[sums])


@functools.lru_cache(maxsize=None)
def _matmul_hinted(kernel):
    """A matmul kernel with our epilogue: one block of LINEAR_WARPS warps an SM."""
    return kernel.replace_hints(occupancy=1, num_worker_warps=LINEAR_WARPS)


def _tanh(approximate: str) -> bool:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate == "tanh"


def _prepare(x, bias, approximate):
    """(tanh, N, x as (M, N) rows, the bias array; x stands in for a missing bias, never read)."""
    kernels.require()
    n = x.shape[-1] if x.dim() else 1
    x2 = rows(x, n)
    return _tanh(approximate), n, x2, x2 if bias is None else bias.contiguous()


def gelu_forward(x, bias=None, approximate="none", tile=None, blocks_per_sm=None):
    """GELU(x + bias), bias of shape (N,) over x's last dim or None; computed in fp32.

    tile: (block_m, block_n) of the (M, N) view a block takes (default: _tiles's choice).
    blocks_per_sm: size of the persistent grid; None launches one block per tile.
    """
    tanh, n, x2, b = _prepare(x, bias, approximate)
    out = torch.empty_like(x2)
    if x.numel():
        block_m, block_n = _tiles(x2.shape[0], n, tile, sm_count(x.device))
        grid = grid_size((-(-x2.shape[0] // block_m)) * (-(-n // block_n)), blocks_per_sm, x.device)
        launch(x.device, (grid,), _hinted(_fwd_kernel),
               (x2, b, out, bias is not None, tanh, block_m, block_n))
    return out if x.dim() == 2 else out.view(x.shape)


def linear_gelu(x, weight, bias=None, approximate="none"):
    """(x @ weight^T, GELU(that + bias)) for rows x (M, K) and a Linear's weight (N, K): one cuTile
    matmul with the GELU in its epilogue where both are 16-bit tensors that tensor-memory loads
    read (kernels.linear.tile_matmul_fits), else the matmul and gelu_forward."""
    if not tile_matmul_fits(x, weight):
        fc = F.linear(x, weight)
        return fc, gelu_forward(fc, bias, approximate)
    tanh = _tanh(approximate)
    fc = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
    y = torch.empty_like(fc)
    if fc.numel():
        tile_m, tile_n, tile_k = LINEAR_TILE
        tiles = -(-fc.shape[0] // tile_m) * -(-fc.shape[1] // tile_n)
        launch(x.device, (grid_size(tiles, 1, x.device),), _matmul_hinted(_linear_fwd_kernel),
               (x, weight, fc if bias is None else bias.contiguous(), fc, y, bias is not None, tanh,
                tile_m, tile_n, tile_k))
    return fc, y


def gelu_backward(dy, x, bias=None, approximate="none", bias_grad=False):
    """dy * GELU'(x + bias), the gradient of x; with bias_grad, (that, the bias's gradient: its
    column sums, in the bias's dtype), summed in the same pass."""
    tanh, n, x2, b = _prepare(x, bias, approximate)
    out = torch.empty_like(x2)
    sums = bias_grad and bias is not None
    db = torch.empty(n, device=x.device, dtype=b.dtype) if sums else None
    if x.numel():
        block_n, tiles_n, groups = column_grid(x2.shape[0], n, BWD_BLOCK_M, BWD_BLOCKS_PER_SM[sums],
                                               x.device)
        part = torch.empty(groups, n, device=x.device, dtype=torch.float32) if sums else x2
        launch(x.device, (tiles_n, groups), _bwd_hinted(sums),
               (rows(dy, n), x2, b, out, part, bias is not None, sums, tanh, BWD_BLOCK_M, block_n))
        if sums:
            sum_partials(part, db)
    elif sums:
        db.zero_()
    out = out if x.dim() == 2 else out.view(x.shape)
    return (out, db) if bias_grad else out


def matmul_gelu_backward(dy, w, x, bias=None, approximate="none", bias_grad=False):
    """gelu_backward(dy @ w, x, bias, approximate, bias_grad) for rows dy (M, K) and w (K, N), x
    (M, N): one cuTile matmul with the GELU's backward in its epilogue where both operands are
    16-bit tensors that tensor-memory loads read (kernels.linear.tile_matmul_fits) and N a multiple
    of 8, else the matmul and gelu_backward. The same dx, bit for bit, where the product is; the
    bias gradient summed in another order (row tiles, then kernels.linear.sum_partials)."""
    if not (tile_matmul_fits(dy, w) and w.shape[1] % 8 == 0 and x.shape == (dy.shape[0], w.shape[1])):
        return gelu_backward(dy @ w, x, bias, approximate, bias_grad)
    tanh, n, x2, b = _prepare(x, bias, approximate)
    out = torch.empty_like(x2)
    sums = bias_grad and bias is not None
    db = torch.empty(n, device=x.device, dtype=b.dtype) if sums else None
    if out.numel():
        tile_m, tile_n, tile_k = LINEAR_TILE
        tiles_m = -(-x2.shape[0] // tile_m)
        part = torch.empty(tiles_m, n, device=x.device, dtype=torch.float32) if sums else out
        grid = (grid_size(tiles_m * -(-n // tile_n), 1, x.device),)
        launch(x.device, grid, _matmul_hinted(_matmul_bwd_kernel),
               (dy, w, x2, b, out, part, bias is not None, sums, tanh, tile_m, tile_n, tile_k))
        if sums:
            sum_partials(part, db)
    elif sums:
        db.zero_()
    return (out, db) if bias_grad else out


class Gelu(torch.autograd.Function):
    """Autograd for the cuTile GELU with its fused bias add."""

    @staticmethod
    def forward(ctx, x, bias, approximate):
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate
        return gelu_forward(x, bias, approximate)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dz, db = gelu_backward(dy, x, bias, ctx.approximate, bias_grad=True)
        return dz, db, None


def gelu(x, bias=None, approximate="none"):
    """GELU(x + bias), differentiable in x and bias; approximate is 'none' (erf) or 'tanh'."""
    return Gelu.apply(x, bias, approximate)


def export_for_check(out_dir, gpu_code="sm_90") -> list[str]:
    """Compile the forward and backward kernels ahead of time (no GPU needed); the cubin paths."""
    if ct is None:
        kernels.require()
    f32 = ct.float32
    paths = []
    for dtype, tanh, grad, bias in [(torch.float16, False, False, True), (torch.float16, True, False, True),
                                    (torch.float16, False, True, True), (torch.float16, True, True, True),
                                    (torch.bfloat16, False, False, False), (torch.float32, False, True, False)]:
        a = array_param(ct_dtype(dtype), 2)
        name = (f"gelu_{'bwd' if grad else 'fwd'}_{'tanh' if tanh else 'erf'}_{dtype_name(dtype)}"
                + ("" if bias else "_nobias"))
        bias_param = array_param(f32, 1) if bias else a  # without a bias, x stands in
        if grad:  # with a bias, its gradient's partial sums; without, x stands in for them too
            part = array_param(f32, 2) if bias else a
            params = [a, a, bias_param, a, part, bias, bias, tanh, BWD_BLOCK_M, column_block(3072)]
            paths.append(export(_bwd_hinted(bias), name, params, out_dir, gpu_code))
        else:
            params = [a, bias_param, a, bias, tanh, *_tiles(8192, 3072, None, 132)]
            paths.append(export(_hinted(_fwd_kernel), name, params, out_dir, gpu_code))
    for dtype, tanh, bias in [(torch.float16, False, True), (torch.bfloat16, True, False)]:
        a = array_param(ct_dtype(dtype), 2)
        name = f"linear_gelu_{'tanh' if tanh else 'erf'}_{dtype_name(dtype)}" + ("" if bias else "_nobias")
        params = [a, a, array_param(f32, 1) if bias else a, a, a, bias, tanh, *LINEAR_TILE]
        paths.append(export(_matmul_hinted(_linear_fwd_kernel), name, params, out_dir, gpu_code))
    for dtype, tanh, bias in [(torch.float16, False, True), (torch.bfloat16, True, False)]:
        a = array_param(ct_dtype(dtype), 2)
        name = (f"matmul_gelu_bwd_{'tanh' if tanh else 'erf'}_{dtype_name(dtype)}"
                + ("" if bias else "_nobias"))
        bias_param, part = (array_param(f32, 1), array_param(f32, 2)) if bias else (a, a)
        params = [a, a, a, bias_param, a, part, bias, bias, tanh, *LINEAR_TILE]
        paths.append(export(_matmul_hinted(_matmul_bwd_kernel), name, params, out_dir, gpu_code))
    return paths
