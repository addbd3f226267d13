"""The history database, on SQLite and on a real PostgreSQL server the test starts: runs, cases and
results round-trip; writing a run again, or from several hosts at once, neither duplicates nor
loses a row; nightlies started together, each in its own process, all keep their runs, even under
one run id; a history CSV migrates with one command, and again without change."""
import glob
import json
import multiprocessing as mp
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from bench import history as history_cli
from bench.results import history, store
from bench.results.baseline import open_run

CASES = [("layernorm", "torch", {"hidden": 768}), ("layernorm", "cutile", {"hidden": 768}),
         ("fmha", "sdpa", {"seq_len": 1024, "dtype": "float16"})]
START = pd.Timestamp("2026-01-01T02:00:00")


def sha(night: int) -> str:
    """The synthetic commit measured on a night: its number first, so that a short sha tells it."""
    return f"{night:04d}{'f' * 36}"


def nights(count: int, hardware: str = "NVIDIA H100 80GB HBM3", prefix: str = "run",
           medians=None) -> pd.DataFrame:
    """`count` nightly runs of CASES as history rows; medians[i] is night i's median (default 1 ms)."""
    medians = np.ones(count) if medians is None else medians
    rows = []
    for i in range(count):
        for workload, provider, params in CASES:
            m = float(medians[i])
            rows.append({"date": f"{START + pd.Timedelta(days=i):%Y-%m-%dT%H:%M:%S.%fZ}",
                         "run_id": f"{prefix}{i:03d}",
                         "sweep": "nightly", "hardware": hardware, "git_sha": sha(i),
                         "case": f"{workload}/{provider} {params}", "workload": workload,
                         "provider": provider, "params": json.dumps(params, sort_keys=True),
                         "status": "ok", "median_ms": m, "ci_low_ms": m * 0.99, "ci_high_ms": m * 1.01,
                         "samples": 100, "verdict": "", "change": float("nan")})
    return pd.DataFrame(rows, columns=history.HISTORY_COLUMNS)


def _pg(program: str, *args: str) -> None:
    """Run a PostgreSQL server program, as the `postgres` user when run as root (PostgreSQL refuses
    root); raises with the reason when it is missing or fails."""
    found = shutil.which(program)
    found = found or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"))), None)
    if not found:
        raise RuntimeError(f"no {program}: PostgreSQL is not installed (Debian: apt-get install postgresql)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    done = subprocess.run(as_user + [found, *args], capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"{program} failed: {(done.stderr or done.stdout).strip()[-300:]}")


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server in a temporary directory, on a unix socket there only."""
    pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")
    root = tempfile.mkdtemp(prefix="bench-pg-")
    os.chmod(root, 0o755)
    data = os.path.join(root, "data")
    try:
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
        _pg("initdb", "-D", data, "-A", "trust", "-U", "bench", "--no-sync")
        _pg("pg_ctl", "-D", data, "-w", "-t", "60", "-l", os.path.join(root, "log"),
            "-o", f"-k {root} -c listen_addresses='' -F", "start")
    except (RuntimeError, KeyError, OSError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"no PostgreSQL server could be started: {e}")
    yield f"postgresql+psycopg://bench@/postgres?host={root}"
    _pg("pg_ctl", "-D", data, "-m", "immediate", "stop")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """A fresh, empty history database of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "history.sqlite")
    base = request.getfixturevalue("postgres")
    test = re.sub(r"\W+", "_", request.node.name)[-40:]  # its parameters included: one database each
    name = f"h{os.getpid()}_{test}".lower()
    with sa.create_engine(base, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    return base.replace("/postgres?", f"/{name}?")


def counts(engine) -> dict:
    with engine.connect() as conn:
        return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
                for t in (history.runs, history.cases, history.results)}


