"""Metric names of notebook 05 (inference on several GPUs)."""

from __future__ import annotations

from labkit.metrics.base import name

HEADLINES = ("tp_2_speedup", "tp_4_speedup", "tp_8_speedup", "dp_2_speedup", "dp_4_speedup", "dp_8_speedup",
             "pipeline_", "allreduce_best_busbw_gb_per_s", "allreduce_fraction_of_copy")


def job(kind: str, processes: int, what: str) -> str:
    """A torchrun job: ``kind`` tp or dp."""
    return name(kind, processes, what)


def plan(model: str, fmt: str, what: str) -> str:
    return name("plan", model, fmt, what)


def expected_quick() -> list[str]:
    return [job(k, n, w) for k in ("tp", "dp") for n in (1, 2) for w in ("tokens_per_s", "speedup")] \
        + ["tp_2_top_logit_gap", "allreduce_best_busbw_gb_per_s", "allreduce_fraction_of_copy",
           plan("llama-70b-shape", "16-bit", "total_gib"), plan("llama-70b-shape", "nf4", "total_gib"),
           "tp_predicted_communication_ms_per_token"]
