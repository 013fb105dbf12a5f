"""pipelines.data.cache: each source tokenized once into Parquet shards, reused while its inputs are unchanged,
read back as the same examples the stream gives; `ift data prepare`.  (`ift data check`, which needs no
cache: test_data_check.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from ift.data import DataError
from ift.toydata import make_conversations, write_jsonl
from pipelines.cli import main as ift
from pipelines.config_loading import load_config
from pipelines.data import cache
from pipelines.data.streaming import build_datasets


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def config(tmp_path: Path, train: Path, *overrides: str):
    return load_config(
        None,
        [f"data.train=[{{path: {train}}}]", "data.validation=[]", f"data.cache_dir={tmp_path / 'cache'}",
         "data.max_length=128", *overrides],
    )  # fmt: skip


def rows(ds) -> list[tuple[str, int, list[int]]]:
    return sorted((Path(r["source"]).name, int(r["row"]), [int(t) for t in r["input_ids"]]) for r in ds.take_all())


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    write_jsonl(make_conversations(20, seed=1), path)
    return path


def test_prepare_writes_shards_and_a_manifest_with_the_corpus_figures(tmp_path, corpus):
    (entry,) = cache.prepare(config(tmp_path, corpus), log=lambda m: None)
    m = entry.manifest
    assert entry.tokenized_now and (Path(entry.directory) / "manifest.json").exists()
    assert (m["rows"], m["good_rows"]) == (20, 20) and m["tokens"] > 0
    assert m["lengths"]["p50"] <= m["lengths"]["p90"] <= m["lengths"]["p99"] <= m["lengths"]["max"] <= 128
    assert sum(s["rows"] for s in m["shards"]) == 20


def test_a_second_prepare_with_unchanged_inputs_tokenizes_nothing(tmp_path, corpus):
    cfg = config(tmp_path, corpus)
    (first,) = cache.prepare(cfg, log=lambda m: None)
    said = []
    (again,) = cache.prepare(cfg, log=said.append)
    assert not again.tokenized_now and again.manifest["build_id"] == first.manifest["build_id"]
    assert said and said[0].startswith("cached") and "nothing tokenized" in said[0]


@pytest.mark.parametrize("change", ["file", "data.max_length=64", "data.truncation=drop", "model.tokenizer=tiny-100m"])
def test_a_changed_input_gives_a_new_cache(tmp_path, corpus, change):
    (before,) = cache.entries(config(tmp_path, corpus))
    if change == "file":
        write_jsonl(make_conversations(20, seed=2), corpus)
        (after,) = cache.entries(config(tmp_path, corpus))
    else:
        (after,) = cache.entries(config(tmp_path, corpus, change))
    assert after.key != before.key and after.manifest is None


def test_the_cache_serves_the_same_examples_as_the_stream(tmp_path, corpus):
    over = ("data.train.0.weight=1.5", "data.validation_fraction=0.2")
    streamed = build_datasets(config(tmp_path, corpus, *over), cluster_cpus=2)
    cached = build_datasets(config(tmp_path, corpus, *over, "data.cache=true"), cluster_cpus=2)
    assert cached.from_cache and not streamed.from_cache
    assert rows(cached.train) == rows(streamed.train) and rows(cached.validation) == rows(streamed.validation)
    assert cached.fingerprints == streamed.fingerprints


def test_max_rows_applies_to_cached_rows(tmp_path, corpus):
    data = build_datasets(config(tmp_path, corpus, "data.cache=true", "data.train.0.max_rows=5"), cluster_cpus=2)
    assert [r for _, r, _ in rows(data.train)] == [0, 1, 2, 3, 4]


def bad_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in make_conversations(8, seed=3)]
    lines[2] = "{broken"
    lines[5] = '{"messages": [{"role": "assistant", "content": "I speak first"}]}'
    path.write_text("\n".join(lines) + "\n")
    return path


def test_under_error_a_corpus_with_bad_rows_is_not_cached(tmp_path):
    cfg = config(tmp_path, bad_corpus(tmp_path))
    with pytest.raises(DataError, match=r"bad.jsonl line 3: invalid JSON.*1 more bad rows"):
        cache.prepare(cfg, log=lambda m: None)
    assert cache.entries(cfg)[0].manifest is None


def test_under_skip_bad_rows_are_cached_with_their_errors_and_counted(tmp_path):
    (entry,) = cache.prepare(config(tmp_path, bad_corpus(tmp_path), "data.on_bad_row=skip"), log=lambda m: None)
    assert entry.manifest["good_rows"] == 6 and entry.manifest["bad_rows"]["by_reason"] == {
        "invalid_json": 1, "role_order": 1}  # fmt: skip


def test_ift_data_prepare_prints_rows_tokens_lengths_and_the_path(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    args = ["data", "prepare", f"data.train=[{{path: {corpus}}}]", "data.validation=[]",
            f"data.cache_dir={tmp_path / 'c'}"]  # fmt: skip
    assert ift(args) == 0
    out = capsys.readouterr().out
    assert "rows       20 good of 20" in out and "length p50" in out and str(tmp_path / "c") in out
    assert ift(args) == 0 and "(reused)" in capsys.readouterr().out
