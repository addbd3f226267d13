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
        assert err["max_abs"] == err["rel"] == math.inf and not check.passes(err, tol)


def test_tolerance_overrides_by_dtype():
    tol = check.tolerance_for("float16", {"float16": {"rel": 0.5}})
    assert tol == {"max_abs": check.DEFAULT_TOLERANCE["float16"]["max_abs"], "rel": 0.5}
    assert check.passes({"max_abs": 0.0, "rel": 0.4}, tol) and not check.passes({"max_abs": 1.0, "rel": 0.0}, tol)


def test_one_wrong_tensor_among_many_is_not_diluted():
    """A 5% error in one small layer's gradient fails, though the pooled error of all would pass."""
    torch.manual_seed(0)
    ref = {f"grad.{i}": torch.randn(100_000 if i else 300, dtype=torch.float64) for i in range(20)}
    out = {k: v.clone() for k, v in ref.items()}
    out["grad.0"] *= 1.05
    err = check.errors(out, ref)
    assert 0.04 < err["rel"] <= 0.05 and err["worst"] == "grad.0"
    assert not check.passes(err, check.tolerance_for("float16"))


def test_a_tensor_that_is_zero_in_exact_arithmetic_is_judged_at_the_outputs_scale():
    """Rounding noise on a gradient whose true value is 0 is not a 100% error."""
    torch.manual_seed(0)
    big = torch.randn(10_000, dtype=torch.float64)
    ref = {"grad.q_bias": big, "grad.key_bias": 1e-9 * torch.randn(64, dtype=torch.float64)}
    out = {"grad.q_bias": big, "grad.key_bias": 1e-6 * torch.randn(64, dtype=torch.float64)}
    err = check.errors(out, ref)
    assert err["rel"] < 1e-5 and check.passes(err, check.tolerance_for("float16"))


def test_names_must_match():
    x = torch.ones(3)
    assert check.errors({"a": x}, {"b": x})["rel"] == math.inf


def test_gradients_are_judged_at_their_own_scale_not_the_parameters():
    """Parameters of size 1 beside gradients of size 1e-4 must not make a wrong gradient look small."""
    torch.manual_seed(0)
    ref = {"param.w": torch.randn(1000, dtype=torch.float64),
           "grad.w": 1e-4 * torch.randn(1000, dtype=torch.float64)}
    out = {"param.w": ref["param.w"], "grad.w": 2 * ref["grad.w"]}
    err = check.errors(out, ref)
    assert err["worst"] == "grad.w" and math.isclose(err["rel"], 1.0, rel_tol=1e-9)
