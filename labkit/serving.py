"""Notebook 06's topic: from one ``generate()`` call to a server under load, the mechanisms too long for a cell.

The notebook writes its experiments in its cells: the two ways of batching and each request's timestamps, the
percentiles and the KV positions they waste, the roofline bounds of the throughput-latency curve and its knee, the
speculative runs, the cost of a verification step and the break-even, the KV bytes per token and the pass through each
cache, the load levels and what the server answers to bad input, and every conclusion. This module holds its typed
parameters (:class:`Parameters`) and what a learner should not have to write:

- the **workload** shipped with labkit (``data/serving_workload.txt``, seeded: :func:`make_workload`);
- waiting for continuous batching's results (:func:`collect`), the timing rule applied to a whole workload
  (:func:`measured_runs`), and the pages a paged cache held at its peak (:func:`peak_pages`);
- the decode curve re-measured against its trend (:func:`decode_curve`);
- speculative decoding's counters (:class:`ForwardCounter`, :func:`speculative_run`);
- the bytes a cache object holds and the caches compared (:func:`held_bytes`, :func:`make_cache`,
  :func:`usable_caches`), and notebook 05's calculator fed with them (:func:`sequences_that_fit`);
- a **real server**: ``transformers serve --continuous-batching`` in a subprocess that labkit starts, waits for and
  always stops (:class:`Server`), and a bounded load of concurrent streaming clients (:func:`load`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import psutil
import torch
from transformers import QuantizedCache

from labkit import footprint, launcher, models, probes
from labkit.errors import BadParameter, LabkitError, ModelNotAvailable, check_sizes
from labkit.paths import cache_dir
from labkit.timing import measure, percentile, recheck_trend

WORKLOAD_FILE = Path(__file__).parent / "data" / "serving_workload.txt"
WORKLOAD_SEED = 6
WORKLOAD_SIZE = 128
QUOTED_TEXT = Path(__file__).parent / "data" / "lighthouse_keepers.txt"  # what the workload's prompts are cut from
SERVING_PACKAGES = ("fastapi", "uvicorn", "openai", "pydantic")  # what `transformers serve` imports (its extra)
# the page size transformers serve 5.25 runs with: its default. Its --cb-block-size flag would set it, through
# ContinuousBatchingConfig(block_size=...), which 5.17 deprecated in favour of page_size and which logs a warning
SERVER_PAGE_SIZE = 256

# Sizes where a parameter was left at 0 or empty (the shipped workload's lengths are divided by length_scale)
SIZES = {
    "gpu": {"requests": 128, "length_scale": 1, "static_batch": 32, "page_size": 256, "repeats": 3,
            "batch_sizes": [1, 4, 16, 64, 256], "curve_prompt": 128, "curve_new_tokens": 32, "spec_new_tokens": 128,
            "quote_words": 240, "kv_context": 2048, "kv_read": 256, "server_concurrency": [1, 4, 16, 64],
            "server_requests": 64},
    "quick": {"requests": 8, "length_scale": 16, "static_batch": 4, "page_size": 16, "repeats": 1,
              "batch_sizes": [1, 2, 4, 8], "curve_prompt": 8, "curve_new_tokens": 4, "spec_new_tokens": 16,
              "quote_words": 60, "kv_context": 128, "kv_read": 32, "server_concurrency": [1, 4], "server_requests": 8},
    "cpu": {"requests": 32, "length_scale": 4, "static_batch": 8, "page_size": 16, "repeats": 1,
            "batch_sizes": [1, 2, 4, 8, 16, 32], "curve_prompt": 32, "curve_new_tokens": 16, "spec_new_tokens": 64,
            "quote_words": 120, "kv_context": 1024, "kv_read": 64, "server_concurrency": [1, 2, 4, 8],
            "server_requests": 16},
}


# --------------------------------------------------------------------------- the parameters

@dataclass
class Parameters:
    """Notebook 06's parameters cell, typed (the same names and defaults); :meth:`resolve` sizes what was left at 0
    or empty for the machine, sizes the paged caches for the workload, and stops a wrong value with one sentence."""

    dtype: Any = "auto"
    model_id: str = "smollm2-135m"
    draft_model_id: str = "tiny-llama"
    requests: int = 0
    static_batch: int = 0
    batch_sizes: list = field(default_factory=list)
    kv_context: int = 0
    server_concurrency: list = field(default_factory=list)
    server_requests: int = 0
    length_scale: int = field(init=False, default=1)  # the shipped workload's lengths are divided by this
    page_size: int = field(init=False, default=16)  # tokens per page of section 1's paged cache
    repeats: int = field(init=False, default=1)  # runs of the whole workload (the median is kept)
    curve_prompt: int = field(init=False, default=8)  # section 2: prompt tokens ...
    curve_new_tokens: int = field(init=False, default=4)  # ... and new tokens of each decode point
    spec_new_tokens: int = field(init=False, default=16)  # section 3: tokens generated per speculative run
    quote_words: int = field(init=False, default=60)  # section 3: words of the passage the repeating prompt quotes
    kv_read: int = field(init=False, default=32)  # section 4: tokens read through each cache after kv_context
    draft_problem: str | None = field(init=False, default=None)  # why the draft model is not available here
    kv_pages: int = field(init=False, default=0)  # section 1's paged cache: pages ...
    max_batch_tokens: int | None = field(init=False, default=None)  # ... and the most tokens a step holds (CPU)
    server_pages: int = field(init=False, default=0)  # section 5's server: its KV cache in pages of 256 tokens ...
    server_capacity: int = field(init=False, default=0)  # ... the tokens they hold ...
    server_max_batch_tokens: int | None = field(init=False, default=None)  # ... and the most tokens per batch (CPU)

    def resolve(self, *, device: str, quick: bool) -> str:
        self.dtype = probes.resolve_dtype(self.dtype, device)
        probes.check_dtype(device, self.dtype)
        check_sizes(0, requests=self.requests, static_batch=self.static_batch, kv_context=self.kv_context,
                    server_requests=self.server_requests)
        for label in ("batch_sizes", "server_concurrency"):
            values = getattr(self, label)
            if isinstance(values, (str, int)):
                raise BadParameter(f"{label}={values!r}: give a list of whole numbers, e.g. [1, 4].")
            check_sizes(1, **{f"{label}[{i}]": v for i, v in enumerate(values)})
        if self.requests > WORKLOAD_SIZE:
            raise BadParameter(f"requests={self.requests}: the shipped workload holds {WORKLOAD_SIZE} requests.")
        problem = models.check_model(self.model_id)  # a misspelt name stops here with one sentence
        if problem:
            raise ModelNotAvailable(f"notebook 06 serves {self.model_id}, and {problem}")
        on_gpu = device.startswith("cuda")
        sizes = SIZES["gpu" if on_gpu and not quick else "quick" if quick else "cpu"]
        for name in ("requests", "static_batch", "kv_context", "server_requests"):
            setattr(self, name, getattr(self, name) or sizes[name])
        for name in ("batch_sizes", "server_concurrency"):
            setattr(self, name, sorted(set(getattr(self, name) or sizes[name])))
        for name in ("length_scale", "page_size", "repeats", "curve_prompt", "curve_new_tokens", "spec_new_tokens",
                     "quote_words", "kv_read"):
            setattr(self, name, sizes[name])
        text_tokens = len(models.load_tokenizer(self.model_id)(QUOTED_TEXT.read_text(encoding="utf-8"))["input_ids"])
        if self.kv_context + self.kv_read + 1 > text_tokens:
            raise BadParameter(f"kv_context={self.kv_context}: the shipped text has {text_tokens} tokens, and the "
                               f"quantized caches read {self.kv_read} more after the context.")
        self.draft_problem = models.check_model(self.draft_model_id)
        lengths = workload_lengths(self.requests, self.length_scale)
        # section 1's paged cache, sized for the whole workload at once (with a page to spare each): left to itself
        # it takes most of the free memory (on a CPU, most of the RAM)
        self.kv_pages = sum(math.ceil((p + n) / self.page_size) + 1 for p, n in lengths)
        self.max_batch_tokens = None if on_gpu else max(256, max(p for p, _ in lengths) + len(lengths))
        # the server's cache: pages of SERVER_PAGE_SIZE tokens for its longest request, for each concurrent client;
        # on a CPU the most tokens per batch kept above it, so that a prompt that cannot fit is refused before work
        longest = max(p + n for p, n in (lengths[i % len(lengths)] for i in range(self.server_requests)))
        self.server_pages = max(self.server_concurrency) * (math.ceil(longest / SERVER_PAGE_SIZE) + 1)
        self.server_capacity = self.server_pages * SERVER_PAGE_SIZE
        self.server_max_batch_tokens = None if on_gpu else self.server_capacity + SERVER_PAGE_SIZE
        prompts, news = [p for p, _ in lengths], [n for _, n in lengths]
        return (f"Model {self.model_id}; a workload of {len(lengths)} requests (prompts {min(prompts)}-{max(prompts)} "
                f"tokens, outputs {min(news)}-{max(news)}); static batches of {self.static_batch}; server concurrency "
                f"{self.server_concurrency}.")


# --------------------------------------------------------------------------- the shipped workload

@dataclass(frozen=True)
class Request:
    """One request of the workload: its prompt (token ids) and how many tokens it asks for."""

    id: str
    prompt_ids: tuple[int, ...]
    new_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def make_workload(seed: int = WORKLOAD_SEED, count: int = WORKLOAD_SIZE) -> list[tuple[int, int, int]]:
    """The workload's (offset, prompt tokens, new tokens) rows, in arrival order: log-normal lengths (median 160
    prompt and 96 output tokens), clipped to 32..1024 and 16..512. ``data/serving_workload.txt`` holds its output."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = int(min(1024, max(32, rng.lognormvariate(math.log(160), 0.8))))
        new = int(min(512, max(16, rng.lognormvariate(math.log(96), 0.9))))
        rows.append((rng.randrange(2048), prompt, new))
    return rows


