"""Sweep loading: expansion rules, overrides, and one-line file:line errors for every bad field."""
import subprocess
import time
from pathlib import Path
import sys

import pytest
import yaml

from bench.measure import sweep
from bench.measure.sweep import SweepError

BASE = """\
workload: fmha
baseline: native
providers: [native, sdpa-math]
axes:
  batch: [1, 2]
  seq_len: [13, 64, 127]
  dtype: [float32]
"""


def load(write_sweep, text, **kw):
    return sweep.load(write_sweep(text), **kw)


def points(sw, provider="native"):
    return [(c.params["batch"], c.params["seq_len"]) for c in sw.cases if c.provider == provider]


def test_product_of_axes_per_provider(write_sweep):
    sw = load(write_sweep, BASE)
    assert len(sw.cases) == 2 * 3 * 2
    assert sorted(points(sw)) == [(b, t) for b in (1, 2) for t in (13, 64, 127)]
    # axes a sweep leaves out take the workload's defaults
    assert {c.params["heads"] for c in sw.cases} == {12} and {c.params["mode"] for c in sw.cases} == {"fwd"}
    assert len({c.case_id for c in sw.cases}) == len(sw.cases)


def test_zip_varies_axes_together(write_sweep):
    sw = load(write_sweep, BASE.replace("[1, 2]", "[1, 2, 4]") + "zip: [[batch, seq_len]]\n")
    assert points(sw) == [(1, 13), (2, 64), (4, 127)]


def test_include_adds_points_and_exclude_removes_them(write_sweep):
    text = BASE + "include:\n  - {batch: 8, seq_len: 1000}\nexclude:\n  - {batch: 2, seq_len: 64}\n"
    sw = load(write_sweep, text)
    pts = points(sw)
    assert (8, 1000) in pts and (2, 64) not in pts and len(pts) == 6


def test_include_must_name_all_of_a_zip_group(write_sweep):
    text = BASE.replace("[1, 2]", "[1, 2, 4]") + "zip: [[batch, seq_len]]\ninclude:\n  - {batch: 8}\n"
    with pytest.raises(SweepError, match=r"sweep.yaml:\d+: include.0: .*name all of them"):
        load(write_sweep, text)


def test_constraints_filter_points(write_sweep):
    sw = load(write_sweep, BASE + "constraints: ['batch * seq_len <= 64']\n")
    assert sorted(points(sw)) == [(1, 13), (1, 64), (2, 13)]


def test_provider_axes_expand_only_that_provider_and_keep_the_shape(write_sweep):
    text = BASE.replace("providers: [native, sdpa-math]", """providers:
  - native
  - name: cutile
    axes: {tile_m: [64, 128], tile_n: [64, 128]}
    zip: [[tile_m, tile_n]]""")
    sw = load(write_sweep, text + "exclude:\n  - {tile_m: 128, seq_len: 13}\n")
    cut = [c for c in sw.cases if c.provider == "cutile"]
    assert len(cut) == 6 * 2 - 2
    assert {(c.params["tile_m"], c.params["tile_n"]) for c in cut} == {(64, 64), (128, 128)}
    assert all("tile_m" not in c.shape for c in cut)
    assert len(points(sw)) == 6
    # a filter on a provider's axis narrows that provider and leaves the others alone
    picked = sweep.load(write_sweep(text), filters=["tile_m=[128]"])
    assert {c.provider for c in picked.cases} == {"native", "cutile"}
    assert {c.params["tile_m"] for c in picked.cases if c.provider == "cutile"} == {128}
    with pytest.raises(SweepError, match=r"--filter tile_m=\[96\]: no case has it \(tile_m is \[64, 128\]\)"):
        sweep.load(write_sweep(text), filters=["tile_m=[96]"])


def test_a_constraint_on_a_provider_axis_applies_to_that_provider_only(write_sweep):
    text = BASE.replace("providers: [native, sdpa-math]", """providers:
  - native
  - name: cutile
    axes: {tile_m: [64, 128]}""") + "constraints: ['tile_m * batch <= 128']\n"
    sw = load(write_sweep, text)
    assert {(c.params["batch"], c.params["tile_m"]) for c in sw.cases if c.provider == "cutile"} == {
        (1, 64), (1, 128), (2, 64)}
    assert len(points(sw)) == 6  # native has no tile_m: the constraint leaves it alone
    # still so when --providers leaves out the provider that has the axis
    assert len(load(write_sweep, text, providers=["native"]).cases) == 6
    with pytest.raises(SweepError, match=r"constraints.0: .*names 'tile_k', which is not an axis"):
        load(write_sweep, text.replace("tile_m * batch", "tile_k * batch"))


