"""pipelines.evaluation.models: models:/ URIs by alias and version, and the errors for what does not exist."""

from __future__ import annotations

import pytest

from pipelines.evaluation.cli import main_eval
from pipelines.evaluation.errors import EvalError
from pipelines.evaluation.models import resolve_model
from tests.pipelines.evaluation.conftest import MODEL_NAME


def test_alias_uri_resolves_to_the_aliased_version_and_its_method(store):
    _, _, src = resolve_model(f"models:/{MODEL_NAME}@champion", tracking_uri=store["uri"])
    v2 = store["versions"][1]
    assert (src.version, src.run_id, src.method) == (v2, store["runs"][v2], "ift")


def test_missing_alias_is_a_clear_error_not_a_stack_trace(store, capsys):
    rc = main_eval([f"models:/{MODEL_NAME}@nope", "--tracking-uri", store["uri"]])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"registered model '{MODEL_NAME}' has no alias 'nope'" in err
    assert store["uri"] in err and "champion" in err
    assert "Traceback" not in err


def test_missing_registered_model_is_a_clear_error_naming_the_existing_ones(store, capsys):
    rc = main_eval(["models:/foo@champion", "--tracking-uri", store["uri"]])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no registered model 'foo'" in err and MODEL_NAME in err


def test_missing_version_is_a_clear_error(store):
    with pytest.raises(EvalError, match=f"'{MODEL_NAME}' has no version 99"):
        resolve_model(f"models:/{MODEL_NAME}/99", tracking_uri=store["uri"])


def test_missing_tracking_store_is_reported_and_not_created(tmp_path):
    db = tmp_path / "nothing.db"
    with pytest.raises(EvalError, match="does not exist"):
        resolve_model(f"models:/{MODEL_NAME}/1", tracking_uri=f"sqlite:///{db}")
    assert not db.exists()
