"""The results store: one directory per run with meta.json, samples.jsonl (appended and flushed per
case, so a killed run keeps every finished case) and summary.csv; `latest` points at the newest
complete run."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

META, SAMPLES, SUMMARY, CASES = "meta.json", "samples.jsonl", "summary.csv", "cases.json"
COUNTERS = "counters.json"  # Nsight Compute counters per case id (bench.run --profile ncu)
LOGS = "logs"  # one file per case that wrote to stdout or stderr
TAIL_LINES = 20
FAILED = {"incorrect", "error", "crashed", "timeout", "oom"}


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


class TornSamples(ValueError):
    """samples.jsonl has a line that is not a whole record (the run was killed mid-write)."""


def read_records(path: Path) -> list[dict]:
    """Records of samples.jsonl; a case recorded twice keeps its last record. A line that is not a
    whole JSON record raises TornSamples: a case lost in a torn write must not pass unnoticed
    (`--resume` cuts a torn last line and runs that case again)."""
    by_id: dict[str, dict] = {}
    p = Path(path) / SAMPLES
    if p.exists():
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                by_id[rec["case_id"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TornSamples(f"{p}:{n}: not a whole record (a torn write; "
                                  "--resume the run to cut it and run that case again)") from None
    return list(by_id.values())


def cut_torn_tail(path: Path) -> bool:
    """Drop a last line of samples.jsonl that was never finished (each record is written with its
    newline in one write, so a last line without one was torn), so resumed records start on a line
    of their own. True when something was cut."""
    p = Path(path) / SAMPLES
    data = p.read_bytes() if p.exists() else b""
    if not data or data.endswith(b"\n"):
        return False
    with open(p, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
    return True


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


def keep_log(run_path: Path, log: str, status: str) -> str | None:
    """A case's captured output: removed when empty, else its path within the run; its last lines
    go to stderr when the case failed, since the cause is usually there."""
    p = Path(log)
    if not p.exists() or p.stat().st_size == 0:
        p.unlink(missing_ok=True)
        return None
    if status in FAILED:
        with open(p, "rb") as f:
            f.seek(max(0, p.stat().st_size - 8192))
            tail = f.read().decode(errors="replace").splitlines()[-TAIL_LINES:]
        print(f"--- last lines of {p}:", *tail, sep="\n", file=sys.stderr)
    return str(p.relative_to(run_path))


def point_latest(root: Path, run_path: Path) -> None:
    """Switch ROOT/latest to run_path atomically (a new link renamed over the old one), unless
    `latest` already names a run started later: resuming an old run must not move it back."""
    root = Path(root)
    current = root / "latest"
    if current.exists() and Path(run_path).resolve() != current.resolve():
        try:
            theirs = json.loads((current / META).read_text()).get("started_utc") or ""
            ours = json.loads((Path(run_path) / META).read_text()).get("started_utc") or ""
        except (OSError, ValueError):
            theirs = ours = ""
        if theirs > ours:
            return
    tmp = root / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(run_path, root), tmp)
    os.replace(tmp, current)
