"""The nightly regression job: run the nightly sweep set, compare each run with this GPU's blessed
baseline, render the reports, append every case to the history, render the trend page, and exit 1
on a regression (2 on bad input, the runner's status if a sweep could not finish).

    python -m bench.nightly [--config sweeps/nightly.yaml] [--out results]
                            [--baselines results/baselines] [--history results/history.sqlite | URL]
                            [--scheduler DASK_ADDRESS]
"""
from __future__ import annotations

import sys
from pathlib import Path

from bench.cli import BadInput, Parser
from bench.results import history
from bench.results.nightly import load_plan, nightly


def main(argv=None) -> int:
    parser = Parser(prog="python -m bench.nightly", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sweeps/nightly.yaml", help="default: %(default)s")
    parser.add_argument("--out", default="results", help="results root (default: %(default)s)")
    parser.add_argument("--baselines", default="results/baselines", help="default: %(default)s")
    parser.add_argument("--history", default=history.DEFAULT,
                        help="a SQLite file or any SQLAlchemy URL, e.g. postgresql+psycopg://host/db "
                             "(default: %(default)s)")
    parser.add_argument("--profile", help="sweep profile for every run (default: bench.run's choice)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="run the sweeps on this Dask cluster (bench.run --executor dask)")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.config)
        return nightly(plan, Path(args.out), Path(args.baselines), history.connect(args.history),
                       args.profile, args.scheduler)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
