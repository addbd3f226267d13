"""AdamW over parameters, gradients and moments held in flat buffers: one kernel, one pass.

torch's fused AdamW walks a model's tensors in multi-tensor chunks: over GPT-2's 148 it ran at
2.7 TB/s on an H200 (1.28 ms), and the gradient norm before it, over the same 148, took 0.17 ms.
FlatAdamW moves a torch AdamW's parameters and moments into one flat fp32 buffer each (the tensors
become views of them, so the model, the optimizer's state_dict and torch's own step see the same
memory), gives every parameter a gradient slot in a flat buffer too, and steps them all with one
cuTile kernel (3.9 TB/s in the same probe) after one norm over the flat gradients.

Gradients land in their slots without a copy where the backward that makes them writes there:
grad_slot(p) gives it the slot, and autograd keeps the tensor it returns as p.grad. Any other
gradient is copied in, by one multi-tensor copy, before the norm. The update is torch's
arithmetic (its fused AdamW's, with the loss scale and the inf check folded in), in fp32 either
way; where cuTile cannot run, torch's fused AdamW steps the flat buffers instead. A group's lr
may be a tensor, which a CUDA graph's step reads at every replay: the kernel reads it from memory
(a float lr is a launch argument, fixed at a capture). The same pass can write a flat copy of the
parameters in fp16 or bf16 (cast_copies), which the forward's weight copies
(kernels.linear.WeightCasts) then are instead of a copy of their own.
"""
from __future__ import annotations

import functools
import math
import struct
import weakref

import torch

import kernels
from kernels.launch import launch, sm_count

try:
    import cuda.tile as ct
except Exception:  # no cuda-tile here: torch's fused AdamW steps the flat buffers
    ct = None

ALIGN = 64  # elements: every slot and group starts on a 256-byte boundary (TMA and cuBLAS want 16)
# 512-element tiles, 8 blocks per SM, load latency 5, over GPT-2's 124M parameters with an fp16
# copy and the gradients left as they are (30 bytes a parameter; docs/PERF.md): on an H100 1.291
# ms against 1.363 for the earlier 1024 x 4 in a probe without an L2 flush (a copy of the same
# bytes 1.229); under the harness's rule (sweeps/adamw.yaml --profile configs) 1.283 ms, level
# with 1024 x 4 and 0.8% from the best of 36 (4096 x 4)
TILE, BLOCKS_PER_SM, LATENCY = 512, 8, 5

if ct is not None:
    ConstInt = ct.Constant[int]
    ConstBool = ct.Constant[bool]
    ZERO = ct.PaddingMode.ZERO

    def _one_minus_power(step, ln_beta):
        """1 - beta**step from ln(beta), to 3e-7 of its value. Taken as 1 - exp(step ln beta) it
        would lose its digits where beta**step is near 1: at the first step with beta 0.999, off
        by 1e-4 of itself. There it is -expm1(y), whose series to y**8 holds fp32's precision for
        |y| < 0.5, where 1 - exp(y) takes over."""
        y = step * ln_beta
        inner = ct.full((1,), 1.0, dtype=ct.float32)
        for i in range(8):  # Horner, from the y**8 / 9! term down
            inner = 1.0 + y / (9 - i) * inner
        return ct.where(y > -0.5, -(y * inner), 1.0 - ct.exp(y))

    @ct.kernel
    def _adamw_kernel(P, G, M, V, W, Steps, Scale, Inf, Lr, step_index: int, lr: float, beta1: float,
                      beta2: float, ln_beta1: float, ln_beta2: float, eps: float, decay: float,
                      TILE: ConstInt, LATENCY: ConstInt, CAST: ConstBool, UNSCALE: ConstBool):
        """One AdamW step of P from G / Scale, as torch's fused AdamW takes it; nothing changes
        where Inf is nonzero. With UNSCALE, G is left divided by Scale, as torch's leaves it
        (4 of the 34 bytes a parameter moves); with CAST, W gets the new P in W's dtype. The rate
        is lr * Lr[0] (one of them 1: a tensor lr is read at every launch, a graph's replays
        included). The step count, already advanced, is Steps[step_index]."""
        step = ct.load(Steps, index=(step_index,), shape=(1,))
        scale = ct.load(Scale, index=(0,), shape=(1,))
        skip = ct.load(Inf, index=(0,), shape=(1,)) != 0.0
        rate = lr * ct.load(Lr, index=(0,), shape=(1,))
        step_size = rate / _one_minus_power(step, ln_beta1)
        root_bc2 = ct.sqrt(_one_minus_power(step, ln_beta2))
        for i in range(ct.bid(0), ct.cdiv(P.shape[0], TILE), ct.num_blocks(0)):
            p = ct.load(P, index=(i,), shape=(TILE,), padding_mode=ZERO, latency=LATENCY)
            g_in = ct.load(G, index=(i,), shape=(TILE,), padding_mode=ZERO, latency=LATENCY)
            m = ct.load(M, index=(i,), shape=(TILE,), padding_mode=ZERO, latency=LATENCY)
            v = ct.load(V, index=(i,), shape=(TILE,), padding_mode=ZERO, latency=LATENCY)
            g = g_in / scale
            m_new = m * beta1 + g * (1.0 - beta1)
            v_new = v * beta2 + (g * g) * (1.0 - beta2)
            p_new = p * (1.0 - rate * decay) - step_size * m_new / (ct.sqrt(v_new) / root_bc2 + eps)
            p_new = ct.where(skip, p, p_new)
            ct.store(P, index=(i,), tile=p_new)
            if CAST:
                ct.store(W, index=(i,), tile=p_new.astype(W.dtype))
            if UNSCALE:
                ct.store(G, index=(i,), tile=ct.where(skip, g_in, g))
            ct.store(M, index=(i,), tile=ct.where(skip, m, m_new))
            ct.store(V, index=(i,), tile=ct.where(skip, v, v_new))


