"""The parent's side of the worker protocol (bench.measure.pool.Worker), against stand-in worker
programs of a tree's protocol: what it asks, and which answers it takes."""
import textwrap

import pytest

from bench.measure import pool
from bench.measure.sweep import Case

# a worker program that answers each request with a record of its case, ok, whose reason lists
# the request's keys; NONCE says what it repeats back: "echo" the request's, "wrong" another,
# "none" answers the bare record (protocols 1 and 2), "tampered" the request's, saying that the
# case replaced part of the harness (the record beside it is ignored)
STAND_IN = '''"""A stand-in worker."""
PROTOCOL = {protocol}
import json, sys
if __name__ == "__main__":
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        case = request["case"]
        record = {{k: case[k] for k in ("case_id", "workload", "provider", "baseline", "params", "shape")}}
        record.update(device=sys.argv[1], status="ok", reason=",".join(sorted(request)))
        answer = {{"echo": {{"nonce": request.get("nonce"), "record": record}},
                  "wrong": {{"nonce": "0" * 32, "record": record}}, "none": record,
                  "tampered": {{"nonce": request.get("nonce"), "tampered": ["check.passes"], "record": record}}
                  }}["{nonce}"]
        print(json.dumps(answer), flush=True)
'''


def _tree(tmp_path, protocol: int, nonce: str):
    root = tmp_path / f"tree-{protocol}-{nonce}"
    (root / "bench" / "measure").mkdir(parents=True)
    (root / "bench" / "__init__.py").write_text("")
    (root / "bench" / "measure" / "__init__.py").write_text("")
    (root / "bench" / "measure" / "worker.py").write_text(
        textwrap.dedent(STAND_IN.format(protocol=protocol, nonce=nonce)))
    return root


CASE = Case(case_id="c0ffee", workload="fmha", provider="native", baseline="native",
            params={"seq_len": 13}, shape={"seq_len": 13}, timing={"timeout_s": 60})


@pytest.mark.parametrize("protocol,nonce,status,asked", [
    (3, "echo", "ok", "case,nonce"),
    (3, "wrong", "tampered", None),  # something other than the worker wrote the answer
    (3, "none", "tampered", None),
    (3, "tampered", "tampered", None),  # the parent writes that case's record
    (2, "none", "ok", "case"),       # an older tree is asked as it expects, without a nonce
])
def test_an_answer_is_taken_only_with_the_requests_nonce(tmp_path, protocol, nonce, status, asked):
    worker = pool.Worker("cpu", _tree(tmp_path, protocol, nonce))
    try:
        first, second = worker.run(CASE), worker.run(CASE)
    finally:
        worker.stop()
    for rec in (first, second):
        assert rec["status"] == status, rec
        if asked:
            assert rec["reason"] == asked
        elif nonce == "tampered":
            assert rec["reason"] == "the provider replaced the harness's check.passes"
            assert rec["leaked"] == {"harness": ["check.passes"]} and not rec["samples_ms"]
        else:
            assert "answer pipe" in rec["reason"]


def test_an_answer_is_one_line_with_the_nonce():
    """A forged line and the worker's own can arrive in one read."""
    one = '{"nonce": "a", "record": {"x": 1}}'
    assert pool._unwrap(one, "a") == {"x": 1}
    assert pool._unwrap(one, "b") is None
    assert pool._unwrap(f"{one}\n{one}", "a") is None
    assert pool._unwrap('{"nonce": "a"}', "a") is None
    assert pool._unwrap('{"nonce": "a", "tampered": ["x"]}', "a") == ["x"]
    assert pool._unwrap('{"nonce": "a", "tampered": [1]}', "a") is None
    assert pool._unwrap("[1, 2]", "a") is None and pool._unwrap("{", "a") is None


def test_a_compiled_cache_of_its_own_source_is_no_change_and_one_of_other_code_is(tmp_path):
    """An import elsewhere (a test, another run) writes caches of the tree while a run runs: such
    a cache is its source's code, and no change. One of other code is, though its header names
    the source as it is, and so is a cache of another interpreter, which cannot be checked here."""
    import marshal
    import py_compile
    from pathlib import Path

    src = tmp_path / "bench" / "gate.py"
    src.parent.mkdir()
    src.write_text("TOLERANCE = 1e-2\n")
    before = pool.source_state(tmp_path)
    cache = Path(py_compile.compile(str(src), doraise=True))
    assert cache.parent.name == "__pycache__"
    assert pool.source_changes(tmp_path, before) == []
    header = cache.read_bytes()[:16]
    cache.write_bytes(header + marshal.dumps(compile("TOLERANCE = 9e9\n", str(src), "exec")))
    assert pool.source_changes(tmp_path, before) == ["bench/__pycache__/" + cache.name]
    cache.unlink()
    assert pool.source_changes(tmp_path, before) == []
    other = cache.with_name("gate.cpython-20.pyc")
    other.write_bytes(b"not this interpreter's")
    assert pool.source_changes(tmp_path, before) == ["bench/__pycache__/gate.cpython-20.pyc"]
