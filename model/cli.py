"""What the model's commands share: bad user input ends in one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import sys

import torch


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(message: str):
    """Stop with one line and exit status 2: for errors the user caused, not for bugs."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def pick_device(name: str | None) -> torch.device:
    """The named device, or CUDA when there is one, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {name}: no CUDA GPU is visible to torch")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast(device: torch.device, dtype: str, cache: bool = True):
    """Mixed precision in `dtype` on `device`; float32 means no autocast. cache=False for a step
    captured in a CUDA graph: a weight cast cached during the capture would be stale at replays."""
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "float32", cache_enabled=cache)
