"""Exercises of notebook 03 (encoders without padding: packed rows today, the fastpath before)."""

from __future__ import annotations

import time

import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

from labkit import compat, fastpath
from labkit.exercises import Exercise, Wrong, behaves_like, call, predict, returns_none

# --------------------------------------------------------------------------- 03.1 a batch's packing boundaries

def packed_boundaries(attention_mask):
    # each sequence's real tokens; cu_seqlens: where each one starts in the packed row, from 0, then the row's end;
    # document ids: the sequence each packed token belongs to
    lengths = attention_mask.sum(dim=1)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    document_ids = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    return cu_seqlens, document_ids


def _boundaries(answer, c):
    with torch.random.fork_rng():  # a fresh right-padded mask each time; the learner's random state is left alone
        torch.manual_seed(time.time_ns() % 2**31)
        lengths = torch.randint(1, 9, (5,))
        lengths[torch.randint(0, 5, ())] = 8  # one sequence fills the batch's length, as a tokenizer pads
    mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    (cu, _), = behaves_like(answer, "my_boundaries(attention_mask)", packed_boundaries,
                            [("on a fresh mask of 5 sequences padded to 8", (mask,))], BOUNDARY_MISTAKES,
                            none="return (cu_seqlens, document_ids).")
    if cu.dtype != torch.int32:
        raise Wrong(f"cu_seqlens is {cu.dtype}: the varlen kernels take int32")
    return f"cu_seqlens {cu.tolist()} and document ids for the real tokens {lengths.tolist()}."


def _lengths_not_cumulative(attention_mask):
    """a function returning the lengths as cu_seqlens"""
    lengths = attention_mask.sum(1)
    return lengths, torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def _no_leading_zero(attention_mask):
    """a function returning the running total without its leading 0"""
    lengths = attention_mask.sum(1)
    return lengths.cumsum(0).int(), torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def _padded_positions(attention_mask):
    """a function counting the padded positions"""
    batch, length = attention_mask.shape
    return (torch.arange(batch + 1) * length).int(), torch.arange(batch).repeat_interleave(length)


def _position_ids(attention_mask):
    """a function returning the position ids as document ids"""
    cu, _ = packed_boundaries(attention_mask)
    return cu, torch.cat([torch.arange(int(n)) for n in attention_mask.sum(1)])


BOUNDARY_MISTAKES = (
    (_lengths_not_cumulative, "those are the lengths; cu_seqlens is their running total, from 0"),
    (_no_leading_zero, "cu_seqlens starts at 0: N sequences have N + 1 boundaries, the first 0 and the last the "
                       "row's length"),
    (_padded_positions, "cu_seqlens and document_ids count the padded positions too: count each sequence's real "
                        "tokens only; the packed row holds the real tokens only"),
    (_position_ids, "those document ids are the position ids, restarting at 0 in each sequence: the document id is "
                    "the sequence's number"))


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
    layer = call(answer, bert_layer, config, what="my_convert_layer(bert_layer, config)",
                 none="build the nn.TransformerEncoderLayer and return it.")
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
    if difference < 3e-6:  # a right conversion differs by at most 7e-7 here; BERT's eps left out, by 1e-5 or more
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
    # if the time is proportional to the tokens computed: the packed row computes only the real ones, (1 - p) of the
    # padded positions, so its time is (1 - p) of the padded batch's, and the speed-up the inverse
    return 1 / (1 - padding_fraction)


def _ideal_speedup_mistakes(expected, padding_fraction):
    p = padding_fraction
    return {"that is the fraction of the work left, a time ratio: the speed-up is its inverse": 1 - p,
            "the packed row computes only the real tokens, (1 - p) of them: the speed-up is 1 / (1 - p)": 1 + p,
            "that is the padding's share relative to the real tokens, not the speed-up": p / (1 - p)}


# --------------------------------------------------------------------------- 03.4 a measured time, explained

def time_with_a_floor(floor_ms, no_padding_ms, padding_fraction):
    # a fixed part, the floor, that no skipped padding removes, plus a part that follows the real tokens: (1 - p) of
    # what it was without padding
    return floor_ms + (no_padding_ms - floor_ms) * (1 - padding_fraction)


def _time_with_a_floor_mistakes(expected, floor_ms, no_padding_ms, padding_fraction):
    return {"the floor does not shrink with the tokens: only the part above it does":
                no_padding_ms * (1 - padding_fraction),
            "the fastpath skips the padding, so the part above the floor shrinks to (1 - p) of itself": no_padding_ms,
            "that is the floor alone: the real tokens still cost (1 - p) of the part above it": floor_ms}


EXERCISES = [
    Exercise("03.1", "A batch's packing boundaries", "code", _boundaries, packed_boundaries,
             ("A packed row holds each sequence's real tokens one after another. The attention mask says how many "
              "each sequence has: count its ones.",
              "cu_seqlens is the running total of the lengths with a 0 in front: N sequences give N + 1 int32 "
              "boundaries. document_ids repeats each sequence's number as many times as it has real tokens "
              "(torch.repeat_interleave)."),
             {}, (*BOUNDARY_MISTAKES, (returns_none, "returns None"))),
    Exercise("03.2", "Convert one more encoder layer", "code", _convert_layer, fastpath.convert_layer,
             ("Build nn.TransformerEncoderLayer with BERT's sizes (batch_first=True, dropout=0, GELU, post-norm), then "
              "copy the weights in.",
              "The layer's in_proj_weight stacks query, key and value: torch.cat([q.weight, k.weight, v.weight]); "
              "norm1 is the attention output's LayerNorm, norm2 the feed-forward's."),
             {}, ((returns_none, "returns None"), (_the_bert_layer_itself, "TransformerEncoderLayer"))),
    predict("03.3", "The ideal speed-up, if time follows the tokens", ideal_speedup, "x", _ideal_speedup_mistakes,
            ("The padded batch computes on every position; the packed row only on the real tokens. Suppose the "
             "time is proportional to the tokens computed.",
             "With a fraction p of padding the packed row computes (1 - p) of the positions, so its time is (1 - p) "
             "of the padded batch's; the speed-up is the padded time over the packed row's."),
            {"padding_fraction": 0.75}, rel=0.02),
    predict("03.4", "Explain a measured time with a fixed cost", time_with_a_floor, "ms", _time_with_a_floor_mistakes,
            ("Split the fastpath's time without padding into the floor, which every call pays, and the rest, which "
             "the real tokens cost.",
             "With a fraction p of padding only (1 - p) of the tokens are real: the time is floor + (no-padding time "
             "- floor) x (1 - p)."),
            {"floor_ms": 2.0, "no_padding_ms": 10.0, "padding_fraction": 0.75}, rel=0.02),
]
