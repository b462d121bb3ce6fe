"""The notebooks as text: built from notebooks/src/, cells a learner can read, predictions before their reveal."""

import importlib.util
import re
from pathlib import Path

import jupytext
import pytest

from labkit import exercises

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("notebook_tools", ROOT / "tools" / "notebooks.py")
tools = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tools)

SOURCES = tools.sources()
LESSONS = [s for s in SOURCES if re.match(r"\d\d_", s.name)]
MAX_CELL_LINES, MAX_OPENING_LINES = 20, 10


def cells(source: Path):
    return jupytext.read(source, fmt=tools.FORMAT).cells


def test_every_ipynb_is_built_from_its_text_source():
    assert SOURCES, "no notebook sources under notebooks/src/"
    assert tools.drift() == [], "run `make notebooks` after editing notebooks/src/ (see tools/notebooks.py)"


def test_building_twice_gives_the_same_bytes_and_stable_ids():
    source = SOURCES[0]
    first, second = tools.build_notebook(source), tools.build_notebook(source)
    assert first == second
    ids = re.findall(r'"id": "([^"]+)"', first)
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("source", LESSONS, ids=[s.stem for s in LESSONS])
def test_code_cells_are_short_enough_to_read(source):
    code = [c for c in cells(source) if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell holds the parameters"
    opening = len(next(c for c in code if "labkit.start(" in c.source).source.splitlines())
    assert opening <= MAX_OPENING_LINES, f"the opening cell has {opening} lines (at most {MAX_OPENING_LINES})"
    long = {i: len(c.source.splitlines()) for i, c in enumerate(code) if len(c.source.splitlines()) > MAX_CELL_LINES}
    assert not long, f"code cells (index: lines) over {MAX_CELL_LINES} lines: {long}"


@pytest.mark.parametrize("source", LESSONS, ids=[s.stem for s in LESSONS])
def test_a_notebook_ends_with_what_you_measured(source):
    code = [c for c in cells(source) if c.cell_type == "code"]
    assert "lab.finish(" in code[-1].source


@pytest.mark.parametrize("exercise", list(exercises.EXERCISES.values()), ids=list(exercises.EXERCISES))
def test_each_exercise_sits_once_in_its_notebook_and_a_prediction_precedes_its_reveal(exercise):
    source = next(s for s in LESSONS if s.name.startswith(exercise.notebook + "_"))
    nb = cells(source)
    asked = [i for i, c in enumerate(nb) if c.cell_type == "code" and f'lab.exercise("{exercise.id}"' in c.source]
    assert len(asked) == 1, f"{exercise.id} must be asked exactly once in {source.name}"
    revealed = [i for i, c in enumerate(nb) if f"reveals-{exercise.id}" in c.metadata.get("tags", [])]
    if exercise.kind == "predict":
        assert len(revealed) == 1, f"{exercise.id}: tag the one cell that reveals its answer reveals-{exercise.id}"
        assert asked[0] < revealed[0], f"{exercise.id} is asked after the cell that reveals its answer"
        assert ".compare(" in nb[revealed[0]].source, f"{exercise.id}: the revealing cell compares the prediction"
    else:
        assert not revealed


INTERNAL_WORDS = re.compile(r"\b(issue|target)s?\b", re.I)


@pytest.mark.parametrize("source", LESSONS, ids=[s.stem for s in LESSONS])
def test_what_a_learner_reads_has_no_internal_words(source):
    for cell in cells(source):
        shown = cell.source if cell.cell_type == "markdown" else "\n".join(
            line for line in cell.source.splitlines() if re.search(r"\b(print|skip|show)\(", line))
        found = INTERNAL_WORDS.findall(shown)
        assert not found, f"{source.name}: {found} in {shown[:120]!r}"
