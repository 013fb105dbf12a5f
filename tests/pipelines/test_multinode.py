"""`ift train` and `ift sweep` on a real multi-node Ray cluster started here, shaped like
cluster/kuberay/raycluster.yaml: a head that takes no work and two worker nodes, each its own
raylet and object store.  Workers are placed on one node or spread over two; a node is taken
away mid-run and a fresh node joins.

Ray starts a node with a signal handler, so only the main thread may add one: the run goes on
in a thread while the test, in the main thread, waits for the stalled worker and swaps its node.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest
import ray
from ray.cluster_utils import Cluster

from pipelines.orchestration.hooks import StallWorker
from pipelines.orchestration.train import init_ray, train
from tests.pipelines.conftest import BUCKET
from tests.pipelines.test_train import config, loss_history
from tests.tune.conftest import common_items
from tune.config import load_sweep
from tune.results import COMPLETED
from tune.trials import run_sweep

pytestmark = pytest.mark.slow

NODE = {"num_cpus": 2, "object_store_memory": 150 * 2**20}
STEPS = 8  # checkpoints at 4 and 8


@pytest.fixture(scope="module")
def cluster(s3):
    """A head with no CPUs and two worker nodes.  Started after the S3 server: every node's
    processes inherit the AWS variables, as pods get them from a secret."""
    c = Cluster(initialize_head=True, head_node_args={**NODE, "num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        c.add_node(**NODE)
    c.wait_for_nodes()
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = c.address  # what `ray job submit` gives a driver; init_ray joins it
    try:
        init_ray(log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved


def train_workers() -> dict[str, tuple[str, str]]:
    """Every Ray Train worker the cluster has run: actor id -> (node id, state), from the GCS."""
    from ray._private import state

    return {
        actor_id: (info["Address"]["NodeID"], info["State"])
        for actor_id, info in state.actors().items()
        if info.get("ActorClassName") == "RayTrainWorker"
    }


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` in a thread; the returned function waits for it and gives its result or raises."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the main thread
            out["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    return join


def swap_node(cluster: Cluster, node_id: str) -> str:
    """Take a worker node away, as a preempted machine goes, with a fresh one already joined (as a spare or
    the autoscaler's replacement); its id.  Joined first, so the retry can place on it at once: a node
    that registers only after the retry was placed would leave SPREAD nothing to spread onto."""
    (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
    fresh = cluster.add_node(**NODE).node_id
    cluster.remove_node(node)
    return fresh


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.2)
    return value


def run_config(root: Path, corpora: Path, strategy: str):
    return config(
        root, corpora, f"optimization.max_steps={STEPS}", f"scaling.placement_strategy={strategy}",
        "data.validation=[]", "mlflow.registered_model_name=null",
    )  # fmt: skip


@pytest.fixture(scope="module")
def one_node_run(cluster, tmp_path_factory, corpora):
    """The uninterrupted reference: both workers packed on one node."""
    before = set(train_workers())
    cfg = run_config(tmp_path_factory.mktemp("pack"), corpora, "PACK")
    result = train(cfg, show_progress=False)
    nodes = {node for a, (node, _) in train_workers().items() if a not in before}
    return {"losses": dict(loss_history(cfg, result.mlflow_run_id)), "nodes": nodes}


@pytest.fixture(scope="module")
def spread_run_losing_a_node(cluster, one_node_run, tmp_path_factory, corpora):
    """Workers spread over both nodes; rank 1 stalls after step 6 (a checkpoint was committed at
    4), its node is taken away and a fresh node joins."""
    root = tmp_path_factory.mktemp("spread")
    cfg = run_config(root, corpora, "SPREAD")
    before = set(train_workers())
    marker = root / "stalled"
    finished = in_thread(lambda: train(cfg, show_progress=False, hooks=StallWorker(6, rank=1, marker=str(marker))))
    lost = wait_for(lambda: marker.exists() and marker.read_text(), "rank 1 to stall")
    first_attempt = {a: node for a, (node, _) in train_workers().items() if a not in before}
    fresh = swap_node(cluster, lost)
    result = finished()
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    retried = {a: node for a, (node, _) in train_workers().items() if a not in before and a not in first_attempt}
    return {
        "result": result,
        "history": loss_history(cfg, result.mlflow_run_id),
        "resumed_from": [m.value for m in client.get_metric_history(result.mlflow_run_id, "resumed_from_step")],
        "first_nodes": set(first_attempt.values()),
        "retried_nodes": set(retried.values()),
        "lost": lost,
        "fresh": fresh,
    }


def test_workers_placed_on_two_nodes_train_to_the_losses_of_one_node(one_node_run, spread_run_losing_a_node):
    assert len(one_node_run["nodes"]) == 1  # PACK
    assert len(spread_run_losing_a_node["first_nodes"]) == 2  # SPREAD: one worker per node
    before_the_loss = {s: v for s, v in spread_run_losing_a_node["history"] if s <= 6}
    assert sorted(before_the_loss) == [1, 2, 3, 4, 5, 6]
    for step, loss in before_the_loss.items():
        assert loss == pytest.approx(one_node_run["losses"][step], rel=1e-4), step


def test_a_node_lost_after_a_checkpoint_resumes_on_a_fresh_node_with_the_losses_of_an_uninterrupted_run(
    one_node_run, spread_run_losing_a_node
):
    run = spread_run_losing_a_node
    assert run["result"].hf_model_path is not None  # finished: the final checkpoint holds the model
    assert run["resumed_from"] == [4.0]
    assert run["lost"] not in run["retried_nodes"] and run["fresh"] in run["retried_nodes"]
    steps = [s for s, _ in run["history"]]
    # Steps 5-6 ran before the loss and again from the step-4 checkpoint; nothing skipped.
    assert sorted(steps) == [1, 2, 3, 4, 5, 5, 6, 6, 7, 8]
    for step, loss in run["history"]:
        assert loss == pytest.approx(one_node_run["losses"][step], rel=1e-4), step


@pytest.fixture(scope="module")
def sweep_losing_a_node(cluster, s3, tmp_path_factory):
    """Two IFT trials at once, checkpoints and Tune state on S3.  Once both trials have
    committed a checkpoint, the node under one trial's workers is taken away and a fresh one joins."""
    root = tmp_path_factory.mktemp("sweep")
    sweep, base = load_sweep(
        "tiny-sweep",
        common_items(root)
        + [
            # Long enough that both trials still run when their first checkpoints are committed.
            "optimization.max_steps=20", "optimization.eval_every_n_steps=10", "checkpointing.every_n_steps=4",
            "checkpointing.keep=2",
            f"checkpointing.storage_path=s3://{BUCKET}/multinode", "sweep.name=lose-a-node",
            "sweep.scheduler.type=none",
        ],
        space=["method.lam=grid(0.0,0.5)", "method.decay=none"],
    )  # fmt: skip
    before = set(train_workers())
    finished = in_thread(lambda: run_sweep(sweep, base, verbose=0))

    def records() -> list[str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="multinode/sweeps/")
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        found = [k for k in keys if k.endswith("/checkpoint_manager_snapshot.json")]
        return found if len(found) == 2 else []

    wait_for(records, "both trials to commit a checkpoint")
    alive = sorted(node for a, (node, st) in train_workers().items() if a not in before and st == "ALIVE")
    lost = alive[0]
    swap_node(cluster, lost)
    return finished(), lost


def test_a_sweep_on_s3_that_loses_a_node_mid_trial_resumes_it_and_registers_its_champion(sweep_losing_a_node):
    result, _ = sweep_losing_a_node
    assert [r["status"] for r in result.rows] == [COMPLETED, COMPLETED]
    assert all(r["checkpoint_path"].startswith(f"s3://{BUCKET}/multinode/sweeps/") for r in result.rows)
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    resumed = {
        r["trial_id"]: [m.value for m in client.get_metric_history(r["mlflow_run_id"], "resumed_from_step")]
        for r in result.rows
    }
    assert any(resumed.values()), f"no trial resumed: {resumed}"
    # From a committed checkpoint (every 4 steps), not from step 0.
    assert all(v[0] > 0 and v[0] % 4 == 0 for v in resumed.values() if v), resumed
    champion = client.get_model_version_by_alias(result.registered_model_name, "champion")
    assert champion.run_id == result.best["mlflow_run_id"]
    assert result.champion_uri == f"models:/{result.registered_model_name}@champion"
