"""Metric names of notebook 03 (the encoder fastpath)."""

from __future__ import annotations

from labkit.metrics.base import name

HEADLINES = ("speedup_fastpath_vs_sdpa_", "to_fastpath_max_abs_difference")


def sweep(implementation: str, batch: int, length: int, padding: float, what: str = "ms") -> str:
    return name("sweep", implementation, f"b{batch}", f"n{length}", f"pad{round(100 * padding)}", what)


def speedup(batch: int, length: int, padding: float) -> str:
    return name("speedup_fastpath_vs_sdpa", f"b{batch}", f"n{length}", f"pad{round(100 * padding)}")


def expected_quick() -> list[str]:
    return ["to_fastpath_max_abs_difference", "embedding_similarity_max_difference"] \
        + [speedup(8, 128, p) for p in (0, 0.25, 0.5, 0.75)] \
        + [sweep(i, 8, 128, p) for i in ("transformers_eager", "transformers_sdpa", "fastpath")
           for p in (0, 0.25, 0.5, 0.75)]
