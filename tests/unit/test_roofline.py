import json

import pytest
import torch

from labkit import models, roofline
from labkit.errors import BadParameter


def test_element_size():
    assert roofline.element_size("bf16") == 2 and roofline.element_size("float32") == 4


def test_measured_ceilings_on_cpu_are_positive():
    ceilings = roofline.measure_ceilings("cpu", "float32", matmul_size=128, copy_megabytes=4)
    assert ceilings["matmul"]["flops"] == 2 * 128**3
    assert ceilings["matmul_flops_per_s"]["float32"] > 0 and ceilings["copy_bytes_per_s"] > 0
    assert ceilings["copy"]["bytes"] == 2 * 4 * 2**20


def _ceilings(dtype="float32", flops=100.0, copy=10.0, quick=False, label="cpu-test", size=64):
    return {"device": "cpu", "device_label": label, "quick": quick, "matmul_flops_per_s": {dtype: flops},
            "copy_bytes_per_s": copy, "matmul": {"size": size}, "measured_at": "now"}


def test_measured_ceilings_are_saved_per_device_and_dtypes_accumulate(tmp_path):
    path = tmp_path / "ceilings.json"
    first = roofline.measure_ceilings("cpu", "float32", matmul_size=64, copy_megabytes=1)
    second = roofline.measure_ceilings("cpu", "bfloat16", matmul_size=64, copy_megabytes=1)
    roofline.save_ceilings(first, path)
    roofline.save_ceilings(second, path)
    stored = roofline.load_ceilings("cpu", path)
    assert set(stored["matmul_flops_per_s"]) == {"float32", "bfloat16"}
    assert stored["copy_bytes_per_s"] == max(first["copy_bytes_per_s"], second["copy_bytes_per_s"])
    assert list(json.loads(path.read_text())) == [first["device_label"]]


def test_a_saved_ceiling_is_the_highest_measured(tmp_path):
    path = tmp_path / "ceilings.json"
    roofline.save_ceilings(_ceilings(flops=100.0, copy=10.0), path)
    roofline.save_ceilings(_ceilings(flops=80.0, copy=12.0), path)
    stored = json.loads(path.read_text())["cpu-test"]
    assert stored["matmul_flops_per_s"]["float32"] == 100.0 and stored["copy_bytes_per_s"] == 12.0


def test_quick_sizes_raise_a_matmul_ceiling_but_never_replace_a_full_copy_ceiling(tmp_path):
    path = tmp_path / "ceilings.json"
    roofline.save_ceilings(_ceilings(flops=100.0, copy=10.0, size=1024), path)
    roofline.save_ceilings(_ceilings(flops=150.0, copy=50.0, quick=True, size=512), path)
    stored = json.loads(path.read_text())["cpu-test"]
    assert stored["matmul_flops_per_s"]["float32"] == 150.0
    assert stored["copy_bytes_per_s"] == 10.0 and stored["quick"] is False and stored["matmul"]["size"] == 1024
    roofline.save_ceilings(_ceilings(quick=True), tmp_path / "only-quick.json")
    assert json.loads((tmp_path / "only-quick.json").read_text())["cpu-test"]["quick"] is True


def test_compute_ceiling_measures_now_and_keeps_the_best(tmp_path):
    path = tmp_path / "ceilings.json"
    first = roofline.compute_ceiling("cpu", "float32", quick=True, path=path)
    assert first["flops_per_s"] > 0 and "measured now" in first["source"]
    label = roofline.load_ceilings("cpu", path)["device_label"]
    roofline.save_ceilings(_ceilings(flops=1e18, label=label), path)
    second = roofline.compute_ceiling("cpu", "float32", quick=True, path=path)
    assert second["flops_per_s"] == 1e18 and "best saved" in second["source"]


def test_no_ceilings_yet(tmp_path):
    assert roofline.load_ceilings("cpu", tmp_path / "none.json") is None


def test_default_sizes_shrink_when_quick():
    assert roofline.default_sizes("cpu", quick=True)["matmul_size"] < roofline.default_sizes("cpu")["matmul_size"]
    assert roofline.default_sizes("cuda:0")["matmul_size"] > roofline.default_sizes("cpu")["matmul_size"]


