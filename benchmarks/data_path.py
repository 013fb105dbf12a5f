"""The data path: Ray Data tokenization against ``datasets.map``, same corpus, same processes.

Both sides run the pipeline's own per-row work, ``pipelines.data.tokenize.TokenizeRows``
(JSON payload -> validated, chat-templated token ids and labels), in batches of
256 rows over the same in-memory corpus of ``make_conversations`` rows:

* Ray Data: ``ray.data.from_items(rows).map_batches(TokenizeRows, compute=ActorPoolStrategy(size=P),
  num_cpus=1).materialize()`` (``concurrency=P`` in the pipeline's spelling; P actors, each loads the tokenizer once);
* datasets: ``Dataset.from_list(rows).map(TokenizeRows(...), batched=True,
  num_proc=P, keep_in_memory=True)`` (a pool of P processes).

Timed from the call to the materialized result.  Building the in-memory
datasets and ``ray.init`` are outside the timer (``ray.init`` is recorded on its
own).  Two figures per library:

* **end to end**: the whole call, worker start included (Ray actors start and
  load the tokenizer; datasets forks its pool and unpickles the function);
* **steady state**: worker start excluded, estimated as
  ``(rows_full − rows_small) / (t_full − t_small)`` where the small run is one
  batch per worker through the same call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import load_average

TOKENIZER = "tiny"
MAX_LENGTH = 512
BATCH = 256


def _corpus(n_rows: int, seed: int) -> list[dict[str, Any]]:
    from ift.toydata import make_conversations

    return [
        {"source": "bench", "row": i, "payload": json.dumps(r)} for i, r in enumerate(make_conversations(n_rows, seed))
    ]


def init_ray() -> float:
    """``pipelines.orchestration.train.init_ray`` (the pipeline's own start-up), timed; 0 if Ray is already up."""
    import ray

    from pipelines.orchestration.train import init_ray as pipeline_init_ray

    if ray.is_initialized():
        return 0.0
    t = time.perf_counter()
    pipeline_init_ray(log_to_driver=False)
    return time.perf_counter() - t


def _ray_once(items: list[dict[str, Any]], procs: int) -> tuple[float, int, int, int]:
    import ray

    from pipelines.data.tokenize import TokenizeRows

    ds = ray.data.from_items(items, override_num_blocks=max(4 * procs, len(items) // (8 * BATCH) or 1))
    ds.context.enable_progress_bars = False
    t = time.perf_counter()
    out = ds.map_batches(
        TokenizeRows,
        fn_constructor_args=(TOKENIZER, "sft", MAX_LENGTH, "truncate_left", False),
        batch_size=BATCH,
        compute=ray.data.ActorPoolStrategy(size=procs),
        num_cpus=1,
        batch_format="numpy",
    ).materialize()
    dt = time.perf_counter() - t
    meta = out.select_columns(["num_tokens", "error"]).to_pandas()
    return dt, len(meta), int(meta["num_tokens"].sum()), int((meta["error"] != "").sum())


def _hf_once(items: list[dict[str, Any]], procs: int) -> tuple[float, int, int, int]:
    import datasets

    from pipelines.data.tokenize import TokenizeRows

    hf = datasets.Dataset.from_list(items)
    t = time.perf_counter()
    fn = TokenizeRows(TOKENIZER, "sft", MAX_LENGTH, "truncate_left", False)  # Ray's actors do this in the timer too
    out = hf.map(
        fn,
        batched=True,
        batch_size=BATCH,
        num_proc=procs if procs > 1 else None,
        keep_in_memory=True,
        remove_columns=["payload"],
        load_from_cache_file=False,
    )
    dt = time.perf_counter() - t
    tokens = sum(int(n) for n in out["num_tokens"])
    errors = sum(1 for e in out["error"] if e)
    return dt, len(out), tokens, errors


def run(
    n_rows: int = 50_000, procs: tuple[int, ...] = (2,), seed: int = 7, log: Callable[[str], None] = print
) -> dict[str, Any]:
    import datasets

    datasets.disable_progress_bars()
    load_before = load_average()
    t = time.perf_counter()
    items = _corpus(n_rows, seed)
    log(f"[data] corpus: {n_rows} conversations generated in {time.perf_counter() - t:.1f}s")
    ray_init_s = init_ray()
    small_n = BATCH  # per worker
    results: dict[str, Any] = {}
    for p in procs:
        small = items[: small_n * p]
        entry: dict[str, Any] = {}
        for lib, fn in (("ray_data", _ray_once), ("datasets", _hf_once)):
            ts, ns, _, _ = fn(small, p)
            tf, nf, tokens, errors = fn(items, p)
            steady = (nf - ns) / (tf - ts) if tf > ts else None
            entry[lib] = {
                "seconds": tf,
                "rows": nf,
                "tokens": tokens,
                "bad_rows": errors,
                "rows_per_s": nf / tf,
                "tokens_per_s": tokens / tf,
                "small_run_rows": ns,
                "small_run_seconds": ts,
                "steady_rows_per_s": steady,
                "steady_tokens_per_s": steady * tokens / nf if steady else None,
            }
            log(
                f"[data] P={p} {lib:8s}: {nf / tf:8.0f} rows/s end to end, "
                f"{(steady or float('nan')):8.0f} rows/s steady, {tokens / tf:9.0f} tokens/s ({tf:.1f}s)"
            )
        entry["tokens_match"] = entry["ray_data"]["tokens"] == entry["datasets"]["tokens"]
        entry["ray_over_datasets_rows_per_s"] = entry["ray_data"]["rows_per_s"] / entry["datasets"]["rows_per_s"]
        rs, ds_ = entry["ray_data"]["steady_rows_per_s"], entry["datasets"]["steady_rows_per_s"]
        entry["ray_over_datasets_steady"] = rs / ds_ if rs and ds_ else None
        results[str(p)] = entry
    return {
        "rows": n_rows,
        "tokenizer": TOKENIZER,
        "max_length": MAX_LENGTH,
        "batch_size": BATCH,
        "ray_init_s": ray_init_s,
        "method": "same in-memory corpus and the same TokenizeRows work on both sides; end to end includes worker "
        "start; steady = (rows_full - rows_small)/(t_full - t_small) with one batch per worker in the "
        "small run; ray.init and building the in-memory datasets are excluded",
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "procs": results,
    }


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--procs", default="2")
    args = p.parse_args(argv)
    print(json.dumps(run(args.rows, tuple(int(x) for x in args.procs.split(","))), indent=1))


if __name__ == "__main__":
    main()
