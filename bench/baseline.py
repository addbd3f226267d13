"""Blessed baselines: one small copy of a run per GPU model and sweep, under
`results/baselines/<gpu>/<sweep>/`, that `bench.compare` and `bench.nightly` measure new runs against.

    python -m bench.baseline set RUN_DIR [--root results/baselines]

A baseline keeps meta.json, summary.csv and the raw samples gzip-compressed (the samples are what
a comparison needs; the summary is for people reading the directory)."""
from __future__ import annotations

import sys

from bench.cli import Parser, command
from bench.results.baseline import ROOT, bless


@command
def main(argv=None) -> int:
    parser = Parser(prog="python -m bench.baseline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    set_ = sub.add_parser("set", help="bless RUN_DIR as the baseline for its GPU model and sweep")
    set_.add_argument("run_dir")
    set_.add_argument("--root", default=str(ROOT), help="baseline store (default: %(default)s)")
    args = parser.parse_args(argv)
    dest = bless(args.run_dir, args.root)
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
