"""LayerNorm over the last dimension as cuTile kernels: forward, backward and an autograd Function.

Each block normalises a tile of `rows_per_block` rows held whole in registers, so the statistics
are a two-pass mean and variance in fp32 (exact for inputs with a large offset) at the cost of a
single read of x. A row is read as one power-of-two tile with the padding masked, or as a few
power-of-two chunks of columns (768 = 3 x 256) with nothing padded. Two variants share one
forward kernel: a grid of one block per row tile, or a persistent grid of a few blocks per SM that
loop over the row tiles. The backward writes dx and one partial dweight/dbias row per block, then
a second kernel sums the partial rows; it is launched as a programmatic dependent of the first, so
its launch overlaps the first kernel's tail and it waits on the GPU for the partial rows.
"""

import functools

import torch

import kernels
from kernels import tuned
from kernels.config import LAYERNORM_BWD_DEFAULTS as BWD_CONFIG, LAYERNORM_FWD_DEFAULTS as FWD_CONFIG
from kernels.config import LAYERNORM_MAX_N as MAX_N
from kernels.config import validate_layernorm_bwd as validate_bwd_config
from kernels.config import validate_layernorm_fwd as validate_fwd_config
from kernels.launch import grid_size, launch, rows, rows_to_fill, sm_count
from kernels.tile_ops import widen

try:
    import cuda.tile as ct
except Exception:  # no cuda-tile here: the public functions raise through kernels.require()
    ct = None

FWD_TILE_ELEMS = 8192
# The backward reads a row as one padded tile: in chunks (as the forward does) it measured 2-3x
# slower on an H100. A tile holds 16 KB of x (8192 fp16 or 4096 fp32 elements), and 2 blocks per
# SM with an occupancy hint of 2 (BWD_CONFIG) run the persistent grid: at 8192 x 768 fp16 that
# measured 26-28 us against 36-37 us for 4096-element tiles and 1 block per SM, and 40-42 against
# 60 us at 16384 x 768 (docs/layernorm-notes.md).
BWD_TILE_BYTES = 16 << 10
BWD_VECTOR_MIN_COLS = 1024  # padded row width from which the backward stores its partial rows AS_VECTOR
# The dweight/dbias reduction sums the partial rows in steps of a 2048-element tile, 32 columns a
# block, or 16 for rows of 16 or fewer: at 13 columns the backward then took 14.2-14.3 us against
# 16.8 with 32 x 32 steps (8192 rows; 4096 and 16384 rows 8-13% less), at 64 and 128 columns
# 0.5-1.5% less, at 768 the same (fp16, H100, 2026-12-06; docs/layernorm-notes.md)
COLSUM_TILE_ELEMS = 2048
# Narrow rows fill a tile with more rows than pay: at 13 columns (padded to 16, 512 rows a tile)
# the backward took 69-79 us against 15-18 with 64 rows, the forward 19-22 against 7-8; at 64
# columns 64 rows were within 5% of 128 (fp16, 257 and 8192 rows, H100, 2026-12-06)
MAX_BLOCK_ROWS = 64
# and a short input's backward takes fewer rows a tile (to 16) while its tiles number under half the
# SMs: 257 x 13 fp16 ran 9.0 us in 16-row tiles against 15.2 in 64-row ones (5 blocks), while at 8192
# rows (128 tiles) 32-row tiles were 0.86-1.05x as fast as 64-row ones (H100, 2026-12-06)
BWD_MIN_TILES_PER_SM = 0.5

