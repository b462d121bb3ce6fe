"""The measured ceilings of this machine, and the byte counts and bound of decoding.

The ceilings are measured, not looked up: a large matrix product gives the FLOP/s this device
reaches in a dtype, a large copy gives the bytes/s its memory moves. Notebook 00 measures and
saves them; later notebooks load them to put every result next to the limit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from labkit.errors import BadParameter, check_sizes
from labkit.paths import cache_dir, write_atomically
from labkit.probes import device_label, resolve_dtype
from labkit.timing import measure


def element_size(dtype) -> int:
    """Bytes per element of a torch dtype or dtype name."""
    return torch.empty((), dtype=resolve_dtype(dtype)).element_size()


# --------------------------------------------------------------------------- measured ceilings

def default_sizes(device: str, quick: bool = False) -> dict[str, int]:
    """Sizes big enough to reach the ceiling on this kind of device, small enough to finish fast."""
    if device.startswith("cuda"):
        return {"matmul_size": 4096 if quick else 8192, "copy_megabytes": 256 if quick else 1024}
    return {"matmul_size": 512 if quick else 1024, "copy_megabytes": 32 if quick else 256}


def measure_matmul_ceiling(device: str, dtype, size: int, *, warmup: int = 2, repeats: int = 5) -> dict[str, Any]:
    """FLOP/s of a square ``size`` matrix product in ``dtype`` on ``device`` (the compute ceiling).

    The rate comes from the fastest repeat: a ceiling is what the machine can do, and on a shared
    machine the slower repeats measure the neighbours too.
    """
    check_sizes(1, size=size)
    torch_dtype = resolve_dtype(dtype, device)
    a = torch.randn(size, size, device=device).to(torch_dtype)
    b = torch.randn(size, size, device=device).to(torch_dtype)
    timing = measure(lambda: torch.matmul(a, b), device=device, warmup=warmup, repeats=repeats)
    flops = 2 * size**3  # one multiply and one add per term of a size x size x size product
    best_ms = min(timing.times_ms)  # a ceiling is the best the machine did, not its typical run
    return {"what": "matmul", "dtype": str(torch_dtype).removeprefix("torch."), "size": size, "flops": flops,
            "median_ms": timing.median_ms, "best_ms": best_ms, "flops_per_s": flops / (best_ms / 1e3)}


def measure_copy_ceiling(device: str, megabytes: int, *, warmup: int = 2, repeats: int = 5) -> dict[str, Any]:
    """Bytes/s of copying a ``megabytes`` buffer on ``device`` (read + write both count: the bandwidth ceiling).

    From the fastest repeat, as for the matmul ceiling.
    """
    check_sizes(1, megabytes=megabytes)
    count = megabytes * 2**20 // 4
    source = torch.rand(count, device=device)
    target = torch.empty_like(source)
    timing = measure(lambda: target.copy_(source), device=device, warmup=warmup, repeats=repeats)
    if not torch.equal(source, target):
        raise RuntimeError("the copy used to measure bandwidth did not copy correctly")
    moved = 2 * source.numel() * source.element_size()
    best_ms = min(timing.times_ms)
    return {"what": "copy", "bytes": moved, "median_ms": timing.median_ms, "best_ms": best_ms,
            "bytes_per_s": moved / (best_ms / 1e3)}


def measure_ceilings(device: str, dtype="auto", *, matmul_size: int | None = None,
                     copy_megabytes: int | None = None, quick: bool = False) -> dict[str, Any]:
    """Measure both ceilings of ``device``; sizes default to :func:`default_sizes`."""
    sizes = default_sizes(device, quick)
    matmul = measure_matmul_ceiling(device, resolve_dtype(dtype, device), matmul_size or sizes["matmul_size"])
    copy = measure_copy_ceiling(device, copy_megabytes or sizes["copy_megabytes"])
    return {"device": device, "device_label": device_label(device), "quick": quick,
            "matmul_flops_per_s": {matmul["dtype"]: matmul["flops_per_s"]},
            "copy_bytes_per_s": copy["bytes_per_s"], "matmul": matmul, "copy": copy,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def save_ceilings(ceilings: dict[str, Any], path: Path | None = None) -> Path:
    """Merge ``ceilings`` into the ceilings file, keyed by device label (several dtypes accumulate).

    A ceiling is the best the machine has shown. Matmul rates: per dtype, the highest ever saved (a rate
    the machine reached is within its reach, whatever the size). Copy bandwidth: a quick (small-buffer)
    measurement never replaces a full one, because a small buffer can sit in a CPU cache and overstate
    memory bandwidth; at the same size level the higher one is kept.
    """
    path = Path(path or cache_dir() / "ceilings.json")  # kept between notebooks
    stored = json.loads(path.read_text()) if path.exists() else {}
    key = ceilings["device_label"]
    previous = stored.get(key, {})
    matmul = dict(previous.get("matmul_flops_per_s", {}))
    for dtype, rate in ceilings["matmul_flops_per_s"].items():
        matmul[dtype] = max(rate, matmul.get(dtype, 0.0))
    if previous and ceilings.get("quick") and not previous.get("quick"):
        merged = {**previous, "matmul_flops_per_s": matmul}
    else:
        copy = ceilings["copy_bytes_per_s"]
        if previous and previous.get("quick") == ceilings.get("quick"):
            copy = max(copy, previous.get("copy_bytes_per_s", 0.0))
        merged = {**previous, **ceilings, "matmul_flops_per_s": matmul, "copy_bytes_per_s": copy}
    stored[key] = merged
    return write_atomically(path, json.dumps(stored, indent=2))  # a notebook beside this one never reads half a file


def load_ceilings(device: str, path: Path | None = None) -> dict[str, Any] | None:
    """The ceilings saved for ``device`` by notebook 00, or None when they were never measured here."""
    path = Path(path or cache_dir() / "ceilings.json")  # kept between notebooks
    return json.loads(path.read_text()).get(device_label(device)) if path.exists() else None


def compute_ceiling(device: str, dtype, *, quick: bool = False, path: Path | None = None) -> dict[str, Any]:
    """The matmul FLOP/s ceiling of ``device`` in ``dtype``, measured now and merged with the saved ones.

    Measuring again here (about a second) keeps a ceiling saved under other conditions from making a
    kernel look faster than the machine. Returns ``{"flops_per_s": ..., "source": "where it comes from"}``.
    """
    name = str(resolve_dtype(dtype, device)).removeprefix("torch.")
    now = measure_ceilings(device, name, quick=quick)
    measured, size = now["matmul_flops_per_s"][name], now["matmul"]["size"]
    best = load_ceilings(device, save_ceilings(now, path))["matmul_flops_per_s"][name]  # saving keeps the higher
    if best > measured:
        return {"flops_per_s": best, "source": f"the best saved on this machine, higher than the "
                f"{measured / 1e12:.3g} TFLOP/s of a {size}x{size} matmul measured now"}
    return {"flops_per_s": best, "source": f"the best of a {size}x{size} {name} matmul measured now"}


def bandwidth_ceiling(device: str, *, path: Path | None = None) -> dict[str, Any]:
    """The memory bandwidth ceiling of ``device``, measured now with a full-size buffer (a small one can sit
    in a CPU cache) and merged with the saved ones. Returns ``{"bytes_per_s": ..., "source": "..."}``."""
    megabytes = default_sizes(device)["copy_megabytes"]
    copy = measure_copy_ceiling(device, megabytes)
    saved = save_ceilings({"device": device, "device_label": device_label(device), "quick": False,
                           "matmul_flops_per_s": {}, "copy_bytes_per_s": copy["bytes_per_s"], "copy": copy,
                           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, path)
    best = load_ceilings(device, saved)["copy_bytes_per_s"]  # saving keeps the higher of two full-size copies
    if best > copy["bytes_per_s"]:
        return {"bytes_per_s": best, "source": f"the best saved on this machine, higher than the "
                f"{copy['bytes_per_s'] / 1e9:.3g} GB/s of a {megabytes} MiB copy measured now"}
    return {"bytes_per_s": best, "source": f"the best of a {megabytes} MiB copy measured now"}


# --------------------------------------------------------------------------- decoding: bytes per generated token

def parameter_bytes(model) -> int:
    """Bytes of a model's parameters and buffers, each shared tensor counted once (tied embeddings).

    Under tensor parallelism a split tensor counts with the shard this process holds (``to_local()``).
    """
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # by identity: data pointers are 0 on meta
    local = [t.to_local() if hasattr(t, "to_local") else t for t in unique.values()]
    return sum(t.numel() * t.element_size() for t in local)


def weight_bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: every parameter once, except that an input embedding not tied
    to the output layer contributes only the rows of the tokens being looked up (one row per token)."""
    total = parameter_bytes(model)
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    if not tied:
        total -= embedding.numel() * embedding.element_size()
        total += embedding.shape[1] * embedding.element_size()
    return total