@functools.lru_cache(maxsize=None)
def _hinted(blocks_per_sm: int = BLOCKS_PER_SM):
    """The kernel with its occupancy hint, made once per hint: each hinted copy has its own JIT cache."""
    return _adamw_kernel.replace_hints(occupancy=blocks_per_sm)


def _fp32(x: float) -> float:
    """x as the kernel holds it: the betas are fp32 in all of its arithmetic, as in torch's
    capturable AdamW."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def grad_slot(param: torch.Tensor) -> torch.Tensor | None:
    """A new view of param's gradient slot in its FlatAdamW's buffer, for a backward to write its
    gradient into and return; None if param has none, or has a gradient already (which the new
    one is added to: the slot may be that gradient). A new view each time: autograd keeps a
    returned gradient as param.grad without a copy only where nothing else holds it."""
    owner = owner_of([param])
    if owner is None or param.grad is not None:
        return None
    return owner.view_of(owner.flat_grads, param)


def owner_of(params) -> "FlatAdamW | None":
    """The FlatAdamW that holds all of these parameters, or None."""
    ref = getattr(params[0], "_flat_adamw", None) if params else None
    owner = ref() if ref is not None else None
    if owner is None or any(getattr(p, "_flat_adamw", None) is not ref for p in params):
        return None
    return owner


class FlatAdamW:
    """The parameters and moments of a fused torch AdamW moved into flat buffers, and its step."""

    def __init__(self, optimizer: torch.optim.AdamW, tile: int = TILE, blocks_per_sm: int = BLOCKS_PER_SM,
                 latency: int = LATENCY):
        """tile, blocks_per_sm and latency: the kernel's launch config (a benchmark's knobs)."""
        groups = optimizer.param_groups
        params = [p for g in groups for p in g["params"]]
        bad = [g for g in groups if g["amsgrad"] or g["maximize"] or g.get("differentiable")]
        if bad or not params:
            raise ValueError("FlatAdamW takes a non-empty AdamW without amsgrad, maximize or differentiable")
        if any(p.dtype != torch.float32 or p.device != params[0].device or p.is_sparse for p in params):
            raise ValueError("FlatAdamW takes fp32 parameters, all on one device")
        self.optimizer, self.params, self.device = optimizer, params, params[0].device
        self.tile, self.blocks_per_sm, self.latency = tile, blocks_per_sm, latency
        self.slots, self.regions, end = [], [], 0  # each param's start; each group's (start, end)
        for g in groups:
            start = end
            for p in g["params"]:
                self.slots.append(end)
                end += _padded(p.numel())
            self.regions.append((start, end))
        zeros = lambda: torch.zeros(end, dtype=torch.float32, device=self.device)  # noqa: E731
        self.flat_params, self.flat_grads, self.exp_avg, self.exp_avg_sq = zeros(), zeros(), zeros(), zeros()
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=self.device)
        self.ones, self.zero = torch.ones(1, device=self.device), torch.zeros(1, device=self.device)
        with torch.no_grad():
            for p, start in zip(params, self.slots):
                self._view(self.flat_params, p, start).copy_(p)
                p.data = self._view(self.flat_params, p, start)
                p._flat_adamw = weakref.ref(self)
        self.casts, self._cast_versions = None, None  # the parameters in a low precision, see cast_copies
        self._index = {id(p): i for i, p in enumerate(params)}
        self._adopt_state()
        at = lambda flat, size: [flat.data_ptr() + size * i for i in self.slots]  # noqa: E731
        self._at = {"param": at(self.flat_params, 4), "grad": at(self.flat_grads, 4),
                    "exp_avg": at(self.exp_avg, 4), "exp_avg_sq": at(self.exp_avg_sq, 4),
                    "step": [self.steps.data_ptr() + 4 * i for i in range(len(params))]}

    @staticmethod
    def _view(flat, p, start):
        return flat[start:start + p.numel()].view(p.shape)

    def view_of(self, flat, p):
        """Parameter p's region of one of the flat buffers (or of the flat copy), as p's shape."""
        return self._view(flat, p, self.slots[self._index[id(p)]])

    def _adopt_state(self):
        """Make the optimizer's state for each parameter views of the flat moments and steps,
        taking over the values of any state it already holds (a loaded state_dict)."""
        with torch.no_grad():
            for i, (p, start) in enumerate(zip(self.params, self.slots)):
                old = self.optimizer.state.get(p, {})
                new = {"step": self.steps[i], "exp_avg": self._view(self.exp_avg, p, start),
                       "exp_avg_sq": self._view(self.exp_avg_sq, p, start)}
                for key, t in new.items():
                    if key in old and old[key].data_ptr() != t.data_ptr():
                        t.copy_(old[key])
                    elif key not in old:
                        t.zero_()
                self.optimizer.state[p] = new

    def gather(self) -> bool:
        """Bring every gradient into its slot (those a backward wrote elsewhere by one copy, and
        p.grad then made the slot);
        False, changing nothing, where the flat step cannot serve: a parameter without a
        gradient (torch's AdamW leaves it alone, the flat step would not) or no longer a view of
        the flat buffer."""
        at, state = self._at, self.optimizer.state
        if any(p.grad is None or p.data_ptr() != a for p, a in zip(self.params, at["param"])):
            return False
        if any(state.get(p, {}).get(key) is None or state[p][key].data_ptr() != at[key][i]
               for i, p in enumerate(self.params) for key in ("step", "exp_avg", "exp_avg_sq")):
            self._adopt_state()  # load_state_dict replaced the state's tensors
        strays = [(self._view(self.flat_grads, p, s), p.grad)
                  for p, s, a in zip(self.params, self.slots, at["grad"]) if p.grad.data_ptr() != a]
        if strays:
            with torch.no_grad():
                torch._foreach_copy_(*map(list, zip(*strays)))
            for p, s, a in zip(self.params, self.slots, at["grad"]):
                if p.grad.data_ptr() != a:
                    p.grad = self._view(self.flat_grads, p, s)  # where the step leaves it unscaled
        return True

    def cast_copies(self, dtype, params) -> list[torch.Tensor]:
        """Views, for these parameters (all of them held here: owner_of), of a flat copy of all of
        them in dtype, which every step writes from then on as it writes the parameters."""
        if self.casts is None or self.casts.dtype != dtype:
            self.casts, self._cast_versions = torch.empty_like(self.flat_params, dtype=dtype), None
        return [self.view_of(self.casts, p) for p in params]

    def casts_current(self, dtype) -> bool:
        """Does the flat copy in dtype hold the parameters as they are? Yes when the last thing
        that changed them was a step that wrote it: any other in-place change (load_state_dict,
        torch's step, an init) advances a parameter's version counter. (Writes through p.data
        do not; nor do a CUDA graph's replays, whose Python ran once: reset_casts() after
        changing the parameters of a captured step.)"""
        return (self.casts is not None and self.casts.dtype == dtype
                and self._cast_versions == [p._version for p in self.params])

    def reset_casts(self):
        """Copy the parameters into the flat copy as they are now."""
        if self.casts is not None:
            with torch.no_grad():
                self.casts.copy_(self.flat_params)
            self._cast_versions = [p._version for p in self.params]

    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of all gradients (after gather): the gaps between slots hold zeros."""
        return torch.linalg.vector_norm(self.flat_grads)

    def step(self, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
             unscale: bool = True) -> bool:
        """One AdamW step of every parameter from its gradient / grad_scale (after gather), none
        where found_inf is nonzero, the steps counted. Returns whether the gradients are left
        divided by grad_scale: always by torch's fused AdamW, by the cuTile kernel only with
        unscale (without, it writes no gradient: 4 of the 34 bytes a parameter it moves)."""
        scale = self.ones if grad_scale is None else grad_scale.reshape(1).float()
        inf = self.zero if found_inf is None else found_inf.reshape(1).float()
        groups = self.optimizer.param_groups
        # one way for all groups, so that their gradients are all left divided or none
        kernel = ct is not None and self.device.type == "cuda" and kernels.available()[0]
        with torch.no_grad():
            self.steps.add_(1)
            first, update = 0, self._kernel_step if kernel else self._torch_step
            for g, (start, end) in zip(groups, self.regions):
                bufs = [b[start:end] for b in (self.flat_params, self.flat_grads, self.exp_avg, self.exp_avg_sq)]
                cast = None if self.casts is None else self.casts[start:end]
                if bufs[0].numel():
                    update(bufs, cast, first, scale, inf, g["lr"], *map(float, g["betas"]), float(g["eps"]),
                           float(g["weight_decay"]), unscale)
                first += len(g["params"])
            if found_inf is not None:
                self.steps.sub_(inf)
        self._cast_versions = None if self.casts is None else [p._version for p in self.params]
        return unscale or not kernel

    def _torch_step(self, bufs, cast, step_index, scale, inf, lr, beta1, beta2, eps, decay, unscale):
        lr = lr if isinstance(lr, torch.Tensor) else float(lr)
        torch._fused_adamw_(*[[b] for b in bufs], [], [self.steps[step_index]], lr=lr, beta1=beta1,
                            beta2=beta2, weight_decay=decay, eps=eps, amsgrad=False, maximize=False,
                            grad_scale=scale.view(()), found_inf=inf.view(()))
        if cast is not None:
            cast.copy_(bufs[0])

    def _kernel_step(self, bufs, cast, step_index, scale, inf, lr, beta1, beta2, eps, decay, unscale):
        grid = (min(-(-bufs[0].numel() // self.tile), self.blocks_per_sm * sm_count(self.device)),)
        if isinstance(lr, torch.Tensor):
            rate, lr = lr.reshape(1).to(self.device, torch.float32), 1.0
        else:
            rate, lr = self.ones, float(lr)
        launch(self.device, grid, _hinted(self.blocks_per_sm),
               (*bufs, bufs[0] if cast is None else cast, self.steps, scale, inf, rate, step_index, lr, beta1,
                beta2, math.log(_fp32(beta1)), math.log(_fp32(beta2)), eps, decay, self.tile, self.latency,
                cast is not None, unscale))


def export_for_check(out_dir, gpu_code="sm_90") -> list[str]:
    """Compile the AdamW kernel ahead of time (no GPU needed), without a cast and with an fp16 or
    bf16 one, and with the fp16 one leaving the gradients as they are; the cubin paths."""
    if ct is None:
        kernels.require()
    from cuda.tile import compilation as cc

    from kernels.aot import array_param, export

    f32 = array_param(ct.float32, 1)
    scalar = cc.ScalarConstraint(ct.float32)
    paths = []
    for w, name, unscale in [(f32, "adamw_float32", True),
                             (array_param(ct.float16, 1), "adamw_float32_cast_float16", True),
                             (array_param(ct.bfloat16, 1), "adamw_float32_cast_bfloat16", True),
                             (array_param(ct.float16, 1), "adamw_float32_cast_float16_scaled_grads", False)]:
        params = [f32, f32, f32, f32, w, f32, f32, f32, f32, cc.ScalarConstraint(ct.int32),
                  *[scalar] * 7, TILE, LATENCY, w is not f32, unscale]
        paths.append(export(_hinted(), name, params, out_dir, gpu_code))
    return paths
