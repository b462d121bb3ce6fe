"""Headline metric names of notebook 03 (the encoder fastpath): the ones the report, ``labkit compare`` and the
reference runs read. Everything else the notebook measures is a table of its results file."""

from __future__ import annotations

from labkit.metrics.base import name

HEADLINES = ("speedup_fastpath_vs_sdpa_", "to_fastpath_max_abs_difference", "padding_free_speedup_")
QUICK_PADDING = (0, 0.25, 0.5, 0.75)


def speedup(batch: int, length: int, padding: float) -> str:
    """transformers sdpa's median time over the fastpath's at one point of the sweep."""
    return name("speedup_fastpath_vs_sdpa", f"b{batch}", f"n{length}", f"pad{round(100 * padding)}")


def padding_free_speedup(way: str, batch: int, length: int, padding: float) -> str:
    """The padded batch's median time over one padding-free way's, on the same sequences."""
    return name("padding_free_speedup", way, f"b{batch}", f"n{length}", f"pad{round(100 * padding)}")


def expected_quick() -> list[str]:
    """What a quick CPU run records (batch 8, length 128 on minilm-l6)."""
    return ["to_fastpath_max_abs_difference", "embedding_fastpath_speedup", "fastpath_fraction_of_matmul_ceiling"] \
        + [speedup(8, 128, p) for p in QUICK_PADDING] \
        + [padding_free_speedup("packed sdpa block mask", 8, 128, p) for p in (0, 0.75)]
