"""Exercises of notebook 03 (the encoder fastpath)."""

from __future__ import annotations

import time

import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

from labkit import compat, fastpath
from labkit.exercises.core import Exercise, NotAttempted, Wrong, call, function_answer, predicted, returns_none

# --------------------------------------------------------------------------- 03.1 which calls skip the padding

def cases_that_skip_padding(cases):
    # the situations with no reason not to pack the batch (labkit.fastpath.why_not_fastpath gave "")
    return {case for case, why in cases.items() if not why}


def _fastpath_cases(answer, c):
    reasons = c["cases"]  # situation -> labkit's reason it does not skip the padding ("" when it does)
    unfused = c.get("unfused", {})  # situation -> labkit's reason a layer does not run fused ("" when all do)
    if isinstance(answer, str) or not hasattr(answer, "__iter__"):
        raise Wrong("give a list or set of situation names")
    chosen = {str(a) for a in answer}
    unknown = chosen - set(reasons)
    if unknown:
        raise Wrong(f"{sorted(unknown)} are not among the situations: {sorted(reasons)}")
    expected = cases_that_skip_padding(reasons)
    extra = chosen - expected
    if extra:
        case = sorted(extra)[0]
        raise Wrong(f"{case!r} does not skip the padding: {reasons[case]}")
    if expected - chosen:
        case = sorted(expected - chosen)[0]
        if unfused.get(case):
            raise Wrong(f"{case!r} does skip the padding too: {unfused[case]} turns off the fused layer only; the "
                        "encoder packed the batch before any layer ran")
        raise Wrong(f"{case!r} does skip the padding too")
    return f"only {sorted(expected)} skip the padding."


# --------------------------------------------------------------------------- 03.2 one encoder layer converted

my_convert_layer = fastpath.convert_layer


def _tiny_bert_layer():
    config = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1)
    compat.set_layer_attention(config, "eager")
    with torch.random.fork_rng():  # the learner's own random state is left as it was
        torch.manual_seed(time.time_ns() % 2**31)
        layer = BertLayer(config).eval()
        with torch.no_grad():  # random LayerNorm weights too, so that a swapped norm shows
            for module in layer.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.normal_(1.0, 0.2)
                    module.bias.normal_(0.0, 0.2)
        x = torch.randn(2, 7, 32)
    return layer, config, x


def _convert_layer(answer, c):
    function = function_answer(answer, "my_convert_layer(bert_layer, config)")
    bert_layer, config, x = _tiny_bert_layer()
    layer = call(function, bert_layer, config)
    if layer is None:
        raise NotAttempted("your function returns None: build the nn.TransformerEncoderLayer and return it.")
    if not isinstance(layer, torch.nn.TransformerEncoderLayer):
        raise Wrong(f"return an nn.TransformerEncoderLayer, not {type(layer).__name__}")
    if not layer.self_attn.batch_first:
        raise Wrong("BERT's tensors are (batch, length, hidden): build the layer with batch_first=True")
    if layer.norm_first:
        raise Wrong("BERT normalises after each residual sum (post-norm): norm_first=False")
    layer.eval()
    with torch.inference_mode():
        expected = bert_layer(x)
        expected = expected[0] if isinstance(expected, tuple) else expected  # a tuple in older transformers
        got = call(layer, x)
    if got.shape != expected.shape:
        raise Wrong(f"the output has shape {tuple(got.shape)}, not {tuple(expected.shape)}")
    difference = float((got - expected).abs().max())
    if difference < 1e-4:
        return f"its output equals the BERT layer's (largest difference {difference:.1e})."
    q = bert_layer.attention.self.query.weight
    if not torch.equal(layer.self_attn.in_proj_weight[:32], q):
        raise Wrong("in_proj_weight must hold query, key and value stacked, in that order (torch.cat of the three)")
    if not (layer.activation is torch.nn.functional.gelu or isinstance(layer.activation, torch.nn.GELU)):
        raise Wrong("BERT's feed-forward uses GELU: activation='gelu'")
    if layer.norm1.eps != config.layer_norm_eps:
        raise Wrong(f"use BERT's LayerNorm epsilon, layer_norm_eps={config.layer_norm_eps}")
    raise Wrong(f"the output differs from the BERT layer's by {difference:.3g}: check each copy, the biases too "
                "(in_proj from query, key, value; out_proj from the attention's output dense; norm1 from the "
                "attention's output LayerNorm, norm2 from the feed-forward's; linear1 and linear2 from the "
                "feed-forward)")


def _the_bert_layer_itself(layer, config):
    """a function returning the BERT layer unconverted"""
    return layer


# --------------------------------------------------------------------------- 03.3 the ideal speed-up

def ideal_speedup(padding_fraction):
    # if the time is proportional to the tokens computed: the fastpath computes only the real ones, (1 - p) of the
    # padded positions, so its time is (1 - p) of the padded model's, and the speed-up the inverse
    return 1 / (1 - padding_fraction)


def _ideal_speedup(answer, c):
    p = c["padding_fraction"]
    return predicted(answer, ideal_speedup(p), "x", {
        "that is the fraction of the work left, a time ratio: the speed-up is its inverse": 1 - p,
        "the fastpath computes only the real tokens, (1 - p) of the positions: the speed-up is 1 / (1 - p)": 1 + p,
        "that is the padding's share relative to the real tokens, not the speed-up": p / (1 - p),
    }, rel=0.02)


EXERCISES = [
    Exercise("03.1", "Which calls skip the padding?", "predict", _fastpath_cases, cases_that_skip_padding,
             ("The encoder decides whether to pack the batch before any layer runs: the mode, gradient tracking, the "
              "mask and how the encoder was built count; what happens inside a layer does not.",
              "Eval mode; no gradient tracking of a weight (torch.no_grad(), torch.inference_mode() or frozen weights "
              "all do); a key padding mask with the padding on the right; layers the nested path accepts (post-norm, "
              "with biases); and no torch.compile. A hook on a layer stops that layer's fused op, not the packing."),
             {"cases": {"eval, torch.no_grad(), right padding": "", "training mode": "the model is in training mode",
                        "left padding": "the padding is not on the right", "a forward hook on layer 0": ""},
              "unfused": {"a forward hook on layer 0": "layer 0: a forward hook or pre-hook is registered on it"}},
             ((["training mode"], "training mode"), (["eval, torch.no_grad(), right padding"], "fused layer only"),
              ([], "does skip"), ("left padding", "list or set"))),
    Exercise("03.2", "Convert one more encoder layer", "code", _convert_layer, my_convert_layer,
             ("Build nn.TransformerEncoderLayer with BERT's sizes (batch_first=True, dropout=0, GELU, post-norm), then "
              "copy the weights in.",
              "The layer's in_proj_weight stacks query, key and value: torch.cat([q.weight, k.weight, v.weight]); "
              "norm1 is the attention output's LayerNorm, norm2 the feed-forward's."),
             {}, ((returns_none, "returns None"), (_the_bert_layer_itself, "TransformerEncoderLayer")),
             answer_is_function=True),
    Exercise("03.3", "The ideal speed-up, if time follows the tokens", "predict", _ideal_speedup, ideal_speedup,
             ("The padded model computes on every position; the fastpath only on the real tokens. Suppose the time "
              "is proportional to the tokens computed.",
              "With a fraction p of padding the fastpath computes (1 - p) of the positions, so its time is (1 - p) "
              "of the padded model's; the speed-up is the padded time over the fastpath's."),
             {"padding_fraction": 0.75}, ((0.25, "inverse"), (1.75, "1 / (1 - p)"), (3.0, "share"))),
]
