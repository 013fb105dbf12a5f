"""Forward passes and per-token log-probabilities of a batch, padded or packed: what every
objective in :mod:`ift.objectives` scores.

Conventions: ``labels`` has the shape of ``input_ids`` with ``-100`` on prompt and padding
(the Hugging Face convention); the token at position t+1 is predicted from the logits at
position t.  Log-probabilities are computed in float32 whatever the model's dtype.

Packed (padding-free) batches: every model-level objective also takes
``position_ids=`` in the layout of :func:`ift.collate.pack_collate` (sequences back
to back, ``position_ids`` restarting at 0 at each sequence, ``attention_mask``
``None``).  Each sequence is then treated on its own, exactly as if it were a
row of a padded batch:

* attention: the model gets ``attention_mask=None`` and the packed
  ``position_ids``; transformers (``masking_utils.create_causal_mask`` ->
  ``find_packed_sequence_indices``) then builds a block-diagonal causal mask for
  ``sdpa`` and ``eager`` (tested; ``flex_attention`` takes the same path), and the flash-attention integration
  runs the varlen kernel on the rows flattened into one, with the boundaries
  (``cu_seq_lens``, read off ``position_ids == 0`` once per batch:
  :func:`flash_varlen_kwargs`) passed to the model rather than recomputed by
  every layer;
* targets: a sequence's first token is never a target (the logit before it is
  the previous sequence's last token);
* IFT's shifted prediction at a sequence's first position is the token itself,
  the rule position 0 of a padded row follows;
* per-token log-probs are scattered into a (num_sequences, longest) padded
  layout (:func:`unpack_sequences`), and the ``*_from_logps`` functions run on
  that unchanged, so the discounted scan of eq. (22) and the per-sequence
  normalisation stop at boundaries and the loss is the mean of per-sequence
  losses, as in a padded batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ift.data import IGNORE_INDEX

__all__ = ["token_logps", "unpack_sequences", "packed_token_logps", "response_logps"]


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the true next tokens, in float32 (float64 inputs stay float64).

    Returns ``(logps, mask)`` of shape (B, T-1): ``logps[:, t] = log π(labels[:, t+1] |
    prefix ≤ t)`` and ``mask`` marks valid targets.  Invalid positions hold 0.
    Uses ``logit - logsumexp`` rather than a full ``log_softmax`` so only one
    (B, T, V) float32 temporary is alive.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    # Upcast only: float64 stays float64 (the exactness tests rely on it).
    logits = logits[:, :-1]
    if logits.dtype != torch.float64:
        logits = logits.float()
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
    picked = torch.gather(logits, 2, safe_targets.unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return logps * mask, mask


def forward_logits(model: nn.Module, attention_mask: torch.Tensor | None, **inputs) -> torch.Tensor:
    out = model(attention_mask=attention_mask, use_cache=False, **inputs)
    return out.logits if hasattr(out, "logits") else out[0]


# --------------------------------------------------------------------------- packed batches


def check_packed(position_ids: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """Refuse a packed batch whose boundaries the model and the loss would read differently.

    transformers splits sequences where consecutive positions do not step by 1, the loss (and
    flash attention) where ``position_ids == 0``; both agree exactly when each row starts at 0
    and every position is either 0 or its predecessor + 1.  A 2-D ``attention_mask`` would switch
    transformers' packed-sequence detection off, so it must be ``None`` (or all ones, then dropped).
    """
    if position_ids.shape != input_ids.shape[:2]:
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, input_ids {tuple(input_ids.shape[:2])}")
    pos = position_ids
    checks = [(pos[:, 0] != 0).any() | ~((pos[:, 1:] == 0) | (pos[:, 1:] == pos[:, :-1] + 1)).all()]
    if attention_mask is not None:
        checks.append((attention_mask == 0).any())
    bad_layout, *bad_mask = torch.stack(checks).tolist()  # one host sync
    if any(bad_mask):
        raise ValueError(
            "a packed batch (position_ids given) has no padding mask: pass attention_mask=None "
            "(the tail padding of ift.collate.collate_packs needs none; it only has -100 labels)"
        )
    if bad_layout:
        raise ValueError(
            "packed position_ids must start each row at 0 and, inside a sequence, count up by 1 "
            "(restarting at 0 at each sequence start), the layout of ift.collate.pack_collate"
        )


def uses_flash_attention(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a wrapper's ``config`` describes) runs flash attention."""
    config = getattr(model, "config", None)
    return "flash" in str(getattr(config, "_attn_implementation", "") or "")


