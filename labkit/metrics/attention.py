"""Metric names of notebook 01 (Flash Attention and the SDPA backends): only its headline numbers, which `labkit
compare`, the report and the reference runs read. Its measurements are tables (the sweep, the memory picture, ...)."""

from __future__ import annotations

HEADLINES = ("best_backend_", "masked_")


def expected_quick() -> list[str]:
    """The headline metrics a quick CPU run records (FlexAttention uncompiled; varlen_attn needs a CUDA GPU)."""
    return ["best_backend_tflops", "best_backend_fraction_of_ceiling", "best_backend_pytorch_choice_time_ratio",
            *(f"masked_{mask}_{implementation}_ms" for mask in ("causal", "document")
              for implementation in ("sdpa", "flex_eager"))]
