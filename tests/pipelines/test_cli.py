"""The `ift` command's own behaviour: version, help on every command, a closed pipe."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.cli import main


def test_version_prints_the_installed_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("ift 0.")


@pytest.mark.parametrize("command", ["train", "data", "configs"])
def test_every_command_answers_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and f"ift {command}" in capsys.readouterr().out


def test_a_reader_that_closes_the_pipe_early_gets_no_traceback():
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main(['configs']))"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # as `ift configs | head -0` does
    stderr = proc.stderr.read().decode()
    assert proc.wait(60) == 0
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


@pytest.mark.parametrize("command, module, extra", [("eval", "lm_eval", "eval"), ("compare", "lm_eval", "eval")])
def test_a_command_whose_extra_is_missing_names_the_extra_to_install(command, module, extra, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # an import of it raises ImportError
    assert main([command, "tiny"]) == 2
    assert f"pip install -e '.[{extra}]'" in capsys.readouterr().err
