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


def perturbed_backward(params, inputs):
    """A model_step provider whose forward is right and whose backward is 1% off: the gradient that
    leaves the final LayerNorm is scaled, so every gradient before it is wrong and the loss is not."""
    from bench.workloads import model_step

    model = model_step.build_model(inputs, "torch", "sdpa")
    model.transformer.ln_f.register_full_backward_hook(
        lambda module, grad_in, grad_out: tuple(None if g is None else g * 1.01 for g in grad_in))
    return model_step.make_step(params, inputs, model)


def _key_biases(model):
    """The key thirds of every attention block's qkv bias: their exact gradient is zero (softmax
    cancels a shift shared by all keys of a query)."""
    biases = [blk.attn.c_attn.bias for blk in model.transformer.h]
    return [b[b.numel() // 3:2 * b.numel() // 3] for b in biases]


def key_bias_rounding(params, inputs):
    """A correct training step whose rounding differs where the exact gradient is zero: +-1e-7 on
    the key biases' gradients, as an fp16 step's rounding leaves there, which turns their first AdamW
    move (lr times the gradient's sign) either way."""
    from bench.workloads import model_step

    model = model_step.build_model(inputs, "torch", "sdpa")
    g = torch.Generator().manual_seed(0)
    for blk in model.transformer.h:
        n = blk.attn.c_attn.bias.numel() // 3
        noise = torch.zeros(3 * n)
        noise[n:2 * n] = 1e-7 * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
        blk.attn.c_attn.bias.register_hook(lambda grad, noise=noise: grad + noise.to(grad.device))
    return model_step.make_step(params, inputs, model)


def key_bias_moved_too_far(params, inputs):
    """A training step that moves the key biases, whose gradient has no determined sign, by 10 lr
    after a correct update: more than any AdamW step moves an element."""
    from bench.workloads import model_step

    model = model_step.build_model(inputs, "torch", "sdpa")
    step = model_step.make_step(params, inputs, model)

    def run():
        out = step()
        with torch.no_grad():
            for key_bias in _key_biases(model):
                key_bias.add_(10 * model_step.LR)
        return out
    return run


def _kill_dask_worker(params, inputs, once: bool):
    """Kills the Dask worker that runs this case (the parent of the case's own worker process), the
    first time only when `once`; then behaves as the native path. Refuses outside a Dask worker,
    where the parent would be the test itself."""
    if not os.environ.get("BENCH_DEVICE"):
        raise RuntimeError("only for a Dask worker")
    mark = os.path.join(os.environ["KILL_MARKS"], str(params["seq_len"]))
    if not (once and os.path.exists(mark)):
        open(mark, "w").close()
        os.kill(os.getppid(), 9)
        os._exit(1)
    return fmha.native(params, inputs)


def kill_worker_once(params, inputs):
    return _kill_dask_worker(params, inputs, once=True)


def kill_worker(params, inputs):
    return _kill_dask_worker(params, inputs, once=False)


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


def threading_probe(params, inputs):
    """torch's layer_norm, and writes whether autograd runs a backward on a thread of its own into
    the file named by BENCH_TEST_SEEN."""
    from bench.workloads import layernorm

    with open(os.environ["BENCH_TEST_SEEN"], "w") as f:
        f.write(f"multithreaded backward: {torch._C._is_multithreading_enabled()}")
    return layernorm.torch_layer_norm(params, inputs)
