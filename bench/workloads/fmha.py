"""Causal (or full) multi-head attention, forward or forward+backward, on (B, H, T, D) inputs."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.workloads import Unavailable, Workload
from bench.workloads.providers import cutile_module, dtype_of, reference_step, step, tilegym_ops
from kernels import reference

DEFAULTS = dict(batch=8, heads=12, seq_len=1024, head_dim=64, dtype="float16", causal=True,
                mode="fwd")
CHOICES = dict(dtype=["float16", "bfloat16", "float32"], mode=["fwd", "fwd_bwd"])


def make_inputs(p, device):
    shape = (p["batch"], p["heads"], p["seq_len"], p["head_dim"])
    grad = p["mode"] == "fwd_bwd"
    q, k, v = (torch.randn(shape, device=device, dtype=dtype_of(p["dtype"]), requires_grad=grad)
               for _ in range(3))
    dout = torch.randn(shape, device=device, dtype=q.dtype) if grad else None
    return dict(q=q, k=k, v=v, dout=dout)


def _run(attn, p, x):
    return step(attn, p["mode"], [x["q"], x["k"], x["v"]], x["dout"])


def reference_output(p, x):
    attn = lambda q, k, v: reference.attention(q, k, v, p["causal"])  # noqa: E731
    return reference_step(attn, p["mode"], [x["q"], x["k"], x["v"]], x["dout"])


def native(p, x):
    """The seed's "native PyTorch": matmuls in the input dtype, fp32 scores with the -1e20 floor."""
    dt = dtype_of(p["dtype"])
    return _run(lambda q, k, v: reference.attention(q, k, v, p["causal"], dtype=dt), p, x)


def compiled(p, x):
    dt = dtype_of(p["dtype"])
    attn = torch.compile(lambda q, k, v: reference.attention(q, k, v, p["causal"], dtype=dt))
    return _run(attn, p, x)


def sdpa(backend_name):
    def factory(p, x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)

        def attn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=p["causal"])

        fn = _run(attn, p, x)
        try:  # ask once whether this backend takes these inputs here
            fn()
        except RuntimeError as e:
            first = str(e).strip().split(". ")[0].splitlines()[0][:120]
            raise Unavailable(f"SDPA {backend_name.lower()} backend unavailable here ({first})") from None
        return fn
    return factory


FWD_KEYS = ("tile_m", "tile_n", "k_lat", "v_lat", "occupancy", "num_ctas", "num_worker_warps", "head_group")
TILE_KEYS = FWD_KEYS + ("fused_dq",)  # fused_dq picks the backward


def cutile(p, x):
    fmha = cutile_module("fmha")
    config = {k: p[k] for k in TILE_KEYS if k in p}
    return _run(lambda q, k, v: fmha.flash_attention(q, k, v, causal=p["causal"], **config), p, x)


def tuned_key(p):
    """The forward kernel's config, keyed by causality, head dim and T. Forward-only cases are
    timed; fwd_bwd cases, which time the backward kernels too (whose tiles the config does not
    set), only gate the config: their backward reads the lse the forward saved."""
    return ("fmha_fwd" if p["causal"] else "fmha_fwd_full", p["head_dim"], p["seq_len"],
            {k: p[k] for k in FWD_KEYS if k in p}, p["mode"] == "fwd")


def tilegym(p, x):
    ops = tilegym_ops()
    if not torch.cuda.is_available():
        raise Unavailable("TileGym's cuTile fmha needs a CUDA GPU")
    return _run(lambda q, k, v: ops.fmha(q, k, v, is_causal=p["causal"],
                                         scaling=1 / math.sqrt(p["head_dim"])), p, x)


def _flash_module(module, package):
    """module (an attribute holder with flash_attn_func), or Unavailable saying why not."""
    import importlib

    try:
        mod = importlib.import_module(module)
        getattr(mod, "flash_attn_func")
    except Exception as e:  # a missing or broken optional install may raise anything on import
        why = "not installed" if isinstance(e, ModuleNotFoundError) else f"not importable ({type(e).__name__}: {e})"
        raise Unavailable(f"{package} {why}"[:200]) from None
    return mod


def flash(module, package, returns_tuple):
    """flash_attn_func of `module` (flash-attn 2's `flash_attn`, FlashAttention-4's
    `flash_attn.cute`), which takes and returns (B, T, H, D): the (B, H, T, D) inputs are passed
    as transposed views (last dim contiguous, as both require) and the output transposed back, so
    gradients reach the workload's own q, k, v. FA4 returns (out, lse)."""
    def factory(p, x):
        if p["dtype"] not in ("float16", "bfloat16"):
            raise Unavailable(f"{package} takes float16 or bfloat16 only, not {p['dtype']}")
        mod = _flash_module(module, package)
        if not torch.cuda.is_available():
            raise Unavailable(f"{package} needs a CUDA GPU")
        func = mod.flash_attn_func

        def attn(q, k, v):
            out = func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=p["causal"])
            return (out[0] if returns_tuple else out).transpose(1, 2)

        return _run(attn, p, x)
    return factory


def flops(p):
    f = 4 * p["batch"] * p["heads"] * p["seq_len"] ** 2 * p["head_dim"]
    f *= 0.5 if p["causal"] else 1.0
    return f * (3.5 if p["mode"] == "fwd_bwd" else 1.0)  # fwd+bwd counted as 3.5x the forward


def bytes_moved(p):
    """q, k, v read and out written once (and their gradients for fwd+bwd): the floor."""
    elt = torch.finfo(dtype_of(p["dtype"])).bits // 8
    tensors = 4 if p["mode"] == "fwd" else 4 + 5  # + dout read, dq/dk/dv written, out re-read
    return tensors * p["batch"] * p["heads"] * p["seq_len"] * p["head_dim"] * elt


WORKLOAD = Workload(
    name="fmha", make_inputs=make_inputs, reference=reference_output,
    providers={"native": native, "sdpa-math": sdpa("MATH"), "sdpa-flash": sdpa("FLASH_ATTENTION"),
               "sdpa-efficient": sdpa("EFFICIENT_ATTENTION"), "sdpa-cudnn": sdpa("CUDNN_ATTENTION"),
               "compile": compiled, "cutile": cutile, "tilegym": tilegym,
               "flash-attn": flash("flash_attn", "flash-attn", False),
               "flash-attn-4": flash("flash_attn.cute", "flash-attn-4", True)},
    subject=("cutile",), x_axes=("seq_len",), regimes=("mode",), panels=("mode", "dtype", "head_dim"),
    flops=flops, bytes=bytes_moved, defaults=DEFAULTS, choices=CHOICES, tuned_key=tuned_key)
