"""pipelines.evaluation.harness: lm-eval runs on the offline tasks, RNG and train mode kept, training helps."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

from ift.collate import pad_collate
from ift.data import read_jsonl, tokenize_rows
from ift.models import load_model
from ift.objectives import sft_loss
from ift.tokenization import load_tokenizer
from pipelines.evaluation.harness import evaluate_model, run_evaluation
from tests.pipelines.evaluation.conftest import untrained_tiny

REPO = Path(__file__).resolve().parents[3]
DEMO_CHAT = REPO / "pipelines" / "demo_data" / "demo_chat.jsonl"


def _train_tiny_sft(steps: int = 600, lr: float = 3e-3, batch_size: int = 16, seed: int = 0):
    """SFT of the tiny preset on the bundled demo chat data: plain torch loop, ~30 s on 2 idle cores."""
    tok = load_tokenizer("tiny")
    model = load_model("tiny", tokenizer=tok, seed=seed)
    examples, _ = tokenize_rows(tok, read_jsonl(DEMO_CHAT), source=str(DEMO_CHAT), max_length=256)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1.0 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    while step < steps:
        order = torch.randperm(len(examples), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            batch = pad_collate([examples[j] for j in order[i : i + batch_size]], tok.pad_token_id)
            out = sft_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
    return model.eval(), tok


@pytest.fixture(scope="module")
def trained():
    with torch.random.fork_rng(devices=[]):
        t0 = time.perf_counter()
        model, tok = _train_tiny_sft()
    print(f"\ntrained tiny SFT in {time.perf_counter() - t0:.1f} s")
    return model, tok


def test_offline_tasks_score_the_untrained_tiny_preset_within_0_and_1():
    model, tok = untrained_tiny()
    res = run_evaluation(model, tok, limit=8)
    assert set(res.scores) == {"ift_arith/exact_match", "ift_capitals_mc/acc"}
    assert all(0.0 <= v <= 1.0 for v in res.scores.values()), res.scores
    assert res.n_samples == {"ift_arith": 8, "ift_capitals_mc": 8}


def test_evaluate_model_leaves_train_mode_and_global_rng_as_they_were():
    model, tok = untrained_tiny()
    model.train()
    torch.manual_seed(123)
    random.seed(123)
    expected_torch, expected_py = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    evaluate_model(model, tok, tasks=["ift_capitals_mc"], limit=2)
    assert model.training
    assert torch.equal(torch.rand(3), expected_torch)
    assert random.random() == expected_py


@pytest.mark.slow
def test_trained_tiny_beats_untrained_on_the_arithmetic_generation_task(trained):
    untrained = evaluate_model(*untrained_tiny(), tasks=["ift_arith"], limit=100)["ift_arith/exact_match"]
    after = evaluate_model(*trained, tasks=["ift_arith"], limit=100)["ift_arith/exact_match"]
    print(f"\nift_arith exact_match (100 problems): untrained {untrained:.2f}, trained {after:.2f}")
    assert after >= untrained + 0.10, (untrained, after)


@pytest.mark.slow
def test_trained_tiny_beats_untrained_on_the_capitals_multiple_choice_task(trained):
    untrained = evaluate_model(*untrained_tiny(), tasks=["ift_capitals_mc"])["ift_capitals_mc/acc"]
    after = evaluate_model(*trained, tasks=["ift_capitals_mc"])["ift_capitals_mc/acc"]
    print(f"\nift_capitals_mc acc (90 questions): untrained {untrained:.2f}, trained {after:.2f}")
    assert after >= 0.8 and after >= untrained + 0.3, (untrained, after)
