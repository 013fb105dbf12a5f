"""pipelines.data.streaming: the streamed splits of a config: JSONL/Parquet
sources, mixture weights, max_rows, validation
splits, fingerprints, and bad rows flowing with their error to the worker that owns them.

Small files are written under tmp_path and go through ``build_datasets`` (fingerprints through ``plan_data``, which
needs no Ray), on one in-process Ray session for the module; ``take_all`` executes a stream in the test.  How a worker
stops or skips a bad row is tested in tests/pipelines/test_batching.py and, end to end, in test_train.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from ift.data import DataError, tokenize_example
from ift.tokenization import load_tokenizer
from ift.toydata import make_conversations, make_preference_pairs, write_jsonl
from pipelines.config_loading import load_config
from pipelines.data.streaming import build_datasets, plan_data

MAX_LENGTH = 128


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def config(train: list[dict], validation: list[dict] = (), *overrides: str):
    return load_config(
        None,
        [
            f"data.train={json.dumps(list(train))}",
            f"data.validation={json.dumps(list(validation))}",
            f"data.max_length={MAX_LENGTH}",
            *overrides,
        ],
    )


def write_parquet(rows: list[dict], path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def prepare_datasets(cfg):
    return build_datasets(cfg, cluster_cpus=2)


def fingerprint(cfg, split: str = "train") -> str:
    return getattr(plan_data(cfg), split).fingerprint


def examples(ds: ray.data.Dataset) -> list[dict]:
    """The dataset's rows in order, token columns as lists of ints."""
    return [
        {k: [int(t) for t in v] if k.endswith(("input_ids", "labels")) else v for k, v in row.items()}
        for row in ds.take_all()
    ]


def errors(ds: ray.data.Dataset) -> list[tuple[str, int, int, str]]:
    """(file name, row, line, error kind) of every bad row in the stream."""
    return sorted(
        (Path(r["source"]).name, int(r["row"]), int(r["line"]), str(r["error_kind"]))
        for r in ds.take_all()
        if r["error"]
    )


def origins(ds: ray.data.Dataset) -> Counter:
    """How often each (file name, row) occurs."""
    return Counter((Path(r["source"]).name, int(r["row"])) for r in ds.take_all())


# --------------------------------------------------------------------------- one mixture, read once

