"""ift.objectives: each objective against hand-worked numbers and an independent float64 implementation."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from ift.forward import ObjectiveForward, run_objective, unwrap
from ift.logps import token_logps
from ift.objectives import (
    EmptyTargetError,
    LambdaSchedule,
    dpo_batch_loss,
    dpo_loss,
    frozen_embedding_copy,
    ift_loss,
    ift_loss_from_logps,
    ift_weights,
    orpo_batch_loss,
    orpo_loss,
    predict_next_tokens,
    sequence_logps,
    sft_loss,
    sft_loss_from_logps,
)
from tests.conftest import build_llama

# ----------------------------------------------------------------------------- a straightforward float64 IFT


def reference_ift(model, input_ids, attention_mask, labels, lam, decay):
    """Paper Appendix B.3 written as plainly as possible: loops, float64, no shared helpers."""
    emb = model.get_input_embeddings().weight
    batch, length = input_ids.shape
    with torch.no_grad():
        first = model(inputs_embeds=emb[input_ids], attention_mask=attention_mask).logits
    pred = input_ids.clone()
    for b in range(batch):
        for t in range(1, length):
            if labels[b, t] != -100:
                pred[b, t] = int(torch.argmax(first[b, t - 1]))
    fused = (1 - lam) * emb[input_ids] + lam * emb[pred]
    logits = model(inputs_embeds=fused, attention_mask=attention_mask).logits
    total = 0.0
    for b in range(batch):
        logp, valid = [], []
        for t in range(length - 1):
            ok = labels[b, t + 1] != -100
            valid.append(bool(ok))
            zero = torch.zeros((), dtype=logits.dtype)
            logp.append(torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]] if ok else zero)
        n = sum(valid)
        if decay == 0:
            w = [1.0 if v else 0.0 for v in valid]
        else:
            items = [-logp[k] / n if valid[k] else 0.0 for k in range(length - 1)]
            w = []
            for k in range(length - 1):
                acc = sum(decay ** (j - k) * items[j] for j in range(k, length - 1))
                w.append(acc if valid[k] else 0.0)
            scale = n / sum(w)
            w = [x * scale for x in w]
        total = total + sum(-logp[k] * w[k] for k in range(length - 1) if valid[k]) / n
    return total / batch


def make_batch(vocab=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[0, :4] = -100  # prompt
    labels[1, :2] = -100
    labels[2, :5] = -100
    labels[2, 9:] = -100  # right padding
    attention_mask[2, 9:] = 0
    input_ids[2, 9:] = 0
    return input_ids, attention_mask, labels


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lam,decay", [(0.2, 0.95), (0.5, 0.5), (0.2, 1.0), (0.0, 0.95), (0.3, 0.0)])
def test_ift_loss_and_every_gradient_match_float64_reference(lam, decay):
    ours_model, ref_model = build_llama(), build_llama()
    ids, att, lab = make_batch()
    out = ift_loss(ours_model, ids, att, lab, lam=lam, decay=decay)
    out.loss.backward()
    ref = reference_ift(ref_model, ids, att, lab, lam, decay)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)
    ours, theirs = grads(ours_model), grads(ref_model)
    assert ours.keys() == theirs.keys() and len(ours) == len(list(ours_model.parameters()))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-12, msg=name)


def test_fusion_changes_the_loss_so_the_reference_test_is_not_vacuous():
    model = build_llama()
    ids, att, lab = make_batch()
    a = ift_loss(model, ids, att, lab, lam=0.5, decay=0.0).loss
    b = ift_loss(model, ids, att, lab, lam=0.0, decay=0.0).loss
    assert not torch.isclose(a, b)


# ----------------------------------------------------------------------------- invariants


def test_lambda0_decay0_is_exactly_sft(llama64):
    ids, att, lab = make_batch()
    ift = ift_loss(llama64, ids, att, lab, lam=0.0, decay=0.0).loss
    sft = sft_loss(llama64, ids, att, lab).loss
    assert torch.equal(ift, sft)


def test_decay0_gives_unit_weights():
    logps = -torch.rand(2, 6)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(ift_weights(logps, mask, 0.0), mask.float())


def test_weights_average_one_per_sequence_and_vanish_off_target():
    logps = -torch.rand(4, 50) - 0.01
    mask = torch.rand(4, 50) > 0.3
    w = ift_weights(logps * mask, mask, 0.95)
    torch.testing.assert_close(w.sum(-1), mask.sum(-1).float())
    assert (w[~mask] == 0).all()


def test_hand_worked_weights_and_loss():
    # logps -1,-2,-3, decay .5: items 1/3, 2/3, 1 -> raw w = 11/12, 7/6, 1 (sum 37/12)
    # -> rescaled to sum 3: 33/37, 42/37, 36/37; loss = (1*33 + 2*42 + 3*36) / 37 / 3 = 225/111.
    logps = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    mask = torch.ones_like(logps, dtype=torch.bool)
    w = ift_weights(logps, mask, 0.5)
    torch.testing.assert_close(w, torch.tensor([[33 / 37, 42 / 37, 36 / 37]], dtype=torch.float64))
    loss, metrics = ift_loss_from_logps(logps, mask, 0.5)
    assert loss.item() == pytest.approx(225 / 111, rel=1e-12)
    assert metrics["weight_max"].item() == pytest.approx(42 / 37)
    sft, _ = sft_loss_from_logps(logps, mask)
    assert sft.item() == pytest.approx(2.0)


def test_right_padding_does_not_change_the_loss(llama64):
    ids, att, lab = make_batch()
    row = slice(2, 3)  # 9 real tokens, then 3 of padding
    alone = ift_loss(llama64, ids[row, :9], att[row, :9], lab[row, :9]).loss
    padded = ift_loss(llama64, ids[row], att[row], lab[row]).loss
    torch.testing.assert_close(alone, padded, rtol=1e-10, atol=0)


class LogitsReplacedAt(torch.nn.Module):
    """``model`` whose logits are replaced by large noise at the (row, position)s of ``where``, in every pass."""

    def __init__(self, model: torch.nn.Module, where: torch.Tensor) -> None:
        super().__init__()
        self.model, self.where = model, where

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, **inputs):
        logits = self.model(**inputs).logits
        noise = 10 * torch.randn(logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(1))
        return SimpleNamespace(logits=torch.where(self.where[..., None], noise, logits))


def test_prompt_positions_carry_no_loss_and_no_weight(llama64, monkeypatch):
    ids, att, lab = make_batch()
    # The prompt: labels -100 before the first response token (rows' prompts are 4, 2 and 5 tokens).
    prompt = (lab == -100) & (torch.arange(12) < torch.tensor([[4], [2], [5]]))
    # The logits at position t predict token t+1: those predicting a prompt token.
    predicts_prompt = torch.zeros_like(prompt)
    predicts_prompt[:, :-1] = prompt[:, 1:]
    used = []  # the token weights the loss applies, (B, T-1): weight t on the token at t+1

    def spy(*args, **kwargs):
        used.append(ift_weights(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr("ift.objectives.ift_weights", spy)
    with torch.no_grad():
        loss = ift_loss(llama64, ids, att, lab, lam=0.2, decay=0.95).loss
        scrambled = ift_loss(LogitsReplacedAt(llama64, predicts_prompt), ids, att, lab, lam=0.2, decay=0.95).loss
    assert torch.equal(scrambled, loss)
    # Eq. (22)'s scan runs backwards from the response: none of its weight may land on the prompt.
    weights = used[0]
    assert (weights[prompt[:, 1:]] == 0).all()
    assert (weights[lab[:, 1:] != -100] > 0).all()
    # Not vacuous: the same noise on the logits predicting each row's first response token moves the loss.
    first_response = torch.zeros_like(prompt)
    first_response[[0, 1, 2], [3, 1, 4]] = True
    with torch.no_grad():
        moved = ift_loss(LogitsReplacedAt(llama64, first_response), ids, att, lab, lam=0.2, decay=0.95).loss
    assert not torch.isclose(moved, loss)


def test_weights_carry_gradient_unless_detached():
    logps = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    live, _ = ift_loss_from_logps(logps, mask, 0.5)
    (g_live,) = torch.autograd.grad(live, logps)
    detached, _ = ift_loss_from_logps(logps, mask, 0.5, detach_weights=True)
    (g_det,) = torch.autograd.grad(detached, logps)
    assert live.item() == pytest.approx(detached.item())
    # Detached: dL/dlogp_t = -w_t / n exactly.
    torch.testing.assert_close(g_det, -torch.tensor([[33, 42, 36]], dtype=torch.float64) / 37 / 3)
    assert not torch.allclose(g_live, g_det)


def test_perfectly_predicted_sequence_gives_zero_loss_not_nan():
    logps = torch.zeros(1, 4, requires_grad=True)
    loss, _ = ift_loss_from_logps(logps, torch.ones(1, 4, dtype=torch.bool), 0.95)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logps.grad).all()


# ----------------------------------------------------------------------------- empty targets


def test_sequence_without_targets_raises_naming_the_row():
    logps = -torch.rand(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(EmptyTargetError, match=r"rows \[1\]"):
        ift_loss_from_logps(logps, mask)


def test_sequence_without_targets_is_skipped_and_counted_on_request():
    logps = -torch.rand(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    loss, metrics = ift_loss_from_logps(logps * mask, mask, on_empty="skip")
    expected, _ = ift_loss_from_logps(logps[[0, 2]], mask[[0, 2]])
    torch.testing.assert_close(loss, expected)
    assert metrics["num_skipped"].item() == 1 and metrics["num_sequences"].item() == 2


def test_batch_with_no_targets_at_all_gives_zero_loss_that_still_backpropagates(llama64):
    ids, att, lab = make_batch()
    lab[:] = -100
    out = ift_loss(llama64, ids, att, lab, on_empty="skip")
    out.loss.backward()
    assert out.loss.item() == 0.0 and not math.isnan(out.loss.item())
    assert all(torch.isfinite(p.grad).all() for p in llama64.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- options


def test_frozen_fusion_embeddings_give_the_same_loss_and_train_the_table_only_through_the_targets():
    live_model, frozen_model = build_llama(), build_llama()
    ids, att, lab = make_batch()
    live = ift_loss(live_model, ids, att, lab, lam=0.3)
    frozen = ift_loss(frozen_model, ids, att, lab, lam=0.3, fusion_embeddings=frozen_embedding_copy(frozen_model))
    live.loss.backward()
    frozen.loss.backward()
    torch.testing.assert_close(live.loss, frozen.loss)
    live_grad = live_model.get_input_embeddings().weight.grad
    frozen_grad = frozen_model.get_input_embeddings().weight.grad
    assert frozen_grad.abs().sum() > 0  # the targets' embeddings (listing line 12) still train it
    assert not torch.allclose(live_grad, frozen_grad)  # the predictions' (line 27) no longer do


def test_at_lambda_one_frozen_fusion_leaves_the_untied_input_table_no_gradient():
    # λ = 1: the fused input is the predictions' embeddings alone, all from the frozen copy.
    model = build_llama()
    ids, att, lab = make_batch()
    ift_loss(model, ids, att, lab, lam=1.0, fusion_embeddings=frozen_embedding_copy(model)).loss.backward()
    assert torch.count_nonzero(model.get_input_embeddings().weight.grad) == 0


def test_detached_prediction_embeddings_are_a_frozen_copy_of_the_current_table():
    copied, detached = build_llama(), build_llama()
    ids, att, lab = make_batch()
    a = ift_loss(copied, ids, att, lab, lam=0.3, fusion_embeddings=frozen_embedding_copy(copied))
    b = ift_loss(detached, ids, att, lab, lam=0.3, detach_prediction_embeddings=True)
    a.loss.backward()
    b.loss.backward()
    assert torch.equal(a.loss, b.loss)
    want, got = grads(copied), grads(detached)
    assert want.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in want.items())


def test_a_frozen_copy_and_detached_prediction_embeddings_together_are_refused():
    model = build_llama()
    ids, att, lab = make_batch()
    with pytest.raises(ValueError, match="not both"):
        ift_loss(
            model, ids, att, lab, fusion_embeddings=frozen_embedding_copy(model), detach_prediction_embeddings=True
        )


# ----------------------------------------------------------------------------- all passes in one forward (ift.forward)


class _Engine(torch.nn.Module):
    """What ``run_objective`` sees of a DeepSpeed engine: a module whose ``module`` it calls."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _calls(module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _packed_batch():
    ids, _, _ = make_batch()
    ids = ids[:2, :6].reshape(1, 12)
    labels = ids.clone()
    labels[0, :2] = labels[0, 6:9] = -100  # each sequence's prompt
    return ids, None, labels, torch.cat([torch.arange(6), torch.arange(6)]).unsqueeze(0)


