"""Row formats users bring (ShareGPT, Alpaca, plain text, tool calls), chat templates shipped with ift,
truncation counts and the column of a JSON error."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ift.chat_templates import CHAT_TEMPLATES_DIR, resolve_chat_template, shipped_chat_templates
from ift.data import (
    IGNORE_INDEX,
    BadRowReport,
    DataError,
    TruncationStats,
    normalize_row,
    parse_json_row,
    read_jsonl,
    tokenize_example,
    tokenize_rows,
)
from ift.tokenization import load_tokenizer

SRC = "demo.jsonl"
DATA = Path(__file__).resolve().parents[1] / "data" / "formats"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def chatml():
    return load_tokenizer("tiny", chat_template="chatml")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def call(name: str, arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def calls(*tool_calls: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": list(tool_calls)}


def tool(text: str, **extra: str) -> dict:
    return {"role": "tool", "content": text, **extra}


def target_runs(tokenizer, example: dict, prefix: str = "") -> list[str]:
    """The decoded runs of consecutive target tokens, in order."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(example[prefix + "input_ids"], example[prefix + "labels"], strict=True):
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return [tokenizer.decode(run) for run in runs]


def sft(tokenizer, row: dict, **kw) -> dict:
    return tokenize_example(tokenizer, row, mode="sft", max_length=kw.pop("max_length", 512), source=SRC, **kw)


def bad_row(tokenizer, row: dict, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        sft(tokenizer, row, index=4, **kw)
    assert (info.value.source, info.value.row) == (SRC, 4)
    return info.value


WEATHER = [
    user("Weather in Paris?"),
    calls(call("get_weather", {"city": "Paris"})),
    tool("22C, sunny", tool_call_id="call_1"),
    assistant("It is 22C and sunny."),
]
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


# --------------------------------------------------------------------------- ShareGPT


def test_sharegpt_human_and_gpt_become_user_and_assistant() -> None:
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    conv = normalize_row(row, source=SRC, index=0)
    assert conv.format == "sharegpt" and conv.messages == [user("q"), assistant("a")]


def test_sharegpt_user_assistant_and_chatgpt_speakers_are_accepted() -> None:
    row = {
        "conversations": [
            {"from": "user", "value": "q1"},
            {"from": "chatgpt", "value": "a1"},
            {"from": "human", "value": "q2"},
            {"from": "assistant", "value": "a2"},
        ]
    }
    conv = normalize_row(row, source=SRC, index=0)
    assert conv.messages == [user("q1"), assistant("a1"), user("q2"), assistant("a2")]


def test_sharegpt_rows_train_on_the_gpt_turns_and_their_end_of_turn(tok) -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Capital of France?"},
            {"from": "gpt", "value": "Paris."},
            {"from": "human", "value": "And of Italy?"},
            {"from": "gpt", "value": "Rome."},
        ]
    }
    assert target_runs(tok, sft(tok, row)) == ["Paris.<|end|>", "Rome.<|end|>"]


def test_sharegpt_top_level_system_becomes_the_first_message() -> None:
    row = {"system": "Be brief.", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    conv = normalize_row(row, source=SRC, index=0)
    assert conv.messages == [{"role": "system", "content": "Be brief."}, user("q"), assistant("a")]


def test_sharegpt_unknown_from_is_a_bad_row_naming_the_index_and_the_allowed_values(tok) -> None:
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "narrator", "value": "a"}]}
    err = bad_row(tok, row)
    assert err.kind == "unknown_role"
    assert "conversations[1] has unknown 'from' 'narrator' (expected one of human, user, gpt, assistant" in err.reason
    assert "observation, function_call)" in err.reason


def test_sharegpt_item_without_value_is_a_bad_row_naming_the_field(tok) -> None:
    err = bad_row(tok, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]})
    assert err.kind == "missing_field" and "conversations[1] is missing field 'value'" in err.reason


def test_messages_items_with_from_and_value_keys_are_accepted() -> None:
    row = {"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    conv = normalize_row(row, source=SRC, index=0)
    assert conv.format == "messages" and conv.messages == [user("q"), assistant("a")]


def test_sharegpt_function_call_and_observation_become_a_tool_call_and_its_output() -> None:
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": "22C, sunny"},
            {"from": "gpt", "value": "It is 22C and sunny."},
        ]
    }
    conv = normalize_row(row, source=SRC, index=0)
    assert conv.messages == [WEATHER[0], WEATHER[1], tool("22C, sunny"), WEATHER[3]]


