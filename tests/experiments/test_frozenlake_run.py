"""``ift frozenlake`` (experiments.frozenlake.run): the command end to end, its result files and its MLflow run."""

from __future__ import annotations

import json

import pytest

from experiments.frozenlake import env as fl


def test_cli_writes_results_and_logs_to_mlflow(tmp_path) -> None:
    from experiments.frozenlake.run import main

    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--out", str(out), "--seeds", "2", "--steps", "30", "--tracking-uri", uri, "--no-progress"]
    assert main(argv) == 0
    for name in ("results.json", "results.md", "frozenlake.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["seeds"] == 2 and len(results["per_seed"]) == 2
    assert sorted(results["order_mse"]) == sorted(fl.METHODS)
    md = (out / "results.md").read_text()
    for label in ("SFT", "IFT", "DPO", "ORPO", "optimal θ*", "Paper's order", "Measured order"):
        assert label in md
    assert (out / "frozenlake.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("frozenlake")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["steps"] == "30"
    assert run.data.metrics["ift.mse_mean"] == pytest.approx(results["aggregate"]["ift"]["mse"]["mean"])
    assert len(client.get_metric_history(run.info.run_id, "loss_seed0.ift")) == 30
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "results.md", "frozenlake.png"} <= artifacts
    assert str(tmp_path) in exp.artifact_location  # artifacts stay next to the store


def test_without_gymnasium_the_command_names_the_extra_to_install(monkeypatch, capsys) -> None:
    import sys

    from pipelines.cli import main

    for name in [n for n in sys.modules if n.startswith(("experiments.frozenlake", "gymnasium"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # an import of it raises ModuleNotFoundError
    assert main(["frozenlake"]) == 2
    assert "ift frozenlake needs the 'frozenlake' extra" in capsys.readouterr().err
