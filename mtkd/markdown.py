"""The one writer of Markdown tables (reports, study and sweep results, bench tables), so every
table mtkd writes has the same shape; light to import (no torch) for any command."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], right: Collection[int] = ()
) -> str:
    """A GitHub Markdown table; each cell is written with ``str``; the columns whose index is in
    ``right`` are right-aligned (numbers)."""
    rule = ["---:" if i in right else "---" for i in range(len(header))]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in cells) + " |" for cells in lines)
