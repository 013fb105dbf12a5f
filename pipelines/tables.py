"""The tables the commands print (`ift configs`, `ift train --help-config`, `ift compare`, the sweep summary),
rendered by rich to plain text.

:func:`render_table` returns a string, so a caller prints it and a test compares it.  The text has
no colour codes (it reads the same in a terminal, a pipe or a log file), and the header rule is
ASCII when stdout cannot encode rich's line characters.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Column, Table

# The width when stdout is not a terminal and COLUMNS is unset: wide enough for a help column.
PIPE_WIDTH = 120


# rich's SIMPLE_HEAD (no borders, a rule under the header) drawn with "-", for a stdout that is not UTF-8.
ASCII_SIMPLE_HEAD = box.Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)


def _rule_box() -> box.Box:
    utf = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").startswith("utf")
    return box.SIMPLE_HEAD if utf else ASCII_SIMPLE_HEAD


def table_width() -> int:
    """``COLUMNS`` if set, else the width of the terminal on stdout, or on stderr when stdout is a pipe
    (``ift train --help-config | less`` still shows on that terminal), else :data:`PIPE_WIDTH`."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            return os.get_terminal_size(stream.fileno()).columns
        except (AttributeError, ValueError, OSError):  # no such stream, or not a terminal
            continue
    return PIPE_WIDTH


def render_table(
    columns: Sequence[str | Column],
    rows: Sequence[Sequence[object] | None],
    title: str | None = None,
    *,
    width: int | None = None,
) -> str:
    """``rows`` under ``columns`` as aligned text: the header, a rule, then one line per row.

    A column is its header, or a :class:`rich.table.Column` for more (``justify="right"`` for
    numbers, ``no_wrap=True``); a cell is printed with ``str``; a ``None`` row starts a new
    section (a blank line).  Cells too long for ``width`` (default :func:`table_width`) wrap
    within their column; trailing blanks are cut from every line.
    """
    table = Table(
        *columns, title=title, title_justify="left", box=_rule_box(), show_edge=False, pad_edge=False,
        header_style="", title_style="",
    )  # fmt: skip
    for row in rows:
        if row is None:
            table.add_section()
        else:
            table.add_row(*(str(cell) for cell in row))
    out = io.StringIO()
    console = Console(file=out, width=width or table_width(), color_system=None, force_terminal=False,
                      no_color=True, highlight=False, emoji=False, markup=False)  # fmt: skip
    console.print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().rstrip("\n").splitlines())
