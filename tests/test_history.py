"""The history database, on SQLite and on a real PostgreSQL server the test starts: runs, cases and
results round-trip; writing a run again, or from several hosts at once, neither duplicates nor
loses a row; a history CSV migrates with one command, and again without change."""
import glob
import json
import multiprocessing as mp
import os
import pwd
import shutil
import subprocess
import tempfile

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from bench import history as history_cli, nightly as nightly_cli
from bench.results import history

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
    name = f"h{os.getpid()}_{request.node.name.split('[')[0][-40:]}".lower()
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
    assert nightly_cli.main(["--history", str(tmp_path / "history.csv")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error:") for line in lines)
    assert "not a history CSV" in lines[0] and "migrate" in lines[2]
