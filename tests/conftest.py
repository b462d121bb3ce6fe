"""Shared test set-up: everything runs offline, as in CI."""

import json
import os
from pathlib import Path

import kernel_guard
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
kernel_guard.install_network_block()  # the test process too: only loopback (see kernel_guard.py)


def first_run_cache(folder):
    """``folder`` as labkit's cache on a new machine after `make install`: only what `labkit prepare` makes (the
    converted SmolLM2, hard-linked from this session's cache, which it converts first if need be)."""
    import shutil

    from labkit import models

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        prepared = models.smollm2_folder()
    except models.ModelNotAvailable:  # not installed: nothing to prepare
        return folder

    def link_or_copy(source, target):
        try:
            os.link(source, target)
        except OSError:  # another file system
            shutil.copy2(source, target)

    shutil.copytree(prepared, folder / "models" / prepared.name, copy_function=link_or_copy)
    return folder


def assert_refused(parameters_type, bad: dict, named: str) -> None:
    """A notebook's ``Parameters(**bad)``, resolved for a CPU, stops with one sentence that names ``named``."""
    from labkit.errors import BadParameter

    with pytest.raises(BadParameter) as caught:
        parameters_type(**bad).resolve(device="cpu", quick=True)
    assert named in str(caught.value) and "\n" not in str(caught.value)


# A notebook's first cells, counted as a kernel runs them: the parameters, papermill's injected parameters, the
# install-if-missing cell (it does nothing where labkit is installed) and the opening, where a bad parameter stops.
OPENING_EXEC_COUNT = 4


def notebook_opening(notebook) -> tuple[dict, int]:
    """The defaults of a notebook's parameters cell, and the place of its ``labkit.start`` cell among its code
    cells, the install-if-missing cell left out (papermill puts the injected parameters right after the parameters
    cell)."""
    import nbformat

    cells = [c for c in nbformat.read(notebook, as_version=4).cells
             if c.cell_type == "code" and "install-if-missing" not in c.metadata.get("tags", [])]
    defaults: dict = {}
    exec(next(c.source for c in cells if "parameters" in c.metadata.get("tags", [])), defaults)
    return defaults, next(i for i, c in enumerate(cells) if "labkit.start(" in c.source)


@pytest.fixture(scope="session")
def guarded_kernels(tmp_path_factory):
    """IPYTHONDIR for kernels that start with the deprecation canary and the network block."""
    return kernel_guard.make_profile(tmp_path_factory.mktemp("ipython"))

RUN_ENV = {"platform": "Linux", "versions": {"torch": "2.13.0"}, "devices": {"cpu": {"name": "Test CPU", "cores": 2}, "cuda": []}}


def _make_run(folder, *, metrics=None, status="ok"):
    """A run folder as labkit run writes it: one notebook with metrics, a check, a skip and a figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit import report

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([1, 2], [1, 4])
    fig.savefig(folder / "01_flash_attention.sweep.png")
    plt.close(fig)
    entry = {"status": status, "duration_s": 12.5, "parameters": {"quick": True},
             "metrics": metrics or {"best_backend_tflops": 0.14, "sweep_math_ms": 3.0},
             "checks": {"outputs_agree": True}, "skipped": {"cuDNN": "no GPU <here>"},
             "figures": ["01_flash_attention.sweep.png"], "environment": RUN_ENV}
    if status != "ok":
        entry["error"] = "cell 3: RuntimeError: boom"
    summary = {"schema": report.SCHEMA, "started": "2026-11-26T07:00:00+0000", "finished": "2026-11-26T07:01:00+0000",
               "quick": True, "machine": {"env": RUN_ENV, "probe": {"error": "not probed in this test"}},
               "notebooks": {"01_flash_attention": entry}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return summary


@pytest.fixture
def make_run():
    """Builds a fake run folder (summary.json and a figure) for report tests."""
    return _make_run


# --------------------------------------------------------------------------- the fault matrix's table
# Here rather than in tests/faults/conftest.py: with xdist, the controller loads this file whatever the arguments.

OUTCOMES: dict[tuple[str, str], str] = {}


def pytest_runtest_logreport(report):
    for key, value in report.user_properties:
        if key == "fault_outcome" and report.when == "call":
            condition, notebook, outcome = value
            OUTCOMES[(condition, notebook)] = outcome


def pytest_terminal_summary(terminalreporter):
    if not OUTCOMES:
        return
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "faults"))
    from conditions import ALL, CONDITIONS

    names = [c.name for c in CONDITIONS if any((c.name, nb) in OUTCOMES for nb in ALL)]
    width = max(len(n) for n in names)
    terminalreporter.write_sep("=", "fault matrix: condition x notebook")
    terminalreporter.write_line(" " * width + "  " + "  ".join(f"{nb:^9}" for nb in ALL))
    for name in names:
        cells = [OUTCOMES.get((name, nb), "-") for nb in ALL]
        terminalreporter.write_line(f"{name:<{width}}  " + "  ".join(f"{c:^9}" for c in cells))
    terminalreporter.write_line("completed: ran to the end, the affected cells skipped with a reason; stopped: one "
                                "sentence in the first cells; FAILED: neither (see above); -: not run here (the notebook "
                                "does not use what is missing, or the test was deselected or skipped)")


# --------------------------------------------------------------------------- the order of a run
# make test runs on two workers with --dist worksteal: each worker starts with half of the tests, and an idle one takes
# the second half of what is still queued for the other. With the collection order and --dist load, one worker ran
# the five largest notebooks one after another while the other sat idle for minutes (on 2 cores, without the legacy
# venv: 709 s, and 511 s in this order with worksteal).
# So the long tests go first, the longest first. The modules with a module-scoped fixture that starts processes
# (test_cli's `labkit run` over seven notebooks, the first torchrun launch) go before them: the head of a queue is
# never taken, so each fixture runs once. A module stays in one piece. Only the order depends on these lists.
LONG_MODULES = ["tests/unit/test_cli.py", "tests/scripts/test_torchrun_scripts.py", "tests/notebooks/test_notebooks.py",
                "tests/browser/test_site.py", "tests/notebooks/test_legacy.py", "tests/notebooks/test_server.py"]
LONG_NOTEBOOKS = ["04", "06", "05", "02", "07", "01", "03", "00"]  # make test's notebook runs, the longest first


def pytest_collection_modifyitems(items):
    def module_of(item):
        return item.nodeid.split("::")[0]

    def notebook_rank(item):
        if module_of(item) != "tests/notebooks/test_notebooks.py" or not hasattr(item, "callspec"):
            return len(LONG_NOTEBOOKS)
        name = Path(str(item.callspec.params.get("notebook", ""))).name[:2]
        return LONG_NOTEBOOKS.index(name) if name in LONG_NOTEBOOKS else len(LONG_NOTEBOOKS)

    first_seen = {}
    for i, item in enumerate(items):
        first_seen.setdefault(module_of(item), i)
    rank = {module: LONG_MODULES.index(module) if module in LONG_MODULES else len(LONG_MODULES) for module in first_seen}
    items.sort(key=lambda item: (rank[module_of(item)], first_seen[module_of(item)], notebook_rank(item)))
