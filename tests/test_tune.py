"""bench.tune: winners from a finished run (fixture records), the harness run through to a tuned
file, the file merged and read back by the kernels, and bad input as one line and exit status 2."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from bench import tune as tune_cli
from bench.measure import env
from bench.present import tuned as tuned_view
from bench.results import store
from bench.results import tune
from kernels import fmha, tuned

H100 = "NVIDIA H100 80GB HBM3"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rmsnorm" / "rmsnorm_bench"
DEFAULT = {"tile_m": 64, "tile_n": 64, "k_lat": 2, "v_lat": 5, "occupancy": 3, "num_ctas": 1}
WIDE = {**DEFAULT, "tile_m": 128, "tile_n": 128, "occupancy": 1}
TALL = {**DEFAULT, "tile_n": 128, "occupancy": 2}
QUICK = {**DEFAULT, "occupancy": 4}
FAST = {**DEFAULT, "tile_m": 128, "occupancy": 2}


def fmha_rec(config, batch, seq_len, ms, status="ok", mode="fwd", provider="cutile", d=64):
    shape = dict(batch=batch, heads=12, seq_len=seq_len, head_dim=d, dtype="float16", causal=True,
                 mode=mode)
    return {"case_id": json.dumps([provider, shape, config], sort_keys=True), "workload": "fmha",
            "provider": provider, "baseline": "native", "params": {**shape, **config}, "shape": shape,
            "device": "cuda:0", "status": status, "samples_ms": [ms, ms * 1.01, ms * 0.99]}


def ln_rec(config, ms, status="ok", mode="fwd"):
    shape = dict(rows=8192, hidden=768, dtype="float16", mode=mode)
    return {"case_id": json.dumps([shape, config], sort_keys=True), "workload": "layernorm",
            "provider": "cutile", "baseline": "torch", "params": {**shape, **config}, "shape": shape,
            "device": "cuda:0", "status": status, "samples_ms": [ms] * 3}


RECORDS = [
    # bucket 1024: T=1000 and T=1024; WIDE wins on both, QUICK (fastest at 1000) lacks T=1024
    fmha_rec(DEFAULT, 8, 1000, 1.0), fmha_rec(DEFAULT, 8, 1024, 1.0),
    fmha_rec(WIDE, 8, 1000, 0.8), fmha_rec(WIDE, 8, 1024, 0.9),
    fmha_rec(QUICK, 8, 1000, 0.5),
    fmha_rec(TALL, 8, 1000, 0.1, status="incorrect"), fmha_rec(TALL, 8, 1024, 0.1),
    # bucket 4096: WIDE is fastest but incorrect; FAST is faster still, but its backward, reading
    # the lse it saved, is incorrect; TALL wins, and the time of its fwd_bwd case does not count
    fmha_rec(DEFAULT, 4, 4096, 4.0), fmha_rec(WIDE, 4, 4096, 1.0, status="incorrect"),
    fmha_rec(TALL, 4, 4096, 3.0), fmha_rec(TALL, 4, 4096, 50.0, mode="fwd_bwd"),
    fmha_rec(FAST, 4, 4096, 0.5), fmha_rec(FAST, 4, 4096, 9.0, status="incorrect", mode="fwd_bwd"),
    # nothing timed from: a fwd_bwd case alone, other providers, a case that named no config
    fmha_rec(QUICK, 4, 4096, 0.01, mode="fwd_bwd"), fmha_rec({}, 4, 4096, 0.01),
    fmha_rec({}, 4, 4096, 0.01, provider="native"),
    # D=128: no config passed
    fmha_rec(WIDE, 4, 4096, 1.0, status="incorrect", d=128),
    # layernorm: the persistent grid only, and no config whose statistics fail the backward
    ln_rec({"persistent": True, "rows_per_block": 8, "chunk": 256}, 0.2),
    ln_rec({"persistent": True, "rows_per_block": 4, "chunk": 256}, 0.1),
    ln_rec({"persistent": False, "rows_per_block": 2, "chunk": 256}, 0.05),
    ln_rec({"persistent": True, "rows_per_block": 16, "chunk": 256}, 0.05),
    ln_rec({"persistent": True, "rows_per_block": 16, "chunk": 256}, 0.3, "incorrect", "fwd_bwd"),
    # layernorm's backward, timed in fwd_bwd cases: 8 rows a block wins over the default; 4 rows is
    # faster but wrong; a case naming a forward config too tunes neither kernel
    ln_rec({"persistent": True, "bwd_rows_per_block": None, "bwd_blocks_per_sm": 2}, 0.4, mode="fwd_bwd"),
    ln_rec({"persistent": True, "bwd_rows_per_block": 8, "bwd_blocks_per_sm": 1}, 0.3, mode="fwd_bwd"),
    ln_rec({"persistent": True, "bwd_rows_per_block": 4, "bwd_blocks_per_sm": 1}, 0.1, "incorrect", "fwd_bwd"),
    ln_rec({"persistent": True, "bwd_rows_per_block": 2, "rows_per_block": 2}, 0.01, mode="fwd_bwd"),
]


def test_a_config_that_ties_the_default_does_not_replace_it():
    """Two configs as fast as the default, measured before and after it: the default wins."""
    recs = [ln_rec({"persistent": True, "bwd_blocks_per_sm": k}, 0.3, mode="fwd_bwd") for k in (1, 2, 3)]
    (group,) = tune.groups(recs)
    entry = tune.winner(group, "run")
    assert tuned.validator("layernorm_bwd")(entry["config"]) == tuned.validator("layernorm_bwd")({})
    assert entry["speedup_vs_default"] == 1.0 and entry["configs_compared"] == 3


@pytest.fixture
def fixture_run(tmp_path):
    """A finished run on an H100 holding RECORDS."""
    meta = {"run_id": "fixture", "env": {"gpus": [{"index": 0, "name": H100}]}, "complete": True}
    w = store.RunWriter(tmp_path / "run", meta, [])
    for r in RECORDS:
        w.append(r)
    w.close(complete=True)
    return w.path


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    d = tmp_path / "tuned"
    monkeypatch.setattr(tuned, "DIR", d)
    monkeypatch.setattr(tuned, "_gpu_name", lambda index: H100)
    tuned.clear()
    yield d
    tuned.clear()


def entries_by_key(path):
    return {(e["kernel"], e["dtype"], e["dim"], e["bucket"]): e for e in json.loads(path.read_text())["configs"]}


def test_winners_pass_the_gate_at_every_shape_of_their_bucket(fixture_run, tuned_dir, capsys):
    assert tune_cli.main(["--from-run", str(fixture_run), "--tuned-dir", str(tuned_dir)]) == 0
    path = tuned_dir / "nvidia-h100-80gb-hbm3.json"
    got = entries_by_key(path)
    assert json.loads(path.read_text())["gpu"] == H100
    assert set(got) == {("fmha_fwd", "float16", 64, 1024), ("fmha_fwd", "float16", 64, 4096),
                        ("layernorm_fwd", "float16", 768, 8192), ("layernorm_bwd", "float16", 768, 8192)}
    bwd = got[("layernorm_bwd", "float16", 768, 8192)]
    assert bwd["config"] == {"rows_per_block": 8, "blocks_per_sm": 1} and bwd["configs_compared"] == 2
    assert bwd["speedup_vs_default"] == pytest.approx(0.4 / 0.3)
    small, large = got[("fmha_fwd", "float16", 64, 1024)], got[("fmha_fwd", "float16", 64, 4096)]
    assert small["config"] == WIDE and small["shapes"] == 2 and small["configs_compared"] == 2
    assert small["speedup_vs_default"] == pytest.approx((1 / 0.8 * 1 / 0.9) ** 0.5)
    assert large["config"] == TALL and large["speedup_vs_default"] == pytest.approx(4 / 3)
    assert got[("layernorm_fwd", "float16", 768, 8192)]["config"] == {"rows_per_block": 4, "chunk": 256}
    out = capsys.readouterr().out
    assert "fmha_fwd float16 dim=128 size<=4096: no config passed" in out
    assert "tile_m=128, tile_n=128, occupancy=1 (default tile_m=64, tile_n=64, occupancy=3)" in out
    # what the kernels now use when given no config
    q = torch.empty(1, 1, 900, 64, dtype=torch.float16)
    assert fmha.tuned_config(q, causal=True) == fmha.validate_config(WIDE)
    assert fmha.tuned_config(torch.empty(1, 1, 4000, 64, dtype=torch.float16), True) \
        == fmha.validate_config(TALL)
    assert fmha.tuned_config(torch.empty(1, 1, 900, 64, dtype=torch.bfloat16), True) == fmha.DEFAULT_CONFIG


def test_tuning_again_replaces_its_keys_and_keeps_the_others(fixture_run, tuned_dir, tmp_path):
    path = tuned_dir / "nvidia-h100-80gb-hbm3.json"
    tuned_dir.mkdir()
    kept = {"kernel": "fmha_fwd", "dtype": "bfloat16", "dim": 64, "bucket": 256, "config": QUICK}
    old = {"kernel": "fmha_fwd", "dtype": "float16", "dim": 64, "bucket": 4096, "config": WIDE}
    path.write_text(json.dumps({"gpu": H100, "configs": [kept, old]}))
    tune.tune_run(fixture_run, tuned_dir)
    got = entries_by_key(path)
    assert got[("fmha_fwd", "bfloat16", 64, 256)] == kept
    assert got[("fmha_fwd", "float16", 64, 4096)]["config"] == TALL
    assert len(got) == 5


def test_bad_input_is_one_line_and_exit_2(fixture_run, tuned_dir, tmp_path, capsys):
    cpu_run = tmp_path / "cpu"
    store.RunWriter(cpu_run, {"run_id": "cpu", "env": {"gpus": []}}, []).close(complete=True)
    tuned_dir.mkdir()
    broken = tuned_dir / "nvidia-h100-80gb-hbm3.json"
    broken.write_text("{oops")
    for args, says in [(["--from-run", str(tmp_path / "nowhere")], "no such run directory"),
                       (["--from-run", str(cpu_run)], "tuned configs are per GPU, and this run has no GPU"),
                       (["--from-run", str(fixture_run)], "fix or remove it"),
                       ([], "name a sweep file")]:
        assert tune_cli.main([*args, "--tuned-dir", str(tuned_dir)]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert broken.read_text() == "{oops"


TUNE_SWEEP = """\
workload: layernorm
baseline: torch
providers:
  - torch
  - name: cutile
    module: "delay_provider:tiled"
    axes: {rows_per_block: [1, 2, 4]}
