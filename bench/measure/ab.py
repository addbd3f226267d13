"""A/B between two revisions of the project: each side's cases run with that side's own code (its
kernels, providers and worker) in a worker process rooted in that side's tree, on the same device,
case by case in A B B A rounds, so that a drift of the machine (clocks, temperature, a neighbour's
load) falls on both sides alike instead of on whichever side ran second."""
from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.cli import BadInput
from bench.measure import env, runner
from bench.measure.pool import STARTUP_S, _failure
from bench.measure.sweep import Case, Sweep
from bench.results import store
from bench.results.store import Run, utc_now
from bench.results.summary import summarize

# Runs in the side's tree (its directory first on sys.path): records go back on a private copy of
# stdout, and whatever a provider prints goes to stderr, so it cannot corrupt a record. Trees from
# before the modules were grouped by stage keep the worker at bench/worker.py.
_CHILD = r"""
import json, os, sys
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
import torch
try:
    from bench.measure.sweep import Case
    from bench.measure.worker import run_case
except ImportError:
    from bench.sweep import Case
    from bench.worker import run_case
device = torch.device(sys.argv[1])
if device.type == "cuda":
    torch.cuda.set_device(device)
print("ready", file=out, flush=True)
for line in sys.stdin:
    print(json.dumps(run_case(Case.from_dict(json.loads(line)), device), default=str), file=out,
          flush=True)
"""


def _git(repo: Path, *args, binary: bool = False):
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=not binary, timeout=120)


def checkout(spec: str, repo: Path, into: Path) -> tuple[Path, dict]:
    """The tree of `spec` and what it is: a directory is used as it stands; a git revision of `repo`
    (of the repository the command runs in) is exported with git archive into a directory under `into`."""
    path = Path(spec)
    if path.is_dir():
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


class TreeWorker:
    """A worker process running the tree's own bench.measure.worker; like pool's slots, a case
    that crashes or hangs it costs only itself and a fresh process takes the next case."""

    def __init__(self, tree: Path, device: str):
        self.tree, self.device, self.proc = tree, device, None

    def _env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.tree), env.get("PYTHONPATH")) if p)
        return env

    def _read(self, timeout: float) -> str | None:
        """One line from the process within `timeout` seconds; None on timeout or end of output."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return (self.proc.stdout.readline() or None) if ready else None

    def start(self) -> bool:
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, self.device], cwd=self.tree,
                                     env=self._env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        return self._read(STARTUP_S) == "ready\n"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc.stdin.close()
            self.proc.stdout.close()
            self.proc = None

    def run(self, case: Case) -> dict:
        started = utc_now()
        if (self.proc is None or self.proc.poll() is not None) and not self.start():
            self.stop()
            return _failure(case, self.device, "crashed",
                            f"worker in {self.tree} did not start within {STARTUP_S:g} s", started)
        try:
            self.proc.stdin.write(json.dumps(case.to_dict()) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # the process died: the read below says so
        line = self._read(case.timing["timeout_s"])
        if line:
            return json.loads(line)
        died = self.proc.poll() is not None
        self.stop()
        if died:
            return _failure(case, self.device, "crashed", "worker process died", started)
        return _failure(case, self.device, "timeout",
                        f"no result within {case.timing['timeout_s']:g} s; worker killed", started)


def merge(first: dict | None, rec: dict) -> dict:
    """One record per case and side over all rounds: the samples of every round pooled; a round
    that failed makes the case fail, with that round's reason."""
    if first is None:
        return {**rec, "rounds": 1}
    if rec["status"] != "ok":
        return {**rec, "rounds": first["rounds"] + 1}
    if first["status"] != "ok":
        return {**first, "rounds": first["rounds"] + 1}
    return {**first, "samples_ms": first["samples_ms"] + rec["samples_ms"],
            "rounds": first["rounds"] + 1, "ended_utc": rec.get("ended_utc")}


def interleave(cases: list[Case], trees: dict[str, Path], device: str, rounds: int,
               on_round=None) -> dict[str, dict[str, dict]]:
    """{side: {case_id: record}}: each case runs on both sides in A B B A ... order before the
    next case starts, so both sides of a case see the machine in the same state."""
    sides = list(trees)
    workers = {s: TreeWorker(trees[s], device) for s in sides}
    out: dict[str, dict[str, dict]] = {s: {} for s in sides}
    try:
        for case in cases:
            for r in range(rounds):
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    rec = workers[side].run(case)
                    out[side][case.case_id] = merge(out[side].get(case.case_id), rec)
                    if on_round:
                        on_round(side, case, rec)
    finally:
        for w in workers.values():
            w.stop()
    return out


def run(sw: Sweep, base: str, head: str | None, root: Path, argv: list[str], device: str,
        rounds: int) -> tuple[Path, Run, Run]:
    """Measure both sides into ROOT/<time>_<sweep>_ab/{base,head}, two ordinary run directories
    whose records pool every round's samples; HEAD None is the working tree of this project."""
    ab_dir = Path(root) / store.run_dir_name(sw.name, "ab")
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        trees, git = {}, {}
        for side, spec in (("base", base), ("head", head)):
            if spec is None:
                trees[side], git[side] = env.ROOT, {**env.git_state(), "tree": "working tree"}
            else:
                trees[side], git[side] = checkout(spec, Path.cwd(), Path(tmp))

        def progress(side, case, rec):
            print(f"{side:4s} {rec['status']:9s} {case.label}", file=sys.stderr, flush=True)

        records = interleave(sw.cases, trees, device, rounds, progress)
    runs = {}
    for side in ("base", "head"):
        writer = runner.new_run(sw, ab_dir, argv, [device], name=side)
        writer.meta.update(git=git[side], ab={"side": side, "rounds": rounds})
        for case in sw.cases:
            writer.append(records[side][case.case_id])
        writer.close(complete=True)
        writer.write_summary(summarize(store.read_records(writer.path), writer.meta.get("ceilings")))
        runs[side] = store.load_run(writer.path)
    return ab_dir, runs["base"], runs["head"]
