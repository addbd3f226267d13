"""One GPT step: inference forward (fwd), forward and backward (fwd_bwd), or a whole training step
with a fused AdamW update and GradScaler (train), under autocast in params["dtype"].

Every provider starts from the same random weights (dropout off, so runs are deterministic) and is
checked against the float32 torch model: the logits for fwd, the loss (before the update) otherwise.
"""
from __future__ import annotations

import functools

import torch

from bench.workloads import Workload
from bench.workloads.providers import cutile_module, dtype_of
from model.gpt import GPT, PRESETS, GPTConfig

DEFAULTS = dict(model="tiny", batch=2, seq_len=32, mode="fwd", dtype="float16")
MODES = ("fwd", "fwd_bwd", "train")


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
    idx = torch.randint(config.vocab_size, (p["batch"], p["seq_len"] + 1), device=device)
    return dict(config=config, state=state, idx=idx[:, :-1].contiguous(), targets=idx[:, 1:].contiguous())


def reference(p, x):
    """The float32 torch model with naive attention: logits for fwd, else the loss."""
    with x["idx"].device:
        model = GPT(x["config"])
    model.load_state_dict(x["state"])
    with torch.no_grad():
        logits, loss = model(x["idx"], None if p["mode"] == "fwd" else x["targets"])
    return logits if p["mode"] == "fwd" else loss


def _provider(backend: str, attention: str = "naive", compile: bool = False):
    def make(p, x):
        if backend == "cutile":
            for name in ("fmha", "layernorm", "gelu"):
                cutile_module(name)  # Unavailable, with the reason, where cuTile cannot run
        device = x["idx"].device
        with device:
            model = GPT(x["config"], backend=backend, attention=attention)
        model.load_state_dict(x["state"])
        step = torch.compile(model) if compile else model
        amp = torch.autocast(device.type, dtype=dtype_of(p["dtype"]), enabled=p["dtype"] != "float32")
        idx, targets = x["idx"], x["targets"]

        if p["mode"] == "fwd":
            model.eval()

            def fn():
                with torch.no_grad(), amp:
                    return step(idx)[0]
            return fn

        if p["mode"] == "fwd_bwd":
            def fn():
                model.zero_grad(set_to_none=True)
                with amp:
                    _, loss = step(idx, targets)
                loss.backward()
                return loss.detach().float()
            return fn

        # train: nanoGPT's step for GPT-2 (lr 6e-4, betas 0.9/0.95, weight decay 0.1, clip 1.0)
        opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
        scaler = torch.amp.GradScaler(device.type, enabled=p["dtype"] == "float16")

        def fn():
            with amp:
                _, loss = step(idx, targets)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            return loss.detach().float()
        return fn
    return make


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
        "torch-compile": _provider("torch", "sdpa", compile=True),
        "cutile": _provider("cutile"),
    },
    flops=flops,
    defaults=DEFAULTS,
    choices=dict(model=sorted(PRESETS), mode=list(MODES), dtype=["float16", "bfloat16", "float32"]),
)
