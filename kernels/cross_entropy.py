"""The LM head and its cross-entropy by row chunks, with cuTile kernels for the softmax: the logits
of all tokens are never held at once (for GPT-2 at 8 x 1024 tokens they are 8192 x 50304 values,
824 MB in fp16, 1.6 GB once upcast).

For each chunk of rows the forward pass computes the chunk's logits and overwrites them in place
with S * (softmax - onehot), with each row's loss; two more matmuls turn that into the chunk's
share of the gradients of the input rows and of the head's weight. For a large vocabulary in fp16
or bf16 the logits come from a cuTile matmul that also stores each (row, column tile)'s max and
sum of exponentials, so the softmax pass reads and writes each logit once; otherwise cuBLAS
computes them and one kernel reads them twice (each row's slices' stats, then the softmax).
S is K in fp16, which keeps softmax values clear of subnormals, and the mean's 1/count in other
dtypes, so that the backward pass, which scales both gradients by the incoming gradient, has
nothing to do when that gradient is 1. The weight's gradient, a sum over all rows that grows with
how often a token occurs, is accumulated by matmuls that write fp32, so it cannot overflow,
except for a bf16 weight: bf16 has fp32's range, and its gradient is accumulated in bf16 (fp32
inside each chunk's matmul, one rounding per chunk), which halves the bytes each chunk's matmul
and the backward's scale move.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

import kernels
from kernels.adamw import grad_slot
from kernels.launch import launch, sm_count
from kernels.linear import WeightCasts, cast, mm_acc, sum_partials, tile_matmul_fits
from kernels.tile_ops import matmul_tile

try:
    import cuda.tile as ct
except Exception:  # no cuda-tile here: linear_cross_entropy raises through kernels.require()
    ct = None

LOG2E = 1.0 / math.log(2.0)
K = 256.0  # fp16's stored softmax gradient's scale, told no loss_grad: a probability of 1e-5 stays normal
# logits held at once, the head's working memory beside its fp32 weight gradient (154 MB for GPT-2),
# which each chunk reads and writes, so fewer chunks move fewer bytes: the GPT-2 step (8 x 1024
# tokens, graphed, H100) took 20.85 / 19.72 / 19.41 / 19.45 ms with chunks of 128 / 256 / 512 /
# 1024 MB. A caller short of memory passes a smaller chunk_bytes.
CHUNK_BYTES = 512 << 20
# Each block reads one PART_V-column slice of a row and stores its max and sum of exponentials; the
# row's last block to finish combines the slices' and rewrites the row, which its other blocks have
# just read, from L2: one read of the logits from memory instead of two. Loaded by gathers: the same
# kernel with tile (TMA) loads took 1.07 ms, and the previous one-row-per-block kernel (two passes
# over the row) 1.02 ms, against 0.76 ms, on 8192 x 50304 bf16 logits (H200, 2026-12-04). Its
# exponentials are exp2 with flush-to-zero (one MUFU op each): ct.exp took 0.695 against 0.607 ms.
# Slices of 8192, rewritten 8192 at a time, 4 blocks an SM (of slices of 2048-16384, tiles of
# 1024-8192, 4-16 blocks, 4 or 8 warps): 0.580 against 0.658 ms for the previous 4096 / 2048 / 8 over
# four chunks of 2048 x 50304 bf16; the whole head 1.3-1.5% faster at 256 MiB chunks (H200).
PART_V, TILE_V, OCCUPANCY, WORKER_WARPS = 8192, 8192, 4, 4
# The logits matmul with the softmax's stats in its epilogue: persistent, (128, 256) tiles of 64-deep
# steps in 8 warps, one block an SM (the fastest of 9 tile configs). On one 2048 x 50304 bf16 chunk of
# GPT-2's head (H200, L2 flushed): 0.250 ms against cuBLAS's 0.221 for the logits alone, then 0.007
# for the rows' stats and 0.102 for the one-read softmax pass, against 0.154 for the two-read one.
# Masking the columns past V in every tile instead of the last cost 0.007 ms more; exponentials of
# the bf16 values instead of fp32 ones, 0.031 more.
GEMM_TILE_M, GEMM_TILE_N, GEMM_TILE_K, GEMM_WARPS = 128, 256, 64, 8
GEMM_MIN_V = 1024  # below this a 256-column tile is mostly padding: cuBLAS and the two-read pass
STATS_ROWS = 16  # rows a block of the row-stats kernel (8: 0.009 ms, 16 or 32: 0.007)
GRAD_PART_V, GRAD_OCCUPANCY, GRAD_WARPS = 4096, 2, 4  # the one-read pass: a block per row slice
ONE_HOT_MAX_V = 256  # the tied embedding's rows go in by a one-hot matmul up to this vocabulary
# its kernel: (BLOCK_T tokens, BLOCK_C columns) tiles, BLOCKS_PER_SM blocks per SM over (column tile,
# every G-th token tile) pairs. On an H200 (16384 tokens): 34 us at V = 65, C = 384 and 83 us at
# V = 256, C = 768, against 79 and 159 us for cuBLAS's fp32 product; 64-token tiles 33 and 194 us,
# 128-column tiles 49-56 and 262-354 us
ONE_HOT_BLOCK_T, ONE_HOT_BLOCK_C, ONE_HOT_BLOCKS_PER_SM = 32, 64, 2
SCALE_TILE = 8192  # elements a block of the dx scale kernel
EMBED_BLOCK_T, EMBED_BLOCK_C = 32, 128  # a block of the token + position embedding kernel

if ct is not None:
    ConstInt = ct.Constant[int]

    @ct.kernel
    def _softmax_grad_kernel(Logits, Targets, Loss, PartMax, PartSum, Done, Scale,
                             PARTS: ConstInt, PARTS_P2: ConstInt, PART_V: ConstInt, TILE_V: ConstInt):
        """Block (row, part) of a grid of rows * PARTS: the max and the sum of exp over its slice
        of the row, into PartMax and PartSum. The row's last block to count itself into Done
        writes loss = logsumexp(logits) - logits[target] and overwrites the row with
        S * (softmax - onehot(target)) (S = Scale[0]), both 0 where target < 0, and resets Done."""
        row, part = ct.bid(0) // PARTS, ct.bid(0) % PARTS
        cols = ct.arange(PART_V, dtype=ct.int32) + part * PART_V
        x = ct.astype(ct.gather(Logits, (row, cols), padding_value=-math.inf, latency=4), ct.float32)
        m = ct.max(x, 0)
        ct.scatter(PartMax, (row, part), m, check_bounds=False)
        ct.scatter(PartSum, (row, part), ct.sum(ct.exp2((x - m) * LOG2E, flush_to_zero=True), 0),
                   check_bounds=False)
        # acquire-release: the last block sees every slice's stats, and the others' reads of the
        # row are done before it overwrites the row
        done = ct.atomic_add(Done, row, 1, check_bounds=False, memory_order=ct.MemoryOrder.ACQ_REL,
                             memory_scope=ct.MemoryScope.DEVICE)
        if done != PARTS - 1:
            return
        parts = ct.arange(PARTS_P2, dtype=ct.int32)
        pm = ct.where(parts < PARTS, ct.gather(PartMax, (row, parts), check_bounds=False), -math.inf)
        ps = ct.where(parts < PARTS, ct.gather(PartSum, (row, parts), check_bounds=False), 0.0)
        mx = ct.max(pm, 0)
        total = ct.sum(ps * ct.exp2((pm - mx) * LOG2E, flush_to_zero=True), 0)
        target = ct.astype(ct.load(Targets, row, shape=()), ct.int32)
        valid = target >= 0
        picked = ct.astype(ct.gather(Logits, (row, ct.maximum(target, 0)), check_bounds=False), ct.float32)
        ct.scatter(Loss, row, ct.where(valid, ct.log(total) + mx - picked, 0.0))
        ct.scatter(Done, row, 0)  # ready for the next chunk without a memset
        scale = ct.load(Scale, 0, shape=())
        inv = scale / total
        cols0 = ct.arange(TILE_V, dtype=ct.int32)
        for j in range(ct.cdiv(Logits.shape[1], TILE_V)):
            c = cols0 + j * TILE_V
            y = ct.astype(ct.gather(Logits, (row, c), padding_value=-math.inf), ct.float32)
            grad = ct.exp2((y - mx) * LOG2E, flush_to_zero=True) * inv - ct.where(c == target, scale, 0.0)
            ct.scatter(Logits, (row, c), ct.astype(ct.where(valid, grad, 0.0), Logits.dtype))

    @ct.kernel
    def _logits_stats_kernel(X, W, Logits, TileMax, TileSum, V: int, TILE_M: ConstInt, TILE_N: ConstInt,
                             TILE_K: ConstInt):
        """Logits = X @ W^T over (TILE_M, TILE_N) tiles, each block looping over every num_blocks-th
        tile, a column of tiles at a time (W's tile stays in L2 for the next); TileMax[n, rows]
        and TileSum[n, rows]: each row's max and sum of exp(logit - max) over column tile n, of
        the logits as stored (rounded), columns >= V left out."""
        tiles_m, tiles_n = ct.cdiv(X.shape[0], TILE_M), ct.cdiv(W.shape[0], TILE_N)
        for t in range(ct.bid(0), tiles_m * tiles_n, ct.num_blocks(0)):
            m, n = t % tiles_m, t // tiles_m
            stored = ct.astype(matmul_tile(X, W, m, n, TILE_M, TILE_N, TILE_K, True), Logits.dtype)
            ct.store(Logits, (m, n), stored)
            x = ct.astype(stored, ct.float32)
            if n == tiles_n - 1:  # only the last column tile reaches past V
                cols = ct.arange(TILE_N, dtype=ct.int32) + n * TILE_N
                x = ct.where(cols[None, :] < V, x, -math.inf)
            mx = ct.max(x, 1)
            ct.store(TileMax, (n, m), ct.reshape(mx, (1, TILE_M)))
            ct.store(TileSum, (n, m), ct.reshape(ct.sum(ct.exp2((x - mx[:, None]) * LOG2E, flush_to_zero=True), 1),
                                                 (1, TILE_M)))

    @ct.kernel
    def _row_stats_kernel(TileMax, TileSum, Logits, Targets, Loss, RowMax, RowScale, Scale,
                          TILES_P2: ConstInt, ROWS: ConstInt):
        """For ROWS rows: the row's max and S / sum of exp over all its column tiles' stats, and
        loss = logsumexp(logits) - logits[target] (0 where target < 0)."""
        b = ct.bid(0)
        tmax = ct.load(TileMax, (0, b), (TILES_P2, ROWS), padding_mode=ct.PaddingMode.NEG_INF)
        tsum = ct.load(TileSum, (0, b), (TILES_P2, ROWS), padding_mode=ct.PaddingMode.ZERO)
        mx = ct.max(tmax, 0)
        total = ct.sum(tsum * ct.exp2((tmax - mx[None, :]) * LOG2E, flush_to_zero=True), 0)
        rows = b * ROWS + ct.arange(ROWS, dtype=ct.int32)
        target = ct.astype(ct.load(Targets, (b,), (ROWS,), padding_mode=ct.PaddingMode.ZERO), ct.int32)
        picked = ct.astype(ct.gather(Logits, (rows, ct.maximum(target, 0))), ct.float32)
        # Not by TMA: so stored, rows 0-2's RowScale came out wrong on 10% of calls at 257 x 65 while
        # 8 processes shared the GPU (154 of 1,600; none alone); stored plainly, none of 1,600 (H100)
        ct.store(Loss, (b,), ct.where(target >= 0, ct.log(total) + mx - picked, 0.0), allow_tma=False)
        ct.store(RowMax, (b,), mx, allow_tma=False)
        ct.store(RowScale, (b,), ct.load(Scale, 0, shape=()) / total, allow_tma=False)

    @ct.kernel
    def _grad_from_stats_kernel(Logits, Targets, RowMax, RowScale, Scale, PARTS: ConstInt, PART_V: ConstInt):
        """Block (row, part): its PART_V-column slice of the row overwritten with
        S * (softmax - onehot(target)), 0 where target < 0, from the row's max and S / sum."""
        row, part = ct.bid(0) // PARTS, ct.bid(0) % PARTS
        cols = ct.arange(PART_V, dtype=ct.int32) + part * PART_V
        x = ct.astype(ct.gather(Logits, (row, cols), padding_value=-math.inf), ct.float32)
        mx, inv = ct.load(RowMax, row, shape=()), ct.load(RowScale, row, shape=())
        target = ct.astype(ct.load(Targets, row, shape=()), ct.int32)
        grad = (ct.exp2((x - mx) * LOG2E, flush_to_zero=True) * inv
                - ct.where(cols == target, ct.load(Scale, 0, shape=()), 0.0))
        ct.scatter(Logits, (row, cols), ct.astype(ct.where(target >= 0, grad, 0.0), Logits.dtype))

    @ct.kernel
    def _one_hot_kernel(Rows, Idx, Grad, Part, V_P2: ConstInt, BLOCK_T: ConstInt, BLOCK_C: ConstInt):
        """Part[g, :, j-th tile] = onehot(Idx)^T @ Rows over column tile j and token tiles g, g + G,
        ..., plus Grad's tile in group 0. The fp32 rows go in as two bf16 pieces, hi = bf16(x) and
        lo = bf16(x - hi): 16 significant bits through the tensor cores, the one-hot tile exact."""
        j, g = ct.bid(0), ct.bid(1)
        acc = ct.load(Grad, (0, j), (V_P2, BLOCK_C), padding_mode=ct.PaddingMode.ZERO)
        acc = ct.where(g == 0, acc, 0.0)
        vocab = ct.arange(V_P2, dtype=ct.int32)[:, None]
        for t in range(g, ct.cdiv(Rows.shape[0], BLOCK_T), ct.num_blocks(1)):
            ids = ct.astype(ct.load(Idx, (t,), (BLOCK_T,), padding_mode=ct.PaddingMode.ZERO), ct.int32)
            onehot = ct.astype(ct.where(vocab == ids[None, :], 1.0, 0.0), ct.bfloat16)
            x = ct.load(Rows, (t, j), (BLOCK_T, BLOCK_C), padding_mode=ct.PaddingMode.ZERO)
            hi = ct.astype(x, ct.bfloat16)
            acc = ct.mma(onehot, hi, acc)
            acc = ct.mma(onehot, ct.astype(x - ct.astype(hi, ct.float32), ct.bfloat16), acc)
        ct.store(Part, (g, 0, j), ct.reshape(acc, (1, V_P2, BLOCK_C)))


    @ct.kernel
    def _embed_kernel(Idx, W, P, Out, BLOCK_T: ConstInt, BLOCK_C: ConstInt):
        """Out[r] = W[Idx[r]] + P[r mod T] (T = P's rows) over a (BLOCK_T, BLOCK_C) tile."""
        i, j = ct.bid(0), ct.bid(1)
        ids = ct.astype(ct.load(Idx, (i,), (BLOCK_T,), padding_mode=ct.PaddingMode.ZERO), ct.int32)
        rows = i * BLOCK_T + ct.arange(BLOCK_T, dtype=ct.int32)
        cols = (j * BLOCK_C + ct.arange(BLOCK_C, dtype=ct.int32))[None, :]
        tok = ct.astype(ct.gather(W, (ids[:, None], cols)), ct.float32)
        pos = ct.astype(ct.gather(P, ((rows % P.shape[0])[:, None], cols)), ct.float32)
        ct.store(Out, (i, j), ct.astype(tok + pos, Out.dtype))

    @ct.kernel
    def _scale_kernel(X, S, Out, TILE: ConstInt, IN_PLACE: ConstInt):
        """Out = X * S[0] in Out's dtype, computed in fp32, a TILE-element slice a block; in place
        with S[0] == 1, nothing to do (each block reads S and leaves: 6 us against 42 for the bf16
        weight gradient of GPT-2's head, on an H200)."""
        s = ct.load(S, 0, shape=())
        if IN_PLACE and s == 1.0:
            return
        x = ct.load(X, (ct.bid(0),), (TILE,), padding_mode=ct.PaddingMode.ZERO)
        ct.store(Out, (ct.bid(0),), ct.astype(ct.astype(x, ct.float32) * s, Out.dtype))


@functools.lru_cache(maxsize=None)
def _hinted():
    return _softmax_grad_kernel.replace_hints(occupancy=OCCUPANCY, num_worker_warps=WORKER_WARPS)


@functools.lru_cache(maxsize=None)
def _gemm_hinted():
    return _logits_stats_kernel.replace_hints(occupancy=1, num_worker_warps=GEMM_WARPS)


@functools.lru_cache(maxsize=None)
def _grad_hinted():
    return _grad_from_stats_kernel.replace_hints(occupancy=GRAD_OCCUPANCY, num_worker_warps=GRAD_WARPS)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _parts(v: int) -> tuple[int, int, int, int]:
    """(PARTS, PARTS_P2, PART_V, TILE_V) of the softmax kernel for rows of v logits."""
    part_v = min(PART_V, _pow2(v))
    parts = -(-v // part_v)
    return parts, _pow2(parts), part_v, min(TILE_V, _pow2(v))


class TiedWeightGrad:
    """The gradient of a weight that is both the token embedding and the LM head (GPT-2 ties them).

    Left alone, autograd gives the weight two full-size gradients and adds them: the head's, and the
    embedding's, a zero-filled (vocabulary, C) tensor with a few rows set. Here the head's backward
    leaves its gradient in `grad`, and the embedding's backward, which autograd runs after it (the
    embedding feeds everything), adds its rows into it in place and returns it: one full-size
    tensor and no full-size add. The rows go in by index_put_ with accumulate, which sorts them
    (deterministic). On GPT-2's step that saved 0.25 ms (H100, docs/PERF.md). A small vocabulary
    sends many rows to each index, which index_put_ adds one after another (shakespeare-char: 65
    rows for 16384 tokens, 145 us on an H200); there they go in as a product with the tokens'
    one-hot matrix, also the same on every run."""

    def __init__(self):
        self.grad = None

    def embed(self, idx, weight, pos_weight=None):
        """F.embedding(idx, weight), whose backward completes the tied weight's gradient; with
        pos_weight, plus its first T rows for the T positions of idx's (B, T), in one pass on a GPU
        (two gathers and a broadcast add took 31 us of shakespeare-char's step on an H200)."""
        return _TiedEmbedding.apply(idx, weight, pos_weight, self)

    def leave(self, grad):
        self.grad = grad if self.grad is None else self.grad.add_(grad)


class _TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, weight, pos_weight, tied):
        tied.grad = None  # a new forward pass: nothing of an earlier one's backward stays
        ctx.save_for_backward(idx)
        ctx.tied, ctx.weight_shape, ctx.weight_dtype = tied, weight.shape, weight.dtype
        ctx.pos_shape = None if pos_weight is None else pos_weight.shape
        if pos_weight is None:
            return F.embedding(idx, weight)
        return _embed_with_positions(idx, weight, pos_weight[:idx.shape[-1]])

    @staticmethod
    def backward(ctx, dout):
        (idx,) = ctx.saved_tensors
        grad, ctx.tied.grad = ctx.tied.grad, None
        if grad is None:  # the head's gradient did not come here (no fused head in the loss)
            grad = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=dout.device)
        rows, flat = dout.reshape(-1, ctx.weight_shape[1]).to(grad.dtype), idx.reshape(-1)
        if ctx.weight_shape[0] > ONE_HOT_MAX_V:
            grad = grad.index_put_((flat,), rows, accumulate=True)
        else:
            grad = _add_one_hot_product(grad, flat, rows)
        dpos = None
        if ctx.pos_shape is not None:  # each position's rows summed over the batch
            t = idx.shape[-1]
            dpos = dout.reshape(-1, t, ctx.pos_shape[1]).sum(0)
            dpos = F.pad(dpos, (0, 0, 0, ctx.pos_shape[0] - t)) if ctx.pos_shape[0] > t else dpos
        return None, grad, dpos, None


