from labkit import widgets


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


def test_show_prints_outside_a_notebook(capsys):
    widgets.show([{"x": 1}], title="plain")
    assert "plain" in capsys.readouterr().out


def test_short_traceback_is_the_sentence():
    from labkit.errors import BadParameter

    assert widgets.short_traceback(None, BadParameter, BadParameter("device='cuda' ... use 'cpu'."), None) == [
        "BadParameter: device='cuda' ... use 'cpu'."]


def test_short_errors_needs_ipython():
    assert widgets.short_errors() is False
