"""labkit.parallel: the memory calculator against hand-computed values, device parsing, planning, commands, the
notebook's parameters."""

import importlib.util
import re
from dataclasses import MISSING

import pytest
import torch

from labkit import compat, footprint, launcher, models, outputs, parallel
from labkit.errors import BadParameter
from labkit.exercises import multi_gpu

GIB = 2**30


def script(name: str):
    """A torchrun script of notebooks/scripts as a module (its main() does not run)."""
    spec = importlib.util.spec_from_file_location(name, launcher.scripts_dir() / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
# keeps two float32 buffers (inv_freq and original_inv_freq) of head_dim / 2 = 8 numbers each.
LINEAR = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)
OTHER = 64_000 + 2 * 128 + 64
BUFFER = 16
LINEAR_LAYERS = 2 * 7


def test_parameter_count_by_hand(small):
    assert sum(p.numel() for p in small.parameters()) == LINEAR + OTHER == 138_048


def test_memory_needed_16_bit_by_hand(small):
    need = footprint.memory_needed(small, fmt="16-bit", batch=3, context=100)
    assert need["weights"] == 2 * (LINEAR + OTHER) + 4 * BUFFER
    # keys and values x 2 layers x batch 3 x 100 tokens x 2 kv heads x head size 16 x 2 bytes
    assert need["kv_cache"] == 2 * 2 * 3 * 100 * 2 * 16 * 2 == 76_800
    assert need["total"] == need["weights"] + need["kv_cache"]


def test_memory_needed_nf4_and_float32_by_hand(small):
    nf4 = footprint.memory_needed(small, fmt="nf4", batch=1, context=1)
    # half a byte per linear weight, one float32 absmax per 64 of them and a 16-entry float32 code table per layer;
    # embeddings and norms in 16-bit, the buffers in float32
    assert nf4["weights"] == LINEAR // 2 + 4 * (LINEAR // 64) + LINEAR_LAYERS * 16 * 4 + 2 * OTHER + 4 * BUFFER \
        == 171_072
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        wide = AutoModelForCausalLM.from_config(small.config, dtype=torch.float32)
    fp32 = footprint.memory_needed(wide, batch=1, context=10, kv_dtype=torch.float32)
    assert fp32["weights"] == 4 * (LINEAR + OTHER + BUFFER)
    assert fp32["kv_cache"] == 2 * 2 * 10 * 2 * 16 * 4
    with pytest.raises(BadParameter):
        footprint.memory_needed(small, context=0)


def test_measured_kv_cache_equals_the_calculator():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.inference_mode():
        output = model(input_ids=torch.randint(0, 100, (2, 7)), use_cache=True)
    assert footprint.cache_bytes(output) == footprint.memory_needed(model, batch=2, context=7, kv_dtype=torch.float32)["kv_cache"]


@pytest.mark.parametrize("text, sizes", [
    ("2 x 24 GB", [24 * GIB] * 2), ("8x80GB", [80 * GIB] * 8), ("24 GB + 12 GiB", [24 * GIB, 12 * GIB]),
    ("1 × 40 GB, 512 MB", [40 * GIB, 512 * 2**20]), ("2*1.5 TB", [int(1.5 * 2**40)] * 2)])
def test_parse_devices(text, sizes):
    devices = footprint.parse_devices(text)
    assert [d["bytes"] for d in devices] == sizes
    assert [d["name"] for d in devices] == [f"gpu{i}" for i in range(len(sizes))]


@pytest.mark.parametrize("text", ["2 x", "abc", "0 x 24 GB", "24", "2 x 24 GB +", "-1 x 8 GB"])
def test_parse_devices_refuses_in_one_sentence(text):
    with pytest.raises(BadParameter, match="write devices like '2 x 24 GB'"):
        footprint.parse_devices(text)