CHAT = make_conversations(8, seed=1)
CAPPED = make_conversations(10, seed=2)
VAL = make_conversations(4, seed=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixture")
    write_jsonl(CHAT, root / "chat.jsonl")
    write_parquet(CHAT, root / "chat.parquet")
    write_jsonl(CAPPED, root / "capped.jsonl")
    write_jsonl(VAL, root / "val.jsonl")
    return root


@pytest.fixture(scope="module")
def mixture_config(files: Path):
    train = [
        {"path": str(files / "chat.jsonl")},
        {"path": str(files / "chat.parquet"), "weight": 2},
        {"path": str(files / "capped.jsonl"), "max_rows": 3},
    ]
    return config(train, [{"path": str(files / "val.jsonl")}])


@pytest.fixture(scope="module")
def mixture(mixture_config):
    return prepare_datasets(mixture_config)


def test_each_example_is_its_source_row_tokenized_with_the_chat_template(mixture, tok) -> None:
    source_rows = {"chat.jsonl": CHAT, "chat.parquet": CHAT, "capped.jsonl": CAPPED}
    for ex in examples(mixture.train):
        expected = tokenize_example(tok, source_rows[Path(ex["source"]).name][ex["row"]], max_length=MAX_LENGTH)
        assert (ex["input_ids"], ex["labels"]) == (expected["input_ids"], expected["labels"])
        assert ex["num_tokens"] == len(expected["input_ids"])


def test_parquet_rows_give_the_same_examples_as_the_same_rows_in_jsonl(mixture) -> None:
    by_origin = {(Path(ex["source"]).name, ex["row"]): ex["input_ids"] for ex in examples(mixture.train)}
    for row in range(len(CHAT)):
        assert by_origin[("chat.parquet", row)] == by_origin[("chat.jsonl", row)]


def test_a_weight_of_two_uses_every_row_of_its_source_twice(mixture) -> None:
    counts = origins(mixture.train)
    assert {row: n for (name, row), n in counts.items() if name == "chat.parquet"} == dict.fromkeys(range(8), 2)
    assert {row: n for (name, row), n in counts.items() if name == "chat.jsonl"} == dict.fromkeys(range(8), 1)


def test_max_rows_caps_the_rows_taken_from_a_source(mixture) -> None:
    capped = [row for name, row in origins(mixture.train).elements() if name == "capped.jsonl"]
    assert len(capped) == 3 and len(set(capped)) == 3 and set(capped) <= set(range(len(CAPPED)))


def test_validation_sources_feed_only_the_validation_split(mixture) -> None:
    assert origins(mixture.validation) == Counter({("val.jsonl", row): 1 for row in range(4)})
    assert not any(name == "val.jsonl" for name, _ in origins(mixture.train))


def test_row_counts_are_known_before_any_row_is_read(mixture) -> None:
    train = examples(mixture.train)
    assert mixture.train_rows == len(train) == 8 + 2 * 8 + 3
    assert mixture.validation_rows == mixture.validation.count() == 4


def test_the_stream_order_is_the_same_for_the_same_seed(mixture, mixture_config) -> None:
    order = [(ex["source"], ex["row"]) for ex in examples(mixture.train)]
    again = prepare_datasets(mixture_config)
    assert [(ex["source"], ex["row"]) for ex in examples(again.train)] == order


def test_shards_are_read_in_a_seeded_order(tmp_path: Path) -> None:
    for i in range(6):
        write_jsonl(make_conversations(1, seed=i), tmp_path / f"part{i}.jsonl")
    orders = {
        seed: [
            Path(r["source"]).name
            for r in prepare_datasets(
                config([{"path": str(tmp_path)}], (), f"optimization.seed={seed}")
            ).train.take_all()
        ]
        for seed in (1, 2)
    }
    assert sorted(orders[1]) == sorted(orders[2]) and orders[1] != orders[2]


def test_each_split_carries_its_fingerprint(mixture, mixture_config) -> None:
    assert mixture.fingerprints == {
        "train": fingerprint(mixture_config),
        "validation": fingerprint(mixture_config, "validation"),
    }
    assert mixture.fingerprints["train"] != mixture.fingerprints["validation"]


# --------------------------------------------------------------------------- more sources


def test_fractional_weights_add_a_random_part_of_the_rows(tmp_path: Path) -> None:
    # 0.5: a random part of the rows, each at most once; 1.5: every row once, plus a random part again.
    write_jsonl(make_conversations(20, seed=4), tmp_path / "half.jsonl")
    write_jsonl(make_conversations(20, seed=5), tmp_path / "one_and_a_half.jsonl")
    cfg = config(
        [
            {"path": str(tmp_path / "half.jsonl"), "weight": 0.5},
            {"path": str(tmp_path / "one_and_a_half.jsonl"), "weight": 1.5},
        ]
    )
    counts = origins(prepare_datasets(cfg).train)
    half = [n for (name, _), n in counts.items() if name == "half.jsonl"]
    assert 0 < len(half) < 20 and set(half) == {1}
    more = {row: n for (name, row), n in counts.items() if name == "one_and_a_half.jsonl"}
    assert set(more) == set(range(20)) and set(more.values()) == {1, 2}


def test_directory_and_glob_sources_read_every_jsonl_and_parquet_file_they_match(tmp_path: Path) -> None:
    folder, other = tmp_path / "folder", tmp_path / "other"
    (folder / "sub").mkdir(parents=True)
    other.mkdir()
    write_jsonl(make_conversations(2, seed=6), folder / "a.jsonl")
    write_parquet(make_conversations(3, seed=7), folder / "sub" / "b.parquet")
    (folder / "notes.txt").write_text("not data\n")
    write_jsonl(make_conversations(1, seed=8), other / "x.jsonl")
    write_jsonl(make_conversations(2, seed=9), other / "y.jsonl")
    write_parquet(make_conversations(4, seed=10), other / "z.parquet")  # not matched by *.jsonl
    cfg = config([{"path": str(folder)}, {"path": str(other / "*.jsonl")}])
    per_file = Counter(name for name, _ in origins(prepare_datasets(cfg).train).elements())
    assert per_file == {"a.jsonl": 2, "b.parquet": 3, "x.jsonl": 1, "y.jsonl": 2}


def test_missing_source_is_a_data_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError, match="no such file") as err:
        prepare_datasets(config([{"path": str(missing)}]))
    assert err.value.source == str(missing) and err.value.kind == "missing"


