"""One AdamW step over parameters held flat, as a training step takes it: gradients divided by the
loss scale, weight decay, bias corrections at a step past the first, and a copy of the new
parameters in dtype (fp16 or bf16; float32: none). GPT-2's 124M parameters are `numel` 124475904.

Each provider steps its own copies of the inputs, so its state (parameters, moments, step count)
goes on from call to call; the first call is checked against a float64 step of the inputs. torch's
fused AdamW also writes the gradients back divided by the loss scale (4 more bytes a parameter);
the cuTile kernel leaves them as they are, as the training step has it.
"""
from __future__ import annotations

import torch

from bench.workloads import Workload
from bench.workloads.providers import cutile_module, dtype_of
from kernels.reference import adamw_step

DEFAULTS = dict(numel=4099, dtype="float16")  # the cutile provider's tile, blocks_per_sm, latency: its own axes
LR, BETAS, EPS, WEIGHT_DECAY, LOSS_SCALE = 1e-2, (0.9, 0.95), 1e-8, 0.1, 1024.0
STEPS_BEFORE = 10  # the step count the inputs' moments were left at: both bias corrections matter


def make_inputs(p, device):
    n = p["numel"]
    m = 0.1 * torch.randn(n, device=device)
    return dict(param=0.1 * torch.randn(n, device=device), exp_avg=m,
                exp_avg_sq=m.square() + 0.01 * torch.rand(n, device=device),
                grad=LOSS_SCALE * torch.randn(n, device=device))


def _outputs(param, exp_avg, exp_avg_sq, copy):
    """Named so that the gate judges each at its own scale (bench.measure.check.errors)."""
    out = {"param.fp32": param, "exp_avg.m": exp_avg, "exp_avg_sq.v": exp_avg_sq}
    if copy is not None:
        out["param.copy"] = copy
    return out


def _copy_dtype(p):
    dt = dtype_of(p["dtype"])
    return None if dt == torch.float32 else dt


def reference(p, t):
    """The step in float64 from the inputs (torch's AdamW arithmetic), the copy rounded from it."""
    new, m, v = adamw_step(t["param"], t["grad"].double() / LOSS_SCALE, t["exp_avg"],
                           t["exp_avg_sq"], STEPS_BEFORE + 1, LR, BETAS, EPS, WEIGHT_DECAY)
    dt = _copy_dtype(p)
    return _outputs(new, m, v, None if dt is None else new.float().to(dt))


def _state(t):
    """The provider's own copies: its steps change them, never the inputs."""
    return {k: v.clone() for k, v in t.items()}


def torch_fused(p, t):
    s, dt = _state(t), _copy_dtype(p)
    steps = torch.full((), float(STEPS_BEFORE), device=s["param"].device)
    scale, found_inf = (torch.full((), x, device=s["param"].device) for x in (LOSS_SCALE, 0.0))
    copy = None if dt is None else torch.empty_like(s["param"], dtype=dt)

    def fn():
        steps.add_(1)
        torch._fused_adamw_([s["param"]], [s["grad"]], [s["exp_avg"]], [s["exp_avg_sq"]], [], [steps],
                            lr=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WEIGHT_DECAY, eps=EPS,
                            amsgrad=False, maximize=False, grad_scale=scale, found_inf=found_inf)
        if copy is not None:
            copy.copy_(s["param"])
        return _outputs(s["param"], s["exp_avg"], s["exp_avg_sq"], copy)
    return fn


def cutile(p, t):
    """kernels.adamw.FlatAdamW over one parameter; the sweep's tile, blocks_per_sm and latency,
    where given, are the kernel's launch config."""
    adamw = cutile_module("adamw")
    s, dt = _state(t), _copy_dtype(p)
    param = torch.nn.Parameter(s["param"])
    optimizer = torch.optim.AdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)
    optimizer.state[param] = {"step": torch.tensor(float(STEPS_BEFORE)), "exp_avg": s["exp_avg"],
                              "exp_avg_sq": s["exp_avg_sq"]}  # taken over by the flat buffers
    knobs = {k: p[k] for k in ("tile", "blocks_per_sm", "latency") if p.get(k) is not None}
    flat = adamw.FlatAdamW(optimizer, **knobs)
    copy = None if dt is None else flat.cast_copies(dt, [param])[0]
    param.grad = s["grad"]
    flat.gather()  # the gradient into its slot, once
    scale = torch.full((), LOSS_SCALE, device=param.device)
    state = optimizer.state[param]

    def fn():
        flat.step(scale, None, unscale=False)
        return _outputs(param.data, state["exp_avg"], state["exp_avg_sq"], copy)
    return fn


def bytes_moved(p):
    """Read the parameters, gradients and both moments, write all but the gradients, and the copy:
    what the cuTile kernel moves (torch's fused AdamW writes the gradients too)."""
    copy = 0 if _copy_dtype(p) is None else torch.finfo(dtype_of(p["dtype"])).bits // 8
    return p["numel"] * (4 * 7 + copy)


WORKLOAD = Workload(
    name="adamw", make_inputs=make_inputs, reference=reference,
    providers={"torch-fused": torch_fused, "cutile": cutile},
    bytes=bytes_moved, defaults=DEFAULTS,
    choices=dict(dtype=["float16", "bfloat16", "float32"]),
    rotate=False, subject=("cutile",), x_axes=("numel",), panels=("dtype",))
