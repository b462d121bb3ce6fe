"""The results file every notebook writes, and the reading of results files (a run, the reference runs).

Results file schema (one JSON object):
``{"notebook": str, "env": {...}, "metrics": {name: number}, "checks": {name: bool}, "skipped": {what: why},
"tables": {name: {"columns": [names], "data": [[row values]]}}, "figures": [file names], "summary": [lines of "What you
measured"], "observations": {name: bool}}`` (tables, figures, summary and observations may be absent). A table is a
measurement as the notebook made it (a pandas DataFrame, stored as pandas' "split" orientation without the index);
``table(data, name)`` reads it back. ``metrics`` holds the few named numbers that ``labkit compare`` and the report
headline.

Checks are what the notebook showed, and the tests require each to be true. A claim about timings (one way faster than
another, a point under its bound) is a check on a GPU, which a run has to itself; on a CPU, shared with whatever else
runs (two notebooks side by side in the tests, a browser, a learner's other work), it is recorded as an observation:
printed when this run did not show it, kept in the results file, never asserted.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from labkit import paths
from labkit.errors import BadParameter


def metric_name(*parts: Any) -> str:
    """A metric name from words and values: lower case, every run of other characters becomes one _
    (``metric_name("decode", "smollm2-135m", "tokens/s") == "decode_smollm2_135m_tokens_s"``)."""
    return re.sub(r"[^a-z0-9]+", "_", "_".join(map(str, parts)).lower()).strip("_")


class Results:
    """Collects a notebook's metrics, checks and skips, and writes them to ``path`` (when it is set)."""

    def __init__(self, notebook: str, path: str | os.PathLike | None = None, env: dict[str, Any] | None = None, *,
                 timing_checks: bool = True):
        self.notebook = notebook
        self.path = Path(path) if path else None
        self.env = env if env is not None else {}
        self.timing_checks = timing_checks  # False on a CPU: timing claims are observations (module docstring)
        self.metrics: dict[str, float] = {}
        self.checks: dict[str, bool] = {}
        self.observations: dict[str, bool] = {}
        self.skipped: dict[str, str] = {}
        self.tables: dict[str, dict[str, list]] = {}
        self.figures: list[str] = []
        self.summary: list[str] = []  # "What you measured", in words (written by Lab.finish)

    def metric(self, name: str, value: float) -> None:
        """Record a measured number (finite int or float)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadParameter(f"metric {name!r} must be a finite number, got {value!r}.")
        self.metrics[name] = value

    def record(self, metrics: dict[str, float | None]) -> None:
        """Record many metrics at once (named with :func:`metric_name`); None is skipped."""
        for name, value in metrics.items():
            if value is not None:
                self.metric(name, value)

    def table(self, name: str, frame) -> None:
        """Record a measurement table (a pandas DataFrame; its index is not kept) under ``name``."""
        if not hasattr(frame, "to_json"):
            raise BadParameter(f"table {name!r} must be a pandas DataFrame, got {type(frame).__name__}.")
        split = json.loads(frame.to_json(orient="split", index=False, double_precision=15))  # numbers as JSON's
        self.tables[name] = {"columns": [str(c) for c in split["columns"]], "data": split["data"]}

    def check(self, name: str, passed: Any, detail: str = "", *, timing: bool = False) -> None:
        """Record one of the notebook's claims about what it showed. Silent when it holds (the results file and the
        report list the checks); when it does not, one line in words says what this machine did not show.
        ``timing=True``: a claim about timings, an observation where ``timing_checks`` is False (on a CPU)."""
        observed = timing and not self.timing_checks
        (self.observations if observed else self.checks)[name] = passed = bool(passed)
        said = f"{name.replace('_', ' ')}{' (' + detail + ')' if detail else ''}"
        if not passed:
            print(f"Not seen this time: {said}. A timing on a CPU shared with other work; run the cell again when the "
                  "machine is idle (on a GPU this is a check)." if observed else f"Not seen on this machine: {said}.")

    def skip(self, what: str, why: str) -> None:
        """Record and print, in one line, what this machine cannot do and why."""
        self.skipped[what] = why
        print(f"Skipped: {what} -- {why}")

    def figure(self, name: str, fig) -> None:
        """Save a matplotlib figure as ``<results file stem>.<name>.png`` beside the results file (when set)."""
        if self.path is not None:
            target = self.path.parent / f"{self.path.name.removesuffix('.json').removesuffix('.results')}.{name}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(target, dpi=110, bbox_inches="tight")
            self.figures.append(target.name)

    def as_dict(self) -> dict[str, Any]:
        return {"notebook": self.notebook, "env": self.env, "metrics": self.metrics, "checks": self.checks,
                "observations": self.observations, "skipped": self.skipped, "tables": self.tables,
                "figures": self.figures, "summary": self.summary}

    def write(self) -> Path | None:
        """Write the results file (when a path was given) and return its path."""
        if self.path is None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.as_dict(), indent=2, default=str))
        return self.path


def reference_runs(notebook: str, folder: Path | None = None) -> dict[str, dict[str, Any]]:
    """Stored reference results for ``notebook``, keyed by device folder name (empty when none exist)."""
    return {path.parent.name: read_results(path)
            for path in sorted(Path(folder or paths.reference_dir()).glob(f"*/{notebook}.results.json"))}


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results file and check that it follows the schema (read as JSON data, never evaluated)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise BadParameter(f"{path} is not a labkit results file: not valid JSON "
                           f"({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict):
        raise BadParameter(f"{path} is not a labkit results file: not a JSON object")
    missing = {"notebook", "env", "metrics", "checks", "skipped"} - set(data)
    if missing:
        raise BadParameter(f"{path} is not a labkit results file: missing {sorted(missing)}")
    problems = record_problems(data)
    if not all(isinstance(data[k], dict) for k in ("env", "metrics", "checks", "skipped")):
        problems.insert(0, "env, metrics, checks and skipped must be objects")
    if problems:
        raise BadParameter(f"{path} is not a labkit results file: {'; '.join(problems[:3])}")
    return data


def record_problems(data: dict[str, Any]) -> list[str]:
    """What is wrong in the record of a results file, or of a notebook's entry in a run's summary (the same keys)."""
    problems = []
    for name, value in _items(data.get("metrics")):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"metric {name!r} is not a number")
        elif not math.isfinite(value):
            problems.append(f"metric {name!r} is not finite")
    problems += [f"check {k!r} is not true or false" for k, v in _items(data.get("checks")) if not isinstance(v, bool)]
    problems += [f"skip {k!r} has no one-line reason" for k, v in _items(data.get("skipped")) if not isinstance(v, str)]
    figures, summary = data.get("figures", []), data.get("summary", [])
    if not isinstance(figures, list) or not all(isinstance(f, str) and f and Path(f).name == f for f in figures):
        problems.append("figures must be a list of file names beside the results file")
    if not isinstance(summary, list) or not all(isinstance(line, str) for line in summary):
        problems.append("summary must be a list of sentences")
    observations = data.get("observations", {})
    if not isinstance(observations, dict) or not all(isinstance(v, bool) for v in observations.values()):
        problems.append("observations must map names to true or false")
    tables = data.get("tables", {})
    if not isinstance(tables, dict) or not all(
            isinstance(t, dict) and isinstance(t.get("columns"), list) and isinstance(t.get("data"), list)
            and all(isinstance(row, list) and len(row) == len(t["columns"]) for row in t["data"])
            for t in tables.values()):
        problems.append("tables must map names to {columns, data} with a value per column in every row")
    return problems


def table(data: dict[str, Any], name: str):
    """The table ``name`` of a results file's data (``read_results``) as a pandas DataFrame."""
    import pandas as pd  # here: reading a results file's numbers needs no pandas

    stored = data.get("tables", {}).get(name)
    if stored is None:
        raise BadParameter(f"the results of {data.get('notebook', '?')} hold no table {name!r}; they hold "
                           f"{', '.join(data.get('tables', {})) or 'none'}.")
    return pd.DataFrame(stored["data"], columns=stored["columns"])


