"""The fault matrix (pytest -m faults): each notebook, quick, under each condition of conditions.py.

Every cell of the matrix must end "completed" (checks true, the affected cells skipped with a one-line reason)
or "stopped" (BadParameter or ModelNotAvailable in the first cells, one sentence, no traceback). A condition made of
parameters alone (or with startup code that ``here`` can apply in this process) runs in a kernel for the notebooks its
``kernel`` names and through ``labkit.start`` in this process for the others: the stop is in the opening cell, and the
opening cell is ``labkit.start``.
"""

import importlib.util
from pathlib import Path

import kernel_guard
import papermill
import pytest
from conditions import CONDITIONS
from conftest import OPENING_EXEC_COUNT, notebook_opening

import labkit
from labkit.errors import BadParameter, ModelNotAvailable
from labkit.results import read_results

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = {p.name[:2]: p for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))}
CASES = [(c, nb) for c in CONDITIONS for nb in c.notebooks if nb in NOTEBOOKS and (c.kernel is None or nb in c.kernel)]
IN_PROCESS = [(c, nb) for c in CONDITIONS for nb in c.notebooks if nb in NOTEBOOKS and (c, nb) not in CASES]


@pytest.mark.faults
@pytest.mark.parametrize("condition, number", CASES, ids=[f"{c.name}-{nb}" for c, nb in CASES])
def test_notebook_completes_or_stops_clearly(condition, number, tmp_path, monkeypatch, record_property):
    notebook = NOTEBOOKS[number]
    if condition.hides and importlib.util.find_spec(condition.hides) is None:
        pytest.skip(f"{condition.hides} is not installed here: hiding it changes nothing, and make test ran the plain "
                    "notebook")
    if condition.cpu_only:
        import torch

        if torch.cuda.is_available():
            pytest.skip(f"{condition.name!r} is simulated for machines without a CUDA GPU, and this one has one")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    profile = kernel_guard.make_profile(tmp_path / "ipython")  # no network, deprecations are errors
    if condition.startup:
        (Path(profile) / "profile_default" / "startup" / "01-fault.py").write_text(condition.startup)
    monkeypatch.setenv("IPYTHONDIR", profile)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, value in condition.env(tmp_path).items():
        monkeypatch.setenv(name, value)
    results_path = tmp_path / "results.json"
    parameters = {"quick": True, "results_path": str(results_path), **condition.parameters(number, empty)}
    outcome = "FAILED"
    try:
        try:
            papermill.execute_notebook(str(notebook), str(tmp_path / notebook.name), kernel_name="python3",
                                       parameters=parameters, cwd=str(notebook.parent), progress_bar=False)
        except papermill.PapermillExecutionError as error:
            assert condition.expected(number) == "stopped", f"{error.ename}: {error.evalue}"
            assert error.ename in ("BadParameter", "ModelNotAvailable"), f"{error.ename}: {error.evalue}"
            assert error.exec_count <= OPENING_EXEC_COUNT, f"stopped in cell {error.exec_count}, not in the first cells"
            assert len(error.traceback) == 1, "one sentence, not a traceback"
            assert condition.stop_says(number) in error.evalue, error.evalue
            outcome = "stopped"
        else:
            assert condition.expected(number) == "completed", "the notebook ran to its end instead of stopping"
            data = read_results(results_path)
            failed = [name for name, passed in data["checks"].items() if not passed]
            assert not failed, f"checks failed: {failed}"
            for what, why in data["skipped"].items():
                assert why.strip() and "\n" not in why, f"skip of {what!r} needs a one-line reason"
            for mention in condition.skipped_mention.get(number, ()):
                assert any(mention in why for why in data["skipped"].values()), \
                    f"no skip reason mentions {mention!r}: {data['skipped']}"
            outcome = "completed"
    finally:
        for name in (condition.name, *condition.stands_for):
            record_property("fault_outcome", (name, number, outcome))


@pytest.mark.faults
@pytest.mark.parametrize("condition, number", IN_PROCESS, ids=[f"{c.name}-{nb}" for c, nb in IN_PROCESS])
def test_opening_cell_stops_with_one_sentence(condition, number, tmp_path, record_property, monkeypatch):
    assert not condition.hides and (condition.here or not condition.startup), \
        "a condition with startup code runs in this process only with its `here`"
    if condition.cpu_only:
        import torch

        if torch.cuda.is_available():
            pytest.skip(f"{condition.name!r} is simulated for machines without a CUDA GPU, and this one has one")
    notebook = NOTEBOOKS[number]
    defaults, place = notebook_opening(notebook)
    assert place == 1, f"labkit.start is in code cell {place + 1}: a bad parameter must stop the first cell after them"
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    parameters = {**defaults, "quick": True, "results_path": "", **condition.parameters(number, empty)}
    if condition.here:
        condition.here(monkeypatch)
    outcome = "FAILED"
    try:
        with pytest.raises((BadParameter, ModelNotAvailable)) as stopped:
            labkit.start(notebook.stem, parameters)
        sentence = str(stopped.value)
        assert condition.stop_says(number) in sentence, sentence
        assert "\n" not in sentence.strip(), f"one sentence, not several lines: {sentence!r}"
        outcome = "stopped"
    finally:
        record_property("fault_outcome", (condition.name, number, outcome))
