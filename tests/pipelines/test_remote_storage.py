"""`ift train` with its corpus and checkpoints on S3: a worker killed while saving, a failure after training.

A real S3-compatible server (moto_server) on 127.0.0.1, started and stopped here, is reached
through the usual AWS environment variables by the driver and by every Ray worker (the local
Ray cluster starts after they are set, so its processes inherit them)."""

from __future__ import annotations

import json

import mlflow
import pytest
import ray

from pipelines.orchestration.hooks import KillWorker
from pipelines.orchestration.train import train
from pipelines.tracking.runs import FAILURE_TAG, load_model_components
from pipelines.training.state import STATE_FILE
from tests.pipelines.conftest import BUCKET
from tests.pipelines.test_train import config, loss_history

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(s3):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def checkpoint_folders(s3, run_name: str) -> dict[str, dict[str, int]]:
    """Each checkpoint folder of the run in the bucket: its files (relative path -> size)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"runs/{run_name}/checkpoint_")
    folders: dict[str, dict[str, int]] = {}
    for o in (o for page in pages for o in page.get("Contents", [])):
        parts = o["Key"].split("/", 3)
        if len(parts) == 4:  # not Ray's checkpoint_manager_snapshot.json beside the folders
            folders.setdefault(parts[2], {})[parts[3]] = o["Size"]
    return folders


def step_of(s3, run_name: str, folder: str) -> int:
    body = s3.get_object(Bucket=BUCKET, Key=f"runs/{run_name}/{folder}/{STATE_FILE}")["Body"].read()
    return json.loads(body)["step"]


RANK1_SHARD = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"  # ZeRO-2: rank 1's optimizer partition


@pytest.fixture(scope="module")
def s3_corpus(s3, corpora) -> list[str]:
    """The training and validation corpora uploaded to the bucket: ``data.*`` overrides reading them there."""
    for name in ("chat.jsonl", "chat_val.jsonl"):
        s3.upload_file(str(corpora / name), BUCKET, f"corpus/{name}")
    return [
        f"data.train=s3://{BUCKET}/corpus/chat.jsonl",
        f"data.validation=[{{path: s3://{BUCKET}/corpus/chat_val.jsonl}}]",
    ]


def test_a_worker_killed_while_saving_leaves_no_checkpoint_a_rerun_loads_and_the_rerun_resumes_from_the_last_whole_one(
    tmp_path, corpora, s3, s3_corpus
):
    marker = tmp_path / "killed-while-saving"
    cfg = config(
        tmp_path, corpora, "optimization.max_steps=10", "deepspeed.zero_stage=2", "checkpointing.max_failures=0",
        f"checkpointing.storage_path=s3://{BUCKET}/runs", *s3_corpus,
    )  # fmt: skip
    assert cfg.data.train[0].path.startswith("s3://")  # every rank streams its rows from the bucket
    # Rank 1 dies halfway through uploading the final checkpoint, once rank 0's part is in the bucket.
    with pytest.raises(ray.train.TrainingFailedError):
        train(cfg, show_progress=False, hooks=KillWorker(step=10, rank=1, marker=str(marker), while_saving=True))
    assert marker.exists(), "the fault was not injected"
    folders = checkpoint_folders(s3, cfg.run_name)
    by_step = {step_of(s3, cfg.run_name, f): f for f, files in folders.items() if STATE_FILE in files}
    assert sorted(by_step) == [4, 8, 10]
    whole, half = folders[by_step[8]], folders[by_step[10]]
    # The step-10 folder looks like a checkpoint (loop state, exported model) but is half-written.
    assert "hf_model/model.safetensors" in half
    assert half[RANK1_SHARD] == whole[RANK1_SHARD] // 2

    result = train(cfg, show_progress=False)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    assert [m.value for m in client.get_metric_history(result.mlflow_run_id, "resumed_from_step")] == [8.0]
    losses: dict[int, list[float]] = {}
    for step, loss in loss_history(cfg, result.mlflow_run_id):
        losses.setdefault(step, []).append(loss)
    assert sorted(losses) == list(range(1, 11))
    # Steps 9-10 ran before the kill and again after it, from the same weights and rows: the same loss.
    assert [len(losses[s]) for s in range(1, 11)] == [1] * 8 + [2, 2]
    assert losses[10][0] == pytest.approx(losses[10][1], rel=1e-4)
    final = checkpoint_folders(s3, cfg.run_name)[result.checkpoint_path.rsplit("/", 1)[1]]
    assert final[RANK1_SHARD] == whole[RANK1_SHARD]
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    assert result.registered_version == "1"
    components = load_model_components("models:/tiny-test/1", cfg.mlflow.tracking_uri)
    ids = components["tokenizer"]("hello", return_tensors="pt").input_ids
    assert components["model"](ids).logits.shape[-1] == len(components["tokenizer"])


def test_a_failure_after_training_marks_the_run_failed_and_rerunning_finishes_it_without_training(
    tmp_path, corpora, monkeypatch
):
    from pipelines.tracking import runs

    cfg = config(tmp_path, corpora, "optimization.max_steps=4", f"checkpointing.storage_path=s3://{BUCKET}/runs")

    def registry_down(*args, **kwargs):
        raise ConnectionError("the model registry is unreachable")

    monkeypatch.setattr(runs, "register_model", registry_down)
    with pytest.raises(ConnectionError):
        train(cfg, show_progress=False)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FAILED"
    reason = run.data.tags[FAILURE_TAG]
    assert "training finished" in reason and "registering the model failed" in reason
    assert "the model registry is unreachable" in reason and "Re-run the same command" in reason
    trained = loss_history(cfg, run.info.run_id)
    assert [s for s, _ in trained] == [1, 2, 3, 4]

    monkeypatch.undo()
    result = train(cfg, show_progress=False)
    assert result.mlflow_run_id == run.info.run_id and result.registered_version == "1"
    assert loss_history(cfg, run.info.run_id) == trained  # not one step trained again
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and FAILURE_TAG not in run.data.tags
