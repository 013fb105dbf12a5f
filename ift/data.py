"""Rows -> validated, tokenized training examples.

Accepted row formats (detected per row):

- conversational ``{"messages": [{"role", "content"}, ...]}``: every assistant
  turn is a training target;
- ``{"prompt": str | messages, "completion": str | messages}``;
- preference ``{"prompt", "chosen", "rejected"}``: ``chosen``/``rejected`` are
  either whole conversations that repeat the user turn (UltraFeedback-binarized
  layout, ``prompt`` then optional) or only the assistant part (a string or a
  list of assistant messages, appended to ``prompt``).  In ``sft`` mode the
  chosen conversation is the training example; ``preference`` mode returns
  both sides.

A conversation is an optional leading system message, then user/assistant
turns alternating, starting with user and ending with assistant.

Labels follow the Hugging Face convention: aligned with ``input_ids`` (the
model shifts them internally) and ``-100`` wherever no loss is taken.  Only
assistant content and its end-of-turn token are targets.

Errors are :class:`DataError`s naming the source, the row index (0-based) and
the reason.  With ``on_bad_row="skip"`` they are counted in a
:class:`BadRowReport`; nothing is dropped silently.

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

Preference pairs keep the ``chosen_*``/``rejected_*`` keys: a pack of pairs
gives one ``chosen_`` row (the packed chosen sequences) and one ``rejected_``
row (the rejected sequences, *in the same order*), both padded to one length.
The k-th chosen sequence of the batch (row-major) and the k-th rejected one
form pair k; a pair is one packing item, so it never straddles packs.  This
keeps the padded layout's contract (``chosen``/``rejected`` with aligned pair
order, concatenated into one forward), so DPO/ORPO need no index tensor.
Per-example scalars (``row``, ``source``, ``reference_chosen_logps``) are
carried in the same sequence order.
"""

from __future__ import annotations

import bisect
import json
import logging
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

Message = dict[str, str]
Mode = Literal["sft", "preference"]
Truncation = Literal["truncate_left", "truncate_right", "drop"]
OnBadRow = Literal["error", "skip"]
TRUNCATION_POLICIES: tuple[str, ...] = ("truncate_left", "truncate_right", "drop")


class DataError(ValueError):
    """A row that cannot become a training example.

    ``source`` is the file (or dataset) name, ``row`` the row's 0-based index in
    it, ``reason`` a human-readable explanation, ``kind`` a short category used to
    count skipped rows (e.g. ``"role_order"``, ``"too_long"``) and ``line`` the
    1-based line of a JSONL file.  The message counts as an editor does: ``line
    57`` for JSONL, else the 1-based ``row 57``.
    """

    def __init__(
        self, source: str, row: int | None, reason: str, *, kind: str = "invalid", line: int | None = None
    ) -> None:
        self.source = source
        self.row = row
        self.reason = reason
        self.kind = kind
        self.line = line
        super().__init__(f"{self.location}: {reason}")

    @property
    def location(self) -> str:
        """``file line N``, ``file row N`` (1-based) or just the source when no row applies."""
        if self.line is not None:
            return f"{self.source} line {self.line}"
        return self.source if self.row is None else f"{self.source} row {self.row + 1}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the keyword-only fields when pickled (e.g. across Ray workers).
        return (_rebuild_data_error, (self.source, self.row, self.reason, self.kind, self.line))


def _rebuild_data_error(source: str, row: int | None, reason: str, kind: str, line: int | None = None) -> DataError:
    return DataError(source, row, reason, kind=kind, line=line)


