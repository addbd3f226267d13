"""python -m bench.tune SWEEP.yaml: run a sweep's tile-config axes through the harness (as bench.run
does) and write each kernel's best correct config into kernels/tuned/<gpu>.json, which the kernels
use when a caller gives them no config. --from-run DIR tunes from a finished run instead. Without a
GPU it refuses at once: every cuTile case would be skipped, after the whole sweep."""
from __future__ import annotations

import sys

from bench import run as bench_run
from bench.cli import BadInput, Parser, command
from bench.measure.runner import gpu_count
from bench.present import tuned
from bench.results import tune


def parse_args(argv):
    p = Parser(prog="python -m bench.tune", description=__doc__)
    bench_run.add_arguments(p)
    p.add_argument("--from-run", metavar="DIR", help="pick the winners of this finished run; run nothing")
    p.add_argument("--tuned-dir", metavar="DIR", help="where the tuned files live (default: kernels/tuned)")
    return p.parse_args(argv)


@command
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    path = args.from_run
    if path is None and (args.sweep or args.resume or args.rest_of) and not args.dry_run and not gpu_count():
        raise BadInput("bench.tune times cuTile configs on a CUDA GPU and none is visible here "
                       "(--from-run DIR tunes from a finished GPU run)")
    if path is None:
        code, path = bench_run.run(args, ["-m", "bench.tune", *argv])
        if code or path is None:  # bad input, interrupted, or a dry run
            return code
    written, entries, none_passed = tune.tune_run(path, args.tuned_dir)
    for line in tuned.lines(entries, none_passed):
        print(line)
    if entries:
        print("\n".join(str(p) for p in written))
    else:
        print(f"nothing to write: {path} holds no case of a tuned kernel with a config that passed "
              "the correctness check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