def test_sharegpt_function_call_that_is_not_json_is_a_bad_row(tok) -> None:
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get_weather(Paris)"}]}
    err = bad_row(tok, row)
    assert err.kind == "invalid_tool_call"
    assert "conversations[1] (function_call) value must be JSON" in err.reason and "not valid JSON" in err.reason


def test_sharegpt_pair_takes_the_conversation_as_the_prompt() -> None:
    # LLaMA-Factory's ranking layout: the prompt conversation plus one chosen and one rejected message.
    row = {
        "conversations": [{"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    conv = normalize_row(row, source=SRC, index=0)
    assert conv.format == "preference"
    assert conv.messages == [user("q"), assistant("good")] and conv.rejected_messages == [user("q"), assistant("bad")]


# --------------------------------------------------------------------------- Alpaca


def test_alpaca_prompt_is_the_instruction_a_blank_line_and_the_input() -> None:
    conv = normalize_row({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}, source=SRC, index=0)
    assert conv.format == "alpaca" and conv.messages == [user("Add the numbers.\n\n2 and 3"), assistant("5")]


@pytest.mark.parametrize("row_input", ["", "   ", None, "absent"])
def test_alpaca_without_an_input_prompts_with_the_instruction_alone(row_input) -> None:
    row = {"instruction": "Name a colour.", "output": "Red."}
    if row_input != "absent":
        row["input"] = row_input
    assert normalize_row(row, source=SRC, index=0).messages == [user("Name a colour."), assistant("Red.")]


def test_alpaca_output_is_the_only_target(tok) -> None:
    ex = sft(tok, {"instruction": "Add the numbers.", "input": "2 and 3", "output": "It is 5."})
    assert target_runs(tok, ex) == ["It is 5.<|end|>"]


def test_alpaca_system_field_becomes_the_system_message() -> None:
    row = {"system": "One word.", "instruction": "Opposite of hot?", "output": "Cold."}
    conv = normalize_row(row, source=SRC, index=0)
    assert conv.messages[0] == {"role": "system", "content": "One word."}


@pytest.mark.parametrize("missing", ["instruction", "output"])
def test_alpaca_row_missing_a_field_is_a_bad_row_naming_it(tok, missing) -> None:
    row = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    del row[missing]
    err = bad_row(tok, row)
    assert err.kind == "missing_field" and f"missing field '{missing}'" in err.reason


def test_alpaca_row_with_an_empty_output_is_a_bad_row(tok) -> None:
    err = bad_row(tok, {"instruction": "Say hi.", "output": "  "})
    assert err.kind == "empty_assistant" and "'output' is empty" in err.reason


# --------------------------------------------------------------------------- plain text


def test_text_row_is_bos_text_eos_without_a_chat_template(tok) -> None:
    ex = sft(tok, {"text": "Paris is the capital of France."})
    body = tok("Paris is the capital of France.", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == [tok.bos_token_id, *body, tok.eos_token_id]


def test_text_row_targets_every_token_but_the_bos(tok) -> None:
    ex = sft(tok, {"text": "Paris is the capital of France."})
    assert ex["labels"] == [IGNORE_INDEX, *ex["input_ids"][1:]]


def test_text_row_for_a_tokenizer_without_bos_starts_with_the_text(tmp_path: Path) -> None:
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", "hello", "world"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="[EOS]", unk_token="[UNK]").save_pretrained(tmp_path)
    plain = load_tokenizer(str(tmp_path))
    ex = sft(plain, {"text": "hello world"})
    assert ex["input_ids"] == ex["labels"] == [vocab["hello"], vocab["world"], vocab["[EOS]"]]


@pytest.mark.parametrize("policy", ["truncate_left", "truncate_right"])
def test_text_row_longer_than_max_length_keeps_its_beginning(tok, policy) -> None:
    row = {"text": "one two three four five six seven eight nine ten eleven twelve"}
    full = sft(tok, row)
    ex = sft(tok, row, max_length=9, truncation=policy)
    assert ex["input_ids"] == full["input_ids"][:9] and ex["labels"] == full["labels"][:9]


def test_text_row_longer_than_max_length_is_dropped_under_drop(tok) -> None:
    err = bad_row(tok, {"text": "one two three four five six seven eight nine ten"}, max_length=9, truncation="drop")
    assert err.kind == "too_long"


def test_text_row_in_preference_mode_is_a_bad_row_saying_why(tok) -> None:
    with pytest.raises(DataError, match=r"demo.jsonl row 3: a plain-text row \('text'\) has no chosen/rejected pair"):
        tokenize_example(tok, {"text": "hello"}, mode="preference", max_length=64, source=SRC, index=2)


@pytest.mark.parametrize("text", ["", " \n "])
def test_empty_text_is_a_bad_row(tok, text) -> None:
    err = bad_row(tok, {"text": text})
    assert err.kind == "empty_text" and "'text' is empty" in err.reason


def test_non_string_text_is_a_bad_row(tok) -> None:
    err = bad_row(tok, {"text": ["a", "b"]})
    assert err.kind == "non_string_content" and "'text' must be a string, got list" in err.reason


# --------------------------------------------------------------------------- tool calls


def test_tool_calls_and_tool_message_keys_are_kept_for_the_template() -> None:
    conv = normalize_row({"messages": WEATHER}, source=SRC, index=0)
    assert conv.messages[1]["tool_calls"] == [call("get_weather", {"city": "Paris"})]
    assert conv.messages[2] == tool("22C, sunny", tool_call_id="call_1")


@pytest.mark.parametrize("content", [None, "absent"])
def test_a_tool_call_turn_may_have_no_content(content) -> None:
    turn = {"role": "assistant", "tool_calls": [call("f", "{}")]}
    if content != "absent":
        turn["content"] = content
    conv = normalize_row({"messages": [user("q"), turn]}, source=SRC, index=0)
    assert conv.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call("f", "{}")]}


def test_tool_call_turns_and_answers_are_targets(chatml) -> None:
    ex = sft(chatml, {"messages": WEATHER})
    assert target_runs(chatml, ex) == [WEATHER_CALL + "<|im_end|>\n", "It is 22C and sunny.<|im_end|>\n"]


def test_tool_outputs_are_never_targets(chatml) -> None:
    ex = sft(chatml, {"messages": WEATHER})
    assert not any("22C, sunny" in run or "tool_response" in run for run in target_runs(chatml, ex))
    assert "<tool_response>\n22C, sunny\n</tool_response>" in chatml.decode(ex["input_ids"])


def test_several_tool_outputs_may_follow_a_turn_with_several_calls(chatml) -> None:
    messages = [
        user("Weather in Paris and Rome?"),
        calls(call("get_weather", {"city": "Paris"}), call("get_weather", {"city": "Rome"})),
        tool("22C"),
        tool("25C"),
        assistant("Paris 22C, Rome 25C."),
    ]
    runs = target_runs(chatml, sft(chatml, {"messages": messages}))
    assert runs[0].count("<tool_call>") == 2 and runs[1] == "Paris 22C, Rome 25C.<|im_end|>\n"


def test_a_conversation_may_end_with_a_tool_call(chatml) -> None:
    ex = sft(chatml, {"messages": [user("Book for two."), calls(call("book", '{"people": 2}'))]})
    assert target_runs(chatml, ex) == [
        '<tool_call>\n{"name": "book", "arguments": {"people": 2}}\n</tool_call><|im_end|>\n'
    ]


ROLE_ORDER = [
    pytest.param(
        [user("q"), tool("x"), assistant("a")],
        "messages[1] has role 'tool' after 'user' (expected assistant); a tool message answers",
        id="tool-after-user",
    ),
    pytest.param(
        [user("q"), assistant("a"), tool("x"), assistant("b")],
        "messages[2] has role 'tool' after 'assistant' (expected user)",
        id="tool-after-an-answer-without-calls",
    ),
    pytest.param(
        [user("q"), calls(call("f", "{}")), user("again"), assistant("a")],
        "messages[2] has role 'user' after 'assistant' (expected tool)",
        id="user-after-tool-calls",
    ),
    pytest.param(
        [user("q"), calls(call("f", "{}")), tool("x"), user("again"), assistant("a")],
        "messages[3] has role 'user' after 'tool' (expected tool or assistant)",
        id="user-after-tool",
    ),
    pytest.param(
        [user("q"), calls(call("f", "{}")), tool("x")], "ends with a 'tool' turn", id="ends-with-a-tool-output"
    ),
]


@pytest.mark.parametrize(("messages", "reason"), ROLE_ORDER)
def test_tool_role_order_errors_name_the_index(tok, messages, reason) -> None:
    err = bad_row(tok, {"messages": messages})
    assert err.kind == "role_order" and reason in err.reason


BAD_TOOL_CALLS = [
    pytest.param(
        {"tool_calls": "f()"}, "messages[1].tool_calls must be a list of tool calls, got str", id="not-a-list"
    ),
    pytest.param({"tool_calls": ["f"]}, "messages[1].tool_calls[0] must be a dict", id="call-not-a-dict"),
    pytest.param(
        {"tool_calls": [{"type": "function"}]},
        "messages[1].tool_calls[0] is missing field 'function'",
        id="no-function",
    ),
    pytest.param(
        {"tool_calls": [{"type": "retrieval", "function": {"name": "f", "arguments": "{}"}}]},
        "messages[1].tool_calls[0] has type 'retrieval' (expected 'function')",
        id="not-a-function",
    ),
    pytest.param(
        {"tool_calls": [{"function": {"arguments": "{}"}}]},
        "messages[1].tool_calls[0].function.name must be a non-empty string",
        id="no-name",
    ),
    pytest.param(
        {"tool_calls": [{"function": {"name": "f"}}]},
        "messages[1].tool_calls[0].function.arguments is missing",
        id="no-arguments",
    ),
    pytest.param(
        {"tool_calls": [{"function": {"name": "f", "arguments": 3}}]},
        "messages[1].tool_calls[0].function.arguments must be a JSON string or an object, got int",
        id="arguments-not-json",
    ),
]


@pytest.mark.parametrize(("fields", "reason"), BAD_TOOL_CALLS)
def test_malformed_tool_calls_are_bad_rows_naming_the_index_and_field(tok, fields, reason) -> None:
    err = bad_row(tok, {"messages": [user("q"), {"role": "assistant", "content": "", **fields}]})
    assert err.kind == "invalid_tool_call" and reason in err.reason


def test_tool_calls_on_a_user_turn_are_a_bad_row(tok) -> None:
    err = bad_row(tok, {"messages": [{**user("q"), "tool_calls": [call("f", "{}")]}, assistant("a")]})
    assert err.kind == "invalid_tool_call" and "messages[0] (user) has tool_calls" in err.reason


def test_tool_message_without_content_is_a_bad_row(tok) -> None:
    messages = [user("q"), calls(call("f", "{}")), {"role": "tool", "tool_call_id": "1"}, assistant("a")]
    err = bad_row(tok, {"messages": messages})
    assert err.kind == "missing_field" and "messages[2] is missing field 'content'" in err.reason


def test_absent_keys_given_as_none_as_parquet_rows_have_them_are_ignored() -> None:
    nones = {"tool_calls": None, "tool_call_id": None, "name": None}
    conv = normalize_row({"messages": [{**user("q"), **nones}, {**assistant("a"), **nones}]}, source=SRC, index=0)
    assert conv.messages == [user("q"), assistant("a")]


def test_a_template_without_the_tool_role_fails_telling_to_set_data_chat_template(tok) -> None:
    err = bad_row(tok, {"messages": WEATHER})
    assert err.kind == "template" and "Unknown role: tool" in err.reason
    assert "set data.chat_template=chatml" in err.reason


def test_a_template_that_ignores_tool_calls_is_refused(tok) -> None:
    # The tiny template renders only content: the call would vanish and the turn train on nothing.
    err = bad_row(tok, {"messages": [user("Book for two."), calls(call("book_table", "{}"))]})
    assert err.kind == "template" and "does not render tool_calls (messages[1] calls 'book_table'" in err.reason
    assert "set data.chat_template=chatml" in err.reason


# --------------------------------------------------------------------------- chat templates


def test_chatml_and_zephyr_are_shipped() -> None:
    assert {"chatml", "zephyr"} <= set(shipped_chat_templates())


def test_load_tokenizer_sets_a_shipped_template_by_name() -> None:
    tok = load_tokenizer("tiny", chat_template="chatml")
    assert tok.chat_template == (CHAT_TEMPLATES_DIR / "chatml.jinja").read_text(encoding="utf-8")


def test_load_tokenizer_reads_a_template_from_a_jinja_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}")
    tok = load_tokenizer("tiny", chat_template=str(path))
    assert tok.apply_chat_template([user("hi")], tokenize=False) == "[user] hi<|end|>"


def test_unknown_chat_template_is_an_error_listing_the_shipped_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown chat template 'chatlm'.*\(chatml, zephyr\)"):
        load_tokenizer("tiny", chat_template="chatlm")


def test_resolve_chat_template_passes_inline_template_text_through() -> None:
    text = "{{ messages[0]['content'] }}"
    assert resolve_chat_template(text) == text


def test_a_saved_tokenizer_keeps_the_chat_template(tmp_path: Path) -> None:
    load_tokenizer("tiny", chat_template="chatml").save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).chat_template == resolve_chat_template("chatml")