@pytest.mark.parametrize("layout", ["padded", "frozen_fusion", "packed"])
def test_ift_loss_run_in_one_objective_forward_equals_ift_loss_on_the_model(layout):
    plain, wrapped = build_llama(), build_llama()
    ids, att, lab = make_batch()
    kwargs = {"lam": 0.3, "decay": 0.9}
    if layout == "packed":
        ids, att, lab, kwargs["position_ids"] = _packed_batch()
    expected_kwargs, wrapped_kwargs = dict(kwargs), dict(kwargs)
    if layout == "frozen_fusion":  # a module outside the wrapper, as the pipeline builds it
        expected_kwargs["fusion_embeddings"] = frozen_embedding_copy(plain)
        wrapped_kwargs["fusion_embeddings"] = frozen_embedding_copy(wrapped)
    root, lm_calls = ObjectiveForward(wrapped), _calls(wrapped)
    root_calls, engine = _calls(root), _Engine(root)
    expected = ift_loss(plain, ids, att, lab, **expected_kwargs)
    out = run_objective(engine, ift_loss, input_ids=ids, attention_mask=att, labels=lab, **wrapped_kwargs)
    assert len(root_calls) == 1 and len(lm_calls) == 2  # both passes inside one call of the root
    assert torch.equal(out.loss, expected.loss)
    assert out.metrics.keys() == expected.metrics.keys()
    assert all(torch.equal(out.metrics[k], v) for k, v in expected.metrics.items())
    expected.loss.backward()
    out.loss.backward()
    want, got = grads(plain), grads(wrapped)
    assert want.keys() == got.keys() and want
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_objective_forward_is_the_model_to_anything_that_calls_it_without_an_objective():
    model = build_llama()
    root = ObjectiveForward(model)
    ids, att, _ = make_batch()
    assert root.config is model.config  # bucket sizes and the attention implementation are read from it
    assert root.get_input_embeddings() is model.get_input_embeddings()
    assert unwrap(root) is model and unwrap(_Engine(root)) is model and unwrap(model) is model
    assert [n for n, _ in root.named_parameters()] == [f"model.{n}" for n, _ in model.named_parameters()]
    torch.testing.assert_close(root(input_ids=ids, attention_mask=att).logits, model(ids, attention_mask=att).logits)
    # Another result than an ObjectiveOutput comes back as it is; without a wrapper the call is direct.
    pair = run_objective(_Engine(root), lambda m, x: (m.config.vocab_size, x), x=torch.ones(2))
    assert pair[0] == 32 and torch.equal(pair[1], torch.ones(2))
    assert run_objective(model, lambda m, x: m is model and x, x=True)
    # A state dict of the bare model (a checkpoint from before the wrapper) loads into the wrapper.
    other = build_llama(seed=1)
    root.load_state_dict(other.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters(), strict=True))
    root.load_state_dict(ObjectiveForward(build_llama(seed=2)).state_dict())
    assert torch.equal(model.lm_head.weight, build_llama(seed=2).lm_head.weight)


