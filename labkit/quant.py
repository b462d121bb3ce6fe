"""Notebook 04's topic: 4-bit and 8-bit weights. bitsandbytes formats (memory), torchao formats (speed), their
footprints predicted from a model's tensors and counted from what the quantized model really holds, perplexity and
KL divergence against 16-bit, decode against each format's own bandwidth bound, and the batch size where weight-only
quantization stops helping (roofline).

What is quantized: the weight matrices of the linear layers, except the output layer (transformers keeps ``lm_head``
in 16-bit whether or not it is tied to the embeddings; torchao's ``quantize_`` gets the same rule here). What stays
16-bit: the embeddings, the output layer, the norms, the biases, and what is computed at run time (activations, KV
cache).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from labkit import attention, compat, generation, models, probes, roofline
from labkit.errors import BadParameter, ModelNotAvailable, check_sizes
from labkit.metrics import quantization as names
from labkit.timing import measure, percentile, recheck_trend, synchronize

# name -> BitsAndBytesConfig keyword arguments (None: the 16-bit model itself)
FORMATS: dict[str, dict[str, Any] | None] = {
    "16-bit": None,
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "nf4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}
BNB_FORMATS = ("fp4", "nf4", "nf4-double", "int8")
TORCHAO_FORMATS = ("torchao-int8", "torchao-int4", "torchao-float8")
ALL_FORMATS = ("16-bit", *BNB_FORMATS, *TORCHAO_FORMATS)
BLOCKSIZE = 64  # bitsandbytes' 4-bit block: one absmax scale per 64 weights
INT4_GROUP_SIZE = 64  # torchao int4: one scale and zero point per 64 weights (SmolLM2's 576 columns are not 128s)
CODE_ENTRIES = 16  # a 4-bit format's 16 levels, kept as a float32 table beside every layer
NESTED_BLOCK = 256  # double quantization: one float32 scale per 256 of the 8-bit absmax values
TILE_PACKED_COLUMNS, TILE_PACKED_ROWS = 1024, 8  # torchao's GPU int4 layout pads columns and rows to these multiples
FP8_CAPABILITY = (8, 9)  # float8 matrix units: Ada and Hopper (8.9, 9.0) and newer
LAUNCH_BOUND = 5.0  # a GPU step this many times slower than its bytes need is set by kernel launches, not memory


def check_format(name: str) -> str:
    """A format name of :data:`ALL_FORMATS`, or one sentence listing them."""
    if name not in ALL_FORMATS:
        raise BadParameter(f"format {name!r} is unknown; use one of {', '.join(ALL_FORMATS)}.")
    return name


def library(name: str) -> str:
    """Which library stores format ``name``: "torch" (16-bit), "bitsandbytes" or "torchao"."""
    check_format(name)
    return "torch" if name == "16-bit" else "torchao" if name in TORCHAO_FORMATS else "bitsandbytes"


# --------------------------------------------------------------------------- the plan

def compute_dtype_for(compute_dtype: Any, device: str) -> torch.dtype:
    """``compute_dtype="auto"``: bfloat16 where it is native (and on a CPU), float16 on an older GPU."""
    if compute_dtype == "auto":
        compute_dtype = "bfloat16" if not device.startswith("cuda") or probes.native_bf16(device) else "float16"
    dtype = probes.resolve_dtype(compute_dtype, device)
    probes.check_dtype(device, dtype)
    return dtype


def default_sizes(on_gpu: bool, quick: bool) -> dict[str, Any]:
    """Sizes for this device: tokens scored, tokens generated, prompt of the prefill timing, timing repeats, and the
    batches and layer of the weight-only sweep."""
    if on_gpu:  # the whole shipped text (about 2,400 tokens); a 8192 x 8192 layer is read in tens of microseconds
        return {"eval_tokens": 4096, "new_tokens": 32, "prefill_tokens": 128, "warmup": 1, "repeats": 2,
                "sweep_batches": [1, 4, 16, 64, 256, 1024], "layer": 8192}
    if quick:
        return {"eval_tokens": 128, "new_tokens": 8, "prefill_tokens": 32, "warmup": 1, "repeats": 1,
                "sweep_batches": [1, 4, 16, 64], "layer": 4096}
    return {"eval_tokens": 512, "new_tokens": 16, "prefill_tokens": 128, "warmup": 1, "repeats": 2,
            "sweep_batches": [1, 4, 16, 64, 256], "layer": 4096}


def notebook_plan(*, device: str, quick: bool, compute_dtype: Any = "auto", model_id: str = "smollm2-135m",
                  formats: Any = ALL_FORMATS, eval_tokens: int = 0, batch_sizes: Any = (1, 8),
                  new_tokens: int = 0) -> dict[str, Any]:
    """Notebook 04's parameters, checked (one sentence for a bad one), the formats this machine can run (the others
    are returned as skips, each with its reason) and the sizes for this device."""
    if isinstance(formats, str) or not formats:
        raise BadParameter(f"formats={formats!r}: give a list, for example ['16-bit', 'nf4', 'torchao-int4'].")
    wanted = [check_format(f) for f in dict.fromkeys(["16-bit", *formats])]  # 16-bit is the reference
    check_sizes(0, eval_tokens=eval_tokens, new_tokens=new_tokens)
    if isinstance(batch_sizes, (str, int)) or not batch_sizes:
        raise BadParameter(f"batch_sizes={batch_sizes!r}: give a list of batch sizes, for example [1, 8].")
    check_sizes(1, **{f"batch_sizes[{i}]": b for i, b in enumerate(batch_sizes)})
    if new_tokens == 1:
        raise BadParameter("new_tokens=1: decoding needs at least 2 new tokens to time a step.")
    quiet_libraries()
    dtype = compute_dtype_for(compute_dtype, device)
    problem = models.check_model(model_id)  # a wrong name stops here
    if problem:  # every section measures this model: without it there is nothing to do
        raise ModelNotAvailable(problem)
    on_gpu = device.startswith("cuda")
    skipped, dropped = unavailable_formats(wanted, device, dtype)
    runs = [f for f in wanted if f not in dropped]
    sizes = default_sizes(on_gpu, quick)
    plan = {"dtype": dtype, "formats": runs, "left_out": {"skipped": skipped},
            "bnb_formats": [f for f in runs if library(f) == "bitsandbytes"],
            "torchao_formats": [f for f in runs if library(f) == "torchao"],
            "eval_tokens": eval_tokens or sizes["eval_tokens"], "new_tokens": new_tokens or sizes["new_tokens"],
            "batch_sizes": sorted(set(batch_sizes)), **{k: sizes[k] for k in
                                                        ("prefill_tokens", "warmup", "repeats", "sweep_batches")},
            "layer_size": sizes["layer"], "compile_problem": compile_problem(device, quick),
            "speed_model_id": "random-llama-1b" if on_gpu else model_id}
    versions = ", ".join(f"{p} {probes.package_version(p) or 'missing'}" for p in ("bitsandbytes", "torchao"))
    plan["line"] = f"{versions}; formats: {', '.join(runs)}."
    return plan


def torchao_problem() -> str:
    """Why torchao cannot be used here ("" when it imports)."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install torchao==0.18.0, part of the quant extra)"
    try:
        with compat.quiet_logger("torchao"):
            import torchao.quantization  # noqa: F401  (optional: the quant extra, hidden by the fault matrix)
    except Exception as err:  # a broken install counts as missing, with its reason
        return f"torchao is installed but fails to import ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return ""


