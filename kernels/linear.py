"""A Linear whose backward writes the gradients in the parameters' dtype straight away.

Under autocast, PyTorch's Linear backward writes the weight gradient in fp16 and a second pass
casts it to the fp32 parameter's dtype; and it sums the bias gradient's columns with a reduction
that ran at 0.7-1.5 TB/s on GPT-2's (8192, 768..3072) gradients (H100, docs/PERF.md). Here the
weight-gradient matmul writes fp32 itself (cuBLAS accumulates in fp32 anyway), and a cuTile kernel
sums the columns: each block takes one column tile and every G-th row tile, and keeps a tile of
fp32 sums, so a tall gradient is read once, by every SM at once; a second kernel adds the blocks'
partial rows in a fixed order, so the sum is the same on every run.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import kernels
from kernels.adamw import grad_slot, owner_of
from kernels.launch import launch, rows, sm_count
from kernels.tile_ops import widen

try:
    import cuda.tile as ct
except Exception:  # no cuda-tile here: the public functions raise through kernels.require()
    ct = None

# a (16, 256) tile per step and one block per SM, the fastest of 11 configs at GPT-2's bias
# gradients on an H100 (2-2.3x torch's sum); the partial rows are added 32 at a time
BLOCK_M, BLOCK_N, BLOCKS_PER_SM, BLOCK_G = 16, 256, 1, 32

if ct is not None:
    ConstInt = ct.Constant[int]
    ZERO = ct.PaddingMode.ZERO

    @ct.kernel
    def _partial_kernel(X, Part, BLOCK_M: ConstInt, BLOCK_N: ConstInt):
        """Part[g, j-th tile] = the fp32 column sums of column tile j over row tiles g, g + G, ..."""
        j, g = ct.bid(0), ct.bid(1)
        acc = ct.zeros((BLOCK_M, BLOCK_N), dtype=ct.float32)
        for i in range(g, ct.cdiv(X.shape[0], BLOCK_M), ct.num_blocks(1)):
            acc += widen(ct.load(X, (i, j), (BLOCK_M, BLOCK_N), padding_mode=ZERO))
        ct.store(Part, (g, j), ct.sum(acc, axis=0, keepdims=True))

    @ct.kernel
    def _sum_kernel(Part, Out, BLOCK_G: ConstInt, BLOCK_N: ConstInt):
        """Out[j-th tile] = the sum of Part's rows over column tile j."""
        j = ct.bid(0)
        acc = ct.zeros((BLOCK_G, BLOCK_N), dtype=ct.float32)
        for i in range(ct.cdiv(Part.shape[0], BLOCK_G)):
            acc += ct.load(Part, (i, j), (BLOCK_G, BLOCK_N), padding_mode=ZERO)
        ct.store(Out, (j,), ct.astype(ct.sum(acc, axis=0), Out.dtype))

    @ct.kernel
    def _qkv_bias_kernel(DQ, DOut, W, PartQ, PartK, PartV, BLOCK_M: ConstInt, BLOCK_N: ConstInt):
        """Block (j, g, p) writes row g of column tile j of a qkv bias gradient's partial sums:
        p = 0, DQ's fp32 column sums over row tiles g, g + G, ...; p = 1, zeros; p = 2, those of
        DOut[i] * W[i, :] over W's row tiles g, g + G, ... (DOut @ W)."""
        j, g, p = ct.bid(0), ct.bid(1), ct.bid(2)
        if p == 0:
            acc = ct.zeros((BLOCK_M, BLOCK_N), dtype=ct.float32)
            for i in range(g, ct.cdiv(DQ.shape[0], BLOCK_M), ct.num_blocks(1)):
                acc += widen(ct.load(DQ, (i, j), (BLOCK_M, BLOCK_N), padding_mode=ZERO))
            ct.store(PartQ, (g, j), ct.sum(acc, axis=0, keepdims=True))
        elif p == 1:
            ct.store(PartK, (g, j), ct.zeros((1, BLOCK_N), dtype=ct.float32))
        else:
            acc = ct.zeros((BLOCK_M, BLOCK_N), dtype=ct.float32)
            for i in range(g, ct.cdiv(W.shape[0], BLOCK_M), ct.num_blocks(1)):
                d = ct.reshape(ct.load(DOut, (i,), (BLOCK_M,), padding_mode=ZERO), (BLOCK_M, 1))
                acc += widen(ct.load(W, (i, j), (BLOCK_M, BLOCK_N), padding_mode=ZERO)) * d
            ct.store(PartV, (g, j), ct.sum(acc, axis=0, keepdims=True))


