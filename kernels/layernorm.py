"""LayerNorm over the last dimension as cuTile kernels: forward, backward and an autograd Function.

Each block normalises a tile of `rows_per_block` rows; a row is one power-of-two tile over N with
the padding masked, so the statistics are a two-pass mean and variance in fp32 registers (exact for
inputs with a large offset) at the cost of a single read of x. Two variants share one kernel: a
grid of one block per row tile, or a persistent grid of a few blocks per SM that loop over the row
tiles. The backward writes dx and one partial dweight/dbias row per block, then a second kernel
sums the partial rows.
"""

import torch

import kernels

try:
    import cuda.tile as ct
except Exception:  # no cuda-tile here: the public functions raise through kernels.require()
    ct = None

MAX_N = 8192  # one row must fit in one tile of registers
# defaults measured on an H100 (docs/layernorm-notes.md): rows_per_block * padded N, and blocks per SM
FWD_TILE_ELEMS, FWD_BLOCKS_PER_SM = 8192, 2  # with occupancy=2 on the kernel
BWD_TILE_ELEMS, BWD_BLOCKS_PER_SM = 8192, 1
REDUCE_BLOCK_N = 32  # columns per block of the dweight/dbias reduction

if ct is not None:
    ConstInt = ct.Constant[int]
    ZERO = ct.PaddingMode.ZERO

    def _row(a, BLOCK_N):
        """A length-N vector as a (1, BLOCK_N) fp32 tile, zero past N."""
        return ct.reshape(ct.astype(ct.load(a, (0,), (BLOCK_N,), padding_mode=ZERO), ct.float32),
                          (1, BLOCK_N))

    def _col(a, t, BLOCK_M):
        """Rows t*BLOCK_M.. of a length-M vector as a (BLOCK_M, 1) tile, zero past M."""
        return ct.reshape(ct.load(a, (t,), (BLOCK_M,), padding_mode=ZERO), (BLOCK_M, 1))

    @ct.kernel(occupancy=2)
    def _fwd_kernel(X, W, B, Y, Mean, Rstd, eps, BLOCK_M: ConstInt, BLOCK_N: ConstInt):
        n = X.shape[1]
        inside = ct.reshape(ct.arange(BLOCK_N, dtype=ct.int32) < n, (1, BLOCK_N))
        w = _row(W, BLOCK_N)
        b = _row(B, BLOCK_N)
        for t in range(ct.bid(0), ct.cdiv(X.shape[0], BLOCK_M), ct.num_blocks(0)):
            x = ct.astype(ct.load(X, (t, 0), (BLOCK_M, BLOCK_N), padding_mode=ZERO), ct.float32)
            mean = ct.sum(x, axis=1, keepdims=True) / n
            xc = ct.where(inside, x - mean, 0.0)
            rstd = ct.rsqrt(ct.sum(xc * xc, axis=1, keepdims=True) / n + eps)
            ct.store(Y, (t, 0), ct.astype(xc * rstd * w + b, Y.dtype))
            ct.store(Mean, (t,), ct.reshape(mean, (BLOCK_M,)))
            ct.store(Rstd, (t,), ct.reshape(rstd, (BLOCK_M,)))

    @ct.kernel
    def _bwd_kernel(DY, X, W, Mean, Rstd, DX, DWp, DBp, BLOCK_M: ConstInt, BLOCK_N: ConstInt):
        n = X.shape[1]
        inside = ct.reshape(ct.arange(BLOCK_N, dtype=ct.int32) < n, (1, BLOCK_N))
        w = _row(W, BLOCK_N)
        dw = ct.zeros((1, BLOCK_N), dtype=ct.float32)
        db = ct.zeros((1, BLOCK_N), dtype=ct.float32)
        for t in range(ct.bid(0), ct.cdiv(X.shape[0], BLOCK_M), ct.num_blocks(0)):
            x = ct.astype(ct.load(X, (t, 0), (BLOCK_M, BLOCK_N), padding_mode=ZERO), ct.float32)
            dy = ct.astype(ct.load(DY, (t, 0), (BLOCK_M, BLOCK_N), padding_mode=ZERO), ct.float32)
            rstd = _col(Rstd, t, BLOCK_M)  # zero on padding rows, so they contribute nothing
            xhat = ct.where(inside, (x - _col(Mean, t, BLOCK_M)) * rstd, 0.0)
            wdy = w * dy
            c1 = ct.sum(xhat * wdy, axis=1, keepdims=True) / n
            c2 = ct.sum(wdy, axis=1, keepdims=True) / n
            ct.store(DX, (t, 0), ct.astype((wdy - xhat * c1 - c2) * rstd, DX.dtype))
            dw += ct.sum(dy * xhat, axis=0, keepdims=True)
            db += ct.sum(dy, axis=0, keepdims=True)
        ct.store(DWp, (ct.bid(0), 0), dw)
        ct.store(DBp, (ct.bid(0), 0), db)

    @ct.kernel
    def _colsum_kernel(DWp, DBp, DW, DB, BLOCK_G: ConstInt, BLOCK_N: ConstInt):
        """DW[j] = sum_i DWp[i, j] (and DB likewise) for one tile of BLOCK_N columns."""
        j = ct.bid(0)
        dw = ct.zeros((BLOCK_G, BLOCK_N), dtype=ct.float32)
        db = ct.zeros((BLOCK_G, BLOCK_N), dtype=ct.float32)
        for i in range(ct.cdiv(DWp.shape[0], BLOCK_G)):
            dw += ct.load(DWp, (i, j), (BLOCK_G, BLOCK_N), padding_mode=ZERO)
            db += ct.load(DBp, (i, j), (BLOCK_G, BLOCK_N), padding_mode=ZERO)
        ct.store(DW, (j,), ct.sum(dw, axis=0))
        ct.store(DB, (j,), ct.sum(db, axis=0))


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _blocks(n: int, rows_per_block: int | None, tile_elems: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): how many rows a block takes at once, and the padded row length."""
    if n > MAX_N:
        raise ValueError(f"layer_norm: last dimension {n} is larger than the supported {MAX_N}")
    block_n = _pow2(n)
    return (rows_per_block or max(1, tile_elems // block_n)), block_n


def _grid(m: int, block_m: int, blocks_per_sm: int | None, device) -> int:
    """One block per row tile, or at most blocks_per_sm blocks per SM looping over them."""
    tiles = -(-m // block_m)
    if blocks_per_sm is None:
        return tiles
    return min(tiles, blocks_per_sm * torch.cuda.get_device_properties(device).multi_processor_count)


def _vector(v, n: int, fill: float, like: torch.Tensor):
    """v detached and contiguous, or `fill` repeated n times when v is None."""
    if v is None:
        return torch.full((n,), fill, device=like.device, dtype=torch.float32)
    return v.detach().contiguous()


def _rows(t, n: int):
    """t as contiguous (M, n) rows, detached: ct.launch takes a slow path for tensors that
    require grad (measured: the autograd forward took 54 us instead of 19 us)."""
    return t.detach().reshape(-1, n).contiguous()


def layer_norm_forward(x, weight, bias, eps=1e-5, persistent=False, rows_per_block=None,
                       blocks_per_sm=FWD_BLOCKS_PER_SM):
    """y = (x - mean) * rstd * weight + bias over the last dim; also the fp32 mean and rstd.

    persistent: `blocks_per_sm` blocks per SM loop over the row tiles, instead of one block per
    tile. rows_per_block: rows per tile, a power of two (default: FWD_TILE_ELEMS elements a tile).
    """
    kernels.require()
    n = x.shape[-1]
    block_m, block_n = _blocks(n, rows_per_block, FWD_TILE_ELEMS)
    x2 = _rows(x, n)
    m = x2.shape[0]
    w, b = _vector(weight, n, 1.0, x), _vector(bias, n, 0.0, x)
    y = torch.empty_like(x2)
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    if m:
        grid = _grid(m, block_m, blocks_per_sm if persistent else None, x.device)
        ct.launch(torch.cuda.current_stream(), (grid,),
                  _fwd_kernel, (x2, w, b, y, mean, rstd, float(eps), block_m, block_n))
    lead = x.shape[:-1]
    return y.reshape(x.shape), mean.reshape(lead), rstd.reshape(lead)


def layer_norm_backward(dy, x, weight, mean, rstd, rows_per_block=None,
                        blocks_per_sm=BWD_BLOCKS_PER_SM):
    """(dx, dweight, dbias) from the saved fp32 mean and rstd; dweight and dbias in fp32.

    Always persistent: each of the `blocks_per_sm` blocks per SM writes one partial row.
    """
    kernels.require()
    n = x.shape[-1]
    block_m, block_n = _blocks(n, rows_per_block, BWD_TILE_ELEMS)
    x2, dy2 = _rows(x, n), _rows(dy, n)
    m = x2.shape[0]
    w = _vector(weight, n, 1.0, x)
    dx = torch.empty_like(x2)
    if m == 0:
        return dx.reshape(x.shape), x.new_zeros(n, dtype=torch.float32), x.new_zeros(n, dtype=torch.float32)
    g = _grid(m, block_m, blocks_per_sm, x.device)
    dwp = torch.empty(g, n, device=x.device, dtype=torch.float32)  # every block writes its row
    dbp = torch.empty_like(dwp)
    dw = torch.empty(n, device=x.device, dtype=torch.float32)
    db = torch.empty(n, device=x.device, dtype=torch.float32)
    stream = torch.cuda.current_stream()
    mean, rstd = mean.detach().reshape(-1), rstd.detach().reshape(-1)
    ct.launch(stream, (g,), _bwd_kernel, (dy2, x2, w, mean, rstd, dx, dwp, dbp, block_m, block_n))
    ct.launch(stream, (-(-n // REDUCE_BLOCK_N),), _colsum_kernel,
              (dwp, dbp, dw, db, min(32, _pow2(g)), REDUCE_BLOCK_N))
    return dx.reshape(x.shape), dw, db


class LayerNorm(torch.autograd.Function):
    """Autograd for the cuTile LayerNorm: saves x, weight and the fp32 statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, persistent):
        y, mean, rstd = layer_norm_forward(x, weight, bias, eps, persistent)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_backward(dy, x, weight, mean, rstd)
        dw = None if weight is None else dw.to(weight.dtype)
        db = None if ctx.bias_dtype is None else db.to(ctx.bias_dtype)
        return dx, dw, db, None, None


