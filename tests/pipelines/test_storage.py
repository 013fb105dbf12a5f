"""Which checkpoint a resume starts from: the latest one Ray Train committed, never a folder a
killed worker left half-written (the Ray runs that produce such folders are in test_remote_storage.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.orchestration.storage import RAY_CHECKPOINT_RECORD, StoredCheckpoint, latest_checkpoint
from pipelines.training.state import LoopState


def checkpoint_folder(run_dir: Path, name: str, step: int) -> Path:
    folder = run_dir / name
    (folder / "deepspeed").mkdir(parents=True)
    LoopState(step=step, world_size=2, data_fingerprint="abc").save(folder)
    return folder


def ray_record(run_dir: Path, committed: list[str]) -> None:
    """Ray Train 2.60's record, as it writes it after every commit (trimmed to what is read)."""
    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": {}} for n in committed]
    record = {
        "ray_version": "2.60.0",
        "checkpoint_results": results,
        "latest_checkpoint_result": results[-1] if results else None,
    }
    (run_dir / RAY_CHECKPOINT_RECORD).write_text(json.dumps(record))


def test_a_resume_starts_from_the_latest_committed_checkpoint_not_a_newer_half_written_folder(tmp_path):
    run_dir = tmp_path / "run"
    checkpoint_folder(run_dir, "checkpoint_a", step=4)
    checkpoint_folder(run_dir, "checkpoint_b", step=8)  # rank 0's part uploaded, then a rank died
    ray_record(run_dir, ["checkpoint_a"])
    checkpoint, state = latest_checkpoint(str(tmp_path), "run")
    assert checkpoint.path == str(run_dir / "checkpoint_a") and state.step == 4


def test_a_run_without_a_committed_checkpoint_starts_afresh(tmp_path):
    assert latest_checkpoint(str(tmp_path), "never-ran") is None
    run_dir = tmp_path / "run"
    checkpoint_folder(run_dir, "checkpoint_a", step=4)  # killed before Ray wrote any record
    assert latest_checkpoint(str(tmp_path), "run") is None


def test_an_unreadable_ray_record_is_an_error_naming_it_and_what_to_do(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RAY_CHECKPOINT_RECORD).write_text('{"latest_checkpoint_result": {"dir": "x"}}')
    with pytest.raises(RuntimeError, match=rf"{RAY_CHECKPOINT_RECORD}.*Ray version pinned"):
        latest_checkpoint(str(tmp_path), "run")


def test_a_stored_checkpoint_reads_back_from_the_uri_a_user_sees(tmp_path):
    folder = checkpoint_folder(tmp_path, "checkpoint_a", step=4)
    (folder / "hf_model").mkdir()
    checkpoint = StoredCheckpoint.from_uri(str(folder))
    assert checkpoint.is_local and checkpoint.uri == str(folder)
    assert checkpoint.has("hf_model") and not checkpoint.has("lora_adapter")
    with checkpoint.local("hf_model") as local:
        assert Path(local) == folder / "hf_model"  # a local checkpoint is read in place, never copied
