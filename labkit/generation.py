"""Notebook 02's topic: prefill and decode of a causal language model, measured against the machine's limits.

Prefill runs the whole prompt through the model once (compute-heavy: many tokens per weight read). Decode produces
one token per step and reads every weight once per step, so its rate is bounded by memory bandwidth
(:func:`labkit.roofline.decode_bound_tokens_per_s`). This module plans the notebook (:func:`notebook_plan`), measures
(prefill sweeps with the trend recheck, decode rates, a hand-written decode loop, the matrix-vector products of one
step alone, a KV cache's real size) and sums the results up (:func:`what_you_measured`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
import warnings
from typing import Any, Callable, Iterator

import torch
from transformers import StaticCache

from labkit import compat, models, probes, roofline
from labkit.attention import peak_extra_memory
from labkit.errors import BadParameter, check_sizes
from labkit.metrics import decoders as names
from labkit.timing import measure, recheck_trend, synchronize

FAR_ABOVE_THE_BOUND = 5.0  # a decode step this many times the time its bytes need is "far above the bound"


# --------------------------------------------------------------------------- the plan

def notebook_plan(*, device: str, quick: bool, dtype: Any = "auto", model_ids: Any = ("smollm2-135m", "tiny-opt"),
                  decode_model: str = "auto", prompt_lengths: Any = (), prefill_batch: int = 0, new_tokens: int = 0,
                  batch_sizes: Any = (), compile: Any = "auto") -> dict[str, Any]:
    """Notebook 02's parameters, checked (one sentence for a bad one), and its sizes for this device."""
    dtype = probes.resolve_dtype(dtype, device)
    probes.check_dtype(device, dtype)
    if isinstance(model_ids, str) or not model_ids:
        raise BadParameter(f"model_ids={model_ids!r}: give a list of one or more causal language models.")
    check_sizes(0, prefill_batch=prefill_batch, new_tokens=new_tokens)
    check_sizes(1, **{f"prompt_lengths[{i}]": n for i, n in enumerate(prompt_lengths)},
                **{f"batch_sizes[{i}]": b for i, b in enumerate(batch_sizes)})
    if new_tokens == 1:
        raise BadParameter("new_tokens=1: decoding needs at least 2 new tokens to time a step.")
    if compile not in ("auto", True, False):
        raise BadParameter(f"compile={compile!r}: use 'auto', True or False.")
    on_gpu = device.startswith("cuda")
    decode_model = decode_model if decode_model != "auto" else ("random-llama-1b" if on_gpu else "smollm2-135m")
    problems = {name: models.check_model(name) for name in dict.fromkeys([*model_ids, decode_model])}
    sizes = default_sizes(on_gpu, quick)
    plan = {"dtype": dtype, "model_ids": list(model_ids), "decode_model": decode_model, "problems": problems,
            "prompt_lengths": sorted(set(prompt_lengths or sizes["prompt_lengths"])),
            "prefill_batch": prefill_batch or sizes["prefill_batch"], "new_tokens": new_tokens or sizes["new_tokens"],
            "batch_sizes": sorted(set(batch_sizes or sizes["batch_sizes"])),
            "compile_step": on_gpu if compile == "auto" else compile, "repeats": 3 if on_gpu and not quick else 2,
            "implementations": implementations(device, dtype)}
    plan["line"] = (f"Prefill: batch {plan['prefill_batch']}, prompts of {plan['prompt_lengths']} tokens; decode: "
                    f"{plan['new_tokens']} new tokens, batches {plan['batch_sizes']}, model {decode_model}; "
                    f"attention implementations {plan['implementations']}; compiled step "
                    f"{'on' if plan['compile_step'] else 'off'}.")
    return plan


def default_sizes(on_gpu: bool, quick: bool) -> dict[str, Any]:
    """The sizes used where a parameter is left at 0 or empty."""
    if on_gpu:
        return {"prompt_lengths": [256, 2048], "prefill_batch": 4, "new_tokens": 32 if quick else 64,
                "batch_sizes": [1, 8] if quick else [1, 8, 32]}
    return {"prompt_lengths": [32, 128] if quick else [64, 256], "prefill_batch": 1,
            "new_tokens": 8 if quick else 16, "batch_sizes": [1, 4]}


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