def test_set_filter_and_providers(write_sweep):
    path = write_sweep(BASE)
    sw = sweep.load(path, overrides=["seq_len=[256]", "timing.max_time_s=0.5"],
                    filters=["batch=2"], providers=["sdpa-math"])
    assert [(c.provider, c.params["batch"], c.params["seq_len"]) for c in sw.cases] == [("sdpa-math", 2, 256)]
    assert sw.cases[0].timing["max_time_s"] == 0.5
    assert len(sweep.load(path, filters=["seq_len=[13, 127]"]).cases) == 2 * 2 * 2


def test_profile_is_merged_over_the_top_level(write_sweep):
    text = BASE + "timing: {max_time_s: 2}\nprofiles:\n  cpu:\n    axes: {seq_len: [5]}\n    timing: {min_reps: 3}\n"
    path = write_sweep(text)
    sw = sweep.load(path, profile="cpu")
    assert {c.params["seq_len"] for c in sw.cases} == {5}
    assert sw.cases[0].timing["max_time_s"] == 2 and sw.cases[0].timing["min_reps"] == 3
    assert sweep.has_profile(path, "cpu") and not sweep.has_profile(path, "gpu")
    assert {c.params["seq_len"] for c in sweep.load(path).cases} == {13, 64, 127}


@pytest.mark.parametrize("part,line", [("    timing: {min_reps: 0}\n", 11), ("    axes: {seq_len: [-5]}\n", 11),
                                       ("    axes: {seq_len: [5]}\n    timing:\n      max_time_s: -3\n", 13)])
def test_a_bad_value_a_profile_gives_names_its_line_in_the_profile(write_sweep, part, line):
    """It named the line of the same key at the top level (or line 1), not the profile's."""
    text = BASE + "timing: {max_time_s: 2}\nprofiles:\n  cpu:\n" + part
    with pytest.raises(sweep.SweepError, match=f"yaml:{line}: "):
        load(write_sweep, text, profile="cpu")


BAD = [
    # (replace this, with this, the message says, on this line)
    ("workload: fmha", "workload: fhma", "workload: unknown workload 'fhma'", 1),
    ("baseline: native", "baseline: cutile", "baseline: baseline 'cutile' is not one of", 2),
    ("providers: [native, sdpa-math]", "providers: [native, sdpa-turbo]", "providers.1.name: unknown provider 'sdpa-turbo'", 3),
    ("providers: [native, sdpa-math]", "providers: [native, native]", "listed twice", 3),
    ("  batch: [1, 2]", "  batch: [1, two]", "axes.batch.1: expected an integer, got str 'two'", 5),
    ("  batch: [1, 2]", "  batch: []", "axes.batch: expected a non-empty list", 5),
    ("  batch: [1, 2]", "  batch: 4", "axes.batch: expected a list, got int 4", 5),
    ("  batch: [1, 2]", "  btach: [1, 2]", "axes.btach: unknown axis for workload fmha", 5),
    ("  dtype: [float32]", "  dtype: [float8]", "axes.dtype.0: expected one of float16, bfloat16, float32", 7),
    ("  dtype: [float32]", "  dtype: [float32]\ntiming: {max_reps: -1}", "timing.max_reps: expected an integer in [1, 10000000], got int -1", 8),
    ("  dtype: [float32]", "  dtype: [float32]\ntiming: {warmup: 3}", "timing.warmup: unknown key", 8),
    ("  dtype: [float32]", "  dtype: [float32]\ntiming: {l2_flush: 1}", "timing.l2_flush: expected true or false", 8),
    ("  dtype: [float32]", "  dtype: [float32]\nzip: [[batch, seq_len]]", "zip.0: zipped axes need lists of one length", 8),
    ("  dtype: [float32]", "  dtype: [float32]\nconstraints: ['batch <']", "constraints.0: bad expression", 8),
    ("  dtype: [float32]", "  dtype: [float32]\nconstraints: ['__import__(\"os\")']", "is not allowed", 8),
    ("  dtype: [float32]", "  dtype: [float32]\nconstraints: ['heads2 > 1']", "names 'heads2', which is not an axis", 8),
    ("  dtype: [float32]", "  dtype: [float32]\ntolerance: {float32: {max_abs: big}}", "tolerance.float32.max_abs: expected a number", 8),
    ("  dtype: [float32]", "  dtype: [float32]\nsurprise: 1", "surprise: unknown key", 8),
    ("providers: [native, sdpa-math]", "providers: [native, {name: mine, module: 'no_such_module:make'}]",
     "providers.1.module: cannot load 'no_such_module:make' (ModuleNotFoundError", 3),
    ("providers: [native, sdpa-math]", "providers: [native, {name: mine, module: 'faulty_providers:nothing'}]",
     "providers.1.module: cannot load 'faulty_providers:nothing' (AttributeError", 3),
    ("providers: [native, sdpa-math]", "providers: [native, {name: mine, module: 'faulty_providers'}]",
     "providers.1.module: expected 'module:function'", 3),
    ("  dtype: [float32]", "  dtype: [float32]\n  dtype: [float16]", "duplicate key 'dtype'", 8),
    ("  seq_len: [13, 64, 127]", "  seq_len: [13, 64, 127", "not valid YAML", 7),
]


