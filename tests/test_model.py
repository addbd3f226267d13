"""The GPT itself: presets, initialisation, GELU, backends, and nanoGPT / Hugging Face weights."""
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from model.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    return GPTConfig.preset("tiny", **kw)


def count(name):
    with torch.device("meta"):
        return GPT(GPTConfig.preset(name)).get_num_params()


def test_presets_give_nanogpts_parameter_counts():
    assert round(count("gpt2") / 1e6, 2) == 123.69  # nanoGPT's train.py: vocab 50304, biases on
    assert round(count("shakespeare-char") / 1e6, 2) == 10.65
    assert count("gpt2") < count("gpt2-medium") < count("gpt2-large") < count("gpt2-xl")
    with pytest.raises(ValueError, match="unknown model preset"):
        GPTConfig.preset("gpt3")


def test_weights_are_tied_and_position_embeddings_are_left_out_of_the_count():
    m = GPT(tiny())
    assert m.transformer.wte.weight is m.lm_head.weight
    total = sum(p.numel() for p in m.parameters())
    assert m.get_num_params(non_embedding=False) == total
    assert m.get_num_params() == total - m.config.block_size * m.config.n_embd


def test_init_std_per_layer():
    torch.manual_seed(0)
    c = GPTConfig(block_size=32, vocab_size=256, n_layer=4, n_head=4, n_embd=256)
    sd = GPT(c).state_dict()
    resid = 0.02 / math.sqrt(2 * c.n_layer)
    for i in range(c.n_layer):
        for name, std in [("attn.c_attn.weight", 0.02), ("mlp.c_fc.weight", 0.02),
                          ("attn.c_proj.weight", resid), ("mlp.c_proj.weight", resid)]:
            w = sd[f"transformer.h.{i}.{name}"]
            assert abs(w.std().item() / std - 1) < 0.05, name
            assert abs(w.mean().item()) < std / 20
        assert torch.all(sd[f"transformer.h.{i}.attn.c_attn.bias"] == 0)
        assert torch.all(sd[f"transformer.h.{i}.ln_1.weight"] == 1)
    assert abs(sd["transformer.wpe.weight"].std().item() / 0.02 - 1) < 0.05


def test_gelu_is_the_erf_form_and_tanh_is_an_option():
    x = torch.randn(3, 7, 64)
    for approximate in ("none", "tanh"):
        mlp = GPT(tiny(gelu=approximate)).transformer.h[0].mlp
        h = mlp.c_fc(x)
        exact = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        tanh = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        torch.testing.assert_close(mlp(x), mlp.c_proj(exact if approximate == "none" else tanh))
    with pytest.raises(ValueError, match="gelu"):
        GPT(tiny(gelu="relu"))


def test_forward_gives_logits_for_every_position_and_the_mean_loss():
    m = GPT(tiny())
    idx = torch.randint(65, (3, 13))
    targets = torch.randint(65, (3, 13))
    targets[0, :4] = -1
    logits, loss = m(idx, targets)
    assert logits.shape == (3, 13, 65)
    keep = targets.view(-1) >= 0
    expect = F.cross_entropy(logits.view(-1, 65)[keep], targets.view(-1)[keep])
    torch.testing.assert_close(loss, expect)
    assert m(idx)[1] is None
    # causal: the first 5 positions' logits ignore what comes after them
    logits5, _ = m(idx[:, :5])
    torch.testing.assert_close(logits5, logits[:, :5], atol=1e-5, rtol=1e-5)


