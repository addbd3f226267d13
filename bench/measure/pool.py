"""Worker processes, and the local pool that runs cases on them, one slot per device.

Every executor (this pool, Dask, A/B, tune, Nsight Compute) runs a case through `Worker`: the
worker program (bench.measure.worker) of a tree, in a process group of its own, in a scratch
directory of its own. A worker that dies is recorded as `crashed`, one that overruns its timeout is
killed with everything it started and recorded as `timeout`, and a fresh worker takes the next case.
So does a worker that a case left changed (bench.measure.leaks). The worker never learns where the
run is written: the parent moves each case's output into the run directory itself.
"""
from __future__ import annotations

import functools
import json
import marshal
import os
import queue
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import psutil

from bench.cli import BadInput
from bench.measure.sweep import Case
from bench.results.record import Record, SchemaError, parse, tampered_reason, utc_now

STARTUP_S = 120.0  # allowed for a fresh worker to import torch and say it is ready
OWN_TREE = Path(__file__).resolve().parents[2]  # the tree this harness runs from

# A tree from before the worker program (PROTOCOL 1) still serves A/B and bisection: its own
# run_case, answering on a private copy of stdout.
_LEGACY = r"""
import json, os, sys
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
import torch
try:
    from bench.measure.sweep import Case
    from bench.measure.worker import run_case
except ImportError:
    from bench.sweep import Case
    from bench.worker import run_case
device = torch.device(sys.argv[1])
if device.type == "cuda":
    torch.cuda.set_device(device)
print("ready", file=out, flush=True)
for line in sys.stdin:
    case = json.loads(line)["case"]
    print(json.dumps(run_case(Case.from_dict(case), device), default=str), file=out, flush=True)
"""


def failure(case: Case, device: str, status: str, reason: str, started: str) -> dict:
    """The record of a case that its worker could not answer for."""
    return Record.blank(case, device, status=status, reason=reason, started_utc=started,
                        ended_utc=utc_now()).to_dict()


def _user_paths() -> list[str]:
    """This process's import path less the interpreter's own, made absolute: the worker runs in a
    directory of its own, and must import a provider module (`module: my_pkg.attn:make`) from
    where the command could."""
    system = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
    return [os.path.abspath(p or ".") for p in sys.path
            if not os.path.abspath(p or ".").startswith(system) and os.path.isdir(p or ".")]


def worker_env(tree: Path = OWN_TREE) -> dict:
    """The environment a worker program of `tree` starts in."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *_user_paths(), env.get("PYTHONPATH", "")])
    return env


def _protocol(tree: Path) -> int:
    """How the worker program of `tree` talks (bench.measure.worker.PROTOCOL; 1 before it)."""
    try:
        found = re.search(r"\nPROTOCOL = (\d+)", (tree / "bench" / "measure" / "worker.py").read_text())
    except OSError:
        return 1
    return int(found.group(1)) if found else 1


# what a worker of a tree runs besides the provider: the harness, the kernels and their tuned
# configs, the model, the report's templates
SOURCES = ("bench", "kernels", "model", "report_templates")


class TreeChanged(BadInput):
    """The files a run's workers import changed while it ran: the cases after would run other code."""


def source_state(tree: Path) -> dict[str, tuple[int, int, int]]:
    """(size, mtime, ctime in ns) of every file of `tree`'s SOURCES, compiled caches included, by
    path. A rewrite that keeps a file's size and puts its mtime back still moves its ctime, which
    only the kernel sets."""
    state = {}
    for sub in SOURCES:
        for path in (tree / sub).rglob("*") if (tree / sub).is_dir() else ():
            if path.is_file():
                st = path.stat()
                state[str(path.relative_to(tree))] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return state


