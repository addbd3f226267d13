"""Parity of the cutile backend with the torch one, at three levels, written as JSON.

L1: each kernel (attention, LayerNorm, GELU) against its float32 reference (kernels.reference, judged by bench.measure.check), forward
    and backward. L2: every transformer block's output hidden states. L3: the full logits.
L2 and L3 run the same weights through the torch backend (naive attention) and the candidate, both
under autocast in --dtype, and also report each side's distance from the float32 torch model, the
noise floor the budgets are set against (docs/model.md says how). Where cuTile cannot run (no GPU),
the candidate is the torch backend with SDPA and L1 checks torch's fused ops, so the code is tested.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from bench.measure.check import errors, passes, tolerance_for
from kernels import reference
from model.cli import DTYPES, ArgumentParser, autocast, command, disk_error, fail, pick_device, writable
from model.gpt import GPT, PRESETS, GPTConfig

# L2/L3 budgets on the candidate-vs-torch distance under fp16/bf16 autocast, set from measurement
# (docs/model.md): about ten times the distance of torch's own autocast run from float32. max_abs is
# relative to the largest |value| of the torch side (at least 1): trained GPT-2 carries residual
# activations in the thousands, where one fp16 ulp is already above any fixed absolute budget.
BUDGETS = {
    "float16": {"L2": {"max_abs": 1e-2, "rel": 1e-2}, "L3": {"max_abs": 1e-2, "rel": 1e-2}},
    "bfloat16": {"L2": {"max_abs": 8e-2, "rel": 8e-2}, "L3": {"max_abs": 8e-2, "rel": 8e-2}},
    "float32": {"L2": {"max_abs": 1e-4, "rel": 1e-4}, "L3": {"max_abs": 1e-4, "rel": 1e-4}},
}

def _row(level: str, name: str, err: dict, tol: dict, **extra) -> dict:
    return {"level": level, "name": name, **err, "budget": tol, "pass": passes(err, tol), **extra}


def _candidate_ops(use_cutile: bool) -> dict:
    """The ops L1 checks: the cuTile kernels, or torch's fused ops where cuTile cannot run."""
    if use_cutile:
        from kernels.fmha import flash_attention
        from kernels.gelu import gelu
        from kernels.layernorm import layer_norm
        return {"attention": lambda q, k, v: flash_attention(q, k, v, causal=True),
                "layer_norm": layer_norm, "gelu": gelu}
    return {"attention": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "layer_norm": lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps),
            "gelu": lambda x, b, approximate: F.gelu(x + b, approximate=approximate)}


def _fwd_bwd(fn, ref_fn, inputs, dtype, gen) -> tuple[dict, list, list]:
    """fn's output error against ref_fn's in float32, and both sides' input gradients."""
    xs = [x.to(dtype).detach().requires_grad_() for x in inputs]
    rs = [x.detach().float().requires_grad_() for x in xs]
    out, ref = fn(*xs), ref_fn(*rs)
    dout = torch.randn(ref.shape, generator=gen, device=ref.device)
    out.backward(dout.to(out.dtype))
    ref.backward(dout)
    return errors(out, ref), [x.grad for x in xs], [r.grad for r in rs]