def workload_rows(path: Path = WORKLOAD_FILE) -> list[tuple[int, int, int]]:
    """The rows of the shipped workload file (lines of ``offset prompt_tokens new_tokens``; # starts a comment)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            offset, prompt, new = (int(x) for x in line.split())
            rows.append((offset, prompt, new))
    return rows


def workload_lengths(requests: int = WORKLOAD_SIZE, length_scale: int = 1) -> list[tuple[int, int]]:
    """(prompt tokens, new tokens) of the first ``requests`` requests of the shipped workload, divided by
    ``length_scale`` (at least 4 prompt and 2 new tokens)."""
    check_sizes(1, requests=requests, length_scale=length_scale)
    return [(max(4, prompt // length_scale), max(2, new // length_scale))
            for _, prompt, new in workload_rows()[:requests]]


def load_workload(tokenizer, *, requests: int = WORKLOAD_SIZE, length_scale: int = 1) -> list[Request]:
    """The first ``requests`` requests of the shipped workload, their lengths divided by ``length_scale``
    (:func:`workload_lengths`). Each prompt is a slice of the quoted text, tokenized by ``tokenizer``."""
    text_ids = tokenizer(QUOTED_TEXT.read_text(encoding="utf-8"))["input_ids"]
    out = []
    for i, ((offset, _, _), (length, new)) in enumerate(zip(workload_rows(), workload_lengths(requests, length_scale),
                                                            strict=False)):
        ids = tuple(text_ids[(offset + j) % len(text_ids)] for j in range(length))
        out.append(Request(f"r{i}", ids, new))
    return out


# --------------------------------------------------------------------------- padding (exercise 06.1)

def padded_positions(prompt_tokens: Sequence[int], new_tokens: Sequence[int]) -> int:
    """Positions a static batch computes and caches: every row padded to the longest prompt, and run for as many
    steps as its longest output."""
    return len(prompt_tokens) * (max(prompt_tokens) + max(new_tokens))


def padding_waste(prompt_tokens: Sequence[int], new_tokens: Sequence[int]) -> float:
    """Fraction of a static batch's padded positions that hold no real token of any request."""
    useful = sum(prompt_tokens) + sum(new_tokens)
    return 1 - useful / padded_positions(prompt_tokens, new_tokens)


