"""Which model to evaluate: an MLflow URI, a local directory, a preset or a Hub id, loaded into memory.

:func:`resolve_model` turns a reference into ``(model, tokenizer, ModelSource)``;
a reference that does not exist is an :class:`EvalError` saying what does.
The registry helpers here (:func:`store_client`, :func:`registered_version_of`,
:func:`run_id_of`) are shared with :func:`pipelines.evaluation.results.log_scores`,
which must find the same run and version again.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ift import models as ift_models
from ift import tokenization
from pipelines.config import DEFAULT_TRACKING_URI
from pipelines.evaluation.errors import EvalError
from pipelines.evaluation.tasks import hub_status


@dataclass
class ModelSource:
    """Where an evaluated model came from (what :func:`resolve_model` found)."""

    ref: str
    kind: str  # "registered" | "run" | "mlflow_path" | "path" | "preset" | "hub"
    model_uri: str | None = None
    run_id: str | None = None
    registered_model_name: str | None = None
    version: str | None = None
    method: str | None = None
    tracking_uri: str | None = None

    @property
    def label(self) -> str:
        """Row label in ``ift compare``: the training method, else the reference."""
        return self.method or self.ref


_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)(?:/(?P<path>.+))?$")


# --------------------------------------------------------------------------- the tracking store


def _check_store(tracking_uri: str) -> None:
    """Refuse a sqlite store that does not exist (MLflow would silently create an empty one)."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///") :])
        if not path.exists():
            raise EvalError(
                f"tracking store {tracking_uri} does not exist (no file {path.resolve()}); "
                "pass --tracking-uri pointing at the store the model was registered in"
            )


def store_client(tracking_uri: str, *, must_exist: bool = True) -> Any:
    """An ``MlflowClient`` on ``tracking_uri`` (tracking and registry).

    ``must_exist``: an absent sqlite store is an :class:`EvalError` (MLflow would create an empty one).
    """
    from mlflow.tracking import MlflowClient  # MLflow loads only for models:/ and runs:/ references

    if must_exist:
        _check_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or (
        "not found" in str(e).lower() or "does not exist" in str(e).lower()
    )


def _list_hint(tracking_uri: str) -> str:
    return f"browse them with: mlflow ui --backend-store-uri {tracking_uri}"


