"""Metric names of notebook 05 (inference on several GPUs)."""

from __future__ import annotations

from labkit.metrics.base import name

HEADLINES = ("tp_2_speedup", "tp_4_speedup", "tp_8_speedup", "dp_2_speedup", "dp_4_speedup", "dp_8_speedup",
             "pp_2_step_vs_one_process", "ep_2_experts_per_rank", "pipeline_", "allreduce_best_busbw_gb_per_s",
             "allreduce_fraction_of_copy")


def job(kind: str, processes: int, what: str) -> str:
    """A layout's measurement with ``processes`` processes: ``kind`` tp, dp, pp or ep (1 process: the model whole)."""
    return name(kind, processes, what)


def plan(model: str, fmt: str, what: str) -> str:
    return name("plan", model, fmt, what)


def plan_covers(machine: str, fmt: str) -> str:
    """The check that ``device_map="auto"`` planned for ``machine`` places every parameter."""
    return name("plan_covers_every_layer", machine, fmt)


def pipeline_placement(placement: str) -> str:
    """Decode tokens/s with ``device_map`` placing the layers (``placement`` in words)."""
    return name("pipeline", placement, "tokens_per_s")


def pp_step(processes: int, batch: int | None = None) -> str:
    """A pipeline's decode step time over one process's (at ``batch`` sequences; None: one sequence)."""
    return name("pp", processes, *(("batch", batch) if batch is not None else ()), "step_vs_one_process")


def expected_quick() -> list[str]:
    return [job(k, n, w) for k in ("tp", "dp") for n in (1, 2) for w in ("tokens_per_s", "speedup")] \
        + ["tp_2_top_logit_gap", job("tp", 2, "kv_cache_share_per_rank"), pp_step(2), pp_step(2, 1),
           job("ep", 2, "experts_per_rank"), "allreduce_best_busbw_gb_per_s", "allreduce_fraction_of_copy",
           plan("llama-70b-shape", "16-bit", "total_gib"), plan("llama-70b-shape", "nf4", "total_gib"),
           "tp_predicted_communication_ms_per_token"]
