"""labkit.parallel: the memory calculator against hand-computed values, device parsing, planning, commands."""

import pytest
import torch

from labkit import compat, parallel
from labkit.errors import BadParameter

GIB = 2**30


@pytest.fixture(scope="module")
def small():
    """A 2-layer Llama of 138,048 parameters (vocab 1000, hidden 64, MLP 128, 4 heads, 2 key/value heads), on meta."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


# By hand: embeddings 1000 x 64 = 64,000 (tied to the output layer); per layer q 64x64, k and v 64x32 each, o 64x64,
# gate/up/down 3 x 64x128 = 36,864 linear weights, plus 2 norms of 64; a final norm of 64; the rotary embedding
# keeps two buffers (inv_freq and original_inv_freq) of head_dim / 2 = 8 numbers each.
LINEAR = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)
OTHER = 64_000 + 2 * 128 + 64
BUFFER = 16


def test_parameter_count_by_hand(small):
    assert sum(p.numel() for p in small.parameters()) == LINEAR + OTHER == 138_048


def test_memory_needed_16_bit_by_hand(small):
    need = parallel.memory_needed(small, fmt="16-bit", batch=3, context=100)
    assert need["weights"] == 2 * (LINEAR + OTHER + BUFFER)
    # keys and values x 2 layers x batch 3 x 100 tokens x 2 kv heads x head size 16 x 2 bytes
    assert need["kv_cache"] == 2 * 2 * 3 * 100 * 2 * 16 * 2 == 76_800
    assert need["total"] == need["weights"] + need["kv_cache"]


def test_memory_needed_nf4_and_float32_by_hand(small):
    nf4 = parallel.memory_needed(small, fmt="nf4", batch=1, context=1)
    # half a byte per linear weight, one float32 scale per 64 of them; embeddings, norms, buffer in 16-bit
    assert nf4["weights"] == LINEAR // 2 + 4 * (LINEAR // 64) + 2 * (OTHER + BUFFER) == 170_144
    fp32 = parallel.memory_needed(small, batch=1, context=10, element_bytes=4)
    assert fp32["weights"] == 4 * (LINEAR + OTHER + BUFFER)
    assert fp32["kv_cache"] == 2 * 2 * 10 * 2 * 16 * 4
    with pytest.raises(BadParameter):
        parallel.memory_needed(small, context=0)


def test_measured_kv_cache_equals_the_calculator():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.inference_mode():
        output = model(input_ids=torch.randint(0, 100, (2, 7)), use_cache=True)
    assert parallel.cache_bytes(output) == parallel.memory_needed(model, batch=2, context=7, element_bytes=4)["kv_cache"]


@pytest.mark.parametrize("text, sizes", [
    ("2 x 24 GB", [24 * GIB] * 2), ("8x80GB", [80 * GIB] * 8), ("24 GB + 12 GiB", [24 * GIB, 12 * GIB]),
    ("1 × 40 GB, 512 MB", [40 * GIB, 512 * 2**20]), ("2*1.5 TB", [int(1.5 * 2**40)] * 2)])
def test_parse_devices(text, sizes):
    devices = parallel.parse_devices(text)
    assert [d["bytes"] for d in devices] == sizes
    assert [d["name"] for d in devices] == [f"gpu{i}" for i in range(len(sizes))]


@pytest.mark.parametrize("text", ["2 x", "abc", "0 x 24 GB", "24", "2 x 24 GB +", "-1 x 8 GB"])
def test_parse_devices_refuses_in_one_sentence(text):
    with pytest.raises(BadParameter, match="write devices like '2 x 24 GB'"):
        parallel.parse_devices(text)


def test_present_devices_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the empty list is for machines without one")
    assert parallel.parse_devices("present") == [] == parallel.devices_present()
    assert parallel.describe_devices([]) == "no GPU"
    assert parallel.describe_devices(parallel.parse_devices("2 x 24 GB + 12 GB")) == "2 x 24 GiB + 1 x 12 GiB"


def test_devices_needed_and_fit():
    assert parallel.devices_needed(100 * GIB, 24 * GIB) == 5  # 100 / (0.9 x 24) = 4.6
    assert parallel.devices_needed(100 * GIB, 24 * GIB, usable=1.0) == 5
    assert parallel.devices_needed(GIB, 24 * GIB) == 1
    need = {"weights": 40 * GIB, "kv_cache": 2 * GIB, "total": 42 * GIB}
    verdict = parallel.fit(need, parallel.parse_devices("2 x 24 GB"))
    assert verdict == {"one_device": False, "all_devices": True, "devices_needed": 2, "share_per_device": 21 / 24}
    assert parallel.fit(need, [])["devices_needed"] is None


def test_plans_cover_every_parameter_and_balance(small):
    blocks = parallel.blocks(small)
    assert blocks == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head"]
    one = parallel.plan_device_map(small, parallel.parse_devices("1 x 1 GB"))
    assert set(one.values()) == {0} and parallel.unplaced(small, one) == []
    # 16-bit: 276 kB of weights; a device of 200 kB holds only part, the rest goes to the CPU
    tight = parallel.plan_device_map(small, [{"name": "gpu0", "bytes": 200_000}], usable=1.0)
    assert "cpu" in tight.values() and parallel.unplaced(small, tight) == []
    # the same model in nf4 is small enough for that device
    assert set(parallel.plan_device_map(small, [{"name": "gpu0", "bytes": 200_000}], fmt="nf4", usable=1.0).values()) == {0}
    two = parallel.plan_device_map(small, parallel.parse_devices("2 x 1 GB"))
    layers = {row["block"]: row["device"] for row in parallel.placement(small, two)}
    assert {layers["model.layers.0"], layers["model.layers.1"]} <= {0, 1}
    sequential = parallel.plan_device_map(small, parallel.parse_devices("2 x 1 GB"), strategy="sequential")
    assert set(sequential.values()) == {0}
    with pytest.raises(BadParameter):
        parallel.plan_device_map(small, [], strategy="round-robin")


def test_device_of_takes_the_longest_prefix():
    device_map = {"model": 0, "model.layers.1": 1, "lm_head": "cpu"}
    assert parallel.device_of("model.layers.1.mlp.up_proj.weight", device_map) == 1
    assert parallel.device_of("model.layers.10.mlp.up_proj.weight", device_map) == 0
    assert parallel.device_of("lm_head.weight", device_map) == "cpu"
    assert parallel.device_of("other.weight", device_map) is None
    assert parallel.device_of("anything", {"": "cpu"}) == "cpu"


def test_placement_rows_count_bytes(small):
    rows = parallel.placement(small, {"": 0})
    assert rows[1] == {"block": "model.layers.0", "device": 0, "bytes": 2 * (LINEAR // 2 + 128)}
    assert rows[0] == {"block": "model.embed_tokens", "device": 0, "bytes": 2 * 64_000}


def test_tensor_parallel_sizes(small):
    parallel.check_tensor_parallel(small.config, 2)
    with pytest.raises(BadParameter, match="cannot split the model's 2 key/value heads evenly"):
        parallel.check_tensor_parallel(small.config, 4)
    with pytest.raises(BadParameter, match="4 attention heads"):
        parallel.check_tensor_parallel(small.config, 3)


def test_bus_bandwidth_as_nccl_tests():
    assert parallel.bus_bandwidth(1_000, 1e-6, 2) == {"algbw_bytes_per_s": 1e9, "busbw_bytes_per_s": 1e9}
    assert parallel.bus_bandwidth(1_000, 1e-6, 8)["busbw_bytes_per_s"] == pytest.approx(1.75e9)


def test_torchrun_commands():
    assert parallel.torchrun_command("scripts/tp.py", 2, {"model": "tiny-llama", "new_tokens": 4, "quick": True,
                                                          "verbose": False}) == \
        "torchrun --standalone --nproc-per-node 2 scripts/tp.py --model tiny-llama --new-tokens 4 --quick"
    assert parallel.torchrun_command("s.py", 8, nnodes=2, rdzv_endpoint="host:29500") == \
        "torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint host:29500 --rdzv-id labkit --nproc-per-node 8 s.py"
    with pytest.raises(BadParameter):
        parallel.torchrun_args("s.py", 0)


def test_threads_per_process(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert parallel.threads_per_process(2) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert parallel.threads_per_process(2) == 4 and parallel.threads_per_process(16) == 1


def test_launch_refuses_a_missing_script(tmp_path):
    with pytest.raises(BadParameter, match="does not exist"):
        parallel.launch(tmp_path / "nothing.py", 1)


def test_shapes_are_the_published_sizes():
    assert sum(p.numel() for p in parallel.empty_model("llama-8b-shape").parameters()) == 8_030_261_248


def test_job_models_need_a_tensor_parallel_plan(small):
    parallel.check_job_model("small", small.config)
    from transformers import BertConfig, OPTConfig

    for config in (OPTConfig(), BertConfig()):
        with pytest.raises(BadParameter, match=f"no tensor-parallel plan for {config.model_type} models"):
            parallel.check_job_model("x", config)


def test_placement_counts_tied_weights_once_and_in_the_format(small):
    sixteen = parallel.placement(small, {"": 0})
    assert sum(r["bytes"] for r in sixteen) == parallel.memory_needed(small, batch=1, context=1)["weights"]
    assert sixteen[-1] == {"block": "lm_head", "device": 0, "bytes": 0}  # tied to the embeddings, counted there
    nf4 = parallel.placement(small, {"": 0}, fmt="nf4")
    assert sum(r["bytes"] for r in nf4) == parallel.memory_needed(small, fmt="nf4", batch=1, context=1)["weights"]


def test_element_bytes_are_checked(small):
    with pytest.raises(BadParameter, match="element_bytes=3"):
        parallel.memory_needed(small, element_bytes=3)


def test_gpu_hiding_makes_transformers_pick_the_cpu(monkeypatch):
    monkeypatch.setattr(torch._C, "_get_accelerator", lambda check=None: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with compat.cpu_accelerator_without_gpus():
        assert torch._C._get_accelerator().type == "cpu"
    assert torch._C._get_accelerator().type == "cuda"