def _embed_with_positions(idx, weight, pos):
    """weight[idx] + pos for idx of (B, T) and pos of (T, C), in their promoted dtype."""
    dtype = torch.promote_types(weight.dtype, pos.dtype)
    if ct is None or not idx.is_cuda or not (weight.is_contiguous() and pos.is_contiguous()):
        return (F.embedding(idx, weight) + pos).to(dtype)
    flat, c = idx.reshape(-1), weight.shape[1]
    out = torch.empty(flat.shape[0], c, dtype=dtype, device=idx.device)
    if flat.shape[0]:
        launch(idx.device, (-(-flat.shape[0] // EMBED_BLOCK_T), -(-c // EMBED_BLOCK_C)), _embed_kernel,
               (flat.contiguous(), weight, pos, out, EMBED_BLOCK_T, EMBED_BLOCK_C))
    return out.view(*idx.shape, c)


def _add_one_hot_product(grad, idx, rows):
    """grad[idx[k]] += rows[k] for every k, as grad += onehot(idx)^T @ rows. In fp32 on the GPU
    that product ran on the SIMT cores (79 us at shakespeare-char's 65 x 16384 x 384 on an H200:
    six output tiles for 132 SMs); the cuTile kernel spreads the tokens over every SM and runs on the
    tensor cores, and its blocks' partial sums are added in a fixed order (same bits every run)."""
    v, (n, c) = grad.shape[0], rows.shape
    if ct is None or grad.dtype != torch.float32 or grad.device.type != "cuda" or not grad.is_contiguous():
        onehot = torch.zeros(v, n, dtype=grad.dtype, device=grad.device)
        return grad.addmm_(onehot.scatter_(0, idx.view(1, -1), 1.0), rows)
    tiles_c = -(-c // ONE_HOT_BLOCK_C)
    groups = max(1, min(-(-n // ONE_HOT_BLOCK_T), ONE_HOT_BLOCKS_PER_SM * sm_count(grad.device) // tiles_c))
    part = torch.empty(groups, v, c, dtype=torch.float32, device=grad.device)  # every block writes its tile
    launch(grad.device, (tiles_c, groups), _one_hot_kernel,
           (rows.contiguous(), idx.contiguous(), grad, part, _pow2(v), ONE_HOT_BLOCK_T, ONE_HOT_BLOCK_C))
    sum_partials(part.view(groups, v * c), grad.view(-1))
    return grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, compute_dtype, casts, tied, chunk_bytes, loss_grad):
        rows, v = x.shape[0], weight.shape[0]
        xc, wc = x.to(compute_dtype), cast(weight, compute_dtype, casts)
        # a vocabulary padded with zero rows to a multiple of 8, so cuBLAS takes its aligned GEMMs:
        # with 65 (shakespeare-char) all three ran align-1 kernels, 59 us a step on an H200.
        # The padded logits are 0, the kernels never read them, and they add 0 to dx and dw.
        if v % 8:
            wc = F.pad(wc, (0, 0, 0, 8 - v % 8))
        dx = torch.empty(rows, x.shape[1], dtype=compute_dtype, device=x.device)
        dw = None
        acc = torch.bfloat16 if weight.dtype == compute_dtype == torch.bfloat16 else torch.float32
        losses = torch.empty(rows, dtype=torch.float32, device=x.device)
        count = (targets >= 0).sum().clamp(min=1)  # a tensor: no host sync
        per_count = compute_dtype != torch.float16
        expected = None
        if per_count:
            scale = (1.0 / count).float().reshape(1)
        elif loss_grad is not None:  # the gradients at the scale the backward will ask for
            expected = loss_grad.detach().float().reshape(1).clone()  # its value now, whatever changes it later
            scale = expected / count
        else:
            scale = torch.full((1,), K, device=x.device)
        step = chunk_rows(rows, wc.shape[0] * wc.element_size(), chunk_bytes)
        softmax = (_SoftmaxFromGemm if _gemm_fits(xc, wc, v) else _SoftmaxPass)(step, v, wc, scale)
        # the weight's gradient slot (kernels.adamw), if it has one and no rows were padded
        slot = grad_slot(weight) if ctx.needs_input_grad[1] and wc.shape[0] == v else None
        for i in range(0, rows, step):
            xs = xc[i:i + step]
            logits = softmax(xs, targets[i:i + step], losses[i:i + step])  # S * d(loss)/d(logits)
            torch.mm(logits, wc, out=dx[i:i + step])  # |dx| <= 2S max|W|: no overflow at K (a scaler's to find else)
            dw = mm_acc(logits.t(), xs, dw, acc, out=slot)
            del logits  # before the next chunk's logits exist: one chunk held at a time
        ctx.save_for_backward(dx, count, expected)
        ctx.dw, ctx.dtypes, ctx.tied = None if dw is None else dw[:v], (x.dtype, weight.dtype), tied
        ctx.per_count = per_count
        return losses.sum() / count

    @staticmethod
    def backward(ctx, grad):
        dx, count, expected = ctx.saved_tensors
        dw, ctx.dw = ctx.dw, None
        if dw is None:
            raise RuntimeError("linear_cross_entropy: its backward ran twice; it scales the weight's "
                               "gradient in place, so a graph through it cannot be retained")
        if ctx.per_count:
            scale = grad.float()
        elif expected is not None:  # 1 where the forward's guess held: _scaled then leaves both as they are
            scale = grad / expected
        else:
            scale = grad / (count * K)
        # scaled and cast in one pass, in place when a gradient is in its input's dtype already:
        # no second copy (154 MB in fp32 for GPT-2's weight), and no pass at all for a scale of 1
        x_dtype, w_dtype = ctx.dtypes
        dw = _scaled(dw, scale, w_dtype, out=dw if w_dtype == dw.dtype else None)
        if ctx.tied is not None:  # the embedding's backward adds its rows and hands it on
            ctx.tied.leave(dw)
            dw = None
        dx = _scaled(dx, scale, x_dtype, out=dx if x_dtype == dx.dtype else None)
        return (dx, dw) + (None,) * 6


def _gemm_fits(x, w, v) -> bool:
    """Whether the logits come from the cuTile matmul with the softmax's stats: operands it can
    read, a vocabulary past GEMM_MIN_V."""
    return v >= GEMM_MIN_V and tile_matmul_fits(x, w)


class _SoftmaxPass:
    """A chunk's logits by cuBLAS, then one kernel: each row's slices' stats, then the softmax."""

    def __init__(self, step, v, wc, scale):
        self.v, self.wc, self.scale, self.shape = v, wc, scale, _parts(v)
        self.stats = torch.empty(2, step, self.shape[1], dtype=torch.float32, device=wc.device)  # slice max, sum
        self.done = torch.zeros(step, dtype=torch.int32, device=wc.device)  # the kernel leaves it zeroed

    def __call__(self, xs, targets, losses):
        logits = xs @ self.wc.t()  # (chunk, V), overwritten by the kernel
        launch(xs.device, (xs.shape[0] * self.shape[0],), _hinted(),
               (logits[:, :self.v], targets, losses, self.stats[0], self.stats[1], self.done, self.scale,
                *self.shape))
        return logits


class _SoftmaxFromGemm:
    """A chunk's logits by the cuTile matmul that also stores their column tiles' stats; a kernel
    combines each row's; one pass then reads and writes each logit once."""

    def __init__(self, step, v, wc, scale):
        self.v, self.wc, self.scale = v, wc, scale
        self.tiles_n = -(-wc.shape[0] // GEMM_TILE_N)
        # whole row tiles, so no stats store is clipped: with planes cut to the chunk's rows, a
        # 257-row chunk at V = 65 got non-finite gradients in two rows (H200; cause not isolated)
        rows = -(-step // GEMM_TILE_M) * GEMM_TILE_M
        self.tile_stats = torch.empty(2, self.tiles_n, rows, dtype=torch.float32, device=wc.device)
        self.row_stats = torch.empty(2, step, dtype=torch.float32, device=wc.device)  # max, S / sum
        self.part_v = min(GRAD_PART_V, _pow2(v))
        self.parts = -(-v // self.part_v)

    def __call__(self, xs, targets, losses):
        r, dev = xs.shape[0], xs.device
        logits = torch.empty(r, self.wc.shape[0], dtype=xs.dtype, device=dev)
        tmax, tsum = self.tile_stats[0], self.tile_stats[1]
        rmax, rscale = self.row_stats[0, :r], self.row_stats[1, :r]
        tiles = -(-r // GEMM_TILE_M) * self.tiles_n
        launch(dev, (min(tiles, sm_count(dev)),), _gemm_hinted(),
               (xs, self.wc, logits, tmax, tsum, self.v, GEMM_TILE_M, GEMM_TILE_N, GEMM_TILE_K))
        launch(dev, (-(-r // STATS_ROWS),), _row_stats_kernel,
               (tmax, tsum, logits, targets, losses, rmax, rscale, self.scale, _pow2(self.tiles_n), STATS_ROWS))
        launch(dev, (r * self.parts,), _grad_hinted(),
               (logits[:, :self.v], targets, rmax, rscale, self.scale, self.parts, self.part_v))
        return logits


def chunk_rows(rows, row_bytes, chunk_bytes):
    """Rows per chunk: as few chunks as fit chunk_bytes, of equal size. With as many rows as fit and
    the rest in the last, GPT-2's 8192 rows held 5336 at 512 MiB; two equal chunks hold 4096."""
    most = max(1, chunk_bytes // row_bytes)
    n = max(1, -(-rows // most))
    return max(1, -(-rows // n))


def _scaled(x, scale, dtype, out=None):
    """x * scale (a 0-dim fp32 device tensor) in dtype, into `out` when given (x itself: in place,
    where a scale of 1 leaves x as it is).
    torch runs a product with a 0-dim device tensor as a generic broadcast kernel (20 us for the
    head's 16384 x 384 fp16 dx on an H200); on a GPU a cuTile kernel reads the scale instead."""
    out = torch.empty_like(x, dtype=dtype) if out is None else out
    if ct is None or not x.is_cuda or not x.is_contiguous() or x.numel() == 0:
        return torch.mul(x, scale, out=out)
    launch(x.device, (-(-x.numel() // SCALE_TILE),), _scale_kernel,
           (x.view(-1), scale.reshape(1).float(), out.view(-1), SCALE_TILE, int(out is x)))
    return out


def linear_cross_entropy(x, weight, targets, casts: WeightCasts | None = None,
                         tied: TiedWeightGrad | None = None, chunk_bytes: int = CHUNK_BYTES,
                         loss_grad: torch.Tensor | None = None):
    """mean cross-entropy of (x @ weight^T) against targets (rows with target -1 ignored), for x of
    (N, C) and weight of (V, C), differentiable in x and weight; under autocast the matmuls run in
    the autocast dtype, as a Linear would (reading the weight's copy from `casts` when given).
    With `tied`, the weight's gradient is left there for the tied embedding's backward. The logits
    are computed chunk_bytes at a time: the head's working memory is about that plus the weight's
    gradient in fp32 (in bf16 for a bf16 weight).

    The gradients are made in the forward, at a scale the backward then corrects by one pass over
    each (103 us for GPT-2's fp32 weight gradient on an H100). loss_grad, a one-element tensor, is
    the gradient the loss is expected to get, an fp16 loss scale: an fp16 head then makes them at
    that scale, as torch's are under loss scaling (an overflow is the scaler's to find), and where
    the guess holds (its value at the forward, the same bits at the backward) the correcting passes
    have nothing to do. A wrong guess costs only those passes."""
    kernels.require()
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or targets.shape != x.shape[:1]:
        raise ValueError(f"expected x (N, C), weight (V, C), targets (N,), got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    device = x.device.type
    dtype = kernels.autocast_dtype(device, x.dtype)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(x, weight, targets.contiguous(), dtype, casts, tied,
                                        chunk_bytes, loss_grad)


def export_for_check(out_dir, gpu_code="sm_90") -> list[str]:
    """Compile ahead of time (no GPU needed): the two-read softmax-gradient kernel for fp16, bf16
    and fp32 logits and GPT-2's and the character model's vocabularies; the logits matmul with
    its stats, the rows' stats and the one-read softmax pass for fp16 and bf16; the tied
    embedding's one-hot kernel for the character model's vocabulary, the token + position
    embedding kernel, and the scale kernel of dx (fp16, bf16) and of the weight's gradient (fp32
    to fp16 or fp32); the cubin paths."""
    if ct is None:
        kernels.require()
    from cuda.tile import compilation as cc

    from kernels.aot import array_param, ct_dtype, dtype_name, export

    f32, f32_1, i64_1 = array_param(ct.float32, 2), array_param(ct.float32, 1), array_param(ct.int64, 1)
    paths = []
    for dtype, v in [(torch.float16, 50304), (torch.bfloat16, 50304), (torch.float32, 65)]:
        params = [array_param(ct_dtype(dtype), 2), i64_1, f32_1, f32, f32, array_param(ct.int32, 1), f32_1,
                  *_parts(v)]
        paths.append(export(_hinted(), f"softmax_grad_{dtype_name(dtype)}_v{v}", params,
                            out_dir, gpu_code))
    for dtype in (torch.float16, torch.bfloat16):
        t2, name = array_param(ct_dtype(dtype), 2), dtype_name(dtype)
        params = [t2, t2, t2, f32, f32, cc.ScalarConstraint(ct.int32), GEMM_TILE_M, GEMM_TILE_N, GEMM_TILE_K]
        paths.append(export(_gemm_hinted(), f"logits_stats_{name}", params, out_dir, gpu_code))
        params = [f32, f32, t2, i64_1, f32_1, f32_1, f32_1, f32_1, _pow2(-(-50304 // GEMM_TILE_N)), STATS_ROWS]
        paths.append(export(_row_stats_kernel, f"row_stats_{name}_v50304", params, out_dir, gpu_code))
        params = [t2, i64_1, f32_1, f32_1, f32_1, -(-50304 // GRAD_PART_V), GRAD_PART_V]
        paths.append(export(_grad_hinted(), f"grad_from_stats_{name}_v50304", params, out_dir, gpu_code))
    params = [f32, i64_1, f32, array_param(ct.float32, 3), _pow2(65), ONE_HOT_BLOCK_T, ONE_HOT_BLOCK_C]
    paths.append(export(_one_hot_kernel, "one_hot_float32_v65", params, out_dir, gpu_code))
    params = [i64_1, f32, f32, f32, EMBED_BLOCK_T, EMBED_BLOCK_C]
    paths.append(export(_embed_kernel, "embed_float32", params, out_dir, gpu_code))
    for src, dtype in [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                       (torch.float32, torch.float16), (torch.float32, torch.float32)]:
        params = [array_param(ct_dtype(src), 1), f32_1, array_param(ct_dtype(dtype), 1), SCALE_TILE,
                  int(src == dtype)]
        paths.append(export(_scale_kernel, f"scale_{dtype_name(src)}_{dtype_name(dtype)}", params,
                            out_dir, gpu_code))
    return paths
