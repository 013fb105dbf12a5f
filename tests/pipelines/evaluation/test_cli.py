"""pipelines.evaluation.cli: ``ift compare`` output files and table, the module's command dispatch."""

from __future__ import annotations

import csv

import pytest

from pipelines.evaluation.cli import main, main_compare
from tests.pipelines.evaluation.conftest import MODEL_NAME, SMALL


def test_compare_prints_and_writes_the_table_for_two_versions(store, tmp_path, capsys):
    v1, v2 = store["versions"]
    refs = [f"models:/{MODEL_NAME}/{v1}", f"models:/{MODEL_NAME}/{v2}"]
    out_dir = tmp_path / "cmp"
    rc = main_compare([*refs, "--tracking-uri", store["uri"], "--limit", SMALL, "--out", str(out_dir), "--no-log"])
    out = capsys.readouterr().out
    assert rc == 0, out
    with (out_dir / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["sft", "ift"]
    assert [r["model"] for r in table] == refs
    for r in table:
        scores = [float(r["ift_arith/exact_match"]), float(r["ift_capitals_mc/acc"])]
        assert float(r["average"]) == pytest.approx(sum(scores) / 2, abs=0.01)
    md = (out_dir / "comparison.md").read_text()
    assert "| Method | Model | Arithmetic (EM) | Capitals (MC) | Average |" in md
    printed = out.splitlines()
    header = next(i for i, line in enumerate(printed) if line.startswith("Method"))
    assert printed[header + 2].startswith("sft") and printed[header + 3].startswith("ift")
    assert printed[-1] == f"results written to {out_dir / 'comparison.csv'} and {out_dir / 'comparison.md'}"


def test_build_tasks_writes_the_shipped_task_files(tmp_path, capsys):
    from pipelines.evaluation.tasks import OFFLINE_TASKS, TASKS_DIR

    assert main(["build-tasks", str(tmp_path)]) == 0
    for name in OFFLINE_TASKS:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (TASKS_DIR / f"{name}.jsonl").read_bytes()
    assert capsys.readouterr().out.split() == [str(tmp_path / f"{name}.jsonl") for name in OFFLINE_TASKS]


def test_unknown_command_prints_the_usage(capsys):
    assert main(["nope"]) == 2
    assert "usage: python -m pipelines.evaluation {eval,compare,build-tasks}" in capsys.readouterr().err


def test_ift_eval_and_compare_dispatch_here(monkeypatch):
    from pipelines import cli
    from pipelines.evaluation import cli as eval_cli

    calls = []
    monkeypatch.setattr(eval_cli, "main_eval", lambda argv: calls.append(("eval", argv)) or 0)
    monkeypatch.setattr(eval_cli, "main_compare", lambda argv: calls.append(("compare", argv)) or 0)
    assert cli.main(["eval", "tiny", "--no-log"]) == 0
    assert cli.main(["compare", "a", "b"]) == 0
    assert calls == [("eval", ["tiny", "--no-log"]), ("compare", ["a", "b"])]
