"""Tuned-config lookup (kernels/tuned.py): keys, buckets, fallback, another GPU's file, a broken
file. CPU only: the GPU's name is patched in, the files are temporary."""
import functools
import json
import logging
import timeit
import types
from pathlib import Path

import pytest
import torch

from bench.measure.check import errors, passes, tolerance_for
from kernels import fmha, layernorm, tuned

H100 = "NVIDIA H100 80GB HBM3"
WIDE = {"tile_m": 128, "tile_n": 128, "occupancy": 1}


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A temporary tuned directory and a GPU called H100; returns a writer of tuned files."""
    monkeypatch.setattr(tuned, "DIR", tmp_path)
    monkeypatch.setattr(tuned, "_gpu_name", lambda index: H100)
    tuned.clear()

    def write(configs, gpu_name=H100, text=None):
        path = tuned.path_for(gpu_name, tmp_path)
        path.write_text(text if text is not None else json.dumps({"gpu": gpu_name, "configs": configs}))
        tuned.clear()
        return path
    yield write
    tuned.clear()


def entry(kernel="fmha_fwd", dtype="float16", dim=64, bucket=4096, config=WIDE):
    return {"kernel": kernel, "dtype": dtype, "dim": dim, "bucket": bucket, "config": config}


def q_of(t, d=64, dtype=torch.float16):
    return torch.empty(1, 2, t, d, dtype=dtype)


def test_slug_and_bucket():
    assert tuned.slug(H100) == "nvidia-h100-80gb-hbm3"
    assert tuned.slug("NVIDIA H200 (MIG 1g.18gb)") == "nvidia-h200-mig-1g-18gb"
    assert [tuned.bucket(n) for n in (1, 2, 3, 13, 1000, 1024, 1025, 16384)] == \
        [1, 2, 4, 16, 1024, 1024, 2048, 16384]


def test_nearest_bucket_is_closest_in_log2_and_the_smaller_on_a_tie():
    assert tuned.nearest([1024, 4096], 2048) == 1024
    assert tuned.nearest([1024, 4096], 8192) == 4096
    assert tuned.nearest([1024, 16384], 65536) == 16384
    assert tuned.nearest([1024, 16384], 16) == 1024


def test_no_file_gives_the_defaults(gpu, caplog):
    with caplog.at_level(logging.WARNING):
        assert fmha.tuned_config(q_of(4096), causal=True) == fmha.DEFAULT_CONFIG
        assert layernorm.tuned_config(torch.empty(8192, 768)) == layernorm.FWD_CONFIG
    assert not caplog.records  # nothing tuned anywhere is nothing to say


def test_keys_pick_kernel_dtype_dim_and_bucket(gpu):
    ln = {"rows_per_block": 4, "chunk": 256}
    gpu([entry(), entry(dim=128, config={"tile_m": 64, "tile_n": 128}),
         entry(dtype="bfloat16", config={"occupancy": 4}),
         entry(kernel="fmha_fwd_full", config={"num_ctas": 2}),
         entry(kernel="layernorm_fwd", dim=768, bucket=8192, config=ln)])
    assert fmha.tuned_config(q_of(4000), True) == {**fmha.DEFAULT_CONFIG, **WIDE}
    assert fmha.tuned_config(q_of(4096, d=128), True)["tile_n"] == 128
    assert fmha.tuned_config(q_of(4096, dtype=torch.bfloat16), True)["occupancy"] == 4
    assert fmha.tuned_config(q_of(4096), False)["num_ctas"] == 2
    assert fmha.tuned_config(q_of(4096, d=32), True) == fmha.DEFAULT_CONFIG  # no D=32 entry
    assert layernorm.tuned_config(torch.empty(2, 4096, 768, dtype=torch.float16)) == {**layernorm.FWD_CONFIG, **ln}
    assert layernorm.tuned_config(torch.empty(8192, 1024, dtype=torch.float16)) == layernorm.FWD_CONFIG


def launches_of_the_backward(monkeypatch, x, **config):
    """(grid, occupancy hint, rows a tile) of the LayerNorm backward's row kernel for x, its
    launch recorded instead of run (no GPU here)."""
    calls = []
    monkeypatch.setattr(layernorm.kernels, "require", lambda: None)
    monkeypatch.setattr(layernorm, "sm_count", lambda device: 132)
    monkeypatch.setattr(layernorm, "grid_size", lambda tiles, per_sm, device: min(tiles, per_sm * 132))
    monkeypatch.setattr(layernorm, "_hinted", lambda kernel, occupancy, warps=None: (kernel, occupancy))
    monkeypatch.setattr(layernorm, "_bwd_kernel", "bwd", raising=False)
    monkeypatch.setattr(layernorm, "_colsum_kernel", "colsum", raising=False)
    monkeypatch.setattr(layernorm, "launch", lambda device, grid, kernel, args, dependent=False:
                        calls.append((grid, kernel, args)))
    stats = torch.zeros(x.shape[0])
    layernorm.layer_norm_backward(torch.ones_like(x), x, None, stats, stats, **config)
    (grid, (name, occupancy), args), _ = calls
    assert name == "bwd"
    return grid, occupancy, args[9]  # args: 9 tensors, then BLOCK_M


def test_the_backward_takes_its_tuned_config_unless_given_one(gpu, monkeypatch):
    """A layernorm_bwd entry sets the backward's rows a tile and grid for its dtype, width and
    rows; the forward's config and the other shapes keep theirs."""
    bwd = {"rows_per_block": 8, "blocks_per_sm": 1}
    gpu([entry(kernel="layernorm_bwd", dim=13, bucket=8192, config=bwd)])
    x = torch.empty(8192, 13, dtype=torch.float16)
    assert layernorm.tuned_config(x, "layernorm_bwd") == {**layernorm.BWD_CONFIG, **bwd}
    assert layernorm.tuned_config(x) == layernorm.FWD_CONFIG
    assert launches_of_the_backward(monkeypatch, x) == ((132,), 1, 8)  # 1024 tiles, 1 block an SM
    # the defaults: 64 rows a tile (128 tiles), 2 blocks an SM
    assert launches_of_the_backward(monkeypatch, x.float()) == ((128,), 2, 64)  # no fp32 entry
    assert launches_of_the_backward(monkeypatch, torch.empty(8192, 64, dtype=torch.float16)) == ((128,), 2, 64)
    assert launches_of_the_backward(monkeypatch, x, rows_per_block=32) == ((256,), 2, 32)  # given: as given


