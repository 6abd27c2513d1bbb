"""The one Markdown-table writer of the project.

It lives in the library because the library writes tables too (the CLI's results table, the
model card of an exported release); ``analyses``, ``experiments`` and ``benchmarks`` import it
from here, so that no package has to import the other the wrong way round.
"""

from collections.abc import Iterable, Sequence
from typing import Any


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (no trailing newline); cells go through ``str``."""
    lines = [_row(head), "|" + "---|" * len(head)]
    lines += [_row(r) for r in rows]
    return "\n".join(lines)


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
