"""The RMSNorm workload: (rows, hidden) inputs and a weight, a float32 reference, a PyTorch
provider and the cuTile kernel of rmsnorm_bench.kernel."""
from __future__ import annotations

from pathlib import Path

import torch

from bench.workloads import Unavailable, Workload

EPS = 1e-6
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def make_inputs(p, device):
    dt = DTYPES[p["dtype"]]
    x = torch.randn(p["rows"], p["hidden"], device=device, dtype=dt)
    w = (1 + 0.5 * torch.randn(p["hidden"], device=device)).to(dt)
    return dict(x=x, w=w)


def reference(p, t):
    """In float32 whatever the inputs' dtype: what every provider is checked against."""
    x, w = t["x"].float(), t["w"].float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def torch_rms_norm(p, t):
    """The plain PyTorch version, in the inputs' dtype (fp32 statistics)."""
    def run():
        x = t["x"].float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)).to(t["x"].dtype) * t["w"]
    return run


def cutile(p, t):
    """The cuTile kernel; a `block_m` axis (the sweep's tune profile) sets its tile, else the tuned
    or default one runs."""
    from rmsnorm_bench import kernel

    ok, reason = kernel.available()
    if not ok:
        raise Unavailable(f"cuTile RMSNorm: {reason}")
    block_m = p.get("block_m")
    try:
        kernel.block_shape(p["hidden"], block_m)
    except ValueError as e:
        raise Unavailable(str(e)) from None
    return lambda: kernel.rms_norm(t["x"], t["w"], EPS, block_m)


def tuned_key(p):
    """What bench.tune keys the winner by: the kernel, the row length, the row count and the tile."""
    config = {"block_m": p["block_m"]} if p.get("block_m") is not None else {}
    return "rmsnorm_fwd", p["hidden"], p["rows"], config, True


def flops(p):
    """Square, sum, scale and weight: 4 per element."""
    return 4 * p["rows"] * p["hidden"]


def bytes_moved(p):
    """Read x, write y (the weight is small beside them)."""
    return 2 * p["rows"] * p["hidden"] * DTYPES[p["dtype"]].itemsize


WORKLOAD = Workload(
    name="rmsnorm", make_inputs=make_inputs, reference=reference,
    providers={"torch": torch_rms_norm, "cutile": cutile},
    flops=flops, bytes=bytes_moved, tuned_key=tuned_key,
    tuned_dir=Path(__file__).with_name("tuned"),
    defaults=dict(rows=4096, hidden=4096, dtype="float16"),
    choices=dict(dtype=list(DTYPES)),
    subject=("cutile",), x_axes=("hidden", "rows"), panels=("dtype",))
