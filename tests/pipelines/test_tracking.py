"""pipelines.tracking.runs: one process may train, register and evaluate against several MLflow
stores; registration and loading go through explicit URIs, never MLflow's process globals."""

from __future__ import annotations

import os

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ift.models import load_model
from ift.tokenization import load_tokenizer
from pipelines.config_loading import load_config
from pipelines.tracking.runs import (
    RunLogger,
    experiment_id,
    load_model_components,
    register_model,
    start_or_resume_run,
)
from pipelines.training.export import export_hf_model

GLOBALS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    export_hf_model(load_model("tiny", seed=0), load_tokenizer("tiny"), out, rank=0)  # as a run's final export
    return str(out)


@pytest.fixture
def no_mlflow_globals(monkeypatch):
    for key in GLOBALS:
        monkeypatch.delenv(key, raising=False)
    mlflow.set_tracking_uri(None)
    yield
    mlflow.set_tracking_uri(None)


def _train_run(store: str, name: str = "m") -> tuple[object, str]:
    cfg = load_config(None, [f"mlflow.tracking_uri={store}", f"mlflow.registered_model_name={name}"])
    run_id, _ = start_or_resume_run(cfg, store)
    return cfg, run_id


def test_registrations_in_two_stores_in_one_process_each_start_at_version_1(tmp_path, tiny_hf_dir, no_mlflow_globals):
    # Regression: a process-global registry pinned to the first store made the second
    # training run in the same process register version 2 in the wrong db.
    for db in ("a.db", "b.db"):
        store = f"sqlite:///{tmp_path / db}"
        cfg, run_id = _train_run(store)
        assert register_model(cfg, store, run_id, tiny_hf_dir, {"method": "ift"})[1] == "1"


def test_registering_and_loading_leave_mlflows_process_globals_untouched(tmp_path, tiny_hf_dir, no_mlflow_globals):
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    store = f"sqlite:///{tmp_path / 'store.db'}"
    cfg, run_id = _train_run(store)
    register_model(cfg, store, run_id, tiny_hf_dir, {})
    load_model_components("models:/m/1", store)
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before
    assert not any(key in os.environ for key in GLOBALS)


def test_a_registered_version_carries_its_tags_and_loads_with_the_trained_weights(tmp_path, tiny_hf_dir):
    store = f"sqlite:///{tmp_path / 'store.db'}"
    cfg, run_id = _train_run(store, "tagged")
    model_uri, version = register_model(cfg, store, run_id, tiny_hf_dir, {"method": "ift", "lam": "0.2"})
    assert model_uri == f"runs:/{run_id}/model" and version == "1"
    mv = MlflowClient(store, registry_uri=store).get_model_version("tagged", "1")
    assert mv.run_id == run_id and mv.tags == {"method": "ift", "lam": "0.2"}
    loaded = load_model_components("models:/tagged/1", store)["model"].state_dict()
    expected = load_model(tiny_hf_dir).state_dict()
    assert loaded.keys() == expected.keys() and all((loaded[k] == expected[k]).all() for k in expected)


def test_registering_copies_the_saved_model_without_building_it_in_this_process(tmp_path, tiny_hf_dir, monkeypatch):
    # The driver registers at the end of a long run, often on a small head node: a 7B model must not
    # be loaded there.  Any model construction in this process fails the test.
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("registration built the model in the driver")

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    cfg, run_id = _train_run(store, "copied")
    assert register_model(cfg, store, run_id, tiny_hf_dir, {})[1] == "1"
    monkeypatch.undo()
    files = {a.path for a in MlflowClient(store).list_artifacts(run_id, "model/model")}
    assert "model/model/model.safetensors" in files


def test_without_a_registered_name_the_model_is_logged_but_not_registered(tmp_path, tiny_hf_dir):
    store = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = load_config(None, [f"mlflow.tracking_uri={store}", "mlflow.registered_model_name="])
    run_id, _ = start_or_resume_run(cfg, store)
    assert register_model(cfg, store, run_id, tiny_hf_dir, {}) == (f"runs:/{run_id}/model", None)
    assert MlflowClient(store, registry_uri=store).search_registered_models() == []
    assert load_model_components(f"runs:/{run_id}/model", store)["tokenizer"] is not None


def test_a_new_experiment_in_a_sqlite_store_keeps_its_artifacts_beside_the_db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "..")  # not the store's folder: artifacts must not follow the cwd
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    client = MlflowClient(store)
    exp_id = experiment_id(client, "ift", store)
    assert experiment_id(client, "ift", store) == exp_id  # found again, not created twice
    run = client.create_run(exp_id)
    client.log_text(run.info.run_id, "hello", "note.txt")
    assert (tmp_path / "store" / "mlartifacts").is_dir()
    assert list((tmp_path / "store" / "mlartifacts").rglob("note.txt"))


def test_the_run_logger_stores_every_queued_metric_by_the_flush(tmp_path, no_mlflow_globals):
    store = f"sqlite:///{tmp_path / 'store.db'}"
    _, run_id = _train_run(store)
    logger = RunLogger(store, run_id)
    for step in range(1, 21):
        logger.metrics({"loss": 1.0 / step, "lr": 0.1}, step=step)
    logger.flush()
    history = MlflowClient(tracking_uri=store).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / s) for s in range(1, 21)]


def test_a_metric_the_store_refuses_fails_the_flush_naming_its_step(tmp_path, no_mlflow_globals):
    store = f"sqlite:///{tmp_path / 'store.db'}"
    _, run_id = _train_run(store)
    MlflowClient(tracking_uri=store).delete_run(run_id)  # a deleted run takes no more metrics
    logger = RunLogger(store, run_id)
    logger.metrics({"loss": 1.0}, step=7)
    with pytest.raises(MlflowException, match=rf"step\(s\) 7 could not be logged to run {run_id}"):
        logger.flush()