def _parse_models_uri(model_uri: str) -> re.Match[str]:
    from pipelines.tracking.runs import MODELS_URI  # brings MLflow, which a preset or path does not need

    m = MODELS_URI.match(model_uri)
    if not m:
        raise EvalError(f"cannot parse model URI {model_uri!r}; expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return m


def registered_version_of(client: Any, model_uri: str, tracking_uri: str) -> Any:
    """The ``ModelVersion`` a ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION|latest`` URI names.

    One that does not exist is an :class:`EvalError` listing the versions and aliases there are.
    """
    from mlflow.exceptions import MlflowException  # see store_client

    m = _parse_models_uri(model_uri)
    name, alias, version = m["name"], m["alias"], m["version"]
    try:
        registered = client.get_registered_model(name)
    except MlflowException as e:
        if not _not_found(e):
            raise
        names = sorted(rm.name for rm in client.search_registered_models(max_results=50))
        raise EvalError(
            f"no registered model {name!r} in tracking store {tracking_uri} "
            f"(registered models there: {', '.join(names) or 'none'}); {_list_hint(tracking_uri)}"
        ) from None
    versions = client.search_model_versions(f"name='{name}'")
    have = sorted(int(v.version) for v in versions)
    aliases = getattr(registered, "aliases", None) or {}
    shown = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
    what = f"versions {', '.join(map(str, have)) or 'none'}; aliases {shown}"

    def fetch(get: Callable[[], Any], missing: str) -> Any:
        try:
            return get()
        except MlflowException as e:
            if not _not_found(e):
                raise
            raise EvalError(
                f"registered model {name!r} has no {missing} in tracking store {tracking_uri} "
                f"(it has {what}); {_list_hint(tracking_uri)}"
            ) from None

    if alias is not None:
        return fetch(lambda: client.get_model_version_by_alias(name, alias), f"alias {alias!r}")
    assert version is not None
    if version.lower() == "latest":
        if not have:
            raise EvalError(f"registered model {name!r} has no versions in tracking store {tracking_uri}")
        version = str(have[-1])
    if not version.isdigit():
        raise EvalError(
            f"models:/{name}/{version}: expected a version number, 'latest' or models:/{name}@alias "
            f"(model stages are deprecated in MLflow); {name!r} has {what}"
        )
    return fetch(lambda: client.get_model_version(name, version), f"version {version}")


def run_id_of(model_uri: str) -> str | None:
    """The run of a ``runs:/RUN_ID/...`` URI; ``None`` for anything else."""
    r = _RUNS_URI.match(model_uri)
    return r["run_id"] if r else None


def _method_of_run(client: Any, run_id: str | None) -> str | None:
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # any failure: the label is a nicety
        return None
    tags, params = run.data.tags, run.data.params
    return tags.get("method") or params.get("method.name") or params.get("method")


# --------------------------------------------------------------------------- loading


def _load_mlflow_components(uri: str, tracking_uri: str | None) -> tuple[Any, Any]:
    """An MLflow transformers model: ``models:/`` / ``runs:/`` from the store at ``tracking_uri``, else a local path."""
    import mlflow  # see store_client

    from pipelines.tracking.runs import load_model_components  # brings MLflow too

    try:
        if tracking_uri:
            parts = load_model_components(uri, tracking_uri)
        else:
            parts = mlflow.transformers.load_model(uri, return_type="components")
    except Exception as e:  # mlflow raises many types; say which model failed
        raise EvalError(f"could not load the transformers model at {uri}: {type(e).__name__}: {e}") from e
    if "model" not in parts or "tokenizer" not in parts:
        raise EvalError(f"{uri} is not a text-generation model with a tokenizer (components: {sorted(parts)})")
    return parts["model"], parts["tokenizer"]


def _prepare(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    tokenization.ensure_pad_and_template(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def resolve_model(
    ref: str,
    *,
    tracking_uri: str = DEFAULT_TRACKING_URI,
    dtype: str = "float32",
    seed: int = 0,
) -> tuple[Any, Any, ModelSource]:
    """Load ``ref`` -> ``(model, tokenizer, ModelSource)``; a reference that does not exist is an :class:`EvalError`.

    ``ref``: ``models:/name@alias``, ``models:/name/<version>|latest``,
    ``runs:/<run_id>/<path>`` (loaded with ``mlflow.transformers.load_model``
    from the store at ``tracking_uri``); a local directory (an MLflow model if
    it holds an ``MLmodel`` file, else a saved Hugging Face model); a preset of
    :mod:`ift.models` (``tiny``: random init with ``seed``); otherwise a Hub id.
    """
    if ref.startswith("models:/"):
        return _resolve_registered(ref, tracking_uri)
    if ref.startswith("runs:/"):
        return _resolve_run(ref, tracking_uri)
    if Path(ref).expanduser().exists():
        return _resolve_path(ref, dtype)
    if tokenization.is_preset(ref):
        tok = tokenization.load_tokenizer(ref)
        model = ift_models.load_model(ref, dtype=dtype, seed=seed, tokenizer=tok)
        return (*_prepare(model, tok), ModelSource(ref, "preset", ref))
    if "://" in ref or ref.startswith(("/", ".", "~")):
        raise EvalError(
            f"{ref!r} is neither an MLflow URI (models:/..., runs:/...), an existing local path, "
            f"a preset ({', '.join(ift_models.MODEL_PRESETS)}) nor a Hugging Face Hub id"
        )
    return _resolve_hub(ref, dtype)


def _resolve_registered(ref: str, tracking_uri: str) -> tuple[Any, Any, ModelSource]:
    _parse_models_uri(ref)  # a malformed URI is reported before the store is opened
    client = store_client(tracking_uri)
    mv = registered_version_of(client, ref, tracking_uri)
    uri = f"models:/{mv.name}/{mv.version}"
    model, tok = _load_mlflow_components(uri, tracking_uri)
    method = (mv.tags or {}).get("method") or _method_of_run(client, mv.run_id)
    src = ModelSource(ref, "registered", uri, mv.run_id, mv.name, str(mv.version), method, tracking_uri)
    return (*_prepare(model, tok), src)


def _resolve_run(ref: str, tracking_uri: str) -> tuple[Any, Any, ModelSource]:
    r = _RUNS_URI.match(ref)
    if not r:
        raise EvalError(f"cannot parse run URI {ref!r}; expected runs:/RUN_ID/ARTIFACT_PATH")
    from mlflow.exceptions import MlflowException  # see store_client

    client = store_client(tracking_uri)
    try:
        client.get_run(r["run_id"])
    except MlflowException as e:
        if not _not_found(e):
            raise
        raise EvalError(f"no run {r['run_id']!r} in tracking store {tracking_uri}") from None
    uri = ref if r["path"] else f"runs:/{r['run_id']}/model"
    model, tok = _load_mlflow_components(uri, tracking_uri)
    method = _method_of_run(client, r["run_id"])
    src = ModelSource(ref, "run", uri, r["run_id"], method=method, tracking_uri=tracking_uri)
    return (*_prepare(model, tok), src)


def _resolve_path(ref: str, dtype: str) -> tuple[Any, Any, ModelSource]:
    path = Path(ref).expanduser()
    if (path / "MLmodel").is_file():
        model, tok = _load_mlflow_components(str(path.resolve()), None)
        return (*_prepare(model, tok), ModelSource(ref, "mlflow_path", str(path.resolve())))
    if not path.is_dir():
        raise EvalError(f"{ref!r} is a file; expected a model directory")
    try:
        tok = tokenization.load_tokenizer(str(path))
        model = ift_models.load_model(str(path), dtype=dtype, tokenizer=tok)
    except (OSError, ValueError) as e:
        raise EvalError(f"could not load a causal LM from directory {ref!r}: {e}") from e
    return (*_prepare(model, tok), ModelSource(ref, "path", str(path.resolve())))


def _resolve_hub(ref: str, dtype: str) -> tuple[Any, Any, ModelSource]:
    try:
        tok = tokenization.load_tokenizer(ref)
        model = ift_models.load_model(ref, dtype=dtype, tokenizer=tok)
    except (OSError, ValueError) as e:
        why = hub_status()
        extra = f" (the Hub is not available: {why})" if why else ""
        raise EvalError(
            f"{ref!r} is not an MLflow URI, a local path or a preset, and loading it as a Hugging Face "
            f"Hub id failed{extra}: {e}"
        ) from e
    return (*_prepare(model, tok), ModelSource(ref, "hub", ref))
