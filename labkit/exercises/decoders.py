"""Exercises of notebook 02 (decoders and fast generation)."""

from __future__ import annotations

import time

import torch

from labkit import compat, roofline
from labkit.exercises import Exercise, Wrong, behaves_like, predict


def decode_bound_tokens_per_s(parameters, bytes_per_parameter, bandwidth_gb_per_s):
    # at batch 1 every step reads every weight once: tokens/s <= bandwidth / bytes read per step
    return roofline.decode_bound_tokens_per_s(bandwidth_gb_per_s * 1e9, int(parameters * bytes_per_parameter))


def _decode_bound_mistakes(expected, bytes_per_parameter):
    return {f"that counts one byte per parameter: each weight takes {bytes_per_parameter} bytes here":
                expected * bytes_per_parameter,
            "that counts bits, not bytes, per parameter": expected / 8}


def kv_cache_mib(layers, kv_heads, head_dim, context, batch, bytes_per_element):
    # a key and a value vector per key/value head, in every layer, for every token of every sequence
    per_token = roofline.kv_bytes_per_token(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                            element_bytes=bytes_per_element)
    return per_token * context * batch / 2**20


def _kv_cache_mistakes(expected, layers, heads, kv_heads):
    return {"the cache holds keys AND values: twice that": expected / 2,
            f"this model shares key/value heads (grouped-query attention): {kv_heads} of them, not the {heads} query "
            "heads": expected * heads / kv_heads if heads != kv_heads else 0,
            f"every one of the {layers} layers keeps its own cache": expected / layers,
            "that looks like bytes: the question asks for MiB (divide by 2**20)": expected * 2**20}


def sliding_cache_kib(layers, sliding_layers, window, kv_heads, head_dim, prompt_tokens, new_tokens,
                      bytes_per_element):
    # the model has seen every token but the last one generated; a global layer keeps them all, a sliding layer
    # the last window - 1 (transformers' sliding cache); each token is a key and a value per key/value head
    seen = prompt_tokens + new_tokens - 1
    held = (layers - sliding_layers) * seen + sliding_layers * min(seen, window - 1)
    return held * 2 * kv_heads * head_dim * bytes_per_element / 1024


def _sliding_cache_mistakes(expected, layers, window, kv_heads, head_dim, prompt_tokens, new_tokens,
                            bytes_per_element):
    one_token = 2 * kv_heads * head_dim * bytes_per_element / 1024  # KiB per token and layer
    seen = prompt_tokens + new_tokens - 1
    return {"that keeps every token in every layer: the sliding layers stop at their window": one_token * layers * seen,
            "that treats every layer as sliding: the global layer keeps every token":
                one_token * layers * min(seen, window - 1),
            "the cache holds keys AND values: twice that": expected / 2,
            "that looks like bytes: the question asks for KiB (divide by 1024)": expected * 1024}


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


def my_decode(model, input_ids, new_tokens):
    # the prompt once, keeping every layer's keys and values; then one token a step, attending to that cache
    from transformers import DynamicCache

    cache = DynamicCache()  # the forward passes fill it in place
    name = compat.forward_keywords(model)["cache"]  # `cache=` since transformers 5.24, `past_key_values=` before
    with torch.inference_mode():
        logits = model(input_ids=input_ids, use_cache=True, **{name: cache}).logits
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(new_tokens - 1):
            logits = model(input_ids=tokens[-1], use_cache=True, **{name: cache}).logits  # the newest token only
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)


def without_cache(model, input_ids, new_tokens):
    """greedy decoding with use_cache=False: right tokens, but every step runs the whole sequence so far"""
    ids = input_ids
    with torch.inference_mode():
        for _ in range(new_tokens):
            token = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
    return ids[:, input_ids.shape[1]:]


