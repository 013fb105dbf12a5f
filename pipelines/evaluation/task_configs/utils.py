"""Dataset loaders for the project's offline lm-eval tasks (``custom_dataset``).

lm-eval imports this file by path (``!function utils.<name>`` in the task
YAMLs), so it must not import the project.  The data are the JSONL files next
to it, written by ``python -m pipelines.evaluation build-tasks``; nothing is
downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

_HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    path = _HERE / f"{name}.jsonl"
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_ift_arith(**_: Any) -> datasets.DatasetDict:
    """Arithmetic word problems: ``question``, ``answer`` (the number, as text), ``solution``."""
    return _load("ift_arith")


def load_ift_capitals_mc(**_: Any) -> datasets.DatasetDict:
    """Capital-city questions: ``question``, ``choices`` (4 sentences), ``label`` (index of the right one)."""
    return _load("ift_capitals_mc")
