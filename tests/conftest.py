import math
import os
import random
import sys
import zlib
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))  # so sweeps can name `module: faulty_providers:...`


def pytest_collection_modifyitems(config, items):
    """Tests marked `cpu` assert what a machine without a CUDA GPU does (its devices, its skips,
    timings of its spin-waits); where a GPU is visible the harness runs on it, so they skip and say
    why. The GPU's own checks are .ci/gpu."""
    if not torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="asserts what a machine without a CUDA GPU does; this one has one")
    for item in items:
        if item.get_closest_marker("cpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded(request):
    """Each test draws its own random inputs from a seed of its name, the same on every run however
    the tests are spread over processes: unseeded, a test's draw followed from whichever tests ran
    before it in its process, and a failure under -n 8 could not be had again alone."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)  # the CPU's and every GPU's default generator
    random.seed(seed)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """What `-n auto` (pyproject.toml) means. Without a GPU, a process per core, up to 4, each
    taking whole test files (a module's fixtures run once): most of the suite's time is worker
    processes importing torch on one core while the test waits, and 2 cores took 678 s where one
    took 1109. Where a GPU is visible, none: its harness tests time kernels, and nothing else may
    share the GPU while they do (.ci/gpu runs the kernels' parity tests 8 at a time itself)."""
    if torch.cuda.is_available():
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))


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


@pytest.fixture
def exported_cubins(tmp_path):
    """Compile a kernel module's export_for_check ahead of time and return the cubin file names,
    each checked to be an ELF image; skips (saying why) where tileiras is missing."""
    from kernels.aot import compiler_missing

    def export(module) -> list[str]:
        reason = compiler_missing()
        if reason:
            pytest.skip(reason)
        paths = module.export_for_check(tmp_path)
        for p in paths:
            with open(p, "rb") as f:
                assert f.read(4) == b"\x7fELF", p  # a cubin is an ELF image
        return [p.rsplit("/", 1)[-1] for p in paths]
    return export
