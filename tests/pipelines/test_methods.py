"""pipelines.training.methods and the method config classes: one config class per method
(its own options and defaults), one objective per config class."""

from __future__ import annotations

import math

import pytest
import torch

from ift.collate import pad_collate
from ift.data import tokenize_rows
from ift.objectives import dpo_batch_loss, reference_pair_logps, sft_loss
from ift.toydata import make_preference_pairs
from pipelines.config import METHOD_CONFIGS, DPOConfig, IFTConfig, ORPOConfig, SFTConfig
from pipelines.config_loading import load_config
from pipelines.training.build import build_model_and_tokenizer
from pipelines.training.loop import attach_reference
from pipelines.training.methods import OBJECTIVES, build_objective
from tests.conftest import build_llama

CPU = torch.device("cpu")


def sft_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of 10 tokens: a 4-token prompt (label -100), then the response; row 1 padded by 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32, (2, 10), generator=g)
    attention = torch.ones_like(ids)
    attention[1, -2:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[attention == 0] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def test_each_method_has_one_config_class_and_one_objective():
    assert set(METHOD_CONFIGS) == {"ift", "sft", "dpo", "orpo"}
    assert set(OBJECTIVES) == set(METHOD_CONFIGS.values())


def test_pair_methods_are_exactly_dpo_and_orpo():
    assert {name for name, cls in METHOD_CONFIGS.items() if cls.paired} == {"dpo", "orpo"}


def test_only_dpo_trains_against_a_reference_policy():
    assert {name for name, cls in METHOD_CONFIGS.items() if cls.uses_reference} == {"dpo"}


def test_beta_defaults_to_the_papers_values_and_an_explicit_beta_wins():
    assert DPOConfig().beta == 0.1
    assert ORPOConfig().beta == 0.25
    assert ORPOConfig(beta=0.5).beta == 0.5
    assert "beta" not in IFTConfig.model_fields and "beta" not in SFTConfig.model_fields


def test_hyperparameters_are_the_methods_own_fields_only():
    ift = IFTConfig(lam=0.3, decay=0.9)
    assert ift.hyperparameters()["lam"] == 0.3 and "beta" not in ift.hyperparameters()
    assert DPOConfig().hyperparameters() == {"beta": 0.1, "precompute_reference": False}
    assert SFTConfig().hyperparameters() == {}


def test_only_dpo_with_precompute_reference_precomputes_it():
    assert DPOConfig(precompute_reference=True).precomputed_reference
    assert not DPOConfig().precomputed_reference
    assert not any(cls().precomputed_reference for cls in (IFTConfig, SFTConfig, ORPOConfig))


def test_the_sft_objective_is_sft_loss():
    model, batch = build_llama(), sft_batch()
    objective = build_objective(SFTConfig(), model, CPU, seed=0)
    expected = sft_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
    assert objective(model, batch, step=0).loss.item() == expected.item()


def test_the_ift_objective_with_lambda_zero_and_decay_zero_is_sft():
    model, batch = build_llama(), sft_batch(1)
    objective = build_objective(IFTConfig(lam=0.0, decay=0.0), model, CPU, seed=0)
    expected = sft_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
    assert objective(model, batch, step=0).loss.item() == expected.item()


def test_ift_trains_with_jittered_lambda_and_validates_with_the_noiseless_one():
    model, batch = build_llama(), sft_batch(2)
    cfg = IFTConfig(lam=0.5, lam_jitter_std=0.1)
    objective = build_objective(cfg, model, CPU, seed=0)
    noisy = objective(model, batch, step=0).metrics["lam"].item()
    # The same draw as the objective's own generator, seeded with the run's seed.
    expected_noisy = 0.5 + 0.1 * torch.randn((), generator=torch.Generator().manual_seed(0)).item()
    assert noisy == pytest.approx(expected_noisy) and noisy != 0.5
    assert objective(model, batch, step=0, validation=True).metrics["lam"].item() == 0.5


def _tied_llama() -> torch.nn.Module:
    """``build_llama`` with the LM head tied to the input table: each step's update of the head moves
    the table that embeds the predictions."""
    untied = build_llama()
    config = untied.config.to_dict() | {"tie_word_embeddings": True}
    model = type(untied)(type(untied.config).from_dict(config)).to(torch.float64)
    model.load_state_dict(untied.state_dict(), strict=False)
    model.tie_weights()
    return model.eval()


def _three_sgd_steps(loss_of) -> list[float]:
    """Three SGD steps, each on its own batch; ``loss_of(step, batch)`` after the previous update."""
    losses = []
    for step in range(3):
        loss = loss_of(step, sft_batch(10 + step))
        loss.backward()
        with torch.no_grad():
            for p in loss_of.model.parameters():
                if p.grad is not None:
                    p -= 0.5 * p.grad
                    p.grad = None
        losses.append(loss.item())
    return losses


def test_ifts_frozen_fusion_embeddings_follow_the_policy_every_step_as_the_authors_refreshed_copy_does():
    """The authors' release embeds the predictions with a frozen ``embed_tokens`` that it copies from the
    policy after every optimizer step.  With a tied LM head the table changes every step, so a copy
    made once drifts from step 2; the pipeline's objective tracks the refreshed one exactly."""
    from ift.objectives import frozen_embedding_copy, ift_loss

    def authors(refresh: bool):
        model, fusion = _tied_llama(), None

        def loss_of(step, b):
            nonlocal fusion
            if fusion is None or refresh:
                fusion = frozen_embedding_copy(model)
            return ift_loss(
                model, b["input_ids"], b["attention_mask"], b["labels"], lam=0.3, fusion_embeddings=fusion
            ).loss

        loss_of.model = model
        return _three_sgd_steps(loss_of)

    model = _tied_llama()
    objective = build_objective(IFTConfig(lam=0.3, frozen_fusion_embeddings=True), model, CPU, seed=0)

    def pipeline(step, b):
        return objective(model, b, step).loss

    pipeline.model = model
    ours, refreshed, stale = _three_sgd_steps(pipeline), authors(refresh=True), authors(refresh=False)
    assert ours == refreshed
    assert stale[0] == refreshed[0] and stale[1] != refreshed[1] and stale[2] != refreshed[2]


def test_frozen_fusion_embeddings_are_allowed_under_zero3():
    cfg = load_config(None, ["method.frozen_fusion_embeddings=true", "deepspeed.zero_stage=3"])
    assert cfg.method.frozen_fusion_embeddings and cfg.deepspeed.zero_stage == 3


def test_ift_validation_lambda_follows_the_warmup_schedule():
    model, batch = build_llama(), sft_batch(3)
    cfg = IFTConfig(lam=0.4, lam_schedule="linear_warmup", lam_min=0.0, lam_warmup_steps=4)
    objective = build_objective(cfg, model, CPU, seed=0)
    assert objective(model, batch, step=1, validation=True).metrics["lam"].item() == pytest.approx(0.1)


def test_dpo_scores_against_a_frozen_copy_of_the_start_model():
    model, _ = build_model_and_tokenizer(load_config(None, ["method.name=dpo"]))
    objective = build_objective(DPOConfig(), model, CPU, seed=0)
    assert objective.reference is not model and not any(p.requires_grad for p in objective.reference.parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # training moves the policy; the reference stays put
    assert not torch.equal(next(model.parameters()), next(objective.reference.parameters()))


def test_the_precomputed_reference_table_gives_each_pair_its_reference_logps_by_source_and_row():
    """What the reference model scores, keyed by (source, row), and attached to any batch of those pairs
    in that batch's order.  (That precomputed references give the live reference's DPO loss:
    tests/ift/test_objectives.py.)"""
    cfg = load_config(None, ["method.name=dpo", "data.max_length=96"])
    model, tokenizer = build_model_and_tokenizer(cfg)
    examples, _ = tokenize_rows(
        tokenizer, make_preference_pairs(4, seed=1), source="p", max_length=96, mode="preference"
    )
    batch = pad_collate(examples, tokenizer.pad_token_id)
    batch["source"], batch["row"] = ["p"] * 4, torch.arange(4)
    objective = build_objective(cfg.method, model, CPU, seed=0)
    chosen, rejected = reference_pair_logps(objective.reference, batch)
    table = objective.precompute_reference([batch])
    assert table == {("p", i): (c, r) for i, (c, r) in enumerate(zip(chosen.tolist(), rejected.tolist(), strict=True))}
    reversed_batch = pad_collate(examples[::-1], tokenizer.pad_token_id)
    reversed_batch["source"], reversed_batch["row"] = ["p"] * 4, torch.arange(3, -1, -1)
    attach_reference(reversed_batch, table, CPU)
    assert torch.equal(reversed_batch["reference_chosen_logps"], chosen.flip(0))
    assert torch.equal(reversed_batch["reference_rejected_logps"], rejected.flip(0))


def test_precomputing_the_dpo_reference_frees_the_copy_so_unseen_pairs_cannot_be_validated():
    cfg = load_config(None, ["method.name=dpo", "data.max_length=96"])
    model, tokenizer = build_model_and_tokenizer(cfg)
    live = build_objective(cfg.method, model, CPU, seed=0)
    pre = build_objective(cfg.method, model, CPU, seed=0)
    pre.precompute_reference([_pair_batch(cfg, tokenizer)])
    assert pre.reference is None
    assert not pre.can_validate and live.can_validate


def test_the_dpo_objective_uses_the_configured_beta():
    cfg = load_config(None, ["method.name=dpo", "method.beta=0.3", "data.max_length=96"])
    model, tokenizer = build_model_and_tokenizer(cfg)
    examples, _ = tokenize_rows(
        tokenizer, make_preference_pairs(2, seed=2), source="p", max_length=96, mode="preference"
    )
    batch = pad_collate(examples, tokenizer.pad_token_id)
    objective = build_objective(cfg.method, model, CPU, seed=0)
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)  # policy ≠ reference, so β changes the loss
    expected = dpo_batch_loss(model, batch, beta=0.3, reference_model=objective.reference).loss
    assert objective(model, batch, 0).loss.item() == expected.item()


def _pair_batch(cfg, tokenizer, n: int = 4) -> dict:
    examples, _ = tokenize_rows(
        tokenizer, make_preference_pairs(n, seed=1), source="p", max_length=96, mode="preference"
    )
    batch = pad_collate(examples, tokenizer.pad_token_id)
    batch["source"], batch["row"] = ["p"] * n, torch.arange(n)
    return batch


LORA_DPO = ["method.name=dpo", "data.max_length=96", "model.lora={r: 4, alpha: 8, dropout: 0.0}"]


def test_dpo_with_lora_keeps_no_reference_copy_and_starts_at_log_two():
    cfg = load_config(None, LORA_DPO)
    model, tokenizer = build_model_and_tokenizer(cfg)
    objective = build_objective(cfg.method, model, CPU, seed=0)
    assert objective.reference is None and objective.can_validate
    # A fresh adapter is the identity (B = 0): policy = reference, so every margin is 0 and the loss log 2.
    out = objective(model, _pair_batch(cfg, tokenizer), 0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)  # the base stays frozen


def test_dpo_with_lora_scores_the_reference_with_the_adapters_off():
    cfg = load_config(None, LORA_DPO)
    model, tokenizer = build_model_and_tokenizer(cfg)
    batch = _pair_batch(cfg, tokenizer)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)  # the policy moves away from the base
    base, _ = build_model_and_tokenizer(load_config(None, ["method.name=dpo", "data.max_length=96"]))
    expected = dpo_batch_loss(model, batch, beta=0.1, reference_model=base).loss
    objective = build_objective(cfg.method, model, CPU, seed=0)
    torch.testing.assert_close(objective(model, batch, 0).loss, expected, rtol=0, atol=1e-6)
    # Precomputed the same way: the table equals the live reference.
    table = objective.precompute_reference([batch])
    attach_reference(batch, table, CPU)
    torch.testing.assert_close(objective(model, batch, 0).loss, expected, rtol=0, atol=1e-6)
