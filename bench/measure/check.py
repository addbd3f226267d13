"""The correctness gate: how far a provider's output is from the reference, and whether that passes.

Used by the harness before timing and by the kernel parity tests, so both judge alike.
"""
from __future__ import annotations

import math

import torch

# default (atol, rtol) per input dtype; a sweep's `tolerance:` block overrides them
DEFAULT_TOLERANCE = {
    "float16": {"max_abs": 1e-2, "rel": 1e-2},
    "bfloat16": {"max_abs": 5e-2, "rel": 2e-2},
    "float32": {"max_abs": 1e-4, "rel": 1e-4},
    "float64": {"max_abs": 1e-8, "rel": 1e-8},
}


def _flat(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _flat(item)]
    raise TypeError(f"expected a tensor or a tuple of tensors, got {type(x).__name__}")


def errors(out, ref) -> dict[str, float]:
    """max_abs: the largest |out - ref|, in units of the reference tensor's RMS where that exceeds 1
    (a weight gradient summed over 8192 rows is ~100 in size, and its fp16 rounding alone is ~0.06);
    rel: ||out - ref|| / ||ref|| over all tensors together.

    NaN or inf anywhere in `out`, or a shape mismatch, gives inf for both.
    """
    outs, refs = _flat(out), _flat(ref)
    if len(outs) != len(refs) or any(o.shape != r.shape for o, r in zip(outs, refs)):
        return {"max_abs": math.inf, "rel": math.inf}
    max_abs, diff_sq, ref_sq = 0.0, 0.0, 0.0
    for o, r in zip(outs, refs):
        o, r = o.detach().double(), r.detach().double()
        if not torch.isfinite(o).all():
            return {"max_abs": math.inf, "rel": math.inf}
        if not o.numel():
            continue
        d = o - r
        r_sq = r.square().sum().item()
        scale = max(1.0, math.sqrt(r_sq / r.numel()))
        max_abs = max(max_abs, d.abs().max().item() / scale)
        diff_sq += d.square().sum().item()
        ref_sq += r_sq
    rel = math.sqrt(diff_sq) / math.sqrt(ref_sq) if ref_sq > 0 else math.sqrt(diff_sq)
    return {"max_abs": max_abs, "rel": rel}


def tolerance_for(dtype: str, overrides: dict | None = None) -> dict[str, float]:
    tol = dict(DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE["float32"]))
    tol.update((overrides or {}).get(dtype, {}))
    return tol


def passes(err: dict[str, float], tol: dict[str, float]) -> bool:
    """Both the largest absolute error and the relative error are within tolerance."""
    return err["max_abs"] <= tol["max_abs"] and err["rel"] <= tol["rel"]
