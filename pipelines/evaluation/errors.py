"""The one exception of ``ift eval`` / ``ift compare``: a problem the user can fix, printed as one line."""

from __future__ import annotations


class EvalError(RuntimeError):
    """A problem the user can fix (unknown model, unreachable hub, bad task name)."""
