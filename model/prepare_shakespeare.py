"""Character-level tiny Shakespeare in nanoGPT's shakespeare_char format.

Writes train.bin and val.bin (uint16 token ids, first 90% / last 10% of the text) and meta.pkl
(vocab_size, stoi, itos), the files nanoGPT's train.py and sample.py read.
"""
from __future__ import annotations

import pickle
import urllib.request
from pathlib import Path

import numpy as np

from model.cli import ArgumentParser, fail

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def prepare(text: str, out: Path) -> dict:
    """Write the three files for `text` into `out`; returns the meta dict."""
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(len(ids) * 0.9)
    out.mkdir(parents=True, exist_ok=True)
    ids[:n].tofile(out / "train.bin")
    ids[n:].tofile(out / "val.bin")
    meta = {"vocab_size": len(chars), "itos": itos, "stoi": stoi}
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return meta


def main(argv=None):
    p = ArgumentParser(prog="python -m model.prepare_shakespeare", description=__doc__.split("\n")[0])
    p.add_argument("--input", type=Path, default=Path("data/shakespeare_char/input.txt"),
                   help="the corpus (a plain text file)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: beside --input)")
    p.add_argument("--download", action="store_true", help=f"fetch the corpus from {URL} if --input is missing")
    args = p.parse_args(argv)
    if not args.input.exists():
        if not args.download:
            fail(f"{args.input}: no such file (pass --download to fetch the corpus)")
        args.input.parent.mkdir(parents=True, exist_ok=True)
        urllib.request.urlretrieve(URL, args.input)
    text = args.input.read_text(encoding="utf-8")
    if len(text) < 2:
        fail(f"{args.input}: the corpus is empty")
    out = args.out or args.input.parent
    meta = prepare(text, out)
    n = int(len(text) * 0.9)
    print(f"{len(text):,} characters, vocab {meta['vocab_size']}: train {n:,} / val {len(text) - n:,} tokens in {out}")


if __name__ == "__main__":
    main()
