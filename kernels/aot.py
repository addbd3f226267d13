"""Ahead-of-time compilation helpers shared by the kernels' export checks: signatures of
contiguous torch tensors and one cubin per kernel and signature, no GPU needed."""
from __future__ import annotations

import os

import torch

try:
    import cuda.tile as ct
except Exception:  # kernels.available() says why; nothing here is called without cuda-tile
    ct = None


def compiler_missing() -> str | None:
    """Why kernels cannot be compiled ahead of time here (cuda-tile or tileiras missing), or None."""
    try:
        from cuda.tile._compile import _find_compiler_bin

        _find_compiler_bin()
    except Exception as e:
        return f"cuda-tile with tileiras is needed to compile ahead of time ({type(e).__name__})"
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def ct_dtype(dtype: torch.dtype):
    """The cuTile dtype of a torch floating dtype."""
    return {torch.float16: ct.float16, torch.bfloat16: ct.bfloat16, torch.float32: ct.float32}[dtype]


def array_param(dtype, ndim: int):
    """A contiguous array parameter as the JIT specializes a torch tensor whose sizes are multiples
    of 16: 16-byte aligned, unit last stride, the other strides multiples of 16 bytes. Without the
    divisibility the compiler cannot prove a tensor-memory (TMA) load legal and builds element-wise
    loads, a different kernel from the one that runs."""
    from cuda.tile import compilation as cc

    per_16_bytes = max(1, 16 // (dtype.bitwidth // 8))
    return cc.ArrayConstraint(dtype, ndim, index_dtype=ct.int32,
                              stride_lower_bound_incl=(0,) * (ndim - 1) + (None,),
                              alias_groups=(), may_alias_internally=False,
                              stride_constant=(None,) * (ndim - 1) + (1,),
                              stride_divisible_by=(per_16_bytes,) * (ndim - 1) + (1,),
                              shape_divisible_by=16, base_addr_divisible_by=16)


def export(kernel, name: str, params: list, out_dir, gpu_code: str) -> str:
    """Compile one kernel for one signature to `out_dir/name.cubin`."""
    from cuda.tile import compilation as cc

    sig = cc.KernelSignature(params, cc.CallingConvention.cutile_python_v2())
    path = os.path.join(os.fspath(out_dir), f"{name}.{gpu_code}.cubin")
    cc.export_kernel(kernel, [sig], path, gpu_code=gpu_code, output_format="cubin")
    return path