class _Config:
    num_hidden_layers = 2
    num_attention_heads = 4
    num_key_value_heads = 2
    hidden_size = 64


def test_kv_cache_bytes_by_hand():
    # 2 (K and V) x 2 layers x batch 3 x 10 tokens x 2 KV heads x head size 16 x 2 bytes
    assert roofline.kv_cache_bytes(_Config(), batch=3, context=10, dtype="float16") == 2 * 2 * 3 * 10 * 2 * 16 * 2
    config = _Config()
    config.num_key_value_heads = None  # no grouped-query attention: every head has its own K and V
    config.head_dim = 32
    assert roofline.kv_cache_bytes(config, batch=1, context=1, dtype="float32") == 2 * 2 * 1 * 1 * 4 * 32 * 4
    with pytest.raises(BadParameter):
        roofline.kv_cache_bytes(_Config(), batch=0, context=10)


def test_decode_bound_by_hand():
    # 1 TB/s over 2 GB of weights and 0.5 GB of cache: 400 steps/s; a batch of 8 gives 8 tokens per step
    assert roofline.decode_bound_tokens_per_s(1e12, 2 * 10**9, 5 * 10**8) == pytest.approx(400.0)
    assert roofline.decode_bound_tokens_per_s(1e12, 2 * 10**9, 5 * 10**8, batch=8) == pytest.approx(3200.0)
    with pytest.raises(BadParameter):
        roofline.decode_bound_tokens_per_s(0, 10)
    with pytest.raises(BadParameter):
        roofline.decode_bound_tokens_per_s(1e9, 10, -1)


def test_weight_bytes_count_tied_embeddings_once_and_untied_input_rows_only():
    class Tiny(torch.nn.Module):
        def __init__(self, tied):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 8)
            self.body = torch.nn.Linear(8, 8, bias=False)
            self.head = torch.nn.Linear(8, 100, bias=False)
            if tied:
                self.head.weight = self.embed.weight

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.head

    tied, untied = Tiny(True), Tiny(False)
    assert roofline.parameter_bytes(tied) == (100 * 8 + 8 * 8) * 4
    assert roofline.weight_bytes_per_token(tied) == (100 * 8 + 8 * 8) * 4
    assert roofline.parameter_bytes(untied) == (100 * 8 * 2 + 8 * 8) * 4
    assert roofline.weight_bytes_per_token(untied) == (8 + 8 * 8 + 100 * 8) * 4  # one embedding row, body, head


def test_bandwidth_ceiling_measures_a_full_buffer_and_keeps_the_best(tmp_path, monkeypatch):
    path = tmp_path / "ceilings.json"
    monkeypatch.setattr(roofline, "default_sizes", lambda device, quick=False: {"matmul_size": 64, "copy_megabytes": 8})
    first = roofline.bandwidth_ceiling("cpu", path=path)
    assert first["bytes_per_s"] > 0 and "8 MiB copy measured now" in first["source"]
    stored = roofline.load_ceilings("cpu", path)
    assert stored["copy_bytes_per_s"] == first["bytes_per_s"] and stored["quick"] is False
    stored_label = stored["device_label"]
    roofline.save_ceilings({"device_label": stored_label, "quick": False, "matmul_flops_per_s": {},
                            "copy_bytes_per_s": 1e18}, path)
    assert roofline.bandwidth_ceiling("cpu", path=path)["bytes_per_s"] == 1e18


def test_byte_counts_of_a_real_tied_model_and_on_the_meta_device():
    model, _ = models.load_model("tiny-llama")
    by_hand = sum(p.numel() for p in model.parameters()) * 4 + sum(b.numel() * b.element_size() for b in model.buffers())
    assert roofline.parameter_bytes(model) == by_hand == roofline.weight_bytes_per_token(model)
    # tiny-llama: 2 layers, 2 KV heads of size 16, float32: 2 x 2 x batch x context x 2 x 16 x 4 bytes
    assert roofline.kv_cache_bytes(model.config, batch=3, context=5, dtype=model.dtype) == 2 * 2 * 3 * 5 * 2 * 16 * 4
    with torch.device("meta"):
        meta = type(model)(model.config)
    assert roofline.parameter_bytes(meta) == roofline.parameter_bytes(model)



