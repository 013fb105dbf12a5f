"""`ift train`: the driver.  Prepares data with Ray Data, runs the shared loop on a
Ray Train ``TorchTrainer`` (DeepSpeed inside each worker), tracks the run in
MLflow, registers the final model and prints where everything is."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray._private.state import state
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from tqdm.auto import tqdm

from ift.data import DataError
from ift.models import load_model
from ift.tokenization import load_tokenizer
from pipelines import evaluation
from pipelines.config import ConfigError, TrainConfig
from pipelines.data.streaming import build_datasets
from pipelines.orchestration.progress import ProgressTracker, on_driver_node, poll_progress
from pipelines.orchestration.storage import (
    StoredCheckpoint,
    latest_checkpoint,
    read_run_record,
    resolve_storage_path,
    write_run_record,
)
from pipelines.orchestration.worker import train_loop_per_worker
from pipelines.tracking import runs
from pipelines.training.recipe import RecipeHooks, RecipeSpec
from pipelines.training.state import (
    ADAPTER_DIR,
    HF_MODEL_DIR,
    LoopState,
    Schedule,
    check_training_settings,
    data_position_fingerprint,
)


@dataclass
class TrainResult:
    run_name: str
    checkpoint_path: str | None
    hf_model_path: str | None
    metrics: dict[str, float]
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    registered_version: str | None = None
    loss_curve: str | None = None
    data_report: dict[str, Any] = field(default_factory=dict)
    eval_scores: dict[str, float] = field(default_factory=dict)


def init_ray(*, log_to_driver: bool = True) -> None:
    """Connect to RAY_ADDRESS (a cluster, or a `ray job submit` driver) or start Ray in-process."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver}
    if not os.environ.get("RAY_ADDRESS"):
        # address="local" always starts a private in-process cluster; a bare ray.init()
        # would silently join any `ray start` head on this machine.
        kwargs.update(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 2, 2))
    ray.init(**{k: v for k, v in kwargs.items() if v is not None})


def resolve_use_gpu(cfg: TrainConfig, *, gpus_now: float, gpus_autoscalable: float) -> tuple[bool, str]:
    """``scaling.use_gpu`` resolved, and why.  ``auto`` trains on GPUs when workers ask for them
    (``scaling.gpus_per_worker > 0``) and the cluster has GPUs, or can start nodes with GPUs
    (its autoscaler's node types: a KubeRay or cloud cluster often starts with none up)."""
    if cfg.scaling.use_gpu != "auto":
        return bool(cfg.scaling.use_gpu), f"scaling.use_gpu={cfg.scaling.use_gpu}"
    if cfg.scaling.gpus_per_worker <= 0:
        return False, "scaling.use_gpu=auto with scaling.gpus_per_worker=0: training on CPU"
    if gpus_now > 0:
        return True, f"scaling.use_gpu=auto: the cluster has {gpus_now:g} GPUs"
    if gpus_autoscalable > 0:
        return True, (
            f"scaling.use_gpu=auto: no GPU node is up yet, but the autoscaler can start nodes with "
            f"{gpus_autoscalable:g} GPUs in all; the workers wait for them"
        )
    return False, (
        "scaling.use_gpu=auto: the cluster has no GPU and no autoscaling node type with GPUs, so this run "
        "trains on CPU (scaling.use_gpu=true waits for GPUs instead; false says CPU on purpose)"
    )


def _autoscalable_gpus() -> float:
    """GPUs the cluster's autoscaler could bring up (its node types x max nodes), 0 without one;
    the same view Ray Train uses to tell a request that can never fit."""

    try:
        return float((state.get_max_resources_from_cluster_config() or {}).get("GPU", 0))
    except Exception:  # an older or a bare cluster without the autoscaler's config in the GCS
        return 0.0


