"""pipelines.data.sources: scanning a corpus once (rows, content hash, shard starts) and which rows each split keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import DataSource
from pipelines.data import sources
from pipelines.data.sources import Shard, expected_rows, keeps, read_shard, scan_file, source_shards


def write_jsonl(path: Path, n: int, *, blank_after: int | None = None) -> Path:
    lines = []
    for i in range(n):
        lines.append(json.dumps({"i": i}))
        if blank_after is not None and i == blank_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def rows_of(shards: list[Shard]) -> list[tuple[str, int]]:
    return [(Path(r["source"]).name, r["row"]) for s in shards for r in read_shard(s.to_item())]


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(sources, "SHARD_ROWS", 4)


def test_a_jsonl_scan_counts_rows_without_blank_lines_and_indexes_shard_starts(tmp_path, small_shards):
    scan = scan_file(str(write_jsonl(tmp_path / "a.jsonl", 10, blank_after=1)))
    assert scan.rows == 10
    # (first row, byte offset, 1-based line): row 4 sits on line 6, after the blank line 3.
    assert [(r, line) for r, _, line in scan.starts] == [(0, 1), (4, 6), (8, 10)]


def test_shards_read_back_every_row_once_with_its_line(tmp_path, small_shards):
    path = write_jsonl(tmp_path / "a.jsonl", 10, blank_after=1)
    shards = sources.file_shards(scan_file(str(path)))
    rows = [r for s in shards for r in read_shard(s.to_item())]
    assert [r["row"] for r in rows] == list(range(10))
    assert [r["line"] for r in rows][:4] == [1, 2, 4, 5]
    assert [json.loads(r["payload"])["i"] for r in rows] == list(range(10))


def test_parquet_shards_start_on_row_groups_and_read_every_row(tmp_path, small_shards):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"i": list(range(10))}), path, row_group_size=3)
    scan = scan_file(str(path))
    assert scan.rows == 10 and [r for r, _, _ in scan.starts] == [0, 6]  # groups of 3 until >= 4 rows
    rows = [r for s in sources.file_shards(scan) for r in read_shard(s.to_item())]
    assert [r["row"] for r in rows] == list(range(10)) and json.loads(rows[7]["payload"]) == {"i": 7}


def test_the_content_hash_changes_with_one_byte(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", 5)
    before = scan_file(str(path), content_hash=True).fingerprint
    path.write_text(path.read_text().replace('"i": 3', '"i": 4'))
    assert scan_file(str(path), content_hash=True).fingerprint != before


def test_a_whole_weight_reads_each_row_that_many_times(tmp_path):
    scans = [scan_file(str(write_jsonl(tmp_path / "a.jsonl", 6)))]
    shards = source_shards(DataSource(path="x", weight=2.0), scans, source_index=0, seed=1)
    assert sorted(rows_of(shards)) == sorted([("a.jsonl", i) for i in range(6)] * 2)
    assert expected_rows(shards) == 12


def test_a_fractional_weight_keeps_a_seeded_share_of_the_rows(tmp_path):
    scans = [scan_file(str(write_jsonl(tmp_path / "a.jsonl", 2000)))]
    shards = source_shards(DataSource(path="x", weight=1.25), scans, source_index=0, seed=1)
    extra = len(rows_of(shards)) - 2000
    assert 400 < extra < 600 and expected_rows(shards) == 2500
    assert rows_of(shards) == rows_of(source_shards(DataSource(path="x", weight=1.25), scans, source_index=0, seed=1))


def test_max_rows_keeps_the_first_rows_of_the_source_in_file_order(tmp_path, small_shards):
    scans = [scan_file(str(write_jsonl(tmp_path / n, 5))) for n in ("a.jsonl", "b.jsonl")]
    shards = source_shards(DataSource(path="x", max_rows=7), scans, source_index=0, seed=1)
    assert rows_of(shards) == [("a.jsonl", i) for i in range(5)] + [("b.jsonl", 0), ("b.jsonl", 1)]


def test_the_holdout_splits_rows_into_disjoint_train_and_validation_sides(tmp_path):
    scans = [scan_file(str(write_jsonl(tmp_path / "a.jsonl", 1000)))]
    src = DataSource(path="x")
    train = set(rows_of(source_shards(src, scans, source_index=0, seed=3, holdout=(0.2, "train"))))
    val = set(rows_of(source_shards(src, scans, source_index=0, seed=3, holdout=(0.2, "validation"))))
    assert not train & val and len(train | val) == 1000 and 150 < len(val) < 250


def test_the_keep_rule_depends_on_the_file_name_not_its_directory():
    a = Shard("/one/a.jsonl", "jsonl", 0, 10, copy_fraction=0.5, seed=7)
    b = Shard("/two/a.jsonl", "jsonl", 0, 10, copy_fraction=0.5, seed=7)
    assert [keeps(a, r) for r in range(50)] == [keeps(b, r) for r in range(50)]


def test_a_cache_shard_applies_the_caps_of_the_rows_own_files():
    shard = Shard("/cache/part-0.parquet", "cache", 0, 10, row_limits=(("a.jsonl", 2), ("b.jsonl", 0)))
    assert [keeps(shard, r, "/data/a.jsonl") for r in range(3)] == [True, True, False]
    assert not keeps(shard, 0, "/data/b.jsonl")


def test_a_shard_survives_the_trip_through_a_ray_item():
    shard = Shard("a.jsonl", "jsonl", 8, 4, holdout=(0.1, "train"), row_limits=(("a.jsonl", 3),))
    assert Shard.from_item(shard.to_item()) == shard


# --------------------------------------------------------------------------- the scan index


def _counting_scanner(index_dir: Path, *, writable: bool = True, content_hash: bool = False):
    scanned: list[str] = []

    def scan_many(files, content_hash):
        scanned.extend(Path(f.path).name for f in files)
        return sources.scan_files(files, content_hash)

    index = sources.ScanIndex(str(index_dir), writable=writable)
    return sources.SourceScanner(index, content_hash, scan_many), scanned


def test_a_second_scanner_on_unchanged_files_scans_nothing_and_gets_the_same_scans(tmp_path, small_shards):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "a.jsonl", 10)
    write_jsonl(tmp_path / "data" / "b.jsonl", 3)
    src = DataSource(path=str(tmp_path / "data" / "*.jsonl"))
    first, scanned_first = _counting_scanner(tmp_path / "index")
    second, scanned_second = _counting_scanner(tmp_path / "index")
    assert first.scans(src) == second.scans(src)
    assert scanned_first == ["a.jsonl", "b.jsonl"] and scanned_second == []
    corpus_bytes = sum(p.stat().st_size for p in (tmp_path / "data").iterdir())
    assert (first.scanned_files, first.scanned_bytes) == (2, corpus_bytes)
    assert second.scanned_files == 0


def test_a_rewritten_file_is_scanned_again_and_its_neighbours_are_not(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", 10)
    write_jsonl(tmp_path / "b.jsonl", 3)
    src = DataSource(path=str(tmp_path / "*.jsonl"))
    _counting_scanner(tmp_path / "index")[0].scans(src)
    write_jsonl(tmp_path / "b.jsonl", 4)
    scanner, scanned = _counting_scanner(tmp_path / "index")
    assert [s.rows for s in scanner.scans(src)] == [10, 4] and scanned == ["b.jsonl"]


def test_a_file_is_fingerprinted_by_its_identity_unless_content_hash_is_asked(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", 5)
    st = path.stat()
    assert scan_file(str(path)).fingerprint == f"id:{st.st_size}:{st.st_mtime_ns}"
    assert scan_file(str(path), content_hash=True).fingerprint.startswith("sha256:")


def test_a_read_only_index_adds_nothing(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", 5)
    scanner, scanned = _counting_scanner(tmp_path / "index", writable=False)
    scanner.scans(DataSource(path=str(tmp_path / "a.jsonl")))
    assert scanned == ["a.jsonl"] and not (tmp_path / "index").exists()


def test_an_unreadable_index_entry_is_scanned_again(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", 5)
    src = DataSource(path=str(tmp_path / "a.jsonl"))
    _counting_scanner(tmp_path / "index")[0].scans(src)
    (entry,) = (tmp_path / "index").iterdir()
    entry.write_text("{not json")
    scanner, scanned = _counting_scanner(tmp_path / "index")
    assert scanner.scans(src)[0].rows == 5 and scanned == ["a.jsonl"]


# --------------------------------------------------------------------------- any fsspec filesystem


@pytest.fixture
def memory_fs():
    import fsspec  # a dependency: memory:// stands for any protocol pyarrow has no filesystem for

    fs = fsspec.filesystem("memory")
    yield fs
    fs.rm("/corpus", recursive=True)


def test_a_source_on_an_fsspec_filesystem_is_listed_by_glob_read_by_shard_and_named_by_uri(memory_fs, small_shards):
    for name, n in (("a.jsonl", 6), ("b.jsonl", 2)):
        memory_fs.pipe(f"/corpus/{name}", "".join(json.dumps({"i": i}) + "\n" for i in range(n)).encode())
    memory_fs.pipe("/corpus/notes.txt", b"not a source")
    scanner = sources.SourceScanner()
    scans = scanner.scans(DataSource(path="memory://corpus/*.jsonl"))
    assert [(s.path, s.rows) for s in scans] == [("memory:///corpus/a.jsonl", 6), ("memory:///corpus/b.jsonl", 2)]
    rows = [r for scan in scans for shard in sources.file_shards(scan) for r in read_shard(shard.to_item())]
    assert [(r["source"], r["row"], r["line"]) for r in rows][4:7] == [
        ("memory:///corpus/a.jsonl", 4, 5), ("memory:///corpus/a.jsonl", 5, 6), ("memory:///corpus/b.jsonl", 0, 1),
    ]  # fmt: skip
    assert [json.loads(r["payload"])["i"] for r in rows] == [0, 1, 2, 3, 4, 5, 0, 1]


def test_a_uri_that_matches_nothing_is_an_error_naming_it(memory_fs):
    from ift.data import DataError

    memory_fs.pipe("/corpus/a.jsonl", b"{}\n")
    with pytest.raises(DataError, match="memory://corpus/none-\\*.jsonl: no such file"):
        sources.scan_source(DataSource(path="memory://corpus/none-*.jsonl"))
