"""Rows -> validated, tokenized training examples.

Accepted row formats (detected per row, in this order):

- conversational ``{"messages": [{"role", "content"}, ...]}``: every assistant
  turn is a training target.  Items may use ShareGPT's ``from``/``value`` keys
  instead of ``role``/``content``;
- ShareGPT ``{"conversations": [{"from", "value"}, ...]}`` (optional top-level
  ``system``): ``from`` is ``human``/``user``, ``gpt``/``assistant``/``chatgpt``,
  ``system``, ``tool``/``observation`` (a tool output) or ``function_call`` (an
  assistant tool call whose ``value`` is the JSON ``{"name", "arguments"}`` or a
  list of them);
- ``{"prompt": str | messages, "completion": str | messages}``;
- preference ``{"prompt", "chosen", "rejected"}``: ``chosen``/``rejected`` are
  either whole conversations that repeat the user turn (UltraFeedback-binarized
  layout, ``prompt`` then optional) or only the assistant part (a string or a
  list of assistant messages, appended to ``prompt``).  In ``sft`` mode the
  chosen conversation is the training example; ``preference`` mode returns
  both sides;
- Alpaca ``{"instruction", "input" (optional), "output"}`` (optional
  ``system``): the user turn is the instruction, plus a blank line and the input
  when there is one; the output is the answer;
- plain text ``{"text": str}`` (``sft`` mode only): a pretraining-style example
  with no chat template: bos (if the tokenizer has one), the text, eos; every
  token but the bos is a target.

A conversation is an optional leading system message, then user/assistant
turns alternating, starting with user and ending with assistant.  Tool use: an
assistant message may carry ``tool_calls`` (a list of ``{"type": "function",
"function": {"name", "arguments"}}``; its content may then be empty), and is then
followed by one or more ``tool`` messages (the tool outputs, with optional
``tool_call_id``/``name``), then by an assistant turn again.  These keys are
kept so that the chat template renders them (``ift.chat_templates`` ships
templates that do).

Labels follow the Hugging Face convention: aligned with ``input_ids`` (the
model shifts them internally) and ``-100`` wherever no loss is taken.  Only
assistant content (tool calls included) and its end-of-turn token are targets;
tool outputs never are.

Rows longer than ``max_length`` are cut or dropped (``truncation``); how many
were cut is counted in :class:`BadRowReport` (``truncated``, ``prompt_cut``) or,
row by row, in a :class:`TruncationStats`.

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
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT ``from`` values -> roles; "function_call" is an assistant turn holding tool calls.
SHAREGPT_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_call": "assistant",
}

Message = dict[str, Any]
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
    rows, else ``None``.  ``format`` is the detected input format.  A plain
    text row has no messages; its ``text`` is the document.
    """

    messages: list[Message]
    rejected_messages: list[Message] | None = None
    format: Literal["messages", "sharegpt", "prompt_completion", "preference", "alpaca", "text"] = "messages"
    text: str | None = None


@dataclass
class TruncationStats:
    """What truncation did to one row: pass one to :func:`tokenize_example` to learn it.

    ``truncated``: the row was longer than ``max_length`` and was cut (not
    dropped); ``prompt_cut``: ``truncate_left`` cut the whole prompt, keeping only
    (the beginning of) the last response.  For a preference row, either side.
    """

    truncated: bool = False
    prompt_cut: bool = False


# --------------------------------------------------------------------------- validation


def _type_name(value: Any) -> str:
    return type(value).__name__


