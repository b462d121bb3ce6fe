"""Metric names of notebook 01 (Flash Attention and the SDPA backends)."""

from __future__ import annotations

from labkit.metrics.base import name

HEADLINES = ("best_backend_",)


def sweep(backend: str, head_dim: int, causal: bool, seq: int, what: str) -> str:
    """One point of 01's sweep: ``what`` is ms, tflops, fraction_of_ceiling or peak_mib."""
    return name("sweep", backend, f"d{head_dim}", "causal" if causal else "full", f"n{seq}", what)


def expected_quick() -> list[str]:
    return [sweep(b, d, c, n, w) for b in ("MATH", "FLASH_ATTENTION") for d in (64, 128)
            for c in (True, False) for n in (128, 256, 512)
            for w in ("ms", "tflops", "fraction_of_ceiling", "peak_mib")] \
        + ["best_backend_tflops", "best_backend_fraction_of_ceiling"]
