"""User providers (named in a sweep as `module: faulty_providers:NAME`) that misbehave on purpose,
so the tests can check that each failure costs only its own case."""
import os
import time

import torch

from bench.workloads import fmha


def wrong(params, inputs):
    """Runs fine, but off by far more than any tolerance."""
    fn = fmha.native(params, inputs)
    return lambda: fn() + 1.0


def abort(params, inputs):
    os.abort()


def hang(params, inputs):
    time.sleep(3600)


def oom(params, inputs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1024.00 GiB")


def slow(params, inputs):
    """The native path plus a fixed delay: takes long enough to interrupt a run mid-way."""
    fn = fmha.native(params, inputs)

    def run():
        time.sleep(0.02)
        return fn()
    return run


def gated(params, inputs):
    """Native, but a case with seq_len above 9 waits until the file named by BENCH_TEST_GATE
    exists: a run cannot finish before the test opens the gate, however loaded the machine is."""
    gate = os.environ["BENCH_TEST_GATE"]
    while params["seq_len"] > 9 and not os.path.exists(gate):
        time.sleep(0.01)
    return fmha.native(params, inputs)


_kept = []  # what `leak` never frees


def threads(params, inputs):
    """Changes process-wide settings and never puts them back."""
    torch.set_num_threads(torch.get_num_threads() + 1)
    torch.set_grad_enabled(False)
    return fmha.native(params, inputs)


def leak(params, inputs):
    """Keeps 768 MiB of host memory alive after its case ends."""
    _kept.append(torch.ones(768 << 18))  # float32: 768 MiB, every page written
    return fmha.native(params, inputs)


def seen(params, inputs):
    """Native, and appends what its worker looks like to the file named by BENCH_TEST_SEEN."""
    import json

    import psutil

    with open(os.environ["BENCH_TEST_SEEN"], "a") as f:
        f.write(json.dumps({"seq_len": params["seq_len"], "threads": torch.get_num_threads(),
                            "grad": torch.is_grad_enabled(),
                            "rss_mb": psutil.Process().memory_info().rss >> 20}) + "\n")
    return fmha.native(params, inputs)


def chatty(params, inputs):
    """Prints megabytes, from Python and from native code, then works."""
    print("chatter " * 300_000)
    os.write(2, b"native chatter\n" * 1000)
    return fmha.native(params, inputs)


def last_words(params, inputs):
    """Says why, then dies."""
    print("the reason it is about to die", flush=True)
    os.abort()
