"""Tests for ift.data: formats, validation, label masking, truncation, collate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ift.collate import pad_collate
from ift.data import (
    IGNORE_INDEX,
    BadRowReport,
    DataError,
    normalize_row,
    read_jsonl,
    tokenize_conversation,
    tokenize_example,
    tokenize_rows,
)
from ift.tokenization import load_tokenizer

SRC = "demo.jsonl"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def targets(example: dict[str, list[int]], prefix: str = "") -> list[int]:
    return [t for t in example[prefix + "labels"] if t != IGNORE_INDEX]


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


TWO_TURNS = [system("Be brief."), user("What is 2 + 2?"), assistant("4"), user("And 3 + 3?"), assistant("It is 6.")]


# --------------------------------------------------------------------------- label masking


def test_only_assistant_content_and_end_of_turn_are_targets(tok) -> None:
    ex = tokenize_conversation(tok, TWO_TURNS, max_length=256)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert targets(ex) == ids_of(tok, "4") + [end] + ids_of(tok, "It is 6.") + [end]


def test_target_spans_start_right_after_the_assistant_header(tok) -> None:
    ex = tokenize_conversation(tok, TWO_TURNS, max_length=256)
    header = [tok.convert_tokens_to_ids("<|assistant|>")] + ids_of(tok, "\n")
    ids, labels = ex["input_ids"], ex["labels"]
    starts = [i for i in range(len(ids)) if labels[i] != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]
    assert len(starts) == 2
    for s in starts:
        assert ids[s - len(header) : s] == header


def test_labels_are_aligned_with_input_ids(tok) -> None:
    ex = tokenize_conversation(tok, TWO_TURNS, max_length=256)
    assert len(ex["input_ids"]) == len(ex["labels"])
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ex["input_ids"], ex["labels"], strict=True))


def test_input_ids_match_the_rendered_chat_template(tok) -> None:
    ex = tokenize_conversation(tok, TWO_TURNS, max_length=256)
    assert ex["input_ids"] == ids_of(tok, tok.apply_chat_template(TWO_TURNS, tokenize=False))


def test_prefix_unstable_template_is_refused_with_its_name(tok) -> None:
    # Like reasoning-model templates that render the last turn differently.
    unstable = tok.__class__.from_pretrained(tok.name_or_path)
    unstable.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(DataError, match="chat template of tokenizer .* is not prefix-stable"):
        tokenize_conversation(unstable, [user("hi"), assistant("yo")], max_length=64)


def test_fallback_template_tokenizer_masks_content_and_eos(tmp_path: Path) -> None:
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", "hi", "there", "<|user|>", "<|assistant|>"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="[EOS]", unk_token="[UNK]").save_pretrained(tmp_path)
    plain = load_tokenizer(str(tmp_path))
    ex = tokenize_conversation(plain, [user("hi"), assistant("there")], max_length=64)
    assert targets(ex) == [vocab["there"], vocab["[EOS]"]]


# --------------------------------------------------------------------------- formats


def test_messages_format_is_detected() -> None:
    conv = normalize_row({"messages": [user("q"), assistant("a")]}, source=SRC, index=0)
    assert conv.format == "messages" and conv.messages == [user("q"), assistant("a")]
    assert conv.rejected_messages is None


def test_prompt_completion_strings_become_a_user_assistant_exchange() -> None:
    conv = normalize_row({"prompt": "q", "completion": "a"}, source=SRC, index=0)
    assert conv.format == "prompt_completion" and conv.messages == [user("q"), assistant("a")]


def test_prompt_completion_accept_message_lists() -> None:
    row = {"prompt": [system("s"), user("q")], "completion": [assistant("a")]}
    conv = normalize_row(row, source=SRC, index=0)
    assert conv.messages == [system("s"), user("q"), assistant("a")]


def test_preference_with_whole_conversations_is_taken_as_is() -> None:
    row = {"prompt": "q", "chosen": [user("q"), assistant("good")], "rejected": [user("q"), assistant("bad")]}
    conv = normalize_row(row, source=SRC, index=0)
    assert conv.format == "preference"
    assert conv.messages == [user("q"), assistant("good")]
    assert conv.rejected_messages == [user("q"), assistant("bad")]


def test_an_ultrafeedback_binarized_row_with_messages_beside_the_pair_is_a_pair() -> None:
    # HuggingFaceH4/ultrafeedback_binarized: 'messages' repeats the chosen side next to 'chosen'/'rejected'.
    chosen, rejected = [user("q"), assistant("good")], [user("q"), assistant("bad")]
    row = {"prompt": "q", "messages": chosen, "chosen": chosen, "rejected": rejected, "score_chosen": 8.0}
    conv = normalize_row(row, source=SRC, index=0)
    assert conv.format == "preference" and conv.messages == chosen and conv.rejected_messages == rejected


def test_preference_with_assistant_only_sides_is_appended_to_the_prompt() -> None:
    as_strings = normalize_row({"prompt": "q", "chosen": "good", "rejected": "bad"}, source=SRC, index=0)
    as_lists = normalize_row(
        {"prompt": "q", "chosen": [assistant("good")], "rejected": [assistant("bad")]}, source=SRC, index=0
    )
    assert as_strings == as_lists
    assert as_strings.messages == [user("q"), assistant("good")]
    assert as_strings.rejected_messages == [user("q"), assistant("bad")]


def test_extra_message_keys_are_dropped() -> None:
    conv = normalize_row({"messages": [{**user("q"), "name": "x"}, assistant("a")]}, source=SRC, index=0)
    assert conv.messages[0] == user("q")


def test_sft_mode_trains_on_the_chosen_side_of_a_preference_row(tok) -> None:
    pref = {"prompt": "q", "chosen": "good answer", "rejected": "bad answer"}
    chat = {"messages": [user("q"), assistant("good answer")]}
    kw = dict(mode="sft", max_length=64, source=SRC, index=0)
    assert tokenize_example(tok, pref, **kw) == tokenize_example(tok, chat, **kw)


def test_preference_mode_returns_both_sides(tok) -> None:
    row = {"prompt": "q", "chosen": "good answer", "rejected": "bad answer"}
    ex = tokenize_example(tok, row, mode="preference", max_length=64, source=SRC, index=0)
    assert set(ex) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    assert targets(ex, "chosen_") == ids_of(tok, "good answer") + [tok.eos_token_id]
    assert targets(ex, "rejected_") == ids_of(tok, "bad answer") + [tok.eos_token_id]


def test_preference_mode_rejects_a_row_without_rejected_side(tok) -> None:
    with pytest.raises(DataError, match=r"demo.jsonl row 5: preference mode needs 'chosen' and 'rejected'"):
        tokenize_example(tok, {"prompt": "q", "completion": "a"}, mode="preference", max_length=64, source=SRC, index=4)


# --------------------------------------------------------------------------- bad rows

BAD_ROWS = [
    pytest.param({"prompt": "q", "chosen": "a"}, "missing_field", "missing field 'rejected'", id="missing-rejected"),
    pytest.param({"chosen": "a", "rejected": "b"}, "missing_field", "missing field 'prompt'", id="missing-prompt"),
    pytest.param({"prompt": "q"}, "missing_field", "needs 'completion' or 'chosen'", id="prompt-only"),
    pytest.param(
        {"messages": [user("q"), {"role": "assistant"}]},
        "missing_field",
        "messages[1] is missing field 'content'",
        id="missing-content",
    ),
    pytest.param(
        {"question": "hi", "label": 1},
        "unknown_format",
        "unknown format: keys ['label', 'question']",
        id="unknown-format",
    ),
    pytest.param(
        {"messages": [user("q"), assistant("a"), assistant("b")]},
        "role_order",
        "messages[2] has role 'assistant' after 'assistant' (expected user)",
        id="assistant-after-assistant",
    ),
    pytest.param(
        {"messages": [assistant("a")]},
        "role_order",
        "messages[0] has role 'assistant' at the start (expected user)",
        id="starts-with-assistant",
    ),
    pytest.param(
        {"messages": [user("q"), system("s"), assistant("a")]},
        "role_order",
        "messages[1] has role 'system' after 'user' (expected assistant)",
        id="late-system",
    ),
    pytest.param(
        {"messages": [user("q"), assistant("a"), user("again")]},
        "role_order",
        "ends with a 'user' turn",
        id="ends-with-user",
    ),
    pytest.param(
        {"messages": [user("q"), assistant("  ")]},
        "empty_assistant",
        "messages[1] (assistant) is empty",
        id="empty-assistant",
    ),
    pytest.param(
        {"messages": [user("q"), assistant(7)]},
        "non_string_content",
        "messages[1] (assistant) content must be a string, got int",
        id="non-string-content",
    ),
    pytest.param(
        {"prompt": 3, "completion": "a"}, "non_string_content", "'prompt' must be a string", id="non-string-prompt"
    ),
    pytest.param(
        {"messages": [user("q"), {"role": "narrator", "content": "x"}]},
        "unknown_role",
        "messages[1] has unknown role 'narrator' (expected one of system, user, assistant, tool)",
        id="unknown-role",
    ),
    pytest.param({"messages": []}, "invalid_messages", "'messages' is an empty list", id="empty-messages"),
    pytest.param({"messages": "hello"}, "invalid_messages", "'messages' must be a list", id="messages-not-a-list"),
    pytest.param(
        {"prompt": "q", "chosen": "a", "rejected": [user("q"), user("q2"), assistant("b")]},
        "role_order",
        "rejected[1] has role 'user' after 'user'",
        id="bad-rejected-side",
    ),
]


@pytest.mark.parametrize(("row", "kind", "reason"), BAD_ROWS)
def test_bad_row_raises_data_error_naming_file_row_and_reason(tok, row, kind, reason) -> None:
    with pytest.raises(DataError) as info:
        tokenize_example(tok, row, mode="sft", max_length=64, source=SRC, index=17)
    err = info.value
    assert (err.source, err.row, err.kind) == (SRC, 17, kind)
    assert reason in err.reason
    assert str(err) == f"{SRC} row 18: {err.reason}"  # index 17 is the 18th row


def test_non_dict_row_is_an_unknown_format() -> None:
    with pytest.raises(DataError, match="demo.jsonl row 3: row must be a JSON object, got list"):
        normalize_row([1, 2], source=SRC, index=2)  # type: ignore[arg-type]


def test_data_error_is_a_value_error_and_survives_pickling() -> None:
    import pickle

    err = DataError(SRC, 3, "boom", kind="too_long")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, ValueError)
    assert (again.source, again.row, again.reason, again.kind, str(again)) == (SRC, 3, "boom", "too_long", str(err))


def _mixed_rows() -> list[dict]:
    good = {"messages": [user("q"), assistant("a")]}
    return [
        good,
        {"messages": [user("q"), assistant("")]},  # empty_assistant
        good,
        {"foo": 1},  # unknown_format
        good,
        {"messages": [user("q"), assistant("a"), assistant("b")]},  # role_order
        good,
        {"messages": [user("x " * 200), assistant("y " * 200)]},  # too_long (drop)
    ]


def test_skip_mode_counts_exactly_the_bad_rows(tok) -> None:
    examples, report = tokenize_rows(
        tok, _mixed_rows(), source=SRC, start_index=10, on_bad_row="skip", max_length=64, truncation="drop"
    )
    assert len(examples) == 4
    assert report.seen == 8 and report.skipped == 4
    assert report.counts == {"empty_assistant": 1, "unknown_format": 1, "role_order": 1, "too_long": 1}
    assert [row for _, row, _ in report.samples] == [11, 13, 15, 17]


def test_error_mode_raises_on_the_first_bad_row(tok) -> None:
    with pytest.raises(DataError, match=r"^demo.jsonl row 12: messages\[1\] \(assistant\) is empty$"):
        tokenize_rows(tok, _mixed_rows(), source=SRC, start_index=10, on_bad_row="error", max_length=64)


def test_bad_row_reports_merge_and_serialise() -> None:
    a, b = BadRowReport(max_samples=2), BadRowReport(max_samples=2)
    a.seen, b.seen = 5, 7
    a.add(DataError("a.jsonl", 1, "x", kind="role_order"))
    b.add(DataError("b.jsonl", 2, "y", kind="role_order"))
    b.add(DataError("b.jsonl", 4, "z", kind="too_long"))
    assert a.merge(b) is a
    assert a.to_dict() == {
        "seen": 12,
        "skipped": 3,
        "by_reason": {"role_order": 2, "too_long": 1},
        "samples": [{"source": "a.jsonl", "row": 1, "reason": "x"}, {"source": "b.jsonl", "row": 2, "reason": "y"}],
        "truncated": 0,
        "prompt_cut": 0,
    }


def test_read_jsonl_yields_rows_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert list(read_jsonl(path)) == [{"a": 1}, {"a": 2}]


def test_read_jsonl_reports_file_and_line_of_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(read_jsonl(path))
    assert info.value.source == str(path) and info.value.row == 2 and info.value.kind == "invalid_json"
    assert "line 3: invalid JSON" in str(info.value)


def test_read_jsonl_rejects_non_object_lines(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1: expected a JSON object, got list"):
        list(read_jsonl(path))


# --------------------------------------------------------------------------- truncation

LONG_PROMPT = [user("one two three four five six seven eight nine ten " * 4), assistant("The answer is 7.")]


def test_short_rows_are_not_truncated(tok) -> None:
    full = tokenize_conversation(tok, LONG_PROMPT, max_length=10_000)
    for policy in ("truncate_left", "truncate_right", "drop"):
        assert tokenize_conversation(tok, LONG_PROMPT, max_length=10_000, truncation=policy) == full


def test_truncate_left_drops_prompt_tokens_and_keeps_the_response(tok) -> None:
    full = tokenize_conversation(tok, LONG_PROMPT, max_length=10_000)
    ex = tokenize_conversation(tok, LONG_PROMPT, max_length=20, truncation="truncate_left")
    assert ex["input_ids"] == full["input_ids"][-20:]
    assert targets(ex) == targets(full)


def test_truncate_left_keeps_the_start_of_an_overlong_response(tok) -> None:
    convo = [user("hi"), assistant("one two three four five six seven eight nine ten")]
    full = tokenize_conversation(tok, convo, max_length=10_000)
    ex = tokenize_conversation(tok, convo, max_length=4, truncation="truncate_left")
    assert ex["input_ids"] == ex["labels"] == targets(full)[:4]


def test_truncate_left_drops_earlier_turns_before_the_last_response(tok) -> None:
    full = tokenize_conversation(tok, TWO_TURNS, max_length=10_000)
    last_answer = ids_of(tok, "It is 6.") + [tok.eos_token_id]
    ex = tokenize_conversation(tok, TWO_TURNS, max_length=len(last_answer) + 3, truncation="truncate_left")
    assert ex["input_ids"] == full["input_ids"][-(len(last_answer) + 3) :]
    assert targets(ex) == last_answer


def test_truncate_right_cuts_the_end(tok) -> None:
    convo = [user("hi"), assistant("one two three four five six seven eight nine ten")]
    full = tokenize_conversation(tok, convo, max_length=10_000)
    ex = tokenize_conversation(tok, convo, max_length=12, truncation="truncate_right")
    assert ex["input_ids"] == full["input_ids"][:12]
    assert ex["labels"] == full["labels"][:12]


def test_truncate_right_without_targets_left_is_a_data_error(tok) -> None:
    with pytest.raises(DataError, match="no target tokens left after truncate_right to max_length=5") as info:
        tokenize_conversation(tok, LONG_PROMPT, max_length=5, truncation="truncate_right", source=SRC, index=3)
    assert info.value.kind == "no_targets" and info.value.row == 3


def test_drop_policy_reports_the_length(tok) -> None:
    n = len(tokenize_conversation(tok, LONG_PROMPT, max_length=10_000)["input_ids"])
    with pytest.raises(DataError, match=rf"demo.jsonl row 10: longer than max_length=20 \({n} tokens\)"):
        tokenize_conversation(tok, LONG_PROMPT, max_length=20, truncation="drop", source=SRC, index=9)


def test_unknown_truncation_policy_is_a_value_error(tok) -> None:
    with pytest.raises(ValueError, match="unknown truncation"):
        tokenize_conversation(tok, LONG_PROMPT, max_length=20, truncation="middle")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- collate


def test_collate_right_pads_to_the_longest_row_and_masks_padding() -> None:
    batch = pad_collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_collate_pads_to_a_multiple(tok) -> None:
    batch = pad_collate([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], pad_token_id=9, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (1, 8)
    assert batch["input_ids"][0, 3:].tolist() == [9] * 5


def test_collate_pads_chosen_and_rejected_to_one_common_length() -> None:
    batch = pad_collate(
        [
            {
                "chosen_input_ids": [1, 2],
                "chosen_labels": [1, 2],
                "rejected_input_ids": [3, 4, 5, 6],
                "rejected_labels": [3, 4, 5, 6],
            },
            {"chosen_input_ids": [7], "chosen_labels": [7], "rejected_input_ids": [8], "rejected_labels": [8]},
        ],
        pad_token_id=0,
    )
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    assert set(shapes.values()) == {(2, 4)}
    assert set(shapes) == {
        "chosen_input_ids",
        "chosen_labels",
        "chosen_attention_mask",
        "rejected_input_ids",
        "rejected_labels",
        "rejected_attention_mask",
    }
    # The shorter chosen side is padded to the rejected side's length: pad id on tokens, -100 on labels.
    assert batch["chosen_input_ids"].tolist() == [[1, 2, 0, 0], [7, 0, 0, 0]]
    assert batch["chosen_labels"].tolist() == [[1, 2, -100, -100], [7, -100, -100, -100]]
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert batch["rejected_input_ids"].tolist() == [[3, 4, 5, 6], [8, 0, 0, 0]]
    assert batch["rejected_labels"].tolist() == [[3, 4, 5, 6], [8, -100, -100, -100]]
    assert batch["rejected_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]


def test_collate_rejects_mismatched_label_length() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        pad_collate([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)


def test_tokenized_batch_runs_through_the_tiny_model(tok) -> None:
    from ift.models import load_model

    rows = [{"messages": TWO_TURNS}, {"prompt": "What is the capital of France?", "completion": "Paris."}]
    examples, report = tokenize_rows(tok, rows, source=SRC, max_length=64)
    batch = pad_collate(examples, tok.pad_token_id)
    model = load_model("tiny", seed=0, tokenizer=tok)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert report.skipped == 0 and torch.isfinite(out.loss)


def test_a_jsonl_error_names_the_line_an_editor_shows(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{broken\n')
    with pytest.raises(DataError) as info:
        list(read_jsonl(path))
    assert (info.value.row, info.value.line) == (1, 3)  # the second row, on line 3 after a blank line
    assert str(info.value).startswith(f"{path} line 3: invalid JSON")


def test_a_data_error_survives_pickling_with_its_line() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(DataError("f.jsonl", 4, "bad", kind="invalid_json", line=7)))
    assert (err.source, err.row, err.kind, err.line) == ("f.jsonl", 4, "invalid_json", 7)
    assert str(err) == "f.jsonl line 7: bad"