@pytest.mark.parametrize("old,new,message,line", BAD)
def test_each_bad_field_gives_file_line_and_key(write_sweep, old, new, message, line):
    path = write_sweep(BASE.replace(old, new))
    with pytest.raises(SweepError) as info:
        sweep.load(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}:{line}:"), text
    assert message in text


def test_missing_required_key(write_sweep):
    with pytest.raises(SweepError, match="missing required key 'axes'"):
        load(write_sweep, "workload: fmha\nbaseline: native\nproviders: [native]\n")


@pytest.mark.parametrize("args,message", [
    (["--set", "nokey=3"], "neither a sweep key nor an axis"),
    (["--filter", "colour=red"], "not an axis of this sweep"),
    (["--providers", "native,turbo"], "unknown provider(s) turbo"),
    (["--profile", "h100"], "no profile 'h100'"),
])
def test_bad_options_exit_2_with_one_line(write_sweep, tmp_path, subprocess_env, args, message):
    path = write_sweep(BASE)
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench.run", str(path), "--out", str(out), *args],
                          capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_file_exits_2_and_writes_nothing(write_sweep, tmp_path, subprocess_env):
    path = write_sweep(BASE.replace("[1, 2]", "[1, -2]"))
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench.run", str(path), "--out", str(out)],
                          capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {path}:5: axes.batch.1: expected an integer in [1, 2147483647], got int -2"
    assert not out.exists()


SHIPPED = sorted(p.name for p in (Path(__file__).parent.parent / "sweeps").glob("*.yaml") if p.name != "nightly.yaml")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sweeps_expand(name):
    """Every sweep in sweeps/ (nightly.yaml lists sweeps, and has its own tests) loads as written and
    in each of its profiles, and runs its baseline."""
    from conftest import ROOT

    path = ROOT / "sweeps" / name
    for profile in [None, *(yaml.safe_load(path.read_text()).get("profiles") or {})]:
        sw = sweep.load(path, profile=profile)
        assert sw.cases and sw.baseline in {c.provider for c in sw.cases}, (name, profile)


def test_fmha_sweep_tile_configs_are_the_kernels_list():
    """The sweep times exactly the configs the kernel's parity tests and AOT check cover: its
    forwards with the separate dQ kernel, and each config with both backwards."""
    from conftest import ROOT
    from kernels.fmha import SWEEP_CONFIGS

    sw = sweep.load(ROOT / "sweeps" / "fmha.yaml")
    keys = SWEEP_CONFIGS[0].keys()

    def swept(mode):
        return {tuple(c.params[k] for k in keys) for c in sw.cases
                if c.provider == "cutile" and c.params["mode"] == mode}
    assert all(c["fused_dq"] == 0 for c in SWEEP_CONFIGS)
    assert swept("fwd") == {tuple(c[k] for k in keys) for c in SWEEP_CONFIGS}
    assert swept("fwd_bwd") == {tuple({**c, "fused_dq": f}[k] for k in keys)
                                for c in SWEEP_CONFIGS for f in (0, 1)}


def _laughs(levels: int, width: int) -> str:
    """An alias bomb: each level names the one before `width` times."""
    lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]"
                               for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _merges(levels: int) -> str:
    lines = ["m0: &m0 {k: 1}"] + [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: 1}}"
                                  for i in range(1, levels)]
    return "\n".join(lines) + "\n"


