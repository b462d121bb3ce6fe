"""Metric names of notebook 04 (4-bit and 8-bit weights: bitsandbytes for memory, torchao for speed)."""

from __future__ import annotations

from labkit.metrics.base import name

HEADLINES = ("footprint_", "perplexity_", "step_compiled_")
FORMATS = ("16-bit", "fp4", "nf4", "nf4-double", "int8")  # the 16-bit reference and the bitsandbytes formats
TORCHAO_ON_A_CPU = ("torchao-int8", "torchao-int4")  # torchao's float8 needs a GPU with float8 units

PREDICTED_1B_NF4_TIMES_SMALLER = "predicted_1b_nf4_times_smaller"
BREAK_EVEN_ROOFLINE = "int4_break_even_batch_roofline"  # the batch where int4 weight-only stops helping, predicted
BREAK_EVEN_MEASURED = "int4_break_even_batch_measured"  # ... and where one layer measured here stopped gaining
STEP_MODEL_BILLIONS = "step_model_billion_parameters"  # the model the compiled one-token step ran


def per_format(what: str, fmt: str) -> str:
    """``what`` is perplexity, kl_vs_16bit, footprint (MiB, counted from the tensors) or prefill (ms)."""
    suffix = {"footprint": "mib", "prefill": "ms"}.get(what)
    return name(what, fmt, suffix) if suffix else name(what, fmt)


def decode(fmt: str, batch: int, what: str) -> str:
    """``what`` is tokens_per_s or fraction_of_bound (of this format's own bandwidth bound)."""
    return name("decode", fmt, f"batch{batch}", what)


def step(label: str, fmt: str, what: str) -> str:
    """Batch-1 decode with the hand loop; ``label`` is eager or compiled (the one-token step compiled)."""
    return name("step", label, fmt, "batch1", what)


def expected_quick() -> list[str]:
    formats = (*FORMATS, *TORCHAO_ON_A_CPU)
    return [per_format(w, f) for w in ("perplexity", "kl_vs_16bit", "prefill", "footprint") for f in formats] \
        + [decode(f, b, w) for f in formats for b in (1, 8) for w in ("tokens_per_s", "fraction_of_bound")] \
        + [PREDICTED_1B_NF4_TIMES_SMALLER, BREAK_EVEN_ROOFLINE]