class _RowError(Exception):
    """Internal: a reason without location; converted to DataError at the API edge."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass
class Conversation:
    """A normalized row.

    ``messages`` is the full training conversation (prompt + chosen answer);
    ``rejected_messages`` is the full rejected conversation for preference
    rows, else ``None``.  ``format`` is the detected input format.
    """

    messages: list[Message]
    rejected_messages: list[Message] | None = None
    format: Literal["messages", "prompt_completion", "preference"] = "messages"


# --------------------------------------------------------------------------- validation


def _type_name(value: Any) -> str:
    return type(value).__name__


def _as_messages(value: Any, field_name: str) -> list[Message]:
    """Check a list of ``{"role", "content"}`` dicts; return clean copies.

    Only ``role`` and ``content`` are kept so that chat templates see a uniform
    input whatever extra keys a dataset carries.
    """
    if not isinstance(value, list):
        raise _RowError(
            f"'{field_name}' must be a list of {{role, content}} messages, got {_type_name(value)}", "invalid_messages"
        )
    if not value:
        raise _RowError(f"'{field_name}' is an empty list", "invalid_messages")
    out: list[Message] = []
    for i, msg in enumerate(value):
        where = f"{field_name}[{i}]"
        if not isinstance(msg, Mapping):
            raise _RowError(
                f"{where} must be a dict with 'role' and 'content', got {_type_name(msg)}", "invalid_messages"
            )
        for key in ("role", "content"):
            if key not in msg:
                raise _RowError(f"{where} is missing field '{key}'", "missing_field")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise _RowError(f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})", "unknown_role")
        if not isinstance(content, str):
            raise _RowError(
                f"{where} ({role}) content must be a string, got {_type_name(content)}", "non_string_content"
            )
        out.append({"role": role, "content": content})
    return out


def validate_conversation(messages: Sequence[Message], field_name: str = "messages") -> None:
    """Check role order and non-empty assistant turns; raise ``_RowError``.

    Order: an optional ``system`` first, then ``user``/``assistant``
    alternating, starting with ``user`` and ending with ``assistant``.
    """
    expected = "user"
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "system" and i == 0:
            continue
        if role != expected:
            after = f"after '{messages[i - 1]['role']}'" if i > 0 else "at the start"
            raise _RowError(f"{field_name}[{i}] has role '{role}' {after} (expected {expected})", "role_order")
        if role == "assistant" and not msg["content"].strip():
            raise _RowError(f"{field_name}[{i}] (assistant) is empty", "empty_assistant")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != "assistant":
        raise _RowError(
            f"{field_name} ends with a '{messages[-1]['role']}' turn (the last turn must be assistant)", "role_order"
        )


def _prompt_messages(row: Mapping[str, Any]) -> list[Message]:
    if "prompt" not in row:
        raise _RowError("missing field 'prompt'", "missing_field")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return _as_messages(prompt, "prompt")
    raise _RowError(f"'prompt' must be a string or a list of messages, got {_type_name(prompt)}", "non_string_content")


def _answer_side(row: Mapping[str, Any], key: str) -> list[Message]:
    """The full conversation for ``completion``/``chosen``/``rejected``."""
    value = row[key]
    if isinstance(value, str):
        return _prompt_messages(row) + [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        msgs = _as_messages(value, key)
        # A side that contains a user turn is a whole conversation
        # (UltraFeedback-binarized repeats the prompt inside chosen/rejected).
        if any(m["role"] == "user" for m in msgs):
            return msgs
        return _prompt_messages(row) + msgs
    raise _RowError(f"'{key}' must be a string or a list of messages, got {_type_name(value)}", "non_string_content")


def _normalize(row: Any) -> Conversation:
    if not isinstance(row, Mapping):
        raise _RowError(f"row must be a JSON object, got {_type_name(row)}", "unknown_format")
    keys = sorted(str(k) for k in row)
    if "messages" in row:
        msgs = _as_messages(row["messages"], "messages")
        validate_conversation(msgs, "messages")
        return Conversation(msgs, None, "messages")
    if "chosen" in row or "rejected" in row:
        for key in ("chosen", "rejected"):
            if key not in row:
                raise _RowError(
                    f"missing field '{key}' (preference rows need 'chosen' and 'rejected')", "missing_field"
                )
        chosen = _answer_side(row, "chosen")
        validate_conversation(chosen, "chosen")
        rejected = _answer_side(row, "rejected")
        validate_conversation(rejected, "rejected")
        return Conversation(chosen, rejected, "preference")
    if "completion" in row:
        msgs = _answer_side(row, "completion")
        validate_conversation(msgs, "prompt+completion")
        return Conversation(msgs, None, "prompt_completion")
    if "prompt" in row:
        raise _RowError("missing field: a row with 'prompt' needs 'completion' or 'chosen'+'rejected'", "missing_field")
    raise _RowError(
        f"unknown format: keys {keys}; expected 'messages', 'prompt'+'completion', or 'prompt'+'chosen'+'rejected'",
        "unknown_format",
    )


def normalize_row(row: dict[str, Any], *, source: str, index: int) -> Conversation:
    """Detect the row's format, validate it and return a :class:`Conversation`.

    Raises :class:`DataError` naming ``source``, ``index`` and the reason.
    """
    try:
        return _normalize(row)
    except _RowError as e:
        raise DataError(source, index, e.reason, kind=e.kind) from None


# --------------------------------------------------------------------------- tokenization


def _render(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja TemplateError, raise_exception(...) in templates
        raise _RowError(f"chat template failed to render: {e}", "template") from e


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The template already contains every special token it wants (bos, role
    # markers); letting the tokenizer add its own would duplicate them.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _template_name(tokenizer: Any) -> str:
    return f"chat template of tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r}"


def _assistant_spans(tokenizer: Any, messages: list[Message]) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize ``messages`` and return ``(input_ids, target spans)``.

    Spans are found by rendering prefixes: for assistant turn ``k``, the
    conversation up to turn ``k`` with the generation prompt marks where the
    answer starts, and the conversation up to the end of turn ``k`` marks where
    it ends.  This works with any template as long as rendering is *prefix
    stable* (a prefix conversation tokenizes to a prefix of the full token
    sequence); if it is not, masks would be wrong, so we refuse.

    Anything after the last eos token inside a span (e.g. the newline a
    ChatML-like template writes after ``<|end|>``) is not a target: the model
    stops at eos and never generates it.
    """
    full = _encode(tokenizer, _render(tokenizer, messages, add_generation_prompt=False))
    eos_id = getattr(tokenizer, "eos_token_id", None)
    spans: list[tuple[int, int]] = []
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _encode(tokenizer, _render(tokenizer, messages[:k], add_generation_prompt=True))
        through = _encode(tokenizer, _render(tokenizer, messages[: k + 1], add_generation_prompt=False))
        for name, prefix in (("with the generation prompt before", before), ("through the end of", through)):
            if full[: len(prefix)] != prefix:
                raise _RowError(
                    f"{_template_name(tokenizer)} is not prefix-stable: the conversation rendered {name} "
                    f"messages[{k}] does not tokenize to a prefix of the full conversation, so assistant "
                    "tokens cannot be located",
                    "template",
                )
        start, end = len(before), len(through)
        if eos_id is not None and eos_id in full[start:end]:
            end = start + max(i for i, t in enumerate(full[start:end]) if t == eos_id) + 1
        if end > start:
            spans.append((start, end))
    return full, spans


