"""`ift train` end to end: Ray Data -> Ray Train (2 CPU workers, gloo) + DeepSpeed -> MLflow.

These are the slow tests (a few minutes together).  One in-process Ray cluster
serves the module; every run uses its own storage and MLflow store under tmp_path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import ray
import torch
from safetensors.torch import load_file

import pipelines
from ift.data import DataError
from pipelines.config import METHOD_CONFIGS
from pipelines.config_loading import load_config
from pipelines.orchestration.hooks import KillWorker, TraceBatches
from pipelines.orchestration.train import train
from pipelines.tracking.runs import load_model_components

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def config(tmp_path: Path, corpora: Path, *overrides: str, pairs: bool = False):
    # Runs that test something other than evaluation pass data.validation=[]: the end-of-run validation
    # starts its own Ray Data pipeline, seconds on this machine.
    # DPO's margin needs pairs seen several times to fall within 16 steps.
    train = f"{{path: {corpora / 'pref.jsonl'}, weight: 8}}" if pairs else f"{{path: {corpora / 'chat.jsonl'}}}"
    base = [
        f"run_name=t-{tmp_path.name}",
        f"data.train=[{train}]",
        f"data.validation=[{{path: {corpora / ('pref.jsonl' if pairs else 'chat_val.jsonl')}}}]",
        "data.max_length=128",
        "optimization.micro_batch_size=4",
        "optimization.epochs=1",
        "optimization.lr=3e-3",
        "optimization.warmup_ratio=0",
        "optimization.schedule=constant",
        "optimization.log_every_n_steps=1",
        "optimization.eval_every_n_steps=0",
        "checkpointing.every_n_steps=4",
        f"checkpointing.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "mlflow.experiment=test",
        "mlflow.registered_model_name=tiny-test",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=1",
        "deepspeed.zero_stage=0",
    ]
    return load_config(None, base + list(overrides))


def loss_history(cfg, run_id: str) -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))


def final_weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.hf_model_path) / "model.safetensors"))


# ZeRO stages are spread over the method runs so all of 0, 2 and 3 train a real method.
METHOD_RUNS = {"ift": 2, "sft": 0, "dpo": 3, "orpo": 2}


@pytest.mark.parametrize("method", list(METHOD_RUNS))
def test_each_method_trains_with_two_workers_and_the_loss_falls(tmp_path, corpora, method):
    cfg = config(
        tmp_path,
        corpora,
        f"method.name={method}",
        f"deepspeed.zero_stage={METHOD_RUNS[method]}",
        pairs=method in ("dpo", "orpo"),
    )
    result = train(cfg, show_progress=False)
    history = loss_history(cfg, result.mlflow_run_id)
    assert [s for s, _ in history] == list(range(1, 17))  # 128 rows / (4 x 2 workers)
    first, last = sum(v for _, v in history[:3]) / 3, sum(v for _, v in history[-3:]) / 3
    assert last < 0.8 * first, f"{method}: loss {first:.3f} -> {last:.3f}"
    assert result.registered_version == "1"
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    tags = client.get_model_version("tiny-test", "1").tags
    assert tags["method"] == method and tags["data_fingerprint"]
    assert "loss_curve.png" in [a.path for a in client.list_artifacts(result.mlflow_run_id)]
    # The registered model loads back offline, as users browse and use it.
    components = load_model_components("models:/tiny-test/1", cfg.mlflow.tracking_uri)
    ids = components["tokenizer"]("hello", return_tensors="pt").input_ids
    assert components["model"](ids).logits.shape[-1] == len(components["tokenizer"])


BUNDLED_DATA = Path(pipelines.__file__).parent / "demo_data"


# One method per packed layout: IFT packs single sequences (as SFT does), DPO packs pairs side by side (as
# ORPO does).  Every method's packed loss and gradients equal its padded ones in float64 (tests/ift/test_packing.py).
@pytest.mark.parametrize("method", ["ift", "dpo"])
def test_packed_training_with_two_workers_has_almost_no_padding(tmp_path, corpora, method):
    pairs = METHOD_CONFIGS[method].paired
    source = BUNDLED_DATA / ("demo_pref.jsonl" if pairs else "demo_chat.jsonl")
    cfg = config(
        tmp_path, corpora, f"method.name={method}", f"deepspeed.zero_stage={METHOD_RUNS[method]}",
        f"data.train=[{{path: {source}, max_rows: 160}}]", "data.validation=[]", "data.packing=true",
        "optimization.micro_batch_size=2", pairs=pairs,
    )  # fmt: skip
    result = train(cfg, show_progress=False)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    metrics = client.get_run(result.mlflow_run_id).data.metrics
    history = loss_history(cfg, result.mlflow_run_id)
    print(f"{method} packed: {len(history)} steps, loss {history[0][1]:.3f} -> {history[-1][1]:.3f}, {metrics}")
    # Two packed rows of at most 128 tokens (256 for a pair) per micro-batch, padded to the longer.
    assert 0 < metrics["data/padding_fraction"] < 0.05
    assert 0 < metrics["tokens_per_step_rank_min"] <= metrics["tokens_per_step_rank_max"] <= 2 * 256
    assert len(history) >= 5 and all(math.isfinite(v) for _, v in history)
    assert result.registered_version == "1"


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory, corpora):
    """Same seed and data stream, 2 workers: ZeRO-0 and ZeRO-3.  (2 workers = 1 worker with 2 accumulation
    steps, given the same rows per step, is pinned on real process groups in tests/pipelines/test_loop.py.)"""
    # 32 rows seen again and again, as in a real run's later epochs: with fresh rows at every step, Adam
    # turns the reduction-order noise of rarely seen embedding rows into differences above the tolerance.
    common = (
        "optimization.max_steps=6", "mlflow.enabled=false", "data.shuffle_buffer_size=0", "data.validation=[]",
        f"data.train=[{{path: {corpora / 'chat32.jsonl'}, weight: 4}}]",
    )  # fmt: skip
    variants = {
        "dp_zero0": ("scaling.num_workers=2", "deepspeed.zero_stage=0"),
        "dp_zero3": ("scaling.num_workers=2", "deepspeed.zero_stage=3"),
    }
    out = {}
    for name, extra in variants.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = final_weights(train(config(d, corpora, *common, *extra), show_progress=False))
    return out


def assert_same_weights(a: dict, b: dict) -> None:
    # ZeRO-3 reduces gradients in another order than ZeRO-0 (fp32 rounding, ~1e-7); Adam turns that into
    # up to ~4e-5 on embedding rows whose gradients are tiny.  A wrong row or a wrong gradient moves weights
    # by lr-sized steps (3e-3 here), far above 1e-4.
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4, msg=name)


def test_zero3_and_zero0_end_with_the_same_weights(equivalence_runs):
    assert_same_weights(equivalence_runs["dp_zero0"], equivalence_runs["dp_zero3"])


def test_training_changed_the_weights_so_the_equivalences_are_not_vacuous(equivalence_runs):
    from ift.models import load_model

    init = load_model("tiny", seed=42).state_dict()
    trained = equivalence_runs["dp_zero0"]
    assert any(not torch.allclose(init[k], trained[k]) for k in trained)


# Packed: one row of 128 tokens per micro-batch, about 3 rows of chat.jsonl, so about 21 steps per epoch.
PACKED = ("data.packing=true", "optimization.micro_batch_size=1")


LORA_RUNS = {"zero2": (2, (), False), "zero3-packed-killed": (3, PACKED, True)}


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, corpora):
    """Two LoRA IFT runs of 16 steps: ZeRO-2 padded, and ZeRO-3 packed with rank 1 killed after step 6
    (the packed resume test).  Each value: (config, result, marker of the injected fault)."""
    out = {}
    for name, (zero, layout, killed) in LORA_RUNS.items():
        tmp_path = tmp_path_factory.mktemp(f"lora-{name}")
        marker = tmp_path / "failed-once"
        cfg = config(
            tmp_path, corpora, f"deepspeed.zero_stage={zero}", "model.lora={r: 8, alpha: 16, dropout: 0.0}",
            "optimization.lr=1e-2", "optimization.max_steps=16", "data.validation=[]", *layout,
        )  # fmt: skip
        hooks = KillWorker(step=6, rank=1, marker=str(marker)) if killed else None
        out[name] = (cfg, train(cfg, show_progress=False, hooks=hooks), marker)
    return out


@pytest.mark.parametrize("name", LORA_RUNS)
def test_lora_trains_only_the_adapters_and_its_loss_falls(lora_runs, name):
    cfg, result, _ = lora_runs[name]
    run = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run(result.mlflow_run_id)
    trainable, total = (int(run.data.params[f"model.{k}_parameters"]) for k in ("trainable", "total"))
    assert 0 < trainable < total
    history = loss_history(cfg, result.mlflow_run_id)
    assert sorted({s for s, _ in history}) == list(range(1, 17))
    # The adapters learn slowly on a random-init model whose embeddings and head stay frozen
    # (7.50 -> 7.25 nats in 16 steps, measured): falling is the point, not how far.
    first, last = sum(v for _, v in history[:3]) / 3, sum(v for _, v in history[-3:]) / 3
    assert last < first - 0.1, f"LoRA {name}: loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("name", LORA_RUNS)
def test_lora_registers_the_merged_model_and_keeps_its_adapters_as_an_artifact(lora_runs, name):
    cfg, result, _ = lora_runs[name]
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    assert "lora_adapter" in [a.path for a in client.list_artifacts(result.mlflow_run_id)]
    components = load_model_components(f"models:/tiny-test/{result.registered_version}", cfg.mlflow.tracking_uri)
    assert not any("lora" in n for n, _ in components["model"].named_parameters())


def test_a_packed_run_killed_after_step_6_resumes_from_step_4_at_the_same_row(lora_runs):
    cfg, result, marker = lora_runs["zero3-packed-killed"]
    assert marker.exists(), "the fault was not injected"
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    assert [m.value for m in client.get_metric_history(result.mlflow_run_id, "resumed_from_step")] == [4.0]
    by_step: dict[int, list[float]] = {}
    for s, v in loss_history(cfg, result.mlflow_run_id):
        by_step.setdefault(s, []).append(v)
    assert len(by_step[5]) == 2 and by_step[5][0] == pytest.approx(by_step[5][1], rel=1e-4)


def test_the_unkilled_lora_run_was_not_resumed(lora_runs):
    cfg, result, marker = lora_runs["zero2"]
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    assert not marker.exists() and client.get_metric_history(result.mlflow_run_id, "resumed_from_step") == []


def test_rerunning_the_same_command_resumes_instead_of_restarting(tmp_path, corpora):
    marker = tmp_path / "failed-once"
    overrides = ("optimization.max_steps=8", "checkpointing.max_failures=0", "data.validation=[]")
    with pytest.raises(ray.train.WorkerGroupError) as err:
        train(
            config(tmp_path, corpora, *overrides),
            show_progress=False,
            hooks=KillWorker(step=6, rank=0, marker=str(marker)),
        )
    # It failed because the killed rank-0 process died (max_failures=0), not for any other reason.
    assert marker.exists(), "the fault was not injected"
    assert "The actor died unexpectedly" in str(err.value.worker_failures[0])
    # The same command, but for how often it logs: that is no training setting, so the run resumes.
    cfg = config(tmp_path, corpora, *overrides, "optimization.log_every_n_steps=2")
    result = train(cfg, show_progress=False)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    assert [m.value for m in client.get_metric_history(result.mlflow_run_id, "resumed_from_step")] == [4.0]
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_evaluation_at_end_scores_the_final_model_and_logs_on_the_run(tmp_path):
    import pyarrow.fs

    from ift.models import load_model
    from ift.tokenization import load_tokenizer
    from pipelines.orchestration.storage import StoredCheckpoint
    from pipelines.orchestration.train import TrainResult, _evaluate_at_end
    from pipelines.tracking.runs import start_or_resume_run

    hf_dir = tmp_path / "hf_model"
    load_model("tiny", seed=0).save_pretrained(hf_dir, safe_serialization=True)
    load_tokenizer("tiny").save_pretrained(hf_dir)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        None, [f"mlflow.tracking_uri={store}", "eval.at_end=true", "eval.limit=4", "mlflow.registered_model_name="]
    )
    run_id, _ = start_or_resume_run(cfg, store)
    out = TrainResult(
        run_name=cfg.run_name,
        checkpoint_path=str(tmp_path),
        hf_model_path=str(hf_dir),
        metrics={},
        mlflow_run_id=run_id,
    )
    final = StoredCheckpoint.of(pyarrow.fs.LocalFileSystem(), str(tmp_path), str(tmp_path))
    scores = _evaluate_at_end(cfg, store, out, final)
    assert {"ift_arith/exact_match", "ift_capitals_mc/acc"} <= set(scores)
    logged = mlflow.MlflowClient(tracking_uri=store).get_run(run_id).data.metrics
    assert logged["eval/ift_arith/exact_match"] == scores["ift_arith/exact_match"]


# --------------------------------------------------------------------------- streaming: each rank its own rows


def traces(trace_dir: Path) -> dict[int, dict[tuple[int, int], list[tuple[str, int]]]]:
    """rank -> (epoch, micro-batch) -> row ids, from the trace_dir test hook (re-reads collapse)."""
    out: dict[int, dict] = {}
    for f in sorted(trace_dir.glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rank, {})[(rec["epoch"], rec["micro"])] = [tuple(r) for r in rec["rows"]]
    return out


STREAMED_ROWS = 32  # chat32.jsonl: which rows each rank reads needs an epoch, not a long one


def streamed_run(tmp_path: Path, corpora: Path, workers: int, *extra: str):
    trace = tmp_path / "trace"
    trace.mkdir()
    cfg = config(
        tmp_path, corpora, f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={1.5 / workers}",
        "optimization.epochs=1", "mlflow.enabled=false", "data.validation=[]",
        f"data.train=[{{path: {corpora / 'chat32.jsonl'}}}]", *extra,
    )  # fmt: skip
    train(cfg, show_progress=False, hooks=TraceBatches(str(trace)))
    return traces(trace)


@pytest.fixture(scope="module")
def two_worker_runs(tmp_path_factory, corpora):
    """The same command twice, each in its own Ray session."""
    first = streamed_run(tmp_path_factory.mktemp("stream_a"), corpora, 2)
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    second = streamed_run(tmp_path_factory.mktemp("stream_b"), corpora, 2)
    return first, second


def assert_each_rank_reads_its_own_rows(per_rank: dict, workers: int, rows: int, micro: int) -> None:
    read = {r: [row for batch in batches.values() for row in batch] for r, batches in per_rank.items()}
    assert sorted(read) == list(range(workers))
    for a in read:
        for b in read:
            if a < b:
                assert not set(read[a]) & set(read[b]), f"ranks {a} and {b} share rows"
    union = set().union(*map(set, read.values()))
    assert rows - len(union) < workers * micro  # all rows less the dropped remainder
    counts = [len(v) for v in read.values()]
    assert max(counts) - min(counts) <= micro


def test_with_two_workers_each_rank_reads_only_its_own_rows(two_worker_runs):
    assert_each_rank_reads_its_own_rows(two_worker_runs[0], workers=2, rows=STREAMED_ROWS, micro=4)


def test_two_runs_with_the_same_seed_train_on_the_same_rows_at_every_step(two_worker_runs):
    first, second = two_worker_runs
    assert first == second and len(first[0]) == STREAMED_ROWS // (4 * 2)


def test_with_three_workers_each_rank_reads_only_its_own_rows(tmp_path, corpora):
    per_rank = streamed_run(tmp_path, corpora, 3, "optimization.micro_batch_size=2")
    assert_each_rank_reads_its_own_rows(per_rank, workers=3, rows=STREAMED_ROWS, micro=2)


def test_a_bad_row_in_the_middle_of_the_stream_stops_the_run_naming_its_file_and_line(tmp_path, corpora):
    bad = tmp_path / "bad.jsonl"
    lines = (corpora / "chat.jsonl").read_text().splitlines()
    lines[20] = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}'
    bad.write_text("\n".join(lines) + "\n")
    cfg = config(tmp_path, corpora, f"data.train=[{{path: {bad}}}]", "data.shuffle_buffer_size=0", "data.validation=[]")
    with pytest.raises(DataError, match=rf"{bad} line 21: .*assistant.* is empty"):
        train(cfg, show_progress=False)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("test").experiment_id])[0]
    assert run.info.status == "FAILED" and "line 21" in run.data.tags["ift.failure_reason"]


def test_under_skip_the_run_counts_the_bad_rows_its_ranks_met(tmp_path, corpora):
    bad = tmp_path / "bad.jsonl"
    lines = (corpora / "chat.jsonl").read_text().splitlines()
    lines[3], lines[17] = "{broken", "[1, 2]"
    bad.write_text("\n".join(lines) + "\n")
    cfg = config(
        tmp_path, corpora, f"data.train=[{{path: {bad}}}]", "data.on_bad_row=skip", "optimization.epochs=1",
        "data.validation=[]",
    )  # fmt: skip
    result = train(cfg, show_progress=False)
    assert result.data_report["skipped"] == 2 and result.data_report["by_reason"] == {"invalid_json": 2}
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    metrics = client.get_run(result.mlflow_run_id).data.metrics
    assert metrics["data/bad_rows_skipped"] == 2
    assert metrics["data/rows_read_rank0"] + metrics["data/rows_read_rank1"] == 128
    assert 0 < metrics["data/padding_fraction"] < 1
    # 63 good rows per rank make 15 micro-batches of 4, one short of the 16 steps scheduled: the run
    # still ends with its final checkpoint, export and registration.
    assert max(s for s, _ in loss_history(cfg, result.mlflow_run_id)) == 15
    assert result.registered_version == "1"


def test_use_gpu_auto_counts_the_gpu_nodes_an_autoscaler_can_start():
    # A KubeRay or cloud cluster often has no GPU node up when the job starts: Ray's GCS holds the
    # autoscaler's node types (written here as the autoscaler writes them), and auto must see them.
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    from pipelines.orchestration.train import use_gpu_on_cluster

    cfg = load_config(None, ["scaling.use_gpu=auto", "scaling.gpus_per_worker=1"])
    said: list[str] = []
    assert use_gpu_on_cluster(cfg, log=said.append) is False  # this cluster: 2 CPUs, no autoscaler
    assert "trains on CPU" in said[-1]
    cluster = autoscaler_pb2.ClusterConfig()
    group = cluster.node_group_configs.add(name="gpu-workers", max_count=2)
    group.resources.update({"CPU": 16, "GPU": 8})
    key, namespace = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    internal_kv._internal_kv_put(key, cluster.SerializeToString(), namespace=namespace)
    try:
        assert use_gpu_on_cluster(cfg, log=said.append) is True
        assert "autoscaler can start nodes with 16 GPUs" in said[-1]
        assert use_gpu_on_cluster(load_config(None, ["scaling.gpus_per_worker=0"])) is False
    finally:
        internal_kv._internal_kv_del(key, namespace=namespace)
