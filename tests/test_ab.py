"""bench.ab on the CPU: two trees whose providers spin for fixed times (tests/delay_provider.py), so
the verdicts do not depend on the machine's load. A revision that slows one provider by 10% fails
naming that case only; two identical trees pass."""
import json
import shutil
import subprocess

from bench import ab as ab_cli
from conftest import ROOT, TESTS

SWEEP = """
name: ab
workload: layernorm
baseline: kept
providers:
  - {name: kept, module: "ab_provider:kept"}
  - {name: changed, module: "ab_provider:changed"}
axes: {rows: [4], hidden: [16], dtype: [float32], mode: [fwd]}
timing: {warmup_ms: 5, min_reps: 100, max_reps: 150, max_time_s: 0.5, target_ci: 0.0001, timeout_s: 60}
"""


def tree(path, changed: str):
    """A copy of the project whose provider `changed` is delay_provider's `changed` function."""
    shutil.copytree(ROOT / "bench", path / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    (path / "ab_provider.py").write_text(
        f"from delay_provider import steady as kept, {changed} as changed  # noqa: F401\n")
    return path


def ab(tmp_path, monkeypatch, capsys, working_tree, *sides) -> tuple[int, list[dict], str]:
    """Run bench.ab as a user would from `working_tree`, whose providers the sweep is checked with."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the trees import delay_provider
    monkeypatch.syspath_prepend(str(working_tree))
    sweep = tmp_path / "ab.yaml"
    sweep.write_text(SWEEP)
    rc = ab_cli.main([*map(str, sides), str(sweep), "--out", str(tmp_path / "results")])
    out, err = capsys.readouterr()
    assert rc in (0, 1), err
    ab_dir = out.strip().splitlines()[-1]
    return rc, json.loads(open(f"{ab_dir}/compare.json").read())["cases"], out


def test_a_revision_that_slows_one_provider_fails_naming_it(tmp_path, monkeypatch, capsys):
    repo = tree(tmp_path / "repo", "steady")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    (repo / "ab_provider.py").write_text("from delay_provider import steady as kept, slowed as changed\n")
    subprocess.run([*git, "commit", "-qam", "slower"], check=True)
    monkeypatch.chdir(repo)  # revisions are looked up in the repository the command runs from
    rc, cases, out = ab(tmp_path, monkeypatch, capsys, repo, "HEAD~1", "HEAD")
    assert rc == 1, out
    assert [c["provider"] for c in cases if c["verdict"] != "unchanged"] == ["changed"], out
    assert [c["verdict"] for c in cases if c["provider"] == "changed"] == ["regression"]
    assert "layernorm/changed" in out and "+" in out
    report = (tmp_path / "results").glob("*_ab_*/report.html")
    assert "1 regression" in next(report).read_text()  # the report's comparison section


def test_identical_trees_pass(tmp_path, monkeypatch, capsys):
    a, b = tree(tmp_path / "a", "quick"), tree(tmp_path / "b", "quick")
    rc, cases, out = ab(tmp_path, monkeypatch, capsys, b, a, b)
    assert rc == 0, out
    assert sorted(c["verdict"] for c in cases) == ["unchanged", "unchanged"], out


def test_bad_revision_is_one_line_and_exit_2(tmp_path, capsys):
    sweep = tmp_path / "ab.yaml"
    sweep.write_text(SWEEP)
    assert ab_cli.main(["no-such-revision", str(sweep), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-revision" in err
