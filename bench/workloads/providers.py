"""Provider helpers shared by the workloads: optional imports that answer why they failed."""
from __future__ import annotations

import importlib
import os
import sys

from bench.workloads import Unavailable


def cutile_module(name: str):
    """kernels.<name>, or Unavailable with the reason cuTile cannot run here."""
    import kernels

    ok, reason = kernels.available()
    if not ok:
        raise Unavailable(f"cuTile not available: {reason}")
    try:
        return importlib.import_module(f"kernels.{name}")
    except ImportError as e:
        raise Unavailable(f"kernels.{name} is not importable ({e})") from None


def tilegym_ops():
    """tilegym.ops from the installed package, or from the source checkout named by TILEGYM_PATH."""
    path = os.environ.get("TILEGYM_PATH")
    if path:
        src = os.path.join(path, "src")
        sys.path.insert(0, src if os.path.isdir(src) else path)
    try:
        return importlib.import_module("tilegym.ops")
    except Exception as e:  # a broken optional install may raise anything on import
        raise Unavailable(f"TileGym not importable ({type(e).__name__}: {e})"[:200]) from None


def dtype_of(name: str):
    import torch

    return getattr(torch, name)


def step(op, mode: str, args, grad_out):
    """fn() running op(*args) forward only (no autograd), or forward and backward with grad_out,
    returning (out, grad of each arg): what a provider is timed on and checked by."""
    import torch

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return op(*args)
        return fn

    def fn():
        for a in args:
            a.grad = None
        out = op(*args)
        out.backward(grad_out)
        return (out.detach(), *(a.grad for a in args))
    return fn


def reference_step(op, mode: str, args, grad_out):
    """The same in float32 on detached copies: the reference a provider's step is checked against."""
    if mode == "fwd":
        return op(*args)
    args = [a.detach().float().requires_grad_() for a in args]
    return step(op, mode, args, grad_out.float())()
