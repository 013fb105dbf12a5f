"""Tokenized examples -> batches: the padded and the packed (padding-free) layouts.

Two batch layouts
-----------------

*Padded* (:func:`pad_collate`): one example per row, right-padded to the
longest row, with an ``attention_mask``.

*Packed*, padding-free (:func:`pack_collate` = :func:`pack_examples` +
:func:`join_pack` + :func:`collate_packs`), Hugging Face's flattening layout::

    input_ids     [ a0 a1 a2 a3 | b0 b1 b2 | c0 c1 | pad pad ]
    labels        [ -100 ..  a3 | -100 .. b2 | -100 c1 | -100 -100 ]
    position_ids  [ 0  1  2  3  | 0  1  2  | 0  1  | 2   3   ]

Sequences sit back to back in a row of at most ``pack_length`` tokens, with
no padding inside; ``position_ids`` restarts at 0 at each sequence start, which
is how every consumer finds the boundaries; ``labels`` is ``-100`` at each
sequence's first position (nothing in the row predicts it).  When several
packed rows form one batch they are right-padded to one length with a tail
that *continues* the last sequence's positions, so the tail is never a sequence
of its own (it has no targets, and causal attention keeps it out of every real
token's view).  There is no ``attention_mask``: the objectives of
:mod:`ift.objectives` take ``position_ids=`` and build per-sequence attention
from it.

Preference pairs pack as one item of chosen + rejected tokens, the two sequences
side by side in one row, chosen first, under the keys ``pair_input_ids``,
``pair_labels`` and ``pair_position_ids``::

    pair_input_ids  [ c0 c0 c0 | r0 r0 | c1 c1 c1 c1 | r1 r1 r1 | pad ]

So in row-major order sequence 2k is pair k's chosen and 2k+1 its rejected one,
which is all :func:`ift.objectives.dpo_batch_loss` needs (no index tensor), a
pair never straddles rows, and the packing is 1-D (one size per pair): the rows
fill as tightly as SFT's, and chosen and rejected run in one forward as they do
padded.  Per-example scalars (``row``, ``source``, ``reference_chosen_logps``)
are carried once per pair, in pair order.
"""

from __future__ import annotations

import bisect
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from ift.data import IGNORE_INDEX

# --------------------------------------------------------------------------- collate


def _same_keys(items: Sequence[Mapping[str, Any]], what: str, item: str) -> list[str]:
    """The keys every item of a batch shares (an error naming the first item that differs)."""
    if not items:
        raise ValueError(f"{what} got an empty batch")
    keys = list(items[0])
    for i, x in enumerate(items[1:], start=1):
        if set(x) != set(keys):
            raise ValueError(f"{item} {i} has keys {sorted(x)}, {item.split()[-1]} 0 has {sorted(keys)}")
    return keys


def _pad_value(key: str, pad_token_id: int) -> int:
    if key.endswith("input_ids"):
        return pad_token_id
    if key.endswith("labels"):
        return IGNORE_INDEX
    if key.endswith("attention_mask"):
        return 0
    raise KeyError(key)


