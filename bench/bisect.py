"""python -m bench.bisect SWEEP --good REV --bad REV --case CASE_ID: which commit slowed this case?

Selects exactly one case of the sweep (--case, or --filter/--providers), confirms that BAD regresses
it against GOOD, then binary-searches `git rev-list --first-parent GOOD..BAD`: each midpoint runs
against GOOD on one device in A B B A rounds (bench.ab's machinery) and is bad when bench.compare's
verdict fails. With --envs ENV1 ENV2 ... it bisects toolchains instead: this tree under each
environment's python (an interpreter or a venv directory), the first one good, the last one bad.
Prints each step and the culprit, and writes bisect.json under --out. Exit 0 when a culprit is
named, 1 when GOOD..BAD shows no regression, 2 on bad input."""
from __future__ import annotations

import sys
from pathlib import Path

from bench.cli import BadInput, Parser, command, refuse, sweep_options
from bench.measure import bisect, env, runner, sweep
from bench.results import store
from bench.results.compare import checked_threshold, sweep_threshold
from bench.results.stats import THRESHOLD


def parse_args(argv):
    p = Parser(prog="python -m bench.bisect", description=__doc__.split("\n")[0])
    p.add_argument("sweep")
    sweep_options(p)
    p.add_argument("--case", help="the case id (or label) to bisect")
    p.add_argument("--good", help="a revision where the case is fast")
    p.add_argument("--bad", help="a later revision where it is slow")
    p.add_argument("--envs", nargs="+", metavar="ENV",
                   help="bisect over environments (python interpreters or venv directories), "
                        "good first, bad last, all running this tree")
    p.add_argument("--gpu", type=int, help="GPU index every step runs on (default: 0, or the CPU)")
    p.add_argument("--rounds", type=int, default=2, help="A B rounds per step (default: 2)")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"relative slowdown that counts as bad (default: the sweep's, else {THRESHOLD:g})")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="stop starting steps after this long, naming the range left")
    return p.parse_args(argv)


def one_case(sw: sweep.Sweep, wanted: str | None) -> sweep.Case:
    cases = [c for c in sw.cases if wanted in (None, c.case_id, c.label)]
    if len(cases) != 1:
        raise BadInput(f"the selection is {len(cases)} cases, not one: name one with --case "
                       f"CASE_ID or narrow --filter/--providers")
    return cases[0]


def run(args) -> tuple[int, bisect.Bisection | None]:
    """(exit status, the bisection) of what `args` name; it is printed, and written under --out."""
    try:
        if args.rounds < 1:
            raise BadInput("--rounds must be at least 1")
        if bool(args.envs) == bool(args.good or args.bad) or not (args.envs or args.good and args.bad):
            raise BadInput("give either --good REV and --bad REV, or --envs ENV1 ENV2 ...")
        device = runner.devices_for(None if args.gpu is None else str(args.gpu), 1)[0]
        sw = runner.load_sweep(args, device)
        case = one_case(sw, args.case)
        threshold = checked_threshold(args.threshold if args.threshold is not None else
                                      sweep_threshold({"sweep": {"compare": sw.compare}}) or THRESHOLD)
        print(f"bisecting {case.label} ({case.case_id}) on {device}, threshold {threshold:.1%}")
        if args.envs:
            result = bisect.bisect_envs(case, args.envs, env.ROOT, device, args.rounds, threshold,
                                        args.budget)
        else:
            result = bisect.bisect_commits(case, args.good, args.bad, device, args.rounds, threshold,
                                           Path.cwd(), args.budget)
    except BadInput as e:
        return refuse(e), None
    out = bisect.write(result, Path(args.out) / store.run_dir_name(sw.name, "bisect"))
    print(bisect.report(result))
    print(out)
    return (0 if result.confirmed else 1), result


@command
def main(argv=None) -> int:
    return run(parse_args(list(sys.argv[1:] if argv is None else argv)))[0]


if __name__ == "__main__":
    sys.exit(main())
