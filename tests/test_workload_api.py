"""The public workload API: a workload from outside the harness, named as package.module:NAME in a
sweep or declared through the entry-point group cutile_bench.workloads, runs like a built-in one
(gate, timing, report, compare), in the worker subprocesses too; names that do not resolve are one
line and exit 2."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import workloads

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "rmsnorm"
SWEEP = (EXAMPLE / "rmsnorm_bench" / "sweep.yaml").read_text()


def _env(*paths):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *map(str, paths), env.get("PYTHONPATH", "")])
    return env


def _bench(args, env, cwd):
    return subprocess.run([sys.executable, "-m", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def _sweep(tmp_path, workload, name="rms.yaml"):
    path = tmp_path / name
    path.write_text(SWEEP.replace("\nworkload: rmsnorm ", f"\nworkload: {workload} ", 1))
    return path


def _installed(tmp_path) -> Path:
    """A folder that makes the example look pip-installed: the package and a dist-info whose
    entry_points.txt declares the workload."""
    site = tmp_path / "site"
    info = site / "rmsnorm_bench-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rmsnorm-bench\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[cutile_bench.workloads]\nrmsnorm = rmsnorm_bench.workload:WORKLOAD\n")
    (site / "rmsnorm_bench").symlink_to(EXAMPLE / "rmsnorm_bench")
    return site


def _run_report_compare(tmp_path, sweep, env):
    out = tmp_path / "out"
    proc = _bench(["bench.run", str(sweep), "--profile", "cpu", "--out", str(out)], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "status: 8 ok, 8 skipped" in proc.stdout
    assert "cuTile RMSNorm:" in proc.stdout  # cutile skips with its own one-line reason
    run = out / "latest"
    rep = _bench(["bench.report", str(run)], env, tmp_path)
    assert rep.returncode == 0, rep.stderr[-2000:]
    cmp = _bench(["bench.compare", str(run), str(run)], env, tmp_path)
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    return run


@pytest.mark.cpu
def test_module_spec_runs_like_a_builtin(tmp_path):
    _run_report_compare(tmp_path, _sweep(tmp_path, "rmsnorm_bench.workload:WORKLOAD"), _env(EXAMPLE))


@pytest.mark.cpu
def test_entry_point_runs_like_a_builtin(tmp_path):
    # the worker subprocesses resolve the name through the same entry point
    _run_report_compare(tmp_path, _sweep(tmp_path, "rmsnorm"), _env(_installed(tmp_path)))


def test_builtins_are_entry_points_too():
    assert {"fmha", "layernorm", "model_step"} <= set(workloads.names())
    from importlib import metadata

    declared = {ep.name for ep in metadata.entry_points(group=workloads.GROUP)}
    if declared:  # installed (editable or not): the built-ins come from the same group
        assert {"fmha", "layernorm", "model_step"} <= declared
    assert workloads.get("layernorm") is workloads.get("bench.workloads.layernorm:WORKLOAD")


def test_optional_parts_may_be_left_out(tmp_path):
    """Without a `subject`, the report's headline is about the providers other than the baseline."""
    (tmp_path / "tiny_workload.py").write_text(
        "import torch\nfrom bench.workloads import Workload\n"
        "WORKLOAD = Workload(name='tiny', make_inputs=lambda p, d: torch.randn(p['n'], device=d),\n"
        "    reference=lambda p, x: x.double() * 2, providers={'torch': lambda p, x: lambda: x * 2,\n"
        "    'sum': lambda p, x: lambda: x + x}, defaults=dict(n=8))\n")
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text("workload: tiny_workload:WORKLOAD\nbaseline: torch\nproviders: [torch, sum]\n"
                     "axes: {n: [1, 13]}\ntiming: {warmup_ms: 1, min_reps: 3, max_time_s: 0.02}\n")
    proc = _bench(["bench.run", str(sweep), "--out", str(tmp_path / "out")], _env(tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "status: 4 ok" in proc.stdout
    rep = _bench(["bench.report", str(tmp_path / "out" / "latest")], _env(tmp_path), tmp_path)
    assert rep.returncode == 0, rep.stderr[-2000:]
    md = (tmp_path / "out" / "latest" / "report.md").read_text()
    assert "the non-baseline providers" in md and "cutile" not in md.lower(), md


def test_a_package_cannot_shadow_a_builtin(tmp_path):
    site = tmp_path / "site"
    info = site / "evil-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[cutile_bench.workloads]\nlayernorm = os:path\n")
    code = ("from bench import workloads as w; print(w.get('layernorm').name);"
            "print('|'.join(w.notes()))")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(site), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "layernorm"
    assert "declared by evil is ignored: the built-in 'layernorm' wins" in out[1]
    assert proc.stderr.strip().count("\n") == 0 and "wins" in proc.stderr


@pytest.mark.parametrize("spec, says", [
    ("no_such_workload", "unknown workload 'no_such_workload' (known: "),
    ("no_such_pkg.mod:WORKLOAD", "importing no_such_pkg.mod failed (ModuleNotFoundError"),
    ("broken_workload:WORKLOAD", "importing broken_workload failed (ZeroDivisionError: division by zero)"),
    ("broken_workload:MISSING", "importing broken_workload failed"),
    ("exiting_workload:WORKLOAD", "importing exiting_workload failed (SystemExit: 3)"),
    ("os:sep", "os:sep is a str, not a bench.workloads.Workload"),
    ("os:NOPE", "module os has no attribute 'NOPE'"),
    (":WORKLOAD", "expected 'package.module:NAME'"),
])
def test_bad_specs_are_one_line_exit_2(tmp_path, spec, says):
    (tmp_path / "broken_workload.py").write_text("x = 1 / 0\n")
    (tmp_path / "exiting_workload.py").write_text("import sys\nsys.exit(3)\n")  # exited silently, 3, before
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(f"# a comment\nworkload: '{spec}'\nbaseline: torch\nproviders: [torch]\naxes: {{}}\n")
    proc = _bench(["bench.run", str(sweep), "--out", str(tmp_path / "out")], _env(tmp_path), tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert f"{sweep}:2: workload: " in err and says in err, err
