import math
from types import SimpleNamespace

import pytest
import torch

from labkit import quant
from labkit.errors import BadParameter


class TinyLM(torch.nn.Module):
    """An embedding, one hidden linear layer with bias, a norm and a tied output layer."""

    def __init__(self, vocab=50, hidden=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.body = torch.nn.Linear(hidden, 3 * hidden)
        self.norm = torch.nn.LayerNorm(3 * hidden)
        self.lm_head = torch.nn.Linear(3 * hidden, vocab, bias=False)


def test_footprint_prediction_by_hand():
    model = TinyLM()
    embed, body_w, body_b, norm, head = 50 * 16, 48 * 16, 48, 2 * 48, 50 * 48
    assert quant.predict_footprint(model, "16-bit") == {"stored": 2 * (embed + body_w + body_b + norm + head), "constants": 0}
    sixteen = 2 * (embed + body_b + norm + head)  # everything but the body's weight (the output layer is skipped)
    assert quant.predict_footprint(model, "nf4") == {"stored": sixteen + body_w // 2, "constants": 4 * (body_w // 64)}
    assert quant.predict_footprint(model, "fp4") == quant.predict_footprint(model, "nf4")
    assert quant.predict_footprint(model, "nf4-double") == {"stored": sixteen + body_w // 2,
                                                            "constants": body_w // 64 + 4 * 1 + 1024}
    assert quant.predict_footprint(model, "int8") == {"stored": sixteen + body_w, "constants": 4 * 48}
    with pytest.raises(BadParameter, match="use one of 16-bit, fp4, nf4, nf4-double, int8"):
        quant.predict_footprint(model, "int4")


def test_quantization_configs():
    assert quant.quantization_config("16-bit") is None
    nf4 = quant.quantization_config("nf4-double", "bfloat16")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert quant.quantization_config("int8").load_in_8bit


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
    result = quant.perplexity(Uniform(37), torch.randint(0, 37, (1, 100)), window=30)
    assert math.isclose(result["perplexity"], 37, rel_tol=1e-6)
    assert result["tokens"] == 29 * 3 + 9  # each window predicts all but its first token
    with pytest.raises(BadParameter):
        quant.perplexity(Uniform(5), torch.tensor([[1]]))


def test_kl_divergence():
    p = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert quant.kl_divergence(p, p) == 0.0
    uniform, skewed = torch.zeros(1, 2), torch.log(torch.tensor([[0.75, 0.25]]))
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert math.isclose(quant.kl_divergence(uniform, skewed), expected, rel_tol=1e-6)
    with pytest.raises(BadParameter):
        quant.kl_divergence(torch.zeros(2, 3), torch.zeros(3, 3))


def test_sample_text_is_shipped_and_long_enough():
    text = quant.sample_text()
    assert "public domain" in text and len(text.split()) > 1200


def test_prediction_matches_bitsandbytes_on_a_real_model():
    from labkit import probes

    if probes.import_bitsandbytes() is None:
        pytest.skip("bitsandbytes is not importable here, so nothing can be quantized")
    from labkit import models

    model, _ = models.load_model("tiny-llama", dtype="bfloat16")
    for name in ("nf4", "nf4-double", "int8"):
        quantized = models.load_model("tiny-llama", dtype="bfloat16", quantization_config=quant.quantization_config(name))[0]
        predicted = quant.predict_footprint(model, name)
        assert abs(quantized.get_memory_footprint() - predicted["stored"]) <= 256
        scales = 0  # what bitsandbytes keeps beside the weights: absmax (and its own scales and code), row scales
        for module in quantized.modules():
            weight = getattr(module, "weight", None)
            state = getattr(weight, "quant_state", None)
            tensors = [getattr(weight, "SCB", None)]
            if state is not None:
                tensors += [state.absmax] + ([state.state2.absmax, state.state2.code] if state.nested else [])
            scales += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        assert scales == predicted["constants"], name
