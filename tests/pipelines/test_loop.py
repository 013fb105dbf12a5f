"""pipelines.training.loop, the training body shared by every method, driven without Ray
(as a GPU machine without Ray drives it): schedule, DeepSpeed config, resume."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import pipelines.training.state as state_module
from ift.collate import pack_collate, pad_collate
from ift.data import DataError, tokenize_rows
from ift.toydata import make_conversations
from pipelines.config_loading import load_config
from pipelines.training.build import build_engine, build_model_and_tokenizer, deepspeed_config, lr_lambda, model_dtype
from pipelines.training.estimate import checkpoint_size, model_shape
from pipelines.training.loop import StreamDataError, run_training
from pipelines.training.methods import build_objective
from pipelines.training.state import DS_TAG, LoopState, ResumeError, Schedule

DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE")


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group; the distributed env vars are restored afterwards, so a
    Ray cluster started later in this process does not inherit RANK/WORLD_SIZE."""
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def tiny_cfg(*overrides):
    return load_config(
        None,
        [
            "optimization.micro_batch_size=4",
            "data.max_length=96",
            "deepspeed.zero_stage=0",
            "optimization.lr=3e-3",
            *overrides,
        ],
    )


def test_schedule_drops_the_remainder_so_every_rank_runs_the_same_steps():
    s = Schedule.from_config(tiny_cfg("optimization.epochs=3", "optimization.gradient_accumulation_steps=2"), 50, 2)
    # 50 rows // (4 x 2 workers) = 6 micro-batches per worker, 3 optimizer steps per epoch.
    assert (s.micro_per_epoch, s.steps_per_epoch, s.total_steps) == (6, 3, 9)


def test_max_steps_caps_the_schedule():
    assert Schedule.from_config(tiny_cfg("optimization.max_steps=4", "optimization.epochs=9"), 100, 1).total_steps == 4


def test_too_little_data_for_one_step_says_so():
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        Schedule.from_config(tiny_cfg(), 5, 2)


def test_lr_warms_up_linearly_then_follows_cosine_to_zero():
    f = lr_lambda(tiny_cfg("optimization.warmup_ratio=0.1", "optimization.schedule=cosine"), 100)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_deepspeed_config_uses_bf16_on_gpu_only_and_merges_overrides():
    cfg = tiny_cfg("deepspeed.zero_stage=3", "deepspeed.overrides={zero_optimization: {reduce_bucket_size: 1000}}")
    cpu, gpu = deepspeed_config(cfg, use_gpu=False), deepspeed_config(cfg, use_gpu=True)
    assert not cpu["bf16"]["enabled"] and gpu["bf16"]["enabled"]
    assert cpu["zero_optimization"] == {
        "stage": 3,
        "reduce_bucket_size": 1000,
    }


def test_zero3_buckets_follow_the_models_hidden_size_unless_overridden():
    zero = deepspeed_config(tiny_cfg("deepspeed.zero_stage=3"), use_gpu=True, hidden_size=4096)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096**2 and zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096**2)
    assert zero["stage3_param_persistence_threshold"] == 40960
    mine = tiny_cfg("deepspeed.zero_stage=3", "deepspeed.overrides={zero_optimization: {reduce_bucket_size: 1000}}")
    assert deepspeed_config(mine, use_gpu=True, hidden_size=4096)["zero_optimization"]["reduce_bucket_size"] == 1000
    zero2 = deepspeed_config(tiny_cfg("deepspeed.zero_stage=2"), use_gpu=True, hidden_size=4096)["zero_optimization"]
    assert "reduce_bucket_size" not in zero2  # DeepSpeed's own defaults below ZeRO-3


def test_model_dtype_auto_loads_in_the_training_precision():
    assert model_dtype(tiny_cfg(), use_gpu=False) == "float32"  # precision auto: fp32 on CPU
    assert model_dtype(tiny_cfg(), use_gpu=True) == "bfloat16"  # ... bf16 on GPUs
    assert model_dtype(tiny_cfg("deepspeed.precision=fp32"), use_gpu=True) == "float32"
    assert model_dtype(tiny_cfg("model.dtype=float16"), use_gpu=True) == "float16"  # an explicit dtype wins


def test_bf16_training_accumulates_gradients_in_fp32(process_group):
    cfg = tiny_cfg("deepspeed.precision=bf16", "deepspeed.zero_stage=2", "optimization.gradient_accumulation_steps=4")
    model, _ = build_model_and_tokenizer(cfg)
    engine = build_engine(cfg, model, total_steps=2, use_gpu=False)
    assert engine.bfloat16_enabled()
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)  # (weights, gradient accumulation)


