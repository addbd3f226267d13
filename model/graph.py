"""A model's step captured once in a CUDA graph and replayed: one launch for all of its kernels.

A capture records the step's kernels and the memory they read and write; a replay runs them again
on whatever those buffers then hold. So a graphed loop copies each batch into the static inputs the
step reads, keeps the learning rate in a tensor it updates in place, and runs autocast without its
weight-cast cache (a cast cached during the capture would be stale at every replay).
"""
from __future__ import annotations

import torch

WARMUP_STEPS = 3  # eager steps on a side stream before a capture, as CUDA graphs require


class CaptureError(RuntimeError):
    """The step ran eagerly but could not be captured (it syncs with the host, or allocates in a
    way a graph cannot hold)."""


def capture(step, model, warmup: int = WARMUP_STEPS, optimizer=None):
    """(replay, out): `step` run `warmup` times eagerly on a side stream, then captured; replay()
    runs the captured step again, and `out`, what the captured call returned, holds each replay's
    result. Gradients are unset before the capture, so the graph's backward writes them afresh at
    every replay instead of adding to the last. The warm-up steps and the capture are real steps:
    given the step's `optimizer` (one with reset()), they are taken back afterwards, the parameters
    as they were before them and the optimizer at its first step, so the first replay is step one."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"a CUDA graph needs the model on a CUDA GPU, not {device}")
    start = None if optimizer is None else {k: v.clone() for k, v in model.state_dict().items()}
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            model.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = step()
    except RuntimeError as e:
        raise CaptureError(str(e)) from e
    if optimizer is not None:
        with torch.no_grad():  # in place: the graph keeps reading and writing the same tensors
            model.load_state_dict(start)
        optimizer.reset()

    def replay():
        graph.replay()
    # The graph reads and writes tensors made before it and held only by step's closure (the
    # optimizer's moments, the loss scale). Freed, their memory would go to whatever came next, and
    # replays would corrupt both: they live as long as the replay.
    replay.holds = step
    return replay, out
