"""ZeRO-3 at the paper's scale, on real 2-process gloo groups: the model is built straight into
partitions, DPO's reference is partitioned too, and the export gathers one module at a time.

Each test spawns two ranks that run one scenario and write what they saw to ``out/rank<r>.pt``;
the test compares it with the same work done whole (ZeRO-0) in this process.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ift.collate import pad_collate
from ift.data import tokenize_rows
from ift.objectives import dpo_batch_loss
from ift.toydata import make_preference_pairs
from pipelines.config_loading import load_config
from pipelines.training.build import build_engine, build_model_and_tokenizer, partitioned_reference
from pipelines.training.export import export_hf_model
from pipelines.training.loop import precompute_reference_table
from pipelines.training.methods import DPOObjective, build_objective

pytestmark = pytest.mark.slow  # real 2-process groups

CPU = torch.device("cpu")
BIG = ["model.name=tiny-100m", "deepspeed.precision=bf16", "model.dtype=auto"]  # 100M parameters, bf16
DPO = ["method.name=dpo", "data.max_length=96", "optimization.micro_batch_size=2"]
SHARD_BYTES = 64 * 1024**2  # the 200 MB bf16 model in 4 shards, so the index is exercised too
# Uneven shares: rank 0 reads 3 micro-batches of pairs, rank 1 reads 2 (a short stream).
SHARES = {0: [0, 1, 2], 1: [3, 4]}


def _cfg(stage: int, *overrides: str):
    return load_config(None, [f"deepspeed.zero_stage={stage}", *overrides])


def _pair_batches(tokenizer) -> list[dict]:
    examples, _ = tokenize_rows(
        tokenizer, make_preference_pairs(10, seed=2), source="p", max_length=96, mode="preference"
    )
    batches = []
    for i in range(0, 10, 2):
        batch = pad_collate(examples[i : i + 2], tokenizer.pad_token_id)
        batch["source"], batch["row"] = ["p"] * 2, torch.arange(i, i + 2)
        batches.append(batch)
    return batches


def _build_and_export(rank: int, out: Path) -> dict:
    cfg = _cfg(3, *BIG)
    model, tokenizer = build_model_and_tokenizer(cfg)
    params = list(model.parameters())
    seen = {
        "held": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
        "full": sum(int(getattr(p, "ds_numel", p.numel())) for p in params),
        "local_data": sum(p.numel() for p in params),  # what a plain tensor op sees: nothing whole
        "dtypes": {str(p.dtype) for p in params},
    }
    export_hf_model(model, tokenizer, out / "zero3", rank, max_shard_bytes=SHARD_BYTES)
    return seen


class _Counting(DPOObjective):
    """Records the rows it scores, in order."""

    def reference_rows(self, batch):
        self.__dict__.setdefault("scored", []).extend(batch["row"].tolist())
        return super().reference_rows(batch)


def _dpo(rank: int, out: Path) -> dict:
    cfg = _cfg(3, *DPO)
    model, tokenizer = build_model_and_tokenizer(cfg)
    reference = partitioned_reference(cfg, tokenizer, use_gpu=False)
    ref_params = list(reference.module.parameters())
    engine = build_engine(cfg, model, total_steps=10, use_gpu=False)
    objective = build_objective(cfg.method, engine.module, CPU, seed=0, rank=rank, reference=reference)
    batches = _pair_batches(tokenizer)
    loss = objective(engine, batches[rank], 0).loss  # each rank its own pairs, in step
    counting = _Counting(cfg.method, model, CPU, seed=0, rank=rank, reference=reference)
    table = precompute_reference_table(counting, [batches[i] for i in SHARES[rank]], CPU)
    return {
        "reference_held": sum(p.ds_tensor.numel() for p in ref_params),
        "reference_full": sum(p.ds_numel for p in ref_params),
        "loss": float(loss),
        "scored": counting.scored,
        "table": table,
        "released": counting.reference is None,
    }


SCENARIOS = {"build_and_export": _build_and_export, "dpo": _dpo}


def _rank_main(rank: int, world: int, port: int, scenario: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    seen = SCENARIOS[scenario](rank, Path(out))
    torch.save(seen, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as in test_loop: skip a teardown that can abort on a joinable gloo thread


def run_ranks(scenario: str, out: Path, world: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(world, port, scenario, str(out)), nprocs=world, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    return out, run_ranks("build_and_export", out)


def test_under_zero3_each_rank_builds_only_its_half_of_the_parameters(built):
    _, ranks = built
    full = ranks[0]["full"]
    assert full > 100_000_000
    for seen in ranks:
        # DeepSpeed pads each partition to a multiple of the world size: half, within a few elements.
        assert seen["held"] == pytest.approx(full / 2, rel=1e-4)
        assert seen["local_data"] == 0  # no rank ever held a parameter whole after construction
    assert ranks[0]["held"] + ranks[1]["held"] >= full


def test_model_dtype_auto_builds_bf16_parameters_when_deepspeed_trains_in_bf16(built):
    _, ranks = built
    assert all(seen["dtypes"] == {"torch.bfloat16"} for seen in ranks)


def test_the_zero3_export_equals_the_zero0_export_bit_for_bit(built):
    out, _ = built
    cfg = _cfg(0, *BIG)
    model, tokenizer = build_model_and_tokenizer(cfg)
    export_hf_model(model, tokenizer, out / "zero0", rank=0, max_shard_bytes=SHARD_BYTES)
    z0, z3 = out / "zero0", out / "zero3"
    names = sorted(p.name for p in z0.iterdir())
    assert names == sorted(p.name for p in z3.iterdir())
    assert "model.safetensors.index.json" in names and "model-00004-of-00004.safetensors" in names
    for name in names:
        assert (z0 / name).read_bytes() == (z3 / name).read_bytes(), name


def test_the_sharded_export_loads_back_as_the_trained_model(built):
    from transformers import AutoModelForCausalLM

    out, _ = built
    model, _ = build_model_and_tokenizer(_cfg(0, *BIG))
    loaded = AutoModelForCausalLM.from_pretrained(out / "zero3", use_safetensors=True)
    assert loaded.dtype == torch.bfloat16
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.fixture(scope="module")
def dpo_ranks(tmp_path_factory):
    return run_ranks("dpo", tmp_path_factory.mktemp("dpo"))


def test_under_zero3_the_dpo_reference_is_partitioned_too(dpo_ranks):
    for seen in dpo_ranks:
        assert seen["reference_held"] == pytest.approx(seen["reference_full"] / 2, rel=1e-3)


def test_the_partitioned_reference_gives_the_losses_of_a_whole_reference_copy(dpo_ranks):
    cfg = _cfg(0, *DPO)
    model, tokenizer = build_model_and_tokenizer(cfg)
    batches = _pair_batches(tokenizer)
    objective = build_objective(cfg.method, model, CPU, seed=0)  # ZeRO-0: a copy of the start policy
    for rank, seen in enumerate(dpo_ranks):
        expected = dpo_batch_loss(model, batches[rank], beta=0.1, reference_model=objective.reference).loss
        assert seen["loss"] == pytest.approx(float(expected), abs=1e-6)


def test_precomputing_the_reference_scores_each_pair_once_and_every_rank_gets_the_whole_table(dpo_ranks):
    cfg = _cfg(0, *DPO)
    model, tokenizer = build_model_and_tokenizer(cfg)
    expected = build_objective(cfg.method, model, CPU, seed=0).precompute_reference(_pair_batches(tokenizer))
    # Each rank scored its own share; rank 1's shorter share replayed its last micro-batch (rows 8, 9)
    # once, in step with rank 0's third, and that result was dropped.  No pair was scored by both.
    assert dpo_ranks[0]["scored"] == [0, 1, 2, 3, 4, 5]
    assert dpo_ranks[1]["scored"] == [6, 7, 8, 9, 8, 9]
    for seen in dpo_ranks:
        assert seen["table"].keys() == expected.keys() and len(expected) == 10
        for key, (chosen, rejected) in expected.items():
            assert seen["table"][key] == pytest.approx((chosen, rejected), abs=1e-4)
        assert seen["released"]
