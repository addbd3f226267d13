"""Executes a sweep into a run directory: meta first, then one record per finished case (so a
killed run is a valid partial run), the summary, and `latest` once everything is done."""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import torch

from bench import workloads
from bench.cli import BadInput, disk_error, first_line
from bench.measure import ceilings, env, ncu, pool
from bench.measure import sweep as sweep_mod
from bench.results import store
from bench.results.summary import shape_key, summarize
from bench.measure.sweep import Case, Sweep


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def devices_for(gpus: str | None, workers: int) -> list[str]:
    count = gpu_count()
    if gpus is None:
        return ["cuda:0"] if count else ["cpu"] * max(1, workers)
    if not count:
        raise BadInput(f"--gpus {gpus}: no CUDA GPU is visible on this machine")
    if gpus == "all":
        return [f"cuda:{i}" for i in range(count)]
    try:
        ids = [int(x) for x in gpus.split(",")]
    except ValueError:
        raise BadInput(f"--gpus {gpus!r}: expected comma-separated indices or 'all'") from None
    bad = [i for i in ids if not 0 <= i < count]
    if bad or len(set(ids)) != len(ids):
        raise BadInput(f"--gpus {gpus}: this machine has GPUs 0..{count - 1}, each named once")
    return [f"cuda:{i}" for i in ids]


NCU = "ncu"  # a --profile value reserved for profiling with Nsight Compute, not a sweep profile


def load_sweep(args, device: str) -> Sweep:
    """The sweep named on a command line (sweep_options), with the `cpu` profile by default on a
    machine without a GPU and none with --profile none; BadInput when no case is left."""
    if sweep_mod.has_profile(args.sweep, NCU):
        raise BadInput(f"{args.sweep}: profile name '{NCU}' is reserved for --profile {NCU} "
                       "(Nsight Compute); rename the profile")
    profile = None if args.profile in (NCU, "none") else args.profile
    if args.profile is None and device == "cpu":
        profile = "cpu" if sweep_mod.has_profile(args.sweep, "cpu") else None
    providers = args.providers.split(",") if args.providers else None
    sw = sweep_mod.load(args.sweep, profile, args.set, args.filter, providers)
    if not sw.cases:
        raise BadInput(f"{args.sweep}: no cases left after filters and constraints")
    return sw


def new_run(sweep: Sweep, root: Path, argv: list[str], devices: list[str],
            name: str | None = None) -> store.RunWriter:
    """A run directory ROOT/NAME (by default named after the time, sweep and commit)."""
    git = env.git_state()
    gpus = sorted({int(d.split(":")[1]) for d in devices if d.startswith("cuda")})
    path = Path(root) / (name or store.run_dir_name(sweep.name, git["sha"]))
    meta = {
        "run_id": path.name, "command": argv, "started_utc": store.utc_now(), "ended_utc": None,
        "complete": False,
        "sweep": {"name": sweep.name, "path": sweep.path, "sha256": sweep.sha256,
                  "workload": sweep.workload, "baseline": sweep.baseline, "profile": sweep.profile,
                  "compare": sweep.compare},
        "git": git, "env": env.fingerprint(gpus), "devices": devices, "cases": len(sweep.cases),
        # how a report lays each workload out, recorded so that it never imports one
        "workloads": {w: workloads.get(w).hints() for w in dict.fromkeys(c.workload for c in sweep.cases)},
    }
    meta["ceilings"] = ceilings.for_run(root, meta["env"]["gpus"] if gpus else [])  # this run's GPUs only
    return store.RunWriter(path, meta, [c.to_dict() for c in sweep.cases])


WORKER_LOST = "worker process did not start"  # a case its worker never ran: resuming runs it


def _partial_run(path: Path, flag: str, cut: bool) -> tuple[store.Run, list[Case], list[Case], bool]:
    """(the run at `path`, its cases, those left to run: without a record, or whose worker never
    started, whether a torn last record was cut); BadInput, in one line, for a directory that is
    not a whole run of this schema. `cut`: drop a record torn by a kill, so that case runs again."""
    if not (path / store.META).is_file() or not (path / store.CASES).is_file():
        raise BadInput(f"{flag} {path}: not a run directory (needs {store.META} and {store.CASES})")
    try:
        was_cut = store.cut_torn_tail(path) if cut else False
        run = store.load_run(path)
        cases = sweep_mod.validate_cases(run.cases, path / store.CASES)
    except (OSError, ValueError, TypeError, KeyError) as e:  # JSON, schema and sweep errors
        raise BadInput(f"{flag} {path}: {first_line(e)}") from None
    if not cases:
        raise BadInput(f"{flag} {path}: {store.CASES} lists no case")
    done = {r["case_id"] for r in run.records if not r["reason"].startswith(WORKER_LOST)}
    return run, cases, [c for c in cases if c.case_id not in done], was_cut