CHECKPOINT_LAYOUTS = {
    "fp32, ZeRO-0": ("deepspeed.precision=fp32", "deepspeed.zero_stage=0"),
    "bf16, ZeRO-2": ("deepspeed.precision=bf16", "deepspeed.zero_stage=2"),
    "bf16, ZeRO-2, LoRA": ("deepspeed.precision=bf16", "deepspeed.zero_stage=2", "model.lora={r: 8, alpha: 16}"),
}


@pytest.mark.parametrize("layout", CHECKPOINT_LAYOUTS)
def test_the_dry_runs_checkpoint_size_is_what_deepspeed_writes(layout, process_group, tmp_path):
    cfg = load_config(None, ["optimization.micro_batch_size=2", *CHECKPOINT_LAYOUTS[layout]])
    model, _ = build_model_and_tokenizer(cfg)
    engine = build_engine(cfg, model, total_steps=2, use_gpu=False)
    ids = torch.randint(0, 100, (2, 16))
    for _ in range(engine.gradient_accumulation_steps()):  # one optimizer step: Adam's moments exist from then on
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    engine.save_checkpoint(str(tmp_path), tag="t")
    written = sum(f.stat().st_size for f in tmp_path.rglob("*.pt"))
    estimate = checkpoint_size(cfg, model_shape(cfg), use_gpu=False).deepspeed_state
    # The files add pickling overhead per tensor (a few % on a model this small): a wrong byte count
    # per parameter (2 vs 4, 8 vs 12, frozen weights left out) is 15% or more.
    assert estimate <= written <= 1.1 * estimate, f"{layout}: wrote {written:,} bytes, estimated {estimate:,.0f}"


def test_fp32_training_sets_no_accumulation_dtype():
    assert "data_types" not in deepspeed_config(tiny_cfg("deepspeed.precision=fp32"), use_gpu=False)


def test_loop_state_is_written_atomically(tmp_path, monkeypatch):
    """A reader sees the whole old state or the whole new one: the new state is written to another
    file, then renamed over the old one (os.replace, atomic); the state file is never written into."""
    old, new = LoopState(step=3, epoch=1, micro_in_epoch=2), LoopState(step=4, epoch=1, micro_in_epoch=3)
    old.save(tmp_path)
    destination = tmp_path / "trainer_state.json"
    real_replace, renamed_onto = os.replace, []

    def replace_checking_both_files(src, dst):
        renamed_onto.append(Path(dst))
        assert Path(src) != Path(dst)
        assert LoopState.from_json(Path(dst).read_text()) == old  # up to the rename: the whole old state
        assert LoopState.from_json(Path(src).read_text()) == new  # ... and the whole new one beside it
        real_replace(src, dst)

    monkeypatch.setattr(state_module.os, "replace", replace_checking_both_files)
    new.save(tmp_path)
    assert renamed_onto == [destination]
    assert LoopState.load(tmp_path) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.json"]


def _batches(tokenizer, rows, micro):
    examples, _ = tokenize_rows(tokenizer, rows, source="t", max_length=96)
    return [pad_collate(examples[i : i + micro], tokenizer.pad_token_id) for i in range(0, len(examples), micro)]


def _train(cfg, batches, state, stop_at=None, ckpt=None, resume=None, schedule=None, steps=None):
    model, tokenizer = build_model_and_tokenizer(cfg)
    objective = build_objective(cfg.method, model, torch.device("cpu"), seed=cfg.optimization.seed)
    schedule = schedule or Schedule.from_config(cfg, len(batches) * cfg.optimization.micro_batch_size, 1)
    engine = build_engine(cfg, model, schedule.total_steps, use_gpu=False)
    if resume is not None:
        engine.load_checkpoint(resume, tag=DS_TAG, load_lr_scheduler_states=True)
        state = LoopState.load(resume)

    class Stop(Exception):
        pass

    def on_step(st, metrics, is_last):
        if steps is not None:
            steps.append((st.step, is_last))
        if stop_at is not None and st.step == stop_at:
            engine.save_checkpoint(ckpt, tag=DS_TAG)
            st.save(ckpt)
            raise Stop

    try:
        run_training(
            cfg,
            engine=engine,
            objective=objective,
            schedule=schedule,
            state=state,
            batches_for_epoch=lambda epoch: iter(batches),
            validation_batches=None,
            device=torch.device("cpu"),
            on_step=on_step,
        )
    except Stop:
        pass
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def test_resuming_mid_epoch_reaches_the_same_weights_as_an_uninterrupted_run(process_group, tmp_path):
    cfg = tiny_cfg("optimization.epochs=2")
    _, tokenizer = build_model_and_tokenizer(cfg)
    batches = _batches(tokenizer, make_conversations(20, seed=3), 4)  # 5 steps per epoch
    straight = _train(cfg, batches, LoopState())
    _train(cfg, batches, LoopState(), stop_at=7, ckpt=str(tmp_path))  # stops in epoch 2, micro-batch 2
    # tokens_seen counts every non-padding token trained on: all 5 batches of epoch 1, the first 2 of epoch 2.
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    assert LoopState.load(tmp_path) == LoopState(
        step=7, epoch=1, micro_in_epoch=2, tokens_seen=sum(tokens) + sum(tokens[:2])
    )
    resumed = _train(cfg, batches, LoopState(), resume=str(tmp_path))
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6, msg=k)


