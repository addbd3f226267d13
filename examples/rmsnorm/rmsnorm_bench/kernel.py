"""RMSNorm forward as a cuTile kernel: y = x / sqrt(mean(x^2) + eps) * weight over the last dim.

Each program normalises one block of BLOCK_M rows, read whole as a (BLOCK_M, BLOCK_N) tile with
BLOCK_N the power of two at or above the row length; padding reads as zero, so it adds nothing to
the sum of squares, and stores past the array's edge are dropped. Accumulation is in fp32.

BLOCK_M is the kernel's one tuning knob: given none, it is the one `python -m bench.tune` picked
for this GPU, dtype, row length and row count (the tuned/ folder beside this file, read through
cutile-bench's tuned-config store), else as many rows as fit TILE_ELEMS.
"""
from __future__ import annotations

from pathlib import Path

import torch

try:
    import cuda.tile as ct
except Exception:  # no cuda-tile here: rms_norm raises RuntimeError, the provider says why
    ct = None

TILE_ELEMS = 8192  # elements of x one program holds at once, unless tuned
MAX_TILE_ELEMS = 32768
MAX_N = 16384
TUNED = Path(__file__).with_name("tuned")  # where bench.tune writes this kernel's winners

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


def block_shape(n: int, block_m: int | None = None) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for rows of n elements: the whole row, and block_m rows (a power of two
    whose tile fits MAX_TILE_ELEMS) or as many as fit TILE_ELEMS."""
    block_n = 1 << max(0, n - 1).bit_length()
    if block_m is None:
        return max(1, TILE_ELEMS // block_n), block_n
    if block_m < 1 or block_m & (block_m - 1) or block_m * block_n > MAX_TILE_ELEMS:
        raise ValueError(f"rms_norm: block_m={block_m} must be a power of two with block_m * "
                         f"{block_n} <= {MAX_TILE_ELEMS}")
    return block_m, block_n


def tuned_block_m(x: torch.Tensor) -> int | None:
    """The block_m bench.tune picked for x's GPU, dtype and shape; None when none was tuned."""
    try:
        from kernels import tuned
    except ImportError:  # cutile-bench is not installed: the default tile
        return None
    return tuned.lookup("rmsnorm_fwd", x.device.index, x.dtype, x.shape[1], x.shape[0],
                        TUNED).get("block_m")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             block_m: int | None = None) -> torch.Tensor:
    """RMSNorm of a (rows, n) CUDA tensor, in x's dtype; block_m rows per program (None: tuned)."""
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"cuTile not available: {reason}")
    rows, n = x.shape
    if n > MAX_N:
        raise ValueError(f"rms_norm: last dimension {n} is larger than the supported {MAX_N}")
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    block_m, block_n = block_shape(n, block_m if block_m is not None else tuned_block_m(x))
    if rows:
        ct.launch(torch.cuda.current_stream(x.device), (-(-rows // block_m),), _rms_norm_fwd,
                  (x, weight, y, float(eps), block_m, block_n))
    return y