def _truncate(
    ids: list[int], labels: list[int], spans: list[tuple[int, int]], max_length: int, truncation: str
) -> tuple[list[int], list[int]]:
    if len(ids) <= max_length:
        return ids, labels
    if truncation == "drop":
        raise _RowError(f"longer than max_length={max_length} ({len(ids)} tokens)", "too_long")
    if truncation == "truncate_right":
        return ids[:max_length], labels[:max_length]
    # truncate_left: the last response is what the model must learn, so drop
    # the oldest prompt tokens first; if the response alone does not fit,
    # keep its beginning (nothing before it can be kept anyway).
    resp_start = spans[-1][0] if spans else len(ids)
    if len(ids) - resp_start <= max_length:
        return ids[-max_length:], labels[-max_length:]
    return ids[resp_start : resp_start + max_length], labels[resp_start : resp_start + max_length]


def _tokenize(tokenizer: Any, messages: list[Message], max_length: int, truncation: str) -> dict[str, list[int]]:
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"unknown truncation {truncation!r}; expected one of {TRUNCATION_POLICIES}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    ids, spans = _assistant_spans(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    ids, labels = _truncate(ids, labels, spans, max_length, truncation)
    if all(t == IGNORE_INDEX for t in labels):
        raise _RowError(f"no target tokens left after {truncation} to max_length={max_length}", "no_targets")
    return {"input_ids": ids, "labels": labels}


def tokenize_conversation(
    tokenizer: Any,
    messages: list[Message],
    *,
    max_length: int,
    truncation: Truncation = "truncate_left",
    source: str = "<conversation>",
    index: int | None = None,
) -> dict[str, list[int]]:
    """Tokenize a validated conversation with the tokenizer's chat template.

    Returns ``{"input_ids", "labels"}`` where labels are ``-100`` except on
    assistant content and its end-of-turn token(s).  ``truncation``:

    - ``"truncate_left"``: drop the oldest tokens, keeping the last response
      whole; if the response alone exceeds ``max_length`` keep its first
      ``max_length`` tokens;
    - ``"truncate_right"``: keep the first ``max_length`` tokens;
    - ``"drop"``: a longer row is a :class:`DataError` (kind ``too_long``).

    A row with no target tokens left is a :class:`DataError` (``no_targets``).
    """
    try:
        return _tokenize(tokenizer, messages, max_length, truncation)
    except _RowError as e:
        raise DataError(source, index, e.reason, kind=e.kind) from None


