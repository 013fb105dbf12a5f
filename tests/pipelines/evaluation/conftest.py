"""Shared by the evaluation tests: offline Hub settings, the untrained tiny model, a registry with two versions."""

from __future__ import annotations

import os
from pathlib import Path

# Everything here runs offline; set before transformers/datasets/lm-eval read them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from ift.models import load_model
from ift.tokenization import load_tokenizer
from pipelines.config_loading import load_config
from pipelines.tracking.runs import register_model, start_or_resume_run

MODEL_NAME = "ift-tiny-eval-test"
SMALL = "4"  # --limit for tests that only check plumbing


def untrained_tiny(seed: int = 0):
    """The tiny preset, randomly initialised with ``seed``, and its tokenizer."""
    tok = load_tokenizer("tiny")
    return load_model("tiny", tokenizer=tok, seed=seed), tok


def _register(uri: str, model, tok, method: str, hf_dir: Path) -> tuple[str, str]:
    """Register ``model`` the way training does, from a run tagged with ``method``; return (run_id, version)."""
    model.save_pretrained(hf_dir, safe_serialization=True)
    tok.save_pretrained(hf_dir)
    cfg = load_config(
        None,
        [
            f"mlflow.tracking_uri={uri}",
            f"mlflow.registered_model_name={MODEL_NAME}",
            f"method.name={method}",
            f"run_name=eval-test-{method}",
        ],
    )
    run_id, _ = start_or_resume_run(cfg, uri)
    _, version = register_model(cfg, uri, run_id, str(hf_dir), {"method": method})
    return run_id, version


@pytest.fixture(scope="package")
def store(tmp_path_factory) -> dict:
    """A sqlite MLflow store with two registered versions (untrained tiny, seeds 0 and 1); 'champion' -> v2.

    Package-scoped: test_models, test_results and test_cli share one store (registering takes seconds).
    """
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"  # the run artifacts land next to it (pipelines.tracking.runs.artifact_location)
    run1, v1 = _register(uri, *untrained_tiny(0), method="sft", hf_dir=root / "sft")
    run2, v2 = _register(uri, *untrained_tiny(1), method="ift", hf_dir=root / "ift")
    mlflow.MlflowClient(uri, registry_uri=uri).set_registered_model_alias(MODEL_NAME, "champion", v2)
    return {"uri": uri, "root": root, "runs": {v1: run1, v2: run2}, "versions": (v1, v2)}
