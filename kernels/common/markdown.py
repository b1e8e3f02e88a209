"""Markdown tables as every report here writes them: `| a | b |` lines under a `| --- |` rule."""
from __future__ import annotations

from collections.abc import Iterable, Sequence


def table_row(cells: Iterable[object]) -> str:
    """One table line; None shows as an empty cell."""
    return "| " + " | ".join("" if cell is None else str(cell) for cell in cells) + " |"


def table(columns: Sequence[str], rows: Iterable[Iterable[object]], *, compact_rule: bool = False) -> list[str]:
    """The header, its rule and a line per row. compact_rule: `|---|---|`, the rule the study reports have always
    had (kept so that regenerated reports stay byte for byte what was committed)."""
    rule = "|" + "---|" * len(columns) if compact_rule else table_row("---" for _ in columns)
    return [table_row(columns), rule, *(table_row(row) for row in rows)]