def unavailable_formats(formats: list[str], device: str, dtype) -> tuple[dict[str, str], set[str]]:
    """The formats of ``formats`` this machine cannot run: ({what is skipped: why}, the format names)."""
    skipped: dict[str, str] = {}
    dropped: set[str] = set()
    bnb = [f for f in formats if library(f) == "bitsandbytes"]
    if bnb:
        probe = probes.bitsandbytes_4bit([device])  # a real 4-bit matrix product on this device, not just an import
        if not all(r["ok"] for r in probe):
            skipped[f"the bitsandbytes formats ({', '.join(bnb)})"] = \
                f"bitsandbytes cannot run 4-bit on {device}: {probe[0]['reason']}"
            dropped.update(bnb)
    ao = [f for f in formats if library(f) == "torchao"]
    why = torchao_problem() if ao else ""
    if why:
        skipped[f"the torchao formats ({', '.join(ao)}), quantization for speed"] = why
        return skipped, dropped | set(ao)
    capability = torch.cuda.get_device_capability(torch.device(device)) if device.startswith("cuda") else None
    if "torchao-int4" in ao and capability is not None and (capability < (8, 0) or dtype != torch.bfloat16):
        skipped["torchao-int4"] = (f"torchao's int4 GPU layout (tinygemm) needs compute capability 8.0 and bfloat16; "
                                   f"this is {capability[0]}.{capability[1]} in {str(dtype).removeprefix('torch.')}")
        dropped.add("torchao-int4")
    if "torchao-float8" in ao and (capability is None or capability < FP8_CAPABILITY):
        where = f"compute capability {capability[0]}.{capability[1]}" if capability else "a CPU"
        skipped["torchao-float8"] = ("float8 weights and activations need a GPU with float8 matrix units (compute "
                                     f"capability 8.9 or newer, such as an H100); this run is on {where}")
        dropped.add("torchao-float8")
    return skipped, dropped


def compile_problem(device: str, quick: bool) -> str:
    """Why the compiled one-token step is not measured here ("" when it is)."""
    if quick and not device.startswith("cuda"):
        return ("quick sizes on a CPU: compiling the one-token step (torch.compile) costs more time than this quick "
                "run has; run with quick=False to measure it")
    return ""


def quiet_libraries() -> None:
    """bitsandbytes' log lines (its CPU backend on optional kernels; LLM.int8 on casting bfloat16 inputs to float16,
    at every matrix product) kept to errors for the rest of the notebook."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# --------------------------------------------------------------------------- configs and quantized models

def quantization_config(name: str, compute_dtype: Any = "bfloat16"):
    """The ``BitsAndBytesConfig`` for a bitsandbytes format (None for 16-bit); ``compute_dtype`` is what 4-bit
    weights are dequantized to for each matrix product."""
    kwargs = FORMATS.get(check_format(name), ...)
    if kwargs is ...:
        raise BadParameter(f"format {name!r} is not a bitsandbytes format; torchao formats use torchao_config().")
    if kwargs is None:
        return None
    from transformers import BitsAndBytesConfig

    extra = {"bnb_4bit_compute_dtype": probes.resolve_dtype(compute_dtype)} if kwargs.get("load_in_4bit") else {}
    return BitsAndBytesConfig(**kwargs, **extra)


def torchao_config(name: str, device: str = "cpu", *, group_size: int = INT4_GROUP_SIZE):
    """The torchao config of a torchao format on ``device``: int8 weight-only; int4 weight-only in the layout this
    device has a kernel for (a CPU: the prototype opaque layout for ``_weight_int4pack_mm_for_cpu``; a GPU: the
    tinygemm tile-packed layout); float8 weights and activations, one scale per row."""
    check_format(name)
    with compat.quiet_logger("torchao"):
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int4WeightOnlyConfig,
            Int8WeightOnlyConfig,
            PerRow,
        )
    if name == "torchao-int8":
        return Int8WeightOnlyConfig()
    if name == "torchao-int4":
        if device.startswith("cuda"):
            return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
        return PrototypeInt4WeightOnlyConfig(group_size=group_size)
    if name == "torchao-float8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    raise BadParameter(f"format {name!r} is not a torchao format; use one of {', '.join(TORCHAO_FORMATS)}.")


def all_linear_but_output(model) -> Callable[[torch.nn.Module, str], bool]:
    """A ``filter_fn`` for torchao's ``quantize_``: every linear layer except the output layer, as transformers does."""
    output = model.get_output_embeddings()
    return lambda module, fqn: isinstance(module, torch.nn.Linear) and module is not output


def torchao_quantized(model, name: str, device: str, *, group_size: int = INT4_GROUP_SIZE):
    """A copy of ``model`` quantized in format ``name`` with torchao's ``quantize_`` (the 16-bit model is kept)."""
    from torchao.quantization import quantize_

    quantized = copy.deepcopy(model)
    with compat.quiet_logger("torchao"):
        quantize_(quantized, torchao_config(name, device, group_size=group_size),
                  filter_fn=all_linear_but_output(quantized))
    return quantized


