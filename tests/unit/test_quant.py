import math
from types import SimpleNamespace

import pytest
import torch

from labkit import footprint, outputs, quant
from labkit.errors import BadParameter, ModelNotAvailable

TORCHAO = quant.torchao_problem() == ""
needs_torchao = pytest.mark.skipif(not TORCHAO, reason="torchao is not importable here")


class TinyLM(torch.nn.Module):
    """An embedding, one hidden linear layer with bias, a norm and an output layer (tied when asked)."""

    def __init__(self, vocab=50, hidden=64, tied=False):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.body = torch.nn.Linear(hidden, 3 * hidden)
        self.norm = torch.nn.LayerNorm(3 * hidden)
        self.lm_head = torch.nn.Linear(3 * hidden, vocab, bias=False)
        if tied:
            self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
            self.lm_head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.lm_head


def test_footprint_prediction_by_hand():
    model = TinyLM().to(torch.bfloat16)
    embed, body_w, body_b, norm, head = 50 * 64, 192 * 64, 192, 2 * 192, 50 * 192
    kept = 2 * (embed + body_b + norm + head)  # everything but the body's weight: the output layer is not quantized
    assert footprint.predict_footprint(model, "16-bit") == {"kept": kept + 2 * body_w, "weights": 0, "scales": 0}
    # 4 bits a weight; a float32 absmax per 64 weights and the format's 16-entry float32 table
    assert footprint.predict_footprint(model, "nf4") == {"kept": kept, "weights": body_w // 2,
                                                     "scales": 4 * (body_w // 64) + 64}
    assert footprint.predict_footprint(model, "fp4") == footprint.predict_footprint(model, "nf4")
    # double: an 8-bit absmax per block, a float32 per 256 blocks, a 256-entry table, the offset, the 16-entry table
    assert footprint.predict_footprint(model, "nf4-double")["scales"] == body_w // 64 + 4 + 1024 + 4 + 64
    assert footprint.predict_footprint(model, "int8") == {"kept": kept, "weights": body_w, "scales": 4 * 192}
    assert footprint.predict_footprint(model, "torchao-int8") == {"kept": kept, "weights": body_w, "scales": 5 * 192}
    # int4: a bfloat16 scale and zero point per group of 64 along each row
    assert footprint.predict_footprint(model, "torchao-int4") == {"kept": kept, "weights": body_w // 2,
                                                              "scales": 192 * (64 // 64) * 2 * 2}
    assert footprint.predict_footprint(model, "torchao-float8")["scales"] == 4 * 192
    with pytest.raises(BadParameter, match="format 'int4' is unknown"):
        footprint.predict_footprint(model, "int4")


def test_a_tied_output_layer_is_counted_once_and_never_quantized():
    model = TinyLM(tied=True).to(torch.bfloat16)
    assert model.lm_head not in footprint.quantized_linears(model)
    assert footprint.predict_footprint(model, "nf4")["kept"] == 2 * (50 * 64 + 192 + 2 * 192)


def test_int4_layouts_and_group_sizes():
    assert footprint.int4_weight_only_parts(4096, 4096, group_size=128) == (8 * 2**20, 4096 * 32 * 4)
    # the GPU's tile-packed layout pads the columns to 1024 and the rows to 8
    assert footprint.int4_weight_only_parts(576, 576, group_size=64, device="cuda") == (576 * 1024 // 2, 576 * 16 * 4)
    assert footprint.weight_parts("torchao-int4", 576, 576, group_size=128) is None  # left in 16-bit: 576 % 128 != 0
    assert sum(footprint.four_bit_parts(4096 * 4096)) == 8 * 2**20 + 2**20 + 64


def test_formats_and_configs():
    assert footprint.library("nf4") == "bitsandbytes" and footprint.library("torchao-int4") == "torchao"
    assert quant.quantization_config("16-bit") is None
    nf4 = quant.quantization_config("nf4-double", "bfloat16")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert quant.quantization_config("int8").load_in_8bit
    with pytest.raises(BadParameter, match="not a bitsandbytes format"):
        quant.quantization_config("torchao-int8")


def test_bitsandbytes_4bit_defaults_to_fp4_and_float32():
    from transformers import BitsAndBytesConfig

    bare = BitsAndBytesConfig(load_in_4bit=True)  # what the source page's config leaves out
    assert bare.bnb_4bit_quant_type == "fp4" and bare.bnb_4bit_compute_dtype == torch.float32


@needs_torchao
def test_torchao_configs_pick_the_layout_of_the_device():
    cpu = quant.torchao_config("torchao-int4", "cpu")
    gpu = quant.torchao_config("torchao-int4", "cuda")
    assert type(cpu).__name__ == "PrototypeInt4WeightOnlyConfig" and cpu.group_size == footprint.INT4_GROUP_SIZE
    assert type(gpu).__name__ == "Int4WeightOnlyConfig" and gpu.int4_packing_format == "tile_packed_to_4d"
    assert type(quant.torchao_config("torchao-int8")).__name__ == "Int8WeightOnlyConfig"
    with pytest.raises(BadParameter, match="not a torchao format"):
        quant.torchao_config("nf4")


# --------------------------------------------------------------------------- the plan

def plan(quick=True, **given):
    parameters = quant.Parameters(**given)
    parameters.resolve(device="cpu", quick=quick)
    return parameters


@pytest.mark.parametrize("given, words", [
    ({"formats": ["nf4", "int4"]}, "format 'int4' is unknown"),
    ({"formats": "nf4"}, "give a list"),
    ({"eval_tokens": -5}, "eval_tokens=-5"),
    ({"new_tokens": 1}, "new_tokens=1"),
    ({"batch_sizes": [1, 0]}, "batch_sizes[1]=0"),
    ({"batch_sizes": 8}, "give a list of batch sizes"),
])
def test_a_bad_parameter_is_one_sentence(given, words):
    with pytest.raises(BadParameter) as caught:
        plan(**given)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_model_stops_the_plan(monkeypatch):
    monkeypatch.setattr(quant.models, "check_model", lambda name: f"{name} is not installed: pip install it")
    with pytest.raises(ModelNotAvailable, match="is not installed"):
        plan()


def test_the_parameters_are_sized_for_a_quick_cpu_run_and_say_what_they_leave_out(monkeypatch):
    monkeypatch.setattr(quant.probes, "bitsandbytes_4bit", lambda devices: [{"ok": True, "reason": ""}])
    found = plan(formats=["nf4", "16-bit", "torchao-float8", "torchao-int4"], batch_sizes=[8, 1, 8])
    assert found.formats[0] == "16-bit" and "torchao-float8" not in found.formats
    assert "torchao-float8" in found.skipped
    assert found.dtype == torch.bfloat16 and found.bnb_formats == ["nf4"]
    assert found.eval_tokens == 64 and found.new_tokens == 6 and found.batch_sizes == [1, 8]
    assert "quick sizes on a CPU" in found.compile_problem
    assert plan(quick=False).compile_problem == "" and plan(quick=False, eval_tokens=7).eval_tokens == 7
    assert quant.Parameters().formats == list(footprint.ALL_FORMATS)  # the parameters cell's defaults


def test_without_torchao_or_bitsandbytes_the_plan_keeps_the_rest(monkeypatch):
    monkeypatch.setattr(quant, "torchao_problem", lambda: "torchao is not installed (pip install torchao==0.18.0)")
    monkeypatch.setattr(quant.probes, "bitsandbytes_4bit",
                        lambda devices: [{"ok": False, "reason": "bitsandbytes is not installed"}])
    found = plan()
    assert found.formats == ["16-bit"] and found.torchao_formats == [] and found.bnb_formats == []
    skipped = found.skipped
    assert len(skipped) == 2 and all("\n" not in why for why in skipped.values())
    assert any("torchao" in what and "not installed" in why for what, why in skipped.items())
    assert any("bitsandbytes" in why for why in skipped.values())


@needs_torchao
@pytest.mark.parametrize("capability, dtype, dropped", [
    ((9, 0), torch.bfloat16, set()),
    ((8, 0), torch.bfloat16, {"torchao-float8"}),
    ((8, 9), torch.float16, {"torchao-int4", "torchao-float8"}),  # per-row float8 takes bfloat16 weights only
    ((7, 5), torch.float16, {"torchao-int4", "torchao-float8"}),
])
def test_which_torchao_formats_a_gpu_runs(monkeypatch, capability, dtype, dropped):
    monkeypatch.setattr(quant.torch.cuda, "get_device_capability", lambda device=None: capability)
    skipped, found = quant.unavailable_formats(list(footprint.TORCHAO_FORMATS), "cuda:0", dtype)
    assert found == dropped and set(skipped) == dropped
    assert all(f"{capability[0]}.{capability[1]}" in why for why in skipped.values())


# --------------------------------------------------------------------------- footprints counted

def test_prediction_matches_the_bytes_counted_on_a_real_model():
    from labkit import models, probes

    model, _ = models.load_model("tiny-llama", dtype="bfloat16")
    formats = ["16-bit"]
    if probes.import_bitsandbytes() is not None:
        formats += ["fp4", "nf4", "nf4-double", "int8"]
    if TORCHAO:
        formats += ["torchao-int8", "torchao-int4"]
    for name in formats:
        if footprint.library(name) == "bitsandbytes":
            quantized = models.load_model("tiny-llama", dtype="bfloat16",
                                          quantization_config=quant.quantization_config(name))[0]
        elif footprint.library(name) == "torchao":
            quantized = quant.torchao_quantized(model, name, "cpu")
        else:
            quantized = model
        counted = footprint.count_footprint(quantized)
        assert counted == footprint.predict_footprint(model, name), name
        if name.startswith("torchao"):  # a tensor subclass presents its 16-bit dtype: get_memory_footprint is wrong
            assert quantized.get_memory_footprint() == model.get_memory_footprint() > sum(counted.values())
        if name in ("nf4", "int8"):  # ... and bitsandbytes' scales live beside the parameters
            assert quantized.get_memory_footprint() == counted["kept"] + counted["weights"]


def test_int8_scales_are_still_counted_after_the_first_forward_pass():
    from labkit import models, probes

    if probes.import_bitsandbytes() is None:
        pytest.skip("bitsandbytes is not importable here")
    int8 = models.load_model("tiny-llama", dtype="bfloat16", quantization_config=quant.quantization_config("int8"))[0]
    before = footprint.count_footprint(int8)
    with torch.inference_mode():
        int8(input_ids=torch.tensor([[1, 2, 3]]))  # LLM.int8 moves each weight's row scales into its layer's state
    assert footprint.count_footprint(int8) == before and before["scales"] > 0


@needs_torchao
def test_a_real_layer_counts_as_the_exercise_formulas_say():
    from labkit.exercises import quantization as ex

    assert quant.layer_footprint_mib("torchao-int4", 4096, 1024, group_size=128) == ex.int4_mib(4096, 1024, 128)
    if quant.probes.import_bitsandbytes() is not None:
        assert quant.layer_footprint_mib("nf4", 1024, 1024) == ex.nf4_mib(1024, 1024, 64)


# --------------------------------------------------------------------------- quality

class Uniform(torch.nn.Module):
    """A 'model' whose next-token distribution is uniform over its vocabulary."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_perplexity_of_a_uniform_model_is_its_vocabulary_size():
    result = quant.score(Uniform(37), torch.randint(0, 37, (1, 100)), window=30)
    assert math.isclose(result["perplexity"], 37, rel_tol=1e-6) and math.isclose(result["mean_nll"], math.log(37), rel_tol=1e-6)
    assert result["tokens"] == 29 * 3 + 9  # each window predicts all but its first token
    with pytest.raises(BadParameter):
        quant.score(Uniform(5), torch.tensor([[1]]))


def test_kl_divergence():
    p = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert outputs.kl_divergence(p, p) == 0.0
    uniform, skewed = torch.zeros(1, 2), torch.log(torch.tensor([[0.75, 0.25]]))
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert math.isclose(outputs.kl_divergence(uniform, skewed), expected, rel_tol=1e-6)
    with pytest.raises(BadParameter):
        outputs.kl_divergence(torch.zeros(2, 3), torch.zeros(3, 3))


def test_a_score_against_itself_moved_nothing_and_one_pass_gives_both():
    from labkit import models

    model, tokenizer = models.load_model("tiny-llama", dtype="float32")
    ids = tokenizer(quant.sample_text(), return_tensors="pt").input_ids[:, :40]
    reference = quant.score(model, ids, window=16)
    assert reference["log_probs"].shape == (40, model.config.vocab_size) and reference["kl"] == 0.0
    again = quant.score(model, ids, reference=reference, window=16)
    assert abs(again["kl"]) < 1e-6 and math.isclose(again["perplexity"], reference["perplexity"], rel_tol=1e-5)
    assert again["mean_nll"] == pytest.approx(reference["mean_nll"], rel=1e-5)


def test_sample_text_is_shipped_and_long_enough():
    text = quant.sample_text()
    assert "public domain" in text and len(text.split()) > 1200


# --------------------------------------------------------------------------- speed

def test_a_step_reads_everything_but_the_untied_input_embeddings_rows_it_does_not_need():
    untied, tied = TinyLM(), TinyLM(tied=True)
    row_bytes = 64 * 4  # one float32 row of the input embeddings per token
    assert quant.step_bytes(untied) == sum(footprint.count_footprint(untied).values()) - 50 * 64 * 4 + row_bytes
    assert quant.step_bytes(tied) == sum(footprint.count_footprint(tied).values())  # the output layer reads all of it


def test_a_layer_narrower_than_bitsandbytes_cpu_blocks_skips_its_formats_with_the_reason(tmp_path, monkeypatch):
    """On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights in blocks of 32 output features and asserts
    they divide: a learner's tiny folder with a 16-wide key/value projection died at 04's first 4-bit forward."""
    import bitsandbytes.functional
    from transformers import MistralConfig

    folder = tmp_path / "narrow"
    MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, vocab_size=256).save_pretrained(folder)
    for cpu_kernel, expected in ((True, "layers of 16"), (False, "")):
        monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda cpu_kernel=cpu_kernel: cpu_kernel)
        problem = quant.bnb_cpu_packing_problem(str(folder), "cpu")
        assert (expected in problem) if expected else problem == ""
    monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: True)
    assert quant.bnb_cpu_packing_problem("smollm2-135m", "cpu") == ""  # 576, 192, 1536: multiples of 32
    assert quant.bnb_cpu_packing_problem(str(folder), "cuda:0") == ""
