"""The cuTile RMSNorm against the float32 reference on a GPU (skipped elsewhere, with the reason)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs uninstalled too

from rmsnorm_bench import kernel, workload  # noqa: E402

OK, REASON = kernel.available()


@pytest.mark.gpu
@pytest.mark.skipif(not OK, reason=REASON)
@pytest.mark.parametrize("rows", [1, 13, 127, 257, 4096])
@pytest.mark.parametrize("hidden", [33, 768, 1000, 4096])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_matches_reference(rows, hidden, dtype):
    p = dict(rows=rows, hidden=hidden, dtype=dtype)
    torch.manual_seed(0)
    t = workload.make_inputs(p, torch.device("cuda"))
    got = kernel.rms_norm(t["x"], t["w"], workload.EPS).float()
    tol = 1e-5 if dtype == "float32" else 2e-2
    torch.testing.assert_close(got, workload.reference(p, t), atol=tol, rtol=tol)
