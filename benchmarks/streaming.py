"""Training from a stream: time to the first step, rows each rank reads, object-store peak, tokens/s.

Every figure comes from real ``ift train`` runs (``pipelines.orchestration.train.train``, the
packaged tiny config, 2 workers) on generated chat corpora written to JSONL:

* **time to the first optimizer step** on a small and a large corpus (2,000 and
  200,000 rows): from the call to ``train`` to the MLflow timestamp of step 1.
  The driver's scan of the corpus (row count + content hash, one pass) is inside
  that time; tokenizing the corpus is not, since nothing waits for it;
* **rows read per rank** in one epoch of the small corpus (MLflow
  ``data/rows_read_rank<r>``), against rows ÷ workers;
* **object-store peak** during the large run: the plasma store's used bytes,
  sampled every 0.5 s from outside the workers (``ray._private.internal_api``);
* **steady tokens/s** (the run's own ``tokens_per_s`` metric, logged every
  ``warmup`` steps: the median of the windows after the first) of the same run
  streamed, read from the prepared cache,
  and materialized (the tokenized stream put in the object store before the
  trainer starts, as the pipeline did before streaming).
"""

from __future__ import annotations

import re
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import load_average


def _corpus(path: Path, rows: int, seed: int) -> Path:
    from ift.toydata import make_conversations, write_jsonl

    write_jsonl(make_conversations(rows, seed=seed), path)
    return path


def _config(root: Path, corpus: Path, name: str, *overrides: str):
    from pipelines.config_loading import load_config

    return load_config(
        None,
        [
            f"run_name={name}", f"data.train=[{{path: {corpus}}}]", "data.validation=[]",
            f"data.cache_dir={root / 'cache'}", f"checkpointing.storage_path={root / 'runs'}",
            f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", "mlflow.experiment=bench",
            "mlflow.registered_model_name=", "checkpointing.every_n_steps=100000", "optimization.log_every_n_steps=1",
            "optimization.eval_every_n_steps=0", *overrides,
        ],
    )  # fmt: skip


def _history(cfg, run_id: str, key: str) -> list[tuple[int, float, int]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


class ObjectStoreSampler:
    """Samples the plasma store's used bytes of the local Ray cluster in a thread."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        from ray._private.internal_api import memory_summary

        text = memory_summary(stats_only=True)
        m = re.search(r"Plasma memory usage (\d+(?:\.\d+)?) MiB", text)
        return int(float(m.group(1)) * 2**20) if m else 0

    def _run(self) -> None:
        while not self._done.wait(self.every_s):
            try:
                self.peak = max(self.peak, self._used())
            except Exception:
                continue

    def __enter__(self) -> ObjectStoreSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)


def first_step_seconds(root: Path, corpus: Path, name: str) -> dict[str, Any]:
    import mlflow

    from pipelines.orchestration.train import train

    cfg = _config(root, corpus, name, "optimization.max_steps=2")
    # The store's tables are created on first touch (seconds of migrations): not part of either run's time.
    mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).search_experiments()
    with ObjectStoreSampler() as sampler:
        t0 = time.time()
        result = train(cfg, show_progress=False)
    first = _history(cfg, result.mlflow_run_id, "loss")[0]
    return {"seconds_to_first_step": first[2] / 1000 - t0, "object_store_peak_bytes": sampler.peak}


def rows_per_rank(root: Path, corpus: Path, rows: int, workers: int) -> dict[str, Any]:
    from pipelines.orchestration.train import train

    cfg = _config(root, corpus, "rows-per-rank", "optimization.epochs=1", f"scaling.num_workers={workers}")
    result = train(cfg, show_progress=False)
    read = [int(_history(cfg, result.mlflow_run_id, f"data/rows_read_rank{r}")[-1][1]) for r in range(workers)]
    return {"rows": rows, "workers": workers, "rows_read_per_rank": read, "goal_per_rank": rows / workers}


def steady_tokens_per_s(root: Path, corpus: Path, steps: int, warmup: int) -> dict[str, Any]:
    import pipelines.data.streaming as data_module
    from pipelines.data.cache import prepare
    from pipelines.orchestration.train import train

    streaming = data_module.build_datasets

    def materialized(cfg, **kwargs):
        """The pre-streaming path: the whole tokenized corpus in the object store before training starts."""
        data = streaming(cfg, **kwargs)
        data.train = data.train.materialize()
        return data

    out: dict[str, Any] = {}
    for label, extra in (("materialized", ()), ("stream", ()), ("cache", ("data.cache=true",))):
        # Logged once after the warm-up and once at the end: the last figure covers the steady steps.
        cfg = _config(
            root, corpus, f"tokens-{label}", f"optimization.max_steps={steps}",
            f"optimization.log_every_n_steps={warmup}", *extra,
        )  # fmt: skip
        if label == "cache":
            prepare(cfg, log=lambda msg: None)
        data_module.build_datasets = materialized if label == "materialized" else streaming
        try:
            result = train(cfg, show_progress=False)
        finally:
            data_module.build_datasets = streaming
        rates = [(s, v) for s, v, _ in _history(cfg, result.mlflow_run_id, "tokens_per_s") if s > warmup]
        out[label] = {"tokens_per_s": statistics.median(v for _, v in rates) if rates else None,
                      "steps": steps - warmup}  # fmt: skip
    base = out["materialized"]["tokens_per_s"]
    for label in ("stream", "cache"):
        rate = out[label]["tokens_per_s"]
        out[label]["ratio_to_materialized"] = rate / base if rate and base else None
    return out


def run(
    *, small_rows: int = 2_000, large_rows: int = 200_000, steps: int = 40, warmup: int = 10, log=print
) -> dict[str, Any]:
    from pipelines.orchestration.train import init_ray

    init_ray(log_to_driver=False)
    out: dict[str, Any] = {"load_average_before": load_average(), "small_rows": small_rows, "large_rows": large_rows}
    with tempfile.TemporaryDirectory(prefix="ift-bench-stream-") as tmp:
        root = Path(tmp)
        small = _corpus(root / "small.jsonl", small_rows, seed=11)
        large = _corpus(root / "large.jsonl", large_rows, seed=12)
        log(f"[stream] corpora: {small_rows:,} and {large_rows:,} rows ({large.stat().st_size / 2**20:.0f} MiB)")
        out["small"] = first_step_seconds(root, small, "first-step-small")
        out["large"] = first_step_seconds(root, large, "first-step-large")
        out["first_step_ratio_large_to_small"] = (
            out["large"]["seconds_to_first_step"] / out["small"]["seconds_to_first_step"]
        )
        log(
            f"[stream] first step: {out['small']['seconds_to_first_step']:.1f} s ({small_rows:,} rows), "
            f"{out['large']['seconds_to_first_step']:.1f} s ({large_rows:,} rows): "
            f"{out['first_step_ratio_large_to_small']:.2f}x"
        )
        out["rows_per_rank"] = rows_per_rank(root, small, small_rows, workers=2)
        log(f"[stream] rows read per rank: {out['rows_per_rank']['rows_read_per_rank']} (goal {small_rows / 2:,.0f})")
        out["tokens_per_s"] = steady_tokens_per_s(root, small, steps, warmup)
        log(f"[stream] steady tokens/s: { {k: v['tokens_per_s'] for k, v in out['tokens_per_s'].items()} }")
    out["load_average_after"] = load_average()
    return out
