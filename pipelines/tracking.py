"""MLflow: one run per training run (found again by name on resume), params, the
registered model with its version tags, and the loss-curve plot."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from pipelines.config import TrainConfig, flatten
from pipelines.provenance import git_commit

RUN_NAME_TAG = "ift.run_name"
# mlflow.transformers.log_model infers requirements by importing torchvision,
# which this project does not need; name them instead.
PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers"]


def resolve_tracking_uri(uri: str, base_dir: str | os.PathLike | None = None) -> str:
    """Relative sqlite paths become absolute, so Ray workers (other cwd) hit the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(base_dir or os.getcwd()) / uri[len(prefix):]
        return prefix + str(path.resolve())
    return uri


@contextlib.contextmanager
def mlflow_store(tracking_uri: str) -> Iterator[MlflowClient]:
    """Point MLflow's process-global tracking *and* registry URIs at one store, then restore them.

    ``mlflow.transformers.log_model(registered_model_name=...)`` and ``models:/`` loads
    resolve the registry from globals.  ``set_registry_uri`` pins the registry (and
    exports ``MLFLOW_REGISTRY_URI`` to every subprocess, Ray workers included), so a
    naive "save ``get_registry_uri()``, restore it" leaves the registry pinned to the
    last store used: later registrations in the same process would land there.  This
    saves and restores the raw module state and environment instead.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri,
             {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")})
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri, env = saved
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a sqlite store (``mlartifacts/``
    beside the .db file), so the store is one self-contained folder whatever the working
    directory; ``None`` (the server's default) for any other store."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        return (Path(tracking_uri[len(prefix):]).parent.resolve() / "mlartifacts").as_uri()
    return None


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created (with :func:`artifact_location`) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(tracking_uri))


def start_or_resume_run(cfg: TrainConfig, tracking_uri: str, *, parent_run_id: str | None = None) -> tuple[str, bool]:
    """The MLflow run of ``cfg.run_name`` in the experiment: reused if it exists (a resume).

    Returns ``(run_id, resumed)``.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = experiment_id(client, cfg.mlflow.experiment, tracking_uri)
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run_name}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    tags = {RUN_NAME_TAG: cfg.run_name, "mlflow.runName": cfg.run_name, "method": cfg.method.name,
            "git_commit": git_commit()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=tags, run_name=cfg.run_name)
    params = {k: ("" if v is None else str(v))[:6000] for k, v in flatten(cfg).items()}
    items = list(params.items())
    from mlflow.entities import Param

    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
    return run.info.run_id, False


def log_data_report(client: MlflowClient, run_id: str, fingerprints: dict[str, str], report: dict[str, Any],
                    train_rows: int, validation_rows: int, train_tokens: int) -> None:
    for split, fp in fingerprints.items():
        client.set_tag(run_id, f"data_fingerprint.{split}", fp)
    client.log_dict(run_id, {"fingerprints": fingerprints, "bad_rows": report, "train_rows": train_rows,
                             "validation_rows": validation_rows, "train_tokens": train_tokens}, "data_report.json")
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[
        Metric("data/train_rows", train_rows, 0, 0), Metric("data/validation_rows", validation_rows, 0, 0),
        Metric("data/bad_rows_skipped", report.get("skipped", 0), 0, 0), Metric("data/train_tokens", train_tokens, 0, 0),
    ])


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def plot_loss_curve(client: MlflowClient, run_id: str, out_path: str | os.PathLike, title: str) -> Path | None:
    """Training loss (and validation NLL) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = metric_history(client, run_id, "loss")
    if not loss:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*loss), label="train loss")
    for key, style in (("val_nll", "o-"), ("val_loss", "s--")):
        hist = metric_history(client, run_id, key)
        if hist:
            ax.plot(*zip(*hist), style, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def register_model(cfg: TrainConfig, tracking_uri: str, run_id: str, hf_dir: str, tags: dict[str, str]):
    """Log the HF model to the run and register a new version under the configured name."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, use_safetensors=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    with mlflow_store(tracking_uri) as client, mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=cfg.mlflow.registered_model_name,
        )
    version = None
    if cfg.mlflow.registered_model_name:
        version = str(info.registered_model_version)
        for k, v in tags.items():
            client.set_model_version_tag(cfg.mlflow.registered_model_name, str(version), k, v)
    return info.model_uri, version


def end_run(tracking_uri: str, run_id: str, ok: bool) -> None:
    MlflowClient(tracking_uri=tracking_uri).set_terminated(
        run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
    )
