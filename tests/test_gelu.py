"""Parity of the cuTile GELU (erf and tanh forms, bias fused, forward and backward) with the reference."""
import pytest
import torch

import kernels
from bench.measure.check import errors, passes, tolerance_for
from kernels import gelu as G
from kernels import reference

OK, REASON = kernels.available()
gpu = pytest.mark.skipif(not OK, reason=REASON)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def test_imports_and_reasons_without_cutile():
    assert callable(G.gelu) and callable(G.gelu_forward) and callable(G.gelu_backward)
    if OK:
        pytest.skip("cuTile is available here")
    with pytest.raises(RuntimeError, match="cuTile not available"):
        G.gelu(torch.randn(4, 8))


def test_erfc_coefficients_reach_their_error_bound():
    """The constants the kernel uses give |Phi - exact| < 0.75e-7 (A&S 7.1.26 bound halved)."""
    x = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    t = 1.0 / (1.0 + G._P * G._INV_SQRT2 * x.abs())
    poly = sum(a * t ** (k + 1) for k, a in enumerate(G._A))
    q = 0.5 * poly * torch.exp(-0.5 * x * x)
    phi = torch.where(x < 0, q, 1.0 - q)
    exact = 0.5 * torch.erfc(-x / 2 ** 0.5)
    assert (phi - exact).abs().max().item() < 0.75e-7


def test_tanh_form_differs_from_erf_form_beyond_fp32_tolerance():
    """So the GPU tests would notice a kernel computing the wrong form."""
    x = torch.linspace(-4, 4, 4001)
    err = errors(reference.gelu(x, "tanh"), reference.gelu(x, "none", dtype=torch.float64))
    assert not passes(err, tolerance_for("float32"))


def test_export_compiles_every_kernel_for_sm90(exported_cubins):
    names = exported_cubins(G)
    for kind in ("fwd", "bwd"):
        for form in ("erf", "tanh"):
            assert any(s.startswith(f"gelu_{kind}_{form}_") for s in names), (kind, form, names)
    assert any(s.endswith("_nobias.sm_90.cubin") for s in names), names


def matches(out, ref, tol) -> bool:
    """The gate's criterion, with the relative leg taken against an RMS of at least 1: a reference
    of one element near GELU's zero (or near its gradient's) has no scale of its own, and a
    float32 rounding of 1e-7 is then a relative error of 3e-4. For references of RMS 1 or more,
    the ones every other case has, this is exactly the gate's rel."""
    err = errors(out, ref)
    ref = ref.detach().double()
    norm = max(ref.norm().item(), ref.numel() ** 0.5)
    rel = (out.detach().double() - ref).norm().item() / norm
    return err["max_abs"] <= tol["max_abs"] and rel <= tol["rel"]


CASES = [
    ((1, 1), "float32", False), ((7, 13), "float16", True), ((127,), "bfloat16", False),
    ((2, 257, 768), "float16", True), ((129, 3072), "bfloat16", True), ((33, 1000), "float32", True),
    ((8192, 3072), "float16", True), ((257, 1536), "float16", False),  # 1536 = 3 x 512-column tiles
]


@gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape,dtype,with_bias", CASES)
def test_forward_and_backward_match_reference(poisoned, shape, dtype, with_bias, approximate):
    dt = DTYPES[dtype]
    torch.manual_seed(len(CASES) * CASES.index((shape, dtype, with_bias)) + (approximate == "tanh"))
    x = (2.0 * torch.randn(shape, device="cuda")).to(dt)
    b = (0.5 * torch.randn(shape[-1], device="cuda")).to(dt) if with_bias else None
    dy = torch.randn(shape, device="cuda").to(dt)
    leaves = [x.detach().requires_grad_()] + ([b.detach().requires_grad_()] if with_bias else [])
    y = G.gelu(leaves[0], leaves[1] if with_bias else None, approximate)
    y.backward(dy)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    z = ref_leaves[0] + ref_leaves[1] if with_bias else ref_leaves[0]
    ref = reference.gelu(z, approximate, dtype=torch.float64)
    ref.backward(dy.double())
    tol = tolerance_for(dtype)
    assert y.dtype == dt and matches(y, ref, tol), errors(y, ref)
    assert matches(leaves[0].grad, ref_leaves[0].grad, tol), errors(leaves[0].grad, ref_leaves[0].grad)
    if with_bias:
        assert errors(leaves[1].grad, ref_leaves[1].grad)["rel"] < 2e-2


@gpu
def test_exact_form_is_accurate_to_fp32_rounding(poisoned):
    """erf comes from a polynomial: over [-12, 12] it stays within a few fp32 ulps of float64."""
    x = torch.linspace(-12, 12, 1 << 20, device="cuda")
    exact = reference.gelu(x, dtype=torch.float64)
    y = G.gelu_forward(x)
    assert (y.double() - exact).abs().max().item() < 2e-6
    assert errors(y, exact)["rel"] < 1e-6
    xd = x.double().requires_grad_()
    reference.gelu(xd, dtype=torch.float64).sum().backward()
    dx = G.gelu_backward(torch.ones_like(x), x)
    assert (dx.double() - xd.grad).abs().max().item() < 2e-6
