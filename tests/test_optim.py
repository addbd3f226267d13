"""model.optim.ScaledAdamW does what GradScaler.unscale_, clip_grad_norm_ and GradScaler.step do,
with its parameters where they were or in flat buffers (kernels.adamw; torch's fused AdamW steps
them on the CPU, the cuTile kernel on a GPU: tests/test_adamw_kernel.py)."""
import pytest
import torch

from kernels.adamw import FlatAdamW, grad_slot
from kernels.linear import WeightCasts, mm_acc
from model.optim import GROWTH_INTERVAL, INIT_SCALE, ScaledAdamW

flat_or_not = pytest.mark.parametrize("flat", [False, True], ids=["tensors", "flat"])


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


def _loss(model, seed, poison=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, generator=g)
    if poison:
        x[0, 0] = float("inf")
    return model(x).pow(2).mean() * 50  # large enough that clipping at 1.0 bites


@pytest.fixture
def kernel_keeps_grads(monkeypatch):
    """FlatAdamW.step as the cuTile kernel takes it without unscale, on the CPU, where only torch's
    step runs (which always divides the gradients): the gradients put back as they were."""
    step = FlatAdamW.step

    def keeping(self, grad_scale=None, found_inf=None, unscale=True):
        kept = self.flat_grads.clone()
        if step(self, grad_scale, found_inf, unscale) and not unscale:
            self.flat_grads.copy_(kept)
            return False
        return True
    monkeypatch.setattr(FlatAdamW, "step", keeping)


@pytest.mark.parametrize("flat, unscale_grads", [(False, True), (True, True), (True, False), (False, False)],
                         ids=["tensors", "flat", "flat-grads-kept", "tensors-grads-kept"])
@pytest.mark.parametrize("clip", [1.0, 0.0, 1e6])
def test_matches_the_three_pass_recipe(clip, flat, unscale_grads, kernel_keeps_grads):
    """Five steps, the third with an inf in the loss, the last one where the scale grows: same
    parameters, gradients (as the step took them: grad()) and loss scale as GradScaler +
    clip_grad_norm_ (the scaler runs on CPU here, where it is enabled explicitly). Kept, the flat
    step's gradients are the backward's, still scaled."""
    ours, theirs = _model(), _model()
    update = ScaledAdamW(_optimizer(ours), loss_scaling=True, clip=clip, flat=flat, unscale_grads=unscale_grads)
    opt = _optimizer(theirs)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    for i in range(5):
        if i == 4:  # the scale doubles in this step's update, after the gradients were scaled by it
            update.growth_tracker.fill_(GROWTH_INTERVAL - 1)
            scaler._growth_tracker.fill_(GROWTH_INTERVAL - 1)
        update.zero_grad()
        update.backward(_loss(ours, i, poison=i == 2))
        scaled = [q.grad.clone() for q in ours.parameters()]
        update.step()

        opt.zero_grad(set_to_none=True)
        scaler.scale(_loss(theirs, i, poison=i == 2)).backward()
        scaler.unscale_(opt)
        if clip:
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), clip)
        scaler.step(opt)
        scaler.update()

        assert update.scale.item() == scaler.get_scale()
        for a, b, g in zip(ours.parameters(), theirs.parameters(), scaled):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            if i != 2:  # after a skipped step the gradients are not finite either way
                torch.testing.assert_close(update.grad(a), b.grad, rtol=1e-5, atol=1e-6)
                assert torch.equal(a.grad, g) == (flat and not unscale_grads)
    assert update.scale.item() == INIT_SCALE  # backed off once, at the inf, and grown once


@flat_or_not
def test_skipped_step_leaves_parameters_and_moments(flat):
    model = _model()
    update = ScaledAdamW(_optimizer(model), loss_scaling=True, clip=1.0, flat=flat)
    before = [q.detach().clone() for q in model.parameters()]
    update.backward(_loss(model, 0, poison=True))
    update.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(s["step"].item() == 0 for s in update.optimizer.state.values())


@flat_or_not
def test_without_loss_scaling_the_scale_stays_one(flat):
    model = _model()
    update = ScaledAdamW(_optimizer(model), loss_scaling=False, clip=1.0, flat=flat)
    for i in range(3):
        update.zero_grad()
        update.backward(_loss(model, i))
        update.step()
    assert update.scale.item() == 1.0
    norm = torch.nn.utils.get_total_norm([q.grad for q in model.parameters()])
    assert norm.item() == pytest.approx(1.0, rel=1e-4)  # clipped to the bound


