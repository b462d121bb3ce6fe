"""labkit.lab: a notebook's opening (typed parameters, results record) and closing ("What you measured")."""

import types

import pytest
import torch

from labkit import exercises, lab, paths
from labkit.errors import BadParameter
from labkit.exercises import Exercise, predicted
from labkit.results import Results, read_results


def double(x):
    return 2 * x


DOUBLE = Exercise(id="99.1", title="twice x", kind="predict", checker=lambda answer, given: predicted(
    answer, double(given["x"]), "units", {"you gave x itself": given["x"]}), solution=double, hints=("twice",))


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A topic module for notebook 99_fake with typed parameters (a dataclass with the parameters cell's defaults and
    ``resolve``), which records what it was given."""
    from dataclasses import dataclass, field

    given = []

    @dataclass
    class Parameters:
        dtype: object = "auto"
        sizes: list = field(default_factory=list)  # empty: sized for the machine
        name: str = "tiny"

        def resolve(self, *, device: str, quick: bool) -> str:
            given.append({"device": device, "quick": quick, "sizes": self.sizes, "name": self.name})
            if any(s < 1 for s in self.sizes):
                raise BadParameter(f"sizes={self.sizes}: give whole numbers >= 1.")
            self.sizes = self.sizes or ([2, 4] if quick else [8, 16])
            self.dtype = torch.float32
            return f"Sizes {self.sizes}."

    module = types.SimpleNamespace(Parameters=Parameters, given=given)
    monkeypatch.setattr(lab, "topic", lambda notebook: module)
    monkeypatch.setattr(exercises, "get", lambda exercise_id: DOUBLE)
    monkeypatch.setenv("LABKIT_PROGRESS", str(tmp_path / "progress.json"))
    return module


def test_start_passes_the_cells_values_and_says_where_it_runs(fake, capsys):
    params = {"device": "auto", "quick": True, "name": "other", "unrelated": object(), "results_path": ""}
    opened = lab.start("99_fake", params)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert fake.given == [{"device": device, "quick": True, "sizes": [], "name": "other"}]  # defaults stay defaults
    said = capsys.readouterr().out
    assert said.startswith(f"Working on {device} (") and "in float32, quick sizes. Sizes [2, 4]." in said
    assert opened.p.sizes == [2, 4] and opened.p.name == "other"
    assert opened.dtype is torch.float32 and opened.dtype_name == "float32" and opened.quick and not opened.solutions
    assert opened.path is None and opened.env["versions"]["torch"] == torch.__version__
    assert lab.start("99_fake", {"quick": False, "sizes": [3]}).p.sizes == [3]
    assert lab.start("99_fake", {}).quick is not torch.cuda.is_available()  # quick left out: small sizes without a GPU


def test_a_bad_parameter_stops_the_notebook_in_one_sentence(fake):
    with pytest.raises(BadParameter) as caught:
        lab.start("99_fake", {"sizes": [0]})
    assert str(caught.value) == "sizes=[0]: give whole numbers >= 1." and "\n" not in str(caught.value)


def test_an_unknown_notebook_lists_the_notebooks():
    with pytest.raises(BadParameter, match="no notebook '42_nothing'; there are 00_setup_and_probes, "):
        lab.topic("42_nothing")


def test_checks_skips_and_metrics_go_to_the_results(fake, capsys):
    opened = lab.start("99_fake", {})
    capsys.readouterr()
    opened.check("holds", True)
    opened.check("does_not_hold", False, "2 > 1")
    opened.skip("the GPU part", "no GPU here")
    opened.metric("m", 1.5)
    opened.record({"n": 2, "not_measured": None})
    opened.check("a_timing_claim", False, "1.0 vs 1.1", timing=True)
    said = capsys.readouterr().out
    assert "Not seen on this machine: does not hold (2 > 1)." in said and "machine: holds" not in said  # silent
    assert "Skipped: the GPU part -- no GPU here" in said
    data = opened.as_dict()
    assert data["metrics"] == {"m": 1.5, "n": 2}
    assert data["checks"] == {"holds": True, "does_not_hold": False, **({"a_timing_claim": False} if opened.on_gpu else {})}
    assert data["skipped"] == {"the GPU part": "no GPU here"}


def test_finish_prints_what_you_measured_and_writes_the_results_with_it(fake, tmp_path, capsys):
    path = tmp_path / "99_fake.results.json"
    opened = lab.start("99_fake", {"results_path": str(path)})
    opened.metric("m", 1.5)
    opened.skip("one part", "why")
    capsys.readouterr()
    opened.finish([f"Measured {len(opened.metrics)} numbers; m was {opened.metrics['m']}."])
    said = capsys.readouterr().out.splitlines()
    assert said[0] == f"What you measured on {opened.device_label}:"
    assert said[1] == "- Measured 1 numbers; m was 1.5."
    assert said[2].startswith("(1 part skipped on this machine")
    written = read_results(path)
    assert written["summary"] == ["Measured 1 numbers; m was 1.5."] and written["metrics"] == {"m": 1.5}


def test_a_workshop_run_fills_in_the_solutions_and_records_that_they_pass(fake, tmp_path, capsys):
    path = tmp_path / "99_fake.results.json"
    opened = lab.start("99_fake", {"solutions": True, "results_path": str(path)})
    ex = opened.exercise("99.1", x=3)
    assert ex.check(None)  # the solution, filled in
    opened.finish([])
    assert read_results(path)["checks"] == {"exercise_solutions_pass": True}
    assert not (tmp_path / "progress.json").exists()  # a workshop run records no progress


def test_a_learners_run_counts_the_exercises_instead(fake, tmp_path, capsys):
    opened = lab.start("99_fake", {})
    opened.exercise("99.1", x=3).check(3)  # a typical mistake
    opened.exercise("99.1", x=5).check(10)
    opened.finish([])
    said = capsys.readouterr().out
    assert "you gave x itself" in said and "Exercises: 1 of 2 correct." in said
    assert "exercise_solutions_pass" not in opened.checks


def test_beside_references_puts_the_stored_runs_next_to_this_machine(fake, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(paths, "reference_dir", lambda: tmp_path / "reference")
    opened = lab.start("99_fake", {})
    opened.metric("m", 2.0)
    assert opened.beside_references({"the speed": "m"}) == [{"measured": "the speed", "this machine": 2.0}]
    assert "No results file of this notebook is stored under reference/" in capsys.readouterr().out
    stored = Results("99_fake", tmp_path / "reference" / "nvidia-h100" / "99_fake.results.json", env={})
    stored.metric("m", 8.0)
    stored.write()
    rows = opened.beside_references({"the speed": "m", "not measured here": "other"})
    assert rows == [{"measured": "the speed", "this machine": 2.0, "nvidia-h100": 8.0},
                    {"measured": "not measured here", "this machine": None, "nvidia-h100": None}]
    assert "No reference runs" not in capsys.readouterr().out


def test_a_table_is_shown_recorded_and_read_back_and_finish_prints_the_notebooks_lines(fake, tmp_path, capsys):
    import pandas as pd

    from labkit.results import table

    path = tmp_path / "99_fake.results.json"
    opened = lab.start("99_fake", {"results_path": str(path)})
    decode = pd.DataFrame({"model": ["a", "b"], "step ms": [2.0, 4.0]})
    decode["tokens/s"] = 1e3 / decode["step ms"]
    opened.table("decode", decode, title="Decode")
    opened.finish([f"{decode['tokens/s'].max():.0f} tokens/s at best."])
    said = capsys.readouterr().out
    assert "Decode\nmodel  step ms  tokens/s" in said and "- 500 tokens/s at best." in said
    written = read_results(path)
    assert written["summary"] == ["500 tokens/s at best."]
    pd.testing.assert_frame_equal(table(written, "decode"), decode)
    with pytest.raises(BadParameter, match="hold no table 'prefill'; they hold decode"):
        table(written, "prefill")
