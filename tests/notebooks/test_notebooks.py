"""Execute every notebook with papermill, quick parameters and the Hub offline; its own checks must pass."""

from pathlib import Path

import papermill
import pytest

from labkit.results import read_results

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_its_checks_pass(notebook, tmp_path, monkeypatch, guarded_kernels):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("IPYTHONDIR", guarded_kernels)  # deprecations are errors; no network
    results_path = tmp_path / f"{notebook.stem}.results.json"
    # with the exercises filled in by their solutions (nbval runs the stored notebooks, exercises unanswered)
    solutions = {"solutions": True} if "solutions" in papermill.inspect_notebook(str(notebook)) else {}
    papermill.execute_notebook(str(notebook), str(tmp_path / notebook.name), kernel_name="python3",
                               parameters={"quick": True, "results_path": str(results_path), **solutions},
                               cwd=str(notebook.parent), progress_bar=False)
    data = read_results(results_path)
    assert data["notebook"] == notebook.stem
    assert data["checks"], "a notebook must assert something about what it taught"
    failed = [name for name, passed in data["checks"].items() if not passed]
    assert not failed, f"checks failed: {failed}"
    assert all(isinstance(v, (int, float)) for v in data["metrics"].values())
    for what, why in data["skipped"].items():
        assert why.strip() and "\n" not in why, f"skip of {what!r} needs a one-line reason"
    for figure in data.get("figures", []):
        assert (tmp_path / figure).stat().st_size > 1000, f"figure {figure} was not saved"
    missing = [name for name in EXPECTED_METRICS.get(notebook.stem, []) if name not in data["metrics"]]
    assert not missing, f"metrics missing: {missing}"
    if solutions:
        assert data["checks"].get("exercise_solutions_pass") is True


FORMATS4 = ("16_bit", "fp4", "nf4", "nf4_double", "int8")
# Metrics the issues ask each notebook to report (quick sizes on CPU).
EXPECTED_METRICS = {
    "01_flash_attention": [f"sweep_{backend}_d{d}_{mask}_n{n}_{what}" for backend in ("math", "flash_attention")
                           for d in (64, 128) for mask in ("causal", "full") for n in (128, 256, 512)
                           for what in ("ms", "tflops", "fraction_of_ceiling", "peak_mib")]
                          + ["best_backend_tflops", "best_backend_fraction_of_ceiling"],
    "02_decoders_and_generation": [f"prefill_{m}_{i}_n{n}_{what}" for m in ("smollm2_135m", "tiny_opt")
                                   for i in ("eager", "sdpa") for n in (32, 128) for what in ("ms", "peak_mib")]
                                  + [f"decode_{m}_{i}_{what}" for m in ("smollm2_135m", "tiny_opt") for i in ("eager", "sdpa")
                                     for what in ("tokens_per_s", "fraction_of_bandwidth_bound")]
                                  + ["recipe_dynamic_cache_fraction_of_bandwidth_bound",
                                     "recipe_static_cache_fraction_of_bandwidth_bound",
                                     "recipe_hand_loop_fraction_of_bandwidth_bound", "batch1_tokens_per_s"],
    "03_encoder_fastpath": ["to_fastpath_max_abs_difference", "embedding_similarity_max_difference"]
                           + [f"speedup_fastpath_vs_sdpa_b8_n128_pad{p}" for p in (0, 25, 50, 75)]
                           + [f"sweep_{i}_b8_n128_pad{p}_ms" for i in ("transformers_eager", "transformers_sdpa", "fastpath")
                              for p in (0, 25, 50, 75)],
    "04_quantization": [f"{what}_{f}" for what in ("perplexity", "kl_vs_16bit") for f in FORMATS4]
                       + [f"prefill_{f}_ms" for f in FORMATS4]
                       + [f"decode_{f}_batch{b}_{what}" for f in FORMATS4 for b in (1, 8)
                          for what in ("tokens_per_s", "fraction_of_bound")]
                       + [f"footprint_{f}_mib" for f in FORMATS4],
    "05_multi_gpu": [f"{job}_{n}_{what}" for job in ("tp", "dp") for n in (1, 2) for what in ("tokens_per_s", "speedup")]
                    + ["tp_2_top_logit_gap", "allreduce_best_busbw_gb_per_s", "allreduce_fraction_of_copy",
                       "plan_llama_70b_shape_16_bit_total_gib", "plan_llama_70b_shape_nf4_total_gib",
                       "tp_predicted_communication_ms_per_token"],
}


BAD_PARAMETERS = {
    "00_setup_and_probes": ({"matmul_size": -1}, "matmul_size=-1"),
    "01_flash_attention": ({"seq_lengths": [0, 128]}, "seq_lengths[0]=0"),
    "02_decoders_and_generation": ({"new_tokens": 1}, "new_tokens=1"),
    "03_encoder_fastpath": ({"padding_fractions": [0.5, 1.5]}, "padding_fractions=[0.5, 1.5]"),
    "04_quantization": ({"formats": ["nf4", "int4"]}, "format 'int4' is unknown"),
    "05_multi_gpu": ({"plan_devices": ["2 x 24 GB", "two big GPUs"]}, "devices='two big GPUs'"),
}


@pytest.mark.notebook
@pytest.mark.parametrize("stem", sorted(BAD_PARAMETERS))
def test_a_bad_parameter_stops_the_notebook_early_in_one_sentence(stem, tmp_path, monkeypatch, guarded_kernels):
    monkeypatch.setenv("IPYTHONDIR", guarded_kernels)
    parameters, named = BAD_PARAMETERS[stem]
    notebook = ROOT / "notebooks" / f"{stem}.ipynb"
    with pytest.raises(papermill.PapermillExecutionError) as caught:
        papermill.execute_notebook(str(notebook), str(tmp_path / "out.ipynb"), kernel_name="python3",
                                   parameters={"quick": True, **parameters}, cwd=str(notebook.parent),
                                   progress_bar=False)
    error = caught.value
    assert error.ename == "BadParameter" and named in error.evalue
    assert error.exec_count <= 3, "bad parameters must be caught in the first cells"
    assert len(error.traceback) == 1, "one sentence, not a traceback"


@pytest.mark.notebook
def test_the_test_kernels_refuse_the_network_and_fail_on_deprecations(tmp_path, monkeypatch, guarded_kernels):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 443), timeout=3)\n"
                                          "except ConnectionRefusedError as error:\n    refused = str(error)\n"
                                          "assert 'the tests run offline' in refused"),
                nbformat.v4.new_code_cell("import warnings\nwarnings.warn('a deprecated call', FutureWarning)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "canary.ipynb")
    monkeypatch.setenv("IPYTHONDIR", guarded_kernels)
    with pytest.raises(papermill.PapermillExecutionError) as caught:
        papermill.execute_notebook(str(tmp_path / "canary.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
                                   progress_bar=False)
    assert caught.value.ename == "FutureWarning" and caught.value.exec_count == 2
