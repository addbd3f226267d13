"""Train a GPT on token files in nanoGPT's format (train.bin / val.bin, uint16; meta.pkl optional).

Fused AdamW with linear warmup then cosine decay, gradient clipping and fp16 loss scaling folded
into its update (model.optim), fp16 autocast (bf16 and fp32 too), periodic evaluation, a nanoGPT
checkpoint whenever the validation loss improves, and the loss curve as loss.csv and loss.json in
--out. With --graph the whole step (every micro-batch's forward and backward, and the update) is
captured once in a CUDA graph and replayed, as the harness times it (model.graph). On a CPU, flags
left unset take the batch, context, eval and log settings of nanoGPT's CPU example (DEFAULTS).
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from bench.cli import first_line
from model.cli import DTYPES, ArgumentParser, autocast, check_options, command, fail, pick_device, writable
from model.gpt import ATTENTIONS, BACKENDS, GPT, PRESETS, GPTConfig
from model.graph import capture
from model.optim import ScaledAdamW
from model.prepare_shakespeare import load_meta

# what a flag left unset means on a GPU and elsewhere (block_size None: the preset's); a step of the
# GPU defaults takes tens of seconds on a laptop CPU, and the first eval 400 forwards of it
DEFAULTS = {"cuda": {"batch_size": 64, "block_size": None, "eval_iters": 200, "log_interval": 10},
            "cpu": {"batch_size": 12, "block_size": 64, "eval_iters": 20, "log_interval": 1}}


def lr_at(it: int, lr: float, min_lr: float, warmup: int, decay_iters: int) -> float:
    """Linear warmup to lr, cosine decay to min_lr at decay_iters, then min_lr."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / max(1, decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


class Batches:
    """Random (x, y) windows from a split's token file, as nanoGPT's get_batch draws them."""

    def __init__(self, path: Path, batch_size: int, block_size: int, device: torch.device, seed: int):
        size = path.stat().st_size
        if size % 2:
            fail(f"{path}: {size} bytes, not a whole number of uint16 tokens (a truncated or foreign file)")
        if size // 2 <= block_size:
            fail(f"{path}: {size // 2} tokens, fewer than block_size + 1 = {block_size + 1} "
                 "(lower --block-size)")
        self.data = np.memmap(path, dtype=np.uint16, mode="r")
        self.batch_size, self.block_size, self.device = batch_size, block_size, device
        self.gen = torch.Generator().manual_seed(seed)

    def next(self):
        ix = torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=self.gen)
        x = torch.stack([torch.from_numpy(self.data[i:i + self.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(self.data[i + 1:i + 1 + self.block_size].astype(np.int64)) for i in ix])
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m model.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/shakespeare_char"), help="directory with train.bin, val.bin")
    p.add_argument("--out", type=Path, default=Path("out"), help="checkpoint and loss-curve directory")
    p.add_argument("--preset", default="shakespeare-char", choices=sorted(PRESETS))
    p.add_argument("--backend", default="torch", choices=BACKENDS)
    p.add_argument("--attention", default="sdpa", choices=ATTENTIONS, help="the torch backend's attention")
    p.add_argument("--block-size", type=int, default=None,
                   help="context length (default: the preset's on CUDA, 64 on CPU)")
    p.add_argument("--dropout", type=float, default=None,
                   help="default: the preset's; 0 with --backend cutile (its attention has none)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 12 on CPU")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-iters", type=int, default=5000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, default=100)
    p.add_argument("--lr-decay-iters", type=int, default=None, help="default: --max-iters")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 turns clipping off")
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--eval-iters", type=int, default=None,
                   help="batches per split (default: 200 on CUDA, 20 on CPU)")
    p.add_argument("--log-interval", type=int, default=None, help="default: 10 on CUDA, 1 on CPU")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="autocast dtype (default: float16 on CUDA, else float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the cutile backend's forward, all kernel launches, stays eager)")
    p.add_argument("--graph", action="store_true",
                   help="capture the training step once in a CUDA graph and replay it (CUDA only)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    check_options(args, [
        (("batch_size", "block_size", "grad_accum", "max_iters", "eval_interval", "eval_iters",
          "log_interval"), lambda v: v >= 1, "at least 1"),
        (("warmup_iters", "lr_decay_iters"), lambda v: v >= 0, "at least 0"),
        (("lr",), lambda v: 0 < v < math.inf, "a positive finite number"),
        (("min_lr", "weight_decay", "grad_clip"), lambda v: 0 <= v < math.inf, "a finite number, at least 0"),
        (("dropout", "beta1", "beta2"), lambda v: 0 <= v < 1, "in [0, 1)"),
    ])
    if args.backend == "cutile" and args.dropout:
        fail(f"--dropout {args.dropout}: the cutile backend's attention has no dropout (leave it unset: 0)")
    for split in ("train.bin", "val.bin"):
        if not (args.data / split).exists():
            fail(f"{args.data / split}: no such file (run python -m model.prepare_shakespeare first)")
    writable(args.out, "--out")
    return args


@torch.no_grad()
def estimate_loss(model, batches: dict, eval_iters: int, ctx) -> dict:
    model.eval()
    out = {}
    for split, b in batches.items():
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            with ctx():
                losses[k] = model(*b.next())[1].item()
        out[split] = losses.mean().item()
    model.train()
    return out


