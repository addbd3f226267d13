"""Why a case got slower: the Nsight Compute counters of one case on two sides (base and head, as
bench.measure.ncu collected them), reduced to what changed, in words: "+6.1%: registers 80 -> 104,
occupancy 3 -> 2 blocks/SM (registers limit), DRAM read +0.2% (...)". The changes are ranked by how
much they explain: the kernels and their resources (registers, spills, shared memory, blocks per SM,
occupancy) first, then the bytes moved, then pipe use and clocks. Unchanged counters are left out.

A case's counters are its kernels' together: times and bytes summed over the kernels, the rest
(per-launch resources, rates) from its longest kernel. The diffs of a run live in its why.json."""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path

WHY = "why.json"  # the counter diffs of a run's flagged cases, beside its records


@dataclass(frozen=True)
class Counter:
    field: str
    label: str
    kind: str  # how it is compared and worded: count, blocks, bytes, pct, mhz, time
    min_change: float  # the least change that counts: relative (bytes, mhz, time) or points (pct)


# in the order a diff lists them: resources, then bytes, then pipe use and clocks
COUNTERS = [
    Counter("registers", "registers", "count", 0),
    Counter("spill_bytes", "spill stores", "bytes", 0.01),
    Counter("smem_bytes", "shared memory per block", "bytes", 0),
    Counter("blocks_per_sm", "occupancy", "blocks", 0),
    Counter("theoretical_occupancy_pct", "theoretical occupancy", "pct", 1.0),
    Counter("occupancy_pct", "achieved occupancy", "pct", 2.0),
    Counter("dram_read_bytes", "DRAM read", "bytes", 0.001),
    Counter("dram_write_bytes", "DRAM written", "bytes", 0.001),
    Counter("l2_bytes", "L2 bytes", "bytes", 0.001),
    Counter("tensor_pct", "tensor pipe", "pct", 2.0),
    Counter("sm_clock_mhz", "SM clock", "mhz", 0.01),
    Counter("sm_pct", "SM throughput", "pct", 2.0),
    Counter("dram_pct", "DRAM throughput", "pct", 2.0),
    Counter("l2_pct", "L2 throughput", "pct", 2.0),
    Counter("duration_ms", "kernel time under ncu", "time", 0.01),
]
SUMMED = ("duration_ms", "dram_read_bytes", "dram_write_bytes", "l2_bytes", "spill_bytes")
# lines of `cutile-cache log` that differ between two compiles of the same kernel
VOLATILE = ("commit ", "Date:", "Last used:", "Duration:")
COMPILE_DIFF_LINES = 200


def _sum(values) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def summarize(kernels: list[dict]) -> dict:
    """One case's counters from its kernels' (ncu.parse_csv's rows)."""
    top = max(kernels, key=lambda k: k.get("duration_ms") or 0)
    smem = [top.get("smem_static_bytes"), top.get("smem_dynamic_bytes")]
    out = {c.field: top.get(c.field) for c in COUNTERS}
    out.update({f: _sum(k.get(f) for k in kernels) for f in SUMMED})
    out.update(smem_bytes=_sum(smem), limited_by=top.get("limited_by"), kernels=len(kernels),
               kernel=top.get("name", ""), top_stall=top.get("top_stall"),
               top_stall_share=top.get("top_stall_share"))
    return out


STALL_POINTS = 0.05  # the least move of the top stall's share of stalled cycles that counts


def stall_words(reason: str, share: float) -> str:
    """A top stall as the report and the diffs write it: "long scoreboard 49%"."""
    return f"{reason} {share:.0%}"


def stall_change(base: dict, head: dict) -> dict | None:
    """What the longest kernel's warps waited on, where that changed (its top stall reason, or that
    reason's share of their stalled cycles), as a change whose sides are words; None where it did
    not, or a side has no stall reasons."""
    b, h = base.get("top_stall"), head.get("top_stall")
    if not b or not h:
        return None
    bs, hs = base["top_stall_share"], head["top_stall_share"]
    if b != h:
        text = f"top stall {b} ({bs:.0%}) -> {h} ({hs:.0%})"
    elif abs(hs - bs) >= STALL_POINTS:
        text = f"{h} stalls {bs:.0%} -> {hs:.0%} of stalled cycles"
    else:
        return None
    return {"field": "top_stall", "label": "top stall", "base": stall_words(b, bs),
            "head": stall_words(h, hs), "text": text}


