"""Sweep input at and past its bounds: expansion work counted before it is done, special files,
names, YAML tags, command-line keys and values, timing the runner can carry out, axis values, and
cases read back from a run. Each bad input is one line, quickly, and nothing is written."""
import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from multiprocessing import Pipe
from pathlib import Path

import pytest

from bench import workloads
from bench.measure import sweep
from bench.measure.sweep import SweepError
from conftest import ROOT
from test_sweep import BASE


def refused(path, match: str, seconds: float = 10, **kw) -> str:
    """Load `path` expecting a SweepError of one line containing `match` within `seconds` of this
    process's CPU time (not wall time, which a loaded host stretches; unbounded expansion took
    minutes)."""
    t0 = time.process_time()
    with pytest.raises(SweepError) as info:
        sweep.load(path, **kw)
    assert time.process_time() - t0 < seconds
    text = str(info.value)
    assert "\n" not in text and match in text, text
    return text


def grid(batches: int, seq_lens: int, providers: str = "[native]", rest: str = "") -> str:
    """An fmha sweep of batches x seq_lens points."""
    return (f"workload: fmha\nbaseline: native\nproviders: {providers}\naxes:\n"
            f"  batch: {list(range(1, batches + 1))}\n  seq_len: {list(range(1, seq_lens + 1))}\n"
            + rest)


def tiles(*sizes: int) -> str:
    """Providers: native, and cutile with axes of these many values each."""
    axes = ", ".join(f"t{i}: {list(range(n))}" for i, n in enumerate(sizes))
    return f"[native, {{name: cutile, axes: {{{axes}}}}}]"


# ---- 1. expansion work is bounded before it is done ------------------------------------------

def test_many_points_with_include_rules_expand_in_linear_time(write_sweep):
    """1e5 points and include rules that repeat them (the check was quadratic: minutes)."""
    for rule in ("{batch: 5}", "{dtype: float16}", "{batch: 7, seq_len: 3}"):
        text = grid(1000, 100, rest=f"  dtype: [float16]\ninclude:\n  - {rule}\n  - {rule}\n")
        t0 = time.process_time()
        sw = sweep.load(write_sweep(text))
        assert time.process_time() - t0 < 30
        assert len(sw.cases) == 100_000 == len({c.case_id for c in sw.cases})


@pytest.mark.parametrize("rest,match", [
    ("include:\n  - {dtype: float32}\n",
     "include.0: the axes and include rules give more than 100,000 points"),
    ("  dtype: [float16]\ninclude:\n" + "  - {dtype: float16}\n" * 50, "steps to expand"),
    ("  dtype: [float16, float32]\n", "the axes give 200,000 points, more than 100,000"),
])
def test_too_many_points_are_refused_before_they_are_made(write_sweep, rest, match):
    refused(write_sweep(grid(1000, 100, rest=rest)), match)


@pytest.mark.parametrize("providers,rest,match", [
    # all removed by a constraint: 1e5 x 1e5 combinations were checked one by one (minutes)
    (tiles(100, 100, 10), "constraints: ['batch < 0']\n",
     "100,000 points x 100,001 provider configs, each checked against 6 terms"),
    (tiles(100, 100), "exclude:\n  - {batch: 0}\n", "100,000 points x 10,001 provider configs"),
    (tiles(1000), "constraints: ['batch < 0']\n", "100,000 points x 1,001 provider configs"),
    ("[native]", "constraints: ['" + " and ".join(["batch > 0"] * 30) + "']\n",
     "100,000 points x 1 provider configs, each checked against"),
    ("[native]", "exclude:\n" + "".join(f"  - {{batch: 0, seq_len: {i}}}\n" for i in range(50)),
     "each checked against 250 terms"),
])
def test_points_removed_by_rules_count_before_they_are_checked(write_sweep, providers, rest, match):
    text = refused(write_sweep(grid(1000, 100, providers, rest)), match)
    assert "more than 5,000,000 steps to expand; narrow the axes" in text


def test_a_filter_counts_towards_the_work(write_sweep):
    path = write_sweep(grid(1000, 100, tiles(20)))
    refused(path, "each checked against 2 terms", filters=["t0=[0]"])
    refused(path, "each checked against 1,001 terms", filters=["t0=" + str(list(range(1000)))])


def test_a_provider_product_past_the_cap_is_refused_before_it_is_made(write_sweep):
    refused(write_sweep(grid(2, 2, tiles(1000, 1000))),
            "providers.1.axes: the axes give 1,000,000 points")


