"""The run report: ``summary.json`` checked, and one self-contained HTML page (figures embedded) from a run folder."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from labkit import probes, widgets
from labkit.errors import BadParameter
from labkit.results import metric_name, record_problems, reference_runs, run_label, table
from labkit.widgets import html_table

SCHEMA = "labkit-run/1"
STATUSES = ("ok", "failed", "timed out")
NOTEBOOK_KEYS = {"status": str, "duration_s": (int, float), "parameters": dict, "metrics": dict, "checks": dict,
                 "skipped": dict, "figures": list, "environment": dict}
# An entry may lack "summary" (its "What you measured" sentences) and "tables" (its measurement tables, as in the
# results file): summaries written before them stay readable.

# --------------------------------------------------------------------------- summary.json

def summary_problems(summary: Any) -> list[str]:
    """What is wrong with a ``summary.json`` object (an empty list: it follows the schema)."""
    if not isinstance(summary, dict):
        return ["the summary is not a JSON object"]
    problems = []
    if summary.get("schema") != SCHEMA:
        problems.append(f"schema is {summary.get('schema')!r}, expected {SCHEMA!r}")
    problems += [f"{key!r} is missing or not a {kind.__name__}" for key, kind in (
        ("started", str), ("finished", str), ("quick", bool), ("machine", dict), ("notebooks", dict))
        if not isinstance(summary.get(key), kind)]
    if isinstance(summary.get("machine"), dict) and not isinstance(summary["machine"].get("env", {}), dict):
        problems.append("'machine.env' is not an object")
    notebooks = summary.get("notebooks")
    for name, entry in (notebooks.items() if isinstance(notebooks, dict) else []):
        if not isinstance(entry, dict):
            problems.append(f"notebook {name!r} is not an object")
            continue
        problems += [f"notebook {name!r}: {key!r} is missing or of the wrong type"
                     for key, kind in NOTEBOOK_KEYS.items() if not isinstance(entry.get(key), kind)]
        if entry.get("status") not in STATUSES:
            problems.append(f"notebook {name!r}: status {entry.get('status')!r} is not one of {', '.join(STATUSES)}")
        elif entry["status"] != "ok" and not isinstance(entry.get("error"), str):
            problems.append(f"notebook {name!r} did not succeed but says no error")
        problems += [f"notebook {name!r}: {problem}" for problem in record_problems(entry)]
    return problems


def read_summary(run_folder: str | Path) -> dict[str, Any]:
    """The run's ``summary.json``, or one sentence saying why it cannot be used."""
    path = Path(run_folder) / "summary.json"
    if not path.exists():
        raise BadParameter(f"{run_folder} has no summary.json: is it a run folder from `labkit run`?")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BadParameter(f"{path} is not valid JSON ({error.msg} at line {error.lineno}).") from None
    problems = summary_problems(summary)
    if problems:
        raise BadParameter(f"{path} does not follow the run summary schema: {'; '.join(problems[:3])}.")
    return summary


# --------------------------------------------------------------------------- the page

def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """widgets' HTML table (a dash where a value is missing), or "none" for no rows."""
    return html_table(rows, columns, missing="\u2013") if rows else "<p class='none'>none</p>"


LEGACY_COLUMNS = ["model", "batch x length", "padding %", "eager 4.48 ms", "sdpa 4.48 ms", "BetterTransformer ms",
                  "labkit fastpath (4.48) ms", "today's sdpa ms", "today's fastpath ms", "BT vs eager",
                  "BT vs today's sdpa"]
_LEGACY_PATHS = {"eager": "eager 4.48 ms", "sdpa": "sdpa 4.48 ms", "BetterTransformer": "BetterTransformer ms",
                 "labkit fastpath": "labkit fastpath (4.48) ms"}


