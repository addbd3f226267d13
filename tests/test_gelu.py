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
    for form in ("erf", "tanh"):
        assert any(s.startswith(f"linear_gelu_{form}_") for s in names), (form, names)
        assert any(s.startswith(f"matmul_gelu_bwd_{form}_") for s in names), (form, names)


@pytest.mark.parametrize("m,n,sms,tile", [
    (8192, 3072, 132, (8, 1024)),  # GPT-2's c_fc: 3072 tiles already
    (16384, 1536, 132, (32, 256)),  # shakespeare-char's: 1536 = 6 x 256
    (8192, 768, 132, (32, 256)),  # 768 tiles
    (8192, 128, 132, (16, 128)),  # full (64, 128) tiles would be 128 for 132 SMs
    (8192, 13, 132, (16, 16)),
    (257, 13, 132, (16, 16)),  # never under 16 rows
    (65536, 16, 132, (128, 16)),
    (8192, 128, 16, (64, 128)),  # a small GPU keeps full tiles
])
def test_short_or_narrow_inputs_take_smaller_tiles_for_two_an_sm(m, n, sms, tile):
    assert G._tiles(m, n, None, sms) == tile
    assert G._tiles(m, n, (4, 32), sms) == (4, 32)


class Rows:
    """Stands in for an activation tensor on a GPU or a CPU: the check reads only its layout."""

    def __init__(self, shape, dtype, is_cuda=True, contiguous=True):
        self.shape, self.dtype, self.is_cuda, self._contiguous = shape, dtype, is_cuda, contiguous

    def is_contiguous(self):
        return self._contiguous


F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.mark.parametrize("why,x,w,fits", [
    ("fp16 on a GPU, aligned rows", Rows((64, 768), F16), ((3072, 768), F16), True),
    ("bf16, one row", Rows((1, 40), BF16), ((8, 40), BF16), True),
    ("fp32 would run as tf32", Rows((64, 768), F32), ((3072, 768), F32), False),
    ("dtypes differ", Rows((64, 768), F16), ((3072, 768), BF16), False),
    ("K not a multiple of 8", Rows((64, 36), F16), ((64, 36), F16), False),
    ("N not a multiple of 8", Rows((64, 768), F16), ((1001, 768), F16), False),
    ("on the CPU", Rows((64, 768), F16, is_cuda=False), ((3072, 768), F16), False),
    ("x not contiguous", Rows((64, 768), F16, contiguous=False), ((3072, 768), F16), False),
    ("w not contiguous", Rows((64, 768), F16), ((768, 3072), F16, "t"), False),
])
def test_which_operands_the_tile_matmul_takes(why, x, w, fits):
    """linear_gelu's cuTile matmul (and the head's) only gets operands its tensor-memory loads
    read; the rest go to torch's matmul. A meta tensor stands in for the weight."""
    from kernels.linear import tile_matmul_fits
    wt = torch.empty(w[0], dtype=w[1], device="meta")
    assert tile_matmul_fits(x, wt.t() if len(w) > 2 else wt) is fits, why


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
    ((8192, 13), "float16", True), ((8192, 128), "bfloat16", False),  # 16-row tiles
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


LINEAR_CASES = [  # (M, K, N): none of them whole (128, 256, 32) tiles but GPT-2's c_fc
    ((1, 8, 8), "float16", True, "none"), ((13, 40, 72), "bfloat16", False, "tanh"),
    ((127, 384, 1536), "float16", True, "tanh"), ((257, 768, 3072), "bfloat16", True, "none"),
    ((300, 136, 264), "float16", False, "none"), ((8192, 768, 3072), "float16", True, "none"),
]


@gpu
@pytest.mark.parametrize("mkn,dtype,with_bias,approximate", LINEAR_CASES)
def test_linear_gelu_matches_reference(poisoned, mkn, dtype, with_bias, approximate):
    """The matmul with GELU in its epilogue: the product against float64's, and the GELU against
    float64's GELU of the product as stored (+ bias), bit for bit what the GELU kernel gives it."""
    from kernels.linear import tile_matmul_fits
    (m, k, n), dt = mkn, DTYPES[dtype]
    torch.manual_seed(LINEAR_CASES.index((mkn, dtype, with_bias, approximate)))
    x = torch.randn(m, k, device="cuda").to(dt)
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(dt)
    b = (0.5 * torch.randn(n, device="cuda")) if with_bias else None
    assert tile_matmul_fits(x, w)
    fc, y = G.linear_gelu(x, w, b, approximate)
    tol = tolerance_for(dtype)
    assert fc.dtype == y.dtype == dt and fc.shape == y.shape == (m, n)
    assert matches(fc, x.double() @ w.double().t(), tol), errors(fc, x.double() @ w.double().t())
    z = fc.double() + (b.double() if with_bias else 0.0)
    ref = reference.gelu(z, approximate, dtype=torch.float64)
    assert matches(y, ref, tol), errors(y, ref)
    assert torch.equal(y, G.gelu_forward(fc, b, approximate))


BACKWARD_CASES = [  # (M, K, N) of dy @ w: none of them whole (128, 256, 32) tiles but GPT-2's
    ((1, 8, 8), "float16", True, "none"), ((13, 40, 72), "bfloat16", False, "tanh"),
    ((127, 384, 1536), "float16", True, "tanh"), ((257, 768, 3072), "bfloat16", True, "none"),
    ((300, 136, 264), "float16", False, "none"), ((8192, 768, 3072), "float16", True, "none"),
    ((33, 24, 100), "float16", True, "none"),  # N not a multiple of 8: the matmul and gelu_backward
]


@gpu
@pytest.mark.parametrize("mkn,dtype,with_bias,approximate", BACKWARD_CASES)
def test_matmul_gelu_backward_matches_reference(poisoned, mkn, dtype, with_bias, approximate):
    """(dy @ w) * GELU'(x + b) and its column sums, against float64's from the product as a matmul
    stores it (float64's product, rounded to dy's dtype)."""
    from kernels.linear import tile_matmul_fits
    (m, k, n), dt = mkn, DTYPES[dtype]
    torch.manual_seed(BACKWARD_CASES.index((mkn, dtype, with_bias, approximate)))
    dy = torch.randn(m, k, device="cuda").to(dt)
    w = (torch.randn(k, n, device="cuda") / k ** 0.5).to(dt)
    x = (2.0 * torch.randn(m, n, device="cuda")).to(dt)
    b = (0.5 * torch.randn(n, device="cuda")) if with_bias else None
    assert tile_matmul_fits(dy, w) and (n % 8 == 0) == (mkn != (33, 24, 100))
    dx, db = G.matmul_gelu_backward(dy, w, x, b, approximate, bias_grad=True)
    assert dx.dtype == dt and dx.shape == (m, n) and (db is None) == (not with_bias)
    product = (dy.double() @ w.double()).to(dt).double()  # rounded as the matmul stores it
    z = (x.double() + (b.double() if with_bias else 0.0)).requires_grad_()
    reference.gelu(z, approximate, dtype=torch.float64).backward(product)
    tol = tolerance_for(dtype)
    assert matches(dx, z.grad, tol), errors(dx, z.grad)
    if with_bias:
        sums = dx.double().sum(0)  # of dx as written
        assert (db.double() - sums).abs().max().item() <= 1e-5 * max(1.0, sums.abs().max().item())


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
