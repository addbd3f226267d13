"""A GPT-2 block, from its input to the next block's LayerNorm, as one autograd node.

An eager training step spends host time on every autograd Function of its own: the apply, the
saved context, the engine's call back into Python for the backward. Per block the cuTile model
had eight (four Linears, attention, GELU, two residual-add LayerNorms), and on shakespeare-char
their Python made its eager step slower on the host than torch's C++ ops (docs/PERF.md). Here one
Function runs the same kernels and matmuls on the same inputs, on (rows, C) views, and its backward
is the eight backwards written out in one function: the same results, bit for bit, from one node,
but for two bias gradients, summed in other orders. c_fc's is summed by the matmul that gives the
GELU's input gradient (below). c_attn's it takes from dQ's column sums and c_proj's bias gradient
(kernels.linear.qkv_bias_grad) rather than from all of dQKV's: a third of the bytes (GPT-2, H100:
the column sum of dQKV took 0.26 ms of the step).

The block takes the residual stream x and h = LayerNorm(x) and returns the next pair: the residual
stream after both branches, and the next LayerNorm of it (the next block's ln_1, or ln_f). Each
branch's c_proj bias is added in the residual add that takes the branch, so it has no dropout.
c_fc's matmul computes the GELU of its product in its epilogue (kernels.gelu.linear_gelu), and
in the backward the MLP's dm @ W_proj computes the GELU's backward in its own
(kernels.gelu.matmul_gelu_backward): 13 us a layer less than cuBLAS and the GELU's backward kernel
on an H100 (docs/PERF.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels import autocast_dtype, fmha, gelu, layernorm
from kernels.adamw import grad_slot
from kernels.linear import cast, mm_acc, qkv_bias_grad

EPS = 1e-5  # GPT-2's LayerNorm epsilon


class _Block(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, ln_w, ln_b, wa, ba, wp, bp, wf, bf, wm, bm, next_w, next_b, spec):
        n_head, approximate, dtype, casts = spec
        b, t, c = x.shape
        ca, cp, cf, cm = (cast(w, dtype, casts) for w in (wa, wp, wf, wm))
        hc = h.reshape(b * t, c).to(dtype)
        qkv = F.linear(hc, ca, None if ba is None else cast(ba, dtype, casts)).view(b, t, 3 * c)
        scale = 1.0 / math.sqrt(c // n_head)
        out, lse, cfg = fmha.qkv_forward(qkv, n_head, scale)
        x2 = x.reshape(b * t, c)
        ln_cfg = layernorm.tuned_config(x2)  # keyed by the residual stream's dtype, as add_layer_norm's
        h1, mean1, rstd1, s1 = layernorm._forward(
            x2, ln_w, ln_b, EPS, True, ln_cfg, residual=F.linear(out.view(b * t, c), cp),
            y_dtype=dtype, residual_bias=bp)
        fc, g = gelu.linear_gelu(h1, cf, bf, approximate)
        h2, mean2, rstd2, s2 = layernorm._forward(s1, next_w, next_b, EPS, True, ln_cfg,
                                                  residual=F.linear(g, cm), y_dtype=dtype, residual_bias=bm)
        ctx.save_for_backward(hc, qkv, out, lse, s1, mean1, rstd1, h1, fc, g, s2, mean2, rstd2,
                              ca, cp, cf, cm, ln_w, next_w, bf)
        ctx.spec, ctx.cfg, ctx.scale = spec, cfg, scale
        ctx.weights = (wa, wp, wf, wm)  # for their gradient slots, if they have them (kernels.adamw)
        ctx.has = tuple(p is not None for p in (ln_b, ba, bp, bm, next_b))
        ctx.dtypes = (h.dtype, ln_w.dtype, wa.dtype)
        ctx.set_materialize_grads(False)
        return s2.view(b, t, c), h2.view(b, t, c)

    @staticmethod
    def backward(ctx, dx_out, dh_out):
        (hc, qkv, out, lse, s1, mean1, rstd1, h1, fc, g, s2, mean2, rstd2,
         ca, cp, cf, cm, ln_w, next_w, bf) = ctx.saved_tensors
        n_head, approximate, dtype, _ = ctx.spec
        h_dtype, ln_dtype, w_dtype = ctx.dtypes
        has_ln_b, has_ba, has_bp, has_bm, has_next_b = ctx.has
        b, t, hh, d = out.shape
        rows, c = b * t, hh * d
        if dh_out is None:  # h unused: only the residual stream's gradient flows
            dh_out = torch.zeros_like(h1)
        ds1, dnext_w, dnext_b, dm, dbm = layernorm.layer_norm_backward(
            dh_out.reshape(rows, c), s2, next_w, mean2, rstd2, ln_dtype,
            dres=None if dx_out is None else dx_out.reshape(rows, c), dr_dtype=dtype, sum_dx=has_bm)
        slot_a, slot_p, slot_f, slot_m = (grad_slot(w) for w in ctx.weights)
        dwm = mm_acc(dm.t(), g, out=slot_m)
        dfc, dbf = gelu.matmul_gelu_backward(dm, cm, fc, bf, approximate, bias_grad=True)
        dwf = mm_acc(dfc.t(), h1, out=slot_f)
        dx, dln_w, dln_b, dy, dbp = layernorm.layer_norm_backward(
            dfc @ cf, s1, ln_w, mean1, rstd1, ln_dtype, dres=ds1, dr_dtype=dtype, sum_dx=has_bp or has_ba)
        dwp = mm_acc(dy.t(), out.view(rows, c), out=slot_p)
        dqkv = fmha.qkv_backward(dy @ cp, qkv, out, lse, n_head, ctx.scale, ctx.cfg).view(rows, 3 * c)
        dwa = mm_acc(dqkv.t(), hc, out=slot_a)
        dba = qkv_bias_grad(dqkv[:, :c], dbp, cp, w_dtype) if has_ba else None
        dh = (dqkv @ ca).view(b, t, c).to(h_dtype)
        return (dx.view(b, t, c), dh, dln_w, dln_b if has_ln_b else None, dwa, dba, dwp,
                dbp if has_bp else None, dwf, dbf,
                dwm, dbm, dnext_w, dnext_b if has_next_b else None, None)


def block(x, h, ln, c_attn, c_proj, c_fc, mlp_proj, next_ln, n_head: int, approximate: str, casts):
    """(x after the block, next_ln of it) for the residual stream x (B, T, C) and h = ln_1(x):
    attention, c_proj, the residual add inside `ln` (ln_2), c_fc with GELU, the MLP's c_proj and
    its residual add inside next_ln. The layers are read for their weight and bias (None where they
    have none); under autocast the matmuls and kernels run in the autocast dtype, reading the
    weights' copies from `casts` (kernels.linear.WeightCasts)."""
    device = x.device.type
    dtype = autocast_dtype(device, h.dtype)
    with torch.autocast(device, enabled=False):
        return _Block.apply(x, h, ln.weight, ln.bias, c_attn.weight, c_attn.bias, c_proj.weight, c_proj.bias,
                            c_fc.weight, c_fc.bias, mlp_proj.weight, mlp_proj.bias, next_ln.weight,
                            next_ln.bias, (n_head, approximate, dtype, casts))