def test_a_size_between_buckets_takes_the_nearest_tuned_one(gpu):
    gpu([entry(bucket=1024, config={"tile_m": 64, "occupancy": 2}), entry(bucket=16384)])
    assert fmha.tuned_config(q_of(13), True)["occupancy"] == 2
    assert fmha.tuned_config(q_of(2047), True)["occupancy"] == 2
    assert fmha.tuned_config(q_of(8192), True)["tile_m"] == 128
    assert fmha.tuned_config(q_of(65536), True)["tile_m"] == 128


def test_another_gpus_file_is_ignored_with_one_line(gpu, caplog):
    gpu([entry()], gpu_name="NVIDIA H200")
    with caplog.at_level(logging.WARNING):
        for t in (128, 4096, 16384):
            assert fmha.tuned_config(q_of(t), True) == fmha.DEFAULT_CONFIG
        layernorm.tuned_config(torch.empty(8192, 768, dtype=torch.float16))
    assert len(caplog.records) == 1, caplog.text
    msg = caplog.records[0].getMessage()
    assert "nvidia-h200" in msg and H100 in msg and "\n" not in msg


def test_a_file_named_for_this_gpu_but_tuned_on_another_is_ignored(gpu, caplog):
    path = gpu([entry()])
    path.write_text(json.dumps({"gpu": "NVIDIA H200", "configs": [entry()]}))
    with caplog.at_level(logging.WARNING):
        assert fmha.tuned_config(q_of(4096), True) == fmha.DEFAULT_CONFIG
    assert len(caplog.records) == 1 and "tuned on NVIDIA H200" in caplog.text


