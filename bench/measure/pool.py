"""Runs cases on worker processes, one per device slot, each case isolated: a worker that dies is
recorded as `crashed`, one that overruns its timeout is killed and recorded as `timeout`, and a fresh
worker takes the next case. So does a worker that a case left changed (bench.measure.leaks)."""
from __future__ import annotations

import multiprocessing as mp
import queue
import threading
from typing import Callable

from bench.results.store import utc_now
from bench.measure.sweep import Case
from bench.measure.worker import blank_record, serve

_CTX = mp.get_context("spawn")
STARTUP_S = 120.0  # allowed for a fresh worker to import torch and say it is ready


def _failure(case: Case, device: str, status: str, reason: str, started: str) -> dict:
    return {**blank_record(case, device), "status": status, "reason": reason,
            "started_utc": started, "ended_utc": utc_now()}


class _Slot:
    """One device and the worker process currently serving it."""

    def __init__(self, device: str):
        self.device, self.proc, self.conn = device, None, None

    def start(self) -> bool:
        """Start a worker and wait until it has imported everything; False if it never does."""
        parent, child = _CTX.Pipe()
        self.proc = _CTX.Process(target=serve, args=(child, self.device), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        try:
            return parent.poll(STARTUP_S) and parent.recv() == "ready"
        except (EOFError, OSError):
            return False

    def stop(self, kill: bool = False):
        if self.proc is None:
            return
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()
        self.proc = self.conn = None

    def run(self, case: Case, log: str) -> dict:
        started = utc_now()
        if self.proc is None or not self.proc.is_alive():
            if not self.start():
                self.stop(kill=True)
                return _failure(case, self.device, "crashed",
                                f"worker process did not start within {STARTUP_S:g} s", started)
        try:
            self.conn.send((case.to_dict(), log))
            if self.conn.poll(case.timing["timeout_s"]):
                record = self.conn.recv()
                if record.get("leaked"):  # the worker exits; the next case starts a fresh one
                    self.stop()
                return record
            self.stop(kill=True)
            return _failure(case, self.device, "timeout",
                            f"no result within {case.timing['timeout_s']:g} s; worker killed", started)
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            self.stop(kill=True)
            return _failure(case, self.device, "crashed",
                            f"worker process died (exit code {code})", started)


_held: dict[str, _Slot] = {}


def run_isolated(case: Case, device: str, log: str) -> dict:
    """One case in this process's worker for `device`, kept for the next case, its output going to
    the file `log`: how a task of another executor (bench.measure.dask_executor) still isolates
    each case."""
    return _held.setdefault(device, _Slot(device)).run(case, log)


def run_cases(cases: list[Case], devices: list[str], on_start: Callable[[Case, str], None],
              on_record: Callable[[Case, dict], None], stop: threading.Event,
              log_of: Callable[[Case], str]) -> None:
    """Run every case on the first free device slot, its output going to the file log_of(case);
    callbacks are called from slot threads, serialised by one lock. Returns when all cases are done
    or `stop` is set."""
    todo: queue.Queue[Case] = queue.Queue()
    for c in cases:
        todo.put(c)
    lock = threading.Lock()
    slots = [_Slot(d) for d in devices]

    def drive(slot: _Slot):
        try:
            while not stop.is_set():
                try:
                    case = todo.get_nowait()
                except queue.Empty:
                    return
                with lock:
                    on_start(case, slot.device)
                record = slot.run(case, log_of(case))
                if stop.is_set():
                    return
                with lock:
                    on_record(case, record)
        finally:
            slot.stop(kill=stop.is_set())

    threads = [threading.Thread(target=drive, args=(s,), daemon=True) for s in slots]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    finally:
        stop.set()
        for s in slots:
            if s.proc is not None and s.proc.is_alive():
                s.proc.kill()
