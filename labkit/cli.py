"""The ``labkit`` command: ``labkit probe``, ``labkit prepare``, ``labkit run``, ``labkit compare``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from labkit.errors import BadParameter, LabkitError


def notebooks_dir() -> Path:
    """The workbook's notebooks: ./notebooks when run from the repository, else beside the package."""
    here = Path.cwd() / "notebooks"
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "notebooks"


def find_notebooks(selection: str | None, folder: Path) -> list[Path]:
    """The sequenced notebooks (NN_topic.ipynb) in order, optionally only the numbers in ``selection``."""
    every = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not selection:
        return every
    wanted = [s.strip() for s in selection.split(",") if s.strip()]
    chosen = []
    for item in wanted:
        matches = [p for p in every if p.name.startswith(item.zfill(2) + "_") or p.stem == item]
        if not matches:
            raise BadParameter(f"no notebook {item!r} in {folder}; there are: {', '.join(p.stem for p in every)}.")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def parse_parameters(pairs: Sequence[str]) -> dict[str, Any]:
    """``name=value`` pairs; values are read as YAML (numbers, true/false, lists), else kept as text."""
    import yaml

    parameters = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip().isidentifier():
            raise BadParameter(f"-p {pair!r}: write parameters as name=value.")
        parameters[name.strip()] = yaml.safe_load(value) if value.strip() else ""
    return parameters


def declared_parameters(notebook: Path) -> dict[str, Any]:
    """The names (and defaults, as text) in a notebook's ``parameters`` cell."""
    import papermill

    return {name: info.get("default") for name, info in papermill.inspect_notebook(str(notebook)).items()}