def set_lr(optimizer, lr: float) -> None:
    """Every group's learning rate: in place where it is a tensor (a graphed step reads it there)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


@command
def main(argv=None) -> dict:
    """Train; returns the summary also written to loss.json."""
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.graph and device.type != "cuda":
        fail(f"--graph: CUDA graphs need a CUDA GPU, and this run is on {device}")
    for name, value in DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    meta_path = args.data / "meta.pkl"
    overrides = {}
    if meta_path.exists():
        overrides["vocab_size"] = load_meta(meta_path)["vocab_size"]
    if args.block_size is not None:
        overrides["block_size"] = args.block_size
    if args.dropout is not None or args.backend == "cutile":
        overrides["dropout"] = args.dropout or 0.0
    config = GPTConfig.preset(args.preset, **overrides)
    batches = {s: Batches(args.data / f"{s}.bin", args.batch_size, config.block_size, device, args.seed + i)
               for i, s in enumerate(("train", "val"))}

    try:
        model = GPT(config, backend=args.backend, attention=args.attention, device=device).to(device)
    except RuntimeError as e:  # torch.OutOfMemoryError on a GPU; the CPU's allocator says "can't allocate"
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        fail(f"--preset {args.preset} with --block-size {config.block_size}: the model does not fit in "
             f"{device}'s memory ({first_line(e, 200)})")
    optimizer = model.configure_optimizers(args.weight_decay, args.lr, (args.beta1, args.beta2),
                                           capturable=args.graph)
    if args.graph:  # the schedule's lr in a tensor that the captured update reads at every replay
        lr_now = torch.tensor(float(args.lr), device=device)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
    update = ScaledAdamW(optimizer, loss_scaling=dtype == "float16", clip=args.grad_clip,
                         flat=model.backend == "cutile",  # its kernels write into the flat gradients
                         unscale_grads=False)  # nothing reads them before the next backward
    step_model = torch.compile(model) if args.compile else model
    hint = update.loss_grad if args.grad_accum == 1 else None  # the gradient each loss gets, for the fused head
    ctx = lambda: autocast(device, dtype)  # noqa: E731

    def train_step(xs, ys):
        """Forward and backward of every micro-batch, then the update; the last micro-batch's
        loss. No host sync, so that it can be captured."""
        for x, y in zip(xs, ys):
            with autocast(device, dtype, cache=not args.graph):
                _, loss = step_model(x, y, loss_grad=hint)
            update.backward(loss / args.grad_accum)
        update.step()
        return loss

    decay_iters = args.lr_decay_iters or args.max_iters
    run_config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "dtype": dtype, "device": str(device), "backend_used": model.backend,
                  "attention_used": model.attention, "data_dir": str(args.data)}
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{args.preset}: {model.get_num_params() / 1e6:.2f}M parameters, backend {model.backend} "
          f"({model.attention} attention), {dtype} on {device}; batch {args.batch_size} x "
          f"{config.block_size}, dropout {config.dropout}, eval every {args.eval_interval} iters on "
          f"{args.eval_iters} batches per split" + (", CUDA-graphed step" if args.graph else ""), flush=True)

    rows, best_val, step_ms = [], float("inf"), []
    fetch = lambda: list(zip(*(batches["train"].next() for _ in range(args.grad_accum))))  # noqa: E731
    xs, ys = fetch()
    replay = None
    t0 = time.perf_counter()
    for it in range(args.max_iters + 1):
        lr = lr_at(it, args.lr, args.min_lr, args.warmup_iters, decay_iters)
        set_lr(optimizer, lr)
        if it % args.eval_interval == 0 or it == args.max_iters:
            losses = estimate_loss(step_model, batches, args.eval_iters, ctx)
            rows += [{"iter": it, "split": f"eval_{s}", "loss": v, "lr": lr, "ms": ""} for s, v in losses.items()]
            print(f"eval {it}: train {losses['train']:.4f}, val {losses['val']:.4f}", flush=True)
            if losses["val"] < best_val:
                best_val = losses["val"]
                model.save_checkpoint(args.out / "ckpt.pt", optimizer, it, best_val, run_config)
            t0 = time.perf_counter()
        if it == args.max_iters:
            break
        if args.graph:
            if replay is None:
                static = [torch.stack(b) for b in (xs, ys)]  # what the captured step reads
                replay, loss = capture(lambda: train_step(*static), model, optimizer=update)
            for buf, b in zip(static, (xs, ys)):
                buf.copy_(torch.stack(b))
            replay()
        else:
            loss = train_step(xs, ys)
            update.zero_grad()
        xs, ys = fetch()  # the next batches, while the GPU works
        if (it + 1) % args.log_interval == 0:
            lossf = loss.item()  # syncs: only once per interval
            ms = (time.perf_counter() - t0) * 1000 / args.log_interval
            t0 = time.perf_counter()
            step_ms.append(ms)
            rows.append({"iter": it + 1, "split": "train", "loss": lossf, "lr": lr, "ms": ms})
            print(f"iter {it + 1}: loss {lossf:.4f}, lr {lr:.2e}, {ms:.2f} ms/iter", flush=True)

    with open(args.out / "loss.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["iter", "split", "loss", "lr", "ms"])
        w.writeheader()
        w.writerows(rows)
    evals = [r for r in rows if r["split"] == "eval_val"]
    summary = {
        "config": run_config,
        "best_val_loss": best_val,
        "first_val_loss": evals[0]["loss"],
        "final_val_loss": evals[-1]["loss"],
        # the first interval holds warm-up and compilation, so it is left out of the typical step time
        "median_ms_per_iter": float(np.median(step_ms[1:] or step_ms)) if step_ms else None,
        "curve": rows,
    }
    (args.out / "loss.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
