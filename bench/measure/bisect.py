"""Bisection of one flagged case: which commit (or which toolchain environment) made it slower.

Each step measures the case on two sides with the A/B machinery (bench.measure.ab.interleave: each
side's own tree and worker, on one device, in A B B A rounds) and judges the pair with
bench.compare's verdict. The good side is measured again at every step, next to the candidate, so
a drift of the machine between steps is no verdict. A candidate is bad when the verdict fails
(a regression of at least the threshold, or a case that broke).

Over commits: the candidates are `git rev-list --first-parent good..bad`, oldest first; over
environments: the environments after the first, in the order given, all running one tree."""
from __future__ import annotations

import json
import math
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.cli import BadInput
from bench.measure import ab
from bench.measure.sweep import Case
from bench.results.compare import FAILING, clean, compare_case


@dataclass
class Side:
    """What one side of a step runs: a tree, and the interpreter of its worker."""
    name: str  # a short sha, or an environment as given
    tree: Path
    python: str | None = None
    subject: str = ""


@dataclass
class Step:
    candidate: str
    subject: str
    good_ms: float
    cand_ms: float
    ratio: float
    ci_low: float
    ci_high: float
    verdict: str
    bad: bool
    seconds: float
    reason: str = ""


@dataclass
class Bisection:
    case: str
    case_id: str
    mode: str  # "commits" or "envs"
    good: str
    bad: str
    threshold: float
    candidates: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    confirmed: bool = False
    culprit: str | None = None
    culprit_subject: str = ""
    last_good: str | None = None
    out_of_time: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d["steps"] = [{k: clean(v) for k, v in s.items()} for s in d["steps"]]
        return d


def _git(repo: Path, *args) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise BadInput(f"git {' '.join(args)}: {(done.stderr.strip().splitlines() or [''])[0][:200]}")
    return done.stdout.strip()


def commits_between(repo: Path, good: str, bad: str) -> list[tuple[str, str]]:
    """[(sha, subject)] of good..bad along first parents, oldest first (bad last)."""
    for rev in (good, bad):
        if ab._git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").returncode:
            raise BadInput(f"{rev!r} is not a git revision of {repo}")
    ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", good, bad], cwd=repo,
                              capture_output=True, timeout=60).returncode == 0
    if not ancestor:
        raise BadInput(f"--good {good} is not an ancestor of --bad {bad}")
    lines = _git(repo, "rev-list", "--first-parent", "--reverse", "--format=%H %s", f"{good}..{bad}")
    out = []
    for line in lines.splitlines():
        if line.startswith("commit "):
            continue
        sha, _, subject = line.partition(" ")
        out.append((sha, subject))
    if not out:
        raise BadInput(f"no commit between --good {good} and --bad {bad}")
    return out


def python_of(spec: str) -> str:
    """The interpreter of an environment given as an interpreter path or a venv directory."""
    path = Path(spec)
    if path.is_dir():
        for exe in (path / "bin" / "python", path / "Scripts" / "python.exe"):
            if exe.exists():
                return str(exe)
        raise BadInput(f"{spec}: a directory without bin/python (not a virtual environment)")
    if not path.exists():
        raise BadInput(f"{spec}: no such interpreter or environment")
    return str(path)


def measure(case: Case, good: Side, cand: Side, device: str, rounds: int, threshold: float,
            log=print) -> Step:
    """One step: the case on both sides, interleaved, and compare's verdict of cand against good."""
    t0 = time.monotonic()
    recs = ab.interleave([case], {"good": good.tree, "cand": cand.tree}, device, rounds,
                         pythons={"good": good.python, "cand": cand.python},
                         max_rounds=max(rounds, ab.max_rounds_for(device)), threshold=threshold)
    kind = "cpu" if device == "cpu" else "cuda"
    row = compare_case(recs["good"][case.case_id], recs["cand"][case.case_id], threshold, kind)
    bad = row["verdict"] in FAILING
    reason = row["reason"] or (recs["good"][case.case_id].get("reason") or "")
    step = Step(cand.name, cand.subject, row["base_ms"], row["cur_ms"], row["ratio"], row["ci_low"],
                row["ci_high"], row["verdict"], bad, round(time.monotonic() - t0, 2), reason)
    log(format_step(step))
    return step


def _ms(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.4f}"


def _ratio(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3f}x"


HEADER = f"{'candidate':14s} {'good ms':>9s} {'cand ms':>9s} {'ratio':>8s}  verdict      subject"


def format_step(s: Step) -> str:
    mark = "BAD " if s.bad else "good"
    return (f"{s.candidate[:14]:14s} {_ms(s.good_ms):>9s} {_ms(s.cand_ms):>9s} {_ratio(s.ratio):>8s}"
            f"  {mark} {s.verdict:11s} {s.subject[:60]}")


