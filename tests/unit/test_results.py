import json
import math

import pytest

from labkit import paths, probes, results
from labkit.errors import BadParameter, check_sizes
from labkit.results import Results, read_results


def test_results_file_follows_the_schema(tmp_path, capsys):
    res = results.Results("99_test", tmp_path / "out" / "r.json", env={"versions": {}})
    res.metric("tokens_per_s", 12.5)
    res.check("outputs_agree", True, "max diff 0")
    res.skip("flash-attn comparison", "flash-attn is not installed")
    printed = capsys.readouterr().out
    assert "outputs_agree" not in printed, "a claim that holds is recorded silently"
    assert "Skipped: flash-attn comparison -- flash-attn is not installed" in printed
    data = results.read_results(res.write())
    assert data == {"notebook": "99_test", "env": {"versions": {}}, "metrics": {"tokens_per_s": 12.5},
                    "checks": {"outputs_agree": True}, "observations": {},
                    "skipped": {"flash-attn comparison": "flash-attn is not installed"}, "tables": {}, "figures": [],
                    "summary": []}


def test_metrics_checks_and_skips_are_recorded_and_a_claim_that_fails_is_said(capsys):
    res = results.Results("99_test", env={})
    res.record({"a": 1.0, "b": None})
    res.check("holds", True)
    res.check("fails", False, "3 > 2")
    res.skip("gpu part", "no GPU here")
    assert res.metrics == {"a": 1.0} and res.checks == {"holds": True, "fails": False}
    printed = capsys.readouterr().out
    assert "Not seen on this machine: fails (3 > 2)." in printed and "Skipped: gpu part -- no GPU here" in printed


def test_figures_are_saved_beside_the_results_file(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    res = results.Results("99_test", tmp_path / "99_test.results.json", env={})
    res.figure("latency", fig)
    assert (tmp_path / "99_test.latency.png").read_bytes()[:4] == b"\x89PNG"
    assert results.read_results(res.write())["figures"] == ["99_test.latency.png"]
    unsaved = results.Results("99_test", env={})
    unsaved.figure("latency", fig)
    assert unsaved.figures == [] and list(tmp_path.glob("*.png")) == [tmp_path / "99_test.latency.png"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, True, "12", None])
def test_metrics_must_be_finite_numbers(bad):
    with pytest.raises(BadParameter):
        results.Results("99_test", env={}).metric("x", bad)


def test_failed_check_is_recorded_false(capsys):
    res = results.Results("99_test", env={})
    res.check("agree", 0)
    assert res.checks == {"agree": False} and "Not seen on this machine: agree." in capsys.readouterr().out


def test_no_path_writes_nothing():
    assert results.Results("99_test", env={}).write() is None


def test_read_results_rejects_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"notebook": "x"}))
    with pytest.raises(ValueError, match="missing"):
        results.read_results(path)


def test_environment_report():
    env = probes.environment()
    assert {"versions", "devices", "platform", "time"} <= set(env)
    items = [row["item"] for row in probes.environment_rows(env)]
    assert "torch" in items and "cpu" in items


def test_reference_runs(tmp_path):
    folder = tmp_path / "nvidia-h100"
    folder.mkdir()
    res = results.Results("00_setup_and_probes", folder / "00_setup_and_probes.results.json", env={})
    res.metric("copy_gb_per_s", 1.0)
    res.write()
    assert results.reference_runs("00_setup_and_probes", tmp_path)["nvidia-h100"]["metrics"] == {"copy_gb_per_s": 1.0}
    assert results.reference_runs("01_flash_attention", tmp_path) == {}


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path / "c"))
    assert paths.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_check_sizes_names_every_offender():
    check_sizes(0, a=0, b=3)
    with pytest.raises(BadParameter, match=r"a=-1, c=2\.5"):
        check_sizes(0, a=-1, b=1, c=2.5)
    with pytest.raises(BadParameter):
        check_sizes(1, flag=True)


def test_metric_name_from_words_and_values():
    assert results.metric_name("decode", "smollm2-135m", "sdpa", "tokens/s") == "decode_smollm2_135m_sdpa_tokens_s"
    assert results.metric_name("recipe", "hand loop, compiled step") == "recipe_hand_loop_compiled_step"


@pytest.mark.parametrize("content, problem", [
    ("not json at all", "not valid JSON"), ("[1, 2]", "not a JSON object"),
    ('{"notebook": "x", "env": {}, "metrics": {"a": "fast"}, "checks": {}, "skipped": {}}', "metric 'a' is not a number"),
    ('{"notebook": "x", "env": {}, "metrics": {}, "checks": {"ok": "yes"}, "skipped": {}}', "check 'ok' is not true"),
    ('{"notebook": "x", "env": {}, "metrics": {}, "checks": {}, "skipped": {"a": 3}}', "skip 'a' has no one-line reason"),
    ('{"notebook": "x", "env": [], "metrics": [], "checks": {}, "skipped": {}}', "must be objects"),
    ('{"notebook": "x", "env": {}, "metrics": {"a": NaN}, "checks": {}, "skipped": {}}', "metric 'a' is not finite"),
    ('{"notebook": "x", "env": {}, "metrics": {}, "checks": {}, "skipped": {}, "figures": ["../../etc/passwd"]}',
     "figures must be a list of file names"),
    ('{"notebook": "x", "env": {}, "metrics": {}, "checks": {}, "skipped": {}, "tables": {"t": {"columns": ["a"], '
     '"data": [[1, 2]]}}}', "tables must map names to {columns, data} with a value per column"),
])
def test_a_results_file_with_unexpected_content_is_rejected_clearly(tmp_path, content, problem):
    path = tmp_path / "x.results.json"
    path.write_text(content)
    with pytest.raises(BadParameter, match=problem):
        read_results(path)


def test_a_timing_claim_is_a_check_on_a_gpu_and_an_observation_on_a_cpu(tmp_path, capsys):
    gpu = Results("06_serving", tmp_path / "gpu.json", timing_checks=True)
    cpu = Results("06_serving", tmp_path / "cpu.json", timing_checks=False)
    for run in (gpu, cpu):
        run.check("tokens_equal", True)
        run.check("batching_raises_tokens_per_s", False, "1.0 vs 1.1", timing=True)
    assert gpu.checks == {"tokens_equal": True, "batching_raises_tokens_per_s": False} and not gpu.observations
    assert cpu.checks == {"tokens_equal": True} and cpu.observations == {"batching_raises_tokens_per_s": False}
    assert "Not seen this time: batching raises tokens per s (1.0 vs 1.1)" in capsys.readouterr().out
    cpu.write()
    assert read_results(tmp_path / "cpu.json")["observations"] == {"batching_raises_tokens_per_s": False}
