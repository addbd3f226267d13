"""LayerNorm over the last dimension of (rows, hidden) inputs, with random weight and bias."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.workloads import Unavailable, Workload
from bench.workloads.providers import cutile_module, dtype_of, reference_step, step, tilegym_ops
from kernels import reference

EPS = 1e-5
DEFAULTS = dict(rows=8192, hidden=768, dtype="float16", mode="fwd")
CHOICES = dict(dtype=["float16", "bfloat16", "float32"], mode=["fwd", "fwd_bwd"])


def make_inputs(p, device):
    dt, n, grad = dtype_of(p["dtype"]), p["hidden"], p["mode"] == "fwd_bwd"
    x = torch.randn(p["rows"], n, device=device, dtype=dt).requires_grad_(grad)
    w = (1 + 0.5 * torch.randn(n, device=device, dtype=dt)).requires_grad_(grad)
    b = (0.5 * torch.randn(n, device=device, dtype=dt)).requires_grad_(grad)
    dy = torch.randn_like(x) if grad else None
    return dict(x=x, w=w, b=b, dy=dy)


def _run(norm, p, t):
    return step(norm, p["mode"], [t["x"], t["w"], t["b"]], t["dy"])


def reference_output(p, t):
    norm = lambda x, w, b: reference.layer_norm(x, w, b, EPS)  # noqa: E731
    return reference_step(norm, p["mode"], [t["x"], t["w"], t["b"]], t["dy"])


def torch_layer_norm(p, t):
    return _run(lambda x, w, b: F.layer_norm(x, (p["hidden"],), w, b, EPS), p, t)


def compiled(p, t):
    norm = torch.compile(lambda x, w, b: F.layer_norm(x, (p["hidden"],), w, b, EPS))
    return _run(norm, p, t)


BWD = "bwd_"  # the backward kernel's config keys as sweep axes: bwd_rows_per_block, ...


def _knobs(p, config: dict, prefix: str = "") -> dict:
    """The keys of a kernel's config that the case names as axes (`prefix` + key)."""
    return {k: p[prefix + k] for k in config if prefix + k in p}


def cutile(p, t):
    """The autograd-aware layer_norm; a sweep's launch knobs go to its kernels: the keys of the
    kernel's FWD_CONFIG to the forward, whose saved statistics a fwd_bwd case's backward reads,
    and those of BWD_CONFIG, prefixed bwd_, to the backward."""
    ln = cutile_module("layernorm")
    persistent = p.get("persistent")
    fwd, bwd = _knobs(p, ln.FWD_CONFIG), _knobs(p, ln.BWD_CONFIG, BWD)
    return _run(lambda x, w, b: ln.layer_norm(x, w, b, EPS, persistent=persistent, backward=bwd, **fwd),
                p, t)


def tuned_key(p):
    """The config a case tunes, keyed by hidden and rows, on the persistent grid (what layer_norm
    runs). A forward config (FWD_CONFIG keys): timed in forward-only cases, gated by fwd_bwd cases
    too (the backward reads the mean and rstd it saved, which a forward-only check never sees). A
    backward config (bwd_ keys): timed in fwd_bwd cases, beside a forward that is the same for all
    (the tuned one). A case that names both tunes neither: its time is of the pair."""
    from kernels.layernorm import BWD_CONFIG, FWD_CONFIG

    fwd, bwd = _knobs(p, FWD_CONFIG), _knobs(p, BWD_CONFIG, BWD)
    if p.get("persistent") is False or (fwd and bwd):
        return None
    if bwd:
        return "layernorm_bwd", p["hidden"], p["rows"], bwd, p["mode"] == "fwd_bwd"
    return "layernorm_fwd", p["hidden"], p["rows"], fwd, p["mode"] == "fwd"


def tilegym(p, t):
    ops = tilegym_ops()
    if not torch.cuda.is_available():
        raise Unavailable("TileGym's cuTile layer_norm_legacy needs a CUDA GPU")
    return _run(lambda x, w, b: ops.layer_norm_legacy(x, (p["hidden"],), w, b, EPS), p, t)


LIGER = "liger-kernel==0.8.5"


def liger_module(name, what):
    """liger_kernel.<name>, or Unavailable saying why not (Liger is an optional peer: the `peers`
    extra). Modules are imported by path, never through LIGER_KERNEL_IMPL, which swaps Liger's
    whole namespace once per process: here its Triton and cuTile kernels run side by side."""
    import importlib

    try:
        return importlib.import_module(f"liger_kernel.{name}")
    except Exception as e:  # a missing or broken optional install may raise anything on import
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "liger_kernel":
            raise Unavailable(f"Liger-Kernel not installed ({LIGER} has {what})") from None
        raise Unavailable(f"Liger-Kernel's {what} not importable ({type(e).__name__}: {e})"[:200]) from None


def liger(module, what):
    """Liger's LigerLayerNormFunction(X, W, B, eps) from `module`: liger_kernel.ops.layer_norm
    (Triton) or liger_kernel.ops.cutile.ops.layer_norm (cuTile); its backward gives dX, dW, dB."""
    def factory(p, t):
        fn = liger_module(module, what).LigerLayerNormFunction
        if not torch.cuda.is_available():
            raise Unavailable(f"Liger-Kernel's {what} needs a CUDA GPU")
        return _run(lambda x, w, b: fn.apply(x, w, b, EPS), p, t)
    return factory


def bytes_moved(p):
    """Read x and write y (fwd); fwd+bwd counted as 5 passes over M x N, as the anchors do."""
    elt = torch.finfo(dtype_of(p["dtype"])).bits // 8
    return (2 if p["mode"] == "fwd" else 5) * p["rows"] * p["hidden"] * elt


WORKLOAD = Workload(
    name="layernorm", make_inputs=make_inputs, reference=reference_output,
    providers={"torch": torch_layer_norm, "compile": compiled, "cutile": cutile, "tilegym": tilegym,
               "liger-triton": liger("ops.layer_norm", "Triton LayerNorm"),
               "liger-cutile": liger("ops.cutile.ops.layer_norm", "cuTile LayerNorm")},
    subject=("cutile",), x_axes=("hidden", "rows"), regimes=("mode",), panels=("mode", "dtype"),
    flops=None, bytes=bytes_moved, defaults=DEFAULTS, choices=CHOICES, tuned_key=tuned_key)
