"""The workbook as a static website: every notebook with the outputs of one run, and the stored GPU runs beside them.

    python tools/site.py RUN_FOLDER [--out build/site]      # make site RUN=runs/<timestamp>

RUN_FOLDER is what ``labkit run`` wrote (``NN_name.ipynb`` executed, ``NN_name.results.json``, ``summary.json``).
Nothing is executed here and nothing is fetched: the pages show the run's own outputs, each page says which machine
and which sizes they came from, and its last section shows the tables and figures of every stored run under
``reference/<device>/`` (read from their files), with the partial GPU runs as pages of their own.

Why Sphinx with myst-nb and sphinx-book-theme (the stack Jupyter Book 1 is built on) rather than Jupyter Book 2: Jupyter
Book 2 (MyST) fetches its site theme over the internet when it builds, and these machines, like a class machine
behind a firewall, have only the package registries; the Sphinx stack installs from PyPI and builds offline.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # labkit from this checkout, as the notebooks use it

from labkit import results  # noqa: E402

CONF = ROOT / "site" / "conf.py"
# Outputs that need a live kernel or a script from the internet (ipywidgets' views): their text form is kept.
LIVE_ONLY = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")


def machine_of(run: Path, notebook: str) -> str:
    """One sentence: the machine, the versions and the sizes a notebook's outputs in ``run`` came from."""
    data = results.read_results(run / f"{notebook}.results.json")
    versions = data.get("env", {}).get("versions", {})
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    sizes = {True: "quick sizes", False: "full sizes"}.get(summary.get("quick"), "sizes not recorded")
    return (f"{results.run_label({notebook: data})}; torch {versions.get('torch', '?')}, transformers "
            f"{versions.get('transformers', '?')}; {sizes}; run {data.get('env', {}).get('time', '?')[:10]}")


def cell_with_outputs(outputs: list[dict]) -> nbformat.NotebookNode:
    """A code cell that shows ``outputs`` and no code (the site is built without executing anything)."""
    # (myst-nb leaves out a code cell with no source, outputs and all; the input is hidden anyway)
    cell = nbformat.v4.new_code_cell("# read from reference/ when the site was built",
                                     metadata={"tags": ["remove-input"]})
    cell.outputs = [nbformat.from_dict(o) for o in outputs]
    return cell


def reference_cells(notebook: str) -> list[nbformat.NotebookNode]:
    """The stored GPU runs of ``notebook``: a heading, the machine, each table and each figure, read from files."""
    runs = results.reference_runs(notebook)
    partial = sorted(ROOT.glob(f"reference/*/partial-{notebook}.ipynb"))
    cells = [nbformat.v4.new_markdown_cell(
        "## Stored GPU runs\n\nWhat this notebook measured on the GPUs of `reference/` (their files are read when the "
        "site is built; nothing here is typed).")]
    if not runs and not partial:
        cells.append(nbformat.v4.new_markdown_cell("No GPU run of this notebook is stored yet."))
    for device, run in runs.items():
        checks = run.get("checks", {})
        cells.append(nbformat.v4.new_markdown_cell(
            f"### {results.run_label({notebook: run})} (`reference/{device}/`)\n\n"
            f"torch {run.get('env', {}).get('versions', {}).get('torch', '?')}, run "
            f"{run.get('env', {}).get('time', '?')[:10]}; {sum(map(bool, checks.values()))} of {len(checks)} checks "
            "true."))
        outputs = []  # the figures first; each table folded, as it is often long
        for figure in run.get("figures", []):
            path = ROOT / "reference" / device / figure
            if path.exists():
                outputs.append({"output_type": "display_data", "metadata": {},
                                "data": {"image/png": base64.b64encode(path.read_bytes()).decode(),
                                         "text/plain": figure}})
        for name in run.get("tables", {}):
            frame = results.table(run, name)
            folded = (f"<details><summary>table <b>{name}</b> ({len(frame)} rows)</summary>"
                      f"{frame.to_html(index=False, float_format=lambda v: f'{v:.4g}')}</details>")
            outputs.append({"output_type": "display_data", "metadata": {},
                            "data": {"text/html": folded, "text/plain": f"table {name}"}})
        cells.append(cell_with_outputs(outputs))
    for path in partial:
        cells.append(nbformat.v4.new_markdown_cell(
            f"A partial run on `{path.parent.name}` is stored, as far as it ran: "
            f"[{path.stem}](reference-{path.parent.name}-{path.stem}.ipynb)."))
    return cells