def test_the_case_cap_is_checked_as_cases_are_made(write_sweep):
    refused(write_sweep(grid(1000, 100, tiles(1))), "(top level): more than 100,000 cases")


def test_a_large_sweep_within_the_bounds_still_expands(write_sweep):
    """300,000 combinations checked, most removed by a constraint: within the bounds, in seconds."""
    t0 = time.process_time()
    sw = sweep.load(write_sweep(grid(999, 100, tiles(2), "constraints: ['t0 >= batch']\n")))
    assert time.process_time() - t0 < 30
    assert len(sw.cases) == 99_900 + 100 == sweep.MAX_CASES  # native; cutile at batch 1, t0 1


def test_a_point_listed_twice_is_one_case(write_sweep):
    sw = sweep.load(write_sweep(BASE.replace("[13, 64, 127]", "[13, 64, 13, 64]")
                                + "include:\n  - {batch: 1, seq_len: 13}\n"))
    assert len(sw.cases) == 2 * 2 * 2 == len({c.case_id for c in sw.cases})


# ---- 2. special files are refused without blocking -------------------------------------------

def _loads_within(path, seconds: float) -> str:
    """The SweepError of loading `path`, which must come within `seconds` (a thread, so a read that
    blocks fails the test instead of hanging it)."""
    out = []

    def load():
        try:
            sweep.load(path)
        except SweepError as e:
            out.append(str(e))
    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"{path}: no SweepError within {seconds} s"
    return out[0]


@pytest.mark.parametrize("kind", ["fifo", "fifo link", "directory", "/dev/null", "/dev/zero"])
def test_special_files_are_refused_without_blocking(tmp_path, kind):
    path = tmp_path / "sweep.yaml"
    if kind.startswith("fifo"):
        os.mkfifo(tmp_path / "fifo")
        path = tmp_path / "fifo"
        if kind == "fifo link":
            (tmp_path / "link.yaml").symlink_to(path)
            path = tmp_path / "link.yaml"
    elif kind == "directory":
        path.mkdir()
    else:
        path = Path(kind)
    text = _loads_within(path, 5)
    assert text.startswith(f"{path}: ") and "not a regular file" in text, text
    assert not sweep.has_profile(path, "cpu")