# --------------------------------------------------------------------------- static and continuous batching

def collect(manager, count: int, *, timeout_s: float = 900.0) -> dict[str, Any]:
    """The finished outputs of ``count`` requests added to a continuous-batching ``manager``, by request id."""
    done: dict[str, Any] = {}
    deadline = time.perf_counter() + timeout_s
    while len(done) < count:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{count - len(done)} of {count} requests were still running after {timeout_s:.0f} s.")
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("the continuous-batching worker stopped before every request finished.")
            continue
        if result.is_finished():
            if result.error:
                raise RuntimeError(f"request {result.request_id} failed: {result.error}")
            done[result.request_id] = result
    return done


def peak_pages(rows: Sequence[dict[str, Any]], page_size: int) -> int:
    """The most KV pages continuous batching's running requests needed at once: at every moment a request was
    scheduled or a token was made, each running request's prompt plus the tokens it had made so far, rounded up to
    pages. ``rows``: one per request, with ``prompt_tokens``, ``scheduled_s``, ``latency_s`` (when it was answered)
    and ``times_s`` (when each of its tokens was made), all in seconds from the same start."""
    events = sorted({t for r in rows for t in r["times_s"]} | {r["scheduled_s"] for r in rows})
    peak = 0
    for moment in events:
        pages = 0
        for r in rows:
            if r["scheduled_s"] <= moment <= r["latency_s"]:
                made = sum(1 for t in r["times_s"] if t <= moment)
                pages += math.ceil((r["prompt_tokens"] + made) / page_size)
        peak = max(peak, pages)
    return peak


