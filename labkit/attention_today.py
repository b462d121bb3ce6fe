"""Notebook 01, section 8: attention beyond SDPA's backends, as the installed stack offers it (checked against
torch 2.13 and transformers 5.25): a first call timed apart from the rest (FlexAttention compiles on its first), and
transformers' ``attn_implementation`` values, built without downloading anything.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from typing import Any, Callable

import torch

from labkit import compat, probes
from labkit.timing import measure, synchronize


def timed_with_first_call(call: Callable[[], Any], device: str, *, warmup: int = 1,
                          repeats: int = 5) -> tuple[Any, dict[str, Any]]:
    """Run ``call`` once (its output, its wall time, compilation included, and the first line of each warning it
    raised), then time it by the workbook's rule (:func:`labkit.timing.measure`) with its warnings silenced
    (uncompiled FlexAttention warns on every call that it is not compiled)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        out = call()
        synchronize(device)
        first_s = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timing = measure(call, device=device, warmup=warmup, repeats=repeats)
    said = " ".join(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught))
    return out, {"ms": timing.median_ms, "p10 ms": timing.p10_ms, "p90 ms": timing.p90_ms, "first call s": first_s,
                 "warning": said}


def attn_implementation_rows() -> list[dict[str, Any]]:
    """The ``attn_implementation=`` values this transformers accepts (:func:`labkit.probes.attn_implementations`),
    the Hub kernel transformers loads instead of a missing flash-attn package when the ``kernels`` package is
    installed, and a Hub kernel id tried as a value. Nothing is downloaded: the Hub id is only tried when ``kernels``
    is absent (it then fails before any download)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_flash_attention_utils import FLASH_ATTN_KERNEL_FALLBACK

    rows = [{**r, "kernels fallback": FLASH_ATTN_KERNEL_FALLBACK.get(r["attn_implementation"], "")}
            for r in probes.attn_implementations()]
    hub_id = FLASH_ATTN_KERNEL_FALLBACK.get("flash_attention_2", "kernels-community/flash-attn2")
    if importlib.util.find_spec("kernels") is not None:
        rows.append({"attn_implementation": hub_id, "ok": None, "kernels fallback": "",
                     "reason": "the kernels package is installed: transformers would download this kernel from the "
                               "Hub, so it is not tried here"})
        return rows
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compat.build_model_class(LlamaForCausalLM, config, hub_id)
        ok, reason = True, ""
    except Exception as err:  # the error a learner would meet is the answer
        ok, reason = False, f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    rows.append({"attn_implementation": hub_id, "ok": ok, "reason": reason, "kernels fallback": ""})
    return rows