def pad_collate(
    examples: list[dict[str, Any]],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row and build attention masks.

    Token keys are recognised by suffix: ``*input_ids`` (padded with
    ``pad_token_id``), ``*labels`` (padded with ``-100``), plus a
    ``*attention_mask`` (1 on real tokens) built for every ``*input_ids`` key
    (``input_ids`` -> ``attention_mask``, ``chosen_input_ids`` ->
    ``chosen_attention_mask``).  All token keys share one padded length, so
    chosen and rejected batches can be concatenated into a single forward.
    Numeric scalar keys become 1-D tensors.
    """
    keys = _same_keys(examples, "pad_collate", "batch example")
    token_keys = [k for k in keys if k.endswith(("input_ids", "labels"))]
    other_keys = [k for k in keys if k not in token_keys and not k.endswith("attention_mask")]
    for k in token_keys:
        ids_key = k[: -len("labels")] + "input_ids"
        if k.endswith("labels") and ids_key in keys:
            for i, ex in enumerate(examples):
                if len(ex[k]) != len(ex[ids_key]):
                    raise ValueError(f"batch example {i}: {k} and {ids_key} differ in length")
    length = max((len(ex[k]) for ex in examples for k in token_keys), default=0)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of

    batch: dict[str, torch.Tensor] = {}
    for k in token_keys:
        pad = _pad_value(k, pad_token_id)
        batch[k] = torch.tensor([list(ex[k]) + [pad] * (length - len(ex[k])) for ex in examples], dtype=torch.long)
        if k.endswith("input_ids"):
            mask_key = k[: -len("input_ids")] + "attention_mask"
            batch[mask_key] = torch.tensor(
                [[1] * len(ex[k]) + [0] * (length - len(ex[k])) for ex in examples], dtype=torch.long
            )
    for k in other_keys:
        values = [ex[k] for ex in examples]
        if not all(isinstance(v, (int, float, bool)) for v in values):
            raise ValueError(f"pad_collate cannot batch key {k!r}: expected token lists or numeric scalars")
        batch[k] = torch.tensor(values)
    return batch


# --------------------------------------------------------------------------- packing

PackingStrategy = Literal["best_fit_decreasing", "greedy"]
PACKING_STRATEGIES: tuple[str, ...] = ("best_fit_decreasing", "greedy")
# Keys the packed layout derives itself; an example's own copies are ignored.
_DERIVED_SUFFIXES = ("attention_mask", "position_ids")


def _sequence_prefixes(example: Mapping[str, Any]) -> list[str]:
    """``""`` for an SFT example, ``["chosen_", "rejected_"]`` for a preference pair."""
    return sorted(k[: -len("input_ids")] for k in example if k.endswith("input_ids"))


def _check_same_keys(examples: Sequence[Mapping[str, Any]], what: str) -> list[str]:
    keys = _same_keys(examples, what, f"{what}: example")
    if not any(k.endswith("input_ids") for k in keys):
        raise ValueError(f"{what}: examples have no '*input_ids' key (keys {sorted(keys)})")
    return keys


def _pack_sizes(examples: Sequence[Mapping[str, Any]], pack_length: int) -> list[int]:
    """Each example's tokens in a pack (a pair: chosen + rejected), checked against ``pack_length``."""
    if pack_length < 1:
        raise ValueError(f"pack_length must be >= 1, got {pack_length}")
    keys = _check_same_keys(examples, "pack_examples")
    prefixes = _sequence_prefixes(examples[0])
    sizes: list[int] = []
    for i, ex in enumerate(examples):
        for p in prefixes:
            n = len(ex[p + "input_ids"])
            if n == 0:
                raise ValueError(f"example {i}: {p}input_ids is empty (a packed sequence needs at least one token)")
            if p + "labels" in keys and len(ex[p + "labels"]) != n:
                raise ValueError(f"example {i}: {p}labels and {p}input_ids differ in length")
        size = sum(len(ex[p + "input_ids"]) for p in prefixes)
        if size > pack_length:
            what = " + ".join(f"{p}input_ids" for p in prefixes)
            raise ValueError(
                f"example {i}: {what} has {size} tokens, more than pack_length={pack_length}; "
                f"tokenize with a max_length that fits pack_length (truncation happens at tokenization, never in "
                "packing)"
            )
        sizes.append(size)
    return sizes


def pack_examples(
    examples: Sequence[Mapping[str, Any]],
    pack_length: int,
    *,
    strategy: PackingStrategy = "best_fit_decreasing",
) -> list[list[int]]:
    """Assign examples to packs of at most ``pack_length`` tokens; returns each pack's example indices.

    Every index appears in exactly one pack; indices inside a pack are ascending and packs are ordered
    by their first index, so the output is deterministic and roughly follows the data order.  A
    preference example is one item of its chosen plus rejected tokens (they share its row).

    ``strategy``:

    - ``"best_fit_decreasing"``: examples by decreasing length (ties by index), each into the pack it
      leaves with the least room (a bisect over the rooms, O(n log n));
    - ``"greedy"``: next fit in the given order: start a new pack when the next example does not fit
      (keeps the data order; what plain concatenation without splitting gives).

    An example longer than ``pack_length`` is a ``ValueError`` naming its index and length: truncation
    belongs to tokenization (``max_length``), never to packing.
    """
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; expected one of {PACKING_STRATEGIES}")
    sizes = _pack_sizes(examples, pack_length)
    packs: list[list[int]] = []
    if strategy == "greedy":
        load = 0
        for i, n in enumerate(sizes):
            if packs and load + n <= pack_length:
                packs[-1].append(i)
                load += n
            else:
                packs.append([i])
                load = n
    else:
        # (room left, pack index), sorted: the first entry with room >= n is the best fit.
        rooms: list[tuple[int, int]] = []
        for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            n = sizes[i]
            j = bisect.bisect_left(rooms, (n, -1))
            if j == len(rooms):
                packs.append([i])
                bisect.insort(rooms, (pack_length - n, len(packs) - 1))
            else:
                room, p = rooms.pop(j)
                packs[p].append(i)
                bisect.insort(rooms, (room - n, p))
    return sorted((sorted(p) for p in packs), key=lambda p: p[0])


def join_pack(examples: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """One pack's examples as one packed row of token lists (no padding; see the layout above).

    ``input_ids`` and ``labels`` are the examples' sequences back to back (a preference pack:
    ``pair_input_ids``/``pair_labels``, each pair's chosen then its rejected sequence), ``labels`` is
    ``-100`` at each sequence's first position (nothing in the row may predict it: the logit before it
    is the previous sequence's last token), and ``position_ids`` restarts at 0 at each sequence.  Any
    other per-example key (a scalar such as ``row``, ``source``, ``reference_chosen_logps``) becomes a
    list with one entry per example, in the row's order.  Incoming ``*attention_mask``/``*position_ids``
    are ignored.
    """
    keys = _check_same_keys(examples, "join_pack")
    prefixes = _sequence_prefixes(examples[0])
    if prefixes not in ([""], ["chosen_", "rejected_"]):
        raise ValueError(f"join_pack packs SFT examples or chosen/rejected pairs, got sequence keys {prefixes}")
    out_prefix = "" if prefixes == [""] else "pair_"
    with_labels = all(p + "labels" in keys for p in prefixes)
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        for p in prefixes:
            seq = list(ex[p + "input_ids"])
            if not seq:
                raise ValueError(f"join_pack: an example has an empty {p}input_ids")
            ids += seq
            positions += range(len(seq))
            if with_labels:
                lab = list(ex[p + "labels"])
                if len(lab) != len(seq):
                    raise ValueError(f"join_pack: {p}labels and {p}input_ids differ in length")
                lab[0] = IGNORE_INDEX
                labels += lab
    row: dict[str, list[Any]] = {out_prefix + "input_ids": ids}
    if with_labels:
        row[out_prefix + "labels"] = labels
    row[out_prefix + "position_ids"] = positions
    for k in keys:
        if k.endswith(("input_ids", "labels")) or k.endswith(_DERIVED_SUFFIXES):
            continue
        row[k] = [ex[k] for ex in examples]
    return row


def build_packs(
    examples: Sequence[Mapping[str, Any]],
    pack_length: int,
    *,
    strategy: PackingStrategy = "best_fit_decreasing",
) -> list[dict[str, list[Any]]]:
    """:func:`pack_examples` then :func:`join_pack`: a window of tokenized examples -> packed rows.

    Used by :func:`pack_collate` (one batch of examples in, one packed batch out), for a loop of your
    own; the rows it returns are batched with :func:`collate_packs`.  The training pipeline does not
    call it: ``pipelines.data.batching.MicroBatches`` calls :func:`pack_examples` on each window,
    keeps each row's examples (with their ``source``/``row``) and, ``micro_batch_size`` rows at a
    time, calls :func:`join_pack` on each row and :func:`collate_packs` on the rows.
    """
    groups = pack_examples(examples, pack_length, strategy=strategy)
    return [join_pack([examples[i] for i in group]) for group in groups]


def collate_packs(
    packs: Sequence[Mapping[str, Sequence[Any]]],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Packed rows (from :func:`join_pack`) -> one batch of shape (P, L).

    Every token key (``*input_ids``, ``*labels``, ``*position_ids``) is right-padded to one length L,
    the longest row (rounded up to ``pad_to_multiple_of``; passing ``pack_length`` there gives fixed
    (P, pack_length) shapes).  The
    tail padding is ``pad_token_id`` with label ``-100`` and *continues* the last sequence's
    position_ids (never restarting at 0), so it is not a sequence of its own: it sits after the last
    sequence, which causal attention never lets see it, and it has no targets.  No ``attention_mask``
    is returned: the objectives take ``position_ids`` and ``attention_mask=None``.

    Other keys hold one entry per sequence (per pair); they are concatenated across rows in row order,
    which is the order of the sequences in the batch (row-major): numeric ones become a 1-D tensor,
    anything else a list.
    """
    keys = _same_keys(packs, "collate_packs", "packed row")
    token_keys = [k for k in keys if k.endswith(("input_ids", "labels", "position_ids"))]
    if not any(k.endswith("position_ids") for k in token_keys):
        raise ValueError("collate_packs expects packed rows with *position_ids (build them with join_pack)")
    for i, row in enumerate(packs):
        for p in _sequence_prefixes(row):
            n = len(row[p + "input_ids"])
            for k in (p + "labels", p + "position_ids"):
                if k in row and len(row[k]) != n:
                    raise ValueError(f"packed row {i}: {k} and {p}input_ids differ in length")
            if n == 0 or row[p + "position_ids"][0] != 0:
                raise ValueError(f"packed row {i}: {p}position_ids must start at 0 (a row starts a sequence)")
    length = max(len(row[k]) for row in packs for k in token_keys)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of

    batch: dict[str, Any] = {}
    for k in token_keys:
        rows = []
        for row in packs:
            values = list(row[k])
            pad = length - len(values)
            if k.endswith("position_ids"):
                # Continue the last sequence, so the tail is no new sequence (see the docstring).
                rows.append(values + list(range(values[-1] + 1, values[-1] + 1 + pad)))
            else:
                rows.append(values + [_pad_value(k, pad_token_id)] * pad)
        batch[k] = torch.tensor(rows, dtype=torch.long)
    for k in keys:
        if k in token_keys or k.endswith("attention_mask"):
            continue
        values = [v for row in packs for v in row[k]]
        # numbers.Number also admits the numpy scalars a Ray Data batch holds.
        if values and all(isinstance(v, numbers.Number) for v in values):
            batch[k] = torch.tensor(values)
        else:
            batch[k] = values
    return batch


def pack_collate(
    examples: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    *,
    pack_length: int,
    strategy: PackingStrategy = "best_fit_decreasing",
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Pack a batch of tokenized examples into rows of at most ``pack_length`` tokens and collate them.

    The padding-free counterpart of :func:`pad_collate`: :func:`build_packs` then :func:`collate_packs`.
    Returns ``input_ids``/``labels``/``position_ids`` of shape (P, L) for SFT/IFT examples, or
    ``pair_input_ids``/``pair_labels``/``pair_position_ids`` for preference pairs.
    """
    return collate_packs(
        build_packs(examples, pack_length, strategy=strategy), pad_token_id, pad_to_multiple_of=pad_to_multiple_of
    )
