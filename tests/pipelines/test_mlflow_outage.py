"""An MLflow tracking server that goes away for ~10 s mid-run: training goes on, and every step's
metrics reach the server in the end, none lost and none twice.  A real `mlflow server` on
127.0.0.1 (sqlite backend), stopped and started again by the test on the same port and store."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import mlflow
import pytest
import ray

from pipelines.orchestration.train import train
from tests.pipelines.test_train import config
from tests.test_cluster_integration import BIN, _base_env, _free_ports, _terminate_tree, _wait_http

pytestmark = pytest.mark.slow

OUTAGE_S = 10


class MlflowServer:
    """`mlflow server` on a fixed port and sqlite store, which the test can stop and start again."""

    def __init__(self, root: Path):
        (self.port,) = _free_ports(1)
        self.root, self.proc = root, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.root / "server.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "artifacts")],
                env=_base_env(), cwd=self.root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        _wait_http(f"{self.uri}/health", self.proc, log, 120)

    def stop(self) -> None:
        if self.proc is not None:
            _terminate_tree(self.proc)
            self.proc = None


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_ten_second_mlflow_outage_mid_run_loses_and_repeats_no_metric(tmp_path, corpora, server):
    cfg = config(tmp_path, corpora, "optimization.max_steps=14", f"mlflow.tracking_uri={server.uri}")
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    outage: dict[str, float] = {}

    def take_the_server_down_at_step_4() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and len(client.get_metric_history(runs[0].info.run_id, "loss")) >= 4:
                break
            time.sleep(0.5)
        outage["down"] = time.monotonic()
        server.stop()
        outage["gone_at"] = time.time()  # wall clock, as MLflow's metric timestamps: the server is gone
        time.sleep(OUTAGE_S)
        server.start()
        outage["up"] = time.monotonic()

    chaos = threading.Thread(target=take_the_server_down_at_step_4, daemon=True)
    chaos.start()
    result = train(cfg, show_progress=False)
    chaos.join(timeout=180)
    assert outage.get("up", 0) - outage.get("down", 0) >= OUTAGE_S, "the outage did not happen"
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and result.registered_version == "1"
    losses = client.get_metric_history(result.mlflow_run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 15))  # every step once: none lost, none twice
    # The outage hit training: the first step was logged before the server went, the last one after
    # (a metric's timestamp is taken when the step logs it, before the call that waits for the server).
    logged_at = sorted(m.timestamp / 1000 for m in losses)
    assert logged_at[0] < outage["gone_at"] < logged_at[-1], "the outage did not overlap training"
    tokens = client.get_metric_history(result.mlflow_run_id, "tokens_per_s")
    assert sorted(m.step for m in tokens) == list(range(1, 15))
