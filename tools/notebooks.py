"""The notebooks' text sources and the .ipynb files built from them.

Each notebook is written as a jupytext percent-format Python file under ``notebooks/src/`` (``# %%`` starts a code
cell, ``# %% [markdown]`` a markdown cell, ``# %% tags=["parameters"]`` a tagged one). That file is what a
contributor edits and a reviewer reads; the ``.ipynb`` beside the other notebooks is built from it, without outputs,
with cell ids that depend only on the text, so that building twice gives the same bytes.

    python tools/notebooks.py build              # notebooks/src/**.py -> notebooks/**.ipynb   (make notebooks)
    python tools/notebooks.py check              # exit 1, naming the files, when a .ipynb differs from its source
    python tools/notebooks.py from-ipynb NB...   # after editing a notebook in JupyterLab: write its text back
    python tools/notebooks.py workshop           # notebooks/WORKSHOP.md's list of the checkers' messages, rewritten

Why percent-format Python and not MyST Markdown: ruff lints it like any module (undefined names matter here, because
the GPU branches never run on the CPU tests), editors and diffs treat it as code, and jupytext keeps cell tags.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SOURCES = NOTEBOOKS / "src"
FORMAT = "py:percent"
DEFAULT_KERNEL = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
# The text keeps only the kernel (the legacy notebook runs in its own); jupytext's version would change every release.
TEXT_METADATA_FILTER = "kernelspec,-all"


def sources() -> list[Path]:
    """Every notebook's text source."""
    return sorted(SOURCES.rglob("*.py"))


def target(source: Path) -> Path:
    """The .ipynb built from ``source``: notebooks/src/a/b.py -> notebooks/a/b.ipynb."""
    return NOTEBOOKS / source.relative_to(SOURCES).with_suffix(".ipynb")


def source_of(notebook: Path) -> Path:
    return SOURCES / notebook.resolve().relative_to(NOTEBOOKS).with_suffix(".py")


def _cell_id(cell, seen: dict[str, int]) -> str:
    """An id from the cell's kind and first line: editing a cell's body or inserting a cell elsewhere keeps it."""
    first = next((line.strip() for line in cell.source.splitlines() if line.strip()), "")
    key = f"{cell.cell_type}:{first}"
    seen[key] = seen.get(key, 0) + 1
    digest = hashlib.sha1(f"{key}#{seen[key]}".encode()).hexdigest()[:8]
    words = re.sub(r"[^a-z0-9]+", "-", first.lower()).strip("-")[:24].strip("-")
    return f"{words}-{digest}" if words else digest


def build_notebook(source: Path) -> str:
    """The .ipynb text for ``source``: no outputs, no execution counts, stable ids."""
    nb = jupytext.read(source, fmt=FORMAT)
    seen: dict[str, int] = {}
    cells = []
    for cell in nb.cells:
        metadata = {k: v for k, v in cell.metadata.items() if k == "tags"}
        if cell.cell_type == "code":
            new = nbformat.v4.new_code_cell(cell.source, metadata=metadata)
        elif cell.cell_type == "markdown":
            new = nbformat.v4.new_markdown_cell(cell.source, metadata=metadata)
        else:
            new = nbformat.v4.new_raw_cell(cell.source, metadata=metadata)
        new.id = _cell_id(new, seen)
        cells.append(new)
    out = nbformat.v4.new_notebook(cells=cells)
    out.nbformat, out.nbformat_minor = 4, 5
    out.metadata = {"kernelspec": dict(nb.metadata.get("kernelspec") or DEFAULT_KERNEL),
                    "language_info": {"name": "python"}}
    nbformat.validate(out)
    return nbformat.writes(out, version=4) + "\n"


def text_of(notebook: Path) -> str:
    """The percent-format text of an .ipynb (its outputs dropped)."""
    nb = jupytext.read(notebook)
    nb.metadata.setdefault("jupytext", {})["notebook_metadata_filter"] = TEXT_METADATA_FILTER
    nb.metadata["jupytext"]["cell_metadata_filter"] = "tags,-all"
    return jupytext.writes(nb, fmt=FORMAT)


def drift() -> list[str]:
    """Notebooks whose .ipynb is not what their source builds, and .ipynb files that have no source."""
    problems = [f"{target(s).relative_to(ROOT)} differs from {s.relative_to(ROOT)}"
                for s in sources() if not target(s).exists() or target(s).read_text() != build_notebook(s)]
    built = {target(s) for s in sources()}
    problems += [f"{nb.relative_to(ROOT)} has no text source under notebooks/src/"
                 for nb in sorted(NOTEBOOKS.rglob("*.ipynb"))
                 if nb not in built and ".ipynb_checkpoints" not in nb.parts and SOURCES not in nb.parents]
    return problems


WORKSHOP = NOTEBOOKS / "WORKSHOP.md"
MISTAKES_START = "<!-- mistakes: written by `python tools/notebooks.py workshop` -->\n"
MISTAKES_END = "<!-- end of mistakes -->\n"


def workshop_text() -> str:
    """WORKSHOP.md with its list of typical mistakes and their messages taken from the exercise checkers."""
    from labkit import exercises

    text = WORKSHOP.read_text()
    start, end = text.index(MISTAKES_START) + len(MISTAKES_START), text.index(MISTAKES_END)
    return text[:start] + exercises.mistakes_markdown() + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="write every notebooks/**.ipynb from its text source")
    sub.add_parser("check", help="fail when a .ipynb differs from what its source builds")
    sub.add_parser("workshop", help="rewrite WORKSHOP.md's list of the checkers' messages")
    back = sub.add_parser("from-ipynb", help="write the text source of notebooks edited in JupyterLab")
    back.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command == "build":
        for source in sources():
            text = build_notebook(source)
            if not target(source).exists() or target(source).read_text() != text:
                target(source).parent.mkdir(parents=True, exist_ok=True)
                target(source).write_text(text)
                print(f"built {target(source).relative_to(ROOT)}")
        return 0
    if args.command == "check":
        problems = drift()
        for problem in problems:
            print(problem)
        if problems:
            print("Edit the text under notebooks/src/ and run `make notebooks` (or, after editing an .ipynb in "
                  "JupyterLab, `python tools/notebooks.py from-ipynb NOTEBOOK` first).")
        return 1 if problems else 0
    if args.command == "workshop":
        WORKSHOP.write_text(workshop_text())
        print(f"wrote {WORKSHOP.relative_to(ROOT)}")
        return 0
    for notebook in args.notebooks:
        source = source_of(notebook)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(text_of(notebook))
        print(f"wrote {source.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
