"""labkit.report: the summary schema, and the HTML page built from a run folder."""

import copy
import json
from pathlib import Path

import pytest

from labkit import cli, report, widgets
from labkit.errors import BadParameter
from labkit.results import Results

ENV = {"platform": "Linux", "versions": {"torch": "2.13.0"}, "devices": {"cpu": {"name": "Test CPU", "cores": 2}, "cuda": []}}


def test_a_good_summary_has_no_problems(make_run, tmp_path):
    assert report.summary_problems(make_run(tmp_path / "run")) == []


@pytest.mark.parametrize("damage, problem", [
    (lambda s: s.pop("schema"), "schema is None"),
    (lambda s: s.update(quick="yes"), "'quick' is missing or not a bool"),
    (lambda s: s["notebooks"]["01_flash_attention"].update(status="maybe"), "status 'maybe' is not one of"),
    (lambda s: s["notebooks"]["01_flash_attention"].update(status="failed"), "did not succeed but says no error"),
    (lambda s: s["notebooks"]["01_flash_attention"]["metrics"].update(x="fast"), "metric 'x' is not a number"),
    (lambda s: s["notebooks"]["01_flash_attention"]["checks"].update(y=1), "check 'y' is not true or false"),
    (lambda s: s["notebooks"]["01_flash_attention"].pop("figures"), "'figures' is missing"),
    (lambda s: s["notebooks"]["01_flash_attention"].update(summary="one line"), "summary must be a list of sentences"),
    (lambda s: s["notebooks"]["01_flash_attention"].update(summary=[1]), "summary must be a list of sentences"),
])
def test_summary_problems_name_what_is_wrong(make_run, tmp_path, damage, problem):
    summary = copy.deepcopy(make_run(tmp_path / "run"))
    damage(summary)
    assert any(problem in p for p in report.summary_problems(summary)), report.summary_problems(summary)


