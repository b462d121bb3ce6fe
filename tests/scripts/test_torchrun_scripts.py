"""The torchrun jobs of notebook 05, launched for real: CPU processes over gloo (GPUs hidden), offline.

One launch of 2 processes runs the four one-machine layouts (as the notebook does); one two-node launch of 2 x 2
processes runs TP inside each node and PP across them; the smallest reproduction of transformers' error on that
combination runs alone.
"""

import pytest
from conftest import first_run_cache

from labkit import launcher, models
from labkit.paths import cache_dir

SCRIPTS = launcher.scripts_dir()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The job as a terminal launches it on a first run after `make install`: labkit's cache holds only SmolLM2, so its
    ranks save the model folders (tiny-llama, the layout models) before the process group starts."""
    args = {"layouts": ["tp", "pp", "ep", "dp"], "model": "tiny-llama", "dtype": "float32", "new_tokens": 4,
            "repeats": 1, "prompts": 5, "batch_in_flight": 3, "allreduce_max_mib": 1}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LABKIT_CACHE", str(first_run_cache(tmp_path_factory.mktemp("first-run") / "labkit")))
        run = launcher.launch(SCRIPTS / "layouts.py", 2, args, gpus=False, echo=False)
        run["models"] = {p.name for p in cache_dir().joinpath("models").iterdir() if models.complete(p)}
    return run


def test_a_first_launch_saves_complete_model_folders_before_the_process_group(layouts):
    assert {"smollm2-135m", "tiny-llama-seed0-float32", "layers-llama-seed0-float32",
            "tiny-moe-seed0-float32"} <= layouts["models"]


def test_one_launch_runs_every_layout_over_gloo(layouts):
    assert (layouts["world_size"], layouts["nodes"], layouts["backend"], layouts["device"]) == (2, 1, "gloo", "cpu")
    assert {"tp", "pp", "ep", "dp"} <= set(layouts)


def test_tensor_parallel_tokens_equal_one_process_with_half_the_weights_and_cache(layouts):
    tp = layouts["tp"]
    assert len(tp["token_ids"][0]) == 4 and tp["token_ids"] == tp["one_process_token_ids"]
    assert tp["top_logits"] == pytest.approx(tp["one_process_top_logits"], abs=1e-5)
    whole = tp["one_process_parameter_bytes"]
    assert all(0.45 * whole <= held <= 0.55 * whole for held in tp["parameter_bytes_per_rank"])
    # tiny-llama: 2 key/value heads, one per process, so each process caches half the keys and values
    assert tp["kv_cache_bytes_per_rank"] == [tp["one_process_kv_cache_bytes"] // 2] * 2
    # two all-reduces per layer (2 layers) and one for the vocabulary-split embedding; the logits gathered once
    assert tp["collectives_per_rank"][0] == {"allreduce_": 5, "allgather_into_tensor_coalesced_": 1}
    assert tp["sdpa_backend"] and tp["step_ms"] > 0


def test_pipeline_stages_hold_their_layers_and_give_one_process_tokens(layouts):
    pp = layouts["pp"]
    assert pp["layers_per_rank"] == [[0, 1], [2, 3]]
    assert all(held < pp["one_process_parameter_bytes"] for held in pp["parameter_bytes_per_rank"])
    assert [b["batch"] for b in pp["batches"]] == [1, 3]
    for b in pp["batches"]:
        assert b["token_ids"] == b["one_process_token_ids"] and len(b["token_ids"]) == b["batch"]
        assert all(0 < share < 1 for share in [*b["busy_share_per_rank"], b["one_process_busy_share"]])


def test_expert_parallel_shares_the_experts_and_names_its_collective(layouts):
    ep = layouts["ep"]
    auto, all_to_all = ep["implementations"]["auto"], ep["implementations"]["all_to_all"]
    assert ep["num_experts"] == 4 and auto["experts_per_rank"] == all_to_all["experts_per_rank"] == 2
    assert auto["token_ids"] == auto["one_process_token_ids"] == all_to_all["token_ids"]
    assert "alltoall_base_" not in auto["collectives_per_rank"][0]  # every rank holds the batch: an all-reduce
    assert all_to_all["collectives_per_rank"][0]["alltoall_base_"] == 6  # counts, tokens, results: per layer


def test_data_parallel_results_are_complete_in_order_and_equal_one_process(layouts):
    dp = layouts["dp"]
    assert [r["prompt"] for r in dp["results"]] == list(range(5))
    assert [r["rank"] for r in dp["results"]] == [0, 0, 0, 1, 1]  # consecutive shares, the first one larger
    assert [r["token_ids"] for r in dp["results"]] == dp["one_process_token_ids"]
    assert dp["seconds"] > 0 and dp["one_process_seconds"] > 0


def test_tp_inside_two_nodes_and_pp_across_them():
    run = launcher.launch(SCRIPTS / "layouts.py", 2, {"layouts": ["tp_pp"], "new_tokens": 3}, nodes=2, gpus=False,
                          echo=False)
    result = run["tp_pp"]
    assert (run["world_size"], run["nodes"]) == (4, 2) and result["sizes"] == {"tp_size": 2, "pp_size": 2}
    assert result["token_ids"] == result["one_process_token_ids"]
    assert result["stage_per_rank"] == [0, 0, 1, 1]
    stage_0, stage_1 = result["collectives_per_rank"][0], result["collectives_per_rank"][2]
    assert stage_0["send"] == 1 and stage_1["recv_"] == 1  # the pipeline: across the nodes
    assert stage_0["allreduce_"] == 3 and stage_1["allreduce_"] == 2  # TP: embedding + one layer; one layer
    # transformers 5.24's and 5.25's error on the plain call; when a release fixes it, drop compat.tp_plan_skips_other_stages
    assert result["plain_error"] == "KeyError: 'model.layers.1.self_attn.q_proj.weight'"


def test_the_smallest_reproduction_of_the_tp_pp_error():
    # whichever rank fails first: a layer of the other stage, or the embedding on the second stage's ranks
    with pytest.raises(launcher.LaunchFailed,
                       match=r"KeyError: 'model\.(layers\.\d+\.self_attn\.q_proj|embed_tokens)\.weight'"):
        launcher.launch(SCRIPTS / "tp_pp_keyerror.py", 4, gpus=False, echo=False)


def test_all_reduce_benchmark_reports_nccl_tests_bandwidths():
    run = launcher.launch(SCRIPTS / "allreduce_bench.py", 2, {"min_bytes": 1024, "max_mib": 1, "repeats": 2},
                          gpus=False, echo=False)
    assert run["world_size"] == 2 and run["backend"] == "gloo"
    assert [r["bytes"] for r in run["rows"]] == [1024 * 4**i for i in range(6)]
    for row in run["rows"]:
        seconds = row["median_us"] / 1e6
        assert row["algbw_bytes_per_s"] == pytest.approx(row["bytes"] / seconds)
        assert row["busbw_bytes_per_s"] == pytest.approx(row["algbw_bytes_per_s"])  # 2(n-1)/n = 1 for two ranks


def test_the_layouts_launch_also_times_all_reduce_as_the_benchmark_does(layouts):
    """Notebook 05 reads section 9's table from its largest layouts launch (one start of the processes fewer)."""
    rows = layouts["allreduce"]["rows"]
    assert [r["bytes"] for r in rows] == [256 * 4**i for i in range(7)]  # 256 bytes to 1 MiB, as allreduce_bench.py
    assert all(r["median_us"] > 0 and r["busbw_bytes_per_s"] == pytest.approx(r["algbw_bytes_per_s"]) for r in rows)


