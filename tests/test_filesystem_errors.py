"""A folder that cannot be written (read-only, full) ends a command in one line and exit status 2,
and loses nothing a run already stored. Where this machine lets the test mount a filesystem, the
errors are the kernel's own (a read-only tmpfs, a full one); elsewhere they are raised at the same
calls, with the same errno."""
import builtins
import contextlib
import errno
import io
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from bench import report, run
from bench.results import store

SWEEP = """\
workload: fmha
baseline: native
providers: [native, sdpa-math]
axes: {batch: [1], heads: [2], seq_len: [13, 33], head_dim: [16], dtype: [float32]}
timing: {warmup_ms: 1, min_reps: 3, max_reps: 20, max_time_s: 0.05, target_ci: 0.5, timeout_s: 60}
"""


def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


class _FillsUp:
    """A file whose writes store half their bytes, then fail as a disk that just filled does."""

    def __init__(self, f):
        self.f = f

    def write(self, data) -> int:
        self.f.write(data[:len(data) // 2])
        self.f.flush()  # on the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)


class _Refuse:
    """Writes under `root` fail with `code`, raised where the system would raise it."""

    def __init__(self, monkeypatch, root: Path, code: int):
        self.root, self.code = str(Path(root).resolve()), code
        opened, os_open = builtins.open, os.open

        def under(p) -> bool:
            try:
                return os.path.realpath(os.fspath(p)).startswith(self.root)
            except TypeError:
                return False

        def fail(p):
            raise OSError(self.code, os.strerror(self.code), os.fspath(p))

        def open_(file, mode="r", *a, **kw):
            if any(c in mode for c in "wax+") and under(file):
                fail(file)
            return opened(file, mode, *a, **kw)

        def os_open_(file, flags, *a, **kw):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(file):
                fail(file)
            return os_open(file, flags, *a, **kw)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(os, "open", os_open_)
        for name in ("mkdir", "replace", "rename", "symlink", "unlink"):
            real = getattr(os, name)

            def guarded(src, *a, _real=real, **kw):
                if under(src) or any(under(x) for x in a[:1] if isinstance(x, (str, Path))):
                    fail(src)
                return _real(src, *a, **kw)
            monkeypatch.setattr(os, name, guarded)


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """make(dir): from now on `dir` (already filled) cannot be written."""
    mounted = []

    def make(folder: Path):
        if os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
                ["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0:
            mounted.append(folder)
            if subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)],
                              capture_output=True).returncode == 0:
                return
        if os.geteuid() != 0:
            for p in [folder, *folder.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
            return
        _Refuse(monkeypatch, folder, errno.EROFS)

    yield make
    for folder in reversed(mounted):
        _unmount(folder)
    for p in [tmp_path, *tmp_path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            with contextlib.suppress(OSError):
                p.chmod(0o755)


def _one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("---")]
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def test_a_new_run_into_a_read_only_folder_is_one_line(tmp_path, read_only, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP)
    out = tmp_path / "ro"
    out.mkdir()
    read_only(out)
    assert run.main([str(sweep), "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(out) in line
    assert list(out.iterdir()) == []


def test_resume_and_report_of_a_run_in_a_read_only_folder_are_one_line(tmp_path, read_only, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP)
    out = tmp_path / "runs"
    assert run.main([str(sweep), "--out", str(out)]) == 0
    path = (out / "latest").resolve()
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    capsys.readouterr()
    read_only(out)
    assert run.main(["--resume", str(path)]) == 2
    _one_error_line(capsys.readouterr().err)
    assert report.main([str(path)]) == 2
    _one_error_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before


def test_a_report_into_a_path_through_a_file_is_one_line(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP)
    assert run.main([str(sweep), "--out", str(tmp_path / "runs")]) == 0
    (tmp_path / "file").write_text("")
    capsys.readouterr()
    assert report.main([str(tmp_path / "runs" / "latest"), "-o", str(tmp_path / "file" / "r.html")]) == 2
    assert "file" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("disk", ["simulated", "tmpfs"])
def test_a_disk_that_fills_mid_run_keeps_every_stored_record_for_resume(tmp_path, monkeypatch, capsys, disk):
    """The third record finds the disk full, part of its line written: exit 2 in one line that names
    --resume; the two stored records stay whole (the torn line cut), and --resume (disk freed) runs
    exactly the cases that were not stored. `tmpfs` fills a real 16 MB filesystem (root only)."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP)
    out = tmp_path / "disk"
    mounted = disk == "tmpfs" and _mount(out, "size=16m,mode=755")
    if disk == "tmpfs" and not mounted:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    filler = out / f"filler-{uuid.uuid4().hex}"
    append = store.RunWriter.append
    calls = []

    def filling(self, record):
        calls.append(record["case_id"])
        if len(calls) == 3:
            if mounted:  # fill the real filesystem: the kernel says ENOSPC
                with contextlib.suppress(OSError), open(filler, "wb") as f:
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
            else:  # as a full disk does: part of the line is stored, then ENOSPC
                self._samples = _FillsUp(self._samples)
        return append(self, record)

    monkeypatch.setattr(store.RunWriter, "append", filling)
    try:
        assert run.main([str(sweep), "--out", str(out)]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "No space left on device" in line and "--resume" in line
        path = Path(line.split("--resume ")[-1].strip())
        assert not (out / "latest").exists()
        filler.unlink(missing_ok=True)
        monkeypatch.setattr(store.RunWriter, "append", append)
        kept = store.load_run(path)
        assert [r["case_id"] for r in kept.records] == calls[:2]
        assert run.main(["--resume", str(path)]) == 0
        done = store.load_run(path)
        assert done.meta["complete"]
        ids = [r["case_id"] for r in done.records]
        assert sorted(ids) == sorted(c["case_id"] for c in done.cases) and len(set(ids)) == len(ids)
        assert ids[:2] == calls[:2]
    finally:
        if mounted:
            _unmount(out)
