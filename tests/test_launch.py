"""The launch helpers' host-side arithmetic and reshaping, on any machine."""
import torch

from kernels import launch


def test_grid_is_one_block_per_tile_or_capped_per_sm(monkeypatch):
    monkeypatch.setattr(launch, "sm_count", lambda device: 132)
    dev = torch.device("cpu")
    assert launch.grid_size(1024, None, dev) == 1024
    assert launch.grid_size(1024, 2, dev) == 264
    assert launch.grid_size(100, 2, dev) == 100  # never more blocks than tiles


def test_rows_returns_contiguous_rows_as_they_are_and_reshapes_the_rest():
    x = torch.arange(24.0).reshape(2, 3, 4)
    r = launch.rows(x, 4)
    assert r.shape == (6, 4) and torch.equal(r.reshape(2, 3, 4), x)
    flat = torch.zeros(6, 4)
    assert launch.rows(flat, 4) is flat
    t = torch.arange(12.0).reshape(4, 3).t()  # (3, 4), not contiguous
    assert launch.rows(t, 4).is_contiguous() and torch.equal(launch.rows(t, 4), t)
