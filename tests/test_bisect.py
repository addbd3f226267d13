"""bench.bisect on the CPU: a synthetic history of 8 commits whose provider spins 3x longer from
commit 5 on, and two environments of which the second makes the provider 3x slower (a .pth file
that sets an environment variable at start-up). The slowdowns are large spin-waits of fixed length,
so the verdicts do not depend on the machine's load."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from bench import bisect as bisect_cli
from bench.measure import runner
from conftest import ROOT, TESTS

SWEEP = """
name: bisect
workload: layernorm
baseline: spun
providers:
  - {name: spun, module: "bisect_provider:spun"}
  - {name: other, module: "delay_provider:steady"}
axes: {rows: [4], hidden: [16], dtype: [float32], mode: [fwd]}
timing: {warmup_ms: 2, min_reps: 20, max_reps: 40, max_time_s: 0.05, target_ci: 0.0001, timeout_s: 60}
"""

PROVIDER = """import os
from delay_provider import _spinning, STEADY_MS

FACTOR = {factor}  # commit {n}


def spun(params, inputs):
    return _spinning(params, inputs, STEADY_MS * FACTOR * float(os.environ.get("BISECT_SLOW", "1")))
"""


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    """The providers spin on the host, which only the CPU timer counts as their time: where a GPU
    was visible, its timer saw 5.7 us a call on each side and called a 3% difference of noise a
    regression. So every bisection here runs on the CPU, on any machine."""
    monkeypatch.setattr(runner, "gpu_count", lambda: 0)


def git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo), *args],
                   check=True, capture_output=True)


def run(tmp_path, monkeypatch, capsys, cwd, *args):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the trees import delay_provider
    monkeypatch.syspath_prepend(str(cwd))
    monkeypatch.chdir(cwd)
    sweep = tmp_path / "bisect.yaml"
    sweep.write_text(SWEEP)
    rc = bisect_cli.main([str(sweep), "--out", str(tmp_path / "results"), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def history(repo, slow_from: int, commits: int = 8):
    """A repository of the project's bench package and a provider; commit `slow_from` (1-based,
    counting from the first after the root) makes the provider 3x slower."""
    shutil.copytree(ROOT / "bench", repo / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "bisect_provider.py").write_text(PROVIDER.format(factor=1.0, n=0))
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "root")
    for n in range(1, commits + 1):
        factor = 3.0 if n >= slow_from else 1.0
        (repo / "bisect_provider.py").write_text(PROVIDER.format(factor=factor, n=n))
        git(repo, "commit", "-qam", f"change {n}" + (" (the slow one)" if n == slow_from else ""))


@pytest.mark.cpu
def test_bisect_names_the_slow_commit(tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    history(repo, slow_from=5)
    rc, out, err = run(tmp_path, monkeypatch, capsys, repo, "--good", "HEAD~8", "--bad", "HEAD",
                       "--providers", "spun")
    assert rc == 0, out + err
    assert "first bad commit" in out and "change 5 (the slow one)" in out, out
    result = json.loads(open(out.strip().splitlines()[-1]).read())
    culprit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD~3"], capture_output=True,
                             text=True).stdout.strip()
    assert result["culprit"] == culprit and result["confirmed"]
    assert len(result["steps"]) == 4  # the confirmation and log2(8) midpoints
    assert all(s["ratio"] > 2 for s in result["steps"] if s["bad"]), result["steps"]
    assert all(s["ratio"] < 1.5 for s in result["steps"] if not s["bad"]), result["steps"]


def test_no_regression_between_good_and_bad_exits_1(tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    history(repo, slow_from=99, commits=2)
    rc, out, err = run(tmp_path, monkeypatch, capsys, repo, "--good", "HEAD~2", "--bad", "HEAD",
                       "--providers", "spun")
    assert rc == 1, out + err
    assert "no regression to bisect" in out


def test_a_selection_of_two_cases_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    history(repo, slow_from=1, commits=1)
    rc, out, err = run(tmp_path, monkeypatch, capsys, repo, "--good", "HEAD~1", "--bad", "HEAD")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "2 cases, not one" in err


def venv(path, slow: bool):
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
                   check=True)
    site = subprocess.run([str(path / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    if slow:  # the environment, not the tree, makes the provider slower
        (open(os.path.join(site, "bisect_slow.pth"), "w")
         .write("import os; os.environ['BISECT_SLOW'] = '3'\n"))
    return path


@pytest.mark.cpu
def test_toolchain_bisect_names_the_slow_environment(tmp_path, monkeypatch, capsys):
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "bench", tree / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "bisect_provider.py").write_text(PROVIDER.format(factor=1.0, n=0))
    envs = [venv(tmp_path / "env1", False), venv(tmp_path / "env2", True),
            venv(tmp_path / "env3", True)]
    rc, out, err = run(tmp_path, monkeypatch, capsys, tree, "--providers", "spun",
                       "--envs", *map(str, envs))
    assert rc == 0, out + err
    assert f"first bad environment: {envs[1]}" in out, out
    result = json.loads(open(out.strip().splitlines()[-1]).read())
    assert result["mode"] == "envs" and result["culprit"] == str(envs[1])
    assert [s["bad"] for s in result["steps"]] == [True, True], result["steps"]


@pytest.mark.cpu
def test_nightly_bisects_a_regression_within_its_budget(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from bench import nightly
    from bench.measure import sweep as sweep_mod
    repo = tmp_path / "repo"
    history(repo, slow_from=2, commits=2)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.syspath_prepend(str(repo))
    monkeypatch.chdir(repo)
    path = tmp_path / "bisect.yaml"
    path.write_text(SWEEP)
    case = sweep_mod.load(str(path), None, [], [], ["spun"]).cases[0]
    sha = {rev: subprocess.run(["git", "rev-parse", rev], capture_output=True, text=True,
                               cwd=repo).stdout.strip() for rev in ("HEAD~2", "HEAD~1", "HEAD")}
    rec = {"case_id": case.case_id, "workload": "layernorm", "provider": "spun", "params": case.params}
    from bench.results.compare import case_label
    run = SimpleNamespace(meta={"git": {"sha": sha["HEAD"]}}, records=[rec])
    base = SimpleNamespace(meta={"git": {"sha": sha["HEAD~2"]}})
    cmp = SimpleNamespace(failing=[{"case": case_label(rec), "verdict": "regression"}])
    entry = {"sweep": str(path), "set": [], "filter": [], "providers": ["spun"]}
    import time
    lines = nightly.bisect_regressions(entry, run, base, cmp, tmp_path / "results", None,
                                       time.monotonic() + 120)
    assert len(lines) == 1 and sha["HEAD"] in lines[0] and "first bad commit" in lines[0], lines
    assert nightly.bisect_regressions(entry, run, base, cmp, tmp_path / "results", None,
                                      time.monotonic() - 1) == []  # no time left: no bisection


@pytest.mark.cpu
def test_nightly_takes_its_bisect_budget_from_the_command_line(monkeypatch, capsys):
    from bench import nightly
    seen = {}
    monkeypatch.setattr(nightly, "nightly", lambda *a, **kw: seen.update(kw) or 0)
    monkeypatch.setattr(nightly.history, "connect", lambda url: None)
    assert nightly.main(["--bisect-budget", "600"]) == 0 and seen["bisect_budget"] == 600
    assert nightly.main(["--bisect-budget", "-5"]) == 2
    err = capsys.readouterr().err
    assert "--bisect-budget -5" in err and err.count("\n") == 1
