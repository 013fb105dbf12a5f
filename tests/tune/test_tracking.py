"""MLflow: the parent run, one child run per trial with its status, the champion alias."""

from __future__ import annotations

import pytest

from pipelines.tracking.runs import load_model_components
from tests.tune.conftest import MAX_STEPS, MODEL, client_for
from tune.results import COMPLETED, STOPPED

# The package-scoped sweep is built inside the first test's setup: about 4 minutes on an
# idle 2-core box, but up to 10 when the box is shared; give it room.
pytestmark = pytest.mark.timeout(1800)


@pytest.mark.slow
def test_mlflow_holds_one_parent_and_four_child_runs(sweep4):
    client = client_for(sweep4)
    runs = client.search_runs([sweep4.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep4.parent_run_id]
    assert [p.info.run_id for p in parents] == [sweep4.parent_run_id]
    assert len(children) == 4 and len(runs) == 5
    by_id = {r["mlflow_run_id"]: r for r in sweep4.rows}
    for child in children:
        row = by_id[child.info.run_id]
        # the trial's config ...
        assert float(child.data.params["method.lam"]) == row["method.lam"]
        assert float(child.data.params["method.decay"]) == row["method.decay"]
        # ... its curves ...
        # (a stopped trial's worker may log a step or two more before it is killed)
        steps = {m.step for m in client.get_metric_history(child.info.run_id, "val_nll")}
        assert row["steps"] in steps and max(steps) <= MAX_STEPS
        assert client.get_metric_history(child.info.run_id, "loss")
        assert "loss_curve.png" in [a.path for a in client.list_artifacts(child.info.run_id)]
        # ... and its outcome
        assert child.info.status == {COMPLETED: "FINISHED", STOPPED: "KILLED"}[row["status"]]
        assert child.data.tags["sweep.status"] == row["status"].lower()
    parent = client.get_run(sweep4.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.algorithm"] == "grid"
    assert {"results.csv", "heatmap.png"} <= {a.path for a in client.list_artifacts(sweep4.parent_run_id)}


@pytest.mark.slow
def test_champion_alias_resolves_to_the_best_trials_model(sweep4):
    completed = [r for r in sweep4.rows if r["status"] == COMPLETED]
    best = min(completed, key=lambda r: r["val_nll"])
    assert sweep4.best is best and best["champion"]
    client = client_for(sweep4)
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.run_id == best["mlflow_run_id"]
    assert version.tags["trial_id"] == best["trial_id"]
    assert float(version.tags["lam"]) == best["method.lam"] and float(version.tags["decay"]) == best["method.decay"]
    assert sweep4.champion_uri == f"models:/{MODEL}@champion"
    components = load_model_components(sweep4.champion_uri, sweep4.tracking_uri)
    ids = components["tokenizer"]("hello", return_tensors="pt").input_ids
    assert components["model"](ids).logits.shape[-1] == len(components["tokenizer"])
