"""The nightly history in a database: one row per run, per case and per case of a run (median, its
CI, sample count, status and the verdict against the baseline), written after every nightly run and
read by the trend page and the change-point search.

Any SQLAlchemy URL works: by default a SQLite file; for a team, one PostgreSQL server that the
nightly of every GPU host writes to. Several hosts may write at once: every row has a natural key
(the run id; workload, provider and params; run and case), inserts skip rows already there, and a
run is written in one transaction, so a row is never duplicated and a run is never half written.
A run id already stored for another run (another start time, GPU, commit or sweep) is not that
run: the newcomer is stored under its id and a digest of itself rather than dropped. A transaction
that lost a race (SQLite's lock past its wait, a PostgreSQL deadlock) is run again.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from bench.cli import BadInput, first_line
from bench.results import compare, counters
from bench.results.baseline import hardware
from bench.results.store import Run
from bench.results.summary import summarize

HISTORY_COLUMNS = ["date", "run_id", "sweep", "hardware", "git_sha", "case", "workload", "provider",
                   "params", "status", "median_ms", "ci_low_ms", "ci_high_ms", "samples", "verdict",
                   "change"]
NUMBERS = ("median_ms", "ci_low_ms", "ci_high_ms", "change")  # the columns stored as numbers
DEFAULT = "results/history.sqlite"
IDENTITY = ("date", "hardware", "git_sha", "sweep")  # what tells two runs with one id apart
ATTEMPTS = 8  # tries of a transaction that lost a race with another writer

schema = sa.MetaData()
runs = sa.Table(
    "runs", schema,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("date", sa.String(40), nullable=False),
    sa.Column("git_sha", sa.String(64)),
    sa.Column("hardware", sa.String(200), nullable=False),
    sa.Column("sweep", sa.String(200)),
    sa.Column("fingerprint", sa.Text),  # meta.json's environment, as JSON
)
cases = sa.Table(
    "cases", schema,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("workload", sa.String(100), nullable=False),
    sa.Column("provider", sa.String(200), nullable=False),
    sa.Column("params", sa.Text, nullable=False),  # JSON, keys sorted: one text per case
    sa.Column("label", sa.Text, nullable=False),
    sa.UniqueConstraint("workload", "provider", "params"),
)
results = sa.Table(
    "results", schema,
    sa.Column("run_id", sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("case_id", sa.ForeignKey("cases.id"), primary_key=True),
    sa.Column("median_ms", sa.Float),
    sa.Column("ci_low_ms", sa.Float),
    sa.Column("ci_high_ms", sa.Float),
    sa.Column("samples", sa.Integer),
    sa.Column("status", sa.String(20)),
    sa.Column("verdict", sa.String(20)),
    sa.Column("change", sa.Float),
)
counter_diffs = sa.Table(  # why a flagged case changed (bench.nightly --counters; bench/results/counters.py)
    "counter_diffs", schema,
    sa.Column("run_id", sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("case_id", sa.ForeignKey("cases.id"), primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("diff", sa.Text),  # the whole diff, as JSON
)


def url_for(where: str) -> str:
    """A SQLAlchemy URL as given, or a path taken as a SQLite file."""
    if "://" in where:
        return where
    if where.endswith(".csv"):
        raise BadInput(f"--history {where}: the history is a database now; move the CSV into one "
                       f"with `python -m bench.history migrate {where}`")
    Path(where).parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{where}"


def connect(where: str) -> sa.Engine:
    """An engine on the history at `where` (URL or SQLite path), its tables created if missing."""
    try:
        engine = sa.create_engine(url_for(where), connect_args=_connect_args(where))
        _transaction(engine, schema.create_all, retry=_created_meanwhile)
    except ModuleNotFoundError as e:
        raise BadInput(f"--history {where}: no database driver {e.name!r} "
                       f"(for PostgreSQL: pip install -e '.[postgres]')") from None
    except (sa.exc.ArgumentError, sa.exc.DatabaseError) as e:  # a file that is no database too
        first = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise BadInput(f"--history {where}: cannot open ({first})") from None
    return engine


def _connect_args(where: str) -> dict:
    # SQLite serialises writers with a file lock: wait for it rather than fail
    return {"timeout": 60} if "://" not in where or where.startswith("sqlite") else {}


def _sqlstate(e: sa.exc.DBAPIError) -> str | None:
    orig = getattr(e, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)  # psycopg 3 or 2


def _transient(e: sa.exc.DBAPIError) -> bool:
    """A failure that running the transaction again cures: SQLite still locked by another writer
    after the busy wait, a PostgreSQL deadlock or serialization failure."""
    return _sqlstate(e) in ("40001", "40P01") or "database is locked" in str(getattr(e, "orig", ""))


def _created_meanwhile(e: sa.exc.DBAPIError) -> bool:
    """Another host created the tables while we did (PostgreSQL: duplicate table, object or type): look
    again and find them."""
    return _transient(e) or _sqlstate(e) in ("42P07", "42710", "23505")


def _transaction(engine: sa.Engine, work, retry=_transient):
    """work(conn) in one transaction, run again (after a short random pause) when it failed in a
    way `retry` accepts. On SQLite the write lock is taken first (BEGIN IMMEDIATE): a writer that
    waits holds nothing, so the busy wait applies and writers cannot deadlock."""
    for attempt in range(ATTEMPTS):
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "sqlite":
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                return work(conn)
        except sa.exc.DBAPIError as e:
            if attempt + 1 == ATTEMPTS or not retry(e):
                raise
        time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))


def history_rows(run: Run, cmp: compare.Comparison | None) -> pd.DataFrame:
    """One row per case of the run, with its verdict against the baseline when there was one."""
    verdicts = {compare.case_label(r): r for r in (cmp.rows if cmp else [])}
    frame = summarize(run.records)
    rows = []
    for rec, (_, s) in zip(run.records, frame.iterrows()):
        label = compare.case_label(rec)
        judged = verdicts.get(label) or {}
        rows.append({
            "date": run.meta.get("started_utc"), "run_id": run.meta.get("run_id") or run.path.name,
            "sweep": (run.meta.get("sweep") or {}).get("name"), "hardware": hardware(run.meta),
            "git_sha": (run.meta.get("git") or {}).get("sha"), "case": label,
            "workload": rec["workload"], "provider": rec["provider"],
            "params": json.dumps(rec.get("params") or {}, sort_keys=True), "status": rec.get("status"),
            "median_ms": s["median_ms"], "ci_low_ms": s["ci_low_ms"], "ci_high_ms": s["ci_high_ms"],
            "samples": len(rec.get("samples_ms") or []),
            "verdict": judged.get("verdict", ""), "change": judged.get("ratio", float("nan")) - 1,
        })
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def _insert_new(conn, table: sa.Table, rows: list[dict]) -> None:
    """Insert rows, skipping those whose key is already there (written by another host)."""
    if not rows:
        return
    dialect = {"sqlite": sqlite, "postgresql": postgresql}.get(conn.dialect.name)
    if dialect is not None:
        conn.execute(dialect.insert(table).on_conflict_do_nothing(), rows)
        return
    for row in rows:  # other databases: one savepoint per row
        try:
            with conn.begin_nested():
                conn.execute(table.insert(), row)
        except sa.exc.IntegrityError:
            pass


def _value(x):
    """A frame's cell as a database value: NaN and pandas' NA become NULL."""
    return None if pd.isna(x) else x


def _identity(values) -> tuple:
    return tuple(None if _value(v) is None else str(v) for v in values)


def _store_runs(conn, rows: pd.DataFrame, fingerprints: dict[str, dict]) -> dict[str, str]:
    """Insert the runs of `rows`; {run id: its id in the history}. The same run again is left as
    stored; a different run under a stored id gets "<id>~<digest of its identity>", which is again
    the same for the same run, so writing it twice still changes nothing."""
    new = {r.run_id: r for r in rows.drop_duplicates("run_id").itertuples()}
    ids = {rid: rid for rid in new}
    for _ in range(2):
        _insert_new(conn, runs, [
            {"id": ids[rid], "date": r.date, "git_sha": _value(r.git_sha), "hardware": r.hardware,
             "sweep": _value(r.sweep), "fingerprint": json.dumps(fingerprints[rid], default=str)
             if rid in fingerprints else None} for rid, r in new.items()])
        stored = {i: _identity(v) for i, *v in conn.execute(
            sa.select(runs.c.id, *(runs.c[c] for c in IDENTITY)).where(runs.c.id.in_(ids.values())))}
        clash = [rid for rid, r in new.items()
                 if stored[ids[rid]] != _identity(getattr(r, c) for c in IDENTITY)]
        if not clash:
            return ids
        for rid in clash:
            mine = json.dumps([rid, *_identity(getattr(new[rid], c) for c in IDENTITY)])
            ids[rid] = f"{rid}~{hashlib.sha256(mine.encode()).hexdigest()[:12]}"
    raise RuntimeError(f"history: run ids {clash} are taken by other runs even with their digest")


def _write(conn, rows: pd.DataFrame, fingerprints: dict[str, dict]) -> dict[str, str]:
    run_ids = _store_runs(conn, rows, fingerprints)
    keys = rows.drop_duplicates(["workload", "provider", "params"])  # in run order: read's order
    _insert_new(conn, cases, [{"workload": r.workload, "provider": r.provider, "params": r.params,
                               "label": r.case} for r in keys.itertuples()])
    ids = {(w, p, q): i for i, w, p, q in conn.execute(
        sa.select(cases.c.id, cases.c.workload, cases.c.provider, cases.c.params)
        .where(cases.c.workload.in_(set(rows["workload"]))))}
    _insert_new(conn, results, [
        {"run_id": run_ids[r.run_id], "case_id": ids[(r.workload, r.provider, r.params)],
         **{c: _value(getattr(r, c)) for c in ("median_ms", "ci_low_ms", "ci_high_ms", "status",
                                               "verdict", "change")},
         "samples": None if pd.isna(r.samples) else int(r.samples)}
        for r in rows.itertuples()])
    return run_ids


def write(engine: sa.Engine, rows: pd.DataFrame,
          fingerprints: dict[str, dict] | None = None) -> dict[str, str]:
    """Write history rows (HISTORY_COLUMNS) in one transaction; rows already stored are kept as
    they are, so writing the same run twice, or from two hosts at once, changes nothing. Returns
    {run id: its id in the history}, which differs only for a run whose id another run holds."""
    if rows.empty:
        return {}
    return _transaction(engine, lambda conn: _write(conn, rows, fingerprints or {}))


def record_run(engine: sa.Engine, run: Run, cmp: compare.Comparison | None) -> str | None:
    """Store one run's cases, with its environment fingerprint; the id it is stored under."""
    rows = history_rows(run, cmp)
    if rows.empty:
        return None
    rid = rows["run_id"].iloc[0]
    stored = write(engine, rows, {rid: run.meta.get("env") or {}})[rid]
    record_counter_diffs(engine, stored, run)
    return stored


