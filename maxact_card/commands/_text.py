"""Plain-text tables for the terminal and for pipes.

On a terminal a table fits its width: columns keep their text whole, and the one column marked
`wrap` (a message) takes what is left, continued under itself. Where even that does not fit, each
row is printed as a block of `title: value` lines. Piped output is never wrapped or padded past its
text, so a log line stays one greppable line. Cells are single lines: whatever a model, tokenizer
or file controls is made printable with `fmt.printable` before it gets here.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Column", "key_values", "stdout_width", "table"]

GAP = "  "
#: A wrapped column narrower than this reads worse than the stacked layout.
MIN_WRAP = 24


@dataclass(frozen=True)
class Column:
    """A table column: its title, alignment, and whether it is the one that moves under its row
    when the table is too wide (`wrap`, at most one per table; `labelled`: with its title then)."""

    title: str
    right: bool = False
    wrap: bool = False
    labelled: bool = True


def stdout_width() -> int | None:
    """The terminal's width when stdout is one, else None (a pipe or a file: no wrapping)."""
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size((100, 24)).columns


def table(title: str | None, columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None) -> list[str]:
    """The lines of a table: a title line, a header line and one line per row.

    When the table is wider than `width`, the `wrap` column leaves the grid and its text goes on an
    indented line under each row, wrapped to `width`; if the rest is still too wide, each row
    becomes a block of `title: value` lines. `width` None (a pipe) never wraps anything."""
    lines = [title] if title else []
    widths = [max([len(c.title), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    if width is None or _total(widths) <= width:
        return lines + [_line(columns, widths, cells) for cells in [[c.title for c in columns], *rows]]
    moved = next((i for i, c in enumerate(columns) if c.wrap), None)
    if moved is not None:
        keep = [i for i in range(len(columns)) if i != moved]
        grid = [columns[i] for i in keep]
        kept_widths = [widths[i] for i in keep]
        indent = " " * (kept_widths[0] + len(GAP))
        if _total(kept_widths) <= width and width - len(indent) >= MIN_WRAP:
            lines.append(_line(grid, kept_widths, [c.title for c in grid]))
            for cells in rows:
                lines.append(_line(grid, kept_widths, [cells[i] for i in keep]))
                text = f"{columns[moved].title}: {cells[moved]}" if columns[moved].labelled else cells[moved]
                lines.extend(textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent,
                                           break_on_hyphens=False, break_long_words=False))
            return lines
    return lines + _stacked(columns, rows, width)


def _total(widths: Sequence[int]) -> int:
    return sum(widths) + len(GAP) * (len(widths) - 1)


def _line(columns: Sequence[Column], widths: Sequence[int], cells: Sequence[str]) -> str:
    parts = [cell.rjust(w) if c.right else cell.ljust(w) for c, w, cell in zip(columns, widths, cells)]
    return GAP.join(parts).rstrip()


def _stacked(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int) -> list[str]:
    """Each row as its first cell, then an indented `title: value` line per other cell."""
    label = max(len(c.title) for c in columns[1:]) + 2
    lines: list[str] = []
    for cells in rows:
        lines.append(cells[0])
        for c, cell in zip(columns[1:], cells[1:]):
            head = f"  {(c.title + ':').ljust(label)} "
            lines.extend(textwrap.wrap(cell, width, initial_indent=head, subsequent_indent=" " * len(head),
                                       break_on_hyphens=False, break_long_words=False) or [head.rstrip()])
    return lines


def key_values(pairs: Sequence[tuple[str, str]], width: int | None) -> list[str]:
    """`key  value` lines, values aligned and wrapped under themselves on a terminal."""
    label = max(len(k) for k, _ in pairs) + 2
    lines: list[str] = []
    for key, value in pairs:
        head = key.ljust(label)
        if width is None or label + len(value) <= width or width - label < MIN_WRAP:
            lines.append(head + value)
        else:
            lines.extend(textwrap.wrap(value, width, initial_indent=head, subsequent_indent=" " * label,
                                       break_on_hyphens=False))
    return lines
