"""Checks of the timer itself, run on a GPU before its numbers are trusted."""
from __future__ import annotations

import math
import statistics

import numpy as np
import torch

from bench.cli import BadInput
from bench.measure import sweep
from bench.measure.pool import Worker
from bench.measure.worker import build
from bench.results.baseline import open_run


def dobench(args) -> int:
    if not torch.cuda.is_available():
        raise BadInput("dobench needs a CUDA GPU")
    try:
        import triton.testing
    except ImportError:
        raise BadInput("dobench needs triton") from None
    providers = args.providers.split(",") if args.providers else None
    sw = sweep.load(args.sweep, None, args.set, args.filter, providers)
    device = torch.device("cuda:0")
    worker = Worker("cuda:0")  # ours, as every run measures it
    ratios, bound = [], 0
    print(f"{'case':70s} {'ours ms':>10s} {'do_bench ms':>12s} {'ratio':>7s} {'host ms':>8s}")
    for case in sw.cases[: args.limit]:
        result = worker.run(case)
        if result["status"] != "ok":
            print(f"{case.label[:70]:70s} {result['status']}: {result['reason'][:60]}")
            continue
        try:
            _, fn = build(case, device)
            fn()
            ours = float(np.median(result["samples_ms"]))
            theirs = float(triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median"))
        except Exception as e:  # a provider unavailable here is not the timer's business
            print(f"{case.label[:70]:70s} skipped: {type(e).__name__}: {str(e)[:60]}")
            continue
        # where enqueueing a call takes the host about as long as the GPU runs it, do_bench's events
        # time the host; ours hide it (timing.hide_launch), so the two are not comparable there
        launch_bound = result["host_ms"] >= 0.5 * ours
        bound += launch_bound
        if not launch_bound:
            ratios.append(ours / theirs)
        print(f"{case.label[:70]:70s} {ours:10.4f} {theirs:12.4f} {ours / theirs:7.3f} "
              f"{result['host_ms']:8.4f}{'  launch-bound' if launch_bound else ''}", flush=True)
        torch.cuda.empty_cache()
    worker.stop()
    if ratios:
        dev = [abs(r - 1) for r in ratios]
        print(f"ours / do_bench over {len(ratios)} cases (and {bound} launch-bound left out): median "
              f"{statistics.median(ratios):.4f}, largest deviation {max(dev):.2%}, "
              f"within 3%: {sum(d <= 0.03 for d in dev)}/{len(dev)}")
    return 0


def spread(args) -> int:
    if len(args.runs) < 2:
        raise BadInput("spread needs two runs of one sweep or more: one run has no spread")
    if not 0 <= args.min_ms < math.inf:
        raise BadInput(f"--min-ms must be a number of ms, 0 or more, got {args.min_ms}")
    runs = [open_run(p) for p in args.runs]
    medians: dict[str, list[float]] = {}
    labels = {}
    for r in runs:
        for rec in r.records:
            if rec["status"] == "ok" and rec["samples_ms"]:
                medians.setdefault(rec["case_id"], []).append(float(np.median(rec["samples_ms"])))
                labels[rec["case_id"]] = f"{rec['provider']} {rec['shape']}"
    rows = [(cid, m) for cid, m in medians.items() if len(m) == len(runs)]
    big = [(cid, (max(m) - min(m)) / np.mean(m), np.mean(m)) for cid, m in rows
           if np.mean(m) >= args.min_ms]
    if not big:
        raise BadInput("no case ran ok in every run above --min-ms (runs of one sweep?)")
    s = np.array([x[1] for x in big])
    print(f"{len(big)} cases >= {args.min_ms} ms in all {len(runs)} runs: median spread "
          f"{np.median(s):.2%}, p90 {np.percentile(s, 90):.2%}, max {s.max():.2%}, "
          f"within 1%: {(s <= 0.01).sum()}/{len(s)}")
    for cid, sp, m in sorted(big, key=lambda x: -x[1])[:5]:
        print(f"  {sp:6.2%}  {m:9.4f} ms  {labels[cid][:110]}")
    return 0
