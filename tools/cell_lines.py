"""Counts what a notebook's code cells are made of: lesson code, labkit calls, harness, display.

    python tools/cell_lines.py [notebooks/src/NN_name.py ...]

Every non-blank, non-comment line of a code cell (the parameters and install-if-missing cells left out) belongs to
one statement; a statement's lines count in one kind, decided by the statement's own text (a compound statement by its
header line, its body statement by statement):

- display: a statement that starts with ``show(``, ``print(``, ``display(`` or draws (``plots.``, ``plt.``, ``ax.``,
  ``fig``), and ``lab.figure``;
- harness: recording and guarding: ``lab.`` calls that record, skip, bind exercises or finish (``lab.check``,
  ``lab.table``, ``lab.metric``, ``lab.record``, ``lab.add``, ``lab.skip``, ``lab.exercise``, ``lab.finish``), an
  exercise's ``ex.`` calls, ``try``/``except`` headers, and ``if``/``else`` headers that test what this machine can do
  (``lab.``, ``skip``, ``problem``, ``on_gpu``, ``server``, ``None``);
- labkit: any other statement that calls a labkit module (``attention.measure(...)``, ``models.load_model(...)``);
- lesson: the rest: torch and transformers calls, the loops, the formulas, pandas.

The lesson share is what a learner reads as the experiment itself.
"""

from __future__ import annotations

import ast
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# labkit and every module of it (a cell calls them as ``quant.x`` after ``from labkit import quant``), but for
# labkit.lab, whose object ``lab`` the cells use (its calls are told apart below)
LABKIT_MODULES = ("labkit", *sorted(p.stem for p in (ROOT / "labkit").glob("*.py")
                                    if p.stem not in ("__init__", "lab")),
                  *sorted(p.parent.name for p in (ROOT / "labkit").glob("*/__init__.py")))
CALLS_LABKIT = re.compile(rf"\b({'|'.join(LABKIT_MODULES)})\.\w+")
DISPLAY = re.compile(r"^(show|print|display)\(|\b(plots|plt|ax|axes)\.|^fig\b|\bfig\.|lab\.figure\(")
HARNESS = re.compile(r"^(\w+ = )?(lab\.(check|table|metric|record|add|skip|exercise|finish)\(|ex\.\w+\()")
GUARD = re.compile(r"\blab\.|skip|problem|on_gpu|server|None")
KINDS = ("lesson", "labkit", "harness", "display")


def kind_of(text: str, header: bool = False) -> str:
    text = text.strip()
    if header:
        if text.startswith(("try", "except", "finally")):
            return "harness"
        if text.startswith(("if ", "elif ", "else")) and GUARD.search(text):
            return "harness"
        return "labkit" if CALLS_LABKIT.search(text) else "lesson"
    if DISPLAY.search(text):
        return "display"
    if HARNESS.search(text):
        return "harness"
    return "labkit" if CALLS_LABKIT.search(text) else "lesson"


def count_cell(source: str) -> Counter:
    lines = source.splitlines()
    tree = compile(source, "<cell>", "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    counts: Counter = Counter()

    def code_lines(first: int, last: int) -> int:
        return sum(1 for i in range(first, last + 1)
                   if lines[i - 1].strip() and not lines[i - 1].strip().startswith("#"))

    def visit(statements) -> None:
        for node in statements:
            bodies = [b for b in ("body", "orelse", "finalbody", "handlers") if getattr(node, b, None)]
            if not bodies or isinstance(node, ast.Lambda):
                counts[kind_of(ast.get_source_segment(source, node) or "")] += code_lines(node.lineno, node.end_lineno)
                continue
            children = [c for b in bodies for c in getattr(node, b)]
            first_child = min(c.lineno for c in children)
            counts[kind_of(lines[node.lineno - 1], header=True)] += code_lines(node.lineno, first_child - 1)
            for child in children:
                if isinstance(child, ast.ExceptHandler):
                    counts["harness"] += 1
                    visit(child.body)
                else:
                    visit([child])
            orelse = getattr(node, "orelse", None)
            if orelse and not (isinstance(node, ast.If) and isinstance(orelse[0], ast.If) and len(orelse) == 1
                               and lines[orelse[0].lineno - 1].strip().startswith("elif")):
                counts[kind_of(lines[node.lineno - 1], header=True)] += 1  # the else: line, as its header

    visit(tree.body)
    return counts


def cells(path: Path) -> list[str]:
    text = path.read_text()
    parts = re.split(r"^# %%.*$", text, flags=re.M)
    headers = re.findall(r"^# %%.*$", text, flags=re.M)
    return [body for header, body in zip(headers, parts[1:], strict=True)
            if "[markdown]" not in header and "parameters" not in header and "install-if-missing" not in header]


def count(path: Path) -> Counter:
    total: Counter = Counter()
    for body in cells(path):
        total += count_cell(body.strip("\n"))
    return total


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted((ROOT / "notebooks" / "src").glob("[0-9][0-9]_*.py"))
    grand: Counter = Counter()
    print(f"{'notebook':<32}{'lines':>6}" + "".join(f"{k:>9}" for k in KINDS) + f"{'lesson %':>10}")
    for path in paths:
        counts = count(path)
        grand += counts
        n = sum(counts.values())
        print(f"{path.stem:<32}{n:>6}" + "".join(f"{counts[k]:>9}" for k in KINDS)
              + f"{100 * counts['lesson'] / max(n, 1):>9.0f}%")
    n = sum(grand.values())
    print(f"{'all':<32}{n:>6}" + "".join(f"{grand[k]:>9}" for k in KINDS)
          + f"{100 * grand['lesson'] / max(n, 1):>9.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
