"""The run's fingerprint (GPU, driver, libraries, host, git) and per-case NVML telemetry."""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from kernels import tuned

ROOT = Path(__file__).resolve().parents[2]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no driver, no library: telemetry is simply absent
        return None


def git_state() -> dict:
    """The commit measured: git's HEAD, or BENCH_GIT_SHA for a tree copied without its history;
    for a tree with uncommitted changes, the hash of their diff too (what tells two such trees
    apart)."""
    def git(*args) -> bytes:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, timeout=10).stdout
    try:
        sha = git("rev-parse", "--verify", "--quiet", "HEAD^{commit}").decode().strip() or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip()) if sha else None
        diff = hashlib.sha256(git("diff", "HEAD", "--binary")).hexdigest() if dirty else None
    except (OSError, subprocess.SubprocessError):
        sha, dirty, diff = None, None, None
    if sha is None and os.environ.get("BENCH_GIT_SHA"):
        sha = os.environ["BENCH_GIT_SHA"]
    return {"sha": sha, "dirty": dirty, **({"diff_sha256": diff} if diff else {})}


def _tileiras_version() -> str | None:
    try:
        from cuda.tile._compile import _find_compiler_bin

        out = subprocess.run([_find_compiler_bin().path, "--version"], capture_output=True,
                             text=True, timeout=20).stdout
        return out.strip().splitlines()[-1] if out.strip() else None
    except Exception:
        return None


def gpu_info(index: int) -> dict:
    props = torch.cuda.get_device_properties(index)
    info = {"index": index, "name": props.name, "sm_count": props.multi_processor_count,
            "memory_gb": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}"}
    nv = _nvml()
    if nv is not None:
        try:
            h = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = nv.nvmlDeviceGetUUID(h)
            info["uuid"] = uuid.decode() if isinstance(uuid, bytes) else uuid
            info["max_sm_clock_mhz"] = nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)
            info["max_mem_clock_mhz"] = nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)
        except Exception:
            pass
    return info


def max_sm_clock_mhz(index: int) -> int | None:
    """The GPU's maximum SM clock: the reference that clock-normalised times are scaled to."""
    nv = _nvml()
    try:
        return nv.nvmlDeviceGetMaxClockInfo(nv.nvmlDeviceGetHandleByIndex(index), nv.NVML_CLOCK_SM)
    except Exception:  # no NVML (nv is None) or no answer
        return None


def fingerprint(gpu_indices: list[int]) -> dict:
    nv = _nvml()
    driver = None
    if nv is not None:
        try:
            driver = nv.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else driver
        except Exception:
            pass
    gpus = [gpu_info(i) for i in gpu_indices]
    return {
        "host": platform.node(), "platform": platform.platform(), "python": sys.version.split()[0],
        "torch": torch.__version__, "cuda": torch.version.cuda, "driver": driver,
        "cuda_tile": _version("cuda-tile"), "tileiras": _tileiras_version() if gpu_indices else None,
        "device_kind": "cuda" if gpu_indices else "cpu",
        "gpus": gpus, "tuned": tuned.fingerprint(gpus[0]["name"]) if gpus else None,
    }


def _git_words(git: dict) -> str:
    sha = (git.get("sha") or "no commit")[:10]
    return f"{sha} with uncommitted changes" if git.get("dirty") else sha


def _gpu_words(gpus: list) -> str:
    return ", ".join(f"{g.get('name')} {g.get('uuid', '')}".strip() for g in gpus) or "no GPU"


def elsewhere(meta: dict) -> str | None:
    """How the code or machine a run was measured with (its meta.json) differs from this one, in
    words; None when they are the same. Cases measured on both would be mixed in one run."""
    then_git, now_git = meta.get("git") or {}, git_state()
    if any(then_git.get(k) != now_git.get(k) for k in ("sha", "dirty", "diff_sha256")):
        return f"it was measured at {_git_words(then_git)}, this tree is {_git_words(now_git)}"
    devices = meta.get("devices") or []
    gpus = sorted({int(d.split(":")[1]) for d in devices if d.startswith("cuda:")})
    if gpus and gpus[-1] >= (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        return f"it ran on {', '.join(devices)}, which this machine lacks"
    then, now = meta.get("env") or {}, fingerprint(gpus)
    for key, value in now.items():
        if key == "gpus":  # by what the run recorded of each (a run from before UUIDs has none)
            known = [{k: g.get(k) for k in t} for t, g in zip(then.get(key) or [], value)]
            if len(then.get(key) or []) != len(value) or known != (then.get(key) or []):
                return f"it ran on {_gpu_words(then.get(key) or [])}, this machine has {_gpu_words(value)}"
        elif key in then and then[key] != value:
            return f"its {key} was {then[key]}, here it is {value}"
    return None


_THROTTLE = {  # NVML clocks-event reason bits worth naming
    0x1: "gpu_idle", 0x2: "app_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake", 0x100: "display_clocks",
}


# reasons that lower the SM clock below what the load asks for; a batch timed under one is re-taken
SLOWING = frozenset({"sw_power_cap", "hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake"})


def _reasons(bits: int) -> list[str]:
    return [name for bit, name in _THROTTLE.items() if bits & bit and bit != 0x1]


def clock_probe(index: int):
    """A cheap reading taken once per timed batch, or None without NVML: a callable returning
    `{"sm_mhz": the current SM clock, "slowed": the active SLOWING reasons}` (two NVML calls on a
    handle looked up once), or None when NVML does not answer."""
    nv = _nvml()
    if nv is None:
        return None
    try:
        h = nv.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None

    def probe() -> dict | None:
        try:
            bits = nv.nvmlDeviceGetCurrentClocksThrottleReasons(h)
            return {"sm_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                    "slowed": [r for r in _reasons(bits) if r in SLOWING]}
        except Exception:
            return None
    return probe


def telemetry(index: int) -> dict | None:
    """SM and memory clocks, temperature, power and active throttle reasons of GPU `index`, with
    its power limit and energy counter where NVML has them (the counter is what a window's mean
    power comes from: mean_power_w)."""
    nv = _nvml()
    if nv is None:
        return None
    try:
        h = nv.nvmlDeviceGetHandleByIndex(index)
        reasons = nv.nvmlDeviceGetCurrentClocksThrottleReasons(h)
        reading = {
            "sm_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
            "mem_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
            "temp_c": nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
            "power_w": nv.nvmlDeviceGetPowerUsage(h) / 1000,
            "throttle": _reasons(reasons),
        }
    except Exception:
        return None
    for key, read in (("power_limit_w", nv.nvmlDeviceGetEnforcedPowerLimit),
                      ("energy_j", nv.nvmlDeviceGetTotalEnergyConsumption)):
        try:
            reading[key] = read(h) / 1000  # mW, mJ
        except Exception:  # GPUs before Volta have no energy counter
            pass
    return reading


def mean_power_w(before: dict | None, after: dict | None, seconds: float) -> float | None:
    """The GPU's mean power over a window of `seconds` whose ends the energy counter was read at:
    near the power limit, a case's time is set by the energy its work takes, not by its clock."""
    try:
        return round((after["energy_j"] - before["energy_j"]) / seconds, 1)
    except (TypeError, KeyError, ZeroDivisionError):
        return None