def test_rows_round_trip_and_a_second_write_changes_nothing(url):
    db = history.connect(url)
    rows = nights(3, medians=[1.0, 1.5, 2.0])
    history.write(db, rows, {"run000": {"gpus": [{"name": "H100"}]}})
    history.write(db, rows)
    assert counts(db) == {"runs": 3, "cases": 3, "results": 9}
    back = history.read(db)
    assert list(back.columns) == history.HISTORY_COLUMNS
    pd.testing.assert_frame_equal(back.reset_index(drop=True), rows.astype({"samples": "int64"}),
                                  check_dtype=False)
    assert history.read(db, "NVIDIA B200").empty
    with db.connect() as conn:
        fingerprint = conn.execute(sa.select(history.runs.c.fingerprint)
                                   .where(history.runs.c.id == "run000")).scalar()
    assert "H100" in fingerprint


def _writer(url, barrier, host):
    barrier.wait()
    db = history.connect(url)
    shared, own = nights(4), nights(2, prefix=f"host{host}-")
    for i in range(4):  # the shared runs interleaved with this host's own
        history.write(db, shared[shared["run_id"] == f"run{i:03d}"])
        if i < 2:
            history.write(db, own[own["run_id"] == f"host{host}-{i:03d}"])


def test_writers_on_several_hosts_at_once_neither_duplicate_nor_lose_rows(url):
    history.connect(url)  # the tables exist, as after the first nightly
    hosts = 4
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(hosts)
    procs = [ctx.Process(target=_writer, args=(url, barrier, h)) for h in range(hosts)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * hosts
    runs = 4 + hosts * 2
    assert counts(history.connect(url)) == {"runs": runs, "cases": 3, "results": runs * 3}


@pytest.fixture(scope="module")
def processes():
    """Where the writer processes come from: a fork server, started clean (never a fork of this
    process, whose connections and threads a writer must not share), that imported this module
    once, so that eight writers start in milliseconds rather than each importing for seconds."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    here = Path(__file__).resolve().parent
    with pytest.MonkeyPatch.context() as mp_env:  # the server imports this checkout, not another
        paths = [str(here.parent), str(here), os.environ.get("PYTHONPATH")]
        mp_env.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))
        first = ctx.Process(target=os.getpid)
        first.start()
        first.join(120)
    return ctx


def run_dir(root, i: int, run_id: str):
    """Writer i's run as the runner writes it (store.RunWriter checks each record against
    record.py): CASES on the CPU, every sample i + 1 ms, started within the same second as the
    others."""
    meta = {"run_id": run_id, "command": ["test"], "started_utc": f"2026-01-01T02:00:00.{i:06d}Z",
            "complete": True, "git": {"sha": sha(0), "dirty": False}, "sweep": {"name": "nightly"},
            "env": {"device_kind": "cpu", "gpus": []}, "cases": len(CASES)}
    writer = store.RunWriter(root / f"writer{i}", meta, [])
    for workload, provider, params in CASES:
        writer.append({"case_id": f"{workload}/{provider}{sorted(params.items())}",
                       "workload": workload, "provider": provider, "baseline": "torch",
                       "params": params, "shape": params, "device": "cpu", "status": "ok",
                       "samples_ms": [i + 1.0] * 5})
    writer.close(True)
    return writer.path


def _record(url, path, barrier, module):
    """One nightly's history step, all started at once: open the history (new, so its tables are
    created by whoever comes first) and record the run, then again, which changes nothing."""
    assert history.__file__ == module, f"{history.__file__}: not the history module under test"
    barrier.wait(60)
    db = history.connect(url)
    for _ in range(2):
        history.record_run(db, open_run(path), None)


@pytest.mark.parametrize("ids", ["unique", "shared"])
@pytest.mark.parametrize("writers", [2, 8])
def test_runs_recorded_at_once_each_keep_every_row(url, tmp_path, processes, writers, ids):
    """Unique ids are run_dir_name's (one second, sweep and commit, a random part); shared ones
    are what runs started in one second were named before the random part."""
    base = f"20260101T020000Z_nightly_{sha(0)[:10]}"
    paths = [run_dir(tmp_path, i, f"{base}_{i:08x}" if ids == "unique" else base)
             for i in range(writers)]
    barrier = processes.Barrier(writers)
    procs = [processes.Process(target=_record, args=(url, str(p), barrier, history.__file__))
             for p in paths]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * writers
    db = history.connect(url)
    for p in paths:  # and again from here: still nothing changes
        history.record_run(db, open_run(p), None)
    back = history.read(db)
    expected, found = (writers, writers * len(CASES)), (back["run_id"].nunique(), len(back))
    kind = "postgresql" if "://" in url else "sqlite"
    print(f"{kind}, {writers} writers, {ids} ids: runs, rows expected {expected}, found {found}")
    assert found == expected
    assert counts(db) == {"runs": writers, "cases": len(CASES), "results": writers * len(CASES)}
    got = set(back[["date", "workload", "provider", "params", "median_ms"]].itertuples(index=False))
    assert got == {(f"2026-01-01T02:00:00.{i:06d}Z", w, p, json.dumps(q, sort_keys=True), i + 1.0)
                   for i in range(writers) for w, p, q in CASES}
    if ids == "unique":  # stored under their own ids
        assert set(back["run_id"]) == {f"{base}_{i:08x}" for i in range(writers)}
    else:  # the first under the id, each other under the id and a digest of itself
        assert sorted(back["run_id"].unique())[0] == base
        assert back["run_id"].str.fullmatch(re.escape(base) + r"(~[0-9a-f]{12})?").all()
    db.dispose()


def test_a_history_csv_migrates_with_one_command_and_again_without_change(url, tmp_path, capsys):
    old = nights(5, medians=[1, 2, 3, 4, 5])
    old.loc[3, "verdict"], old.loc[3, "change"] = "regression", 0.25
    csv = tmp_path / "history.csv"
    old.drop(columns="samples").to_csv(csv, index=False)  # as the nightly wrote it before
    assert history_cli.main(["migrate", str(csv), "--history", url]) == 0
    assert "15 rows" in capsys.readouterr().out
    assert history_cli.main(["migrate", str(csv), "--history", url]) == 0
    db = history.connect(url)
    assert counts(db) == {"runs": 5, "cases": 3, "results": 15}
    back = history.read(db)
    assert back["median_ms"].tolist() == old["median_ms"].tolist()
    assert back["git_sha"].tolist() == old["git_sha"].tolist()
    assert back.loc[3, ["verdict", "change"]].tolist() == ["regression", 0.25]


def test_bad_history_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    assert history_cli.main(["migrate", str(tmp_path / "x.csv"), "--history",
                             str(tmp_path / "h.sqlite")]) == 2
    assert history_cli.main(["migrate", str(tmp_path / "x.csv"), "--history", "nosuch://x"]) == 2
    from bench import nightly as nightly_cli  # imports torch: kept out of the writer processes

    assert nightly_cli.main(["--history", str(tmp_path / "history.csv")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error:") for line in lines)
    assert "not a history CSV" in lines[0] and "migrate" in lines[2]


def test_a_history_that_is_no_database_or_a_csv_of_other_values_is_one_line(tmp_path, capsys):
    """Each was a traceback of sqlalchemy's or the codec's: a file that is no database, a CSV whose
    median is not a number (a 66-line traceback when the row was written), a CSV that is binary."""
    notdb = tmp_path / "notdb.sqlite"
    notdb.write_text("not a database, " * 100)
    csv = tmp_path / "history.csv"
    rows = nights(2, medians=[1, 2]).drop(columns="samples")
    rows.to_csv(csv, index=False)
    assert history_cli.main(["migrate", str(csv), "--history", str(notdb)]) == 2
    rows["median_ms"] = rows["median_ms"].astype(object)
    rows.loc[2, "median_ms"] = "fast"
    rows.to_csv(csv, index=False)
    assert history_cli.main(["migrate", str(csv), "--history", str(tmp_path / "h.sqlite")]) == 2
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 4)
    assert history_cli.main(["migrate", str(tmp_path / "binary.csv"), "--history", str(tmp_path / "h.sqlite")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error:") for line in lines), lines
    assert "cannot open (file is not a database)" in lines[0]
    assert f"history.csv:4: median_ms: 'fast' is not a number" in lines[1]
    assert "cannot read a history CSV" in lines[2]