def _cache_bytes_measured(config, tokens: int) -> int:
    """Bytes of transformers' own cache after a forward pass of ``tokens`` tokens (batch 2), every layer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.inference_mode():
        cache = model(torch.randint(0, config.vocab_size, (2, tokens)), use_cache=True).past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("tokens", [10, 40], ids=["inside the window", "past the window"])
@pytest.mark.parametrize("kind", ["gemma3: 2 sliding, 1 global", "mistral: all sliding", "deepseek-v3: MLA"])
def test_the_kv_formula_is_what_transformers_caches(kind, tokens):
    from transformers import DeepseekV3Config, Gemma3TextConfig, MistralConfig

    config = {
        "gemma3: 2 sliding, 1 global": lambda: Gemma3TextConfig(**TINY, num_hidden_layers=6, head_dim=16,
                                                                  sliding_window=16, sliding_window_pattern=3),
        "mistral: all sliding": lambda: MistralConfig(**TINY, num_hidden_layers=2, sliding_window=16),
        "deepseek-v3: MLA": lambda: DeepseekV3Config(**{**TINY, "num_key_value_heads": 4}, num_hidden_layers=2,
                                                     moe_intermediate_size=32, kv_lora_rank=32, q_lora_rank=48,
                                                     qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                                                     n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                                     topk_group=1, first_k_dense_replace=1),
    }[kind]()
    expected = roofline.kv_cache_bytes(config, batch=2, context=tokens, dtype=torch.float32)
    assert _cache_bytes_measured(config, tokens) == expected


def test_mla_caches_one_latent_and_one_rotary_key_per_layer_as_published():
    """DeepSeek-V2 paper (arXiv 2405.04434), table 1: MLA caches (d_c + d_h^R) elements per token and layer;
    DeepSeek-V3's shapes (transformers' DeepseekV3Config defaults): d_c = 512, d_h^R = 64, 61 layers."""
    from transformers import DeepseekV3Config

    config = DeepseekV3Config()
    assert (config.kv_lora_rank, config.qk_rope_head_dim, config.num_hidden_layers) == (512, 64, 61)
    assert roofline.kv_cache_bytes(config, batch=1, context=1, dtype=torch.bfloat16) == 61 * (512 + 64) * 2
    # the heads' full keys (128 + 64 per head) and values (128 per head) would be 71x larger
    as_mha = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * 61 * 2
    assert round(as_mha / (61 * 576 * 2)) == 71


def test_a_sliding_window_cuts_the_cache_eightfold_at_32k_as_mistral_7b_reports():
    """Mistral 7B paper (arXiv 2310.06825), section 2: with a window of 4096, "for a sequence length of 32k tokens,
    this reduces the cache memory usage by 8x"."""
    from transformers import MistralConfig

    sliding, full = MistralConfig(sliding_window=4096), MistralConfig(sliding_window=None)
    ratio = roofline.kv_cache_bytes(full, batch=1, context=32768) / roofline.kv_cache_bytes(sliding, batch=1,
                                                                                             context=32768)
    assert ratio == pytest.approx(8, rel=1e-3)
    assert roofline.kv_cache_bytes(sliding, batch=1, context=4000) == roofline.kv_cache_bytes(full, batch=1,
                                                                                               context=4000)


@pytest.mark.parametrize("new_tokens", [4, 60], ids=["inside the window", "past the window"])
def test_exercise_02_5_predicts_what_the_kv_formula_counts(new_tokens):
    """Notebook 02's exercise 02.5 (a Gemma-3-like 5 sliding : 1 global mix) is the one KV formula, by hand."""
    from transformers import Gemma3TextConfig

    from labkit.exercises.decoders import sliding_cache_kib

    config = Gemma3TextConfig(**TINY, num_hidden_layers=6, head_dim=16, sliding_window=32)
    assert config.layer_types.count("sliding_attention") == 5
    predicted = sliding_cache_kib(layers=6, sliding_layers=5, window=32, kv_heads=2, head_dim=16, prompt_tokens=20,
                                  new_tokens=new_tokens, bytes_per_element=4)
    assert predicted * 1024 == roofline.kv_cache_bytes(config, batch=1, context=20 + new_tokens - 1, dtype="float32")
