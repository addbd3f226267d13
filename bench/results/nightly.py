"""The nightly plan (sweeps/nightly.yaml) as data: which sweeps to run, each cut down by its --set,
--filter and --providers; python -m bench.nightly runs it."""
from __future__ import annotations

from pathlib import Path

import yaml

from bench.cli import BadInput

ENTRY_KEYS = {"sweep", "set", "filter", "providers"}


def load_plan(path, find=Path) -> list[dict]:
    """The sweeps to run: [{sweep, set, filter, providers}], checked so a typo fails before any run;
    find(name) is the file a sweep's name stands for (bench.nightly: a built-in one too)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    entries = data.get("sweeps") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise BadInput(f"{path}: expected a non-empty list under 'sweeps'")
    plan = []
    for i, entry in enumerate(entries):
        where = f"{path}: sweeps[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sweep"), str):
            raise BadInput(f"{where}: expected a mapping with 'sweep: FILE'")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise BadInput(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                           f"(known: {', '.join(sorted(ENTRY_KEYS))})")
        for key in ("set", "filter", "providers"):
            if not all(isinstance(v, str) for v in entry.get(key) or []):
                raise BadInput(f"{where}.{key}: expected a list of strings")
        if not find(entry["sweep"]).is_file():
            raise BadInput(f"{where}: no sweep file {entry['sweep']}")
        plan.append({"sweep": entry["sweep"], "set": entry.get("set") or [],
                     "filter": entry.get("filter") or [], "providers": entry.get("providers") or []})
    return plan
