"""cuTile kernels and their PyTorch references.

Importing this package never fails: on a machine without a GPU or without cuda-tile the kernel
modules stay unimported and `available()` says why in one line.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def available() -> tuple[bool, str]:
    """(ok, reason): can cuTile kernels be compiled and launched here?"""
    try:
        import cuda.tile  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return False, f"cuda-tile is not importable ({type(e).__name__}: {e})"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return False, f"cuTile needs compute capability 9.0 or newer, this GPU is {major}.{minor}"
    try:
        from cuda.tile._compile import _find_compiler_bin

        _find_compiler_bin()
    except Exception as e:
        return False, f"tileiras not found ({e})"
    return True, "ok"


def available_on(device=None) -> tuple[bool, str]:
    """available(), for work on `device` (None: wherever cuTile can run): cuTile runs on CUDA
    devices only, so a model put on the CPU of a machine where cuTile runs takes the torch paths,
    as it would without cuTile."""
    import torch

    ok, reason = available()
    kind = None if device is None else torch.device(device).type
    if ok and kind not in (None, "cuda"):
        return False, f"the work is on {kind}, and cuTile runs on CUDA devices"
    return ok, reason


def require() -> None:
    """Raise RuntimeError with the one-line reason when cuTile cannot run here."""
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"cuTile not available: {reason}")


def autocast_dtype(device_type: str, default):
    """The dtype autocast runs matmuls in on this device type, or `default` where autocast is off:
    what the fused Functions compute in, which run with autocast itself turned off."""
    import torch

    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default