@pytest.mark.parametrize("text, says", [
    ("{not json", "not readable as JSON"),
    (json.dumps({"gpu": H100}), "'configs'"),
    (json.dumps({"gpu": H100, "configs": [{"kernel": "gemm", "dtype": "float16", "dim": 64,
                                           "bucket": 64, "config": {"tile": [64, 64]}}]}),
     "a config is a flat mapping"),  # another package's kernel: only a flat config is checked
    (json.dumps({"gpu": H100, "configs": [{"kernel": 7, "dtype": "float16", "dim": 64,
                                           "bucket": 64, "config": {}}]}), "configs[0] needs kernel"),
    (json.dumps({"gpu": H100, "configs": [entry(config={"tile_m": 96})]}), "tile_m=96"),
    (json.dumps({"gpu": H100, "configs": [entry(config={"tiles": 2})]}), "unknown fmha config"),
])
def test_a_malformed_file_is_one_line_and_the_defaults(gpu, caplog, text, says):
    gpu([], text=text)
    with caplog.at_level(logging.WARNING):
        assert fmha.tuned_config(q_of(4096), True) == fmha.DEFAULT_CONFIG
        assert fmha.tuned_config(q_of(64), True) == fmha.DEFAULT_CONFIG
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert says in msg and "\n" not in msg, msg


def test_a_given_config_is_checked_before_anything_else(gpu):
    """A caller's config is the caller's: validated at once (here: before the GPU check fails),
    whatever is tuned."""
    gpu([entry()])
    q = q_of(4096)
    with pytest.raises(ValueError, match="tile_m=96"):
        fmha.flash_attention(q, q, q, tile_m=96)
    with pytest.raises(ValueError, match="rows_per_block=3"):
        layernorm.layer_norm_forward(torch.empty(8, 768), None, None, rows_per_block=3)


def test_after_the_first_call_a_lookup_reads_and_checks_nothing(gpu, monkeypatch):
    """The wrappers call it on every launch: after the first call per size it is a cache hit."""
    gpu([entry()])
    calls = []
    check = tuned.KERNELS["fmha_fwd"]
    monkeypatch.setitem(tuned.KERNELS, "fmha_fwd", lambda c: calls.append(c) or check(c))
    monkeypatch.setattr(tuned, "read", lambda path, read=tuned.read: calls.append(path) or read(path))
    q = q_of(4096)
    fmha.tuned_config(q, True)
    first = len(calls)
    assert first >= 2  # the file read, its entry checked
    for _ in range(100):
        fmha.tuned_config(q, True)
    assert len(calls) == first
    n = 20000
    best = min(timeit.repeat(lambda: fmha.tuned_config(q, True), number=n, repeat=5)) / n
    # about 1 us here with the tensor's attribute reads; reading the file each call costs 100x more
    assert best < 10e-6, f"{best * 1e9:.0f} ns per lookup"

SYNTHETIC = {"gpu": H100, "configs": [  # non-default configs of both kernels, two buckets sharing one
    entry(kernel="fmha_fwd", dtype="bfloat16", dim=128, bucket=4096, config={"tile_m": 128, "occupancy": 2}),
    entry(kernel="fmha_fwd", dtype="bfloat16", dim=128, bucket=16384, config={"tile_m": 128, "occupancy": 2}),
    entry(kernel="layernorm_fwd", dim=768, bucket=8192, config={"rows_per_block": 8, "chunk": 256, "latency": 10}),
    entry(kernel="layernorm_bwd", dim=13, bucket=8192, config={"rows_per_block": 8, "blocks_per_sm": 1}),
]}


def export_tuned(path, out_dir, gpu_code: str = "sm_90") -> list[str]:
    """Compile every config of a tuned file ahead of time (no GPU needed): the layernorm forward
    and backward, the fmha forward, and the backward kernels of each dtype and head dim it names, each distinct
    kernel and signature once. The cubin paths, one folder per compile."""
    jobs = {}
    for e in tuned.read(path)["configs"]:
        dtype, dim, cfg = getattr(torch, e["dtype"]), e["dim"], tuned.validator(e["kernel"])(e["config"])
        if e["kernel"].startswith("layernorm_"):
            jobs[(e["kernel"], dtype, dim, json.dumps(cfg, sort_keys=True))] = \
                functools.partial(layernorm.export_config, e["kernel"], e["config"], dtype, dim)
            continue
        causal = e["kernel"] == "fmha_fwd"
        export = functools.partial(fmha.export_for_check, cfg, dtype, dim, causal)
        # head_group shapes only the grid and fused_dq only the backward, which takes nothing
        # else from the config
        kernel_cfg = {k: v for k, v in cfg.items() if k not in ("head_group", "fused_dq")}
        jobs[("fwd", dtype, dim, causal, json.dumps(kernel_cfg, sort_keys=True))] = \
            functools.partial(export, only=("fwd",))
        jobs[("bwd", dtype, dim, causal, cfg["fused_dq"])] = \
            functools.partial(export, only=("delta", "dkdv", "dq", "dq_scale"))
    paths = []
    for i, job in enumerate(jobs.values()):
        out = Path(out_dir) / str(i)
        out.mkdir(parents=True, exist_ok=True)
        paths += job(out_dir=str(out), gpu_code=gpu_code)
    return paths


