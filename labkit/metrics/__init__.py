"""Headline metric names of the notebooks that still record metrics by built names (01, 03, 05, 06), for the tests
that expect them and the report that headlines them: one module each, with its ``HEADLINES`` (the prefixes the report
shows first) and ``expected_quick()``. A notebook moved to tables records its measurements with ``lab.table`` and a
few plain headline names with ``lab.metric``; the report shows its first ``FIRST_METRICS`` of them. This package goes
once 05 and 06 record tables.

A metric name is lower case words joined by ``_`` (``best_backend_tflops``).
"""

from __future__ import annotations

from labkit.metrics import attention, encoder, multi_gpu
from labkit.metrics.base import name

__all__ = ["name", "headline", "expected_quick", "HEADLINES", "FIRST_METRICS"]

BY_NOTEBOOK = {"01_flash_attention": attention, "03_encoder_fastpath": encoder, "05_multi_gpu": multi_gpu}

HEADLINES: dict[str, tuple[str, ...]] = {nb: module.HEADLINES for nb, module in BY_NOTEBOOK.items()}
HEADLINES["bettertransformer"] = ("speedup_bettertransformer_vs_eager_", "decode_")
FIRST_METRICS = 8  # shown as the headline of a notebook HEADLINES does not know


def expected_quick(notebook: str) -> list[str]:
    """The metrics a quick run of ``notebook`` on a CPU must record."""
    module = BY_NOTEBOOK.get(notebook)
    return module.expected_quick() if module else []


def headline(notebook: str, metrics: dict[str, float]) -> list[str]:
    """The names of a notebook's headline metrics, in the order it recorded them."""
    prefixes = HEADLINES.get(notebook)
    if not prefixes:
        return list(metrics)[:FIRST_METRICS]
    return [n for n in metrics if n.startswith(prefixes)]
