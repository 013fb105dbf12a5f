"""Running trials: the 4-trial sweep on the CPU, ASHA stopping trials, a crashing trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tune.conftest import MAX_STEPS, MODEL, client_for, common_items
from tune.config import load_sweep
from tune.results import COMPLETED, ERROR, STOPPED, summary
from tune.trials import run_sweep

# The package-scoped sweep is built inside the first test's setup: about 4 minutes on an
# idle 2-core box, but up to 10 when the box is shared; give it room.
pytestmark = pytest.mark.timeout(1800)


def test_trials_get_ray_train_v2_without_an_environment_switch():
    """The Tuner-over-TorchTrainer recipe needs Train V2; Ray's default since the required version,
    so nothing sets RAY_TRAIN_V2_ENABLED (set to 0 by a user, the sweep would not work)."""
    import os

    from ray.train.torch import TorchTrainer

    if os.environ.get("RAY_TRAIN_V2_ENABLED") == "0":
        pytest.skip("Train V2 switched off in this environment")
    assert TorchTrainer.__module__.startswith("ray.train.v2.")


@pytest.mark.slow
def test_four_trial_sweep_completes_on_the_cpu(sweep4):
    rows = sweep4.rows
    assert len(rows) == 4
    assert {(r["method.lam"], r["method.decay"]) for r in rows} == {(0.0, 0.8), (0.0, 1.0), (0.5, 0.8), (0.5, 1.0)}
    assert all(r["status"] in (COMPLETED, STOPPED) for r in rows), rows
    done = [r for r in rows if r["status"] == COMPLETED]
    assert done and all(r["steps"] == MAX_STEPS and r["hf_model_path"] for r in done)
    assert sweep4.max_concurrent_trials == 2


@pytest.mark.slow
def test_asha_stops_at_least_one_trial_early(sweep4):
    stopped = [r for r in sweep4.rows if r["status"] == STOPPED]
    assert stopped, sweep4.rows
    for r in stopped:
        assert r["steps"] < MAX_STEPS and r["hf_model_path"] is None
        assert r["steps"] % 5 == 0  # stopped at an ASHA rung (an evaluation step)


@pytest.mark.slow
def test_a_crashing_trial_is_reported_and_the_sweep_goes_on(ray_cluster, tmp_path):
    """Two trials: one loads a model that does not exist and fails inside Ray Train."""
    sweep, base = load_sweep(
        "tiny-sweep",
        common_items(tmp_path)
        + [
            "optimization.max_steps=5",
            "model.tokenizer=tiny",
            "checkpointing.max_failures=0",
            "sweep.name=crash",
            "sweep.scheduler.type=none",
        ],
        space=["method.lam=none", "method.decay=none", "model.name=grid(tiny,/nonexistent/ift-model)"],
    )
    result = run_sweep(sweep, base, verbose=0)
    by_model = {r["model.name"]: r for r in result.rows}
    assert by_model["tiny"]["status"] == COMPLETED
    bad = by_model["/nonexistent/ift-model"]
    assert bad["status"] == ERROR and bad["error"]
    client = client_for(result)
    run = client.get_run(bad["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["sweep.status"] == "error"
    assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
    assert client.get_model_version_by_alias(MODEL, "champion").run_id == by_model["tiny"]["mlflow_run_id"]
    assert "failed" in summary(result)


def child_runs(client, result) -> list:
    """The sweep's trial runs: the MLflow runs nested under its parent run."""
    return client.search_runs(
        [client.get_experiment_by_name("sweep-test").experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    )


@pytest.mark.slow
def test_the_sweep_tokenizes_the_corpus_once_and_every_trial_reads_that_cache(sweep4):
    client = client_for(sweep4)
    children = child_runs(client, sweep4)
    assert len(children) == 4
    cache_dirs = {r.data.params["data.cache_dir"] for r in children}
    assert len(cache_dirs) == 1 and all(r.data.params["data.cache"] == "True" for r in children)
    # One finished entry per source (train and validation), each built once: no trial tokenized again.
    manifests = sorted(Path(cache_dirs.pop()).glob("*/manifest.json"))
    assert len(manifests) == 2
    for child in children:
        local = client.download_artifacts(child.info.run_id, "data_plan.json")
        plan = json.loads(Path(local).read_text())
        assert plan["from_cache"] and sorted(plan["cache"]) == sorted(str(m.parent) for m in manifests)


@pytest.mark.slow
def test_resubmitting_one_trial_reads_the_sweeps_cache_and_tokenizes_nothing(sweep4):
    from pipelines.config_loading import apply_overrides
    from pipelines.orchestration.train import train

    client = client_for(sweep4)
    child = child_runs(client, sweep4)[0]
    cache_dir = Path(child.data.params["data.cache_dir"])
    manifests = {m: m.stat().st_mtime_ns for m in cache_dir.glob("*/manifest.json")}
    # The trial's own settings, submitted again on its own (a shorter run: what is read is the point).
    root = cache_dir.parent
    _, base = load_sweep("tiny-sweep", common_items(root) + ["sweep.name=t4"])
    cfg = apply_overrides(base, {
        "data.cache": True, "method.lam": float(child.data.params["method.lam"]),
        "method.decay": float(child.data.params["method.decay"]), "run_name": "resubmitted",
        "optimization.max_steps": 2, "mlflow.registered_model_name": None,
    })  # fmt: skip
    result = train(cfg, show_progress=False)
    plan = json.loads(Path(client.download_artifacts(result.mlflow_run_id, "data_plan.json")).read_text())
    assert plan["from_cache"] and sorted(plan["cache"]) == sorted(str(m.parent) for m in manifests)
    # Nothing was prepared again: the same entries, untouched.
    assert {m: m.stat().st_mtime_ns for m in cache_dir.glob("*/manifest.json")} == manifests


def test_default_concurrency_fits_worker_groups_and_tokenizer_actors(monkeypatch):
    import ray

    from pipelines.config_loading import apply_overrides, load_config
    from tune.trials import _default_concurrency

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    base = load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.use_gpu=false"])
    # 8 CPUs hold 4 groups of 2 workers; trials reading the prepared cache start no tokenizer.
    assert _default_concurrency(apply_overrides(base, {"data.cache": True}), 0.0) == 4
    # Streaming trials with 4 tokenizer actors each: only one fits beside the read tasks' CPU.
    assert _default_concurrency(apply_overrides(base, {"data.tokenize_concurrency": 4}), 0.0) == 1
    assert _default_concurrency(base, 0.0) == 4  # unset: one actor per trial


def test_a_trial_that_raised_is_refused_on_retry_with_its_first_reason(tmp_path):
    from tune.trials import TrialFailedBefore, raise_if_failed_before, record_trial_failure

    trials = str(tmp_path / "trials")
    raise_if_failed_before(trials, "s-00000")  # never failed: runs
    record_trial_failure(trials, "s-00000", OSError("Traceback ...\nno model at /nonexistent/ift-model"))
    with pytest.raises(TrialFailedBefore, match=r"raised before \(OSError: no model at /nonexistent/ift-model\)"):
        raise_if_failed_before(trials, "s-00000")
    raise_if_failed_before(trials, "s-00001")  # another trial of the sweep is not affected


def test_a_trial_of_a_method_without_a_searched_option_does_not_take_it():
    from tune.trials import trial_values

    sampled = {"method.name": "sft", "method.lam": 0.3, "optimization.lr": 1e-3}
    assert trial_values(sampled, "ift") == {"method.name": "sft", "optimization.lr": 1e-3}
    assert trial_values({"method.lam": 0.3}, "ift") == {"method.lam": 0.3}