@pytest.mark.parametrize("name", ["synthetic"] + sorted(p.name for p in tuned.DIR.glob("*.json")))
def test_every_tuned_config_compiles_for_sm90(name, exported_cubins, tmp_path):
    """Every file in kernels/tuned, and a synthetic one so that the check never passes vacuously."""
    path = tuned.DIR / name
    if name == "synthetic":
        path = tmp_path / "synthetic.json"
        path.write_text(json.dumps(SYNTHETIC))
    names = exported_cubins(types.SimpleNamespace(export_for_check=lambda out: export_tuned(path, out)))
    if name == "synthetic":  # the fmha forward and its backward once, though two buckets name it
        assert sorted(n.split("_")[1] for n in names) == ["bwd", "dkdv", "dq", "fwd", "fwd"], names


def _this_gpus_entries():
    import kernels

    ok, reason = kernels.available()
    if not ok:
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    path = tuned.path_for(torch.cuda.get_device_name(0))
    if not path.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no tuned file for this GPU ({path.name})"))]
    return [pytest.param(e, id=f"{e['kernel']}-{e['dtype']}-{e['dim']}-{e['bucket']}")
            for e in tuned.read(path)["configs"]]


@pytest.mark.gpu
@pytest.mark.parametrize("e", _this_gpus_entries())
def test_every_tuned_config_of_this_gpu_matches_the_reference(e, poisoned):
    """Given no config, the kernels take the tuned one at a size inside its bucket, and it is correct."""
    from test_fmha_kernel import _check_forward, _qkv
    from test_layernorm_kernel import check_statistics, make

    tuned.clear()
    size, dtype = e["bucket"] // 2 + 1, getattr(torch, e["dtype"])
    if e["kernel"] == "layernorm_fwd":
        # the bucket's most rows: the most row tiles each persistent block loops over
        x, w, b = make((e["bucket"], e["dim"]), dtype, "cuda")
        assert layernorm.tuned_config(x) == layernorm.validate_fwd_config(e["config"])
        for _ in range(20):  # the statistics the backward reads, on every call
            y, mean, rstd = layernorm.layer_norm_forward(x, w, b, persistent=True)
            check_statistics(x, mean, rstd)
        ref = torch.nn.functional.layer_norm(x.double(), (e["dim"],), w.double(), b.double())
        assert passes(errors(y, ref), tolerance_for(e["dtype"]))
        return
    if e["kernel"] == "layernorm_bwd":  # the bucket's most rows, through autograd as a model calls it
        x, w, b = make((e["bucket"], e["dim"]), dtype, "cuda")
        assert layernorm.tuned_config(x, "layernorm_bwd") == layernorm.validate_bwd_config(e["config"])
        dy = torch.randn(x.shape, device="cuda").to(dtype)
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        layernorm.layer_norm(*leaves).backward(dy)
        want = [t.detach().double().requires_grad_() for t in (x, w, b)]
        torch.nn.functional.layer_norm(want[0], (e["dim"],), want[1], want[2]).backward(dy.double())
        for got, ref in zip(leaves, want):
            assert errors(got.grad, ref.grad)["rel"] < 2e-2
        return
    q, k, v = _qkv(1, 2, size, e["dim"], dtype)
    causal = e["kernel"] == "fmha_fwd"
    assert fmha.tuned_config(q, causal) == fmha.validate_config(e["config"])
    _check_forward(q, k, v, causal)
