"""Metric names of notebook 02 (decoders and fast generation)."""

from __future__ import annotations

from labkit.metrics.base import name

HEADLINES = ("batch1_tokens_per_s", "best_fraction_of_bandwidth_bound", "recipe_")

BEST_FRACTION_BATCH1 = "best_fraction_of_bandwidth_bound_batch1"
RECIPES_AGREEING = "recipes_agreeing_with_dynamic_cache"
BANDWIDTH = "bandwidth_gb_per_s"
KV_CACHE_MIB = "kv_cache_measured_mib"
WEIGHTS_ALONE_MS = "matrix_products_alone_ms"


def prefill(model: str, implementation: str, seq: int, what: str) -> str:
    """``what`` is ms, peak_mib or noisy (1 where the trend recheck left the time inconsistent)."""
    return name("prefill", model, implementation, f"n{seq}", what)


def eager_over_sdpa_memory(model: str) -> str:
    return name("prefill", model, "eager_over_sdpa_memory")


def decode(model: str, implementation: str, what: str) -> str:
    """``what`` is tokens_per_s, step_ms, bound_step_ms or fraction_of_bandwidth_bound."""
    return name("decode", model, implementation, what)


def logits_difference(model: str) -> str:
    return name("logits_relative_difference", model)


def recipe(label: str, what: str) -> str:
    """``what`` is tokens_per_s, step_ms, fraction_of_bandwidth_bound or compile_seconds."""
    return name("recipe", label, what)


def batch(size: int, what: str) -> str:
    return name(f"batch{size}", what)


def expected_quick() -> list[str]:
    models = ("smollm2-135m", "tiny-opt")
    return [prefill(m, i, n, w) for m in models for i in ("eager", "sdpa") for n in (32, 128)
            for w in ("ms", "peak_mib")] \
        + [decode(m, i, w) for m in models for i in ("eager", "sdpa")
           for w in ("tokens_per_s", "step_ms", "bound_step_ms", "fraction_of_bandwidth_bound")] \
        + [recipe(r, w) for r in ("dynamic cache", "static cache", "hand loop")
           for w in ("step_ms", "fraction_of_bandwidth_bound")] \
        + [batch(1, "tokens_per_s"), BEST_FRACTION_BATCH1, BANDWIDTH, KV_CACHE_MIB, WEIGHTS_ALONE_MS]