def run_notebooks(notebooks: list[Path], out: Path, parameters: dict[str, Any], *, quick: bool,
                  cell_timeout: int | None = None, log=print) -> dict[str, Any]:
    """Execute ``notebooks`` in order with papermill; one failure is recorded and the others still run."""
    import papermill

    declared = {nb: declared_parameters(nb) for nb in notebooks}
    known = set().union(*declared.values()) if declared else set()
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise BadParameter(f"unknown parameter(s) {', '.join(unknown)}; the notebooks declare: {', '.join(sorted(known))}.")
    out = out.resolve()  # the kernel runs in the notebooks' folder, so paths handed to it must be absolute
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": quick, "notebooks": {}}
    for index, notebook in enumerate(notebooks, 1):
        results_path = out / f"{notebook.stem}.results.json"
        given = {"quick": quick, "results_path": str(results_path), **parameters}
        applied = {k: v for k, v in given.items() if k in declared[notebook]}
        log(f"[{index}/{len(notebooks)}] {notebook.name} ...")
        start = time.perf_counter()
        entry: dict[str, Any] = {"parameters": applied}
        try:
            papermill.execute_notebook(str(notebook), str(out / notebook.name), parameters=applied,
                                       kernel_name="python3", cwd=str(notebook.parent), progress_bar=False,
                                       execution_timeout=cell_timeout)
            entry["status"] = "ok"
        except Exception as err:  # recorded, and the next notebook still runs
            entry["status"] = "failed"
            entry["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        entry["duration_s"] = round(time.perf_counter() - start, 1)
        if results_path.exists():
            from labkit.results import read_results

            data = read_results(results_path)
            entry.update({k: data[k] for k in ("metrics", "checks", "skipped")})
            if not all(data["checks"].values()):
                entry["status"] = "failed"
                entry["error"] = "checks failed: " + ", ".join(k for k, v in data["checks"].items() if not v)
        elif entry["status"] == "ok" and "results_path" in declared[notebook]:
            entry["status"] = "failed"
            entry["error"] = f"the notebook wrote no results file at {results_path}"
        summary["notebooks"][notebook.stem] = entry
        log(f"      {entry['status']} in {entry['duration_s']} s" + (f": {entry['error']}" if "error" in entry else ""))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _cmd_probe(args: argparse.Namespace) -> int:
    from labkit import probes

    report = probes.probe()
    print(json.dumps(report, indent=2, default=str) if args.json else probes.format_report(report))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from labkit import models

    for name, folder in models.prepare_embedded().items():
        print(f"{name}: ready in {folder}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from labkit import probes

    folder = Path(args.dir) if args.dir else notebooks_dir()
    notebooks = find_notebooks(args.notebooks, folder)
    parameters = parse_parameters(args.parameter or [])
    if args.parameters:
        import yaml

        parameters = {**(yaml.safe_load(Path(args.parameters).read_text()) or {}), **parameters}
    if args.quick is None:
        has_gpu = bool(probes.devices()["cuda"])
        quick = not has_gpu
        why = "a CUDA GPU was found, so full sizes" if has_gpu else "no CUDA GPU found, so quick sizes (--full for full sizes)"
    else:
        quick = args.quick
        why = "quick sizes (asked for)" if quick else "full sizes (asked for)"
    out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    print(f"labkit run: {why}; {len(notebooks)} notebook(s) into {out}/")
    summary = run_notebooks(notebooks, out, parameters, quick=quick, cell_timeout=args.cell_timeout)
    failed = [name for name, entry in summary["notebooks"].items() if entry["status"] != "ok"]
    print(f"done: {len(notebooks) - len(failed)} ok, {len(failed)} failed; summary in {out / 'summary.json'}")
    return 1 if failed else 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from labkit import results
    from labkit.widgets import text_table

    run_a, run_b = results.load_run(args.run_a), results.load_run(args.run_b)
    rows = results.compare(run_a, run_b, only=args.only or "")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"the two runs share no metrics{' matching ' + repr(args.only) if args.only else ''} "
              f"(notebooks: {', '.join(sorted(run_a))} and {', '.join(sorted(run_b))})")
        return 1
    print(f"a: {args.run_a} ({results.run_label(run_a)})")
    print(f"b: {args.run_b} ({results.run_label(run_b)})")
    print(text_table(rows, ["notebook", "metric", "a", "b", "b / a"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labkit", description="Helpers for the efficient inference workbook.")
    commands = parser.add_subparsers(dest="command", required=True)
    probe = commands.add_parser("probe", help="what this machine can do (versions, devices, SDPA backends, ...)")
    probe.add_argument("--json", action="store_true", help="print the report as JSON")
    probe.set_defaults(func=_cmd_probe)
    prepare = commands.add_parser("prepare", help="make the embedded models ready to load offline")
    prepare.set_defaults(func=_cmd_prepare)
    run = commands.add_parser("run", help="execute the notebooks with papermill into a run folder")
    run.add_argument("--notebooks", help="comma-separated numbers, e.g. 00,01 (default: all)")
    size = run.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="quick", action="store_true", default=None, help="small sizes")
    size.add_argument("--full", dest="quick", action="store_false", help="full sizes")
    run.add_argument("-p", "--parameter", action="append", metavar="NAME=VALUE", help="a notebook parameter")
    run.add_argument("--parameters", metavar="FILE.yaml", help="parameters from a YAML file")
    run.add_argument("--out", help="run folder (default runs/<timestamp>)")
    run.add_argument("--dir", help="folder holding the notebooks (default ./notebooks)")
    run.add_argument("--cell-timeout", type=int, default=None, help="seconds a single cell may run")
    run.set_defaults(func=_cmd_run)
    compare = commands.add_parser("compare", help="the metrics two runs share, with ratios (before/after, mine/reference)")
    compare.add_argument("run_a", help="a run folder, a reference/<device> folder or a results file")
    compare.add_argument("run_b", help="the same, to compare with the first")
    compare.add_argument("--only", help="only metrics whose name contains this text")
    compare.add_argument("--json", action="store_true", help="print the rows as JSON")
    compare.set_defaults(func=_cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LabkitError as err:
        print(f"labkit: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
