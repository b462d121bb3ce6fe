import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from labkit import cli, report
from labkit.errors import BadParameter
from labkit.results import Results

ROOT = Path(__file__).resolve().parents[2]


def write_notebook(path: Path, body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('size = 1\nquick = False\nresults_path = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


WRITES_RESULTS = """
from labkit.results import Results
import json
res = Results("NAME", results_path, env={})
res.metric("size", size)
res.check("size_positive", size > 0)
res.write()
"""


def test_parse_parameters_reads_yaml_values():
    assert cli.parse_parameters(["n=3", "quick=true", "name=tiny-opt", "sizes=[1, 2]"]) == {
        "n": 3, "quick": True, "name": "tiny-opt", "sizes": [1, 2]}
    with pytest.raises(BadParameter, match="name=value"):
        cli.parse_parameters(["oops"])


def test_find_notebooks_in_order_and_by_number():
    found = cli.find_notebooks(None, ROOT / "notebooks")
    assert found and found == sorted(found) and found[0].name.startswith("00_")
    assert cli.find_notebooks("0", ROOT / "notebooks")[0].name.startswith("00_")
    with pytest.raises(BadParameter, match="no notebook '42'"):
        cli.find_notebooks("42", ROOT / "notebooks")


def test_notebook_00_declares_its_parameters():
    declared = cli.declared_parameters(ROOT / "notebooks" / "00_setup_and_probes.ipynb")
    assert {"device", "dtype", "model_id", "quick", "results_path"} <= set(declared)


def test_unknown_parameter_fails_before_anything_runs(tmp_path):
    nb = write_notebook(tmp_path / "01_a.ipynb", "raise SystemExit('must not run')")
    with pytest.raises(BadParameter, match="unknown parameter.*sise.*declare: quick, results_path, size"):
        cli.run_notebooks([nb], tmp_path / "out", {"sise": 2}, quick=True)
    assert not (tmp_path / "out").exists()


# One real `labkit run` (the command line, papermill, a kernel per notebook) over a folder of small notebooks, each
# showing one way a notebook can end; the tests below read what it left. One run instead of one per case: each kernel
# start costs seconds on 2 busy cores.
RUN_CASES = {
    "01_fails": "raise RuntimeError('boom')",
    "02_works": WRITES_RESULTS.replace("NAME", "02_works"),
    "03_check": WRITES_RESULTS.replace("NAME", "03_check").replace("size > 0", "size > 5"),
    "04_silent": "x = 1",
    "05_stale": "raise RuntimeError('fails before writing')",
    "06_slow": "import time\ntime.sleep(120)",
    "07_after": WRITES_RESULTS.replace("NAME", "07_after"),
}
TIMEOUT_S = 20  # the limit holds for every notebook, and a kernel's start alone took over 8 s on 2 busy cores in CI


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``labkit run --dir notebooks --out runs/x --quick -p size=3 --timeout 20``, from the run's own folder."""
    work = tmp_path_factory.mktemp("cli-run")
    folder = work / "notebooks"
    folder.mkdir()
    for name, body in RUN_CASES.items():
        write_notebook(folder / f"{name}.ipynb", body)
    out = work / "runs" / "x"
    out.mkdir(parents=True)
    # what an earlier, successful run left in the same folder
    (out / "05_stale.results.json").write_text(json.dumps({"notebook": "05_stale", "env": {}, "metrics": {"size": 1.0},
                                                           "checks": {"size_positive": True}, "skipped": {}}))
    done = subprocess.run([sys.executable, "-m", "labkit.cli", "run", "--dir", "notebooks", "--out", "runs/x",
                           "--quick", "-p", "size=3", "--timeout", str(TIMEOUT_S)],
                          capture_output=True, text=True, cwd=work)
    return done, out, report.read_summary(out)  # the one reader of summary.json: raises unless it follows the schema


def test_run_records_a_failure_and_runs_the_rest(cli_run):
    done, out, summary = cli_run
    entries = summary["notebooks"]
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].startswith("labkit run: quick sizes")
    assert list(entries) == list(RUN_CASES)
    assert entries["01_fails"]["status"] == "failed"
    assert entries["01_fails"]["error"] == "In [3]: RuntimeError: boom"  # as numbered in the executed notebook
    assert entries["02_works"]["status"] == "ok" and entries["07_after"]["status"] == "ok"
    assert entries["02_works"]["metrics"] == {"size": 3} and entries["02_works"]["checks"] == {"size_positive": True}
    assert (out / "02_works.ipynb").exists() and (out / "02_works.results.json").exists()  # a relative --out
    assert (out / "report.html").exists() and "RuntimeError: boom" in (out / "report.html").read_text()
    assert done.stdout.strip().endswith("report.html")


def test_summary_follows_its_schema(cli_run):
    _, out, summary = cli_run
    assert report.summary_problems(summary) == []
    assert summary["quick"] is True and set(summary["machine"]) == {"env", "probe"} and summary["machine"]["probe"]["sdpa"]
    entry = summary["notebooks"]["02_works"]
    assert entry["parameters"] == {"size": 3, "quick": True, "results_path": str((out / "02_works.results.json").resolve())}
    assert entry["environment"] == {} and entry["figures"] == [] and entry["duration_s"] > 0


def test_a_notebook_past_its_timeout_is_stopped_and_the_next_runs(cli_run):
    entries = cli_run[2]["notebooks"]
    slow = entries["06_slow"]
    assert slow["status"] == "timed out" and f"stopped after {TIMEOUT_S} s" in slow["error"] and slow["duration_s"] < 60
    assert entries["07_after"]["status"] == "ok"


def test_a_notebook_that_writes_no_results_fails(cli_run):
    entry = cli_run[2]["notebooks"]["04_silent"]
    assert entry["status"] == "failed" and "no results file" in entry["error"]


def test_a_failed_check_fails_the_notebook(cli_run):
    entry = cli_run[2]["notebooks"]["03_check"]
    assert entry["status"] == "failed" and "size_positive" in entry["error"]


def test_results_left_by_an_earlier_run_are_not_this_runs(cli_run):
    entry = cli_run[2]["notebooks"]["05_stale"]
    assert entry["status"] == "failed" and entry["metrics"] == {} and "fails before writing" in entry["error"]


def test_cli_reports_bad_input_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "labkit.cli", "run", "--dir", str(ROOT / "notebooks"),
                           "--notebooks", "77", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("labkit: no notebook '77'") and len(done.stderr.strip().splitlines()) == 1


def _run_folder(folder, device, metrics):
    env = {"devices": {"cpu": {"name": device, "cores": 2}, "cuda": []}}
    for notebook, values in metrics.items():
        res = Results(notebook, folder / f"{notebook}.results.json", env=env)
        for name, value in values.items():
            res.metric(name, value)
        res.write()
    return folder


def test_compare_lists_shared_metrics_with_ratios(tmp_path, capsys):
    a = _run_folder(tmp_path / "a", "CPU A", {"01_x": {"tflops": 2.0, "only_a": 1.0}, "02_y": {"ms": 10.0}})
    b = _run_folder(tmp_path / "b", "CPU B", {"01_x": {"tflops": 3.0}, "02_y": {"ms": 5.0}, "03_z": {"ms": 1.0}})
    assert cli.main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "a: " in out and "(CPU A, 2 cores)" in out and "(CPU B, 2 cores)" in out
    lines = [line.split() for line in out.splitlines() if line.startswith(("01_x", "02_y"))]
    assert lines == [["01_x", "tflops", "2", "3", "1.5"], ["02_y", "ms", "10", "5", "0.5"]]
    assert "only_a" not in out and "03_z" not in out


def test_compare_filters_reads_single_files_and_prints_json(tmp_path, capsys):
    a = _run_folder(tmp_path / "a", "A", {"01_x": {"tflops": 2.0, "ms": 4.0}})
    b = _run_folder(tmp_path / "b", "B", {"01_x": {"tflops": 1.0, "ms": 8.0}})
    assert cli.main(["compare", str(a / "01_x.results.json"), str(b), "--only", "ms", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"notebook": "01_x", "metric": "ms", "a": 4.0, "b": 8.0, "b / a": 2.0}]


def test_compare_explains_what_it_cannot_read(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    a = _run_folder(tmp_path / "a", "A", {"01_x": {"tflops": 2.0}})
    assert cli.main(["compare", str(empty), str(a)]) == 2
    assert "holds no *.results.json files" in capsys.readouterr().err
    assert cli.main(["compare", str(tmp_path / "missing"), str(a)]) == 2
    assert "neither a run folder nor a results file" in capsys.readouterr().err
    b = _run_folder(tmp_path / "b", "B", {"02_y": {"ms": 1.0}})
    assert cli.main(["compare", str(a), str(b)]) == 1
    assert "share no metrics" in capsys.readouterr().out


@pytest.mark.parametrize("content, problem", [
    ("quick: [unclosed", "is not valid YAML"), ("- 1\n- 2\n", "must map parameter names to values"),
    ("'not a name': 1\n", "must map parameter names to values"),
    ("size: !!python/object/apply:os.system ['echo hacked']\n", "is not valid YAML"),
    ("size: {nested: 1}\n", "size must be a number, text, true/false or a list"),
])
def test_a_parameters_file_is_read_as_data_and_checked(tmp_path, content, problem):
    path = tmp_path / "params.yaml"
    path.write_text(content)
    with pytest.raises(BadParameter, match=problem):
        cli.read_parameters_file(path)
    assert cli.read_parameters_file(_write(tmp_path / "ok.yaml", "quick: true\nsizes: [1, 2]\n")) == {
        "quick": True, "sizes": [1, 2]}


def _write(path, text):
    path.write_text(text)
    return path


def test_parameters_on_the_command_line_are_checked():
    with pytest.raises(BadParameter, match="not valid YAML"):
        cli.parse_parameters(["sizes=[1,"])
    with pytest.raises(BadParameter, match="use --out for the run folder"):
        cli.parse_parameters(["results_path=/tmp/x.json"])
    with pytest.raises(BadParameter, match="use true or false"):
        cli.run_notebooks([], Path("unused"), {"quick": "no"}, quick=True)


def test_quick_given_as_a_parameter_is_what_the_summary_says(tmp_path, monkeypatch):
    nb = write_notebook(tmp_path / "01_q.ipynb", WRITES_RESULTS.replace("NAME", "01_q"))
    monkeypatch.setattr(cli, "execute_one", lambda *args, **kwargs: {"status": "ok", "duration_s": 0.1})  # no kernel
    summary = cli.run_notebooks([nb], tmp_path / "out", {"quick": False}, quick=True, probe=False, log=lambda *_: None)
    assert summary["quick"] is False and summary["notebooks"]["01_q"]["parameters"]["quick"] is False


def test_a_run_stopped_midway_keeps_the_summary_of_what_finished(tmp_path, monkeypatch):
    done = write_notebook(tmp_path / "01_done.ipynb", WRITES_RESULTS.replace("NAME", "01_done"))
    stopped = write_notebook(tmp_path / "02_stopped.ipynb", "x = 1")
    def stop_at_the_second(notebook, executed, parameters, **kwargs):  # the first one finishes, without a kernel
        if notebook == stopped:
            raise KeyboardInterrupt  # Ctrl-C, or the machine's own time limit
        Results("01_done", parameters["results_path"], env={}).write()
        return {"status": "ok", "duration_s": 0.1}

    monkeypatch.setattr(cli, "execute_one", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        cli.run_notebooks([done, stopped], tmp_path / "out", {}, quick=True, probe=False, log=lambda *_: None)
    summary = report.read_summary(tmp_path / "out")
    assert list(summary["notebooks"]) == ["01_done"] and summary["finished"] == ""
    assert "a stop before the end" in report.build_report(tmp_path / "out")


def test_what_you_measured_goes_from_each_results_file_into_the_summary_and_the_report(tmp_path, monkeypatch):
    said = ["Matrix products ran at 1.5 GFLOP/s here.", "Copies moved 2.5 GB/s."]
    new = write_notebook(tmp_path / "01_says.ipynb", "")
    old = write_notebook(tmp_path / "02_old.ipynb", "")

    def executes(notebook, executed, parameters, **kwargs):  # what the notebooks would write, without a kernel
        if notebook == new:
            res = Results("01_says", parameters["results_path"], env={})
            res.summary = said
            res.write()
        else:  # a results file from before "What you measured" existed
            Path(parameters["results_path"]).write_text(json.dumps(
                {"notebook": "02_old", "env": {}, "metrics": {}, "checks": {}, "skipped": {}}))
        return {"status": "ok", "duration_s": 0.1}

    monkeypatch.setattr(cli, "execute_one", executes)
    cli.run_notebooks([new, old], tmp_path / "out", {}, quick=True, probe=False, log=lambda *_: None)
    summary = report.read_summary(tmp_path / "out")
    assert summary["notebooks"]["01_says"]["summary"] == said and summary["notebooks"]["02_old"]["summary"] == []
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<li>Matrix products ran at 1.5 GFLOP/s here.</li><li>Copies moved 2.5 GB/s.</li>" in page
    assert page.count("What you measured") == 1  # not for the notebook that said nothing


def test_a_teacher_sees_the_class_progress_and_a_page_of_it(tmp_path, capsys):
    from labkit import exercises

    first, second = list(exercises.EXERCISES)[:2]
    learners = tmp_path / "class"
    # a folder their $LABKIT_PROGRESS points into, a home folder, a broken file, a learner who has not started
    (learners / "ana").mkdir(parents=True)
    (learners / "ana" / "progress.json").write_text(json.dumps(
        {"done": {first: "2026-12-06 10:00", second: "2026-12-06 10:20"}}))
    home = learners / "ben" / ".local" / "share" / "labkit"
    home.mkdir(parents=True)
    (home / "progress.json").write_text(json.dumps({"done": {second: "2026-12-06 11:00"}}))
    (learners / "cy").mkdir()
    (learners / "cy" / "progress.json").write_text("{not json")
    (learners / "dan").mkdir()
    page = tmp_path / "class.html"
    assert cli.main(["progress", "--class", str(learners), "--page", str(page)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("not counted: cy: ") and "could not be read" in lines[0]
    assert lines[1] == "not counted: dan: no progress file yet"
    rows = {line.split()[0]: line.split() for line in lines if line.strip()}
    total = len(exercises.EXERCISES)
    assert rows["ana"][:6] == ["ana", "2", "of", str(total), "2026-12-06", "10:20"]
    assert rows["ben"][:4] == ["ben", "1", "of", str(total)] and rows["ben"][-1] == first  # the next one for ben
    assert rows[first][1:4] == ["1", "of", "2"] and rows[second][1:4] == ["2", "of", "2"]
    shown = page.read_text()
    assert "2 learners" in shown and shown.count("<td>✓</td>") == 3 and "<td>ana</td>" in shown


def test_a_class_folder_that_is_not_there_is_one_sentence(tmp_path, capsys):
    assert cli.main(["progress", "--class", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["progress", "--page", str(tmp_path / "x.html")]) == 2
    assert "give --class FOLDER too" in capsys.readouterr().err