def record_counter_diffs(engine: sa.Engine, run_id: str, run: Run) -> int:
    """Store the counter diffs of the run's why.json under its id in the history; how many."""
    diffs = (counters.read(run.path) or {}).get("cases") or []
    by_label = {compare.case_label(r): r for r in run.records}
    keys = {d["case"]: (r["workload"], r["provider"], json.dumps(r.get("params") or {}, sort_keys=True))
            for d in diffs if (r := by_label.get(d["case"]))}
    if not keys:
        return 0

    def work(conn):
        ids = {(w, p, q): i for i, w, p, q in conn.execute(
            sa.select(cases.c.id, cases.c.workload, cases.c.provider, cases.c.params)
            .where(cases.c.workload.in_({k[0] for k in keys.values()})))}
        rows = [{"run_id": run_id, "case_id": ids[keys[d["case"]]], "text": d["text"],
                 "diff": json.dumps(d, default=str)} for d in diffs if keys.get(d["case"]) in ids]
        _insert_new(conn, counter_diffs, rows)
        return len(rows)
    return _transaction(engine, work)


def read_counter_diffs(engine: sa.Engine, run_id: str | None = None) -> list[dict]:
    """The stored counter diffs ({run_id, case, text, diff}), oldest run first; one run's if given."""
    query = (sa.select(counter_diffs.c.run_id, cases.c.label, counter_diffs.c.text, counter_diffs.c.diff)
             .join_from(counter_diffs, cases).join_from(counter_diffs, runs)
             .order_by(runs.c.date, runs.c.id, cases.c.id))
    if run_id is not None:
        query = query.where(counter_diffs.c.run_id == run_id)
    with engine.connect() as conn:
        return [{"run_id": r, "case": c, "text": t, "diff": json.loads(d) if d else None}
                for r, c, t, d in conn.execute(query)]