def tokenize_example(
    tokenizer: Any,
    row: dict[str, Any],
    *,
    mode: Mode = "sft",
    max_length: int,
    truncation: Truncation = "truncate_left",
    source: str = "<rows>",
    index: int = 0,
) -> dict[str, list[int]]:
    """Normalize and tokenize one row.

    ``mode="sft"`` (also used by IFT) -> ``input_ids``, ``labels`` of the
    (chosen) conversation.  ``mode="preference"`` -> ``chosen_input_ids``,
    ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``; the row
    must be a preference row.
    """
    if mode not in ("sft", "preference"):
        raise ValueError(f"unknown mode {mode!r}; expected 'sft' or 'preference'")
    conv = normalize_row(row, source=source, index=index)
    try:
        chosen = _tokenize(tokenizer, conv.messages, max_length, truncation)
        if mode == "sft":
            return chosen
        if conv.rejected_messages is None:
            raise _RowError(
                f"preference mode needs 'chosen' and 'rejected' but the row is in {conv.format!r} format "
                f"(keys {sorted(row)})",
                "missing_field",
            )
        rejected = _tokenize(tokenizer, conv.rejected_messages, max_length, truncation)
    except _RowError as e:
        raise DataError(source, index, e.reason, kind=e.kind) from None
    return {
        "chosen_input_ids": chosen["input_ids"],
        "chosen_labels": chosen["labels"],
        "rejected_input_ids": rejected["input_ids"],
        "rejected_labels": rejected["labels"],
    }


# --------------------------------------------------------------------------- bad rows


@dataclass
class BadRowReport:
    """Counts of skipped rows by reason kind, plus the first few examples.

    ``seen`` is the number of rows looked at, ``counts`` maps a
    :attr:`DataError.kind` to how many rows were skipped for it, ``samples``
    keeps up to ``max_samples`` ``(source, row, reason)`` triples.
    """

    seen: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    samples: list[tuple[str, int | None, str]] = field(default_factory=list)
    max_samples: int = 5

    @property
    def skipped(self) -> int:
        """Total number of skipped rows."""
        return sum(self.counts.values())

    def add(self, error: DataError) -> None:
        """Record one skipped row."""
        self.counts[error.kind] = self.counts.get(error.kind, 0) + 1
        if len(self.samples) < self.max_samples:
            self.samples.append((error.source, error.row, error.reason))

    def merge(self, other: BadRowReport) -> BadRowReport:
        """Add ``other``'s counts and samples into this report (in place); returns self."""
        self.seen += other.seen
        for kind, n in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
        room = self.max_samples - len(self.samples)
        if room > 0:
            self.samples.extend(other.samples[:room])
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BadRowReport:
        """The inverse of :meth:`to_dict` (reports travel between processes as dicts)."""
        samples = [(s["source"], s["row"], s["reason"]) for s in d.get("samples", [])]
        return cls(seen=int(d.get("seen", 0)), counts=dict(d.get("by_reason", {})), samples=samples)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary for logging."""
        return {
            "seen": self.seen,
            "skipped": self.skipped,
            "by_reason": dict(sorted(self.counts.items())),
            "samples": [{"source": s, "row": r, "reason": why} for s, r, why in self.samples],
        }


def tokenize_rows(
    tokenizer: Any,
    rows: Iterable[dict[str, Any]],
    *,
    source: str,
    start_index: int = 0,
    on_bad_row: OnBadRow = "error",
    mode: Mode = "sft",
    max_length: int,
    truncation: Truncation = "truncate_left",
) -> tuple[list[dict[str, list[int]]], BadRowReport]:
    """Tokenize many rows; bad rows raise (``"error"``) or are counted (``"skip"``).

    Row indices start at ``start_index`` so that a shard of a file still
    reports the file's own row numbers.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"unknown on_bad_row {on_bad_row!r}; expected 'error' or 'skip'")
    examples: list[dict[str, list[int]]] = []
    report = BadRowReport()
    for index, row in enumerate(rows, start=start_index):
        report.seen += 1
        try:
            examples.append(
                tokenize_example(
                    tokenizer, row, mode=mode, max_length=max_length, truncation=truncation, source=source, index=index
                )
            )
        except DataError as e:
            if on_bad_row == "error":
                raise
            report.add(e)
    if report.skipped:
        logger.warning(
            "%s: skipped %d of %d rows: %s (first: %s)",
            source,
            report.skipped,
            report.seen,
            report.counts,
            report.samples[0][2],
        )
    return examples, report


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSON-lines file.

    Blank lines are ignored.  Invalid JSON or a non-object line raises
    :class:`DataError` with the file, the row index and the 1-based line number.
    """
    path = Path(path)
    source = str(path)
    index = 0
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            yield parse_json_row(line, source, index, line=lineno)
            index += 1


def parse_json_row(text: str | bytes, source: str, row: int, *, line: int | None = None) -> dict[str, Any]:
    """One JSON text -> the row's object; invalid JSON or a non-object is a :class:`DataError`
    naming ``source`` and the line (JSONL) or row."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            source, row, f"invalid JSON ({e.msg} at column {e.colno})", kind="invalid_json", line=line
        ) from None
    if not isinstance(obj, dict):
        raise DataError(source, row, f"expected a JSON object, got {_type_name(obj)}", kind="invalid_json", line=line)
    return obj


