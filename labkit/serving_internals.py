"""Notebook 07's topic: what a serving engine's operator tunes, the bookkeeping too long for a cell.

The notebook writes its experiments in its cells: the shared-prefix burst served with and without block sharing, the
token budget swept, the paged block table and its gather, and every conclusion. This module holds its typed
parameters (:class:`Parameters`) and two mechanical pieces:

- :class:`StepLog`, a forward pre-hook that notes, for every forward pass of transformers' continuous batching, the
  query tokens it computed and the KV cache blocks held at that moment;
- :func:`collect`, which reads a continuous batching manager's outputs until the given requests have finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from labkit import models, probes
from labkit.errors import BadParameter, ModelNotAvailable, check_sizes

# Sizes where a parameter was left at 0 or empty
SIZES = {
    "gpu": {"shared_prompt_tokens": 4000, "requests": 32, "token_budgets": [512, 4096, 32768],
            "page_size": 64, "question_tokens": 16, "new_tokens": 16, "chat_tokens": 64, "arrival_tokens": 4000,
            "cache_tokens": 8192},
    "quick": {"shared_prompt_tokens": 1000, "requests": 6, "token_budgets": [16, 256, 4096],
              "page_size": 16, "question_tokens": 8, "new_tokens": 4, "chat_tokens": 48, "arrival_tokens": 400,
              "cache_tokens": 512},
    "cpu": {"shared_prompt_tokens": 2000, "requests": 8, "token_budgets": [16, 256, 4096],
            "page_size": 16, "question_tokens": 8, "new_tokens": 8, "chat_tokens": 64, "arrival_tokens": 1000,
            "cache_tokens": 1024},
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
    question_tokens: int = field(init=False, default=0)  # section 1: each request's own tokens after the shared ones
    new_tokens: int = field(init=False, default=0)  # section 1: tokens each request generates
    chat_tokens: int = field(init=False, default=0)  # section 2: tokens each running conversation generates
    arrival_tokens: int = field(init=False, default=0)  # section 2: the prompt of each request that arrives
    cache_tokens: int = field(init=False, default=0)  # section 3: the longest request's tokens in the paged pool

    def resolve(self, *, device: str, quick: bool) -> str:
        self.dtype = probes.resolve_dtype(self.dtype, device)
        probes.check_dtype(device, self.dtype)
        check_sizes(0, shared_prompt_tokens=self.shared_prompt_tokens, requests=self.requests,
                    page_size=self.page_size)
        if isinstance(self.token_budgets, (str, int)):
            raise BadParameter(f"token_budgets={self.token_budgets!r}: give a list of whole numbers, e.g. [32, 512].")
        check_sizes(1, **{f"token_budgets[{i}]": v for i, v in enumerate(self.token_budgets)})
        if self.page_size and self.page_size < 4:  # ContinuousBatchingConfig: "Must be at least 4"
            raise BadParameter(f"page_size={self.page_size}: transformers' paged cache needs at least 4 tokens a page.")
        problem = models.check_model(self.model_id)  # a misspelt name stops here with one sentence
        if problem:
            raise ModelNotAvailable(f"notebook 07 serves {self.model_id}, and {problem}")
        sizes = SIZES["gpu" if device.startswith("cuda") and not quick else "quick" if quick else "cpu"]
        for name, size in sizes.items():
            chosen = getattr(self, name) or size
            setattr(self, name, sorted(set(chosen)) if isinstance(chosen, list) else chosen)
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
