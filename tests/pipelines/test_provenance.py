"""pipelines.tracking.provenance: the commit recorded on runs, models and benchmark results."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.tracking.provenance import COMMIT_ENV, git_commit


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / ".git").exists(), reason="not a git checkout")
def test_the_commit_of_this_checkout_is_12_hex_digits(monkeypatch):
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    assert re.fullmatch(r"[0-9a-f]{12}", git_commit())


def test_the_environment_wins_for_uploaded_working_dirs_without_git(monkeypatch):
    monkeypatch.setenv(COMMIT_ENV, "abc123")
    assert git_commit() == "abc123"
