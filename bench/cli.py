"""What every bench command shares: a bad command line or bad input is one line and exit status 2."""
from __future__ import annotations

import argparse
import functools
import sys


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line: its type and the first line of its message."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:limit]


class BadInput(Exception):
    """Something the user gave cannot be used; the message is the one line they see."""


def refuse(message) -> int:
    """Bad input as the user sees it: one line on stderr, and the exit status 2 that goes with it."""
    print(f"error: {message}", file=sys.stderr)
    return 2


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (not usage + error) and exits 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def sweep_options(p: Parser) -> None:
    """The options that choose a sweep's cases, shared by every command that runs a sweep."""
    p.add_argument("--out", default="results", help="results root (default: results)")
    p.add_argument("--profile", help="sweep profile to apply, or 'none' for the sweep as written "
                                     "(default: 'cpu' on a machine without a GPU, when the sweep "
                                     "defines it); 'ncu' profiles with Nsight Compute")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep key or axis, e.g. timing.max_time_s=1 or seq_len=[128,256]")
    p.add_argument("--filter", action="append", default=[], metavar="AXIS=VALUE",
                   help="keep only cases whose axis has this value (or one of a [list])")
    p.add_argument("--providers", help="comma-separated providers to run")


def disk_error(e: OSError) -> str:
    """A filesystem error as the one line a user reads: what could not be done, where, and why."""
    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    return f"cannot read or write{where}: {e.strerror or first_line(e)}"


def command(main):
    """An entry point's main(argv) whose bad input (BadInput, a sweep's SweepError among them) and
    filesystem errors (a read-only folder, a full disk, a path through a file) end in one line and
    exit status 2, not a traceback."""
    @functools.wraps(main)
    def guarded(argv=None) -> int:
        try:
            return main(argv)
        except BadInput as e:
            return refuse(e)
        except OSError as e:
            return refuse(disk_error(e))
    return guarded
