"""Deterministic synthetic chat corpora: the project's bundled training data.

Nothing here downloads anything.  The task families are deliberately small and
*learnable* so that a tiny model trained for a few hundred CPU steps improves
measurably (loss drops, exact-match on arithmetic rises above chance):

- arithmetic word problems with small numbers (0-20, ``+`` and ``-``), whose
  answers follow a fixed template ending in ``The answer is N.``;
- capital-of facts over a fixed list of ~30 countries;
- copy / reverse a short word list.

Every generator takes an explicit ``seed`` and uses its own
``random.Random`` instance, so outputs are identical across runs, processes
and machines (no global RNG state is touched).

Three layouts are produced, matching the formats :mod:`ift.data` accepts:

- conversational ``{"messages": [{"role", "content"}, ...]}``;
- UltraFeedback-binarized preference pairs
  ``{"prompt", "chosen": [messages], "rejected": [messages]}``;
- ``{"prompt": str, "completion": str}``.

The data of the offline lm-eval tasks shipped in ``pipelines/evaluation/task_configs``
(:func:`offline_task_rows`) come from the same generators with their own seeds,
the arithmetic problems held out from the bundled files.

Regenerate the bundled files and the eval tasks' data with::

    python -m ift.toydata pipelines/demo_data
    python -m pipelines.evaluation build-tasks
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

Message = dict[str, str]
Row = dict[str, Any]

# (country, capital).  Fixed and ordered: later tasks (multiple choice) index
# into this list, so only ever append to it.
_CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Australia", "Canberra"),
    ("Russia", "Moscow"),
    ("Poland", "Warsaw"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"),
)

_NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Maria", "Omar", "Yuki", "Leo", "Nina")
_OBJECTS = ("apples", "books", "coins", "pencils", "stickers", "cookies", "marbles", "cards")
_WORDS = tuple(
    "red blue green cat dog sun moon tree river stone bird fish apple bread milk rain snow wind star road".split()
)
# The three wordings of a capital question, shared by the training data and the
# offline multiple-choice eval task (which must ask in the wording the model learnt).
CAPITALS_PHRASINGS = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
)
_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You are a careful tutor who shows the working.",
)


def capital_facts() -> list[tuple[str, str]]:
    """Return the fixed ``(country, capital)`` list used by the capital tasks."""
    return list(_CAPITALS)


def arithmetic_problem(rng: random.Random) -> tuple[str, str, int]:
    """Draw one arithmetic word problem.

    Returns ``(question, answer_text, answer_number)``, e.g.
    ``("Tom has 3 apples and buys 4 more. How many apples does Tom have?",
    "Tom has 3 + 4 = 7 apples. The answer is 7.", 7)``.  Operands are in
    0-20; subtraction never goes below zero so every answer is a small
    non-negative integer (exact-match evaluation parses ``The answer is N``).
    """
    name = rng.choice(_NAMES)
    obj = rng.choice(_OBJECTS)
    a = rng.randint(0, 20)
    b = rng.randint(0, 20)
    if rng.random() < 0.5:
        answer = a + b
        question = f"{name} has {a} {obj} and buys {b} more. How many {obj} does {name} have?"
        text = f"{name} has {a} + {b} = {answer} {obj}. The answer is {answer}."
    else:
        if b > a:
            a, b = b, a
        answer = a - b
        question = f"{name} has {a} {obj} and gives away {b}. How many {obj} does {name} have left?"
        text = f"{name} has {a} - {b} = {answer} {obj} left. The answer is {answer}."
    return question, text, answer


def _capital_task(rng: random.Random) -> tuple[str, str, str]:
    """Return ``(question, correct_answer, wrong_answer)`` for a capital fact."""
    idx = rng.randrange(len(_CAPITALS))
    country, capital = _CAPITALS[idx]
    # Wrong capital: another country's capital, never the right one.
    wrong_idx = (idx + rng.randrange(1, len(_CAPITALS))) % len(_CAPITALS)
    wrong_capital = _CAPITALS[wrong_idx][1]
    question = rng.choice(CAPITALS_PHRASINGS).format(country=country)
    return question, f"The capital of {country} is {capital}.", f"The capital of {country} is {wrong_capital}."


def _list_task(rng: random.Random) -> tuple[str, str, str]:
    """Copy or reverse a short word list; the wrong answer has a wrong order."""
    words = rng.sample(_WORDS, rng.randint(3, 5))
    listed = ", ".join(words)
    if rng.random() < 0.5:
        question = f"Repeat this list: {listed}"
        right = list(words)
    else:
        question = f"Reverse this list: {listed}"
        right = list(reversed(words))
    wrong = list(right)
    # Swap two adjacent items so the rejected answer is the same words in a
    # wrong order (a minimal, learnable contrast for preference training).
    i = rng.randrange(len(wrong) - 1)
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    return question, ", ".join(right), ", ".join(wrong)


def _arith_pair(rng: random.Random) -> tuple[str, str, str]:
    """Arithmetic question with a correct and an off-by-one answer text."""
    question, text, answer = arithmetic_problem(rng)
    wrong = answer + 1 if answer == 0 or rng.random() < 0.5 else answer - 1
    # Same template as the correct answer so the only difference is the
    # result; "= N " and "is N." each occur exactly once in the template.
    wrong_text = text.replace(f"= {answer} ", f"= {wrong} ").replace(
        f"The answer is {answer}.", f"The answer is {wrong}."
    )
    return question, text, wrong_text


_TASKS: tuple[Callable[[random.Random], tuple[str, str, str]], ...] = (_arith_pair, _capital_task, _list_task)


def _task(rng: random.Random) -> tuple[str, str, str]:
    """Pick a task family uniformly and draw ``(question, right, wrong)``."""
    return rng.choice(_TASKS)(rng)


def make_conversations(n: int, seed: int) -> list[Row]:
    """Return ``n`` conversational rows ``{"messages": [...]}``.

    Roughly a quarter of the rows start with a system message and a quarter
    are multi-turn (two user/assistant exchanges); the rest are a single
    exchange.  Every assistant answer is correct.
    """
    rng = random.Random(seed)
    rows: list[Row] = []
    for _ in range(n):
        messages: list[Message] = []
        if rng.random() < 0.25:
            messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
        turns = 2 if rng.random() < 0.25 else 1
        for _ in range(turns):
            question, right, _wrong = _task(rng)
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": right})
        rows.append({"messages": messages})
    return rows


def make_preference_pairs(n: int, seed: int) -> list[Row]:
    """Return ``n`` preference rows in the UltraFeedback-binarized layout.

    ``{"prompt": str, "chosen": [user, assistant], "rejected": [user, assistant]}``
    where both conversations repeat the user turn (as UltraFeedback does) and
    the rejected answer is wrong: off-by-one arithmetic, a wrong capital, or a
    word list in the wrong order.
    """
    rng = random.Random(seed)
    rows: list[Row] = []
    for _ in range(n):
        question, right, wrong = _task(rng)
        user = {"role": "user", "content": question}
        rows.append(
            {
                "prompt": question,
                "chosen": [dict(user), {"role": "assistant", "content": right}],
                "rejected": [dict(user), {"role": "assistant", "content": wrong}],
            }
        )
    return rows


def make_prompt_completion(n: int, seed: int) -> list[Row]:
    """Return ``n`` rows ``{"prompt": str, "completion": str}`` (correct answers)."""
    rng = random.Random(seed)
    rows: list[Row] = []
    for _ in range(n):
        question, right, _wrong = _task(rng)
        rows.append({"prompt": question, "completion": right})
    return rows


# Sizes and seeds of the committed files.  The validation split uses its own
# seed so it is not a copy of the training prefix.
BUNDLED_FILES: dict[str, tuple[Callable[[int, int], list[Row]], int, int]] = {
    "demo_chat.jsonl": (make_conversations, 1200, 0),
    "demo_chat_val.jsonl": (make_conversations, 100, 1),
    "demo_pref.jsonl": (make_preference_pairs, 600, 2),
}


def write_jsonl(rows: list[Row], path: str | Path) -> None:
    """Write rows as JSON lines (UTF-8, stable key order, ``\\n`` line ends)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_bundled_data(out_dir: str | Path) -> list[Path]:
    """(Re)generate the bundled corpora into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    for name, (fn, n, seed) in BUNDLED_FILES.items():
        path = out_dir / name
        write_jsonl(fn(n, seed), path)
        written.append(path)
    return written


# --------------------------------------------------------------------------- offline eval tasks
# The data of the lm-eval tasks shipped in pipelines/evaluation/task_configs (ift_arith,
# ift_capitals_mc): same generators and wording as the training data, so a model
# trained on the bundled files can learn them, with their own seeds.

ARITH_SEED = 7001  # the bundled training/validation data use seeds 0-2 and 1000-1002
ARITH_N = 200
CAPITALS_SEED = 7002


def _bundled_questions() -> set[str]:
    """Every user turn of the bundled data files (the arithmetic eval problems are held out from them)."""
    seen: set[str] = set()
    for fn, n, seed in BUNDLED_FILES.values():
        for row in fn(n, seed):
            for conv in (row.get("messages"), row.get("chosen")):
                seen.update(m["content"] for m in conv or () if m["role"] == "user")
    return seen


def offline_task_rows() -> dict[str, list[Row]]:
    """The shipped offline eval tasks' data, generated deterministically.

    - ``ift_arith``: :data:`ARITH_N` problems from :func:`arithmetic_problem`
      with seed :data:`ARITH_SEED`, skipping questions that occur in the
      bundled data files (held out);
    - ``ift_capitals_mc``: every country of :func:`capital_facts` in the
      training data's three wordings (:data:`CAPITALS_PHRASINGS`), with the
      right answer and three other countries' capitals as whole-sentence
      choices in a shuffled order.
    """
    rng = random.Random(ARITH_SEED)
    held_out = _bundled_questions()
    arith: list[Row] = []
    seen: set[str] = set()
    while len(arith) < ARITH_N:
        q, solution, answer = arithmetic_problem(rng)
        if q in held_out or q in seen:
            continue
        seen.add(q)
        arith.append({"question": q, "answer": str(answer), "solution": solution})

    rng = random.Random(CAPITALS_SEED)
    facts = capital_facts()
    caps: list[Row] = []
    for phrasing in CAPITALS_PHRASINGS:
        for i, (country, capital) in enumerate(facts):
            others = [c for j, (_, c) in enumerate(facts) if j != i]
            options = [capital, *rng.sample(others, 3)]
            rng.shuffle(options)
            caps.append(
                {
                    "question": phrasing.format(country=country),
                    "choices": [f"The capital of {country} is {c}." for c in options],
                    "label": options.index(capital),
                    "country": country,
                }
            )
    return {"ift_arith": arith, "ift_capitals_mc": caps}


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m ift.toydata OUT_DIR`` writes the bundled files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="pipelines/demo_data")
    args = parser.parse_args(argv)
    for path in write_bundled_data(args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