def test_present_devices_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the empty list is for machines without one")
    assert footprint.parse_devices("present") == [] == footprint.devices_present()
    assert footprint.describe_devices([]) == "no GPU"
    assert footprint.describe_devices(footprint.parse_devices("2 x 24 GB + 12 GB")) == "2 x 24 GiB + 1 x 12 GiB"


def test_devices_needed():
    assert footprint.devices_needed(100 * GIB, 24 * GIB) == 5  # 100 / (0.9 x 24) = 4.6
    assert footprint.devices_needed(100 * GIB, 24 * GIB, usable=1.0) == 5
    assert footprint.devices_needed(GIB, 24 * GIB) == 1


def test_plans_place_every_block_and_balance(small):
    one = parallel.plan_device_map(small, footprint.parse_devices("1 x 1 GB"))
    assert [r["block"] for r in one] == \
        ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head"]
    assert {r["device"] for r in one} == {0}
    # 16-bit: 276 kB of weights; a device of 250 kB (225 kB usable, at 90%) holds part, the rest goes to the CPU
    tight = parallel.plan_device_map(small, [{"name": "gpu0", "bytes": 250_000}])
    assert {r["device"] for r in tight} == {0, "cpu"}
    # the same model in nf4 is small enough for that device
    assert {r["device"] for r in parallel.plan_device_map(small, [{"name": "gpu0", "bytes": 250_000}], fmt="nf4")} \
        == {0}
    two = {r["block"]: r["device"] for r in parallel.plan_device_map(small, footprint.parse_devices("2 x 1 GB"))}
    assert set(two.values()) == {0, 1}  # "auto" shares the model out between the GPUs (sequential would use one)
    with pytest.raises(BadParameter, match="int4"):
        parallel.plan_device_map(small, [], fmt="int4")


def test_device_of_takes_the_longest_prefix():
    device_map = {"model": 0, "model.layers.1": 1, "lm_head": "cpu"}
    assert parallel.device_of("model.layers.1.mlp.up_proj.weight", device_map) == 1
    assert parallel.device_of("model.layers.10.mlp.up_proj.weight", device_map) == 0
    assert parallel.device_of("lm_head.weight", device_map) == "cpu"
    assert parallel.device_of("other.weight", device_map) is None
    assert parallel.device_of("anything", {"": "cpu"}) == "cpu"


