"""Notebook 07's topic: what a serving engine's operator tunes, the bookkeeping too long for a cell.

The notebook writes its experiments in its cells: the shared-prefix burst served with and without block sharing, the
token budget swept, the paged block table and its gather, the early-exit draft, and every conclusion. This module
holds its typed parameters and what notes or reads the engine's work: hooks on the forward passes (:class:`StepLog`,
:class:`ForwardLog`) and a reader of its outputs (:func:`collect`). Section 5's two processes run
``notebooks/scripts/kv_handoff.py``, started by :func:`labkit.launcher.launch`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from labkit import models, probes, timing
from labkit.errors import BadParameter, ModelNotAvailable, check_sizes

# Sizes where a parameter was left at 0 or empty
SIZES = {
    "gpu": {"shared_prompt_tokens": 4000, "requests": 32, "token_budgets": [512, 4096, 32768],
            "page_size": 64, "question_tokens": 16, "new_tokens": 16, "chat_tokens": 64, "arrival_tokens": 4000,
            "cache_tokens": 8192, "spec_new_tokens": 64, "proposals": 4, "handoff_tokens": [64, 256, 500],
            "handoff_new_tokens": 16},
    "quick": {"shared_prompt_tokens": 1000, "requests": 6, "token_budgets": [16, 256, 4096],
              "page_size": 16, "question_tokens": 8, "new_tokens": 4, "chat_tokens": 48, "arrival_tokens": 400,
              "cache_tokens": 512, "spec_new_tokens": 10, "proposals": 3, "handoff_tokens": [64, 256, 500],
              "handoff_new_tokens": 8},
    "cpu": {"shared_prompt_tokens": 2008, "requests": 8, "token_budgets": [16, 256, 4096],
            "page_size": 16, "question_tokens": 8, "new_tokens": 8, "chat_tokens": 64, "arrival_tokens": 1000,
            "cache_tokens": 1024, "spec_new_tokens": 32, "proposals": 4, "handoff_tokens": [64, 256, 500],
            "handoff_new_tokens": 16},
}


@dataclass
class Parameters:
    """Notebook 07's parameters cell, typed (the same names and defaults); :meth:`resolve` sizes what was left at 0
    or empty for the machine, and stops a wrong value with one sentence."""

    dtype: Any = "auto"
    model_id: str = "tiny-llama"
    shared_prompt_tokens: int = 0
    requests: int = 0
    token_budgets: list = field(default_factory=list)
    page_size: int = 0
    spec_model_id: str = "smollm2-135m"
    exit_layers: list = field(default_factory=list)
    handoff_tokens: list = field(default_factory=list)
    question_tokens: int = field(init=False, default=0)  # section 1: each request's own tokens after the shared ones
    new_tokens: int = field(init=False, default=0)  # section 1: tokens each request generates
    chat_tokens: int = field(init=False, default=0)  # section 2: tokens each running conversation generates
    arrival_tokens: int = field(init=False, default=0)  # section 2: the prompt of each request that arrives
    cache_tokens: int = field(init=False, default=0)  # section 3: the longest request's tokens in the paged pool
    spec_new_tokens: int = field(init=False, default=0)  # section 4: tokens each self-speculative run generates
    proposals: int = field(init=False, default=0)  # section 4: tokens the draft proposes at every step
    handoff_new_tokens: int = field(init=False, default=0)  # section 5: tokens decoded from the moved cache

    def resolve(self, *, device: str, quick: bool) -> str:
        self.dtype = probes.resolve_dtype(self.dtype, device)
        probes.check_dtype(device, self.dtype)
        check_sizes(0, shared_prompt_tokens=self.shared_prompt_tokens, requests=self.requests,
                    page_size=self.page_size)
        for name in ("token_budgets", "exit_layers", "handoff_tokens"):
            given = getattr(self, name)
            if isinstance(given, (str, int)):
                raise BadParameter(f"{name}={given!r}: give a list of whole numbers, e.g. [4, 16].")
            check_sizes(1, **{f"{name}[{i}]": v for i, v in enumerate(given)})
        if self.page_size and self.page_size < 4:  # ContinuousBatchingConfig: "Must be at least 4"
            raise BadParameter(f"page_size={self.page_size}: transformers' paged cache needs at least 4 tokens a page.")
        for name in (self.model_id, self.spec_model_id):  # a misspelt name stops here with one sentence
            problem = models.check_model(name)
            if problem:
                raise ModelNotAvailable(f"notebook 07 runs {name}, and {problem}")
        sizes = SIZES["gpu" if device.startswith("cuda") and not quick else "quick" if quick else "cpu"]
        for name, size in sizes.items():
            chosen = getattr(self, name) or size
            setattr(self, name, sorted(set(chosen)) if isinstance(chosen, list) else chosen)
        self.exit_layers = sorted(set(self.exit_layers))
        if min(self.token_budgets) <= self.requests:  # a step must hold a token of every conversation, and more
            raise BadParameter(f"token_budgets={self.token_budgets}: each budget must be more than requests="
                               f"{self.requests}, the tokens of one decode step of every running request.")
        return (f"Model {self.model_id}; {self.requests} requests sharing a prompt of {self.shared_prompt_tokens} "
                f"tokens; pages of {self.page_size} tokens; token budgets {self.token_budgets}.")


# --------------------------------------------------------------------------- what continuous batching did

class StepLog:
    """Notes, before every forward pass of ``model`` while ``manager`` runs, the query tokens the pass computes and
    the KV cache blocks held (a block is ``page_size`` tokens of every layer; in use, or kept for sharing).

    transformers 5.25 passes the step's tokens as ``input_ids`` of shape (1, tokens) (``model_runner.py``); the
    cache's free space is ``PagedAttentionCache.compute_free_capacity`` (``continuous_batching/cache.py``)."""

    def __init__(self, model, manager):
        self.manager, self.rows = manager, []
        self.handle = model.register_forward_pre_hook(self._note, with_kwargs=True)

    def _note(self, module, args, kwargs) -> None:
        cache = self.manager.batch_processor.cache
        block_bytes = sum(allocator.bytes_per_block for allocator in cache.cache_allocators.values())
        free = int(cache.compute_free_capacity(relative=False)) // block_bytes
        self.rows.append({"query tokens": kwargs["input_ids"].shape[-1], "blocks held": cache.num_blocks - free})

    def remove(self):
        """Stop noting; the steps noted so far, as a pandas DataFrame."""
        import pandas as pd

        self.handle.remove()
        return pd.DataFrame(self.rows, columns=["query tokens", "blocks held"])


