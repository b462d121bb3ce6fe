"""Every version shim and every private torch, transformers or IPython name labkit uses, in one place.

Each entry says which versions it serves and why, so that the day the oldest admitted version moves (pyproject.toml:
torch>=2.11, transformers>=5.17) it can be deleted in one edit. Notebooks never touch a private name: they call
the topic modules, which call these.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any

# torch is imported inside the shims that need it: `import labkit` (and with it this module) stays free of torch,
# so that the `labkit` command answers --help at once.


# torch 2.11-2.13: the profiler's public API has no per-allocation records on CPU; its kineto results do
# (``[memory]`` events with a size): (start_ns, nbytes) of every allocation and free a finished CPU profile recorded.
# labkit.timing.peak_extra_memory reads them; None means "not measured".
def profiler_allocations(prof) -> list[tuple[int, int]] | None:
    try:
        events = prof.profiler.kineto_results.events()
        return sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except AttributeError:  # the raw results changed shape: "not measured" rather than a guess
        return None


# torch 2.11-2.13: the CPU profiler records only the ops of the thread that started it, unless the private
# ``_ExperimentalConfig(profile_all_threads=True)`` is passed (checked on 2.13: a worker thread's aten::mm is recorded
# with it and missing without it). transformers' continuous batching runs its steps in a background thread.
def all_threads_profiler_config():
    from torch._C._profiler import _ExperimentalConfig

    return _ExperimentalConfig(profile_all_threads=True)


# torch 2.11-2.13: nn.TransformerEncoder takes its nested-tensor fastpath only when the padding is on the right (every
# sequence's tokens first, ``mask`` True at padding), which it tests with this private op;
# labkit.fastpath.why_not_fastpath asks the same question the same way.
def padding_is_right_aligned(src, src_key_padding_mask) -> bool:
    import torch

    return bool(torch._nested_tensor_from_mask_left_aligned(src, src_key_padding_mask.logical_not()))


# transformers 5.17-5.25 picks the tensor-parallel device from ``torch._C._get_accelerator()``, which names CUDA in
# any CUDA build of torch even with every GPU hidden; where no GPU is usable, make it name the CPU (gloo).
@contextlib.contextmanager
def cpu_accelerator_without_gpus():
    import torch

    if torch.cuda.is_available():
        yield
        return
    original = torch._C._get_accelerator
    torch._C._get_accelerator = lambda check=None: torch.device("cpu")
    try:
        yield
    finally:
        torch._C._get_accelerator = original


# transformers 5.x renamed the forward argument ``past_key_values`` to ``cache`` in newer releases, and the output
# key with it; 5.17 has the old names, 5.24 and newer the new ones. Also: whether forward takes cache positions and
# logits_to_keep.
def forward_keywords(model) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    return {"cache": "cache" if "cache" in params else "past_key_values",
            "cache_position": "cache_position" in params, "logits_to_keep": "logits_to_keep" in params}


def output_cache(output):  # the KV cache a forward pass with ``use_cache=True`` returned, under either name
    return output["cache"] if "cache" in output else output["past_key_values"]


# transformers 5.17-5.25: the public ``from_config`` of an Auto class needs a model type; building one
# architecture class with a given attention implementation from a config is the private ``_from_config``.
def build_model_class(model_class, config, attn_implementation: str):
    return model_class._from_config(config, attn_implementation=attn_implementation)


# transformers 5.17-5.25: a bare layer (BertLayer) built outside a model reads the attention implementation from
# the config's private field; ``from_pretrained``/``from_config`` set it for whole models.
def set_layer_attention(config, name: str) -> None:
    config._attn_implementation = name


# transformers 5.25 and newer: ``create_bidirectional_mask`` takes ``position_ids`` and, with no attention mask, finds
# packed sequences where they restart at 0 (masking_utils.find_packed_sequence_indices), so a packed encoder row keeps
# its sequences apart by itself; 5.17-5.24 build no mask there (the argument lands in **kwargs), and a packed BERT row
# without a mask lets its sequences attend to each other. Notebook 03 measures which; this says which to expect.
def encoder_mask_from_position_ids() -> bool:
    from transformers.masking_utils import create_bidirectional_mask

    return "position_ids" in inspect.signature(create_bidirectional_mask).parameters


# transformers 5.25 and newer: ``transformers serve --max-model-len N`` refuses (HTTP 400) a request whose prompt
# leaves no room for an answer in N tokens, and without the flag N is the model's context (cli/serving/utils.py,
# ``_check_prompt_length``); 5.17-5.24 check no length, and a prompt the KV cache cannot hold reaches the scheduler.
def serve_takes_max_model_len() -> bool:  # read from its command's signature
    from transformers.cli.serve import Serve

    return "max_model_len" in inspect.signature(Serve.__init__).parameters


def attn_implementation(model) -> str:  # what a loaded model runs: transformers keeps it in a private config field
    return model.config._attn_implementation


# IPython 8-9: a custom exception handler's return value is discarded; ``_showtraceback`` is what ipykernel turns
# into the cell's error output (ename, evalue, traceback), which papermill and nbval read.
def show_short_traceback(shell, etype, value, lines: list[str]) -> None:
    shell._showtraceback(etype, value, lines)


# transformers 5.25 (and 5.24): DistributedConfig(tp_size=..., pp_size=...) fails while loading with
# KeyError: 'model.layers.N.self_attn.q_proj.weight'. Its tensor-parallel plan is expanded over every layer before
# the pipeline replaces the layers other stages own with placeholders (PipelineIdentityLayer), and
# apply_tensor_parallelism then looks those names up (transformers/distributed/mixin.py, maybe_distribute_model).
# This drops the plan's entries for what this stage does not hold.
@contextlib.contextmanager
def tp_plan_skips_other_stages():
    from transformers.distributed import mixin
    from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

    original = mixin.apply_tensor_parallelism

    def apply(model, tp_mesh, tp_plan):
        modules = dict(model.named_modules())

        def held(name):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            return name in modules and not isinstance(modules[name], PipelineIdentityLayer)

        return original(model, tp_mesh, {name: style for name, style in tp_plan.items() if held(name)})

    mixin.apply_tensor_parallelism = apply
    try:
        yield
    finally:
        mixin.apply_tensor_parallelism = original


# torch 2.11-2.13: nn.TransformerEncoderLayer leaves its fused path when the module (or one inside it) has forward
# hooks or pre-hooks, which it counts in private dictionaries; labkit.fastpath.why_not_fused asks the same way.
def has_forward_hooks(module) -> bool:
    return any(len(getattr(m, "_forward_hooks", {})) + len(getattr(m, "_forward_pre_hooks", {}))
               for m in module.modules())


# torch 2.11-2.13: the module a torch.compile wrapper (OptimizedModule) holds, in a private attribute (None: plain).
def compiled_original(module):
    return getattr(module, "_orig_mod", None)


# torchao 0.18 on a machine without its CUDA libraries: transformers imports torchao in every from_pretrained once it
# is installed, and that import logs each CUDA-only library of its wheel it cannot load, and torch a note on the
# enums torchao registers with its compiler. Log records, not warnings: nothing the deprecation canary watches is
# hidden. Installed when labkit is imported (once per logger).
def _not_chatter(record: logging.LogRecord) -> bool:
    return not any(text in str(record.msg) for text in ("Failed to load ", "is an Enum subclass and is now natively"))


def drop_import_chatter() -> None:
    for logger in map(logging.getLogger, ("torchao", "torch.utils._pytree")):
        if _not_chatter not in logger.filters:
            logger.addFilter(_not_chatter)


@contextlib.contextmanager
def quiet_logger(name: str):
    """Within the block, the library logger ``name`` reports errors only (accelerate's placement notes, torchao's and
    bitsandbytes' notes on optional kernels): what a cell prints stays the lesson."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

