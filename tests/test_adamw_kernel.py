"""The cuTile AdamW over flat buffers (kernels.adamw) against torch's fused AdamW on the GPU, at
awkward sizes; the cuTile model's gradients written into their slots; the kernel compiled ahead of
time anywhere tileiras is."""
import pytest
import torch

import kernels
from kernels import adamw, reference
from model.gpt import GPT, GPTConfig
from model.optim import ScaledAdamW

OK, REASON = kernels.available()
gpu = pytest.mark.skipif(not OK, reason=REASON)
SIZES = [(1,), (13,), (127, 1), (257, 3), (4099,), (1000, 1003)]


def test_export_compiles_the_adamw_kernel_for_sm90(exported_cubins):
    assert exported_cubins(adamw) == ["adamw_float32.sm_90.cubin", "adamw_float32_cast_float16.sm_90.cubin",
                                      "adamw_float32_cast_bfloat16.sm_90.cubin",
                                      "adamw_float32_cast_float16_scaled_grads.sm_90.cubin"]


def _params(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.nn.Parameter(0.1 * torch.randn(s, device="cuda", generator=g)) for s in SIZES]


def _adamw(params):
    return torch.optim.AdamW([{"params": params[:4], "weight_decay": 0.1},
                              {"params": params[4:], "weight_decay": 0.0, "lr": 3e-3}],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True, capturable=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_the_lr_is_read_at_every_step_given_as_a_float_or_a_tensor(as_tensor, device):
    """A schedule given as floats, or as one tensor changed in place (what a captured step reads
    at every replay), moves the parameters as torch's AdamW does with the same floats. On a GPU
    either goes to the cuTile kernel. (Its betas are fp32, as in torch's capturable AdamW: with
    beta2 = 0.999, whose 1 - beta2 fp32 holds to 1.3e-5, torch's other path, in double, moves a
    parameter 7e-6 of an update elsewhere.)"""
    g = torch.Generator().manual_seed(0)
    start = [0.1 * torch.randn(s, generator=g) for s in SIZES]
    ours, theirs = ([torch.nn.Parameter(t.to(device)) for t in start] for _ in range(2))
    flat = adamw.FlatAdamW(torch.optim.AdamW(ours, lr=1.0, betas=(0.9, 0.95), fused=True))
    reference = torch.optim.AdamW(theirs, lr=1.0, betas=(0.9, 0.95), fused=True)
    lr = torch.tensor(1.0, device=device)
    if as_tensor:
        flat.optimizer.param_groups[0]["lr"] = lr
    for value in (1e-2, 3e-3, 3e-3, 1e-4):
        lr.fill_(value)
        if not as_tensor:
            flat.optimizer.param_groups[0]["lr"] = value
        reference.param_groups[0]["lr"] = value
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g).to(device)
            b.grad = a.grad.clone()
        assert flat.gather()
        flat.step()
        reference.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-8)  # 1e-6 of an update, as below


@gpu
@pytest.mark.parametrize("unscale", [True, False], ids=["unscale", "grads-kept"])
@pytest.mark.parametrize("cast", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1024.0, 3.7])
def test_matches_torch_fused_adamw(poisoned, scale, cast, unscale):
    """Four steps of both, the third one skipped for an inf: parameters, unscaled gradients,
    moments and step counts agree, the two groups with their own lr and weight decay; the
    weights' copies in `cast` are the parameters' after every step. Without unscale the
    gradients are left as they came, to the bit."""
    ours, theirs = _params(0), _params(0)
    flat, reference = adamw.FlatAdamW(_adamw(ours)), _adamw(theirs)
    copies = flat.cast_copies(cast, ours) if cast else []
    grad_scale = torch.full((), scale, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    for i in range(4):
        found_inf = torch.full((), float(i == 2), device="cuda")
        for a, b in zip(ours, theirs):
            a.grad = scale * torch.randn(a.shape, device="cuda", generator=g)
            b.grad = a.grad.clone()
        assert flat.gather()
        given = [a.grad.clone() for a in ours]
        assert flat.step(grad_scale, found_inf, unscale=unscale) == unscale
        reference.grad_scale, reference.found_inf = grad_scale, found_inf
        reference.step()
        assert all(torch.equal(c, a.to(cast)) for c, a in zip(copies, ours))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-8)  # 1e-6 of an update
            if unscale:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
            else:
                assert torch.equal(a.grad, given.pop(0))
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(flat.optimizer.state[a][key], reference.state[b][key],
                                           rtol=1e-6, atol=0)
    assert all(flat.optimizer.state[a]["step"].item() == 3 for a in ours)


