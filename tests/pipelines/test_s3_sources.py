"""A corpus in S3: listed by glob, scanned once, read by shard, its bad rows named by URI and line; a second
plan on unchanged files reads no source byte.  Against a real S3-compatible server (moto_server) on
127.0.0.1, reached through the usual AWS environment variables (the ``s3`` fixture)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ift.toydata import make_conversations
from pipelines.config_loading import load_config
from pipelines.data import files, sources
from pipelines.data.check import check
from pipelines.data.plan import local_scanner
from pipelines.data.sources import read_shard
from pipelines.data.streaming import plan_data
from tests.pipelines.conftest import BUCKET


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def bucket(s3):
    """chat-0.jsonl (24 rows), chat-1.jsonl (16 rows) and chat-2.parquet (8 rows) under s3://ift-test/corpus/."""
    rows = make_conversations(48, seed=11)
    s3.put_object(Bucket=BUCKET, Key="corpus/chat-0.jsonl", Body=_jsonl(rows[:24]))
    s3.put_object(Bucket=BUCKET, Key="corpus/chat-1.jsonl", Body=_jsonl(rows[24:40]))
    table = pa.table({"messages": [r["messages"] for r in rows[40:]]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    s3.put_object(Bucket=BUCKET, Key="corpus/chat-2.parquet", Body=buffer.getvalue())
    s3.put_object(Bucket=BUCKET, Key="corpus/README.md", Body=b"not a source")
    return f"s3://{BUCKET}/corpus"


def _cfg(tmp_path, train: str, *more: str):
    return load_config(
        None, [f"data.train={train}", "data.validation=[]", f"data.cache_dir={tmp_path / 'cache'}", *more]
    )


def test_a_glob_in_a_bucket_lists_its_files_with_their_identity_and_reads_none(bucket):
    listed = files.list_files(f"{bucket}/chat-*")
    assert [(f.path, f.format) for f in listed] == [
        (f"{bucket}/chat-0.jsonl", "jsonl"),
        (f"{bucket}/chat-1.jsonl", "jsonl"),
        (f"{bucket}/chat-2.parquet", "parquet"),
    ]
    assert all(f.size > 0 and f.version for f in listed)


def test_an_s3_corpus_plans_every_row_and_its_shards_read_them_back(tmp_path, bucket):
    plan = plan_data(_cfg(tmp_path, f"{bucket}/chat-*"))
    assert plan.train.rows == 48
    rows = [r for shard in plan.train.shards for r in read_shard(shard.to_item())]
    assert sorted((r["source"].rsplit("/", 1)[1], r["row"]) for r in rows) == sorted(
        [("chat-0.jsonl", i) for i in range(24)] + [("chat-1.jsonl", i) for i in range(16)]
        + [("chat-2.parquet", i) for i in range(8)]
    )  # fmt: skip
    assert all(json.loads(r["payload"])["messages"] for r in rows)


def test_a_second_plan_on_unchanged_s3_files_reads_no_source_byte(tmp_path, bucket, monkeypatch):
    opened: list[str] = []
    real = files.open_input

    def counting(path):
        opened.append(path)
        return real(path)

    monkeypatch.setattr(sources, "open_input", counting)
    cfg = _cfg(tmp_path, f"{bucket}/chat-*")
    first_scanner, second_scanner = local_scanner(cfg), local_scanner(cfg)
    first = plan_data(cfg, first_scanner)
    assert first_scanner.scanned_files == 3 and len(opened) == 3
    opened.clear()
    second = plan_data(cfg, second_scanner)
    assert second_scanner.scanned_files == 0 and opened == []  # the index in data.cache_dir answered
    assert second.train.rows == first.train.rows and second.train.fingerprint == first.train.fingerprint


def test_a_bad_row_in_the_bucket_is_named_by_its_uri_and_line(tmp_path, s3):
    lines = _jsonl(make_conversations(3, seed=2)).decode().splitlines()
    lines.insert(2, "{broken")
    s3.put_object(Bucket=BUCKET, Key="bad/chat.jsonl", Body=("\n".join(lines) + "\n").encode())
    report = check(_cfg(tmp_path, f"s3://{BUCKET}/bad/chat.jsonl"))
    (bad,) = report.bad
    assert (bad.source, bad.line) == (f"s3://{BUCKET}/bad/chat.jsonl", 3)