def measured_runs(run: Callable[[], list[dict[str, Any]]], *, device: str, repeats: int) -> list[dict[str, Any]]:
    """The rows of the median run of ``run()`` by the workbook's timing rule, the runs ordered by the time their last
    request was answered (the caller warms up first, on a few requests: a whole workload is too long to repeat only
    to warm up)."""
    runs: list[list[dict[str, Any]]] = []

    def call():
        runs.append(run())

    measure(call, device=device, warmup=0, repeats=repeats, min_time_s=0)
    runs.sort(key=lambda rows: max(r["latency_s"] for r in rows))
    return runs[len(runs) // 2]


# --------------------------------------------------------------------------- the throughput-latency curve

def decode_curve(model, *, batch_sizes: Sequence[int], prompt_tokens: int, new_tokens: int,
                 repeats: int = 1) -> list[dict[str, Any]]:
    """Decode rows (labkit.outputs.measure_decode) for each batch size on random prompts, re-measured once where
    a larger batch stepped faster than a smaller one (the timing rule's trend check; ``noisy`` where it stays so)."""
    from labkit.outputs import measure_decode, random_prompt

    def one(batch: int) -> dict[str, Any]:
        ids = random_prompt(model, batch=batch, length=prompt_tokens)
        row = measure_decode(model, ids, new_tokens=new_tokens, repeats=repeats)
        row.pop("token_ids", None)
        return row

    rows = [one(b) for b in batch_sizes]
    return recheck_trend(rows, work="batch", time="step_ms", remeasure=lambda row: one(row["batch"]))


# --------------------------------------------------------------------------- speculative decoding

class ForwardCounter:
    """Counts the forward passes of a model during ``generate`` and the tokens each one was given (a public
    forward pre-hook): a verification step of speculative decoding is one forward over 1 + the proposed tokens."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.lengths.append(int(ids.shape[1]))

    def __enter__(self):
        self.lengths.clear()
        return self

    def __exit__(self, *exc):
        return None

    def remove(self) -> None:
        self.handle.remove()


def speculation_stats(lengths: list[int], prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """From the main model's forward lengths in one ``generate`` call: the first forward carries the prompt (and,
    with speculation, the first proposals); each later one carries the last token and the proposed ones. Each
    forward yields its accepted proposals plus one token of its own."""
    steps = len(lengths)
    proposed = (lengths[0] - prompt_tokens) + sum(n - 1 for n in lengths[1:])
    accepted = max(0, new_tokens - steps)
    return {"model_forwards": steps, "proposed": proposed, "accepted": accepted,
            "acceptance_rate": accepted / proposed if proposed else 0.0,
            "tokens_per_forward": new_tokens / steps if steps else 0.0}


def speculative_run(model, inputs, *, new_tokens: int, counter: ForwardCounter, repeats: int = 1,
                    **generate_kwargs) -> dict[str, Any]:
    """Greedy ``generate`` (with ``generate_kwargs`` such as ``prompt_lookup_num_tokens`` or ``assistant_model``),
    timed by the workbook's rule, with its token ids and speculation statistics."""
    prompt = inputs["input_ids"].shape[1]
    kept: dict[str, Any] = {}

    def call():
        with counter, _transformers_errors_only():  # assisted generation logs a notice about its own arguments
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=model.generation_config.pad_token_id, **generate_kwargs)
            kept["ids"], kept["lengths"] = out[0, prompt:].tolist(), list(counter.lengths)

    timing = measure(call, device=str(model.device), warmup=1, repeats=repeats, min_time_s=0)
    ids = kept["ids"]
    return {"token_ids": ids, "new_tokens": len(ids), "ms": timing.median_ms,
            "ms_per_token": timing.median_ms / max(1, len(ids)), **speculation_stats(kept["lengths"], prompt, len(ids))}