@gpu
def test_the_bias_corrections_hold_at_beta2_0999():
    """With beta2 = 0.999 the first steps' 1 - beta2**step is 1e-3 to 4e-3, which 1 - exp2 in
    fp32 got wrong by up to 1e-4 of itself (5e-5 of an update). Four steps against the same
    arithmetic in float64, at the kernel's fp32 betas, agree to 3e-6 of an update (fp32's own
    arithmetic, emulated on a CPU, came to 0.4 of that; the old corrections to 6.6 times it)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    params = [torch.nn.Parameter(0.1 * torch.randn(s, device="cuda", generator=g)) for s in SIZES]
    exact = [p.detach().double() for p in params]
    moments = [(torch.zeros_like(e), torch.zeros_like(e)) for e in exact]
    lr, decay, eps = 1e-2, 0.1, 1e-8
    beta1, beta2 = (torch.tensor(b, dtype=torch.float32).item() for b in (0.9, 0.999))
    flat = adamw.FlatAdamW(torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=eps,
                                             weight_decay=decay, fused=True))
    for step in range(1, 5):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, device="cuda", generator=g)
            exact[i], *moments[i] = reference.adamw_step(exact[i], p.grad, *moments[i], step, lr,
                                                         (beta1, beta2), eps, decay)
        assert flat.gather()
        flat.step()
        for p, e in zip(params, exact):
            torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=3e-8)


@gpu
def test_the_cutile_model_writes_its_weight_gradients_into_their_slots():
    """No copy of a matrix's gradient: the block's four Linears and the tied head write theirs
    into the flat buffer (the head where it pads no rows: a vocabulary that is a multiple of 8),
    the same gradients as without slots; the step matches torch's AdamW on the same model. (One
    step: after it, a weight that moved by 1e-10 can round to another fp16 copy, and the next
    gradients differ at fp16's precision.)"""
    config = GPTConfig.preset("tiny", dropout=0.0, vocab_size=128)
    torch.manual_seed(0)
    models = [GPT(config, backend="cutile", device="cuda").cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    updates = [ScaledAdamW(m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), capturable=True),
                           loss_scaling=True, clip=1.0, flat=flat) for m, flat in zip(models, (True, False))]
    idx = torch.randint(config.vocab_size, (4, 32), device="cuda")
    for m, u in zip(models, updates):
        u.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            _, loss = m(idx, idx.roll(-1, 1))
        u.backward(loss)
    at = dict(zip(updates[0].flat.params, updates[0].flat._at["grad"]))
    matrices = [p for p in models[0].parameters() if p.dim() == 2 and p is not models[0].transformer.wpe.weight]
    assert len(matrices) == 1 + 4 * config.n_layer and all(p.grad.data_ptr() == at[p] for p in matrices)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    for u in updates:
        u.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):  # the flat step's weight copies
        after = [m(idx, idx.roll(-1, 1))[1] for m in models]
    torch.testing.assert_close(after[0], after[1], rtol=1e-4, atol=0)
    assert updates[0].flat.casts_current(torch.float16)


@gpu
@pytest.mark.parametrize("lr_tensor", [False, True], ids=["lr-float", "lr-tensor"])
def test_a_captured_step_replays_as_eager_steps_run(lr_tensor, monkeypatch):
    """The step in a CUDA graph (as a graphed training step holds it), all of it in the cuTile
    kernel: three replays give what three eager steps of torch's fused AdamW give. With the lr in
    tensors (as model.train --graph holds it), changed before every replay, each replay takes the
    new one."""
    ours, theirs = _params(3), _params(3)
    flat, reference = adamw.FlatAdamW(_adamw(ours)), _adamw(theirs)
    rates = [torch.tensor(g["lr"], device="cuda") for g in flat.optimizer.param_groups]
    if lr_tensor:
        for g, rate in zip(flat.optimizer.param_groups, rates):
            g["lr"] = rate

    def torch_step(*args):
        raise AssertionError("torch's fused AdamW stepped the flat buffers")
    monkeypatch.setattr(adamw.FlatAdamW, "_torch_step", torch_step)
    copies = flat.cast_copies(torch.bfloat16, ours)
    grad_scale, found_inf = torch.full((), 8.0, device="cuda"), torch.zeros((), device="cuda")
    grads = [torch.randn(p.shape, device="cuda") for p in ours]
    for a, b, d in zip(ours, theirs, grads):
        a.grad, b.grad = d.clone(), d.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the warm-up step a capture needs
        flat.gather()
        flat.step(grad_scale, found_inf)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flat.step(grad_scale, found_inf)
    reference.grad_scale, reference.found_inf = grad_scale, found_inf
    for i in range(4):
        if i:
            if lr_tensor:  # a schedule: the replay must read these, not the capture's
                for g, rate in zip(reference.param_groups, rates):
                    rate.mul_(0.5)
                    g["lr"] = rate.item()
            for a, d in zip(ours, grads):
                a.grad.copy_(d)
            graph.replay()
        for b, d in zip(theirs, grads):
            b.grad.copy_(d)
        reference.step()
    for a, b, c in zip(ours, theirs, copies):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-8)
        assert torch.equal(c, a.to(torch.bfloat16))
