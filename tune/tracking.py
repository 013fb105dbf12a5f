"""A sweep's MLflow bookkeeping: the parent run, one child run per trial with its final
status, the parent's results (artifacts, counts, best trial) and the champion: the best
completed trial's model registered with the sweep's alias.

Each trial's child run is opened by ``ift train`` itself (``pipelines.orchestration.train.train`` with
``parent_run_id``); this module only creates the parent, fixes up the children once Tune
is done, and registers the champion.  Store access goes through ``pipelines.tracking.runs``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipelines.config import TrainConfig
from pipelines.config_loading import apply_overrides, flatten
from pipelines.orchestration.storage import StoredCheckpoint
from pipelines.tracking import runs
from pipelines.tracking.provenance import git_commit
from pipelines.training.state import HF_MODEL_DIR
from tune.config import SweepConfig
from tune.results import COMPLETED, ERROR, STOPPED, SweepResult

SWEEP_TAG = "ift.sweep"
# MLflow run status of each trial outcome.
RUN_STATUS = {COMPLETED: "FINISHED", STOPPED: "KILLED", ERROR: "FAILED"}


def start_parent_run(
    client: MlflowClient,
    exp_id: str,
    sweep_id: str,
    sweep: SweepConfig,
    base: TrainConfig,
    *,
    sweep_dir: str,
    max_concurrent: int,
) -> str:
    """Create the sweep's parent run with the sweep settings, the search space and the base
    config as params and ``sweep_config.json``; returns its run id."""
    space = sweep.space()
    parent = client.create_run(
        exp_id,
        run_name=sweep_id,
        tags={
            "mlflow.runName": sweep_id,
            SWEEP_TAG: "parent",
            "ift.sweep_id": sweep_id,
            "git_commit": git_commit(),
            "method": base.method.name,
        },
    )
    parent_id = parent.info.run_id
    params = {
        "sweep.algorithm": sweep.algorithm,
        "sweep.metric": sweep.metric,
        "sweep.mode": sweep.mode,
        "sweep.num_samples": sweep.resolved_num_samples(),
        "sweep.max_concurrent_trials": max_concurrent,
        "sweep.scheduler": sweep.scheduler.type,
        "sweep.seed": sweep.seed,
        "sweep.storage": sweep_dir,
        **{f"sweep.scheduler.{k}": v for k, v in sweep.scheduler.model_dump().items() if k != "type"},
        **{f"space.{k}": spec.describe() for k, spec in space.items()},
        **{f"base.{k}": v for k, v in flatten(base).items() if k not in space},
    }
    runs.log_params(client, parent_id, params)
    client.log_dict(
        parent_id, {"sweep": sweep.model_dump(mode="json"), "base": base.model_dump(mode="json")}, "sweep_config.json"
    )
    return parent_id


def reconcile_child_runs(
    client: MlflowClient, exp_id: str, parent_id: str, sweep_id: str, rows: list[dict], base: TrainConfig
) -> None:
    """Every trial gets a child run with its final status: FINISHED, KILLED (stopped early) or FAILED.

    Sets ``row["mlflow_run_id"]`` on every row.
    """
    found = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10_000)
    by_name = {r.data.tags.get(runs.RUN_NAME_TAG): r for r in found}
    for row in rows:
        run = by_name.get(row["run_name"])
        if run is None:  # crashed before `ift train` opened its run (e.g. an invalid sampled value)
            run = client.create_run(
                exp_id,
                run_name=row["run_name"],
                tags={
                    "mlflow.runName": row["run_name"],
                    "mlflow.parentRunId": parent_id,
                    runs.RUN_NAME_TAG: row["run_name"],
                    "method": base.method.name,
                },
            )
            runs.log_params(client, run.info.run_id, {k: row.get(k) for k in row if "." in k})
        run_id = run.info.run_id
        row["mlflow_run_id"] = run_id
        client.set_tag(run_id, "ift.sweep_id", sweep_id)
        client.set_tag(run_id, "sweep.trial_id", row["trial_id"])
        client.set_tag(run_id, "sweep.status", row["status"].lower())
        status = RUN_STATUS[row["status"]]
        if row["status"] == STOPPED:
            client.set_tag(run_id, "sweep.stopped_at_step", str(row["steps"]))
        if row["status"] == ERROR and row["error"]:
            client.set_tag(run_id, "sweep.error", row["error"][:5000])
        if row["status"] == STOPPED:
            _log_loss_curve(client, run_id, row["run_name"])
        current = client.get_run(run_id).info.status
        if current != status:
            client.set_terminated(run_id, status)


def _log_loss_curve(client: MlflowClient, run_id: str, title: str) -> None:
    """A stopped trial was killed before `ift train` drew its loss curve; draw it here."""
    if "loss_curve.png" in [a.path for a in client.list_artifacts(run_id)]:
        return
    with tempfile.TemporaryDirectory() as tmp:
        png = runs.plot_loss_curve(client, run_id, Path(tmp) / "loss_curve.png", f"{title} (stopped early)")
        if png is not None:
            client.log_artifact(run_id, str(png))


def register_champion(result: SweepResult, base: TrainConfig, sweep: SweepConfig, client: MlflowClient) -> None:
    """Register the best trial's model under ``result.registered_model_name`` and point the
    sweep's alias at that version; records the version and ``models:/`` URI on ``result``."""
    best = result.best
    assert best is not None
    run = client.get_run(best["mlflow_run_id"])
    cfg = apply_overrides(
        base, {"mlflow.registered_model_name": result.registered_model_name, **{k: best[k] for k in result.keys}}
    )
    tags = {
        **runs.model_version_tags(cfg, run.data.tags.get("data_fingerprint.train", "")),
        result.metric: f"{best[result.metric]:.6f}",
        "sweep_id": result.sweep_id,
        "sweep_parent_run_id": result.parent_run_id,
        "trial_id": best["trial_id"],
        "run_name": best["run_name"],
        **{f"space.{k}": str(best[k]) for k in result.keys},
    }
    # The trial's checkpoint may be in a bucket: only its hf_model/ is copied out to register.
    with StoredCheckpoint.from_uri(best["checkpoint_path"]).local(HF_MODEL_DIR) as hf_local:
        _, version = runs.register_model(cfg, result.tracking_uri, best["mlflow_run_id"], hf_local, tags)
    client.set_registered_model_alias(result.registered_model_name, sweep.alias, str(version))
    client.set_tag(best["mlflow_run_id"], "sweep.champion", "true")
    client.set_tag(result.parent_run_id, "champion_version", str(version))
    client.set_tag(result.parent_run_id, "champion_uri", f"models:/{result.registered_model_name}@{sweep.alias}")
    result.champion_version = str(version)
    result.champion_uri = f"models:/{result.registered_model_name}@{sweep.alias}"


