"""Padding-free packing (issue 14): ift.collate's packer and collate, and every objective on packed batches.

The contract: a packed batch gives exactly (float64, 1e-6) the loss, every parameter gradient and the
metrics of the same sequences in an ordinary padded batch, for IFT (eqs. 17 and 22), SFT, DPO and ORPO,
with ``sdpa`` and ``eager`` attention on the tiny preset's architecture; and a sequence never sees its
neighbours in the pack.  The packed batches of these proofs are built the way training builds them
(:func:`packed_batch`: the calls of ``pipelines.data.batching.MicroBatches``).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ift.objectives as objectives
from ift.collate import build_packs, collate_packs, join_pack, pack_collate, pack_examples, pad_collate
from ift.data import IGNORE_INDEX, tokenize_rows
from ift.logps import packed_token_logps, token_logps
from ift.models import TINY_CONFIG, load_model
from ift.objectives import (
    dpo_batch_loss,
    ift_loss,
    ift_weights,
    orpo_batch_loss,
    reference_pair_logps,
    sequence_logps,
    sft_loss,
)
from ift.tokenization import load_tokenizer

VOCAB = 512
PAD = 0
ATTENTION = ["sdpa", "eager"]
TOL = 1e-6


def tiny_llama(attn: str, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    """The ``tiny`` preset's architecture (ift.models.TINY_CONFIG) with a given attention implementation."""
    config = LlamaConfig(**{**TINY_CONFIG, "vocab_size": VOCAB, "attn_implementation": attn})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    assert model.config._attn_implementation == attn
    # Larger-than-default init so greedy predictions and IFT's weights vary from token to token.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return model.eval()


def sft_example(rng: random.Random, prompt: int, response: int) -> dict[str, list[int]]:
    ids = [rng.randrange(1, VOCAB) for _ in range(prompt + response)]
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def sft_examples(seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    shapes = [(3, 9), (5, 4), (2, 14), (4, 6), (6, 3), (1, 11), (3, 5)]
    return [sft_example(rng, p, r) for p, r in shapes]


def with_greedy_responses(model: torch.nn.Module, examples: list[dict], count: int) -> list[dict]:
    """The first ``count`` examples' responses replaced by the model's greedy continuation of the prompt, so
    IFT's prediction pass hits on them (prediction_accuracy strictly between 0 and 1)."""
    out = [dict(e) for e in examples]
    for e in out[:count]:
        ids = list(e["input_ids"])
        start = next(t for t, lab in enumerate(e["labels"]) if lab != IGNORE_INDEX)
        with torch.no_grad():
            for t in range(start, len(ids)):
                ids[t] = int(model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].argmax())
        e["input_ids"], e["labels"] = ids, e["labels"][:start] + ids[start:]
    return out


def preference_examples(seed: int = 1) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    out = []
    for prompt, chosen, rejected in [(3, 6, 9), (4, 8, 3), (2, 5, 5), (5, 3, 7), (3, 9, 4)]:
        c = sft_example(rng, prompt, chosen)
        r = sft_example(rng, prompt, rejected)
        r["input_ids"][:prompt] = c["input_ids"][:prompt]  # one prompt, two answers
        out.append(
            {
                "chosen_input_ids": c["input_ids"],
                "chosen_labels": c["labels"],
                "rejected_input_ids": r["input_ids"],
                "rejected_labels": r["labels"],
            }
        )
    return out


def packed_rows(examples: list[dict], pack_length: int, strategy: str = "best_fit_decreasing") -> list[dict[str, list]]:
    """The packed rows training builds from ``examples`` (pipelines.data.batching.MicroBatches):
    pack_examples groups them into rows, join_pack lays out each row."""
    groups = pack_examples(examples, pack_length, strategy=strategy)
    return [join_pack([examples[i] for i in group]) for group in groups]


def packed_batch(
    examples: list[dict], pack_length: int, *, strategy: str = "best_fit_decreasing", pad_token_id: int = PAD
) -> dict:
    """The packed micro-batch training builds from ``examples`` (MicroBatches, every row in one
    micro-batch): :func:`packed_rows`, then collate_packs."""
    return collate_packs(packed_rows(examples, pack_length, strategy), pad_token_id)