def _tiny_decoder():
    """A 2-layer Llama with random weights in float64 (no download, built in milliseconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(torch.float64).eval()


def _decode_loop(answer, c):
    model, new = _tiny_decoder(), 6
    fresh = torch.Generator().manual_seed(time.time_ns() % 2**31)  # a new prompt each time: decode, not memorise
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=fresh)
    expected, seen = without_cache(model, ids, new), []  # seen: how many tokens each forward pass was given

    def count(module, args, kwargs):
        given = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        seen.append(given.shape[1] if isinstance(given, torch.Tensor) else 0)

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        behaves_like(answer, "my_decode(model, input_ids, new_tokens)", lambda *_: expected,
                     [("on a random 2-layer Llama", (model, ids, new))], DECODE_MISTAKES,
                     none="return the new token ids, shape (batch, new_tokens).",
                     otherwise="your tokens differ from a loop with use_cache=False. After the prompt, give the "
                               "model the newest token AND the cache that holds the keys and values of all the tokens "
                               "before it")
    finally:
        hook.remove()
    if any(n > 1 for n in seen[1:]):
        raise Wrong(f"the tokens are right, but later steps ran up to {max(seen[1:])} tokens through the model: "
                    "feed only the newest token; the cache holds the rest")
    return f"the same tokens as use_cache=False, with {len(seen) - 1} one-token steps after the prompt."


def _forgets_the_cache(model, input_ids, new_tokens):
    """one token a step, but no cache passed: the model sees only that token"""
    with torch.inference_mode():
        tokens = [model(input_ids=input_ids).logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(new_tokens - 1):
            tokens.append(model(input_ids=tokens[-1]).logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)


def _with_the_prompt(model, input_ids, new_tokens):
    """the new tokens with the prompt in front"""
    return torch.cat([input_ids, my_decode(model, input_ids, new_tokens)], dim=1)


DECODE_MISTAKES = (
    (_with_the_prompt, "return only the new tokens, shape (batch, new_tokens), not the prompt with them"),)


EXERCISES = [
    predict("02.1", "The decode bound", decode_bound_tokens_per_s, "tokens/s", _decode_bound_mistakes,
            ("At batch 1 every decode step reads every weight once.",
             "tokens/s <= bytes per second / bytes read per step; bytes per step = parameters x bytes per parameter."),
            {"parameters": 1.0e9, "bytes_per_parameter": 2, "bandwidth_gb_per_s": 1000.0}),
    predict("02.2", "The KV cache, predicted", kv_cache_mib, "MiB", _kv_cache_mistakes,
            ("Every layer keeps a key and a value vector for every token of every sequence.",
             "2 (K and V) x layers x key/value heads x head size x tokens x batch x bytes per element; then / 2**20."),
            {"layers": 16, "heads": 32, "kv_heads": 8, "head_dim": 64, "context": 4096, "batch": 1,
             "bytes_per_element": 2}),
    Exercise("02.3", "Which side to pad for batched generation?", "predict", _padding_side, padding_side,
             ("A decoder continues from the last position of each row.",
              "Where must each prompt's last real token sit so that the next token follows it?"),
             {}, (("right", "between a short prompt"), ("middle", "'left' or 'right'"))),
    Exercise("02.4", "A decode loop with a KV cache", "code", _decode_loop, my_decode,
             ("Run the prompt once with use_cache=True and a cache object; the model fills the cache in place.",
              "Then loop: give the model only the newest token and the same cache, take the argmax of the last "
              "logits. The cache is passed as cache= (transformers 5.24 and newer; past_key_values= before)."),
             {}, (*DECODE_MISTAKES, (without_cache, "feed only the newest token"),
                  (_forgets_the_cache, "AND the cache"))),
    predict("02.5", "The cache of a sliding/global mix", sliding_cache_kib, "KiB", _sliding_cache_mistakes,
            ("A global layer keeps every token it has seen; a sliding layer keeps only the last window - 1 of them.",
             "tokens held = global layers x tokens seen + sliding layers x min(tokens seen, window - 1); then x 2 "
             "(K and V) x key/value heads x head size x bytes, / 1024. Tokens seen: prompt + new tokens - 1."),
            {"layers": 6, "sliding_layers": 5, "window": 32, "kv_heads": 2, "head_dim": 16, "prompt_tokens": 20,
             "new_tokens": 60, "bytes_per_element": 4}),
]
