"""What a model produces, made and compared the same way in every notebook: random prompts, generation of exactly
N tokens, decode timed by steps, and the two comparisons of outputs (relative error, KL divergence)."""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import StaticCache, StoppingCriteria

from labkit import compat
from labkit.errors import BadParameter, check_sizes
from labkit.timing import measure, synchronize


def random_prompt(model, *, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids of shape (batch, length) drawn from the ordinary part of the vocabulary, on the model's device."""
    check_sizes(1, batch=batch, length=length)
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    low = min(100, vocab // 2)  # stay clear of the special tokens at the start of most vocabularies
    return torch.randint(low, vocab, (batch, length), generator=generator).to(model.device)


def pad_id(model, tokenizer=None) -> int:
    """The id generate pads with: the tokenizer's pad or end-of-text token, else the model's, else 0."""
    candidates = (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                  model.generation_config.pad_token_id, model.generation_config.eos_token_id)
    first = next((c for c in candidates if c not in (None, [])), 0)
    return int(first[0] if isinstance(first, list) else first)


def generate_exactly(model, input_ids, new_tokens: int, *, attention_mask=None, tokenizer=None, **kwargs):
    """Greedy ``generate`` that produces exactly ``new_tokens`` tokens (no early stop at end-of-text)."""
    check_sizes(1, new_tokens=new_tokens)
    if attention_mask is None:  # no padding: say so, instead of letting generate guess from the pad token
        attention_mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=pad_id(model, tokenizer), **kwargs)


def measure_decode(model, input_ids, *, new_tokens: int = 32, warmup: int = 1, repeats: int = 3,
                   min_time_s: float | None = None, **generate_kwargs) -> dict[str, Any]:
    """Decode tokens/s: the time of ``generate`` for ``new_tokens`` minus the time for 1 token (the
    prefill and set-up), divided by the ``new_tokens - 1`` decode steps. Also returns the token ids. ``min_time_s=0``
    makes exactly the calls asked (a torchrun job's ranks must all make the same ones); ``generate_kwargs`` go to
    :func:`generate_exactly` (``tokenizer``, ``attention_mask``) and on to ``generate``."""
    prompt = input_ids.shape[1]
    return decode_rate(lambda count: generate_exactly(model, input_ids, count, **generate_kwargs)[:, prompt:],
                       input_ids, new_tokens=new_tokens, device=str(model.device), warmup=warmup, repeats=repeats,
                       min_time_s=min_time_s)


def decode_rate(run, input_ids, *, new_tokens: int, device: str, warmup: int, repeats: int,
                min_time_s: float | None = None) -> dict[str, Any]:
    """Time ``run(1)`` and ``run(new_tokens)`` (each returns the new token ids) and derive the decode rate.

    The first call of ``run(new_tokens)`` is timed on its own (it pays any compilation) and counts as a warm-up."""
    if new_tokens < 2:
        raise BadParameter(f"new_tokens={new_tokens}: decoding needs at least 2 new tokens to time a step.")
    one = measure(lambda: run(1), device=device, warmup=warmup, repeats=repeats, min_time_s=min_time_s)
    start = time.perf_counter()
    ids = [run(new_tokens)]
    synchronize(device)
    first_s = time.perf_counter() - start
    full = measure(lambda: ids.append(run(new_tokens)), device=device, warmup=max(warmup - 1, 0), repeats=repeats,
                   min_time_s=min_time_s)
    steps = new_tokens - 1
    step_ms = (full.median_ms - one.median_ms) / steps
    fallback = step_ms <= 0
    if fallback:  # timing noise larger than the decode itself: the whole call per token, flagged
        step_ms = full.median_ms / new_tokens
    batch = input_ids.shape[0]
    return {"batch": batch, "prompt_tokens": input_ids.shape[1], "new_tokens": new_tokens,
            "generate_ms": full.median_ms, "first_token_ms": one.median_ms, "step_ms": step_ms,
            "step_p10_ms": max((full.p10_ms - one.median_ms) / steps, 0.0),
            "step_p90_ms": max((full.p90_ms - one.median_ms) / steps, 0.0),
            "first_call_extra_s": max(first_s - full.median_ms / 1e3, 0.0),
            "timing_fallback": fallback, "tokens_per_s": batch * 1e3 / step_ms,
            "token_ids": ids[-1].tolist()}


def kl_divergence(reference_logits, logits) -> float:
    """Mean over positions of KL(P_reference || P), in nats (natural logarithms): how far a model's next-token
    distributions moved from the reference's. Takes logits or log-probabilities."""
    if reference_logits.shape != logits.shape:
        raise BadParameter(f"logits of shapes {tuple(reference_logits.shape)} and {tuple(logits.shape)} "
                           "cannot be compared.")
    log_p = torch.log_softmax(reference_logits.float(), dim=-1)
    return kl_sum(log_p, torch.log_softmax(logits.float(), dim=-1)) / reference_logits.shape[0]


def relative_error(output, reference) -> float:
    """||output - reference|| / ||reference|| (Frobenius), computed in float64."""
    output, reference = output.double(), reference.double()
    return float((output - reference).norm() / reference.norm())


def kl_sum(log_p, log_q) -> float:
    """Sum over positions of KL(P || Q) from log-probabilities, in float32, each position's sum in float64."""
    return float((log_p.exp() * (log_p - log_q)).sum(-1).double().sum())


class GreedyLoop:
    """Greedy decoding in the style of gpt-fast: a static KV cache made once, one forward per token, the argmax and
    the position kept on the device (the loop itself never waits for the device), and optionally the one-token step
    compiled, with CUDA graphs on a GPU when ``compile_mode="reduce-overhead"``. ``loop(input_ids)`` returns the new
    token ids (batch, new_tokens)."""

    def __init__(self, model, *, batch: int, prompt_tokens: int, new_tokens: int, compile_mode: str | None = None):
        check_sizes(1, batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
        self.model, self.new_tokens, self.prompt_tokens = model, new_tokens, prompt_tokens
        self.keywords = compat.forward_keywords(model)
        self.cache = StaticCache(config=model.config, max_cache_len=prompt_tokens + new_tokens)
        self.step = self.forward if compile_mode is None else \
            torch.compile(self.forward, mode=compile_mode, fullgraph=True)

    def forward(self, ids, positions):
        """One forward pass over ``ids`` at ``positions`` (a tensor), returning the greedy next token."""
        kwargs = {self.keywords["cache"]: self.cache, "use_cache": True,
                  "position_ids": positions.unsqueeze(0).expand(ids.shape[0], -1)}
        if self.keywords["cache_position"]:
            kwargs["cache_position"] = positions
        if self.keywords["logits_to_keep"]:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=ids, **kwargs).logits[:, -1].argmax(-1, keepdim=True)

    def __call__(self, input_ids, new_tokens: int | None = None):
        count = self.new_tokens if new_tokens is None else new_tokens
        if input_ids.shape[1] != self.prompt_tokens or not 1 <= count <= self.new_tokens:
            raise BadParameter(f"this loop was built for prompts of {self.prompt_tokens} tokens and up to "
                               f"{self.new_tokens} new tokens; got {input_ids.shape[1]} and {count}.")
        device = input_ids.device
        with torch.inference_mode():
            self.cache.reset()  # the cache tensors were made under inference mode, so reset them there
            token = self.forward(input_ids, torch.arange(self.prompt_tokens, device=device))  # prefill
            tokens = [token]
            position = torch.tensor([self.prompt_tokens], device=device)  # a tensor: the compiled step compiles once
            for _ in range(count - 1):
                torch.compiler.cudagraph_mark_step_begin()
                token = self.step(token, position).clone()  # a CUDA graph's output is overwritten by its next replay
                tokens.append(token)
                position += 1
        return torch.cat(tokens, dim=1)


def measure_loop(loop: GreedyLoop, input_ids, *, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Decode tokens/s of a :class:`GreedyLoop`, computed as in :func:`measure_decode`."""
    return decode_rate(lambda count: loop(input_ids, count), input_ids, new_tokens=loop.new_tokens,
                        device=str(loop.model.device), warmup=warmup, repeats=repeats)


class StepClock(StoppingCriteria):
    """A stopping criterion that never stops: ``generate`` calls it once per step, right after each new token, so it
    records when every token was ready (notebook 06's static batches, notebook 04's decode steps)."""

    def __init__(self, device: str = "cpu"):
        self.device, self.times = str(device), []

    def __call__(self, input_ids, scores, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_greedy(model, tokenizer, prompt: str, max_new_tokens: int = 20) -> dict[str, Any]:
    """Greedy (deterministic) continuation of ``prompt``: the text, how many tokens, and the wall time.

    One call, warm-up included: an illustration, not a benchmark (timing.measure is for that).
    """
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=pad_id(model, tokenizer))
    new = output[0, inputs["input_ids"].shape[1]:]
    return {"continuation": tokenizer.decode(new, skip_special_tokens=True), "token_ids": new.tolist(),
            "new_tokens": len(new), "seconds": time.perf_counter() - start}


def next_token_candidates(model, tokenizer, prompt: str, k: int = 3) -> list[dict[str, Any]]:
    """The ``k`` most likely next tokens after ``prompt``, with their logits as the model's dtype holds them."""
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        logits = model(**inputs).logits[0, -1]
    top = logits.float().topk(k)
    return [{"token": tokenizer.decode([int(i)]), "token_id": int(i), "logit": float(v)}
            for v, i in zip(top.values, top.indices, strict=True)]
