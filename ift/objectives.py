"""Training objectives: IFT and the paper's baselines (SFT, DPO, ORPO).

Equation numbers refer to Hua et al., "Intuitive Fine-Tuning: Towards
Simplifying Alignment into a Single Process" (arXiv:2405.11870).

Every objective comes in two layers:

* a pure function of per-token log-probabilities (``*_from_logps`` / ``dpo_loss``
  / ``orpo_loss``), small enough to check by hand;
* a model-level function that runs the forward pass(es) and returns an
  :class:`ObjectiveOutput` (``.loss`` plus detached metrics), usable in any
  PyTorch loop.

Packed (padding-free) batches: every model-level objective also takes
``position_ids=`` in the layout of :func:`ift.collate.pack_collate`, and treats each
sequence exactly as a row of a padded batch.  The forward passes, per-token
log-probabilities and their conventions (labels, shifting, float32), padded or
packed, are in :mod:`ift.logps`; this module holds the equations.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ift.data import IGNORE_INDEX
from ift.logps import (
    check_packed,
    flash_varlen_kwargs,
    forward_logits,
    packed_forward_logits,
    packed_token_logps,
    response_logps,
    token_logps,
    uses_flash_attention,
)
from ift.scan import discounted_cumsum

__all__ = [
    "IGNORE_INDEX",
    "ObjectiveOutput",
    "LambdaSchedule",
    "EmptyTargetError",
    "sft_loss_from_logps",
    "ift_weights",
    "ift_loss_from_logps",
    "sft_loss",
    "ift_loss",
    "predict_next_tokens",
    "frozen_embedding_copy",
    "dpo_loss",
    "orpo_loss",
    "sequence_logps",
    "concat_pair",
    "pair_sequence_logps",
    "reference_pair_logps",
    "dpo_batch_loss",
    "orpo_batch_loss",
]


class EmptyTargetError(ValueError):
    """A sequence in the batch has no target tokens (every label is -100)."""


@dataclass
class ObjectiveOutput:
    """What every objective returns: the scalar ``loss`` to backpropagate and
    detached scalar ``metrics`` (tensors, so logging decides when to sync)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _target_counts(mask: torch.Tensor, on_empty: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid-target count per sequence and the mask of sequences that have any.

    ``on_empty="raise"`` raises :class:`EmptyTargetError` naming the rows;
    ``"skip"`` lets the caller exclude them (and count them in the metrics).
    """
    n = mask.sum(-1)
    keep = n > 0
    if on_empty not in ("raise", "skip"):
        raise ValueError(f"on_empty must be 'raise' or 'skip', got {on_empty!r}")
    if on_empty == "raise" and not bool(keep.all()):
        rows = torch.nonzero(~keep).flatten().tolist()
        raise EmptyTargetError(
            f"batch rows {rows} have no target tokens (all labels are -100): the prompt "
            "filled max_length or the response is empty. Drop such rows in data "
            "preparation (ift.data reports them), or pass on_empty='skip'."
        )
    return n, keep


def _mean_over_kept(per_sequence: torch.Tensor, keep: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_sequence`` over kept rows; 0 (still attached to the graph) if none."""
    if bool(keep.any()):
        return per_sequence[keep].mean()
    # Every rank must still run backward (DDP/ZeRO collectives), so stay in the graph.
    return anchor.sum() * 0.0


# --------------------------------------------------------------------------- pure objectives


def sft_loss_from_logps(
    logps: torch.Tensor, mask: torch.Tensor, *, on_empty: str = "raise"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SFT, paper eq. (27): ``mean_b [ Σ_t −log π(a*_t | s*_t) / n_b ]``.

    Each sequence's NLL is averaged over its own n_b target tokens, then
    sequences are averaged, the same length normalisation IFT uses.
    """
    n, keep = _target_counts(mask, on_empty)
    per_seq = -(logps * mask).sum(-1) / n.clamp(min=1)
    loss = _mean_over_kept(per_seq, keep, logps)
    metrics = {
        "nll": loss.detach(),
        "num_sequences": keep.sum().detach().float(),
        "num_skipped": (~keep).sum().detach().float(),
        "num_tokens": n.sum().detach().float(),
    }
    return loss, metrics


def ift_weights(
    logps: torch.Tensor,
    mask: torch.Tensor,
    decay: float | torch.Tensor,
    *,
    detach: bool = False,
) -> torch.Tensor:
    """Dynamic Relation Propagation weights, paper eqs. (22)/(25) with decay (B.1).

    Eq. (22) sums, for every start n, the losses of all tokens i ≥ n, so token
    i's loss is counted once per earlier-or-equal start; with the decay of
    Appendix B.1 (the Bellman-style discount of A.3) this becomes a right
    discounted cumulative sum.  Following the authors' release (B.3):

    * ``item_t = −logp_t / n`` on valid tokens, 0 elsewhere;
    * ``w_t = Σ_{k ≥ t} γ^{k−t} item_k``  (:func:`ift.scan.discounted_cumsum`);
    * ``w`` is zeroed off-target and rescaled so each sequence's weights sum to
      n (they average 1, keeping the loss on SFT's scale).

    ``decay = 0`` turns propagation off: every target weight is exactly 1, so
    IFT with λ=0 is SFT.  Gradients flow through the weights unless ``detach``:
    the method's authors confirm the gradient is meant to pass through them.
    Sequences with no target get zero weights.
    """
    maskf = mask.to(logps.dtype)
    if not isinstance(decay, torch.Tensor) and decay == 0:
        return maskf
    n = maskf.sum(-1, keepdim=True)
    items = -logps * maskf / n.clamp(min=1)
    w = discounted_cumsum(items, decay) * maskf
    total = w.sum(-1, keepdim=True)
    # A sequence predicted perfectly has all-zero items; its loss is 0 whatever the
    # weights, so fall back to 1s instead of dividing by zero (NaN gradients).
    ok = total > 0
    w = torch.where(ok, w * (n / torch.where(ok, total, torch.ones_like(total))), maskf)
    return w.detach() if detach else w


def ift_loss_from_logps(
    logps: torch.Tensor,
    mask: torch.Tensor,
    decay: float | torch.Tensor = 0.95,
    *,
    detach_weights: bool = False,
    on_empty: str = "raise",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IFT loss from the fused pass's log-probs, eq. (22):
    ``mean_b [ Σ_t −logp_t · w_t / n_b ]`` with ``w`` from :func:`ift_weights`."""
    n, keep = _target_counts(mask, on_empty)
    w = ift_weights(logps, mask, decay, detach=detach_weights)
    per_seq = (-(logps * mask) * w).sum(-1) / n.clamp(min=1)
    loss = _mean_over_kept(per_seq, keep, logps)
    valid_w = w.detach()[mask]
    nll = -(logps.detach() * mask).sum(-1) / n.clamp(min=1)
    metrics = {
        "nll": nll[keep].mean() if bool(keep.any()) else nll.sum() * 0,
        "weight_mean": valid_w.mean() if valid_w.numel() else valid_w.sum(),
        "weight_max": valid_w.max() if valid_w.numel() else valid_w.sum(),
        "num_sequences": keep.sum().detach().float(),
        "num_skipped": (~keep).sum().detach().float(),
        "num_tokens": n.sum().detach().float(),
    }
    return loss, metrics


# --------------------------------------------------------------------------- λ schedule


@dataclass
class LambdaSchedule:
    """λ of eq. (17) as a function of the optimizer step.

    ``kind="constant"`` gives ``lam_max`` throughout; ``"linear_warmup"`` ramps
    from ``lam_min`` to ``lam_max`` over ``warmup_steps``.  ``jitter_std`` adds
    Gaussian noise (clipped to [0, 1]) per call, drawn from ``generator`` so runs
    are reproducible.
    """

    lam_max: float = 0.2
    kind: Literal["constant", "linear_warmup"] = "constant"
    lam_min: float = 0.0
    warmup_steps: int = 0
    jitter_std: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lam_min", "lam_max"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        if self.kind not in ("constant", "linear_warmup"):
            raise ValueError(f"kind must be 'constant' or 'linear_warmup', got {self.kind!r}")
        if self.warmup_steps < 0 or self.jitter_std < 0:
            raise ValueError("warmup_steps and jitter_std must be non-negative")

    def base(self, step: int) -> float:
        if self.kind == "constant" or self.warmup_steps == 0:
            return self.lam_max
        frac = min(max(step, 0) / self.warmup_steps, 1.0)
        return self.lam_min + frac * (self.lam_max - self.lam_min)

    def __call__(self, step: int, generator: torch.Generator | None = None) -> float:
        lam = self.base(step)
        if self.jitter_std > 0:
            lam += float(torch.randn((), generator=generator)) * self.jitter_std
        return min(max(lam, 0.0), 1.0)


# --------------------------------------------------------------------------- model-level objectives


def sft_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    on_empty: str = "raise",
    position_ids: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """SFT (eq. 27) on the response tokens, length-normalised per sequence.

    With ``position_ids`` the batch is packed (module docstring): the same loss and metrics as
    the same sequences in a padded batch.
    """
    logps, mask = response_logps(model, input_ids, attention_mask, labels, position_ids)
    loss, metrics = sft_loss_from_logps(logps, mask, on_empty=on_empty)
    return ObjectiveOutput(loss, metrics)


def predict_next_tokens(
    logits: torch.Tensor,
    *,
    strategy: Literal["greedy", "sample"] = "greedy",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The model's own choice at every position (paper B.3, step 1).

    ``greedy`` is the paper's argmax; ``sample`` draws from the temperature /
    top-k / top-p filtered distribution, as the authors' release allows.
    """
    if strategy == "greedy":
        return logits.argmax(-1)
    if strategy != "sample":
        raise ValueError(f"strategy must be 'greedy' or 'sample', got {strategy!r}")
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for sampling; use strategy='greedy' for argmax")
    scores = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = sorted_scores.softmax(-1)
        # Drop a token once the mass before it already exceeds top_p (the top token always stays).
        drop_sorted = (probs.cumsum(-1) - probs) > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(probs.shape[:-1])


def frozen_embedding_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of the model's input embeddings, for ``ift_loss(fusion_embeddings=...)``: the
    authors' ``self.embed_tokens`` (paper Appendix B.3, listing line 27), which embeds the model's own
    predictions, so the fusion does not train the table through them.  The authors refresh it from the
    policy after every optimizer step; ``ift_loss(detach_prediction_embeddings=True)`` is that refreshed
    copy without the copy (and works under ZeRO-3, where a copy of partitioned embeddings is empty).
    """
    emb = copy.deepcopy(model.get_input_embeddings())
    emb.requires_grad_(False)
    return emb


def ift_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    lam: float = 0.2,
    decay: float = 0.95,
    *,
    detach_weights: bool = False,
    prediction: Literal["greedy", "sample"] = "greedy",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    fusion_embeddings: nn.Module | None = None,
    detach_prediction_embeddings: bool = False,
    on_empty: str = "raise",
    position_ids: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """Intuitive Fine-Tuning loss for one batch (paper §4, Appendix B.3).

    1. *Inference one step ahead*: a no-grad pass on ``E(input_ids)``; the greedy
       prediction for position t is ``argmax logits[:, t-1]`` (``pred[:, 0] =
       input_ids[:, 0]``).  Prompt and padding positions (``labels == -100``) keep
       their true token.
    2. *Intuitive preference estimation*, eq. (17): the input is
       ``(1-λ)·E(input_ids) + λ·E(pred)``, i.e. each target state is mixed with
       the state the model itself would have produced; a second pass with
       gradients gives float32 log-probs of the true next tokens.
    3. *Dynamic relation propagation*, eq. (22): token losses are weighted by
       :func:`ift_weights` (discount ``decay``).

    Returns an :class:`ObjectiveOutput` whose metrics include ``lam``,
    ``weight_mean``/``weight_max``, the fused-pass ``nll`` and
    ``prediction_accuracy`` (how often the model's own prediction equals the
    target on response tokens, i.e. how far the fused input is from the SFT one).

    The targets are embedded by the model's own table (listing line 12), with gradients.  The
    predictions are embedded by ``fusion_embeddings`` when given (listing line 27: the authors' frozen
    ``self.embed_tokens``, :func:`frozen_embedding_copy`), else by the model's table; with
    ``detach_prediction_embeddings`` by the model's table out of the gradient, which is what the
    authors' copy is when refreshed from the policy after every optimizer step, as their release does.

    With ``lam=0`` and ``decay=0`` this is exactly :func:`sft_loss`.

    With ``position_ids`` the batch is packed (module docstring): both passes attend within each
    sequence only, a sequence's first position keeps its own token (as position 0 of a padded
    row does) instead of the previous sequence's last prediction, and eq. (22)'s scan and the
    per-sequence normalisation run on each sequence alone, so loss, gradients and metrics equal
    those of the same sequences in a padded batch (with greedy prediction; sampling draws its
    random numbers in another shape).  A sequence's first token is never a target there, so it is
    not counted in ``prediction_accuracy`` even if its label is set.
    """
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    if fusion_embeddings is not None and detach_prediction_embeddings:
        raise ValueError("give fusion_embeddings (a frozen copy) or detach_prediction_embeddings, not both")
    embed = model.get_input_embeddings()

    def embed_predictions(ids: torch.Tensor) -> torch.Tensor:
        if fusion_embeddings is not None:
            return fusion_embeddings(ids)
        return embed(ids).detach() if detach_prediction_embeddings else embed(ids)

    packed = position_ids is not None
    if packed:
        check_packed(position_ids, input_ids, attention_mask)
        # Nothing in the row predicts a sequence's first token (the logit before it is the
        # previous sequence's), so it is neither a target nor a fused position.
        labels = labels.masked_fill(position_ids == 0, IGNORE_INDEX)

    # Under flash attention both passes share the batch's sequence boundaries, computed once.
    varlen = flash_varlen_kwargs(position_ids) if packed and uses_flash_attention(model) else None

    def forward(**inputs: torch.Tensor) -> torch.Tensor:
        if packed:
            return packed_forward_logits(model, position_ids, varlen=varlen, **inputs)
        return forward_logits(model, attention_mask, **inputs)

    is_target = labels != IGNORE_INDEX
    # No logit predicts a row's first token, so the loss never scores it (token_logps starts
    # at position 1): it is neither fused nor counted as a hit, whatever its label says.
    is_target[:, 0] = False

    with torch.no_grad():
        logits = forward(inputs_embeds=embed(input_ids))
        next_pred = predict_next_tokens(
            logits, strategy=prediction, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        del logits
        shifted = torch.cat([input_ids[:, :1], next_pred[:, :-1]], dim=1)
        if packed:
            # The padded rule for position 0, at every sequence start: never the previous
            # sequence's last prediction.
            shifted = torch.where(position_ids == 0, input_ids, shifted)
        pred_ids = torch.where(is_target, shifted, input_ids)
        hits = ((pred_ids == input_ids) & is_target).sum()
        accuracy = hits.float() / is_target.sum().clamp(min=1)

    true_embeds = embed(input_ids)
    if lam == 0:
        fused = true_embeds
    else:
        fused = (1.0 - lam) * true_embeds + lam * embed_predictions(pred_ids)
    logits = forward(inputs_embeds=fused)
    if packed:
        logps, mask = packed_token_logps(logits, labels, position_ids)
    else:
        logps, mask = token_logps(logits, labels)
    loss, metrics = ift_loss_from_logps(logps, mask, decay, detach_weights=detach_weights, on_empty=on_empty)
    metrics["lam"] = torch.tensor(float(lam))
    metrics["prediction_accuracy"] = accuracy.detach()
    return ObjectiveOutput(loss, metrics)


# --------------------------------------------------------------------------- preference baselines


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO (Rafailov et al.; paper eq. 32, offline form).

    ``−log σ(β·[(log π(y+) − log π_ref(y+)) − (log π(y−) − log π_ref(y−))])``
    averaged over the batch; inputs are summed sequence log-probs, shape (B,).
    Metrics: implicit rewards ``β·(log π − log π_ref)`` and their accuracy.
    """
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    margins = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(margins)
    metrics = {
        "reward_chosen": chosen_rewards.detach().mean(),
        "reward_rejected": rejected_rewards.detach().mean(),
        "reward_margin": margins.detach().mean(),
        "reward_accuracy": (margins.detach() > 0).float().mean(),
    }
    return losses.mean(), metrics


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for x < 0, stable on both sides of −log 2 (Mächler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float = 0.25,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al. 2024), the paper's β=0.25 baseline.

    ``L = NLL(y+) + β · (−log σ(log odds(y+) − log odds(y−)))`` with
    ``log odds(y) = p̄ − log(1 − exp(p̄))`` and ``p̄`` the length-averaged
    log-prob of the response.  Inputs have shape (B,); ``chosen_nll`` is the
    per-sequence length-normalised NLL of the chosen response.
    """
    log_odds = (chosen_mean_logps - rejected_mean_logps) - (
        _log1mexp(chosen_mean_logps) - _log1mexp(rejected_mean_logps)
    )
    ratio_losses = -F.logsigmoid(log_odds)
    loss = chosen_nll.mean() + beta * ratio_losses.mean()
    metrics = {
        "nll": chosen_nll.detach().mean(),
        "log_odds_ratio": log_odds.detach().mean(),
        "odds_ratio_loss": ratio_losses.detach().mean(),
        "reward_accuracy": (log_odds.detach() > 0).float().mean(),
    }
    return loss, metrics


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-prob and response length per sequence, shape (B,) each.

    With ``position_ids`` (a packed batch) there is one entry per packed sequence, in row-major
    order, shape (S,).
    """
    logps, mask = response_logps(model, input_ids, attention_mask, labels, position_ids)
    n = mask.sum(-1)
    if not bool((n > 0).all()):
        rows = torch.nonzero(n == 0).flatten().tolist()
        raise EmptyTargetError(f"preference batch rows {rows} have no response tokens")
    return logps.sum(-1), n


def concat_pair(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Chosen and rejected stacked into one forward (they are padded to one length).

    Returns ``(input_ids, attention_mask, labels, b)``: rows ``[:b]`` are chosen, ``[b:]`` rejected.
    """
    b = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    lab = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    return ids, att, lab, b


def pair_sequence_logps(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts of every pair's chosen and rejected
    sequence, in one forward: ``(chosen logps, rejected logps, chosen tokens, rejected tokens)``, (B,) each.

    Padded (``chosen_*``/``rejected_*``): :func:`concat_pair`.  Packed (``pair_*``, the layout of
    :func:`ift.collate.pack_collate`): sequence 2k (row-major) is pair k's chosen, 2k+1 its rejected.
    """
    if "pair_position_ids" not in batch:
        ids, att, lab, b = concat_pair(batch)
        logps, n = sequence_logps(model, ids, att, lab)
        return logps[:b], logps[b:], n[:b], n[b:]
    logps, n = sequence_logps(
        model, batch["pair_input_ids"], None, batch["pair_labels"], position_ids=batch["pair_position_ids"]
    )
    if logps.shape[0] % 2:
        raise ValueError(f"a packed preference batch holds {logps.shape[0]} sequences: expected chosen/rejected pairs")
    return logps[0::2], logps[1::2], n[0::2], n[1::2]


@torch.no_grad()
def reference_pair_logps(
    reference_model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the chosen and the rejected sequences under the frozen
    reference π_ref of DPO (paper eq. 32), shape (B,) each (B pairs, padded or packed)."""
    chosen, rejected, _, _ = pair_sequence_logps(reference_model, batch)
    return chosen, rejected


def dpo_batch_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    beta: float = 0.1,
    reference_model: nn.Module | None = None,
) -> ObjectiveOutput:
    """DPO on a collated preference batch, padded (``chosen_*``/``rejected_*``) or packed (``pair_*``).

    The reference log-probs come from ``reference_model`` (a frozen copy of the
    start policy, run under no-grad), or were precomputed once and stored in the
    batch as ``reference_chosen_logps`` / ``reference_rejected_logps`` (one per pair, in pair order).

    A packed batch (from :func:`ift.collate.pack_collate`) gives the value and gradients of the same
    pairs padded.
    """
    if "reference_chosen_logps" in batch:
        ref_c, ref_r = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    elif reference_model is None:
        raise ValueError("dpo needs reference_model, or precomputed reference_*_logps in the batch")
    else:
        ref_c, ref_r = reference_pair_logps(reference_model, batch)
    pol_c, pol_r, n_c, _ = pair_sequence_logps(model, batch)
    loss, metrics = dpo_loss(pol_c, pol_r, ref_c.to(pol_c.dtype), ref_r.to(pol_c.dtype), beta=beta)
    metrics["nll"] = (-pol_c / n_c).detach().mean()
    metrics["num_sequences"] = torch.tensor(float(pol_c.shape[0]))
    metrics["num_tokens"] = n_c.sum().detach().float()
    return ObjectiveOutput(loss, metrics)


def orpo_batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, beta: float = 0.25) -> ObjectiveOutput:
    """ORPO on a collated preference batch, padded or packed (as :func:`dpo_batch_loss`); no reference model."""
    pol_c, pol_r, n_c, n_r = pair_sequence_logps(model, batch)
    mean_c, mean_r = pol_c / n_c, pol_r / n_r
    loss, metrics = orpo_loss(mean_c, mean_r, -mean_c, beta=beta)
    metrics["num_sequences"] = torch.tensor(float(pol_c.shape[0]))
    metrics["num_tokens"] = n_c.sum().detach().float()
    return ObjectiveOutput(loss, metrics)
