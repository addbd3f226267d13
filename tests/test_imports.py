"""What imports what: every module imports, and a report renders, where cuda-tile cannot be
imported (as on a machine without it, even where it is installed); and the layer rules that keep
it so: kernels/ imports nothing of bench or model and has no import cycle, bench/present nothing of
kernels, model, bench/measure, bench/workloads or the entry points, and bench/results nothing of
bench/present, bench/measure or the entry points."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "results" / "fixtures" / "h100_synthetic"

# a finder ahead of every other that refuses `cuda` and `cuda.*`, so `import cuda.tile` fails
BLOCK_CUDA = """
import sys

class NoCuda:
    def find_spec(self, name, path=None, target=None):
        if name == "cuda" or name.startswith("cuda."):
            raise ImportError(f"{name} is blocked")

sys.meta_path.insert(0, NoCuda())
"""


def without_cuda(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_CUDA + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)


def modules(package: str) -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / package).rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_a_report_renders_without_cuda(tmp_path):
    out = tmp_path / "report.html"
    done = without_cuda(f"""
import kernels
from bench import report
assert not kernels.available()[0]
assert report.main([{str(FIXTURE)!r}, "-o", {str(out)!r}]) == 0
print(sorted(m for m in sys.modules if m.startswith("kernels")))
""")
    assert done.returncode == 0, done.stderr
    assert "['kernels', 'kernels.config', 'kernels.tuned']" in done.stdout, "no kernel is imported"
    html = out.read_text()
    assert "kernels/tuned/nvidia-h100-80gb-hbm3.json" in html, "the tuned table is read all the same"
    assert (tmp_path / "report.md").exists()


def test_every_module_imports_without_cuda():
    names = modules("bench") + modules("kernels") + modules("model")
    done = without_cuda(f"""
import importlib
for name in {names!r}:
    importlib.import_module(name)
print(len(sys.modules))
""")
    assert done.returncode == 0, done.stderr


def test_kernels_know_nothing_of_the_harness_and_have_no_circle():
    graph = {}
    for name in modules("kernels"):
        path = ROOT / (name.replace(".", "/") + ("/__init__.py" if name == "kernels" else ".py"))
        found = imports(path)
        assert not any(m.split(".")[0] in ("bench", "model") for m in found), name
        graph[name] = {m for m in found if m in set(modules("kernels")) - {"kernels", name}}

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m))) for m in graph[start])
    assert [m for m in graph if reaches(m, m)] == []


ENTRY_POINTS = [f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py")
                if p.stem not in ("__init__", "cli", "assets")]  # cli and assets serve every layer


@pytest.mark.parametrize("package, forbidden", [
    ("bench/present", ["kernels", "model", "bench.measure", "bench.workloads", *ENTRY_POINTS]),
    ("bench/results", ["bench.present", "bench.measure", *ENTRY_POINTS]),
])
def test_layers_import_only_below_them(package, forbidden):
    for path in (ROOT / package).glob("*.py"):
        bad = {m for m in imports(path) if any(m == f or m.startswith(f + ".") for f in forbidden)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
