"""Metric names of notebook 02 (decoders and fast generation)."""

from __future__ import annotations

from labkit.metrics.base import name

HEADLINES = ("batch1_tokens_per_s", "best_fraction_of_bandwidth_bound", "recipe_")


def prefill(model: str, implementation: str, seq: int, what: str) -> str:
    return name("prefill", model, implementation, f"n{seq}", what)


def decode(model: str, implementation: str, what: str) -> str:
    return name("decode", model, implementation, what)


def recipe(label: str, what: str) -> str:
    return name("recipe", label, what)


def expected_quick() -> list[str]:
    models = ("smollm2-135m", "tiny-opt")
    return [prefill(m, i, n, w) for m in models for i in ("eager", "sdpa") for n in (32, 128)
            for w in ("ms", "peak_mib")] \
        + [decode(m, i, w) for m in models for i in ("eager", "sdpa")
           for w in ("tokens_per_s", "fraction_of_bandwidth_bound")] \
        + [recipe(r, "fraction_of_bandwidth_bound") for r in ("dynamic cache", "static cache", "hand loop")] \
        + ["batch1_tokens_per_s"]