def layer_norm(x, weight, bias, eps=1e-5, persistent=None):
    """LayerNorm over the last dim, differentiable in x, weight and bias (either may be None).

    persistent=None takes the persistent grid, the faster variant at every measured shape.
    """
    return LayerNorm.apply(x, weight, bias, eps, persistent is not False)


def export_for_check(out_dir, gpu_code="sm_90") -> list[str]:
    """Compile the forward, backward and reduction kernels ahead of time (no GPU needed).

    Covers every dtype and a few padded widths, so a kernel that stops compiling fails on CPU.
    Returns the paths of the cubins written under `out_dir`.
    """
    if ct is None:
        kernels.require()
    from cuda.tile import compilation as cc

    from kernels.aot import array_param, ct_dtype, dtype_name, export

    f32, scalar = ct.float32, cc.ScalarConstraint(ct.float32)
    stat, part = array_param(f32, 1), array_param(f32, 2)
    jobs = []
    for dtype, n in [(torch.float16, 768), (torch.bfloat16, 1000), (torch.float32, 4096)]:
        mat, vec = array_param(ct_dtype(dtype), 2), array_param(ct_dtype(dtype), 1)
        name = f"{dtype_name(dtype)}_{n}"
        jobs.append((_fwd_kernel, f"layernorm_fwd_{name}",
                     [mat, vec, vec, mat, stat, stat, scalar, *_blocks(n, None, FWD_TILE_ELEMS)]))
        jobs.append((_bwd_kernel, f"layernorm_bwd_{name}",
                     [mat, mat, vec, stat, stat, mat, part, part, *_blocks(n, None, BWD_TILE_ELEMS)]))
    jobs.append((_colsum_kernel, "layernorm_colsum", [part, part, stat, stat, 32, REDUCE_BLOCK_N]))
    return [export(kernel, name, params, out_dir, gpu_code) for kernel, name, params in jobs]
