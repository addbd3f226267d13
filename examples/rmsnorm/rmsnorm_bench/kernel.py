"""RMSNorm forward as a cuTile kernel: y = x / sqrt(mean(x^2) + eps) * weight over the last dim.

Each program normalises one block of BLOCK_M rows, read whole as a (BLOCK_M, BLOCK_N) tile with
BLOCK_N the power of two at or above the row length; padding reads as zero, so it adds nothing to
the sum of squares, and stores past the array's edge are dropped. Accumulation is in fp32.
"""
from __future__ import annotations

import torch

try:
    import cuda.tile as ct
except Exception:  # no cuda-tile here: rms_norm raises RuntimeError, the provider says why
    ct = None

TILE_ELEMS = 8192  # elements of x one program holds at once
MAX_N = 16384

if ct is not None:
    ConstInt = ct.Constant[int]

    @ct.kernel
    def _rms_norm_fwd(X, W, Y, eps, BLOCK_M: ConstInt, BLOCK_N: ConstInt):
        row_block = ct.bid(0)
        x = ct.astype(ct.load(X, (row_block, 0), (BLOCK_M, BLOCK_N), padding_mode=ct.PaddingMode.ZERO),
                      ct.float32)
        w = ct.astype(ct.load(W, (0,), (BLOCK_N,), padding_mode=ct.PaddingMode.ZERO), ct.float32)
        mean_square = ct.sum(x * x, axis=1, keepdims=True) / X.shape[1]
        y = x * ct.rsqrt(mean_square + eps) * ct.reshape(w, (1, BLOCK_N))
        ct.store(Y, (row_block, 0), ct.astype(y, Y.dtype))


def available() -> tuple[bool, str]:
    """(ok, one-line reason): can the kernel run here?"""
    if ct is None:
        return False, "cuda-tile is not importable"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch"
    return True, "ok"


def block_shape(n: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for rows of n elements: the whole row, and as many rows as fit."""
    block_n = 1 << max(0, n - 1).bit_length()
    return max(1, TILE_ELEMS // block_n), block_n


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of a (rows, n) CUDA tensor, in x's dtype."""
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"cuTile not available: {reason}")
    rows, n = x.shape
    if n > MAX_N:
        raise ValueError(f"rms_norm: last dimension {n} is larger than the supported {MAX_N}")
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    block_m, block_n = block_shape(n)
    if rows:
        ct.launch(torch.cuda.current_stream(x.device), (-(-rows // block_m),), _rms_norm_fwd,
                  (x, weight, y, float(eps), block_m, block_n))
    return y