def page(executed: Path, run: Path) -> nbformat.NotebookNode:
    """An executed notebook as a page: the machine after its title, its outputs, then the stored GPU runs."""
    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if any(kind in output.get("data", {}) for kind in LIVE_ONLY):
                output["data"] = {k: v for k, v in output["data"].items() if k not in LIVE_ONLY} or {
                    "text/plain": "(an interactive widget: run the notebook in JupyterLab to use it)"}
    nb.metadata.pop("widgets", None)
    say_after_title(nb, f"The outputs on this page come from one run of this notebook on: "
                        f"**{machine_of(run, executed.stem)}**. The stored GPU runs are at the end of the page.")
    nb.cells += reference_cells(executed.stem)
    return nb


def say_after_title(nb: nbformat.NotebookNode, text: str) -> None:
    """Put ``text`` in a note box right under the notebook's title (the first line of its first markdown cell)."""
    cell = next(c for c in nb.cells if c.cell_type == "markdown")
    title, _, rest = cell.source.partition("\n")
    cell.source = f"{title}\n\n```{{note}}\n{text}\n```\n{rest}"


def stored_page(path: Path, why: str) -> nbformat.NotebookNode:
    """A notebook as stored (no outputs), with one line saying why this site shows no outputs for it."""
    nb = nbformat.read(path, as_version=4)
    say_after_title(nb, why)
    if path.parent.name == "notebooks":  # a sequenced notebook: its stored GPU runs still show
        nb.cells += reference_cells(path.stem)
    return nb


def index(notebooks: list[Path], partial: list[Path], legacy: list[str]) -> str:
    readme = (ROOT / "README.md").read_text().split("\n## ")[0]  # the README's title and opening
    lines = [readme.strip(), "", "```{toctree}", ":maxdepth: 1", ":caption: Notebooks", "",
             *[nb.stem for nb in notebooks], "```", ""]
    if legacy:
        lines += ["```{toctree}", ":maxdepth: 1", ":caption: The legacy track", "", *legacy, "```", ""]
    if partial:
        lines += ["```{toctree}", ":maxdepth: 1", ":caption: Partial GPU runs, as stored", "",
                  *[f"reference-{p.parent.name}-{p.stem}" for p in partial], "```", ""]
    return "\n".join(lines)


def build(run: Path, out: Path) -> Path:
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    executed = [nb.name for nb in notebooks if (run / nb.name).exists()]
    if not executed:
        sys.exit(f"site: {run} holds no executed notebook; make a run with `make run` (or `labkit run --out DIR`).")
    failed = [name for name in executed if not (run / name).with_suffix(".results.json").exists()]
    if failed:
        sys.exit(f"site: {', '.join(failed)} in {run} wrote no results file (the run failed there): rerun it.")
    source = out.parent / f"{out.name}-source"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for name in ("conf.py", "favicon.svg"):
        shutil.copy(CONF.parent / name, source / name)
    for stored in notebooks:
        nbformat.write(page(run / stored.name, run) if stored.name in executed else stored_page(
            stored, "This site's run did not include this notebook: the page shows it without outputs, and the "
            "stored GPU runs at its end."),
            source / stored.name)
    partial = sorted(ROOT.glob("reference/*/partial-*.ipynb"))
    for path in partial:
        nb = copy.deepcopy(nbformat.read(path, as_version=4))
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(
            f"# {path.stem} (`reference/{path.parent.name}/`)\n\n```{{note}}\nA run on "
            f"{path.parent.name} that stopped before the end (reference/README.md says why); its outputs as stored."
            "\n```"))
        nbformat.write(nb, source / f"reference-{path.parent.name}-{path.stem}.ipynb")
    legacy = []  # the legacy track: executed where the run holds it (labkit run --notebooks legacy), else as stored
    for stored in sorted((ROOT / "notebooks" / "legacy").glob("*.ipynb")):
        ran = run / stored.name
        nb = page(ran, run) if ran.exists() else stored_page(stored, (
            "This page shows the notebook without outputs: it runs in a kernel of its own, with the source page's old "
            "versions (`make legacy`), and this site's run did not include it."))
        (source / "legacy").mkdir(exist_ok=True)
        nbformat.write(nb, source / "legacy" / stored.name)
        legacy.append(f"legacy/{stored.stem}")
    (source / "index.md").write_text(index(notebooks, partial, legacy))
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-q", "-W", "--keep-going", "-j", "1",
                    str(source), str(out)], check=True)
    return out / "index.html"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder from `labkit run`")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "site")
    args = parser.parse_args(argv)
    print(f"site: {build(args.run.resolve(), args.out.resolve())}")


if __name__ == "__main__":
    main()
