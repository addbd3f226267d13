"""What a case can leave behind in its worker process: torch's global settings, host memory and
CUDA memory. A worker compares them after every case with what it saw when it started, and one that
changed is replaced before the next case, so no case's result depends on the case before it."""
from __future__ import annotations

import gc

import psutil
import torch

# host memory a worker may grow by: allocator caches and lazy library init; on a GPU the libraries
# that load at their first use (cuDNN, NVRTC, Triton, the cuTile compiler's modules) add more: a
# worker on an H100 grew by 730 MB over its first cases with no leak, its CUDA context excluded
RSS_ALLOWANCE = {"cpu": 512 << 20, "cuda": 2 << 30}
CUDA_ALLOWANCE = 16 << 20  # CUDA memory still allocated after a case's tensors are gone


def settings() -> dict:
    """torch's process-wide settings that change how fast or how exactly the next case runs."""
    cuda = torch.backends.cuda.matmul
    return {
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
        "autocast_cuda": torch.is_autocast_enabled("cuda"),
        "default_dtype": str(torch.get_default_dtype()),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": cuda.allow_tf32,
        "cuda_matmul_allow_fp16_reduced_precision": cuda.allow_fp16_reduced_precision_reduction,
        "cudnn_enabled": torch.backends.cudnn.enabled,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }


def warm(device: torch.device) -> None:
    """Create the CUDA context and cuBLAS's handle before the clean snapshot, so that the first
    case's share of them (several hundred MB of host memory) is not counted as its leak."""
    if device.type == "cuda":
        a = torch.ones(64, 64, device=device)
        (a @ a).sum().item()


def snapshot(device: torch.device) -> dict:
    """The state to compare against: settings, host RSS and CUDA memory allocated, the latter once
    reference cycles (a captured graph and the closures around it) are collected."""
    gc.collect()
    cuda = 0
    if device.type == "cuda":
        # cuBLAS keeps a 32 MB workspace per stream it has seen in torch's allocator: torch's own,
        # not a case's (on an H100 every case that used a new stream "leaked" 32 MB of it)
        getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
        cuda = torch.cuda.memory_allocated(device)
    return {"settings": settings(), "rss": psutil.Process().memory_info().rss, "cuda": cuda}


def changes(clean: dict, device: torch.device) -> dict:
    """{what: [then, now]} for everything that differs from `clean` beyond its allowance."""
    now = snapshot(device)
    out = {k: [v, now["settings"][k]] for k, v in clean["settings"].items() if now["settings"][k] != v}
    if now["rss"] - clean["rss"] > RSS_ALLOWANCE[device.type]:
        out["rss_mb"] = [clean["rss"] >> 20, now["rss"] >> 20]
    if now["cuda"] - clean["cuda"] > CUDA_ALLOWANCE:
        out["cuda_allocated_mb"] = [clean["cuda"] >> 20, now["cuda"] >> 20]
    return out
