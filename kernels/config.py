"""Validation of the launch configs that the kernels take as keyword arguments."""
from __future__ import annotations


def validate(kind: str, config: dict, defaults: dict, limits: dict, optional=frozenset()) -> dict:
    """`defaults` updated with `config`; ValueError naming the first unknown key or bad value.

    limits: key -> (smallest, largest, must be a power of two). A key in `optional` may also be
    None: the launch code or the compiler then chooses.
    """
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {kind} config key(s) {unknown}; known: {sorted(defaults)}")
    cfg = {**defaults, **config}
    for key, (lo, hi, pow2) in limits.items():
        val = cfg[key]
        if val is None and key in optional:
            continue
        if isinstance(val, bool) or not isinstance(val, int) or not lo <= val <= hi:
            raise ValueError(f"{kind} config {key}={val!r}: expected an integer in [{lo}, {hi}]")
        if pow2 and val & (val - 1):
            raise ValueError(f"{kind} config {key}={val}: expected a power of two")
    return cfg
