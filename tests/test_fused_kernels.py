"""Parity of the kernels the cuTile GPT step fuses (attention on the packed c_attn output, the
residual add inside LayerNorm, the LM head with its cross-entropy, the Linear with its fp32
gradients and column sums) with float64 references, forward and backward, at awkward shapes; the
block as one autograd node against its separate Functions; and the graphed training step against
the eager one.

Each GPU test draws its own random inputs (tests/conftest.py seeds it from its name); outputs
the kernels write are poisoned with NaN first."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench.measure.check import errors, passes, tolerance_for
from kernels import cross_entropy, linear, reference

OK, REASON = kernels.available()
gpu = pytest.mark.skipif(not OK, reason=REASON)
DT = {"float16": torch.float16, "bfloat16": torch.bfloat16}
AWKWARD_T = [1, 13, 127, 257]


def test_export_compiles_the_softmax_gradient_and_one_hot_kernels_for_sm90(exported_cubins):
    names = exported_cubins(cross_entropy)
    assert {"float16", "bfloat16", "float32"} == {n.split("_")[2] for n in names if n.startswith("softmax")}, names
    assert any(n.startswith("one_hot_float32") for n in names), names
    for kernel in ("logits_stats", "row_stats", "grad_from_stats"):  # the matmul path, fp16 and bf16
        assert {"float16", "bfloat16"} == {n.removeprefix(kernel + "_").split("_")[0].split(".")[0]
                                           for n in names if n.startswith(kernel)}, names
    assert {"scale_float16_float16", "scale_bfloat16_bfloat16", "scale_float32_float16", "scale_float32_float32",
            "embed_float32"} <= {n.split(".")[0] for n in names}, names


def test_export_compiles_the_column_sum_kernels_for_sm90(exported_cubins):
    names = exported_cubins(linear)
    assert {"float16", "bfloat16", "float32"} == {n.split("_")[2] for n in names}, names
    assert {"float16", "bfloat16"} == {n.split("_")[2] for n in names if n.startswith("qkv_bias")}, names


@pytest.mark.parametrize("rows,most", [(8192, 5336), (8192, 2668), (16384, 2668), (1000, 300), (257, 13),
                                       (2048, 5336), (1, 1), (7, 1), (0, 10)])
def test_the_head_takes_as_few_chunks_as_fit_and_splits_rows_evenly(rows, most):
    step = cross_entropy.chunk_rows(rows, 6, 6 * most)
    sizes = [min(step, rows - i) for i in range(0, rows, step)]
    assert step <= max(1, most)  # never more logits than the budget
    assert len(sizes) == -(-rows // most)  # no more chunks than the budget needs
    assert not sizes or sizes[0] - sizes[-1] < len(sizes)  # even: the last short by less than one row a chunk
    assert cross_entropy.chunk_rows(8192, 50304 * 2, 512 << 20) == 4096  # GPT-2's head: 2 x 4096, not 5336 + 2856


def test_weight_casts_are_refilled_for_each_pass_and_read_only_inside_it():
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    casts = linear.WeightCasts()
    casts.track([w, b, w])  # a tied weight once
    assert casts.params == [w, b]
    with casts.fresh(torch.bfloat16):
        copy = casts.cast(w, torch.bfloat16)
        assert torch.equal(copy, w.detach().bfloat16()) and casts.cast(w, torch.bfloat16) is copy
        assert casts.cast(w, torch.float16).dtype == torch.float16  # not cached: cast anew
    with torch.no_grad():
        w.add_(1.0)
    outside = casts.cast(w, torch.bfloat16)
    assert outside is not copy and torch.equal(outside, w.detach().bfloat16())
    with casts.fresh(torch.bfloat16):
        assert casts.cast(w, torch.bfloat16) is copy and torch.equal(copy, w.detach().bfloat16())
    # a pass whose saved copy is refilled before its backward runs fails loudly, never silently
    x = torch.randn(2, 3, dtype=torch.bfloat16, requires_grad=True)
    with casts.fresh(torch.bfloat16):
        y = x @ casts.cast(w, torch.bfloat16).t()
    with casts.fresh(torch.bfloat16):
        pass
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


class _Head(torch.autograd.Function):
    """A stand-in for the fused head: loss = sum(x @ w^T * g), its weight gradient left in `tied`."""

    @staticmethod
    def forward(ctx, x, w, g, tied):
        ctx.save_for_backward(x, w, g)
        ctx.tied = tied
        return (x @ w.t() * g).sum()

    @staticmethod
    def backward(ctx, grad):
        x, w, g = ctx.saved_tensors
        ctx.tied.leave(grad * g.t() @ x)
        return grad * g @ w, None, None, None


@pytest.mark.parametrize("one_hot_max_v", [0, 256], ids=["index_put", "one-hot"])
def test_a_tied_weight_gets_the_head_and_embedding_gradients_in_one_tensor(monkeypatch, one_hot_max_v):
    """Both ways the embedding's rows go in: sorted index_put_ and the one-hot product."""
    monkeypatch.setattr(cross_entropy, "ONE_HOT_MAX_V", one_hot_max_v)
    torch.manual_seed(0)
    v, c = 11, 4
    w = torch.randn(v, c, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[3, 3, 7], [0, 3, 10]])  # repeated rows sum
    g = torch.randn(6, v, dtype=torch.float64)
    tied = cross_entropy.TiedWeightGrad()
    emb = tied.embed(idx, w)
    _Head.apply(torch.tanh(emb).view(6, c), w, g, tied).backward()
    ref_w = w.detach().clone().requires_grad_()
    (torch.tanh(F.embedding(idx, ref_w)).view(6, c) @ ref_w.t() * g).sum().backward()
    assert torch.allclose(w.grad, ref_w.grad) and tied.grad is None
    # without a head's gradient left there, the embedding's own
    w.grad = None
    tied.embed(idx, w).pow(2).sum().backward()
    ref_w.grad = None
    F.embedding(idx, ref_w).pow(2).sum().backward()
    assert torch.allclose(w.grad, ref_w.grad, rtol=1e-14, atol=0)
    # with the position embedding added in the same pass: its gradient sums the batch's rows
    pos = torch.randn(5, c, dtype=torch.float64, requires_grad=True)
    ref_pos = pos.detach().clone().requires_grad_()
    w.grad = ref_w.grad = None
    tied.embed(idx, w, pos).pow(2).sum().backward()
    (F.embedding(idx, ref_w) + ref_pos[:3]).pow(2).sum().backward()
    assert torch.allclose(w.grad, ref_w.grad, rtol=1e-14, atol=0)
    assert torch.allclose(pos.grad, ref_pos.grad, rtol=1e-14, atol=0) and not pos.grad[3:].any()
    # a forward pass drops what an unfinished earlier backward left
    tied.leave(torch.ones(v, c, dtype=torch.float64))
    w.grad = None
    tied.embed(idx, w).sum().backward()
    assert torch.equal(w.grad, F.one_hot(idx.reshape(-1), v).sum(0)[:, None].double().expand(v, c))


