"""The one record type: what one case produced, as its worker sends it and the store keeps it.

Every record and every run's meta.json carries `schema_version`. A reader meets older data through
`upgrade` alone (version 1: the records written before the version existed; version 2: before
per-batch clocks and A/B round sizes) and refuses a version it
does not know with one line. `case_id` is the one identity of a case (sweep.Case makes it from the
workload, the provider and every parameter); labels are for people and never used as keys.
docs/records.md documents each field.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone

SCHEMA_VERSION = 4
STATUSES = ("ok", "incorrect", "tampered", "skipped", "error", "crashed", "timeout", "oom")
# statuses of a case that ran and failed: never timed into a result, counted by --strict
FAILED = frozenset({"incorrect", "tampered", "error", "crashed", "timeout", "oom"})


class SchemaError(ValueError):
    """A record or a run written by a schema this code does not read; the message is one line."""


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Record:
    case_id: str
    workload: str
    provider: str
    baseline: str
    params: dict
    shape: dict  # params without the provider's own axes: what a baseline is matched on
    device: str
    status: str = "ok"
    reason: str = ""
    samples_ms: list = field(default_factory=list)
    first_call_ms: float | None = None  # the gated call, compile included
    max_abs_err: float | None = None
    rel_err: float | None = None
    tolerance: dict | None = None
    flops: float | None = None
    bytes: float | None = None
    telemetry: dict | None = None  # NVML before and after timing
    clocks: dict | None = None  # per timed batch: reps and SM clock; batches discarded as throttled
    stop: str | None = None  # why timing stopped: converged, time_budget, max_reps
    host_ms: float | None = None  # the host's time to enqueue one call
    busy_ms: float | None = None  # GPU-busy time of one call
    extra_mib: float | None = None  # CUDA: the gated call's peak allocation beyond what it left held
    hygiene: dict | None = None  # what the worker checked beyond the gate (docs/isolation.md)
    leaked: dict | None = None  # what the case left changed in its worker, which was then replaced
    log: str | None = None  # the case's captured output, relative to the run directory
    rounds: int | None = None  # A/B: rounds pooled into this record
    round_reps: list | None = None  # A/B: samples of each round, in the order samples_ms pools them
    host: str | None = None  # the host that ran it, where that is not this one (Dask)
    started_utc: str = field(default_factory=utc_now)
    ended_utc: str | None = None
    schema_version: int = SCHEMA_VERSION

    @staticmethod
    def blank(case, device: str, **changes) -> "Record":
        """The record of `case` before anything is known about it."""
        return Record(case_id=case.case_id, workload=case.workload, provider=case.provider,
                      baseline=case.baseline, params=case.params, shape=case.shape, device=device,
                      **changes)

    def to_dict(self, _asdict=asdict) -> dict:
        return _asdict(self)


FIELDS = {f.name for f in fields(Record)}
# each field's Python types, read from its annotation ("float | None": a number, or none)
_KINDS = {"str": (str,), "dict": (dict,), "list": (list,), "int": (int,), "float": (int, float),
          "None": (type(None),)}
KINDS = {f.name: tuple(k for part in str(f.type).split("|") for k in _KINDS[part.strip()]) for f in fields(Record)}
REQUIRED = {"case_id", "workload", "provider", "baseline", "params", "shape", "device", "status"}


def tampered_reason(names: list[str]) -> str:
    """The reason of a `tampered` record: the harness's parts its case replaced."""
    return f"the provider replaced the harness's {', '.join(names[:4])}"


def upgrade(d: dict) -> dict:
    """A record of any version this code reads, as a record of SCHEMA_VERSION. Version 1 (no
    `schema_version`) had the same fields less `hygiene`, `rounds` and `host`, which were absent or
    added loosely by other modules; version 2 had them, less `clocks` and `round_reps`, and version
    3 less `extra_mib` (None: not measured)."""
    version = d.get("schema_version", 1)
    if version == SCHEMA_VERSION:
        return d
    if version == 1:
        return {**{k: v for k, v in d.items() if k in FIELDS}, "schema_version": SCHEMA_VERSION}
    if version in (2, 3):
        return {**d, "schema_version": SCHEMA_VERSION}
    raise SchemaError(f"record schema_version {version!r}: this harness reads versions 1 to "
                      f"{SCHEMA_VERSION}; use a newer harness")


def parse(d) -> dict:
    """A stored or received record, checked and upgraded: a dict with every field of Record.
    SchemaError names what is wrong."""
    if not isinstance(d, dict):
        raise SchemaError(f"a record is a JSON object, got {type(d).__name__}")
    d = upgrade(d)
    unknown = set(d) - FIELDS
    missing = REQUIRED - set(d)
    if unknown or missing:
        raise SchemaError("record " + "; ".join(
            ([f"unknown fields {sorted(unknown)}"] if unknown else [])
            + ([f"missing fields {sorted(missing)}"] if missing else [])))
    wrong = next((k for k, v in d.items() if not isinstance(v, KINDS[k]) or (
        isinstance(v, bool) and bool not in KINDS[k])), None)
    if wrong:
        raise SchemaError(f"record {d.get('case_id')}: {wrong} is of type {type(d[wrong]).__name__}, "
                          "not what the harness writes there")
    if d["status"] not in STATUSES:
        raise SchemaError(f"record {d.get('case_id')}: unknown status {d['status']!r}")
    samples = d.get("samples_ms") or []
    if not isinstance(samples, list) or not all(
            isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in samples):
        raise SchemaError(f"record {d.get('case_id')}: samples_ms must be finite, non-negative numbers")
    return Record(**d).to_dict()