@contextlib.contextmanager
def _transformers_errors_only():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def repeating_prompt(words: int = 120) -> str:
    """A prompt that quotes a passage of the shipped text and then starts quoting it again: the continuation is
    already in the prompt, so looking it up there (prompt lookup) proposes the right tokens."""
    passage = " ".join(QUOTED_TEXT.read_text(encoding="utf-8").split()[:words])
    start = " ".join(passage.split()[:12])
    return f"Copy the passage exactly.\n\nPassage: {passage}\n\nCopy: {start}"


FRESH_PROMPT = "Once upon a time, in a small village by the sea, there lived"  # text the model writes on for long


# --------------------------------------------------------------------------- KV-cache size and quantization

def held_bytes(obj: Any, _seen: set[int] | None = None, _depth: int = 0) -> int:
    """Bytes of every tensor a cache object holds (its layers, their tensors, tuples and dicts of tensors), each
    storage counted once. A quantized tensor (a tensor subclass) counts the tensors it packs, not its logical size."""
    seen = set() if _seen is None else _seen
    if _depth > 8 or obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.dtype, torch.device)):
        return 0
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:  # a wrapper such as quanto's
            inner, _ = obj.__tensor_flatten__()
            return sum(held_bytes(getattr(obj, n), seen, _depth + 1) for n in inner)
        key = obj.untyped_storage().data_ptr() if obj.device.type != "meta" else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes() if obj.device.type != "meta" else obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple, set)):
        return sum(held_bytes(x, seen, _depth + 1) for x in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(x, seen, _depth + 1) for x in obj.values())
    if isinstance(obj, torch.nn.Module) or not hasattr(obj, "__dict__") or id(obj) in seen:
        return 0
    seen.add(id(obj))
    return sum(held_bytes(x, seen, _depth + 1) for x in vars(obj).values())


def cache_backends() -> dict[str, str | None]:
    """QuantizedCache backends and why one cannot run here (None when it can). quanto builds a C++ extension the
    first time it quantizes on a CPU (minutes, with a compiler); fp8 is plain PyTorch inside transformers."""
    out: dict[str, str | None] = {}
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        out["quanto"] = "optimum-quanto is not installed (pip install optimum-quanto)"
    else:
        out["quanto"] = None
    out["fp8"] = None if hasattr(torch, "float8_e4m3fn") else f"torch {torch.__version__} has no float8_e4m3fn"
    return out


