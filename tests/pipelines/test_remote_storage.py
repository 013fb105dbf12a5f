"""`ift train` with its checkpoints on S3 (the pipeline's worker-kill resume test runs here).

A real S3-compatible server (moto_server) on 127.0.0.1, started and stopped here, is reached
through the usual AWS environment variables by the driver and by every Ray worker (the local
Ray cluster starts after they are set, so its processes inherit them)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
import ray

from pipelines.tracking import FAILURE_TAG, load_model_components
from pipelines.train import train
from pipelines.worker import KillWorker
from tests.pipelines.test_train import config, loss_history

pytestmark = pytest.mark.slow

BUCKET = "ift-test"
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on loopback with an empty bucket; the AWS variables point at it."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)  # fmt: skip
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        server.terminate()
        server.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(s3):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def objects(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_a_run_on_s3_resumes_from_its_s3_checkpoint_after_a_killed_worker_and_registers_a_loadable_model(
    tmp_path, corpora, s3
):
    marker = tmp_path / "failed-once"
    cfg = config(tmp_path, corpora, "optimization.max_steps=10", f"checkpointing.storage_path=s3://{BUCKET}/runs")
    result = train(cfg, show_progress=False, fault=KillWorker(step=6, rank=1, marker=str(marker)))
    assert marker.exists(), "the fault was not injected"
    assert result.checkpoint_path.startswith(f"s3://{BUCKET}/runs/{cfg.run_name}/")
    assert result.hf_model_path == f"{result.checkpoint_path}/hf_model"
    keys = objects(s3, f"runs/{cfg.run_name}/")
    assert any(k.endswith("hf_model/model.safetensors") for k in keys)
    assert any("/deepspeed/" in k for k in keys)  # the DeepSpeed shards went to S3 too
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    assert [m.value for m in client.get_metric_history(result.mlflow_run_id, "resumed_from_step")] == [4.0]
    by_step: dict[int, list[float]] = {}
    for step, loss in loss_history(cfg, result.mlflow_run_id):
        by_step.setdefault(step, []).append(loss)
    assert sorted(by_step) == list(range(1, 11))
    # Steps 5-6 ran before the kill and again after it, from the same weights and rows: the same loss.
    assert len(by_step[5]) == 2 and by_step[5][0] == pytest.approx(by_step[5][1], rel=1e-4)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert "loss_curve.png" in [a.path for a in client.list_artifacts(result.mlflow_run_id)]
    assert result.registered_version == "1"
    components = load_model_components("models:/tiny-test/1", cfg.mlflow.tracking_uri)
    ids = components["tokenizer"]("hello", return_tensors="pt").input_ids
    assert components["model"](ids).logits.shape[-1] == len(components["tokenizer"])


def test_a_failure_after_training_marks_the_run_failed_and_rerunning_finishes_it_without_training(
    tmp_path, corpora, monkeypatch
):
    from pipelines import tracking

    cfg = config(tmp_path, corpora, "optimization.max_steps=4", f"checkpointing.storage_path=s3://{BUCKET}/runs")

    def registry_down(*args, **kwargs):
        raise ConnectionError("the model registry is unreachable")

    monkeypatch.setattr(tracking, "register_model", registry_down)
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