def collect(manager, request_ids, *, started_only: bool = False) -> dict[str, Any]:
    """Read ``manager``'s outputs until every request of ``request_ids`` has finished (``started_only``: has made a
    token; its requests must stream); the last output of each, by request id. A failed request stops with its
    error."""
    wanted, last = set(request_ids), {}
    for result in manager:
        if result.request_id in wanted:
            assert not result.error, f"request {result.request_id} failed: {result.error}"
            last[result.request_id] = result
        done = {r for r, out in last.items() if (out.generated_tokens if started_only else out.is_finished())}
        if done >= wanted:
            return last
    raise RuntimeError("the continuous batching thread stopped before every request had finished")


# --------------------------------------------------------------------------- section 4: a draft from the model itself

def exit_layers(given: list[int], layers: int) -> list[int]:
    """The exit layers of section 4 for a model of ``layers`` decoder layers: ``given``, each checked to leave at
    least one layer for the model's own step; left empty, a sixth, a half and five sixths of the way down."""
    chosen = given or sorted({max(1, round(layers * f)) for f in (1 / 6, 1 / 2, 5 / 6)} - {layers})
    too_deep = [k for k in chosen if k >= layers]
    if too_deep:
        raise BadParameter(f"exit_layers={given}: the model has {layers} layers, so a draft must exit before layer "
                           f"{layers}; {too_deep} would run the whole model.")
    return chosen


class ForwardLog:
    """Notes every forward pass of ``model`` until :meth:`remove`: the tokens it was given, the decoder layers it ran
    and its time in ms.

    The layers are the config's ``num_hidden_layers`` at that moment. transformers 5.25's early-exit draft lowers it
    on the base model while it proposes (``EarlyExitCandidateGenerator.get_candidates``,
    ``generation/candidate_generator.py``), and a Llama runs ``self.layers[: self.config.num_hidden_layers]``
    (``models/llama/modeling_llama.py``). The base model shares the ``config`` object of the model with the LM head.
    """

    def __init__(self, model):
        self.model, self.rows, self._start = model, [], 0.0
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after, with_kwargs=True)]

    def _before(self, module, args, kwargs) -> None:
        timing.synchronize(str(module.device))
        self.rows.append({"tokens": kwargs["input_ids"].shape[-1], "layers": module.config.num_hidden_layers})
        self._start = time.perf_counter()

    def _after(self, module, args, kwargs, output) -> None:
        timing.synchronize(str(module.device))
        self.rows[-1]["ms"] = 1e3 * (time.perf_counter() - self._start)

    def remove(self):
        """Stop noting; the forward passes noted, as a pandas DataFrame."""
        import pandas as pd

        for handle in self.handles:
            handle.remove()
        return pd.DataFrame(self.rows, columns=["tokens", "layers", "ms"])
