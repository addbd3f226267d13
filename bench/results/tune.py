"""Picks each kernel's best tile config from a finished run and merges it into the GPU's tuned file
(kernels/tuned/<gpu slug>.json), which the kernels read when a caller gives them no config.

Cases of a workload's subject providers (those it names, else all but the baseline) that name a
config (their provider-only axes) are grouped by kernel, dtype, dim and size bucket
(kernels/tuned.py), and written to the workload's own tuned folder (its `tuned_dir`) unless a folder
is given. A config counts in a group only if every one of its cases there passed the correctness
gate (status `ok`), those that only gate it (a forward config's fwd_bwd cases) included, and it was
timed at every shape of the group; the winner has the lowest geometric mean of its median over the
best median at each shape (the default on a tie).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from statistics import geometric_mean

from bench import workloads
from bench.cli import BadInput
from bench.results.stats import describe
from bench.results.baseline import open_run
from bench.results.summary import is_suspect
from kernels import tuned


@dataclass
class Group:
    """The configs measured for one tuned key: median ms per (config, shape), and the failed ones."""
    key: tuple  # (kernel, dtype, dim, bucket)
    medians: dict  # config json -> {shape json: median ms}
    failed: set  # config json that did not pass at some shape
    directory: Path | None = None  # the tuned folder of the workload's kernels (None: kernels/tuned)

    def eligible(self) -> dict:
        shapes = set().union(*self.medians.values()) if self.medians else set()
        return {c: m for c, m in self.medians.items() if c not in self.failed and set(m) == shapes}


def groups(records: list[dict], ceilings: dict | None = None) -> list[Group]:
    """The subject providers' cases that name a config, grouped by tuned key, in key order."""
    by_key: dict[tuple, Group] = {}
    for rec in records:
        wl = workloads.get(rec["workload"])
        if not wl.is_subject(rec.get("provider"), rec.get("baseline")):
            continue
        found = wl.tuned_key(rec["params"]) if wl.tuned_key else None
        if not found or not found[3]:  # no config named: the case ran whatever was tuned then
            continue
        kernel, dim, size, config, timed = found
        key = (kernel, rec["params"]["dtype"], dim, tuned.bucket(size))
        g = by_key.setdefault(key, Group(key, {}, set(), wl.tuned_dir and Path(wl.tuned_dir)))
        cfg = json.dumps(config, sort_keys=True)
        if rec.get("status") != "ok" or is_suspect(rec, ceilings):  # an impossible time never wins
            g.failed.add(cfg)
        elif timed:
            shape = json.dumps(rec.get("shape", {}), sort_keys=True)
            g.medians.setdefault(cfg, {})[shape] = describe(rec["samples_ms"])["median"]
    return [by_key[k] for k in sorted(by_key, key=str)]


def winner(group: Group, run_id: str) -> dict | None:
    """The tuned-file entry of the group's best config; None when no config counts."""
    cands = group.eligible()
    if not cands:
        return None
    shapes = next(iter(cands.values())).keys()
    best_at = {s: min(m[s] for m in cands.values()) for s in shapes}
    score = {c: geometric_mean([m[s] / best_at[s] for s in shapes]) for c, m in cands.items()}
    kernel, dtype, dim, b = group.key
    check = tuned.validator(kernel)
    default = next((c for c in cands if check(json.loads(c)) == check({})), None)
    # on a tie the default: a config that is no faster is no reason to leave it
    best = min(score, key=lambda c: (score[c], c != default))
    vs_default = None
    if default is not None:
        vs_default = geometric_mean([cands[default][s] / cands[best][s] for s in shapes])
    return {"kernel": kernel, "dtype": dtype, "dim": dim, "bucket": b, "config": json.loads(best),
            "shapes": len(shapes), "configs_compared": len(cands), "speedup_vs_default": vs_default,
            "run": run_id}


def gpu_of(meta: dict) -> str:
    names = {g.get("name") for g in (meta.get("env") or {}).get("gpus") or []}
    if len(names) != 1:
        raise BadInput(f"run {meta.get('run_id')}: tuned configs are per GPU, and this run has "
                       f"{'no GPU' if not names else 'several kinds: ' + ', '.join(sorted(names))}")
    return names.pop()


def merge(path: Path, gpu: str, entries: list[dict]) -> None:
    """Write `entries` into the tuned file, replacing the entries of the same keys."""
    data = {"gpu": gpu, "configs": []}
    if path.exists():
        try:
            data = tuned.read(path)
        except ValueError as e:
            raise BadInput(f"{e}; fix or remove it before tuning into it") from None
        if tuned.slug(data["gpu"]) != tuned.slug(gpu):
            raise BadInput(f"{path}: tuned on {data['gpu']}, not on this run's {gpu}")

    def key(e):
        return e["kernel"], e["dtype"], e["dim"], e["bucket"]
    new = {key(e): e for e in entries}
    data["configs"] = sorted([e for e in data["configs"] if key(e) not in new] + entries, key=key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def defaults_beside(kernel: str, config: dict) -> tuple[dict, dict]:
    """(the full config, the kernel's defaults): an entry names only some keys, the rest default."""
    check = tuned.validator(kernel)
    return check(config), check({})


def tuned_file(gpu: str, directory=None) -> dict | None:
    """The tuned file of this GPU as a report shows it: {path, sha256, configs, error}, configs None
    and error the one line why when it cannot be used; None when the GPU has no file."""
    path = tuned.path_for(gpu, directory)
    if not path.exists():
        return None
    found = {"path": path, "sha256": tuned.fingerprint(gpu, directory)["sha256"], "configs": None,
             "error": None}
    try:
        found["configs"] = tuned.read(path)["configs"]
    except ValueError as e:
        found["error"] = str(e)
    return found


def tune_run(run_path, directory=None) -> tuple[list[Path], list[dict], list[tuple]]:
    """(tuned files written, entries written, keys of groups where no config counted) for a
    finished run; each workload's winners go to its own tuned folder unless `directory` is given."""
    run = open_run(run_path)
    gpu = gpu_of(run.meta)
    entries, none_passed, by_file = [], [], {}
    for g in groups(run.records, run.meta.get("ceilings")):
        entry = winner(g, run.meta.get("run_id") or run.path.name)
        if entry is None:
            none_passed.append(g.key)
        else:
            entries.append(entry)
            by_file.setdefault(tuned.path_for(gpu, directory or g.directory), []).append(entry)
    for path, written in by_file.items():
        merge(path, gpu, written)
    return list(by_file) or [tuned.path_for(gpu, directory)], entries, none_passed
