"""A language model's head and loss: logits = hidden @ weight^T, mean cross-entropy against the
targets, and its backward, for hidden states (tokens, hidden), the head's weight (vocab, hidden)
(GPT-2 ties it to the token embedding) and targets (tokens,). Each call returns the loss and the
gradients of the hidden states and of the weight: a fused head computes them in one pass and never
holds all the logits (8192 x 50304 of them for GPT-2 at 8 x 1024 tokens, 824 MB in fp16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.workloads import Unavailable, Workload
from bench.workloads.layernorm import liger_module
from bench.workloads.providers import cutile_module, dtype_of

DEFAULTS = dict(tokens=8192, hidden=768, vocab=50304, dtype="float16")
CHOICES = dict(dtype=["float16", "bfloat16", "float32"])
REF_ROWS = 1024  # reference rows per chunk: (1024, V) float64 logits at a time, 412 MB for GPT-2


def make_inputs(p, device):
    """Unit hidden states and a weight of std 1/sqrt(hidden), so logits are of order 1 at any
    width; targets uniform over the vocabulary."""
    dt, n, c, v = dtype_of(p["dtype"]), p["tokens"], p["hidden"], p["vocab"]
    x = torch.randn(n, c, device=device, dtype=dt).requires_grad_()
    w = (torch.randn(v, c, device=device, dtype=dt) / c ** 0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    return dict(x=x, w=w, targets=targets)


def _outputs(loss, dx, dw):
    return dict(loss=loss, grad=dict(x=dx, weight=dw))


def reference_output(p, t):
    """Float64 by chunks of rows: loss = mean(logsumexp(l) - l[target]) over rows whose target is
    not negative; d loss / d logits = (softmax(l) - onehot(target)) / count, then dx = g @ W and
    dW = g^T @ x."""
    x, w, targets = t["x"].detach().double(), t["w"].detach().double(), t["targets"]
    valid = targets >= 0
    count = max(int(valid.sum()), 1)
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    dx, dw = torch.empty_like(x), torch.zeros_like(w)
    for i in range(0, x.shape[0], REF_ROWS):
        xs, ts, ok = x[i:i + REF_ROWS], targets[i:i + REF_ROWS], valid[i:i + REF_ROWS]
        logits = xs @ w.t()
        lse = torch.logsumexp(logits, dim=1)
        rows = torch.arange(len(ts), device=x.device)
        picked = logits[rows, ts.clamp(min=0)]
        loss += torch.where(ok, lse - picked, 0.0).sum()
        g = torch.exp(logits - lse[:, None])
        g[rows, ts.clamp(min=0)] -= 1.0
        g *= ok[:, None].double() / count
        dx[i:i + REF_ROWS] = g @ w
        dw += g.t() @ xs
    return _outputs((loss / count).float(), dx.float(), dw.float())


def _run(head, t):
    """fn() running loss = head(x, w, targets) and its backward: (loss, dx, dw)."""
    x, w, targets = t["x"], t["w"], t["targets"]

    def fn():
        x.grad = w.grad = None
        loss = head(x, w, targets)
        loss.backward()
        return _outputs(loss.detach().float(), x.grad, w.grad)
    return fn


def torch_head(p, t):
    """What a user writes: the logits by F.linear in the input dtype (fp32 accumulation in the
    matmul), upcast to fp32 for F.cross_entropy."""
    return _run(lambda x, w, targets: F.cross_entropy(F.linear(x, w).float(), targets), t)


def cutile(p, t):
    """Ours: kernels.cross_entropy.linear_cross_entropy, the GPT model's fused head on the cutile
    backend (chunks of rows, a cuTile softmax-gradient kernel, the weight's gradient accumulated
    in fp32, or in bf16 for a bf16 weight);
    a sweep may set chunk_mib, the logits held at once (null: the model's 512), which trades
    memory for time."""
    ce = cutile_module("cross_entropy")
    chunk = p.get("chunk_mib")
    kw = {} if chunk is None else {"chunk_bytes": int(chunk) << 20}
    return _run(lambda x, w, targets: ce.linear_cross_entropy(x, w, targets, **kw), t)


def liger_triton(p, t):
    """Liger's Triton LigerFusedLinearCrossEntropyFunction.apply(input, weight, target), first of
    its four outputs; a sweep may set accum_dtype (null: the weight gradient accumulates in the
    weight's dtype, Liger's default; float32)."""
    mod = liger_module("ops.fused_linear_cross_entropy", "Triton fused linear cross-entropy")
    if not torch.cuda.is_available():
        raise Unavailable("Liger-Kernel's Triton fused linear cross-entropy needs a CUDA GPU")
    accum = p.get("accum_dtype")
    accum = dtype_of(accum) if accum else None
    fn = mod.LigerFusedLinearCrossEntropyFunction
    return _run(lambda x, w, targets: fn.apply(x, w, targets, None, None, -100, 0.0, 0.0, "mean",
                                               None, False, accum)[0], t)


def liger_cutile(p, t):
    """Liger's cuTile LigerFusedLinearCrossEntropyFunction.apply(input, weight, target) (SM90 and
    bfloat16 only; it holds all the logits in bf16), first of its four outputs."""
    if p["dtype"] != "bfloat16":
        raise Unavailable(f"Liger-Kernel's cuTile fused linear cross-entropy takes bfloat16 only, "
                          f"not {p['dtype']}")
    mod = liger_module("ops.cutile.ops.fused_linear_cross_entropy",
                       "cuTile fused linear cross-entropy")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise Unavailable("Liger-Kernel's cuTile fused linear cross-entropy needs a Hopper (SM90) GPU")
    fn = mod.LigerFusedLinearCrossEntropyFunction
    return _run(lambda x, w, targets: fn.apply(x, w, targets)[0], t)


def flops(p):
    """The three matmuls (logits, dx, dW), 2 * tokens * vocab * hidden each; the softmax is not
    counted."""
    return 6.0 * p["tokens"] * p["vocab"] * p["hidden"]


def bytes_moved(p):
    """The floor of a fused head: hidden states and weight read, their gradients written, targets
    read; logits never leave the chip."""
    elt = torch.finfo(dtype_of(p["dtype"])).bits // 8
    return 2 * (p["tokens"] + p["vocab"]) * p["hidden"] * elt + 8 * p["tokens"]


WORKLOAD = Workload(
    name="model_head", make_inputs=make_inputs, reference=reference_output,
    providers={"torch": torch_head, "cutile": cutile, "liger-triton": liger_triton,
               "liger-cutile": liger_cutile},
    subject=("cutile",), x_axes=("tokens", "vocab", "hidden"), regimes=(), panels=("dtype",),
    flops=flops, bytes=bytes_moved, defaults=DEFAULTS, choices=CHOICES)
