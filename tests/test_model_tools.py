"""The model's commands (prepare, train, sample, parity) and the model_step workload, on CPU."""
import re
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels
from bench.measure.check import errors, passes, tolerance_for
from bench.workloads import Unavailable, get
from model import parity, prepare_shakespeare, sample, train
from model.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# the tiny Shakespeare corpus: $TINYSHAKESPEARE, or the copy shared beside the repository, if present
CORPUS = Path(os.environ.get("TINYSHAKESPEARE")
              or Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt")


def corpus_text(n: int = 200_000) -> str:
    """The start of the corpus, or generated verse-like text where the corpus is absent."""
    if CORPUS.exists():
        return CORPUS.read_text(encoding="utf-8")[:n]
    rng = random.Random(0)
    words = ["thou", "art", "the", "king", "of", "my", "heart", "and", "love", "doth", "speak", "so"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + "."
             for _ in range(n // 30)]
    return "\n".join(lines)[:n]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare_char")
    (out / "input.txt").write_text(corpus_text(), encoding="utf-8")
    prepare_shakespeare.main(["--input", str(out / "input.txt")])
    return out


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = train.main(["--data", str(data_dir), "--out", str(out), "--preset", "tiny",
                          "--block-size", "32", "--batch-size", "16", "--max-iters", "80",
                          "--lr", "3e-3", "--warmup-iters", "10", "--eval-interval", "40",
                          "--eval-iters", "8", "--log-interval", "20", "--device", "cpu"])
    return out, summary


def test_prepare_writes_nanogpts_shakespeare_char_format(data_dir):
    text = (data_dir / "input.txt").read_text(encoding="utf-8")
    with open(data_dir / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert set(meta) == {"vocab_size", "stoi", "itos"}
    assert meta["vocab_size"] == len(set(text)) and list(meta["stoi"]) == sorted(set(text))
    assert all(meta["itos"][i] == c for c, i in meta["stoi"].items())
    train_ids = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
    val_ids = np.fromfile(data_dir / "val.bin", dtype=np.uint16)
    assert len(train_ids) == int(len(text) * 0.9) and len(train_ids) + len(val_ids) == len(text)
    assert "".join(meta["itos"][int(i)] for i in np.concatenate([train_ids, val_ids])) == text


def test_prepare_without_the_corpus_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare_shakespeare.main(["--input", str(tmp_path / "missing.txt")])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_lr_schedule_warms_up_then_decays_to_min():
    lrs = [train.lr_at(i, 1.0, 0.1, 10, 100) for i in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0
    assert all(a >= b for a, b in zip(lrs[10:101], lrs[11:101]))
    assert lrs[100] == pytest.approx(0.1) and lrs[119] == 0.1


def test_a_tiny_training_run_lowers_the_loss(trained):
    out, summary = trained
    assert summary["final_val_loss"] < summary["first_val_loss"] - 0.5
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "iter,split,loss,lr,ms" and len(rows) == 1 + 3 * 2 + 4  # evals at 0, 40, 80
    assert json.loads((out / "loss.json").read_text())["best_val_loss"] == summary["best_val_loss"]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 80 and ckpt["model_args"]["block_size"] == 32


def test_train_rejects_bad_flags_in_one_line(data_dir, tmp_path, capsys):
    for argv in (["--batch-size", "0"], ["--dtype", "float8"], ["--data", str(tmp_path)],
                 ["--backend", "cutile", "--dropout", "0.2"], ["--graph", "--device", "cpu"]):
        with pytest.raises(SystemExit) as e:
            train.main(["--data", str(data_dir), "--out", str(tmp_path), *argv] if argv[0] != "--data"
                       else argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1, argv


def test_on_cpu_unset_flags_take_small_defaults_said_at_once(data_dir, tmp_path, capsys):
    """The GPU defaults (batch 64 x 256, 200 eval batches) printed nothing for minutes on a CPU."""
    summary = train.main(["--data", str(data_dir), "--out", str(tmp_path), "--preset", "tiny",
                          "--max-iters", "1", "--device", "cpu"])
    config = summary["config"]
    assert (config["batch_size"], config["block_size"], config["eval_iters"], config["log_interval"]) \
        == (12, 64, 20, 1)
    first = capsys.readouterr().out.splitlines()[0]
    assert "float32 on cpu; batch 12 x 64" in first and "on 20 batches per split" in first


def test_the_cutile_backend_trains_without_dropout(data_dir, tmp_path, capsys):
    """Its attention has no dropout: unset, dropout is 0 whatever the preset says (0.2 here)."""
    train.main(["--data", str(data_dir), "--out", str(tmp_path), "--backend", "cutile",
                "--preset", "shakespeare-char", "--block-size", "8", "--batch-size", "2",
                "--eval-iters", "1", "--max-iters", "1", "--device", "cpu"])
    assert "dropout 0.0" in capsys.readouterr().out
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["model_args"]["dropout"] == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU is visible to torch")
@pytest.mark.parametrize("backend", ["torch", "cutile"])
def test_a_graphed_training_run_follows_the_eager_one(data_dir, tmp_path, backend):
    """--graph captures the step once and replays it: with the schedule's lr read from a tensor
    at every replay and the capture's warm-up steps undone, its losses follow the eager run's from
    the same seed and batches. (A baked-in lr, the warm-up's 5e-4 against up to 3e-3, or three
    extra steps would part them by far more.) Two micro-batches a step: both are captured."""
    if backend == "cutile" and not kernels.available()[0]:
        pytest.skip(kernels.available()[1])
    common = ["--data", str(data_dir), "--preset", "tiny", "--block-size", "32", "--batch-size", "8",
              "--grad-accum", "2", "--max-iters", "30", "--lr", "3e-3", "--warmup-iters", "5",
              "--eval-interval", "15", "--eval-iters", "4", "--log-interval", "5", "--dropout", "0",
              "--device", "cuda", "--backend", backend]
    eager, graphed = (train.main([*common, "--out", str(tmp_path / name), *flags])
                      for name, flags in (("eager", []), ("graphed", ["--graph"])))
    assert graphed["config"]["graph"] and not eager["config"]["graph"]
    pairs = [(a, b) for a, b in zip(eager["curve"], graphed["curve"])]
    assert len(pairs) == len(eager["curve"]) == len(graphed["curve"]) == 6 + 6
    for a, b in pairs:
        assert (a["iter"], a["split"], a["lr"]) == (b["iter"], b["split"], b["lr"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (a, b)
    assert graphed["final_val_loss"] < graphed["first_val_loss"] - 0.3


def test_sampling_is_seeded_and_deterministic(trained, capsys):
    out, _ = trained
    ckpt = str(out / "ckpt.pt")
    run = lambda *a: sample.main(["--checkpoint", ckpt, "--max-new-tokens", "40", "--device", "cpu", *a])  # noqa: E731
    first, again, other = run("--seed", "1"), run("--seed", "1"), run("--seed", "2")
    assert first == again and first != other and len(first[0]) == 41
    greedy = run("--greedy", "--start", "The")
    assert greedy == run("--greedy", "--start", "The", "--seed", "5") and greedy[0].startswith("The")
    with pytest.raises(SystemExit) as e:
        run("--start", "\u00e9")  # not in the vocabulary
    assert e.value.code == 2 and "outside the vocabulary" in capsys.readouterr().err


def test_parity_l1_l2_l3_on_cpu_compares_naive_with_sdpa(trained, tmp_path):
    out, _ = trained
    report = parity.main(["--models", "tiny", "--checkpoint", str(out / "ckpt.pt"), "--seq-lens", "1,13,32",
                          "--batches", "1,3", "--levels", "L2,L3", "--device", "cpu",
                          "--out", str(tmp_path / "parity.json")])
    assert report == json.loads((tmp_path / "parity.json").read_text())
    assert report["pass"] and report["candidate"] == "torch-sdpa"  # on the CPU, wherever cuTile runs
    l2, l3 = report["levels"]["L2"]["rows"], report["levels"]["L3"]["rows"]
    assert len(l3) == 2 * 3 * 2 and len(l2) == 2 * len(l3)  # two models x 3 T x 2 batches; 2 blocks each
    assert all(r["rel"] < 1e-5 for r in l2 + l3)  # float32 on both sides
    assert all(r["candidate_vs_fp32"]["rel"] < 1e-5 for r in l3)


def test_parity_says_when_cutile_was_not_run_and_why(monkeypatch, capsys):
    monkeypatch.setattr(kernels, "available", lambda: (False, "no CUDA GPU is visible to torch"))
    parity.main(["--models", "tiny", "--seq-lens", "13", "--batches", "1", "--levels", "L3",
                 "--device", "cpu"])
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("cuTile not run: no CUDA GPU is visible to torch; torch-sdpa stands in")
    assert err[1].startswith("L3: pass (torch-sdpa vs torch-naive, 1 checks")


def test_parity_l1_checks_every_kernel_forward_and_backward():
    rows = parity.level1(torch.device("cpu"), "float32", use_cutile=False)
    names = " ".join(r["name"] for r in rows)
    for op in ("attention fwd", "attention bwd", "layer_norm fwd", "layer_norm bwd dx",
               "layer_norm bwd dweight", "gelu+bias fwd", "gelu+bias bwd"):
        assert op in names
    assert all(r["pass"] for r in rows) and any(" T1 " in r["name"] for r in rows)


def test_parity_rejects_a_sequence_longer_than_block_size(capsys):
    with pytest.raises(SystemExit) as e:
        parity.main(["--models", "tiny", "--seq-lens", "13,65", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exceeds" in err and "block_size 64" in err


def bad_inputs(data_dir: Path, tmp: Path) -> dict:
    """Files a user could pass by mistake: a directory, a binary, an existing file, a data dir with
    a garbage meta.pkl, one whose train.bin ends mid-token, and a small real checkpoint."""
    (tmp / "garbage").write_bytes(bytes(range(256)) * 8)
    (tmp / "file").write_text("x")
    for name, corrupt in (("bad_meta", "meta.pkl"), ("odd_bin", "train.bin")):
        (tmp / name).mkdir()
        for f in ("meta.pkl", "train.bin", "val.bin"):
            (tmp / name / f).write_bytes((data_dir / f).read_bytes())
        with open(tmp / name / corrupt, "r+b" if corrupt == "train.bin" else "wb") as f:
            f.seek(0, 2)
            f.write(b"\x01" if corrupt == "train.bin" else b"not a pickle")
    GPT(GPTConfig.preset("tiny")).save_checkpoint(tmp / "ckpt.pt")
    return {"data": str(data_dir), "tmp": str(tmp), "garbage": str(tmp / "garbage"),
            "file": str(tmp / "file"), "ckpt": str(tmp / "ckpt.pt")}


TRAIN = ["--preset", "tiny", "--block-size", "8", "--batch-size", "2", "--max-iters", "1",
         "--eval-iters", "1", "--device", "cpu"]


@pytest.mark.parametrize("command, argv, says", [
    # train: options the parser took, then files it opened, each before the model is built
    (train, ["--device", "tpu"], "--device tpu"),
    (train, ["--lr", "nan"], "--lr must be"),
    (train, ["--lr", "-1"], "--lr must be"),
    (train, ["--warmup-iters", "-5"], "--warmup-iters must be"),
    (train, ["--out", "{file}"], "--out"),
    (train, ["--data", "{tmp}/bad_meta"], "bad_meta/meta.pkl: not a meta.pkl"),
    (train, ["--data", "{tmp}/odd_bin"], "odd_bin/train.bin: "),
    (train, ["--block-size", "100000000"], "lower --block-size"),
    (sample, ["--checkpoint", "{garbage}", "--meta", "{data}/meta.pkl"], "garbage: not a checkpoint"),
    (sample, ["--checkpoint", "{tmp}", "--meta", "{data}/meta.pkl"], "a directory, not a checkpoint"),
    (sample, ["--checkpoint", "{ckpt}", "--meta", "{garbage}"], "garbage: not a meta.pkl"),
    (parity, ["--checkpoint", "{garbage}"], "garbage: not a checkpoint"),
    (parity, ["--out", "{tmp}"], "a directory, not a file"),
    (prepare_shakespeare, ["--input", "{tmp}", "--out", "{tmp}/p"], "--input"),
    (prepare_shakespeare, ["--input", "{garbage}", "--out", "{tmp}/p"], "not UTF-8 text"),
    (prepare_shakespeare, ["--input", "{data}/input.txt", "--out", "{file}"], "a file, not a directory"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_line_and_exit_2(command, argv, says, data_dir, tmp_path, capsys, monkeypatch):
    """Each once ended in a traceback (a parity --out after all its computing): now one line naming
    the option or file, exit status 2, and nothing long computed first."""
    paths = bad_inputs(data_dir, tmp_path)
    argv = [a.format(**paths) for a in argv]
    if command is train:
        argv = ["--data", paths["data"], "--out", str(tmp_path / "out"), *TRAIN, *argv]
    if command is parity:
        argv = ["--models", "tiny", "--levels", "L3", "--seq-lens", "4", "--batches", "1", "--device", "cpu",
                *argv]
    monkeypatch.setattr(parity, "run_parity", lambda *a, **k: pytest.fail("computed before refusing"))
    monkeypatch.setattr(train, "estimate_loss", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(SystemExit) as e:
        command.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert says in err, err


def test_a_bad_option_is_one_line_and_exit_2_from_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "model.train", "--data", str(tmp_path), "--lr", "nan"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2 and done.stderr == "error: --lr must be a positive finite number, got nan\n"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd", "train"])
def test_model_step_gate_passes_for_the_torch_providers(mode, dtype):
    w = get("model_step")
    p = dict(w.defaults, mode=mode, dtype=dtype, seq_len=13)
    x = w.make_inputs(p, torch.device("cpu"))
    ref = w.reference(p, x)
    if mode == "fwd":
        assert ref.shape == (2, 13, 65)
    else:  # the loss, every gradient and, after an update, every parameter
        names = [n for n, _ in GPT(x["config"]).named_parameters()]
        assert list(ref) == ["loss"] + [f"grad.{n}" for n in names] + (
            [f"param.{n}" for n in names] if mode == "train" else [])
    for name in ("torch-naive", "torch-sdpa"):
        fn = w.providers[name](p, x)
        err = errors(fn(), ref, w.outputs)  # the step's own mapping, read when judged
        assert passes(err, tolerance_for(dtype)), (name, err)
    if mode == "train":  # the step updates the weights, so the next loss differs
        assert not torch.equal(fn()["loss"].clone(), fn()["loss"])


def test_model_step_gate_checks_the_update_not_only_the_loss():
    """A step whose optimizer does nothing has the right loss and gradients, and still fails."""
    w = get("model_step")
    p = dict(w.defaults, mode="train", dtype="float32", seq_len=13)
    x = w.make_inputs(p, torch.device("cpu"))
    fn = w.providers["torch-sdpa"](p, x)
    out = fn()
    frozen = {k: (x["state"][k[len("param."):]] if k.startswith("param.") else v) for k, v in out.items()}
    err = errors(frozen, w.reference(p, x))
    assert not passes(err, tolerance_for("float32")) and err["worst"].startswith("param.")


@pytest.mark.skipif(kernels.available()[0], reason="cuTile runs here")
def test_model_step_cutile_is_unavailable_with_the_reason():
    w = get("model_step")
    x = w.make_inputs(w.defaults, torch.device("cpu"))
    with pytest.raises(Unavailable, match=re.escape(kernels.available()[1])):
        w.providers["cutile"](w.defaults, x)


def test_model_step_flops_follow_nanogpts_estimate():
    w = get("model_step")
    p = dict(model="gpt2", batch=8, seq_len=1024, mode="fwd")
    with torch.device("meta"):
        n = GPT(GPTConfig.preset("gpt2")).get_num_params()
    assert w.flops(p) == 8 * 1024 * (2 * n + 4 * 12 * 768 * 1024)
    assert w.flops({**p, "mode": "train"}) == w.flops({**p, "mode": "fwd_bwd"}) == 3 * w.flops(p)
    with pytest.raises(ValueError, match="exceeds"):
        w.make_inputs({**p, "model": "tiny", "seq_len": 65}, torch.device("cpu"))