@gpu
@pytest.mark.parametrize("n,v,c", [(1, 65, 384), (13, 65, 384), (257, 65, 100), (16384, 65, 384), (4099, 256, 768)])
def test_the_one_hot_kernel_adds_fp32_rows_into_the_tied_gradient(n, v, c):
    """The tied embedding's rows added by the one-hot kernel (bf16 hi and lo pieces on the tensor
    cores): within 2e-5 of the largest value of a float64 index_add, for rows spanning six orders of
    magnitude, at awkward token counts and widths."""
    g = torch.Generator(device="cuda").manual_seed(n)
    grad = torch.randn(v, c, device="cuda", generator=g)
    rows = torch.randn(n, c, device="cuda", generator=g) * 10.0 ** torch.randint(-4, 2, (n, 1), device="cuda", generator=g)
    idx = torch.randint(v, (n,), device="cuda", generator=g)
    ref = grad.double().index_add(0, idx, rows.double())
    out = cross_entropy._add_one_hot_product(grad.clone(), idx, rows)
    assert (out.double() - ref).abs().max() <= 2e-5 * ref.abs().max()


@gpu
@pytest.mark.parametrize("b,t,v,c", [(1, 1, 65, 384), (3, 13, 65, 100), (2, 257, 50304, 768), (64, 256, 65, 384)])
def test_the_embedding_kernel_adds_token_and_position_rows(b, t, v, c):
    """Token rows gathered and the position rows added in one pass: the same bits as torch's fp32
    gather and add, at awkward lengths and widths (none a multiple of the tile)."""
    g = torch.Generator(device="cuda").manual_seed(t)
    w, pos = torch.randn(v, c, device="cuda", generator=g), torch.randn(t + 3, c, device="cuda", generator=g)
    idx = torch.randint(v, (b, t), device="cuda", generator=g)
    out = cross_entropy._embed_with_positions(idx, w, pos[:t])
    assert out.shape == (b, t, c) and torch.equal(out, F.embedding(idx, w) + pos[:t])


