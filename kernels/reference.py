"""PyTorch references for every kernel, computed in float32 (or float64) whatever the input dtype.

The parity tests and the harness's correctness gate both compare against these.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MASK_FLOOR = -1e20  # the seed's stability floor: masked scores are finite, so no row becomes NaN
_SCORE_BYTES = 1 << 30  # materialise at most this many bytes of scores at once


def _scores(q, k, scale, causal, row0, t_q):
    """Scaled fp32 scores of a chunk of query rows starting at row `row0` of `t_q`, masked if causal.

    The causal mask aligns the last query with the last key (t_q may be shorter than t_k)."""
    s = (q @ k.transpose(-2, -1)).float() * scale
    if causal:
        offset = k.shape[-2] - t_q
        rows = torch.arange(row0, row0 + q.shape[-2], device=q.device)[:, None]
        cols = torch.arange(k.shape[-2], device=q.device)[None, :]
        s = s.masked_fill(cols > rows + offset, MASK_FLOOR)
    return s


def _row_chunks(q, t_k):
    per_row = max(1, q[..., :1, :1].numel() * t_k * 4)
    step = max(1, _SCORE_BYTES // per_row)
    return range(0, q.shape[-2], step), step


def attention(q, k, v, causal: bool = True, scale: float | None = None, dtype=torch.float32):
    """softmax(q k^T * scale, masked) v for (B, H, T, D) inputs.

    Matmuls run in `dtype` (float32 for a reference; the input dtype for the naive "native" path);
    scores, mask and softmax are always float32, since -1e20 does not fit in fp16. Query rows are
    processed in chunks so long sequences do not materialise the whole T x T score matrix.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k, v = (x.to(dtype) for x in (q, k, v))
    starts, step = _row_chunks(q, k.shape[-2])
    outs = [torch.softmax(_scores(q[..., i:i + step, :], k, scale, causal, i, q.shape[-2]), dim=-1).to(dtype) @ v
            for i in starts]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def attention_lse(q, k, v, causal: bool = True, scale: float | None = None):
    """Log-sum-exp of each query row's scaled, masked scores, in float32: (B, H, T)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k = q.float(), k.float()
    starts, step = _row_chunks(q, k.shape[-2])
    return torch.cat([torch.logsumexp(_scores(q[..., i:i + step, :], k, scale, causal, i, q.shape[-2]), dim=-1)
                      for i in starts], dim=-1)


def layer_norm(x, weight, bias, eps: float = 1e-5, dtype=torch.float32):
    """LayerNorm over the last dimension in `dtype`; weight and bias may be None."""
    n = x.shape[-1]
    w = None if weight is None else weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    return F.layer_norm(x.to(dtype), (n,), w, b, eps)


def gelu(x, approximate: str = "none", dtype=torch.float32):
    """GELU in `dtype`: the exact erf form (nanoGPT) or approximate='tanh' (GPT-2's original)."""
    return F.gelu(x.to(dtype), approximate=approximate)


def adamw_step(param, grad, exp_avg, exp_avg_sq, step: int, lr: float, betas, eps: float,
               weight_decay: float):
    """One AdamW step in float64 (torch's arithmetic: decay, then the bias-corrected update) from
    moments left at step - 1; returns (param, exp_avg, exp_avg_sq), the inputs unchanged."""
    (b1, b2), g = betas, grad.double()
    m = b1 * exp_avg.double() + (1 - b1) * g
    v = b2 * exp_avg_sq.double() + (1 - b2) * g * g
    denom = v.sqrt() / (1 - b2 ** step) ** 0.5 + eps
    return param.double() * (1 - lr * weight_decay) - lr / (1 - b1 ** step) * m / denom, m, v
