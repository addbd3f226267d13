"""The model's whole GPU check in one command: `python -m model.gpu_check OUT_DIR`.

1. Train nanoGPT's Shakespeare model (dropout 0, the rest as its config) for 500 iterations with
   torch naive attention, torch SDPA and the cutile backend, from the same seed and batches.
2. Greedy-sample 500 characters from each trained model with both backends: where do they part?
3. Parity L1-L3 (model.parity) with random shakespeare-char and GPT-2 weights and a trained model.
4. The model sweep (sweeps/model.yaml; torch.compile only with --with-compile, it takes minutes).

Writes train.csv, train.json, samples.json, parity.json, sweep.tar.gz and summary.json into OUT_DIR.
Needs the corpus at --corpus (default data/shakespeare_char/input.txt).
"""
from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

import kernels
from model import parity, prepare_shakespeare, sample, train
from model.cli import ArgumentParser, fail
from model.gpt import GPT, GPTConfig

RUNS = {"torch-naive": ["--backend", "torch", "--attention", "naive"],
        "torch-sdpa": ["--backend", "torch", "--attention", "sdpa"],
        "cutile": ["--backend", "cutile"]}


def first_difference(a: str, b: str) -> int:
    """How many leading characters two strings share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv=None):
    p = ArgumentParser(prog="python -m model.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--corpus", type=Path, default=Path("data/shakespeare_char/input.txt"))
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--with-compile", action="store_true", help="also time torch.compile in the sweep")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out: train,sample,parity,sweep")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        fail("no CUDA GPU is visible to torch")
    if not args.corpus.exists():
        fail(f"{args.corpus}: no corpus (python -m model.prepare_shakespeare --download fetches it)")
    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ok, reason = kernels.available()
    summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cutile": "ok" if ok else reason}
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    say(json.dumps(summary))

    prepare_shakespeare.prepare(args.corpus.read_text(encoding="utf-8"), work / "data")
    ckpts = {}
    if "train" not in skip:
        rows, results = [], {}
        for name, flags in RUNS.items():
            t0 = time.perf_counter()
            s = train.main(["--data", str(work / "data"), "--out", str(work / name), "--dropout", "0",
                            "--max-iters", str(args.iters), "--lr-decay-iters", str(args.iters),
                            "--eval-interval", "250", "--eval-iters", "50", "--log-interval", "50", *flags])
            rows += [{"run": name, **r} for r in s.pop("curve")]
            results[name] = {**s, "wall_s": time.perf_counter() - t0}
            ckpts[name] = work / name / "ckpt.pt"
        with open(args.out / "train.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["run", "iter", "split", "loss", "lr", "ms"])
            w.writeheader()
            w.writerows(rows)
        (args.out / "train.json").write_text(json.dumps(results, indent=1))
        summary["train"] = {k: {m: v[m] for m in ("final_val_loss", "median_ms_per_iter", "wall_s")}
                            for k, v in results.items()}
        say(json.dumps(summary["train"]))

    if "sample" not in skip and ckpts:
        with open(work / "data" / "meta.pkl", "rb") as f:
            meta = pickle.load(f)
        samples = {}
        for trained_by in ("torch-sdpa", "cutile"):
            texts = {}
            for backend, attention in (("torch", "naive"), ("torch", "sdpa"), ("cutile", "naive")):
                model = GPT.from_checkpoint(ckpts[trained_by], backend=backend, attention=attention).cuda()
                label = "cutile" if backend == "cutile" else f"torch-{attention}"
                texts[label] = sample.sample(model, meta, "\n", 500, greedy=True, dtype="float16")[0]
            samples[f"trained with {trained_by}"] = {
                "texts": texts,
                # the texts start with the one-character prompt
                "agree_chars": {f"{a} vs cutile": first_difference(texts[a][1:], texts["cutile"][1:])
                                for a in ("torch-naive", "torch-sdpa")},
            }
        (args.out / "samples.json").write_text(json.dumps(samples, indent=1))
        summary["samples_agree_chars_of_500"] = {k: v["agree_chars"] for k, v in samples.items()}
        say(json.dumps(summary["samples_agree_chars_of_500"]))

    if "parity" not in skip:
        models = {}
        for name in ("shakespeare-char", "gpt2"):
            config = GPTConfig.preset(name, dropout=0.0)
            models[f"{name} (random)"] = (config, GPT(config).state_dict())
        if "cutile" in ckpts:
            m = GPT.from_checkpoint(ckpts["cutile"])
            models["shakespeare-char (trained)"] = (m.config, m.state_dict())
        report = parity.run_parity(models, [1, 8], [13, 127, 256], torch.device("cuda"), "float16")
        (args.out / "parity.json").write_text(json.dumps(report, indent=1))
        summary["parity"] = {lv: {k: v[k] for k in ("pass", "n", "worst_max_abs", "worst_rel")}
                             for lv, v in report["levels"].items()}
        say(json.dumps(summary["parity"]))

    if "sweep" not in skip:
        providers = "torch-naive,torch-sdpa,cutile" + (",torch-compile" if args.with_compile else "")
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "bench.run", "sweeps/model.yaml", "--out",
                              str(work / "sweep"), "--providers", providers])
        with tarfile.open(args.out / "sweep.tar.gz", "w:gz") as tar:
            tar.add(work / "sweep", arcname="sweep")
        summary["sweep"] = {"exit_status": rc, "wall_s": time.perf_counter() - t0}

    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    say(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
