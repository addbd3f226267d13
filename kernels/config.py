"""The launch configs that the kernels take as keyword arguments: their defaults, their limits and
their validation. Plain data that imports no kernel, so the tuned files (kernels/tuned.py) can be
read and checked where cuda-tile is absent, and the kernels can import tuned.py without a circle."""
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


FMHA_DEFAULTS = {"tile_m": 64, "tile_n": 64, "k_lat": 2, "v_lat": 5, "occupancy": 3, "num_ctas": 1,
                 "num_worker_warps": None, "head_group": 1, "fused_dq": 0}
_FMHA_LIMITS = {  # key: (smallest, largest, must be a power of two)
    "tile_m": (16, 256, True),
    "tile_n": (16, 256, True),
    "k_lat": (1, 10, False),
    "v_lat": (1, 10, False),
    "occupancy": (1, 32, False),
    "num_ctas": (1, 16, True),
    "num_worker_warps": (4, 8, True),  # 4 and 8 are what tileiras 13.4 takes
    "head_group": (0, 4096, False),
    "fused_dq": (0, 1, False),
}

LAYERNORM_MAX_N = 8192  # one row must fit in one tile of registers
# Forward launch config. The defaults were measured on an H100 with sweeps/layernorm_tune.yaml
# (docs/layernorm-notes.md); None lets the launch code (or, for the hints, the compiler) choose.
LAYERNORM_FWD_DEFAULTS = {
    "rows_per_block": None,  # rows a block normalises at once; None: layernorm._fwd_shape chooses
    "chunk": None,           # columns per load, a row being cdiv(N, chunk) of them; None: layernorm._chunk
    "blocks_per_sm": 2,      # persistent grid size
    "occupancy": None,       # compiler hint; None: blocks_per_sm when persistent, else inferred
    "num_worker_warps": 8,   # compiler hint
    "latency": 5,            # DRAM latency hint (1-10) of the x loads
}
_LAYERNORM_FWD_LIMITS = {"rows_per_block": (1, 4096, True), "chunk": (16, LAYERNORM_MAX_N, True),
                         "blocks_per_sm": (1, 32, False), "occupancy": (1, 32, False),
                         "num_worker_warps": (1, 32, True), "latency": (1, 10, False)}
_LAYERNORM_FWD_OPTIONAL = {"rows_per_block", "chunk", "occupancy", "num_worker_warps", "latency"}
# Backward launch config. Its best differs by shape with no one rule (8 rows, 1 block an SM ran
# 8192 x 13 fp16 in 15.9 us against the default's 17.9, and lost at 2048 and 4096 rows and from 64
# columns; H100), so a tuned file can hold it per shape.
LAYERNORM_BWD_DEFAULTS = {
    "rows_per_block": None,  # rows a block takes at once; None: layernorm._bwd_shape chooses
    "chunk": None,           # columns per load; None: one padded tile a row (chunks measured 2-3x slower)
    "blocks_per_sm": 2,      # persistent grid size, and the kernel's occupancy hint
}
_LAYERNORM_BWD_LIMITS = {k: _LAYERNORM_FWD_LIMITS[k] for k in LAYERNORM_BWD_DEFAULTS}


def validate_fmha(config: dict) -> dict:
    """FMHA_DEFAULTS updated with `config`; ValueError naming the first bad key or value."""
    return validate("fmha", config, FMHA_DEFAULTS, _FMHA_LIMITS, optional={"num_worker_warps"})


def validate_layernorm_fwd(config: dict) -> dict:
    """LAYERNORM_FWD_DEFAULTS updated with `config`; ValueError naming the first bad key or value."""
    return validate("layer_norm forward", config, LAYERNORM_FWD_DEFAULTS, _LAYERNORM_FWD_LIMITS,
                    _LAYERNORM_FWD_OPTIONAL)


def validate_layernorm_bwd(config: dict) -> dict:
    """LAYERNORM_BWD_DEFAULTS updated with `config`; ValueError naming the first bad key or value."""
    return validate("layer_norm backward", config, LAYERNORM_BWD_DEFAULTS, _LAYERNORM_BWD_LIMITS,
                    {"rows_per_block", "chunk"})
