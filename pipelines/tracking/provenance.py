"""Which code produced a run: the git commit, for MLflow tags and benchmark results.

No heavy imports here: the benchmarks' GPU path (no Ray, no MLflow) uses it too.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

COMMIT_ENV = "IFT_GIT_COMMIT"


def git_commit() -> str:
    """The project's commit (12 hex digits), or ``"unknown"`` outside a checkout.

    ``IFT_GIT_COMMIT`` wins: a Ray job's uploaded working directory has no ``.git``,
    so the submitter passes the commit through the runtime env.
    """
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):  # no git binary
        return "unknown"
    return out.stdout.strip() or "unknown"
