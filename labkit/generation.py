"""Notebook 02's topic: prefill and decode of a causal language model. The experiments are written in the notebook's
cells; this module holds its typed parameters (:class:`Parameters`) and the capture of what transformers logs.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from labkit import models, probes
from labkit.errors import BadParameter, check_sizes


@dataclass
class Parameters:
    """Notebook 02's parameters cell, typed (the same names and defaults); :meth:`resolve` sizes what was left at 0
    or empty for the machine and stops a wrong value with one sentence."""

    dtype: Any = "auto"
    model_ids: list = field(default_factory=lambda: ["smollm2-135m", "tiny-opt"])
    decode_model: str = "auto"
    prompt: str = "Hello my dog is cute and"
    prompt_lengths: list = field(default_factory=list)
    prefill_batch: int = 0
    new_tokens: int = 0
    batch_sizes: list = field(default_factory=list)
    compile: Any = "auto"
    problems: dict = field(init=False, default_factory=dict)  # model: why it is skipped here (None: it loads)
    implementations: list = field(init=False, default_factory=list)  # the attention implementations compared
    compile_step: bool = field(init=False, default=False)
    repeats: int = field(init=False, default=2)

    def resolve(self, *, device: str, quick: bool) -> str:
        self.dtype = probes.resolve_dtype(self.dtype, device)
        probes.check_dtype(device, self.dtype)
        if isinstance(self.model_ids, str) or not self.model_ids:
            raise BadParameter(f"model_ids={self.model_ids!r}: give a list of one or more causal language models.")
        check_sizes(0, prefill_batch=self.prefill_batch, new_tokens=self.new_tokens)
        check_sizes(1, **{f"prompt_lengths[{i}]": n for i, n in enumerate(self.prompt_lengths)},
                    **{f"batch_sizes[{i}]": b for i, b in enumerate(self.batch_sizes)})
        if self.new_tokens == 1:
            raise BadParameter("new_tokens=1: decoding needs at least 2 new tokens to time a step.")
        if self.compile not in ("auto", True, False):
            raise BadParameter(f"compile={self.compile!r}: use 'auto', True or False.")
        on_gpu = device.startswith("cuda")
        if self.decode_model == "auto":
            self.decode_model = "random-llama-1b" if on_gpu else "smollm2-135m"
        self.model_ids = list(self.model_ids)
        self.problems = {name: models.check_model(name) for name in dict.fromkeys([*self.model_ids, self.decode_model])}
        if on_gpu:  # sizes where a parameter was left at 0 or empty
            lengths, batch, tokens, batches = [256, 2048], 4, 32 if quick else 64, [1, 8] if quick else [1, 8, 32]
        else:
            lengths, batch, tokens, batches = [32, 128] if quick else [64, 256], 1, 8 if quick else 16, [1, 4]
        self.prompt_lengths = sorted(set(self.prompt_lengths or lengths))
        self.prefill_batch = self.prefill_batch or batch
        self.new_tokens = self.new_tokens or tokens
        self.batch_sizes = sorted(set(self.batch_sizes or batches))
        self.compile_step = on_gpu if self.compile == "auto" else self.compile
        self.repeats = 3 if on_gpu and not quick else 2
        # the attention implementations section 2 compares: eager and sdpa, and flash_attention_2 where it runs
        flash = probes.flash_attn()["ok"] and on_gpu and self.dtype in (torch.float16, torch.bfloat16)
        self.implementations = ["eager", "sdpa"] + (["flash_attention_2"] if flash else [])
        return (f"Prefill: batch {self.prefill_batch}, prompts of {self.prompt_lengths} tokens; decode: "
                f"{self.new_tokens} new tokens, batches {self.batch_sizes}, model {self.decode_model}; attention "
                f"implementations {self.implementations}; compiled step {'on' if self.compile_step else 'off'}.")


@contextlib.contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """The messages transformers logs inside the block (its warnings go to its logger, not to ``warnings``)."""
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield said
    finally:
        logger.removeHandler(handler)