def padded_call(fn, model, batch, *args, **kwargs):
    """``fn`` (sft_loss / ift_loss / sequence_logps) on a padded batch."""
    return fn(model, batch["input_ids"], batch["attention_mask"], batch["labels"], *args, **kwargs)


def packed_call(fn, model, batch, *args, **kwargs):
    """``fn`` on a packed batch: no attention mask, the position_ids of ift.collate.collate_packs."""
    return fn(model, batch["input_ids"], None, batch["labels"], *args, position_ids=batch["position_ids"], **kwargs)


def loss_and_grads(model: torch.nn.Module, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    model.zero_grad(set_to_none=True)
    out = fn()
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, out.metrics


def assert_same(padded, packed) -> None:
    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = padded, packed
    torch.testing.assert_close(loss_b, loss_a, atol=TOL, rtol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, atol=TOL, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert metrics_a.keys() == metrics_b.keys()
    for key, value in metrics_a.items():
        torch.testing.assert_close(
            metrics_b[key].double(), value.double(), atol=TOL, rtol=0, msg=lambda m, key=key: f"{key}: {m}"
        )


def check_packed_batch(batch: dict, rows_at_least: int = 2, prefix: str = "") -> None:
    """Guard against a vacuous comparison: several rows, several sequences in a row, a padded tail."""
    pos = batch[f"{prefix}position_ids"]
    assert pos.shape[0] >= rows_at_least
    assert int((pos == 0).sum(-1).max()) >= 2
    assert "attention_mask" not in batch and f"{prefix}attention_mask" not in batch


# --------------------------------------------------------------------------- the packer


def test_every_example_lands_in_exactly_one_pack_and_no_pack_exceeds_pack_length():
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(200)]
    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
    for strategy in ("best_fit_decreasing", "greedy"):
        packs = pack_examples(examples, 64, strategy=strategy)
        assert sorted(i for p in packs for i in p) == list(range(len(examples)))
        assert all(sum(lengths[i] for i in p) <= 64 for p in packs)
        assert all(p == sorted(p) for p in packs)


def test_a_pair_is_packed_as_one_item_of_its_chosen_plus_rejected_tokens():
    rng = random.Random(1)
    sizes = [(rng.randint(1, 30), rng.randint(1, 30)) for _ in range(100)]
    examples = [
        {
            "chosen_input_ids": [1] * c,
            "chosen_labels": [1] * c,
            "rejected_input_ids": [2] * r,
            "rejected_labels": [2] * r,
        }
        for c, r in sizes
    ]
    for strategy in ("best_fit_decreasing", "greedy"):
        packs = pack_examples(examples, 64, strategy=strategy)
        assert sorted(i for p in packs for i in p) == list(range(len(examples)))
        assert all(sum(sizes[i][0] + sizes[i][1] for i in p) <= 64 for p in packs)


def test_best_fit_decreasing_packs_tighter_than_greedy_on_a_hand_made_case():
    # pack_length 10, lengths 6 5 4 5: greedy (next fit, in order) -> [6] [5 4] [5];
    # best fit decreasing -> 6, 5, then 5 fills the 5-pack and 4 fills the 6-pack: [6 4] [5 5].
    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in (6, 5, 4, 5)]
    assert pack_examples(examples, 10, strategy="greedy") == [[0], [1, 2], [3]]
    assert pack_examples(examples, 10, strategy="best_fit_decreasing") == [[0, 2], [1, 3]]


def test_an_example_longer_than_pack_length_is_an_error_naming_its_length():
    examples = [{"input_ids": [1] * 5, "labels": [1] * 5}, {"input_ids": [1] * 13, "labels": [1] * 13}]
    with pytest.raises(ValueError, match=r"example 1: input_ids has 13 tokens, more than pack_length=12"):
        pack_examples(examples, 12)
    with pytest.raises(ValueError, match="unknown packing strategy"):
        pack_examples(examples, 20, strategy="first_fit")


