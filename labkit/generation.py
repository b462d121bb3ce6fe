"""Notebook 02's topic: prefill and decode of a causal language model, the mechanisms too long for a cell.

The notebook writes its experiments in its cells (the loops over models, attention implementations and recipes, the
prefill call being timed, the bandwidth bound, the step budget, the KV cache measured, the conclusions). This module
holds its typed parameters (:class:`Parameters`) and what a learner should not have to write: random prompts and a
``generate`` that never stops early, the decode rate (a step's time as the difference of two ``generate`` calls), a
hand-written decode loop in the style of gpt-fast (:class:`GreedyLoop`), and the capture of transformers' warnings and
of SDPA's refusals.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from transformers import StaticCache

from labkit import compat, models, probes
from labkit.errors import BadParameter, check_sizes
from labkit.timing import measure, synchronize

# --------------------------------------------------------------------------- the parameters


@dataclass
class Parameters:
    """Notebook 02's parameters cell, typed (the same names and defaults); :meth:`resolve` sizes what was left at 0
    or empty for the machine and stops a wrong value with one sentence."""

    dtype: Any = "auto"
    model_ids: list = field(default_factory=lambda: ["smollm2-135m", "tiny-opt"])
    decode_model: str = "auto"
    prompt: str = "Hello my dog is cute and"
    prompt_lengths: list = field(default_factory=list)
    prefill_batch: int = 0
    new_tokens: int = 0
    batch_sizes: list = field(default_factory=list)
    compile: Any = "auto"
    problems: dict = field(init=False, default_factory=dict)  # model: why it is skipped here (None: it loads)
    implementations: list = field(init=False, default_factory=list)  # the attention implementations compared
    compile_step: bool = field(init=False, default=False)
    repeats: int = field(init=False, default=2)

    def resolve(self, *, device: str, quick: bool) -> str:
        self.dtype = probes.resolve_dtype(self.dtype, device)
        probes.check_dtype(device, self.dtype)
        if isinstance(self.model_ids, str) or not self.model_ids:
            raise BadParameter(f"model_ids={self.model_ids!r}: give a list of one or more causal language models.")
        check_sizes(0, prefill_batch=self.prefill_batch, new_tokens=self.new_tokens)
        check_sizes(1, **{f"prompt_lengths[{i}]": n for i, n in enumerate(self.prompt_lengths)},
                    **{f"batch_sizes[{i}]": b for i, b in enumerate(self.batch_sizes)})
        if self.new_tokens == 1:
            raise BadParameter("new_tokens=1: decoding needs at least 2 new tokens to time a step.")
        if self.compile not in ("auto", True, False):
            raise BadParameter(f"compile={self.compile!r}: use 'auto', True or False.")
        on_gpu = device.startswith("cuda")
        if self.decode_model == "auto":
            self.decode_model = "random-llama-1b" if on_gpu else "smollm2-135m"
        self.model_ids = list(self.model_ids)
        self.problems = {name: models.check_model(name) for name in dict.fromkeys([*self.model_ids, self.decode_model])}
        if on_gpu:  # sizes where a parameter was left at 0 or empty
            lengths, batch, tokens, batches = [256, 2048], 4, 32 if quick else 64, [1, 8] if quick else [1, 8, 32]
        else:
            lengths, batch, tokens, batches = [32, 128] if quick else [64, 256], 1, 8 if quick else 16, [1, 4]
        self.prompt_lengths = sorted(set(self.prompt_lengths or lengths))
        self.prefill_batch = self.prefill_batch or batch
        self.new_tokens = self.new_tokens or tokens
        self.batch_sizes = sorted(set(self.batch_sizes or batches))
        self.compile_step = on_gpu if self.compile == "auto" else self.compile
        self.repeats = 3 if on_gpu and not quick else 2
        self.implementations = implementations(device, self.dtype)
        return (f"Prefill: batch {self.prefill_batch}, prompts of {self.prompt_lengths} tokens; decode: "
                f"{self.new_tokens} new tokens, batches {self.batch_sizes}, model {self.decode_model}; attention "
                f"implementations {self.implementations}; compiled step {'on' if self.compile_step else 'off'}.")


def implementations(device: str, dtype) -> list[str]:
    """The attention implementations section 2 compares: eager and sdpa, and flash_attention_2 where it runs."""
    found = ["eager", "sdpa"]
    if probes.flash_attn()["ok"] and device.startswith("cuda") and dtype in (torch.float16, torch.bfloat16):
        found.append("flash_attention_2")
    return found


# --------------------------------------------------------------------------- inputs and generate

def random_prompt(model, *, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids of shape (batch, length) drawn from the ordinary part of the vocabulary, on the model's device."""
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
    check_sizes(1, new_tokens=new_tokens)
    if attention_mask is None:  # no padding: say so, instead of letting generate guess from the pad token
        attention_mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=_pad_id(model, tokenizer), **kwargs)


# --------------------------------------------------------------------------- decode

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
    """Time ``run(1)`` and ``run(new_tokens)`` (each returns the new token ids) and derive the decode rate.

    The first call of ``run(new_tokens)`` is timed on its own (it pays any compilation) and counts as a warm-up."""
    if new_tokens < 2:
        raise BadParameter(f"new_tokens={new_tokens}: decoding needs at least 2 new tokens to time a step.")
    outputs: dict[str, Any] = {}

    def timed(count):
        def call():
            outputs["ids"] = run(count)
        return call

    one = measure(timed(1), device=device, warmup=warmup, repeats=repeats)
    start = time.perf_counter()
    timed(new_tokens)()
    synchronize(device)
    first_s = time.perf_counter() - start
    full = measure(timed(new_tokens), device=device, warmup=max(warmup - 1, 0), repeats=repeats)
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
            "token_ids": outputs["ids"].tolist()}


# --------------------------------------------------------------------------- a hand-written decode loop

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
    return _decode_rate(lambda count: loop(input_ids, count), input_ids, new_tokens=loop.new_tokens,
                        device=str(loop.model.device), warmup=warmup, repeats=repeats)


# --------------------------------------------------------------------------- padding

@contextlib.contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """The messages transformers logs inside the block (its warnings go to its logger, not to ``warnings``)."""
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield said
    finally:
        logger.removeHandler(handler)


def attempt_with_reasons(call: Callable[[], Any]) -> dict[str, Any]:
    """Run ``call()``; a RuntimeError (such as "No available kernel") becomes its first line, and the SDPA refusal
    reasons PyTorch warned about just before it are kept."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
            error = ""
        except RuntimeError as err:
            error = str(err).strip().splitlines()[0]
    return {"ok": not error, "error": error, "reasons": probes.refusal_reasons([str(w.message) for w in caught])}
