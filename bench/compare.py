"""Compare two runs case by case and flag regressions.

    python -m bench.compare BASE CUR [--threshold 0.03] [--allow-different-hardware] [-o DIR]

For each case present in both runs (same workload, provider and parameters) the ratio of medians
CUR/BASE gets a bootstrap confidence interval from the stored samples. A case is a regression when
it is slower by more than the threshold and by more than the run-to-run noise expected of it (its
sample spread times a factor per device kind), *and* the interval lies wholly above 1 (the slowdown
is larger than the measured noise); improvements mirror that. Exit status: 1 on any regression (or a
case that ran in BASE and fails in CUR), 0 otherwise, 2 on bad input or when nothing could be
compared. docs/regressions.md says why.
"""
from __future__ import annotations

import sys

from bench.cli import Parser, command
from bench.results.baseline import open_run
from bench.results.compare import compare_runs, to_text, write
from bench.results.stats import THRESHOLD


@command
def main(argv=None) -> int:
    parser = Parser(prog="python -m bench.compare",
                                     description="Compare two runs and flag regressions.")
    parser.add_argument("base", help="baseline run directory (or a blessed baseline)")
    parser.add_argument("cur", help="current run directory")
    parser.add_argument("--threshold", type=float, default=None,
                        help="relative change that counts (default: the sweep's compare.threshold, "
                             f"else {THRESHOLD:g})")
    parser.add_argument("--allow-different-hardware", action="store_true")
    parser.add_argument("-o", "--out", default=None,
                        help="where compare.json and compare.md go (default: CUR)")
    args = parser.parse_args(argv)
    cmp = compare_runs(open_run(args.base), open_run(args.cur), args.threshold,
                       args.allow_different_hardware)
    write(cmp, args.out or args.cur)
    print(to_text(cmp))
    return 1 if cmp.failing else 0


if __name__ == "__main__":
    sys.exit(main())
