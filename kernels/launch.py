"""Launching cuTile kernels on PyTorch tensors with as little host time as the launch allows.

A small kernel runs for 10-20 us; the Python around its launch can cost more. Measured on the
H100 host (torch 2.11): ct.launch 7 us, torch.cuda.current_stream() 7 us,
get_device_properties() 7 us, a reshape or view 2.6 us, an allocation 3.5 us. So a launch takes
the current stream's raw handle, the SM count is looked up once per device, and rows() returns
a tensor that already is contiguous rows as it is.
"""
from __future__ import annotations

import functools

import torch

try:
    import cuda.tile as ct
except Exception:  # kernels.available() says why; nothing here is called without cuda-tile
    ct = None


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def rows_to_fill(block_m: int, m: int, tiles_n: int, min_tiles: int, least: int = 16) -> int:
    """block_m halved, down to `least` rows, while an (m, tiles_n * block_n) input would make fewer
    than min_tiles tiles: full tiles of a short or narrow input leave SMs idle."""
    while block_m > least and -(-m // block_m) * tiles_n < min_tiles:
        block_m //= 2
    return block_m


def grid_size(tiles: int, blocks_per_sm: int | None, device: torch.device) -> int:
    """One block per tile, or a persistent grid of at most blocks_per_sm blocks per SM looping
    over the tiles."""
    if blocks_per_sm is None:
        return tiles
    return min(tiles, blocks_per_sm * sm_count(device))


def launch(device: torch.device, grid: tuple, kernel, args: tuple, dependent: bool = False) -> None:
    """ct.launch on torch's current stream of `device`. dependent: a programmatic dependent launch,
    which may start before the previous kernel ends; the kernel must begin with
    ct.grid_dependency_control_wait() before it reads what that kernel wrote."""
    ct.launch(torch._C._cuda_getCurrentRawStream(device.index), grid, kernel, args,
              programmatic_dependent_launch=dependent)


def rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as contiguous (M, n) rows: t itself when it already is."""
    if t.dim() == 2 and t.is_contiguous():
        return t
    return t.reshape(-1, n).contiguous()
