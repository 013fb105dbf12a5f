"""`ift data check`: every row of a config's sources tokenized in this process, without Ray; bad rows listed
by file and line (the first N), truncation counted, a report for scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ift.data import tokenize_rows
from ift.tokenization import load_tokenizer
from ift.toydata import make_conversations, write_jsonl
from pipelines.cli import main as ift
from pipelines.config_loading import load_config, packaged_config_path
from pipelines.data.check import check


def bad_corpus(tmp_path: Path, bad_rows: int = 2, rows: int = 8) -> Path:
    """``rows`` lines, then a blank one; invalid JSON on line 3, a wrong role order on line 6, and more
    invalid lines after the blank one when ``bad_rows`` > 2."""
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in make_conversations(rows, seed=3)]
    lines[2] = "{broken"
    lines[5] = '{"messages": [{"role": "assistant", "content": "I speak first"}]}'
    lines += [""] + ["[1, 2]"] * (bad_rows - 2)
    path.write_text("\n".join(lines) + "\n")
    return path


def only(path: Path, *more: str) -> list[str]:
    return [f"data.train=[{{path: {path}}}]", "data.validation=[]", *more]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """The check writes its bad-rows file in the working directory by default."""
    monkeypatch.chdir(tmp_path)


def test_the_bundled_corpus_is_checked_in_this_process_without_ray(capsys):
    ray = sys.modules.get("ray")
    was_running = ray is not None and ray.is_initialized()
    assert ift(["data", "check"]) == 0
    out = capsys.readouterr().out.strip()
    demo = packaged_config_path("tiny").parent.parent / "demo_data"
    rows = sum(1 for f in ("demo_chat.jsonl", "demo_chat_val.jsonl") for line in open(demo / f) if line.strip())
    assert out == f"checked {rows:,} rows in 2 files: 0 bad, none truncated to max_length=256"
    ray = sys.modules.get("ray")
    assert was_running or ray is None or not ray.is_initialized(), "ift data check started Ray"


def test_the_check_module_does_not_import_ray():
    import subprocess

    code = "import sys, pipelines.data.check, pipelines.cli; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_bad_rows_are_listed_by_file_and_line_and_the_exit_code_is_1(tmp_path, capsys):
    bad = bad_corpus(tmp_path)
    assert ift(["data", "check", *only(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "checked 8 rows in 1 file: 2 bad (1 invalid_json, 1 role_order), none truncated to max_length=256"
    assert out[1].startswith(f"{bad} line 3: invalid JSON") and out[2].startswith(f"{bad} line 6: ")
    assert out[3:] == ["every bad row, one JSON object per line: bad_rows.jsonl"]


def test_a_parquet_row_is_named_by_its_1_based_row(tmp_path, capsys):
    rows = make_conversations(4, seed=5)
    rows[1] = {"messages": [{"role": "assistant", "content": "first"}]}
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert ift(["data", "check", *only(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("checked 4 rows in 1 file: 1 bad (1 role_order)")
    assert out[1].startswith(f"{path} row 2: ")


def test_the_list_of_bad_rows_is_capped_and_the_rest_counted(tmp_path, capsys):
    bad = bad_corpus(tmp_path, bad_rows=30)
    assert ift(["data", "check", *only(bad), "--max-errors", "5"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("checked 36 rows in 1 file: 30 bad (29 invalid_json, 1 role_order)")
    assert len(out) == 1 + 5 + 2 and out[-2].startswith("... and 25 more bad rows")
    assert out[3].startswith(f"{bad} line 10: expected a JSON object")  # the blank line 9 is no row
    assert ift(["data", "check", *only(bad)]) == 1  # the default: 20
    assert capsys.readouterr().out.splitlines()[-2].startswith("... and 10 more bad rows")


def test_thousands_of_bad_rows_print_a_bounded_summary_and_all_go_to_the_file_it_names(tmp_path, capsys):
    bad = bad_corpus(tmp_path, bad_rows=3000)
    listed = tmp_path / "all-bad.jsonl"
    assert ift(["data", "check", *only(bad), "--bad-rows", str(listed)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 20 + 2  # the counts, the first 20, how many more, the file
    assert out[0].startswith("checked 3,006 rows in 1 file: 3,000 bad (2,999 invalid_json, 1 role_order)")
    assert out[-1] == f"every bad row, one JSON object per line: {listed}"
    written = [json.loads(line) for line in listed.read_text().splitlines()]
    assert len(written) == 3000 and written[0]["line"] == 3 and written[-1]["line"] == 3007
    assert {w["kind"] for w in written} == {"invalid_json", "role_order"}


def test_a_corpus_without_bad_rows_writes_no_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_jsonl(make_conversations(5, seed=1), path)
    assert ift(["data", "check", *only(path)]) == 0
    assert not (tmp_path / "bad_rows.jsonl").exists()


def test_truncated_rows_are_counted_as_training_counts_them(tmp_path, capsys):
    long_answer = {"messages": [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": "word " * 40}]}
    rows = make_conversations(40, seed=7) + [long_answer] * 3  # an answer longer than max_length: no prompt left
    path = tmp_path / "chat.jsonl"
    write_jsonl(rows, path)
    cfg = load_config(None, only(path, "data.max_length=24"))
    report = check(cfg)
    _, expected = tokenize_rows(load_tokenizer("tiny"), rows, source=str(path), on_bad_row="skip", max_length=24)
    assert report.rows == 43 and report.counts.counts == expected.counts
    assert report.counts.truncated == expected.truncated > report.counts.prompt_cut == expected.prompt_cut >= 3
    assert ift(["data", "check", *only(path, "data.max_length=24")]) == (1 if expected.skipped else 0)
    summary = capsys.readouterr().out.splitlines()[0]
    assert summary.endswith(
        f"{expected.truncated} truncated to max_length=24 ({expected.prompt_cut} with the whole prompt cut; "
        "see data.truncation)"
    )


def test_under_drop_long_rows_are_bad_rows(tmp_path, capsys):
    path = tmp_path / "chat.jsonl"
    write_jsonl(make_conversations(10, seed=7), path)
    assert ift(["data", "check", *only(path, "data.max_length=24", "data.truncation=drop")]) == 1
    summary = capsys.readouterr().out.splitlines()[0]
    assert "too_long" in summary and "none truncated (data.truncation=drop" in summary


def test_json_report_parses(tmp_path, capsys):
    bad = bad_corpus(tmp_path, bad_rows=4)
    assert ift(["data", "check", *only(bad), "--json", "--max-errors", "3"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 10 and report["files"] == 1 and report["bad_rows"] == 4
    assert report["by_reason"] == {"invalid_json": 3, "role_order": 1} and report["more_bad_rows"] == 1
    assert [(b["line"], b["row"], b["kind"]) for b in report["bad"]] == [
        (3, 2, "invalid_json"), (6, 5, "role_order"), (10, 8, "invalid_json")]  # fmt: skip
    assert {"truncated", "prompt_cut", "max_length", "truncation"} <= set(report)


def test_a_missing_source_is_an_error_naming_it(tmp_path, capsys):
    assert ift(["data", "check", *only(tmp_path / "nope.jsonl")]) == 1
    assert "error: bad data:" in capsys.readouterr().err


def test_a_file_named_by_train_and_validation_is_checked_once(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_jsonl(make_conversations(5, seed=1), path)
    report = check(load_config(None, [f"data.train=[{{path: {path}}}]", f"data.validation=[{{path: {path}}}]"]))
    assert (report.rows, report.files) == (5, 1)
