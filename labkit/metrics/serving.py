"""Metric names of notebook 06 (from generate() to a server)."""

from __future__ import annotations

from labkit.metrics.base import name

HEADLINES = ("continuous_over_static_tokens_per_s", "batching_", "speculative_", "kv_cache_", "server_c")

MODES = ("static", "continuous")  # section 1's two ways of batching
CONTINUOUS_OVER_STATIC = "continuous_over_static_tokens_per_s"
SAME_TOKENS = "batching_requests_with_the_same_tokens"  # requests whose tokens static and continuous agree on
KNEE_BATCH = "curve_knee_batch"  # where the bandwidth and compute bounds meet (the roofline's knee)
DRAFT_BREAK_EVEN = "speculative_draft_break_even_measured"
DRAFT_BREAK_EVEN_PREDICTED = "speculative_draft_break_even_predicted"
HEALTH_AFTER_OVER_LONG = "server_health_status_after_over_long_prompt"
SERVER_START_S = "server_start_s"


def batching(mode: str, what: str) -> str:
    """Section 1: ``mode`` static or continuous; ``what`` tokens_per_s, ttft_p50_ms, ttft_p99_ms,
    token_latency_p50_ms, token_latency_p99_ms, latency_p50_ms, latency_p99_ms, kv_peak_mib or kv_waste_percent."""
    return name("batching", mode, what)


def curve(batch: int, what: str) -> str:
    """Section 2, one batch size: ``what`` tokens_per_s, step_ms or fraction_of_bound."""
    return name("curve", f"b{batch}", what)


def speculative(method: str, prompt: str, what: str) -> str:
    """Section 3: ``method`` prompt_lookup or draft; ``prompt`` repeating or fresh; ``what`` acceptance_rate,
    tokens_per_forward or speedup."""
    return name("speculative", method, prompt, what)


def kv_per_token(model: str) -> str:
    """Section 4: KV bytes per token of a model or shape in 16-bit."""
    return name("kv_bytes_per_token", model)


def kv_cache(cache: str, what: str) -> str:
    """Section 4, one cache (model for the model's own, quanto, fp8): ``what`` held_mib, ms, perplexity, kl_nats
    or over_model_cache (its bytes held over the model cache's)."""
    return name("kv_cache", cache, what)


def server(concurrency: int, what: str) -> str:
    """Section 5, one level of concurrent clients: ``what`` requests_per_s, tokens_per_s, ttft_p50_ms, ttft_p99_ms,
    latency_p50_ms or latency_p99_ms."""
    return name("server", f"c{concurrency}", what)


def expected_quick() -> list[str]:
    """What a quick CPU run records (8 requests, batches 1-8, server concurrency 1 and 4)."""
    return [batching(m, w) for m in MODES
            for w in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "token_latency_p50_ms", "token_latency_p99_ms",
                      "latency_p50_ms", "latency_p99_ms", "kv_peak_mib", "kv_waste_percent")] \
        + [CONTINUOUS_OVER_STATIC, SAME_TOKENS, KNEE_BATCH] \
        + [curve(b, w) for b in (1, 2, 4, 8) for w in ("tokens_per_s", "step_ms", "fraction_of_bound")] \
        + [speculative("prompt_lookup", p, w) for p in ("repeating", "fresh")
           for w in ("acceptance_rate", "tokens_per_forward", "speedup")] \
        + [speculative("draft", "fresh", w) for w in ("acceptance_rate", "speedup")] \
        + [DRAFT_BREAK_EVEN, DRAFT_BREAK_EVEN_PREDICTED] \
        + [kv_per_token(m) for m in ("smollm2-135m", "llama-8b-shape", "llama-70b-shape")] \
        + [kv_cache(c, w) for c in ("model", "fp8") for w in ("held_mib", "ms", "perplexity")] \
        + [kv_cache("fp8", w) for w in ("kl_nats", "over_model_cache")] \
        + [server(c, w) for c in (1, 4) for w in ("requests_per_s", "tokens_per_s", "ttft_p50_ms", "latency_p99_ms")] \
        + [SERVER_START_S, HEALTH_AFTER_OVER_LONG]
