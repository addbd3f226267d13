import math
import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))  # so sweeps can name `module: faulty_providers:...`


@pytest.fixture
def write_sweep(tmp_path):
    """Write a sweep file from YAML text and return its path."""
    def write(text: str, name: str = "sweep.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


@pytest.fixture
def subprocess_env():
    """Environment for `python -m bench.run` in a subprocess: finds the project and test providers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
def poisoned(monkeypatch):
    """Every float tensor torch.empty/empty_like allocates starts as NaN, so a kernel's unwritten
    output element shows up in the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(x):
        return x.fill_(math.nan) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan(empty_like(*a, **kw)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine run 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
