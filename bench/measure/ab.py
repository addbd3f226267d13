"""A/B between two revisions of the project: each side's cases run with that side's own code (its
kernels, providers and worker) in a worker process rooted in that side's tree, on the same device,
case by case in A B B A rounds, so that a drift of the machine (clocks, temperature, a neighbour's
load) falls on both sides alike instead of on whichever side ran second."""
from __future__ import annotations

import contextlib
import io
import math
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.cli import BadInput
from bench.measure import env, runner
from bench.measure.pool import Worker
from bench.measure.sweep import Case, Sweep
from bench.results import clocks, stats, store
from bench.results.compare import CONFIDENCE
from bench.results.stats import THRESHOLD
from bench.results.store import Run
from bench.results.summary import summarize

def _git(repo: Path, *args, binary: bool = False):
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=not binary, timeout=120)


def checkout(spec: str, repo: Path, into: Path) -> tuple[Path, dict]:
    """The tree of `spec` and what it is: a directory is used as it stands; a git revision of `repo`
    (of the repository the command runs in) is exported with git archive into a directory under `into`."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "bench" / "__init__.py").is_file():  # its workers would run the installed harness
            raise BadInput(f"{spec}: not a tree of this project (no bench/ package in it)")
        return path.resolve(), {"tree": str(path.resolve()), "sha": None}
    found = _git(repo, "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
    sha = found.stdout.strip()
    if found.returncode or not sha:
        raise BadInput(f"{spec!r} is neither a directory nor a git revision of {repo}")
    dest = Path(into) / sha[:12]
    if not dest.exists():
        archive = _git(repo, "archive", "--format=tar", sha, binary=True)
        if archive.returncode:
            raise BadInput(f"git archive {spec} failed: {archive.stderr.decode().strip()[:200]}")
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(dest, filter="data")
    return dest, {"tree": str(dest), "sha": sha, "revision": spec}


def merge(first: dict | None, rec: dict) -> dict:
    """One record per case and side over all rounds: the samples of every round pooled, and how
    many each round gave (the pairs of rounds compare judges an A/B by); a round that failed makes
    the case fail, with that round's reason."""
    if first is None:
        return {**rec, "rounds": 1, "round_reps": [len(rec.get("samples_ms") or [])]}
    if rec["status"] != "ok":
        return {**rec, "rounds": first["rounds"] + 1}
    if first["status"] != "ok":
        return {**first, "rounds": first["rounds"] + 1}
    return {**first, "samples_ms": first["samples_ms"] + rec["samples_ms"],
            "round_reps": first["round_reps"] + [len(rec["samples_ms"])],
            "clocks": clocks.pooled(first.get("clocks"), rec.get("clocks")),
            "rounds": first["rounds"] + 1, "ended_utc": rec.get("ended_utc")}


# Most rounds a case gets from the stop rule, by device kind: a GPU case's rounds agree within
# tenths of a percent and stop at the least; a shared CPU's scatter by 10-50%, and a 20% slowdown
# was found in every trial only by 48 (docs/regressions.md).
MAX_ROUNDS = {"cuda": 24, "cpu": 48}


def max_rounds_for(device: str) -> int:
    return MAX_ROUNDS["cpu" if device == "cpu" else "cuda"]


def enough_rounds(a: dict, b: dict, done: int, threshold: float, rounds: int, max_rounds: int) -> bool:
    """The noise-based stop rule of a case's rounds: at least `rounds`, then more in A B B A
    pairs until the interval of the paired ratio is narrow enough to resolve a change of twice
    the threshold (half-width under log(1 + threshold)), or `max_rounds`, or a side failed. The
    rule looks only at the interval's width, never at where it lies, so stopping does not favour
    a verdict."""
    if done >= max_rounds or a["status"] != "ok" or b["status"] != "ok":
        return True
    if done < rounds or done % 2:
        return False
    kind = "cpu" if a.get("device") == "cpu" else "cuda"
    ratio, low, high = stats.paired_ratio_ci(stats.round_times(a["samples_ms"], a["round_reps"], kind),
                                             stats.round_times(b["samples_ms"], b["round_reps"], kind),
                                             CONFIDENCE, kind)
    if not (ratio > 0 and low > 0 and high > 0):
        return False
    return max(math.log(high / ratio), math.log(ratio / low)) <= math.log1p(threshold)


def start_idle(workers: list[Worker]) -> None:
    """Start the workers that are not running, all at once: between rounds nothing is timed, so a
    fresh pair costs one start-up (1.6 s on a 2-core CPU) instead of two. One that does not start
    is left to its next run, which starts it again and records why it failed."""
    idle = [w for w in workers if w.proc is None]
    if idle:
        with ThreadPoolExecutor(len(idle)) as pool:
            for w, ready in zip(idle, pool.map(Worker.start, idle)):
                if not ready:
                    w.stop()


