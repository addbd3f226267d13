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


@pytest.mark.parametrize("name, argv, says", [
    ("baseline", ["set", "{tmp}/none"], "{tmp}/none: no such run directory"),
    ("compare", ["{tmp}/a", "{tmp}/b"], "{tmp}/a: no such run directory"),
    ("report", ["{tmp}"], "{tmp}: not a run directory (no meta.json)"),
    ("crosscheck", ["spread", "{tmp}", "{tmp}"], "{tmp}: not a run directory (no meta.json)"),
    ("crosscheck", ["spread", "{tmp}"], "one run has no spread"),  # was a spread of 0.00%, exit 0
    ("crosscheck", ["spread", "{tmp}", "{tmp}", "--min-ms", "nan"], "--min-ms must be a number of ms"),
    ("run", ["{tmp}/none.yaml"], "{tmp}/none.yaml"),
    ("ab", ["HEAD", "{tmp}/none.yaml"], "{tmp}/none.yaml"),
    ("nightly", ["--bisect-budget", "-1"], "--bisect-budget -1: expected 0 to a week of seconds"),
])
def test_bad_input_is_one_line_and_exit_2(name, argv, says, tmp_path, capsys):
    """bench.cli.command turns BadInput (a sweep's SweepError too) into the line every command prints."""
    main = importlib.import_module(f"bench.{name}").main
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and says.format(tmp=tmp_path) in err
