"""Checks of the timer itself, run on a GPU before its numbers are trusted.

    python -m bench.crosscheck dobench SWEEP.yaml [--filter k=v] [--providers a,b] [--limit N]
        times each case with bench.measure.timing and with triton.testing.do_bench (median) on the same
        callable and prints the ratio;
    python -m bench.crosscheck spread RUN_DIR RUN_DIR [RUN_DIR ...]
        the spread (max - min) / mean of each case's median across repeated runs of one sweep.
"""
from __future__ import annotations

import argparse
import sys

from bench.cli import Parser, command
from bench.measure.crosscheck import dobench, spread


@command
def main(argv=None) -> int:
    p = Parser(prog="python -m bench.crosscheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dobench")
    d.add_argument("sweep")
    d.add_argument("--set", action="append", default=[])
    d.add_argument("--filter", action="append", default=[])
    d.add_argument("--providers")
    d.add_argument("--limit", type=int, default=None)
    s = sub.add_parser("spread")
    s.add_argument("runs", nargs="+")
    s.add_argument("--min-ms", type=float, default=0.02)
    args = p.parse_args(argv)
    return dobench(args) if args.cmd == "dobench" else spread(args)


if __name__ == "__main__":
    sys.exit(main())
