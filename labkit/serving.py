"""Notebook 06's topic: from one ``generate()`` call to a server under load.

- a mixed **workload** shipped with labkit (``data/serving_workload.txt``, seeded: :func:`make_workload`);
- **static batching** (padded batches through ``generate``) against **continuous batching** (transformers'
  ``continuous_batching_context_manager`` with a paged KV cache): tokens/s, time to first token (TTFT), per-token
  and end-to-end latency, and the KV memory each holds;
- the **throughput-latency curve** of decoding against the roofline (bandwidth bound at batch 1, compute bound at a
  large batch) and its knee;
- **speculative decoding** (prompt lookup, a draft model): acceptance rate, tokens per step of the main model,
  speed-up, and the acceptance rate at which a draft breaks even;
- **KV-cache size** (one formula: :func:`labkit.roofline.kv_bytes_per_token`) and ``QuantizedCache``;
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import torch
from transformers import QuantizedCache

from labkit import compat, footprint, launcher, models, outputs, probes, roofline
from labkit.errors import BadParameter, LabkitError, check_sizes
from labkit.metrics import serving as names
from labkit.paths import cache_dir
from labkit.timing import measure, percentile, recheck_trend

WORKLOAD_FILE = Path(__file__).parent / "data" / "serving_workload.txt"
WORKLOAD_SEED = 6
WORKLOAD_SIZE = 128
QUOTED_TEXT = Path(__file__).parent / "data" / "lighthouse_keepers.txt"  # what the workload's prompts are cut from
SERVING_PACKAGES = ("fastapi", "uvicorn", "openai", "pydantic")  # what `transformers serve` imports (its extra)
CACHE_BACKENDS = ("quanto", "fp8")  # QuantizedCache backends compared with the model's own cache


# --------------------------------------------------------------------------- the plan

def default_sizes(on_gpu: bool, quick: bool) -> dict[str, Any]:
    """Sizes for this kind of machine. Lengths of the shipped workload are divided by ``length_scale`` on a CPU."""
    if on_gpu and not quick:
        return {"requests": 128, "length_scale": 1, "static_batch": 32, "page_size": 256, "repeats": 3,
                "batch_sizes": [1, 4, 16, 64, 256], "curve_prompt": 128, "curve_new_tokens": 32,
                "spec_new_tokens": 128, "quote_words": 240, "kv_context": 2048, "kv_read": 256,
                "server_concurrency": [1, 4, 16, 64], "server_requests": 64}
    if quick:
        return {"requests": 8, "length_scale": 16, "static_batch": 4, "page_size": 16, "repeats": 1,
                "batch_sizes": [1, 2, 4, 8], "curve_prompt": 8, "curve_new_tokens": 4, "spec_new_tokens": 16,
                "quote_words": 60, "kv_context": 128, "kv_read": 32, "server_concurrency": [1, 4],
                "server_requests": 8}
    return {"requests": 32, "length_scale": 4, "static_batch": 8, "page_size": 16, "repeats": 1,
            "batch_sizes": [1, 2, 4, 8, 16, 32], "curve_prompt": 32, "curve_new_tokens": 16,
            "spec_new_tokens": 64, "quote_words": 120, "kv_context": 1024, "kv_read": 64,
            "server_concurrency": [1, 2, 4, 8], "server_requests": 16}


def notebook_plan(*, device: str, quick: bool, dtype: Any = "auto", model_id: str = "smollm2-135m",
                  draft_model_id: str = "tiny-llama", requests: int = 0, static_batch: int = 0,
                  batch_sizes: Any = (), kv_context: int = 0, server_concurrency: Any = (),
                  server_requests: int = 0) -> dict[str, Any]:
    """Notebook 06's parameters, checked (one sentence for a bad one), its sizes, its model and its workload."""
    dtype = probes.resolve_dtype(dtype, device)
    probes.check_dtype(device, dtype)
    check_sizes(0, requests=requests, static_batch=static_batch, kv_context=kv_context,
                server_requests=server_requests)
    for label, values in (("batch_sizes", batch_sizes), ("server_concurrency", server_concurrency)):
        if isinstance(values, (str, int)):
            raise BadParameter(f"{label}={values!r}: give a list of whole numbers, e.g. [1, 4].")
        check_sizes(1, **{f"{label}[{i}]": v for i, v in enumerate(values)})
    if requests > WORKLOAD_SIZE:
        raise BadParameter(f"requests={requests}: the shipped workload holds {WORKLOAD_SIZE} requests.")
    problem = models.check_model(model_id)  # a misspelt name stops here with one sentence
    if problem:
        raise models.ModelNotAvailable(f"notebook 06 serves {model_id}, and {problem}")
    on_gpu = device.startswith("cuda")
    sizes = default_sizes(on_gpu, quick)
    model, tokenizer = models.load_model(model_id, device=device, dtype=dtype)
    workload = load_workload(tokenizer, requests=requests or sizes["requests"], length_scale=sizes["length_scale"])
    static = static_batch or sizes["static_batch"]
    text_tokens = len(tokenizer(QUOTED_TEXT.read_text(encoding="utf-8"))["input_ids"])
    if (kv_context or sizes["kv_context"]) + sizes["kv_read"] + 1 > text_tokens:
        raise BadParameter(f"kv_context={kv_context}: the shipped text has {text_tokens} tokens, and the quantized "
                           f"caches read {sizes['kv_read']} more after the context.")
    plan = {"dtype": dtype, "model_id": model_id, "model": model, "tokenizer": tokenizer, "workload": workload,
            "static_batch": static, "page_size": sizes["page_size"], "repeats": sizes["repeats"],
            "batch_sizes": sorted(set(batch_sizes or sizes["batch_sizes"])), "curve_prompt": sizes["curve_prompt"],
            "curve_new_tokens": sizes["curve_new_tokens"], "spec_new_tokens": sizes["spec_new_tokens"],
            "quote_words": sizes["quote_words"], "kv_read": sizes["kv_read"],
            "draft_model_id": draft_model_id, "draft_problem": models.check_model(draft_model_id),
            "kv_context": kv_context or sizes["kv_context"],
            "server_concurrency": sorted(set(server_concurrency or sizes["server_concurrency"])),
            "server_requests": server_requests or sizes["server_requests"]}
    # Sized for the workload: left to itself, the paged cache takes most of the free memory (on a CPU, most RAM)
    plan.update(paged_cache_size(workload, page_size=plan["page_size"], concurrent=len(workload)))
    if on_gpu:
        plan["max_batch_tokens"] = None  # transformers' own choice on a GPU
    plan.update(server_sizes(workload, plan["server_concurrency"], plan["server_requests"], on_gpu=on_gpu))
    plan["server_door"] = server_door(plan["server_capacity"], getattr(model.config, "max_position_embeddings", None))
    plan["line"] = (f"Model {model_id}; a workload of {len(workload)} requests (prompts "
                    f"{min(r.prompt_tokens for r in workload)}-{max(r.prompt_tokens for r in workload)} tokens, "
                    f"outputs {min(r.new_tokens for r in workload)}-{max(r.new_tokens for r in workload)}); static "
                    f"batches of {static}; server concurrency {plan['server_concurrency']}.")
    return plan