def test_sequence_longer_than_block_size_is_a_clear_error():
    m = GPT(tiny())
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        m(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("t", [1, 13, 64])
def test_naive_and_sdpa_attention_agree(t):
    torch.manual_seed(0)
    a = GPT(tiny(), attention="naive").eval()
    b = GPT(tiny(), attention="sdpa").eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(65, (2, t))
    torch.testing.assert_close(a(idx)[0], b(idx)[0], atol=1e-5, rtol=1e-5)


def test_runs_under_bf16_autocast_close_to_float32():
    torch.manual_seed(0)
    m = GPT(tiny()).eval()
    idx = torch.randint(65, (2, 33))
    ref, _ = m(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = m(idx)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 2e-2


def test_bad_backend_attention_or_heads_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        GPT(tiny(), backend="triton")
    with pytest.raises(ValueError, match="attention"):
        GPT(tiny(), attention="flash")
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPT(tiny(n_head=3))


def test_the_block_fusion_needs_the_fusions_it_runs_in_one_node():
    with pytest.raises(ValueError, match="block.*add_ln"):
        GPT(tiny(), backend="cutile", fusions=("block", "attn_qkv", "linear"))


@pytest.mark.skipif(kernels.available()[0], reason="cuTile runs here, so there is no fallback to see")
def test_cutile_backend_falls_back_to_torch_with_one_warning_line(caplog):
    with caplog.at_level(logging.WARNING, logger="model.gpt"):
        m = GPT(tiny(), backend="cutile")
    assert (m.backend, m.attention) == ("torch", "sdpa")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and kernels.available()[1] in lines[0]
    assert m(torch.randint(65, (1, 5)))[0].shape == (1, 5, 65)


def test_a_cutile_model_for_the_cpu_falls_back_where_cutile_runs(monkeypatch, caplog):
    """On a machine where cuTile runs (made so here), a model built for the CPU takes the torch
    paths, saying why, instead of handing CPU tensors to cuTile; one built for a GPU keeps cuTile."""
    monkeypatch.setattr(kernels, "available", lambda: (True, "ok"))
    assert GPT(tiny(), backend="cutile", fusions=(), device="cuda:0").backend == "cutile"
    with caplog.at_level(logging.WARNING, logger="model.gpt"):
        m = GPT(tiny(), backend="cutile", fusions=(), device=torch.device("cpu"))
    assert (m.backend, m.attention) == ("torch", "sdpa")
    assert len(caplog.records) == 1 and "the work is on cpu" in caplog.records[0].getMessage()
    assert m(torch.randint(65, (1, 5)))[0].shape == (1, 5, 65)


@pytest.mark.skipif(not kernels.available()[0], reason=kernels.available()[1])
def test_cutile_backend_matches_torch_under_fp16_autocast():
    torch.manual_seed(0)
    config = GPTConfig.preset("shakespeare-char", dropout=0.0)
    a, b = GPT(config).cuda().eval(), GPT(config, backend="cutile").cuda().eval()
    assert b.backend == "cutile"
    b.load_state_dict(a.state_dict())
    idx = torch.randint(65, (2, 127), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        la, lb = a(idx)[0].float(), b(idx)[0].float()
    assert (la - lb).norm() / la.norm() < 1e-2


def test_a_cutile_models_forward_stays_eager_under_torch_compile():
    """torch.compile traces the torch model's forward, and not the cutile model's: its kernel
    launches would each break the graph, and autocast changes recompile them."""
    from torch._dynamo.testing import CompileCounter

    idx = torch.randint(0, tiny().vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    for backend, traced in (("torch", True), ("cutile", False)):
        torch._dynamo.reset()
        m = GPT(tiny()).eval()
        m.backend = backend  # the routing alone: on a CPU a cutile model's layers are torch's
        counter = CompileCounter()
        with torch.no_grad():
            assert torch.equal(torch.compile(m, backend=counter)(idx)[0], m(idx)[0])
        assert (counter.op_count > 0) == traced, backend
    torch._dynamo.reset()


def test_nanogpt_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = GPT(tiny()).eval()
    m.save_checkpoint(tmp_path / "ckpt.pt", iter_num=7, best_val_loss=1.5, config={"dataset": "x"})
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert ckpt["model_args"] == dict(n_layer=2, n_head=2, n_embd=64, block_size=64, bias=True,
                                      vocab_size=65, dropout=0.0)  # nanoGPT's keys, nothing else
    idx = torch.randint(65, (2, 20))
    assert torch.equal(GPT.from_checkpoint(tmp_path / "ckpt.pt").eval()(idx)[0], m(idx)[0])

    # what nanoGPT writes after torch.compile, on a torch without flash attention: prefixed keys
    # and causal-mask buffers
    sd = {"_orig_mod." + k: v for k, v in m.state_dict().items()}
    sd.update({f"_orig_mod.transformer.h.{i}.attn.bias": torch.ones(1, 1, 64, 64) for i in range(2)})
    torch.save({**ckpt, "model": sd}, tmp_path / "compiled.pt")
    assert torch.equal(GPT.from_checkpoint(tmp_path / "compiled.pt").eval()(idx)[0], m(idx)[0])


def test_tanh_gelu_is_saved_beside_nanogpts_keys(tmp_path):
    GPT(tiny(gelu="tanh")).save_checkpoint(tmp_path / "ckpt.pt")
    assert GPT.from_checkpoint(tmp_path / "ckpt.pt").config.gelu == "tanh"


def hf_layout(model: GPT, prefix: str) -> dict:
    """model's weights as Hugging Face's GPT2LMHeadModel stores them (Conv1D weights are (in, out))."""
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        k = k.removeprefix("transformer.")
        out[prefix + k] = (v.t() if k.endswith(conv1d) else v).contiguous().clone()
        if k.endswith("attn.c_attn.weight"):
            out[prefix + k.replace("c_attn.weight", "bias")] = torch.ones(1, 1, 64, 64)
    out["lm_head.weight"] = model.lm_head.weight.detach().clone()
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hugging_face_layout_round_trip(tmp_path, fmt):
    torch.manual_seed(0)
    m = GPT(tiny(gelu="tanh")).eval()
    (tmp_path / "config.json").write_text(json.dumps(dict(
        n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=65, activation_function="gelu_new")))
    if fmt == "safetensors":
        st = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
        st.save_file(hf_layout(m, "transformer."), str(tmp_path / "model.safetensors"))
    else:
        torch.save(hf_layout(m, ""), tmp_path / "pytorch_model.bin")
    loaded = GPT.from_pretrained(tmp_path).eval()
    assert loaded.config.gelu == "tanh" and loaded.transformer.wte.weight is loaded.lm_head.weight
    idx = torch.randint(65, (2, 30))
    torch.testing.assert_close(loaded(idx)[0], m(idx)[0], atol=0, rtol=0)
    assert GPT.from_pretrained(tmp_path, gelu="none").config.gelu == "none"


def test_hugging_face_loading_needs_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(tmp_path)


def test_generate_is_seeded_and_greedy_is_argmax():
    torch.manual_seed(0)
    m = GPT(tiny()).eval()
    idx = torch.randint(65, (2, 3))
    draw = lambda seed: m.generate(idx, 20, temperature=1.0, top_k=10,  # noqa: E731
                                   generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    out = m.generate(idx, 70, greedy=True)  # longer than block_size: the context is cropped
    assert out.shape == (2, 73)
    assert torch.equal(out[:, 3], m(idx)[0][:, -1].argmax(-1))


def test_naive_attention_never_narrows_a_float64_model():
    """Scores are widened to at least float32, never cut to it: a float64 model's logits match the
    SDPA path to float64 rounding (with a float32 softmax they differed by about 1.6e-8)."""
    torch.manual_seed(0)
    a = GPT(tiny(), attention="naive").double().eval()
    b = GPT(tiny(), attention="sdpa").double().eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(65, (2, 33))
    with torch.no_grad():
        assert (a(idx)[0] - b(idx)[0]).abs().max().item() < 1e-12