def test_packed_layout_restarts_positions_masks_first_labels_and_pads_the_tail_as_the_last_sequence():
    a = {"input_ids": [11, 12, 13, 14], "labels": [-100, -100, 13, 14], "row": 0}
    b = {"input_ids": [21, 22, 23], "labels": [21, 22, 23], "row": 1}  # a target at position 0: masked when packed
    c = {"input_ids": [31, 32], "labels": [-100, 32], "row": 2}
    batch = collate_packs([join_pack([a, b]), join_pack([c])], PAD)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22, 23], [31, 32, PAD, PAD, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, -100, 13, 14, -100, 22, 23], [-100, 32, -100, -100, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6]]
    assert batch["row"].tolist() == [0, 1, 2]  # per-sequence keys in the batch's sequence order
    assert "attention_mask" not in batch
    fixed = collate_packs([join_pack([a, b]), join_pack([c])], PAD, pad_to_multiple_of=8)
    assert fixed["input_ids"].shape == (2, 8) and fixed["position_ids"][1].tolist() == list(range(8))


def test_pack_collate_puts_each_pairs_chosen_then_rejected_side_by_side_in_one_row():
    examples = []
    for i, (c, r) in enumerate([(3, 6), (5, 2), (2, 2), (6, 5), (1, 4), (4, 4)]):
        examples.append(
            {
                "chosen_input_ids": [100 + i] * c,
                "chosen_labels": [100 + i] * c,
                "rejected_input_ids": [200 + i] * r,
                "rejected_labels": [200 + i] * r,
                "row": i,
                "source": f"s{i}",
            }
        )
    batch = pack_collate(examples, PAD, pack_length=12)
    assert not any(k.startswith(("chosen_", "rejected_")) for k in batch)
    pos, ids = batch["pair_position_ids"], batch["pair_input_ids"]
    starts = ids[pos == 0].tolist()  # row-major: the batch's sequence order
    # Sequence 2k is pair k's chosen, 2k+1 its rejected, and pair k is the batch's row[k].
    assert starts == [base + i for i in batch["row"].tolist() for base in (100, 200)]
    assert (batch["pair_labels"][pos == 0] == IGNORE_INDEX).all()
    assert ids.shape[1] <= 12
    assert sorted(batch["row"].tolist()) == list(range(6))
    assert batch["source"] == [f"s{i}" for i in batch["row"].tolist()]
    # Best fit decreasing on the pairs' sizes 9 7 4 11 5 8 fills rows of 12 as 11, 9, 8+4, 7+5:
    # no room is left but in the first two rows.
    assert sorted(int((row != PAD).sum()) for row in ids) == [9, 11, 12, 12]


