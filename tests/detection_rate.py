"""How often `bench.ab` flags a 20% slowdown of real CPU kernels, and how often it flags nothing
changed, measured as a user would meet it: each trial is one `python -m bench.ab TREE_A TREE_B`
between two copies of the project whose provider runs a real kernel (fmha `native` and layernorm
`torch`, as in sweeps/*.yaml's cpu profiles) 5 times a rep on one side and 6 (20% more real work)
or 5 on the other, through the canary (bench/workloads/canary.py). A/B and A/A trials alternate, so both meet the same load. Minutes per trial;
not part of the test suite (docs/regressions.md has the results):

    python tests/detection_rate.py --trials 20 --out /tmp/detection
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SWEEP = """
name: detection
workload: {workload}
baseline: work
providers:
  - {{name: work, module: "detection_provider:work", axes: {{wraps: ["{wraps}"], repeats: [5]}}}}
axes: {axes}
timing: {{warmup_ms: 5, min_reps: 5, max_time_s: 0.1, target_ci: 0.02, timeout_s: 120}}
"""

# each workload's case and the provider the canary wraps
CASES = {"fmha": ("{batch: [2], heads: [4], seq_len: [127], head_dim: [64], dtype: [float32], "
                  "causal: [true], mode: [fwd]}", "fmha:native"),
         "layernorm": ("{rows: [1000], hidden: [1000], dtype: [float32], mode: [fwd]}", "layernorm:torch")}


def tree(path: Path, slower: bool) -> Path:
    """A copy of the project whose provider `work` calls the kernel 5 times a rep (the canary's
    twin), or 6 times (the canary: 20% more real work)."""
    for part in ("bench", "kernels", "report_templates"):
        shutil.copytree(ROOT / part, path / part, ignore=shutil.ignore_patterns("__pycache__"))
    name = "canary" if slower else "twin"
    (path / "detection_provider.py").write_text(f"from bench.workloads.canary import {name} as work\n")
    return path


def trial(workdir: Path, base: Path, head: Path, workload: str, out: Path) -> dict:
    """One bench.ab run of one case; its compare row (verdict, ratio, interval, rounds)."""
    sweep = workdir / f"{workload}.yaml"
    axes, wraps = CASES[workload]
    sweep.write_text(SWEEP.format(workload=workload, axes=axes, wraps=wraps))
    done = subprocess.run([sys.executable, "-m", "bench.ab", str(base), str(head), str(sweep),
                           "--out", str(out)], cwd=head, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"bench.ab failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    ab_dir = Path(done.stdout.strip().splitlines()[-1])
    row = json.loads((ab_dir / "compare.json").read_text())["cases"][0]
    meta = json.loads((ab_dir / "head" / "meta.json").read_text())
    rec = json.loads((ab_dir / "head" / "samples.jsonl").read_text().splitlines()[0])["record"]
    return {"workload": workload, "verdict": row["verdict"], "ratio": row["ratio"],
            "ci": [row["ci_low"], row["ci_high"]], "detectable": row.get("detectable"),
            "rounds": rec.get("rounds"), "max_rounds": meta["ab"]["max_rounds"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="A/B and A/A trials each")
    p.add_argument("--out", type=Path, required=True, help="where runs and results.json go")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="detection-") as tmp:
        five, five_again, six = (tree(Path(tmp) / name, slower) for name, slower in
                                 (("five", False), ("five-again", False), ("six", True)))
        for i in range(args.trials):
            workload = list(CASES)[i % len(CASES)]
            for kind, head in (("ab", six), ("aa", five_again)):
                row = {"trial": i, "kind": kind, **trial(Path(tmp), five, head, workload, args.out)}
                results.append(row)
                print(json.dumps(row), flush=True)
                (args.out / "results.json").write_text(json.dumps(results, indent=1))
    for kind, want in (("ab", "regression"), ("aa", None)):
        rows = [r for r in results if r["kind"] == kind]
        flagged = sum(r["verdict"] == "regression" if want else r["verdict"] != "unchanged" for r in rows)
        print(f"{kind}: {flagged} of {len(rows)} flagged", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