def quanto_extension_built() -> bool:
    """Whether optimum-quanto's CPU extension is compiled already (its first use on a CPU compiles it)."""
    spec = importlib.util.find_spec("optimum.quanto")
    if spec is None or not spec.submodule_search_locations:
        return False
    root = Path(list(spec.submodule_search_locations)[0]) / "library" / "extensions" / "cpp" / "build"
    return any(root.glob("quanto_cpp*.so")) if root.exists() else False


def make_cache(kind: str, config):
    """The model's own cache (``"dynamic"``) or a 4-bit quanto / an fp8 ``QuantizedCache`` for ``config``."""
    from transformers import DynamicCache

    if kind == "dynamic":
        return DynamicCache(config=config)
    if kind == "quanto":
        return QuantizedCache(backend="quanto", config=config, nbits=4)
    if kind == "fp8":
        return QuantizedCache(backend="fp8", config=config)
    raise BadParameter(f"cache {kind!r} is unknown; use dynamic, quanto or fp8.")


def usable_caches(*, quick: bool) -> tuple[list[str], dict[str, str]]:
    """The caches to compare here ("dynamic", the model's own, first) and, for each backend left out, why."""
    kinds, left_out = ["dynamic"], {}
    for backend, why in cache_backends().items():
        if why is None and backend == "quanto" and quick and not quanto_extension_built():
            why = ("optimum-quanto compiles its CPU extension the first time it quantizes (minutes, with a C++ "
                   "compiler), too long for quick sizes: serving.prepare_quanto() builds it once")
        if why:
            left_out[f"QuantizedCache({backend})"] = why
        else:
            kinds.append(backend)
    return kinds, left_out


def prepare_quanto() -> bool:
    """Quantize a small tensor with optimum-quanto so that it compiles its CPU extension now, once (for `labkit
    prepare`); False when optimum-quanto is not installed."""
    if cache_backends()["quanto"] is not None:
        return False
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, vocab_size=16)
    cache = make_cache("quanto", config)
    keys = torch.randn(1, 1, 130, 64)
    cache.update(keys, keys, 0)
    cache.update(keys[:, :, :1], keys[:, :, :1], 0)
    return quanto_extension_built()


