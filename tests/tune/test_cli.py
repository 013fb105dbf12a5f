"""`ift sweep`'s command line (no Ray)."""

from __future__ import annotations

from tune.cli import main


def test_cli_reports_config_errors_and_lists_sweeps(capsys):
    assert main(["--list"]) == 0
    assert "tiny-sweep" in capsys.readouterr().out
    assert main(["tiny-sweep", "sweep.metric=val_nll", "method.lam=2"]) == 2
    assert "method.lam" in capsys.readouterr().err
