"""The CI script (.ci/run) installs and tests as the README tells a user to, before anything else."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_first_runs_exactly_the_readmes_two_set_up_commands():
    setup = (ROOT / "README.md").read_text().split("## Set up\n")[1].split("\n## ")[0]
    commands = [line.split("  #")[0].strip() for line in setup.splitlines() if line.startswith("    ")]
    assert len(commands) == 2 and commands[1] == "python -m pytest -q"
    script = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
              if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert script[:2] == commands


def test_the_test_files_ci_runs_again_exist():
    named = re.findall(r"tests/test_\w+\.py", (ROOT / ".ci" / "run").read_text())
    assert named and [n for n in named if not (ROOT / n).is_file()] == []
