"""Execute every notebook with papermill, quick parameters and the Hub offline; its own checks must pass.

Each run is a learner's first run after `make install`: labkit's cache holds only what `labkit prepare` makes (the
converted SmolLM2; no random-init folders for 05's torchrun jobs, no measured ceilings, no cached probes), and Hugging
Face's and matplotlib's caches are empty, in folders of the run's own. A warm cache once hid two first-run failures.
(torch's compile cache stays shared: a cold one costs minutes of compiling and hides no bug of the workbook's.)
"""

from pathlib import Path

import papermill
import pytest
from conftest import OPENING_EXEC_COUNT, first_run_cache, notebook_opening

import labkit
from labkit import registry
from labkit.errors import BadParameter
from labkit.results import read_results

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def first_run(tmp_path: Path, monkeypatch) -> None:
    """Point the kernel at empty caches, but for the models `labkit prepare` made (conftest.first_run_cache)."""
    fresh = tmp_path / "fresh-cache"
    monkeypatch.setenv("LABKIT_CACHE", str(first_run_cache(fresh / "labkit")))
    monkeypatch.setenv("HF_HOME", str(fresh / "huggingface"))
    monkeypatch.setenv("MPLCONFIGDIR", str(fresh / "matplotlib"))


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_its_checks_pass(notebook, tmp_path, monkeypatch, guarded_kernels):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("IPYTHONDIR", guarded_kernels)  # deprecations are errors; no network
    first_run(tmp_path, monkeypatch)  # module docstring
    results_path = tmp_path / f"{notebook.stem}.results.json"
    # with the exercises filled in by their solutions (nbval runs the stored notebooks, exercises unanswered)
    solutions = {"solutions": True} if "solutions" in papermill.inspect_notebook(str(notebook)) else {}
    papermill.execute_notebook(str(notebook), str(tmp_path / notebook.name), kernel_name="python3",
                               parameters={"quick": True, "results_path": str(results_path), **solutions},
                               cwd=str(notebook.parent), progress_bar=False)
    data = read_results(results_path)
    assert data["notebook"] == notebook.stem
    assert data["checks"], "a notebook must assert something about what it taught"
    failed = [name for name, passed in data["checks"].items() if not passed]
    assert not failed, f"checks failed: {failed}"
    assert all(isinstance(v, (int, float)) for v in data["metrics"].values())
    for what, why in data["skipped"].items():
        assert why.strip() and "\n" not in why, f"skip of {what!r} needs a one-line reason"
    for figure in data.get("figures", []):
        assert (tmp_path / figure).stat().st_size > 1000, f"figure {figure} was not saved"
    missing = [name for name in registry.get(notebook.stem).metrics if name not in data["metrics"]]
    assert not missing, f"metrics missing: {missing}"
    tables = data.get("tables", {})
    missing = [name for name in registry.get(notebook.stem).tables if not tables.get(name, {}).get("data")]
    assert not missing, f"tables missing or empty: {missing}"
    if solutions:
        assert data["checks"].get("exercise_solutions_pass") is True


# Values of the wrong kind (the fault matrix's "a zero or negative size" stops every notebook on a bad size). Each
# stops the opening cell, `labkit.start`: one notebook shows it in a kernel (one sentence, in the first cells), the
# others call `labkit.start` with the same parameters here.
BAD_PARAMETERS = {n.stem: n.bad_value for n in registry.NOTEBOOKS if n.bad_value}
IN_A_KERNEL = "04_quantization"


@pytest.mark.notebook
def test_a_bad_parameter_stops_the_notebook_early_in_one_sentence(tmp_path, monkeypatch, guarded_kernels):
    monkeypatch.setenv("IPYTHONDIR", guarded_kernels)
    parameters, named = BAD_PARAMETERS[IN_A_KERNEL]
    notebook = ROOT / "notebooks" / f"{IN_A_KERNEL}.ipynb"
    with pytest.raises(papermill.PapermillExecutionError) as caught:
        papermill.execute_notebook(str(notebook), str(tmp_path / "out.ipynb"), kernel_name="python3",
                                   parameters={"quick": True, **parameters}, cwd=str(notebook.parent),
                                   progress_bar=False)
    error = caught.value
    assert error.ename == "BadParameter" and named in error.evalue
    assert error.exec_count <= OPENING_EXEC_COUNT, "bad parameters must be caught in the first cells"
    assert len(error.traceback) == 1, "one sentence, not a traceback"


@pytest.mark.parametrize("stem", sorted(BAD_PARAMETERS))
def test_a_bad_parameter_stops_the_opening_cell_in_one_sentence(stem):
    notebook = ROOT / "notebooks" / f"{stem}.ipynb"
    defaults, place = notebook_opening(notebook)
    assert place == 1, "labkit.start opens the first code cell after the parameters"
    parameters, named = BAD_PARAMETERS[stem]
    with pytest.raises(BadParameter) as caught:
        labkit.start(stem, {**defaults, "quick": True, "results_path": "", **parameters})
    assert named in str(caught.value) and "\n" not in str(caught.value).strip()


@pytest.mark.notebook
def test_the_test_kernels_refuse_the_network_and_fail_on_deprecations(tmp_path, monkeypatch, guarded_kernels):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 443), timeout=3)\n"
                                          "except ConnectionRefusedError as error:\n    refused = str(error)\n"
                                          "assert 'the tests run offline' in refused"),
                nbformat.v4.new_code_cell("import warnings\nwarnings.warn('a deprecated call', FutureWarning)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "canary.ipynb")
    monkeypatch.setenv("IPYTHONDIR", guarded_kernels)
    with pytest.raises(papermill.PapermillExecutionError) as caught:
        papermill.execute_notebook(str(tmp_path / "canary.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
                                   progress_bar=False)
    assert caught.value.ename == "FutureWarning" and caught.value.exec_count == 2
