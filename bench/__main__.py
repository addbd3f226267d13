"""cutile-bench COMMAND [ARGS...]: the console script; `cutile-bench X ...` is `python -m bench.X ...`."""
from __future__ import annotations

import importlib
import sys

from bench.cli import BadInput, command

COMMANDS = {
    "run": "time every provider of a sweep, store every sample",
    "report": "render a run as report.html and report.md",
    "compare": "compare two runs; exit 1 on a regression",
    "ab": "A/B: this tree against a git ref",
    "nightly": "the nightly sweeps against the baseline, and the trend page",
    "tune": "best correct tile config per GPU and shape",
    "baseline": "bless a run as this GPU's baseline",
    "history": "the history database",
    "crosscheck": "our timer against another",
    "bisect": "find the commit that made a case slower",
}


def usage() -> str:
    return ("usage: cutile-bench COMMAND [ARGS...]  (the same as python -m bench.COMMAND ARGS...)\n\n"
            + "\n".join(f"  {name:<11} {what}" for name, what in COMMANDS.items())
            + "\n\ncutile-bench COMMAND --help for a command's options\n")


@command
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        raise BadInput(f"unknown command '{name[:80]}' (known: {', '.join(COMMANDS)})")
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"bench.{name}":
            raise
        raise BadInput(f"command '{name}' is not in this installation (no module bench.{name})") from None
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