def use_gpu_on_cluster(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> bool:
    """Whether this run trains on GPUs on the connected cluster (:func:`resolve_use_gpu`); says why to ``log``."""
    use, why = resolve_use_gpu(
        cfg, gpus_now=ray.cluster_resources().get("GPU", 0), gpus_autoscalable=_autoscalable_gpus()
    )
    if log is not None and cfg.scaling.use_gpu == "auto":
        log(why)
    return use


def train(
    cfg: TrainConfig,
    *,
    parent_run_id: str | None = None,
    show_progress: bool = True,
    extra_callbacks: list | None = None,
    register: bool = True,
    hooks: RecipeHooks | None = None,
    report_each_log_step: bool = False,
    resume_with_changes: bool = False,
) -> TrainResult:
    """Run one training job end to end (also the body of every sweep trial).

    A run whose folder holds a checkpoint resumes from it, if its training settings are the ones
    the run was started with (:func:`claim_run`); ``resume_with_changes`` continues it under new ones.

    Ray Train gets a report at checkpoints and evaluations; ``report_each_log_step`` adds every
    logged step, for callbacks that read training metrics (a sweep that ranks trials by ``loss``).
    Each report waits for the Ray Train controller's next poll (up to 2 s).

    ``hooks`` are test hooks (:mod:`pipelines.orchestration.hooks`: kill or stall a worker after a
    step or while it saves, trace the row ids of every micro-batch); production runs pass none.
    """

    log = print if show_progress else None
    for note in cfg.notes:
        print(f"note: {note}")
    storage = resolve_storage_path(cfg.checkpointing.storage_path)
    previous, changes = claim_run(cfg, storage, resume_with_changes=resume_with_changes, log=log)
    init_ray()
    use_gpu = use_gpu_on_cluster(cfg, log=log)
    if cfg.model.attn_implementation == "flash_attention_2" and not use_gpu:
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs CUDA GPUs, and this run trains on CPU "
            f"(scaling.use_gpu={cfg.scaling.use_gpu}, the cluster has no GPU); use sdpa"
        )
    tracking_uri = runs.resolve_tracking_uri(cfg.mlflow.tracking_uri)

    data = _build_data(cfg, show_progress=show_progress)
    schedule = Schedule.from_config(cfg, data.train_rows, cfg.scaling.num_workers, data.rows_per_micro)
    position = data_position_fingerprint(cfg, data.fingerprints["train"])
    if previous is not None:  # refused here, before any worker starts (a worker would be retried)
        previous[1].check_resumable(cfg.scaling.num_workers, position)

    run_id = _track(cfg, tracking_uri, data, parent_run_id, changes_at=(previous[1].step, changes) if changes else None)
    finished = previous is not None and previous[1].step >= schedule.total_steps and previous[0].has(HF_MODEL_DIR)
    if finished:
        # Trained to the end before, and something after training failed (registration, plot,
        # evaluation, MLflow): finish that from the final checkpoint; nothing is trained again.
        final, outcomes = previous[0], {}
        metrics = dict(runs.MlflowClient(tracking_uri).get_run(run_id).data.metrics) if run_id is not None else {}
        if show_progress:
            print(f"{cfg.run_name} trained to step {previous[1].step} before: finishing from {final.uri}")
    else:
        final, metrics, outcomes = _fit(
            cfg, data, schedule, storage, use_gpu, position, tracking_uri, run_id,
            show_progress=show_progress, hooks=hooks, extra_callbacks=extra_callbacks,
            report_each_log_step=report_each_log_step,
        )  # fmt: skip
    if "data_error" in outcomes:
        bad = outcomes["data_error"]
        error = DataError(bad["source"], bad["row"], bad["reason"], kind=bad["kind"], line=bad["line"])
        if run_id is not None:
            runs.end_run(tracking_uri, run_id, ok=False, reason=f"bad training data: {error}")
        raise error
    report = outcomes.get("data_report", {})
    has_model = final is not None and final.has(HF_MODEL_DIR)
    out = TrainResult(
        run_name=cfg.run_name,
        checkpoint_path=final.uri if final is not None else None,
        hf_model_path=f"{final.uri}/{HF_MODEL_DIR}" if has_model else None,
        metrics=metrics,
        mlflow_run_id=run_id,
        data_report=report,
    )
    _finish(cfg, tracking_uri, out, final if has_model else None, data.fingerprints, register=register)
    return out


def _build_data(cfg: TrainConfig, *, show_progress: bool):
    data = build_datasets(cfg)
    for ds in (data.train, data.validation):
        if ds is not None:  # workers' per-epoch Ray Data bars would garble the driver's bar
            ds.context.enable_progress_bars = False
    if not data.from_cache and data.tokenizer_cpus < 1 and show_progress:
        print(
            f"note: the training workers take the cluster's CPUs; the tokenizer runs on a {data.tokenizer_cpus} CPU "
            "share beside them (set scaling.cpus_per_worker lower, or `ift data prepare` and data.cache=true)"
        )
    return data


def _track(
    cfg: TrainConfig, tracking_uri: str, data, parent_run_id: str | None, changes_at: tuple[int, dict] | None
) -> str | None:
    """The run's MLflow run id (None with tracking off): a new run logs its data plan; a run continued
    under changed settings gets a tag listing them (its params keep the values it started with)."""
    if not cfg.mlflow.enabled:
        return None
    run_id, resumed = runs.start_or_resume_run(cfg, tracking_uri, parent_run_id=parent_run_id)
    client = runs.MlflowClient(tracking_uri=tracking_uri)
    if not resumed:
        runs.log_data_plan(client, run_id, data)
    if changes_at is not None:
        step, changes = changes_at
        client.set_tag(run_id, f"resumed_with_changes_at_step_{step}", json.dumps(changes))
    return run_id


