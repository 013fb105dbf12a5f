"""Shared sweeps for the `ift sweep` tests (Ray Tune over Ray Train trials, ASHA, MLflow).

One package-scoped 4-trial sweep (the packaged tiny-sweep grid, 15 steps, val_nll
every 5 steps, two trials at a time with half a CPU each) serves the tests of
several modules (trials, placement groups, tracking, results); it is built once,
inside the setup of the first test that asks for it.  Each sweep uses its own MLflow
sqlite store and storage under a temporary directory.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pytest
import ray

from tune.config import load_sweep
from tune.results import summary
from tune.trials import run_sweep

MAX_STEPS = 15
MODEL = "sweep-test"


def common_items(root: Path) -> list[str]:
    """Overrides every test sweep shares: its own store and storage under ``root``, a small budget."""
    return [
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        f"checkpointing.storage_path={root / 'runs'}",
        f"data.cache_dir={root / 'cache'}",
        "mlflow.experiment=sweep-test",
        f"mlflow.registered_model_name={MODEL}",
        "data.train.0.max_rows=240",
        "data.validation.0.max_rows=48",
        f"optimization.max_steps={MAX_STEPS}",
    ]


def client_for(result) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=result.tracking_uri)


# Package scope: the 4-trial sweep takes minutes; every test module of tests/tune shares it.
@pytest.fixture(scope="package")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="package")
def sweep4(ray_cluster, tmp_path_factory):
    """The packaged tiny-sweep: grid lam {0, 0.5} x decay {0.8, 1.0}, ASHA at steps 5 and 10."""
    root = tmp_path_factory.mktemp("sweep4")
    sweep, base = load_sweep("tiny-sweep", common_items(root) + ["sweep.name=t4"])
    assert (sweep.algorithm, sweep.max_concurrent_trials, base.scaling.num_workers) == ("grid", 2, 1)
    t0 = time.time()
    result = run_sweep(sweep, base, verbose=0)
    print(f"\n4-trial sweep: {time.time() - t0:.0f} s", summary(result))
    return result