# --------------------------------------------------------------------------- collate


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
    if not examples:
        raise ValueError("pad_collate got an empty batch")
    keys = list(examples[0])
    for i, ex in enumerate(examples[1:], start=1):
        if set(ex) != set(keys):
            raise ValueError(f"batch example {i} has keys {sorted(ex)}, example 0 has {sorted(keys)}")
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
    if not examples:
        raise ValueError(f"{what} got no examples")
    keys = list(examples[0])
    for i, ex in enumerate(examples[1:], start=1):
        if set(ex) != set(keys):
            raise ValueError(f"{what}: example {i} has keys {sorted(ex)}, example 0 has {sorted(keys)}")
    if not any(k.endswith("input_ids") for k in keys):
        raise ValueError(f"{what}: examples have no '*input_ids' key (keys {sorted(keys)})")
    return keys


def _pack_sizes(examples: Sequence[Mapping[str, Any]], pack_length: int) -> list[tuple[int, ...]]:
    """Each example's token count per sequence prefix, checked against ``pack_length``."""
    if pack_length < 1:
        raise ValueError(f"pack_length must be >= 1, got {pack_length}")
    keys = _check_same_keys(examples, "pack_examples")
    prefixes = _sequence_prefixes(examples[0])
    sizes: list[tuple[int, ...]] = []
    for i, ex in enumerate(examples):
        size = tuple(len(ex[p + "input_ids"]) for p in prefixes)
        for p, n in zip(prefixes, size, strict=True):
            if n == 0:
                raise ValueError(f"example {i}: {p}input_ids is empty (a packed sequence needs at least one token)")
            if n > pack_length:
                raise ValueError(
                    f"example {i}: {p}input_ids has {n} tokens, more than pack_length={pack_length}; "
                    f"tokenize with max_length <= pack_length (truncation happens at tokenization, never in packing)"
                )
            if p + "labels" in keys and len(ex[p + "labels"]) != n:
                raise ValueError(f"example {i}: {p}labels and {p}input_ids differ in length")
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
    by their first index, so the output is deterministic and roughly follows the data order.

    A preference example (``chosen_*``/``rejected_*``) is one item with two sizes: its chosen sequence
    goes to the pack's chosen row and its rejected sequence to the pack's rejected row, and both rows
    must fit (vector bin packing).  So a pair never straddles packs.

    ``strategy``:

    - ``"best_fit_decreasing"``: examples by decreasing length (ties by index), each into the pack it
      leaves with the least room (1-D: a bisect over the rooms, O(n log n); pairs: a scan over the
      packs, O(n · packs));
    - ``"greedy"``: next fit in the given order: start a new pack when the next example does not fit
      (keeps the data order; what plain concatenation without splitting gives).

    An example longer than ``pack_length`` is a ``ValueError`` naming its index and length: truncation
    belongs to tokenization (``max_length``), never to packing.
    """
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; expected one of {PACKING_STRATEGIES}")
    sizes = _pack_sizes(examples, pack_length)
    dims = len(sizes[0])
    packs: list[list[int]] = []
    if strategy == "greedy":
        load = [0] * dims
        for i, size in enumerate(sizes):
            if packs and all(used + n <= pack_length for used, n in zip(load, size, strict=True)):
                packs[-1].append(i)
                load = [used + n for used, n in zip(load, size, strict=True)]
            else:
                packs.append([i])
                load = list(size)
    else:
        order = sorted(range(len(sizes)), key=lambda i: (-sum(sizes[i]), i))
        if dims == 1:
            # (room left, pack index), sorted: the first entry with room >= n is the best fit.
            rooms: list[tuple[int, int]] = []
            for i in order:
                n = sizes[i][0]
                j = bisect.bisect_left(rooms, (n, -1))
                if j == len(rooms):
                    packs.append([i])
                    bisect.insort(rooms, (pack_length - n, len(packs) - 1))
                else:
                    room, p = rooms.pop(j)
                    packs[p].append(i)
                    bisect.insort(rooms, (room - n, p))
        else:
            room_left: list[list[int]] = []
            for i in order:
                size = sizes[i]
                best, best_slack = -1, None
                for p, room in enumerate(room_left):
                    if all(r >= n for r, n in zip(room, size, strict=True)):
                        slack = sum(room) - sum(size)
                        if best_slack is None or slack < best_slack:
                            best, best_slack = p, slack
                if best < 0:
                    packs.append([i])
                    room_left.append([pack_length - n for n in size])
                else:
                    packs[best].append(i)
                    room_left[best] = [r - n for r, n in zip(room_left[best], size, strict=True)]
    return sorted((sorted(p) for p in packs), key=lambda p: p[0])


def join_pack(examples: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """One pack's examples as one packed row of token lists (no padding; see the layout above).

    For each sequence prefix (``""``, or ``"chosen_"`` and ``"rejected_"``): ``*input_ids`` and
    ``*labels`` are the examples' sequences back to back, ``*labels`` is ``-100`` at each sequence's
    first position (nothing in the row may predict it: the logit before it is the previous sequence's
    last token), and ``*position_ids`` restarts at 0 at each sequence.  Any other per-example key
    (a scalar such as ``row``, ``source``, ``reference_chosen_logps``) becomes a list with one entry
    per example, in the row's sequence order.  Incoming ``*attention_mask``/``*position_ids`` are ignored.
    """
    keys = _check_same_keys(examples, "join_pack")
    prefixes = _sequence_prefixes(examples[0])
    row: dict[str, list[Any]] = {}
    for p in prefixes:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for ex in examples:
            seq = list(ex[p + "input_ids"])
            if not seq:
                raise ValueError(f"join_pack: an example has an empty {p}input_ids")
            ids += seq
            positions += range(len(seq))
            if p + "labels" in keys:
                lab = list(ex[p + "labels"])
                if len(lab) != len(seq):
                    raise ValueError(f"join_pack: {p}labels and {p}input_ids differ in length")
                lab[0] = IGNORE_INDEX
                labels += lab
        row[p + "input_ids"] = ids
        if p + "labels" in keys:
            row[p + "labels"] = labels
        row[p + "position_ids"] = positions
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

    This is the step a data pipeline maps over windows of examples; the rows it returns are batched
    later with :func:`collate_packs`.
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
    (P, pack_length) shapes), so chosen and rejected rows can be concatenated into one forward.  The
    tail padding is ``pad_token_id`` with label ``-100`` and *continues* the last sequence's
    position_ids (never restarting at 0), so it is not a sequence of its own: it sits after the last
    sequence, which causal attention never lets see it, and it has no targets.  No ``attention_mask``
    is returned: the objectives take ``position_ids`` and ``attention_mask=None``.

    Other keys hold one entry per sequence (per pair); they are concatenated across rows in row order,
    which is the order of the sequences in the batch (row-major): numeric ones become a 1-D tensor,
    anything else a list.
    """
    if not packs:
        raise ValueError("collate_packs got an empty batch")
    keys = list(packs[0])
    for i, row in enumerate(packs[1:], start=1):
        if set(row) != set(keys):
            raise ValueError(f"packed row {i} has keys {sorted(row)}, row 0 has {sorted(keys)}")
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
    ``chosen_*`` and ``rejected_*`` (each (P, L), one length) for preference pairs.
    """
    return collate_packs(
        build_packs(examples, pack_length, strategy=strategy), pad_token_id, pad_to_multiple_of=pad_to_multiple_of
    )