@gpu
@pytest.mark.parametrize("shape,dtype,out_dtype,in_place", [((1, 384), torch.float16, torch.float16, False),
                                                            ((13, 385), torch.bfloat16, torch.bfloat16, False),
                                                            ((16384, 384), torch.float16, torch.float16, False),
                                                            ((257, 768), torch.float16, torch.float32, False),
                                                            ((257, 769), torch.float32, torch.float16, False),
                                                            ((1000, 771), torch.bfloat16, torch.bfloat16, True),
                                                            ((13, 770), torch.float32, torch.float32, True)])
@pytest.mark.parametrize("value", [3.0e-5 / 7, 1.0])
def test_the_scale_kernel_rounds_as_torch_does_in_fp32(shape, dtype, out_dtype, in_place, value):
    """The head's dx, or its weight's gradient (in place where it has the weight's dtype), times
    the incoming gradient's scale: the same bits as torch's fp32 product rounded to the output
    dtype, over every element of awkward sizes (none a multiple of the tile); a scale of 1 in
    place, which the kernel skips, leaves the same bits too."""
    g = torch.Generator(device="cuda").manual_seed(shape[0])
    x = (torch.randn(shape, device="cuda", generator=g) * 100).to(dtype)
    scale = torch.tensor(value, device="cuda")
    want = (x.float() * scale).to(out_dtype)
    out = cross_entropy._scaled(x, scale, out_dtype, out=x if in_place else None)
    assert out.dtype == out_dtype and torch.equal(out, want)
    assert (out.data_ptr() == x.data_ptr()) == in_place


def _grads(fn, inputs, dout):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out, [t.grad for t in leaves]


@gpu
@pytest.mark.parametrize("fused_dq", [0, 1])
@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("t", AWKWARD_T)
def test_attention_on_packed_qkv_matches_the_reference(poisoned, t, dtype, fused_dq):
    """Both backwards, each writing dq, dk and dv straight into the strided (B, T, 3C) gradient."""
    from kernels.fmha import attention_qkv

    b, h, d = 2, 6, 64
    qkv = torch.randn(b, t, 3 * h * d, device="cuda", dtype=DT[dtype])
    dout = torch.randn(b, t, h * d, device="cuda")

    def ref(x):
        q, k, v = (y.view(b, t, h, d).transpose(1, 2) for y in x.split(h * d, dim=2))
        return reference.attention(q, k, v, True, dtype=torch.float64).transpose(1, 2).reshape(b, t, h * d)

    out, (dqkv,) = _grads(lambda x: attention_qkv(x, h, fused_dq=fused_dq), [qkv], dout)
    ref_out, (ref_dqkv,) = _grads(ref, [qkv.double()], dout.double())
    tol = tolerance_for(dtype)
    assert out.shape == (b, t, h * d) and out.is_contiguous()
    assert passes(errors(out, ref_out), tol), errors(out, ref_out)
    assert passes(errors(dqkv, ref_dqkv), tol), errors(dqkv, ref_dqkv)


