"""Notebook 04's topic: what of 4-bit and 8-bit weights is too long for a cell. Which formats this machine runs, their
configs (bitsandbytes, torchao) and a quantized copy of a model, the bytes of one real quantized layer, perplexity and
KL divergence against 16-bit in one pass, and the bytes a decode step reads. The measurements (decode against each
format's bandwidth bound, the weight-only sweep, the compiled step) are in the notebook's cells.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from labkit import compat, footprint, models, outputs, probes
from labkit.errors import BadParameter, ModelNotAvailable, check_sizes
from labkit.footprint import INT4_GROUP_SIZE, count_footprint

# name -> BitsAndBytesConfig keyword arguments (None: the 16-bit model itself)
FORMATS: dict[str, dict[str, Any] | None] = {
    "16-bit": None,
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "nf4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}
FP8_CAPABILITY = (8, 9)  # float8 matrix units: Ada and Hopper (8.9, 9.0) and newer
INT4_CAPABILITY = (8, 0)  # torchao's tinygemm int4 layout, in bfloat16: Ampere and newer


# --------------------------------------------------------------------------- the plan

@dataclass
class Parameters:
    """Notebook 04's parameters (the parameters cell's names and defaults), checked and sized for this machine by
    :meth:`resolve`; the formats this machine cannot run are left out of ``formats`` and kept in ``skipped``, each with
    its reason."""

    compute_dtype: Any = "auto"
    model_id: str = "smollm2-135m"
    formats: list = field(default_factory=lambda: list(footprint.ALL_FORMATS))
    prompt: str = "Hello my dog is cute and"
    eval_tokens: int = 0  # tokens of the shipped text scored for perplexity (0: sized for the machine)
    batch_sizes: list = field(default_factory=lambda: [1, 8])
    new_tokens: int = 0  # tokens generated per decode measurement (0: sized for the machine)
    dtype: Any = field(init=False, default=None)
    skipped: dict = field(init=False, default_factory=dict)  # what this machine cannot run: why
    bnb_formats: list = field(init=False, default_factory=list)
    torchao_formats: list = field(init=False, default_factory=list)
    prefill_tokens: int = field(init=False, default=0)  # the prompt of the prefill timing
    warmup: int = field(init=False, default=1)
    repeats: int = field(init=False, default=1)
    sweep_batches: list = field(init=False, default_factory=list)  # the weight-only sweep's batches ...
    layer_size: int = field(init=False, default=0)  # ... through one square layer of this size
    compile_problem: str = field(init=False, default="")  # why the compiled one-token step is not measured here
    speed_model_id: str = field(init=False, default="")  # the model of the compiled one-token step

    def resolve(self, *, device: str, quick: bool) -> str:
        if isinstance(self.formats, str) or not self.formats:
            raise BadParameter(f"formats={self.formats!r}: give a list, for example ['16-bit', 'nf4', 'torchao-int4'].")
        # 16-bit is the reference
        wanted = [footprint.check_format(f) for f in dict.fromkeys(["16-bit", *self.formats])]
        check_sizes(0, eval_tokens=self.eval_tokens, new_tokens=self.new_tokens)
        if isinstance(self.batch_sizes, (str, int)) or not self.batch_sizes:
            raise BadParameter(f"batch_sizes={self.batch_sizes!r}: give a list of batch sizes, for example [1, 8].")
        check_sizes(1, **{f"batch_sizes[{i}]": b for i, b in enumerate(self.batch_sizes)})
        if self.new_tokens == 1:
            raise BadParameter("new_tokens=1: decoding needs at least 2 new tokens to time a step.")
        # bitsandbytes' log lines (its CPU backend on optional kernels; LLM.int8 on casting bfloat16 inputs to
        # float16, at every matrix product) kept to errors for the rest of the notebook
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        on_gpu = device.startswith("cuda")
        if self.compute_dtype == "auto":  # bfloat16 where it is native (and on a CPU), float16 on an older GPU
            self.compute_dtype = "bfloat16" if not on_gpu or probes.native_bf16(device) else "float16"
        self.dtype = probes.resolve_dtype(self.compute_dtype, device)
        probes.check_dtype(device, self.dtype)
        problem = models.check_model(self.model_id)  # a wrong name stops here
        if problem:  # every section measures this model: without it there is nothing to do
            raise ModelNotAvailable(problem)
        self.skipped, dropped = unavailable_formats(wanted, device, self.dtype)
        four_bit = [f for f in wanted if (FORMATS.get(f) or {}).get("load_in_4bit") and f not in dropped]
        narrow = bnb_cpu_packing_problem(self.model_id, device) if four_bit else ""
        if narrow:  # LLM.int8 has no such kernel and still runs
            self.skipped[f"the bitsandbytes 4-bit formats ({', '.join(four_bit)})"] = narrow
            dropped |= set(four_bit)
        self.formats = [f for f in wanted if f not in dropped]
        self.bnb_formats = [f for f in self.formats if footprint.library(f) == "bitsandbytes"]
        self.torchao_formats = [f for f in self.formats if footprint.library(f) == "torchao"]
        # sizes: tokens scored, tokens generated, the prefill's prompt, timing repeats, the weight-only sweep
        if on_gpu:  # the whole shipped text (about 2,400 tokens); a 8192 x 8192 layer is read in tens of microseconds
            sizes = (4096, 32, 128, 2, [1, 4, 16, 64, 256, 1024], 8192)
        elif quick:
            sizes = (64, 6, 32, 1, [1, 4, 16, 64], 4096)  # small: a CPU without bfloat16 instructions runs it slowly
        else:
            sizes = (512, 16, 128, 2, [1, 4, 16, 64, 256], 4096)
        self.eval_tokens, self.new_tokens = self.eval_tokens or sizes[0], self.new_tokens or sizes[1]
        self.prefill_tokens, self.repeats, self.sweep_batches, self.layer_size = sizes[2:]
        self.batch_sizes = sorted(set(self.batch_sizes))
        if quick and not on_gpu:
            self.compile_problem = ("quick sizes on a CPU: compiling the one-token step (torch.compile) costs more "
                                    "time than this quick run has; run with quick=False to measure it")
        self.speed_model_id = "random-llama-1b" if on_gpu else self.model_id
        versions = ", ".join(f"{p} {probes.package_version(p) or 'missing'}" for p in ("bitsandbytes", "torchao"))
        return f"{versions}; formats: {', '.join(self.formats)}."


def bnb_cpu_packing_problem(model_id: str, device: str) -> str:
    """Why bitsandbytes' 4-bit layers would fail on this CPU with this model ('' when they would not). On a CPU with
    AVX512-BF16, bitsandbytes 0.50 repacks each 4-bit weight at its first forward pass in blocks of 32 output
    features and asserts that they divide (``_convert_weight_packed_for_cpu`` in its ``functional.py``, called from
    ``Linear4bit.forward``): a tiny model's 16-wide key/value projection fails there. Real models' layers divide."""
    if device != "cpu" or importlib.util.find_spec("bitsandbytes") is None:
        return ""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        return ""
    empty = models.empty_model(model_id)  # its shapes, on the meta device
    narrow = sorted({m.out_features for m in empty.modules() if isinstance(m, torch.nn.Linear)
                     and m is not empty.get_output_embeddings() and m.out_features % 32})
    return (f"bitsandbytes' 4-bit kernel for this CPU (AVX512-BF16) needs each layer's outputs in multiples of 32, "
            f"and {model_id} has layers of {', '.join(map(str, narrow))}") if narrow else ""


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


def fp8_problem(device: str) -> str:
    """Why float8 matrix products cannot run on ``device`` ('' when they can): they need compute capability 8.9."""
    capability = torch.cuda.get_device_capability(torch.device(device)) if device.startswith("cuda") else None
    if capability is not None and capability >= FP8_CAPABILITY:
        return ""
    where = f"compute capability {capability[0]}.{capability[1]}" if capability else "a CPU"
    return (f"float8 matrix products need a GPU with float8 matrix units (compute capability 8.9 or newer, such as "
            f"an L4, RTX 4090 or H100); this run is on {where}")


def unavailable_formats(formats: list[str], device: str, dtype) -> tuple[dict[str, str], set[str]]:
    """The formats of ``formats`` this machine cannot run: ({what is skipped: why}, the format names)."""
    skipped: dict[str, str] = {}
    dropped: set[str] = set()
    bnb = [f for f in formats if footprint.library(f) == "bitsandbytes"]
    if bnb:
        probe = probes.bitsandbytes_4bit([device])  # a real 4-bit matrix product on this device, not just an import
        if not all(r["ok"] for r in probe):
            skipped[f"the bitsandbytes formats ({', '.join(bnb)})"] = \
                f"bitsandbytes cannot run 4-bit on {device}: {probe[0]['reason']}"
            dropped.update(bnb)
    ao = [f for f in formats if footprint.library(f) == "torchao"]
    why = torchao_problem() if ao else ""
    if why:
        skipped[f"the torchao formats ({', '.join(ao)}), quantization for speed"] = why
        return skipped, dropped | set(ao)
    capability = torch.cuda.get_device_capability(torch.device(device)) if device.startswith("cuda") else None
    if "torchao-int4" in ao and capability is not None and (capability < INT4_CAPABILITY or dtype != torch.bfloat16):
        skipped["torchao-int4"] = (f"torchao's int4 GPU layout (tinygemm) needs compute capability 8.0 and bfloat16; "
                                   f"this is {capability[0]}.{capability[1]} in {str(dtype).removeprefix('torch.')}")
        dropped.add("torchao-int4")
    if "torchao-float8" in ao and (fp8_problem(device) or dtype != torch.bfloat16):
        skipped["torchao-float8"] = fp8_problem(device) or (  # torchao 0.18 asserts it (quant_api.py)
            f"torchao's per-row float8 takes bfloat16 weights only; this is {capability[0]}.{capability[1]} in "
            f"{str(dtype).removeprefix('torch.')}")
        dropped.add("torchao-float8")
    return skipped, dropped


# --------------------------------------------------------------------------- configs and quantized models

def quantization_config(name: str, compute_dtype: Any = "bfloat16"):
    """The ``BitsAndBytesConfig`` for a bitsandbytes format (None for 16-bit); ``compute_dtype`` is what 4-bit
    weights are dequantized to for each matrix product."""
    kwargs = FORMATS.get(footprint.check_format(name), ...)
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
    footprint.check_format(name)
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
    raise BadParameter(f"format {name!r} is not a torchao format; use one of "
                       f"{', '.join(footprint.TORCHAO_FORMATS)}.")


def torchao_quantized(model, name: str, device: str, *, group_size: int = INT4_GROUP_SIZE):
    """A copy of ``model`` (a model or one linear layer) quantized in format ``name`` with torchao's ``quantize_``
    (the 16-bit model is kept)."""
    from torchao.quantization import quantize_

    quantized = copy.deepcopy(model)
    # every linear layer but the output, as transformers does
    output = quantized.get_output_embeddings() if hasattr(quantized, "get_output_embeddings") else None
    with compat.quiet_logger("torchao"):
        quantize_(quantized, torchao_config(name, device, group_size=group_size),
                  filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and module is not output)
    return quantized


# --------------------------------------------------------------------------- footprints: predicted, then counted


def layer_footprint_mib(name: str, rows: int, cols: int, *, device: str = "cpu", dtype=torch.bfloat16,
                        group_size: int = INT4_GROUP_SIZE) -> float:
    """A real ``rows`` x ``cols`` layer quantized in format ``name`` by its library, its bytes counted (MiB)."""
    layer = torch.nn.Linear(cols, rows, bias=False, device=device, dtype=dtype)
    if footprint.library(name) == "bitsandbytes":
        import bitsandbytes.functional as bnbf  # optional (the quant extra): only when a bitsandbytes format runs

        packed, state = bnbf.quantize_4bit(layer.weight.data, blocksize=footprint.BLOCKSIZE,
                                           quant_type=name.split("-")[0],
                                           compress_statistics=name == "nf4-double")
        holder = torch.nn.Parameter(packed, requires_grad=False)
        holder.quant_state = state
        parts = count_footprint(torch.nn.ParameterList([holder]))
    else:
        parts = count_footprint(torchao_quantized(layer, name, device, group_size=group_size))
    return sum(parts.values()) / 2**20


# --------------------------------------------------------------------------- quality

def sample_text() -> str:
    """The text the workbook measures perplexity on (written for it, public domain, about 2,400 SmolLM2 tokens)."""
    return (Path(__file__).parent / "data" / "lighthouse_keepers.txt").read_text(encoding="utf-8")


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
                kl += outputs.kl_sum(reference["log_probs"][start:start + chunk.shape[1]], log_probs)
    if tokens == 0:
        raise BadParameter("perplexity needs at least 2 tokens.")
    found = {"perplexity": math.exp(nll / tokens), "mean_nll": nll / tokens, "tokens": tokens}
    if reference is None:
        return {**found, "kl": 0.0, "log_probs": torch.cat(kept)}
    return {**found, "kl": kl / ids.shape[1]}


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


# what the notebook shows beside the reference runs (words: metric name, as the notebook records it)
REFERENCE_METRICS = {"NF4 footprint MiB": "footprint_nf4_mib", "16-bit perplexity": "perplexity_16_bit",
                     "NF4 perplexity": "perplexity_nf4", "FP4 KL vs 16-bit (nats)": "kl_vs_16bit_fp4",
                     "NF4 KL vs 16-bit (nats)": "kl_vs_16bit_nf4",
                     "16-bit batch-1 tokens/s": "decode_16_bit_batch1_tokens_per_s",
                     "NF4 batch-1 tokens/s": "decode_nf4_batch1_tokens_per_s",
                     "torchao int4 batch-1 tokens/s": "decode_torchao_int4_batch1_tokens_per_s"}
