"""Runs a sweep's cases as Dask tasks, so that one sweep spreads over the GPUs of several hosts.

Each case is a task that needs one GPU: every Dask worker serves one device and declares `GPU=1`.
Inside the task the case still runs in the harness's own isolated worker process
(bench.measure.pool.run_isolated), so a crash, a hang or an OOM stays a case status. A Dask worker
that disappears fails only its task in flight, which the scheduler retries once on another worker
(`allowed-failures: 1`); lost twice, the case is recorded as `crashed`. Records come back as tasks
finish, to the one run directory of the calling process.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

import torch

from bench.cli import BadInput, first_line
from bench.measure.pool import TreeChanged, failure, run_isolated
from bench.measure.sweep import Case
from bench.results.store import utc_now

DEVICE_ENV = "BENCH_DEVICE"  # the device a Dask worker serves; default cuda:0, or cpu without a GPU
CONFIG = {
    "distributed.scheduler.allowed-failures": 1,  # a task whose worker dies is retried once
    "distributed.worker.daemon": False,  # a worker must be able to start the case's own process
}
CONNECT_TIMEOUT = "10s"


def worker_device() -> str:
    return os.environ.get(DEVICE_ENV) or ("cuda:0" if torch.cuda.is_available() else "cpu")


def run_task(case: dict, log: str) -> dict:
    """The Dask task: one case, isolated, on this worker's device, its output going to `log` (the
    run directory's file where that is shared, else the same path on the worker's host); the
    record says which host."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    record = run_isolated(Case.from_dict(case), worker_device(), log)
    record["host"] = socket.gethostname()
    return record


def local_cluster(devices: list[str]):
    """One single-threaded worker process per device, each declaring one GPU."""
    from distributed import Nanny, Scheduler, SpecCluster
    options = {"nthreads": 1, "resources": {"GPU": 1}, "memory_limit": 0, "host": "127.0.0.1",
               "silence_logs": logging.ERROR}
    workers = {i: {"cls": Nanny, "options": {**options, "env": {DEVICE_ENV: d}}}
               for i, d in enumerate(devices)}
    scheduler = {"cls": Scheduler, "options": {"dashboard": False, "host": "127.0.0.1"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR)


def connect(scheduler: str | None, devices: list[str]):
    """A client of the scheduler at `scheduler`, or of a new local cluster over `devices`."""
    try:
        import dask
        from distributed import Client
    except ImportError:
        raise BadInput("--executor dask needs the dask extra: pip install -e '.[dask]'") from None
    dask.config.set(CONFIG)
    if scheduler is None:
        return Client(local_cluster(devices))
    try:
        return Client(scheduler, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as e:
        raise BadInput(f"--scheduler {scheduler}: cannot connect ({e})") from None


def _lost(case: Case, error: BaseException) -> dict:
    status = "crashed" if type(error).__name__ == "KilledWorker" else "error"
    reason = ("its Dask worker was lost twice" if status == "crashed"
              else f"Dask task failed: {first_line(error)}")
    return failure(case, "dask", status, reason, utc_now())


def gpu_slots(client) -> int:
    """GPUs the scheduler's workers declare now (at least 1, so a sweep waits for workers)."""
    workers = client.scheduler_info()["workers"].values()
    return max(1, sum(int(w.get("resources", {}).get("GPU", 0)) for w in workers))


def run_cases(client, cases: list[Case], devices: list[str], on_start: Callable[[Case, str], None],
              on_record: Callable[[Case, dict], None], stop: threading.Event,
              log_of: Callable[[Case], str]) -> None:
    """bench.measure.pool.run_cases over a Dask client (bind it with functools.partial); `devices`
    are the workers' business here. No more tasks are handed to the scheduler than there are GPUs,
    so that a worker holds only the task it runs and a lost worker fails no case still waiting.
    The client, and a local cluster, are closed at the end."""
    from distributed import as_completed
    todo, running, finished = list(cases), {}, as_completed()

    def feed():
        while todo and len(running) < gpu_slots(client):
            case = todo.pop(0)
            future = client.submit(run_task, case.to_dict(), log_of(case), resources={"GPU": 1}, pure=False)
            running[future] = case
            finished.add(future)
            on_start(case, "dask")
    try:
        feed()
        for future in finished:
            if stop.is_set():
                return
            case = running.pop(future)
            try:
                record = future.result()
            except TreeChanged:  # the cases after would run other code: the run stops here
                raise
            except Exception as e:
                record = _lost(case, e)
            on_record(case, record)
            feed()
    finally:
        stop.set()
        cluster = client.cluster
        client.close()
        if cluster is not None:
            cluster.close()
