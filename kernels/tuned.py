"""Tuned launch configs the kernels remember: kernels/tuned/<gpu slug>.json, written by
`python -m bench.tune`, read here when a caller gives a kernel no config.

Kernels of other packages use the same store in a folder of their own (`directory`): their configs
are checked only for being flat (names to numbers, strings or flags), since only the kernel knows
which values it takes.

A config is keyed by GPU, kernel, dtype, dim (head_dim or hidden) and a bucket of the size (T or
rows): the smallest power of two at or above it. A lookup takes its own bucket, or else the
nearest bucket tuned for that kernel, dtype and dim (nearest in log2; the smaller on a tie), or
else the kernel's defaults. Any tuned config is a correct config at any size (the parity tests run
each one), so a neighbouring bucket's winner is a guess about speed only.

The wrappers that call lookup() run thousands of times per training step, so everything past the
first call for a (device, dtype, dim, bucket) comes from a cache; a file that cannot be used costs
one log line and the defaults, never an error.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from pathlib import Path

from kernels import config

DIR = Path(__file__).with_name("tuned")
log = logging.getLogger(__name__)

# kernel -> its config validator: config -> the full config, validator({}) the defaults
KERNELS = {
    "fmha_fwd": config.validate_fmha,        # causal
    "fmha_fwd_full": config.validate_fmha,   # not causal
    "layernorm_fwd": config.validate_layernorm_fwd,
    "layernorm_bwd": config.validate_layernorm_bwd,
}


def slug(gpu_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the tuned file's name."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")


def bucket(n: int) -> int:
    """The smallest power of two at or above n (at least 1)."""
    return 1 << max(0, n - 1).bit_length()


def flat(config: dict) -> dict:
    """The check of a kernel this module does not know: a flat dict of names to numbers, strings or
    flags (the kernel itself rejects values it cannot take); {} are its defaults."""
    if not isinstance(config, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float, str, bool)) for k, v in config.items()):
        raise ValueError(f"a config is a flat mapping of names to numbers, strings or flags, not {config!r}")
    return dict(config)


def validator(kernel: str):
    return KERNELS.get(kernel, flat)


def path_for(gpu_name: str, directory: Path | None = None) -> Path:
    return Path(directory or DIR) / f"{slug(gpu_name)}.json"


def read(path: Path) -> dict:
    """A tuned file as {"gpu": name, "configs": [entry, ...]}; ValueError saying what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("gpu"), str) \
            or not isinstance(data.get("configs"), list):
        raise ValueError(f"{path}: expected an object with 'gpu' (a name) and 'configs' (a list)")
    for i, e in enumerate(data["configs"]):
        if not (isinstance(e, dict) and isinstance(e.get("kernel"), str) and isinstance(e.get("dtype"), str)
                and all(isinstance(e.get(k), int) for k in ("dim", "bucket"))
                and isinstance(e.get("config"), dict)):
            raise ValueError(f"{path}: configs[{i}] needs kernel (a name), dtype, "
                             f"dim, bucket and config")
        try:
            validator(e["kernel"])(e["config"])
        except ValueError as err:
            raise ValueError(f"{path}: configs[{i}]: {err}") from None
    return data


def fingerprint(gpu_name: str, directory: Path | None = None) -> dict | None:
    """{file, sha256} of the tuned file the kernels read on this GPU, None when there is none:
    what a run records, so that its numbers can be traced to the configs behind them."""
    path = path_for(gpu_name, directory)
    if not path.exists():
        return None
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _gpu_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def _table(gpu_name: str, directory: Path) -> dict:
    """{(kernel, dtype, dim): {bucket: config}} from this GPU's file; {} (and one log line saying
    why) when it is missing while other GPUs' files exist, or cannot be used."""
    path = path_for(gpu_name, directory)
    if not path.exists():
        others = sorted(p.stem for p in directory.glob("*.json"))
        if others:
            log.warning("tuned configs ignored: there are files for %s only, not for this GPU, %s "
                        "(%s.json); the kernels use their defaults", ", ".join(others), gpu_name,
                        slug(gpu_name))
        return {}
    try:
        data = read(path)
        if slug(data["gpu"]) != slug(gpu_name):
            raise ValueError(f"{path}: tuned on {data['gpu']}, not this GPU ({gpu_name})")
    except ValueError as e:
        log.warning("tuned configs ignored: %s; the kernels use their defaults", e)
        return {}
    table: dict = {}
    for e in data["configs"]:
        table.setdefault((e["kernel"], e["dtype"], e["dim"]), {})[e["bucket"]] = e["config"]
    return table


def nearest(buckets, b: int) -> int:
    """The bucket closest to b in log2 (the smaller on a tie)."""
    return min(buckets, key=lambda x: (abs(x.bit_length() - b.bit_length()), x))


@functools.lru_cache(maxsize=None)
def _by_bucket(kernel: str, device_index: int, dtype, dim: int, b: int, directory: Path) -> dict:
    check = validator(kernel)
    found = _table(_gpu_name(device_index), directory).get((kernel, str(dtype).removeprefix("torch."), dim))
    return check(found[nearest(found, b)] if found else {})


@functools.lru_cache(maxsize=4096)
def lookup(kernel: str, device_index: int, dtype, dim: int, size: int, directory: Path | None = None) -> dict:
    """The full launch config of `kernel` for the GPU of this index, a torch dtype, dim and size:
    tuned, or the defaults ({} for a kernel of another package, read from its `directory`). Cached
    by size too (a hit is one dict lookup, no bucket arithmetic); shared: callers must not change it."""
    return _by_bucket(kernel, device_index, dtype, dim, bucket(size), Path(directory or DIR))


def clear() -> None:
    """Forget every cached file and lookup (after a tuned file changes)."""
    for cached in (_table, _by_bucket, lookup):
        cached.cache_clear()