def test_when_the_stream_ends_before_the_schedule_the_last_step_taken_is_reported_as_the_last(process_group):
    cfg = tiny_cfg("optimization.epochs=1")
    _, tokenizer = build_model_and_tokenizer(cfg)
    batches = _batches(tokenizer, make_conversations(12, seed=3), 4)  # 3 micro-batches; 5 scheduled
    steps: list[tuple[int, bool]] = []
    _train(cfg, batches, LoopState(), schedule=Schedule(micro_per_epoch=5, steps_per_epoch=5, total_steps=5),
           steps=steps)  # fmt: skip
    # So the worker still writes the final checkpoint and exports the model.
    assert steps == [(1, False), (2, False), (3, False), (3, True)]


@pytest.mark.parametrize("method", ["ift", "sft"])
def test_packed_micro_batches_train_to_the_same_weights_as_padded_ones(process_group, method):
    cfg = tiny_cfg(f"method.name={method}", "optimization.epochs=1")
    _, tokenizer = build_model_and_tokenizer(cfg)
    examples, _ = tokenize_rows(tokenizer, make_conversations(8, seed=5), source="t", max_length=96)
    padded = [pad_collate(examples[i : i + 4], tokenizer.pad_token_id) for i in (0, 4)]
    packed = [pack_collate(examples[i : i + 4], tokenizer.pad_token_id, pack_length=4 * 96) for i in (0, 4)]
    assert all(b["input_ids"].shape[0] == 1 and "attention_mask" not in b for b in packed)  # one pack each
    a, b = _train(cfg, padded, LoopState()), _train(cfg, packed, LoopState())
    # Two AdamW steps at lr 3e-3 in float32: the same gradients up to rounding leave ~1e-5 apart
    # (Adam's first step moves every weight by about lr, whatever its gradient's size); a packing
    # leak (attention or IFT's scan across a boundary) moves them by ~lr.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=5e-5, msg=k)


# --------------------------------------------------------------------------- ranks in step (real 2-process groups)


