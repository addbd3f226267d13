"""The correctness gate: how far a provider's output is from the reference, and whether that passes.

Used by the harness before timing and by the kernel parity tests, so both judge alike.
"""
from __future__ import annotations

import builtins
import math
from collections.abc import Mapping

import torch

# this module's own builtins, and its helpers bound as default arguments: the worker judges with
# them after a provider has run, and a provider that replaced a name, even for a moment, must not
# be judged by its replacement (docs/isolation.md)
__builtins__ = dict(vars(builtins))

# default (atol, rtol) per input dtype; a sweep's `tolerance:` block overrides them
DEFAULT_TOLERANCE = {
    "float16": {"max_abs": 1e-2, "rel": 1e-2},
    "bfloat16": {"max_abs": 5e-2, "rel": 2e-2},
    "float32": {"max_abs": 1e-4, "rel": 1e-4},
    "float64": {"max_abs": 1e-8, "rel": 1e-8},
}


def _flat(x, strict: bool = True, mappings: tuple = (), _tensor=torch.Tensor,
          _plain=(torch.Tensor, torch.nn.Parameter), _mapping=Mapping) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a tensor, a tuple/list or a dict of them (names from dict keys and
    positions), so an error can say which tensor it is in. Only plain tensors (and parameters) in
    plain tuples, lists and dicts are judged: a subclass's own methods or __torch_function__ could
    make any difference read zero, and a container of a provider's class could run its work when
    the harness walks it (a list that computes on its first iteration); `mappings` are a workload's
    own classes of output, read when judged (Workload.outputs). Not `strict` (a workload's inputs,
    which the harness made): subclasses are walked, anything else is skipped."""
    pairs = []

    def walk(x, name):
        kind = type(x)
        if kind in _plain or (not strict and isinstance(x, _tensor)):
            pairs.append((name or "0", x))
        elif isinstance(x, _tensor):
            raise TypeError(f"expected plain tensors, got a {kind.__name__} (a subclass of "
                            f"torch.Tensor) at output {name or '0'}")
        elif kind is dict or kind in mappings or (not strict and isinstance(x, _mapping)):
            for k, v in x.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif kind in (list, tuple) or (not strict and isinstance(x, (list, tuple))):
            for i, v in enumerate(x):
                walk(v, f"{name}.{i}" if name else str(i))
        elif strict:
            raise TypeError(f"expected a tensor, or a tuple, list or dict of tensors, got {kind.__name__}"
                            + (f" at output {name}" if name else ""))
    walk(x, "")
    return pairs


def errors(out, ref, mappings: tuple = (), _flat=_flat, _isfinite=torch.isfinite, _sqrt=math.sqrt,
           _inf=math.inf, _detach=torch.Tensor.detach, _double=torch.Tensor.double) -> dict:
    """How far `out` is from `ref`, judged tensor by tensor so that no tensor hides in the others
    (a wrong gradient of one layer among 150 tensors must show):

    max_abs: the largest |out - ref| of any tensor, in units of that tensor's RMS where the RMS
    exceeds 1 (a weight gradient summed over 8192 rows is ~100 in size, and its fp16 rounding alone
    is ~0.06);
    rel: the largest ||out - ref|| / ||ref|| of any tensor, where a tensor much smaller than its
    group (a gradient that is zero in exact arithmetic, say) is measured against the norm it would
    have with its group's typical element size, not against its own rounding noise. Named tensors
    ("grad.h.0.c_fc.weight", "param.h.0.c_fc.weight") group by the part of their name before the
    first dot, so gradients are judged at the gradients' scale and parameters at theirs; the tensors
    of a tuple form one group;
    worst: the name of the tensor with the largest rel.

    NaN or inf anywhere in `out`, or a mismatch of names or shapes, gives inf for both.
    """
    outs, refs = _flat(out, mappings=mappings), _flat(ref, mappings=mappings)
    if [n for n, _ in outs] != [n for n, _ in refs] or any(
            o.shape != r.shape for (_, o), (_, r) in zip(outs, refs)):
        return {"max_abs": _inf, "rel": _inf, "worst": None}
    # torch.Tensor's own methods, not the tensors': a provider can set `detach` on a tensor it returns
    pairs = [(n, _double(_detach(o)), _double(_detach(r))) for (n, o), (_, r) in zip(outs, refs)]
    bad = next((n for n, o, _ in pairs if not _isfinite(o).all()), None)
    if bad is not None:
        return {"max_abs": _inf, "rel": _inf, "worst": bad}
    group = lambda name: name.split(".")[0] if "." in name else ""  # noqa: E731
    sums: dict[str, list[float]] = {}
    for name, _, r in pairs:
        s = sums.setdefault(group(name), [0.0, 0])
        s[0] += r.square().sum().item()
        s[1] += r.numel()
    max_abs, rel, worst = 0.0, 0.0, None
    for name, o, r in pairs:
        total_sq, count = sums[group(name)]
        typical = _sqrt(total_sq / max(count, 1))
        if not o.numel():
            continue
        d = o - r
        r_norm = r.norm().item()
        max_abs = max(max_abs, d.abs().max().item() / max(1.0, r_norm / _sqrt(r.numel())))
        scale = max(r_norm, typical * _sqrt(r.numel()))
        t_rel = d.norm().item() / scale if scale > 0 else d.norm().item()
        if worst is None or t_rel > rel:
            rel, worst = t_rel, name
    return {"max_abs": max_abs, "rel": rel, "worst": worst}


def tolerance_for(dtype: str, overrides: dict | None = None) -> dict[str, float]:
    tol = dict(DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE["float32"]))
    tol.update((overrides or {}).get(dtype, {}))
    return tol


def passes(err: dict[str, float], tol: dict[str, float]) -> bool:
    """Both the largest absolute error and the relative error are within tolerance."""
    return err["max_abs"] <= tol["max_abs"] and err["rel"] <= tol["rel"]