@functools.lru_cache(maxsize=1024)
def _honest_cache(path: Path, stat: tuple | None) -> bool:
    """Whether `path`, new, changed or gone, is a compiled cache any import of its source could have
    written (a test or another run importing the tree writes them while a run runs): one gone, or a
    .pyc of this interpreter whose code is its source's. One of other code is not: the import takes
    a cache whose header gives its source's size and mtime unchecked, so a rewritten gate could sit
    there while the source stays as it was."""
    if path.parent.name != "__pycache__" or path.suffix != ".pyc":
        return False
    if stat is None:
        return True
    stem, tag, *opt = path.stem.split(".")  # check.cpython-311, or check.cpython-311.opt-1
    if tag != sys.implementation.cache_tag or len(opt) > 1:
        return False
    source = path.parent.parent / f"{stem}.py"
    try:
        level = int(opt[0].removeprefix("opt-")) if opt else 0
        code = marshal.loads(path.read_bytes()[16:])  # after the header: magic, flags, mtime, size
        return code == compile(source.read_bytes(), str(source), "exec", dont_inherit=True, optimize=level)
    except (OSError, ValueError, EOFError, TypeError, SyntaxError):
        return False


def source_changes(tree: Path, before: dict) -> list[str]:
    now = source_state(tree)
    return sorted(k for k in before.keys() | now.keys()
                  if before.get(k) != now.get(k) and not _honest_cache(tree / k, now.get(k)))


FORGED = ("its worker's answer pipe carried a line the worker did not write: something the case ran "
          "wrote into it")


class Worker:
    """One worker process of the tree `tree` serving `device`, started on demand, run by the
    interpreter `python` (by default this one; bench.bisect --envs names another environment's)."""

    def __init__(self, device: str, tree: Path = OWN_TREE, python: str | None = None):
        self.device, self.tree = device, Path(tree)
        self.python = python or sys.executable
        self.proc, self.scratch = None, None
        self.protocol = _protocol(self.tree)
        self.sources = source_state(self.tree)

    def _command(self) -> list[str]:
        if self.protocol >= 2:
            return [self.python, "-m", "bench.measure.worker", self.device]
        return [self.python, "-c", _LEGACY, self.device]

    def start(self) -> bool:
        """Start a worker and wait until it has imported everything; False if it never does."""
        self.scratch = tempfile.mkdtemp(prefix="bench-worker-")
        env = worker_env(self.tree)
        if self.python != sys.executable:  # its compiled caches are not this interpreter's to check
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        with open(Path(self.scratch) / "worker.log", "wb") as err:
            self.proc = subprocess.Popen(self._command(), cwd=self.scratch, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         start_new_session=True)
        return self._read(STARTUP_S) == "ready"

    def _last_words(self) -> str:
        """The last line the worker wrote outside a case (an import error, say)."""
        try:
            lines = (Path(self.scratch) / "worker.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f": {lines[-1][:200]}" if lines else ""

    def kill(self) -> None:
        """End the worker and every process it started, from any thread: its process group, and
        its descendants that left the group (the worker is their reaper, so it finds them all)."""
        proc = self.proc
        if proc is None:
            return
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            family = []
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for p in family:
            try:
                p.kill()
            except psutil.Error:
                pass

    def _read(self, timeout: float) -> str | None:
        """One line from the worker within `timeout` s; None when it died or the time is up. The
        worker's death is noticed even where a process it started still holds the pipe open."""
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], min(left, 0.2))
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return None
                buf += chunk
                if buf.endswith(b"\n"):
                    return buf.decode(errors="replace").rstrip("\n")
            elif self.proc.poll() is not None:
                return None

    def stop(self) -> None:
        """End the worker and every process it started (its process group)."""
        if self.proc is None:
            return
        self.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.proc = self.scratch = None

    def check_sources(self) -> None:
        """TreeChanged when the tree's files are not as they were when this worker was made."""
        changed = source_changes(self.tree, self.sources)
        if changed:
            raise TreeChanged(f"{self.tree}: {', '.join(changed[:4])} changed while the run ran; "
                              "restore the tree (git status shows what)")

    def run(self, case: Case, log: str | None = None) -> dict:
        """The record of `case`; its output is moved to the file `log` when it wrote any. A case
        during which the tree's files changed is `tampered` (a provider can rewrite the harness's
        source for every worker started after it), and the next call raises TreeChanged."""
        self.check_sources()
        record = self._run(case, log)
        changed = source_changes(self.tree, self.sources)
        if changed:
            self.stop()
            record.update(status="tampered", samples_ms=[],
                          reason=f"the tree's files changed while the case ran: {', '.join(changed[:4])}")
        return record

    def _run(self, case: Case, log: str | None) -> dict:
        started = utc_now()
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            if not self.start():
                why = self._last_words()
                self.stop()
                return failure(case, self.device, "crashed",
                               f"worker process did not start within {STARTUP_S:g} s{why}; "
                               "--resume runs it again", started)
        request = {"case": case.to_dict()}
        if self.protocol >= 3:
            request["nonce"] = secrets.token_hex(16)
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            pass  # it died: the read below says so
        line = self._read(case.timing["timeout_s"])
        if line is None:
            try:  # its output ended: give a dying worker a moment to be reaped
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
        died = self.proc.poll() is not None
        self._keep_log(log)
        if line is None:
            code = self.proc.poll()
            self.stop()
            if died:
                return failure(case, self.device, "crashed", f"worker process died (exit code {code})",
                               started)
            return failure(case, self.device, "timeout",
                           f"no result within {case.timing['timeout_s']:g} s; worker killed", started)
        if self.protocol >= 3:
            answer = _unwrap(line, request["nonce"])
            if answer is None or isinstance(answer, list):  # forged, or a case that replaced part of
                self.stop()                                 # the harness: this worker is not asked again
                rec = failure(case, self.device, "tampered",
                              FORGED if answer is None else tampered_reason(answer), started)
                rec["leaked"] = None if answer is None else {"harness": answer}
                return rec
        try:
            record = parse(answer if self.protocol >= 3 else json.loads(line))
        except (ValueError, SchemaError) as e:
            self.stop()
            return failure(case, self.device, "crashed", f"worker answered no record ({e})"[:300], started)
        if record["case_id"] != case.case_id:
            self.stop()
            return failure(case, self.device, "crashed", "worker answered for another case", started)
        if record.get("leaked"):  # the worker exits; the next case starts a fresh one
            self.stop()
        return record

    def _keep_log(self, log: str | None) -> None:
        src = Path(self.scratch) / "case.log"
        if log and src.exists() and src.stat().st_size:
            shutil.copyfile(src, log)
        src.unlink(missing_ok=True)


