"""Workloads: each one builds its inputs, names its providers, counts FLOPs and bytes, and gives
the reference output that every provider is checked against before it is timed.

A provider is a name and a factory `make(params, inputs) -> fn`, where `fn()` runs the operation
once and returns its output (a tensor or a tuple of tensors, shaped like the reference). A factory
that cannot run here raises `Unavailable` with a one-line reason; the case is then `skipped`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

Params = dict[str, Any]
Factory = Callable[[Params, Any], Callable[[], Any]]


class Unavailable(Exception):
    """A provider cannot run on this machine; the message is the reason, in one line."""


@dataclass
class Workload:
    name: str
    make_inputs: Callable[[Params, Any], Any]  # (params, torch.device) -> fresh random inputs
    reference: Callable[[Params, Any], Any]  # (params, inputs) -> high-precision output
    providers: dict[str, Factory]
    flops: Callable[[Params], float] | None = None
    bytes: Callable[[Params], float] | None = None
    # every axis of the workload, with the value used when a sweep leaves it out
    defaults: Params = field(default_factory=dict)
    # the allowed values of axes that take one of a few (dtype, mode, ...)
    choices: dict[str, list] = field(default_factory=dict)
    # params -> (kernel, dim, size, config, timed): where kernels/tuned.py remembers the config a
    # case of the cutile provider ran, and whether its time counts or it only gates the config;
    # None for a case that runs no single tunable kernel
    tuned_key: Callable[[Params], tuple | None] | None = None
    # whether a provider's call depends only on its inputs, so that timed reps can read inputs drawn
    # afresh and be checked against the reference of what they read; False for a step that carries
    # state from call to call (an optimizer's), which only its first call is checked on
    rotate: bool = True
    # how a report shows it without naming it: the axes its plots may run along (the first that
    # varies), the axes whose values are regimes never mixed in one headline verdict (fwd and
    # fwd_bwd, eager and graphed), and the axes whose values get plots of their own (one per model)
    x_axes: tuple[str, ...] = ()
    regimes: tuple[str, ...] = ()
    panels: tuple[str, ...] = ()


_BUILTIN = {
    "fmha": "bench.workloads.fmha",
    "layernorm": "bench.workloads.layernorm",
    "model_head": "bench.workloads.model_head",
    "model_step": "bench.workloads.model_step",
}


def names() -> list[str]:
    return sorted(_BUILTIN)


def get(name: str) -> Workload:
    """The workload called `name`; KeyError if there is none."""
    if name not in _BUILTIN:
        raise KeyError(name)
    return importlib.import_module(_BUILTIN[name]).WORKLOAD


def load_user_provider(spec: str) -> Factory:
    """A provider factory from 'module:function' (the module must be importable)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), attr)
