import os
import sys
from pathlib import Path

import pytest

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
