"""Metric names of notebook 00 (set-up and probes)."""

from __future__ import annotations

from labkit.metrics.base import name

BACKENDS = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
# not generate_tokens_per_s: one warm call of a small model is launch-bound, not a measure of the machine
HEADLINES = ("matmul_gflops_per_s", "copy_gb_per_s", "ridge_flop_per_byte", "sdpa_")


def backend_cases(backend: str) -> str:
    """How many (dtype, input) cases of the kernel matrix a backend ran on this device."""
    return name("sdpa", backend, "cases_that_run")


def expected_quick() -> list[str]:
    return ["matmul_gflops_per_s", "copy_gb_per_s", "ridge_flop_per_byte", "generate_tokens_per_s",
            *(backend_cases(b) for b in BACKENDS)]
