"""The results store: one directory per run with meta.json, samples.jsonl (appended and flushed per
case, so a killed run keeps every finished case) and summary.csv; `latest` points at the newest
complete run."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

META, SAMPLES, SUMMARY, CASES = "meta.json", "samples.jsonl", "summary.csv", "cases.json"
COUNTERS = "counters.json"  # Nsight Compute counters per case id (bench.run --profile ncu)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def run_dir_name(sweep_name: str, git_sha: str | None) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}_{sweep_name}_{(git_sha or 'nogit')[:10]}"


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@dataclass
class Run:
    path: Path
    meta: dict
    records: list[dict] = field(default_factory=list)
    cases: list[dict] = field(default_factory=list)
    counters: dict = field(default_factory=dict)

    @property
    def done_ids(self) -> set[str]:
        return {r["case_id"] for r in self.records}


def read_records(path: Path) -> list[dict]:
    """Records of samples.jsonl; a torn last line (the run was killed mid-write) is ignored, and a
    case recorded twice keeps its last record."""
    by_id: dict[str, dict] = {}
    p = Path(path) / SAMPLES
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_id[rec["case_id"]] = rec
    return list(by_id.values())


def load_run(path) -> Run:
    """A run directory (or a `latest` link to one) as written by RunWriter."""
    path = Path(path).resolve()
    meta_path = path / META
    if not meta_path.exists():
        raise FileNotFoundError(f"{path}: not a run directory (no {META})")
    cases_path = path / CASES
    cases = json.loads(cases_path.read_text()) if cases_path.exists() else []
    counters_path = path / COUNTERS
    counters = json.loads(counters_path.read_text()) if counters_path.exists() else {}
    return Run(path, json.loads(meta_path.read_text()), read_records(path), cases, counters)


def write_counters(path: Path, counters: dict) -> None:
    _write_json_atomic(Path(path) / COUNTERS, counters)


class RunWriter:
    """Writes one run. Samples are appended and fsync'd per case; meta.json is replaced atomically."""

    def __init__(self, path: Path, meta: dict, cases: list[dict] | None = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        if cases is not None:
            _write_json_atomic(self.path / CASES, cases)
        self.write_meta()
        self._samples = open(self.path / SAMPLES, "a")

    def write_meta(self) -> None:
        _write_json_atomic(self.path / META, self.meta)

    def append(self, record: dict) -> None:
        self._samples.write(json.dumps(record, default=str) + "\n")
        self._samples.flush()
        os.fsync(self._samples.fileno())

    def close(self, complete: bool) -> None:
        self._samples.close()
        self.meta["ended_utc"] = utc_now()
        self.meta["complete"] = complete
        self.write_meta()

    def write_summary(self, frame) -> None:
        tmp = self.path / (SUMMARY + ".tmp")
        frame.to_csv(tmp, index=False)
        os.replace(tmp, self.path / SUMMARY)


def point_latest(root: Path, run_path: Path) -> None:
    """Switch ROOT/latest to run_path atomically (a new link renamed over the old one)."""
    root = Path(root)
    tmp = root / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(run_path, root), tmp)
    os.replace(tmp, root / "latest")