def sequences_that_fit(*, model_name: str = "llama-70b-shape", devices: str = "8 x 80 GB", context: int = 4096,
                       kv_fraction: float = 1.0) -> dict[str, Any]:
    """Notebook 05's calculator fed with the KV bytes per token: how many sequences of ``context`` tokens fit in the
    memory the 16-bit weights of ``model_name`` leave on ``devices`` (each filled to labkit.parallel's usable share),
    with a KV cache of ``kv_fraction`` of the 16-bit size (a quantized cache)."""
    model = models.empty_model(model_name)
    need = footprint.memory_needed(model, fmt="16-bit", batch=1, context=context)
    total = sum(d["bytes"] for d in footprint.parse_devices(devices)) * footprint.USABLE_FRACTION
    left = total - need["weights"]
    per_sequence = need["kv_cache"] * kv_fraction
    return {"model": model_name, "devices": devices, "context": context, "weights_gib": need["weights"] / 2**30,
            "kv_gib_per_sequence": per_sequence / 2**30, "kv_bytes_per_token": need["kv_cache"] / context,
            "sequences": max(0, int(left // per_sequence))}


# --------------------------------------------------------------------------- the server

class ServerFailed(LabkitError, RuntimeError):
    """The server process ended or never answered; the message ends with the last lines of its log."""


def serving_problem() -> str | None:
    """Why ``transformers serve`` cannot start here (its packages are missing), or None."""
    missing = [p for p in SERVING_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        return (f"transformers serve needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                "installed: pip install 'transformers[serving]'")
    return None


def model_folder(model_id: str) -> str:
    """What ``transformers serve`` is given to load: the embedded model's converted folder, a local folder, or a Hub
    id in the cache. A random-init model has no folder of weights to serve."""
    spec = models.EMBEDDED.get(model_id)
    if spec is not None and spec.kind == "random":
        raise BadParameter(f"{model_id} is built from a config with random weights; the server needs a folder of "
                           "weights (smollm2-135m, a local folder, or a Hub id in the cache).")
    if model_id == "smollm2-135m":
        return str(models.smollm2_folder())
    return model_id


# The watchdog between the notebook's kernel and the server: it starts the server as its child in its own process
# group and stops it when the kernel goes away, even when the kernel is killed (it never runs its atexit handlers).
# On Linux the kernel's death signals the watchdog at once (prctl PR_SET_PDEATHSIG) and the watchdog's own death
# kills the server; everywhere, the watchdog also notices within WATCH_PERIOD_S that its parent changed. It imports
# nothing but the standard library, so it starts in milliseconds.
WATCH_PERIOD_S = 0.2
WATCHDOG = r"""
import ctypes, os, signal, subprocess, sys, time
parent, log, use_pdeathsig, command = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4:]
linux = sys.platform.startswith("linux")
def die_with_parent(sig):
    if linux:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
if use_pdeathsig:
    die_with_parent(signal.SIGTERM)
if os.getppid() != parent:
    sys.exit(0)
with open(log, "ab", buffering=0) as out:
    child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             preexec_fn=(lambda: die_with_parent(signal.SIGKILL)) if linux else None)
def stop(*_):
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=3)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    os._exit(0)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, stop)
while child.poll() is None:
    if os.getppid() != parent:
        stop()
    time.sleep(PERIOD)
sys.exit(child.returncode)
""".replace("PERIOD", str(WATCH_PERIOD_S))


def _transformers_command() -> list[str]:
    script = Path(sys.executable).parent / "transformers"
    return [str(script)] if script.exists() else [sys.executable, "-m", "transformers.cli.transformers"]


def pid_running(pid: int | None) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an ended process its parent has not reaped)."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class Server:
    """``transformers serve`` on a loopback port, in a subprocess that labkit starts, waits for and always stops.

    ``start()`` launches it behind a watchdog in a process group of its own, writes its log to ``log_path`` and
    waits until ``/health`` answers. ``stop()`` ends the whole group (also registered with ``atexit``, and done by
    ``with Server(...) as server:``). If the Python process that started it is killed, the watchdog stops the
    server within a fraction of a second: nothing outlives the notebook.
    """

    def __init__(self, model: str, *, device: str = "cpu", dtype: str = "float32", port: int | None = None,
                 kv_pages: int | None = None, max_batch_tokens: int | None = None, max_model_len: int | None = None,
                 continuous_batching: bool = True, log_path: str | os.PathLike | None = None):
        self.model, self.port, self.max_model_len = model, port or launcher.free_port(), max_model_len
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else cache_dir() / "serving" / f"transformers-serve-{self.port}.log"
        flags = ["--host", "127.0.0.1", "--port", str(self.port), "--device", device, "--dtype", dtype]
        flags += ["--max-model-len", str(max_model_len)] if max_model_len else []  # transformers 5.25 and newer
        if continuous_batching:
            flags.append("--continuous-batching")
            if kv_pages:
                flags += ["--cb-num-blocks", str(kv_pages)]
            if max_batch_tokens:
                flags += ["--cb-max-batch-tokens", str(max_batch_tokens)]
        self.command = [*_transformers_command(), "serve", model, *flags]
        self.process: subprocess.Popen | None = None
        self.started_s: float | None = None

    @property
    def command_line(self) -> str:
        """The command a learner types in a terminal for the same server."""
        import shlex

        if "serve" not in self.command:
            return shlex.join(self.command)
        return "transformers " + shlex.join(self.command[self.command.index("serve"):])

    @property
    def watchdog_pid(self) -> int | None:
        return self.process.pid if self.process else None

    def server_pid(self) -> int | None:
        """The server's own process id (the watchdog's child), once it runs."""
        if not self.process:
            return None
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return None
        return children[0].pid if children else None

    def start(self, *, timeout_s: float = 300.0) -> Server:
        """Launch the server and wait until it answers ``/health`` (or raise ServerFailed with its log's end)."""
        if self.process is not None:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text(f"$ {self.command_line}\n")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        main_thread = threading.current_thread() is threading.main_thread()  # PDEATHSIG follows the thread
        begin = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(self.log_path), "1" if main_thread else "0",
             *self.command], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        atexit.register(self.stop)
        try:
            self._wait_until_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.started_s = time.perf_counter() - begin
        return self

    def _wait_until_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(f"the server exited with status {self.process.returncode} before it answered.\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise ServerFailed(f"the server did not answer {self.url}/health within {timeout_s:.0f} s.\n" + self.log_tail())

    def health(self) -> tuple[int, str]:
        """``/health``'s status code and body, as the server gives them."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def running(self) -> bool:
        """Whether the watchdog or the server still runs."""
        return pid_running(self.watchdog_pid) or self.port_in_use()

    def port_in_use(self) -> bool:
        return port_open(self.port)

    def log_tail(self, lines: int = 12) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def last_error(self) -> str:
        """The last error line the server wrote to its log (a traceback's last line), or an empty string."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        errors = [line.strip() for line in lines if "Error" in line and not line.lstrip().startswith(("File ", "^"))]
        return errors[-1] if errors else ""

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Stop the server and its watchdog: SIGTERM to their process group, SIGKILL after ``timeout_s``."""
        atexit.unregister(self.stop)
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Server({self.url}, {'running' if self.process else 'stopped'}, log {self.log_path})"


# --------------------------------------------------------------------------- a bounded load

async def load(one_request: Callable[[Request], Awaitable[dict[str, Any]]], requests: Sequence[Request], *,
               concurrency: int, timeout_s: float = 300.0) -> dict[str, Any]:
    """Send ``requests`` through ``concurrency`` clients, each taking the next request when its last one is answered
    (a closed loop: never more than ``concurrency`` in flight). ``one_request(request)`` returns a dict with
    ``ttft_s``, ``latency_s`` and ``tokens``, or raises. The whole level stops after ``timeout_s``."""
    check_sizes(1, concurrency=concurrency)
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    answers: list[dict[str, Any]] = []

    async def client():
        while not queue.empty():
            request = queue.get_nowait()
            try:
                answers.append({"request": request.id, "ok": True, **await one_request(request)})
            except Exception as error:  # a failed request is a measurement (an error row), not a crash
                answers.append({"request": request.id, "ok": False, "error": f"{type(error).__name__}: {error}"})

    start = time.perf_counter()
    tasks = [asyncio.create_task(client()) for _ in range(min(concurrency, len(requests)))]
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    wall = time.perf_counter() - start
    ok = [a for a in answers if a["ok"]]
    level: dict[str, Any] = {"concurrency": concurrency, "requests": len(requests), "answered": len(ok),
                             "failed": len(requests) - len(ok), "seconds": wall,
                             "requests_per_s": len(ok) / wall, "tokens_per_s": sum(a["tokens"] for a in ok) / wall,
                             "errors": sorted({a["error"] for a in answers if not a["ok"]})[:3]}
    for key in ("ttft_s", "latency_s"):
        values = [1e3 * a[key] for a in ok if a.get(key) is not None]
        if values:
            label = key.removesuffix("_s")
            level[f"{label}_p50_ms"], level[f"{label}_p99_ms"] = percentile(values, 50), percentile(values, 99)
    return level


def prompt_of(tokenizer, tokens: int) -> str:
    """A prompt of about ``tokens`` tokens: the shipped text, repeated and cut to that many tokens."""
    text = QUOTED_TEXT.read_text(encoding="utf-8")
    per_copy = max(1, len(tokenizer(text)["input_ids"]))
    ids = tokenizer(text * (tokens // per_copy + 1), add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def error_answer(error: BaseException) -> dict[str, Any]:
    """The HTTP status and the server's own message of an OpenAI client error (or the error, when there is none)."""
    status = getattr(error, "status_code", None)
    body = getattr(error, "body", None)
    message = body.get("detail") or body.get("error") if isinstance(body, dict) else body
    return {"status": status, "message": str(message if message is not None else error)}