def kv_shape(config) -> dict[str, int]:
    """What the KV cache's size depends on: layers, query heads, key/value heads (fewer than the query heads under
    grouped-query attention, GQA; one under multi-query attention, MQA) and the head size."""
    heads = config.num_attention_heads
    return {"layers": config.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def kv_bytes_per_token(*, layers: int, kv_heads: int, head_dim: int, element_bytes: int) -> int:
    """Bytes one token adds to the KV cache: a key and a value vector per key/value head, in every layer."""
    check_sizes(1, layers=layers, kv_heads=kv_heads, head_dim=head_dim, element_bytes=element_bytes)
    return 2 * layers * kv_heads * head_dim * element_bytes


def kv_tokens_held(config, context: int) -> list[int]:
    """How many tokens each layer's cache holds after ``context`` tokens, as transformers' cache shows them (the
    length of the keys each layer attends to).

    A full-attention layer keeps every token. A sliding-window layer (Mistral, Gemma 2 and 3, gpt-oss; and a
    chunked-attention layer, whose chunk transformers caches the same way) keeps the last ``window - 1`` (with the
    token being processed they make the window). A layer that reuses another's cache, or has no attention, keeps none.
    The layer types are ``config.layer_types``, or, as transformers infers them, sliding wherever
    ``config.sliding_window`` is set. The memory behind a sliding layer can be larger: transformers 5.25 keeps a
    slice of the keys it concatenated (``DynamicSlidingWindowLayer.update``), so after a prompt longer than the
    window the tensor holds the whole prompt until the next token, and while decoding it holds ``window`` tokens.
    """
    window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    types = list(getattr(config, "layer_types", None) or [
        "sliding_attention" if window else "chunked_attention" if chunk else "full_attention"
    ] * config.num_hidden_layers)
    for i, mode in enumerate(getattr(config, "kv_sharing_modes", None) or []):
        types[i] = "dummy" if mode == "reuse" else types[i]
    held = {"sliding_attention": min(context, (window or context + 1) - 1),
            "chunked_attention": min(context, (chunk or context + 1) - 1), "dummy": 0, "moe": 0, "mlp": 0}
    return [held.get(kind, context) for kind in types]


def kv_elements_per_token(config) -> int:
    """Numbers one token adds to one layer's cache: a key and a value per key/value head (MHA, GQA, MQA); under
    multi-head latent attention (MLA: DeepSeek-V2 and V3) one compressed latent and one rotary key, shared by every
    head (``kv_lora_rank + qk_rope_head_dim``; the DeepSeek-V2 paper, arXiv 2405.04434, table 1)."""
    if getattr(config, "kv_lora_rank", None):
        return config.kv_lora_rank + config.qk_rope_head_dim
    shape = kv_shape(config)
    return kv_bytes_per_token(layers=1, kv_heads=shape["kv_heads"], head_dim=shape["head_dim"], element_bytes=1)


def kv_cache_bytes(config, *, batch: int, context: int, dtype="float16") -> int:
    """Bytes of the key and value cache for ``batch`` sequences of ``context`` tokens, every layer: the one KV
    formula, for MHA, GQA, MQA, MLA and sliding-window layers (:func:`kv_elements_per_token`,
    :func:`kv_tokens_held`)."""
    check_sizes(1, batch=batch, context=context)
    return batch * sum(kv_tokens_held(config, context)) * kv_elements_per_token(config) * element_size(dtype)


def decode_bound_tokens_per_s(bandwidth_bytes_per_s: float, weight_bytes: int, kv_bytes: int = 0,
                              batch: int = 1) -> float:
    """The bandwidth bound of decoding: each step reads the weights and the KV cache once and yields
    ``batch`` tokens, so tokens/s <= batch x bandwidth / (weight bytes + KV cache bytes)."""
    if not bandwidth_bytes_per_s > 0:
        raise BadParameter(f"bandwidth={bandwidth_bytes_per_s}: a ceiling must be a positive number.")
    check_sizes(1, batch=batch, weight_bytes=weight_bytes)
    if kv_bytes < 0:
        raise BadParameter(f"kv_bytes={kv_bytes}: a size cannot be negative.")
    return batch * bandwidth_bytes_per_s / (weight_bytes + kv_bytes)
