"""The ``labkit`` command: ``labkit probe``, ``prepare``, ``run``, ``progress``, ``report`` and ``compare``."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from labkit import results
from labkit.errors import BadParameter, LabkitError

# Each command imports the rest of what it needs when it runs: papermill, nbformat and jupyter_client take about a
# second to import, and torch (under labkit's probes, report, models and exercises) a few more, which
# `labkit --help` and a mistyped command should not wait for.


def find_notebooks(selection: str | None, folder: Path) -> list[Path]:
    """The sequenced notebooks (NN_topic.ipynb) in order, optionally only those in ``selection``: numbers, stems,
    or ``legacy`` for the legacy track (folder/legacy/*.ipynb, each in its own kernel, never run by default)."""
    every = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    legacy = sorted((folder / "legacy").glob("*.ipynb"))
    chosen: list[Path] = []
    for item in filter(None, (s.strip() for s in (selection or "").split(","))):
        matches = legacy if item == "legacy" else [
            p for p in every + legacy if p.name.startswith(item.zfill(2) + "_") or p.stem == item]
        if not matches:
            names = ", ".join([p.stem for p in every] + (["legacy"] if legacy else []))
            raise BadParameter(f"no notebook {item!r} in {folder}; there are: {names}.")
        chosen += [m for m in matches if m not in chosen]
    return chosen if selection else every


def kernel_of(notebook: Path) -> str:
    """The kernel a notebook asks for in its metadata (python3 when it names none)."""
    try:
        spec = json.loads(notebook.read_text()).get("metadata", {}).get("kernelspec") or {}
    except (OSError, ValueError):
        return "python3"
    return spec.get("name") or "python3"


def missing_kernels(notebooks: list[Path]) -> dict[str, str]:
    """Notebooks whose kernel is not installed here -> one sentence saying how to get it."""
    from jupyter_client.kernelspec import KernelSpecManager

    installed = set(KernelSpecManager().find_kernel_specs()) | {"python3"}
    hints = {"labkit-legacy": "`make legacy` builds it"}
    return {nb.stem: f"its kernel {kernel_of(nb)!r} is not installed ({hints.get(kernel_of(nb), 'install it first')})"
            for nb in notebooks if kernel_of(nb) not in installed}


def parse_parameters(pairs: Sequence[str]) -> dict[str, Any]:
    """``name=value`` pairs; values are read as YAML (numbers, true/false, lists), else kept as text."""
    parameters = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip().isidentifier():
            raise BadParameter(f"-p {pair!r}: write parameters as name=value.")
        try:
            parameters[name.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise BadParameter(f"-p {pair!r}: the value is not valid YAML (quote text, close lists).") from None
    if "results_path" in parameters:
        raise BadParameter("-p results_path: labkit run sets it for each notebook; use --out for the run folder.")
    return parameters


def read_parameters_file(path: Path) -> dict[str, Any]:
    """Parameters from a YAML file: a mapping of names to plain values, read as data (never evaluated)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError:
        raise BadParameter(f"--parameters {path}: no such file.") from None
    except yaml.YAMLError as error:
        raise BadParameter(f"--parameters {path} is not valid YAML ({str(error).splitlines()[0]}).") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and k.isidentifier() for k in data):
        raise BadParameter(f"--parameters {path} must map parameter names to values, like 'quick: true'.")
    odd = [k for k, v in data.items() if not isinstance(v, (str, int, float, bool, list, type(None)))]
    if odd:
        raise BadParameter(f"--parameters {path}: {', '.join(odd)} must be a number, text, true/false or a list.")
    return data


def declared_parameters(notebook: Path) -> dict[str, Any]:
    """The names (and defaults, as text) in a notebook's ``parameters`` cell."""
    import papermill

    return {name: info.get("default") for name, info in papermill.inspect_notebook(str(notebook)).items()}


NOTEBOOK_TIMEOUT_S = 3600


def execute_one(notebook: Path, executed: Path, parameters: dict[str, Any], *, timeout_s: float,
                cell_timeout: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Execute one notebook with papermill in its own process group, so that a timeout stops it and its kernel."""
    command = [sys.executable, "-m", "papermill", str(notebook), str(executed), "-k", kernel_of(notebook),
               "--cwd", str(notebook.parent), "-y", yaml.safe_dump(parameters),
               "--progress-bar" if progress else "--no-progress-bar", "--log-level", "ERROR"]
    if cell_timeout:
        command += ["--execution-timeout", str(cell_timeout)]
    log = executed.with_suffix(".log")
    start = time.perf_counter()
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=None if progress else stderr,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_tree(process)
            return {"status": "timed out", "duration_s": round(time.perf_counter() - start, 1),
                    "error": f"stopped after {timeout_s:.0f} s (the per-notebook timeout); "
                             f"the cells that ran are in {executed.name}"}
        except BaseException:  # Ctrl-C: papermill runs in its own session and would not hear it
            _stop_tree(process)
            raise
    entry: dict[str, Any] = {"status": "ok" if code == 0 else "failed",
                             "duration_s": round(time.perf_counter() - start, 1)}
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    if code != 0:
        import nbformat

        try:
            cells = nbformat.read(str(executed), as_version=4).cells
        except Exception:  # no notebook, or a half-written one: no error to read from it
            cells = []
        shown = [f"In [{cell.get('execution_count')}]: {output.get('ename')}: {output.get('evalue')}".strip()
                 for cell in cells for output in cell.get("outputs", []) if output.get("output_type") == "error"]
        # the first error the notebook shows, numbered as it numbers its cells ("In [5]: NameError: ...")
        entry["error"] = shown[0] if shown else lines[-1] if lines else f"papermill exited with status {code}"
    if not lines:
        log.unlink()
    return entry


def _stop_tree(process) -> None:
    """Stop papermill, its kernel and whatever the kernel started (each may sit in its own session)."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):  # papermill may be gone already
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    process.kill()
    process.wait()


def run_notebooks(notebooks: list[Path], out: Path, parameters: dict[str, Any], *, quick: bool,
                  cell_timeout: int | None = None, timeout_s: float = NOTEBOOK_TIMEOUT_S, progress: bool = False,
                  probe: bool = True, log=print) -> dict[str, Any]:
    """Execute ``notebooks`` in order with papermill; a failure or a timeout is recorded and the others still run.

    Writes ``summary.json`` (schema in labkit.report) and ``report.html`` into ``out``.
    """
    from tqdm.auto import tqdm

    from labkit import probes, report

    parameters = dict(parameters)
    quick = parameters.pop("quick", quick)  # -p quick=... decides the sizes, and the summary says so
    if not isinstance(quick, bool):
        raise BadParameter(f"-p quick={quick!r}: use true or false (or --quick / --full).")
    declared = {nb: declared_parameters(nb) for nb in notebooks}
    known = set().union(*declared.values())
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise BadParameter(f"unknown parameter(s) {', '.join(unknown)}; "
                           f"the notebooks declare: {', '.join(sorted(known))}.")
    out = out.resolve()  # the kernel runs in the notebooks' folder, so paths handed to it must be absolute
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"schema": report.SCHEMA, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "finished": "", "quick": quick, "machine": {"env": probes.environment()},
                               "notebooks": {}}
    if probe:
        try:  # the machine probe for the report; a failure there must not stop the run
            summary["machine"]["probe"] = json.loads(json.dumps(probes.probe(), default=str))
        except Exception as error:  # recorded in the report instead of the kernel matrix
            summary["machine"]["probe"] = {"error": f"{type(error).__name__}: {error}"}
    say = tqdm.write if progress else log  # lines that do not break the progress bar
    bar = tqdm(notebooks, desc="notebooks", unit="notebook", disable=not progress)
    for number, notebook in enumerate(bar, 1):
        bar.set_postfix_str(notebook.stem)
        results_path = out / f"{notebook.stem}.results.json"
        results_path.unlink(missing_ok=True)  # a file from an earlier run in the same folder is not this run's
        given = {"quick": quick, "results_path": str(results_path), **parameters}
        applied = {k: v for k, v in given.items() if k in declared[notebook]}
        say(f"[{number}/{len(notebooks)}] {notebook.name} ...")
        entry = {"parameters": applied, **execute_one(notebook, out / notebook.name, applied, timeout_s=timeout_s,
                                                     cell_timeout=cell_timeout, progress=progress)}
        try:
            data = results.read_results(results_path) if results_path.exists() else {}
        except BadParameter as error:  # recorded; the other notebooks still run
            data = {}
            entry.update(status="failed", error=str(error))
        # the results file's record, with its "What you measured" lines, tables and observations (timing claims on
        # a CPU, never a failure); empty where the notebook wrote none
        entry.update({k: data.get(k, {}) for k in ("metrics", "checks", "skipped", "observations", "tables")},
                     figures=data.get("figures", []), environment=data.get("env", {}), summary=data.get("summary", []))
        failed_checks = [k for k, v in entry["checks"].items() if not v]
        if entry["status"] == "ok" and failed_checks:
            entry.update(status="failed", error="checks failed: " + ", ".join(failed_checks))
        elif entry["status"] == "ok" and not data and "results_path" in declared[notebook]:
            entry.update(status="failed", error=f"the notebook wrote no results file at {results_path}")
        summary["notebooks"][notebook.stem] = entry
        # Written after every notebook: a run stopped midway keeps what finished ("finished" stays empty).
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        say(f"      {entry['status']} in {entry['duration_s']} s" + (f": {entry['error']}" if "error" in entry else ""))
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    report.write_report(out)
    return summary


def _cmd_probe(args: argparse.Namespace) -> int:
    from labkit import probes, widgets

    report = probes.probe()
    print(json.dumps(report, indent=2, default=str) if args.json else widgets.probe_text(report))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from labkit import models

    for name, folder in {"smollm2-135m": models.smollm2_folder(), "minilm-l6": models.minilm_folder()}.items():
        print(f"{name}: ready in {folder}")  # the one-time GGUF conversion is done: every embedded model loads offline
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from labkit import probes

    folder = Path(args.dir or "notebooks")  # ./notebooks when run from the repository, else beside the package
    if not args.dir and not folder.is_dir():
        folder = Path(__file__).resolve().parents[1] / "notebooks"
    notebooks = find_notebooks(args.notebooks, folder)
    missing = missing_kernels(notebooks)
    if missing:
        raise BadParameter("; ".join(f"{name}: {why}" for name, why in missing.items()) + ".")
    parameters = {**(read_parameters_file(Path(args.parameters)) if args.parameters else {}),
                  **parse_parameters(args.parameter or [])}
    if args.solutions:
        if not any("solutions" in declared_parameters(nb) for nb in notebooks):
            raise BadParameter("--solutions: none of the selected notebooks has exercises (01 to 05 do).")
        parameters["solutions"] = True
    if args.quick is None and isinstance(parameters.get("quick"), bool):
        args.quick = parameters.pop("quick")  # -p quick=true is --quick
    if args.quick is None:
        quick = len(probes.device_names()) <= 1  # the CPU alone: no CUDA device
        why = "no CUDA GPU found, so quick sizes (--full for full sizes)" if quick else \
            "a CUDA GPU was found, so full sizes"
    else:
        quick = args.quick
        why = "quick sizes (asked for)" if quick else "full sizes (asked for)"
    out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    print(f"labkit run: {why}; {len(notebooks)} notebook(s) into {out}/")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    summary = run_notebooks(notebooks, out, parameters, quick=quick, cell_timeout=args.cell_timeout,
                            timeout_s=args.timeout, progress=progress)
    failed = [name for name, entry in summary["notebooks"].items() if entry["status"] != "ok"]
    print(f"done: {len(notebooks) - len(failed)} ok, {len(failed)} failed; "
          f"{out / 'summary.json'} and {out / 'report.html'}")
    return 1 if failed else 0


def _cmd_progress(args: argparse.Namespace) -> int:
    from labkit import exercises
    from labkit.widgets import text_table

    if args.class_folder:
        return _class_progress(Path(args.class_folder), Path(args.page) if args.page else None)
    if args.page:
        raise BadParameter("--page draws a class's progress: give --class FOLDER too.")
    rows = exercises.progress()
    done = sum(bool(r["done"]) for r in rows)
    print(text_table([{**r, "done": r["done"] or "-"} for r in rows], ["exercise", "title", "kind", "done"]))
    print(f"{done} of {len(rows)} exercises done (kept in {exercises.progress_path()}, on this machine only)")
    return 0


def _class_progress(folder: Path, page: Path | None) -> int:
    """The teacher's view: each learner's exercises done, then each exercise's learners; a web page of the grid."""
    from labkit import exercises
    from labkit.widgets import html_table, text_table

    if not folder.is_dir():
        raise BadParameter(f"--class {folder} is not a folder; give the folder that holds one folder per learner "
                           "(/home on a machine with an account per learner).")
    rows, problems = exercises.class_progress(folder)
    ids = list(exercises.EXERCISES)
    for line in problems:
        print(f"not counted: {line}")
    if not rows:
        places = " or ".join(f"<learner>/{place}" for place in exercises.CLASS_PLACES)
        print(f"no learner's progress under {folder} (looked for {places})")
        return 0
    print(text_table([{"learner": r["learner"], "done": f"{sum(bool(r[e]) for e in ids)} of {len(ids)}",
                       "latest": max((r[e] for e in ids), default="") or "-",
                       "next": next((e for e in ids if not r[e]), "all done")} for r in rows],
                     ["learner", "done", "latest", "next"]))
    done_by = {e: sum(bool(r[e]) for r in rows) for e in ids}
    print(text_table([{"exercise": e, "learners done": f"{done_by[e]} of {len(rows)}",
                       "title": exercises.EXERCISES[e].title} for e in ids], ["exercise", "learners done", "title"]))
    if page is not None:
        grid = [{"learner": r["learner"], **{e: "✓" if r[e] else "" for e in ids}} for r in rows]
        grid.append({"learner": "learners done", **{e: f"{done_by[e]}/{len(rows)}" for e in ids}})
        title = f"{len(rows)} learners in {folder}, read {time.strftime('%Y-%m-%d %H:%M')}"
        page.write_text("<!doctype html><meta charset='utf-8'><title>Class progress</title><h1>Class progress</h1>"
                        + html_table(grid, ["learner", *ids], title=title))
        print(f"page: {page}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from labkit import report

    print(report.write_report(args.run, reference_folder=args.reference))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
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

    def command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(func=func)
        return sub

    probe = command("probe", _cmd_probe, "what this machine can do (versions, devices, SDPA backends, ...)")
    probe.add_argument("--json", action="store_true", help="print the report as JSON")
    command("prepare", _cmd_prepare, "make the embedded models ready to load offline")
    run = command("run", _cmd_run, "execute the notebooks with papermill into a run folder")
    run.add_argument("--notebooks",
                     help="comma-separated numbers, e.g. 00,01, or legacy for the legacy track (default: all)")
    size = run.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="quick", action="store_true", default=None, help="small sizes")
    size.add_argument("--full", dest="quick", action="store_false", help="full sizes")
    run.add_argument("-p", "--parameter", action="append", metavar="NAME=VALUE", help="a notebook parameter")
    run.add_argument("--parameters", metavar="FILE.yaml", help="parameters from a YAML file")
    run.add_argument("--out", help="run folder (default runs/<timestamp>)")
    run.add_argument("--dir", help="folder holding the notebooks (default ./notebooks)")
    run.add_argument("--cell-timeout", type=int, default=None, help="seconds a single cell may run")
    run.add_argument("--timeout", type=float, default=NOTEBOOK_TIMEOUT_S,
                     help=f"seconds a whole notebook may run (default {NOTEBOOK_TIMEOUT_S})")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bars (the default in a terminal), or plain lines only")
    run.add_argument("--solutions", action="store_true",
                     help="fill every exercise with its solution (a teacher's run before class; nothing is recorded)")
    mine = command("progress", _cmd_progress, "which exercises you have answered correctly on this machine")
    mine.add_argument("--class", dest="class_folder", metavar="FOLDER",
                      help="a teacher's view of a class. FOLDER holds one folder per learner: the learner's home "
                           "(/home, on a machine with an account per learner), or the folder their $LABKIT_PROGRESS "
                           "file is in")
    mine.add_argument("--page", metavar="FILE.html", help="with --class: also write the grid as a web page")
    write = command("report", _cmd_report, "(re)write report.html for a run folder")
    write.add_argument("run", help="a run folder from labkit run")
    write.add_argument("--reference", help="the folder of reference runs (default: the repository's reference/)")
    compare = command("compare", _cmd_compare, "the metrics two runs share, with ratios (before/after, mine/reference)")
    compare.add_argument("run_a", help="a run folder, a reference/<device> folder or a results file")
    compare.add_argument("run_b", help="the same, to compare with the first")
    compare.add_argument("--only", help="only metrics whose name contains this text")
    compare.add_argument("--json", action="store_true", help="print the rows as JSON")
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