def paged_cache_size(workload: Sequence[Request], *, page_size: int, concurrent: int) -> dict[str, int]:
    """Pages for ``concurrent`` of the workload's longest requests at once (with one page to spare each), and the
    most tokens one batch may hold: what ``ContinuousBatchingConfig`` is given instead of sizing itself from memory."""
    check_sizes(1, page_size=page_size, concurrent=concurrent)
    longest = sorted((r.prompt_tokens + r.new_tokens for r in workload), reverse=True)[:concurrent]
    pages = sum(math.ceil(n / page_size) + 1 for n in longest)
    return {"kv_pages": pages, "max_batch_tokens": max(256, max(r.prompt_tokens for r in workload) + len(workload))}


# the page size transformers serve 5.25 runs with: its default. Its --cb-block-size flag would set it, through
# ContinuousBatchingConfig(block_size=...), which 5.17 deprecated in favour of page_size and which logs a warning
SERVER_PAGE_SIZE = 256


def server_sizes(workload: Sequence[Request], concurrency: Sequence[int], requests: int, *,
                 on_gpu: bool) -> dict[str, Any]:
    """The server's requests (the workload, repeated when more are asked for), its KV cache in pages of
    SERVER_PAGE_SIZE tokens (enough for the most concurrent clients), and on a CPU the most tokens per batch, kept
    above the cache's capacity so that a prompt that cannot fit is refused before any work."""
    chosen = [workload[i % len(workload)] for i in range(requests)]
    longest = max(r.prompt_tokens + r.new_tokens for r in chosen)
    pages = max(concurrency) * (math.ceil(longest / SERVER_PAGE_SIZE) + 1)
    capacity = pages * SERVER_PAGE_SIZE
    return {"server_workload": chosen, "server_pages": pages, "server_capacity": capacity,
            "server_max_batch_tokens": None if on_gpu else capacity + SERVER_PAGE_SIZE}


def server_door(capacity: int, context: int | None) -> int | None:
    """The ``--max-model-len`` the notebook's server gets, or None where ``transformers serve`` has no such flag
    (before 5.25): twice the tokens its KV cache holds, within the model's context. On purpose above the cache, so that
    section 5 can show both a prompt refused at the door and one admitted that the cache can never hold."""
    if not compat.serve_takes_max_model_len():
        return None
    return min(2 * capacity, context) if context else 2 * capacity


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


