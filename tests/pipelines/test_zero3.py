"""ZeRO-3 at the paper's scale, on real 2-process gloo groups: the model is built straight into
partitions, DPO's reference is partitioned too, the export gathers one module at a time, and each
method's passes over a micro-batch run in one engine forward, so ZeRO-3's trace holds and prefetches.

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
from safetensors import safe_open

from benchmarks.zero3_passes import coordinator_of, count_trace, counts_of
from ift.collate import pad_collate
from ift.data import tokenize_rows
from ift.objectives import dpo_batch_loss
from ift.toydata import make_conversations, make_preference_pairs
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


def _pair_batches(tokenizer, pairs: int = 10) -> list[dict]:
    examples, _ = tokenize_rows(
        tokenizer, make_preference_pairs(pairs, seed=2), source="p", max_length=96, mode="preference"
    )
    batches = []
    for i in range(0, pairs, 2):
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

    def reference_rows(self, batch, engine=None):
        self.__dict__.setdefault("scored", []).extend(batch["row"].tolist())
        return super().reference_rows(batch, engine)


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


# Each method (and LoRA-IFT) trained 3 steps under ZeRO-3, with gradient checkpointing off and on.
PASS_METHODS = {
    "ift": ["method.name=ift"],
    "sft": ["method.name=sft"],
    "dpo": ["method.name=dpo"],  # its partitioned reference engine runs inside the policy's forward
    "lora_ift": ["method.name=ift", "model.lora={r: 8}"],
}
PASS_STEPS = 3


def _passes_batches(tokenizer, paired: bool) -> list[dict]:
    if paired:
        return _pair_batches(tokenizer, 4 * PASS_STEPS)
    examples, _ = tokenize_rows(tokenizer, make_conversations(4 * PASS_STEPS, seed=4), source="c", max_length=64)
    return [pad_collate(examples[i : i + 2], tokenizer.pad_token_id) for i in range(0, 4 * PASS_STEPS, 2)]


def _train_steps(rank: int, overrides: list[str], *, two_calls: bool = False, export_to: Path | None = None) -> dict:
    """PASS_STEPS steps of one method on rank-specific micro-batches: the loss and the whole (reduced)
    gradients of each step, and what DeepSpeed's coordinator counted during it.  ``two_calls``: each
    pass its own engine call (``Objective.compute(engine, ...)``), the layout before ``ift.forward``.
    ``export_to``: then export the engine's module as the recipe does, and record the file's keys."""
    from deepspeed.utils import safe_get_full_grad

    cfg = _cfg(3, "optimization.micro_batch_size=2", "data.max_length=96", "optimization.lr=1e-3", *overrides)
    torch.manual_seed(cfg.optimization.seed)  # as the recipe does: LoRA's A matrices draw from it
    model, tokenizer = build_model_and_tokenizer(cfg)
    reference = partitioned_reference(cfg, tokenizer, use_gpu=False)
    objective = build_objective(cfg.method, model, CPU, seed=0, rank=rank, reference=reference)
    engine = build_engine(cfg, model, total_steps=10, use_gpu=False)
    batches = _passes_batches(tokenizer, cfg.method.paired)
    seen: dict = {"loss": [], "grads": [], "counts": [], "reference_counts": []}
    # LoRA's frozen base weights inside the decoder layers (what checkpointing recomputes)
    seen["frozen_layer_numel"] = sum(
        int(getattr(p, "ds_numel", p.numel())) for n, p in engine.module.named_parameters() if ".base_layer." in n
    )
    for step in range(PASS_STEPS):
        before, ref_before = counts_of(engine), counts_of(reference) if reference else None
        batch = batches[2 * step + rank]
        out = objective.compute(engine, batch, step) if two_calls else objective(engine, batch, step)
        engine.backward(out.loss)
        params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        seen["grads"].append({n: safe_get_full_grad(p).detach().clone() for n, p in params})  # a collective
        engine.step()
        seen["loss"].append(float(out.loss.detach()))
        seen["counts"].append(dict(counts_of(engine) - before))
        if reference:
            seen["reference_counts"].append(dict(counts_of(reference) - ref_before))
    seen["trace_complete"] = coordinator_of(engine) is not None and coordinator_of(engine).is_complete_trace()
    if export_to is not None:
        export_hf_model(engine.module, tokenizer, export_to, rank)  # the wrapper, as the recipe passes it
        if rank == 0:
            with safe_open(str(export_to / "model.safetensors"), "pt") as f:
                seen["exported_keys"] = sorted(f.keys())
    return seen


def _passes(rank: int, out: Path) -> dict:
    seen = {}
    with count_trace():
        for name, overrides in PASS_METHODS.items():
            for checkpointing in (False, True):
                cfg = [*overrides, f"model.gradient_checkpointing={checkpointing}"]
                export_to = out / f"export_{name}" if name in ("ift", "lora_ift") and not checkpointing else None
                seen[name, checkpointing] = _train_steps(rank, cfg, export_to=export_to)
        seen["two_calls"] = _train_steps(rank, PASS_METHODS["ift"], two_calls=True)
    return seen


def _tiny(rank: int, out: Path) -> dict:
    """The scenarios on ``tiny``, in one 2-process run (a run's start costs more than its work)."""
    return {"dpo": _dpo(rank, out), "passes": _passes(rank, out)}


SCENARIOS = {"build_and_export": _build_and_export, "tiny": _tiny}


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
def tiny_ranks(tmp_path_factory):
    return run_ranks("tiny", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def dpo_ranks(tiny_ranks):
    return [seen["dpo"] for seen in tiny_ranks]


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


# --------------------------------------------------------------------------- one engine forward per micro-batch


@pytest.fixture(scope="module")
def passes(tiny_ranks):
    """Every method's 3 steps under ZeRO-3, checkpointing off and on, in one 2-process run (rank 0's view;
    both ranks take part in every collective, so their counts agree)."""
    return tiny_ranks[0]["passes"]


def _zero(counts: dict, key: str) -> int:
    return counts.get(key, 0)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("method", list(PASS_METHODS))
def test_after_the_first_step_zero3s_trace_holds_and_every_parameter_is_prefetched(passes, method, checkpointing):
    seen = passes[method, checkpointing]
    # With LoRA, DeepSpeed (0.19) hands the frozen base weights a layer's recomputation gathers to the
    # layer's backward, which frees them; the next use gathers them again, synchronously.  SFT-LoRA
    # does the same: it is not a matter of passes.  Everything else is prefetched.
    refetched = seen["frozen_layer_numel"] if checkpointing else 0
    # Step 1 records the trace (nothing to prefetch by yet); the reset that opens step 2 completes it.
    for counts in seen["counts"][1:]:
        assert _zero(counts, "root_forwards") == 1  # all of a micro-batch's passes: one engine forward
        assert _zero(counts, "invalidations") == 0
        assert _zero(counts, "sync_numel") == refetched, counts  # every other parameter gathered ahead
    assert _zero(seen["counts"][2], "incomplete_resets") == 0
    assert seen["trace_complete"]
    for counts in seen["reference_counts"][1:]:  # DPO's partitioned reference, a forward-only engine
        assert _zero(counts, "invalidations") == 0 and _zero(counts, "sync_fetches") == 0


def test_two_engine_calls_per_micro_batch_are_what_broke_the_trace(passes):
    """The counter sees the failure the single forward removes: IFT's passes as two engine calls."""
    seen = passes["two_calls"]
    for counts in seen["counts"][1:]:
        assert _zero(counts, "root_forwards") == 2
        assert _zero(counts, "invalidations") >= 1
        assert _zero(counts, "sync_fetches") > 0
    assert not seen["trace_complete"]


@pytest.mark.parametrize("method", ["ift", "lora_ift"])
def test_the_engines_model_is_exported_under_the_hugging_face_models_own_keys(passes, method):
    model, _ = build_model_and_tokenizer(_cfg(0))
    # No ``model.`` of the wrapper; a LoRA model merged into its base keys.
    assert passes[method, False]["exported_keys"] == sorted(model.state_dict())


def _assert_same_steps(seen: dict, expected: dict, *, atol: float) -> None:
    assert seen["loss"] == pytest.approx(expected["loss"], rel=0, abs=atol)
    for step, (grads, want) in enumerate(zip(seen["grads"], expected["grads"], strict=True)):
        assert grads.keys() == want.keys() and grads
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want[name], rtol=0, atol=atol, msg=f"step {step + 1}: {name}")


def test_ifts_passes_in_one_engine_forward_give_the_losses_and_gradients_of_two_engine_calls(passes):
    _assert_same_steps(passes["ift", False], passes["two_calls"], atol=1e-6)


@pytest.mark.parametrize("method", list(PASS_METHODS))
def test_gradient_checkpointing_gives_the_losses_and_gradients_of_a_plain_run_under_zero3(passes, method):
    # Non-reentrant checkpointing recomputes each layer's forward with the same float32 ops on the same
    # inputs (dropout draws replayed from the saved RNG state), so losses and gradients agree to float32
    # rounding: the backward may add a parameter's partial gradients in another order (a few ulps of
    # values below 1, ~1e-7).  1e-6 leaves room for that and catches any real difference (a dropped
    # gradient, a recomputation with other inputs), which moves them by far more.
    _assert_same_steps(passes[method, True], passes[method, False], atol=1e-6)
