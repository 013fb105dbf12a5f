"""`ift sweep`'s command line (no Ray)."""

from __future__ import annotations

from tune.cli import main, split_config_path


def test_cli_reports_config_errors_and_lists_sweeps(capsys):
    assert main(["--list"]) == 0
    assert "tiny-sweep" in capsys.readouterr().out
    assert main(["tiny-sweep", "sweep.metric=val_nll", "method.lam=2"]) == 2
    assert "method.lam" in capsys.readouterr().err


def test_the_first_item_is_a_config_path_unless_it_is_an_override():
    assert split_config_path([]) == (None, [])
    assert split_config_path(["tiny-sweep", "a.b=1"]) == ("tiny-sweep", ["a.b=1"])
    assert split_config_path(["a.b=1", "c=2"]) == (None, ["a.b=1", "c=2"])
