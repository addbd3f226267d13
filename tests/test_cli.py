"""Every command's --help says what it does in whole sentences."""
import importlib

import pytest


@pytest.mark.parametrize("name", ["run", "report", "compare", "baseline", "nightly", "crosscheck"])
def test_help_description_is_whole_sentences(name, capsys):
    with pytest.raises(SystemExit) as info:
        importlib.import_module(f"bench.{name}").main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert not description.startswith(("options:", "positional")), text
    assert description.rstrip().endswith((".", ".)")), description
