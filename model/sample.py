"""Sample text from a trained character-level checkpoint: temperature, top-k or greedy, seeded.

The same seed, checkpoint and device give the same text: sampling draws from its own generator.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from model.cli import DTYPES, ArgumentParser, autocast, check_options, command, fail, pick_device
from model.gpt import ATTENTIONS, BACKENDS, GPT, load_checkpoint
from model.prepare_shakespeare import load_meta


def find_meta(checkpoint: Path, meta: Path | None) -> Path:
    """meta.pkl: as given, else in the data directory the checkpoint was trained on (ours record
    `data_dir`; nanoGPT's record `dataset`, under data/)."""
    if meta is not None:
        return meta
    config = load_checkpoint(checkpoint).get("config") or {}
    if "data_dir" in config:
        return Path(config["data_dir"]) / "meta.pkl"
    return Path("data") / str(config.get("dataset", "shakespeare_char")) / "meta.pkl"


def sample(model: GPT, meta: dict, start: str, max_new_tokens: int, num_samples: int = 1,
           temperature: float = 1.0, top_k: int | None = None, greedy: bool = False, seed: int = 1337,
           dtype: str = "float32") -> list[str]:
    """num_samples continuations of `start`, decoded with meta's character vocabulary."""
    stoi, itos = meta["stoi"], meta["itos"]
    unknown = sorted(set(start) - set(stoi))
    if unknown:
        raise ValueError(f"the start text has characters outside the vocabulary: {unknown!r}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([[stoi[c] for c in start]] * num_samples, dtype=torch.long, device=device)
    model.eval()
    with autocast(device, dtype):
        out = model.generate(idx, max_new_tokens, temperature, top_k, greedy, generator=gen)
    return ["".join(itos[int(i)] for i in row) for row in out.tolist()]


@command
def main(argv=None) -> list[str]:
    p = ArgumentParser(prog="python -m model.sample", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("out/ckpt.pt"))
    p.add_argument("--meta", type=Path, default=None, help="meta.pkl (default: the training data's)")
    p.add_argument("--start", default="\n", help="the prompt")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--greedy", action="store_true", help="always the most likely next character")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--backend", default="torch", choices=BACKENDS)
    p.add_argument("--attention", default="sdpa", choices=ATTENTIONS)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float16 on CUDA, else float32")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    check_options(args, [(("num_samples", "top_k"), lambda v: v >= 1, "at least 1"),
                         (("max_new_tokens",), lambda v: v >= 0, "at least 0"),
                         (("temperature",), lambda v: args.greedy or 0 < v < math.inf,
                          "a positive finite number (use --greedy for argmax)")])
    meta_path = find_meta(args.checkpoint, args.meta)
    if not meta_path.exists():
        fail(f"{meta_path}: no meta.pkl (pass --meta); only character-level vocabularies are supported")
    meta = load_meta(meta_path, need=("stoi", "itos"))
    device = pick_device(args.device)
    model = GPT.from_checkpoint(args.checkpoint, backend=args.backend, attention=args.attention,
                                device=device).to(device)
    try:
        texts = sample(model, meta, args.start, args.max_new_tokens, args.num_samples, args.temperature,
                       args.top_k, args.greedy, args.seed, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    except ValueError as e:
        fail(str(e))
    for text in texts:
        print(text)
        print("---------------")
    return texts


if __name__ == "__main__":
    main()