def interleave(cases: list[Case], trees: dict[str, Path], device: str, rounds: int,
               on_round=None, log_of=None, pythons: dict[str, str] | None = None,
               max_rounds: int | None = None,
               threshold: float = THRESHOLD) -> dict[str, dict[str, dict]]:
    """{side: {case_id: record}}: each case runs on both sides in A B B A ... order before the
    next case starts, so both sides of a case see the machine in the same state: `rounds`
    rounds, or with `max_rounds` as many as the stop rule (enough_rounds) asks of the first two
    sides. On a CPU each round gets fresh workers. `log_of(side, case)` names the
    file a case's output goes to; `pythons` the interpreter of a side's worker (default: this one)."""
    sides = list(trees)
    workers = {s: Worker(device, trees[s], (pythons or {}).get(s)) for s in sides}
    out: dict[str, dict[str, dict]] = {s: {} for s in sides}
    try:
        for case in cases:
            done = 0
            while done < rounds or max_rounds and not enough_rounds(
                    *(out[s][case.case_id] for s in sides[:2]), done, threshold, rounds, max_rounds):
                start_idle(list(workers.values()))
                for side in (sides if done % 2 == 0 else sides[::-1]):
                    rec = workers[side].run(case, log_of(side, case) if log_of else None)
                    out[side][case.case_id] = merge(out[side].get(case.case_id), rec)
                    if on_round:
                        on_round(side, case, rec)
                if device == "cpu":
                    # A CPU worker carries a bias of its own for as long as it lives (its memory
                    # layout, say): fresh workers of one tree, pinned to one core, differed by -5%
                    # to +5% pair to pair, steadily over 12 rounds. A fresh pair each round turns
                    # that bias into scatter the interval sees. GPU workers showed none (A/A within
                    # tenths of a percent) and are slow to start: kept.
                    for w in workers.values():
                        w.stop()
                done += 1
    finally:
        for w in workers.values():
            w.stop()
    return out


def run(sw: Sweep, base: str, head: str | None, root: Path, argv: list[str], device: str,
        rounds: int, trees_dir: Path | None = None, max_rounds: int | None = None,
        threshold: float = THRESHOLD) -> tuple[Path, Run, Run]:
    """Measure both sides into ROOT/<time>_<sweep>_ab_<random>/{base,head}, two ordinary run
    directories whose records pool every round's samples; HEAD None is the working tree of this
    project. A revision's tree is exported under `trees_dir` (where a caller keeps it for more
    work, such as profiling), by default a temporary directory."""
    ab_dir = Path(root) / store.run_dir_name(sw.name, "ab")
    keep = contextlib.nullcontext(str(trees_dir)) if trees_dir else None
    with keep or tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        trees, writers = {}, {}
        for side, spec in (("base", base), ("head", head)):
            if spec is None:
                trees[side], git = env.ROOT, {**env.git_state(), "tree": "working tree"}
            else:
                trees[side], git = checkout(spec, Path.cwd(), Path(tmp))
            writers[side] = runner.new_run(sw, ab_dir, argv, [device], name=side)
            writers[side].meta.update(git=git, ab={"side": side, "rounds": rounds,
                                                   "max_rounds": max_rounds or rounds})
            (writers[side].path / store.LOGS).mkdir()
        # both sides name both revisions, so that either side's report says what it compares
        named = {side: {"revision": (spec or "working tree"), "sha": w.meta["git"].get("sha"),
                        "dirty": bool(w.meta["git"].get("dirty"))}
                 for (side, spec), w in zip((("base", base), ("head", head)), writers.values())}
        for w in writers.values():
            w.meta["ab"].update(named)
            w.write_meta()

        def progress(side, case, rec):
            print(f"{side:4s} {rec['status']:9s} {case.label}", file=sys.stderr, flush=True)

        def log_of(side, case):
            return str(writers[side].path / store.LOGS / f"{case.case_id}.log")

        records = interleave(sw.cases, trees, device, rounds, progress, log_of,
                             max_rounds=max_rounds, threshold=threshold)
    runs = {}
    for side, writer in writers.items():
        for case in sw.cases:
            rec = records[side][case.case_id]
            rec["log"] = store.keep_log(writer.path, log_of(side, case), rec["status"])
            writer.append(rec)
        writer.close(complete=True)
        writer.write_summary(summarize(store.read_records(writer.path), writer.meta.get("ceilings")))
        runs[side] = store.load_run(writer.path)
    return ab_dir, runs["base"], runs["head"]
