"""MLflow: one run per training run (found again by name on resume), params, the
registered model with its version tags, and the loss-curve plot."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.artifacts import download_artifacts
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.async_logging.run_operations import RunOperations

from pipelines.config import TrainConfig
from pipelines.config_loading import flatten
from pipelines.tracking.provenance import git_commit

RUN_NAME_TAG = "ift.run_name"
MODEL_ARTIFACT = "model"  # the run artifact holding the registered transformers model
# mlflow.transformers.log_model infers requirements by importing torchvision,
# which this project does not need; name them instead.
PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers"]


def resolve_tracking_uri(uri: str, base_dir: str | os.PathLike | None = None) -> str:
    """Relative sqlite paths become absolute, so Ray workers (other cwd) hit the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(base_dir or os.getcwd()) / uri[len(prefix) :]
        return prefix + str(path.resolve())
    return uri


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a sqlite store (``mlartifacts/``
    beside the .db file), so the store is one self-contained folder whatever the working
    directory; ``None`` (the server's default) for any other store."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        return (Path(tracking_uri[len(prefix) :]).parent.resolve() / "mlartifacts").as_uri()
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
        [exp_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run_name}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    tags = {
        RUN_NAME_TAG: cfg.run_name,
        "mlflow.runName": cfg.run_name,
        "method": cfg.method.name,
        "git_commit": git_commit(),
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=tags, run_name=cfg.run_name)
    log_params(client, run.info.run_id, flatten(cfg))
    return run.info.run_id, False


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Params in batches of 100 (MLflow's limit per call), values cut to MLflow's 6000 characters."""

    items = [Param(k, ("" if v is None else str(v))[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_data_plan(client: MlflowClient, run_id: str, data: Any) -> None:
    """What the run reads (a :class:`pipelines.data.streaming.StreamingData`): fingerprints as tags, the planned
    rows as metrics and ``data_plan.json``.  Bad rows are counted while streaming (``bad_rows_skipped.json``)."""
    for split, fp in data.fingerprints.items():
        client.set_tag(run_id, f"data_fingerprint.{split}", fp)
    plan = {
        "fingerprints": data.fingerprints, "train_rows": data.train_rows, "validation_rows": data.validation_rows,
        "from_cache": data.from_cache, "cache": data.cache_paths, "tokenizer_actors": data.tokenizer_actors,
        "tokenizer_cpus": data.tokenizer_cpus,
    }  # fmt: skip
    client.log_dict(run_id, plan, "data_plan.json")

    client.log_batch(
        run_id,
        metrics=[
            Metric("data/train_rows", data.train_rows, 0, 0),
            Metric("data/validation_rows", data.validation_rows, 0, 0),
        ],
    )


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def plot_loss_curve(client: MlflowClient, run_id: str, out_path: str | os.PathLike, title: str) -> Path | None:
    """Training loss (and validation NLL) against step, as a PNG."""
    import matplotlib  # its headless backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = metric_history(client, run_id, "loss")
    if not loss:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*loss, strict=True), label="train loss")
    for key, style in (("val_nll", "o-"), ("val_loss", "s--")):
        hist = metric_history(client, run_id, key)
        if hist:
            ax.plot(*zip(*hist, strict=True), style, label=key.replace("_", " "))
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


@contextlib.contextmanager
def _pipeline_classes_by_object() -> Iterator[None]:
    """MLflow 3.17 saves a checkpoint directory reading ``transformers.pipelines.check_task(task)[1]
    ["impl"].__name__``; transformers 5 gives ``impl`` as a dotted path string, so the call fails.
    Inside, ``check_task`` answers with the class itself (nothing changes where it already does)."""
    from transformers import pipelines  # local: the name is this project's package too

    original = pipelines.check_task

    def check_task(task: str):
        name, meta, options = original(task)
        impl = meta.get("impl")
        if isinstance(impl, str):
            module, _, cls = impl.rpartition(".")
            meta = {**meta, "impl": getattr(importlib.import_module(module), cls)}
        return name, meta, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original


def register_model(
    cfg: TrainConfig, tracking_uri: str, run_id: str, hf_dir: str, tags: dict[str, str]
) -> tuple[str, str | None]:
    """Save the HF model as an MLflow ``transformers`` model in the run's artifacts
    (``model/``) and register it as a new version of ``cfg.mlflow.registered_model_name``.

    Returns ``(model_uri, version)`` (``version`` is None when no name is configured).
    Only the client API with explicit URIs is used: MLflow's process-global tracking
    and registry URIs are never touched, so one process can train, register and
    evaluate against several stores.

    The directory is logged as it is (MLflow's transformers flavour takes a checkpoint path):
    the weights are copied, never loaded, so the driver, often on a small head node, needs no
    memory for a 7B model at the end of the run.
    """
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp, _pipeline_classes_by_object():
        local = Path(tmp) / MODEL_ARTIFACT
        mlflow.transformers.save_model(
            transformers_model=str(hf_dir),
            path=str(local),
            task="text-generation",
            pip_requirements=PIP_REQUIREMENTS,
        )
        client.log_artifacts(run_id, str(local), MODEL_ARTIFACT)
    model_uri = f"runs:/{run_id}/{MODEL_ARTIFACT}"
    name = cfg.mlflow.registered_model_name
    if not name:
        return model_uri, None
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    return model_uri, str(version.version)


class RunLogger:
    """Rank 0's writer into a run the driver started: params, metrics at a step, and a JSON artifact.

    Metrics go through MLflow's asynchronous logging (one queue per run, written in order by a
    background thread, with the client's usual HTTP retries), so a slow or briefly unreachable
    tracking server does not hold the training step.  :meth:`flush` waits until every metric logged
    so far is stored, and raises if any could not be: nothing is lost silently.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(tracking_uri=tracking_uri), run_id
        self._pending: list[tuple[int, RunOperations]] = []

    def params(self, params: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def metrics(self, metrics: dict[str, float], *, step: int) -> None:
        now = int(time.time() * 1000)  # when the step logged it, not when the server took it
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._pending.append((step, self.client.log_batch(self.run_id, metrics=batch, synchronous=False)))

    def flush(self) -> None:
        """Wait for every metric logged so far; an ``MlflowException`` naming the steps that failed."""
        pending, self._pending = self._pending, []
        failed = []
        for step, operations in pending:
            try:
                operations.wait()
            except MlflowException as exc:
                failed.append((step, exc))
        if failed:
            steps = ", ".join(str(step) for step, _ in failed)
            raise MlflowException(
                f"the metrics of step(s) {steps} could not be logged to run {self.run_id}: {failed[0][1]}"
            )

    def dict(self, value: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, value, artifact_file)


def model_version_tags(cfg: TrainConfig, data_fingerprint: str) -> dict[str, str]:
    """The tags of a registered model version, the same from ``ift train`` and a sweep's champion: the
    method and every option of it (β with its default), the training data, the code and the run."""
    return {
        "method": cfg.method.name,
        **{k: str(v) for k, v in cfg.method.hyperparameters().items()},
        "data_fingerprint": data_fingerprint,
        "git_commit": git_commit(),
        "run_name": cfg.run_name,
    }


def load_model_components(model_uri: str, tracking_uri: str) -> dict[str, Any]:
    """``{"model": ..., "tokenizer": ...}`` of an MLflow transformers model (``models:/name/N``,
    ``models:/name@alias``, ``runs:/id/path``) from the given store, without touching
    MLflow's process-global URIs."""

    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifacts(
            artifact_uri=artifact_source(model_uri, tracking_uri), dst_path=tmp, tracking_uri=tracking_uri
        )
        return mlflow.transformers.load_model(local, return_type="components")


# A registered model version: models:/NAME/VERSION or models:/NAME@ALIAS.
MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))/?$")


def artifact_source(model_uri: str, tracking_uri: str) -> str:
    """Where the artifacts of ``model_uri`` live: a registered version (``models:/name/N`` or
    ``models:/name@alias``) resolves through the registry of ``tracking_uri``; any other URI
    (``runs:/``, a path) is returned as it is."""
    match = MODELS_URI.match(model_uri)
    if not match:
        return model_uri
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, version = match["name"], match["version"]
    if match["alias"]:
        version = client.get_model_version_by_alias(name, match["alias"]).version
    return client.get_model_version_download_uri(name, version)


FAILURE_TAG = "ift.failure_reason"


def end_run(tracking_uri: str, run_id: str, ok: bool, reason: str | None = None) -> None:
    """Mark the run FINISHED, or FAILED with ``reason`` in the ``ift.failure_reason`` tag."""
    client = MlflowClient(tracking_uri=tracking_uri)
    if not ok and reason:
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
    if ok and FAILURE_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, FAILURE_TAG)  # a re-run finished what the failed one left
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))
