"""labkit's modules import downward only: the core returns data, display shows it, the runner sits on top."""

import ast
import re
from pathlib import Path

LABKIT = Path(__file__).resolve().parents[2] / "labkit"
DISPLAY = {"widgets", "plots", "report"}
RUNNER = {"lab", "cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(LABKIT).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "__init__"


def imports() -> dict[str, set[str]]:
    """labkit module -> the labkit modules it imports (at top level or inside functions)."""
    graph = {}
    for path in sorted(LABKIT.rglob("*.py")):
        name = module_name(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("labkit"):
                base = node.module.removeprefix("labkit").lstrip(".")
                if base:
                    found.add(base)
                else:  # from labkit import probes, widgets
                    found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("labkit.") for a in node.names if a.name.startswith("labkit.")}
        graph[name] = {m for m in found if m != name and not m.startswith(name + ".")}
    return graph


def top(name: str) -> str:
    return name.split(".")[0]


def test_no_labkit_module_imports_in_a_cycle():
    graph = imports()
    graph.pop("__init__", None)  # its lazy attributes import on first use, never at import time

    def visit(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            visit(nxt, [*path, nxt])

    for start in graph:
        visit(start, [start])


def test_the_core_never_imports_display_or_runner_code():
    offenders = {name: sorted(m for m in deps if top(m) in DISPLAY | RUNNER)
                 for name, deps in imports().items()
                 if top(name) not in DISPLAY | RUNNER and name != "__init__"}
    assert not {k: v for k, v in offenders.items() if v}, "core modules import display or runner code"


PRIVATE = re.compile(r"\btorch\._(?!_)\w+|\._attn_implementation\b|\._from_config\b|\bkineto_results\b|"
                     r"\._showtraceback\b")


def test_only_compat_touches_private_torch_transformers_or_ipython_names():
    root = LABKIT.parent
    for path in [*LABKIT.rglob("*.py"), *(root / "notebooks" / "src").rglob("*.py")]:
        if path.name == "compat.py" or "legacy" in path.parts:  # the legacy track runs transformers 4.48 on purpose
            continue
        found = sorted({m.group(0) for m in PRIVATE.finditer(path.read_text())})
        assert not found, f"{path.relative_to(root)} uses {found}: go through labkit/compat.py"


def test_one_html_table_builder_and_one_reader_per_schema():
    """widgets.html_table builds every HTML table; results.read_results reads results files, report.read_summary
    reads summary.json: no second copy elsewhere in labkit."""
    builders = sorted(str(p.relative_to(LABKIT)) for p in LABKIT.rglob("*.py")
                      if "<table" in p.read_text() and p.name != "widgets.py")
    assert not builders, f"{builders} build HTML tables: use labkit.widgets.html_table"
    readers = sorted(str(p.relative_to(LABKIT)) for p in LABKIT.rglob("*.py")
                     if re.search(r"json\.loads?\(.*(results|summary)", p.read_text())
                     and p.name not in ("results.py", "report.py"))
    assert not readers, f"{readers} parse results or summary files: use results.read_results / report.read_summary"


# Topic modules that still import another topic: none (issue 27 moved what they shared into the core: footprint
# counting to labkit.footprint, public models' shapes to labkit.models, the torchrun launcher to labkit.launcher).
PENDING: set[tuple[str, str]] = set()


def test_no_topic_module_imports_another():
    from labkit import registry

    topics = {n.topic for n in registry.NOTEBOOKS}
    found = {(name, top(m)) for name, deps in imports().items() if name in topics for m in deps if top(m) in topics}
    assert found == PENDING, f"topic modules importing topics: {sorted(found - PENDING)}; resolved: " \
                             f"{sorted(PENDING - found)} (take them out of PENDING)"
