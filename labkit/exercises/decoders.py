"""Exercises of notebook 02 (decoders and fast generation)."""

from __future__ import annotations

from labkit import roofline
from labkit.exercises.core import Exercise, Wrong, predicted


def decode_bound_tokens_per_s(parameters, bytes_per_parameter, bandwidth_gb_per_s):
    # at batch 1 every step reads every weight once: tokens/s <= bandwidth / bytes read per step
    return roofline.decode_bound_tokens_per_s(bandwidth_gb_per_s * 1e9, int(parameters * bytes_per_parameter))


def _decode_bound(answer, c):
    expected = decode_bound_tokens_per_s(c["parameters"], c["bytes_per_parameter"], c["bandwidth_gb_per_s"])
    return predicted(answer, expected, "tokens/s", {
        f"that counts one byte per parameter: each weight takes {c['bytes_per_parameter']} bytes here":
            expected * c["bytes_per_parameter"],
        "that counts bits, not bytes, per parameter": expected / 8,
    })


def kv_cache_mib(layers, kv_heads, head_dim, context, batch, bytes_per_element):
    # a key and a value vector per key/value head, in every layer, for every token of every sequence
    per_token = roofline.kv_bytes_per_token(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                            element_bytes=bytes_per_element)
    return per_token * context * batch / 2**20


def _kv_cache(answer, c):
    layers, heads, kv_heads = c["layers"], c["heads"], c["kv_heads"]
    expected = kv_cache_mib(layers, kv_heads, c["head_dim"], c["context"], c["batch"], c["bytes_per_element"])
    return predicted(answer, expected, "MiB", {
        "the cache holds keys AND values: twice that": expected / 2,
        f"this model shares key/value heads (grouped-query attention): {kv_heads} of them, not the {heads} query "
        "heads": expected * heads / kv_heads if heads != kv_heads else 0,
        f"every one of the {layers} layers keeps its own cache": expected / layers,
        "that looks like bytes: the question asks for MiB (divide by 2**20)": expected * 2**20,
    })


def padding_side():
    # tokenizer.padding_side = "left" before tokenizing a batch of prompts: every prompt ends at the last position
    return "left"


def _padding_side(answer, c):
    side = str(answer).strip().lower()
    if side not in ("left", "right"):
        raise Wrong("answer 'left' or 'right'")
    if side == "right":
        raise Wrong("with right padding the pad tokens sit between a short prompt and the tokens generated after it; a "
                    "decoder continues from the last position, which would be padding")
    return "the prompts end together at the right, so every sequence continues from its own last real token."


EXERCISES = [
    Exercise("02.1", "The decode bound", "predict", _decode_bound, decode_bound_tokens_per_s,
             ("At batch 1 every decode step reads every weight once.",
              "tokens/s <= bytes per second / bytes read per step; bytes per step = parameters x bytes per parameter."),
             {"parameters": 1.0e9, "bytes_per_parameter": 2, "bandwidth_gb_per_s": 1000.0},
             ((1000.0, "one byte"), (62.5, "bits"))),
    Exercise("02.2", "The KV cache, predicted", "predict", _kv_cache, kv_cache_mib,
             ("Every layer keeps a key and a value vector for every token of every sequence.",
              "2 (K and V) x layers x key/value heads x head size x tokens x batch x bytes per element; then / 2**20."),
             {"layers": 16, "heads": 32, "kv_heads": 8, "head_dim": 64, "context": 4096, "batch": 1,
              "bytes_per_element": 2},
             ((64.0, "keys AND values"), (512.0, "shares key/value"), (8.0, "every one of the 16 layers"))),
    Exercise("02.3", "Which side to pad for batched generation?", "predict", _padding_side, padding_side,
             ("A decoder continues from the last position of each row.",
              "Where must each prompt's last real token sit so that the next token follows it?"),
             {}, (("right", "between a short prompt"), ("middle", "'left' or 'right'"))),
]
