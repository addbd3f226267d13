"""python -m bench.run SWEEP.yaml: expand a sweep, run every case in isolated workers, store every
sample. Bad input ends in one line and exit status 2; Ctrl-C leaves a partial run to --resume."""
from __future__ import annotations

import signal
import sys
from functools import partial
from pathlib import Path

from bench.measure import dask_executor, pool, runner
from bench.present import console
from bench.cli import BadInput, Parser, command, refuse, sweep_options


def add_arguments(p) -> None:
    """The flags that say what to run (bench.tune takes them too)."""
    p.add_argument("sweep", nargs="?", help="sweep YAML file (not needed with --resume)")
    sweep_options(p)
    p.add_argument("--dry-run", action="store_true", help="print the expanded cases and stop")
    p.add_argument("--resume", metavar="DIR", help="finish a partial run without redoing its cases")
    p.add_argument("--rest-of", metavar="DIR",
                   help="a new run of every shape a partial run left unfinished, all its providers "
                        "measured here (where --resume refuses: another machine or tree)")
    p.add_argument("--gpus", help="GPU indices to run on at once, e.g. 0,1, or 'all'")
    p.add_argument("--workers", type=int, default=1, help="CPU worker processes (no GPU)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a case is incorrect, error, crashed, timeout or oom")
    p.add_argument("--executor", choices=["local", "dask"], default="local",
                   help="local: a worker per device of this host (default); dask: one Dask task "
                        "per case (docs/regressions.md)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="with --executor dask: the Dask scheduler "
                                                          "(default: a local cluster, a worker per GPU)")


def parse_args(argv):
    p = Parser(prog="python -m bench.run", description=__doc__)
    add_arguments(p)
    return p.parse_args(argv)


def _sigterm(*_):
    raise KeyboardInterrupt


def run(args, command: list[str]) -> tuple[int, Path | None]:
    """(exit status, run directory) of running what `args` name; `command` goes into meta.json."""
    try:
        if args.workers < 1:
            raise BadInput("--workers must be at least 1")
        if args.scheduler and args.executor != "dask":
            raise BadInput("--scheduler needs --executor dask")
        if args.profile == runner.NCU and not runner.gpu_count():
            raise BadInput("--profile ncu needs a CUDA GPU: Nsight Compute profiles CUDA kernels")
        local_gpus = "all" if args.executor == "dask" and runner.gpu_count() else None
        devices = runner.devices_for(args.gpus or local_gpus, args.workers)
        if sum(map(bool, (args.sweep, args.resume, args.rest_of))) > 1:
            raise BadInput("name one of a sweep file, --resume DIR and --rest-of DIR")
        given = [f"--{k}" for k in ("set", "filter", "providers") if getattr(args, k)]
        given += ["--profile"] if args.profile not in (None, runner.NCU) else []
        if (args.resume or args.rest_of) and given:
            raise BadInput(f"{', '.join(given)}: {'--resume' if args.resume else '--rest-of'} runs the "
                           "cases its run lists, as that run chose them")
        if not args.resume:
            if not (args.sweep or args.rest_of):
                raise BadInput("name a sweep file, or --resume a run directory")
            sw = runner.rest_of(Path(args.rest_of)) if args.rest_of else runner.load_sweep(args, devices[0])
            if args.dry_run:
                console.out.print(console.case_table(sw.cases))
                if sw.profile:
                    console.out.print(f"profile: {sw.profile}" + (" (no GPU here; --profile none shows "
                                      "the sweep as written)" if args.profile is None else ""))
                return 0, None
        run_cases = pool.run_cases
        if args.executor == "dask":  # connected before anything is written
            run_cases = partial(dask_executor.run_cases, dask_executor.connect(args.scheduler, devices))
        if args.resume:
            writer, todo = runner.resume_run(Path(args.resume), command, args.dry_run)
            if args.dry_run:
                console.out.print(console.case_table(todo))
                console.out.print(f"--resume {args.resume} would run these {len(todo)} case(s)")
                return 0, None
            root = writer.path.parent
        else:
            root = Path(args.out)
            try:
                writer = runner.new_run(sw, root, command, devices)
            except OSError as e:
                raise BadInput(f"--out {root}: cannot write a run there ({e.strerror or e})") from None
            todo = sw.cases
    except BadInput as e:
        return refuse(e), None
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        code = runner.execute(writer, todo, devices, root, run_cases, args.strict, console.RunView)
    except BadInput as e:  # the run's folder could not be written: what is stored stays resumable
        return refuse(e), writer.path
    if code == 0 and args.profile == runner.NCU:
        runner.profile_counters(writer.path, todo, devices[0])
    print(writer.path)
    return code, writer.path


@command
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(parse_args(argv), ["-m", "bench.run", *argv])[0]


if __name__ == "__main__":
    sys.exit(main())