@pytest.mark.parametrize("scaling", [True, False])
def test_loss_grad_is_the_gradient_backward_gives_the_loss(scaling):
    """What a model's fused head is told to make its gradients at (model.gpt.GPT.forward): the
    gradient the loss then gets, also once a skipped step has halved the scale."""
    model = _model()
    update = ScaledAdamW(_optimizer(model), loss_scaling=scaling, clip=1.0)
    for i, poison in enumerate((True, False)):
        expected = None if update.loss_grad is None else update.loss_grad.clone()
        loss = _loss(model, i, poison=poison)
        loss.retain_grad()
        update.zero_grad()
        update.backward(loss)
        if scaling:
            assert torch.equal(loss.grad, expected)
        else:
            assert expected is None and loss.grad.item() == 1.0
        update.step()
    assert not scaling or update.loss_grad.item() == INIT_SCALE / 2


@flat_or_not
def test_reset_returns_to_the_first_step(flat):
    model = _model()
    update = ScaledAdamW(_optimizer(model), loss_scaling=True, clip=1.0, flat=flat)
    update.backward(_loss(model, 0, poison=True))
    update.step()
    update.reset()
    assert update.scale.item() == INIT_SCALE
    assert all(not t.any() for s in update.optimizer.state.values() for t in s.values())


def test_refuses_an_unfused_optimizer():
    with pytest.raises(ValueError, match="fused=True"):
        ScaledAdamW(torch.optim.AdamW(_model().parameters()), loss_scaling=True, clip=1.0)


class _SlotLinear(torch.autograd.Function):
    """x @ w.T whose backward writes w's gradient into its slot, as the cuTile model's do."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x)
        ctx.w = w
        return x @ w.t()

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return None, mm_acc(dy.t(), x, out=grad_slot(ctx.w))


def _slot_model():
    torch.manual_seed(0)
    return torch.nn.ParameterList([torch.nn.Parameter(torch.randn(16, 8) * 0.3),
                                   torch.nn.Parameter(torch.randn(4, 16) * 0.3),
                                   torch.nn.Parameter(torch.zeros(4))])


def _slot_loss(params, seed):
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(seed))
    h = torch.relu(_SlotLinear.apply(x, params[0]))
    return (_SlotLinear.apply(h, params[1]) + params[2]).pow(2).mean() * 50


def _slot_optimizer(params):
    return torch.optim.AdamW([{"params": list(params)[:2], "weight_decay": 0.1},
                              {"params": list(params)[2:], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), fused=True)


def test_flat_keeps_a_gradient_written_into_its_slot_without_a_copy():
    """The parameters and moments are views of one buffer each; a gradient a backward wrote into
    its slot is p.grad as it is; one it did not is copied there; both step as torch's AdamW does."""
    ours, theirs = _slot_model(), _slot_model()
    update = ScaledAdamW(_slot_optimizer(ours), loss_scaling=True, clip=1.0, flat=True)
    reference = ScaledAdamW(_slot_optimizer(theirs), loss_scaling=True, clip=1.0)
    flat = update.flat
    for i in range(3):
        for u, params in ((update, ours), (reference, theirs)):
            u.zero_grad()
            u.backward(_slot_loss(params, i))
        slots = [flat.flat_grads[s:].data_ptr() for s in flat.slots]
        assert [p.grad.data_ptr() == s for p, s in zip(ours, slots)] == [True, True, False]
        update.step()
        reference.step()
        assert [p.grad.data_ptr() for p in ours] == slots  # the stray one is its slot now
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    starts = [flat.flat_params[s:].data_ptr() for s in flat.slots]
    assert [p.data_ptr() for p in ours] == starts
    state = update.optimizer.state
    assert [state[p]["exp_avg"].data_ptr() for p in ours] == [flat.exp_avg[s:].data_ptr() for s in flat.slots]