if ct is not None:
    ConstInt = ct.Constant[int]
    ConstBool = ct.Constant[bool]
    ZERO = ct.PaddingMode.ZERO

    def _row(a, c, BLOCK_N):
        """Columns c*BLOCK_N.. of a length-N vector as a (1, BLOCK_N) fp32 tile, zero past N."""
        return ct.reshape(ct.astype(ct.load(a, (c,), (BLOCK_N,), padding_mode=ZERO), ct.float32),
                          (1, BLOCK_N))

    def _col(a, t, BLOCK_M):
        """Rows t*BLOCK_M.. of a length-M vector as a (BLOCK_M, 1) tile, zero past M."""
        return ct.reshape(ct.load(a, (t,), (BLOCK_M,), padding_mode=ZERO), (BLOCK_M, 1))

    def _vector_chunks(V, CHUNK, NCHUNK):
        """A length-N vector as NCHUNK (1, CHUNK) fp32 tiles, zero past N."""
        out = ()
        for c in ct.static_iter(range(NCHUNK)):
            out += (_row(V, c, CHUNK),)
        return out

    def _row_chunks(A, t, BLOCK_M, CHUNK, NCHUNK, LATENCY):
        """Row tile t of an (M, N) array as NCHUNK fp32 (BLOCK_M, CHUNK) tiles, zero past M and N;
        LATENCY 0 lets the compiler infer the loads' latency."""
        out = ()
        for c in ct.static_iter(range(NCHUNK)):
            tile = ct.load(A, (t, c), (BLOCK_M, CHUNK), padding_mode=ZERO,
                           latency=ct.static_eval(LATENCY or None))
            out += (widen(tile),)
        return out

    def _partial_row(acc, CHUNK, AS_VECTOR):
        """A (1, CHUNK) accumulator as a (1, 1, CHUNK) tile of Part. AS_VECTOR takes it by way of
        its sum over the one row (the same values as a 1-D tile): the accumulators are then laid
        out so that the backward ran 10-39% faster at 768 to 4096 columns in fp16 and bf16, and
        3-7% slower at 384 (H100; docs/layernorm-notes.md)."""
        if AS_VECTOR:
            return ct.reshape(ct.sum(acc, axis=0), (1, 1, CHUNK))
        return ct.reshape(acc, (1, 1, CHUNK))

    def _inside(d, c, NCHUNK, RAGGED, last):
        """d, zeroed past N when it is the ragged last chunk."""
        if RAGGED and c == NCHUNK - 1:
            return ct.where(last, d, 0.0)
        return d

    # A row is NCHUNK tiles of CHUNK columns held in registers at once (unrolled at compile time),
    # so N need not be a power of two to be read without padding; only the last chunk can stick
    # out past N (RAGGED), and only it is masked.
    @ct.kernel
    def _fwd_kernel(X, R, RB, S, W, B, Y, Mean, Rstd, eps, BLOCK_M: ConstInt, CHUNK: ConstInt,
                    NCHUNK: ConstInt, RAGGED: ConstBool, LATENCY: ConstInt, HAS_RES: ConstBool,
                    HAS_RB: ConstBool, HAS_B: ConstBool, HAS_STATS: ConstBool):
        """Y = LayerNorm(X) (+ B with HAS_B), or with HAS_RES: S = X + R (+ RB, R's bias, a vector,
        with HAS_RB; stored) and Y = LayerNorm(S). With HAS_STATS, each row's mean and rstd too."""
        n = X.shape[1]
        last = ct.reshape(ct.arange(CHUNK, dtype=ct.int32) + (NCHUNK - 1) * CHUNK < n, (1, CHUNK))
        w, b = _vector_chunks(W, CHUNK, NCHUNK), _vector_chunks(B, CHUNK, NCHUNK)
        rb = _vector_chunks(RB, CHUNK, NCHUNK)
        for t in range(ct.bid(0), ct.cdiv(X.shape[0], BLOCK_M), ct.num_blocks(0)):
            x = _row_chunks(X, t, BLOCK_M, CHUNK, NCHUNK, LATENCY)
            if HAS_RES:
                r = _row_chunks(R, t, BLOCK_M, CHUNK, NCHUNK, LATENCY)
                summed = ()
                for c in ct.static_iter(range(NCHUNK)):
                    summed += (x[c] + r[c] + rb[c] if HAS_RB else x[c] + r[c],)
                    ct.store(S, (t, c), ct.astype(summed[c], S.dtype))
                x = summed
            total = ct.zeros((BLOCK_M, 1), dtype=ct.float32)
            for c in ct.static_iter(range(NCHUNK)):
                total += ct.sum(x[c], axis=1, keepdims=True)
            mean = total / n
            xc = ()
            squares = ct.zeros((BLOCK_M, 1), dtype=ct.float32)
            for c in ct.static_iter(range(NCHUNK)):
                xc += (_inside(x[c] - mean, c, NCHUNK, RAGGED, last),)
                squares += ct.sum(xc[c] * xc[c], axis=1, keepdims=True)
            rstd = ct.rsqrt(squares / n + eps)
            for c in ct.static_iter(range(NCHUNK)):
                y = xc[c] * rstd * w[c]
                ct.store(Y, (t, c), ct.astype(y + b[c] if HAS_B else y, Y.dtype))
            # Not by TMA: so stored, some chunked configs (16384 x 768 fp16, 8 or 16 rows of 256-
            # column chunks) left a few rows' statistics wrong on 18-29% of calls while y was right
            # (H200, tileiras 13.x); stored plainly, none in 1,000 calls, at 3.5% of the time at worst.
            if HAS_STATS:
                ct.store(Mean, (t,), ct.reshape(mean, (BLOCK_M,)), allow_tma=False)
                ct.store(Rstd, (t,), ct.reshape(rstd, (BLOCK_M,)), allow_tma=False)

    @ct.kernel
    def _bwd_kernel(DY, X, W, Mean, Rstd, DRes, DX, DR, Part, BLOCK_M: ConstInt, CHUNK: ConstInt,
                    NCHUNK: ConstInt, AS_VECTOR: ConstBool, HAS_DRES: ConstBool, HAS_DR: ConstBool,
                    SUM_DX: ConstBool):
        """dx for each row tile (plus DRes, the gradient reaching x by the residual path, with
        HAS_DRES; with HAS_DR also written to DR, in DR's dtype), and this block's partial rows,
        Part[k, block]: k = 0 dweight, 1 dbias, and with SUM_DX 2, the column sums of dx."""
        n = X.shape[1]
        # dy and w are zero past N, so xhat needs no mask there: every sum takes it times one of
        # them, and dx past N is never stored.
        w = _vector_chunks(W, CHUNK, NCHUNK)
        dw, db, ds = (), (), ()
        for c in ct.static_iter(range(NCHUNK)):
            dw += (ct.zeros((1, CHUNK), dtype=ct.float32),)
            db += (ct.zeros((1, CHUNK), dtype=ct.float32),)
            if SUM_DX:
                ds += (ct.zeros((1, CHUNK), dtype=ct.float32),)
        for t in range(ct.bid(0), ct.cdiv(X.shape[0], BLOCK_M), ct.num_blocks(0)):
            x = _row_chunks(X, t, BLOCK_M, CHUNK, NCHUNK, 0)
            dy = _row_chunks(DY, t, BLOCK_M, CHUNK, NCHUNK, 0)
            mean = _col(Mean, t, BLOCK_M)
            rstd = _col(Rstd, t, BLOCK_M)  # zero on padding rows, so they contribute nothing
            xhat, wdy = (), ()
            for c in ct.static_iter(range(NCHUNK)):
                xhat += ((x[c] - mean) * rstd,)
                wdy += (w[c] * dy[c],)
            c1 = ct.sum(xhat[0] * wdy[0], axis=1, keepdims=True)
            c2 = ct.sum(wdy[0], axis=1, keepdims=True)
            for c in ct.static_iter(range(1, NCHUNK)):
                c1 += ct.sum(xhat[c] * wdy[c], axis=1, keepdims=True)
                c2 += ct.sum(wdy[c], axis=1, keepdims=True)
            # dx = (wdy - xhat c1 - c2) rstd as two fused multiply-adds an element, not three
            # operations: the compiler does not reassociate (3-4% of the time at 8192 x 768, H100)
            a, b = c1 / n * rstd, c2 / n * rstd
            new_dw, new_db, new_ds = (), (), ()
            for c in ct.static_iter(range(NCHUNK)):
                dx = wdy[c] * rstd - (xhat[c] * a + b)
                if HAS_DRES:
                    dx = dx + ct.astype(ct.load(DRes, (t, c), (BLOCK_M, CHUNK), padding_mode=ZERO),
                                        ct.float32)
                ct.store(DX, (t, c), ct.astype(dx, DX.dtype))
                if HAS_DR:
                    ct.store(DR, (t, c), ct.astype(dx, DR.dtype))
                new_dw += (dw[c] + ct.sum(dy[c] * xhat[c], axis=0, keepdims=True),)
                new_db += (db[c] + ct.sum(dy[c], axis=0, keepdims=True),)
                # dx is zero on padding rows (dy, DRes and rstd are); padding columns are never stored
                if SUM_DX:
                    new_ds += (ds[c] + ct.sum(dx, axis=0, keepdims=True),)
            dw, db, ds = new_dw, new_db, new_ds
        for c in ct.static_iter(range(NCHUNK)):
            ct.store(Part, (0, ct.bid(0), c), _partial_row(dw[c], CHUNK, AS_VECTOR))
            ct.store(Part, (1, ct.bid(0), c), _partial_row(db[c], CHUNK, AS_VECTOR))
            if SUM_DX:
                ct.store(Part, (2, ct.bid(0), c), _partial_row(ds[c], CHUNK, AS_VECTOR))

    @ct.kernel
    def _colsum_kernel(Part, Out, BLOCK_G: ConstInt, BLOCK_N: ConstInt):
        """Out[k, j-th tile] = the sum over i of Part[k, i, j-th tile], k the grid's second index;
        launched as a programmatic dependent of the kernel that writes the partial rows, so it
        waits for them."""
        ct.grid_dependency_control_wait()
        j, k = ct.bid(0), ct.bid(1)
        acc = ct.zeros((BLOCK_G, BLOCK_N), dtype=ct.float32)
        for i in range(ct.cdiv(Part.shape[1], BLOCK_G)):
            acc += ct.reshape(ct.load(Part, (k, i, j), (1, BLOCK_G, BLOCK_N), padding_mode=ZERO),
                              (BLOCK_G, BLOCK_N))
        ct.store(Out, (k, j), ct.reshape(ct.astype(ct.sum(acc, axis=0), Out.dtype), (1, BLOCK_N)))


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _check_width(n: int) -> None:
    if n > MAX_N:
        raise ValueError(f"layer_norm: last dimension {n} is larger than the supported {MAX_N}")


