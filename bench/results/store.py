"""The results store: one directory per run with meta.json, samples.jsonl (appended and flushed per
case, so a killed run keeps every finished case) and summary.csv; `latest` points at the newest
complete run.

Only the parent process writes a run, and only records it received from its own workers count:
each line of samples.jsonl carries the hash of the line before it and of its own record, and
meta.json, rewritten by the parent after every record, names the last hash. A reader follows that
chain back from meta.json; a line that is not on it (written by something else, or torn by a kill)
is reported and ignored. Runs written before schema version 2 have no chain and are read through
record.upgrade.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import secrets
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench.results.record import FAILED, SCHEMA_VERSION, SchemaError, parse, utc_now  # noqa: F401

META, SAMPLES, SUMMARY, CASES = "meta.json", "samples.jsonl", "summary.csv", "cases.json"
SAMPLES_GZ = SAMPLES + ".gz"  # a blessed baseline's samples, compressed
COUNTERS = "counters.json"  # Nsight Compute counters per case id (bench.run --profile ncu)
LOGS = "logs"  # one file per case that wrote to stdout or stderr
TAIL_LINES = 20
GENESIS = "0" * 64  # the hash before a run's first record
LOCK = ".writing"  # held (flock) by the one process writing the run: released when it ends, however


def run_file(path) -> bool:
    """Whether `path` is one of a run's own files, which only the harness writes."""
    path = Path(path)
    return path.name in (META, SAMPLES, SAMPLES_GZ, SUMMARY, CASES, COUNTERS, LOCK) \
        and (path.parent / META).is_file()


def run_dir_name(sweep_name: str, git_sha: str | None) -> str:
    """<UTC second>_<sweep>_<sha>_<random>: unique across processes and hosts that start together."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}_{sweep_name}_{(git_sha or 'nogit')[:10]}_{secrets.token_hex(4)}"


def chain_hash(prev: str, record: dict) -> str:
    body = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256((prev + body).encode()).hexdigest()


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


def chain(records: list[dict], head: str = GENESIS) -> tuple[list[dict], str]:
    """The lines of `records` chained after `head`, and the new head."""
    lines = []
    for r in records:
        lines.append({"prev": head, "hash": chain_hash(head, r), "record": r})
        head = lines[-1]["hash"]
    return lines, head


def _lines(p: Path, chained: bool) -> list[tuple[int, object]]:
    """(line number, parsed JSON) of each non-empty line. A last line without its newline that is
    not JSON was torn by a kill: TornSamples (--resume cuts it). Any other line that is not JSON is
    TornSamples too where no chain names the records (schema version 1: a record could be lost
    unseen); on a chained run, it is a line the harness did not write, given as None."""
    out = []
    if not p.exists() and p.with_name(SAMPLES_GZ).exists():
        p = p.with_name(SAMPLES_GZ)
    if p.exists():
        text = gzip.decompress(p.read_bytes()).decode(errors="replace") if p.suffix == ".gz" \
            else p.read_text(errors="replace")
        lines = text.splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError:
                if chained and (n < len(lines) or text.endswith("\n")):
                    out.append((n, None))
                    continue
                raise TornSamples(f"{p}:{n}: not a whole record (a torn write; "
                                  "--resume the run to cut it and run that case again)") from None
    return out


def meta_version(meta: dict) -> int:
    """The schema version of a run's meta.json; SchemaError for one this code does not read."""
    version = meta.get("schema_version", 1)
    if version not in range(1, SCHEMA_VERSION + 1):
        raise SchemaError(f"run schema_version {version!r}: this harness reads versions 1 to "
                          f"{SCHEMA_VERSION}; use a newer harness")
    return version


def _chained(p: Path, lines: list, head: str) -> tuple[list[dict], list[int]]:
    """(the records on the chain that ends at `head`, in order; line numbers of the others)."""
    by_hash = {}
    for n, line in lines:
        if isinstance(line, dict) and isinstance(line.get("record"), dict) \
                and chain_hash(str(line.get("prev")), line["record"]) == line.get("hash"):
            by_hash.setdefault(line["hash"], (n, line))
    kept, at = [], head
    while at != GENESIS and at in by_hash:
        n, line = by_hash.pop(at)
        kept.append((n, line["record"]))
        at = line["prev"]
    if at != GENESIS:
        raise SchemaError(f"{p}: the record chain named by {META} is broken (a record the harness "
                          "wrote is missing or changed)")
    on_chain = {n for n, _ in kept}
    return [r for _, r in reversed(kept)], [n for n, _ in lines if n not in on_chain]


def read_records(path: Path, meta: dict | None = None) -> list[dict]:
    """The run's records, checked against record.Record; a case recorded twice keeps its last record.
    A torn last line raises TornSamples: a case lost in a torn write must not pass unnoticed
    (`--resume` cuts it and runs that case again). A line the harness did not write is reported on
    stderr and ignored."""
    path = Path(path)
    if meta is None:
        meta = json.loads((path / META).read_text())
    p = path / SAMPLES
    lines = _lines(p, chained=meta_version(meta) > 1)
    if meta_version(meta) == 1:
        records, foreign = [line for _, line in lines], []
    else:
        records, foreign = _chained(p, lines, (meta.get("records") or {}).get("head", GENESIS))
    if foreign:
        print(f"warning: {p}: ignored {len(foreign)} line(s) the harness did not write "
              f"(line {', '.join(map(str, foreign[:5]))}{', ...' if len(foreign) > 5 else ''})",
              file=sys.stderr)
    by_id: dict[str, dict] = {}
    for rec in records:
        rec = parse(rec)
        by_id[rec["case_id"]] = rec
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


