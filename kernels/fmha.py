"""Flash attention (forward and backward) in cuTile, causal or not, for (B, H, T, D) tensors.

The forward pass keeps an online softmax in fp32 (exp2, with log2(e) folded into the scale) and
also returns the log-sum-exp of every query row, which lets the backward pass rebuild the softmax
tile by tile instead of storing it. The backward pass is two kernels: dQ (one block per query
tile, looping over key tiles), which also writes each row's delta = rowsum(dO * O), then dK/dV
(one block per key tile, looping over query tiles), which reads it; so no block needs an atomic
add (cuTile's atomic_add is per element: a dK/dV kernel that added dQ with it measured 1.6-7x
slower, docs/fmha-notes.md). With fused_dq=1 the dK/dV kernel adds dQ itself through a tiled
view's atomic_store_add, a bulk tensor reduce-add (UTMAREDG on sm_90) of a whole tile into an fp32
buffer, and a last kernel scales it (delta then takes a kernel of its own, before): two matmuls
fewer per pair of tiles, at the price of dQ bits that vary with the order of the adds; measured,
it pays only at D=64 and long sequences (docs/fmha-notes.md). The tile
config (tile_m, tile_n, k_lat, v_lat, occupancy, num_ctas, num_worker_warps, head_group) steers
the forward kernel, fused_dq picks the backward; the backward kernels keep their own measured
tiles and latencies (see _bwd_config).

Causal query tiles differ in work by up to T / tile_n times, so blocks start longest-first: the grid
is (head_group, query tiles, B*H / head_group), and the hardware dispatches the longest tile of
`head_group` heads before any shorter one of them. 1 keeps each head's tiles together (K and V of
few heads live in L2 at once); 0 takes all heads at once, the shortest tail. Between them, a group
whose tiles fill the GPU's block slots once or twice keeps both: 3-5% at D=128 (the dK/dV kernel
takes its groups that way, and so does dQ's at D=128; docs/fmha-notes.md, "Head groups").

Masked scores are set to the fp32 floor -1e20 rather than -inf, so no row can turn into NaN.
Causal blocks stop at the diagonal and build a mask only on the tiles that cross it (or that run
past the end of the sequence).
"""
from __future__ import annotations

import functools
import math
import os

import torch

from kernels import require, tuned
from kernels.config import FMHA_DEFAULTS as DEFAULT_CONFIG
from kernels.config import validate_fmha as validate_config
from kernels.launch import launch, sm_count
from kernels.reference import MASK_FLOOR

try:
    import cuda.tile as ct
except Exception:  # no cuda-tile here: the kernels stay undefined and require() says why
    ct = None

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


def _config(tile_m, tile_n, occupancy, k_lat=2, v_lat=5, num_worker_warps=None, head_group=1):
    return {**DEFAULT_CONFIG, "tile_m": tile_m, "tile_n": tile_n, "k_lat": k_lat, "v_lat": v_lat,
            "occupancy": occupancy, "num_worker_warps": num_worker_warps, "head_group": head_group}


# The forward tile configs worth sweeping (sweeps/fmha.yaml is written from this list): the winners
# of the H100 and H200 runs in docs/fmha-notes.md and their neighbours. 128-row tiles need 8 worker
# warps (two warpgroups of 64 rows): with the compiler's choice they measured 1.3-2.4x slower.
SWEEP_CONFIGS = [
    DEFAULT_CONFIG,
    _config(64, 64, 4),
    _config(64, 64, 4, head_group=0),
    _config(64, 128, 2),
    _config(64, 128, 2, head_group=8),
    _config(64, 128, 2, head_group=16),
    _config(64, 128, 2, 3, 3),
    _config(64, 128, 2, 3, 3, head_group=0),
    _config(64, 128, 4),
    _config(128, 64, 2, 2, 2, num_worker_warps=8, head_group=0),
    _config(128, 64, 2, 2, 4, num_worker_warps=8, head_group=0),
    _config(128, 128, 1, num_worker_warps=8),
]


def tuned_config(q, causal: bool) -> dict:
    """The forward config kernels/tuned remembers for q's GPU, dtype, head dim and length, else
    DEFAULT_CONFIG (shared: do not change it)."""
    _, _, t, d = q.shape
    return tuned.lookup("fmha_fwd" if causal else "fmha_fwd_full", q.get_device(), q.dtype, d, t)


