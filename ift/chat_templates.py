"""Chat templates shipped with ift, for base models whose tokenizer has none.

A template is named by a shipped name (a file ``ift/assets/chat_templates/<name>.jinja``:
``chatml``, ``zephyr``), by a path to a Jinja file, or given inline (text holding ``{{`` or
``{%``).  :func:`resolve_chat_template` turns any of these into the template text that
``tokenizer.chat_template`` takes (:func:`ift.tokenization.load_tokenizer` does it for its
``chat_template`` argument).

Both shipped templates render the ``tool`` role and assistant ``tool_calls`` and are
prefix-stable (a prefix of a conversation renders to a prefix of the whole), which
:mod:`ift.data` needs to find the assistant tokens.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHAT_TEMPLATES_DIR = Path(__file__).resolve().parent / "assets" / "chat_templates"


def shipped_chat_templates() -> list[str]:
    """Names of the templates shipped with ift, sorted."""
    return sorted(p.stem for p in CHAT_TEMPLATES_DIR.glob("*.jinja"))


def is_inline_template(value: str) -> bool:
    """Whether ``value`` is template text rather than a name or a path."""
    return "{{" in value or "{%" in value


def resolve_chat_template(name_or_path: str) -> str:
    """A shipped name, a path to a Jinja file or inline template text -> the template text.

    Raises ``ValueError`` listing the shipped names when ``name_or_path`` is none of them.
    """
    if is_inline_template(name_or_path):
        return name_or_path
    shipped = CHAT_TEMPLATES_DIR / f"{name_or_path}.jinja"
    if "/" not in name_or_path and os.sep not in name_or_path and shipped.is_file():
        return shipped.read_text(encoding="utf-8")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(
        f"unknown chat template {name_or_path!r}: neither a template shipped with ift "
        f"({', '.join(shipped_chat_templates())}) nor an existing Jinja file"
    )


def chat_template_hash(name_or_path: str) -> str:
    """12 hex characters of the resolved template's SHA-256 (a cache key changes with the text)."""
    return hashlib.sha256(resolve_chat_template(name_or_path).encode("utf-8")).hexdigest()[:12]