def _items(value: Any) -> list[tuple[Any, Any]]:
    return list(value.items()) if isinstance(value, dict) else []


def load_run(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The results files of a run: a run folder (``labkit run --out``), a ``reference/<device>`` folder, or one
    results file. Returns ``{notebook: results}``; one sentence when there is nothing to read."""
    path = Path(path)
    if path.is_file():
        data = read_results(path)
        return {data["notebook"]: data}
    if not path.is_dir():
        raise BadParameter(f"{path} is neither a run folder nor a results file.")
    runs = {data["notebook"]: data for data in map(read_results, sorted(path.glob("*.results.json")))}
    if not runs:
        raise BadParameter(f"{path} holds no *.results.json files (is it a run folder from `labkit run`?).")
    return runs


def compare(run_a: dict[str, dict[str, Any]], run_b: dict[str, dict[str, Any]], *,
            only: str = "") -> list[dict[str, Any]]:
    """The metrics two runs share, notebook by notebook: both values and the ratio b / a."""
    rows = []
    for notebook in sorted(set(run_a) & set(run_b)):
        metrics_a, metrics_b = run_a[notebook]["metrics"], run_b[notebook]["metrics"]
        for name in sorted(set(metrics_a) & set(metrics_b)):
            if only and only not in name:
                continue
            a, b = metrics_a[name], metrics_b[name]
            rows.append({"notebook": notebook, "metric": name, "a": a, "b": b, "b / a": b / a if a else None})
    return rows


def run_label(run: dict[str, dict[str, Any]]) -> str:
    """The device a run measured on, from its environment report ("AMD EPYC, 2 cores", "NVIDIA H100 ...")."""
    env = next(iter(run.values())).get("env", {})
    devices = env.get("devices", {})
    gpus = devices.get("cuda") or []
    if gpus:
        return gpus[0].get("name", "GPU")
    cpu = devices.get("cpu", {})
    return f"{cpu.get('name', 'CPU')}, {cpu.get('cores', '?')} cores" if cpu else "unknown device"
