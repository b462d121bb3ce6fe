"""The torchrun jobs of notebook 05, launched for real: 2 CPU processes over gloo (GPUs hidden), offline."""

import pytest

from labkit import generation, models, parallel
from labkit.errors import BadParameter

SCRIPTS = parallel.scripts_dir()


@pytest.fixture(scope="module")
def tensor_parallel_runs():
    args = {"model": "tiny-llama", "dtype": "float32", "new_tokens": 5, "repeats": 1}
    return {n: parallel.launch(SCRIPTS / "tp_generate.py", n, args, gpus=False, echo=False) for n in (1, 2)}


def test_tensor_parallel_tokens_equal_one_process(tensor_parallel_runs):
    one, two = tensor_parallel_runs[1], tensor_parallel_runs[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["backend"] == "gloo" and two["device"] == "cpu"
    assert len(two["token_ids"][0]) == 5 and two["token_ids"] == one["token_ids"]
    assert two["top_token_ids"] == one["top_token_ids"]
    assert two["top_logits"] == pytest.approx(one["top_logits"], abs=1e-5)


def test_tensor_parallel_splits_the_weights_and_runs_sdpa(tensor_parallel_runs):
    one, two = tensor_parallel_runs[1], tensor_parallel_runs[2]
    whole = one["parameter_bytes_per_rank"][0]
    assert len(two["parameter_bytes_per_rank"]) == 2
    assert all(0.45 * whole <= held <= 0.55 * whole for held in two["parameter_bytes_per_rank"])
    assert one["sdpa_backend"] and two["sdpa_backend"] and two["attn_implementation"] == "sdpa"
    assert two["tokens_per_s"] > 0 and two["step_ms"] > 0


def test_tensor_parallel_refuses_a_split_that_does_not_divide_the_heads():
    # checked before launching, in one sentence (tiny-llama has 2 key/value heads)
    with pytest.raises(BadParameter, match="3 processes cannot split the model's 4 attention heads"):
        parallel.check_tensor_parallel(parallel.model_config("tiny-llama"), 3)


def test_data_parallel_results_are_complete_in_order_and_equal_one_process():
    run = parallel.launch(SCRIPTS / "dp_generate.py", 2, {"model": "tiny-llama", "prompts": 5, "new_tokens": 3},
                          gpus=False, echo=False)
    assert run["world_size"] == 2 and run["backend"] == "gloo"
    assert [r["prompt"] for r in run["results"]] == list(range(5))
    assert [r["rank"] for r in run["results"]] == [0, 0, 0, 1, 1]  # consecutive shares, the first one larger
    model, tokenizer = models.load_model("tiny-llama", dtype="float32", attn_implementation="sdpa")
    for row in run["results"]:
        prompt = generation.random_prompt(model, batch=1, length=16, seed=row["prompt"])
        expected = generation.generate_exactly(model, prompt, 3, tokenizer=tokenizer)[0, 16:].tolist()
        assert row["token_ids"] == expected


def test_all_reduce_benchmark_reports_nccl_tests_bandwidths():
    run = parallel.launch(SCRIPTS / "allreduce_bench.py", 2, {"min_bytes": 1024, "max_mib": 1, "repeats": 2},
                          gpus=False, echo=False)
    assert run["world_size"] == 2 and run["backend"] == "gloo"
    assert [r["bytes"] for r in run["rows"]] == [1024 * 4**i for i in range(6)]
    for row in run["rows"]:
        seconds = row["median_us"] / 1e6
        assert row["algbw_bytes_per_s"] == pytest.approx(row["bytes"] / seconds)
        assert row["busbw_bytes_per_s"] == pytest.approx(row["algbw_bytes_per_s"])  # 2(n-1)/n = 1 for two ranks


def test_two_nodes_meet_at_a_rendezvous():
    run = parallel.launch_nodes(SCRIPTS / "allreduce_bench.py", 2, 1, {"max_mib": 1, "repeats": 1}, echo=False)
    assert run["world_size"] == 2 and run["rows"]


def test_a_failing_job_reports_its_last_lines(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n    raise RuntimeError('rank one broke on purpose')\n")
    with pytest.raises(parallel.LaunchFailed, match="rank one broke on purpose") as caught:
        parallel.launch(script, 2, gpus=False, echo=False)
    assert "broken.py with 2 processes failed" in str(caught.value)


def test_a_job_without_results_is_a_failure(tmp_path):
    script = tmp_path / "silent.py"
    script.write_text("print('done, but nothing written')\n")
    with pytest.raises(parallel.LaunchFailed, match="exit status 0"):
        parallel.launch(script, 1, gpus=False, echo=False)


def test_gpus_are_hidden_from_cpu_jobs(tmp_path):
    script = tmp_path / "where.py"
    script.write_text("import os, sys\nfrom labkit import parallel\n"
                      "parallel.write_from_rank0(sys.argv[-1], {'visible': os.environ.get('CUDA_VISIBLE_DEVICES')})\n")
    assert parallel.launch(script, 1, gpus=False, echo=False)["visible"] == ""


def test_tensor_parallel_on_cpu_processes_with_a_cuda_build_of_torch(tmp_path, monkeypatch):
    # A CUDA build names CUDA as its accelerator even with every GPU hidden; transformers then tried NCCL and failed.
    (tmp_path / "sitecustomize.py").write_text(
        "import torch\ntorch._C._get_accelerator = lambda check=None: torch.device('cuda')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    run = parallel.launch(SCRIPTS / "tp_generate.py", 2, {"model": "tiny-llama", "new_tokens": 2, "repeats": 1},
                          gpus=False, echo=False)
    assert run["backend"] == "gloo" and run["world_size"] == 2
