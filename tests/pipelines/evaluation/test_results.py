"""pipelines.evaluation.results: where the scores are logged in MLflow, and the comparison table."""

from __future__ import annotations

import pytest

from pipelines.evaluation.cli import main_eval
from pipelines.evaluation.results import EVAL_EXPERIMENT, comparison_table
from tests.pipelines.evaluation.conftest import MODEL_NAME, SMALL


def test_eval_of_a_registered_version_logs_metrics_on_its_run_and_tags_the_version(store, capsys):
    import mlflow

    v1 = store["versions"][0]
    rc = main_eval([f"models:/{MODEL_NAME}/{v1}", "--tracking-uri", store["uri"], "--limit", SMALL])
    out = capsys.readouterr().out
    assert rc == 0, out
    client = mlflow.MlflowClient(store["uri"])
    metrics = client.get_run(store["runs"][v1]).data.metrics
    for key in ("eval/ift_arith/exact_match", "eval/ift_capitals_mc/acc"):
        assert 0.0 <= metrics[key] <= 1.0
    tags = client.get_model_version(MODEL_NAME, v1).tags
    assert float(tags["eval.ift_capitals_mc"]) == pytest.approx(metrics["eval/ift_capitals_mc/acc"], abs=1e-4)
    assert float(tags["eval.ift_arith"]) == pytest.approx(metrics["eval/ift_arith/exact_match"], abs=1e-4)
    assert tags["eval.limit"] == SMALL
    assert store["runs"][v1] in out


def test_eval_of_a_preset_logs_to_a_new_run_in_the_eval_experiment(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/fresh.db"
    assert main_eval(["tiny", "--tracking-uri", uri, "--limit", "2", "--tasks", "ift_capitals_mc"]) == 0
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(EVAL_EXPERIMENT).experiment_id])
    assert len(runs) == 1
    assert runs[0].data.tags["ift.model_ref"] == "tiny"
    assert "eval/ift_capitals_mc/acc" in runs[0].data.metrics


def test_comparison_table_labels_rows_by_method_and_disambiguates_repeats():
    header, cells = comparison_table(
        [("sft", "models:/m/1", {"a/acc": 0.5, "b/acc": 0.25}), ("sft", "models:/m/2", {"a/acc": 1.0, "b/acc": 0.0})]
    )
    assert header == ["method", "model", "a/acc", "b/acc", "average"]
    assert cells == [
        ["sft (models:/m/1)", "models:/m/1", "50.00", "25.00", "37.50"],
        ["sft (models:/m/2)", "models:/m/2", "100.00", "0.00", "50.00"],
    ]