def level1(device: torch.device, dtype: str, use_cutile: bool, seed: int = 0) -> list[dict]:
    ops, tol = _candidate_ops(use_cutile), tolerance_for(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    tdt, rows = DTYPES[dtype], []
    for b, h, t, d in [(1, 6, 1, 64), (1, 6, 13, 64), (2, 12, 127, 64), (1, 6, 257, 64), (8, 12, 256, 64)]:
        fwd, g, gr = _fwd_bwd(ops["attention"], lambda q, k, v: reference.attention(q, k, v, causal=True),
                              [randn(b, h, t, d) for _ in range(3)], tdt, gen)
        rows += [_row("L1", f"attention fwd B{b} H{h} T{t} D{d}", fwd, tol),
                 _row("L1", f"attention bwd dq,dk,dv B{b} H{h} T{t} D{d}", errors(g, gr), tol)]
    for m, n, bias in [(1, 384, False), (13, 768, True), (127, 1024, True), (257, 384, False), (2048, 768, True)]:
        inputs = [randn(m, n), 1 + 0.1 * randn(n)] + ([0.1 * randn(n)] if bias else [])
        fwd, g, gr = _fwd_bwd(lambda x, w, b=None: ops["layer_norm"](x, w, b, 1e-5),
                              lambda x, w, b=None: reference.layer_norm(x, w, b, 1e-5), inputs, tdt, gen)
        # dweight and dbias sum over all m rows, so they grow like sqrt(m): their absolute budget
        # scales with their size, the precision an fp16 result of that size can have
        big = max(1.0, max(r.abs().max().item() for r in gr[1:]))
        wtol = {**tol, "max_abs": tol["max_abs"] * big}
        rows += [_row("L1", f"layer_norm fwd {m}x{n} bias={bias}", fwd, tol),
                 _row("L1", f"layer_norm bwd dx {m}x{n} bias={bias}", errors(g[0], gr[0]), tol),
                 _row("L1", f"layer_norm bwd dweight,dbias {m}x{n} bias={bias}", errors(g[1:], gr[1:]), wtol)]
    for m, n, approximate in [(13, 1536, "none"), (257, 3072, "tanh"), (2048, 3072, "none")]:
        fwd, g, gr = _fwd_bwd(lambda x, b: ops["gelu"](x, b, approximate),
                              lambda x, b: reference.gelu(x + b, approximate), [randn(m, n), randn(n)], tdt, gen)
        rows += [_row("L1", f"gelu+bias fwd {m}x{n} {approximate}", fwd, tol),
                 _row("L1", f"gelu+bias bwd dx {m}x{n} {approximate}", errors(g[0], gr[0]), tol)]
    return rows


def compare_models(config: GPTConfig, state: dict, batch: int, seq_len: int, device: torch.device,
                   dtype: str, backend: str, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """L2 rows (one per block) and the L3 row for one model, batch and sequence length.

    The torch side uses naive attention; the candidate is `backend` ("cutile", or "sdpa" for the
    torch backend with SDPA). All share `state`; each autocast side is also measured against float32.
    """
    if seq_len > config.block_size:
        raise ValueError(f"seq_len {seq_len} exceeds block_size {config.block_size}")
    torch_side = GPT(config, "torch", "naive").to(device).eval()
    other = GPT(config, "cutile", device=device) if backend == "cutile" else GPT(config, "torch", "sdpa")
    other = other.to(device).eval()
    torch_side.load_state_dict(state)
    other.load_state_dict(state)
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.randint(config.vocab_size, (batch, seq_len), generator=gen, device=device)

    def run(model, precision):
        hidden = []
        # a block returns (its output, the residual stream; the next LayerNorm of it)
        hooks = [blk.register_forward_hook(lambda mod, inp, out: hidden.append(out[0].float()))
                 for blk in model.transformer.h]
        with torch.no_grad(), autocast(device, precision):
            logits, _ = model(idx)
        for hk in hooks:
            hk.remove()
        return hidden + [logits.float()]

    ref, a, b = run(torch_side, "float32"), run(torch_side, dtype), run(other, dtype)
    budgets = BUDGETS[dtype]
    rows = []
    for i, (r, x, y) in enumerate(zip(ref, a, b)):
        level = "L3" if i == len(ref) - 1 else "L2"
        name = "logits" if level == "L3" else f"block {i}"
        tol = {**budgets[level], "max_abs": budgets[level]["max_abs"] * max(1.0, x.abs().max().item())}
        rows.append(_row(level, f"{name} B{batch} T{seq_len}", errors(y, x), tol,
                         layer=i, batch=batch, seq_len=seq_len,
                         torch_vs_fp32=errors(x, r), candidate_vs_fp32=errors(y, r)))
    return rows[:-1], rows[-1:]


def run_parity(models: dict, batches, seq_lens, device, dtype: str, levels=("L1", "L2", "L3")) -> dict:
    """models: {label: (GPTConfig, state dict)}. Returns the JSON-ready report."""
    ok, reason = kernels.available_on(device)
    backend = "cutile" if ok else "sdpa"
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": dtype, "torch_side": "torch-naive",
              "candidate": "cutile" if ok else "torch-sdpa",
              "cutile_unavailable": None if ok else reason,
              "budgets": {"L1": tolerance_for(dtype), **BUDGETS[dtype]}, "levels": {}}
    rows = {lv: [] for lv in levels}
    if "L1" in levels:
        rows["L1"] = level1(device, dtype, use_cutile=ok)
    if "L2" in levels or "L3" in levels:
        for label, (config, state) in models.items():
            for bsz in batches:
                for t in seq_lens:
                    l2, l3 = compare_models(config, state, bsz, t, device, dtype, backend)
                    for r in l2 + l3:
                        r["model"] = label
                    rows.get("L2", []).extend(l2)
                    rows.get("L3", []).extend(l3)
    for lv, rs in rows.items():
        report["levels"][lv] = {
            "pass": all(r["pass"] for r in rs), "n": len(rs),
            "worst_max_abs": max((r["max_abs"] for r in rs), default=0.0),
            "worst_rel": max((r["rel"] for r in rs), default=0.0), "rows": rs}
    report["pass"] = all(v["pass"] for v in report["levels"].values())
    return report


@command
def main(argv=None) -> dict:
    p = ArgumentParser(prog="python -m model.parity", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="the JSON report (default: stdout)")
    p.add_argument("--models", default="shakespeare-char,gpt2",
                   help=f"presets with random weights, comma-separated, from: {', '.join(PRESETS)}")
    p.add_argument("--checkpoint", type=Path, action="append", default=[], help="a trained nanoGPT ckpt.pt (repeatable)")
    p.add_argument("--pretrained", type=Path, default=None, help="GPT-2 weights in the Hugging Face layout")
    p.add_argument("--seq-lens", default="13,127,256")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--levels", default="L1,L2,L3")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float16 on CUDA, else float32")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        seq_lens = [int(s) for s in args.seq_lens.split(",")]
        batches = [int(s) for s in args.batches.split(",")]
    except ValueError:
        fail("--seq-lens and --batches take comma-separated integers")
    levels = [s.strip() for s in args.levels.split(",")]
    if any(lv not in ("L1", "L2", "L3") for lv in levels):
        fail(f"--levels takes L1, L2, L3; got {args.levels}")
    if min(seq_lens + batches) < 1:
        fail("--seq-lens and --batches must be positive")
    if args.out:  # now, not after minutes of computing
        writable(args.out, "--out", directory=False)
    device = pick_device(args.device)
    dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    torch.manual_seed(args.seed)

    models = {}
    for name in filter(None, (s.strip() for s in args.models.split(","))):
        if name not in PRESETS:
            fail(f"--models: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        config = GPTConfig.preset(name, dropout=0.0)
        models[f"{name} (random)"] = (config, GPT(config).state_dict())
    for path in args.checkpoint:
        m = GPT.from_checkpoint(path)
        models[f"{path} (trained)"] = (m.config, m.state_dict())
    if args.pretrained is not None:
        try:
            m = GPT.from_pretrained(args.pretrained)
        except (FileNotFoundError, ValueError, ImportError) as e:
            fail(str(e))
        models[f"{args.pretrained} (pretrained)"] = (m.config, m.state_dict())
    for label, (config, _) in models.items():
        if max(seq_lens) > config.block_size:
            fail(f"--seq-lens {max(seq_lens)} exceeds {label}'s block_size {config.block_size}")

    report = run_parity(models, batches, seq_lens, device, dtype, levels)
    text = json.dumps(report, indent=1)
    try:
        if args.out:
            args.out.write_text(text)
    except OSError as e:  # the report is not lost: it goes to stdout, and the failure is said after it
        print(text)
        fail(f"--out {args.out}: {disk_error(e)}; the report went to stdout instead")
    if not args.out:
        print(text)
    if report["cutile_unavailable"]:
        print(f"cuTile not run: {report['cutile_unavailable']}; {report['candidate']} stands in for it, "
              "so a pass below checks the comparison, not the cuTile kernels", file=sys.stderr)
    for lv, v in report["levels"].items():
        against = "the float32 reference" if lv == "L1" else report["torch_side"]
        print(f"{lv}: {'pass' if v['pass'] else 'FAIL'} ({report['candidate']} vs {against}, {v['n']} checks, "
              f"worst max_abs {v['worst_max_abs']:.3g}, rel {v['worst_rel']:.3g})", file=sys.stderr)
    if not report["pass"]:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
