"""Workloads: each one builds its inputs, names its providers, counts FLOPs and bytes, and gives
the reference output that every provider is checked against before it is timed.

A provider is a name and a factory `make(params, inputs) -> fn`, where `fn()` runs the operation
once and returns its output (a tensor or a tuple of tensors, shaped like the reference). A factory
that cannot run here raises `Unavailable` with a one-line reason; the case is then `skipped`.
"""
from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable

Params = dict[str, Any]
Factory = Callable[[Params, Any], Callable[[], Any]]


class Unavailable(Exception):
    """A provider cannot run on this machine; the message is the reason, in one line."""


@dataclass(frozen=True)
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
    # the folder of the tuned files its kernels read (kernels/tuned.py's store; None: kernels/tuned),
    # where `bench.tune` writes their winners
    tuned_dir: Any = None
    # whether a provider's call depends only on its inputs, so that timed reps can read inputs drawn
    # afresh and be checked against the reference of what they read; False for a step that carries
    # state from call to call (an optimizer's), which only its first call is checked on
    rotate: bool = True
    # classes of its own, Mappings, that its providers return and the gate walks as it walks a dict:
    # reading one is part of judging it (model_step's reads the gradients when the gate looks, so a
    # timed step spends no host time gathering them); any other class a provider returns is refused
    outputs: tuple[type, ...] = ()
    # how a report shows it without naming it: the axes its plots may run along (the first that
    # varies), the axes whose values are regimes never mixed in one headline verdict (fwd and
    # fwd_bwd, eager and graphed), and the axes whose values get plots of their own (one per model)
    x_axes: tuple[str, ...] = ()
    regimes: tuple[str, ...] = ()
    panels: tuple[str, ...] = ()
    # the providers a report's headline is about and bench.tune tunes (the workload's own kernels;
    # none named: every provider but the sweep's baseline), and a note the report prints under the
    # workload's results (numbers reported elsewhere, never plotted)
    subject: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self):
        # read-only, as the whole object is: a provider running in a worker cannot swap another
        # provider, the reference or the input maker for the cases after its own
        if isinstance(self.providers, dict):  # anything else is refused by name when loaded
            object.__setattr__(self, "providers", MappingProxyType(dict(self.providers)))

    def is_subject(self, provider: str, baseline: str) -> bool:
        """Whether `provider` is one of the workload's own kernels (bench/present/report.py's
        headline reads the same rule from a run's hints)."""
        return provider in self.subject if self.subject else provider != baseline

    def hints(self) -> dict:
        """The presentation hints as plain data: a run records them in its meta.json, so that a
        report lays the workload out without importing it."""
        return {"x_axes": list(self.x_axes), "regimes": list(self.regimes),
                "panels": list(self.panels), "subject": list(self.subject), "note": self.note}


GROUP = "cutile_bench.workloads"  # the entry-point group a package declares its workloads in
OWN_DIST = "cutile-bench"
# The same declarations as pyproject.toml's entry points, for a checkout that is not pip-installed
# (no metadata to read them from); an installed one reads them from its metadata like any other.
_UNINSTALLED = {
    "adamw": "bench.workloads.adamw:WORKLOAD",
    "fmha": "bench.workloads.fmha:WORKLOAD",
    "layernorm": "bench.workloads.layernorm:WORKLOAD",
    "model_head": "bench.workloads.model_head:WORKLOAD",
    "model_step": "bench.workloads.model_step:WORKLOAD",
}


