"""Bytes and machines, the core's footprint counting: what a model's weights take in each storage format (predicted
from its 16-bit tensors, and counted from what a quantized model really holds), what serving it needs beside its KV
cache, and whether that fits the machines a learner types in ("2 nodes x 8 x 80 GB") or this one's GPUs.

Notebook 04 predicts and counts formats with it, 05 plans layouts, 06 sizes a server's KV cache.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import torch

from labkit import compat, roofline
from labkit.errors import BadParameter

BNB_FORMATS = ("fp4", "nf4", "nf4-double", "int8")
TORCHAO_FORMATS = ("torchao-int8", "torchao-int4", "torchao-float8")
ALL_FORMATS = ("16-bit", *BNB_FORMATS, *TORCHAO_FORMATS)
BLOCKSIZE = 64  # bitsandbytes' 4-bit block: one absmax scale per 64 weights
INT4_GROUP_SIZE = 64  # torchao int4: one scale and zero point per 64 weights (SmolLM2's 576 columns are not 128s)
CODE_ENTRIES = 16  # a 4-bit format's 16 levels, kept as a float32 table beside every layer
NESTED_BLOCK = 256  # double quantization: one float32 scale per 256 of the 8-bit absmax values
TILE_PACKED_COLUMNS, TILE_PACKED_ROWS = 1024, 8  # torchao's GPU int4 layout pads columns and rows to these multiples
GIB = 2**30
# Share of each device's memory a plan may fill. The rest is a planning margin (our choice, not a measurement)
# for the CUDA context, activations and allocator fragmentation.
USABLE_FRACTION = 0.9


# --------------------------------------------------------------------------- storage formats: bytes per weight

def check_format(name: str) -> str:
    """A format name of :data:`ALL_FORMATS`, or one sentence listing them."""
    if name not in ALL_FORMATS:
        raise BadParameter(f"format {name!r} is unknown; use one of {', '.join(ALL_FORMATS)}.")
    return name


def library(name: str) -> str:
    """Which library stores format ``name``: "torch" (16-bit), "bitsandbytes" or "torchao"."""
    check_format(name)
    return "torch" if name == "16-bit" else "torchao" if name in TORCHAO_FORMATS else "bitsandbytes"


def quantized_linears(model) -> list[torch.nn.Linear]:
    """The linear layers a format quantizes: all of them except the output layer."""
    output = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output]


def four_bit_parts(count: int, *, blocksize: int = BLOCKSIZE, double: bool = False) -> tuple[int, int]:
    """(packed weight bytes, scale bytes) of ``count`` weights in bitsandbytes' 4-bit formats: half a byte per weight;
    one float32 absmax per block of ``blocksize`` and the 16-entry float32 code table of the format. With double
    quantization the absmax values are stored in 8 bits, with one float32 scale per 256 of them, their own 256-entry
    float32 code table and one float32 offset. Their sum is the one formula for a 4-bit size."""
    blocks = -(-count // blocksize)
    scales = blocks + 4 * -(-blocks // NESTED_BLOCK) + 4 * NESTED_BLOCK + 4 if double else 4 * blocks
    return (count + 1) // 2, scales + 4 * CODE_ENTRIES


def int4_weight_only_parts(rows: int, cols: int, *, group_size: int = INT4_GROUP_SIZE, element_bytes: int = 2,
                           device: str = "cpu") -> tuple[int, int]:
    """(packed weight bytes, scale bytes) of a ``rows`` x ``cols`` weight in torchao's int4 weight-only formats: half a
    byte per weight, and a scale and a zero point (each of ``element_bytes``, the weights' dtype) per group of
    ``group_size`` weights along a row. On a GPU the tile-packed layout first pads the columns to a multiple of 1024
    and the rows to a multiple of 8."""
    if device.startswith("cuda"):
        cols = -(-cols // TILE_PACKED_COLUMNS) * TILE_PACKED_COLUMNS
        rows = -(-rows // TILE_PACKED_ROWS) * TILE_PACKED_ROWS
    return rows * cols // 2, rows * (cols // group_size) * 2 * element_bytes


def weight_parts(name: str, rows: int, cols: int, *, element_bytes: int = 2, device: str = "cpu",
                 group_size: int = INT4_GROUP_SIZE) -> tuple[int, int] | None:
    """(quantized weight bytes, scale bytes) of one ``rows`` x ``cols`` linear weight in format ``name``; None when
    the format leaves this layer in 16-bit (torchao int4 when ``cols`` is not a multiple of the group size)."""
    count = rows * cols
    if name in ("fp4", "nf4", "nf4-double"):
        return four_bit_parts(count, double=name == "nf4-double")
    if name in ("int8", "torchao-float8"):  # LLM.int8's int8 or torchao's float8 weights, one float32 scale per row
        return count, 4 * rows
    if name == "torchao-int8":  # int8 weights, a float32 scale and an int8 zero point per row
        return count, rows * (4 + 1)
    if name == "torchao-int4":
        return None if cols % group_size else int4_weight_only_parts(rows, cols, group_size=group_size,
                                                                    element_bytes=element_bytes, device=device)
    raise BadParameter(f"format {name!r} stores no quantized weights.")


def predict_footprint(model, name: str, *, device: str = "cpu") -> dict[str, int]:
    """Predict the bytes of ``model`` (a 16-bit model, before quantization) in format ``name`` from its own tensors:
    ``kept`` (what stays 16-bit), ``weights`` (the quantized weight matrices) and ``scales`` (what the format keeps
    beside them). A tensor shared by two modules (tied embeddings) counts once."""
    check_format(name)
    layers = {id(m.weight): m for m in quantized_linears(model)}
    parts, seen = {"kept": 0, "weights": 0, "scales": 0}, set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        layer = layers.get(id(tensor))
        stored = None if name == "16-bit" or layer is None else weight_parts(
            name, layer.out_features, layer.in_features, element_bytes=tensor.element_size(), device=device)
        if stored is None:
            parts["kept"] += tensor.numel() * tensor.element_size()
        else:
            parts["weights"] += stored[0]
            parts["scales"] += stored[1]
    return parts


def _plain_bytes(tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass holding other tensors
        return sum(_plain_bytes(getattr(tensor, n)) for n in tensor.__tensor_flatten__()[0])
    return tensor.numel() * tensor.element_size()


def count_footprint(model) -> dict[str, int]:
    """The bytes a (quantized) model really holds, counted from its tensors: ``kept`` (16-bit tensors), ``weights``
    (quantized weights) and ``scales``. ``get_memory_footprint()`` counts elements times the dtype a parameter
    presents: right for plain tensors, blind to bitsandbytes' scales (kept beside the parameter) and wrong for
    torchao's tensor subclasses (each presents its 16-bit dtype while holding int8 or packed int4 inside)."""
    parts, seen = {"kept": 0, "weights": 0, "scales": 0}, set()
    # LLM.int8's row scales move from ``weight.SCB`` into the layer's ``state.SCB`` at its first forward pass
    # (bitsandbytes' ``Linear8bitLt.init_8bit_state``): found there by the weight's id.
    moved = {id(m.weight): m.state.SCB for m in model.modules()
             if getattr(getattr(m, "state", None), "SCB", None) is not None and getattr(m, "weight", None) is not None}

    def add(part: str, tensor) -> None:
        if tensor is not None and id(tensor) not in seen:
            seen.add(id(tensor))
            parts[part] += tensor.numel() * tensor.element_size()

    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        if hasattr(tensor, "__tensor_flatten__"):  # torchao: the packed weights ("qdata") and their scales inside
            seen.add(id(tensor))
            for n in tensor.__tensor_flatten__()[0]:
                parts["weights" if n == "qdata" else "scales"] += _plain_bytes(getattr(tensor, n))
            continue
        state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: the scales live beside the parameter
        row_scales = getattr(tensor, "SCB", None)
        row_scales = moved.get(id(tensor)) if row_scales is None else row_scales
        add("kept" if state is None and row_scales is None else "weights", tensor)
        extra = [row_scales] if row_scales is not None else [] if state is None else [state.absmax, state.code]
        if state is not None and state.nested:
            extra += [state.state2.absmax, state.state2.code, state.offset]
        for t in extra:
            add("scales", t)
    return parts


# --------------------------------------------------------------------------- devices and machines, real or typed in

_DEVICES = re.compile(r"^\s*(?:(\d+)\s*[x×*]\s*)?(\d+(?:\.\d+)?)\s*([gmt])(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"g": GIB, "m": 2**20, "t": 2**40}  # as GPU makers use them, GB here are GiB (2**30 bytes)
_NODES = re.compile(r"^\s*(\d+)\s*nodes?\s*[x×*]\s*(.+)$", re.IGNORECASE)


def parse_devices(text: str) -> list[dict[str, Any]]:
    """Devices typed by a learner: "2 x 24 GB", "8x80GB", "24 GB + 12 GB"; "present" (or "") for this machine's GPUs.

    Returns ``[{"name": "gpu0", "bytes": ...}, ...]``.
    """
    if str(text).strip().lower() in ("", "present"):
        return devices_present()
    sizes: list[int] = []
    for part in re.split(r"[+,]", str(text)):
        match = _DEVICES.match(part)
        size = int(float(match.group(2)) * _UNITS[match.group(3).lower()]) if match else 0
        if size <= 0 or int(match.group(1) or 1) < 1:
            raise BadParameter(f"devices={text!r}: write devices like '2 x 24 GB', '8 x 80 GB', '24 GB + 12 GB' or "
                               "'2 nodes x 8 x 80 GB'.")
        sizes += [size] * int(match.group(1) or 1)
    return [{"name": f"gpu{i}", "bytes": size} for i, size in enumerate(sizes)]


def parse_machine(text: str) -> dict[str, Any]:
    """A machine typed by a learner: one node ("8 x 80 GB") or several alike ("2 nodes x 8 x 80 GB").

    Returns ``{"text", "nodes", "per_node", "devices"}``, ``devices`` listing every GPU of every node.
    """
    match = _NODES.match(str(text))
    nodes, node = (int(match.group(1)), match.group(2)) if match else (1, str(text))
    if nodes < 1:
        raise BadParameter(f"devices={text!r}: a machine has at least 1 node.")
    one = parse_devices(node)
    if not one:
        raise BadParameter(f"plan_devices: {text!r} means this machine's GPUs, and it has none; "
                           "describe one like '1 x 24 GB'.")
    devices = [{**d, "name": f"gpu{i}"} for i, d in enumerate(d for _ in range(nodes) for d in one)]
    return {"text": str(text), "nodes": nodes, "per_node": len(one), "devices": devices}


def devices_present() -> list[dict[str, Any]]:
    """This machine's CUDA GPUs with their total memory (an empty list without a GPU)."""
    if not torch.cuda.is_available():
        return []
    return [{"name": f"cuda:{i}", "bytes": torch.cuda.get_device_properties(i).total_memory,
             "label": torch.cuda.get_device_name(i)} for i in range(torch.cuda.device_count())]


def describe_devices(devices: list[dict[str, Any]]) -> str:
    """"2 x 24.0 GiB" style text for a device list."""
    sizes = Counter(round(device["bytes"] / GIB, 1) for device in devices)
    return " + ".join(f"{n} x {size:g} GiB" for size, n in sizes.items()) or "no GPU"


def memory_needed(model, *, fmt: str = "16-bit", batch: int = 1, context: int = 4096,
                  kv_dtype: Any = "float16") -> dict[str, int]:
    """Bytes to serve ``model``: its weights stored in format ``fmt`` (:func:`predict_footprint`: what is not
    quantized keeps the model's own dtype, so build a plan's model in 16-bit) and the KV cache of ``batch`` sequences
    of ``context`` tokens in ``kv_dtype``. Activations are small beside these at decode time and are left to the
    planning margin."""
    weights = sum(predict_footprint(model, fmt).values())
    kv = roofline.kv_cache_bytes(model.config, batch=batch, context=context, dtype=kv_dtype)
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def cache_bytes(output) -> int:
    """Bytes of the keys and values held in the cache a forward pass returned (``model(..., use_cache=True)``); a
    pipeline stage's cache holds only its own layers."""
    return sum(t.numel() * t.element_size() for layer in compat.output_cache(output).layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))


def devices_needed(total_bytes: int, device_bytes: int, *, usable: float = USABLE_FRACTION) -> int:
    """The fewest devices of ``device_bytes`` that hold ``total_bytes``, filling each to ``usable``."""
    return max(1, math.ceil(total_bytes / (device_bytes * usable)))
