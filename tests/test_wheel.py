"""The installable tool: a wheel built from this tree, installed (not editable) in a fresh venv, runs
a sweep, renders and compares its report and runs the nightly, from a directory that is not the
checkout, with the sweeps and templates it carries."""
import importlib.util
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "bench", "kernels", "model", "sweeps", "report_templates"]
FAST = ["--set", "timing.max_time_s=0.05", "--set", "timing.warmup_ms=1"]



def can_build() -> bool:
    """setuptools, with its own bdist_wheel (70.1 and later) or the wheel package's."""
    if not importlib.util.find_spec("setuptools"):
        return False
    return bool(importlib.util.find_spec("wheel")
                or importlib.util.find_spec("setuptools.command.bdist_wheel"))




def tree_packages() -> set[str]:
    """Every package of this tree, as a dotted name."""
    return {".".join(p.parent.relative_to(ROOT).parts) for top in ("bench", "kernels", "model")
            for p in (ROOT / top).rglob("__init__.py") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, environment, working directory): the wheel of this tree installed in a fresh venv."""
    if not can_build():
        pytest.skip("building the wheel needs setuptools with bdist_wheel, or the wheel module "
                    "(--no-build-isolation: no network)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # built from a copy: a build leaves build/ and *.egg-info where it runs
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp / "dist")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = (tmp / "dist").glob("cutile_bench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert tree_packages() <= in_wheel, f"pyproject.toml's packages lack {tree_packages() - in_wheel}"
    for data in ("bench/sweeps/smoke.yaml", "bench/sweeps/nightly.yaml",
                 "bench/report_templates/report.html.j2", "kernels/tuned/nvidia-h100-80gb-hbm3.json"):
        assert data in names, f"{data} is not in the wheel"

    env_dir = tmp / "venv"
    # torch and the other dependencies come from this machine's site-packages; pip too
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # run from a venv, whose packages the base interpreter's lack
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        # path lines only: the outer .pth files (an editable install of this checkout) stay unread
        (Path(purelib) / "outer-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                           "--no-warn-script-location", str(wheel)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    work = tmp / "elsewhere"
    work.mkdir()
    return env_dir, env, work


def test_installed_package_is_the_wheels(installed):
    """Not this checkout (an editable install of it may be in the system site-packages the venv
    sees): every module of the harness, and its sweeps and templates, come from the venv."""
    env_dir, env, work = installed
    probe = ("import sys, bench.__main__, bench.measure.worker, bench.nightly, bench.present.report as r, "
             "kernels.tuned, model\n"
             "from bench import assets\n"
             "mods = [m.__file__ for n, m in list(sys.modules.items()) "
             "if n.split('.')[0] in ('bench', 'kernels', 'model') and getattr(m, '__file__', None)]\n"
             "print('\\n'.join(mods + [str(r.TEMPLATES), str(assets.sweep_file('sweeps/nightly.yaml')), "
             "str(assets.sweep_file('fmha'))]))")
    out = subprocess.run([str(env_dir / "bin" / "python"), "-c", probe], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    paths = out.stdout.split()
    assert len(paths) > 10
    venv_root = env_dir.resolve()
    for p in paths:
        assert Path(p).resolve().is_relative_to(venv_root), f"{p} is not the installed wheel's"
        assert not Path(p).resolve().is_relative_to(ROOT), p
    assert paths[-1].endswith("fmha.yaml") and paths[-2].endswith("nightly.yaml")


def run(installed, *args, ok=(0,)):
    env_dir, env, work = installed
    proc = subprocess.run([str(env_dir / "bin" / "cutile-bench"), *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in ok, f"cutile-bench {' '.join(args)}: exit {proc.returncode}\n" \
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def test_run_report_compare_nightly(installed):
    env_dir, env, work = installed
    assert "nightly" in run(installed, "--help").stdout
    assert run(installed, "nosuch", ok=(2,)).stderr.count("\n") == 1

    runs = []
    for _ in range(2):  # a built-in sweep, named as in the README, from a directory without it
        out = run(installed, "run", "sweeps/smoke.yaml", "--out", "results", *FAST).stdout
        runs.append(work / out.strip().splitlines()[-1])
        assert (runs[-1] / "samples.jsonl").is_file()
    assert (work / "results" / "latest").resolve() == runs[-1].resolve()

    run(installed, "report", "results/latest")
    html = runs[-1] / "report.html"
    assert html.is_file() and html.stat().st_size > 5000
    assert "native" in html.read_text()
    assert (runs[-1] / "report.md").is_file()

    run(installed, "compare", str(runs[0]), str(runs[1]), ok=(0, 1))  # 1: CPU noise read as a regression
    assert (runs[1] / "compare.json").is_file()

    # a plan of its own, whose relative sweep path names the built-in sweep
    (work / "plan.yaml").write_text("sweeps:\n  - sweep: sweeps/smoke.yaml\n")
    out = run(installed, "nightly", "--config", "plan.yaml", "--out", "night", "--baselines",
              "night/baselines", "--history", str(work / "night" / "history.sqlite"), ok=(0, 1)).stdout
    assert "nightly:" in out
    md, = (work / "night" / "nightly").glob("*/report.md")
    assert "Nightly benchmark" in md.read_text()
    assert list((work / "night" / "nightly").glob("*/trend.html"))
    assert not (work / "sweeps").exists() and not (work / "report_templates").exists()


def test_dispatch(capsys, monkeypatch, tmp_path):
    """cutile-bench X is bench.X.main; an unknown or absent command is one line and exit 2; a
    built-in sweep is found by name from any directory, an existing file first."""
    from bench import __main__ as cli, assets
    assert cli.main([]) == 0 and "crosscheck" in capsys.readouterr().out
    assert cli.main(["nosuch"]) == 2 and capsys.readouterr().err.count("\n") == 1
    monkeypatch.setitem(cli.COMMANDS, "absent", "")
    assert cli.main(["absent"]) == 2 and "bench.absent" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    monkeypatch.chdir(tmp_path)
    assert assets.sweep_file("fmha") == assets.sweep_file("sweeps/fmha.yaml") == ROOT / "sweeps" / "fmha.yaml"
    assert assets.sweep_file("sweeps/nope.yaml") == Path("sweeps/nope.yaml")
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "fmha.yaml").write_text("workload: fmha\n")
    assert assets.sweep_file("sweeps/fmha.yaml") == Path("sweeps/fmha.yaml")
    assert (assets.folder("report_templates") / "report.html.j2").is_file()
