"""GPT-2 in one file, after nanoGPT's model.py.

Parameter names, initialisation and the checkpoint format are nanoGPT's, so its `ckpt.pt` files load
as they are. `backend` picks who runs attention, LayerNorm and GELU: PyTorch (attention naive, as the seed
has it, or SDPA) or the project's cuTile kernels, which are imported only when asked for.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import math
from dataclasses import dataclass, fields
from types import SimpleNamespace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.reference import MASK_FLOOR
from model.cli import BadInput

log = logging.getLogger(__name__)

# the keys of nanoGPT's `model_args`; anything else is ours and saved only when it differs
NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64, as nanoGPT trains it
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2 has them
    gelu: str = "none"  # "none": exact erf GELU (nanoGPT); "tanh": GPT-2's original approximation

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def model_args(self) -> dict:
        """nanoGPT's `model_args`, plus our own keys only where they differ from the default."""
        args = {k: getattr(self, k) for k in NANOGPT_ARGS}
        default = GPTConfig()
        args.update({f.name: getattr(self, f.name) for f in fields(self)
                     if f.name not in NANOGPT_ARGS and getattr(self, f.name) != getattr(default, f.name)})
        return args


PRESETS = {
    "tiny": dict(block_size=64, vocab_size=65, n_layer=2, n_head=2, n_embd=64, bias=True),
    # nanoGPT's config/train_shakespeare_char.py (bias off, as its train.py defaults): 10.65M params
    "shakespeare-char": dict(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384,
                             dropout=0.2, bias=False),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

BACKENDS = ("torch", "cutile")
ATTENTIONS = ("naive", "sdpa")
# what the cutile backend fuses, each measured separately (docs/PERF.md): attention that reads q, k,
# v from the c_attn output and writes (B, T, C) ("attn_qkv"), the residual add, with the branch's
# c_proj bias, inside LayerNorm forward and backward ("add_ln"), the LM head with the
# cross-entropy, by row chunks, never holding all logits, and one gradient for the tied token
# embedding ("head_ce"), Linears whose backward writes fp32 weight gradients from the
# matmul and sums bias gradients in a cuTile kernel ("linear"), and each block, with those three of
# its fusions, as one autograd node, for the host time of an eager step ("block")
FUSIONS = ("attn_qkv", "add_ln", "head_ce", "linear", "block")
BLOCK_NEEDS = ("attn_qkv", "add_ln", "linear")


def _cutile_kernels(device=None) -> tuple[SimpleNamespace | None, str]:
    """(the cuTile kernels the model calls, '') or (None, why not), for a model that runs on
    `device` (None: wherever cuTile can)."""
    import kernels

    ok, reason = kernels.available_on(device)
    if not ok:
        return None, reason
    try:
        fmha = importlib.import_module("kernels.fmha")
        ln = importlib.import_module("kernels.layernorm")
        gelu = importlib.import_module("kernels.gelu")
        head = importlib.import_module("kernels.cross_entropy")
        linear = importlib.import_module("kernels.linear")
        return SimpleNamespace(flash_attention=fmha.flash_attention, attention_qkv=fmha.attention_qkv,
                               layer_norm=ln.layer_norm, add_layer_norm=ln.add_layer_norm,
                               gelu=gelu.gelu, head_cross_entropy=head.linear_cross_entropy,
                               tied_weight_grad=head.TiedWeightGrad,
                               linear=linear.linear, weight_casts=linear.WeightCasts,
                               block=importlib.import_module("kernels.block").block), ""
    except Exception as e:  # a kernel module missing or broken: fall back, say why
        return None, f"cuTile kernels failed to import ({type(e).__name__}: {e})"


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop it); eps 1e-5 as GPT-2.

    With a `residual`, it first adds it (and `residual_bias`, the bias of the layer that made it,
    if that layer left it out) to x and returns (the sum, LayerNorm of it): the residual add of a
    transformer block, which the cuTile kernel fuses into the normalisation."""

    def __init__(self, ndim: int, bias: bool, kernel=None, add_kernel=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.kernel, self.add_kernel = kernel, add_kernel

    def forward(self, x, residual=None, residual_bias=None):
        if residual is not None and self.add_kernel is not None:
            return self.add_kernel(x, residual, self.weight, self.bias, 1e-5, residual_bias)
        if residual is not None:
            x = x + residual if residual_bias is None else x + residual + residual_bias
        if self.kernel is not None:
            y = self.kernel(x, self.weight, self.bias, 1e-5)
        else:
            y = F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)
        return y if residual is None else (x, y)

    def stream(self, x):
        """(x, LayerNorm of x) for a caller that carries x on as its residual stream (block 0's
        ln_1): with the add kernel, x's two gradients are summed in its backward pass rather than
        by autograd, and the output is in the autocast dtype that the next Linear reads."""
        if self.add_kernel is None:
            return x, self(x)
        return self.add_kernel(x, None, self.weight, self.bias, 1e-5)


class ResidualBranch(nn.Module):
    """A block's branch, ending in c_proj. With bias_elsewhere, c_proj leaves its bias to the
    residual add that takes the branch (branch_bias)."""
    bias_elsewhere = False

    def proj(self, y):
        return self.linear(y, self.c_proj.weight, None if self.bias_elsewhere else self.c_proj.bias)

    def branch_bias(self):
        return self.c_proj.bias if self.bias_elsewhere else None


class CausalSelfAttention(ResidualBranch):
    def __init__(self, config: GPTConfig, attention: str, kernel=None, linear=F.linear, bias_elsewhere=False):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout
        self.attention, self.kernel, self.linear = attention, kernel, linear
        self.bias_elsewhere = bias_elsewhere

    def forward(self, x):
        B, T, C = x.size()
        if self.attention.startswith("cutile") and self.training and self.dropout > 0:
            raise ValueError("the cuTile attention kernel has no dropout; use dropout=0 with it")
        qkv = self.linear(x, self.c_attn.weight, self.c_attn.bias)
        if self.attention == "cutile_qkv":  # reads q, k, v out of c_attn's output, writes (B, T, C)
            y = self.kernel(qkv, self.n_head)
            return self.resid_dropout(self.proj(y))
        q, k, v = qkv.split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.attention == "cutile":
            y = self.kernel(q, k, v, causal=True)
        elif self.attention == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        else:  # the seed's naive attention; its -1e20 floor only fits fp32, so mask fp32 (or wider) scores
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            wide = torch.promote_types(att.dtype, torch.float32)  # never narrower than the scores
            att = F.softmax(att.to(wide).masked_fill(mask, MASK_FLOOR), dim=-1).to(v.dtype)
            y = self.attn_dropout(att) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(ResidualBranch):
    def __init__(self, config: GPTConfig, kernel=None, linear=F.linear, bias_elsewhere=False):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate, self.kernel, self.linear = config.gelu, kernel, linear
        self.bias_elsewhere = bias_elsewhere

    def forward(self, x):
        if self.kernel is not None:  # the kernel adds c_fc's bias itself, in the same pass as GELU
            h = self.kernel(self.linear(x, self.c_fc.weight), self.c_fc.bias, self.approximate)
        else:
            h = F.gelu(self.linear(x, self.c_fc.weight, self.c_fc.bias), approximate=self.approximate)
        return self.dropout(self.proj(h))


def _layer_norm(config: GPTConfig, cutile, fusions) -> LayerNorm:
    if cutile is None:
        return LayerNorm(config.n_embd, config.bias)
    return LayerNorm(config.n_embd, config.bias, cutile.layer_norm,
                     cutile.add_layer_norm if "add_ln" in fusions else None)


class Block(nn.Module):
    """One transformer block. It takes the residual stream x and h = ln_1(x), computed by the caller,
    and `next_ln`, the LayerNorm that follows it (the next block's ln_1, or ln_f), and returns the
    residual stream after both branches and next_ln of it. So each residual add can be done inside
    the LayerNorm that follows it ("add_ln"), with the branch's c_proj bias added there too, and
    the bias gradient summed in that LayerNorm's backward pass. With "block", the whole block runs
    as one autograd node (kernels.block)."""

    def __init__(self, config: GPTConfig, attention: str, cutile=None, fusions=(), casts=None):
        super().__init__()
        self.ln_1 = _layer_norm(config, cutile, fusions)
        attn_kernel, linear = None, F.linear
        if cutile is not None:
            attn_kernel = cutile.attention_qkv if attention == "cutile_qkv" else cutile.flash_attention
        if casts is not None:
            linear = functools.partial(cutile.linear, casts=casts)
        # the bias must be added before the branch's dropout: move it only where there is none
        elsewhere = cutile is not None and "add_ln" in fusions and config.dropout == 0
        self.attn = CausalSelfAttention(config, attention, attn_kernel, linear, elsewhere)
        self.ln_2 = _layer_norm(config, cutile, fusions)
        self.mlp = MLP(config, cutile.gelu if cutile else None, linear, elsewhere)
        self.fused = None
        if "block" in fusions and config.dropout == 0:
            self.fused = functools.partial(cutile.block, n_head=config.n_head, approximate=config.gelu,
                                           casts=casts)

    def forward(self, x, h, next_ln):
        attn, mlp = self.attn, self.mlp
        if self.fused is not None:
            return self.fused(x, h, self.ln_2, attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, next_ln)
        x, h = self.ln_2(x, attn(h), attn.branch_bias())
        return next_ln(x, mlp(h), mlp.branch_bias())


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, backend: str = "torch", attention: str = "naive",
                 fusions=FUSIONS, device=None):
        """backend "cutile" runs attention, LayerNorm and GELU in cuTile kernels, with the `fusions`
        named (a subset of FUSIONS); where cuTile cannot run, or `device` (where the model will run,
        if known) is not a CUDA device, it falls back to torch with SDPA and logs one warning line.
        `attention` picks the torch one."""
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
        if config.gelu not in ("none", "tanh"):
            raise ValueError(f"gelu must be 'none' or 'tanh', got {config.gelu!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        unknown = [f for f in fusions if f not in FUSIONS]
        if unknown:
            raise ValueError(f"unknown fusions {unknown}; choose from {', '.join(FUSIONS)}")
        missing = [f for f in BLOCK_NEEDS if "block" in fusions and f not in fusions]
        if missing:
            raise ValueError(f"fusion 'block' runs {'+'.join(BLOCK_NEEDS)} in one node; add {missing}")
        cutile = None
        if backend == "cutile":
            cutile, reason = _cutile_kernels(device)
            if cutile is None:
                log.warning("cutile backend unavailable (%s); using torch with SDPA attention", reason)
                backend, attention = "torch", "sdpa"
            else:
                attention = "cutile_qkv" if "attn_qkv" in fusions else "cutile"
        fusions = tuple(fusions) if cutile is not None else ()
        self.config, self.backend, self.attention, self.fusions = config, backend, attention, fusions
        # the "linear" fusion's Linears read weights cast once per forward pass (kernels.linear)
        self.casts = cutile.weight_casts() if "linear" in fusions else None
        self.head_loss = self.tied = None
        if "head_ce" in fusions:  # the head's and the token embedding's gradients made as one
            self.tied = cutile.tied_weight_grad()
            self.head_loss = functools.partial(cutile.head_cross_entropy, casts=self.casts)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, attention, cutile, fusions, self.casts)
                             for _ in range(config.n_layer)]),
            ln_f=_layer_norm(config, cutile, fusions),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if self.casts is not None:
            self.casts.track(p for m in self.modules() if isinstance(m, nn.Linear) for p in m.parameters())

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings left out by default, as nanoGPT reports it (the token
        embeddings stay in: they are the lm_head's weights too)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, loss_grad=None):
        """(logits for every position, mean cross-entropy or None); targets of -1 are ignored.

        With the fused LM head and cross-entropy ("head_ce") and targets, the logits are never held
        whole, and None is returned in their place. loss_grad: the gradient the loss will be given
        (an fp16 loss scale), which saves that head a pass over its gradients where it is right
        (kernels.cross_entropy.linear_cross_entropy); ignored elsewhere."""
        if self.backend == "cutile":
            return self._cutile_forward(idx, targets, loss_grad)
        return self._forward(idx, targets)

    @torch.compiler.disable
    def _cutile_forward(self, idx, targets, loss_grad):
        """The forward as it runs eagerly, under torch.compile too. Traced, every kernel launch broke
        its graph and each change of autocast state recompiled the wrappers around it, until the
        cache limit: a compiled shakespeare-char step took 2.2x as long as an eager one (H200)."""
        device = idx.device.type
        if self.casts is None or not torch.is_autocast_enabled(device):
            return self._forward(idx, targets, loss_grad)
        with self.casts.fresh(torch.get_autocast_dtype(device)):
            return self._forward(idx, targets, loss_grad)

    def _forward(self, idx, targets, loss_grad=None):
        b, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        wte, wpe = self.transformer.wte, self.transformer.wpe
        tied = self.tied if wte.weight is self.lm_head.weight else None  # unless someone untied them
        if tied is None:
            x = wte(idx) + wpe(torch.arange(t, dtype=torch.long, device=idx.device))
        else:  # with the position embedding added in the same pass
            x = tied.embed(idx, wte.weight, wpe.weight)
        x = self.transformer.drop(x)
        blocks = self.transformer.h
        x, h = blocks[0].ln_1.stream(x)
        for i, block in enumerate(blocks):
            x, h = block(x, h, blocks[i + 1].ln_1 if i + 1 < len(blocks) else self.transformer.ln_f)
        if targets is not None and self.head_loss is not None:
            return None, self.head_loss(h.view(b * t, -1), self.lm_head.weight, targets.view(-1), tied=tied,
                                        loss_grad=loss_grad)
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas, capturable: bool = False,
                             fused: bool = True):
        """AdamW with weight decay on matrices only, fused (one kernel for all parameters; it also
        takes model.optim.ScaledAdamW's folded loss scale), capturable in a CUDA graph if asked."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused, capturable=capturable)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 greedy: bool = False, generator: torch.Generator | None = None):
        """Extend idx (B, T) by max_new_tokens, feeding back at most block_size tokens each step.

        greedy takes the most likely token; otherwise sample from softmax(logits / temperature),
        restricted to the top_k most likely. `generator` makes the sampling reproducible.
        """
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :].float()
            if greedy:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx

    # ---- weights in and out ------------------------------------------------------------------

    def load_nanogpt_state(self, state: dict) -> None:
        """Load a nanoGPT state dict: drops torch.compile's `_orig_mod.` prefix and the causal-mask
        buffers (`attn.bias`) that nanoGPT keeps when it has no flash attention."""
        prefix = "_orig_mod."
        state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.endswith(".attn.bias")}
        self.load_state_dict(state)

    @classmethod
    def from_checkpoint(cls, path, backend: str = "torch", attention: str = "naive",
                        map_location="cpu", device=None) -> "GPT":
        """A model from a nanoGPT `ckpt.pt` (`model_args` and `model`), or one we saved; `device`
        as for the constructor."""
        ckpt = load_checkpoint(path, map_location)
        model = cls(GPTConfig(**ckpt["model_args"]), backend=backend, attention=attention, device=device)
        model.load_nanogpt_state(ckpt["model"])
        return model

    def save_checkpoint(self, path, optimizer=None, iter_num: int = 0,
                        best_val_loss: float = float("inf"), config: dict | None = None) -> None:
        """Save in nanoGPT's format, so its sample.py and train.py (resume) read it."""
        torch.save({
            "model": self.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "model_args": self.config.model_args(),
            "iter_num": iter_num,
            "best_val_loss": best_val_loss,
            "config": dict(config or {}),
        }, path)

    @classmethod
    def from_pretrained(cls, path, backend: str = "torch", attention: str = "naive",
                        gelu: str | None = None) -> "GPT":
        """GPT-2 weights in the Hugging Face layout from a local directory (config.json with
        model.safetensors or pytorch_model.bin) or one of those files; nothing is downloaded.

        gelu defaults to the file's activation_function: GPT-2's "gelu_new" is the tanh form.
        """
        sd, hf = _read_hf(Path(path))
        sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in sd.items()}
        n_layer = hf.get("n_layer", 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h.")))
        if "n_head" not in hf:
            raise ValueError(f"{path}: config.json with n_head is needed next to the weights")
        act = hf.get("activation_function", "gelu_new")
        config = GPTConfig(
            block_size=hf.get("n_positions", sd["wpe.weight"].shape[0]),
            vocab_size=sd["wte.weight"].shape[0], n_layer=n_layer, n_head=hf["n_head"],
            n_embd=sd["wte.weight"].shape[1], dropout=0.0, bias=True,
            gelu=gelu or ("none" if act == "gelu" else "tanh"))
        model = cls(config, backend=backend, attention=attention)
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        ours = {}
        for k, v in sd.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
                continue  # mask buffers, and the head that is tied to wte
            ours["transformer." + k] = v.t() if k.endswith(conv1d) else v  # Conv1D stores (in, out)
        ours["lm_head.weight"] = ours["transformer.wte.weight"]
        model.load_state_dict(ours)
        return model


def _read_hf(path: Path) -> tuple[dict, dict]:
    """(state dict, config.json as a dict or {}) from a directory or a weights file."""
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()]
        if not found:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError("reading .safetensors needs the safetensors package") from None
        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    cfg = path.parent / "config.json"
    return sd, (json.loads(cfg.read_text()) if cfg.exists() else {})


def load_checkpoint(path, map_location="cpu") -> dict:
    """A nanoGPT checkpoint's dict (`model_args` and `model`); BadInput, one line, for a path that
    holds none: missing, a directory, or a file torch.load cannot read or of another shape."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: {'a directory, not a' if path.is_dir() else 'no such'} checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as e:  # unpickling garbage raises many kinds
        raise BadInput(f"{path}: not a checkpoint torch.load can read ({type(e).__name__})") from None
    if not (isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), dict) for k in ("model_args", "model"))):
        raise BadInput(f"{path}: not a nanoGPT checkpoint (no model_args and model in it)")
    return ckpt
