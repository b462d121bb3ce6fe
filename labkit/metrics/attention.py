"""Metric names of notebook 01 (Flash Attention and the SDPA backends)."""

from __future__ import annotations

from labkit.metrics.base import name

HEADLINES = ("best_backend_", "masked_")

# FlexAttention against SDPA (section 8): the masks and the implementations measured
MASKS = ("causal", "document")
IMPLEMENTATIONS = ("sdpa", "flex_eager", "flex_compiled")

MATH_PEAK = "math_peak_in_score_matrices"  # MATH's peak extra memory at the longest length it ran, in score matrices
BEST_TFLOPS = "best_backend_tflops"
BEST_FRACTION = "best_backend_fraction_of_ceiling"
PYTORCH_CHOICE_VS_BEST = "best_backend_pytorch_choice_time_ratio"  # PyTorch's own choice's time / the best's
NOISY_POINTS = "sweep_noisy_points"  # points still against the trend after one re-measurement


def sweep(backend: str, head_dim: int, causal: bool, seq: int, what: str) -> str:
    """One point of 01's sweep: ``what`` is ms, tflops, fraction_of_ceiling or peak_mib."""
    return name("sweep", backend, f"d{head_dim}", "causal" if causal else "full", f"n{seq}", what)


def memory_growth_exponent(backend: str) -> str:
    """p in peak extra memory ~ N^p for one backend (section 1)."""
    return name("memory_growth_exponent", backend)


def time_exponent(backend: str) -> str:
    """p in time ~ N^p between the two longest lengths of the headline series (section 6)."""
    return name("sweep_time_exponent", backend)


def eligible_cases(backend: str) -> str:
    return name("eligible_cases", backend)


def relative_error(backend: str, dtype: str) -> str:
    return name("relative_error", backend, dtype)


def greedy_tokens_agreeing(implementation: str, dtype: str) -> str:
    return name("greedy_tokens_agreeing", implementation, "vs_sdpa", dtype)


def masked(mask: str, implementation: str, what: str = "ms") -> str:
    """A masked attention call of section 8: ``mask`` causal or document, ``implementation`` sdpa, flex_eager or
    flex_compiled; ``what`` ms, first_call_s or blocks_skipped_percent."""
    return name("masked", mask, implementation, what)


def expected_quick() -> list[str]:
    return [sweep(b, d, c, n, w) for b in ("MATH", "FLASH_ATTENTION") for d in (64, 128)
            for c in (True, False) for n in (128, 256, 512)
            for w in ("ms", "tflops", "fraction_of_ceiling", "peak_mib")] \
        + [BEST_TFLOPS, BEST_FRACTION, PYTORCH_CHOICE_VS_BEST, NOISY_POINTS, MATH_PEAK,
           memory_growth_exponent("MATH"), memory_growth_exponent("FLASH_ATTENTION")] \
        + [masked(m, i) for m in MASKS for i in ("sdpa", "flex_eager")]