def search(case: Case, good: Side, sides: list[Side], device: str, rounds: int, threshold: float,
           result: Bisection, budget_s: float | None = None, log=print) -> Bisection:
    """Confirm that the last side regresses against `good`, then binary-search `sides` for the
    first bad one. With a budget, stops when the next step would start after it, naming the range
    left."""
    start = time.monotonic()
    log(HEADER)
    first = measure(case, good, sides[-1], device, rounds, threshold, log)
    result.steps.append(first)
    result.confirmed = first.bad
    if not first.bad:
        return result
    lo, hi = -1, len(sides) - 1  # sides[lo] good (or `good` itself), sides[hi] bad
    while hi - lo > 1:
        if budget_s is not None and time.monotonic() - start >= budget_s:
            result.out_of_time = True
            break
        mid = (lo + hi) // 2
        step = measure(case, good, sides[mid], device, rounds, threshold, log)
        result.steps.append(step)
        if step.bad:
            hi = mid
        else:
            lo = mid
    result.culprit, result.culprit_subject = sides[hi].name, sides[hi].subject
    result.last_good = good.name if lo < 0 else sides[lo].name
    return result


def bisect_commits(case: Case, good: str, bad: str, device: str, rounds: int, threshold: float,
                   repo: Path | None = None, budget_s: float | None = None, log=print) -> Bisection:
    """The first commit of good..bad (first parents) at which `case` is bad."""
    repo = Path(repo or Path.cwd())
    commits = commits_between(repo, good, bad)
    result = Bisection(case.label, case.case_id, "commits", good, bad, threshold,
                       [sha for sha, _ in commits])
    with tempfile.TemporaryDirectory(prefix="bench-bisect-") as tmp:
        good_tree, meta = ab.checkout(good, repo, Path(tmp))
        good_side = Side(meta["sha"][:12], good_tree, subject=_git(repo, "log", "-1", "--format=%s",
                                                                     meta["sha"]))
        sides = [_LazyTree(sha, subject, repo, Path(tmp)) for sha, subject in commits]
        search(case, good_side, sides, device, rounds, threshold, result, budget_s, log)
    if result.culprit:
        result.culprit = next(sha for sha, _ in commits if sha.startswith(result.culprit))
    return result


class _LazyTree(Side):
    """A commit's side, exported (git archive) only when a step measures it."""

    def __init__(self, sha: str, subject: str, repo: Path, into: Path):
        self.name, self.subject, self.python = sha[:12], subject, None
        self._sha, self._repo, self._into, self._tree = sha, repo, into, None

    @property
    def tree(self) -> Path:  # type: ignore[override]
        if self._tree is None:
            self._tree = ab.checkout(self._sha, self._repo, self._into)[0]
        return self._tree


def bisect_envs(case: Case, envs: list[str], tree: Path, device: str, rounds: int,
                threshold: float, budget_s: float | None = None, log=print) -> Bisection:
    """The first environment of envs[1:] under which `case` is bad against envs[0], one tree."""
    if len(envs) < 2:
        raise BadInput("--envs needs at least two environments: the good one first, the bad one last")
    pythons = [python_of(e) for e in envs]
    sides = [Side(e, Path(tree), p, subject=_version(p)) for e, p in zip(envs, pythons)]
    result = Bisection(case.label, case.case_id, "envs", envs[0], envs[-1], threshold, envs[1:])
    search(case, sides[0], sides[1:], device, rounds, threshold, result, budget_s, log)
    return result


def _version(python: str) -> str:
    """What an environment is, in a few words: its python and torch versions."""
    code = "import sys, importlib.metadata as m\ntry: t = m.version('torch')\nexcept Exception: t = '-'\n" \
           "print(f'python {sys.version.split()[0]}, torch {t}')"
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise BadInput(f"{python}: cannot run ({e.strerror})") from None
    return done.stdout.strip() if done.returncode == 0 else "?"


def report(result: Bisection) -> str:
    """The verdict in words, after the table of steps."""
    if not result.confirmed:
        s = result.steps[0]
        return (f"no regression to bisect: {result.bad} against {result.good} is {s.verdict} "
                f"({_ratio(s.ratio)}, threshold {result.threshold:.1%}) for {result.case}")
    culprit = next((s for s in result.steps if s.candidate == result.culprit[:14]), None)
    numbers = f" ({_ms(culprit.good_ms)} -> {_ms(culprit.cand_ms)} ms, {_ratio(culprit.ratio)})" \
        if culprit else ""
    what = "first bad commit" if result.mode == "commits" else "first bad environment"
    if result.out_of_time:
        return (f"out of time: the first bad {result.mode[:-1]} is after {result.last_good} and at "
                f"or before {result.culprit} ({result.culprit_subject}){numbers}")
    return f"{what}: {result.culprit} {result.culprit_subject}{numbers}; last good {result.last_good}"


def write(result: Bisection, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "bisect.json").write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    return path / "bisect.json"