def finish_parent_run(client: MlflowClient, result: SweepResult, started_at: float) -> None:
    """Log the sweep's outcome on the parent run (results table, heatmap, trial counts, best
    trial, placement groups released, wall time) and end it FINISHED.

    ``started_at`` is the sweep's ``time.time()`` at start; ``result.wall_s`` is set from it.
    """
    parent_id = result.parent_run_id
    if result.csv_path:
        client.log_artifact(parent_id, result.csv_path)
    if result.heatmap_path:
        client.log_artifact(parent_id, result.heatmap_path)
    now = int(time.time() * 1000)
    counts = {s: sum(r["status"] == s for r in result.rows) for s in (COMPLETED, STOPPED, ERROR)}
    metrics = [Metric(f"trials_{s.lower()}", n, now, 0) for s, n in counts.items()]
    metrics.append(Metric("placement_groups_released", len(result.released_placement_groups), now, 0))
    best = result.best
    if best is not None:
        metrics.append(Metric(f"best_{result.metric}", float(best[result.metric]), now, 0))
        client.set_tag(parent_id, "best_trial_id", best["trial_id"])
        client.set_tag(parent_id, "best_run_id", best.get("mlflow_run_id") or "")
    client.log_batch(parent_id, metrics=metrics)
    result.wall_s = time.time() - started_at
    client.log_metric(parent_id, "wall_s", result.wall_s)
    runs.end_run(result.tracking_uri, parent_id, ok=True)
