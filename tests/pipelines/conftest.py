"""Corpora shared by the modules that run `ift train` end to end (each module writes its own copy)."""

from __future__ import annotations

import pytest

from ift.toydata import make_conversations, make_preference_pairs, write_jsonl


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    # One epoch of 128 rows: 16 steps of 4 x 2 workers, and a single pass of the stream (each
    # epoch re-reads and re-tokenizes it, which costs seconds on this small machine).
    write_jsonl(make_conversations(128, seed=7), root / "chat.jsonl")
    write_jsonl(make_conversations(16, seed=8), root / "chat_val.jsonl")
    write_jsonl(make_conversations(32, seed=7), root / "chat32.jsonl")
    write_jsonl(make_preference_pairs(16, seed=9), root / "pref.jsonl")  # read 8 times per epoch (weight 8)
    return root