def legacy_comparison(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model and padding level: the legacy notebook's four paths (transformers 4.48 kernel; its table "timings")
    beside notebook 03's sweep of the same run at the same batch, length and padding (today's stack; its table
    "sweep"), where 03 swept that model."""
    legacy, sweep = (summary["notebooks"].get(name) or {} for name in ("bettertransformer", "03_encoder_fastpath"))
    if "timings" not in (legacy.get("tables") or {}):
        return []

    def key(model, r):  # a model and a point, as both notebooks name them
        return metric_name(model), int(r["batch"]), int(r["length"]), round(100 * r["padding"])

    today: dict[tuple, dict[str, float]] = {}
    if "sweep" in (sweep.get("tables") or {}):
        # 03's sweep model, as its parameter cell decides it: minilm-l6 on a CPU, random-bert-base on a GPU
        # (`make compare-legacy` names minilm-l6, so nothing is guessed there)
        chosen = sweep["parameters"].get("sweep_model", "auto")
        if chosen == "auto":
            device = str(sweep["parameters"].get("device", "auto"))
            has_gpu = bool((summary["machine"].get("env") or {}).get("devices", {}).get("cuda"))
            chosen = "random-bert-base" if device.startswith("cuda") or (device == "auto" and has_gpu) else "minilm-l6"
        points = table(sweep, "sweep")
        for r in points[(points["status"] == "ok") & points["implementation"].isin(("transformers sdpa", "fastpath"))
                        ].to_dict("records"):
            today.setdefault(key(chosen, r), {})[r["implementation"]] = r["median_ms"]
    rows: dict[tuple, dict[str, Any]] = {}
    for r in table(legacy, "timings").to_dict("records"):
        k = key(r["model"], r)
        rows.setdefault(k, {"model": k[0], "batch x length": f"{k[1]} x {k[2]}", "padding %": k[3],
                            **dict.fromkeys(LEGACY_COLUMNS[3:])})[_LEGACY_PATHS[r["path"]]] = r["median_ms"]
    for k, row in rows.items():
        row["today's sdpa ms"], row["today's fastpath ms"] = (today.get(k, {}).get(path)
                                                              for path in ("transformers sdpa", "fastpath"))
        bt = row["BetterTransformer ms"]
        for column, other in (("BT vs eager", "eager 4.48 ms"), ("BT vs today's sdpa", "today's sdpa ms")):
            row[column] = row[other] / bt if bt and row[other] else None
    return [rows[k] for k in sorted(rows)]


def build_report(run_folder: str | Path, *, reference_folder: str | Path | None = None) -> str:
    """The HTML page for a run folder: environment, kernel matrix, and per notebook its status, checks, skips,
    headline metrics (beside the reference runs of other devices) and figures. Self-contained: no links out."""
    run_folder = Path(run_folder)
    summary = read_summary(run_folder)
    machine = summary["machine"]
    env = machine.get("env") or {}
    label = run_label({"run": {"env": env}})
    notebooks = summary["notebooks"]
    counts = {s: sum(e["status"] == s for e in notebooks.values()) for s in STATUSES}
    parts = [f"<h1>Workbook run on {html.escape(label)}</h1>",
             f"<p>{html.escape(summary['started'])} to {html.escape(summary['finished'] or 'a stop before the end')}, "
             f"{'quick' if summary['quick'] else 'full'} sizes. "
             f"<b>{counts['ok']} ok</b>, {counts['failed']} failed, {counts['timed out']} timed out.</p>"]
    parts.append("<h2>Overview</h2>" + _table([
        {"notebook": name, "status": e["status"], "seconds": f"{e['duration_s']:.0f}",
         "checks": f"{sum(e['checks'].values())}/{len(e['checks'])}", "skipped": str(len(e["skipped"])),
         "error": e.get("error", "")} for name, e in notebooks.items()],
        ["notebook", "status", "seconds", "checks", "skipped", "error"]))
    if env:
        parts.append("<h2>Environment</h2>" + _table(probes.environment_rows(env), ["item", "value"]))
    probe = machine.get("probe") or {}
    if probe.get("sdpa"):
        parts.append("<h2>Kernel matrix</h2><p>The SDPA backends that ran, forced one at a time, and why the others "
                     "did not.</p>" + _table(widgets.sdpa_summary(probe["sdpa"]), list(widgets.SUMMARY_COLUMNS)))
        if probe.get("features"):
            parts.append(_table(widgets.feature_rows(probe["features"]), ["feature", "ok", "detail"]))
    elif probe.get("error"):
        parts.append(f"<h2>Kernel matrix</h2><p>not probed: {html.escape(probe['error'])}</p>")
    legacy = legacy_comparison(summary)
    if legacy:
        parts.append("<h2 id='legacy-comparison'>Legacy BetterTransformer against today's path</h2><p>Median "
                     "milliseconds per batch. The first four columns ran in the legacy kernel (transformers 4.48, "
                     "optimum 1.27); the two \"today's\" columns come from notebook 03 in this run, on the same "
                     "batches, and are empty where 03 swept another model or size. Above 1 in a \"vs\" column: "
                     "BetterTransformer is faster.</p>" + _table(legacy, LEGACY_COLUMNS))
    for name, entry in notebooks.items():
        try:
            references = reference_runs(name, reference_folder)
        except BadParameter as error:  # one unreadable reference file must not hide this run's own numbers
            references = {}
            parts.append(f"<p class='none'>Reference runs for {html.escape(name)} not shown: "
                         f"{html.escape(str(error))}</p>")
        status = html.escape(entry["status"])
        section = [f"<section id='nb-{html.escape(name)}'><h2>{html.escape(name)} "
                   f"<span class='status {status.replace(' ', '-')}'>{status}</span></h2>",
                   f"<p>{entry['duration_s']:.0f} s</p>"]
        if entry.get("error"):
            section.append(f"<pre class='error'>{html.escape(entry['error'])}</pre>")
        if entry.get("summary"):  # the notebook's own closing sentences, before its numbers
            section.append("<h3>What you measured</h3><ul class='measured'>"
                           + "".join(f"<li>{html.escape(line)}</li>" for line in entry["summary"]) + "</ul>")
        failed = [c for c, ok in entry["checks"].items() if not ok]
        section.append(f"<p>Checks: {sum(entry['checks'].values())} of {len(entry['checks'])} passed"
                       + (f"; failed: {html.escape(', '.join(failed))}" if failed else "") + ".</p>")
        unseen = [o for o, seen in entry.get("observations", {}).items() if not seen]
        if unseen:  # timing claims on a CPU (labkit.results): said, never a failure
            section.append(f"<p>Not seen this time (timings on a CPU shared with other work): "
                           f"{html.escape(', '.join(unseen))}.</p>")
        if entry["skipped"]:
            section.append("<h3>Skipped</h3>" + _table([{"what": w, "why": y} for w, y in entry["skipped"].items()],
                                                      ["what", "why"]))
        if entry["metrics"]:
            if not references:
                section.append("<p class='none'>No reference run stored for this notebook yet.</p>")
            rows = []  # the notebook's few headline metrics (labkit.registry names them), beside the reference runs
            for metric, value in entry["metrics"].items():
                row = {"metric": metric, "this run": value}
                for device, data in references.items():
                    theirs = row[device] = data["metrics"].get(metric)
                    row[f"this run / {device}"] = value / theirs if theirs else None
                rows.append(row)
            section.append("<h3>Metrics</h3>" + _table(rows, ["metric", "this run", *(
                column for device in references for column in (device, f"this run / {device}"))]))
        for table_name, stored in entry.get("tables", {}).items():  # summaries written before tables have none
            rows = [dict(zip(stored["columns"], row, strict=True)) for row in stored["data"]]
            section.append(f"<details><summary>table: {html.escape(table_name)} ({len(rows)} rows)</summary>"
                           f"{_table(rows, stored['columns'])}</details>")
        figures = [run_folder / f for f in entry["figures"] if (run_folder / f).is_file()]
        if figures:
            section.append("<h3>Figures</h3>" + "".join(
                f"<figure><img alt='{html.escape(f.stem)}' src='data:image/png;base64,"
                f"{base64.b64encode(f.read_bytes()).decode('ascii')}'><figcaption>{html.escape(f.name)}</figcaption>"
                "</figure>" for f in figures))
        parts.append("".join(section) + "</section>")
    title = f"Workbook run on {label}"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}"
            f"<footer>Written by <code>labkit run</code> from {html.escape(run_folder.name)}/summary.json.</footer>"
            "</body></html>")


def write_report(run_folder: str | Path, *, reference_folder: str | Path | None = None) -> Path:
    """Write ``report.html`` into the run folder and return its path."""
    target = Path(run_folder) / "report.html"
    target.write_text(build_report(run_folder, reference_folder=reference_folder), encoding="utf-8")
    return target


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1f2328; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption, .none, footer { color: #656d76; font-size: 0.85em; }
.status { font-size: 0.6em; padding: 0.1em 0.5em; border-radius: 0.5em; color: white; vertical-align: middle; }
.ok { background: #1a7f37; } .failed { background: #cf222e; } .timed-out { background: #bf8700; }
pre.error { background: #fff1f0; padding: 0.5em; white-space: pre-wrap; }
section { border-top: 1px solid #d0d7de; margin-top: 2em; }
"""
