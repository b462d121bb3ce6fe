"""Metric names: built here, and only here, for the notebooks that record them, the tests that expect them and the
report that headlines them. One module per notebook (``labkit.metrics.attention`` for 01, ...), each with its name
builders, its ``HEADLINES`` (the prefixes the report shows first) and ``expected_quick()`` (what a quick CPU run must
record; the notebook tests assert each one).

A metric name is lower case words joined by ``_`` (``sweep_flash_attention_d64_causal_n512_ms``).
"""

from __future__ import annotations

from labkit.metrics import attention, encoder, multi_gpu, serving
from labkit.metrics.base import name

__all__ = ["name", "headline", "expected_quick", "HEADLINES", "FIRST_METRICS"]

BY_NOTEBOOK = {"01_flash_attention": attention, "03_encoder_fastpath": encoder, "05_multi_gpu": multi_gpu,
               "06_serving": serving}

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