# what meta.json's readers take its parts to be: a file edited by hand into other shapes is refused
# in one line, not met as a traceback in whichever reader touches it first
META_KINDS = {"sweep": dict, "env": dict, "git": dict, "workloads": dict, "records": dict, "ceilings": dict,
              "ab": dict, "devices": list, "complete": bool, "run_id": str, "started_utc": str}


def checked_meta(meta, where) -> dict:
    """meta.json's content, its parts of the kinds META_KINDS names; SchemaError naming the first
    that is not."""
    if not isinstance(meta, dict):
        raise SchemaError(f"{where}: not a JSON object")
    parts = {k: (meta.get(k), kind) for k, kind in META_KINDS.items()}
    sweep, env = meta.get("sweep"), meta.get("env")
    if isinstance(sweep, dict):
        parts["sweep.compare"] = (sweep.get("compare"), dict)
        compare = sweep.get("compare") if isinstance(sweep.get("compare"), dict) else {}
        parts["sweep.compare.threshold"] = (compare.get("threshold"), (int, float))
        parts["sweep.compare.control"] = (compare.get("control"), str)
    if isinstance(env, dict):
        parts["env.gpus"] = (env.get("gpus"), list)
    if isinstance(meta.get("workloads"), dict):
        parts.update((f"workloads.{k}", (v, dict)) for k, v in meta["workloads"].items())
    for name, (value, kind) in parts.items():
        if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
            raise SchemaError(f"{where}: {name} is of type {type(value).__name__}, not what the harness writes there")
    return meta


def load_run(path) -> Run:
    """A run directory (or a `latest` link to one) as written by RunWriter."""
    path = Path(path).resolve()
    meta_path = path / META
    if not meta_path.exists():
        raise FileNotFoundError(f"{path}: not a run directory (no {META})")
    meta = checked_meta(json.loads(meta_path.read_text()), meta_path)
    cases_path = path / CASES
    cases = json.loads(cases_path.read_text()) if cases_path.exists() else []
    if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
        raise SchemaError(f"{cases_path}: not a list of cases")
    counters_path = path / COUNTERS
    counters = json.loads(counters_path.read_text()) if counters_path.exists() else {}
    return Run(path, meta, read_records(path, meta), cases, counters)


def write_counters(path: Path, counters: dict) -> None:
    _write_json_atomic(Path(path) / COUNTERS, counters)


class RunBusy(ValueError):
    """Another process is writing the run."""


def lock_run(path: Path):
    """An open file holding the run's write lock; RunBusy where another process holds it: two
    resumes of one run timed their cases against each other on one machine, and each chained its
    records on a head the other had moved, so every reader warned of lines the harness did not
    write."""
    f = open(Path(path) / LOCK, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RunBusy(f"{path}: another process is writing this run; let it finish") from None
    return f


class RunWriter:
    """Writes one run, holding its lock (`lock`, taken by the caller, or taken here). Samples are
    appended and fsync'd per case, each on the record chain; meta.json, which names the chain's
    last hash, is replaced atomically after each. A new run (`cases` given) gets a directory of its
    own: never one that exists."""

    def __init__(self, path: Path, meta: dict, cases: list[dict] | None = None, lock=None):
        self.path = Path(path)
        if cases is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir()  # FileExistsError rather than two runs in one directory
        self._lock = lock or lock_run(self.path)
        if cases is not None:
            meta["schema_version"] = SCHEMA_VERSION
            meta.setdefault("records", {"count": 0, "head": GENESIS})
            _write_json_atomic(self.path / CASES, cases)
        elif meta_version(meta) != SCHEMA_VERSION:
            raise SchemaError(f"{self.path}: written by schema version {meta_version(meta)}; "
                              f"only version {SCHEMA_VERSION} runs can be resumed")
        self.meta = meta
        self.write_meta()
        self._samples = open(self.path / SAMPLES, "ab", buffering=0)

    def write_meta(self) -> None:
        _write_json_atomic(self.path / META, self.meta)

    def append(self, record: dict) -> None:
        """Store one record whole or not at all: a write the disk cut short (a full disk stores part
        of a line, then fails) is cut off again, so the run stays readable."""
        count = self.meta["records"]["count"]
        (line,), head = chain([parse(record)], self.meta["records"]["head"])
        data = memoryview((json.dumps(line, default=str) + "\n").encode())
        fd = self._samples.fileno()
        end = os.fstat(fd).st_size
        try:
            while data:
                data = data[self._samples.write(data):]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise
        self.meta["records"] = {"count": count + 1, "head": head}
        self.write_meta()

    def close(self, complete: bool) -> None:
        self._samples.close()
        self.meta["ended_utc"] = utc_now()
        self.meta["complete"] = complete
        self.write_meta()
        self.release()

    def release(self) -> None:
        """Let another process write the run (a resume), as this process's end would."""
        self._lock.close()

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
