"""Running a sweep's trials: a Ray Tune ``Tuner`` over a small driver function, one
``ift train`` run per sampled config, with the search algorithm, the ASHA scheduler,
the console progress lines and :func:`run_sweep`, which runs a sweep end to end.

How a sweep runs
----------------
* The Tuner runs :func:`trial_driver` once per sampled config.  The driver applies
  the sampled values to the base :class:`~pipelines.config.TrainConfig` and calls
  :func:`pipelines.orchestration.train.train`, the body of ``ift train``: the same Ray Data
  preparation, the same ``TorchTrainer`` + DeepSpeed loop, the same MLflow run
  (nested under the sweep's parent run).  This is the Ray Train V2 recipe: a Tuner
  over a driver function that launches a ``TorchTrainer`` whose ``RunConfig`` carries
  a ``TuneReportCallback``.  V2 is Ray's default (ray-project/ray#57857), so nothing
  here sets ``RAY_TRAIN_V2_ENABLED``.
* Rank 0 reports ``val_nll``/``val_loss`` at evaluation steps
  (``optimization.eval_every_n_steps``); ``_ReportEvaluations`` forwards those
  reports to Tune, where ASHA compares trials at ``step`` milestones.
* Trials stopped by ASHA would keep their placement group:
  :mod:`tune.placement_groups` gives it back.
* A trial whose driver is lost with its node is retried (up to ``checkpointing.max_failures``
  times); the retry is the same ``ift train`` run, so it resumes from the trial's last
  checkpoint.  A trial that raised is not run again: the retry reads the failure
  the first attempt recorded beside its checkpoints and fails at once
  (:func:`trial_driver`).  Lost workers alone are Ray Train's to retry, inside the trial.
* After the Tuner: one results row per trial (:mod:`tune.results`), child runs
  marked FINISHED / KILLED (early stopped) / FAILED, and the best *completed*
  trial's model registered with the alias ``champion`` (:mod:`tune.tracking`).
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.data
import ray.exceptions
from mlflow.tracking import MlflowClient
from ray import tune as rtune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from pipelines.config import METHOD_CONFIGS, TrainConfig
from pipelines.config_loading import apply_overrides
from pipelines.data import cache
from pipelines.orchestration.storage import filesystem
from pipelines.orchestration.train import init_ray, train, use_gpu_on_cluster
from pipelines.tracking import runs as mlflow_runs
from tune import tracking
from tune.config import SweepConfig, check_sweep, plain
from tune.placement_groups import PlacementGroupJanitor, placement_group_recorder
from tune.results import SweepResult, collect_rows, fmt, mark_best, say, trial_run_name, write_outputs


def trial_values(sampled: dict[str, Any], base_method: str) -> dict[str, Any]:
    """A trial's sampled values as config overrides.  A space that searches ``method.name`` together with
    one method's options (``method.name=choice(ift,sft)`` and ``method.lam``) is conditional: a trial
    of a method without that option does not take it."""
    values = {k: plain(v) for k, v in sampled.items()}
    fields = METHOD_CONFIGS[values.get("method.name", base_method)].model_fields
    return {k: v for k, v in values.items() if not (k.startswith("method.") and k.split(".")[1] not in fields)}


def _report_callback_cls() -> type:

    class _ReportEvaluations(TuneReportCallback):
        """TuneReportCallback that forwards only the reports carrying the sweep metric.

        Checkpoint reports may lack it (a checkpoint step that is no evaluation
        step); Tune requires the metric in every result.
        """

        def __init__(self, metric: str):
            super().__init__()
            self._metric = metric

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and self._metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return _ReportEvaluations


def trial_driver(
    config: dict[str, Any],
    *,
    base: dict,
    sweep_id: str,
    parent_run_id: str,
    trials_dir: str,
    metric: str,
    registry: Any,
) -> None:
    """One trial: ``ift train`` with the sampled values, its MLflow run nested under the sweep's.

    ``registry`` is the placement-group janitor's registry actor (``None``: no janitor).
    """

    # Several trials prepare data at once: their Ray Data bars would interleave on the console.
    ray.data.DataContext.get_current().enable_progress_bars = False
    trial_id = rtune.get_context().get_trial_id()
    values = trial_values(config, base["method"]["name"])
    values["run_name"] = trial_run_name(sweep_id, trial_id)
    values["checkpointing.storage_path"] = trials_dir
    cfg = apply_overrides(TrainConfig.model_validate(base), values)
    callbacks: list = [_report_callback_cls()(metric)]
    recorder = placement_group_recorder(registry, trial_id) if registry is not None else None
    if recorder is not None:
        callbacks.append(recorder)
    # Tune retries a trial whatever ended it; only a trial lost with its node is worth a retry.
    raise_if_failed_before(trials_dir, values["run_name"])
    try:
        train(
            cfg, parent_run_id=parent_run_id, show_progress=False, extra_callbacks=callbacks, register=False,
            report_each_log_step=not metric.startswith("val_"),  # evaluations are always reported
        )  # fmt: skip
    except (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError):
        raise  # lost with a node (the driver usually dies with it): worth the retry
    except Exception as exc:
        record_trial_failure(trials_dir, values["run_name"], exc)
        raise


TRIAL_FAILURE_SUFFIX = ".failed"  # beside the trial's checkpoint folder: what its first attempt raised


class TrialFailedBefore(RuntimeError):
    """A retried trial whose first attempt raised: the same config would raise again."""


def _failure_record(trials_dir: str, run_name: str) -> tuple[pafs.FileSystem, str]:
    return filesystem(f"{trials_dir.rstrip('/')}/{run_name}{TRIAL_FAILURE_SUFFIX}")


def record_trial_failure(trials_dir: str, run_name: str, exc: BaseException) -> None:
    """Write what a trial raised beside its checkpoints (local or in a bucket)."""
    fs, path = _failure_record(trials_dir, run_name)
    lines = str(exc).strip().splitlines()
    fs.create_dir(path.rsplit("/", 1)[0])
    with fs.open_output_stream(path) as f:
        f.write(f"{type(exc).__name__}: {lines[-1] if lines else ''}".encode())


def raise_if_failed_before(trials_dir: str, run_name: str) -> None:
    """Refuse to run again a trial that raised before (:class:`TrialFailedBefore`, with its reason)."""
    fs, path = _failure_record(trials_dir, run_name)
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            raise TrialFailedBefore(f"not retried: this trial raised before ({f.read().decode()})")


def _progress_callback_cls() -> type:

    class _SweepProgress(rtune.Callback):
        """One line per trial event (start, evaluation, end), on the driver's stdout."""

        def __init__(self, metric: str, keys: list[str]):
            self.metric, self.keys = metric, keys

        def log(self, msg: str) -> None:
            say(msg)

        def _values(self, trial) -> str:
            return " ".join(f"{k}={fmt(plain(trial.config.get(k)))}" for k in self.keys)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.log(f"[sweep] trial {trial.trial_id} started: {self._values(trial)}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.metric in result:
                self.log(
                    f"[sweep] trial {trial.trial_id} step {result.get('step')}: {self.metric} {result[self.metric]:.4f}"
                )

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            self.log(
                f"[sweep] trial {trial.trial_id} ended at step {last.get('step')} "
                f"({self.metric} {fmt(last.get(self.metric))})"
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            self.log(f"[sweep] trial {trial.trial_id} FAILED ({self._values(trial)}); the sweep goes on")

    return _SweepProgress


def _default_concurrency(base: TrainConfig, driver_cpus: float) -> int:
    """As many trials as worker groups fit, while every trial's data preparation
    (tokenizer actors; none when the trials read the prepared cache) still leaves one
    CPU for Ray Data's read tasks."""

    total = ray.cluster_resources()
    cpus = total.get("CPU", 1)
    train_need = base.scaling.num_workers * base.scaling.cpus_per_worker + driver_cpus
    actors = 0 if base.data.cache else (base.data.tokenize_concurrency or 1)
    prep_need = actors * min(1.0, base.scaling.cpus_per_worker) + driver_cpus
    n = int(cpus // train_need) if train_need > 0 else int(cpus)
    if prep_need > 0:
        n = min(n, int(max(cpus - 1, 0) // prep_need))
    if use_gpu_on_cluster(base) and base.scaling.gpus_per_worker > 0:
        n = min(n, int(total.get("GPU", 0) // (base.scaling.num_workers * base.scaling.gpus_per_worker)))
    return max(1, n)


def _search(sweep: SweepConfig, max_concurrent: int) -> tuple[dict[str, Any], Any]:
    """Tune param space and search algorithm."""
    space = sweep.space()
    param_space = {k: spec.tune_domain(sweep.algorithm) for k, spec in space.items()}
    if sweep.algorithm == "optuna":
        import optuna  # only the optuna algorithm needs it

        return param_space, OptunaSearch(sampler=optuna.samplers.TPESampler(seed=sweep.seed))

    # A search algorithm passed in is not wrapped by TuneConfig.max_concurrent_trials
    # (only Searchers are): the generator limits itself.
    return param_space, BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent)


def _scheduler(sweep: SweepConfig, base: TrainConfig) -> Any:
    """ASHA on the sweep metric, its clock defaulting to the training config's eval steps."""
    if sweep.scheduler.type == "none":
        return None

    sc = sweep.scheduler
    if sc.time_attr == "step":
        grace = sc.grace_period or base.optimization.eval_every_n_steps or 1
        max_t = sc.max_t or base.optimization.max_steps or 1_000_000
    else:
        grace = sc.grace_period or 1
        max_t = sc.max_t or 1_000_000
    # stop_last_trials=False: a trial that reaches max_t is not stopped at its last report
    # (it finishes, exports its model and closes its MLflow run).
    return ASHAScheduler(
        time_attr=sc.time_attr,
        grace_period=grace,
        max_t=max(max_t, grace),
        reduction_factor=sc.reduction_factor,
        stop_last_trials=False,
    )


def _tuner(
    sweep: SweepConfig,
    base: TrainConfig,
    *,
    sweep_id: str,
    sweep_dir: str,
    parent_id: str,
    max_concurrent: int,
    registry: Any,
    verbose: int,
) -> Any:
    """The Tuner: :func:`trial_driver` per sampled config, each driver reserving only its own bundle."""

    metric, mode = sweep.metric, sweep.mode
    param_space, search_alg = _search(sweep, max_concurrent)
    trainable = rtune.with_resources(
        rtune.with_parameters(
            trial_driver,
            base=base.model_dump(mode="json"),
            sweep_id=sweep_id,
            parent_run_id=parent_id,
            trials_dir=f"{sweep_dir}/trials",
            metric=metric,
            registry=registry,
        ),
        {"CPU": sweep.driver_cpus, "memory": sweep.driver_memory_mb * 2**20},
    )
    return rtune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=rtune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=search_alg,
            scheduler=_scheduler(sweep, base),
            num_samples=sweep.resolved_num_samples(),
            reuse_actors=False,
            # Optuna (a Searcher) gets a ConcurrencyLimiter from this; the variant generator limits itself.
            max_concurrent_trials=max_concurrent if sweep.algorithm == "optuna" else None,
            trial_name_creator=lambda t: t.trial_id,
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=rtune.RunConfig(
            name="tune",
            storage_path=sweep_dir,
            verbose=verbose,
            # Retries are for trials lost with their node: see trial_driver.
            failure_config=rtune.FailureConfig(max_failures=base.checkpointing.max_failures, fail_fast=False),
            callbacks=[_progress_callback_cls()(metric, list(sweep.space()))],
        ),
    )


def _sweep_dirs(sweep: SweepConfig, base: TrainConfig, sweep_id: str) -> tuple[str, Path]:
    """The sweep's storage (Tune state, trial checkpoints; may be a URI) and the local
    folder the CSV and heatmap are written to (a temp folder when the storage is remote)."""
    root = sweep.storage_path or os.path.join(base.checkpointing.storage_path, "sweeps")
    if "://" not in root:
        root = str(Path(root).resolve())
    sweep_dir = f"{root.rstrip('/')}/{sweep_id}"
    local_dir = Path(sweep_dir) if "://" not in sweep_dir else Path(tempfile_dir(sweep_id))
    local_dir.mkdir(parents=True, exist_ok=True)
    return sweep_dir, local_dir


# Keys that change what a row becomes: a sweep over them cannot share one tokenized cache.
_TOKENIZATION_KEYS = ("data.", "model.name", "model.tokenizer", "model.revision", "method.name")


def _prepare_data_once(base: TrainConfig, sweep: SweepConfig, log: Callable[[str], None]) -> TrainConfig:
    """Tokenize the corpus once, before any trial starts, and point every trial at the cache."""
    if any(k.startswith(_TOKENIZATION_KEYS) for k in sweep.space()):
        log("[sweep] the search space changes tokenization: each trial streams and tokenizes its own data")
        return base

    for entry in cache.prepare(base, log=lambda msg: log(f"[sweep] data: {msg}")):
        log(f"[sweep] data: {entry.manifest['good_rows']:,} rows, {entry.manifest['tokens']:,} tokens")
    return apply_overrides(base, {"data.cache": True})


def run_sweep(
    sweep: SweepConfig, base: TrainConfig, *, verbose: int = 1, log: Callable[[str], None] | None = None
) -> SweepResult:
    """Run the sweep end to end; see the module docstring."""
    log = log or say

    check_sweep(sweep, base)
    t0 = time.time()
    init_ray()
    base = _prepare_data_once(base, sweep, log)
    tracking_uri = mlflow_runs.resolve_tracking_uri(base.mlflow.tracking_uri)
    base = apply_overrides(base, {"mlflow.tracking_uri": tracking_uri})
    sweep_id = f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    sweep_dir, local_dir = _sweep_dirs(sweep, base, sweep_id)
    space = sweep.space()
    keys = list(space)
    metric, mode = sweep.metric, sweep.mode
    max_conc = sweep.max_concurrent_trials or _default_concurrency(base, sweep.driver_cpus)
    model_name = sweep.registered_model_name or base.mlflow.registered_model_name

    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = mlflow_runs.experiment_id(client, base.mlflow.experiment, tracking_uri)
    parent_id = tracking.start_parent_run(
        client, exp_id, sweep_id, sweep, base, sweep_dir=sweep_dir, max_concurrent=max_conc
    )
    dims = ", ".join(f"{k}~{s.describe()}" for k, s in space.items())
    log(
        f"[sweep] {sweep_id}: {sweep.algorithm} search over {dims}; "
        f"{sweep.scheduler.type} on {metric} ({mode}); up to {max_conc} trials at a time"
    )
    log(f"[sweep] MLflow parent run {parent_id} in {tracking_uri}")

    janitor = PlacementGroupJanitor(log=log)
    janitor.start()
    tuner = _tuner(
        sweep,
        base,
        sweep_id=sweep_id,
        sweep_dir=sweep_dir,
        parent_id=parent_id,
        max_concurrent=max_conc,
        registry=janitor.registry,
        verbose=verbose,
    )
    ok = False
    try:
        grid = tuner.fit()
        ok = True
    finally:
        janitor.stop()
        if not ok:
            mlflow_runs.end_run(tracking_uri, parent_id, ok=False)

    rows = collect_rows(grid, sweep_id, keys, metric, sweep_dir)
    tracking.reconcile_child_runs(client, exp_id, parent_id, sweep_id, rows, base)
    best = mark_best(rows, metric, mode)
    result = SweepResult(
        sweep_id=sweep_id,
        sweep_dir=sweep_dir,
        parent_run_id=parent_id,
        experiment_id=exp_id,
        tracking_uri=tracking_uri,
        metric=metric,
        mode=mode,
        keys=keys,
        rows=rows,
        best=best,
        registered_model_name=model_name,
        released_placement_groups=list(janitor.released),
        max_concurrent_trials=max_conc,
    )
    if best is not None and model_name and best.get("hf_model_path"):
        tracking.register_champion(result, base, sweep, client)
    elif best is not None and not model_name:
        log("[sweep] no mlflow.registered_model_name / sweep.registered_model_name: the champion is not registered")
    write_outputs(result, local_dir)
    tracking.finish_parent_run(client, result, started_at=t0)
    return result


def tempfile_dir(name: str) -> str:
    """A local folder for a sweep whose storage is remote."""

    return os.path.join(tempfile.gettempdir(), "ift-sweeps", name)
