"""The correctness gate's error measures."""
import math

import torch

from bench.measure import check


def test_errors_on_unit_scale_tensors_are_plain_differences():
    ref = torch.randn(1000, dtype=torch.float64) * 0.5
    err = check.errors(ref + 0.003, ref)
    assert math.isclose(err["max_abs"], 0.003, rel_tol=1e-9)
    assert math.isclose(err["rel"], 0.003 / ref.norm().item() * math.sqrt(1000), rel_tol=1e-9)


def test_max_abs_is_in_units_of_a_large_tensors_rms():
    """A summed weight gradient of size ~100 is judged relative to its size; its companions are not."""
    big = torch.randn(1000, dtype=torch.float64) * 100
    small = torch.randn(1000, dtype=torch.float64) * 0.5  # RMS under 1: errors stay absolute
    err = check.errors((small, big + 0.5), (small, big))
    rms = big.square().mean().sqrt().item()
    assert math.isclose(err["max_abs"], 0.5 / rms, rel_tol=1e-9)
    assert math.isclose(check.errors((small + 0.5, big), (small, big))["max_abs"], 0.5, rel_tol=1e-9)


def test_nan_inf_and_shape_mismatch_never_pass():
    ref = torch.randn(8)
    bad = ref.clone()
    bad[3] = float("nan")
    tol = check.tolerance_for("float16")
    for out, r in [(bad, ref), (ref.unsqueeze(0), ref), ((ref, ref), (ref,))]:
        err = check.errors(out, r)
        assert err == {"max_abs": math.inf, "rel": math.inf} and not check.passes(err, tol)


def test_tolerance_overrides_by_dtype():
    tol = check.tolerance_for("float16", {"float16": {"rel": 0.5}})
    assert tol == {"max_abs": check.DEFAULT_TOLERANCE["float16"]["max_abs"], "rel": 0.5}
    assert check.passes({"max_abs": 0.0, "rel": 0.4}, tol) and not check.passes({"max_abs": 1.0, "rel": 0.0}, tol)
