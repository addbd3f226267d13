"""One GPT step: inference forward (fwd), forward and backward (fwd_bwd), or a whole training step
(train: forward, backward with fp16 loss scaling, gradient clipping and a fused AdamW update, the
last three folded into one pass by model.optim.ScaledAdamW), under
autocast in params["dtype"], run eagerly or (graph=true) captured once into a CUDA graph and replayed.

Every step reads static input buffers that are refilled from a few pre-drawn batches before each
call, the way a graphed training loop feeds its graph, so the eager and the graphed step do the same
work. Every provider starts from the same random weights (dropout off) and its first step is checked
against the float32 torch model: the logits for fwd; for fwd_bwd the loss and every parameter's
gradient; for train also every parameter after the update.

AdamW's first step moves an element by lr times the sign of its gradient, so where the exact
gradient is zero or nearly (the key projection's bias, whose gradient softmax cancels) rounding
alone picks the direction: a correct fp16 step and the float32 reference part by 2 lr there, and
enough such elements failed correct steps of every provider. Those elements are judged by the bound
every AdamW step keeps instead: moved by at most lr from where the step starts.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping

import torch

from bench.cli import first_line
from bench.workloads import Unavailable, Workload
from bench.workloads.providers import cutile_module, dtype_of
from model.gpt import FUSIONS, GPT, PRESETS, GPTConfig
from model.graph import CaptureError, capture
from model.optim import ScaledAdamW

DEFAULTS = dict(model="tiny", batch=2, seq_len=32, mode="fwd", dtype="float16", graph=False)
MODES = ("fwd", "fwd_bwd", "train")
BATCHES = 4  # pre-drawn batches the static inputs are refilled from, in turn; the first is checked
# nanoGPT's GPT-2 training step: AdamW lr 6e-4, betas (0.9, 0.95), weight decay 0.1, clip at 1.0
LR, BETAS, WEIGHT_DECAY, CLIP = 6e-4, (0.9, 0.95), 0.1, 1.0
# an element whose float32 gradient is at most this fraction of its tensor's RMS has no determined
# first AdamW direction: gradients are judged to 1-3% of their norm (docs/model.md)
UNDETERMINED = 0.1


def _config(p) -> GPTConfig:
    if p["mode"] not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {p['mode']!r}")
    config = GPTConfig.preset(p["model"], dropout=0.0)
    if p["seq_len"] > config.block_size:
        raise ValueError(f"seq_len {p['seq_len']} exceeds {p['model']}'s block_size {config.block_size}")
    return config


def make_inputs(p, device):
    config = _config(p)
    torch.manual_seed(0)
    with torch.device(device):  # initialising a large model on the GPU takes a fraction of the CPU's time
        state = GPT(config).state_dict()
    tokens = torch.randint(config.vocab_size, (BATCHES, p["batch"], p["seq_len"] + 1), device=device)
    x = dict(config=config, state=state, idx=tokens[:, :, :-1].contiguous(),
             targets=tokens[:, :, 1:].contiguous())
    if p["mode"] == "train":
        x["undetermined"] = _undetermined(x)
    return x


def _undetermined(x) -> dict:
    """Per parameter, the elements whose float32 gradient on the checked batch is too small for the
    first AdamW step to have a determined direction (UNDETERMINED)."""
    with x["idx"].device:
        model = GPT(x["config"])
    model.load_state_dict(x["state"])
    model(x["idx"][0], x["targets"][0])[1].backward()
    return {n: q.grad.abs() <= UNDETERMINED * q.grad.square().mean().sqrt()
            for n, q in model.named_parameters()}


def _settled(name: str, q: torch.Tensor, x) -> torch.Tensor:
    """q, a parameter after the first update, with each undetermined element that moved by at most
    lr from where AdamW's step starts (the weight-decayed start) put at that start; one that moved
    further stays as it is, and fails the check."""
    q = q.detach()
    start = x["state"][name].to(q.dtype) * (1 - LR * (WEIGHT_DECAY if q.dim() >= 2 else 0.0))
    within = (q - start).abs() <= LR * 1.001  # fp32 rounding of the update
    return torch.where(x["undetermined"][name] & within, start, q)


class StepOutputs(Mapping):
    """What a step is checked by: the loss, every gradient (train: unscaled and clipped, as the
    update took it) and (train) every updated parameter, its undetermined elements settled
    (_settled), read from the model when the gate looks, so a timed step spends no host time
    gathering them."""

    def __init__(self, mode: str, model, loss, x, update=None):
        self.mode, self.model, self.loss, self.x, self.update = mode, model, loss, x, update

    def _items(self):
        yield "loss", self.loss
        named = list(self.model.named_parameters())
        grad = (lambda q: q.grad) if self.update is None else self.update.grad
        yield from ((f"grad.{n}", grad(q)) for n, q in named)
        if self.mode == "train":
            yield from ((f"param.{n}", _settled(n, q, self.x)) for n, q in named)

    def __getitem__(self, key):
        return dict(self._items())[key]

    def __iter__(self):
        return (k for k, _ in self._items())

    def __len__(self):
        return sum(1 for _ in self._items())


def reference(p, x):
    """The float32 torch model with naive attention, one step on the first batch: the logits (fwd),
    the loss and gradients (fwd_bwd), and the clipped gradients and parameters after an unfused
    float32 AdamW update (train)."""
    with x["idx"].device:
        model = GPT(x["config"])
    model.load_state_dict(x["state"])
    idx, targets = x["idx"][0], x["targets"][0]
    if p["mode"] == "fwd":
        with torch.no_grad():
            return model(idx)[0]
    _, loss = model(idx, targets)
    loss.backward()
    if p["mode"] == "train":
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, fused=False).step()
    return dict(StepOutputs(p["mode"], model, loss, x))


def build_model(x, backend: str, attention: str = "naive", fusions=()):
    """The model of a case, on the inputs' device, with the case's starting weights."""
    with x["idx"].device:
        model = GPT(x["config"], backend=backend, attention=attention, fusions=fusions)
    model.load_state_dict(x["state"])
    return model


def make_step(p, x, model, forward=None):
    """fn() running one step of `model` through `forward` (the model itself, or a compiled version
    of it) on freshly refilled static inputs, eagerly or replaying a CUDA graph of the step."""
    mode, device, graph = p["mode"], x["idx"].device, p["graph"]
    forward = model if forward is None else forward
    idx, targets = x["idx"][0].clone(), x["targets"][0].clone()  # the static input buffers
    order = itertools.cycle(range(BATCHES))
    amp = functools.partial(torch.autocast, device.type, dtype=dtype_of(p["dtype"]),
                            enabled=p["dtype"] != "float32", cache_enabled=not graph)

    def refill():
        i = next(order)
        idx.copy_(x["idx"][i])
        targets.copy_(x["targets"][i])

    if mode == "fwd":
        model.eval()

        def step():
            with torch.no_grad(), amp():
                return forward(idx)[0]
    elif mode == "fwd_bwd":
        def step():
            with amp():
                _, loss = forward(idx, targets)
            loss.backward()
            return StepOutputs(mode, model, loss, x)
    else:
        update = ScaledAdamW(model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, device.type == "cuda"),
                             loss_scaling=p["dtype"] == "float16", clip=CLIP,
                             flat=model.backend == "cutile",  # torch's models keep torch's AdamW
                             unscale_grads=False)  # the next step's backward overwrites them

        hint = {"loss_grad": update.loss_grad} if model.backend == "cutile" else {}

        def step():
            with amp():
                _, loss = forward(idx, targets, **hint)
            update.backward(loss)
            update.step()  # loss scaling stays on the GPU: no .item() anywhere in the step
            return StepOutputs(mode, model, loss, x, update)

    if not graph:
        def fn():
            refill()
            if mode != "fwd":
                model.zero_grad(set_to_none=True)
            return step()
        return fn

    replay, out = _capture(step, model, device, update if mode == "train" else None)
    order = itertools.cycle(range(BATCHES))

    def fn():
        refill()
        replay()
        return out
    return fn


def _capture(step, model, device, optimizer):
    """(replay, static outputs) of `step` in a CUDA graph (model.graph.capture), a training step's
    warm-up taken back so that the replays start where the eager step starts."""
    if device.type != "cuda":
        raise Unavailable("graph=true needs a CUDA GPU (CUDA graphs)")
    try:
        return capture(step, model, optimizer=optimizer)
    except CaptureError as e:
        raise Unavailable(f"the step cannot be captured in a CUDA graph ({first_line(e, 200)})") from None


def _provider(backend: str, attention: str = "naive", compile_mode: str | None = None):
    def make(p, x):
        if compile_mode == "reduce-overhead" and p["graph"]:
            raise Unavailable("torch.compile reduce-overhead replays CUDA graphs of its own, which "
                              "cannot be captured inside another graph; see graph=false")
        fusions = ()
        if backend == "cutile":
            for name in ("fmha", "layernorm", "gelu"):
                cutile_module(name)  # Unavailable, with the reason, where cuTile cannot run
            fusions = _fusions(p.get("fusions", "all"))
        model = build_model(x, backend, attention, fusions)
        forward = torch.compile(model, mode=compile_mode) if compile_mode else None
        return make_step(p, x, model, forward)
    return make


def _fusions(spec: str) -> tuple[str, ...]:
    """'all', 'none' or a '+'-joined subset of model.gpt.FUSIONS."""
    if spec == "all":
        return FUSIONS
    names = () if spec == "none" else tuple(spec.split("+"))
    unknown = [n for n in names if n not in FUSIONS]
    if unknown:
        raise ValueError(f"fusions: unknown {unknown}; choose 'all', 'none' or from {'+'.join(FUSIONS)}")
    return names


@functools.lru_cache(maxsize=None)
def _num_params(model: str) -> int:
    with torch.device("meta"):  # counts without allocating
        return GPT(GPTConfig.preset(model)).get_num_params()


def flops(p) -> float:
    """nanoGPT's estimate: 2N per token forward (6N with backward), N without position embeddings,
    plus attention's 4*L*d*T per token forward (12*L*d*T with backward), counted without the causal
    half, as nanoGPT and PaLM count it."""
    c = GPTConfig.preset(p["model"])
    tokens, attn = p["batch"] * p["seq_len"], c.n_layer * c.n_embd * p["seq_len"]
    per_token = 2 * _num_params(p["model"]) + 4 * attn
    return tokens * per_token * (1 if p["mode"] == "fwd" else 3)


WORKLOAD = Workload(
    name="model_step",
    make_inputs=make_inputs,
    reference=reference,
    providers={
        "torch-naive": _provider("torch", "naive"),
        "torch-sdpa": _provider("torch", "sdpa"),
        "torch-compile": _provider("torch", "sdpa", compile_mode="default"),
        "torch-compile-ro": _provider("torch", "sdpa", compile_mode="reduce-overhead"),
        "cutile": _provider("cutile"),
    },
    flops=flops,
    defaults=DEFAULTS,
    choices=dict(model=sorted(PRESETS), mode=list(MODES), dtype=["float16", "bfloat16", "float32"],
                 graph=[False, True]),
    rotate=False,
    outputs=(StepOutputs,),
    subject=("cutile",),
    x_axes=("batch",), regimes=("mode", "graph"), panels=("model", "mode", "graph", "dtype"),
    note=("Reference, not a measurement of this run: the seed reports 2.8 ms (cuTile) vs 7.4 ms "
          "(native PyTorch) per step, 2.64x, on a Blackwell GPU with an unstated config; reported "
          "on other hardware, not comparable number for number."),
)
