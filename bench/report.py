"""Render a run as one self-contained HTML report (plots embedded) plus a short report.md for CI
job summaries. Reads the results store only; never re-runs anything.

    python -m bench.report RUN_DIR [--baseline RUN_DIR] [-o FILE]
"""
from __future__ import annotations

import sys
from pathlib import Path

from bench.cli import BadInput, Parser, command
from bench.present.report import render
from bench.results import compare, store
from bench.results.baseline import open_run


@command
def main(argv=None) -> int:
    parser = Parser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--baseline", help="run directory (or blessed baseline) to compare against")
    parser.add_argument("--allow-different-hardware", action="store_true")
    parser.add_argument("-o", "--out", help="HTML file to write (default: RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    run = open_run(args.run_dir)
    out = Path(args.out) if args.out else run.path / "report.html"
    if store.run_file(out):
        raise BadInput(f"-o {out}: a file of the run itself ({out.name}); write the report elsewhere")
    cmp = compare.compare_runs(open_run(args.baseline), run,
                               allow_different_hardware=args.allow_different_hardware) \
        if args.baseline else None
    html, _ = render(run, out, cmp)
    print(html)
    return 0


if __name__ == "__main__":
    sys.exit(main())