def claim_run(
    cfg: TrainConfig, storage: str, *, resume_with_changes: bool, log: Callable[[str], None] | None = None
) -> tuple[tuple[StoredCheckpoint, LoopState] | None, dict[str, list]]:
    """The checkpoint run ``cfg.run_name`` resumes from (None for a new run), and the training settings
    it continues under changed.  Refuses (:class:`ResumeError`) a checkpoint trained under other
    settings unless ``resume_with_changes``.  Records the settings in the run's folder for the next time."""
    previous = latest_checkpoint(storage, cfg.run_name)
    current = cfg.training_settings()
    record = read_run_record(storage, cfg.run_name) if previous is not None else None
    changes: dict[str, list] = {}
    if record is not None:
        changes = check_training_settings(
            previous[1].step, record["training_settings"], current,
            resume_with_changes=resume_with_changes,
        )  # fmt: skip
        if not changes:
            if log:
                log(f"resuming run '{cfg.run_name}' from its checkpoint at step {previous[1].step}")
            return previous, {}
        if log:
            log(f"continuing run '{cfg.run_name}' from step {previous[1].step} with changed settings: "
                + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))  # fmt: skip
    history = (record or {}).get("changes", [])
    if changes:
        history = [*history, {"from_step": previous[1].step, "changes": changes}]
    write_run_record(
        storage, cfg.run_name, {"run_name": cfg.run_name, "training_settings": current, "changes": history}
    )
    return previous, changes


def _fit(cfg: TrainConfig, data, schedule: Schedule, storage: str, use_gpu: bool, position: str, tracking_uri: str,
         run_id: str | None, *, show_progress: bool, hooks: RecipeHooks | None, extra_callbacks,
         report_each_log_step: bool):  # fmt: skip
    """Train on the Ray cluster; (final checkpoint or None, last reported metrics, the workers' outcomes)."""

    # On a worker node that is lost, the tracker would take the run's outcome with it (and fail
    # every retry of the workers that report to it).
    tracker = ProgressTracker.options(scheduling_strategy=on_driver_node()).remote()
    spec = RecipeSpec(
        config=cfg,
        schedule=schedule,
        use_gpu=use_gpu,
        data_fingerprint=position,
        has_validation=data.validation is not None,
        tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
        report_each_log_step=report_each_log_step,
    )
    datasets = {"train": data.train}
    if data.validation is not None:
        datasets["validation"] = data.validation
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "progress": tracker, "hooks": hooks},
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={
                "CPU": cfg.scaling.cpus_per_worker,
                **({"GPU": cfg.scaling.gpus_per_worker} if use_gpu else {}),
            },
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpointing.keep),
            failure_config=FailureConfig(max_failures=cfg.checkpointing.max_failures),
            callbacks=extra_callbacks or None,
        ),
        datasets=datasets,
        # Each rank streams its own equal share, in an order fixed by the seed.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=list(datasets), execution_options=ExecutionOptions(preserve_order=True)
        ),
    )

    bar = tqdm(
        total=schedule.total_steps,
        desc=f"{cfg.method.name} {cfg.run_name}",
        unit="step",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    done = threading.Event()
    poller = threading.Thread(target=poll_progress, args=(tracker, bar, done), daemon=True)
    poller.start()
    ok = False
    try:
        result = trainer.fit()
        ok = True
    finally:
        done.set()
        poller.join(timeout=2)
        bar.close()
        if run_id is not None and not ok:
            runs.end_run(tracking_uri, run_id, ok=False, reason="training failed (see the driver's log)")

    final = StoredCheckpoint.from_ray(result.checkpoint, storage) if result.checkpoint is not None else None
    return final, dict(result.metrics or {}), ray.get(tracker.outcome.remote())


def _finish(cfg: TrainConfig, tracking_uri: str, out: TrainResult, final: StoredCheckpoint | None,
            fingerprints: dict[str, str], *, register: bool) -> None:  # fmt: skip
    """Everything after training: plot, register, evaluate; then mark the run FINISHED.  If any of it
    fails the MLflow run is marked FAILED with the reason, and re-running the same command finishes
    it from the final checkpoint without training again."""

    run_id = out.mlflow_run_id
    doing = "recording the run"
    try:
        if run_id is not None:
            doing = "registering the model"
            _finish_tracking(cfg, tracking_uri, run_id, out, final, fingerprints, register=register)
        if cfg.eval.at_end and final is not None:
            doing = "evaluating the model"
            out.eval_scores = _evaluate_at_end(cfg, tracking_uri, out, final)
    except BaseException as exc:
        if run_id is not None:
            reason = (
                f"training finished (final checkpoint {out.checkpoint_path}) but {doing} failed: "
                f"{type(exc).__name__}: {exc}.  Re-run the same command to finish: training is not repeated."
            )
            with contextlib.suppress(Exception):  # MLflow itself may be what failed
                runs.end_run(tracking_uri, run_id, ok=False, reason=reason)
        raise
    if run_id is not None:
        runs.end_run(tracking_uri, run_id, ok=True)


def _finish_tracking(
    cfg: TrainConfig,
    tracking_uri: str,
    run_id: str,
    out: TrainResult,
    final: StoredCheckpoint | None,
    fingerprints: dict[str, str],
    *,
    register: bool,
) -> None:
    """The loss-curve plot, the registered model and the LoRA adapters, each once per run (a re-run
    that finishes a failed ending skips what is already there)."""

    client = runs.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="ift-plot-") as tmp:  # never beside a remote checkpoint
        png = runs.plot_loss_curve(
            client, run_id, Path(tmp) / "loss_curve.png", f"{cfg.method.name} on {cfg.model.name} ({cfg.run_name})"
        )
        if png is not None:
            client.log_artifact(run_id, str(png))
            out.loss_curve = f"runs:/{run_id}/loss_curve.png"
    if final is None:
        return
    name = cfg.mlflow.registered_model_name
    registered = client.search_model_versions(f"name='{name}' and run_id='{run_id}'") if name else []
    if registered:
        out.model_uri = f"runs:/{run_id}/{runs.MODEL_ARTIFACT}"
        out.registered_version = str(max(int(v.version) for v in registered))
    elif register:
        tags = runs.model_version_tags(cfg, fingerprints.get("train", ""))
        with final.local(HF_MODEL_DIR) as hf_local:
            out.model_uri, out.registered_version = runs.register_model(cfg, tracking_uri, run_id, hf_local, tags)
    if final.has(ADAPTER_DIR) and ADAPTER_DIR not in [a.path for a in client.list_artifacts(run_id)]:
        # The model is registered merged; the LoRA adapters alone are kept beside it.
        with final.local(ADAPTER_DIR) as adapter:
            client.log_artifacts(run_id, adapter, ADAPTER_DIR)


