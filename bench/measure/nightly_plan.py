"""The nightly plan (sweeps/nightly.yaml): which sweeps to run, each cut down by its --set, --filter
and --providers. Read as a sweep file is (bench.measure.sweep_yaml: bounded, safe, duplicate keys
refused), so that an error names its file and line before anything runs."""
from __future__ import annotations

from pathlib import Path

from bench.measure.sweep_yaml import Doc, SweepError, read_text

ENTRY_KEYS = {"sweep", "set", "filter", "providers"}


def load_plan(path, find=Path) -> list[dict]:
    """The sweeps to run: [{sweep, set, filter, providers}]; find(name) is the file a sweep's name
    stands for (bench.nightly: a built-in one too). SweepError, one line, for a plan it cannot run."""
    path = Path(path)
    doc = Doc(path, read_text(path))
    data = doc.data
    entries = data.get("sweeps") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise SweepError(f"{doc.where(('sweeps',))}: expected a non-empty list under 'sweeps'")
    unknown = set(data) - {"sweeps"}
    if unknown:
        raise SweepError(f"{doc.where((sorted(unknown)[0],))}: unknown key {sorted(unknown)[0]!r} (known: sweeps)")
    plan = []
    for i, entry in enumerate(entries):
        at = ("sweeps", i)
        if not isinstance(entry, dict) or not isinstance(entry.get("sweep"), str):
            raise SweepError(f"{doc.where(at)}: sweeps[{i}]: expected a mapping with 'sweep: FILE'")
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise SweepError(f"{doc.where(at + (unknown[0],))}: sweeps[{i}]: unknown key(s) "
                             f"{', '.join(map(str, unknown))} (known: {', '.join(sorted(ENTRY_KEYS))})")
        for key in ("set", "filter", "providers"):
            value = entry.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SweepError(f"{doc.where(at + (key,))}: sweeps[{i}].{key}: expected a list of strings")
        if not find(entry["sweep"]).is_file():
            raise SweepError(f"{doc.where(at + ('sweep',))}: sweeps[{i}]: no sweep file {entry['sweep']}")
        plan.append({"sweep": entry["sweep"], "set": entry.get("set") or [],
                     "filter": entry.get("filter") or [], "providers": entry.get("providers") or []})
    return plan
