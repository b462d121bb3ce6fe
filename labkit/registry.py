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
                     "best_backend", "flex_vs_sdpa")),
    Notebook("02_decoders_and_generation", "generation", "decoders", "model_ids", "dtype",
             ({"new_tokens": 1}, "new_tokens=1"),
             tables=("prefill", "longest_prompt", "decode", "agreement", "kv_cache", "recipes", "batches", "padding")),
    Notebook("03_encoder_fastpath", "fastpath", "encoder", "model_id", "dtype", ({"batch_sizes": [0]}, "batch_sizes"),
             ({"padding_fractions": [0.5, 1.5]}, "padding_fractions=[0.5, 1.5]"),
             tables=("situations", "accelerate", "conversion", "embeddings", "sweep", "speedups", "padding_free")),
    Notebook("04_quantization", "quant", "quantization", "model_id", "compute_dtype",
             ({"eval_tokens": -5}, "eval_tokens=-5"), ({"formats": ["nf4", "int4"]}, "format 'int4' is unknown"),
             tables=("predicted", "footprint", "quality", "speed", "continuations", "int4_sweep", "break_even",
                     "summary")),
    Notebook("05_multi_gpu", "parallel", "multi_gpu", "model_id", None, ({"context": 0}, "context=0"),
             ({"plan_devices": ["2 x 24 GB", "two big GPUs"]}, "devices='two big GPUs'")),
    Notebook("06_serving", "serving", "serving", "model_id", "dtype",
             ({"server_concurrency": [4, 0]}, "server_concurrency[1]=0"),
             tables=("batching", "curve", "prompt_lookup", "draft", "kv_per_token", "kv_caches", "fits", "server_load",
                     "bad_input")),
)

BY_STEM: dict[str, Notebook] = {n.stem: n for n in NOTEBOOKS}
BY_NUMBER: dict[str, Notebook] = {n.number: n for n in NOTEBOOKS}


def get(notebook: str) -> Notebook:
    """The entry of ``notebook`` (its stem, "02_decoders_and_generation", or its number, "02"), or one sentence."""
    found = BY_STEM.get(notebook) or BY_NUMBER.get(notebook)
    if found is None:
        raise BadParameter(f"no notebook {notebook!r}; there are {', '.join(BY_STEM)}.")
    return found
