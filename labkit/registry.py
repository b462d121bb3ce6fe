"""The notebooks of the workbook, one entry each: what ``labkit.start``, the exercises, the command line, the tests
and the fault matrix know about a notebook. Adding a notebook means its source, its topic module, its exercise module
and one entry here.

Importing this module imports nothing heavy (the tests and the fault matrix read it without torch).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from labkit.errors import BadParameter


@dataclass(frozen=True)
class Notebook:
    stem: str  # "02_decoders_and_generation": the file names notebooks/<stem>.ipynb and notebooks/src/<stem>.py
    topic: str  # labkit.<topic>: the notebook's parameters and the mechanisms too long for a cell
    exercises: str | None  # labkit.exercises.<module>, or None
    model_parameter: str  # the parameter that names the model (a list for 02)
    dtype_parameter: str | None  # the parameter that names the compute dtype, if any
    bad_size: tuple[dict[str, Any], str]  # a size no machine can honour, and what the sentence that stops it names
    bad_value: tuple[dict[str, Any], str] | None = None  # a value of the wrong kind, and what the sentence names
    tables: tuple[str, ...] = ()  # the tables a quick run on a CPU records (the notebook tests assert each)
    # the headline metrics a quick run on a CPU records (the notebook tests assert each): the few named numbers that
    # `labkit compare`, the report and the reference runs read; everything else is a table
    metrics: tuple[str, ...] = ()
    # each parameter that names a model, and the task its model must have ("causal-lm" or "encoder"): labkit.start
    # refuses a model of the other task in one sentence (models.check_choice), before any work; "paged-causal-lm": one
    # that transformers' continuous batching runs
    model_tasks: tuple[tuple[str, str], ...] = (("model_id", "causal-lm"),)

    @property
    def number(self) -> str:
        return self.stem[:2]

    def topic_module(self):
        return importlib.import_module(f"labkit.{self.topic}")


NOTEBOOKS: tuple[Notebook, ...] = (
    Notebook("00_setup_and_probes", "machine", None, "model_id", "dtype", ({"matmul_size": -1}, "matmul_size=-1"),
             tables=("sdpa_backends", "ceilings")),
    Notebook("01_flash_attention", "attention", "flash_attention", "model_id", "dtype",
             ({"seq_lengths": [0, 128]}, "seq_lengths[0]=0"),
             tables=("memory", "what_ran", "eligibility", "why_not", "greedy_agreement", "accuracy", "sweep",
                     "best_backend", "time_by_op", "flex_vs_sdpa"),
             metrics=("best_backend_tflops", "best_backend_fraction_of_ceiling",
                      "best_backend_pytorch_choice_time_ratio", "masked_causal_sdpa_ms", "masked_causal_flex_eager_ms",
                      "masked_document_sdpa_ms", "masked_document_flex_eager_ms")),
    Notebook("02_decoders_and_generation", "generation", "decoders", "model_ids", "dtype",
             ({"new_tokens": 1}, "new_tokens=1"),
             model_tasks=(("model_ids", "causal-lm"), ("decode_model", "causal-lm")),
             tables=("prefill", "longest_prompt", "decode", "agreement", "kv_cache", "kv_layouts", "sliding_cache",
                     "recipes", "cache_loop", "step_profile", "step_busy", "decode_attention", "batches", "padding")),
    Notebook("03_encoder_fastpath", "fastpath", "encoder", "model_id", "dtype", ({"batch_sizes": [0]}, "batch_sizes"),
             ({"padding_fractions": [0.5, 1.5]}, "padding_fractions=[0.5, 1.5]"),
             model_tasks=(("model_id", "encoder"), ("sweep_model", "encoder")),
             tables=("padding_free", "packing", "time_by_op", "flex_tiles", "situations", "conversion", "sweep",
                     "speedups", "stored_gpu_padding"),
             metrics=("packed_fraction_of_matmul_ceiling", "to_fastpath_max_abs_difference",
                      "fastpath_fraction_of_matmul_ceiling",
                      *(f"speedup_{way}_vs_sdpa_b8_n128_pad{p}" for way in ("packed", "fastpath")
                        for p in (0, 25, 50, 75)))),
    Notebook("04_quantization", "quant", "quantization", "model_id", "compute_dtype",
             ({"eval_tokens": -5}, "eval_tokens=-5"), ({"formats": ["nf4", "int4"]}, "format 'int4' is unknown"),
             tables=("predicted", "footprint", "quality", "today_formats", "speed", "continuations", "int4_kernel",
                     "int8_eager", "int4_sweep", "break_even", "summary")),
    Notebook("05_multi_gpu", "parallel", "multi_gpu", "model_id", None, ({"context": 0}, "context=0"),
             ({"plan_devices": ["2 x 24 GB", "two big GPUs"]}, "devices='two big GPUs'"),
             model_tasks=(("model_id", "causal-lm"), ("plan_model", "causal-lm")),
             tables=("memory_needed", "gpus_needed", "today_layouts", "calculator", "device_maps", "tensor_parallel",
                     "kv_per_rank", "data_parallel", "latency_budget", "pipeline_stages", "pipeline_steps",
                     "expert_parallel", "layouts", "tp_pp", "allreduce", "tp_communication", "tp_links"),
             metrics=("tp_2_speedup", "dp_2_speedup", "pp_2_step_vs_one_process", "ep_2_experts_per_rank",
                      "allreduce_best_busbw_gb_per_s", "allreduce_fraction_of_copy")),
    Notebook("06_serving", "serving", "serving", "model_id", "dtype",
             ({"server_concurrency": [4, 0]}, "server_concurrency[1]=0"),
             model_tasks=(("model_id", "paged-causal-lm"), ("draft_model_id", "causal-lm")),
             tables=("batching", "batching_profile", "curve", "prompt_lookup", "draft", "kv_per_token", "kv_caches",
                     "fits", "server_load", "bad_input"),
             metrics=("continuous_over_static_tokens_per_s", "speculative_prompt_lookup_repeating_speedup",
                      "speculative_draft_fresh_speedup", "kv_cache_fp8_over_model_cache", "server_c4_tokens_per_s")),
    Notebook("07_serving_internals", "serving_internals", "serving_internals", "model_id", "dtype",
             ({"requests": -1}, "requests=-1"), ({"token_budgets": 512}, "token_budgets=512"),
             model_tasks=(("model_id", "paged-causal-lm"), ("spec_model_id", "causal-lm")),
             tables=("prefix_caching", "token_budget", "paged_block_table", "self_speculation",
                     "kv_handoff"),
             metrics=("prefix_caching_ttft_p50_speedup", "self_speculation_best_speedup",
                      "kv_handoff_transfer_over_prefill_longest")),
)

BY_STEM: dict[str, Notebook] = {n.stem: n for n in NOTEBOOKS}
BY_NUMBER: dict[str, Notebook] = {n.number: n for n in NOTEBOOKS}


def get(notebook: str) -> Notebook:
    """The entry of ``notebook`` (its stem, "02_decoders_and_generation", or its number, "02"), or one sentence."""
    found = BY_STEM.get(notebook) or BY_NUMBER.get(notebook)
    if found is None:
        raise BadParameter(f"no notebook {notebook!r}; there are {', '.join(BY_STEM)}.")
    return found