def _unwrap(text: str, nonce: str):
    """What an answer of protocol 3 carries: the case's record, or the names of the harness's parts
    the case replaced (a list of str); None where it is not the worker's: the worker answers in one
    line that repeats the request's nonce, so anything else was written by something else."""
    try:
        answer = json.loads(text) if "\n" not in text else None
    except ValueError:
        return None
    if not isinstance(answer, dict) or answer.get("nonce") != nonce:
        return None
    what = answer.get("tampered")
    if isinstance(what, list) and what and all(isinstance(k, str) for k in what):
        return what
    return answer["record"] if isinstance(answer.get("record"), dict) else None


_held: dict[str, Worker] = {}


def run_isolated(case: Case, device: str, log: str) -> dict:
    """One case in this process's worker for `device`, kept for the next case, its output going to
    the file `log`: how a task of another executor (bench.measure.dask_executor) still isolates
    each case."""
    return _held.setdefault(device, Worker(device)).run(case, log)


def run_cases(cases: list[Case], devices: list[str], on_start: Callable[[Case, str], None],
              on_record: Callable[[Case, dict], None], stop: threading.Event,
              log_of: Callable[[Case], str]) -> None:
    """Run every case on the first free device slot, its output going to the file log_of(case);
    callbacks are called from slot threads, serialised by one lock. Returns when all cases are done
    or `stop` is set; raises TreeChanged, once every slot has stopped, when the tree's files changed
    during the run."""
    todo: queue.Queue[Case] = queue.Queue()
    for c in cases:
        todo.put(c)
    lock = threading.Lock()
    slots = [Worker(d) for d in devices]
    changed: list[TreeChanged] = []

    def drive(slot: Worker):
        try:
            while not stop.is_set():
                try:
                    case = todo.get_nowait()
                except queue.Empty:
                    break
                with lock:
                    on_start(case, slot.device)
                record = slot.run(case, log_of(case))
                if stop.is_set():
                    return
                with lock:
                    on_record(case, record)
            slot.check_sources()
        except TreeChanged as e:
            changed.append(e)
            stop.set()
        finally:
            slot.stop()

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
            s.kill()
    if changed:
        raise changed[0]
