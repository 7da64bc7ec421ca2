"""Terminal tables: rich when installed, aligned plain text otherwise (same content either way)."""

from __future__ import annotations

import sys
from typing import Any, Sequence


def format_value(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1e6:
            return f"{v:.3e}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"
    return "-" if v is None else str(v)


def render_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table (used in logs, files and when rich is absent)."""
    cells = [[format_value(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "  ".join("-" * w for w in widths)
    out = [title, line, "  ".join(c.ljust(w) for c, w in zip(columns, widths)), line]
    out += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    out.append(line)
    return "\n".join(out)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, file: Any = None) -> None:
    """Print a table to the terminal (rich if available)."""
    file = file or sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(render_table(title, columns, rows), file=file)
        return
    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[format_value(v) for v in r])
    Console(file=file, width=max(100, min(200, 20 * len(columns)))).print(table)
