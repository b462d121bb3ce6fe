"""Metric names of notebook 04 (4-bit and 8-bit weights)."""

from __future__ import annotations

from labkit.metrics.base import name

HEADLINES = ("footprint_", "perplexity_")
FORMATS = ("16-bit", "fp4", "nf4", "nf4-double", "int8")


def per_format(what: str, fmt: str) -> str:
    """``what`` is perplexity, kl_vs_16bit, footprint (MiB) or prefill (ms)."""
    suffix = {"footprint": "mib", "prefill": "ms"}.get(what)
    return name(what, fmt, suffix) if suffix else name(what, fmt)


def decode(fmt: str, batch: int, what: str) -> str:
    return name("decode", fmt, f"batch{batch}", what)


def expected_quick() -> list[str]:
    return [per_format(w, f) for w in ("perplexity", "kl_vs_16bit", "prefill", "footprint") for f in FORMATS] \
        + [decode(f, b, w) for f in FORMATS for b in (1, 8) for w in ("tokens_per_s", "fraction_of_bound")]
