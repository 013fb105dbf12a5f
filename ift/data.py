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

Batching (padded and packed layouts) is :mod:`ift.collate`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    # A pair first: UltraFeedback-binarized rows carry 'messages' (= the chosen side) beside
    # 'chosen'/'rejected', and a preference method needs the pair.
    if "messages" in row and not ("chosen" in row and "rejected" in row):
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
