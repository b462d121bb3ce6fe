"""Prefill and decode of a causal language model, measured: latency, peak memory, decode tokens/s.

Prefill runs the whole prompt through the model once (compute-bound: many tokens per weight read).
Decode produces one token per step and reads every weight once per step (bandwidth-bound), so its
rate is compared with :func:`labkit.roofline.decode_bound_tokens_per_s`.
"""

from __future__ import annotations

from typing import Any

from labkit.errors import BadParameter, check_sizes


def random_prompt(model, *, batch: int, length: int, seed: int = 0):
    """Token ids of shape (batch, length) drawn from the ordinary part of the vocabulary, on the model's device."""
    import torch

    check_sizes(1, batch=batch, length=length)
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    low = min(100, vocab // 2)  # stay clear of the special tokens at the start of most vocabularies
    return torch.randint(low, vocab, (batch, length), generator=generator).to(model.device)


def _pad_id(model, tokenizer=None) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                      model.generation_config.pad_token_id, model.generation_config.eos_token_id, 0):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def generate_exactly(model, input_ids, new_tokens: int, *, attention_mask=None, tokenizer=None, **kwargs):
    """Greedy ``generate`` that produces exactly ``new_tokens`` tokens (no early stop at end-of-text)."""
    import torch

    check_sizes(1, new_tokens=new_tokens)
    if attention_mask is None:  # no padding: say so, instead of letting generate guess from the pad token
        attention_mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=_pad_id(model, tokenizer), **kwargs)


def measure_prefill(model, input_ids, *, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Time one forward pass over the prompt (building the KV cache) and its peak extra memory.

    Only the last position's logits are computed (``logits_to_keep=1``), as ``generate`` does: logits over
    the whole vocabulary at every prompt position would dwarf the attention memory being compared.
    """
    import inspect

    import torch

    from labkit.attention import peak_extra_memory
    from labkit.timing import measure

    device = str(model.device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def call():
        with torch.inference_mode():
            return model(input_ids=input_ids, use_cache=True, **extra)

    timing = measure(call, device=device, warmup=warmup, repeats=repeats)
    tokens = input_ids.numel()
    return {"batch": input_ids.shape[0], "prompt_tokens": input_ids.shape[1], "median_ms": timing.median_ms,
            "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms, "tokens_per_s": tokens / (timing.median_ms / 1e3),
            "peak_extra_bytes": peak_extra_memory(call, device)}


def measure_decode(model, input_ids, *, new_tokens: int = 32, warmup: int = 1, repeats: int = 3,
                   attention_mask=None, tokenizer=None, **generate_kwargs) -> dict[str, Any]:
    """Decode tokens/s: the time of ``generate`` for ``new_tokens`` minus the time for 1 token (the
    prefill and set-up), divided by the ``new_tokens - 1`` decode steps. Also returns the token ids."""
    from labkit.timing import measure

    if new_tokens < 2:
        raise BadParameter(f"new_tokens={new_tokens}: decoding needs at least 2 new tokens to time a step.")
    device = str(model.device)
    batch = input_ids.shape[0]
    outputs: dict[str, Any] = {}

    def run(count):
        def call():
            outputs["ids"] = generate_exactly(model, input_ids, count, attention_mask=attention_mask,
                                              tokenizer=tokenizer, **generate_kwargs)
        return call

    one = measure(run(1), device=device, warmup=warmup, repeats=repeats)
    full = measure(run(new_tokens), device=device, warmup=warmup, repeats=repeats)
    step_ms = (full.median_ms - one.median_ms) / (new_tokens - 1)
    fallback = step_ms <= 0
    if fallback:  # timing noise larger than the decode itself: the whole call per token, flagged
        step_ms = full.median_ms / new_tokens
    return {"batch": batch, "prompt_tokens": input_ids.shape[1], "new_tokens": new_tokens,
            "generate_ms": full.median_ms, "first_token_ms": one.median_ms, "step_ms": step_ms,
            "timing_fallback": fallback,
            "tokens_per_s": batch * 1e3 / step_ms,
            "token_ids": outputs["ids"][:, input_ids.shape[1]:].tolist()}
