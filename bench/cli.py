"""What every bench command shares: a bad command line or bad input is one line and exit status 2."""
from __future__ import annotations

import argparse


class BadInput(Exception):
    """Something the user gave cannot be used; the message is the one line they see."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (not usage + error) and exits 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
