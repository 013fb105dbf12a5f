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
