"""PyTorch references for every kernel, computed in float32 (or float64) whatever the input dtype.

The parity tests and the harness's correctness gate both compare against these.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MASK_FLOOR = -1e20  # the seed's stability floor: masked scores are finite, so no row becomes NaN


def attention(q, k, v, causal: bool = True, scale: float | None = None, dtype=torch.float32):
    """Naive attention in `dtype` (float32 by default): softmax(q k^T * scale, masked) v.

    q, k, v: (B, H, T, D). Returns (B, H, T, D) in `dtype`.
    """
    q, k, v = (x.to(dtype) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        t_q, t_k = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1 + t_k - t_q)
        scores = scores.masked_fill(mask, MASK_FLOOR)
    return torch.softmax(scores, dim=-1) @ v


def attention_lse(q, k, v, causal: bool = True, scale: float | None = None):
    """Log-sum-exp of each query row's scaled, masked scores, in float32: (B, H, T)."""
    q, k = q.float(), k.float()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        t_q, t_k = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1 + t_k - t_q)
        scores = scores.masked_fill(mask, MASK_FLOOR)
    return torch.logsumexp(scores, dim=-1)


def layer_norm(x, weight, bias, eps: float = 1e-5, dtype=torch.float32):
    """LayerNorm over the last dimension in `dtype`; weight and bias may be None."""
    n = x.shape[-1]
    w = None if weight is None else weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    return F.layer_norm(x.to(dtype), (n,), w, b, eps)


def gelu(x, approximate: str = "none", dtype=torch.float32):
    """GELU in `dtype`: the exact erf form (nanoGPT) or approximate='tanh' (GPT-2's original)."""
    return F.gelu(x.to(dtype), approximate=approximate)
