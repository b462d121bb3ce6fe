"""Display: tables that render as HTML in JupyterLab and as plain text under papermill or in a terminal.

Functions elsewhere return data; this module only shows it.
"""

from __future__ import annotations

import html
from typing import Any, Iterable, Sequence


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def text_table(rows: Iterable[dict[str, Any]], columns: Sequence[str], *, indent: int = 0,
               headers: Sequence[str] | None = None) -> str:
    """Rows of dicts as an aligned plain-text table with the given columns."""
    rows = list(rows)
    headers = list(headers or columns)
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    pad = " " * indent

    def line(values: Sequence[str]) -> str:
        return (pad + "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells]
    return "\n".join(out)


class Table:
    """A table that JupyterLab shows as HTML and papermill/terminals show as aligned text."""

    def __init__(self, rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None, *,
                 title: str = "", headers: Sequence[str] | None = None):
        self.rows = list(rows)
        self.columns = list(columns or (self.rows[0].keys() if self.rows else []))
        self.headers = list(headers or self.columns)
        self.title = title

    def __repr__(self) -> str:
        body = text_table(self.rows, self.columns, headers=self.headers)
        return f"{self.title}\n{body}" if self.title else body

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in self.headers)
        body = []
        for row in self.rows:
            tds = []
            for col in self.columns:
                value = row.get(col)
                style = ""
                if isinstance(value, bool):
                    style = " style='color:#1a7f37'" if value else " style='color:#cf222e'"
                tds.append(f"<td{style}>{html.escape(_cell(value))}</td>")
            body.append("<tr>" + "".join(tds) + "</tr>")
        caption = f"<caption style='text-align:left'><b>{html.escape(self.title)}</b></caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def show(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None, *, title: str = "",
         headers: Sequence[str] | None = None) -> None:
    """Display a table in a notebook, or print it outside one."""
    table = Table(rows, columns, title=title, headers=headers)
    try:
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is not None:
            display(table)
            return
    except ImportError:
        pass
    print(repr(table))


def short_traceback(shell, etype, value, tb, tb_offset=None) -> list[str]:
    """IPython custom-exception handler: a labkit error shows as its one sentence, not a traceback."""
    stb = [f"{etype.__name__}: {value}"]
    if shell is not None:
        # IPython discards a handler's return value; _showtraceback is what ipykernel turns into the
        # cell's error output (ename, evalue, this one-line traceback), which papermill and nbval read.
        shell._showtraceback(etype, value, stb)
    return stb


def short_errors() -> bool:
    """In IPython/Jupyter, show labkit's own errors (bad parameters, missing models) as one line.

    The cell still fails (papermill and nbval still see an error); only the display is shorter.
    Returns False outside IPython.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    from labkit.errors import LabkitError

    shell.set_custom_exc((LabkitError,), short_traceback)
    return True
