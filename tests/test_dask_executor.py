"""The Dask executor on the CPU: a local cluster of two workers gives the same cases and statuses as
the local pool, --resume finishes a partial run through it, and a Dask worker killed mid-sweep costs
only its own case (retried once on another worker; lost twice, it is recorded as crashed)."""
import json
import logging

import pytest

from bench import nightly as nightly_cli, run
from bench.measure import dask_executor
from bench.results import store
from test_run import small

pytest.importorskip("distributed", reason="the dask extra is not installed")

DASK = ["--executor", "dask", "--workers", "2"]


def statuses(path) -> dict:
    return {r["case_id"]: r["status"] for r in store.load_run(path).records}


def test_local_cluster_matches_the_local_pool_and_resumes(write_sweep, tmp_path):
    path = write_sweep(small(["native", "faulty_providers:wrong", "faulty_providers:abort"], seq_lens="[13]"))
    assert run.main([str(path), "--out", str(tmp_path / "pool"), "--workers", "2"]) == 0
    assert run.main([str(path), "--out", str(tmp_path / "dask"), *DASK]) == 0
    pool, dask = statuses(tmp_path / "pool" / "latest"), statuses(tmp_path / "dask" / "latest")
    assert dask == pool and sorted(dask.values()) == ["crashed", "incorrect", "ok"]
    hosts = {r["host"] for r in store.load_run(tmp_path / "dask" / "latest").records}
    assert len(hosts) == 1

    # a run killed after one case: --resume through Dask runs only the other two
    done = (tmp_path / "dask" / "latest").resolve()
    lines = (done / store.SAMPLES).read_text().splitlines()
    (done / store.SAMPLES).write_text(lines[0] + "\n")
    meta = json.loads((done / store.META).read_text())
    meta["records"] = {"count": 1, "head": json.loads(lines[0])["hash"]}
    (done / store.META).write_text(json.dumps(meta))
    assert run.main(["--resume", str(done), *DASK]) == 0
    records = [json.loads(x) for x in (done / store.SAMPLES).read_text().splitlines()]
    assert len(records) == 3 and statuses(done) == pool


def test_a_lost_worker_costs_only_its_case(write_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("KILL_MARKS", str(tmp_path))
    path = write_sweep(small(["native", "faulty_providers:kill_worker_once", "sdpa-math"], seq_lens="[13]"))
    assert run.main([str(path), "--out", str(tmp_path / "r"), *DASK]) == 0
    status = {r["provider"]: r["status"] for r in store.load_run(tmp_path / "r" / "latest").records}
    assert status == {"native": "ok", "kill_worker_once": "ok", "sdpa-math": "ok"}, \
        "the case whose worker was killed ran again on another worker"


def test_a_case_that_loses_its_worker_twice_is_crashed(write_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("KILL_MARKS", str(tmp_path))
    path = write_sweep(small(["native", "faulty_providers:kill_worker"], seq_lens="[13]"))
    assert run.main([str(path), "--out", str(tmp_path / "r"), "--executor", "dask"]) == 0
    recs = {r["provider"]: r for r in store.load_run(tmp_path / "r" / "latest").records}
    assert recs["native"]["status"] == "ok"
    assert recs["kill_worker"]["status"] == "crashed"
    assert recs["kill_worker"]["reason"] == "its Dask worker was lost twice"


def test_the_nightly_runs_on_a_scheduler_it_is_given(write_sweep, tmp_path):
    """A cluster started apart, as a team's would be: workers declaring one GPU each."""
    import dask
    from distributed import LocalCluster
    from test_nightly import SWEEP

    sweep = write_sweep(SWEEP.format(delay="steady"), "tiny.yaml")
    config = write_sweep(f"sweeps:\n  - sweep: {sweep}\n    set: ['hidden=[16]']\n", "nightly.yaml")
    with dask.config.set(dask_executor.CONFIG), \
            LocalCluster(n_workers=2, threads_per_worker=1, resources={"GPU": 1}, dashboard_address=None,
                         host="127.0.0.1", silence_logs=logging.ERROR) as cluster:
        rc = nightly_cli.main(["--config", str(config), "--out", str(tmp_path / "results"),
                               "--baselines", str(tmp_path / "baselines"), "--history",
                               str(tmp_path / "history.sqlite"), "--scheduler", cluster.scheduler_address])
        assert rc == 0
        assert len(cluster.scheduler_info["workers"]) == 2, "a team's cluster is left running"
    records = store.load_run(tmp_path / "results" / "latest").records
    assert len(records) == 2 and all(r["status"] == "ok" and r["host"] for r in records)


def test_an_unreachable_scheduler_is_one_line_and_exit_2(write_sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dask_executor, "CONNECT_TIMEOUT", "2s")
    path = write_sweep(small(["native"]))
    code = run.main([str(path), "--out", str(tmp_path), "--executor", "dask",
                     "--scheduler", "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--scheduler tcp://127.0.0.1:9" in err
    assert not list(tmp_path.glob("2*")), "nothing written"
