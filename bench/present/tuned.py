"""Tuned configs beside the kernels' defaults: the lines bench.tune prints, and the report's table
of the tuned file for the run's GPU. A config shows only the keys where it differs from the default."""
from __future__ import annotations

from bench.results import tune


def where(e: dict) -> str:
    return f"{e['kernel']} {e['dtype']} dim={e['dim']} size<={e['bucket']}"


def side_by_side(kernel: str, config: dict) -> tuple[str, str]:
    """(tuned, default) as 'key=value' text over the keys where they differ."""
    full, default = tune.defaults_beside(kernel, config)
    keys = [k for k in full if full[k] != default[k]]
    if not keys:
        return "the default", "-"
    return (", ".join(f"{k}={full[k]}" for k in keys), ", ".join(f"{k}={default[k]}" for k in keys))


def speedup_text(e: dict) -> str:
    s = e.get("speedup_vs_default")
    return f"{s:.3f}x" if s else "default not measured"


def lines(entries: list[dict], none_passed: list[tuple]) -> list[str]:
    """One line per tuned key: the winner against the default, or why there is none."""
    out = []
    for e in entries:
        cfg, default = side_by_side(e["kernel"], e["config"])
        out.append(f"{where(e)}: {cfg} (default {default}); {speedup_text(e)} over "
                   f"{e['shapes']} shape(s), {e['configs_compared']} config(s) compared")
    for kernel, dtype, dim, b in none_passed:
        out.append(f"{where(dict(kernel=kernel, dtype=dtype, dim=dim, bucket=b))}: no config passed "
                   "the correctness check at every shape; nothing written")
    return out


def used_note(meta: dict, now: dict) -> str:
    """Whether the run used this file as it is now (runs record its sha256)."""
    env = meta.get("env") or {}
    if "tuned" not in env:
        return "The run did not record which tuned file it used."
    if env["tuned"] is None:
        return "The run found no tuned file: its cuTile cases that named no config ran the defaults."
    if env["tuned"]["sha256"] != now["sha256"]:
        return (f"The file has changed since the run, which used the version with sha256 "
                f"{env['tuned']['sha256'][:12]}.")
    return "The run used this file as it is now."


def section(meta: dict, directory=None) -> dict | None:
    """The report's block for the tuned file of the run's GPU; None when it has none."""
    gpus = [g.get("name") for g in (meta.get("env") or {}).get("gpus") or [] if g.get("name")]
    if not gpus:
        return None
    found = tune.tuned_file(gpus[0], directory)
    if found is None:
        return None
    block = {"gpu": gpus[0], "file": f"kernels/tuned/{found['path'].name}", "error": None,
             "table": None, "used": used_note(meta, found)}
    if found["error"]:
        block["error"] = found["error"].replace(str(found["path"]), block["file"])
        return block
    rows = []
    for e in found["configs"]:
        cfg, default = side_by_side(e["kernel"], e["config"])
        s = e.get("speedup_vs_default")
        rows.append([(e["kernel"], e["kernel"]), (e["dtype"], e["dtype"]), (str(e["dim"]), e["dim"]),
                     (f"<={e['bucket']}", e["bucket"]), (cfg, cfg), (default, default),
                     (speedup_text(e), s or 0), (str(e.get("run", "-")), str(e.get("run", "")))])
    block["table"] = {"columns": ["kernel", "dtype", "dim", "size", "tuned", "default",
                                  "tuned vs default", "tuned from run"], "rows": rows}
    return block