def _evaluate_at_end(
    cfg: TrainConfig, tracking_uri: str, out: TrainResult, final: StoredCheckpoint
) -> dict[str, float]:

    with final.local(HF_MODEL_DIR) as hf_local:
        model = load_model(hf_local)
        tokenizer = load_tokenizer(hf_local)
    scores = evaluation.evaluate_model(model, tokenizer, tasks=cfg.eval.tasks or None, limit=cfg.eval.limit)
    if out.mlflow_run_id:
        evaluation.log_scores(
            scores,
            tracking_uri=tracking_uri,
            run_id=out.mlflow_run_id,
            registered_model_name=cfg.mlflow.registered_model_name,
            version=out.registered_version,
        )
    return scores


def summary(cfg: TrainConfig, out: TrainResult) -> str:
    lines = ["", f"Training run '{out.run_name}' finished ({cfg.method.name}, {cfg.model.name})."]
    if "loss" in out.metrics:
        lines.append(f"  final loss        {out.metrics['loss']:.4f}")
    if "val_nll" in out.metrics:
        lines.append(f"  validation NLL    {out.metrics['val_nll']:.4f}")
    if out.data_report.get("skipped"):
        lines.append(f"  bad rows skipped  {out.data_report['skipped']} ({out.data_report['by_reason']})")
    for k, v in out.eval_scores.items():
        lines.append(f"  {k:17s} {v:.4f}")
    lines.append(f"  checkpoint        {out.checkpoint_path}")
    if out.hf_model_path:
        lines.append(f"  HF model          {out.hf_model_path}")
    if out.registered_version:
        lines.append(f"  registered model  models:/{cfg.mlflow.registered_model_name}/{out.registered_version}")
    if out.loss_curve:
        lines.append(f"  loss curve        {out.loss_curve}")
    if out.mlflow_run_id:
        uri = cfg.mlflow.tracking_uri
        lines.append(f"  MLflow run        {out.mlflow_run_id} in {uri}")
        if uri.startswith("sqlite:"):
            lines.append(f"Browse it: mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
    return "\n".join(lines)
