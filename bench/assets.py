"""Where the harness's own files are: the built-in sweeps and the report templates. In a checkout
they are the top-level sweeps/ and report_templates/; an installed wheel carries them as
bench/sweeps/ and bench/report_templates/ (pyproject.toml maps one onto the other)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

SWEEP_SUFFIXES = (".yaml", ".yml")


def folder(name: str) -> Path:
    """The folder `name` (sweeps or report_templates): the installed package's, else the checkout's."""
    packaged = Path(str(resources.files("bench").joinpath(name)))
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / name


def sweep_file(path) -> Path:
    """A sweep (or nightly plan) named on a command line: an existing file always wins; else
    `sweeps/NAME.yaml`, `NAME.yaml` or `NAME` names a built-in one, found wherever the harness is
    installed; else the path as given, for the caller to report as missing."""
    given = Path(path)
    if given.exists() or given.is_absolute() or given.parent not in (Path("."), Path("sweeps")):
        return given
    name = given.name if given.suffix in SWEEP_SUFFIXES else given.name + ".yaml"
    builtin = folder("sweeps") / name
    return builtin if builtin.is_file() else given