def test_build_packs_gives_rows_of_at_most_pack_length_holding_every_token_that_collate_into_one_batch():
    examples = sft_examples()
    rows = build_packs(examples, 24)
    assert all(len(r["input_ids"]) <= 24 and r["position_ids"][0] == 0 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    assert collate_packs(rows, PAD)["input_ids"].shape[0] == len(rows)


def test_pack_collate_gives_the_same_batch_from_numpy_arrays_and_scalars_as_from_lists_and_ints():
    # Ray Data hands over numpy arrays and numpy scalars.
    examples = sft_examples()
    as_numpy = [
        {"input_ids": np.asarray(e["input_ids"]), "labels": np.asarray(e["labels"]), "row": np.int64(i)}
        for i, e in enumerate(examples)
    ]
    with_rows = [e | {"row": i} for i, e in enumerate(examples)]
    a, b = pack_collate(with_rows, PAD, pack_length=24), pack_collate(as_numpy, PAD, pack_length=24)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("attn", ATTENTION)
def test_transformers_builds_a_block_diagonal_causal_mask_from_packed_position_ids(attn):
    """What the objectives rely on: with attention_mask=None, masking_utils.create_causal_mask finds the
    sequences from position_ids (find_packed_sequence_indices) and confines attention to each."""
    from transformers.masking_utils import create_causal_mask

    model = tiny_llama(attn)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    embeds = torch.zeros(1, 8, model.config.hidden_size, dtype=torch.float64)
    mask = create_causal_mask(
        config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None, position_ids=pos
    )
    allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    expected = (seq[:, None] == seq[None, :]) & torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(allowed, expected)


# --------------------------------------------------------------------------- packed == padded


@pytest.fixture(scope="module", params=ATTENTION)
def policy(request) -> LlamaForCausalLM:
    return tiny_llama(request.param)


@pytest.fixture(scope="module")
def ift_examples(policy) -> list[dict]:
    return with_greedy_responses(policy, sft_examples(), 2)


@pytest.mark.parametrize("lam, decay", [(0.0, 0.0), (0.2, 0.95), (0.5, 1.0), (1.0, 0.5)])
def test_ift_packed_equals_padded_loss_gradients_and_metrics(policy, ift_examples, lam, decay):
    examples = ift_examples
    padded = pad_collate(examples, PAD)
    packed = packed_batch(examples, 28)
    check_packed_batch(packed)
    a = loss_and_grads(policy, lambda: padded_call(ift_loss, policy, padded, lam, decay))
    b = loss_and_grads(
        policy,
        lambda: packed_call(ift_loss, policy, packed, lam, decay),
    )
    assert_same(a, b)
    assert 0.0 < float(b[2]["prediction_accuracy"]) < 1.0  # hits and misses are both counted


def test_ift_packed_with_frozen_fusion_embeddings_and_detached_weights(policy):
    examples = sft_examples(seed=3)
    padded, packed = pad_collate(examples, PAD), packed_batch(examples, 30, strategy="greedy")
    check_packed_batch(packed)
    fusion = objectives.frozen_embedding_copy(policy)
    kw = dict(lam=0.3, decay=0.9, detach_weights=True, fusion_embeddings=fusion)
    a = loss_and_grads(policy, lambda: padded_call(ift_loss, policy, padded, **kw))
    b = loss_and_grads(policy, lambda: packed_call(ift_loss, policy, packed, **kw))
    assert_same(a, b)


def test_sft_packed_equals_padded(policy):
    examples = sft_examples()
    padded, packed = pad_collate(examples, PAD), packed_batch(examples, 28)
    check_packed_batch(packed)
    a = loss_and_grads(policy, lambda: padded_call(sft_loss, policy, padded))
    b = loss_and_grads(policy, lambda: packed_call(sft_loss, policy, packed))
    assert_same(a, b)


def test_packed_sequences_without_targets_are_skipped_and_counted_like_padded_rows(policy):
    examples = sft_examples()
    examples[2] = {"input_ids": examples[2]["input_ids"], "labels": [IGNORE_INDEX] * len(examples[2]["labels"])}
    padded, packed = pad_collate(examples, PAD), packed_batch(examples, 28)
    a = loss_and_grads(policy, lambda: padded_call(ift_loss, policy, padded, on_empty="skip"))
    b = loss_and_grads(
        policy,
        lambda: packed_call(ift_loss, policy, packed, on_empty="skip"),
    )
    assert_same(a, b)
    assert float(b[2]["num_skipped"]) == 1.0
    with pytest.raises(objectives.EmptyTargetError):
        packed_call(sft_loss, policy, packed)


@pytest.fixture(scope="module")
def reference(policy) -> LlamaForCausalLM:
    return tiny_llama(policy.config._attn_implementation, seed=7)


def test_dpo_packed_equals_padded_with_a_reference_model(policy, reference):
    examples = preference_examples()
    padded, packed = pad_collate(examples, PAD), packed_batch(examples, 40)
    check_packed_batch(packed, prefix="pair_")
    a = loss_and_grads(policy, lambda: dpo_batch_loss(policy, padded, beta=0.5, reference_model=reference))
    b = loss_and_grads(policy, lambda: dpo_batch_loss(policy, packed, beta=0.5, reference_model=reference))
    assert_same(a, b)
    assert float(a[2]["reward_accuracy"]) not in (0.0, 1.0)  # the margins are not all one sign


def test_dpo_packed_carries_each_pairs_precomputed_references_with_the_pair(policy, reference):
    """Packing reorders the pairs; each pair's precomputed reference log-probs move with it, so the
    packed batch gives the padded one's loss, gradients and metrics.  (That precomputed references
    give the live reference model's DPO: tests/ift/test_objectives.py.)"""
    examples = preference_examples()
    ref_c, ref_r = reference_pair_logps(reference, pad_collate(examples, PAD))
    with_ref = [
        e | {"reference_chosen_logps": float(c), "reference_rejected_logps": float(r)}
        for e, c, r in zip(examples, ref_c, ref_r, strict=True)
    ]
    # Rows of 44 tokens: best fit decreasing packs pairs 0 and 3, 1 and 4, then 2 (sizes 21 19 14 20 19).
    padded, packed = pad_collate(with_ref, PAD), packed_batch(with_ref, 44)
    check_packed_batch(packed, prefix="pair_")
    # Not vacuous: the pairs (and so their references) are in another order once packed.
    assert not torch.equal(packed["reference_chosen_logps"], padded["reference_chosen_logps"])
    a = loss_and_grads(policy, lambda: dpo_batch_loss(policy, padded, beta=0.5))
    b = loss_and_grads(policy, lambda: dpo_batch_loss(policy, packed, beta=0.5))
    assert_same(a, b)


def test_orpo_packed_equals_padded(policy):
    examples = preference_examples()
    padded, packed = pad_collate(examples, PAD), packed_batch(examples, 40)
    check_packed_batch(packed, prefix="pair_")
    a = loss_and_grads(policy, lambda: orpo_batch_loss(policy, padded, beta=0.25))
    b = loss_and_grads(policy, lambda: orpo_batch_loss(policy, packed, beta=0.25))
    assert_same(a, b)


def test_sequence_logps_packed_gives_one_entry_per_sequence_in_row_major_order(policy):
    examples = sft_examples()
    padded = pad_collate(examples, PAD)
    rows = packed_rows(examples, 28)
    packed = collate_packs(rows, PAD)
    # Each packed sequence's example, found by its tokens (best fit decreasing reorders them).
    order = [
        next(j for j, e in enumerate(examples) if e["input_ids"] == seq)
        for r in rows
        for seq in split_row(r["input_ids"], r["position_ids"])
    ]
    with torch.no_grad():
        ref_sum, ref_n = padded_call(sequence_logps, policy, padded)
        got_sum, got_n = sequence_logps(
            policy, packed["input_ids"], None, packed["labels"], position_ids=packed["position_ids"]
        )
    torch.testing.assert_close(got_sum, ref_sum[order], atol=TOL, rtol=0)
    assert torch.equal(got_n, ref_n[order])


def split_row(ids: list[int], pos: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for t, p in zip(ids, pos, strict=True):
        if p == 0:
            out.append([])
        out[-1].append(t)
    return out


def test_packed_token_logps_never_scores_a_sequences_last_logit_against_the_next_sequences_first_token():
    logits = torch.randn(1, 6, 5, dtype=torch.float64)
    labels = torch.tensor([[-100, 1, 2, 3, 4, 0]])  # labels at both sequence starts set on purpose
    labels[0, 3] = 3
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    logps, mask = packed_token_logps(logits, labels, pos)
    assert logps.shape == mask.shape == (2, 2)
    assert mask.tolist() == [[True, True], [True, True]]
    full, _ = token_logps(logits, labels)
    # sequence 0 predicts tokens 1 and 2 from logits 0 and 1; logit 2 (its last) scores nothing.
    torch.testing.assert_close(logps[0], full[0, :2])
    torch.testing.assert_close(logps[1], full[0, 3:5])


def test_the_tiny_preset_on_tokenized_rows_packed_equals_padded_for_ift_and_dpo():
    """End to end: ift.models.load_model("tiny") and rows through ift.data.tokenize_rows, both modes."""
    tokenizer = load_tokenizer("tiny")
    model = load_model("tiny", dtype=torch.float64, seed=0, tokenizer=tokenizer).eval()
    rows = [
        {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five, I think."},
        {"prompt": "Name a colour.", "chosen": "Blue, like the sky.", "rejected": "Seven."},
        {"prompt": "Say hello.", "chosen": "Hello!", "rejected": "No."},
        {"prompt": "Count to three.", "chosen": "One, two, three.", "rejected": "One, three, two, five."},
    ]
    pad_id = tokenizer.pad_token_id
    sft, _ = tokenize_rows(tokenizer, rows, source="rows", mode="sft", max_length=64)
    pairs, _ = tokenize_rows(tokenizer, rows, source="rows", mode="preference", max_length=64)
    padded, packed = pad_collate(sft, pad_id), packed_batch(sft, 48, pad_token_id=pad_id)
    check_packed_batch(packed)
    assert_same(
        loss_and_grads(model, lambda: padded_call(ift_loss, model, padded, 0.2, 0.95)),
        loss_and_grads(model, lambda: packed_call(ift_loss, model, packed, 0.2, 0.95)),
    )
    reference = load_model("tiny", dtype=torch.float64, seed=1, tokenizer=tokenizer).eval()
    padded, packed = pad_collate(pairs, pad_id), packed_batch(pairs, 128, pad_token_id=pad_id)
    check_packed_batch(packed, prefix="pair_")
    assert_same(
        loss_and_grads(model, lambda: dpo_batch_loss(model, padded, reference_model=reference)),
        loss_and_grads(model, lambda: dpo_batch_loss(model, packed, reference_model=reference)),
    )


# --------------------------------------------------------------------------- no leakage


def ift_details(model, batch, monkeypatch, lam=0.2, decay=0.95):
    """Per-sequence losses and per-token weights of a packed ift_loss, read off the logps it scores."""
    seen = {}
    real = objectives.ift_loss_from_logps

    def spy(logps, mask, *args, **kwargs):
        seen["logps"], seen["mask"] = logps.detach(), mask
        return real(logps, mask, *args, **kwargs)

    monkeypatch.setattr(objectives, "ift_loss_from_logps", spy)
    with torch.no_grad():
        packed_call(ift_loss, model, batch, lam, decay)
    logps, mask = seen["logps"], seen["mask"]
    weights = ift_weights(logps, mask, decay)
    per_sequence = (-(logps * mask) * weights).sum(-1) / mask.sum(-1)
    return per_sequence, weights, logps


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("position", ["first", "second"])
def test_a_sequence_whose_neighbour_changes_keeps_its_loss_and_weights(attn, position, monkeypatch):
    model = tiny_llama(attn)
    rng = random.Random(5)
    a, b, b2 = sft_example(rng, 3, 9), sft_example(rng, 4, 7), sft_example(rng, 2, 12)

    def pack(neighbour):
        seqs = [a, neighbour] if position == "first" else [neighbour, a]
        return collate_packs([join_pack(seqs)], PAD)

    # sdpa is float64 throughout: equal to float64 rounding (the scan of eq. 22 runs over rows as
    # long as the longest sequence, which the neighbour sets).  Eager attention takes its softmax in
    # float32 (transformers' eager_attention_forward), whose rounding depends on the row length: equal
    # to float32 precision.  Leakage would move the loss by orders of magnitude more.
    tol = 1e-12 if attn == "sdpa" else 1e-6
    i = 0 if position == "first" else 1
    loss_1, w_1, _ = ift_details(model, pack(b), monkeypatch)
    loss_2, w_2, _ = ift_details(model, pack(b2), monkeypatch)
    n = len(a["input_ids"]) - 1
    torch.testing.assert_close(loss_2[i], loss_1[i], atol=tol, rtol=0)
    torch.testing.assert_close(w_2[i, :n], w_1[i, :n], atol=tol, rtol=0)
    assert not torch.allclose(loss_1[1 - i], loss_2[1 - i])  # the neighbour did change

    # And the same as `a` alone in a padded batch: what naive packing (one causal row) would break.
    alone = pad_collate([a], PAD)
    with torch.no_grad():
        solo = padded_call(ift_loss, model, alone, 0.2, 0.95).loss
        row = pack(b)
        naive = ift_loss(model, row["input_ids"], None, row["labels"], 0.2, 0.95).loss  # no position_ids
        packed = packed_call(ift_loss, model, row, 0.2, 0.95).loss
    torch.testing.assert_close(loss_1[i], solo, atol=tol, rtol=0)
    torch.testing.assert_close(packed, loss_1.mean(), atol=1e-12, rtol=0)
    assert not torch.allclose(naive, packed)


# --------------------------------------------------------------------------- refusals


def test_packed_position_ids_that_do_not_restart_at_zero_or_skip_are_refused(llama_sdpa):
    batch = packed_batch(sft_examples(), 28)
    bad = batch["position_ids"].clone()
    bad[0, 0] = 1
    with pytest.raises(ValueError, match="start each row at 0"):
        sft_loss(llama_sdpa, batch["input_ids"], None, batch["labels"], position_ids=bad)
    jump = batch["position_ids"].clone()
    jump[0, 2] += 1  # 0 1 3: transformers would split here, the loss would not
    with pytest.raises(ValueError, match="count up by 1"):
        sft_loss(llama_sdpa, batch["input_ids"], None, batch["labels"], position_ids=jump)
    with pytest.raises(ValueError, match="no padding mask"):
        mask = torch.ones_like(batch["input_ids"])
        mask[0, -1] = 0
        sft_loss(llama_sdpa, batch["input_ids"], mask, batch["labels"], position_ids=batch["position_ids"])
    # An all-ones mask says nothing and is dropped (a 2-D mask would switch packing detection off).
    ones = sft_loss(
        llama_sdpa,
        batch["input_ids"],
        torch.ones_like(batch["input_ids"]),
        batch["labels"],
        position_ids=batch["position_ids"],
    )
    none = packed_call(sft_loss, llama_sdpa, batch)
    assert torch.equal(ones.loss, none.loss)


@pytest.fixture(scope="module")
def llama_sdpa() -> LlamaForCausalLM:
    return tiny_llama("sdpa")


# --------------------------------------------------------------------------- flash attention


class FlashLabelled(torch.nn.Module):
    """An sdpa model whose config says flash_attention_2: drives the objectives' flash path (the rows
    flattened into one, as transformers' varlen flash attention reads position_ids only on one row) on CPU."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model
        self.config = SimpleNamespace(_attn_implementation="flash_attention_2")
        self.shapes: list[tuple[int, ...]] = []
        self.varlen: list[dict] = []

    def forward(self, **inputs):
        self.shapes.append(tuple(inputs["position_ids"].shape))
        self.varlen.append({k: inputs.pop(k) for k in list(inputs) if k.startswith(("cu_seq_lens", "max_length"))})
        return self.model(**inputs)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()


def test_flash_path_flattens_the_rows_into_one_and_gives_the_padded_result(llama_sdpa):
    examples = sft_examples()
    padded, packed = pad_collate(examples, PAD), packed_batch(examples, 28)
    rows, length = packed["input_ids"].shape
    check_packed_batch(packed)
    flash = FlashLabelled(llama_sdpa)
    a = loss_and_grads(llama_sdpa, lambda: padded_call(ift_loss, llama_sdpa, padded))
    b = loss_and_grads(llama_sdpa, lambda: packed_call(ift_loss, flash, packed))
    assert_same(a, b)
    assert flash.shapes == [(1, rows * length)] * 2  # the prediction pass and the fused pass


def test_flash_path_hands_both_passes_the_batchs_boundaries_computed_once(llama_sdpa):
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    packed = packed_batch(sft_examples(), 28)
    flash = FlashLabelled(llama_sdpa)
    packed_call(ift_loss, flash, packed)
    first, second = flash.varlen
    assert first["cu_seq_lens_q"] is second["cu_seq_lens_q"]  # one computation for both passes
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(packed["position_ids"].reshape(1, -1))
    assert torch.equal(first["cu_seq_lens_q"], cu_q) and torch.equal(first["cu_seq_lens_k"], cu_k)
    assert first["max_length_q"] == int(max_q) == first["max_length_k"] == int(max_k)
    assert isinstance(first["max_length_q"], int)  # no tensor for the kernel to sync on, layer after layer


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _flash_attn_available(), reason="flash_attention_2 needs CUDA and the flash_attn package")
@pytest.mark.parametrize("objective", ["ift", "sft"])
def test_flash_attention_2_packed_matches_padded_sdpa(objective):
    """Varlen flash attention from position_ids (rows flattened into one) against padded sdpa, in bfloat16."""
    torch.manual_seed(0)
    flash = tiny_llama("flash_attention_2", dtype=torch.bfloat16).cuda()
    sdpa = tiny_llama("sdpa", dtype=torch.bfloat16).cuda()
    examples = sft_examples()
    padded = {k: v.cuda() for k, v in pad_collate(examples, PAD).items()}
    packed = {k: v.cuda() for k, v in packed_batch(examples, 28).items()}
    check_packed_batch(packed)
    fn = ift_loss if objective == "ift" else sft_loss
    with torch.no_grad():
        ref = padded_call(fn, sdpa, padded).loss
        got = packed_call(fn, flash, packed).loss
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
