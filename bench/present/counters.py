"""The report's "Why it changed" section: each flagged case's counter diff (bench.results.counters,
from the run's why.json) in one line, the changed counters side by side, and the diff of the
cuTile compile logs where both sides left one."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.results import counters


@dataclass
class Case:
    case: str
    text: str
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (counter, base, head)
    compile_diff: str | None = None
    compile_note: str = ""


@dataclass
class Why:
    reason: str | None
    cases: list[Case]


KINDS = {c.field: c.kind for c in counters.COUNTERS}
FORMATS = {"bytes": counters.size, "pct": "{:.1f}%".format, "mhz": "{:.0f} MHz".format,
           "time": "{:.4g} ms".format}


def value(change: dict) -> tuple[str, str]:
    """A change's two sides as text in the counter's unit (a change in words, such as the top
    stall reason, as it is)."""
    show = FORMATS.get(KINDS.get(change["field"], "count"), "{:g}".format)
    return tuple(v if isinstance(v, str) else show(v) for v in (change["base"], change["head"]))


def compile_note(d: dict) -> str:
    if d.get("compile_diff") == "":
        return "The cuTile compile logs of both sides agree."
    if d.get("compile_diff") is None and d.get("changes") is not None and d.get("base"):
        return f"No compile log diff: {d.get('compile_log_reason') or 'a side has no compile log'}."
    return ""


def section(run_path: Path) -> Why | None:
    """The section of a run whose why.json exists (bench.ab / bench.nightly --counters), else None."""
    found = counters.read(run_path)
    if found is None:
        return None
    cases = [Case(d["case"], d["text"], [(c["label"], *value(c)) for c in d.get("changes") or []],
                  d.get("compile_diff") or None, compile_note(d)) for d in found.get("cases") or []]
    return Why(found.get("reason"), cases)