def test_plan_rows_count_bytes_as_accelerate_does(small):
    rows = parallel.plan_device_map(small, footprint.parse_devices("1 x 1 GB"))
    assert rows[1] == {"block": "model.layers.0", "device": 0, "bytes": 2 * (LINEAR // 2 + 128)}
    assert rows[0] == {"block": "model.embed_tokens", "device": 0, "bytes": 2 * 64_000}
    # the output layer is tied to the embeddings: counted once, there; buffers at 2 bytes too
    assert rows[-1]["bytes"] == 0 and sum(r["bytes"] for r in rows) == 2 * (LINEAR + OTHER + BUFFER)
    # nf4: half a byte per linear weight (accelerate's count: the scales are left to the planning margin)
    nf4 = parallel.plan_device_map(small, footprint.parse_devices("1 x 1 GB"), fmt="nf4")
    assert sum(r["bytes"] for r in nf4) == LINEAR // 2 + 2 * (OTHER + BUFFER)


def test_bus_bandwidth_as_nccl_tests():
    bench = script("allreduce_bench")
    assert bench.bus_bandwidth(1_000, 1e-6, 2) == {"algbw_bytes_per_s": 1e9, "busbw_bytes_per_s": 1e9}
    assert bench.bus_bandwidth(1_000, 1e-6, 8)["busbw_bytes_per_s"] == pytest.approx(1.75e9)


def test_torchrun_commands():
    assert launcher.torchrun_command("scripts/tp.py", 2, {"model": "tiny-llama", "new_tokens": 4, "quick": True,
                                                          "verbose": False}) == \
        "torchrun --standalone --nproc-per-node 2 scripts/tp.py --model tiny-llama --new-tokens 4 --quick"
    assert launcher.torchrun_command("s.py", 8, nnodes=2, rdzv_endpoint="host:29500") == \
        "torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint host:29500 --rdzv-id labkit --nproc-per-node 8 s.py"
    with pytest.raises(BadParameter):
        launcher.torchrun_args("s.py", 0)


def test_threads_per_process(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launcher.threads_per_process(2) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert launcher.threads_per_process(2) == 4 and launcher.threads_per_process(16) == 1


def test_launch_refuses_a_missing_script(tmp_path):
    with pytest.raises(BadParameter, match="does not exist"):
        launcher.launch(tmp_path / "nothing.py", 1)


def test_shapes_are_the_published_sizes():
    assert sum(p.numel() for p in models.empty_model("llama-8b-shape").parameters()) == 8_030_261_248


def test_gpu_hiding_makes_transformers_pick_the_cpu(monkeypatch):
    monkeypatch.setattr(torch._C, "_get_accelerator", lambda check=None: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with compat.cpu_accelerator_without_gpus():
        assert torch._C._get_accelerator().type == "cpu"
    assert torch._C._get_accelerator().type == "cuda"


def test_torchrun_commands_pass_lists_as_several_values():
    assert launcher.torchrun_command("layouts.py", 2, {"layouts": ["tp", "pp"], "new_tokens": 4}) == \
        "torchrun --standalone --nproc-per-node 2 layouts.py --layouts tp pp --new-tokens 4"


# --------------------------------------------------------------------------- machines typed in, and the planner's rule

def test_parse_machine_with_nodes():
    machine = footprint.parse_machine("2 nodes x 8 x 80 GB")
    assert (machine["nodes"], machine["per_node"], len(machine["devices"])) == (2, 8, 16)
    assert machine["devices"][-1] == {"name": "gpu15", "bytes": 80 * GIB}
    one = footprint.parse_machine("8x80GB")
    assert (one["nodes"], one["per_node"]) == (1, 8)
    assert footprint.parse_machine("1 node x 24 GB + 12 GB")["per_node"] == 2


@pytest.mark.parametrize("text, named", [("two big GPUs", "devices='two big GPUs'"),
                                         ("2 nodes x lots", "devices='lots'")])
def test_parse_machine_refuses_in_one_sentence(text, named):
    with pytest.raises(BadParameter, match=named):
        footprint.parse_machine(text)


def layout(model, machine, fmt="16-bit"):
    """The planner's rule, as exercise 05.4's solution writes it (the notebook's reveal cell writes the same rule)."""
    return multi_gpu.layout_for(model, machine, fmt, batch=1, context=4096)


def test_planner_one_gpu_when_it_holds_the_model():
    assert layout("llama-8b-shape", "8 x 80 GB") == (1, 1)
    assert layout("llama-70b-shape", "8 x 80 GB", "nf4") == (1, 1)  # 4-bit makes one 80 GB GPU enough for 70B


def test_planner_tp_divides_the_key_value_heads():
    # 16-bit llama-70b-shape needs 132.7 GiB; 45 GiB usable per 50 GB GPU: TP 3 would hold it but cannot divide
    # its 8 key/value heads, so the planner takes TP 4
    need = footprint.memory_needed(models.empty_model("llama-70b-shape"))["total"]
    assert need / 3 <= 50 * GIB * footprint.USABLE_FRACTION
    assert layout("llama-70b-shape", "6 x 50 GB") == (4, 1)


def test_planner_keeps_tp_inside_a_node_and_adds_stages_across_nodes():
    assert layout("llama-405b-shape", "2 nodes x 8 x 80 GB") == (8, 2)
    assert layout("llama-405b-shape", "8 x 80 GB") == (8, 2)  # 16 GPUs: more than this one node has
    tp, pp = layout("llama-405b-shape", "8 nodes x 2 x 80 GB")
    assert tp == 2 and tp * pp <= 16
    for machine in ("2 nodes x 8 x 80 GB", "8 nodes x 2 x 80 GB", "4 x 24 GB"):
        for name in ("llama-8b-shape", "llama-70b-shape", "llama-405b-shape"):
            tp, _ = layout(name, machine)
            assert tp <= footprint.parse_machine(machine)["per_node"] and 8 % tp == 0


# --------------------------------------------------------------------------- pieces of the jobs, in one process

def test_the_tp_and_pp_keyerror_and_its_workaround():
    """transformers 5.24's and 5.25's bug without any process group: applying a tensor-parallel plan to a pipeline stage looks up
    the weights of layers the stage replaced with placeholders."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.distributed import mixin
    from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.model.layers[1] = PipelineIdentityLayer()  # what stage 0 of 2 holds
    plan = {"model.layers.1.self_attn.q_proj.weight": "colwise", "model.layers.1.self_attn.q_proj": "colwise"}
    with pytest.raises(KeyError, match="model.layers.1.self_attn.q_proj.weight"):
        mixin.apply_tensor_parallelism(model, None, plan)
    with compat.tp_plan_skips_other_stages():
        assert mixin.apply_tensor_parallelism(model, None, plan) is model
    assert script("layouts").owned_layers(model) == [0]


def test_decode_rate_makes_exactly_the_calls_asked_and_busy_time_counts_layers():
    from labkit import models

    model, _ = models.load_model("tiny-llama", dtype="float32")
    prompt = outputs.random_prompt(model, batch=1, length=8)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    layouts = script("layouts")
    with layouts.busy_time(list(model.model.layers), "cpu") as busy:
        rate = layouts.decode_rate(model, prompt, new_tokens=3, repeats=2, warmup=1)
    handle.remove()
    assert len(calls) == 3 * 1 + 3 * 3  # 3 generate calls of 1 token, 3 of 3 tokens: one forward per token
    assert rate["token_ids"] == outputs.generate_exactly(model, prompt, 3)[:, 8:].tolist()
    assert rate["step_ms"] > 0 and busy["s"] > 0


# --------------------------------------------------------------------------- the notebook's parameters

@pytest.mark.parametrize("given, named", [
    ({"plan_devices": "2 x 24 GB"}, "plan_devices='2 x 24 GB': give a list"),
    ({"plan_devices": []}, "plan_devices=[]"),
    ({"plan_devices": ["2 x 24 GB", "two big GPUs"]}, "devices='two big GPUs'"),
    ({"plan_formats": ["int4"]}, "format 'int4' is unknown"),
    ({"context": 0}, "context=0"),
    ({"processes": [2, 0]}, "processes[1]=0"),
    ({"processes": [1]}, "processes=[1]: each layout splits a model over at least 2 processes"),
    ({"new_tokens": 1}, "new_tokens=1"),
    ({"allreduce_max_mib": -1}, "allreduce_max_mib=-1"),
    ({"model_id": "smollm2-135n"}, "smollm2-135n"),
    ({"model_id": "tiny-bert"}, "transformers has no tensor-parallel plan for bert models")])
def test_parameters_refuse_a_bad_value_in_one_sentence(given, named):
    from labkit.errors import LabkitError

    with pytest.raises(LabkitError, match=re.escape(named)):
        parallel.Parameters(**given).resolve(device="cpu", quick=True)


def test_parameters_defaults_are_the_notebook_cell():
    import ast
    from dataclasses import fields
    from pathlib import Path

    source = (Path(__file__).resolve().parents[2] / "notebooks" / "src" / "05_multi_gpu.py").read_text()
    cell = source.split('# %% tags=["parameters"]')[1].split("# %%")[0]
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell).body}
    typed = {f.name: f.default if f.default_factory is MISSING else f.default_factory()
             for f in fields(parallel.Parameters) if f.init}
    assert typed == {k: v for k, v in values.items() if k not in ("device", "quick", "solutions", "results_path")}
