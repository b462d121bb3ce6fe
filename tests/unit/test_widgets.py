from types import SimpleNamespace

import pytest

from labkit import widgets
from labkit.errors import BadParameter


def test_text_table_aligns_columns():
    text = widgets.text_table([{"a": "x", "b": True}, {"a": "longer", "b": 1.23456}], ["a", "b"])
    lines = text.splitlines()
    assert lines[0].split() == ["a", "b"]
    assert lines[2].split() == ["x", "yes"] and lines[3].split() == ["longer", "1.235"]
    assert lines[2].index("yes") == lines[3].index("1.235")


def test_table_html_is_escaped_and_text_matches():
    table = widgets.Table([{"name": "<script>", "ok": False}], title="T")
    assert "&lt;script&gt;" in table._repr_html_() and "<script>" not in table._repr_html_()
    assert repr(table).startswith("T\n") and "no" in repr(table)


def test_html_table_is_the_one_builder_behind_table():
    rows = [{"name": "a", "ok": True, "ms": 1.23456, "ref": None}]
    page = widgets.html_table(rows, ["name", "ok", "ms", "ref"], missing="-")
    assert "<td style='color:#1a7f37'>yes</td>" in page and "<td>1.235</td>" in page and "<td>-</td>" in page
    assert widgets.Table(rows, title="T")._repr_html_() == widgets.html_table(rows, list(rows[0]), title="T")
    assert ">a</th>" in widgets.html_table([], ["a"])  # an empty board still has its header


def test_show_prints_outside_a_notebook(capsys):
    widgets.show([{"x": 1}], title="plain")
    assert "plain" in capsys.readouterr().out


def test_short_traceback_is_the_sentence():
    assert widgets.short_traceback(None, BadParameter, BadParameter("device='cuda' ... use 'cpu'."), None) == [
        "BadParameter: device='cuda' ... use 'cpu'."]


def test_short_errors_needs_ipython():
    assert widgets.short_errors() is False


ROWS = [{"backend": "MATH", "ms": 1.5}, {"backend": "FLASH_ATTENTION", "ms": 0.25}]


def test_live_board_prints_rows_as_they_come_outside_a_notebook(capsys):
    board = widgets.LiveBoard(["backend", "ms"], title="sweep", total=2)
    assert board.mode == "text"
    board.add(ROWS[0])
    assert capsys.readouterr().out == "sweep\n  backend=MATH  ms=1.5\n"
    board(ROWS[1])
    board.finish()
    assert "backend=FLASH_ATTENTION  ms=0.25" in capsys.readouterr().out
    assert board.rows == ROWS and board.finished
    assert repr(board).splitlines()[0] == "sweep" and "FLASH_ATTENTION" in repr(board)


class _FakeHandle:
    def __init__(self):
        self.updates = []

    def update(self, obj):
        self.updates.append(obj._repr_mimebundle_())


def _as_if_in_jupyterlab(monkeypatch):
    import IPython.display
    import ipywidgets

    shown, handle = [], _FakeHandle()

    def fake_display(obj, display_id=None):
        shown.append(obj)
        return handle if display_id else None

    monkeypatch.setattr(widgets, "_ipywidgets", lambda: ipywidgets)
    monkeypatch.setattr(IPython.display, "display", fake_display)
    return shown, handle


def test_live_board_is_a_widget_that_fills_in_and_leaves_a_text_table(monkeypatch):
    shown, handle = _as_if_in_jupyterlab(monkeypatch)
    board = widgets.LiveBoard(["backend", "ms"], title="sweep", total=2)
    assert board.mode == "widget" and shown == [board]
    assert "0/2 rows, measuring" in board.status.value
    board.add(ROWS[0])
    assert "MATH" in board.table.value and "1/2 rows" in board.status.value
    board.add(ROWS[1])
    board.finish()
    assert "2/2 rows, done" in board.status.value and "FLASH_ATTENTION" in board.table.value
    bundle = handle.updates[-1]
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "FLASH_ATTENTION" in bundle["text/plain"] and bundle["text/plain"].startswith("sweep")


def test_picker_is_a_dropdown_in_jupyterlab_whose_value_the_next_cell_reads(monkeypatch):
    shown, _ = _as_if_in_jupyterlab(monkeypatch)
    chosen = widgets.picker(["MATH", "FLASH_ATTENTION"], value="FLASH_ATTENTION", description="backend")
    assert shown == [chosen] and chosen.value == "FLASH_ATTENTION"
    chosen.value = "MATH"  # what a learner (or the browser test) does
    assert chosen.value == "MATH"


def test_picker_outside_a_notebook_is_a_plain_choice(capsys):
    chosen = widgets.picker([128, 256], description="length")
    assert chosen.value == 128 and "length: 128" in capsys.readouterr().out

    with pytest.raises(ValueError, match="not one of"):
        widgets.picker([1, 2], value=3)
    with pytest.raises(ValueError, match="at least one"):
        widgets.picker([])


def test_in_a_kernel_without_ipywidgets_the_board_and_picker_are_text(monkeypatch, capsys):
    """What the fault matrix's "ipywidgets not importable" row showed with two whole notebook runs: a kernel whose
    ipywidgets cannot be imported gets the text forms (ipywidgets hidden here as the matrix hides it)."""
    import builtins

    real_import = builtins.__import__

    def without_ipywidgets(name, *args, **kwargs):
        if name.split(".")[0] == "ipywidgets":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(widgets, "_shell", lambda: SimpleNamespace(kernel="a Jupyter kernel"))
    monkeypatch.setattr(builtins, "__import__", without_ipywidgets)
    assert widgets._ipywidgets() is None
    board = widgets.LiveBoard(["backend", "ms"], title="sweep", total=2)
    board.add(ROWS[0])
    board.finish()
    chosen = widgets.picker([128, 256], value=256, description="length")
    said = capsys.readouterr().out
    assert board.mode == "text" and "MATH" in said and chosen.value == 256 and "length: 256" in said
