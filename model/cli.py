"""What the model's commands share: bad user input ends in one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import torch

from bench.cli import BadInput, disk_error


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(message: str):
    """Stop with one line and exit status 2: for errors the user caused, not for bugs."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def command(main):
    """A model command's main(argv), as bench.cli.command guards the bench's: BadInput raised
    anywhere below it, and filesystem errors (a directory given for a file, a full disk), end in
    one line and exit status 2, not a traceback. Bugs still raise."""
    @functools.wraps(main)
    def guarded(argv=None):
        try:
            return main(argv)
        except BadInput as e:
            fail(str(e))
        except OSError as e:
            fail(disk_error(e))
    return guarded


def check_options(args, rules) -> None:
    """Fail on the first option set to a value its rule refuses. rules: (dests, test, what the
    value must be); NaN passes no comparison, so a test of bounds refuses it too."""
    for names, ok, what in rules:
        for name in names:
            value = getattr(args, name)
            if value is not None and not ok(value):
                fail(f"--{name.replace('_', '-')} must be {what}, got {value}")


def writable(path: Path, option: str, directory: bool = True) -> None:
    """Fail now, before anything is computed, where `option`'s output path cannot be written: a
    file given for a directory (or the reverse), or a folder that cannot be made or written to."""
    if directory and path.exists() and not path.is_dir():
        fail(f"{option} {path}: a file, not a directory")
    if not directory and path.is_dir():
        fail(f"{option} {path}: a directory, not a file")
    folder = path if directory else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{option} {path}: {disk_error(e)}")
    if not os.access(folder, os.W_OK) or (not directory and path.exists() and not os.access(path, os.W_OK)):
        fail(f"{option} {path}: not writable")


def pick_device(name: str | None) -> torch.device:
    """The named device, or CUDA when there is one, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {name}: no CUDA GPU is visible to torch")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)  # a device torch names but cannot reach here (mps, xla) fails now
    except (RuntimeError, ImportError) as e:
        fail(f"--device {name}: not a device torch can use here ({type(e).__name__}); try cpu or cuda")
    return device


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast(device: torch.device, dtype: str, cache: bool = True):
    """Mixed precision in `dtype` on `device`; float32 means no autocast. cache=False for a step
    captured in a CUDA graph: a weight cast cached during the capture would be stale at replays."""
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "float32", cache_enabled=cache)
