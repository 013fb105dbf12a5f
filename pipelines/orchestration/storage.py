"""Checkpoints where Ray Train keeps them: a local directory or any pyarrow filesystem URI
(``s3://``, ``gs://``, ``abfs://``, ``hdfs://``).

Ray hands back a checkpoint as (filesystem, path), the path without its scheme; code that
calls ``os.path.isdir`` on it works on local disks only.  :class:`StoredCheckpoint` keeps the
three together and copies out the one folder the driver needs (``hf_model/`` to register or
evaluate, ``lora_adapter/``), never the DeepSpeed shards.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipelines.training.state import RUN_RECORD, STATE_FILE, LoopState


def resolve_storage_path(storage_path: str) -> str:
    """A URI as it is; a local path made absolute (Ray Train needs one)."""
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


def filesystem(storage_path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a storage path or URI, and the path inside it.  S3 reads its
    credentials and endpoint from the usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``...)."""
    uri = storage_path if "://" in storage_path else Path(storage_path).resolve().as_uri()
    return pafs.FileSystem.from_uri(uri)


@dataclass(frozen=True)
class StoredCheckpoint:
    fs: pafs.FileSystem
    path: str  # inside ``fs``, no scheme
    uri: str  # what a user reads: the local path, or scheme://bucket/...

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @classmethod
    def of(cls, fs: pafs.FileSystem, path: str, storage_path: str) -> StoredCheckpoint:
        if isinstance(fs, pafs.LocalFileSystem):
            return cls(fs, path, path)
        scheme = storage_path.split("://", 1)[0] if "://" in storage_path else fs.type_name
        return cls(fs, path, f"{scheme}://{path}")

    @classmethod
    def from_uri(cls, uri: str) -> StoredCheckpoint:
        """From what a user reads (a local path or ``scheme://bucket/...``)."""
        fs, path = filesystem(uri)
        return cls.of(fs, path, uri)

    @classmethod
    def from_ray(cls, checkpoint: Any, storage_path: str) -> StoredCheckpoint:
        """From a ``ray.train.Checkpoint`` (its ``filesystem`` and scheme-less ``path``)."""
        return cls.of(checkpoint.filesystem, checkpoint.path, storage_path)

    def has(self, name: str) -> bool:
        return self.fs.get_file_info(f"{self.path}/{name}").type == pafs.FileType.Directory

    @contextlib.contextmanager
    def local(self, name: str) -> Iterator[str]:
        """A local directory holding ``name`` of this checkpoint: the folder itself on a local
        filesystem, else a temporary copy of that folder alone, removed afterwards."""
        if self.is_local:
            yield f"{self.path}/{name}"
            return
        with tempfile.TemporaryDirectory(prefix="ift-checkpoint-") as tmp:
            dest = str(Path(tmp) / name)
            pafs.LocalFileSystem().create_dir(dest)  # copy_files makes no local parent folder
            pafs.copy_files(
                f"{self.path}/{name}", dest, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem()
            )
            yield dest


# Ray Train V2's record of a run's committed checkpoints, beside them in the run's folder.  A
# checkpoint is committed once every rank has uploaded its part; Ray resumes from the latest one.
RAY_CHECKPOINT_RECORD = "checkpoint_manager_snapshot.json"


def latest_checkpoint(storage_path: str, run_name: str) -> tuple[StoredCheckpoint, LoopState] | None:
    """The checkpoint a resume of the run starts from, and its loop state: the latest one Ray Train
    committed.  A folder left half-written by a worker killed during the save (rank 0's loop
    state there, another rank's shard missing or cut short) is never committed, so never chosen."""
    fs, root = filesystem(storage_path)
    run_dir = f"{root.rstrip('/')}/{run_name}"
    record = f"{run_dir}/{RAY_CHECKPOINT_RECORD}"
    if fs.get_file_info(record).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(record) as f:
        text = f.read()
    try:
        latest = json.loads(text).get("latest_checkpoint_result")
        name = latest["checkpoint_dir_name"] if latest else None
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise RuntimeError(
            f"cannot read Ray Train's checkpoint record {record} ({exc!r}): was it written by another Ray version? "
            "Resume with the Ray version pinned in pyproject.toml, or use a new run_name"
        ) from exc
    if name is None:
        return None
    checkpoint = StoredCheckpoint.of(fs, f"{run_dir}/{name}", storage_path)
    with fs.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as f:
        return checkpoint, LoopState.from_json(f.read())


def _run_record_path(storage_path: str, run_name: str) -> tuple[pafs.FileSystem, str]:
    fs, root = filesystem(storage_path)
    return fs, f"{root.rstrip('/')}/{run_name}/{RUN_RECORD}"


def read_run_record(storage_path: str, run_name: str) -> dict[str, Any] | None:
    """What run ``run_name`` recorded when it started (its training settings, and the changes it was
    continued under), or None for a run that never started (or started before runs kept a record)."""
    fs, path = _run_record_path(storage_path, run_name)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def write_run_record(storage_path: str, run_name: str, record: dict[str, Any]) -> None:
    """Write the run's record whole: a local file through a rename, an object store in one PUT (both
    atomic, so a reader never sees half of it)."""
    fs, path = _run_record_path(storage_path, run_name)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    body = json.dumps(record, indent=1, sort_keys=True).encode()
    target = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if isinstance(fs, pafs.LocalFileSystem) else path
    with fs.open_output_stream(target) as f:
        f.write(body)
    if target != path:
        fs.move(target, path)