def quantized_linears(model) -> list[torch.nn.Linear]:
    """The linear layers a format quantizes: all of them except the output layer."""
    output = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output]


def meta_model(name: str, tokenizer, dtype):
    """A random-init architecture (``random-llama-1b``) built on the meta device: its shapes, no memory."""
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    with torch.device("meta"):
        return models.build_from_config(models.random_config(name, len(tokenizer), special), dtype=dtype)


# --------------------------------------------------------------------------- footprints: predicted, then counted

def four_bit_parts(count: int, *, blocksize: int = BLOCKSIZE, double: bool = False) -> tuple[int, int]:
    """(packed weight bytes, scale bytes) of ``count`` weights in bitsandbytes' 4-bit formats: half a byte per weight;
    one float32 absmax per block of ``blocksize`` and the 16-entry float32 code table of the format. With double
    quantization the absmax values are stored in 8 bits, with one float32 scale per 256 of them, their own 256-entry
    float32 code table and one float32 offset."""
    blocks = -(-count // blocksize)
    if double:
        scales = blocks + 4 * -(-blocks // NESTED_BLOCK) + 4 * NESTED_BLOCK + 4
    else:
        scales = 4 * blocks
    return (count + 1) // 2, scales + 4 * CODE_ENTRIES


def four_bit_bytes(count: int, *, blocksize: int = BLOCKSIZE, double: bool = False) -> int:
    """Bytes of ``count`` weights in a bitsandbytes 4-bit format, scales included (:func:`four_bit_parts`): the one
    formula for a 4-bit size."""
    return sum(four_bit_parts(count, blocksize=blocksize, double=double))


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
    if name == "int8":  # LLM.int8: int8 weights and one float32 scale per row
        return count, 4 * rows
    if name == "torchao-int8":  # int8 weights, a float32 scale and an int8 zero point per row
        return count, rows * (4 + 1)
    if name == "torchao-int4":
        return None if cols % group_size else int4_weight_only_parts(rows, cols, group_size=group_size,
                                                                    element_bytes=element_bytes, device=device)
    if name == "torchao-float8":  # float8 weights and one float32 scale per row
        return count, 4 * rows
    raise BadParameter(f"format {name!r} stores no quantized weights.")


def predict_footprint(model, name: str, *, device: str = "cpu", group_size: int = INT4_GROUP_SIZE) -> dict[str, int]:
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
            name, layer.out_features, layer.in_features, element_bytes=tensor.element_size(), device=device,
            group_size=group_size)
        if stored is None:
            parts["kept"] += tensor.numel() * tensor.element_size()
        else:
            parts["weights"] += stored[0]
            parts["scales"] += stored[1]
    return parts


def _plain_bytes(tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass holding other tensors
        inner, _ = tensor.__tensor_flatten__()
        return sum(_plain_bytes(getattr(tensor, n)) for n in inner)
    return tensor.numel() * tensor.element_size()


def _tensor_parts(tensor, seen: set[int], moved_scales: dict[int, Any]) -> Iterator[tuple[str, int]]:
    """(part, bytes) of what one parameter really holds; bitsandbytes' scales live beside the parameter (or, for
    LLM.int8 after its first forward pass, in its layer's ``state``: ``moved_scales``)."""
    if hasattr(tensor, "__tensor_flatten__"):  # torchao: the packed weights ("qdata") and their scales inside
        inner, _ = tensor.__tensor_flatten__()
        for n in inner:
            yield ("weights" if n == "qdata" else "scales"), _plain_bytes(getattr(tensor, n))
        return
    state = getattr(tensor, "quant_state", None)
    row_scales = getattr(tensor, "SCB", None)
    if row_scales is None:
        row_scales = moved_scales.get(id(tensor))
    if state is None and row_scales is None:
        yield "kept", tensor.numel() * tensor.element_size()
        return
    yield "weights", tensor.numel() * tensor.element_size()
    extra = [row_scales] if row_scales is not None else [state.absmax, state.code]
    if state is not None and state.nested:
        extra += [state.state2.absmax, state.state2.code, state.offset]
    for t in extra:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            yield "scales", t.numel() * t.element_size()


def count_footprint(model) -> dict[str, int]:
    """The bytes a (quantized) model really holds, counted from its tensors: ``kept`` (16-bit tensors), ``weights``
    (quantized weights) and ``scales``. ``get_memory_footprint()`` counts elements times the dtype a parameter
    presents: right for plain tensors, blind to bitsandbytes' scales (kept beside the parameter) and wrong for
    torchao's tensor subclasses (each presents its 16-bit dtype while holding int8 or packed int4 inside)."""
    parts, seen = {"kept": 0, "weights": 0, "scales": 0}, set()
    moved_scales = _int8_scales_in_state(model)
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        for part, size in _tensor_parts(tensor, seen, moved_scales):
            parts[part] += size
    return parts


def _int8_scales_in_state(model) -> dict[int, Any]:
    """LLM.int8's row scales that moved off their weight: bitsandbytes' ``Linear8bitLt`` moves ``weight.SCB`` into
    its ``state.SCB`` at the first forward pass (``init_8bit_state``), so they are found by the weight's id."""
    moved = {}
    for module in model.modules():
        state, weight = getattr(module, "state", None), getattr(module, "weight", None)
        scales = getattr(state, "SCB", None)
        if weight is not None and scales is not None and getattr(weight, "SCB", None) is None:
            moved[id(weight)] = scales
    return moved


def layer_footprint_mib(name: str, rows: int, cols: int, *, device: str = "cpu", dtype=torch.bfloat16,
                        group_size: int = INT4_GROUP_SIZE) -> float:
    """A real ``rows`` x ``cols`` layer quantized in format ``name`` by its library, its bytes counted (MiB)."""
    layer = torch.nn.Linear(cols, rows, bias=False, device=device, dtype=dtype)
    if library(name) == "bitsandbytes":
        import bitsandbytes.functional as bnbf  # optional (the quant extra): only when a bitsandbytes format runs

        packed, state = bnbf.quantize_4bit(layer.weight.data, blocksize=BLOCKSIZE, quant_type=name.split("-")[0],
                                           compress_statistics=name == "nf4-double")
        holder = torch.nn.Parameter(packed, requires_grad=False)
        holder.quant_state = state
        parts = count_footprint(torch.nn.ParameterList([holder]))
    else:
        from torchao.quantization import quantize_

        with compat.quiet_logger("torchao"):
            quantize_(layer, torchao_config(name, device, group_size=group_size))
        parts = count_footprint(layer)
    return sum(parts.values()) / 2**20


def footprint_rows(counted: dict[str, dict[str, int]], predicted: dict[str, dict[str, int]],
                   reported: dict[str, int]) -> list[dict[str, Any]]:
    """One row per format: the parts counted, the total against the prediction and against what
    ``get_memory_footprint()`` reports, and how many times smaller than 16-bit."""
    base = sum(counted["16-bit"].values())
    rows = []
    for name, parts in counted.items():
        total = sum(parts.values())
        rows.append({"format": name, "16-bit part MiB": parts["kept"] / 2**20,
                     "quantized weights MiB": parts["weights"] / 2**20, "scales MiB": parts["scales"] / 2**20,
                     "total MiB": total / 2**20, "predicted MiB": sum(predicted[name].values()) / 2**20,
                     "get_memory_footprint() MiB": reported[name] / 2**20, "x smaller": base / total})
    return rows


def footprint_findings(counted: dict[str, dict[str, int]], predicted: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The footprint metrics, and the claims: the prediction holds, and the formats order as their bits do."""
    total = {name: sum(parts.values()) for name, parts in counted.items()}
    metrics = {names.per_format("footprint", name): size / 2**20 for name, size in total.items()}
    checks: dict[str, Any] = {"prediction_matches_counted_footprint": all(
        abs(total[n] - sum(predicted[n].values())) <= 0.01 * total[n] for n in total)}
    four_bit = [total[n] for n in ("fp4", "nf4", "nf4-double") if n in total]
    if "int8" in total and four_bit:
        checks["footprint_ordering_16bit_int8_4bit"] = total["16-bit"] > total["int8"] > max(four_bit)
    if "torchao-int8" in total and "torchao-int4" in total:
        checks["torchao_footprints_below_16bit_int8_above_int4"] = \
            total["16-bit"] > total["torchao-int8"] > total["torchao-int4"]
    return {"metrics": metrics, "checks": checks}


def prediction_rows(predicted: dict[str, dict[str, int]], big: dict[str, dict[str, int]], model_id: str,
                    big_id: str = "random-llama-1b") -> list[dict[str, Any]]:
    """Predicted footprints of the notebook's model and of a 1B-parameter model, per format."""
    def total(parts):
        return sum(parts.values())

    return [{"format": name, f"{model_id} MiB": total(predicted[name]) / 2**20,
             "of which scales MiB": predicted[name]["scales"] / 2**20,
             "x smaller": total(predicted["16-bit"]) / total(predicted[name]),
             f"{big_id} GiB": total(big[name]) / 2**30, f"{big_id} x smaller": total(big["16-bit"]) / total(big[name])}
            for name in predicted]


def embedding_share(model) -> float:
    """The share of a model's parameters held by its input embeddings."""
    return model.get_input_embeddings().weight.numel() / sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- quality

def sample_text() -> str:
    """The text the workbook measures perplexity on (written for it, public domain, about 2,400 SmolLM2 tokens)."""
    return (Path(__file__).parent / "data" / "lighthouse_keepers.txt").read_text(encoding="utf-8")


def kl_divergence(reference_logits, logits) -> float:
    """Mean over positions of KL(P_reference || P), in nats (natural logarithms): how far a model's next-token
    distributions moved from the reference's. Takes logits or log-probabilities."""
    if reference_logits.shape != logits.shape:
        raise BadParameter(f"logits of shapes {tuple(reference_logits.shape)} and {tuple(logits.shape)} "
                           "cannot be compared.")
    log_p = torch.log_softmax(reference_logits.float(), dim=-1)
    return _kl_sum(log_p, torch.log_softmax(logits.float(), dim=-1)) / reference_logits.shape[0]


def _kl_sum(log_p, log_q) -> float:
    """Sum over positions of KL(P || Q) from log-probabilities, in float32, each position's sum in float64."""
    return float((log_p.exp() * (log_p - log_q)).sum(-1).double().sum())


def score(model, input_ids, *, reference: dict[str, Any] | None = None, window: int = 512) -> dict[str, Any]:
    """One pass over ``input_ids`` (1, N) in windows of ``window`` tokens: the perplexity, exp(mean negative
    log-likelihood of each token given the ones before it in its window); with ``reference`` (the 16-bit model's
    score) also the mean KL divergence from its next-token distributions, in nats. Without ``reference`` the
    log-probabilities are kept (as float32 on the CPU), so that this score can be the reference."""
    check_sizes(2, window=window)
    ids = input_ids.reshape(1, -1)
    nll, tokens, kl, kept = 0.0, 0, 0.0, []
    with torch.inference_mode():
        for start in range(0, ids.shape[1], window):
            chunk = ids[:, start:start + window].to(model.device)
            log_probs = torch.log_softmax(model(input_ids=chunk).logits[0].float(), dim=-1).cpu()
            if chunk.shape[1] >= 2:
                targets = chunk[0, 1:].cpu().unsqueeze(1)
                nll -= float(log_probs[:-1].gather(1, targets).double().sum())
                tokens += chunk.shape[1] - 1
            if reference is None:
                kept.append(log_probs)
            else:
                kl += _kl_sum(reference["log_probs"][start:start + chunk.shape[1]], log_probs)
    if tokens == 0:
        raise BadParameter("perplexity needs at least 2 tokens.")
    found = {"perplexity": math.exp(nll / tokens), "mean_nll": nll / tokens, "tokens": tokens}
    if reference is None:
        return {**found, "kl": 0.0, "log_probs": torch.cat(kept)}
    return {**found, "kl": kl / ids.shape[1]}


def perplexity(model, input_ids, *, window: int = 512) -> dict[str, float]:
    """Perplexity of ``input_ids`` (1, N) in consecutive windows (:func:`score` without the distributions)."""
    found = score(model, input_ids, window=window)
    return {k: found[k] for k in ("perplexity", "mean_nll", "tokens")}


def quality_rows(quality: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    base = quality["16-bit"]["perplexity"]
    return [{"format": name, "perplexity": q["perplexity"], "change": q["perplexity"] / base - 1,
             "KL vs 16-bit (nats)": q["kl"]} for name, q in quality.items()]


def quality_findings(quality: dict[str, dict[str, Any]]) -> dict[str, Any]:
    metrics = {}
    for name, q in quality.items():
        metrics[names.per_format("perplexity", name)] = q["perplexity"]
        metrics[names.per_format("kl_vs_16bit", name)] = q["kl"]
    return {"metrics": metrics,
            "checks": {"perplexities_finite": all(math.isfinite(q["perplexity"]) for q in quality.values())}}


def closest_to_16bit(quality: dict[str, dict[str, Any]]) -> str:
    """The format with the smallest measured KL divergence from the 16-bit model."""
    kl = {name: q["kl"] for name, q in quality.items() if name != "16-bit"}
    return min(kl, key=kl.get) if kl else ""


def default_cost_line(quality: dict[str, dict[str, Any]]) -> str:
    """What leaving ``bnb_4bit_quant_type`` out cost on this run: FP4 against NF4."""
    if "fp4" not in quality or "nf4" not in quality:
        return "FP4 and NF4 did not both run here, so the cost of the default is not measured on this machine."
    fp4, nf4 = quality["fp4"], quality["nf4"]
    return (f"FP4, the default when bnb_4bit_quant_type is left out, moved the distributions {fp4['kl']:.3f} nats "
            f"(perplexity {fp4['perplexity']:.1f}); NF4, at the same size, {nf4['kl']:.3f} nats "
            f"(perplexity {nf4['perplexity']:.1f}).")


# --------------------------------------------------------------------------- speed

def step_bytes(model) -> int:
    """Bytes one decode step reads from the weights: everything the model holds (:func:`count_footprint`), except
    that an input embedding not tied to the output layer contributes one row per token, as in
    :func:`labkit.roofline.weight_bytes_per_token`."""
    total = sum(count_footprint(model).values())
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings()
    if output is None or output.weight is not embedding:
        total += (embedding.shape[1] - embedding.numel()) * embedding.element_size()
    return total


def bound(model, row: dict[str, Any], bandwidth_bytes_per_s: float, dtype) -> dict[str, float]:
    """The bandwidth bound of a decode ``row`` (batch, prompt_tokens, new_tokens) for this format: its own bytes read
    per step (:func:`step_bytes`) and the KV cache at the run's middle length."""
    context = row["prompt_tokens"] + row["new_tokens"] // 2
    weights = step_bytes(model)
    cache = roofline.kv_cache_bytes(model.config, batch=row["batch"], context=context, dtype=dtype)
    tokens_per_s = roofline.decode_bound_tokens_per_s(bandwidth_bytes_per_s, weights, cache, batch=row["batch"])
    return {"bound_tokens_per_s": tokens_per_s, "bound_step_ms": 1e3 * row["batch"] / tokens_per_s,
            "step_bytes": weights + cache}


def prefill_ms(model, input_ids, *, warmup: int, repeats: int) -> float:
    """Median time of one forward pass over the prompt (only the last position's logits, as ``generate`` does)."""
    extra = {"logits_to_keep": 1} if compat.forward_keywords(model)["logits_to_keep"] else {}

    def call():
        with torch.inference_mode():
            return model(input_ids=input_ids, use_cache=True, **extra)

    return measure(call, device=str(input_ids.device), warmup=warmup, repeats=repeats).median_ms


class StepClock(StoppingCriteria):
    """A stopping criterion that never stops: ``generate`` calls it once at the end of every step, and it notes the
    time (after waiting for the device), so that one ``generate`` call times each of its decode steps."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.times = device, []

    def __call__(self, input_ids, scores, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_rate(model, input_ids, *, new_tokens: int) -> dict[str, Any]:
    """Greedy decode of exactly ``new_tokens`` tokens in one ``generate`` call, each step timed (:class:`StepClock`):
    the first step after the prefill is the warm-up, the others are the repeats; the median step gives tokens/s,
    with the p10-p90 spread of the steps."""
    clock = StepClock(str(model.device))
    ids = generation.generate_exactly(model, input_ids, new_tokens, stopping_criteria=StoppingCriteriaList([clock]))
    steps = [1e3 * (after - before) for before, after in zip(clock.times, clock.times[1:], strict=False)]
    steps = steps[1:] or steps
    if not steps:
        raise BadParameter(f"new_tokens={new_tokens}: decoding needs at least 2 new tokens to time a step.")
    step_ms = percentile(steps, 50)
    batch = input_ids.shape[0]
    return {"batch": batch, "prompt_tokens": input_ids.shape[1], "new_tokens": new_tokens, "step_ms": step_ms,
            "step_p10_ms": percentile(steps, 10), "step_p90_ms": percentile(steps, 90), "steps_timed": len(steps),
            "tokens_per_s": batch * 1e3 / step_ms, "token_ids": ids[:, input_ids.shape[1]:].tolist()}


def measure_speed(model, prompt_ids, *, batch_sizes: list[int], new_tokens: int, prefill_tokens: int, warmup: int,
                  repeats: int, bandwidth_bytes_per_s: float, dtype) -> dict[str, Any]:
    """Prefill time, and decode at each batch size (the prompt repeated) against this format's bandwidth bound. The
    batch-1 decode's tokens are the prompt's continuation."""
    prompt = generation.random_prompt(model, batch=1, length=prefill_tokens)
    found: dict[str, Any] = {"prefill_ms": prefill_ms(model, prompt, warmup=warmup, repeats=repeats), "decode": []}
    for batch in batch_sizes:
        row = decode_rate(model, prompt_ids.repeat(batch, 1), new_tokens=new_tokens)
        limit = bound(model, row, bandwidth_bytes_per_s, dtype)
        found["decode"].append({"batch": batch, "tokens_per_s": row["tokens_per_s"], "step_ms": row["step_ms"],
                                "step_p10_ms": row["step_p10_ms"], "step_p90_ms": row["step_p90_ms"], **limit,
                                "fraction_of_bound": row["tokens_per_s"] / limit["bound_tokens_per_s"]})
        if batch == batch_sizes[0]:
            found["token_ids"] = row["token_ids"][0]
    return found


def speed_rows(speed: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per format and batch: tokens/s, its bound, the fraction, and the gain over 16-bit at that batch."""
    base = {d["batch"]: d["tokens_per_s"] for d in speed["16-bit"]["decode"]}
    return [{"format": name, "batch": d["batch"], "tokens/s": d["tokens_per_s"],
             "x 16-bit": d["tokens_per_s"] / base[d["batch"]], "bound tokens/s": d["bound_tokens_per_s"],
             "fraction of bound": d["fraction_of_bound"], "prefill ms": s["prefill_ms"]}
            for name, s in speed.items() for d in s["decode"]]


def continuation_rows(speed: dict[str, dict[str, Any]], tokenizer) -> list[dict[str, str]]:
    """What each format wrote after the prompt: the batch-1 decode's tokens."""
    return [{"format": name, "continuation": tokenizer.decode(s["token_ids"], skip_special_tokens=True)}
            for name, s in speed.items()]


def speed_findings(speed: dict[str, dict[str, Any]], tokenizer) -> dict[str, Any]:
    metrics = {}
    for name, s in speed.items():
        metrics[names.per_format("prefill", name)] = s["prefill_ms"]
        for d in s["decode"]:
            metrics[names.decode(name, d["batch"], "tokens_per_s")] = d["tokens_per_s"]
            metrics[names.decode(name, d["batch"], "fraction_of_bound")] = d["fraction_of_bound"]
    texts = [row["continuation"] for row in continuation_rows(speed, tokenizer)]
    return {"metrics": metrics, "checks": {
        "every_format_produced_tokens": all(len(s["token_ids"]) > 0 and all(d["tokens_per_s"] > 0 for d in s["decode"])
                                            for s in speed.values()),
        "continuations_are_text": all(any(c.isalpha() for c in text) for text in texts)}}


def pace_line(speed: dict[str, dict[str, Any]], device: str) -> str:
    """The 16-bit batch-1 step against the time its bytes need: what sets the pace, before formats are compared."""
    d = speed["16-bit"]["decode"][0]
    ratio = d["step_ms"] / d["bound_step_ms"]
    said = (f"16-bit at batch {d['batch']}: a step took {d['step_ms']:.3g} ms where reading its bytes at this "
            f"machine's bandwidth needs {d['bound_step_ms']:.3g} ms ({ratio:.1f}x)")
    if ratio < 1.5:
        return f"{said}: close to the bound, so reading the weights sets the pace."
    if device.startswith("cuda") and ratio >= LAUNCH_BOUND:
        return (f"{said}: the step is launch-bound (the GPU waits while the CPU launches its many small kernels), so "
                "fewer weight bytes can shorten only the small part of the step spent reading them.")
    return (f"{said}: most of the step is not reading weights (it is the dispatch of every small op, and generate's "
            "own work), so fewer weight bytes can shorten only a part of it.")


def gain_lines(speed: dict[str, dict[str, Any]]) -> list[str]:
    """Per format: its batch-1 rate over 16-bit's, beside how much higher its bound is (what fewer bytes promised)."""
    first = {name: s["decode"][0] for name, s in speed.items()}
    base = first["16-bit"]
    return [f"{name}: {d['tokens_per_s'] / base['tokens_per_s']:.2f}x the 16-bit tokens/s at batch {d['batch']}; "
            f"its bound is {d['bound_tokens_per_s'] / base['bound_tokens_per_s']:.2f}x higher"
            for name, d in first.items() if name != "16-bit"]


def bnb_ops(model, device: str, batches: tuple[int, ...] = (1, 8)) -> list[dict[str, Any]]:
    """The bitsandbytes ops (and, on a GPU, the kernels) that one one-token forward pass runs at each batch size."""
    rows = []
    for batch in batches:
        ids = generation.random_prompt(model, batch=batch, length=1)
        with torch.inference_mode():
            seen = attention.ops_that_ran(lambda ids=ids: model(input_ids=ids), device)
        kernels = [k for k in seen.kernels if any(w in k.lower() for w in ("4bit", "gemv", "gemm", "dequant"))]
        rows.append({"batch": batch, "bitsandbytes ops": ", ".join(sorted({o for o in seen.ops
                                                                           if o.startswith("bitsandbytes::")})),
                     "GPU kernels": ", ".join(sorted(set(kernels))[:3]) or "-"})
    return rows


# --------------------------------------------------------------------------- where weight-only stops helping

def break_even_batch(flops_per_s: float, bytes_per_s: float, *, weight_bytes: float = 2.0) -> float:
    """By the roofline, the batch above which a weight-only quantized decode step is no faster than the one with
    ``weight_bytes``-byte weights: each sequence of the batch costs 2 FLOPs per weight, so the 16-bit step turns
    compute-bound (and fewer weight bytes stop mattering) at batch = FLOP/s x weight bytes / (2 x bytes/s)."""
    if not flops_per_s > 0 or not bytes_per_s > 0:
        raise BadParameter("a ceiling must be a positive number.")
    return flops_per_s * weight_bytes / (2 * bytes_per_s)


def roofline_step_s(batch: int, *, weights: int, weight_bytes: float, flops_per_s: float, bytes_per_s: float) -> float:
    """The roofline time of ``batch`` one-token rows through ``weights`` weights of ``weight_bytes`` bytes each."""
    return max(weights * weight_bytes / bytes_per_s, 2 * weights * batch / flops_per_s)


def roofline_speedup(batch: float, flops_per_s: float, bytes_per_s: float) -> float:
    """The roofline's speed-up of int4 weights (half a byte each) over 16-bit ones for a step of ``batch`` rows."""
    def step(weight_bytes):
        return roofline_step_s(batch, weights=1, weight_bytes=weight_bytes, flops_per_s=flops_per_s,
                               bytes_per_s=bytes_per_s)
    return step(2.0) / step(0.5)


def roofline_curve(flops_per_s: float, bytes_per_s: float, batches: list[int], points: int = 64) -> list[tuple]:
    """(batch, roofline speed-up) on a geometric grid over the batches of a sweep, for a figure."""
    low, high = math.log(min(batches)), math.log(max(batches))
    grid = [math.exp(low + (high - low) * i / (points - 1)) for i in range(points)]
    return [(b, roofline_speedup(b, flops_per_s, bytes_per_s)) for b in grid]


def layer_sweep(size: int, batches: list[int], *, device: str, dtype, group_size: int = INT4_GROUP_SIZE,
                warmup: int = 1, repeats: int = 3) -> list[dict[str, Any]]:
    """One ``size`` x ``size`` linear layer in 16-bit and in torchao int4 weight-only, timed with ``batch`` one-token
    rows at each batch size (the same inputs for both); each series rechecked against its trend."""
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(size, size, generator=generator) / size**0.5).to(device=device, dtype=dtype)
    layers = {"16-bit": torch.nn.Linear(size, size, bias=False, device=device, dtype=dtype)}
    layers["16-bit"].weight.data.copy_(weight)
    layers["torchao-int4"] = copy.deepcopy(layers["16-bit"])
    from torchao.quantization import quantize_

    with compat.quiet_logger("torchao"):
        quantize_(layers["torchao-int4"], torchao_config("torchao-int4", device, group_size=group_size))
    inputs = {b: torch.randn(b, size, generator=generator).to(device=device, dtype=dtype) for b in batches}

    def timed(point):
        layer, x = layers[point["format"]], inputs[point["batch"]]

        def call():
            with torch.inference_mode():
                return layer(x)
        t = measure(call, device=device, warmup=warmup, repeats=repeats)
        return {"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms}

    rows = []
    for name in layers:
        series = [{"format": name, "batch": b} for b in batches]
        series = [{**p, **timed(p)} for p in series]
        rows += recheck_trend(series, work="batch", remeasure=timed)
    return rows


def measured_break_even(rows: list[dict[str, Any]]) -> float | None:
    """The batch at which int4 weight-only stopped being faster than 16-bit in a :func:`layer_sweep` (noisy points
    left out): between the last batch where it was faster and the first where it was not, where the speed-up,
    interpolated on log scales, crosses 1; the first batch when int4 was never faster; None when it stayed faster."""
    times = {(r["format"], r["batch"]): r for r in rows}
    gains = []
    for batch in sorted({r["batch"] for r in rows}):
        a, b = times.get(("torchao-int4", batch)), times.get(("16-bit", batch))
        if a and b and not (a["noisy"] or b["noisy"]):
            gains.append((batch, b["median_ms"] / a["median_ms"]))
    for i, (batch, gain) in enumerate(gains):
        if gain <= 1.0:
            if i == 0:
                return float(batch)
            before, ahead = gains[i - 1]
            share = math.log(ahead) / (math.log(ahead) - math.log(gain))
            return float(before * (batch / before) ** share)
    return None


def break_even_findings(roofline_batch: float, measured: float | None) -> dict[str, Any]:
    metrics = {names.BREAK_EVEN_ROOFLINE: roofline_batch}
    if measured is not None:
        metrics[names.BREAK_EVEN_MEASURED] = measured
    return {"metrics": metrics}


def break_even_line(roofline_batch: float, measured: float | None, rows: list[dict[str, Any]]) -> str:
    """The roofline's break-even batch beside the measured one, and the int4 speed-up at the smallest batch."""
    first = rows[0]
    gain = f"At batch {first['batch']} int4 was {first['int4 speed-up']:.2f}x as fast as 16-bit"
    if measured is None:
        return (f"{gain}, and still faster at batch {rows[-1]['batch']}; the roofline puts the end of its gain at "
                f"batch {roofline_batch:.0f}.")
    return (f"{gain}; its gain ended at about batch {measured:.0f} (between the batches measured), where the roofline "
            f"says {roofline_batch:.0f}.")


def sweep_rows(rows: list[dict[str, Any]], *, flops_per_s: float, bytes_per_s: float) -> list[dict]:
    """The sweep by batch: both measured times, the int4 speed-up, and the speed-up the roofline allows."""
    times = {(r["format"], r["batch"]): r for r in rows}
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        sixteen, four = times[("16-bit", batch)], times[("torchao-int4", batch)]
        out.append({"batch": batch, "16-bit ms": sixteen["median_ms"], "int4 ms": four["median_ms"],
                    "int4 speed-up": sixteen["median_ms"] / four["median_ms"],
                    "roofline speed-up": roofline_speedup(batch, flops_per_s, bytes_per_s),
                    "noisy": "noisy" if sixteen["noisy"] or four["noisy"] else ""})
    return out


# --------------------------------------------------------------------------- the compiled one-token step

def compiled_decode(model, prompt_ids, *, new_tokens: int, device: str, bandwidth_bytes_per_s: float, dtype,
                    repeats: int) -> dict[str, Any]:
    """Batch-1 decode with notebook 02's hand loop (static cache), eager and with the one-token step compiled (CUDA
    graphs on a GPU), each against this format's bandwidth bound; the compile time is the first call's extra."""
    found: dict[str, Any] = {}
    for label, mode in (("eager", None), ("compiled", "reduce-overhead" if device.startswith("cuda") else "default")):
        loop = generation.GreedyLoop(model, batch=1, prompt_tokens=prompt_ids.shape[1], new_tokens=new_tokens,
                                     compile_mode=mode)
        with warnings.catch_warnings():  # torchao's tensors lack a hash for the compiler's cache: a note, not an error
            warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
            row = generation.measure_loop(loop, prompt_ids, warmup=1, repeats=repeats)
        limit = bound(model, row, bandwidth_bytes_per_s, dtype)
        found[label] = {"tokens_per_s": row["tokens_per_s"], "step_ms": row["step_ms"], **limit,
                        "fraction_of_bound": row["tokens_per_s"] / limit["bound_tokens_per_s"],
                        "first_call_extra_s": row["first_call_extra_s"], "tokens": len(row["token_ids"][0])}
    return found


def compiled_rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"format": name, "step": label, "tokens/s": r["tokens_per_s"], "step ms": r["step_ms"],
             "bound step ms": r["bound_step_ms"], "fraction of bound": r["fraction_of_bound"],
             "first call extra s": r["first_call_extra_s"]}
            for name, run in runs.items() for label, r in run.items()]


def compiled_findings(runs: dict[str, dict[str, Any]], model) -> dict[str, Any]:
    """The batch-1 step of each format, eager and compiled, as metrics (with the size of the model they ran)."""
    metrics = {names.step(label, name, what): r[key] for name, run in runs.items() for label, r in run.items()
               for what, key in (("fraction_of_bound", "fraction_of_bound"), ("tokens_per_s", "tokens_per_s"))}
    metrics[names.STEP_MODEL_BILLIONS] = sum(p.numel() for p in model.parameters()) / 1e9
    return {"metrics": metrics, "checks": {"compiled_steps_produced_tokens": all(
        r["tokens"] > 0 for run in runs.values() for r in run.values())}}


# --------------------------------------------------------------------------- summary

# what the notebook shows beside the reference runs (words: metric name)
REFERENCE_METRICS = {"NF4 footprint MiB": names.per_format("footprint", "nf4"),
                     "16-bit perplexity": names.per_format("perplexity", "16-bit"),
                     "NF4 perplexity": names.per_format("perplexity", "nf4"),
                     "FP4 KL vs 16-bit (nats)": names.per_format("kl_vs_16bit", "fp4"),
                     "NF4 KL vs 16-bit (nats)": names.per_format("kl_vs_16bit", "nf4"),
                     "16-bit batch-1 tokens/s": names.decode("16-bit", 1, "tokens_per_s"),
                     "NF4 batch-1 tokens/s": names.decode("nf4", 1, "tokens_per_s"),
                     "torchao int4 batch-1 tokens/s": names.decode("torchao-int4", 1, "tokens_per_s")}


def prediction_findings(predicted_big: dict[str, dict[str, int]]) -> dict[str, Any]:
    """How many times smaller NF4 makes a 1B-parameter model, predicted."""
    if "nf4" not in predicted_big:
        return {}
    ratio = sum(predicted_big["16-bit"].values()) / sum(predicted_big["nf4"].values())
    return {"metrics": {names.PREDICTED_1B_NF4_TIMES_SMALLER: ratio}}


def summary_rows(counted: dict[str, dict[str, int]], quality: dict[str, dict[str, Any]],
                 speed: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per format: footprint, how many times smaller, batch-1 decode against 16-bit and its bound,
    perplexity change."""
    base_size, base_ppl = sum(counted["16-bit"].values()), quality["16-bit"]["perplexity"]
    base_rate = speed["16-bit"]["decode"][0]["tokens_per_s"]
    rows = []
    for name, parts in counted.items():
        first = speed[name]["decode"][0]
        rows.append({"format": name, "library": library(name), "MiB": sum(parts.values()) / 2**20,
                     "x smaller": base_size / sum(parts.values()),
                     f"x 16-bit tokens/s (batch {first['batch']})": first["tokens_per_s"] / base_rate,
                     "fraction of bound": first["fraction_of_bound"],
                     "perplexity change": quality[name]["perplexity"] / base_ppl - 1})
    return rows


# --------------------------------------------------------------------------- what you measured

def _mib(m: dict[str, float], name: str) -> float | None:
    return m.get(names.per_format("footprint", name))


def what_you_measured(results: dict[str, Any]) -> list[str]:
    """Notebook 04's results in a few sentences (each only when its part ran)."""
    m, lines = results["metrics"], []
    sizes = {f: _mib(m, f) for f in ALL_FORMATS if _mib(m, f)}
    if len(sizes) > 1:
        shown = ", ".join(f"{f} {v:.0f} MiB ({sizes['16-bit'] / v:.2f}x smaller)" for f, v in sizes.items()
                          if f != "16-bit")
        lines.append(f"Footprints counted from the tensors, against {sizes['16-bit']:.0f} MiB in 16-bit: {shown}.")
    kl = {f: m[names.per_format("kl_vs_16bit", f)] for f in ALL_FORMATS[1:] if names.per_format("kl_vs_16bit", f) in m}
    if kl:
        closest = min(kl, key=kl.get)
        page = (f" FP4, what BitsAndBytesConfig(load_in_4bit=True) gives by default, moved {kl['fp4']:.3f} nats "
                f"against NF4's {kl['nf4']:.3f}." if "fp4" in kl and "nf4" in kl else "")
        lines.append(f"Closest to the 16-bit model's next-token distributions: {closest} (KL {kl[closest]:.3g} "
                     f"nats).{page}")
    base = m.get(names.decode("16-bit", 1, "tokens_per_s"))
    gains = {f: m[names.decode(f, 1, "tokens_per_s")] / base for f in ALL_FORMATS[1:]
             if base and names.decode(f, 1, "tokens_per_s") in m}
    if gains:
        faster = [f for f, g in gains.items() if g > 1.05]
        shown = ", ".join(f"{f} {g:.2f}x" for f, g in gains.items())
        lines.append(f"Batch-1 decode against 16-bit here: {shown}; "
                     + (f"faster: {', '.join(faster)}." if faster else "none was faster: these formats saved memory, "
                        "not time, on this machine."))
    roof, seen = m.get(names.BREAK_EVEN_ROOFLINE), m.get(names.BREAK_EVEN_MEASURED)
    if roof:
        measured = (f"; one layer measured here stopped gaining at batch {seen:.0f}" if seen
                    else "; one layer measured here was still faster with int4 at the largest batch tried")
        lines.append(f"By this machine's roofline, int4 weight-only stops making a decode step faster from about "
                     f"batch {roof:.0f}{measured}.")
    compiled = {f: m[names.step("compiled", f, "fraction_of_bound")] for f in ALL_FORMATS
                if names.step("compiled", f, "fraction_of_bound") in m}
    if compiled:
        shown = ", ".join(f"{f} {100 * v:.0f}%" for f, v in compiled.items())
        size = m.get(names.STEP_MODEL_BILLIONS, 0.0)
        lines.append(f"With the one-token step compiled, batch-1 decode of a {size:.2g}-billion-parameter model "
                     f"reached these fractions of each format's own bandwidth bound: {shown}.")
    return lines or ["No format ran on this machine: the 'Skipped:' lines above say why."]
