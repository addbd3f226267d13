"""The nightly regression job: run the nightly sweep set, compare each run with this GPU's blessed
baseline, render the reports, append every case to the history, render the trend page, and exit 1
on a regression (2 on bad input, the runner's status if a sweep could not finish).

    python -m bench.nightly [--config sweeps/nightly.yaml] [--out results]
                            [--baselines results/baselines] [--history results/history.csv]
"""
from __future__ import annotations

import sys
from pathlib import Path

from bench.cli import BadInput, Parser
from bench.results.nightly import load_plan, nightly


def main(argv=None) -> int:
    parser = Parser(prog="python -m bench.nightly", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sweeps/nightly.yaml", help="default: %(default)s")
    parser.add_argument("--out", default="results", help="results root (default: %(default)s)")
    parser.add_argument("--baselines", default="results/baselines", help="default: %(default)s")
    parser.add_argument("--history", default="results/history.csv", help="default: %(default)s")
    parser.add_argument("--profile", help="sweep profile for every run (default: bench.run's choice)")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.config)
        return nightly(plan, Path(args.out), Path(args.baselines), Path(args.history), args.profile)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
