"""Exercises of notebook 03 (the encoder fastpath)."""

from __future__ import annotations

import time

import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

from labkit import compat, fastpath
from labkit.exercises.core import Exercise, NotAttempted, Wrong, call, function_answer, predicted, returns_none

# --------------------------------------------------------------------------- 03.1 which calls skip the padding

def cases_that_skip_padding(reasons):
    # reasons: situation -> (why the padding is not skipped, why a layer is not fused), "" where nothing stops it
    return {case for case, (why_padding, _) in reasons.items() if not why_padding}


def _fastpath_cases(answer, c):
    if isinstance(answer, str) or not hasattr(answer, "__iter__"):
        raise Wrong("give a list or set of situation names")
    reasons = c["reasons"]
    chosen, expected = {str(a) for a in answer}, cases_that_skip_padding(reasons)
    if chosen - set(reasons):
        raise Wrong(f"{sorted(chosen - set(reasons))} are not among the situations: {sorted(reasons)}")
    wrong = sorted(chosen - expected) + sorted(expected - chosen)  # a situation answered wrong, the chosen first
    if wrong:
        why_padding, why_unfused = reasons[wrong[0]]
        if why_padding:
            raise Wrong(f"{wrong[0]!r} does not skip the padding: {why_padding}")
        raise Wrong(f"{wrong[0]!r} does skip the padding too" + (f": {why_unfused} turns off the fused layer only; "
                                                                 "the encoder packed the batch before any layer ran"
                                                                 if why_unfused else ""))
    return f"only {sorted(expected)} skip the padding."


# --------------------------------------------------------------------------- 03.2 one encoder layer converted

def _convert_layer(answer, c):
    config = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1)
    compat.set_layer_attention(config, "eager")
    with torch.random.fork_rng():  # a fresh random layer each time; the learner's own random state is left as it was
        torch.manual_seed(time.time_ns() % 2**31)
        bert_layer = BertLayer(config).eval()
        with torch.no_grad():  # random LayerNorm weights too, so that a swapped norm shows
            for norm in (m for m in bert_layer.modules() if isinstance(m, torch.nn.LayerNorm)):
                norm.weight.normal_(1.0, 0.2)
                norm.bias.normal_(0.0, 0.2)
        x = torch.randn(2, 7, 32)
    layer = call(function_answer(answer, "my_convert_layer(bert_layer, config)"), bert_layer, config)
    if layer is None:
        raise NotAttempted("your function returns None: build the nn.TransformerEncoderLayer and return it.")
    if not isinstance(layer, torch.nn.TransformerEncoderLayer):
        raise Wrong(f"return an nn.TransformerEncoderLayer, not {type(layer).__name__}")
    if not layer.self_attn.batch_first:
        raise Wrong("BERT's tensors are (batch, length, hidden): build the layer with batch_first=True")
    if layer.norm_first:
        raise Wrong("BERT normalises after each residual sum (post-norm): norm_first=False")
    with torch.inference_mode():
        expected = bert_layer(x)
        got = call(layer.eval(), x)
    difference = float((got - expected).abs().max())
    if difference < 1e-4:
        return f"its output equals the BERT layer's (largest difference {difference:.1e})."
    if not (layer.activation is torch.nn.functional.gelu or isinstance(layer.activation, torch.nn.GELU)):
        raise Wrong("BERT's feed-forward uses GELU: activation='gelu'")
    raise Wrong(f"the output differs from the BERT layer's by {difference:.3g}: check each copy, the biases too "
                "(in_proj: query, key and value stacked in that order; out_proj: the attention's output dense; norm1: "
                "its LayerNorm, norm2 the feed-forward's; linear1, linear2: the feed-forward's; BERT's layer_norm_eps)")


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


# --------------------------------------------------------------------------- 03.4 a measured time, explained

def time_with_a_floor(floor_ms, no_padding_ms, padding_fraction):
    # a fixed part, the floor, that no skipped padding removes, plus a part that follows the real tokens: (1 - p) of
    # what it was without padding
    return floor_ms + (no_padding_ms - floor_ms) * (1 - padding_fraction)


def _time_with_a_floor(answer, c):
    floor, t0, p = c["floor_ms"], c["no_padding_ms"], c["padding_fraction"]
    return predicted(answer, time_with_a_floor(floor, t0, p), "ms", {
        "the floor does not shrink with the tokens: only the part above it does": t0 * (1 - p),
        "the fastpath skips the padding, so the part above the floor shrinks to (1 - p) of itself": t0,
        "that is the floor alone: the real tokens still cost (1 - p) of the part above it": floor,
    }, rel=0.02)


EXERCISES = [
    Exercise("03.1", "Which calls skip the padding?", "predict", _fastpath_cases, cases_that_skip_padding,
             ("The encoder decides whether to pack the batch before any layer runs: the mode, gradient tracking, the "
              "mask and how the encoder was built count; what happens inside a layer does not.",
              "Eval mode; no gradient tracking of a weight (torch.no_grad(), torch.inference_mode() or frozen weights "
              "all do); a key padding mask with the padding on the right; layers the nested path accepts (post-norm, "
              "with biases); and no torch.compile. A hook on a layer stops that layer's fused op, not the packing."),
             {"reasons": {"eval, torch.no_grad(), right padding": ("", ""), "left padding": ("not on the right", ""),
                          "training mode": ("the model is in training mode", "layers 0, 1: training mode"),
                          "a forward hook on layer 0": ("",
                                                        "layer 0: a forward hook or pre-hook is registered on it")}},
             ((["training mode"], "training mode"), (["eval, torch.no_grad(), right padding"], "fused layer only"),
              ([], "does skip"), ("left padding", "list or set"))),
    Exercise("03.2", "Convert one more encoder layer", "code", _convert_layer, fastpath.convert_layer,
             ("Build nn.TransformerEncoderLayer with BERT's sizes (batch_first=True, dropout=0, GELU, post-norm), then "
              "copy the weights in.",
              "The layer's in_proj_weight stacks query, key and value: torch.cat([q.weight, k.weight, v.weight]); "
              "norm1 is the attention output's LayerNorm, norm2 the feed-forward's."),
             {}, ((returns_none, "returns None"), (_the_bert_layer_itself, "TransformerEncoderLayer"))),
    Exercise("03.3", "The ideal speed-up, if time follows the tokens", "predict", _ideal_speedup, ideal_speedup,
             ("The padded model computes on every position; the fastpath only on the real tokens. Suppose the time "
              "is proportional to the tokens computed.",
              "With a fraction p of padding the fastpath computes (1 - p) of the positions, so its time is (1 - p) "
              "of the padded model's; the speed-up is the padded time over the fastpath's."),
             {"padding_fraction": 0.75}, ((0.25, "inverse"), (1.75, "1 / (1 - p)"), (3.0, "share"))),
    Exercise("03.4", "Explain a measured time with a fixed cost", "predict", _time_with_a_floor, time_with_a_floor,
             ("Split the fastpath's time without padding into the floor, which every call pays, and the rest, which "
              "the real tokens cost.",
              "With a fraction p of padding only (1 - p) of the tokens are real: the time is floor + (no-padding time "
              "- floor) x (1 - p)."),
             {"floor_ms": 2.0, "no_padding_ms": 10.0, "padding_fraction": 0.75},
             ((2.5, "does not shrink"), (10.0, "shrinks to"), (2.0, "floor alone"))),
]