# --------------------------------------------------------------------------- prefill

def measure_prefill(model, input_ids, *, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Time one forward pass over the prompt (building the KV cache) and its peak extra memory.

    Only the last position's logits are computed (``logits_to_keep=1``), as ``generate`` does: logits over
    the whole vocabulary at every prompt position would dwarf the attention memory being compared.
    """
    device = str(model.device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def call():
        with torch.inference_mode():
            return model(input_ids=input_ids, use_cache=True, **extra)

    timing = measure(call, device=device, warmup=warmup, repeats=repeats)
    tokens = input_ids.numel()
    return {"batch": input_ids.shape[0], "prompt_tokens": input_ids.shape[1], "tokens": tokens,
            "median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
            "tokens_per_s": tokens / (timing.median_ms / 1e3), "peak_extra_bytes": peak_extra_memory(call, device)}


def usable_lengths(model, lengths: list[int]) -> list[int]:
    """The prompt lengths the model's position table can hold (one position is left for the next token)."""
    limit = getattr(model.config, "max_position_embeddings", None) or max(lengths)
    return [n for n in lengths if n + 1 <= limit]


def prefill_sweep(model, lengths: list[int], *, batch: int, repeats: int) -> list[dict[str, Any]]:
    """Prefill time and memory at each prompt length for the model's current attention implementation, then the
    timing rule's trend recheck (work = tokens): a point whose time fell while the tokens grew is measured again,
    and marked ``noisy`` if it still contradicts the trend."""
    rows = [measure_prefill(model, random_prompt(model, batch=batch, length=n), repeats=repeats) for n in lengths]

    def remeasure(point):
        again = measure_prefill(model, random_prompt(model, batch=batch, length=point["prompt_tokens"]),
                                repeats=repeats + 2)
        return {k: again[k] for k in ("median_ms", "p10_ms", "p90_ms", "tokens_per_s")}

    return recheck_trend(rows, work="tokens", remeasure=remeasure)


def prefill_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prefill rows as a learner reads them: median and p10-p90 in ms, peak MiB, and whether the point is noisy."""
    return [{"model": r["model"], "attn_implementation": r["attn_implementation"], "batch": r["batch"],
             "prompt tokens": r["prompt_tokens"], "median ms": r["median_ms"],
             "p10-p90 ms": f"{r['p10_ms']:.3g}-{r['p90_ms']:.3g}", "tokens/s": r["tokens_per_s"],
             "peak MiB": None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20,
             "timing": "noisy" if r.get("noisy") else "ok"} for r in rows]


def prefill_findings(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The prefill sweep's metrics: time and peak memory per point, and a ``noisy`` marker where the trend
    recheck could not make the time consistent."""
    found: dict[str, float] = {}
    for r in rows:
        key = (r["model"], r["attn_implementation"], r["prompt_tokens"])
        found[names.prefill(*key, "ms")] = r["median_ms"]
        if r["peak_extra_bytes"] is not None:
            found[names.prefill(*key, "peak_mib")] = r["peak_extra_bytes"] / 2**20
        if r.get("noisy"):
            found[names.prefill(*key, "noisy")] = 1
    return {"metrics": found}


def longest_prompt(rows: list[dict[str, Any]], configs: dict[str, Any], dtype) -> list[dict[str, Any]]:
    """Eager against sdpa at each model's longest prompt: the ratio of peak memories, the ratio of times (None when
    either time is noisy: no conclusion is drawn from it), and the size of one layer's N x N attention scores."""
    found = []
    for name, config in configs.items():
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        n = max(r["prompt_tokens"] for r in mine)
        at = {r["attn_implementation"]: r for r in mine if r["prompt_tokens"] == n}
        eager, sdpa = at.get("eager"), at.get("sdpa")
        if not (eager and sdpa and eager["peak_extra_bytes"] and sdpa["peak_extra_bytes"]):
            continue
        noisy = eager.get("noisy") or sdpa.get("noisy")
        scores = roofline.element_size(dtype) * sdpa["batch"] * config.num_attention_heads * n * n
        found.append({"model": name, "prompt tokens": n,
                      "eager / sdpa memory": eager["peak_extra_bytes"] / sdpa["peak_extra_bytes"],
                      "eager / sdpa time": None if noisy else eager["median_ms"] / sdpa["median_ms"],
                      "one layer's scores MiB": scores / 2**20, "timing": "noisy" if noisy else "ok"})
    return found


def longest_prompt_findings(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metrics": {names.eager_over_sdpa_memory(r["model"]): r["eager / sdpa memory"] for r in rows}}


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


def bandwidth_bound(model, row: dict[str, Any], bandwidth_bytes_per_s: float, *,
                    extra_bytes: int = 0) -> dict[str, Any]:
    """The bandwidth bound of a decode measurement ``row`` (batch, prompt_tokens, new_tokens): weights read per
    step (plus ``extra_bytes``, e.g. quantization scales) and the KV cache at the run's middle length; the time a
    step needs at that bound; and the measured step time as a multiple of it."""
    context = row["prompt_tokens"] + row["new_tokens"] // 2  # the cache grows during the run: its middle size
    weights = roofline.weight_bytes_per_token(model) + extra_bytes
    cache = roofline.kv_cache_bytes(model.config, batch=row["batch"], context=context, dtype=model.dtype)
    bound = roofline.decode_bound_tokens_per_s(bandwidth_bytes_per_s, weights, cache, batch=row["batch"])
    bound_step_ms = 1e3 * row["batch"] / bound
    return {"bound_tokens_per_s": bound, "weight_bytes": weights, "kv_cache_bytes": cache,
            "bound_step_ms": bound_step_ms,
            "fraction_of_bound": row["tokens_per_s"] / bound if "tokens_per_s" in row else None,
            "step_over_bound": row["step_ms"] / bound_step_ms if "step_ms" in row else None}


def decode_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Decode rows against their bound: the measured time of one step beside the time its bytes need."""
    return [{"model": r["model"], "attn_implementation": r["attn_implementation"],
             "weights MB": r["weight_bytes"] / 1e6,
             "KV cache MB": r["kv_cache_bytes"] / 1e6, "step ms": r["step_ms"], "bound step ms": r["bound_step_ms"],
             "step / bound": r["step_over_bound"], "tokens/s": r["tokens_per_s"],
             "fraction of bound": r["fraction_of_bound"]} for r in rows]


def step_verdict(step_ms: float, bound_step_ms: float, device: str, *, products_ms: float | None = None) -> str:
    """What a measured decode step says against the time its bytes need, in words; with ``products_ms`` (the step's
    matrix-vector products timed alone, :func:`weights_alone`) also which part of the step sets its pace."""
    ratio = step_ms / bound_step_ms
    said = f"a step takes {step_ms:.3g} ms where reading its bytes needs {bound_step_ms:.3g} ms ({ratio:.1f}x)"
    on_gpu = device.startswith("cuda")
    if ratio < 1.5:
        return f"{said}: close to the bound; reading the weights sets the pace (bandwidth-bound)."
    if products_ms is not None:
        share = min(products_ms / step_ms, 1.0)
        if share >= 0.5:
            speed = (f"; they read the weights at {bound_step_ms / products_ms:.0%} of the copy's speed"
                     if products_ms > bound_step_ms else "")
            return (f"{said}; the matrix-vector products alone take {products_ms:.3g} ms of it ({share:.0%}), so "
                    f"they set the pace{speed}.")
        rest = ("on a GPU, usually the launching of the step's many small kernels one by one" if on_gpu
                else "Python, the dispatch of every small op, and generate's own work where it runs")
        return (f"{said}; the matrix-vector products alone take only {products_ms:.3g} ms of it ({share:.0%}), so "
                f"the rest of the step sets the pace: {rest}.")
    if ratio >= FAR_ABOVE_THE_BOUND and on_gpu:
        return (f"{said}: far above the bound: memory does not set the pace (on a GPU, usually the launching of many "
                "small kernels); section 4 times the matrix-vector products alone to show where the time goes.")
    return (f"{said}: reading the bytes at this machine's best bandwidth would take {100 / ratio:.2g}% of the step; "
            "section 4 times the matrix-vector products alone to show where the rest goes.")


def decode_findings(rows: list[dict[str, Any]], bandwidth_bytes_per_s: float) -> dict[str, Any]:
    """Section 3's metrics: the bandwidth, and per run its rate, its step time, its bound's step time, its fraction."""
    found: dict[str, float] = {names.BANDWIDTH: bandwidth_bytes_per_s / 1e9}
    for r in rows:
        key = (r["model"], r["attn_implementation"])
        found.update({names.decode(*key, "tokens_per_s"): r["tokens_per_s"],
                      names.decode(*key, "step_ms"): r["step_ms"],
                      names.decode(*key, "bound_step_ms"): r["bound_step_ms"],
                      names.decode(*key, "fraction_of_bandwidth_bound"): r["fraction_of_bound"]})
    return {"metrics": found}


# --------------------------------------------------------------------------- do implementations agree?

def implementations_agree(model, tokenizer, prompt: str, implementations: list[str], *, new_tokens: int,
                          seed: int = 1) -> dict[str, Any]:
    """Greedy tokens of ``prompt`` and the logits of two random prompts of 48 tokens under each implementation;
    the largest relative logit difference from sdpa's. The model is switched back to sdpa at the end."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    random_ids = random_prompt(model, batch=2, length=48, seed=seed)
    tokens, logits = {}, {}
    for implementation in implementations:
        model.set_attn_implementation(implementation)
        out = generate_exactly(model, ids, new_tokens, tokenizer=tokenizer)
        tokens[implementation] = out[0, ids.shape[1]:].tolist()
        with torch.inference_mode():
            logits[implementation] = model(input_ids=random_ids).logits.double()
    model.set_attn_implementation("sdpa")
    error = max(float((x - logits["sdpa"]).norm() / logits["sdpa"].norm()) for x in logits.values())
    return {"same_tokens": all(t == tokens["sdpa"] for t in tokens.values()), "logit_error": error,
            "text": {k: tokenizer.decode(v) for k, v in tokens.items()}}


def agreement_findings(agree: dict[str, dict[str, Any]], *, tolerance: float = 1e-4) -> dict[str, Any]:
    """The claims of the comparison: identical greedy tokens, and logits equal to float32 rounding."""
    worst = max(a["logit_error"] for a in agree.values())
    same = {name: a["same_tokens"] for name, a in agree.items()}
    return {"metrics": {names.logits_difference(name): a["logit_error"] for name, a in agree.items()},
            "checks": {"greedy_tokens_identical_across_implementations": (all(same.values()), str(same)),
                       "logits_agree_across_implementations": (worst < tolerance,
                                                               f"largest relative difference {worst:.1e}")}}


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


# --------------------------------------------------------------------------- where a step's time goes

def weights_alone(model, *, batch: int = 1, repeats: int = 5) -> dict[str, Any]:
    """The matrix-vector products of one decode step and nothing else: every linear layer's weight (each shared
    weight once) times a ``batch`` x in_features input, back to back. Its time is the floor of a step's matrix
    work on this machine; its bytes over its time is the bandwidth those products reach."""
    weights = list({id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}.values())
    inputs = [torch.randn(batch, w.shape[1], device=w.device, dtype=w.dtype) for w in weights]

    def call():
        with torch.inference_mode():
            for x, w in zip(inputs, weights, strict=True):
                torch.nn.functional.linear(x, w)

    timing = measure(call, device=str(model.device), warmup=2, repeats=repeats)
    read = sum(w.numel() * w.element_size() for w in weights)
    return {"median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms, "bytes": read,
            "bytes_per_s": read / (timing.median_ms / 1e3), "products": len(weights)}


def step_budget(recipes: list[dict[str, Any]], alone: dict[str, Any]) -> list[dict[str, Any]]:
    """Each recipe's step split in two measured parts: the matrix-vector products (timed alone) and the rest
    (attention, norms, the cache, Python, ``generate``'s own work), with the step's p10-p90 spread."""
    return [{"recipe": r["recipe"], "step ms": r["step_ms"],
             "p10-p90 ms": f"{r['step_p10_ms']:.3g}-{r['step_p90_ms']:.3g}",
             "matrix products ms": alone["median_ms"], "the rest ms": r["step_ms"] - alone["median_ms"],
             "bound step ms": r["bound_step_ms"], "fraction of bound": r["fraction_of_bound"]} for r in recipes]


def budget_lines(recipes: list[dict[str, Any]], alone: dict[str, Any], bandwidth_bytes_per_s: float) -> list[str]:
    """What the step budget shows, in words, from the numbers (no claim the numbers do not carry)."""
    if not recipes:
        return []
    base = recipes[0]
    lines = [f"The matrix-vector products alone take {alone['median_ms']:.3g} ms ({alone['products']} products, "
             f"{alone['bytes'] / 1e6:.0f} MB at {alone['bytes_per_s'] / 1e9:.3g} GB/s, against a copy at "
             f"{bandwidth_bytes_per_s / 1e9:.3g} GB/s); a {base['recipe']} step takes {base['step_ms']:.3g} ms, so "
             f"{100 * min(alone['median_ms'] / base['step_ms'], 1):.0f}% of it is those products."]
    for r in recipes[1:]:
        if "compile" in r["recipe"]:
            lines.append(f"{r['recipe']}: its first call took {r['first_call_extra_s']:.1f} s more than the others "
                         "(the compilation; a cache of another size compiles again).")
        change = r["step_ms"] - base["step_ms"]
        spread = max(r["step_p90_ms"] - r["step_p10_ms"], base["step_p90_ms"] - base["step_p10_ms"])
        if abs(change) <= spread:
            lines.append(f"{r['recipe']}: {r['step_ms']:.3g} ms a step, within the spread of the "
                         f"{base['recipe']} ({spread:.2g} ms between p10 and p90): no difference shown.")
        else:
            lines.append(f"{r['recipe']}: {r['step_ms']:.3g} ms a step, {abs(change):.3g} ms "
                         f"{'less' if change < 0 else 'more'} than the {base['recipe']}; the matrix products are the "
                         "same calls, so the change is in the rest.")
    agreeing = sum(r["token_ids"] == base["token_ids"] for r in recipes)
    lines.append(f"{agreeing} of {len(recipes)} recipes generated exactly the {base['recipe']}'s "
                 f"{base['new_tokens']} tokens (each decoded {base['new_tokens']} tokens from the same "
                 f"{base['prompt_tokens']}-token prompt).")
    return lines


def recipe_findings(recipes: list[dict[str, Any]], alone: dict[str, Any], *, dtype) -> dict[str, Any]:
    """The recipes' metrics, the best batch-1 fraction of the bound, and whether the recipes generated the same
    tokens (a check in float32, where every recipe computes the same sums to rounding; in 16-bit a compiled kernel
    may round differently and a near-tie may flip a greedy token, so there it is a count)."""
    found: dict[str, Any] = {"metrics": {names.WEIGHTS_ALONE_MS: alone["median_ms"]}, "checks": {}}
    for r in recipes:
        found["metrics"].update({names.recipe(r["recipe"], "tokens_per_s"): r["tokens_per_s"],
                                 names.recipe(r["recipe"], "step_ms"): r["step_ms"],
                                 names.recipe(r["recipe"], "fraction_of_bandwidth_bound"): r["fraction_of_bound"]})
        if "compile" in r["recipe"]:
            found["metrics"][names.recipe(r["recipe"], "compile_seconds")] = r["first_call_extra_s"]
    if recipes:
        agreeing = sum(r["token_ids"] == recipes[0]["token_ids"] for r in recipes)
        found["metrics"][names.RECIPES_AGREEING] = agreeing
        found["metrics"][names.BEST_FRACTION_BATCH1] = max(r["fraction_of_bound"] for r in recipes)
        found["checks"]["recipes_decode_the_same_number_of_tokens"] = (
            len({(r["prompt_tokens"], r["new_tokens"]) for r in recipes}) == 1, "")
        if dtype == torch.float32:
            found["checks"]["recipes_generate_the_same_tokens"] = (agreeing == len(recipes),
                                                                   f"{agreeing} of {len(recipes)} agree")
    return found


# --------------------------------------------------------------------------- the KV cache, measured

def kv_cache_measured(model, *, context: int, batch: int = 1) -> int:
    """Bytes of a real static KV cache for ``context`` tokens: the cache is made, one token is run through it
    (which allocates its tensors), and the bytes of every layer's keys and values are added up."""
    cache = StaticCache(config=model.config, max_cache_len=context)
    keywords = compat.forward_keywords(model)
    ids = random_prompt(model, batch=batch, length=1)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **{keywords["cache"]: cache})
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def kv_cache_findings(model, measured_bytes: int, *, context: int, batch: int = 1) -> dict[str, Any]:
    """The measured cache in MiB, and the claim that it is what the formula (roofline.kv_cache_bytes) says."""
    formula = roofline.kv_cache_bytes(model.config, batch=batch, context=context, dtype=model.dtype)
    return {"metrics": {names.KV_CACHE_MIB: measured_bytes / 2**20},
            "checks": {"kv_cache_size_is_the_formula": (measured_bytes == formula,
                                                        f"measured {measured_bytes} bytes, formula {formula}")}}


# --------------------------------------------------------------------------- batching

def compute_bound(model, row: dict[str, Any], flops_per_s: float) -> float:
    """The compute bound on the tokens/s of all the sequences of a decode measurement ``row`` (batch, prompt_tokens,
    new_tokens): every token costs the same FLOPs (about 2 per weight, plus attention over the cache at the run's
    middle length), so FLOP/s / FLOPs per token, the same at every batch (a batch of b sequences does b tokens' work
    in a step, and yields b tokens)."""
    flops = roofline.decoder_flops_per_token(sum(p.numel() for p in model.parameters()),
                                             layers=model.config.num_hidden_layers,
                                             context=row["prompt_tokens"] + row["new_tokens"] // 2,
                                             hidden=model.config.hidden_size)
    return flops_per_s / flops


def batch_sweep(model, tokenizer, *, batch_sizes: list[int], new_tokens: int, repeats: int, prompt_tokens: int,
                bandwidth_bytes_per_s: float, flops_per_s: float, batch1: dict[str, Any] | None = None) -> list[dict]:
    """Decode at each batch size (``batch1``: an existing batch-1 row of the same prompt, reused), each against
    its bandwidth bound (which grows with the batch) and its compute bound (:func:`compute_bound`, the same at
    every batch)."""
    rows = []
    for b in batch_sizes:
        row = batch1 if b == 1 and batch1 is not None else measure_decode(
            model, random_prompt(model, batch=b, length=prompt_tokens), new_tokens=new_tokens, repeats=repeats,
            tokenizer=tokenizer)
        bound = bandwidth_bound(model, row, bandwidth_bytes_per_s)
        rows.append({"batch": b, "step ms": row["step_ms"], "tokens/s (all sequences)": row["tokens_per_s"],
                     "bound tokens/s": bound["bound_tokens_per_s"], "fraction of bound": bound["fraction_of_bound"],
                     "compute bound tokens/s": compute_bound(model, row, flops_per_s)})
    return rows


def batch_findings(rows: list[dict[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {"metrics": {}, "timing": {}}
    for r in rows:
        found["metrics"][names.batch(r["batch"], "tokens_per_s")] = r["tokens/s (all sequences)"]
        found["metrics"][names.batch(r["batch"], "step_ms")] = r["step ms"]
    if len(rows) >= 2:
        gain = rows[-1]["tokens/s (all sequences)"] / rows[0]["tokens/s (all sequences)"]
        found["timing"]["batching_raises_throughput"] = (gain > 1.0, f"batch {rows[-1]['batch']}: {gain:.2f}x")
    return found


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


def padding_findings(seen: dict[str, list[int]], said: list[str]) -> dict[str, Any]:
    """The padding claims: left padding continues as the prompt alone does; transformers warns about right padding."""
    return {"checks": {"left_padding_matches_the_prompt_alone": seen["left"] == seen["alone"],
                       "right_padding_is_warned_about": any("right-padding" in m for m in said)}}


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


# --------------------------------------------------------------------------- the figure and the summary

# what the notebook shows beside the reference runs (words: metric name)
REFERENCE_METRICS = {"memory bandwidth GB/s": names.BANDWIDTH,
                     "best batch-1 fraction of the bandwidth bound": names.BEST_FRACTION_BATCH1,
                     "dynamic cache, ms a step": names.recipe("dynamic cache", "step_ms"),
                     "hand loop, compiled step, ms a step": names.recipe("hand loop, compiled step", "step_ms"),
                     "matrix products alone, ms a step": names.WEIGHTS_ALONE_MS,
                     "batch 1 tokens/s": names.batch(1, "tokens_per_s")}

def fractions(decode_rows: list[dict], recipes: list[dict], batch_rows: list[dict], decode_model: str):
    """Labels and fractions of the bandwidth bound of every decode run, batch-1 runs first (the batch sweep's batch 1
    is the dynamic-cache recipe, shown once)."""
    batches = [r for r in batch_rows if r["batch"] != 1]
    labels = [f"{r['model']}, {r['attn_implementation']}" for r in decode_rows]
    labels += [f"{decode_model}, {r['recipe']}" for r in recipes]
    labels += [f"{decode_model}, batch {r['batch']}" for r in batches]
    values = [r["fraction_of_bound"] for r in [*decode_rows, *recipes]] + [r["fraction of bound"] for r in batches]
    return labels, values


def _pace(ratio: float) -> str:
    if ratio >= FAR_ABOVE_THE_BOUND:
        return "far above it"
    return "above it" if ratio >= 1.5 else "close to it (bandwidth-bound)"


def what_you_measured(results: dict[str, Any]) -> list[str]:
    """Notebook 02's results in a few sentences (each only when its part ran)."""
    m, checks, lines = results["metrics"], results["checks"], []
    sdpa = [k.removesuffix("_step_ms") for k in m if k.startswith("decode_") and k.endswith("_sdpa_step_ms")]
    if sdpa and f"{sdpa[0]}_bound_step_ms" in m:
        step, bound = m[f"{sdpa[0]}_step_ms"], m[f"{sdpa[0]}_bound_step_ms"]
        model = sdpa[0].removeprefix("decode_").removesuffix("_sdpa").replace("_", " ")
        lines.append(f"Decode of {model} (sdpa, batch 1): {step:.3g} ms a step, where reading its bytes at this "
                     f"machine's bandwidth needs {bound:.3g} ms: {step / bound:.1f}x, {_pace(step / bound)}.")
    fractions = {k.removeprefix("recipe_").removesuffix("_fraction_of_bandwidth_bound").replace("_", " "): v
                 for k, v in m.items() if k.startswith("recipe_") and k.endswith("_fraction_of_bandwidth_bound")}
    if fractions:
        winner = max(fractions, key=fractions.get)
        alone, base = m.get(names.WEIGHTS_ALONE_MS), m.get(names.recipe("dynamic cache", "step_ms"))
        products = (f"; the matrix-vector products alone took {alone:.3g} ms of the dynamic cache's {base:.3g} ms "
                    "step" if alone and base else "")
        lines.append(f"The best batch-1 recipe, {winner}, reached {100 * fractions[winner]:.0f}% of the bandwidth "
                     f"bound{products}.")
    ratios = {k.removeprefix("prefill_").removesuffix("_eager_over_sdpa_memory").replace("_", " "): v
              for k, v in m.items() if k.endswith("_eager_over_sdpa_memory")}
    if ratios:
        shown = ", ".join(f"{model} {ratio:.2f}x" for model, ratio in ratios.items())
        lines.append(f"Prefill at the longest prompt: eager attention's peak memory over sdpa's: {shown} (eager "
                     "holds each layer's N x N scores).")
    noisy = sum(k.startswith("prefill_") and k.endswith("_noisy") for k in m)
    if noisy:
        lines.append(f"{noisy} prefill time{'s' * (noisy != 1)} stayed against the trend after a second measurement "
                     "(marked noisy): nothing is concluded from them.")
    batches = sorted(int(k.removeprefix("batch").split("_")[0]) for k in m
                     if k.startswith("batch") and k.endswith("_tokens_per_s"))
    if len(batches) >= 2:
        gain = m[names.batch(batches[-1], "tokens_per_s")] / m[names.batch(batches[0], "tokens_per_s")]
        lines.append(f"Batch {batches[-1]} produced {gain:.1f}x the tokens/s of batch {batches[0]}: a step reads "
                     "the weights once for all the sequences of its batch.")
    if "left_padding_matches_the_prompt_alone" in checks:
        lines.append("A short prompt in a left-padded batch continued exactly as it does alone."
                     if checks["left_padding_matches_the_prompt_alone"]
                     else "A short prompt in a left-padded batch did not continue as it does alone here.")
    return lines or ["No decode ran on this machine: the 'Skipped:' lines above say why."]