def load_workload(tokenizer, *, requests: int = WORKLOAD_SIZE, length_scale: int = 1) -> list[Request]:
    """The first ``requests`` requests of the shipped workload, their lengths divided by ``length_scale`` (at least 4
    prompt and 2 new tokens). Each prompt is a slice of the quoted text, tokenized by ``tokenizer``."""
    check_sizes(1, requests=requests, length_scale=length_scale)
    text_ids = tokenizer(QUOTED_TEXT.read_text(encoding="utf-8"))["input_ids"]
    out = []
    for i, (offset, prompt, new) in enumerate(workload_rows()[:requests]):
        length = max(4, prompt // length_scale)
        ids = tuple(text_ids[(offset + j) % len(text_ids)] for j in range(length))
        out.append(Request(f"r{i}", ids, max(2, new // length_scale)))
    return out


def workload_table(workload: Sequence[Request]) -> list[dict[str, Any]]:
    return [{"request": r.id, "prompt tokens": r.prompt_tokens, "new tokens": r.new_tokens} for r in workload]


def batches(workload: Sequence[Request], size: int) -> list[list[Request]]:
    """The workload cut in arrival order into static batches of ``size`` requests (the last may be smaller)."""
    check_sizes(1, size=size)
    return [list(workload[i:i + size]) for i in range(0, len(workload), size)]


# --------------------------------------------------------------------------- padding and paged blocks

def padded_positions(prompt_tokens: Sequence[int], new_tokens: Sequence[int]) -> int:
    """Positions a static batch computes and caches: every row padded to the longest prompt, and run for as many
    steps as its longest output."""
    return len(prompt_tokens) * (max(prompt_tokens) + max(new_tokens))


def padding_waste(prompt_tokens: Sequence[int], new_tokens: Sequence[int]) -> float:
    """Fraction of a static batch's padded positions that hold no real token of any request."""
    useful = sum(prompt_tokens) + sum(new_tokens)
    return 1 - useful / padded_positions(prompt_tokens, new_tokens)


def paged_positions(prompt_tokens: Sequence[int], new_tokens: Sequence[int], page_size: int) -> int:
    """Positions a paged cache reserves for the same requests: each request's own length, rounded up to pages."""
    return sum(math.ceil((p + n) / page_size) * page_size for p, n in zip(prompt_tokens, new_tokens, strict=True))


def kv_bytes_per_token(model) -> int:
    """Bytes one token adds to ``model``'s KV cache in the model's dtype (the one formula, in labkit.roofline)."""
    shape = roofline.kv_shape(model.config)
    return roofline.kv_bytes_per_token(layers=shape["layers"], kv_heads=shape["kv_heads"], head_dim=shape["head_dim"],
                                       element_bytes=roofline.element_size(model.dtype))


# --------------------------------------------------------------------------- static and continuous batching

def static_rows(batch: Sequence[Request], output, padded, clock: outputs.StepClock,
                start: float) -> list[dict[str, Any]]:
    """One row per request of a static batch that ``generate`` ran: its token ids, TTFT, per-token latency, and when
    it was returned (with its whole batch, at the batch's end)."""
    width = padded["input_ids"].shape[1]
    generated = output.shape[1] - width
    finished = clock.times[-1] if clock.times else time.perf_counter()
    rows = []
    for i, request in enumerate(batch):
        times = clock.times[:request.new_tokens]
        rows.append(_row(request, output[i, width:width + request.new_tokens].tolist(), times, start, finished,
                         padded_width=width, generated=generated, batch_size=len(batch)))
    return rows


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


def continuous_rows(workload: Sequence[Request], outputs: dict[str, Any], start: float) -> list[dict[str, Any]]:
    """One row per request run by continuous batching, from the timestamps it recorded."""
    rows = []
    for request in workload:
        output = outputs[request.id]
        times = list(output.timestamps or [])
        row = _row(request, list(output.generated_tokens), times, start, output.lifespan[1])
        row["scheduled_s"] = output.lifespan[0] - start
        rows.append(row)
    return rows


def _row(request: Request, tokens: list[int], times: list[float], start: float, finished: float,
         **extra: Any) -> dict[str, Any]:
    first = times[0] if times else finished
    per_token = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return {"request": request.id, "prompt_tokens": request.prompt_tokens, "new_tokens": len(tokens),
            "token_ids": tokens, "ttft_s": first - start, "token_latency_s": per_token, "latency_s": finished - start,
            "token_times_s": [t - start for t in times], **extra}


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Tokens/s over the whole run (useful tokens only) and the p50/p99 of TTFT, per-token and end-to-end latency."""
    makespan = max(r["latency_s"] for r in rows)
    ttft = [1e3 * r["ttft_s"] for r in rows]
    token = [1e3 * r["token_latency_s"] for r in rows if r["token_latency_s"] is not None]
    latency = [1e3 * r["latency_s"] for r in rows]
    out = {"requests": len(rows), "tokens": sum(r["new_tokens"] for r in rows), "seconds": makespan}
    out["tokens_per_s"] = out["tokens"] / makespan
    for label, values in (("ttft", ttft), ("token_latency", token), ("latency", latency)):
        if values:
            out[f"{label}_p50_ms"], out[f"{label}_p99_ms"] = percentile(values, 50), percentile(values, 99)
    return out


def static_kv(rows: Sequence[dict[str, Any]], bytes_per_token: int) -> dict[str, float]:
    """KV memory of static batching: each batch's padded cache (rows x (padded prompt + generated steps)); the
    largest batch's is what the run held at its peak."""
    per_batch, start = [], 0
    while start < len(rows):  # rows come batch after batch, each row knowing its batch's size
        row = rows[start]
        per_batch.append(row["batch_size"] * (row["padded_width"] + row["generated"]))
        start += row["batch_size"]
    useful = sum(r["prompt_tokens"] + r["new_tokens"] for r in rows)
    slots = sum(per_batch)
    return {"peak_bytes": max(per_batch) * bytes_per_token, "slots": slots, "useful": useful,
            "waste": 1 - useful / slots}


def paged_kv(rows: Sequence[dict[str, Any]], bytes_per_token: int, page_size: int) -> dict[str, float]:
    """KV memory of continuous batching: at every moment a token was produced, the pages the running requests
    needed (their prompt plus the tokens made so far, rounded up to pages); the largest total is the peak."""
    events = sorted({t for r in rows for t in r["token_times_s"]} | {r["scheduled_s"] for r in rows})
    peak_pages = 0
    for moment in events:
        pages = 0
        for r in rows:
            if r["scheduled_s"] <= moment <= r["latency_s"]:
                made = sum(1 for t in r["token_times_s"] if t <= moment)
                pages += math.ceil((r["prompt_tokens"] + made) / page_size)
        peak_pages = max(peak_pages, pages)
    useful = sum(r["prompt_tokens"] + r["new_tokens"] for r in rows)
    slots = paged_positions([r["prompt_tokens"] for r in rows], [r["new_tokens"] for r in rows], page_size)
    return {"peak_bytes": peak_pages * page_size * bytes_per_token, "slots": slots, "useful": useful,
            "waste": 1 - useful / slots}


def measured_runs(run: Callable[[], list[dict[str, Any]]], *, device: str, repeats: int) -> list[dict[str, Any]]:
    """The rows of the median run of ``run()`` by the workbook's timing rule (the caller warms up first, on a few
    requests: a whole workload is too long to repeat only to warm up)."""
    runs: list[list[dict[str, Any]]] = []

    def call():
        runs.append(run())

    measure(call, device=device, warmup=0, repeats=repeats, min_time_s=0)
    runs.sort(key=lambda rows: summary(rows)["seconds"])
    return runs[len(runs) // 2]


def batching_results(static: Sequence[dict[str, Any]], continuous: Sequence[dict[str, Any]], *,
                     bytes_per_token: int, page_size: int) -> dict[str, dict[str, float]]:
    """The summaries of both runs with the KV memory each held at its peak (MiB) and the share of its KV positions
    that held no real token (%)."""
    out = {}
    for mode, rows, kv in (("static", static, static_kv(static, bytes_per_token)),
                           ("continuous", continuous, paged_kv(continuous, bytes_per_token, page_size))):
        out[mode] = {**summary(rows), "kv_peak_mib": kv["peak_bytes"] / 2**20, "kv_waste_percent": 100 * kv["waste"]}
    return out


def batching_table(results: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    return [{"batching": mode, "tokens/s": s["tokens_per_s"], "TTFT p50 ms": s.get("ttft_p50_ms"),
             "TTFT p99 ms": s.get("ttft_p99_ms"), "per-token p50 ms": s.get("token_latency_p50_ms"),
             "per-token p99 ms": s.get("token_latency_p99_ms"), "latency p50 ms": s.get("latency_p50_ms"),
             "latency p99 ms": s.get("latency_p99_ms"), "KV peak MiB": s.get("kv_peak_mib"),
             "KV slots wasted %": s.get("kv_waste_percent")}
            for mode, s in results.items()]


def batching_findings(results: dict[str, dict[str, float]], *, same_tokens: int, requests: int,
                      on_gpu: bool, quick: bool) -> dict[str, Any]:
    """Metrics and checks of section 1 (``results``: static and continuous summaries with their KV numbers)."""
    metrics = {names.batching(mode, key): value for mode, s in results.items() for key, value in s.items()
               if key not in ("requests", "tokens", "seconds")}
    ratio = results["continuous"]["tokens_per_s"] / results["static"]["tokens_per_s"]
    metrics[names.CONTINUOUS_OVER_STATIC] = ratio
    metrics[names.SAME_TOKENS] = same_tokens
    checks: dict[str, Any] = {
        "paged_cache_wastes_fewer_slots_than_padding": (
            results["continuous"]["kv_waste_percent"] < results["static"]["kv_waste_percent"],
            f"paged {results['continuous']['kv_waste_percent']:.0f}% vs padded "
            f"{results['static']['kv_waste_percent']:.0f}%"),
    }
    if on_gpu and not quick:
        checks["continuous_batching_at_least_twice_static_tokens_per_s"] = (ratio >= 2, f"{ratio:.2f}x")
    return {"metrics": metrics, "checks": checks}


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


def curve_bounds(model, rows: list[dict[str, Any]], *, bandwidth_bytes_per_s: float,
                 flops_per_s: float) -> list[dict[str, Any]]:
    """Each decode row (labkit.outputs.measure_decode) with its bandwidth bound (weights and KV cache read once
    per step, for the whole batch) and its compute bound (FLOPs per token against the matmul ceiling)."""
    weights = roofline.weight_bytes_per_token(model)
    config = model.config
    shape = roofline.kv_shape(config)
    parameters = weights // roofline.element_size(model.dtype)
    out = []
    for row in rows:
        context = row["prompt_tokens"] + row["new_tokens"] // 2
        kv = roofline.kv_cache_bytes(config, batch=row["batch"], context=context, dtype=model.dtype)
        flops = roofline.decoder_flops_per_token(parameters, layers=shape["layers"], context=context,
                                                 hidden=shape["heads"] * shape["head_dim"])
        bandwidth_bound = roofline.decode_bound_tokens_per_s(bandwidth_bytes_per_s, weights, kv, batch=row["batch"])
        compute_bound = flops_per_s / flops
        bound = min(bandwidth_bound, compute_bound)
        out.append({**row, "bandwidth_bound_tokens_per_s": bandwidth_bound, "compute_bound_tokens_per_s": compute_bound,
                    "fraction_of_bound": row["tokens_per_s"] / bound})
    return out


def knee_batch(model, *, bandwidth_bytes_per_s: float, flops_per_s: float) -> float:
    """The batch at which the two bounds meet (the KV cache left out): below it a step waits for the weights to
    arrive, above it for the arithmetic. It is the ridge point (FLOP/s / bytes/s) x bytes per weight / 2."""
    weights = roofline.weight_bytes_per_token(model)
    parameters = weights // roofline.element_size(model.dtype)
    per_token_compute = flops_per_s / roofline.decoder_flops_per_token(parameters)
    return per_token_compute * weights / bandwidth_bytes_per_s


def curve_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"batch": r["batch"], "tokens/s": r["tokens_per_s"], "per-token latency ms": r["step_ms"],
             "bandwidth bound tokens/s": r["bandwidth_bound_tokens_per_s"],
             "compute bound tokens/s": r["compute_bound_tokens_per_s"], "fraction of the bound": r["fraction_of_bound"]}
            for r in rows]


def curve_findings(rows: list[dict[str, Any]], knee: float) -> dict[str, Any]:
    metrics = {names.curve(r["batch"], key): r[key] for r in rows
               for key in ("tokens_per_s", "step_ms", "fraction_of_bound")}
    metrics[names.KNEE_BATCH] = knee
    first, last = rows[0], rows[-1]
    return {"metrics": metrics, "timing": {
        "batching_raises_tokens_per_s": (last["tokens_per_s"] > first["tokens_per_s"],
                                         f"batch {last['batch']}: {last['tokens_per_s']:.1f} tokens/s, batch "
                                         f"{first['batch']}: {first['tokens_per_s']:.1f}"),
        "every_point_under_its_roofline_bound": (max(r["fraction_of_bound"] for r in rows) < 1.05,
                                                 f"highest fraction {max(r['fraction_of_bound'] for r in rows):.2f}")}}


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


def step_costs(model, inputs, *, proposals: int, greedy: dict[str, Any], draft_greedy: dict[str, Any],
               repeats: int = 3) -> dict[str, float]:
    """What one speculative step costs, in steps of plain greedy decoding (``greedy``: a :func:`speculative_run`
    without speculation; ``draft_greedy``: the draft's own). Verifying is a greedy step plus the extra work of
    ``proposals`` more tokens in the same forward (two forwards timed after a prefilled prompt); proposing is
    ``proposals`` draft steps."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = inputs["input_ids"]
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)

    def forward_ms(count: int) -> float:
        step = ids[:, -1:].repeat(1, count)

        def call():
            with torch.inference_mode():
                model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=count)
            cache.crop(-count)  # back to the prompt alone, for the next repeat
        return measure(call, device=str(model.device), warmup=1, repeats=repeats).median_ms

    extra = max(0.0, forward_ms(1 + proposals) - forward_ms(1))
    step = greedy["ms_per_token"]
    return {"proposals": proposals, "verify_cost": (step + extra) / step,
            "draft_cost": draft_greedy["ms_per_token"] / step}


def measured_break_even(run: dict[str, Any], greedy: dict[str, Any], proposals: int) -> float:
    """The acceptance rate at which this assisted run would have matched plain greedy decoding: its time per
    verification step, in greedy steps, less the one token a step always yields, shared by the proposals."""
    step_in_greedy_steps = (run["ms"] / run["model_forwards"]) / greedy["ms_per_token"]
    return (step_in_greedy_steps - 1) / proposals


def speculative_table(runs: dict[str, dict[str, Any]], greedy: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for label, run in runs.items():
        base = greedy[label.split(", ")[0]]
        rows.append({"run": label, "new tokens": run["new_tokens"], "forwards of the model": run["model_forwards"],
                     "proposed": run["proposed"], "accepted": run["accepted"],
                     "acceptance rate": run["acceptance_rate"], "tokens per forward": run["tokens_per_forward"],
                     "ms": run["ms"], "speed-up vs greedy": base["ms"] / run["ms"],
                     "same tokens as greedy": run["token_ids"] == base["token_ids"]})
    return rows


def lookup_findings(runs: dict[str, dict[str, Any]], greedy: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Metrics and checks of prompt lookup on the repeating and the fresh prompt (``runs`` keyed "<prompt>, ...")."""
    metrics, same = {}, True
    for label, run in runs.items():
        prompt = label.split(", ")[0]
        base = greedy[prompt]
        metrics.update({names.speculative("prompt_lookup", prompt, "acceptance_rate"): run["acceptance_rate"],
                        names.speculative("prompt_lookup", prompt, "tokens_per_forward"): run["tokens_per_forward"],
                        names.speculative("prompt_lookup", prompt, "speedup"): base["ms"] / run["ms"]})
        same = same and run["token_ids"] == base["token_ids"]
    repeating, fresh = runs["repeating, prompt lookup"], runs["fresh, prompt lookup"]
    return {"metrics": metrics, "checks": {
        "prompt_lookup_gives_the_greedy_tokens": same,
        "a_repeating_prompt_accepts_more_proposals": (repeating["acceptance_rate"] > fresh["acceptance_rate"],
                                                      f"{repeating['acceptance_rate']:.2f} vs "
                                                      f"{fresh['acceptance_rate']:.2f}")},
        "timing": {"prompt_lookup_speeds_up_a_repeating_prompt": (
            greedy["repeating"]["ms"] > repeating["ms"], f"{greedy['repeating']['ms'] / repeating['ms']:.2f}x")}}


def draft_findings(run: dict[str, Any], greedy: dict[str, Any], *, break_even: float, predicted: float,
                   random_draft: bool) -> dict[str, Any]:
    checks: dict[str, Any] = {"assisted_decoding_gives_the_greedy_tokens": run["token_ids"] == greedy["token_ids"]}
    if random_draft:
        checks["a_random_draft_is_almost_never_accepted"] = (run["acceptance_rate"] < 0.2,
                                                             f"acceptance rate {run['acceptance_rate']:.2f}")
    return {"metrics": {names.speculative("draft", "fresh", "acceptance_rate"): run["acceptance_rate"],
                        names.speculative("draft", "fresh", "speedup"): greedy["ms"] / run["ms"],
                        names.DRAFT_BREAK_EVEN: break_even, names.DRAFT_BREAK_EVEN_PREDICTED: predicted},
            "checks": checks}


# --------------------------------------------------------------------------- KV-cache size and quantization

def kv_table(names_and_configs: dict[str, Any], *, element_bytes: int = 2) -> list[dict[str, Any]]:
    """KV bytes per token of each config in 16-bit (``element_bytes``), with the attention kind it uses: MHA (one
    key/value head per query head), GQA (groups of query heads share one) or MQA (all share a single one)."""
    rows = []
    for label, config in names_and_configs.items():
        shape = roofline.kv_shape(config)
        kind = "MHA" if shape["kv_heads"] == shape["heads"] else "MQA" if shape["kv_heads"] == 1 else "GQA"
        per_token = roofline.kv_bytes_per_token(layers=shape["layers"], kv_heads=shape["kv_heads"],
                                                head_dim=shape["head_dim"], element_bytes=element_bytes)
        rows.append({"model": label, "attention": kind, **shape, "KV KiB per token": per_token / 2**10,
                     "GiB at 4096 tokens": per_token * 4096 / 2**30})
    return rows


def kv_findings(rows: list[dict[str, Any]], measured: dict[str, float]) -> dict[str, Any]:
    """The KV bytes per token of the table's models as metrics, and the formula checked against the caches
    ``measured`` (model name -> bytes per token a forward pass left)."""
    by_model = {r["model"]: r["KV KiB per token"] * 2**10 for r in rows}
    checks = {f"kv_formula_matches_the_cache_of_{name.replace('-', '_')}": (by_model[name] == value,
                                                                         f"{by_model[name]} vs {value} bytes")
              for name, value in measured.items()}
    return {"metrics": {names.kv_per_token(model): value for model, value in by_model.items()}, "checks": checks}


def with_kv_heads(config, kv_heads: int):
    """A copy of ``config`` whose attention keeps ``kv_heads`` key/value heads (to compare MHA, GQA and MQA)."""
    import copy

    changed = copy.deepcopy(config)
    changed.num_key_value_heads = kv_heads
    return changed


def measured_kv_bytes_per_token(model, *, tokens: int = 16) -> float:
    """Bytes per token of the cache a forward pass really leaves (on the meta device for a model built there, so a
    70B shape costs no memory): a check of the formula."""
    ids = torch.zeros(1, tokens, dtype=torch.long, device=model.device)
    with torch.inference_mode():
        output = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return footprint.cache_bytes(output) / tokens


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


def cache_quality(model, ids, *, context: int, cache: str, chunk: int = 16, repeats: int = 1) -> dict[str, Any]:
    """Prefill ``context`` tokens of ``ids`` into a cache of kind ``cache``, then read the next tokens ``chunk`` at a
    time through it (teacher forcing): the logits at every read position, the bytes the cache holds at the end, the
    time of the whole pass and the perplexity of the tokens read."""
    check_sizes(1, context=context, chunk=chunk)
    ids = ids.reshape(1, -1).to(model.device)
    if ids.shape[1] < context + 2:
        raise BadParameter(f"context={context}: the text has only {ids.shape[1]} tokens.")
    kept: dict[str, Any] = {}

    def call():
        cache_object = make_cache(cache, model.config)
        logits = []
        with torch.inference_mode():
            model(input_ids=ids[:, :context], cache=cache_object, use_cache=True, logits_to_keep=1)
            for start in range(context, ids.shape[1] - 1, chunk):
                piece = ids[:, start:min(start + chunk, ids.shape[1] - 1)]
                logits.append(model(input_ids=piece, cache=cache_object, use_cache=True).logits[0].float().cpu())
        kept["cache"], kept["logits"] = cache_object, torch.cat(logits)

    timing = measure(call, device=str(model.device), warmup=1, repeats=repeats, min_time_s=0)
    logits = kept["logits"]
    targets = ids[0, context + 1:context + 1 + logits.shape[0]].cpu()
    nll = torch.nn.functional.cross_entropy(logits, targets).item()
    return {"cache": cache, "held_bytes": held_bytes(kept["cache"]), "logits": logits, "ms": timing.median_ms,
            "perplexity": math.exp(nll), "tokens_read": logits.shape[0], "tokens_held": context + logits.shape[0]}


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


def cache_table(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    if "dynamic" not in runs:  # nothing to compare with
        return []
    base = runs["dynamic"]
    return [{"cache": "model's own (DynamicCache)" if kind == "dynamic" else f"QuantizedCache({kind})",
             "tokens held": run["tokens_held"], "MiB held": run["held_bytes"] / 2**20,
             "share of the model's cache": run["held_bytes"] / base["held_bytes"], "ms": run["ms"],
             "perplexity": run["perplexity"],
             "KL from the model's cache (nats)": kl_nats(base["logits"], run["logits"])}
            for kind, run in runs.items()]


def cache_findings(runs: dict[str, dict[str, Any]], model) -> dict[str, Any]:
    if "dynamic" not in runs:
        return {}
    base = runs["dynamic"]
    metrics: dict[str, float] = {}
    for kind, run in runs.items():
        label = "model" if kind == "dynamic" else kind
        metrics.update({names.kv_cache(label, "held_mib"): run["held_bytes"] / 2**20,
                        names.kv_cache(label, "ms"): run["ms"], names.kv_cache(label, "perplexity"): run["perplexity"]})
        if kind != "dynamic":
            metrics[names.kv_cache(label, "kl_nats")] = kl_nats(base["logits"], run["logits"])
            metrics[names.kv_cache(label, "over_model_cache")] = run["held_bytes"] / base["held_bytes"]
    formula = kv_bytes_per_token(model) * base["tokens_held"]
    checks: dict[str, Any] = {"kv_formula_matches_the_cache_held": (base["held_bytes"] == formula,
                                                                    f"{base['held_bytes']} vs {formula} bytes")}
    for kind, run in runs.items():
        if kind != "dynamic":
            checks[f"quantized_{kind}_cache_holds_less"] = (run["held_bytes"] < base["held_bytes"],
                                                            f"{run['held_bytes']} vs {base['held_bytes']} bytes")
    return {"metrics": metrics, "checks": checks}


def kl_nats(reference_logits, logits) -> float:
    """Mean KL(P_reference || P) over positions, in nats (labkit.quant's measure, the same as notebook 04's)."""
    from labkit.outputs import kl_divergence

    return kl_divergence(reference_logits, logits)


def share_of_16bit(run: dict[str, Any], model) -> float:
    """Bytes a cache held over those of a 16-bit cache of the same tokens (the formula with 2 bytes per number):
    the share to plan with on a GPU, whatever dtype the model ran in here."""
    shape = roofline.kv_shape(model.config)
    sixteen_bit = roofline.kv_bytes_per_token(layers=shape["layers"], kv_heads=shape["kv_heads"],
                                              head_dim=shape["head_dim"], element_bytes=2)
    return run["held_bytes"] / (sixteen_bit * run["tokens_held"])


def fits_table(caches: dict[str, dict[str, Any]], model, *, devices: str = "8 x 80 GB",
               model_name: str = "llama-70b-shape", context: int = 4096) -> list[dict[str, Any]]:
    """Notebook 05's calculator for each cache: sequences of ``context`` tokens that fit beside ``model_name``'s
    16-bit weights on ``devices``, the quantized caches at the share of a 16-bit cache they held here."""
    rows = []
    for kind, run in {"dynamic": None, **caches}.items():
        share = 1.0 if kind == "dynamic" else share_of_16bit(run, model)
        fit = sequences_that_fit(model_name=model_name, devices=devices, context=context, kv_fraction=share)
        rows.append({"KV cache": "16-bit" if kind == "dynamic" else f"QuantizedCache({kind})",
                     "share of 16-bit": share, "weights GiB": fit["weights_gib"],
                     "KV GiB per sequence": fit["kv_gib_per_sequence"],
                     f"sequences of {context} tokens": fit["sequences"]})
    return rows


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
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.exists() and Path("/proc/self").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        if children.exists():
            found = children.read_text().split()
            return int(found[0]) if found else None
        try:
            out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return int(out.stdout.split()[0]) if out.stdout.split() else None

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


def load_table(levels: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"clients": lv["concurrency"], "answered": f"{lv['answered']}/{lv['requests']}",
             "requests/s": lv["requests_per_s"], "tokens/s": lv["tokens_per_s"], "TTFT p50 ms": lv.get("ttft_p50_ms"),
             "TTFT p99 ms": lv.get("ttft_p99_ms"), "latency p50 ms": lv.get("latency_p50_ms"),
             "latency p99 ms": lv.get("latency_p99_ms")} for lv in levels]


def load_findings(levels: Sequence[dict[str, Any]], server: Server) -> dict[str, Any]:
    metrics = {names.server(lv["concurrency"], key): lv.get(key) for lv in levels
               for key in ("requests_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms",
                           "latency_p99_ms")}
    if server.started_s is not None:
        metrics[names.SERVER_START_S] = server.started_s
    failed = sum(lv["failed"] for lv in levels)
    return {"metrics": metrics, "checks": {"server_answered_every_request": (failed == 0, f"{failed} failed")}}


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


def bad_input_findings(answers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Section 5's bad input, from the server's answers (label -> status and message; each "GET /health after: X"
    is the health check after request X)."""
    status = {label: answer.get("status") for label, answer in answers.items()}
    checks = {
        "unknown_model_gets_a_client_error": (status["unknown model"] is not None and
                                              400 <= status["unknown model"] < 500, str(answers["unknown model"]))}
    metrics = {}
    if "longer than the KV cache" in answers:  # not sent where the door admits nothing the cache cannot hold
        checks["over_long_prompt_gets_an_error"] = (status["longer than the KV cache"] is not None and
                                                    status["longer than the KV cache"] >= 400,
                                                    str(answers["longer than the KV cache"]))
        metrics[names.HEALTH_AFTER_OVER_LONG] = status["GET /health after: longer than the KV cache"]
    if "longer than --max-model-len" in answers:
        checks["a_prompt_past_max_model_len_is_refused_at_the_door"] = (
            status["longer than --max-model-len"] == 400 and status["GET /health after: longer than --max-model-len"]
            == 200, f"{answers['longer than --max-model-len']}, then /health "
                    f"{status['GET /health after: longer than --max-model-len']}")
    return {"checks": checks, "metrics": metrics}


def stop_findings(server: Server, pids: Sequence[int | None]) -> dict[str, Any]:
    left = [pid for pid in pids if pid_running(pid)]
    return {"checks": {"nothing_left_running_after_stop": (not left and not server.port_in_use(),
                                                           f"still running: {left}, port open: "
                                                           f"{server.port_in_use()}")}}


# --------------------------------------------------------------------------- what you measured

def what_you_measured(results: dict[str, Any]) -> list[str]:
    """Notebook 06's results in a few sentences (each only when its part ran)."""
    m, lines = results["metrics"], []
    nan = float("nan")
    static, continuous = (m.get(names.batching(mode, "tokens_per_s")) for mode in names.MODES)
    if static and continuous:
        padded, paged = (m.get(names.batching(mode, "kv_waste_percent"), nan) for mode in names.MODES)
        lines.append(f"On the mixed workload, continuous batching made {continuous:.1f} tokens/s against {static:.1f} "
                     f"for padded static batches ({continuous / static:.2f}x); static batching left {padded:.0f}% of "
                     f"its KV positions without a real token, the paged cache {paged:.0f}%.")
    batches = sorted(int(k.split("_")[1][1:]) for k in m if k.startswith("curve_b") and k.endswith("_tokens_per_s"))
    if len(batches) >= 2:
        low, high = batches[0], batches[-1]
        slower = m[names.curve(high, "step_ms")] / m[names.curve(low, "step_ms")]
        lines.append(f"Decoding at batch {high} gave {m[names.curve(high, 'tokens_per_s')]:.1f} tokens/s against "
                     f"{m[names.curve(low, 'tokens_per_s')]:.1f} at batch {low}, each step {slower:.1f}x as long; "
                     f"the roofline puts the knee near batch {m.get(names.KNEE_BATCH, nan):.0f} on this machine.")
    repeating = names.speculative("prompt_lookup", "repeating", "acceptance_rate")
    if repeating in m:
        fresh = m.get(names.speculative("prompt_lookup", "fresh", "acceptance_rate"), nan)
        speedup = m.get(names.speculative("prompt_lookup", "repeating", "speedup"), nan)
        lines.append(f"Prompt lookup accepted {100 * m[repeating]:.0f}% of its proposals on a prompt that repeats "
                     f"itself ({speedup:.2f}x the speed of greedy decoding) and {100 * fresh:.0f}% on one that does "
                     "not; the tokens are greedy's either way.")
    draft = names.speculative("draft", "fresh", "acceptance_rate")
    if draft in m:
        lines.append(f"The draft model's proposals were accepted at a rate of {m[draft]:.2f} where it needed "
                     f"{m.get(names.DRAFT_BREAK_EVEN, nan):.2f} to break even: "
                     f"{m.get(names.speculative('draft', 'fresh', 'speedup'), nan):.2f}x the speed of greedy.")
    quantized = {k.removeprefix("kv_cache_").removesuffix("_over_model_cache"): v for k, v in m.items()
                 if k.startswith("kv_cache_") and k.endswith("_over_model_cache")}
    if quantized:
        parts = ", ".join(f"{kind} {100 * share:.0f}%" for kind, share in quantized.items())
        lines.append(f"A quantized KV cache held this share of the model's own cache at the same context: {parts}.")
    levels = sorted(int(k.split("_")[1][1:]) for k in m if k.startswith("server_c") and k.endswith("_requests_per_s"))
    if levels:
        top = levels[-1]
        lines.append(f"transformers serve with continuous batching answered "
                     f"{m[names.server(top, 'requests_per_s')]:.2f} requests/s "
                     f"({m[names.server(top, 'tokens_per_s')]:.1f} tokens/s) with {top} concurrent clients, time to "
                     f"first token p50 {m.get(names.server(top, 'ttft_p50_ms'), nan):.0f} ms.")
    return lines