def test_chatml_renders_the_generation_prompt_and_string_arguments_verbatim(chatml) -> None:
    text = chatml.apply_chat_template(
        [user("q"), calls(call("f", '{"x":1}'))], tokenize=False, add_generation_prompt=False
    )
    assert text.endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {"x":1}}\n</tool_call><|im_end|>\n'
    )
    assert chatml.apply_chat_template([user("q")], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", ["chatml", "zephyr"])
def test_shipped_templates_tokenize_a_multi_turn_tool_conversation(name) -> None:
    # Prefix stability is what lets ift.data locate the assistant tokens: a template that lacks it is refused.
    tok = load_tokenizer("tiny", chat_template=name)
    messages = [{"role": "system", "content": "Be brief."}, *WEATHER, user("And Rome?"), assistant("Also sunny.")]
    ex = sft(tok, {"messages": messages})
    text = tok.apply_chat_template(messages, tokenize=False)
    assert ex["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert len(target_runs(tok, ex)) == 3


def test_zephyr_ends_every_turn_with_the_tokenizers_eos(tok) -> None:
    zephyr = load_tokenizer("tiny", chat_template="zephyr")
    ex = sft(zephyr, {"messages": [user("q"), assistant("It is 6.")]})
    assert target_runs(zephyr, ex) == ["It is 6.<|end|>"]  # the newline after eos is never generated


# --------------------------------------------------------------------------- truncation counts

LONG_ANSWER = {"messages": [user("hi"), assistant("one two three four five six seven eight nine ten")]}
LONG_PROMPT = {"messages": [user("one two three four five six seven eight nine ten " * 3), assistant("Seven.")]}
SHORT = {"messages": [user("hi"), assistant("yo")]}  # 11 tokens; LONG_ANSWER has 20


def test_tokenize_rows_counts_the_rows_cut_to_max_length(tok) -> None:
    _, report = tokenize_rows(tok, [SHORT, LONG_ANSWER, SHORT], source=SRC, max_length=15, truncation="truncate_right")
    assert (report.truncated, report.prompt_cut) == (1, 0)


def test_tokenize_rows_counts_the_rows_whose_whole_prompt_was_cut(tok) -> None:
    _, report = tokenize_rows(tok, [LONG_ANSWER, LONG_PROMPT], source=SRC, max_length=8, truncation="truncate_left")
    assert (report.truncated, report.prompt_cut) == (2, 1)  # LONG_PROMPT keeps a part of its prompt


def test_dropped_rows_are_bad_rows_not_truncated_ones(tok) -> None:
    _, report = tokenize_rows(
        tok, [LONG_ANSWER, SHORT], source=SRC, max_length=12, truncation="drop", on_bad_row="skip"
    )
    assert (report.truncated, report.prompt_cut, report.counts) == (0, 0, {"too_long": 1})


def test_tokenize_example_reports_one_rows_truncation_in_stats(tok) -> None:
    stats = TruncationStats()
    sft(tok, LONG_ANSWER, max_length=8, stats=stats)
    assert stats == TruncationStats(truncated=True, prompt_cut=True)
    sft(tok, SHORT, max_length=12, stats=stats)  # the same object, reused for the next row
    assert stats == TruncationStats()


def test_a_preference_row_is_truncated_when_either_side_is(tok) -> None:
    row = {"prompt": "hi", "chosen": "yo", "rejected": "one two three four five six seven eight nine ten"}
    stats = TruncationStats()
    tokenize_example(tok, row, mode="preference", max_length=10, source=SRC, stats=stats)
    assert stats.truncated


def test_truncation_counts_merge_and_survive_the_dict_round_trip() -> None:
    a, b = BadRowReport(truncated=2, prompt_cut=1), BadRowReport(truncated=3, prompt_cut=0)
    merged = a.merge(b)
    assert (merged.truncated, merged.prompt_cut) == (5, 1)
    again = BadRowReport.from_dict(merged.to_dict())
    assert (again.truncated, again.prompt_cut) == (5, 1)


# --------------------------------------------------------------------------- files and JSON errors


@pytest.mark.parametrize(
    ("name", "tokenizer_template", "rows"),
    [("sharegpt.jsonl", "chatml", 3), ("alpaca.jsonl", None, 3), ("text.jsonl", None, 2), ("tools.jsonl", "chatml", 2)],
)
def test_each_format_sample_file_tokenizes_without_a_bad_row(name, tokenizer_template, rows) -> None:
    tokenizer = load_tokenizer("tiny", chat_template=tokenizer_template)
    examples, report = tokenize_rows(tokenizer, read_jsonl(DATA / name), source=name, max_length=256, on_bad_row="skip")
    assert (len(examples), report.skipped) == (rows, 0)


def test_bad_rows_of_a_file_are_named_with_the_file_and_row(tok) -> None:
    path = DATA / "bad_rows.jsonl"
    _, report = tokenize_rows(tok, read_jsonl(path), source=str(path), max_length=128, on_bad_row="skip")
    assert [(row + 1, kind) for _, row, kind in _samples_with_kind(report)] == [
        (2, "conversations[0] has unknown 'from' 'narrator'"),
        (3, "missing field 'output'"),
        (4, "'text' is empty"),
        (5, "messages[1] has role 'tool' after 'user'"),
    ]
    with pytest.raises(DataError, match=rf"^{path} row 2: conversations\[0\] has unknown 'from'"):
        tokenize_rows(tok, read_jsonl(path), source=str(path), max_length=128)


def _samples_with_kind(report: BadRowReport) -> list[tuple[str, int, str]]:
    # The reason's first clause, enough to tell the rows apart.
    return [(source, row, reason.split(" (")[0].split(";")[0]) for source, row, reason in report.samples]


@pytest.mark.parametrize(
    ("line", "column"),
    [
        pytest.param('{"a": 1, "b": ', 15, id="cut-short"),
        pytest.param('{"a": 1, "b": oops}', 15, id="mid-line"),
        pytest.param('{"a": "ééé", "b": x}', 19, id="after-non-ascii"),
    ],
)
def test_invalid_json_in_a_file_reports_the_column_in_the_line(tmp_path: Path, line, column) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 0}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(read_jsonl(path))
    assert info.value.line == 2 and f"at column {column}" in info.value.reason


def test_invalid_json_cut_short_says_the_error_is_at_the_end_of_the_line() -> None:
    with pytest.raises(DataError, match=r"at column 7 \(the end of the line\)"):
        parse_json_row('{"a": \n', SRC, 0, line=1)


@pytest.mark.parametrize("payload", ['{"a": 1, "b": \r\n', b'{"a": 1, "b": \n'], ids=["crlf-str", "bytes"])
def test_a_payload_with_its_line_break_reports_the_column_in_the_line(payload) -> None:
    # pipelines.data.sources hands each JSONL line over with its line break.
    with pytest.raises(DataError, match="at column 15"):
        parse_json_row(payload, SRC, 0, line=9)


def test_a_utf8_bom_at_the_start_of_a_file_is_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "hi"}\n{"text": "yo"}\n')
    assert list(read_jsonl(path)) == [{"text": "hi"}, {"text": "yo"}]
