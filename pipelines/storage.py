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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipelines.loop import STATE_FILE, LoopState


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


def latest_checkpoint(storage_path: str, run_name: str) -> tuple[StoredCheckpoint, LoopState] | None:
    """The run's newest checkpoint in storage and its loop state, if it has one."""
    fs, root = filesystem(storage_path)
    run_dir = f"{root.rstrip('/')}/{run_name}"
    if fs.get_file_info(run_dir).type != pafs.FileType.Directory:
        return None
    newest: tuple[StoredCheckpoint, LoopState] | None = None
    for info in fs.get_file_info(pafs.FileSelector(run_dir)):
        state_file = f"{info.path}/{STATE_FILE}"
        if info.type != pafs.FileType.Directory or fs.get_file_info(state_file).type != pafs.FileType.File:
            continue
        with fs.open_input_stream(state_file) as f:
            state = LoopState(**json.loads(f.read()))
        if newest is None or state.step > newest[1].step:
            newest = (StoredCheckpoint.of(fs, info.path, storage_path), state)
    return newest
