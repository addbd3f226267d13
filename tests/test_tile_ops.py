"""kernels.tile_ops.widen gives what a conversion gives, for every 16-bit pattern."""
import pytest
import torch

import kernels

OK, REASON = kernels.available()
gpu = pytest.mark.skipif(not OK, reason=REASON)

if OK:
    import cuda.tile as ct

    from kernels.launch import launch
    from kernels.tile_ops import widen

    @ct.kernel
    def _widen_kernel(X, Y, BLOCK: ct.Constant[int]):
        ct.store(Y, (ct.bid(0),), widen(ct.load(X, (ct.bid(0),), (BLOCK,))))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widen_equals_the_conversion_on_every_bit_pattern(dtype):
    """Bit for bit in bf16 (NaN payloads too); in fp16, equal values and NaN in the same places."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).cuda()
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    launch(x.device, (x.numel() // 1024,), _widen_kernel, (x, y, 1024))
    want = x.float()
    if dtype == torch.bfloat16:
        assert torch.equal(y.view(torch.int32), want.view(torch.int32))
    else:
        assert torch.equal(y.isnan(), want.isnan())
        assert torch.equal(y.nan_to_num(0.0), want.nan_to_num(0.0))