@gpu
@pytest.mark.parametrize("form", ["x", "x+r", "x+r+rbias"])
@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("rows,n", [(1, 768), (13, 384), (127, 1000), (257, 768), (4096, 1024)])
def test_residual_add_layernorm_matches_the_reference(poisoned, rows, n, dtype, form):
    """form "x": no residual, s is x itself (block 0's ln_1), whose gradient from s and from y is
    summed in the backward's pass."""
    from kernels.layernorm import add_layer_norm

    x = torch.randn(rows, n, device="cuda")  # the residual stream is float32 under autocast
    r = torch.randn(rows, n, device="cuda", dtype=DT[dtype])
    w = 1 + 0.1 * torch.randn(n, device="cuda")
    bias = 0.1 * torch.randn(n, device="cuda")
    rbias = torch.randn(n, device="cuda")  # the bias of the layer that made r, added here
    ds, dy = torch.randn(rows, n, device="cuda"), torch.randn(rows, n, device="cuda")

    def run(fn, args):
        leaves = [a.detach().requires_grad_() for a in args]
        with torch.autocast("cuda", dtype=DT[dtype]):
            s, y = fn(*leaves)
        torch.autograd.backward([s, y], [ds.to(s.dtype), dy.to(y.dtype)])
        return s, y, [a.grad for a in leaves]

    terms = form.split("+")
    args = {"x": x, "r": r, "rbias": rbias}
    leaves = [args[t] for t in terms] + [w, bias]

    def ours(a, *rest):
        residual = rest[0] if "r" in terms else None
        return add_layer_norm(a, residual, rest[-2], rest[-1], 1e-5, *rest[1:-2])

    def ref(*rest):
        summed = sum(rest[:-2])
        return summed, reference.layer_norm(summed, rest[-2], rest[-1], 1e-5, dtype=torch.float64)

    s, y, grads = run(ours, leaves)
    rs, ry, rgrads = run(ref, [a.double() for a in leaves])
    tol = tolerance_for(dtype)
    assert y.dtype == DT[dtype] and s.dtype == torch.float32
    named = [("s", s, rs), ("y", y, ry)] + [(f"d{t}", g, want) for t, g, want in zip(terms[:2], grads, rgrads)]
    if "r" in terms:
        assert grads[1].dtype == DT[dtype]
    for name, got, want in named:
        assert passes(errors(got, want), tol), (name, errors(got, want))
    per_row = min(2, len(terms))  # x's and r's gradients; the vectors' are summed over the rows
    big = max(1.0, max(g.abs().max().item() for g in rgrads[per_row:]))
    assert passes(errors(grads[per_row:], rgrads[per_row:]), {**tol, "max_abs": tol["max_abs"] * big})


@gpu
@pytest.mark.parametrize("dloss", [3.0, 1.0])
@pytest.mark.parametrize("path", ["matmul", "cublas"])
@pytest.mark.parametrize("weight", ["float32", "compute"])
@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("rows,v,chunk_rows", [(1, 65, None), (13, 50304, None), (257, 65, None),
                                               (1000, 50304, None), (1000, 50304, 300), (257, 1000, 13),
                                               (127, 2053, 50)])
def test_head_cross_entropy_matches_the_reference(poisoned, monkeypatch, rows, v, chunk_rows, dtype, weight,
                                                  path, dloss):
    """chunk_rows: at most that many rows' logits at a time (chunks of 250, 13 and 43, the last
    of 10 and 41), else the default.
    The weight is fp32 under autocast (the model's), or in the compute dtype (a bf16 weight's
    gradient accumulates in bf16, an fp16 one's in fp32). Both ways to the logits at every
    shape: the cuTile matmul with the softmax's stats, or cuBLAS and the two-read pass. An
    incoming gradient other than 1, as a loss scaler gives, and 1, which bf16 leaves unscaled."""
    _head_matches_the_reference(monkeypatch, rows, v, chunk_rows, dtype, weight, path, dloss)


@gpu
@pytest.mark.parametrize("guess", ["right", "wrong"])
@pytest.mark.parametrize("path", ["matmul", "cublas"])
@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("rows,v,chunk_rows", [(13, 50304, None), (257, 65, None), (1000, 50304, 300),
                                               (127, 2053, 50)])