def test_glob_matching_an_unsupported_file_type_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    write_jsonl(make_conversations(2, seed=1), tmp_path / "ok.jsonl")
    (tmp_path / "table.csv").write_text("prompt,completion\nq,a\n")
    with pytest.raises(DataError, match="unsupported file type") as err:
        prepare_datasets(config([{"path": str(tmp_path / "*")}]))
    assert err.value.source == str(tmp_path / "table.csv") and err.value.kind == "format"


def test_preference_methods_get_chosen_and_rejected_token_columns(tmp_path: Path, tok) -> None:
    pairs = make_preference_pairs(4, seed=11)
    write_jsonl(pairs, tmp_path / "pref.jsonl")
    data = prepare_datasets(config([{"path": str(tmp_path / "pref.jsonl")}], (), "method.name=dpo"))
    for ex in examples(data.train):
        expected = tokenize_example(tok, pairs[ex["row"]], mode="preference", max_length=MAX_LENGTH)
        assert {k: ex[k] for k in expected} == expected


# --------------------------------------------------------------------------- validation fraction


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("held_out")
    write_jsonl(make_conversations(20, seed=12), root / "all.jsonl")
    return prepare_datasets(config([{"path": str(root / "all.jsonl")}], (), "data.validation_fraction=0.25"))


def test_validation_fraction_holds_out_that_share_of_train_rows(held_out) -> None:
    train, validation = origins(held_out.train), origins(held_out.validation)
    assert (held_out.train_rows, held_out.validation_rows) == (15, 5)  # the expected share, before reading
    assert abs(sum(train.values()) - 15) <= 4 and not set(train) & set(validation)
    assert set(train) | set(validation) == {("all.jsonl", row) for row in range(20)}


# --------------------------------------------------------------------------- bad rows


def test_malformed_rows_flow_with_their_file_line_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    rows = [json.dumps(r) for r in make_conversations(6, seed=1)]
    rows[3] = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}'
    rows[4] = "{not json"
    bad.write_text("\n".join(rows[:2] + [""] + rows[2:]) + "\n")  # a blank line 3
    assert errors(prepare_datasets(config([{"path": str(bad)}])).train) == [
        ("bad.jsonl", 3, 5, "empty_assistant"),
        ("bad.jsonl", 4, 6, "invalid_json"),
    ]


def test_a_bad_parquet_row_is_named_by_its_row(tmp_path: Path) -> None:
    rows = make_conversations(5, seed=13)
    rows[2] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}
    write_parquet(rows, tmp_path / "bad.parquet")
    assert errors(prepare_datasets(config([{"path": str(tmp_path / "bad.parquet")}])).train) == [
        ("bad.parquet", 2, 0, "empty_assistant")
    ]


def test_bad_rows_of_every_split_reach_the_workers(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in make_conversations(5, seed=14)]
    lines[3] = '{"messages": [oops'
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    val = make_conversations(3, seed=15)
    val[1] = {"messages": [{"role": "assistant", "content": "I speak first"}]}
    write_jsonl(val, tmp_path / "val.jsonl")
    data = prepare_datasets(config([{"path": str(tmp_path / "train.jsonl")}], [{"path": str(tmp_path / "val.jsonl")}]))
    assert errors(data.train) == [("train.jsonl", 3, 4, "invalid_json")]
    assert errors(data.validation) == [("val.jsonl", 1, 2, "role_order")]


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_is_16_hex_digits_and_stable_for_unchanged_files(files: Path, mixture_config) -> None:
    fp = fingerprint(mixture_config)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(mixture_config) == fp


def test_fingerprint_changes_when_a_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    write_jsonl(make_conversations(3, seed=1), path)
    cfg = config([{"path": str(path)}])
    before = fingerprint(cfg)
    write_jsonl(make_conversations(3, seed=2), path)  # same name, other rows
    assert fingerprint(cfg) != before


@pytest.mark.parametrize(
    "override",
    [
        "data.max_length=64",
        "data.truncation=drop",
        "model.tokenizer=tiny-100m",
        "data.train.0.weight=2",
        "data.train.0.max_rows=2",
        "optimization.seed=7",
    ],
)
def test_fingerprint_changes_with_what_shapes_the_examples(tmp_path: Path, override: str) -> None:
    path = tmp_path / "data.jsonl"
    write_jsonl(make_conversations(3, seed=1), path)
    base = config([{"path": str(path)}])
    changed = config([{"path": str(path)}], (), override)
    assert fingerprint(changed) != fingerprint(base)
