"""The two counting tools the issues' "done when" read: tools/cell_lines.py (lesson share) and tools/prose_stats.py."""

import importlib.util
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "notebooks" / "src").glob("[0-9][0-9]_*.py"))


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cell_lines, prose_stats = load("cell_lines"), load("prose_stats")


def test_cell_lines_tells_lesson_from_labkit_harness_and_display():
    cell = textwrap.dedent("""\
        times = []
        for n in sizes:
            t = timing.measure(lambda: torch.mm(a, b), device=lab.device)
            times.append(t.median_ms)
        lab.check("faster", times[0] < times[-1], "detail")
        if lab.on_gpu:
            print(times)
        """)
    counts = cell_lines.count_cell(cell)
    assert counts == {"lesson": 3, "labkit": 1, "harness": 2, "display": 1}


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem[:2])
def test_every_notebook_keeps_at_least_60_percent_lesson_code(source):
    counts = cell_lines.count(source)
    assert counts["lesson"] / sum(counts.values()) >= 0.60, dict(counts)  # issue 27: the experiment is in the cell


def test_prose_stats_counts_sentences_and_parentheticals(tmp_path):
    source = tmp_path / "nb.py"
    source.write_text(textwrap.dedent("""\
        # %% [markdown]
        # # A title
        #
        # One short sentence here. Another one (with an aside) that has `code(x)` in it?
        #
        # - a list item of five words

        # %%
        x = (1)
        """))
    found = prose_stats.stats(source)
    assert found["sentences"] == 3 and found["parentheticals"] == 1
    assert found["words_per_sentence"] == pytest.approx((4 + 10 + 6) / 3)  # the title (two words) is not a sentence
