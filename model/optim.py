"""AdamW with fp16 loss scaling and gradient clipping folded into its fused update.

The usual recipe (GradScaler.unscale_, clip_grad_norm_, GradScaler.step) passes over every gradient
three times before AdamW reads it: to unscale and check for inf, to take the norm, to clip. Here
one pass takes the norm of the still-scaled gradients, and the fused AdamW divides each gradient by
loss_scale / clip_coef as it updates, skipping the update when the norm is not finite. Same
arithmetic, one pass over the gradients instead of three; no host sync, so the step can be
captured in a CUDA graph. With flat=True the parameters, gradients and moments live in flat
buffers (kernels.adamw.FlatAdamW): one norm over one buffer and one kernel for the update.
"""
from __future__ import annotations

import torch

# GradScaler's defaults
INIT_SCALE, GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL = 2.0 ** 16, 2.0, 0.5, 2000


class ScaledAdamW:
    """optimizer: a fused torch.optim.AdamW. loss_scaling: dynamic fp16 loss scaling, as
    GradScaler does it. clip: the gradient-norm bound, as clip_grad_norm_ takes it (0: none).
    flat: move the parameters (fp32, on one device) and moments into flat buffers and step them
    there; a step where some parameter has no gradient is torch's, on the same memory.
    unscale_grads: leave each .grad unscaled and clipped after the step, as GradScaler.unscale_
    and clip_grad_norm_ do; False lets the flat step skip writing them back (a loop that zeroes
    them next has no use for it), and grad(p) is then the gradient the step took."""

    def __init__(self, optimizer: torch.optim.AdamW, loss_scaling: bool, clip: float, flat: bool = False,
                 unscale_grads: bool = True):
        if not optimizer.defaults.get("fused"):
            raise ValueError("ScaledAdamW folds scaling into the fused AdamW update: pass fused=True")
        self.optimizer, self.loss_scaling, self.clip = optimizer, loss_scaling, clip
        self.params = [q for g in optimizer.param_groups for q in g["params"]]
        device = self.params[0].device
        self.scale = torch.full((), INIT_SCALE if loss_scaling else 1.0, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.unscale_grads, self.grads_scaled_by = unscale_grads, None
        self.flat = None
        if flat:
            from kernels.adamw import FlatAdamW

            self.flat = FlatAdamW(optimizer)

    @property
    def loss_grad(self) -> torch.Tensor | None:
        """The gradient backward() gives the loss (the loss scale), for a model's fused head to
        make its gradients at (model.gpt.GPT.forward); None without loss scaling."""
        return self.scale if self.loss_scaling else None

    def backward(self, loss: torch.Tensor):
        (loss * self.scale if self.loss_scaling else loss).backward()

    def grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """p's gradient as the last step took it, unscaled and clipped (p.grad itself where the
        step left it so)."""
        return p.grad if self.grads_scaled_by is None or p.grad is None else p.grad / self.grads_scaled_by

    def step(self):
        """Update the parameters from gradients of the scaled loss, then update the scale. The
        gradients are left unscaled and clipped, as after unscale_ and clip_grad_norm_, unless
        unscale_grads is False and the flat step took them (grad(p) has them then)."""
        flat = self.flat if self.flat is not None and self.flat.gather() else None
        if flat is not None:
            norm = flat.grad_norm()  # of the scaled gradients
        else:
            norm = torch.nn.utils.get_total_norm([q.grad for q in self.params if q.grad is not None])
        found_inf = (~norm.isfinite()).float()
        grad_scale = self.scale
        if self.clip > 0:  # clip_grad_norm_'s max_norm / (norm + 1e-6), with the norm still scaled
            coef = self.clip * self.scale / (norm + 1e-6 * self.scale)
            grad_scale = self.scale / coef.clamp(max=1.0)
        self.grads_scaled_by = None
        if flat is not None:
            if not flat.step(grad_scale, found_inf, unscale=self.unscale_grads):  # the gradients kept as they are
                # (a copy where it is the loss scale, which the update below changes)
                self.grads_scaled_by = grad_scale.clone() if grad_scale is self.scale else grad_scale
        else:
            self.optimizer.grad_scale, self.optimizer.found_inf = grad_scale, found_inf
            self.optimizer.step()
        if self.loss_scaling:
            torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf,
                                     GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL)

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def reset(self):
        """Back to the first step: no moments, no steps taken, the initial scale; call it after
        putting the parameters back, which the flat buffers' weight copies then take up too."""
        for state in self.optimizer.state.values():
            for t in state.values():
                t.zero_()
        if self.flat is not None:
            self.flat.reset_casts()
        self.scale.fill_(INIT_SCALE if self.loss_scaling else 1.0)
        self.growth_tracker.zero_()
