"""Character-level tiny Shakespeare in nanoGPT's shakespeare_char format.

Writes train.bin and val.bin (uint16 token ids, first 90% / last 10% of the text) and meta.pkl
(vocab_size, stoi, itos), the files nanoGPT's train.py and sample.py read.
"""
from __future__ import annotations

import pickle
import urllib.request
from pathlib import Path

import numpy as np

from model.cli import ArgumentParser, BadInput, command, fail, writable

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


def load_meta(path: Path, need=("vocab_size",)) -> dict:
    """meta.pkl as prepare writes it, with the keys `need`; BadInput, one line, for a file that is
    no such pickle."""
    try:
        with open(path, "rb") as f:
            meta = pickle.load(f)
    except OSError:
        raise
    except Exception as e:  # unpickling garbage raises many kinds
        raise BadInput(f"{path}: not a meta.pkl pickle ({type(e).__name__})") from None
    if not isinstance(meta, dict) or any(k not in meta for k in need):
        raise BadInput(f"{path}: not a meta.pkl as model.prepare_shakespeare writes (no {', '.join(need)})")
    if not isinstance(meta.get("vocab_size", 1), int) or meta.get("vocab_size", 1) < 1:
        raise BadInput(f"{path}: vocab_size {meta['vocab_size']!r} is not a positive integer")
    return meta


@command
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
    if not args.input.is_file():
        fail(f"--input {args.input}: {'a directory' if args.input.is_dir() else 'not a plain file'}, not a text file")
    try:
        text = args.input.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        fail(f"--input {args.input}: not UTF-8 text (byte {e.start}); the corpus must be plain text")
    if len(text) < 2:
        fail(f"{args.input}: the corpus is empty")
    out = args.out or args.input.parent
    writable(out, "--out")
    meta = prepare(text, out)
    n = int(len(text) * 0.9)
    print(f"{len(text):,} characters, vocab {meta['vocab_size']}: train {n:,} / val {len(text) - n:,} tokens in {out}")


if __name__ == "__main__":
    main()