def test_a_bad_summary_file_is_refused_in_one_sentence(tmp_path):
    with pytest.raises(BadParameter, match="has no summary.json"):
        report.read_summary(tmp_path)
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(BadParameter, match="is not valid JSON"):
        report.read_summary(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(BadParameter, match="does not follow the run summary schema"):
        report.read_summary(tmp_path)
    assert report.summary_problems([1, 2]) == ["the summary is not a JSON object"]


def test_every_metric_of_a_notebook_is_in_its_one_table(make_run, tmp_path):
    make_run(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    summary["notebooks"]["01_flash_attention"]["metrics"] = {f"m{i}": float(i) for i in range(11)}
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    page = Path(report.write_report(tmp_path / "run", reference_folder=tmp_path / "none")).read_text()
    metrics = page[page.index("<h3>Metrics</h3>"):]
    metrics = metrics[:metrics.index("</table>")]
    assert all(f">m{i}<" in metrics for i in range(11))


def test_the_page_is_self_contained_and_shows_everything(make_run, tmp_path):
    make_run(tmp_path / "run", status="failed")
    page = report.write_report(tmp_path / "run", reference_folder=tmp_path / "no-references").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Workbook run on Test CPU" in page
    assert "data:image/png;base64," in page and "src='http" not in page and "<script" not in page
    assert "cell 3: RuntimeError: boom" in page and "no GPU &lt;here&gt;" in page  # escaped, not markup
    assert "best_backend_tflops" in page and "0.14" in page and "all 2 metrics" not in page  # both in the headline
    assert "No reference run stored" in page and "not probed in this test" in page


def test_reference_runs_appear_beside_this_run(make_run, tmp_path):
    make_run(tmp_path / "run")
    ref = Results("01_flash_attention", tmp_path / "reference" / "nvidia-h100" / "01_flash_attention.results.json", env=ENV)
    ref.metric("best_backend_tflops", 280.0)
    ref.write()
    page = report.build_report(tmp_path / "run", reference_folder=tmp_path / "reference")
    assert ">nvidia-h100</th>" in page and ">this run / nvidia-h100</th>" in page
    assert "280" in page and "0.0005" in page  # 0.14 / 280


def test_labkit_report_command_rewrites_the_page(make_run, tmp_path, capsys):
    make_run(tmp_path / "run")
    assert cli.main(["report", str(tmp_path / "run"), "--reference", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith("report.html")
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2


def test_summary_problems_survive_lists_where_objects_belong(make_run, tmp_path):
    summary = make_run(tmp_path / "run")
    summary["notebooks"]["01_flash_attention"].update(metrics=[1, 2], checks=["x"], figures=["/etc/passwd"])
    problems = report.summary_problems(summary)
    assert any("'metrics' is missing or of the wrong type" in p for p in problems)
    assert any("figures must be a list of file names" in p for p in problems)
    assert report.summary_problems({**summary, "notebooks": [1]})  # reported, not a crash


def test_legacy_comparison_joins_the_legacy_paths_with_notebook_03_at_the_same_point(make_run, tmp_path):
    summary = make_run(tmp_path / "run")
    timings = [["minilm-l6", 8, 128, p, path, ms] for p, base in ((0.0, 300.0), (0.5, 280.0)) for path, ms in
               (("eager", base), ("sdpa", base + 10), ("BetterTransformer", base / 2), ("labkit fastpath", base / 2.1))]
    timings.append(["tiny-bert", 8, 128, 0.5, "BetterTransformer", 4.0])
    summary["notebooks"]["bettertransformer"] = {  # as the legacy notebook records it (Results.table)
        **summary["notebooks"]["01_flash_attention"], "figures": [], "metrics": {},
        "tables": {"timings": {"columns": ["model", "batch", "length", "padding", "path", "median_ms"], "data": timings}}}
    summary["notebooks"]["03_encoder_fastpath"] = {**summary["notebooks"]["01_flash_attention"], "figures": [],
                                                   "parameters": {"sweep_model": "auto"},
                                                   "tables": {"sweep": {  # as notebook 03 records it (lab.table)
                                                       "columns": ["implementation", "batch", "length", "padding",
                                                                   "median_ms", "status"],
                                                       "data": [["transformers sdpa", 8, 128, 0.498, 420.0, "ok"],
                                                                ["fastpath", 8, 128, 0.498, 133.0, "ok"],
                                                                ["transformers eager", 8, 128, 0.498, 9.0, "ok"],
                                                                ["transformers sdpa", 4, 128, 0.5, 1.0, "ok"],
                                                                ["fastpath", 8, 128, 0.0, None, "oom"]]}}}
    rows = report.legacy_comparison(summary)
    assert [(r["model"], r["padding %"]) for r in rows] == [("minilm_l6", 0), ("minilm_l6", 50), ("tiny_bert", 50)]
    at_50 = rows[1]
    assert at_50["today's sdpa ms"] == 420.0 and at_50["today's fastpath ms"] == 133.0
    assert at_50["BT vs eager"] == 2.0 and at_50["BT vs today's sdpa"] == 3.0
    assert rows[0]["today's sdpa ms"] is None  # 03 ran no point at 0% padding here
    assert rows[2]["eager 4.48 ms"] is None and rows[2]["BT vs eager"] is None
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    page = report.build_report(tmp_path / "run")
    assert "legacy-comparison" in page and "420" in page


def test_no_legacy_section_without_the_legacy_notebook(make_run, tmp_path):
    summary = make_run(tmp_path / "run")
    assert report.legacy_comparison(summary) == [] and "legacy-comparison" not in report.build_report(tmp_path / "run")


def test_what_you_measured_shows_under_the_heading_before_the_metrics(make_run, tmp_path):
    summary = make_run(tmp_path / "run")
    summary["notebooks"]["01_flash_attention"]["summary"] = ["Flash ran at 0.14 TFLOP/s <here>.", "Second line."]
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    page = report.build_report(tmp_path / "run", reference_folder=tmp_path)
    section = page[page.index("<section id='nb-01_flash_attention'>"):]
    assert "<li>Flash ran at 0.14 TFLOP/s &lt;here&gt;.</li><li>Second line.</li>" in section
    assert section.index("What you measured") < section.index("<h3>Metrics</h3>")


def test_a_summary_written_before_what_you_measured_existed_still_reads(make_run, tmp_path):
    summary = make_run(tmp_path / "run")
    assert "summary" not in summary["notebooks"]["01_flash_attention"]
    assert report.read_summary(tmp_path / "run") == summary
    assert "What you measured" not in report.build_report(tmp_path / "run", reference_folder=tmp_path)


def test_the_report_uses_the_one_html_table_of_widgets(make_run, tmp_path):
    make_run(tmp_path / "run")
    page = report.build_report(tmp_path / "run", reference_folder=tmp_path)
    skipped = widgets.html_table([{"what": "cuDNN", "why": "no GPU <here>"}], ["what", "why"], missing="\u2013")
    assert skipped in page
    assert not hasattr(report, "_number")  # no second formatter of cells


def test_the_report_shows_each_measurement_table_of_a_notebook(make_run, tmp_path):
    summary = make_run(tmp_path / "run")
    summary["notebooks"]["01_flash_attention"]["tables"] = {
        "sweep": {"columns": ["backend", "n", "ms"], "data": [["MATH", 128, 0.5], ["FLASH", 128, None]]}}
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    page = report.build_report(tmp_path / "run", reference_folder=tmp_path)
    rows = [{"backend": "MATH", "n": 128, "ms": 0.5}, {"backend": "FLASH", "n": 128, "ms": None}]
    assert "table: sweep (2 rows)" in page and widgets.html_table(rows, ["backend", "n", "ms"], missing="\u2013") in page