def _as_messages(value: Any, field_name: str) -> list[Message]:
    """Check a list of messages; return clean copies.

    Items are ``{"role", "content"}`` dicts or ShareGPT ``{"from", "value"}``
    ones.  Only ``role`` and ``content``, an assistant's ``tool_calls`` and a
    tool message's ``tool_call_id``/``name`` are kept, so that chat templates
    see a uniform input whatever extra keys a dataset carries.
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
        # Parquet and hub datasets give every message every key, None where absent.
        if msg.get("role") is None and "from" in msg:
            out.append(_sharegpt_message(msg, where))
        else:
            out.append(_role_message(msg, where))
    return out


def _role_message(msg: Mapping[str, Any], where: str) -> Message:
    if "role" not in msg:
        raise _RowError(f"{where} is missing field 'role'", "missing_field")
    role = msg["role"]
    if role not in ROLES:
        raise _RowError(f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})", "unknown_role")
    if "content" not in msg and not (role == "assistant" and msg.get("tool_calls")):
        raise _RowError(f"{where} is missing field 'content'", "missing_field")
    return _clean_message(role, msg.get("content"), msg, where)


def _clean_message(role: str, content: Any, msg: Mapping[str, Any], where: str) -> Message:
    out: Message = {"role": role}
    if msg.get("tool_calls") is not None:
        if role != "assistant":
            raise _RowError(f"{where} ({role}) has tool_calls; only assistant turns call tools", "invalid_tool_call")
        calls = _tool_calls(msg["tool_calls"], f"{where}.tool_calls")
        if calls:
            out["tool_calls"] = calls
            content = "" if content is None else content  # a turn that only calls tools
    if not isinstance(content, str):
        raise _RowError(f"{where} ({role}) content must be a string, got {_type_name(content)}", "non_string_content")
    out["content"] = content
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if msg.get(key) is not None:
                if not isinstance(msg[key], str):
                    raise _RowError(f"{where}.{key} must be a string, got {_type_name(msg[key])}", "invalid_tool_call")
                out[key] = msg[key]
    return out


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _RowError(f"{where} must be a list of tool calls, got {_type_name(value)}", "invalid_tool_call")
    return [_tool_call(call, f"{where}[{j}]") for j, call in enumerate(value)]


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """``{"type": "function", "function": {"name", "arguments"}}`` (plus its ``id``), checked and copied."""
    if not isinstance(call, Mapping):
        raise _RowError(
            f"{where} must be a dict {{'type': 'function', 'function': {{'name', 'arguments'}}}}, "
            f"got {_type_name(call)}",
            "invalid_tool_call",
        )
    if call.get("type") not in (None, "function"):
        raise _RowError(f"{where} has type {call['type']!r} (expected 'function')", "invalid_tool_call")
    fn = call.get("function")
    if not isinstance(fn, Mapping):
        what = "is missing field 'function'" if fn is None else f"'function' must be a dict, got {_type_name(fn)}"
        raise _RowError(f"{where} {what}", "invalid_tool_call")
    name, args = fn.get("name"), fn.get("arguments")
    if not isinstance(name, str) or not name.strip():
        raise _RowError(f"{where}.function.name must be a non-empty string, got {name!r}", "invalid_tool_call")
    if not isinstance(args, (str, Mapping)):
        what = "is missing" if args is None else f"must be a JSON string or an object, got {_type_name(args)}"
        raise _RowError(f"{where}.function.arguments {what}", "invalid_tool_call")
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
    if not isinstance(args, str):
        out["function"]["arguments"] = dict(args)
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _sharegpt_message(msg: Mapping[str, Any], where: str) -> Message:
    speaker = msg["from"]
    role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
    if role is None:
        raise _RowError(
            f"{where} has unknown 'from' {speaker!r} (expected one of {', '.join(SHAREGPT_ROLES)})", "unknown_role"
        )
    if "value" not in msg:
        raise _RowError(f"{where} is missing field 'value'", "missing_field")
    value = msg["value"]
    if speaker == "function_call":
        return {"role": "assistant", "content": "", "tool_calls": _function_call_value(value, where)}
    if not isinstance(value, str):
        raise _RowError(f"{where} ({speaker}) value must be a string, got {_type_name(value)}", "non_string_content")
    return {"role": role, "content": value}


def _function_call_value(value: Any, where: str) -> list[dict[str, Any]]:
    """A ShareGPT ``function_call`` value: JSON ``{"name", "arguments"}`` or a list of them."""
    shape = f'{where} (function_call) value must be JSON {{"name", "arguments"}} or a list of them'
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        raise _RowError(f"{shape}; it is not valid JSON", "invalid_tool_call") from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls or not all(isinstance(c, Mapping) for c in calls):
        raise _RowError(f"{shape}, got {_type_name(parsed)}", "invalid_tool_call")
    return [_tool_call({"type": "function", "function": c}, f"{where}.value[{j}]") for j, c in enumerate(calls)]


def _next_roles(msg: Message) -> tuple[str, ...]:
    """The roles that may follow ``msg``."""
    if msg["role"] == "assistant":
        return ("tool",) if msg.get("tool_calls") else ("user",)
    if msg["role"] == "tool":
        return ("tool", "assistant")
    return ("assistant",)


def validate_conversation(messages: Sequence[Message], field_name: str = "messages") -> None:
    """Check role order and non-empty assistant turns; raise ``_RowError``.

    Order: an optional ``system`` first, then ``user``/``assistant``
    alternating, starting with ``user`` and ending with ``assistant``.  An
    assistant turn with ``tool_calls`` is followed by one or more ``tool``
    messages, then by an assistant turn (a conversation may end with the call).
    """
    expected: tuple[str, ...] = ("user",)
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "system" and i == 0:
            continue
        if role not in expected:
            after = f"after '{messages[i - 1]['role']}'" if i > 0 else "at the start"
            hint = "; a tool message answers an assistant turn with tool_calls" if role == "tool" else ""
            raise _RowError(
                f"{field_name}[{i}] has role '{role}' {after} (expected {' or '.join(expected)}){hint}", "role_order"
            )
        if role == "assistant" and not msg["content"].strip() and not msg.get("tool_calls"):
            raise _RowError(f"{field_name}[{i}] (assistant) is empty", "empty_assistant")
        expected = _next_roles(msg)
    if messages[-1]["role"] != "assistant":
        raise _RowError(
            f"{field_name} ends with a '{messages[-1]['role']}' turn (the last turn must be assistant)", "role_order"
        )


def _prompt_messages(row: Mapping[str, Any]) -> list[Message]:
    if "prompt" not in row and "conversations" in row:  # a ShareGPT pair: the conversation is the prompt
        return _as_messages(row["conversations"], "conversations")
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
    if isinstance(value, Mapping):  # one message, as ShareGPT pairs give it
        value = [value]
    if isinstance(value, list):
        msgs = _as_messages(value, key)
        # A side that contains a user turn is a whole conversation
        # (UltraFeedback-binarized repeats the prompt inside chosen/rejected).
        if any(m["role"] == "user" for m in msgs):
            return msgs
        return _prompt_messages(row) + msgs
    raise _RowError(f"'{key}' must be a string or a list of messages, got {_type_name(value)}", "non_string_content")


def _with_system(row: Mapping[str, Any], messages: list[Message]) -> list[Message]:
    """``messages`` after the row's top-level ``system`` prompt (ShareGPT, Alpaca), unless they start with one."""
    system = row.get("system")
    if system is None or messages[0]["role"] == "system":
        return messages
    if not isinstance(system, str):
        raise _RowError(f"'system' must be a string, got {_type_name(system)}", "non_string_content")
    return ([{"role": "system", "content": system}] if system.strip() else []) + messages


