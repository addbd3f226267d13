"""Blessed baselines: one small copy of a run per GPU model and sweep, under
`results/baselines/<gpu>/<sweep>/`, that `bench.compare` and `bench.nightly` measure new runs against.

A baseline keeps meta.json, summary.csv and the raw samples gzip-compressed (the samples are what
a comparison needs; the summary is for people reading the directory)."""
from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

from bench.cli import BadInput
from bench.results.store import META, SAMPLES_GZ, SCHEMA_VERSION, SUMMARY, Run, chain, load_run, utc_now
from bench.results.summary import summarize

ROOT = Path("results/baselines")
BLESSED = "blessed.json"


def hardware(meta: dict) -> str:
    """The GPU model a run was measured on ("cpu" for runs without a GPU): runs are comparable only
    on the same model."""
    gpus = (meta.get("env") or {}).get("gpus") or []
    names = sorted({g.get("name") or "unknown GPU" for g in gpus})
    return " + ".join(names) if names else "cpu"


def slug(text: str) -> str:
    """A directory name for a GPU model or sweep: lower case, runs of other characters -> '-'."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def open_run(path) -> Run:
    """A run directory or a blessed baseline; BadInput with a one-line reason when it is neither."""
    path = Path(path)
    if not path.is_dir():
        raise BadInput(f"{path}: no such run directory")
    try:
        run = load_run(path)
    except FileNotFoundError as e:
        raise BadInput(str(e)) from None
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path}: malformed run ({type(e).__name__}: {e})") from None
    if not isinstance(run.meta, dict):
        raise BadInput(f"{path}: malformed {META} (not a JSON object)")
    bad = [r for r in run.records if not isinstance(r, dict) or not {"workload", "provider"} <= r.keys()]
    if bad:
        raise BadInput(f"{path}: malformed record in samples (needs workload and provider)")
    return run


def baseline_dir(root, meta: dict) -> Path:
    """Where the baseline for this run's GPU model and sweep lives."""
    sweep = (meta.get("sweep") or {}).get("name") or "unnamed"
    return Path(root) / slug(hardware(meta)) / slug(sweep)


def without_out(command: list) -> list:
    """A run's command less its --out: where the run was written is a folder of the machine that ran
    it (often a temporary one), not part of what it measured; blessed.json names the source run."""
    kept, skip = [], False
    for arg in command:
        if not skip and arg != "--out" and not str(arg).startswith("--out="):
            kept.append(arg)
        skip = arg == "--out"
    return kept


def bless(run_path, root=ROOT) -> Path:
    """Copy a run into the baseline store, replacing the previous baseline of its GPU and sweep."""
    run = open_run(run_path)
    if not run.meta.get("complete", False):
        raise BadInput(f"{run.path}: the run is incomplete; bless a complete run")
    dest = baseline_dir(root, run.meta)
    if dest.exists() and any(dest.iterdir()) and not (dest / BLESSED).is_file():
        raise BadInput(f"{dest}: holds files that are not a blessed baseline, which blessing would "
                       "delete; move them, or bless into another --root")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines, head = chain(run.records)
    meta = {**run.meta, "command": without_out(run.meta.get("command") or []),
            "schema_version": SCHEMA_VERSION, "records": {"count": len(lines), "head": head}}
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    summarize(run.records, run.meta.get("ceilings")).to_csv(tmp / SUMMARY, index=False)
    with gzip.open(tmp / SAMPLES_GZ, "wt") as f:
        for line in lines:
            f.write(json.dumps(line, default=str) + "\n")
    (tmp / BLESSED).write_text(json.dumps(
        {"run_id": run.meta.get("run_id"), "source": run.path.name, "blessed_utc": utc_now(),
         "hardware": hardware(run.meta)}, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
