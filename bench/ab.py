"""python -m bench.ab BASE [HEAD] SWEEP [options]: did my change make it faster or slower?

BASE and HEAD are git revisions or directories (HEAD defaults to this working tree). Every case of
the sweep runs with each side's own code on the same device, in A B B A rounds; each case's ratio
HEAD/BASE gets a bootstrap confidence interval as in bench.compare. Exit 1 when HEAD regresses a
case (or breaks one), 0 otherwise, 2 on bad input."""
from __future__ import annotations

import sys

from bench.cli import BadInput, Parser, command, sweep_options
from bench.measure import ab, runner, sweep
from bench.present.report import render
from bench.results.compare import compare_runs, to_text, write


def parse_args(argv):
    p = Parser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("args", nargs="+", metavar="BASE [HEAD] SWEEP")
    sweep_options(p)
    p.add_argument("--gpu", type=int, help="GPU index both sides run on (default: 0, or the CPU)")
    p.add_argument("--rounds", type=int, default=2,
                   help="A B rounds per case, alternating the order (default: 2, i.e. A B B A)")
    p.add_argument("--threshold", type=float, default=None,
                   help="relative change that counts (default: the sweep's compare.threshold, else 0.03)")
    args = p.parse_args(argv)
    if len(args.args) not in (2, 3):
        p.error("expected BASE [HEAD] SWEEP")
    args.base, args.head, args.sweep = (args.args[0], None, args.args[1]) if len(args.args) == 2 \
        else args.args
    return args


@command
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if args.rounds < 1:
            raise BadInput("--rounds must be at least 1")
        device = runner.devices_for(None if args.gpu is None else str(args.gpu), 1)[0]
        sw = runner.load_sweep(args, device)
        out, base, head = ab.run(sw, args.base, args.head, args.out, ["-m", "bench.ab", *argv],
                                 device, args.rounds)
        cmp = compare_runs(base, head, args.threshold)
    except (sweep.SweepError, BadInput) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write(cmp, out)
    render(head, out / "report.html", cmp)
    print(to_text(cmp))
    print(out)
    return 1 if cmp.failing else 0


if __name__ == "__main__":
    sys.exit(main())
