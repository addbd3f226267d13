"""What the user sees while a sweep runs: a progress bar with ETA and the current case, then a
compact table of the best provider per shape (with every provider's speedup) and one line per
reason a provider was skipped."""
from __future__ import annotations

import math
import sys
from collections import Counter

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table

from bench.results.summary import fresh_workers, settling

err = Console(stderr=True)
out = Console(width=160)  # writes to whatever sys.stdout is at the time


def progress(total: int) -> Progress:
    bar = Progress(TextColumn("{task.description}", style="bold"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                   TextColumn("{task.fields[current]}", style="dim"),
                   console=err, transient=False, disable=not err.is_terminal)
    bar.add_task("cases", total=total, current="")
    return bar


class RunView:
    """A run's progress on the terminal (a bar with ETA and the current case) or, when stderr is
    not one, a line per finished case; the best-provider table at the end."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.bar = progress(total)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def started(self, case, device: str) -> None:
        self.bar.update(self.bar.task_ids[0], current=f"{device} {case.label}"[:90])

    def finished(self, case, record: dict) -> None:
        self.done += 1
        self.bar.advance(self.bar.task_ids[0])
        if not err.is_terminal:
            print(f"[{self.done}/{self.total}] {record['status']:9s} {case.label}", file=sys.stderr,
                  flush=True)

    def ended(self, summary, records) -> None:
        report_end(summary, records)


TABLE_ROWS = 200  # a dry run of 100,000 cases spent 90 s drawing them all


def case_table(cases) -> Table:
    """The cases of a sweep, the first TABLE_ROWS of them and a count of the rest."""
    shown = cases[:TABLE_ROWS]
    more = len(cases) - len(shown)
    table = Table(title=f"{len(cases)} cases", show_lines=False,
                  caption=f"... and {more} more, not shown" if more else None)
    keys = list(dict.fromkeys(k for c in cases for k in c.params))
    for col in ["provider", *keys]:
        table.add_column(col)
    for c in shown:
        table.add_row(c.provider, *(str(c.params.get(k, "")) for k in keys))
    return table


def _fmt(x, spec=".3g"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ratio(x) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}x"


def best_table(summary: pd.DataFrame, records: list[dict]) -> Table | None:
    """Per shape: the baseline's median, the fastest correct provider and its speedup, and every
    other correct provider's speedup (so a subject that loses still shows by how much)."""
    ok = summary[(summary.status == "ok") & ~summary.suspect.astype(bool)]  # never a suspect best
    if ok.empty:
        return None
    shapes = {r["case_id"]: r["shape"] for r in records}
    keys = list(dict.fromkeys(k for r in records for k in r["shape"]))
    varying = [k for k in keys if len({str(s.get(k)) for s in shapes.values()}) > 1] or keys[:3]
    table = Table(title="best provider per shape (speedup = baseline median / median)")
    for col in [*varying, "baseline ms", "best", "best ms", "unit", "speedup", "each provider"]:
        table.add_column(col, justify="right")
    groups: dict[str, list] = {}
    for row in ok.itertuples():
        groups.setdefault(str(sorted(shapes[row.case_id].items())), []).append(row)
    for rows in groups.values():
        best = min(rows, key=lambda r: r.median_ms)
        base = [r for r in rows if r.provider == r.baseline]
        rate = (f"{best.tflops:.3g} TFLOP/s" if not math.isnan(best.tflops)
                else f"{best.gbps:.3g} GB/s" if not math.isnan(best.gbps) else "")
        each = ", ".join(f"{r.provider} {_ratio(r.speedup)}" for r in rows if r.provider != r.baseline)
        table.add_row(*(str(shapes[best.case_id].get(k)) for k in varying),
                      _fmt(base[0].median_ms) if base else "-", best.provider,
                      _fmt(best.median_ms), rate, _ratio(best.speedup), each or "-")
    return table


def missing_baseline(summary: pd.DataFrame) -> str | None:
    """Why the table has no speedups, when its baseline has no correct case (--providers left it
    out, or it failed everywhere), so a column of dashes is not left unexplained."""
    ok = summary[summary.status == "ok"]
    gone = sorted(set(ok.baseline) - set(ok.provider))
    return (f"no speedups over {', '.join(gone)}: no correct case of it in this run; "
            "--set baseline=PROVIDER names another") if gone else None


def report_end(summary: pd.DataFrame, records: list[dict]) -> None:
    table = best_table(summary, records)
    if table is not None:
        out.print(table)
    note = missing_baseline(summary)
    if note:
        out.print(note, highlight=False)
    counts = Counter(r["status"] for r in records)
    out.print("status: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    fresh = fresh_workers(records)
    if fresh:
        out.print(f"cases that left their worker changed: {fresh}", highlight=False)
    settled = settling(records)
    if settled:
        out.print(f"settling: {settled}", highlight=False)
    reasons = Counter((r["provider"], r["reason"]) for r in records if r["status"] == "skipped")
    for (provider, reason), n in sorted(reasons.items()):
        out.print(f"skipped {provider} ({n} case{'s' * (n != 1)}): {reason}", highlight=False)
    for r in records:
        if r["status"] not in ("ok", "skipped"):
            out.print(f"{r['status']}: {r['provider']} {r['params']}: {r['reason']}", highlight=False)