def test_sampling_with_top_k_1_is_greedy():
    logits = torch.randn(2, 7, 11)
    assert torch.equal(predict_next_tokens(logits, strategy="sample", top_k=1), logits.argmax(-1))


def test_sampling_with_tiny_top_p_is_greedy():
    logits = torch.randn(2, 7, 11)
    assert torch.equal(predict_next_tokens(logits, strategy="sample", top_p=1e-6), logits.argmax(-1))


def test_sampling_is_reproducible_with_a_generator():
    logits = torch.randn(2, 7, 11)
    a = predict_next_tokens(logits, strategy="sample", generator=torch.Generator().manual_seed(3))
    b = predict_next_tokens(logits, strategy="sample", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_ift_metrics_report_lambda_and_the_number_of_target_tokens(llama64):
    ids, att, lab = make_batch()
    m = ift_loss(llama64, ids, att, lab, lam=0.3).metrics
    assert m["lam"].item() == pytest.approx(0.3)
    assert m["num_tokens"].item() == (lab[:, 1:] != -100).sum().item() == 22


def forced_batch(model, hit, batch=None, vocab=32):
    """The batch (default make_batch's) with the k-th response token of each row set to the model's greedy
    choice after the tokens before it where ``hit(k)``, and to another token elsewhere (greedy decoding)."""
    ids, att, lab = (t.clone() for t in (batch or make_batch(vocab)))
    with torch.no_grad():
        for b in range(ids.shape[0]):
            k = 0
            for t in range(1, ids.shape[1]):
                if lab[b, t] == -100:
                    continue
                greedy = int(model(input_ids=ids[b : b + 1, :t]).logits[0, -1].argmax())
                ids[b, t] = lab[b, t] = greedy if hit(k) else (greedy + 1) % vocab
                k += 1
    return ids, att, lab


def count_greedy_hits(model, ids, att, lab):
    """(hits, targets): response positions t whose token is the argmax of an explicit no-grad forward at t-1."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits
    hits = targets = 0
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if lab[b, t] != -100:
                targets += 1
                hits += int(logits[b, t - 1].argmax() == ids[b, t])
    return hits, targets


def test_prediction_accuracy_is_the_share_of_response_tokens_the_model_predicts_greedily(llama64):
    # Response lengths 8, 10, 4; every third response token (k = 0, 3, 6, 9) is the model's choice: 3 + 4 + 2 = 9.
    ids, att, lab = forced_batch(llama64, hit=lambda k: k % 3 == 0)
    assert count_greedy_hits(llama64, ids, att, lab) == (9, 22)
    accuracy = ift_loss(llama64, ids, att, lab, lam=0.3).metrics["prediction_accuracy"]
    assert accuracy.item() == pytest.approx(9 / 22, rel=1e-6)


def test_prediction_accuracy_is_1_when_every_response_token_is_the_models_greedy_choice(llama64):
    ids, att, lab = forced_batch(llama64, hit=lambda k: True)
    assert count_greedy_hits(llama64, ids, att, lab) == (22, 22)
    assert ift_loss(llama64, ids, att, lab).metrics["prediction_accuracy"].item() == 1.0


def test_prediction_accuracy_is_0_when_no_response_token_is_the_models_greedy_choice(llama64):
    ids, att, lab = forced_batch(llama64, hit=lambda k: False)
    assert count_greedy_hits(llama64, ids, att, lab) == (0, 22)
    assert ift_loss(llama64, ids, att, lab).metrics["prediction_accuracy"].item() == 0.0


def test_prediction_accuracy_ignores_the_first_token_which_nothing_predicts(llama64):
    ids = make_batch()[0][:1, :8]
    no_prompt = (ids, torch.ones_like(ids), ids.clone())  # every label is a target, position 0 included
    ids, att, lab = forced_batch(llama64, hit=lambda k: False, batch=no_prompt)
    assert count_greedy_hits(llama64, ids, att, lab) == (0, 7)  # positions 1..7 are predicted, none correctly
    assert ift_loss(llama64, ids, att, lab).metrics["prediction_accuracy"].item() == 0.0


def test_lambda_outside_unit_interval_is_rejected(llama64):
    with pytest.raises(ValueError, match="lam must lie"):
        ift_loss(llama64, *make_batch(), lam=1.5)


def test_lambda_schedule_linear_warmup():
    s = LambdaSchedule(lam_max=0.2, kind="linear_warmup", lam_min=0.0, warmup_steps=10)
    assert [s(0), s(5), s(10), s(100)] == pytest.approx([0.0, 0.1, 0.2, 0.2])


def test_lambda_schedule_jitter_is_seeded_and_clipped():
    s = LambdaSchedule(lam_max=0.05, jitter_std=1.0)
    a = [s(0, torch.Generator().manual_seed(1)) for _ in range(3)]
    b = [s(0, torch.Generator().manual_seed(1)) for _ in range(3)]
    assert a == b
    values = [s(0, g) for g in [torch.Generator().manual_seed(i) for i in range(50)]]
    assert min(values) == 0.0 and all(0.0 <= v <= 1.0 for v in values)


def test_lambda_schedule_validates_its_range():
    with pytest.raises(ValueError, match="lam_max"):
        LambdaSchedule(lam_max=2.0)


# ----------------------------------------------------------------------------- baselines


def test_token_logps_masks_and_shifts():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[-100, 0, 1]])
    logps, mask = token_logps(logits, labels)
    assert mask.tolist() == [[True, True]]
    torch.testing.assert_close(logps, torch.log(torch.tensor([[0.5, 0.8]])))


def test_dpo_hand_computed():
    # margins = .1*(-1 - -2) - .1*(-3 - -2) = 0.2 -> loss = log(1 + e^-0.2)
    loss, m = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)))
    assert m["reward_chosen"].item() == pytest.approx(0.1) and m["reward_accuracy"].item() == 1.0


def test_orpo_hand_computed():
    # p(y+)=1/2 -> odds 1; p(y-)=1/4 -> odds 1/3; -log sigma(log 3) = log(4/3); NLL(y+) = log 2.
    c, r = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    loss, m = orpo_loss(c, r, -c, beta=0.25)
    assert loss.item() == pytest.approx(math.log(2) + 0.25 * math.log(4 / 3), rel=1e-6)
    assert m["log_odds_ratio"].item() == pytest.approx(math.log(3), rel=1e-6)


def test_orpo_is_finite_when_the_chosen_response_is_certain():
    loss, _ = orpo_loss(torch.tensor([0.0]), torch.tensor([-2.0]), torch.tensor([0.0]))
    assert torch.isfinite(loss)


def preference_batch():
    ids, att, lab = make_batch()
    return {
        "chosen_input_ids": ids,
        "chosen_attention_mask": att,
        "chosen_labels": lab,
        "rejected_input_ids": torch.where(lab == -100, ids, (ids + 1) % 32),
        "rejected_attention_mask": att,
        "rejected_labels": torch.where(lab == -100, lab, (ids + 1) % 32),
    }


def test_dpo_against_itself_as_reference_is_log2(llama64):
    out = dpo_batch_loss(llama64, preference_batch(), reference_model=copy.deepcopy(llama64))
    assert out.loss.item() == pytest.approx(math.log(2))


def test_dpo_with_precomputed_reference_equals_dpo_with_the_reference_model():
    """The same loss, gradients and metrics.  (Precomputed references in a packed batch:
    tests/ift/test_packing.py; the training pipeline's table of them: tests/pipelines/test_methods.py.)"""
    policy, batch = build_llama(), preference_batch()
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01)
    live = dpo_batch_loss(policy, batch, reference_model=ref)
    live.loss.backward()
    live_grads = grads(policy)
    policy.zero_grad(set_to_none=True)

    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    lab = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    with torch.no_grad():
        ref_logps, _ = sequence_logps(ref, ids, att, lab)
    precomputed = {"reference_chosen_logps": ref_logps[:3], "reference_rejected_logps": ref_logps[3:]}
    pre = dpo_batch_loss(policy, batch | precomputed)
    pre.loss.backward()

    torch.testing.assert_close(pre.loss, live.loss)
    pre_grads = grads(policy)
    assert pre_grads.keys() == live_grads.keys() and len(live_grads) > 0
    for name, g in live_grads.items():
        torch.testing.assert_close(pre_grads[name], g, msg=name)
    assert pre.metrics.keys() == live.metrics.keys()
    for key, value in live.metrics.items():
        torch.testing.assert_close(pre.metrics[key], value, msg=key)


def test_dpo_without_a_reference_says_what_is_missing(llama64):
    with pytest.raises(ValueError, match="reference_model"):
        dpo_batch_loss(llama64, preference_batch())


def test_orpo_batch_loss_matches_formula_on_model_logps(llama64):
    batch = preference_batch()
    out = orpo_batch_loss(llama64, batch)
    c, nc = sequence_logps(llama64, *(batch[f"chosen_{k}"] for k in ("input_ids", "attention_mask", "labels")))
    r, nr = sequence_logps(llama64, *(batch[f"rejected_{k}"] for k in ("input_ids", "attention_mask", "labels")))
    expected, _ = orpo_loss(c / nc, r / nr, -c / nc)
    torch.testing.assert_close(out.loss, expected)