def test_flat_adds_a_second_backward_to_the_first():
    """Two backward passes before a step (gradient accumulation): the second gradient must not be
    written into the slot that holds the first."""
    ours, theirs = _slot_model(), _slot_model()
    update = ScaledAdamW(_slot_optimizer(ours), loss_scaling=False, clip=0.0, flat=True)
    reference = ScaledAdamW(_slot_optimizer(theirs), loss_scaling=False, clip=0.0)
    for u, params in ((update, ours), (reference, theirs)):
        u.zero_grad()
        u.backward(_slot_loss(params, 0))
        u.backward(_slot_loss(params, 1))
        u.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_flat_leaves_a_parameter_without_a_gradient_alone():
    """torch's AdamW does not touch a parameter whose gradient is None; nor does the flat one."""
    ours, theirs = _slot_model(), _slot_model()
    update = ScaledAdamW(_slot_optimizer(ours), loss_scaling=True, clip=1.0, flat=True)
    reference = ScaledAdamW(_slot_optimizer(theirs), loss_scaling=True, clip=1.0)
    for u, params in ((update, ours), (reference, theirs)):
        for i in range(2):
            u.zero_grad()
            u.backward(_slot_loss(params, i))
            if i == 1:
                params[2].grad = None
            u.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert update.optimizer.state[ours[2]]["step"].item() == 1


def test_flat_takes_over_a_loaded_state_dict():
    """A state_dict loaded into the optimizer (new tensors) is taken back into the flat buffers:
    the run goes on as the one that was saved."""
    ours, resumed = _slot_model(), _slot_model()
    update = ScaledAdamW(_slot_optimizer(ours), loss_scaling=False, clip=1.0, flat=True)
    for i in range(2):
        update.zero_grad()
        update.backward(_slot_loss(ours, i))
        update.step()
    saved_params, saved_opt = [p.detach().clone() for p in ours], update.optimizer.state_dict()
    saved_opt = {k: ({i: {n: t.clone() for n, t in s.items()} for i, s in v.items()} if k == "state" else v)
                 for k, v in saved_opt.items()}
    again = ScaledAdamW(_slot_optimizer(resumed), loss_scaling=False, clip=1.0, flat=True)
    with torch.no_grad():
        for p, q in zip(resumed, saved_params):
            p.copy_(q)
    again.optimizer.load_state_dict(saved_opt)
    for u, params in ((update, ours), (again, resumed)):
        u.zero_grad()
        u.backward(_slot_loss(params, 2))
        u.step()
    for a, b in zip(ours, resumed):
        assert torch.equal(a, b)
    assert all(s["step"].item() == 3 for s in again.optimizer.state.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flat_step_writes_the_weight_copies_a_forward_reads(monkeypatch, dtype):
    """After a flat step the copies already hold the new weights and fresh() copies nothing; after
    any other change of a weight (an in-place op, torch's own step) it copies them again."""
    params = _slot_model()
    update = ScaledAdamW(_slot_optimizer(params), loss_scaling=False, clip=1.0, flat=True)
    casts = WeightCasts()
    casts.track(list(params)[:2])
    refills, copy = [], torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: (refills.append(dst[0].dtype), copy(dst, src)))

    def forward_reads():
        with casts.fresh(dtype):
            got = [casts.cast(p, dtype) for p in list(params)[:2]]
            assert all(torch.equal(c, p.to(dtype)) for c, p in zip(got, params))
        return refills.count(dtype)

    def step(drop_bias_grad=False):
        update.zero_grad()
        update.backward(_slot_loss(params, len(refills)))
        if drop_bias_grad:
            params[2].grad = None  # torch's step, not the flat one
        update.step()

    assert forward_reads() == 1
    step()
    assert forward_reads() == 1  # the step wrote them
    with torch.no_grad():
        params[0].mul_(0.5)
    assert forward_reads() == 2
    step(drop_bias_grad=True)
    assert forward_reads() == 3
    step()
    assert forward_reads() == 3
    with torch.no_grad():
        params[1].zero_()
    update.reset()
    assert forward_reads() == 3  # reset() took the change up


def test_weight_copies_of_a_parameter_outside_the_flat_buffers_are_made_once():
    """A tracked weight the optimizer does not hold: the copies are the casts' own, refilled in
    place every forward, not made anew."""
    params, frozen = _slot_model(), torch.nn.Parameter(torch.randn(3, 3))
    ScaledAdamW(_slot_optimizer(params), loss_scaling=False, clip=1.0, flat=True)
    casts = WeightCasts()
    casts.track([params[0], frozen])
    made = []
    for _ in range(2):
        with casts.fresh(torch.float16):
            made.append(casts.cast(frozen, torch.float16))
            assert torch.equal(made[-1], frozen.to(torch.float16))
    assert made[0] is made[1]
