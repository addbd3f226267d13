"""python -m bench.history migrate results/history.csv [--history URL]: move a nightly history CSV
into the history database (default results/history.sqlite; any SQLAlchemy URL). Rows already
there are skipped, so running it again changes nothing."""
from __future__ import annotations

import sys
from pathlib import Path

from bench.cli import Parser, command
from bench.results import history


@command
def main(argv=None) -> int:
    parser = Parser(prog="python -m bench.history", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    migrate = commands.add_parser("migrate", help="move a history CSV into the database")
    migrate.add_argument("csv", help="the history CSV the nightly wrote")
    migrate.add_argument("--history", default=history.DEFAULT, help="default: %(default)s")
    args = parser.parse_args(argv)
    n = history.migrate(Path(args.csv), history.connect(args.history))
    print(f"{args.csv}: {n} rows in {args.history}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
