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


def test_help_config_shows_the_value_the_config_runs_with(capsys, monkeypatch):
    from tests.pipelines.test_config import key_table

    monkeypatch.setenv("COLUMNS", "130")
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ift train (the default config, tiny): every key with the value this run uses")
    rows = key_table(out)  # asserts the columns line up
    assert rows["optimization.lr"][0] == "0.003" and rows["optimization.epochs"][0] == "2"
    assert "model.lora.r" in rows and "method.lam" in rows and "method.beta" not in rows
    assert rows["method.name"][1] == "one of ift, sft, dpo, orpo"
    assert rows["data.truncation"][1] == "one of truncate_left, truncate_right, drop"
    assert all(len(line) <= 130 for line in out.splitlines()) and "\x1b[" not in out  # no colour codes


def test_help_config_follows_the_overrides_and_the_method(capsys):
    from tests.pipelines.test_config import key_table

    assert main(["train", "method.name=dpo", "method.beta=0.3", "--help-config"]) == 0
    rows = key_table(capsys.readouterr().out)
    assert rows["method.name"][0] == "dpo" and rows["method.beta"][0] == "0.3" and "method.lam" not in rows


def test_help_config_with_a_bad_override_is_an_error(capsys):
    assert main(["train", "optimization.lr=-1", "--help-config"]) == 2
    assert "optimization.lr" in capsys.readouterr().err


def test_configs_is_a_table_of_names_and_files(capsys, monkeypatch):
    from pipelines.config_loading import packaged_config_names, packaged_config_path

    monkeypatch.setenv("COLUMNS", "240")  # wide enough that no path wraps, whatever terminal runs the suite
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["config", "file"] and set(lines[1]) in ({"─"}, {"-"})
    assert [line.split() for line in lines[2:]] == [[n, str(packaged_config_path(n))] for n in packaged_config_names()]
