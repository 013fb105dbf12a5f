"""The TRL peer benchmark runs TRL's own trainers on our tiny preset and counts what it says it counts.

No timing assertions beyond "positive": throughput is measured with the benchmarks, not tested.
"""

from __future__ import annotations

import random

import pytest
import torch

from benchmarks.trl_peer import build_trainer, trl_tokens_per_s
from ift.tokenization import load_tokenizer

KEYS = {"tokens_per_s", "steps", "seconds", "tokens", "trl_version", "padding_free", "examples_per_step"}
BATCH = 4
MAX_LENGTH = 64


def _examples(method: str, n: int = 16, seed: int = 0) -> list[dict]:
    """``n`` random token-id examples of 10..40 tokens, no special ids (so no id is the pad id)."""
    tokenizer = load_tokenizer("tiny")
    ordinary = sorted(set(range(len(tokenizer))) - set(tokenizer.all_special_ids))
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(10, 40)
        prompt = rng.randint(3, length - 3)
        ids = [rng.choice(ordinary) for _ in range(length)]
        if method == "sft":
            out.append({"prompt_ids": ids[:prompt], "completion_ids": ids[prompt:]})
        else:
            rejected = [rng.choice(ordinary) for _ in range(length - prompt)]
            out.append({"prompt_ids": ids[:prompt], "chosen_ids": ids[prompt:], "rejected_ids": rejected})
    return out


def _measure(method: str) -> dict:
    return trl_tokens_per_s(
        method, "tiny", _examples(method), batch_size=BATCH, max_length=MAX_LENGTH, steps=2, warmup=1
    )


def _first_sft_batch(tmp_path) -> tuple[dict, list[dict], object]:
    examples = _examples("sft")
    trainer = build_trainer(
        "sft", "tiny", examples, batch_size=BATCH, max_length=MAX_LENGTH, max_steps=1, output_dir=str(tmp_path)
    )
    return next(iter(trainer.get_train_dataloader())), examples, trainer


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    starts = (position_ids == 0).nonzero().flatten().tolist() + [position_ids.numel()]
    return list(zip(starts[:-1], starts[1:], strict=True))


def test_sft_peer_reports_useful_tokens_per_second_of_the_timed_steps():
    result = _measure("sft")
    assert KEYS <= set(result)
    assert result["steps"] == 2 and result["examples_per_step"] == BATCH
    assert result["padding_free"] is True and result["padding_fraction"] == 0.0
    # Two timed steps of four examples of 10..40 tokens each.
    assert 2 * BATCH * 10 <= result["tokens"] <= 2 * BATCH * 40
    assert result["seconds"] > 0 and result["tokens_per_s"] == pytest.approx(result["tokens"] / result["seconds"])


def test_dpo_peer_counts_both_sequences_of_a_pair_and_reports_that_trl_pads():
    result = _measure("dpo")
    assert KEYS <= set(result)
    assert result["steps"] == 2 and result["tokens_per_s"] > 0
    # prompt+chosen and prompt+rejected: two sequences of 10..40 tokens per pair.
    assert 2 * BATCH * 2 * 10 <= result["tokens"] <= 2 * BATCH * 2 * 40
    # TRL 1.16's DPOTrainer ignores padding_free (it warns and pads); the result says so.
    assert result["padding_free_requested"] is True and result["padding_free"] is False


def test_padding_free_sft_batch_is_one_unpadded_row_with_positions_restarting_per_sequence(tmp_path):
    batch, examples, trainer = _first_sft_batch(tmp_path)
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    assert "attention_mask" not in batch
    assert input_ids.shape[0] == 1 and position_ids.shape == input_ids.shape
    assert not (input_ids == trainer.processing_class.pad_token_id).any()
    segments = _segments(position_ids[0])
    assert len(segments) == BATCH
    whole = {tuple(ex["prompt_ids"] + ex["completion_ids"]) for ex in examples}
    for start, end in segments:
        assert position_ids[0, start:end].tolist() == list(range(end - start))
        assert tuple(input_ids[0, start:end].tolist()) in whole  # a whole example, nothing else


def test_sft_loss_is_on_completion_tokens_only(tmp_path):
    batch, examples, _ = _first_sft_batch(tmp_path)
    by_ids = {tuple(ex["prompt_ids"] + ex["completion_ids"]): ex for ex in examples}
    for start, end in _segments(batch["position_ids"][0]):
        ex = by_ids[tuple(batch["input_ids"][0, start:end].tolist())]
        labels = batch["labels"][0, start:end].tolist()
        n_prompt = len(ex["prompt_ids"])
        assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ex["completion_ids"]


def test_flattened_sdpa_forward_attends_within_each_sequence_only(tmp_path):
    # transformers builds a block-diagonal causal mask from the restarting position_ids when there is no
    # attention_mask, so padding-free is real with sdpa, not only with FlashAttention.
    batch, _, trainer = _first_sft_batch(tmp_path)
    model = trainer.model.eval()
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        flat = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        for start, end in _segments(batch["position_ids"][0]):
            alone = model(input_ids=batch["input_ids"][:, start:end]).logits[0]
            torch.testing.assert_close(flat[start:end], alone, atol=1e-4, rtol=1e-4)
