"""Prefill and decode of a causal language model, measured: latency, peak memory, decode tokens/s.

Prefill runs the whole prompt through the model once (compute-bound: many tokens per weight read).
Decode produces one token per step and reads every weight once per step (bandwidth-bound), so its
rate is compared with :func:`labkit.roofline.decode_bound_tokens_per_s`.
"""

from __future__ import annotations

from typing import Any

from labkit import compat
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
    prompt = input_ids.shape[1]

    def run(count):
        ids = generate_exactly(model, input_ids, count, attention_mask=attention_mask, tokenizer=tokenizer,
                               **generate_kwargs)
        return ids[:, prompt:]

    return _decode_rate(run, input_ids, new_tokens=new_tokens, device=str(model.device), warmup=warmup,
                        repeats=repeats)


def _decode_rate(run, input_ids, *, new_tokens: int, device: str, warmup: int, repeats: int) -> dict[str, Any]:
    """Time ``run(1)`` and ``run(new_tokens)`` (each returns the new token ids) and derive the decode rate."""
    from labkit.timing import measure

    if new_tokens < 2:
        raise BadParameter(f"new_tokens={new_tokens}: decoding needs at least 2 new tokens to time a step.")
    outputs: dict[str, Any] = {}

    def timed(count):
        def call():
            outputs["ids"] = run(count)
        return call

    one = measure(timed(1), device=device, warmup=warmup, repeats=repeats)
    full = measure(timed(new_tokens), device=device, warmup=warmup, repeats=repeats)
    step_ms = (full.median_ms - one.median_ms) / (new_tokens - 1)
    fallback = step_ms <= 0
    if fallback:  # timing noise larger than the decode itself: the whole call per token, flagged
        step_ms = full.median_ms / new_tokens
    batch = input_ids.shape[0]
    return {"batch": batch, "prompt_tokens": input_ids.shape[1], "new_tokens": new_tokens,
            "generate_ms": full.median_ms, "first_token_ms": one.median_ms, "step_ms": step_ms,
            "timing_fallback": fallback, "tokens_per_s": batch * 1e3 / step_ms,
            "token_ids": outputs["ids"].tolist()}


def bandwidth_bound(model, row: dict[str, Any], bandwidth_bytes_per_s: float, *, extra_bytes: int = 0) -> dict[str, float]:
    """The bandwidth bound of a decode measurement ``row`` (batch, prompt_tokens, new_tokens): weights read per
    step (plus ``extra_bytes``, e.g. quantization scales) and the KV cache at the run's middle length."""
    from labkit.roofline import decode_bound_tokens_per_s, kv_cache_bytes, weight_bytes_per_token

    context = row["prompt_tokens"] + row["new_tokens"] // 2  # the cache grows during the run: its middle size
    weights = weight_bytes_per_token(model) + extra_bytes
    cache = kv_cache_bytes(model.config, batch=row["batch"], context=context, dtype=model.dtype)
    bound = decode_bound_tokens_per_s(bandwidth_bytes_per_s, weights, cache, batch=row["batch"])
    return {"bound_tokens_per_s": bound, "weight_bytes": weights, "kv_cache_bytes": cache,
            "fraction_of_bound": row["tokens_per_s"] / bound if "tokens_per_s" in row else None}


# --------------------------------------------------------------------------- a hand-written decode loop

class GreedyLoop:
    """Greedy decoding in the style of gpt-fast: a static KV cache made once, one forward per token,
    the argmax on the device, and (optionally) the one-token step compiled, with CUDA graphs on a GPU
    when ``mode="reduce-overhead"``. ``loop(input_ids)`` returns the new token ids (batch, new_tokens)."""

    def __init__(self, model, *, batch: int, prompt_tokens: int, new_tokens: int, compile_mode: str | None = None):
        from transformers import StaticCache

        check_sizes(1, batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
        self.model, self.new_tokens, self.prompt_tokens = model, new_tokens, prompt_tokens
        self.keywords = compat.forward_keywords(model)
        self.cache = StaticCache(config=model.config, max_cache_len=prompt_tokens + new_tokens)
        self.step = self._step
        if compile_mode is not None:
            import torch

            self.step = torch.compile(self._step, mode=compile_mode, fullgraph=True)

    def _forward(self, ids, positions):
        kwargs = {self.keywords["cache"]: self.cache, "use_cache": True,
                  "position_ids": positions.unsqueeze(0).expand(ids.shape[0], -1)}
        if self.keywords["cache_position"]:
            kwargs["cache_position"] = positions
        if self.keywords["logits_to_keep"]:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=ids, **kwargs).logits[:, -1].argmax(-1, keepdim=True)

    def _step(self, token, position):
        # ``position`` is a one-element tensor, not an int: a compiled step would recompile for every new int
        return self._forward(token, position)

    def __call__(self, input_ids, new_tokens: int | None = None):
        import torch

        count = self.new_tokens if new_tokens is None else new_tokens
        if input_ids.shape[1] != self.prompt_tokens or not 1 <= count <= self.new_tokens:
            raise BadParameter(f"this loop was built for prompts of {self.prompt_tokens} tokens and up to "
                               f"{self.new_tokens} new tokens; got {input_ids.shape[1]} and {count}.")
        device = input_ids.device
        with torch.inference_mode():
            self.cache.reset()  # the cache tensors were made under inference mode, so reset them there
            token = self._forward(input_ids, torch.arange(self.prompt_tokens, device=device))
            tokens = [token]
            for position in range(self.prompt_tokens, self.prompt_tokens + count - 1):
                if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                    torch.compiler.cudagraph_mark_step_begin()
                step_position = torch.tensor([position], device=device)
                token = self.step(token, step_position).clone()  # a CUDA-graph output is overwritten by the next replay
                tokens.append(token)
        return torch.cat(tokens, dim=1)


def measure_loop(loop: GreedyLoop, input_ids, *, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Decode tokens/s of a :class:`GreedyLoop`, computed as in :func:`measure_decode`."""
    return _decode_rate(lambda count: loop(input_ids, count), input_ids, new_tokens=loop.new_tokens,
                        device=str(loop.model.device), warmup=warmup, repeats=repeats)