def read(engine: sa.Engine, gpu: str | None = None) -> pd.DataFrame:
    """The history as a frame of HISTORY_COLUMNS, oldest first; only one GPU model's when given."""
    query = (sa.select(runs.c.date, runs.c.id.label("run_id"), runs.c.sweep, runs.c.hardware,
                       runs.c.git_sha, cases.c.label.label("case"), cases.c.workload,
                       cases.c.provider, cases.c.params, results.c.status, results.c.median_ms,
                       results.c.ci_low_ms, results.c.ci_high_ms, results.c.samples,
                       results.c.verdict, results.c.change)
             .join_from(results, runs).join_from(results, cases)
             .order_by(runs.c.date, runs.c.id, cases.c.id))
    if gpu is not None:
        query = query.where(runs.c.hardware == gpu)
    with engine.connect() as conn:
        frame = pd.DataFrame(conn.execute(query).fetchall(), columns=HISTORY_COLUMNS)
    frame["verdict"] = frame["verdict"].fillna("")
    return frame.astype({c: float for c in ("median_ms", "ci_low_ms", "ci_high_ms", "change")})


def migrate(csv_path: Path, engine: sa.Engine) -> int:
    """Move a history.csv (as the nightly wrote before the database) into the database; rows
    already there are skipped, so a migration can be run again. Returns the rows read."""
    try:
        frame = pd.read_csv(csv_path, keep_default_na=False, na_values=[""], dtype={"git_sha": str})
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise BadInput(f"{csv_path}: cannot read a history CSV ({first_line(e)})") from None
    missing = [c for c in HISTORY_COLUMNS if c not in frame.columns and c != "samples"]
    if missing:
        raise BadInput(f"{csv_path}: not a history CSV (no column {', '.join(missing)})")
    for column in NUMBERS:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna()
        if bad.any():  # line 1 is the header
            raise BadInput(f"{csv_path}:{bad.idxmax() + 2}: {column}: {frame[column][bad.idxmax()]!r} is not a number")
        frame[column] = values
    if "samples" not in frame.columns:
        frame["samples"] = None
    frame["verdict"] = frame["verdict"].fillna("")
    write(engine, frame[HISTORY_COLUMNS])
    return len(frame)
