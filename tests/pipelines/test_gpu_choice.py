"""scaling.use_gpu: what auto resolves to, and the reason the run prints at start."""

from __future__ import annotations

import pytest

from pipelines.config_loading import load_config
from pipelines.orchestration.train import resolve_use_gpu


@pytest.mark.parametrize(
    "overrides, now, autoscalable, expected, reason",
    [
        ([], 8, 0, True, "the cluster has 8 GPUs"),
        ([], 0, 16, True, "autoscaler can start nodes with 16 GPUs"),
        ([], 0, 0, False, "no GPU and no autoscaling node type with GPUs, so this run trains on CPU"),
        (["scaling.gpus_per_worker=0"], 8, 0, False, "gpus_per_worker=0: training on CPU"),
        (["scaling.use_gpu=true"], 0, 0, True, "scaling.use_gpu=True"),
        (["scaling.use_gpu=false"], 8, 16, False, "scaling.use_gpu=False"),
    ],
    ids=["gpus-up", "gpus-autoscalable", "no-gpus", "workers-ask-none", "forced-on", "forced-off"],
)
def test_use_gpu_resolves_with_a_reason(overrides, now, autoscalable, expected, reason):
    use, why = resolve_use_gpu(load_config(None, overrides), gpus_now=now, gpus_autoscalable=autoscalable)
    assert use is expected and reason in why
