"""python -m bench.run SWEEP.yaml: expand a sweep, run every case in isolated workers, store every
sample. Bad input ends in one line and exit status 2; Ctrl-C leaves a partial run to --resume."""
from __future__ import annotations

import signal
import sys
from pathlib import Path


from bench.measure import runner, sweep
from bench.present import console
from bench.cli import BadInput, Parser


def parse_args(argv):
    p = Parser(prog="python -m bench.run", description=__doc__)
    p.add_argument("sweep", nargs="?", help="sweep YAML file (not needed with --resume)")
    p.add_argument("--out", default="results", help="results root (default: results)")
    p.add_argument("--profile", help="sweep profile to apply, or 'none' for the sweep as written "
                                     "(default: 'cpu' on a machine without a GPU, when the sweep "
                                     "defines it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep key or axis, e.g. timing.max_time_s=1 or seq_len=[128,256]")
    p.add_argument("--filter", action="append", default=[], metavar="AXIS=VALUE",
                   help="keep only cases whose axis has this value (or one of a [list])")
    p.add_argument("--providers", help="comma-separated providers to run")
    p.add_argument("--dry-run", action="store_true", help="print the expanded cases and stop")
    p.add_argument("--resume", metavar="DIR", help="finish a partial run without redoing its cases")
    p.add_argument("--gpus", help="GPU indices to run on at once, e.g. 0,1, or 'all'")
    p.add_argument("--workers", type=int, default=1, help="CPU worker processes (no GPU)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a case is incorrect, error, crashed, timeout or oom")
    return p.parse_args(argv)


def _sigterm(*_):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if args.workers < 1:
            raise BadInput("--workers must be at least 1")
        devices = runner.devices_for(args.gpus, args.workers)
        if args.resume:
            try:
                writer, todo = runner.resume_run(Path(args.resume), ["-m", "bench.run", *argv])
            except (FileNotFoundError, KeyError, ValueError) as e:
                raise BadInput(f"--resume {args.resume}: {e}") from None
            root = writer.path.parent
        else:
            if not args.sweep:
                raise BadInput("name a sweep file, or --resume a run directory")
            profile = None if args.profile == "none" else args.profile
            if args.profile is None and devices[0] == "cpu":
                profile = "cpu" if sweep.has_profile(args.sweep, "cpu") else None
            providers = args.providers.split(",") if args.providers else None
            sw = sweep.load(args.sweep, profile, args.set, args.filter, providers)
            if not sw.cases:
                raise BadInput(f"{args.sweep}: no cases left after filters and constraints")
            if args.dry_run:
                console.out.print(console.case_table(sw.cases))
                if profile:
                    console.out.print(f"profile: {profile}" + (" (no GPU here; --profile none shows "
                                      "the sweep as written)" if args.profile is None else ""))
                return 0
            root = Path(args.out)
            writer = runner.new_run(sw, root, ["-m", "bench.run", *argv], devices)
            todo = sw.cases
    except (sweep.SweepError, BadInput) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    code = runner.execute(writer, todo, devices, root, args.strict)
    print(writer.path)
    return code


if __name__ == "__main__":
    sys.exit(main())