axes: {rows: [16, 32], hidden: [64], dtype: [float32], mode: [fwd]}
timing: {warmup_ms: 1, min_reps: 5, max_reps: 10, max_time_s: 0.1, target_ci: 0.5, timeout_s: 60}
"""


def test_without_a_gpu_tuning_a_sweep_refuses_at_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tune_cli, "gpu_count", lambda: 0)
    assert tune_cli.main(["sweeps/fmha.yaml", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA GPU" in err and "--from-run" in err
    assert list(tmp_path.iterdir()) == [], "nothing run, nothing written"


@pytest.mark.cpu
def test_a_sweep_runs_through_the_harness_into_the_tuned_file(write_sweep, tuned_dir, tmp_path,
                                                              monkeypatch, capsys):
    """rows_per_block 1 is the fastest everywhere, but wrong at 16 rows: 2 wins there, 1 at 32."""
    fingerprint = env.fingerprint
    monkeypatch.setattr(env, "fingerprint", lambda gpus: {**fingerprint(gpus), "gpus": [{"name": H100, "index": 0}]})
    monkeypatch.setattr(tune_cli, "gpu_count", lambda: 1)  # the cases still run on the CPU
    sweep = write_sweep(TUNE_SWEEP)
    code = tune_cli.main([str(sweep), "--out", str(tmp_path / "results"), "--tuned-dir", str(tuned_dir)])
    assert code == 0
    run = store.load_run(tmp_path / "results" / "latest")
    assert run.meta["command"][:2] == ["-m", "bench.tune"]
    status = {(r["params"]["rows"], r["params"].get("rows_per_block")): r["status"] for r in run.records}
    assert status[(16, 1)] == "incorrect" and status[(32, 1)] == status[(16, 2)] == "ok"
    got = entries_by_key(tuned_dir / "nvidia-h100-80gb-hbm3.json")
    assert got[("layernorm_fwd", "float32", 64, 16)]["config"] == {"rows_per_block": 2}
    assert got[("layernorm_fwd", "float32", 64, 32)]["config"] == {"rows_per_block": 1}
    assert str(tuned_dir / "nvidia-h100-80gb-hbm3.json") in capsys.readouterr().out


def test_the_report_shows_the_tuned_config_beside_the_default(fixture_run, tuned_dir):
    tune.tune_run(fixture_run, tuned_dir)
    block = tuned_view.section({"env": {"gpus": [{"name": H100}]}}, tuned_dir)
    assert block["file"] == "kernels/tuned/nvidia-h100-80gb-hbm3.json" and not block["error"]
    rows = {(r[0][0], r[2][0], r[3][0]): [c[0] for c in r[4:7]] for r in block["table"]["rows"]}
    assert rows[("fmha_fwd", "64", "<=4096")] == ["tile_n=128, occupancy=2", "tile_n=64, occupancy=3",
                                                  "1.333x"]
    assert block["used"] == "The run did not record which tuned file it used."
    gpus = [{"name": H100}]
    now = tuned.fingerprint(H100, tuned_dir)
    assert now["file"] == "nvidia-h100-80gb-hbm3.json" and len(now["sha256"]) == 64
    for recorded, says in [(now, "as it is now"), (None, "ran the defaults"),
                           ({**now, "sha256": "0" * 64}, "changed since the run")]:
        assert says in tuned_view.section({"env": {"gpus": gpus, "tuned": recorded}}, tuned_dir)["used"]
    assert tuned_view.section({"env": {"gpus": [{"name": "NVIDIA H200"}]}}, tuned_dir) is None
    assert tuned_view.section({"env": {"gpus": []}}, tuned_dir) is None
    (tuned_dir / "nvidia-h100-80gb-hbm3.json").write_text("[]")
    assert "expected an object" in tuned_view.section({"env": {"gpus": [{"name": H100}]}}, tuned_dir)["error"]


def test_the_html_report_carries_the_tuned_table(fixture_run, tuned_dir, tmp_path):
    from bench.present import report

    tune.tune_run(fixture_run, tuned_dir)
    fixture = store.load_run(Path(__file__).resolve().parent.parent / "results/fixtures/h100_synthetic")
    html, _ = report.render(fixture, tmp_path / "report.html")
    text = html.read_text()
    assert 'id="tuned-table"' in text and "tile_n=128, occupancy=2" in text and "1.333x" in text


@pytest.mark.parametrize("path, profile, kernels", [
    ("sweeps/fmha.yaml", None, {"fmha_fwd"}), ("sweeps/layernorm_tune.yaml", None, {"layernorm_fwd"}),
    ("sweeps/layernorm_tune.yaml", "narrow", {"layernorm_fwd"}),
    ("sweeps/layernorm_tune.yaml", "backward", {"layernorm_bwd"})])
def test_tuning_sweeps_measure_the_defaults_at_every_shape(path, profile, kernels):
    """A winner's speedup over the defaults is only known when the defaults ran beside it, and a
    sweep that tunes the backward times it where it runs (fwd_bwd cases)."""
    from bench import workloads
    from bench.measure import sweep

    root = Path(__file__).resolve().parents[1]
    shapes, with_default, timed = set(), set(), set()
    for case in sweep.load(root / path, profile).cases:
        found = workloads.get(case.workload).tuned_key(case.params) if case.provider == "cutile" else None
        if not found or not found[3]:
            continue
        kernel, shape = found[0], json.dumps([found[0], case.shape], sort_keys=True)
        shapes.add(shape)
        timed.add((kernel, found[4]))
        check = tuned.validator(kernel)
        if check(found[3]) == check({}):
            with_default.add(shape)
    assert shapes and shapes == with_default
    assert {k for k, is_timed in timed if is_timed} == kernels


def test_a_workload_of_another_package_is_tuned_into_its_own_folder(tmp_path, tuned_dir, monkeypatch):
    """The example package's RMSNorm: its winners go to its tuned folder, and its kernel reads them."""
    import importlib.util

    from bench import workloads

    def load(name, file):  # this checkout's example, whatever copy of it is installed
        spec = importlib.util.spec_from_file_location(name, EXAMPLE / file)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module
    kernel = load("example_rmsnorm_kernel", "kernel.py")
    load("example_rmsnorm_workload", "workload.py")
    spec = "example_rmsnorm_workload:WORKLOAD"
    own = tmp_path / "rmsnorm_tuned"
    monkeypatch.setitem(workloads._loaded, spec, dataclasses.replace(workloads.get(spec), tuned_dir=own))
    monkeypatch.setattr(kernel, "TUNED", own)

    def rec(block_m, ms, rows=4000, status="ok", provider="cutile"):
        shape = dict(rows=rows, hidden=1000, dtype="float16")
        config = {} if block_m is None else {"block_m": block_m}
        return {"case_id": json.dumps([provider, shape, config]), "workload": spec, "provider": provider,
                "baseline": "torch", "params": {**shape, **config}, "shape": shape, "device": "cuda:0",
                "status": status, "samples_ms": [ms] * 3}
    meta = {"run_id": "rms", "env": {"gpus": [{"index": 0, "name": H100}]}, "complete": True}
    w = store.RunWriter(tmp_path / "run", meta, [])
    for r in [rec(1, 0.30), rec(4, 0.10), rec(8, 0.05, status="incorrect"), rec(2, 0.20),
              rec(None, 0.01), rec(None, 0.01, provider="torch")]:
        w.append(r)
    w.close(complete=True)
    written, entries, _ = tune.tune_run(w.path)
    assert written == [own / "nvidia-h100-80gb-hbm3.json"]
    assert [(e["kernel"], e["config"]) for e in entries] == [("rmsnorm_fwd", {"block_m": 4})]
    assert not (tuned_dir / "nvidia-h100-80gb-hbm3.json").exists()  # the built-in kernels' file
    x = torch.empty(3000, 1000, dtype=torch.float16)  # same bucket (4096 rows), same row length
    assert kernel.tuned_block_m(x) == 4
    assert kernel.tuned_block_m(torch.empty(3000, 1000, dtype=torch.bfloat16)) is None
