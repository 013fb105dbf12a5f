"""The pipeline's side of chat templates: data.chat_template validated at load, part of the cache
key, and rendered by the tokenizer actors (the templates themselves: tests/ift/test_formats.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import ConfigError
from pipelines.config_loading import apply_overrides, load_config
from pipelines.data.tokenize import TokenizeRows, tokenize_rows_args, tokenizer_id
from tests.ift.test_formats import SRC, WEATHER


def test_data_config_keeps_a_shipped_name_and_makes_a_template_file_absolute(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "mine.jinja").write_text("{{ messages[0]['content'] }}")
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert apply_overrides(cfg, {"data.chat_template": "chatml"}).data.chat_template == "chatml"
    assert apply_overrides(cfg, {"data.chat_template": "mine.jinja"}).data.chat_template == str(tmp_path / "mine.jinja")


def test_data_config_refuses_an_unknown_chat_template() -> None:
    with pytest.raises(ConfigError, match=r"data.chat_template.*unknown chat template 'chatlm'"):
        apply_overrides(load_config(), {"data.chat_template": "chatlm"})


def test_the_cache_key_changes_with_the_chat_template(tmp_path: Path) -> None:
    cfg = load_config()
    (tmp_path / "a.jinja").write_text("{{ 'A' }}")
    (tmp_path / "b.jinja").write_text("{{ 'B' }}")
    ids = {
        tokenizer_id(apply_overrides(cfg, {"data.chat_template": v}))
        for v in ("chatml", "zephyr", str(tmp_path / "a.jinja"), str(tmp_path / "b.jinja"))
    }
    assert len(ids | {tokenizer_id(cfg)}) == 5


def test_the_tokenizer_actor_renders_with_the_configured_template() -> None:
    cfg = load_config(None, ["data.chat_template=chatml", "data.max_length=256"])
    actor = TokenizeRows(*tokenize_rows_args(cfg))
    payload = json.dumps({"messages": WEATHER}) + "\n"
    out = actor({"source": np.asarray([SRC]), "row": np.asarray([0]), "line": np.asarray([1]),
                 "payload": np.asarray([payload], dtype=object)})  # fmt: skip
    assert out["error"] == [""] and "<|im_start|>tool" in actor.tokenizer.decode(out["input_ids"][0])
