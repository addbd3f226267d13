"""User providers for the layernorm workload (named in a sweep as `module: delay_provider:NAME`)
whose time per call is fixed by a spin-wait rather than by the machine's load, so a comparison of
two runs sees exactly the slowdown put in: `slowed` takes 10% longer than `steady`."""
import time

from bench import workloads

STEADY_MS = 0.5  # short, so that few calls are preempted on a busy machine


def _spinning(params, inputs, ms: float):
    """Returns the reference output of the inputs it is given, `ms` after it was called (the
    reference's own cost, far less than `ms`, falls inside the delay instead of adding to it)."""
    reference = workloads.get("layernorm").reference

    def fn():
        end = time.perf_counter() + ms / 1e3
        out = reference(params, inputs)
        while time.perf_counter() < end:
            pass
        return out
    return fn


def steady(params, inputs):
    return _spinning(params, inputs, STEADY_MS)


def slowed(params, inputs):
    return _spinning(params, inputs, STEADY_MS * 1.10)


def quick(params, inputs):
    """A second steady provider, at another speed, that must not be flagged."""
    return _spinning(params, inputs, STEADY_MS * 0.75)


def tiled(params, inputs):
    """A stand-in for a tile-config sweep: the time grows with rows_per_block (1: 0.25 ms, 2: 0.5
    ms, ...), except that rows_per_block 1 at 16 rows is wrong (its output is off by one)."""
    fn = _spinning(params, inputs, STEADY_MS * params["rows_per_block"] / 2)
    if params["rows_per_block"] == 1 and params["rows"] == 16:
        return lambda: fn() + 1
    return fn


def off(params, inputs):
    """Steady, but its output is wrong: the case is `incorrect`."""
    fn = steady(params, inputs)
    return lambda: fn() + 1.0