def flash_varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """The sequence boundaries of a packed batch, its rows flattened into one, as flash attention's
    varlen kernel takes them (transformers' ``FlashAttentionKwargs``: ``cu_seq_lens_q/k``,
    ``max_length_q/k``).  Passed to the model, they spare every attention layer of every pass from
    recomputing them out of ``position_ids`` (a device-to-host sync per layer); computed here once
    per batch, with one sync.  Each row starts at 0 (:func:`check_packed`), so flattening the rows
    keeps every boundary."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1).to(torch.int32)
    end = torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)
    cu_seq_lens = torch.cat([starts, end])
    longest = int(cu_seq_lens.diff().max())
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def packed_forward_logits(
    model: nn.Module, position_ids: torch.Tensor, *, varlen: dict[str, Any] | None = None, **inputs: torch.Tensor
) -> torch.Tensor:
    """Logits of a packed batch with attention confined to each sequence.

    ``attention_mask=None`` is what lets transformers detect the packing from ``position_ids``
    (``masking_utils._preprocess_mask_arguments`` only looks when the 2-D mask is None) and build
    the block-diagonal causal mask.  Under flash attention the rows are flattened into one (each
    row starts at 0, so the varlen boundaries are unchanged), the boundaries are handed to the
    model (``varlen``: :func:`flash_varlen_kwargs`, computed here when not given; a caller making
    several passes over one batch computes them once), and the logits are reshaped back.
    """
    rows, length = position_ids.shape
    if uses_flash_attention(model):
        flat = {k: v.reshape(1, rows * length, *v.shape[2:]) for k, v in inputs.items()}
        varlen = varlen if varlen is not None else flash_varlen_kwargs(position_ids)
        logits = forward_logits(model, None, position_ids=position_ids.reshape(1, -1), **varlen, **flat)
        return logits.view(rows, length, *logits.shape[2:])
    return forward_logits(model, None, position_ids=position_ids, **inputs)


def _sequence_layout(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Where each token of a packed batch goes in the padded layout: flat (sequence, offset) indices, S, T."""
    starts = position_ids == 0
    seq = starts.reshape(-1).cumsum(0) - 1
    # One host sync for both sizes.
    num_sequences, longest = torch.stack([starts.sum(), position_ids.max() + 1]).tolist()
    return seq, position_ids.reshape(-1), num_sequences, longest


def _scatter(x: torch.Tensor, layout: tuple[torch.Tensor, torch.Tensor, int, int], fill: float | bool) -> torch.Tensor:
    seq, offset, num_sequences, longest = layout
    out = x.new_full((num_sequences, longest, *x.shape[2:]), fill)
    out[seq, offset] = x.reshape(-1, *x.shape[2:])
    return out


def unpack_sequences(x: torch.Tensor, position_ids: torch.Tensor, *, fill: float | bool = 0) -> torch.Tensor:
    """Scatter a per-token tensor of a packed batch, shape (P, L, ...), into the padded layout (S, T, ...).

    Sequence s is the s-th sequence start (``position_ids == 0``) in row-major order and token
    ``(p, t)`` lands at ``(s, position_ids[p, t])``, so each sequence becomes a row starting at
    column 0, padded with ``fill`` to the longest, T = max position + 1 (a batch's tail padding
    continues the last sequence's positions and lands after it).  Differentiable in ``x``.
    """
    return _scatter(x, _sequence_layout(position_ids), fill)


def packed_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logps` of a packed batch, in the padded per-sequence layout.

    Returns ``(logps, mask)`` of shape (S, T-1), equal to what :func:`token_logps` gives on the
    same S sequences right-padded to length T.  The logit at a sequence's last token is never
    scored against the next sequence's first token: that target is masked whatever its label.
    """
    labels = labels.masked_fill(position_ids == 0, IGNORE_INDEX)
    logps, mask = token_logps(logits, labels)
    # logps[:, t] predicts token t+1 from token t, so it belongs to token t's sequence at offset
    # position_ids[:, t]; a zero column for the row's last token (which predicts nothing) makes it
    # (P, L), and the last column of the (S, T) layout (offset T-1 predicts nothing) is dropped.
    layout = _sequence_layout(position_ids)
    logps = _scatter(F.pad(logps, (0, 1)), layout, 0)[:, :-1]
    mask = _scatter(F.pad(mask, (0, 1), value=False), layout, False)[:, :-1]
    return logps, mask


def response_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass -> per-token log-probs of the targets and their mask, padded or packed
    (a packed batch comes back in the (sequences, length) layout of a padded one)."""
    if position_ids is None:
        logits = forward_logits(model, attention_mask, input_ids=input_ids)
        return token_logps(logits, labels)
    check_packed(position_ids, input_ids, attention_mask)
    logits = packed_forward_logits(model, position_ids, input_ids=input_ids)
    return packed_token_logps(logits, labels, position_ids)