def resume_run(path: Path, argv: list[str], dry_run: bool = False) -> tuple[store.RunWriter | None, list[Case]]:
    """(a writer that appends to the run at `path`, the cases left to run). Only the code and the
    machine that began a run finish it: elsewhere, BadInput before anything is written. With
    `dry_run`, nothing is written and the writer is None."""
    path = Path(path).resolve()
    try:
        moved = env.elsewhere(json.loads((path / store.META).read_text()))
    except FileNotFoundError:
        moved = None  # said below, with what a run directory needs
    except (OSError, ValueError, TypeError, AttributeError) as e:  # not JSON, or edited by hand
        raise BadInput(f"--resume {path}: {store.META}: {first_line(e)}") from None
    if moved:
        raise BadInput(f"--resume {path}: {moved}; finish it where it started, or measure what it "
                       "left here as a run of its own (--rest-of)")
    if dry_run:
        return None, _partial_run(path, "--resume", cut=False)[2]
    try:
        lock = store.lock_run(path)  # before a torn record is cut: it may be another writer's line
    except (OSError, ValueError) as e:
        raise BadInput(f"--resume {path}: {first_line(e)}") from None
    try:
        run, _, todo, cut = _partial_run(path, "--resume", cut=True)
        run.meta.setdefault("resumed", []).append({"utc": store.utc_now(), "command": argv,
                                                   "cut_torn_record": cut})
        run.meta["complete"] = False
        return store.RunWriter(run.path, run.meta, lock=lock), todo
    except (OSError, ValueError) as e:
        lock.close()
        raise BadInput(f"--resume {path}: {first_line(e)}") from None
    except BadInput:
        lock.close()
        raise


def rest_of(path: Path) -> Sweep:
    """The sweep of every shape of the run at `path` that has a case left, with all of that shape's
    providers, the baseline's included: a run that cannot be finished where it started is finished
    as a run of its own, so that no shape's speedups mix two machines or two trees. The old run is
    left as it was, but for a record torn by a kill, which is cut as --resume would."""
    path = Path(path).resolve()
    run, cases, todo, _ = _partial_run(path, "--rest-of", cut=True)
    left = {shape_key(c.to_dict()) for c in todo}
    if not left:
        raise BadInput(f"--rest-of {path}: every case has a record; nothing is left to run")
    s = run.meta.get("sweep") or {}
    return Sweep(name=s.get("name") or "rest", path=s.get("path") or str(path),
                 sha256=s.get("sha256") or "", workload=s.get("workload") or cases[0].workload,
                 baseline=s.get("baseline") or cases[0].baseline, profile=s.get("profile"),
                 compare=s.get("compare") or {}, cases=[c for c in cases if shape_key(c.to_dict()) in left])


class Quiet:
    """What a run shows while it goes (bench.present.console.RunView shows it on a terminal); this
    one shows nothing."""

    def __init__(self, total: int):
        self.total = total

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def started(self, case: Case, device: str) -> None:
        pass

    def finished(self, case: Case, record: dict) -> None:
        pass

    def ended(self, summary, records: list[dict]) -> None:
        pass


def execute(writer: store.RunWriter, todo: list[Case], devices: list[str], root: Path | None,
            run_cases=pool.run_cases, strict: bool = False, view=Quiet) -> int:
    """Run `todo` into `writer` with `run_cases` (the local pool, or another executor behind the same
    interface), showing progress through `view(total)`. Returns 0 when the run is complete, 130 when
    it is not; with `strict`, 1 when it is complete but a case failed (incorrect, tampered, error,
    crashed, timeout, oom). BadInput when the tree's files changed during the run, once the run
    is stored."""
    stop = threading.Event()
    t0 = time.time()
    logs = writer.path / store.LOGS
    logs.mkdir(exist_ok=True)

    def log_of(case: Case) -> str:
        return str(logs / f"{case.case_id}.log")

    interrupted = False
    unwritable: list[OSError] = []
    with view(len(todo)) as shown:
        def on_record(case: Case, record: dict):
            if unwritable:
                return
            try:
                record["log"] = store.keep_log(writer.path, log_of(case), record["status"])
                writer.append(record)
            except OSError as e:  # a full disk, a folder made read-only: stop, keep what is stored
                unwritable.append(e)
                stop.set()
                return
            shown.finished(case, record)

        changed = None
        try:
            run_cases(todo, devices, shown.started, on_record, stop, log_of)
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
        except pool.TreeChanged as e:  # the cases after would run other code: stop, keep the run
            changed = e
        try:
            if unwritable:
                raise unwritable[0]
            writer.meta["wall_s"] = writer.meta.get("wall_s", 0.0) + (time.time() - t0)
            run = store.load_run(writer.path)
            records = run.records
            complete = not interrupted and {c["case_id"] for c in run.cases} <= run.done_ids
            writer.close(complete)  # complete only when every case has a whole record
            summary = summarize(records, writer.meta.get("ceilings"))
            writer.write_summary(summary)
            if complete and root is not None:
                store.point_latest(root, writer.path)
        except OSError as e:
            writer.release()
            raise BadInput(f"{disk_error(e)}; the records stored so far are kept: finish with "
                           f"--resume {writer.path}") from None
        shown.ended(summary, records)
    if changed is not None:
        raise BadInput(f"{changed}; the records stored so far are kept"
                       + ("" if complete else f": finish with --resume {writer.path}"))
    if not complete:
        print(f"{'interrupted' if interrupted else 'incomplete'}: {len(records)} of "
              f"{writer.meta['cases']} cases stored; finish with --resume {writer.path}", file=sys.stderr)
        return 130
    failed = sorted({r["status"] for r in records if r["status"] in store.FAILED})
    if strict and failed:
        n = sum(r["status"] in store.FAILED for r in records)
        print(f"strict: {n} case(s) {', '.join(failed)}; exit status 1", file=sys.stderr)
        return 1
    return 0


def profile_counters(path: Path, cases: list[Case], device: str) -> None:
    """counters.json of a run: Nsight Compute's counters of each case's kernels, or why none."""
    records = {r["case_id"]: r for r in store.read_records(path)}
    counters = {}
    for case in cases:
        print(f"ncu {case.label}", file=sys.stderr, flush=True)
        counters[case.case_id] = ncu.profile_case(case, records.get(case.case_id, {}), device)
    store.write_counters(path, counters)