def test_a_failing_job_reports_its_last_lines(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n    raise RuntimeError('rank one broke on purpose')\n")
    with pytest.raises(launcher.LaunchFailed, match="rank one broke on purpose") as caught:
        launcher.launch(script, 2, gpus=False, echo=False)
    assert "broken.py with 2 processes failed" in str(caught.value)


def test_a_job_without_results_is_a_failure(tmp_path):
    script = tmp_path / "silent.py"
    script.write_text("print('done, but nothing written')\n")
    with pytest.raises(launcher.LaunchFailed, match="exit status 0"):
        launcher.launch(script, 1, gpus=False, echo=False)


def test_gpus_are_hidden_from_cpu_jobs(tmp_path):
    script = tmp_path / "where.py"
    script.write_text("import json, os, sys\n"
                      "open(sys.argv[-1], 'w').write(json.dumps({'visible': os.environ.get('CUDA_VISIBLE_DEVICES')}))\n")
    assert launcher.launch(script, 1, gpus=False, echo=False)["visible"] == ""


def test_tensor_parallel_on_cpu_processes_with_a_cuda_build_of_torch(tmp_path, monkeypatch):
    # A CUDA build names CUDA as its accelerator even with every GPU hidden; transformers then tried NCCL and failed.
    (tmp_path / "sitecustomize.py").write_text(
        "import torch\ntorch._C._get_accelerator = lambda check=None: torch.device('cuda')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    run = launcher.launch(SCRIPTS / "layouts.py", 2, {"layouts": ["tp"], "new_tokens": 2, "repeats": 1},
                          gpus=False, echo=False)
    assert run["backend"] == "gloo" and run["world_size"] == 2 and run["tp"]["token_ids"]
