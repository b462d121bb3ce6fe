"""Metric names of notebook 03 (the encoder fastpath)."""

from __future__ import annotations

from labkit.metrics.base import name

HEADLINES = ("speedup_fastpath_vs_sdpa_", "to_fastpath_max_abs_difference", "padding_free_speedup_")

# the sweep's implementations, as they appear in metric names (labkit.report reads transformers_sdpa and fastpath)
IMPLEMENTATIONS = ("transformers eager", "transformers sdpa", "fastpath")
QUICK_IMPLEMENTATIONS = IMPLEMENTATIONS[1:]  # a quick run compares the two that matter
# today's ways to skip padding (section 5), the padded batch they are compared with first
WAYS = ("padded sdpa", "packed sdpa block mask", "packed varlen", "packed flex document mask")
QUICK_PADDING = (0, 0.25, 0.5, 0.75)
# the fastpath's real work per second at the sweep's headline point, as a fraction of the matmul ceiling
FASTPATH_FRACTION_OF_CEILING = "fastpath_fraction_of_matmul_ceiling"


def sweep(implementation: str, batch: int, length: int, padding: float, what: str = "ms") -> str:
    """One point of the sweep: ``what`` is ms, or noisy (1 where the point stayed against the trend)."""
    return name("sweep", implementation, f"b{batch}", f"n{length}", f"pad{round(100 * padding)}", what)


def speedup(batch: int, length: int, padding: float) -> str:
    """transformers sdpa's median time over the fastpath's at one point of the sweep."""
    return name("speedup_fastpath_vs_sdpa", f"b{batch}", f"n{length}", f"pad{round(100 * padding)}")


def padding_free(way: str, batch: int, length: int, padding: float, what: str = "ms") -> str:
    """One way of section 5 on one batch: ``what`` is ms or max_abs_difference (from the padded batch)."""
    return name("padding_free", way, f"b{batch}", f"n{length}", f"pad{round(100 * padding)}", what)


def padding_free_speedup(way: str, batch: int, length: int, padding: float) -> str:
    """The padded batch's median time over one padding-free way's, on the same sequences."""
    return name("padding_free_speedup", way, f"b{batch}", f"n{length}", f"pad{round(100 * padding)}")


def expected_quick() -> list[str]:
    """What a quick CPU run records (batch 8, length 128 on minilm-l6)."""
    return ["to_fastpath_max_abs_difference", "embedding_similarity_max_difference", "fastpath_floor_ms",
            "sweep_noisy_points", "fastpath_situations", "fastpath_situations_skipping_padding",
            FASTPATH_FRACTION_OF_CEILING] \
        + [speedup(8, 128, p) for p in QUICK_PADDING] \
        + [sweep(i, 8, 128, p) for i in QUICK_IMPLEMENTATIONS for p in QUICK_PADDING] \
        + [padding_free(w, 8, 128, p) for w in WAYS[:2] for p in (0, 0.75)] \
        + [padding_free_speedup(WAYS[1], 8, 128, p) for p in (0, 0.75)]
