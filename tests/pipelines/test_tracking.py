"""MLflow store handling: one process may train, register and evaluate against several stores."""

from __future__ import annotations

import os

import mlflow
import pytest
from mlflow.tracking._model_registry import utils as registry_utils

from pipelines.tracking import mlflow_store


@pytest.fixture(autouse=True)
def unset_mlflow_globals(monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        # setenv first so monkeypatch records the original (maybe absent) value and restores it,
        # even after a test sets the variable outside monkeypatch (mlflow.set_registry_uri does).
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)


def _register_in(store: str, name: str) -> str:
    with mlflow_store(store) as client:
        if not client.search_registered_models(f"name='{name}'"):
            client.create_registered_model(name)
        return client.create_model_version(name, source="file:///nowhere", run_id=None).version


def test_the_store_leaves_no_pinned_registry_or_environment_behind(tmp_path):
    with mlflow_store(f"sqlite:///{tmp_path / 'a.db'}"):
        assert mlflow.get_registry_uri() == f"sqlite:///{tmp_path / 'a.db'}"
        assert os.environ["MLFLOW_REGISTRY_URI"] == f"sqlite:///{tmp_path / 'a.db'}"
    assert registry_utils._registry_uri is None
    assert "MLFLOW_REGISTRY_URI" not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ


def test_registrations_in_two_stores_in_one_process_each_start_at_version_1(tmp_path):
    # Regression: restoring get_registry_uri() pinned the registry to the first store,
    # so a second training run in the same process registered version 2 in the wrong db.
    assert str(_register_in(f"sqlite:///{tmp_path / 'a.db'}", "m")) == "1"
    assert str(_register_in(f"sqlite:///{tmp_path / 'b.db'}", "m")) == "1"


def test_an_outer_pinned_registry_is_restored(tmp_path, monkeypatch):
    outer = f"sqlite:///{tmp_path / 'outer.db'}"
    mlflow.set_registry_uri(outer)
    inner = f"sqlite:///{tmp_path / 'inner.db'}"
    with mlflow_store(inner):
        assert mlflow.get_registry_uri() == inner
    assert mlflow.get_registry_uri() == outer and os.environ["MLFLOW_REGISTRY_URI"] == outer


def test_a_new_experiment_in_a_sqlite_store_keeps_its_artifacts_beside_the_db(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import experiment_id

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
