"""A canary: any provider of a workload made slower by a known share of its own real work, so that
whether a comparison catches it measures the sensitivity of the whole chain (machine, timing,
verdict) on real kernels rather than on a spin-wait.

Named in a sweep as user providers, with two provider axes: `wraps` (the provider wrapped: a
workload's "workload:provider", or a user provider's "module:function") and `repeats` (n). The
`twin` calls the wrapped provider n times per timed rep, the `canary` n + 1 times: the same kernel on the same inputs, slower by exactly 1/n of real work on
a CPU and on a GPU alike (5% at n = 20). Both return the wrapped provider's output, so the
correctness gate still checks the kernel.
"""
from __future__ import annotations

from bench import workloads

AXES = ("wraps", "repeats")  # the canary's own parameters, not passed on to the wrapped provider


def _calls(params: dict, inputs, calls: int):
    spec = str(params["wraps"])
    workload, _, provider = spec.partition(":")
    known = workloads.get(workload).providers if workload in workloads.names() else {}
    factory = known[provider] if provider in known else workloads.load_user_provider(spec)
    fn = factory({k: v for k, v in params.items() if k not in AXES}, inputs)

    def repeated():
        for _ in range(calls - 1):
            fn()
        return fn()
    return repeated


def twin(params: dict, inputs):
    """The wrapped provider, `repeats` calls a rep."""
    return _calls(params, inputs, int(params["repeats"]))


def canary(params: dict, inputs):
    """The wrapped provider, `repeats` + 1 calls a rep: slower than the twin by 1/repeats."""
    return _calls(params, inputs, int(params["repeats"]) + 1)