def _rows_for(tile_elems: int, width: int) -> int:
    """The largest power of two of rows of `width` elements that fit in `tile_elems`, at least 1
    and at most MAX_BLOCK_ROWS."""
    return min(MAX_BLOCK_ROWS, 1 << (max(1, tile_elems // width).bit_length() - 1))


def _chunk(n: int, chunk: int | None) -> int:
    """Columns per load: `chunk` (at most pow2(n)), or else whichever of pow2(n), its half and its
    quarter pads a row least, the widest on a tie (768 -> 3 x 256, 1000 -> 1 x 1024). Rows of
    more than four chunks measured slower than one padded chunk."""
    p = _pow2(n)
    if chunk:
        return min(chunk, p)
    return min((c for c in (p, p // 2, p // 4) if c >= 16 or c == p), key=lambda c: (-(-n // c) * c, -c))


@functools.lru_cache(maxsize=None)
def _shape(n: int, rows_per_block: int | None, chunk: int | None, tile_elems: int) -> tuple[int, int, int, bool]:
    """(BLOCK_M, CHUNK, NCHUNK, RAGGED) of a kernel for rows of n elements."""
    _check_width(n)
    chunk = _chunk(n, chunk)
    nchunk = -(-n // chunk)
    return rows_per_block or _rows_for(tile_elems, chunk * nchunk), chunk, nchunk, n % chunk != 0


def _fwd_shape(n: int, cfg: dict, m: int, sms: int) -> tuple[int, int, int, bool]:
    """(BLOCK_M, CHUNK, NCHUNK, RAGGED) of the forward kernel for m rows of n under cfg on `sms`
    SMs; unless cfg names the rows, a tile's rows halve (to 16) while there would be fewer tiles
    than the persistent grid has blocks."""
    block_m, chunk, nchunk, ragged = _shape(n, cfg["rows_per_block"], cfg["chunk"], FWD_TILE_ELEMS)
    # 16-row tiles were the fastest or within 0.3 us of it at 257-8192 rows of 13, 64 and 128
    # columns, 0.5-1.1 us (9-17%) faster than 64-row ones (fp16, H100, 2026-12-06)
    if cfg["rows_per_block"] is None:
        block_m = rows_to_fill(block_m, m, 1, cfg["blocks_per_sm"] * sms)
    return block_m, chunk, nchunk, ragged


def _bwd_shape(n: int, cfg: dict, x_size: int, m: int, sms: int) -> tuple:
    """(BLOCK_M, CHUNK, NCHUNK, AS_VECTOR) of the backward kernel for m rows of n elements of
    x_size bytes on `sms` SMs under cfg; a row is one padded tile unless cfg names a chunk."""
    rows_per_block = cfg["rows_per_block"]
    block_m, chunk, nchunk, _ = _shape(n, rows_per_block, cfg["chunk"] or _pow2(n), BWD_TILE_BYTES // x_size)
    if rows_per_block is None:
        block_m = rows_to_fill(block_m, m, 1, int(BWD_MIN_TILES_PER_SM * sms))
    return block_m, chunk, nchunk, chunk * nchunk >= BWD_VECTOR_MIN_COLS


def _colsum_shape(n: int, g: int) -> tuple[int, int]:
    """(BLOCK_G, BLOCK_N) of the column sum of g partial rows of n columns."""
    block_n = 16 if n <= 16 else 32
    return min(_pow2(g), COLSUM_TILE_ELEMS // block_n), block_n


@functools.lru_cache(maxsize=None)
def _hinted(kernel, occupancy: int | None, num_worker_warps: int | None = None):
    """The kernel with these compiler hints, built once (each copy has its own JIT cache)."""
    hints = {"occupancy": occupancy, "num_worker_warps": num_worker_warps}
    return kernel.replace_hints(**{k: v for k, v in hints.items() if v is not None})


def _fwd_hinted(cfg: dict, persistent: bool):
    """The forward kernel as cfg runs it: on the persistent grid the occupancy hint, unless the
    config names one, is the grid's blocks per SM (the launch and the ahead-of-time check alike)."""
    occupancy = cfg["occupancy"] or (cfg["blocks_per_sm"] if persistent else None)
    return _hinted(_fwd_kernel, occupancy, cfg["num_worker_warps"])


def tuned_config(x, kernel: str = "layernorm_fwd") -> dict:
    """The config kernels/tuned remembers for this kernel (layernorm_fwd or layernorm_bwd) on x's
    GPU, dtype, width and row count, else its defaults, FWD_CONFIG or BWD_CONFIG (shared: do not
    change it)."""
    n = x.shape[-1]
    return tuned.lookup(kernel, x.get_device(), x.dtype, n, x.numel() // max(1, n))


def _vector(v, n: int, fill: float, like: torch.Tensor):
    """v contiguous, or `fill` repeated n times when v is None."""
    if v is None:
        return torch.full((n,), fill, device=like.device, dtype=torch.float32)
    return v.contiguous()


def _forward(x, weight, bias, eps, persistent, cfg, residual=None, y_dtype=None, residual_bias=None,
             stats=True):
    """(y shaped like x, mean, rstd, s): the statistics flat over the rows of the (M, N) view; with
    a residual, s = x + residual (+ residual_bias, a vector) in the wider dtype of the two is
    normalised and returned too. y is in y_dtype (default: x's). stats=False: no backward will
    read the statistics, so none are stored (mean and rstd come back None)."""
    n = x.shape[-1]
    x2 = rows(x, n)
    m = x2.shape[0]
    block_m, chunk, nchunk, ragged = _fwd_shape(n, cfg, m, sm_count(x.device))
    y = torch.empty_like(x2, dtype=y_dtype or x.dtype)
    mean = torch.empty(m if stats else 1, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32) if stats else mean  # never read
    r2 = s = x2
    w = _vector(weight, n, 1.0, x)
    b = w if bias is None else bias.contiguous()  # w stands in for what is not there, never read
    rb = w if residual_bias is None else residual_bias.contiguous()
    if residual is not None:
        r2 = rows(residual, n)
        s = torch.empty_like(x2, dtype=torch.promote_types(x.dtype, residual.dtype))
    if m:
        grid = (grid_size(-(-m // block_m), cfg["blocks_per_sm"] if persistent else None, x.device),)
        launch(x.device, grid, _fwd_hinted(cfg, persistent),
               (x2, r2, rb, s, w, b, y, mean, rstd, float(eps), block_m, chunk, nchunk, ragged,
                cfg["latency"] or 0, residual is not None, residual_bias is not None, bias is not None,
                stats))
    shaped = (lambda a: a) if x.dim() == 2 else (lambda a: a.view(x.shape))
    return shaped(y), mean if stats else None, rstd if stats else None, shaped(s)


def layer_norm_forward(x, weight, bias, eps=1e-5, persistent=True, **config):
    """y = (x - mean) * rstd * weight + bias over the last dim; also the fp32 mean and rstd.

    persistent: `blocks_per_sm` blocks per SM loop over the row tiles (the default, as layer_norm's:
    11.6 us at 8192 x 768 fp16 on an H100 against 22.2 for one block per tile). config: keys of
    FWD_CONFIG (tile shape and compiler hints), the rest from its defaults; without any, the tuned
    config for this GPU and shape (kernels/tuned.py).
    """
    cfg = validate_fwd_config(config) if config else None
    kernels.require()
    y, mean, rstd, _ = _forward(x, weight, bias, eps, persistent, cfg or tuned_config(x))
    if x.dim() == 2:
        return y, mean, rstd
    return y, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


def layer_norm_backward(dy, x, weight, mean, rstd, grad_dtype=torch.float32, dres=None, dr_dtype=None,
                        sum_dx=False, **config):
    """(dx, dweight, dbias, dr, dsum) from the saved fp32 mean and rstd; dweight and dbias in
    grad_dtype, summed in fp32; dx in x's dtype, plus `dres` (the gradient reaching x by another
    path) if given. dr: dx in dr_dtype, written by the same pass (dx itself if that is x's dtype
    or None). dsum: with sum_dx, dx's column sums in grad_dtype (a residual bias's gradient), else None.

    Always persistent: each of the `blocks_per_sm` blocks per SM writes one partial row.
    config: keys of BWD_CONFIG (rows_per_block; chunk, columns per load as in the forward, None
    reading a row as one padded tile; blocks_per_sm), the rest from its defaults; without any, the
    tuned config for this GPU and shape (kernels/tuned.py).
    """
    cfg = validate_bwd_config(config) if config else None
    kernels.require()
    cfg = cfg or tuned_config(x, "layernorm_bwd")
    n = x.shape[-1]
    x2, dy2 = rows(x, n), rows(dy, n)
    m = x2.shape[0]
    shape = _bwd_shape(n, cfg, x.element_size(), m, sm_count(x.device))
    dx = torch.empty_like(x2)
    dr = dx if dr_dtype in (None, x.dtype) else torch.empty_like(x2, dtype=dr_dtype)
    sums = torch.empty(3 if sum_dx else 2, n, device=x.device, dtype=grad_dtype)  # summed in fp32
    if m == 0:
        sums.zero_()
    else:
        g = grid_size(-(-m // shape[0]), cfg["blocks_per_sm"], x.device)
        part = torch.empty(sums.shape[0], g, n, device=x.device, dtype=torch.float32)  # a row per block
        stats = [t if t.dim() == 1 else t.reshape(-1) for t in (mean, rstd)]
        dres2 = dx if dres is None else rows(dres, n)
        launch(x.device, (g,), _hinted(_bwd_kernel, cfg["blocks_per_sm"]),
               (dy2, x2, _vector(weight, n, 1.0, x), *stats, dres2, dx, dr, part, *shape,
                dres is not None, dr is not dx, sum_dx))
        block_g, block_n = _colsum_shape(n, g)
        launch(x.device, (-(-n // block_n), sums.shape[0]), _colsum_kernel,
               (part, sums, block_g, block_n), dependent=True)
    dw, db, *dsum = sums.unbind()
    if x.dim() != 2:
        dx, dr = dx.view(x.shape), dr.view(x.shape)
    return dx, dw, db, dr, dsum[0] if sum_dx else None


class LayerNorm(torch.autograd.Function):
    """Autograd for the cuTile LayerNorm: saves x, weight and the fp32 statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, persistent, cfg, bwd_cfg):
        # under no_grad (inference) no backward reads the statistics: they are not stored
        y, mean, rstd, _ = _forward(x, weight, bias, eps, persistent, cfg or tuned_config(x),
                                    stats=any(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has = (weight is not None, bias is not None)
        ctx.grad_dtype = next((t.dtype for t in (weight, bias) if t is not None), torch.float32)
        ctx.bwd_cfg = bwd_cfg or {}
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db, _, _ = layer_norm_backward(dy, x, weight, mean, rstd, ctx.grad_dtype, **ctx.bwd_cfg)
        return dx, dw if ctx.has[0] else None, db if ctx.has[1] else None, None, None, None, None


class AddLayerNorm(torch.autograd.Function):
    """Autograd for the residual add fused into the LayerNorm: (s = x + r + r_bias,
    y = LayerNorm(s)). The backward adds the gradient that reaches s from later layers in the same
    pass that writes dx, and writes r's gradient (dx in r's dtype) and r_bias's (dx's column sums)
    there too. Without r, s is x itself."""

    @staticmethod
    def forward(ctx, x, r, r_bias, weight, bias, eps, y_dtype):
        y, mean, rstd, s = _forward(x, weight, bias, eps, True, tuned_config(x), residual=r,
                                    y_dtype=y_dtype, residual_bias=r_bias,
                                    stats=any(ctx.needs_input_grad[:5]))
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.has = (weight is not None, bias is not None, r_bias is not None)
        ctx.grad_dtype = next((t.dtype for t in (weight, bias) if t is not None), torch.float32)
        ctx.r_dtype = None if r is None else r.dtype
        ctx.set_materialize_grads(False)
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        s, weight, mean, rstd = ctx.saved_tensors
        if dy is None:  # y unused: only the residual path's gradient flows
            dy = torch.zeros_like(s)
        dx, dw, db, dr, drb = layer_norm_backward(dy, s, weight, mean, rstd, ctx.grad_dtype, dres=ds,
                                                  dr_dtype=ctx.r_dtype, sum_dx=ctx.has[2])
        return (dx, None if ctx.r_dtype is None else dr, drb, dw if ctx.has[0] else None,
                db if ctx.has[1] else None, None, None)


def add_layer_norm(x, residual, weight, bias, eps=1e-5, residual_bias=None):
    """(x + residual + residual_bias, LayerNorm of it) in one pass, differentiable; residual_bias
    (N,) or None is the bias of the layer that made `residual`, added here instead. Under autocast
    the normalised output is written in the autocast dtype, which is what the next Linear reads
    anyway. residual None: (x, LayerNorm of x), for a caller that carries x on as its residual
    stream; x's gradient from both is then summed in the backward's one pass, not by autograd."""
    kernels.require()
    y_dtype = kernels.autocast_dtype(x.device.type, None)
    return AddLayerNorm.apply(x, residual, residual_bias, weight, bias, eps, y_dtype)


def layer_norm(x, weight, bias, eps=1e-5, persistent=None, backward=None, **config):
    """LayerNorm over the last dim, differentiable in x, weight and bias (either may be None).

    persistent=None takes the persistent grid, the faster variant at every measured shape.
    config: the forward kernel's launch config (keys of FWD_CONFIG), as for layer_norm_forward;
    backward: the backward kernel's (keys of BWD_CONFIG), as for layer_norm_backward; without
    either, the tuned one. The backward reads the statistics that forward saved.
    """
    cfg = validate_fwd_config(config) if config else None
    if backward:
        validate_bwd_config(backward)
    kernels.require()
    return LayerNorm.apply(x, weight, bias, eps, persistent is not False, cfg, backward)


def _fwd_job(config: dict, dtype, n: int, residual: bool = False, bias: bool = True,
             persistent: bool = True, stats: bool = True, stream: bool = False) -> tuple:
    """(kernel, cubin name, signature params) of the forward kernel for rows of n under a config,
    with the residual add (a float32 residual stream, and its bias) or without, with a LayerNorm
    bias or without, for the persistent grid (what layer_norm and the tuned configs run) or the
    grid of one block per tile, storing the statistics (training) or not (inference). stream: no
    residual, x a float32 stream normalised into dtype (add_layer_norm without one)."""
    from cuda.tile import compilation as cc

    from kernels.aot import array_param, ct_dtype, dtype_name

    mat, vec = array_param(ct_dtype(dtype), 2), array_param(ct_dtype(dtype), 1)
    wide = array_param(ct.float32, 2) if residual or stream else mat
    stat = array_param(ct.float32, 1)
    cfg = validate_fwd_config(config)
    shape = _fwd_shape(n, cfg, 8192, 132)
    tag = "".join(f"_{k}{v}" for k, v in sorted(config.items()))
    return (_fwd_hinted(cfg, persistent),
            f"layernorm_fwd_{dtype_name(dtype)}_{n}{tag}" + ("_add" if residual else "")
            + ("_stream" if stream else "") + ("" if bias else "_nobias") + ("" if persistent else "_plain")
            + ("" if stats else "_nostats"),
            [wide, wide if stream else mat, vec, wide, vec, vec, mat, stat, stat, cc.ScalarConstraint(ct.float32),
             *shape, cfg["latency"] or 0, residual, residual, bias, stats])


def _bwd_job(config: dict, dtype, n: int, residual: bool = False, stream: bool = False) -> tuple:
    """(kernel, cubin name, signature params) of the backward kernel for rows of n under a config;
    with the residual: a float32 stream, the branch's gradient in dtype, its bias's sums; stream:
    a float32 stream whose own gradient is added to dx, with no branch."""
    from kernels.aot import array_param, ct_dtype, dtype_name

    mat, stat = array_param(ct_dtype(dtype), 2), array_param(ct.float32, 1)
    wide = array_param(ct.float32, 2) if residual or stream else mat
    cfg = validate_bwd_config(config)
    tag = "".join(f"_{k}{v}" for k, v in sorted(config.items()))
    return (_hinted(_bwd_kernel, cfg["blocks_per_sm"]),
            f"layernorm_bwd_{dtype_name(dtype)}_{n}{tag}" + ("_add" if residual else "")
            + ("_stream" if stream else ""),
            [mat, wide, array_param(ct_dtype(dtype), 1), stat, stat, wide, wide, mat if residual else wide,
             array_param(ct.float32, 3), *_bwd_shape(n, cfg, 4 if residual or stream else dtype.itemsize, 8192, 132),
             residual or stream, residual, residual])


def export_config(kernel: str, config: dict, dtype, n: int, out_dir, gpu_code="sm_90") -> list[str]:
    """Compile the forward (kernel "layernorm_fwd") or backward ("layernorm_bwd") kernel of one
    config for rows of n ahead of time; [the cubin path]."""
    if ct is None:
        kernels.require()
    from kernels.aot import export

    job = {"layernorm_fwd": _fwd_job, "layernorm_bwd": _bwd_job}[kernel]
    return [export(*job(config, dtype, n), out_dir, gpu_code)]


def export_for_check(out_dir, gpu_code="sm_90") -> list[str]:
    """Compile the forward, backward and reduction kernels ahead of time (no GPU needed).

    Covers every dtype and a few padded widths, so a kernel that stops compiling fails on CPU.
    Returns the paths of the cubins written under `out_dir`.
    """
    if ct is None:
        kernels.require()
    from kernels.aot import array_param, ct_dtype, dtype_name, export

    part = array_param(ct.float32, 3)
    # 384 columns: the partial rows stored as they are (not AS_VECTOR)
    jobs = [_bwd_job({}, torch.float16, 384, residual) for residual in (False, True)]
    # the last two: a ragged last chunk, and every compiler hint set
    for dtype, n, config in [(torch.float16, 768, {}), (torch.bfloat16, 1000, {}),
                             (torch.float32, 4096, {}), (torch.float16, 1000, {"chunk": 256}),
                             (torch.bfloat16, 768, {"chunk": 256, "occupancy": 2,
                                                    "num_worker_warps": 8, "latency": 8})]:
        jobs.append(_fwd_job(config, dtype, n))
        if not config:
            jobs.append(_fwd_job(config, dtype, n, persistent=False))
            jobs.append(_fwd_job(config, dtype, n, stats=False))
            jobs.append(_fwd_job(config, dtype, n, residual=True))
            jobs.append(_fwd_job(config, dtype, n, residual=True, bias=False))
            jobs.append(_fwd_job(config, dtype, n, stream=True))
            jobs += [_bwd_job({}, dtype, n, residual) for residual in (False, True)]
            jobs.append(_bwd_job({}, dtype, n, stream=True))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # the sums in the weights' dtype
        for n in (13, 768):  # both tiles of a 264-block grid
            block_g, block_n = _colsum_shape(n, 264)
            jobs.append((_colsum_kernel, f"layernorm_colsum_{dtype_name(dtype)}_{block_n}",
                         [part, array_param(ct_dtype(dtype), 2), block_g, block_n]))
    return [export(kernel, name, params, out_dir, gpu_code) for kernel, name, params in jobs]
