"""pipelines.evaluation.tasks: presets, task lists with shots, the Hub check, unknown shipped tasks."""

from __future__ import annotations

import pytest

from pipelines.evaluation.cli import main_eval
from pipelines.evaluation.errors import EvalError
from pipelines.evaluation.harness import evaluate_model
from pipelines.evaluation.tasks import resolve_tasks
from tests.pipelines.evaluation.conftest import untrained_tiny


def test_paper_preset_fails_with_a_clear_message_when_the_hub_is_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main_eval(["tiny", "--preset", "paper", "--no-log"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "arc_challenge, mmlu, truthfulqa_mc2, winogrande, gsm8k" in err
    assert "Hugging Face Hub" in err and "HF_HUB_OFFLINE=1" in err and "--preset offline" in err


def test_paper_preset_is_the_papers_suite_and_shots():
    assert [(t.name, t.num_fewshot) for t in resolve_tasks(preset="paper")] == [
        ("arc_challenge", 25),
        ("mmlu", 5),
        ("truthfulqa_mc2", 0),
        ("winogrande", 5),
        ("gsm8k", 5),
    ]


def test_task_list_overrides_the_preset_and_accepts_shots():
    specs = resolve_tasks(["ift_arith,gsm8k:3"], preset="paper")
    assert [(t.name, t.num_fewshot, t.metric) for t in specs] == [
        ("ift_arith", 0, "exact_match,final_number"),
        ("gsm8k", 3, "exact_match,strict-match"),
    ]


def test_unknown_offline_task_is_a_clear_error_naming_the_shipped_ones():
    model, tok = untrained_tiny()
    with pytest.raises(EvalError, match="unknown offline task.*ift_nope.*ift_arith, ift_capitals_mc"):
        evaluate_model(model, tok, tasks=["ift_arith", "ift_nope"], limit=1)