def test_a_fifo_on_the_command_line_exits_2_at_once(tmp_path, subprocess_env):
    os.mkfifo(tmp_path / "sweep.yaml")
    proc = subprocess.run([sys.executable, "-m", "bench.run", str(tmp_path / "sweep.yaml"),
                           "--out", str(tmp_path / "results")],
                          capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {tmp_path / 'sweep.yaml'}: a FIFO, not a regular file; not a sweep file")
    assert not (tmp_path / "results").exists()


# ---- 3. the sweep name is safe in a directory name -------------------------------------------

@pytest.mark.parametrize("name", [
    "'/../../../escaped'", "'../escaped'", "a/b", "'..'", ".hidden", "-rf", "'a b'", '"a\\0b"',
    '"tab\\there"', "a" * 65, "a" * 300, "[x]", "{a: 1}", "12", "true", "'é'", "''"])
def test_bad_names_are_refused_with_file_and_line(write_sweep, name):
    path = write_sweep(BASE + f"name: {name}\n")
    text = refused(path, "name: expected 1 to 64 letters, digits, '.', '_' or '-'")
    assert text.startswith(f"{path}:8: name: ") and len(text) < 300


@pytest.mark.parametrize("name", ["ok", "a.b-c_1", "0a", "A" * 64])
def test_good_names_load(write_sweep, name):
    assert sweep.load(write_sweep(BASE + f"name: '{name}'\n")).name == name


def test_a_name_from_set_or_the_file_name_is_checked_too(write_sweep):
    text = refused(write_sweep(BASE), "--set name=../up: name: expected", overrides=["name=../up"])
    assert text.startswith("--set name=../up: ")
    refused(write_sweep(BASE, name="my sweep.yaml"), "the file name does not make a sweep name")
    assert sweep.load(write_sweep(BASE + "name: mine\n", name="my sweep.yaml")).name == "mine"
    assert sweep.load(write_sweep(BASE, name="plain-1.yaml")).name == "plain-1"


def test_an_escaping_name_exits_2_and_writes_nothing(tmp_path, subprocess_env):
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "sweep.yaml"
    path.write_text(BASE + "name: '/../../../escaped'\n")
    proc = subprocess.run([sys.executable, "-m", "bench.run", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=subprocess_env, timeout=120,
                          cwd=tmp_path / "in")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {path}:8: name: ")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["in", "sweep.yaml"]


# ---- 4. YAML tags are refused wherever they are ----------------------------------------------

@pytest.mark.parametrize("line,tag", [
    ("x: !!python/object/apply:os.system {args: [echo hi]}", "!!python/object/apply:os.system"),
    ("x: !!python/object/apply:os.system [echo hi]", "!!python/object/apply:os.system"),
    ("x: !!python/name:os.system ''", "!!python/name:os.system"),
    ("x: !!binary aGVsbG8=", "!!binary"),
    ("x: !!set {a, b}", "!!set"),
    ("x: !!omap [{a: 1}]", "!!omap"),
    ("x: !!pairs [{a: 1}]", "!!pairs"),
    ("x: !!timestamp 2024-01-01", "!!timestamp"),
    ("x: 2024-01-01", "!!timestamp"),  # safe_load would make a date of it
    ("x: !local {a: 1}", "!local"),
    ("x: !local [1]", "!local"),
    ("x: !<tag:example.com,2024:thing> 1", "tag:example.com,2024:thing"),
    ("x: !!str [1]", "!!str"),
    ("x: !!seq {a: 1}", "!!seq"),
    ("? !!python/tuple [a, b]\n: 1", "!!python/tuple"),
    ("m: &m !!python/object:os.Foo {a: 1}\nx: {<<: *m}", "!!python/object:os.Foo"),
])
def test_tags_are_refused_on_every_kind_of_node(write_sweep, line, tag):
    path = write_sweep(BASE + line + "\n")
    text = refused(path, f"YAML tag {tag} is not allowed")
    assert text.startswith(f"{path}:8: ")
    assert not sweep.has_profile(path, "cpu")


@pytest.mark.parametrize("old,new", [
    ("axes:", "axes: !!python/object:x"),
    ("[1, 2]", "!!python/tuple [1, 2]"),
    ("[native, sdpa-math]", "[native, !!python/str sdpa-math]"),
])
def test_tags_are_refused_in_the_keys_the_sweep_uses(write_sweep, old, new):
    refused(write_sweep(BASE.replace(old, new)), "is not allowed")


def test_standard_tags_still_load(write_sweep):
    text = BASE.replace("[1, 2]", "!!seq [!!int '1', 2]").replace("[float32]", "[!!str float32]")
    sw = sweep.load(write_sweep(text + "timing: !!map {max_time_s: !!float 1, l2_flush: !!bool true}\n"
                                "name: ! plain\n"))
    assert {c.params["batch"] for c in sw.cases} == {1, 2} and sw.name == "plain"


# ---- 5 and 6. command-line keys and values ----------------------------------------------------

@pytest.mark.parametrize("option,match", [
    ("timeing.max_time_s=5", "'timeing.max_time_s' is neither a sweep key nor an axis (sweep keys: axes,"),
    ("seq_lenn=5", "'seq_lenn' is neither a sweep key nor an axis"),
    ("workload=layernorm", "'workload' is neither a sweep key nor an axis"),
    ("profiles.cpu.timing.min_reps=1", "'profiles.cpu.timing.min_reps' is neither"),
    ("tolerance.float16.rel.x=1", "'tolerance.float16.rel.x' is neither"),
    ("timing.max_tme_s=5", "timing.max_tme_s: unknown key (expected one of cuda_graph,"),
    ("axes.seq_lenn=[1]", "axes.seq_lenn: unknown axis for workload fmha (known: batch,"),
    ("tolerance.float16.abs=1", "tolerance.float16.abs: unknown key (expected one of max_abs, rel)"),
    ("compare.treshold=1", "compare.treshold: unknown key"),
    ("timing.timeout_s=3000000", "timing.timeout_s: expected a number in (0, 86400], got int 3000000"),
    ("seq_len=-1", "axes.seq_len.0: expected an integer in [1, 2147483647], got int -1"),
    ("timing.max_time_s.x=1", "timing.max_time_s: expected a number, got dict"),
])
def test_set_on_an_unknown_key_or_a_bad_value_names_the_option(write_sweep, option, match):
    text = refused(write_sweep(BASE), match, overrides=[option])
    assert text.startswith(f"--set {option}: ")


def test_set_names_the_keys_and_axes_it_knows(write_sweep):
    text = refused(write_sweep(BASE), "'nope' is", overrides=["nope=1"])
    assert "sweep keys: axes, baseline, compare, constraints, exclude, include, name, providers, " \
           "timing, tolerance, zip; axes: batch, causal, dtype, head_dim, heads, mode, seq_len)" in text


HOSTILE_VALUES = {
    "self alias": "&a [*a]",
    "alias bomb": "[" + ", ".join(f"&a{i} [{', '.join([f'*a{i - 1}'] * 9) if i else 'x'}]"
                                  for i in range(12)) + "]",
    "deep flow": "[" * 5000 + "]" * 5000,
    "deep mapping": "{a: " * 500 + "1" + "}" * 500,
    "wide list": "[" + ", ".join(["1"] * 100_000) + "]",
    "huge": "x" * (300 << 10),
    "long int": "1" + "0" * 5000,
    "tag": "!!python/object/apply:os.system [echo hi]",
    "bad yaml": "[1, 2",
    "two documents": "1\n---\n2",
}


@pytest.mark.parametrize("flag", ["--filter", "--set"])
@pytest.mark.parametrize("kind", HOSTILE_VALUES)
def test_command_line_values_have_the_bounds_of_a_file(write_sweep, flag, kind):
    path = write_sweep(BASE)
    option = "seq_len=" + HOSTILE_VALUES[kind]
    kw = {"filters": [option]} if flag == "--filter" else {"overrides": [option]}
    text = refused(path, "", **kw)
    assert text.startswith(f"{flag} seq_len=") and len(text) < 400, text


def test_too_many_options_are_refused(write_sweep):
    refused(write_sweep(BASE), "more than 1000 --set and --filter options", filters=["batch=1"] * 1001)


@pytest.mark.parametrize("args,message", [
    (["--set", "timeing.max_time_s=5"], "error: --set timeing.max_time_s=5: 'timeing.max_time_s' is"),
    (["--filter", "seq_len=&a [*a]"], "error: --filter seq_len=&a [*a]: an alias refers to the value"),
    (["--set", "timing.timeout_s=3000000"], "error: --set timing.timeout_s=3000000: timing.timeout_s:"),
])
def test_bad_options_exit_2_with_one_line(write_sweep, tmp_path, subprocess_env, args, message):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench.run", str(write_sweep(BASE)), "--out", str(out),
                           *args], capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(message) and not out.exists()


# ---- 7. timing the runner can carry out --------------------------------------------------------

def timing(keys: str) -> str:
    """A timing line with these keys, and room for them: no warm-up, 1 s, the longest timeout."""
    room = {"warmup_ms": 0, "max_time_s": 1, "timeout_s": 86400}
    keep = [f"{k}: {x}" for k, x in room.items() if f"{k}:" not in keys]
    return "timing: {" + ", ".join(keep + [keys]) + "}\n"


@pytest.mark.parametrize("keys", [
    "warmup_ms: 600000", "warmup_ms: 0", "timeout_s: 86400", "timeout_s: 0.5, max_time_s: 0.4",
    "max_time_s: 86399", "max_time_s: 1.0e-9", "min_reps: 1", "max_reps: 10000000",
    "min_reps: 10000000, max_reps: 10000000", "target_ci: 0.999999", "target_ci: 1.0e-9"])
def test_timing_at_its_bounds_loads(write_sweep, keys):
    assert sweep.load(write_sweep(BASE + timing(keys))).cases


@pytest.mark.parametrize("keys,match", [
    ("warmup_ms: 600000.5", "warmup_ms: expected a number in [0, 600000]"),
    ("warmup_ms: -0.001", "warmup_ms: expected a number in [0, 600000]"),
    ("warmup_ms: 1.0e+11", "warmup_ms: expected a number in [0, 600000]"),
    ("timeout_s: 86400.5", "timeout_s: expected a number in (0, 86400]"),
    ("timeout_s: 3000000", "timeout_s: expected a number in (0, 86400]"),
    ("timeout_s: 0", "timeout_s: expected a number in (0, 86400]"),
    ("max_time_s: 86400.5", "max_time_s: expected a number in (0, 86400]"),
    ("max_time_s: 86400", "timeout_s: 86400 s leaves no time"),
    ("max_time_s: 0", "max_time_s: expected a number in (0, 86400]"),
    ("min_reps: 0", "min_reps: expected an integer in [1, 10000000]"),
    ("max_reps: 10000001", "max_reps: expected an integer in [1, 10000000]"),
    ("min_reps: 5, max_reps: 4", "min_reps: min_reps is larger than max_reps"),
    ("min_reps: 2.0", "min_reps: expected an integer, got float 2.0"),
    ("max_reps: true", "max_reps: expected an integer, got bool True"),
    ("min_reps: 1" + "0" * 400, "min_reps: expected an integer in [1, 10000000]"),
    ("target_ci: 1", "target_ci: expected a number in (0, 1)"),
    ("target_ci: 0", "target_ci: expected a number in (0, 1)"),
    ("target_ci: .nan", "target_ci: expected a number in (0, 1), got float nan"),
    ("max_time_s: .inf", "max_time_s: expected a number in (0, 86400], got float inf"),
    ("warmup_ms: -.inf", "warmup_ms: expected a number in [0, 600000], got float -inf"),
    ("timeout_s: .nan", "timeout_s: expected a number in (0, 86400], got float nan"),
    ("timeout_s: '600'", "timeout_s: expected a number, got str '600'"),
])
def test_timing_past_its_bounds_is_refused(write_sweep, keys, match):
    path = write_sweep(BASE + timing(keys))
    assert refused(path, match).startswith(f"{path}:8: timing.")


def test_the_longest_timeout_is_one_the_runner_can_wait_on():
    """The runner polls a worker's pipe for timeout_s: the bound must not overflow it (3e6 s did)."""
    longest = sweep.TIMING_RANGES["timeout_s"][2]
    a, b = Pipe()
    b.send(1)
    assert a.poll(longest) and longest < threading.TIMEOUT_MAX


# ---- 8. axis values a workload can take ------------------------------------------------------

def _int_axes():
    return [(name, axis) for name in workloads.names()
            for axis, default in workloads.get(name).defaults.items()
            if isinstance(default, int) and not isinstance(default, bool)]


@pytest.mark.parametrize("workload,axis", _int_axes())
@pytest.mark.parametrize("value", ["-1", "0", "2147483648", "1.0", "true", "'8'", "[1]", "null"])
def test_integer_axes_of_every_workload_take_sizes_only(write_sweep, workload, axis, value):
    wl = workloads.get(workload)
    provider = next(iter(wl.providers))
    text = (f"workload: {workload}\nbaseline: {provider}\nproviders: [{provider}]\n"
            f"axes:\n  {axis}: [{value}]\n")
    refused(write_sweep(text), f"sweep.yaml:5: axes.{axis}.0: expected an integer")
    assert sweep.load(write_sweep(text.replace(f"[{value}]", "[1, 2147483647]"))).cases


def test_sizes_are_checked_in_include_rules_and_set(write_sweep):
    refused(write_sweep(BASE + "include:\n  - {seq_len: -1}\n"), "include.0.seq_len: expected an integer")
    refused(write_sweep(BASE), "--set seq_len=[64, 0]: axes.seq_len.1: expected",
            overrides=["seq_len=[64, 0]"])


@pytest.mark.parametrize("value,match", [
    ("1", "expected one of False, True, got int 1"),
    ("'true'", "expected one of False, True, got str 'true'"),
])
def test_choices_are_matched_by_type_too(write_sweep, value, match):
    text = ("workload: model_step\nbaseline: torch-naive\nproviders: [torch-naive]\n"
            f"axes:\n  graph: [{value}]\n")
    refused(write_sweep(text), f"axes.graph.0: {match}")


@pytest.mark.parametrize("value,match", [
    ("[[1]]", "expected null, true/false, a number or a string, got list [1]"),
    ("[{a: 1}]", "expected null, true/false, a number or a string, got dict"),
    ("[.nan]", "expected a number in [-1000000000000, 1000000000000], got float nan"),
    ("[1" + "0" * 30 + "]", "expected a number in [-1000000000000, 1000000000000]"),
    ("[" + "x" * 201 + "]", "expected at most 200 characters, got 201"),
])
def test_provider_axes_take_plain_values(write_sweep, value, match):
    text = BASE.replace("[native, sdpa-math]", f"[native, {{name: cutile, axes: {{tile: {value}}}}}]")
    refused(write_sweep(text), f"providers.1.axes.tile.0: {match}")


def test_provider_axes_may_be_zero_or_null(write_sweep):
    text = BASE.replace("[native, sdpa-math]", "[native, {name: cutile, axes: {g: [0, null, -1, 'x']}}]")
    assert {c.params["g"] for c in sweep.load(write_sweep(text)).cases if c.provider == "cutile"} == {
        0, None, -1, "x"}


# ---- validate_cases: cases read back from a run -------------------------------------------------

def _cases(write_sweep):
    text = BASE.replace("[native, sdpa-math]", "[native, {name: cutile, axes: {tile_m: [64, null]}}]")
    return json.loads(json.dumps([c.to_dict() for c in sweep.load(write_sweep(text)).cases]))


def test_every_shipped_sweep_loads_and_its_cases_validate_when_read_back():
    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        if path.name != "nightly.yaml":  # a list of sweeps to run, not a sweep
            for profile in [None] + (["cpu"] if sweep.has_profile(path, "cpu") else []):
                made = sweep.load(path, profile).cases
                back = json.loads(json.dumps([c.to_dict() for c in made]))
                assert made and sweep.validate_cases(back, "cases.json") == made, path


def _set(c, path, value):
    *parents, last = path
    for p in parents:
        c = c[p]
    if value is KeyError:
        del c[last]
    else:
        c[last] = value


@pytest.mark.parametrize("index,path,value,match", [
    (1, ("case_id",), "<first>", "1.case_id: case id"),
    (0, ("workload",), "fhma", "0.workload: unknown workload 'fhma'"),
    (0, ("provider",), "turbo", "0.provider: unknown provider 'turbo' for workload fmha"),
    (0, ("module",), "no_colon", "0.module: expected 'module:function'"),
    (0, ("timing", "timeout_s"), 3000000, "0.timing.timeout_s: expected a number in (0, 86400]"),
    (0, ("timing", "warmup_ms"), math.nan, "0.timing.warmup_ms: expected a number in [0, 600000], got"),
    (0, ("timing", "max_reps"), 0, "0.timing.max_reps: expected an integer in [1, 10000000]"),
    (0, ("timing", "warmup"), 1, "0.timing.warmup: unknown key"),
    (0, ("timing", "l2_flush"), KeyError, "0.timing: missing key 'l2_flush'"),
    (0, ("params", "seq_len"), -1, "0.params.seq_len: expected an integer in [1, 2147483647], got int -1"),
    (0, ("params", "dtype"), "float8", "0.params.dtype: expected one of float16, bfloat16, float32"),
    (0, ("params", "heads"), KeyError, "0.params: missing axis 'heads'"),
    (2, ("params", "tile_m"), [64], "2.params.tile_m: expected null, true/false, a number or a string"),
    (0, ("shape", "batch"), 99, "0.shape.batch: differs from params"),
    (0, ("tolerance",), {"float32": {"rel": -1}}, "0.tolerance.float32.rel: expected a number in (0,"),
    (0, ("params",), [], "0.params: expected a mapping, got list []"),
    (0, ("name",), "x", "0.name: unknown key"),
    (0, ("baseline",), KeyError, "0: missing key 'baseline'"),
    (0, ("case_id",), 7, "0.case_id: expected a non-empty string, got int 7"),
])
def test_bad_cases_read_back_are_refused_in_one_line(write_sweep, index, path, value, match):
    cases = _cases(write_sweep)
    _set(cases[index], path, cases[0]["case_id"] if value == "<first>" else value)
    with pytest.raises(SweepError) as info:
        sweep.validate_cases(cases, "run/cases.json")
    text = str(info.value)
    assert text.startswith("run/cases.json: ") and match in text and "\n" not in text, text


@pytest.mark.parametrize("cases,match", [
    ({"a": 1}, "expected a list, got dict"), ([1], "0: expected a mapping, got int 1"),
    ([{}] * 100_001, "more than 100,000 cases")])
def test_a_cases_file_that_is_not_a_list_of_cases_is_refused(cases, match):
    with pytest.raises(SweepError, match=match):
        sweep.validate_cases(cases, "cases.json")


# ---- one line, whatever the input holds ----------------------------------------------------------

def test_messages_escape_what_would_break_the_line(write_sweep):
    text = refused(write_sweep(BASE + '"a\\nb\\x1b[2J": 1\n'), "unknown key")
    assert "a\\nb\\x1b[2J: unknown key" in text
    assert str(SweepError("a\nb\x00c")) == "a\\nb\\x00c"


def test_the_sweep_hash_is_of_the_file(write_sweep):
    """A constraint's text once took the file text's variable: the hash was of the last constraint."""
    path = write_sweep(BASE + "constraints: ['batch < 2']\n")
    assert sweep.load(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