def _rank_main(rank: int, world: int, port: int, overrides: list[str], plan: list[list[int]], out: str) -> None:
    """One rank of a gloo group: train on the micro-batches ``plan[rank]`` (indices into a fixed corpus)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = tiny_cfg(*overrides)
    model, tokenizer = build_model_and_tokenizer(cfg)
    corpus = _batches(tokenizer, make_conversations(32, seed=3), cfg.optimization.micro_batch_size)
    objective = build_objective(cfg.method, model, torch.device("cpu"), seed=cfg.optimization.seed, rank=rank)

    def mine():
        for i in plan[rank]:
            if i < 0:  # a bad row met by this rank's stream
                raise DataError("bad.jsonl", 5, "messages[1] (assistant) is empty", kind="empty_assistant", line=7)
            yield corpus[i]

    # Every rank plans the same steps (as the driver does), whatever its own stream holds.
    longest = max(len(p) for p in plan)
    schedule = Schedule.from_config(cfg, longest * cfg.optimization.micro_batch_size * world, world)
    engine = build_engine(cfg, model, schedule.total_steps, use_gpu=False)
    state, stopped = LoopState(), ""
    try:
        run_training(cfg, engine=engine, objective=objective, schedule=schedule, state=state,
                     batches_for_epoch=lambda epoch: mine(), validation_batches=None, device=torch.device("cpu"),
                     on_step=lambda *a: None)  # fmt: skip
    except StreamDataError as exc:
        stopped = f"rank {rank}: {exc}"
    stops = [""] * world
    dist.all_gather_object(stops, stopped)
    if rank == 0:
        torch.save({"weights": engine.module.state_dict(), "step": state.step, "stops": stops}, out)
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: under load, a gloo/DeepSpeed worker thread still joinable at
    # exit made one rank abort ("terminate called without an active exception") after its work was done.
    os._exit(0)


def _run_group(world: int, overrides: list[str], plan: list[list[int]], out) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(world, port, overrides, plan, str(out)), nprocs=world, start_method="spawn")
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_two_accumulation_steps_on_the_same_rows(tmp_path):
    # Step k: ranks 0 and 1 take micro-batches 2k and 2k+1; one rank accumulates the same two.
    common = ["optimization.epochs=1", "data.shuffle_buffer_size=0"]
    dp = _run_group(2, common, [[0, 2, 4, 6], [1, 3, 5, 7]], tmp_path / "dp.pt")
    ga = _run_group(1, [*common, "optimization.gradient_accumulation_steps=2"], [list(range(8))], tmp_path / "ga.pt")
    assert dp["step"] == ga["step"] == 4
    for k in dp["weights"]:
        torch.testing.assert_close(dp["weights"][k], ga["weights"][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_when_one_ranks_stream_ends_every_rank_ends_the_epoch_at_that_step(tmp_path):
    # Rank 1 has 2 micro-batches, rank 0 has 4: both stop after 2 (no rank waits in a collective).
    out = _run_group(
        2, ["optimization.epochs=1", "optimization.max_steps=4"], [[0, 1, 2, 3], [4, 5]], tmp_path / "w.pt"
    )
    assert out["step"] == 2 and out["stops"] == ["", ""]


@pytest.mark.slow
def test_a_bad_row_on_one_rank_stops_every_rank_with_that_row(tmp_path):
    out = _run_group(2, ["optimization.epochs=1"], [[0, 1, 2], [3, -1, 4]], tmp_path / "w.pt")
    assert out["step"] == 1
    assert out["stops"] == [f"rank {r}: bad.jsonl line 7: messages[1] (assistant) is empty" for r in (0, 1)]


def test_a_checkpoint_from_another_world_size_is_refused_naming_both():
    with pytest.raises(ResumeError, match="written by 4 workers and this run has 2"):
        LoopState(step=8, world_size=4, data_fingerprint="abc").check_resumable(2, "abc")


def test_a_checkpoint_for_other_data_is_refused_naming_both_fingerprints():
    with pytest.raises(ResumeError, match="training data abc and the data is now def"):
        LoopState(step=8, world_size=2, data_fingerprint="abc").check_resumable(2, "def")


def test_a_checkpoint_from_the_same_world_and_data_resumes():
    LoopState(step=8, world_size=2, data_fingerprint="abc").check_resumable(2, "abc")
    LoopState(step=8).check_resumable(2, "abc")  # written before these were recorded


class _HostCopies(torch.Tensor):
    """A tensor that counts the copies to the host made of it (or of anything computed from it)."""

    copies = 0

    def __float__(self) -> float:
        type(self).copies += 1
        return super().__float__()

    def item(self):
        type(self).copies += 1
        return super().item()


def test_the_log_window_copies_the_loss_and_metrics_to_the_host_only_at_the_logged_step():
    from ift.objectives import ObjectiveOutput
    from pipelines.training.loop import LogWindow
    from pipelines.training.state import LoopState, Schedule

    def tensor(x: float) -> torch.Tensor:
        return torch.tensor(x).as_subclass(_HostCopies)

    window, _HostCopies.copies = LogWindow(), 0
    for loss, nll in ((1.0, 2.0), (3.0, 4.0), (5.0, 9.0)):
        window.add(ObjectiveOutput(tensor(loss), {"nll": tensor(nll), "num_tokens": tensor(7.0)}), tokens=10)
    assert _HostCopies.copies == 0  # three micro-batches, no sync
    window.rank_tokens = [30]
    schedule = Schedule(micro_per_epoch=6, steps_per_epoch=2, total_steps=2)
    metrics = window.flush(torch.device("cpu"), grad_norm=None, lr=0.1, state=LoopState(), schedule=schedule)
    assert metrics["loss"] == pytest.approx(3.0) and metrics["nll"] == pytest.approx(5.0)
    assert "num_tokens" not in metrics and _HostCopies.copies == 2  # one per metric, at the logged step
