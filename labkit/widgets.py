"""Display: tables that render as HTML in JupyterLab and as plain text under papermill or in a terminal.

Functions elsewhere return data; this module only shows it.
"""

from __future__ import annotations

import html
from types import SimpleNamespace
from typing import Any, Iterable, Sequence

from labkit import compat, probes
from labkit.errors import LabkitError


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def text_table(rows: Iterable[dict[str, Any]], columns: Sequence[str], *, indent: int = 0) -> str:
    """Rows of dicts as an aligned plain-text table with the given columns."""
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return (" " * indent + "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True))).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(c) for c in cells])


def html_table(rows: Iterable[dict[str, Any]], columns: Sequence[str], *, title: str = "", missing: str = "") -> str:
    """Rows of dicts as an HTML table (every value escaped, yes/no in colour, ``missing`` where a value is None):
    the one HTML table of labkit, for notebooks and the run report alike.

    Not pandas': ``DataFrame.to_html`` has no caption, and a ``Styler``'s HTML carries a random id per table and a
    style rule per coloured cell, so that the same rows never give the same page twice."""
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            colour = f" style='color:{'#1a7f37' if value else '#cf222e'}'" if isinstance(value, bool) else ""
            cells.append(f"<td{colour}>{html.escape(missing if value is None else _cell(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"<caption style='text-align:left'><b>{html.escape(title)}</b></caption>" if title else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Table:
    """A table that JupyterLab shows as HTML and papermill/terminals show as aligned text."""

    def __init__(self, rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None, *, title: str = ""):
        if hasattr(rows, "to_dict"):  # a pandas DataFrame: its columns, in order; NaN shown as empty
            columns = columns or [str(c) for c in rows.columns]
            rows = [{str(k): (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
                    for r in rows.to_dict(orient="records")]
        self.rows = list(rows)
        self.columns = list(columns or (self.rows[0].keys() if self.rows else []))
        self.title = title

    def __repr__(self) -> str:
        return "\n".join(filter(None, [self.title, text_table(self.rows, self.columns)]))

    def _repr_html_(self) -> str:
        return html_table(self.rows, self.columns, title=self.title)


def show(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None, *, title: str = "") -> None:
    """Display a table (rows of dicts, or a pandas DataFrame) in a notebook, or print it outside one."""
    table = Table(rows, columns, title=title)
    if _shell() is None:
        print(repr(table))
        return
    from IPython.display import display  # there is a shell, so IPython is installed

    display(table)


def _shell():
    """The running IPython shell, or None in plain Python."""
    try:
        from IPython import get_ipython  # optional (the lab extra): labkit runs in plain Python without it
    except ImportError:
        return None
    return get_ipython()


def short_traceback(shell, etype, value, tb, tb_offset=None) -> list[str]:
    """IPython custom-exception handler: a labkit error shows as its one sentence, not a traceback."""
    stb = [f"{etype.__name__}: {value}"]
    if shell is not None:
        # IPython discards a handler's return value; _showtraceback is what ipykernel turns into the
        # cell's error output (ename, evalue, this one-line traceback), which papermill and nbval read.
        compat.show_short_traceback(shell, etype, value, stb)
    return stb


def short_errors() -> bool:
    """In IPython/Jupyter, show labkit's own errors (bad parameters, missing models) as one line.

    The cell still fails (papermill and nbval still see an error); only the display is shorter.
    Returns False outside IPython.
    """
    shell = _shell()
    if shell is None:
        return False
    shell.set_custom_exc((LabkitError,), short_traceback)
    return True


# --------------------------------------------------------------------------- live board and pickers

def _ipywidgets():
    """The ipywidgets module inside a Jupyter kernel (JupyterLab, papermill), else None: in a terminal, plain Python
    or a kernel without ipywidgets the plain-text form is used."""
    if not hasattr(_shell(), "kernel"):
        return None
    try:
        import ipywidgets  # optional (the lab extra), and hidden by the fault matrix: text tables without it
    except ImportError:
        return None
    return ipywidgets


class LiveBoard:
    """A table that fills in row by row while a sweep runs.

    In JupyterLab it is an ipywidgets HTML table updated in place, with a count of rows measured. Without
    ipywidgets or outside a kernel each row is printed as a line of text as it arrives. When it finishes,
    the displayed output's plain-text form becomes the whole table, which is what papermill stores.
    Use it as a sweep's ``on_row`` callback: ``board.add(row)`` or ``board(row)``.
    """

    def __init__(self, columns: Sequence[str], *, title: str = "", total: int | None = None):
        self.columns, self.title, self.total = list(columns), title, total
        self.rows: list[dict[str, Any]] = []
        self.finished, self._handle = False, None
        module = _ipywidgets()
        self.mode = "widget" if module is not None else "text"
        if self.mode == "widget":
            self.status = module.HTML(value=self._status_html())
            self.table = module.HTML(value=html_table([], self.columns))
            self.widget = module.VBox([self.status, self.table])
            from IPython.display import display  # in a kernel, so IPython is there (it is optional elsewhere)

            self._handle = display(self, display_id=True)
        elif title:
            print(title)

    def _status_html(self) -> str:
        count = f"{len(self.rows)}/{self.total}" if self.total else str(len(self.rows))
        return f"<b>{html.escape(self.title)}</b> &nbsp; {count} rows, {'done' if self.finished else 'measuring'}"

    def add(self, row: dict[str, Any]) -> None:
        """Show one more row."""
        self.rows.append(row)
        if self.mode == "widget":
            self.status.value = self._status_html()
            self.table.value = html_table(self.rows, self.columns)
        else:
            print("  " + "  ".join(f"{c}={_cell(row.get(c))}" for c in self.columns))

    __call__ = add

    def finish(self) -> None:
        """Mark the board done; the stored plain-text form becomes the whole table."""
        self.finished = True
        if self.mode == "widget":
            self.status.value = self._status_html()
            self._handle.update(self)

    def __repr__(self) -> str:
        return repr(Table(self.rows, self.columns, title=self.title))

    def _repr_mimebundle_(self, **kwargs) -> dict[str, Any]:
        if self.mode != "widget":
            return {"text/plain": repr(self)}
        return {**self.widget._repr_mimebundle_(**kwargs), "text/plain": repr(self)}


def picker(options: Sequence[Any], value: Any = None, *, description: str = ""):
    """A dropdown whose ``.value`` the next cell reads; where widgets cannot show, a plain object with the same
    ``.value``, ``.options`` and ``.description``. Under papermill the default ``value`` is what the next cell
    measures."""
    options = list(options)
    if not options:
        raise ValueError("a picker needs at least one option")
    value = options[0] if value is None else value
    if value not in options:
        raise ValueError(f"value {value!r} is not one of the options {options}")
    module = _ipywidgets()
    if module is None:
        print(f"{description or 'choice'}: {value!r} (options: {', '.join(map(str, options))})")
        return SimpleNamespace(value=value, options=options, description=description)
    from IPython.display import display  # in a kernel, so IPython is there (it is optional elsewhere)

    dropdown = module.Dropdown(options=options, value=value, description=description,
                               style={"description_width": "initial"})
    display(dropdown)
    return dropdown


# --------------------------------------------------------------------------- a probe report, as tables

SUMMARY_COLUMNS = ("device", "dtype", "input", "runs", "why_not")


def sdpa_summary(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per device x dtype x input kind: the backends that ran, and why each other one did not."""
    grouped: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row["device"], row["dtype"], row["input_kind"])
        entry = grouped.setdefault(key, {"device": key[0], "dtype": key[1], "input": key[2], "runs": [], "why_not": []})
        if row["ok"]:
            entry["runs"].append(row["backend"])
        else:
            entry["why_not"].append(f"{row['backend']}: {row['reason']}")
    return [{**e, "runs": ", ".join(e["runs"]) or "-", "why_not": " | ".join(e["why_not"])} for e in grouped.values()]


def feature_rows(features: dict[str, Any]) -> list[dict[str, Any]]:
    """flash-attn, NCCL, gloo and GPU peer access as (feature, ok, detail) rows."""
    fa, collectives, topo = features["flash_attn"], features["nccl"], features["topology"]
    return [
        {"feature": "flash-attn package", "ok": fa["ok"], "detail": fa["version"] if fa["ok"] else fa["reason"]},
        {"feature": "NCCL (GPU collectives)", "ok": collectives["ok"],
         "detail": collectives["version"] if collectives["ok"] else collectives["reason"]},
        {"feature": "gloo (CPU collectives)", "ok": collectives["gloo"], "detail": ""},
        {"feature": "GPU peer access", "ok": bool(topo["peer_access"]) and all(map(all, topo["peer_access"])),
         "detail": topo["reason"] or str(topo["peer_access"])},
    ]


def probe_text(report: dict[str, Any]) -> str:
    """A probe report (``probes.probe()``) as plain-text tables: what ``labkit probe`` prints."""
    features = report["features"]
    sections = [
        ("Versions and devices", probes.environment_rows(report), ["item", "value"]),
        ("SDPA backends that run (forced one at a time with torch.nn.attention.sdpa_kernel)",
         sdpa_summary(report["sdpa"]), list(SUMMARY_COLUMNS)),
        ("attn_implementation values (transformers)", features["attn_implementations"],
         ["attn_implementation", "ok", "reason"]),
        ("bitsandbytes 4-bit matmul", features["bitsandbytes_4bit"], ["device", "quant_type", "ok", "reason"]),
        ("Other features", feature_rows(features), ["feature", "ok", "detail"]),
    ]
    return "\n\n".join(f"{title}\n{text_table(rows, columns, indent=2)}" for title, rows, columns in sections)
