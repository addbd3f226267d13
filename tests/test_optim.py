"""model.optim.ScaledAdamW does what GradScaler.unscale_, clip_grad_norm_ and GradScaler.step do."""
import pytest
import torch

from model.optim import INIT_SCALE, ScaledAdamW


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


@pytest.mark.parametrize("clip", [1.0, 0.0, 1e6])
def test_matches_the_three_pass_recipe(clip):
    """Five steps, the third with an inf in the loss: same parameters, gradients and loss scale
    as GradScaler + clip_grad_norm_ (the scaler runs on CPU here, where it is enabled explicitly)."""
    ours, theirs = _model(), _model()
    update = ScaledAdamW(_optimizer(ours), loss_scaling=True, clip=clip)
    opt = _optimizer(theirs)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    for i in range(5):
        update.zero_grad()
        update.backward(_loss(ours, i, poison=i == 2))
        update.step()

        opt.zero_grad(set_to_none=True)
        scaler.scale(_loss(theirs, i, poison=i == 2)).backward()
        scaler.unscale_(opt)
        if clip:
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), clip)
        scaler.step(opt)
        scaler.update()

        assert update.scale.item() == scaler.get_scale()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            if i != 2:  # after a skipped step the gradients are not finite either way
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert update.scale.item() == INIT_SCALE / 2  # backed off once, at the inf


def test_skipped_step_leaves_parameters_and_moments():
    model = _model()
    update = ScaledAdamW(_optimizer(model), loss_scaling=True, clip=1.0)
    before = [q.detach().clone() for q in model.parameters()]
    update.backward(_loss(model, 0, poison=True))
    update.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(s["step"].item() == 0 for s in update.optimizer.state.values())


def test_without_loss_scaling_the_scale_stays_one():
    model = _model()
    update = ScaledAdamW(_optimizer(model), loss_scaling=False, clip=1.0)
    for i in range(3):
        update.zero_grad()
        update.backward(_loss(model, i))
        update.step()
    assert update.scale.item() == 1.0
    norm = torch.nn.utils.get_total_norm([q.grad for q in model.parameters()])
    assert norm.item() == pytest.approx(1.0, rel=1e-4)  # clipped to the bound


def test_reset_returns_to_the_first_step():
    model = _model()
    update = ScaledAdamW(_optimizer(model), loss_scaling=True, clip=1.0)
    update.backward(_loss(model, 0, poison=True))
    update.step()
    update.reset()
    assert update.scale.item() == INIT_SCALE
    assert all(not t.any() for s in update.optimizer.state.values() for t in s.values())


def test_refuses_an_unfused_optimizer():
    with pytest.raises(ValueError, match="fused=True"):
        ScaledAdamW(torch.optim.AdamW(_model().parameters()), loss_scaling=True, clip=1.0)