def test_head_told_its_loss_gradient_matches_the_reference(poisoned, monkeypatch, rows, v, chunk_rows, dtype,
                                                           path, guess):
    """Told the loss's gradient (a loss scale of 2^16), the head makes its gradients at that scale
    in the forward, and its backward then has nothing to rescale: every scale it applies is 1. A
    wrong guess is rescaled as without one. Either way the gradients are the reference's."""
    scales, scaled = [], cross_entropy._scaled

    def recording(x, scale, *args, **kwargs):
        scales.append(scale.item())
        return scaled(x, scale, *args, **kwargs)
    monkeypatch.setattr(cross_entropy, "_scaled", recording)
    dloss = 65536.0
    hint = torch.tensor(dloss if guess == "right" else 3.0, device="cuda")
    _head_matches_the_reference(monkeypatch, rows, v, chunk_rows, dtype, "float32", path, dloss, hint)
    assert len(scales) == 2  # dx's and the weight's
    if dtype == "float16":  # bf16 heads leave the loss's gradient to the backward, with or without a guess
        assert (all(s == 1.0 for s in scales)) == (guess == "right"), scales


def _head_matches_the_reference(monkeypatch, rows, v, chunk_rows, dtype, weight, path, dloss, loss_grad=None):
    monkeypatch.setattr(cross_entropy, "GEMM_MIN_V", 0 if path == "matmul" else 1 << 30)
    c = 768 if v > 1000 else 384
    x = torch.randn(rows, c, device="cuda", dtype=DT[dtype])
    w = (0.02 * torch.randn(v, c, device="cuda")).to(torch.float32 if weight == "float32" else DT[dtype])
    targets = torch.randint(v, (rows,), device="cuda")
    targets[::5] = -1  # ignored rows
    if (targets < 0).all():
        targets[0] = 1

    def run(fn, args):
        leaves = [a.detach().requires_grad_() for a in args]
        with torch.autocast("cuda", dtype=DT[dtype]):
            loss = fn(*leaves)
        (loss * dloss).backward()
        return loss, [a.grad for a in leaves]

    chunk = {} if chunk_rows is None else {"chunk_bytes": chunk_rows * v * torch.finfo(DT[dtype]).bits // 8}
    loss, grads = run(lambda a, b: cross_entropy.linear_cross_entropy(a, b, targets, loss_grad=loss_grad, **chunk),
                      [x, w])
    rloss, rgrads = run(lambda a, b: F.cross_entropy(a @ b.t(), targets, ignore_index=-1),
                        [x.double(), w.double()])
    tol = tolerance_for(dtype)
    assert passes(errors(loss, rloss), tol), errors(loss, rloss)
    # a gradient in a 16-bit dtype is off by its rounding, relative to its size: one row's weight
    # gradient reaches ~10, where a bf16 step is 0.06
    big = max(1.0, max(g.abs().max().item() for g in rgrads))
    got = errors({"grad.x": grads[0], "grad.w": grads[1]}, {"grad.x": rgrads[0], "grad.w": rgrads[1]})
    assert passes(got, {**tol, "max_abs": tol["max_abs"] * big}), got


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("rows,n", [(1, 1), (13, 65), (127, 1000), (257, 2304), (8192, 768), (3, 50304)])
def test_column_sum_matches_the_reference(poisoned, rows, n, dtype):
    x = torch.randn(rows, n, device="cuda", dtype=DT.get(dtype, torch.float32)) + 0.5  # sums well off 0
    got = linear.column_sum(x.view(1, rows, n))
    want = x.double().sum(0)
    assert got.shape == (n,) and got.dtype == torch.float32
    assert passes(errors(got, want), {"max_abs": 1e-4 * rows, "rel": 1e-5}), errors(got, want)
    assert torch.equal(got, linear.column_sum(x))  # the same order every run
    assert linear.column_sum(x[:0]).eq(0).all()


@gpu
@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("t", AWKWARD_T)
@pytest.mark.parametrize("c,n_head", [(768, 12), (200, 5)])
def test_qkv_bias_gradient_from_dq_and_the_output_bias_matches_the_reference(poisoned, t, c, n_head, dtype):
    """Causal attention in float64 between two biased projections: the qkv bias's gradient from
    dQ's column sums, zeros and c_proj's bias gradient times its weight equals autograd's, which
    sums all of dQKV; its key part is exactly zero (autograd's is rounding noise)."""
    x = torch.randn(2, t, c, device="cuda", dtype=torch.float64)
    leaves = [torch.randn(3 * c, c, device="cuda", dtype=torch.float64) / c ** 0.5,
              torch.randn(3 * c, device="cuda", dtype=torch.float64),
              torch.randn(c, c, device="cuda", dtype=torch.float64) / c ** 0.5,
              torch.randn(c, device="cuda", dtype=torch.float64)]
    wa, ba, wp, bp = (leaf.requires_grad_() for leaf in leaves)
    qkv = F.linear(x, wa, ba)
    qkv.retain_grad()
    q, k, v = (z.view(2, t, n_head, c // n_head).transpose(1, 2) for z in qkv.split(c, dim=2))
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, t, c)
    F.linear(att, wp, bp).backward(torch.randn(2, t, c, device="cuda", dtype=torch.float64))
    dq = qkv.grad.reshape(2 * t, 3 * c).to(DT[dtype])[:, :c]  # a strided view, as the block passes it
    got = linear.qkv_bias_grad(dq, bp.grad.float(), wp.detach().to(DT[dtype]))
    assert got.shape == (3 * c,) and got.dtype == torch.float32
    assert got[c:2 * c].eq(0).all() and ba.grad[c:2 * c].abs().max() < 1e-9 * ba.grad.abs().max()
    big = ba.grad.abs().max().item()
    tol = tolerance_for(dtype)
    assert passes(errors(got, ba.grad), {**tol, "max_abs": tol["max_abs"] * big}), errors(got, ba.grad)
    assert torch.equal(got, linear.qkv_bias_grad(dq, bp.grad.float(), wp.detach().to(DT[dtype])))


@gpu
@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("t,k,n,bias", [(1, 64, 48, True), (13, 384, 1152, False), (127, 768, 2304, True),
                                        (257, 1000, 77, True)])
def test_linear_matches_the_reference(t, k, n, bias, dtype):
    """Under autocast, as the model runs it: fp32 parameters and residual stream, gradients back in
    each input's dtype, checked against float64."""
    x = torch.randn(2, t, k, device="cuda")
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    b = torch.randn(n, device="cuda") if bias else None
    dout = torch.randn(2, t, n, device="cuda")

    def run(fn, args):
        leaves = [a.detach().requires_grad_() for a in args if a is not None]
        with torch.autocast("cuda", dtype=DT[dtype]):
            out = fn(*leaves)
        out.backward(dout.to(out.dtype))
        return out, [a.grad for a in leaves]

    out, grads = run(linear.linear, [x, w, b])
    rout, rgrads = run(lambda *a: F.linear(*(t.double() for t in a)), [x, w, b])
    tol = tolerance_for(dtype)
    assert out.dtype == DT[dtype] and [g.dtype for g in grads] == [torch.float32] * len(grads)
    assert passes(errors(out, rout), tol), errors(out, rout)
    assert passes(errors(grads[0], rgrads[0]), tol), errors(grads[0], rgrads[0])
    big = max(1.0, max(g.abs().max().item() for g in rgrads[1:]))  # summed over the rows
    assert passes(errors(grads[1:], rgrads[1:]), {**tol, "max_abs": tol["max_abs"] * big})


@gpu
@pytest.mark.parametrize("t", AWKWARD_T)
@pytest.mark.parametrize("bias,gelu", [(True, "none"), (False, "tanh")])
def test_a_block_as_one_node_computes_what_its_separate_functions_do(t, bias, gelu):
    """The same kernels on the same inputs: the loss and every gradient bit for bit, under fp16
    autocast, with random weights and biases, but two bias gradients the block sums in other
    orders: c_attn's, from dQ and c_proj's bias gradient (kernels.linear.qkv_bias_grad), and
    c_fc's, by the matmul that gives the GELU's input gradient (kernels.gelu.matmul_gelu_backward),
    whose dx is the cuBLAS product's and the GELU backward's to the bit. Both models within the
    fp16 tolerance of the float32 torch model, those gradients too."""
    from model.gpt import FUSIONS, GPT, GPTConfig

    config = GPTConfig(block_size=512, vocab_size=97, n_layer=2, n_head=2, n_embd=128, bias=bias, gelu=gelu)
    torch.manual_seed(0)
    reference_model = GPT(config).cuda()
    with torch.no_grad():
        for p in reference_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    separate = tuple(f for f in FUSIONS if f != "block")
    models = [GPT(config, "cutile", fusions=f).cuda() for f in (FUSIONS, separate)]
    assert models[0].transformer.h[0].fused is not None and models[1].transformer.h[0].fused is None
    idx, targets = torch.randint(97, (2, 3, t), device="cuda")
    results = []
    for model in [*models, reference_model]:
        model.load_state_dict(reference_model.state_dict())
        with torch.autocast("cuda", dtype=torch.float16, enabled=model is not reference_model):
            _, loss = model(idx, targets)
        loss.backward()
        results.append([loss] + [p.grad for p in model.parameters()])
    block, separate, ref = results
    names = ["loss"] + [name for name, _ in models[0].named_parameters()]
    differ = [n for n, a, b in zip(names, block, separate) if not torch.equal(a, b)]
    summed = [f"transformer.h.{i}.{layer}.bias"
              for i in range(config.n_layer) for layer in ("attn.c_attn", "mlp.c_fc")]
    assert set(differ) <= set(summed if bias else []), differ
    big = max(1.0, max(g.abs().max().item() for g in ref[1:]))
    tol = tolerance_for("float16")
    assert passes(errors(block, ref), {**tol, "max_abs": tol["max_abs"] * big}), errors(block, ref)


@gpu
def test_an_eager_step_makes_one_autograd_node_per_block():
    """What the eager step's host time rests on (docs/PERF.md): one Python autograd node per block,
    plus the first LayerNorm, the token embedding and the head; not eight per block."""
    from model.gpt import GPT, GPTConfig

    config = GPTConfig.preset("tiny", n_layer=3, dropout=0.0)
    model = GPT(config, "cutile").cuda()
    idx = torch.randint(config.vocab_size, (2, 13), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        _, loss = model(idx, idx)
    nodes, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            todo.extend(n for n, _ in node.next_functions)
    python_nodes = sorted(type(n).__name__ for n in nodes
                          if isinstance(n, torch.autograd.function.BackwardCFunction))
    assert python_nodes.count("_BlockBackward") == config.n_layer, python_nodes
    assert len(python_nodes) == config.n_layer + 3, python_nodes


@gpu
def test_ten_graphed_train_steps_equal_ten_eager_steps():
    """The graphed training step is the same step: the same parameters after 10 steps."""
    from bench.workloads import model_step

    for provider in ("torch-sdpa", "cutile"):
        params = {}
        for graph in (False, True):
            p = dict(model="shakespeare-char", batch=8, seq_len=127, mode="train", dtype="float16",
                     graph=graph)
            x = model_step.make_inputs(p, torch.device("cuda"))
            fn = model_step.WORKLOAD.providers[provider](p, x)
            for _ in range(10):
                out = fn()
            params[graph] = {k: v.detach().clone() for k, v in out.items() if k.startswith("param.")}
        err = errors(params[True], params[False])
        assert passes(err, tolerance_for("float16")) and err["rel"] < 1e-3, (provider, err)


@gpu
def test_a_process_that_graphed_cutile_kernels_exits_cleanly():
    code = textwrap.dedent("""
        import torch
        from bench.workloads import model_step
        p = dict(model="tiny", batch=2, seq_len=32, mode="train", dtype="float16", graph=True)
        x = model_step.make_inputs(p, torch.device("cuda"))
        fn = model_step.WORKLOAD.providers["cutile"](p, x)
        fn(); fn()
        torch.cuda.synchronize()
        print("done")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "done" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