class WorkloadError(KeyError):
    """A workload name or spec that does not resolve; the message is one line."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _dist_name(ep) -> str:
    dist = getattr(ep, "dist", None)
    return (dist.metadata["Name"] or "?") if dist is not None else "?"


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


@functools.lru_cache(maxsize=None)
def _declared() -> tuple[dict[str, str], tuple[str, ...]]:
    """({name: 'module:ATTR'} of every workload declared in the group, [one-line notes]).

    Ours are declared the same way; a name another package declares too stays ours (a note says
    so), and a name two other packages declare resolves to neither (WorkloadError names both)."""
    from importlib import metadata

    found: dict[str, dict[str, str]] = {}  # name -> {dist: value}
    for ep in metadata.entry_points(group=GROUP):
        found.setdefault(ep.name, {}).setdefault(_dist_name(ep), ep.value)
    ours = {n: v for n, by in found.items() for d, v in by.items() if _norm(d) == OWN_DIST}
    if not ours:  # a checkout that is not installed: our declarations, as pyproject.toml has them
        ours = dict(_UNINSTALLED)
        for name, value in ours.items():
            found.setdefault(name, {})[OWN_DIST] = value
    table, notes = dict(ours), []
    for name, by in sorted(found.items()):
        others = sorted(d for d in by if _norm(d) != OWN_DIST)
        if name in ours and others:
            notes.append(f"workload '{name}' declared by {', '.join(others)} is ignored: "
                         f"the built-in '{name}' wins (name it as module:NAME instead)")
        elif len(others) > 1:
            table[name] = "!" + " and ".join(f"{d} ({by[d]})" for d in others)
        elif others:
            table[name] = by[others[0]]
    return table, tuple(notes)


def names() -> list[str]:
    """The names of every declared workload (built-in and installed)."""
    return sorted(_declared()[0])


def notes() -> list[str]:
    """One line for each declared name that another declaration of it lost to."""
    return list(_declared()[1])


_loaded: dict[str, Workload] = {}


def loaded() -> dict[str, Workload]:
    """The workloads this process has resolved so far, by the name they were asked for."""
    return dict(_loaded)


def _load(spec: str, what: str) -> Workload:
    module, _, attr = spec.partition(":")
    module, attr = module.strip(), attr.strip()
    if not module or not attr:
        raise WorkloadError(f"{what}: expected 'package.module:NAME', got {spec[:80]!r}")
    try:
        mod = importlib.import_module(module)
    except (Exception, SystemExit) as e:  # a module that exits as it is imported: a script's argparse
        msg = " ".join(str(e).split())[:200]
        raise WorkloadError(f"{what}: importing {module[:80]} failed ({type(e).__name__}: {msg})") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise WorkloadError(f"{what}: module {module[:80]} has no attribute {attr[:80]!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Workload):
        raise WorkloadError(f"{what}: {spec[:80]} is a {type(obj).__name__}, not a bench.workloads.Workload")
    if not isinstance(obj.providers, MappingProxyType) or not all(callable(f) for f in obj.providers.values()):
        raise WorkloadError(f"{what}: {spec[:80]}'s providers must be a dict of name -> factory")
    for part in ("make_inputs", "reference"):
        if not callable(getattr(obj, part)):
            raise WorkloadError(f"{what}: {spec[:80]}'s {part} is not callable")
    return obj


def get(name: str) -> Workload:
    """The workload `name`: a name declared in the entry-point group GROUP (ours are too), or a
    'package.module:NAME' spec of a Workload object. WorkloadError (a KeyError) with one line
    when it does not resolve."""
    if name in _loaded:
        return _loaded[name]
    if ":" in name:
        wl = _load(name, f"workload '{name[:80]}'")
    else:
        table = _declared()[0]
        if name not in table:
            raise WorkloadError(f"unknown workload '{name[:80]}' (known: {', '.join(names())}; "
                                f"or name one as package.module:NAME)")
        if table[name].startswith("!"):
            raise WorkloadError(f"workload '{name}' is declared by {table[name][1:]}: "
                                f"name one as package.module:NAME")
        wl = _load(table[name], f"workload '{name}' ({table[name]})")
        for note in _declared()[1]:
            if note.startswith(f"workload '{name}' "):
                print(note, file=sys.stderr)
    _loaded[name] = wl
    return wl


def load_user_provider(spec: str) -> Factory:
    """A provider factory from 'module:function' (the module must be importable)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), attr)