def changed(c: Counter, base: float | None, head: float | None) -> bool:
    if base is None or head is None or base == head:
        return False
    if c.kind in ("count", "blocks"):
        return True
    if c.kind == "pct":
        return abs(head - base) >= c.min_change
    if base == 0:
        return True
    return abs(head / base - 1) >= max(c.min_change, 1e-12)


def size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _rel(base: float, head: float) -> str:
    return f"{(head / base - 1) * 100:+.1f}%" if base else "new"


def wording(c: Counter, base: float, head: float, limited_by: str | None = None) -> str:
    """One change in words."""
    if c.kind == "count":
        return f"{c.label} {base:g} -> {head:g}"
    if c.kind == "blocks":
        return f"occupancy {base:g} -> {head:g} blocks/SM" + (f" (limited by {limited_by})" if limited_by else "")
    if c.kind == "bytes":
        return f"{c.label} {_rel(base, head)} ({size(base)} -> {size(head)})"
    if c.kind == "pct":
        return f"{c.label} {base:.0f}% -> {head:.0f}%"
    if c.kind == "mhz":
        return f"{c.label} {base:.0f} -> {head:.0f} MHz"
    return f"{c.label} {_rel(base, head)}"


def changes(base: dict, head: dict) -> list[dict]:
    """What differs between two case summaries, most telling first."""
    out = []
    if base["kernels"] != head["kernels"]:
        out.append({"field": "kernels", "label": "kernels", "base": base["kernels"],
                    "head": head["kernels"], "text": f"kernels {base['kernels']} -> {head['kernels']}"})
    for c in COUNTERS:
        b, h = base.get(c.field), head.get(c.field)
        if changed(c, b, h):
            out.append({"field": c.field, "label": c.label, "base": b, "head": h,
                        "text": wording(c, b, h, head.get("limited_by"))})
    stall = stall_change(base, head)
    return out + [stall] if stall else out


def percent(ratio: float | None) -> str:
    return "?" if ratio is None or math.isnan(ratio) else f"{(ratio - 1) * 100:+.1f}%"


def compile_diff(base: str | None, head: str | None) -> str | None:
    """A unified diff of two cuTile compile logs, the lines that differ between any two compiles
    left out; "" when they agree; None without both logs."""
    if base is None or head is None:
        return None
    def keep(text):
        return [line for line in text.splitlines() if not line.lstrip().startswith(VOLATILE)]
    lines = list(difflib.unified_diff(keep(base), keep(head), "base", "head", lineterm="", n=1))
    if len(lines) > COMPILE_DIFF_LINES:
        lines = lines[:COMPILE_DIFF_LINES] + [f"... {len(lines) - COMPILE_DIFF_LINES} more lines"]
    return "\n".join(lines)


def diff(case: str, base: dict, head: dict, ratio: float | None = None) -> dict:
    """The counter diff of one case: `base` and `head` are ncu.profile_case's answers for each
    side, `ratio` the head/base ratio of the medians that flagged it."""
    out = {"case": case, "ratio": ratio, "changes": [], "base": None, "head": None}
    missing = [f"{side}: {entry.get('reason', 'no counters')}"
               for side, entry in (("base", base), ("head", head)) if not entry.get("kernels")]
    if missing:
        return {**out, "reason": "; ".join(missing),
                "text": f"{percent(ratio)}: no counter diff ({'; '.join(missing)})"}
    out["base"], out["head"] = summarize(base["kernels"]), summarize(head["kernels"])
    out["changes"] = changes(out["base"], out["head"])
    said = ", ".join(c["text"] for c in out["changes"]) or "no counter collected changed"
    out["text"] = f"{percent(ratio)}: {said}"
    out["compile_diff"] = compile_diff(base.get("compile_log"), head.get("compile_log"))
    out["compile_log_reason"] = head.get("compile_log_reason") or base.get("compile_log_reason")
    return out


def write(run_path: Path, diffs: list[dict], reason: str | None = None) -> Path:
    """why.json of a run: its flagged cases' diffs, or why there are none."""
    path = Path(run_path) / WHY
    path.write_text(json.dumps({"reason": reason, "cases": diffs}, indent=2, default=str) + "\n")
    return path


def read(run_path: Path) -> dict | None:
    """A run's why.json, or None where it has none."""
    path = Path(run_path) / WHY
    return json.loads(path.read_text()) if path.exists() else None