def column_block(n: int) -> int:
    """Columns per tile of a column sum over n columns."""
    return min(BLOCK_N, 1 << max(0, n - 1).bit_length())


def column_grid(m: int, n: int, block_m: int, blocks_per_sm: int, device) -> tuple[int, int, int]:
    """(block_n, column tiles, row groups) of a column-summing grid over (m, n): one block per
    (column tile, row group), blocks_per_sm per SM, each over every G-th row tile."""
    block_n = column_block(n)
    tiles_n, tiles_m = -(-n // block_n), -(-m // block_m)
    return block_n, tiles_n, min(tiles_m, max(1, blocks_per_sm * sm_count(device) // tiles_n))


def column_sum(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The sum over all leading dims of x (..., N), accumulated in fp32, as an (N,) tensor of dtype."""
    kernels.require()
    n = x.shape[-1]
    x2 = rows(x, n)
    out = torch.empty(n, device=x.device, dtype=dtype)
    if x2.shape[0] == 0:
        return out.zero_()
    block_n, tiles_n, groups = column_grid(x2.shape[0], n, BLOCK_M, BLOCKS_PER_SM, x.device)
    part = torch.empty(groups, n, device=x.device, dtype=torch.float32)  # every block writes its row
    launch(x.device, (tiles_n, groups), _partial_kernel, (x2, part, BLOCK_M, block_n))
    return sum_partials(part, out)


def qkv_bias_grad(dq: torch.Tensor, dbias_out: torch.Tensor, w_out: torch.Tensor,
                  dtype=torch.float32) -> torch.Tensor:
    """The gradient (3C,) of causal self-attention's qkv bias without reading dK or dV: dq's column
    sums; zeros for the keys' part (a key bias moves every score of a query by the same q . b_k,
    which softmax ignores); for the values' part dbias_out @ w_out (each row of the attention
    weights sums to one, so dV's column sums are dO's, and dO = dY @ W_out). dq: (M, C), a view
    with unit column stride; dbias_out: the output projection's bias gradient, dY's fp32 column
    sums; w_out: its (C, C) weight. Exact only for attention without dropout."""
    kernels.require()
    m, c = dq.shape
    out = torch.empty(3 * c, device=dq.device, dtype=dtype)
    block_n, tiles_n, groups = column_grid(max(m, c), c, BLOCK_M, BLOCKS_PER_SM, dq.device)
    part = torch.empty(groups, 3 * c, device=dq.device, dtype=torch.float32)  # every block writes its row
    launch(dq.device, (tiles_n, groups, 3), _qkv_bias_kernel,
           (dq, dbias_out.float(), w_out, part[:, :c], part[:, c:2 * c], part[:, 2 * c:], BLOCK_M, block_n))
    return sum_partials(part, out)


def sum_partials(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = the sum of part's (G, N) fp32 rows, added in a fixed order (the same on every run)."""
    block_n = column_block(part.shape[1])
    launch(part.device, (-(-part.shape[1] // block_n),), _sum_kernel, (part, out, BLOCK_G, block_n))
    return out


def tile_matmul_fits(x, w) -> bool:
    """Whether a cuTile matmul can take x (M, K) and w (N, K) as operands: both fp16 or both bf16
    on a GPU, contiguous, with rows of K and of the result's N a multiple of 8 elements (16 bytes,
    for tensor-memory loads and stores)."""
    return (x.dtype in (torch.float16, torch.bfloat16) and w.dtype == x.dtype and x.is_cuda
            and x.shape[-1] % 8 == 0 and w.shape[0] % 8 == 0 and x.is_contiguous() and w.is_contiguous())


def mm_acc(a, b, acc=None, dtype=torch.float32, out=None):
    """a @ b (into `out` when given), or acc += a @ b in place, with a result in `dtype` (fp32, or
    a's own dtype), from fp16/bf16 operands without an fp32 copy of either: cuBLAS accumulates in
    fp32 either way. In place, because addmm into a new tensor first copies acc (154 MB for GPT-2's
    LM head, per chunk)."""
    if acc is not None:
        return acc.addmm_(a, b) if a.dtype == dtype else torch.addmm(acc, a, b, out_dtype=dtype, out=acc)
    if out is None or out.dtype != dtype:
        return a @ b if a.dtype == dtype else torch.mm(a, b, out_dtype=dtype)
    return torch.mm(a, b, out=out) if a.dtype == dtype else torch.mm(a, b, out_dtype=dtype, out=out)


class WeightCasts:
    """The autocast-dtype copies of a model's weights, made by one multi-tensor copy at the start
    of a forward pass rather than by one cast kernel per tensor as each Linear first reads it: GPT-2's
    148 tensors took 0.29 ms of GPU time per step that way against 0.52 ms (H100, docs/PERF.md).

    Lookups find a copy only inside fresh(), which refills them first, so no pass reads stale
    weights. A copy saved for a backward that is refilled before that backward runs makes autograd
    raise, as any in-place change of a saved tensor does. Where a FlatAdamW holds the weights
    (kernels.adamw), the copies are views of its flat copy, which its step writes as it updates
    them (0.23 ms of GPT-2's step as a copy on an H200): fresh() then refills them only where
    something else has changed the weights since."""

    def __init__(self):
        self.params, self._copies, self._live = [], {}, {}

    def track(self, params):
        """Cast these tensors (a tied weight counts once) from now on."""
        self.params, self._copies = list(dict.fromkeys(params)), {}

    @contextlib.contextmanager
    def fresh(self, dtype):
        """Refill the dtype copies; inside, cast() returns them."""
        key = (dtype, self.params[0].device if self.params else None)
        owner = owner_of(self.params)
        copies, seen = self._copies.get(key, (None, None))
        if copies is None or seen is not owner:  # made before the weights went into flat buffers
            copies = (owner.cast_copies(dtype, self.params) if owner is not None
                      else [torch.empty_like(p, dtype=dtype) for p in self.params])
            self._copies[key] = (copies, owner)
        # under torch.compile a version check would be traced once: copy every time there
        if owner is None or torch.compiler.is_compiling() or not owner.casts_current(dtype):
            with torch.no_grad():
                torch._foreach_copy_(copies, self.params)
        self._live = {id(p): c for p, c in zip(self.params, copies)}
        try:
            yield
        finally:
            self._live = {}

    def cast(self, t, dtype):
        """t in dtype: the refilled copy inside fresh(), else a new cast."""
        copy = self._live.get(id(t))
        return copy if copy is not None and copy.dtype == dtype else t.to(dtype)


def cast(t, dtype, casts: WeightCasts | None):
    return t.to(dtype) if casts is None else casts.cast(t, dtype)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, casts):
        xc, wc = x.to(dtype), cast(weight, dtype, casts)
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.weight = weight  # for its gradient slot, if it has one (kernels.adamw)
        return F.linear(xc, wc, None if bias is None else cast(bias, dtype, casts))

    @staticmethod
    def backward(ctx, dy):
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        dy2 = rows(dy.to(wc.dtype), wc.shape[0])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ wc).view(xc.shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            dw = mm_acc(dy2.t(), rows(xc, wc.shape[1]), out=grad_slot(ctx.weight)).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            db = column_sum(dy2, b_dtype)
        return dx, dw, db, None, None


def linear(x, weight, bias=None, casts: WeightCasts | None = None):
    """F.linear(x, weight, bias), differentiable in all three; under autocast the matmuls run in
    the autocast dtype as F.linear's would (reading the weights' copies from `casts` when given),
    and the gradients come back in each input's dtype."""
    kernels.require()
    device = x.device.type
    dtype = kernels.autocast_dtype(device, x.dtype)
    with torch.autocast(device, enabled=False):
        return _Linear.apply(x, weight, bias, dtype, casts)


def export_for_check(out_dir, gpu_code="sm_90") -> list[str]:
    """Compile both column-sum kernels ahead of time (no GPU needed) for every input dtype and a
    narrow and a wide output, and the qkv bias gradient's; the cubin paths."""
    if ct is None:
        kernels.require()
    from kernels.aot import array_param, ct_dtype, dtype_name, export

    part = array_param(ct.float32, 2)
    paths = []
    for dtype, n in [(torch.float16, 3072), (torch.bfloat16, 768), (torch.float32, 65)]:
        paths.append(export(_partial_kernel, f"colsum_partial_{dtype_name(dtype)}_{n}",
                            [array_param(ct_dtype(dtype), 2), part, BLOCK_M, column_block(n)],
                            out_dir, gpu_code))
        paths.append(export(_sum_kernel, f"colsum_sum_{dtype_name(dtype)}_{n}",
                            [part, array_param(ct_dtype(dtype), 1), BLOCK_G, column_block(n)],
                            out_dir, gpu_code))
    for dtype, c in [(torch.float16, 768), (torch.bfloat16, 128)]:
        grad = array_param(ct_dtype(dtype), 2)
        paths.append(export(_qkv_bias_kernel, f"qkv_bias_{dtype_name(dtype)}_{c}",
                            [grad, array_param(ct.float32, 1), grad, part, part, part, BLOCK_M, column_block(c)],
                            out_dir, gpu_code))
    return paths