def _check_inputs(q, k, v, scale):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, T, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must all be float16 or all bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim D={d}: expected a power of two in [16, 256]")
    if q.shape[2] < 1:
        raise ValueError("sequence length T must be at least 1")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number, got {scale}")


def _lead_dim_contiguous(x):
    """The kernels read any strides, but the tensor-memory loads want a unit stride along D."""
    return x if x.stride(-1) == 1 else x.contiguous()


if ct is not None:
    ConstInt = ct.Constant[int]
    ConstBool = ct.Constant[bool]
    ZERO = ct.PaddingMode.ZERO

    def _head_tile(A, b, h, i, ROWS, D):
        """Rows i*ROWS.. of head (b, h) of a (B, H, T, D) tensor as a (ROWS, D) tile, zero past T."""
        return ct.load(A, index=(b, h, i, 0), shape=(1, 1, ROWS, D), padding_mode=ZERO).reshape((ROWS, D))

    def _query_block():
        """(query tile, batch*head) of this block in the (head_group, query tiles, B*H / head_group)
        grid, the longest causal tiles first."""
        return ct.num_blocks(1) - 1 - ct.bid(1), ct.bid(2) * ct.num_blocks(0) + ct.bid(0)

    def _key_block():
        """(key tile, batch*head) of this block in the same grid, the first (longest causal) first."""
        return ct.bid(1), ct.bid(2) * ct.num_blocks(0) + ct.bid(0)

    def _key_tiles(m_blk, t, TILE_M, TILE_N, CAUSAL):
        """(end, mask_from): the key tiles query tile m_blk visits, and the first that needs a mask
        (causal blocks stop at the diagonal; a tile past the end of the sequence is masked too)."""
        if CAUSAL:
            return (ct.cdiv(min((m_blk + 1) * TILE_M, t), TILE_N),
                    min(m_blk * TILE_M // TILE_N, t // TILE_N))
        return ct.cdiv(t, TILE_N), t // TILE_N

    def _masked(x, rows, cols, t, CAUSAL, fill):
        """x with `fill` where a key may not be seen: above the diagonal (which also drops keys past
        the end for every real query row), or past the end of the sequence."""
        if CAUSAL:
            return ct.where(rows >= cols, x, fill)
        return ct.where(cols < t, x, fill)

    def _attend(q, K, V, b, h, j, m_i, l_i, acc, rows, cols0, t, scale_log2, D, TILE_N, K_LAT, V_LAT,
                CAUSAL, MASKED):
        """The online softmax's (m_i, l_i, acc) after key tile j of width TILE_N, masked where
        MASKED: true for a tile the mask reaches, and a constant false where none can."""
        kt = ct.load(K, index=(b, h, 0, j), shape=(1, 1, D, TILE_N), order=(0, 1, 3, 2),
                     padding_mode=ZERO, latency=K_LAT).reshape((D, TILE_N))
        s = ct.mma(q, kt, ct.zeros((q.shape[0], TILE_N), dtype=ct.float32))
        if MASKED:
            s = _masked(s, rows, j * TILE_N + cols0, t, CAUSAL, MASK_FLOOR)
        # the scale multiplies the row max, not the whole tile: one fma per score below
        m_new = ct.maximum(m_i, ct.max(s, axis=-1, keepdims=True) * scale_log2)
        p = ct.exp2(s * scale_log2 - m_new, flush_to_zero=True)
        alpha = ct.exp2(m_i - m_new, flush_to_zero=True)
        l_i = l_i * alpha + ct.sum(p, axis=-1, keepdims=True)
        vt = ct.load(V, index=(b, h, j, 0), shape=(1, 1, TILE_N, D),
                     padding_mode=ZERO, latency=V_LAT).reshape((TILE_N, D))
        return m_new, l_i, ct.mma(p.astype(q.dtype), vt, acc * alpha)

    @ct.kernel
    def _fwd_kernel(Q, K, V, Out, Lse, scale_log2: float,
                    H: ConstInt, D: ConstInt, TILE_M: ConstInt, TILE_N: ConstInt,
                    CAUSAL: ConstBool, EVEN_N: ConstBool, K_LAT: ConstInt, V_LAT: ConstInt):
        """One block per (query tile, batch*head): out = softmax(q k^T * scale) v, and the row lse.

        Causal, where the block's last row sees only the first half of its last key tile (every
        other 64-row block under 128-key tiles, and short sequences), that tile is taken as one
        of half the width: 2-3% of the time at 8 x 1024, D=128, on an H100."""
        m_blk, bh = _query_block()
        b, h = bh // H, bh % H
        t = K.shape[2]
        q = _head_tile(Q, b, h, m_blk, TILE_M, D)
        rows = (m_blk * TILE_M + ct.arange(TILE_M, dtype=ct.int32))[:, None]
        cols0 = ct.arange(TILE_N, dtype=ct.int32)[None, :]
        m_i = ct.full((TILE_M, 1), -math.inf, dtype=ct.float32)
        l_i = ct.zeros((TILE_M, 1), dtype=ct.float32)
        acc = ct.zeros((TILE_M, D), dtype=ct.float32)
        n_end, mask_from = _key_tiles(m_blk, t, TILE_M, TILE_N, CAUSAL)
        HALF = TILE_N // 2
        HALF_TAIL = CAUSAL and HALF >= 16  # a constant: the last key tile may be taken at half width
        n_full = n_end
        if HALF_TAIL:
            seen = min((m_blk + 1) * TILE_M, t) - (n_end - 1) * TILE_N  # keys of the last tile: 1..TILE_N
            n_full = n_end - 1 + (seen - 1) // HALF
        for j in range(n_full):
            m_i, l_i, acc = _attend(q, K, V, b, h, j, m_i, l_i, acc, rows, cols0, t, scale_log2, D, TILE_N,
                                    K_LAT, V_LAT, CAUSAL, (CAUSAL or not EVEN_N) and j >= mask_from)
        if HALF_TAIL and n_full < n_end:
            m_i, l_i, acc = _attend(q, K, V, b, h, 2 * n_full, m_i, l_i, acc, rows,
                                    ct.arange(HALF, dtype=ct.int32)[None, :], t, scale_log2, D, HALF,
                                    K_LAT, V_LAT, CAUSAL, True)
        out = ct.truediv(acc, l_i, flush_to_zero=True, rounding_mode=ct.RoundingMode.APPROX)
        ct.store(Out, index=(b, h, m_blk, 0), tile=out.astype(Out.dtype).reshape((1, 1, TILE_M, D)))
        lse = (m_i + ct.log2(l_i)) * LN2
        ct.store(Lse, index=(b, h, m_blk), tile=lse.reshape((1, 1, TILE_M)))

    def _row_delta(o, do):
        """rowsum(dO * O) in fp32 of (ROWS, D) tiles: the softmax backward's per-row correction."""
        return ct.sum(o.astype(ct.float32) * do.astype(ct.float32), axis=-1)

    @ct.kernel
    def _bwd_delta_kernel(Out, dOut, Delta, H: ConstInt, D: ConstInt, TILE_M: ConstInt):
        """delta of a query tile, for the fused dK/dV kernel (unfused, the dQ kernel writes it)."""
        b, h = ct.bid(1) // H, ct.bid(1) % H
        o = ct.load(Out, index=(b, h, ct.bid(0), 0), shape=(1, 1, TILE_M, D), padding_mode=ZERO)
        do = ct.load(dOut, index=(b, h, ct.bid(0), 0), shape=(1, 1, TILE_M, D), padding_mode=ZERO)
        ct.store(Delta, index=(b, h, ct.bid(0)), tile=_row_delta(o, do))

    @ct.kernel
    def _bwd_dkdv_kernel(Q, K, V, dOut, Lse, Delta, dK, dV, DQacc, scale_log2: float, scale: float,
                         H: ConstInt, D: ConstInt, TILE_M: ConstInt, TILE_N: ConstInt,
                         CAUSAL: ConstBool, K_LAT: ConstInt, V_LAT: ConstInt, FUSED_DQ: ConstBool):
        """One block per (key tile, batch*head), in transposed form (keys along rows):
        dV = P^T dO and dK = scale * dS^T Q, summed over the query tiles that see this key tile.
        With FUSED_DQ it also adds each query tile's share of dQ / scale, dS K, into the fp32
        DQacc by a bulk tensor reduce-add (TMA), so no dQ kernel has to compute S and dP again;
        without it DQacc is not touched.

        Query rows past the end need no mask: q, dO, lse and delta load as zeros there, so their
        p is 1 and both their dO and their dP - delta are 0 (and the reduce-add drops them). Key
        rows past the end (without the causal mask) get p = exp(-lse), inf where the scores are
        far below zero: dK and dV drop those rows, but dQ sums over them, so the fused kernel
        masks them."""
        n_blk, bh = _key_block()
        b, h = bh // H, bh % H
        t = Q.shape[2]
        kt = _head_tile(K, b, h, n_blk, TILE_N, D)
        vt = _head_tile(V, b, h, n_blk, TILE_N, D)
        cols = (n_blk * TILE_N + ct.arange(TILE_N, dtype=ct.int32))[:, None]  # key positions
        rows0 = ct.arange(TILE_M, dtype=ct.int32)[None, :]
        dk = ct.zeros((TILE_N, D), dtype=ct.float32)
        dv = ct.zeros((TILE_N, D), dtype=ct.float32)
        m_start = n_blk * TILE_N // TILE_M if CAUSAL else 0
        diag_end = ct.cdiv((n_blk + 1) * TILE_N, TILE_M)  # query tiles before it cross the diagonal
        for i in range(m_start, ct.cdiv(t, TILE_M)):
            qi = ct.load(Q, index=(b, h, i, 0), shape=(1, 1, TILE_M, D), padding_mode=ZERO,
                         latency=K_LAT).reshape((TILE_M, D))
            do = ct.load(dOut, index=(b, h, i, 0), shape=(1, 1, TILE_M, D), padding_mode=ZERO,
                         latency=V_LAT).reshape((TILE_M, D))
            lse = ct.load(Lse, index=(b, h, i), shape=(1, 1, TILE_M), padding_mode=ZERO)
            delta = ct.load(Delta, index=(b, h, i), shape=(1, 1, TILE_M), padding_mode=ZERO)
            st = ct.mma(kt, ct.transpose(qi), ct.zeros((TILE_N, TILE_M), dtype=ct.float32))
            pt = ct.exp2(st * scale_log2 - lse.reshape((1, TILE_M)) * LOG2E, flush_to_zero=True)
            if CAUSAL and i < diag_end:
                pt = ct.where(i * TILE_M + rows0 >= cols, pt, 0.0)
            if FUSED_DQ and not CAUSAL and (n_blk + 1) * TILE_N > t:
                pt = ct.where(cols < t, pt, 0.0)  # keys past the end: their p may be inf
            dv = ct.mma(pt.astype(Q.dtype), do, dv)
            dpt = ct.mma(vt, ct.transpose(do), ct.zeros((TILE_N, TILE_M), dtype=ct.float32))
            dst = (pt * (dpt - delta.reshape((1, TILE_M)))).astype(Q.dtype)
            dk = ct.mma(dst, qi, dk)
            if FUSED_DQ:
                dqi = ct.mma(ct.transpose(dst), kt, ct.zeros((TILE_M, D), dtype=ct.float32))
                DQacc.tiled_view((1, 1, TILE_M, D)).atomic_store_add(
                    (b, h, i, 0), dqi.reshape((1, 1, TILE_M, D)))
        ct.store(dK, index=(b, h, n_blk, 0), tile=(dk * scale).astype(dK.dtype).reshape((1, 1, TILE_N, D)))
        ct.store(dV, index=(b, h, n_blk, 0), tile=dv.astype(dV.dtype).reshape((1, 1, TILE_N, D)))

    @ct.kernel
    def _bwd_dq_kernel(Q, K, V, Out, dOut, Lse, Delta, dQ, scale_log2: float, scale: float,
                       H: ConstInt, D: ConstInt, TILE_M: ConstInt, TILE_N: ConstInt,
                       CAUSAL: ConstBool, EVEN_N: ConstBool, K_LAT: ConstInt, V_LAT: ConstInt):
        """One block per (query tile, batch*head): dQ = scale * dS K over the key tiles it sees,
        and delta for the dK/dV kernel, which runs after it."""
        m_blk, bh = _query_block()
        b, h = bh // H, bh % H
        t = K.shape[2]
        q = _head_tile(Q, b, h, m_blk, TILE_M, D)
        do = _head_tile(dOut, b, h, m_blk, TILE_M, D)
        lse = ct.load(Lse, index=(b, h, m_blk), shape=(1, 1, TILE_M), padding_mode=ZERO)
        lse2 = lse.reshape((TILE_M, 1)) * LOG2E
        delta = _row_delta(_head_tile(Out, b, h, m_blk, TILE_M, D), do)
        ct.store(Delta, index=(b, h, m_blk), tile=delta.reshape((1, 1, TILE_M)))
        delta = delta.reshape((TILE_M, 1))
        rows = (m_blk * TILE_M + ct.arange(TILE_M, dtype=ct.int32))[:, None]
        cols0 = ct.arange(TILE_N, dtype=ct.int32)[None, :]
        dq = ct.zeros((TILE_M, D), dtype=ct.float32)
        n_end, mask_from = _key_tiles(m_blk, t, TILE_M, TILE_N, CAUSAL)
        for j in range(n_end):
            kj = ct.load(K, index=(b, h, j, 0), shape=(1, 1, TILE_N, D), padding_mode=ZERO,
                         latency=K_LAT).reshape((TILE_N, D))
            vt = ct.load(V, index=(b, h, 0, j), shape=(1, 1, D, TILE_N), order=(0, 1, 3, 2),
                         padding_mode=ZERO, latency=V_LAT).reshape((D, TILE_N))
            s = ct.mma(q, ct.transpose(kj), ct.zeros((TILE_M, TILE_N), dtype=ct.float32))
            p = ct.exp2(s * scale_log2 - lse2, flush_to_zero=True)
            if (CAUSAL or not EVEN_N) and j >= mask_from:
                p = _masked(p, rows, j * TILE_N + cols0, t, CAUSAL, 0.0)
            dp = ct.mma(do, vt, ct.zeros((TILE_M, TILE_N), dtype=ct.float32))
            ds = p * (dp - delta)
            dq = ct.mma(ds.astype(Q.dtype), kj, dq)
        ct.store(dQ, index=(b, h, m_blk, 0), tile=(dq * scale).astype(dQ.dtype).reshape((1, 1, TILE_M, D)))

    @ct.kernel
    def _bwd_dq_scale_kernel(DQacc, dQ, scale: float, H: ConstInt, D: ConstInt, TILE_M: ConstInt):
        """dQ = scale * DQacc in dQ's dtype and layout: the last step of the fused backward."""
        b, h = ct.bid(1) // H, ct.bid(1) % H
        acc = ct.load(DQacc, index=(b, h, ct.bid(0), 0), shape=(1, 1, TILE_M, D), padding_mode=ZERO)
        ct.store(dQ, index=(b, h, ct.bid(0), 0), tile=(acc * scale).astype(dQ.dtype))

    _KERNELS = {"fwd": _fwd_kernel, "delta": _bwd_delta_kernel, "dkdv": _bwd_dkdv_kernel,
                "dq": _bwd_dq_kernel, "dq_scale": _bwd_dq_scale_kernel}


@functools.lru_cache(maxsize=None)
def _hinted(name: str, occupancy: int, num_ctas: int, num_worker_warps: int | None):
    """The kernel with these compiler hints, built once (each hinted copy has its own JIT cache)."""
    hints = {"occupancy": occupancy, "num_ctas": num_ctas}
    if num_worker_warps:
        hints["num_worker_warps"] = num_worker_warps
    return _KERNELS[name].replace_hints(**hints)


def _launch(name, grid, args, cfg):
    kernel = _hinted(name, cfg["occupancy"], cfg["num_ctas"], cfg["num_worker_warps"])
    launch(args[0].device, grid, kernel, args)


def _head_grid(device, t: int, rows: int, bh: int, cfg: dict) -> tuple:
    """The (head_group, tiles, B*H / head_group) grid of _query_block and _key_block. A head_group
    that does not divide B*H shrinks to its largest divisor below it (0: all of B*H). None, the
    backward kernels' choice, takes as many heads (at most 16) as fill the GPU's block slots (SMs x
    occupancy) once with their tiles, where a head has 8 tiles or more; with fewer, the tiles
    differ little in work and each head keeps its own (docs/fmha-notes.md, "Head groups")."""
    g, tiles = cfg["head_group"], math.ceil(t / rows)
    if g is None:
        g = 1 if tiles < 8 else min(16, max(1, sm_count(device) * cfg["occupancy"] // tiles))
    g = bh if g == 0 else max(d for d in range(1, min(g, bh) + 1) if bh % d == 0)
    return g, tiles, bh // g


def _forward(q, k, v, causal, scale, cfg, out=None):
    """(out, lse); `out` may be given, in any layout with a unit stride along D."""
    b, h, t, d = q.shape
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    tm, tn = cfg["tile_m"], cfg["tile_n"]
    _launch("fwd", _head_grid(q.device, t, tm, b * h, cfg),
            (q, k, v, out, lse, scale * LOG2E, h, d, tm, tn, causal, causal or t % tn == 0,
             cfg["k_lat"], cfg["v_lat"]), cfg)
    return out, lse


@functools.lru_cache(maxsize=None)
def _bwd_config(d):
    """Each backward kernel's own launch config ({kernel: config}, shared: do not change it) for
    head dim d: the tile config
    steers the forward kernel only, so one build of the backward serves every forward config.
    Measured on an H100
    (docs/fmha-notes.md): dK/dV ran fastest with 64 key rows per block, 128 query rows a loop step
    (for D=64; 8192 / D in general, past which it spills registers) and occupancy 2, whatever
    suited the forward. dQ, at D=64: 64 x 64 tiles, occupancy 3, all heads' longest tiles first
    (4-14% faster than dK/dV's shape); at D=128: 128-row blocks of 8 worker warps, occupancy 1
    (15-17% faster). 2-CTA clusters broke both (misaligned address).

    The same knobs measured again on an H200 found nothing faster. The fused dQ (fused_dq=1) takes
    64-row query steps, since the dQ share of a step sits in registers beside dK and dV; at D=64,
    128 keys a block in 8 worker warps (half the reduce-adds of 64-key blocks) measured fastest
    on an H200. It scales dQ in 64-row tiles. dK/dV, and dQ at D=128, take their heads in groups
    that fill the GPU once (head_group None, see _head_grid): 4-9% faster backwards at 1024 and
    4096 tokens than each head alone."""
    step = min(128, 8192 // d)
    base = {"k_lat": 2, "v_lat": 5, "num_ctas": 1, "num_worker_warps": None, "head_group": None}
    dkdv = {**base, "block": 64, "step": step, "occupancy": 2}
    dq = {64: {**base, "block": 64, "step": 64, "occupancy": 3, "head_group": 0},
          128: {**base, "block": 128, "step": 64, "occupancy": 1, "num_worker_warps": 8}}.get(d, dkdv)
    fused = {**dkdv, "step": 64}
    if d == 64:
        fused.update(block=128, occupancy=1, num_worker_warps=8)
    return {"delta": dkdv, "dkdv": dkdv, "dq": dq, "dkdv_dq": fused, "dq_scale": dkdv}


def _backward(dout, q, k, v, out, lse, causal, scale, cfg, grads=None):
    """(dq, dk, dv); `grads` may give them, in any layout with a unit stride along D.

    fused_dq=0: dQ and delta (a separate delta pass took 15 us of GPT-2's 150 us attention
    backward at 8 x 1024 on an H200), then dK/dV, which computes S and dP again (7 matmuls per
    pair of tiles, and bitwise the same dQ every run). fused_dq=1: the dK/dV kernel adds dQ
    into an fp32 buffer by bulk reduce-adds (5 matmuls; the order of the adds, so dQ's last bits,
    varies from run to run)."""
    b, h, t, d = q.shape
    cfgs = _bwd_config(d)
    delta = torch.empty_like(lse)
    fused = cfg["fused_dq"]
    kv, qc, dc = cfgs["dkdv_dq" if fused else "dkdv"], cfgs["dq"], cfgs["delta"]
    lat = (kv["k_lat"], kv["v_lat"])
    dq, dk, dv = grads or (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    if fused:
        _launch("delta", (math.ceil(t / dc["block"]), b * h, 1), (out, dout, delta, h, d, dc["block"]), dc)
    else:
        _launch("dq", _head_grid(q.device, t, qc["block"], b * h, qc),
                (q, k, v, out, dout, lse, delta, dq, scale * LOG2E, scale, h, d, qc["block"], qc["step"],
                 causal, causal or t % qc["step"] == 0, *lat), qc)
    # the fp32 buffer the fused kernel adds into; unfused, a placeholder it does not touch
    dq_acc = torch.zeros((b, h, t, d), dtype=torch.float32, device=q.device) if fused else dq
    _launch("dkdv", _head_grid(q.device, t, kv["block"], b * h, kv),
            (q, k, v, dout, lse, delta, dk, dv, dq_acc, scale * LOG2E, scale, h, d, kv["step"],
             kv["block"], causal, *lat, bool(fused)), kv)
    if fused:
        sc = cfgs["dq_scale"]
        _launch("dq_scale", (math.ceil(t / sc["block"]), b * h, 1),
                (dq_acc, dq, scale, h, d, sc["block"]), sc)
    return dq, dk, dv


def _prepare(q, k, v, causal, scale, tile_config):
    """Checked inputs, the scale, and the tile config: the caller's, or else the tuned one."""
    cfg = validate_config(tile_config) if tile_config else None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    _check_inputs(q, k, v, scale)
    require()
    if not q.is_cuda:
        raise ValueError("q, k, v must be CUDA tensors")
    return [_lead_dim_contiguous(x) for x in (q, k, v)], scale, cfg or tuned_config(q, causal)


def fmha_forward(q, k, v, causal: bool = True, scale: float | None = None, **tile_config):
    """(out, lse): attention output like q and the fp32 (B, H, T) log-sum-exp; no autograd.
    Without a tile config, the tuned one for this GPU and shape (kernels/tuned.py)."""
    (q, k, v), scale, cfg = _prepare(q, k, v, causal, scale, tile_config)
    return _forward(q, k, v, bool(causal), scale, cfg)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, cfg):
        out, lse = _forward(q, k, v, causal, scale, cfg)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.cfg = causal, scale, cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale, ctx.cfg)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, causal: bool = True, scale: float | None = None, **tile_config):
    """softmax(q k^T * scale, causal mask) v for (B, H, T, D) fp16/bf16 tensors, differentiable.
    Without a tile config, the tuned one for this GPU and shape (kernels/tuned.py)."""
    (q, k, v), scale, cfg = _prepare(q, k, v, causal, scale, tile_config)
    return _FlashAttention.apply(q, k, v, bool(causal), scale, cfg)


def _heads(qkv, n_head: int):
    """q, k, v as (B, H, T, D) views into a (B, T, 3C) c_attn output (or its gradient): no copy."""
    b, t, c3 = qkv.shape
    return qkv.view(b, t, 3, n_head, c3 // (3 * n_head)).permute(2, 0, 3, 1, 4).unbind(0)


def qkv_forward(qkv, n_head: int, scale: float, cfg=None):
    """(out, lse, cfg): causal attention of the q, k, v in a (B, T, 3C) tensor, out as
    (B, T, H, D) (a (B, T, C) tensor viewed by head), lse (B, H, T) fp32, and the tile config it
    ran (the tuned one if cfg is None); the kernel reads and writes those layouts through strided
    views."""
    b, t, c3 = qkv.shape
    q, k, v = _heads(qkv, n_head)
    cfg = cfg or tuned_config(q, True)
    out = torch.empty((b, t, n_head, c3 // (3 * n_head)), dtype=qkv.dtype, device=qkv.device)
    _, lse = _forward(q, k, v, True, scale, cfg, out=out.transpose(1, 2))
    return out, lse, cfg


def qkv_backward(dy, qkv, out, lse, n_head: int, scale: float, cfg):
    """The (B, T, 3C) gradient of qkv_forward's input from dy, the gradient of its out (any shape
    of B*T*C contiguous elements); dq, dk and dv are written straight into it."""
    dqkv = torch.empty_like(qkv)
    dout = dy.contiguous().view(out.shape).transpose(1, 2)
    _backward(dout, *_heads(qkv, n_head), out.transpose(1, 2), lse, True, scale, cfg,
              grads=_heads(dqkv, n_head))
    return dqkv


class _AttentionQKV(torch.autograd.Function):
    """Causal attention from a (B, T, 3C) qkv tensor to a (B, T, C) output, with the kernels reading
    and writing those layouts through strided views: no transposes, no .contiguous() copies, and
    the backward writes dq, dk and dv straight into one (B, T, 3C) gradient."""

    @staticmethod
    def forward(ctx, qkv, n_head, scale, cfg):
        out, lse, _ = qkv_forward(qkv, n_head, scale, cfg)
        ctx.save_for_backward(qkv, out, lse)
        ctx.n_head, ctx.scale, ctx.cfg = n_head, scale, cfg
        return out.view(qkv.shape[0], qkv.shape[1], -1)

    @staticmethod
    def backward(ctx, dy):
        qkv, out, lse = ctx.saved_tensors
        return qkv_backward(dy, qkv, out, lse, ctx.n_head, ctx.scale, ctx.cfg), None, None, None


def attention_qkv(qkv, n_head: int, scale: float | None = None, **tile_config):
    """Causal softmax(q k^T * scale) v of the q, k, v packed in a (B, T, 3C) tensor (GPT-2's c_attn
    output), as a (B, T, C) tensor, differentiable."""
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * n_head):
        raise ValueError(f"qkv must be (B, T, 3C) with C a multiple of n_head={n_head}, got {tuple(qkv.shape)}")
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    _, scale, cfg = _prepare(*_heads(qkv, n_head), True, scale, tile_config)
    return _AttentionQKV.apply(qkv, n_head, scale, cfg)


def _signatures(config: dict, dtype, head_dim: int, causal: bool, num_heads: int):
    """(name, launch config, KernelSignature) for every kernel, with the masked (uneven T) paths."""
    from cuda.tile.compilation import CallingConvention, KernelSignature, ScalarConstraint

    from kernels.aot import array_param, ct_dtype

    cfg = validate_config(config)
    x, row = array_param(ct_dtype(dtype), 4), array_param(ct.float32, 3)
    acc = array_param(ct.float32, 4)
    f32 = ScalarConstraint(ct.float32)
    h, d = num_heads, head_dim
    bwd = _bwd_config(d)
    fused = bool(cfg["fused_dq"])
    kv, qc, sc = bwd["dkdv_dq" if fused else "dkdv"], bwd["dq"], bwd["dq_scale"]
    lat = (kv["k_lat"], kv["v_lat"])
    params = {
        "fwd": (cfg, [x, x, x, x, row, f32, h, d, cfg["tile_m"], cfg["tile_n"], causal, causal,
                      cfg["k_lat"], cfg["v_lat"]]),
        "dkdv": (kv, [x, x, x, x, row, row, x, x, acc if fused else x, f32, f32, h, d, kv["step"],
                      kv["block"], causal, *lat, fused]),
    }
    if fused:
        params["delta"] = (bwd["delta"], [x, x, row, h, d, bwd["delta"]["block"]])
        params["dq_scale"] = (sc, [acc, x, f32, h, d, sc["block"]])
    else:
        params["dq"] = (qc, [x, x, x, x, x, row, row, x, f32, f32, h, d, qc["block"], qc["step"], causal,
                             causal, *lat])
    cc = CallingConvention.cutile_python_v2()
    return [(name, c, KernelSignature(p, cc).with_mangled_symbol(name)) for name, (c, p) in params.items()]


def export_for_check(config: dict, dtype=torch.float16, head_dim: int = 64, causal: bool = True,
                     out_dir: str = ".", gpu_code: str = "sm_90", num_heads: int = 12,
                     only=("fwd", "delta", "dkdv", "dq", "dq_scale")) -> list[str]:
    """Compile every kernel (or those named in `only`) of one tile config ahead of time (no GPU
    needed): the forward, dK/dV, and dQ or (fused_dq=1) delta and the dQ scale; the cubin paths.

    Raises whatever tileiras raises when a kernel no longer compiles for this config.
    """
    if ct is None:
        require()
    from cuda.tile.compilation import export_kernel

    cfg = validate_config(config)
    tag = "_".join(f"{k}{cfg[k]}" for k in sorted(cfg) if cfg[k] is not None)
    paths = []
    for name, kcfg, sig in _signatures(cfg, dtype, head_dim, causal, num_heads):
        if name not in only:
            continue
        path = os.path.join(out_dir, f"fmha_{name}_{tag}_d{head_dim}_{'causal' if causal else 'full'}.cubin")
        kernel = _hinted(name, kcfg["occupancy"], kcfg["num_ctas"], kcfg["num_worker_warps"])
        export_kernel(kernel, [sig], path, gpu_code=gpu_code, output_format="cubin")
        paths.append(path)
    return paths