BASE_T = BASE + "timing: {%s}\n"
HOSTILE = {  # kinds of file that are not sweeps, each refused in one line, quickly
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\xff\xfe" * 50,
    "utf16": BASE.encode("utf-16"),
    "latin1": (BASE + "name: caf\xe9\n").encode("latin-1"),
    "nul": (BASE + "name: a\x00b\n").encode(),
    "control": (BASE + "name: a\x07b\n").encode(),
    "huge": b"# " + b"x" * (2 << 20) + b"\n",
    "endless": None,  # /dev/zero
    "alias bomb": (BASE + _laughs(12, 9)).encode(),
    "merge bomb": (BASE + _merges(40)).encode(),
    "self alias": (BASE + "name: &a [1, *a]\n").encode(),
    "deep flow": (BASE + "name: " + "[" * 5000 + "]" * 5000 + "\n").encode(),
    "deep block": (BASE + "".join(f"{' ' * i}k:\n" for i in range(600))).encode(),
    "deep dashes": (BASE + "name:\n" + "- " * 100000 + "x\n").encode(),
    "wide list": (BASE + "name: [" + ", ".join(["1"] * 100000) + "]\n").encode(),
    "deep mapping": (BASE + "name: " + "{a: " * 500 + "1" + "}" * 500 + "\n").encode(),
    "long int": BASE.replace("[1, 2]", "[1" + "0" * 5000 + "]").encode(),
    "complex key": (BASE + "? [a, b]\n: 1\n").encode(),
    "list in zip": (BASE + "zip: [[[batch], seq_len]]\n").encode(),
    "power": (BASE + "constraints: ['2 ** 10 ** 10 > 1']\n").encode(),
    "axis power": (BASE + "constraints: ['batch ** 999999999 > seq_len ** 99999']\n").encode(),
    "string product": (BASE + "constraints: ['\"a\" * 10 ** 9 == \"b\"']\n").encode(),
    "list product": (BASE + "constraints: ['[1] * 10 ** 9 == [1]']\n").encode(),
    "float overflow": (BASE + "constraints: ['10.0 ** 400 > batch']\n").encode(),
    "nested parens": (BASE + "constraints: ['" + "(" * 300 + "1" + ")" * 300 + " > 0']\n").encode(),
    "too many cases": (BASE.replace("[1, 2]", str(list(range(1, 400))))
                       .replace("[13, 64, 127]", str(list(range(1, 400))))).encode(),
    "negative warmup": (BASE_T % "warmup_ms: -1").encode(),
    "zero reps": (BASE_T % "min_reps: 0").encode(),
    "fractional reps": (BASE_T % "min_reps: 2.5").encode(),
    "nan budget": (BASE_T % "max_time_s: .nan").encode(),
    "inf timeout": (BASE_T % "timeout_s: .inf").encode(),
    "zero timeout": (BASE_T % "timeout_s: 0").encode(),
    "ci above 1": (BASE_T % "target_ci: 5").encode(),
    "huge warmup": (BASE_T % "warmup_ms: 1.0e+300").encode(),
    "warmup past timeout": (BASE_T % "warmup_ms: 5000, timeout_s: 4").encode(),
    "nan tolerance": (BASE + "tolerance: {float32: {max_abs: .nan, rel: 0.1}}\n").encode(),
    "negative threshold": (BASE + "compare: {threshold: -0.1}\n").encode(),
}


def test_a_filter_no_case_matches_says_what_the_profile_replaced(write_sweep):
    path = write_sweep(BASE + "profiles:\n  cpu: {axes: {seq_len: [5]}}\n")
    with pytest.raises(SweepError, match=r"--filter seq_len=64: no case has it \(seq_len is \[5\]: "
                       r"the 'cpu' profile replaced seq_len; --profile none keeps the sweep's own\)"):
        sweep.load(path, profile="cpu", filters=["seq_len=64"])
    with pytest.raises(SweepError, match=r"no case has it \(batch is \[1, 2\]\)$"):
        sweep.load(path, profile="cpu", filters=["batch=3"])
    assert len(sweep.load(path, filters=["seq_len=64"]).cases) == 4


def test_anchors_and_merge_keys_still_work(write_sweep):
    text = BASE.replace("timing", "x") + "profiles:\n  a: &t {timing: {min_reps: 3}}\n  cpu: {<<: *t}\n"
    sw = load(write_sweep, text, profile="cpu")
    assert sw.cases[0].timing["min_reps"] == 3


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_files_are_refused_in_one_line_quickly(tmp_path, kind):
    path = tmp_path / "sweep.yaml"
    if HOSTILE[kind] is None:
        path = Path("/dev/zero")
    else:
        path.write_bytes(HOSTILE[kind])
    t0 = time.process_time()
    with pytest.raises(SweepError) as info:
        sweep.load(path)
    assert time.process_time() - t0 < 10
    text = str(info.value)
    assert text.startswith(str(path)) and "\n" not in text and len(text) < 400, text
    assert not sweep.has_profile(path, "cpu")


@pytest.mark.parametrize("kind", ["binary", "alias bomb", "deep flow", "power", "negative warmup"])
def test_hostile_file_exits_2_and_writes_nothing(tmp_path, subprocess_env, kind):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(HOSTILE[kind])
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench.run", str(path), "--out", str(out)],
                          capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {path}") and not out.exists()
