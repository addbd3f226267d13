"""python -m bench.ab BASE [HEAD] SWEEP [options]: did my change make it faster or slower?

BASE and HEAD are git revisions or directories (HEAD defaults to this working tree). Every case of
the sweep runs with each side's own code on the same device, in A B B A rounds (more while the
case's noise asks for them; on a CPU each round with fresh workers); each case's ratio HEAD/BASE is
the geometric mean of its rounds' ratios with a t interval (on a CPU their median with the sign
test's interval), judged as in bench.compare. Exit 1 when HEAD regresses a
case (or breaks one), 0 otherwise, 2 on bad input."""
from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

from bench.cli import BadInput, Parser, command, sweep_options
from bench.measure import ab, env, ncu, runner
from bench.present.report import render
from bench.results.compare import checked_threshold, compare_runs, to_text, write
from bench.results.stats import THRESHOLD

ROUNDS = 6  # the least rounds of a case: a t interval over fewer pairs is too wide to say much


def parse_args(argv):
    p = Parser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("args", nargs="+", metavar="BASE [HEAD] SWEEP")
    sweep_options(p)
    p.add_argument("--gpu", type=int, help="GPU index both sides run on (default: 0, or the CPU)")
    p.add_argument("--rounds", type=int, default=ROUNDS,
                   help="A B rounds per case at least, alternating the order A B B A ... "
                        "(default: %(default)s)")
    p.add_argument("--max-rounds", type=int, default=None,
                   help="more rounds, up to this many, while the interval of the case's paired "
                        "ratio is too wide to resolve twice the threshold (default: "
                        f"{ab.MAX_ROUNDS['cuda']} on a GPU, {ab.MAX_ROUNDS['cpu']} on the CPU)")
    p.add_argument("--threshold", type=float, default=None,
                   help="relative change that counts (default: the sweep's compare.threshold, else "
                        f"{THRESHOLD:g})")
    p.add_argument("--counters", action="store_true",
                   help="profile each regression on both sides with Nsight Compute and say which "
                        "counters changed (registers, occupancy, bytes, ...)")
    args = p.parse_args(argv)
    if len(args.args) not in (2, 3):
        p.error("expected BASE [HEAD] SWEEP")
    args.base, args.head, args.sweep = (args.args[0], None, args.args[1]) if len(args.args) == 2 \
        else args.args
    return args


def why(cmp, cases, base, head, device) -> None:
    """--counters: each regression profiled with each side's own tree (ncu.explain_into)."""
    trees = {side: Path(tree) if tree != "working tree" else env.ROOT
             for side, tree in (("base", base.meta["git"]["tree"]), ("head", head.meta["git"]["tree"]))}
    ncu.explain_into(cmp, cases, base, head, lambda: contextlib.nullcontext(trees), device, "--counters")


@command
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = runner.devices_for(None if args.gpu is None else str(args.gpu), 1)[0]
    if args.max_rounds is None:
        args.max_rounds = max(args.rounds, ab.max_rounds_for(device))
    if args.rounds < 1 or args.max_rounds < args.rounds:
        raise BadInput("--rounds must be at least 1 and --max-rounds at least --rounds")
    if args.threshold is not None:  # checked before anything is measured
        checked_threshold(args.threshold)
    sw = runner.load_sweep(args, device)
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as trees:
        out, base, head = ab.run(sw, args.base, args.head, args.out, ["-m", "bench.ab", *argv],
                                 device, args.rounds, Path(trees), max_rounds=args.max_rounds,
                                 threshold=args.threshold or sw.compare["threshold"])
        cmp = compare_runs(base, head, args.threshold)
        if args.counters:
            why(cmp, sw.cases, base, head, device)
    write(cmp, out)
    render(head, out / "report.html", cmp)
    print(to_text(cmp))
    print(out)
    return 1 if cmp.failing else 0


if __name__ == "__main__":
    sys.exit(main())
