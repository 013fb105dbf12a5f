"""Tests for ift.toydata: the deterministic synthetic corpora, the bundled files and the offline eval tasks' data."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from ift import toydata
from ift.data import normalize_row, read_jsonl
from pipelines.evaluation.tasks import OFFLINE_TASKS, TASKS_DIR

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = REPO / "pipelines" / "demo_data"


def test_conversations_are_identical_for_the_same_seed() -> None:
    assert toydata.make_conversations(50, seed=3) == toydata.make_conversations(50, seed=3)


def test_conversations_differ_for_different_seeds() -> None:
    assert toydata.make_conversations(50, seed=3) != toydata.make_conversations(50, seed=4)


def test_preference_pairs_and_prompt_completion_are_deterministic() -> None:
    assert toydata.make_preference_pairs(30, seed=5) == toydata.make_preference_pairs(30, seed=5)
    assert toydata.make_prompt_completion(30, seed=5) == toydata.make_prompt_completion(30, seed=5)


def test_generators_return_the_requested_number_of_rows() -> None:
    assert len(toydata.make_conversations(17, 0)) == 17
    assert len(toydata.make_preference_pairs(17, 0)) == 17
    assert len(toydata.make_prompt_completion(17, 0)) == 17


def test_arithmetic_answers_are_correct_and_small() -> None:
    rng = random.Random(0)
    for _ in range(300):
        question, text, answer = toydata.arithmetic_problem(rng)
        a, op, b, result = re.search(r"(\d+) ([+-]) (\d+) = (\d+)", text).groups()
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert int(result) == expected == answer
        assert text.endswith(f"The answer is {answer}.")
        assert 0 <= int(a) <= 20 and 0 <= int(b) <= 20 and answer >= 0
        assert question.endswith("?")


def test_capital_facts_has_about_thirty_distinct_countries() -> None:
    facts = toydata.capital_facts()
    assert 25 <= len(facts) <= 35
    assert len({c for c, _ in facts}) == len(facts)
    assert ("France", "Paris") in facts


def test_conversations_mix_system_messages_and_multi_turn() -> None:
    rows = toydata.make_conversations(400, seed=0)
    with_system = sum(r["messages"][0]["role"] == "system" for r in rows)
    multi_turn = sum(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in rows)
    assert 50 < with_system < 150
    assert 50 < multi_turn < 150


def test_conversations_cover_all_task_families() -> None:
    questions = [m["content"] for r in toydata.make_conversations(200, 0) for m in r["messages"] if m["role"] == "user"]
    assert any("How many" in q for q in questions)
    assert any("capital" in q for q in questions)
    assert any(q.startswith("Reverse this list") for q in questions)
    assert any(q.startswith("Repeat this list") for q in questions)


def test_preference_pairs_use_ultrafeedback_layout_with_a_wrong_rejected_answer() -> None:
    for row in toydata.make_preference_pairs(200, seed=1):
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["chosen"][0] == {"role": "user", "content": row["prompt"]}
        assert row["rejected"][0] == row["chosen"][0]
        assert row["chosen"][-1]["role"] == row["rejected"][-1]["role"] == "assistant"
        assert row["chosen"][-1]["content"] != row["rejected"][-1]["content"]


def test_rejected_arithmetic_answer_is_off_by_one() -> None:
    for row in toydata.make_preference_pairs(200, seed=2):
        good, bad = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        if "The answer is" in good:
            g = int(good.rsplit(" ", 1)[-1].rstrip("."))
            b = int(bad.rsplit(" ", 1)[-1].rstrip("."))
            assert abs(g - b) == 1


def test_rejected_list_answer_has_the_same_words_in_a_wrong_order() -> None:
    for row in toydata.make_preference_pairs(200, seed=2):
        if "this list" in row["prompt"]:
            good = row["chosen"][-1]["content"].split(", ")
            bad = row["rejected"][-1]["content"].split(", ")
            assert sorted(good) == sorted(bad) and good != bad


def test_every_generated_row_is_valid_for_the_data_loader() -> None:
    rows = (
        toydata.make_conversations(100, 0)
        + toydata.make_preference_pairs(100, 0)
        + toydata.make_prompt_completion(100, 0)
    )
    for i, row in enumerate(rows):
        normalize_row(row, source="toydata", index=i)


@pytest.mark.parametrize("name", sorted(toydata.BUNDLED_FILES))
def test_committed_bundled_file_matches_the_generator(tmp_path: Path, name: str) -> None:
    toydata.write_bundled_data(tmp_path)
    assert (DATA_DIR / name).read_bytes() == (tmp_path / name).read_bytes(), (
        f"pipelines/demo_data/{name} is stale; regenerate with `python -m ift.toydata pipelines/demo_data`"
    )


def test_bundled_files_have_the_documented_sizes() -> None:
    counts = {name: len((DATA_DIR / name).read_text(encoding="utf-8").splitlines()) for name in toydata.BUNDLED_FILES}
    assert counts == {"demo_chat.jsonl": 1200, "demo_chat_val.jsonl": 100, "demo_pref.jsonl": 600}
    assert sum((DATA_DIR / n).stat().st_size for n in counts) < 1_000_000


def test_validation_split_is_not_a_copy_of_training_rows() -> None:
    train = (DATA_DIR / "demo_chat.jsonl").read_text(encoding="utf-8").splitlines()
    val = (DATA_DIR / "demo_chat_val.jsonl").read_text(encoding="utf-8").splitlines()
    # A shared seed would make val identical to the first 100 training rows.
    # Some short rows coincide by design: the capital questions are a closed
    # set (30 countries x 3 phrasings), so ~20% overlap is expected.
    assert val != train[:100]
    assert sum(line in set(train) for line in val) < 40


# --------------------------------------------------------------------------- offline eval tasks


def test_shipped_task_files_are_what_the_generator_writes():
    rows = toydata.offline_task_rows()
    for name in OFFLINE_TASKS:
        assert list(read_jsonl(TASKS_DIR / f"{name}.jsonl")) == rows[name], (
            f"{name}.jsonl is stale: run python -m pipelines.evaluation build-tasks"
        )


def test_arithmetic_eval_problems_are_held_out_from_the_bundled_data():
    bundled = toydata._bundled_questions()
    questions = [r["question"] for r in toydata.offline_task_rows()["ift_arith"]]
    assert len(questions) == toydata.ARITH_N == len(set(questions))
    assert not bundled & set(questions)
