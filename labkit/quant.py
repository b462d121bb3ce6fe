"""4-bit and 8-bit weights with bitsandbytes: formats, predicted footprints, perplexity and KL divergence.

What is quantized: the weight matrices of the linear layers. What stays 16-bit: embeddings (and a tied
output layer), layer norms, biases, and the activations and KV cache, which are computed in the compute dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from labkit.errors import BadParameter, check_sizes

# name -> BitsAndBytesConfig keyword arguments (None: the 16-bit model itself)
FORMATS: dict[str, dict[str, Any] | None] = {
    "16-bit": None,
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "nf4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}
BLOCKSIZE = 64  # bitsandbytes' 4-bit block: one absmax scale per 64 weights
SKIPPED_MODULES = ("lm_head",)  # transformers keeps the output layer in 16-bit


def check_format(name: str) -> str:
    """A format name of :data:`FORMATS`, or one sentence listing them."""
    if name not in FORMATS:
        raise BadParameter(f"format {name!r} is unknown; use one of {', '.join(FORMATS)}.")
    return name


def quantization_config(name: str, compute_dtype: Any = "bfloat16"):
    """The ``BitsAndBytesConfig`` for a format (None for 16-bit); ``compute_dtype`` is what 4-bit
    weights are dequantized to for each matrix product."""
    from labkit.probes import resolve_dtype

    kwargs = FORMATS[check_format(name)]
    if kwargs is None:
        return None
    from transformers import BitsAndBytesConfig

    extra = {"bnb_4bit_compute_dtype": resolve_dtype(compute_dtype)} if kwargs.get("load_in_4bit") else {}
    return BitsAndBytesConfig(**kwargs, **extra)


def _linear_weights(model) -> list[tuple[str, Any]]:
    import torch

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not any(name.endswith(s) for s in SKIPPED_MODULES)]


def predict_footprint(model, name: str, *, sixteen_bit_bytes: int = 2) -> dict[str, int]:
    """Predict the bytes of ``model`` (a 16-bit or float32 model, before quantization) stored in format ``name``.

    Returns ``stored`` (what ``get_memory_footprint()`` counts: parameters and buffers) and
    ``constants`` (the quantization scales bitsandbytes keeps beside them: one float32 absmax per 64
    weights for 4-bit; with double quantization one byte per 64, one float32 per 256 blocks and a 1 KiB code table per
    layer; one float32 scale per row for int8).
    """
    stored = constants = 0
    for _, tensor_stored, tensor_constants in tensor_footprints(model, name, sixteen_bit_bytes=sixteen_bit_bytes):
        stored += tensor_stored
        constants += tensor_constants
    return {"stored": stored, "constants": constants}


def tensor_footprints(model, name: str, *, sixteen_bit_bytes: int = 2):
    """``(tensor, stored bytes, scale bytes)`` for each distinct parameter and buffer of ``model`` in format ``name``
    (a tensor shared by two modules, like tied embeddings, comes once)."""
    check_format(name)
    quantized = {id(module.weight): module for _, module in _linear_weights(model)}
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        count = tensor.numel()
        if name == "16-bit" or id(tensor) not in quantized:
            yield tensor, count * (sixteen_bit_bytes if tensor.is_floating_point() else tensor.element_size()), 0
        elif name == "int8":
            yield tensor, count, quantized[id(tensor)].out_features * 4
        else:
            yield tensor, *four_bit_parts(count, double=name == "nf4-double")


def four_bit_parts(count: int, *, blocksize: int = BLOCKSIZE, double: bool = False) -> tuple[int, int]:
    """(packed weight bytes, scale bytes) of ``count`` weights in a 4-bit format: half a byte per weight, and one
    float32 absmax per block; with double quantization an 8-bit absmax per block, one float32 per 256 of those and a
    256-entry float32 code table."""
    blocks = -(-count // blocksize)
    scales = blocks + 4 * -(-blocks // 256) + 256 * 4 if double else 4 * blocks
    return (count + 1) // 2, scales


def four_bit_bytes(count: int, *, blocksize: int = BLOCKSIZE, double: bool = False) -> int:
    """Bytes of ``count`` weights in a 4-bit format, scales included (:func:`four_bit_parts`)."""
    return sum(four_bit_parts(count, blocksize=blocksize, double=double))


# --------------------------------------------------------------------------- quality

def sample_text() -> str:
    """The text the workbook measures perplexity on (written for it, public domain, about 2,400 SmolLM2 tokens)."""
    return (Path(__file__).parent / "data" / "lighthouse_keepers.txt").read_text(encoding="utf-8")


def perplexity(model, input_ids, *, window: int = 512) -> dict[str, float]:
    """Perplexity of ``input_ids`` (1, N) in consecutive windows of ``window`` tokens: exp(mean negative
    log-likelihood of each token given the ones before it in its window)."""
    import math

    import torch

    check_sizes(2, window=window)
    ids = input_ids.reshape(1, -1)
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start:start + window].to(model.device)
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                    reduction="sum")
            total_nll += float(nll)
            total_tokens += chunk.shape[1] - 1
    if total_tokens == 0:
        raise BadParameter("perplexity needs at least 2 tokens.")
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "mean_nll": mean, "tokens": total_tokens}


def next_token_logits(model, input_ids, *, window: int = 512):
    """The logits of every position, window by window, as float32 on the CPU (for :func:`kl_divergence`)."""
    import torch

    ids = input_ids.reshape(1, -1)
    parts = []
    with torch.inference_mode():
        for start in range(0, ids.shape[1], window):
            parts.append(model(input_ids=ids[:, start:start + window].to(model.device)).logits[0].float().cpu())
    return torch.cat(parts)


def kl_divergence(reference_logits, logits) -> float:
    """Mean over positions of KL(P_reference || P): how far a model's next-token distributions moved (nats)."""
    import torch

    if reference_logits.shape != logits.shape:
        raise BadParameter(f"logits of shapes {tuple(reference_logits.shape)} and {tuple(logits.shape)} cannot be compared.")
    total = 0.0
    for start in range(0, reference_logits.shape[0], 256):  # in chunks: float64 over a whole vocabulary is large
        log_p = torch.log_softmax(reference_logits[start:start + 256].double(), dim=-1)
        log_q = torch.log_softmax(logits[start:start + 256].double(), dim=-1)
        total += float((log_p.exp() * (log_p - log_q)).sum(-1).sum())
    return total / reference_logits.shape[0]