def _conversation_row(row: Mapping[str, Any], key: str, fmt: Literal["messages", "sharegpt"]) -> Conversation:
    msgs = _as_messages(row[key], key)
    validate_conversation(msgs, key)  # before the system prompt goes in, so indices are the row's own
    return Conversation(_with_system(row, msgs) if fmt == "sharegpt" else msgs, None, fmt)


def _preference_row(row: Mapping[str, Any]) -> Conversation:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise _RowError(f"missing field '{key}' (preference rows need 'chosen' and 'rejected')", "missing_field")
    chosen = _answer_side(row, "chosen")
    validate_conversation(chosen, "chosen")
    rejected = _answer_side(row, "rejected")
    validate_conversation(rejected, "rejected")
    return Conversation(chosen, rejected, "preference")


def _alpaca_row(row: Mapping[str, Any]) -> Conversation:
    for key in ("instruction", "output"):
        if row.get(key) is None:
            raise _RowError(f"missing field '{key}' (Alpaca rows need 'instruction' and 'output')", "missing_field")
    for key in ("instruction", "input", "output"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise _RowError(f"'{key}' must be a string, got {_type_name(row[key])}", "non_string_content")
    instruction, extra, output = row["instruction"], row.get("input") or "", row["output"]
    if not instruction.strip():
        raise _RowError("'instruction' is empty", "empty_prompt")
    if not output.strip():
        raise _RowError("'output' is empty", "empty_assistant")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Conversation(_with_system(row, msgs), None, "alpaca")


def _text_row(row: Mapping[str, Any]) -> Conversation:
    text = row["text"]
    if not isinstance(text, str):
        raise _RowError(f"'text' must be a string, got {_type_name(text)}", "non_string_content")
    if not text.strip():
        raise _RowError("'text' is empty", "empty_text")
    return Conversation([], None, "text", text=text)


def _normalize(row: Any) -> Conversation:
    if not isinstance(row, Mapping):
        raise _RowError(f"row must be a JSON object, got {_type_name(row)}", "unknown_format")
    # A pair first: UltraFeedback-binarized rows carry 'messages' (= the chosen side) beside
    # 'chosen'/'rejected', and a preference method needs the pair.
    pair = "chosen" in row and "rejected" in row
    if "messages" in row and not pair:
        return _conversation_row(row, "messages", "messages")
    if "conversations" in row and not pair:
        return _conversation_row(row, "conversations", "sharegpt")
    if "chosen" in row or "rejected" in row:
        return _preference_row(row)
    if "completion" in row:
        msgs = _answer_side(row, "completion")
        validate_conversation(msgs, "prompt+completion")
        return Conversation(msgs, None, "prompt_completion")
    if "prompt" in row:
        raise _RowError("missing field: a row with 'prompt' needs 'completion' or 'chosen'+'rejected'", "missing_field")
    if "instruction" in row or "output" in row:
        return _alpaca_row(row)
    if "text" in row:
        return _text_row(row)
    raise _RowError(
        f"unknown format: keys {sorted(str(k) for k in row)}; expected 'messages', 'conversations', "
        "'prompt'+'completion', 'prompt'+'chosen'+'rejected', 'instruction'+'output' or 'text'",
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


TOOLS_HINT = (
    "rows with tool calls need a chat template that renders the tool role and tool_calls: "
    "set data.chat_template=chatml (ift.chat_templates ships it)"
)


def _uses_tools(messages: list[Message]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def _render(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja TemplateError, raise_exception(...) in templates
        hint = f"; {TOOLS_HINT}" if _uses_tools(messages) else ""
        raise _RowError(f"chat template failed to render: {e}{hint}", "template") from e


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The template already contains every special token it wants (bos, role
    # markers); letting the tokenizer add its own would duplicate them.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _template_name(tokenizer: Any) -> str:
    return f"chat template of tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r}"


def _check_tool_calls_rendered(tokenizer: Any, messages: list[Message], text: str) -> None:
    """A template that ignores ``tool_calls`` would train on an empty answer: refuse instead."""
    for k, msg in enumerate(messages):
        for call in msg.get("tool_calls") or ():
            name = call["function"]["name"]
            if name not in text:
                raise _RowError(
                    f"{_template_name(tokenizer)} does not render tool_calls (messages[{k}] calls {name!r}, "
                    f"which the rendered conversation lacks); {TOOLS_HINT}",
                    "template",
                )


def _assistant_spans(tokenizer: Any, messages: list[Message]) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize ``messages`` and return ``(input_ids, target spans)``.

    Spans are found by rendering prefixes: for assistant turn ``k``, the
    conversation up to turn ``k`` with the generation prompt marks where the
    answer starts, and the conversation up to the end of turn ``k`` marks where
    it ends.  This works with any template as long as rendering is *prefix
    stable* (a prefix conversation tokenizes to a prefix of the full token
    sequence); if it is not, masks would be wrong, so we refuse.  Only
    assistant turns (tool calls included) have spans: tool outputs are input.

    Anything after the last eos token inside a span (e.g. the newline a
    ChatML-like template writes after ``<|end|>``) is not a target: the model
    stops at eos and never generates it.
    """
    text = _render(tokenizer, messages, add_generation_prompt=False)
    _check_tool_calls_rendered(tokenizer, messages, text)
    full = _encode(tokenizer, text)
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


def _check_options(max_length: int, truncation: str) -> None:
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"unknown truncation {truncation!r}; expected one of {TRUNCATION_POLICIES}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")


def _truncate(
    ids: list[int],
    labels: list[int],
    spans: list[tuple[int, int]],
    max_length: int,
    truncation: str,
    stats: TruncationStats,
) -> tuple[list[int], list[int]]:
    if len(ids) <= max_length:
        return ids, labels
    if truncation == "drop":
        raise _RowError(f"longer than max_length={max_length} ({len(ids)} tokens)", "too_long")
    stats.truncated = True
    if truncation == "truncate_right":
        return ids[:max_length], labels[:max_length]
    # truncate_left: the last response is what the model must learn, so drop
    # the oldest prompt tokens first; if the response alone does not fit,
    # keep its beginning (nothing before it can be kept anyway).
    resp_start = spans[-1][0] if spans else len(ids)
    start = len(ids) - max_length if len(ids) - resp_start <= max_length else resp_start
    stats.prompt_cut = stats.prompt_cut or start >= resp_start
    return ids[start : start + max_length], labels[start : start + max_length]


def _tokenize(
    tokenizer: Any, messages: list[Message], max_length: int, truncation: str, stats: TruncationStats
) -> dict[str, list[int]]:
    _check_options(max_length, truncation)
    ids, spans = _assistant_spans(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    ids, labels = _truncate(ids, labels, spans, max_length, truncation, stats)
    if all(t == IGNORE_INDEX for t in labels):
        raise _RowError(f"no target tokens left after {truncation} to max_length={max_length}", "no_targets")
    return {"input_ids": ids, "labels": labels}


def _tokenize_text(
    tokenizer: Any, text: str, max_length: int, truncation: str, stats: TruncationStats
) -> dict[str, list[int]]:
    """A plain-text row as a pretraining example: ``[bos] text eos``, every token a target but the bos."""
    _check_options(max_length, truncation)
    body = _encode(tokenizer, text)
    # The bos whenever the tokenizer has one, as chat templates start with it (whether the
    # tokenizer would add it itself varies, e.g. add_bos_token is off by default in transformers 5).
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if bos is not None and body[:1] == [bos]:
        body = body[1:]  # a text that starts with the bos itself: added below, not a target
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None and body[-1:] != [eos] else []  # so the model learns to stop
    ids = head + body + tail
    labels = [IGNORE_INDEX] * len(head) + body + tail
    if len(ids) > max_length:
        if truncation == "drop":
            raise _RowError(f"longer than max_length={max_length} ({len(ids)} tokens)", "too_long")
        # Both truncate policies keep the beginning: a document has no response to
        # protect (what truncate_left keeps for chat), and its end means little
        # without its start, while the start stands on its own after the bos.
        ids, labels = ids[:max_length], labels[:max_length]
        stats.truncated = True
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
    stats: TruncationStats | None = None,
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
    ``stats``, when given, is set to what truncation did.
    """
    stats = _reset(stats)
    try:
        return _tokenize(tokenizer, messages, max_length, truncation, stats)
    except _RowError as e:
        raise DataError(source, index, e.reason, kind=e.kind) from None


def _reset(stats: TruncationStats | None) -> TruncationStats:
    if stats is None:
        return TruncationStats()
    stats.truncated = stats.prompt_cut = False
    return stats


def _tokenize_conv(
    tokenizer: Any, conv: Conversation, row: Mapping[str, Any], mode: Mode, max_length: int, truncation: str,
    stats: TruncationStats,
) -> dict[str, list[int]]:  # fmt: skip
    if mode == "preference" and conv.format == "text":
        raise _RowError(
            "a plain-text row ('text') has no chosen/rejected pair: preference methods (DPO, ORPO) need "
            "'prompt'+'chosen'+'rejected' rows",
            "missing_field",
        )
    if mode == "preference" and conv.rejected_messages is None:
        raise _RowError(
            f"preference mode needs 'chosen' and 'rejected' but the row is in {conv.format!r} format "
            f"(keys {sorted(row)})",
            "missing_field",
        )
    if conv.text is not None:
        return _tokenize_text(tokenizer, conv.text, max_length, truncation, stats)
    chosen = _tokenize(tokenizer, conv.messages, max_length, truncation, stats)
    if conv.rejected_messages is None or mode == "sft":
        return chosen
    rejected = _tokenize(tokenizer, conv.rejected_messages, max_length, truncation, stats)
    return {
        "chosen_input_ids": chosen["input_ids"],
        "chosen_labels": chosen["labels"],
        "rejected_input_ids": rejected["input_ids"],
        "rejected_labels": rejected["labels"],
    }


def tokenize_example(
    tokenizer: Any,
    row: dict[str, Any],
    *,
    mode: Mode = "sft",
    max_length: int,
    truncation: Truncation = "truncate_left",
    source: str = "<rows>",
    index: int = 0,
    stats: TruncationStats | None = None,
) -> dict[str, list[int]]:
    """Normalize and tokenize one row.

    ``mode="sft"`` (also used by IFT) -> ``input_ids``, ``labels`` of the
    (chosen) conversation, or of a plain-text row.  ``mode="preference"`` ->
    ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
    ``rejected_labels``; the row must be a preference row.  ``stats``, when
    given, is set to what truncation did to this row (:class:`TruncationStats`).
    """
    if mode not in ("sft", "preference"):
        raise ValueError(f"unknown mode {mode!r}; expected 'sft' or 'preference'")
    conv = normalize_row(row, source=source, index=index)
    try:
        return _tokenize_conv(tokenizer, conv, row, mode, max_length, truncation, _reset(stats))
    except _RowError as e:
        raise DataError(source, index, e.reason, kind=e.kind) from None


# --------------------------------------------------------------------------- bad rows


@dataclass
class BadRowReport:
    """Counts of skipped rows by reason kind, plus the first few examples, and of truncated rows.

    ``seen`` is the number of rows looked at, ``counts`` maps a
    :attr:`DataError.kind` to how many rows were skipped for it, ``samples``
    keeps up to ``max_samples`` ``(source, row, reason)`` triples.
    ``truncated`` counts the rows kept but cut to ``max_length``, ``prompt_cut``
    those among them whose whole prompt was cut (``truncate_left`` kept only
    the last response, or its beginning): see :class:`TruncationStats`.
    """

    seen: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    samples: list[tuple[str, int | None, str]] = field(default_factory=list)
    max_samples: int = 5
    truncated: int = 0
    prompt_cut: int = 0

    @property
    def skipped(self) -> int:
        """Total number of skipped rows."""
        return sum(self.counts.values())

    def add(self, error: DataError) -> None:
        """Record one skipped row."""
        self.counts[error.kind] = self.counts.get(error.kind, 0) + 1
        if len(self.samples) < self.max_samples:
            self.samples.append((error.source, error.row, error.reason))

    def count_truncation(self, stats: TruncationStats) -> None:
        """Record what truncation did to one kept row."""
        self.truncated += stats.truncated
        self.prompt_cut += stats.prompt_cut

    def merge(self, other: BadRowReport) -> BadRowReport:
        """Add ``other``'s counts and samples into this report (in place); returns self."""
        self.seen += other.seen
        self.truncated += other.truncated
        self.prompt_cut += other.prompt_cut
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
        return cls(
            seen=int(d.get("seen", 0)),
            counts=dict(d.get("by_reason", {})),
            samples=samples,
            truncated=int(d.get("truncated", 0)),
            prompt_cut=int(d.get("prompt_cut", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary for logging."""
        return {
            "seen": self.seen,
            "skipped": self.skipped,
            "by_reason": dict(sorted(self.counts.items())),
            "samples": [{"source": s, "row": r, "reason": why} for s, r, why in self.samples],
            "truncated": self.truncated,
            "prompt_cut": self.prompt_cut,
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
    reports the file's own row numbers.  The report also counts the rows kept
    but truncated (``truncated``, ``prompt_cut``).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"unknown on_bad_row {on_bad_row!r}; expected 'error' or 'skip'")
    examples: list[dict[str, list[int]]] = []
    report = BadRowReport()
    stats = TruncationStats()
    for index, row in enumerate(rows, start=start_index):
        report.seen += 1
        try:
            examples.append(
                tokenize_example(
                    tokenizer,
                    row,
                    mode=mode,
                    max_length=max_length,
                    truncation=truncation,
                    source=source,
                    index=index,
                    stats=stats,
                )  # fmt: skip
            )
        except DataError as e:
            if on_bad_row == "error":
                raise
            report.add(e)
        else:
            report.count_truncation(stats)
    if report.skipped:
        logger.warning(
            "%s: skipped %d of %d rows: %s (first: %s)",
            source,
            report.skipped,
            report.seen,
            report.counts,
            report.samples[0][2],
        )
    if report.truncated:
        logger.info(
            "%s: %d of %d rows cut to max_length=%d (%s), %d of them down to the response alone",
            source, report.truncated, report.seen, max_length, truncation, report.prompt_cut,
        )  # fmt: skip
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
    naming ``source``, the line (JSONL) or row, and the 1-based column of the error in the line."""
    # A JSONL line arrives with its line break; left on, an error at the end of a cut-short line
    # (the usual one) would sit on JSON's line 2, column 1.  A UTF-8 BOM may start a file's first line.
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text.rstrip("\r\n").removeprefix("\ufeff")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        end = " (the end of the line)" if e.pos >= len(text) else ""
        raise DataError(
            source, row, f"invalid JSON ({e.msg} at column {e.colno}{end})", kind="invalid_json", line=line
        ) from None
    if not isinstance(obj, dict):
        raise DataError(source, row, f"expected a JSON object, got {_type_name(obj)}", kind="invalid_json", line=line)
    return obj
