"""Notebook 05's topic, inference on several devices: the mechanisms too long for a cell.

- the notebook's typed :class:`Parameters`;
- machines typed in ("2 nodes x 8 x 80 GB") and the GPUs present; the memory a model needs (weights in a format, KV
  cache), on the meta device; the layout planner (TP inside a node dividing the key/value heads, PP across nodes);
- ``device_map="auto"`` planned without a GPU (accelerate's own planning) and each block's device and bytes;
- the torchrun launcher (one machine, or nodes rehearsed on one machine over a c10d rendezvous), the models the jobs
  load (saved once before any job starts), and what a job needs of labkit (its device, writing its result).
The jobs themselves are scripts (``notebooks/scripts/``), never run inside a Jupyter kernel; the notebook builds its
tables from the results they write.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import infer_auto_device_map
from accelerate.utils import CustomDtype, get_balanced_memory
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

from labkit import compat, models, probes, quant, roofline
from labkit.errors import BadParameter, LabkitError, ModelNotAvailable, check_sizes
from labkit.paths import cache_dir
from labkit.timing import measure

GIB = 2**30
# Share of each device's memory a plan may fill. The rest is a planning margin (our choice, not a measurement)
# for the CUDA context, activations and allocator fragmentation.
USABLE_FRACTION = 0.9

# Architecture shapes of public models, as configs only (meta device: nothing is downloaded or allocated).
# Numbers from the models' published config.json files (Llama 3.1 8B, 70B and 405B).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-8b-shape": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-70b-shape": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                            num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-405b-shape": dict(vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                             num_attention_heads=128, num_key_value_heads=8, tie_word_embeddings=False),
}

# Random-init models the layouts run besides the learner's model (built from a config, saved once in labkit's
# cache, no download). "layers-llama" is shaped so that its layers, not Python, take a decode step's time on a
# CPU (4 layers of width 512, a 512-token vocabulary): the pipeline's bubble shows. "tiny-moe" is a Qwen3-MoE
# mixture of experts: 4 experts per layer, 2 chosen per token.
LAYOUT_MODELS = ("layers-llama", "tiny-moe")


class LaunchFailed(LabkitError, RuntimeError):
    """A torchrun job exited with an error; the message ends with the job's last lines of output."""


# --------------------------------------------------------------------------- the notebook's parameters

@dataclass
class Parameters:
    """Notebook 05's parameters (the parameters cell's names and defaults), checked and sized for this machine by
    :meth:`resolve`. The job model and the layout models are saved in labkit's cache here, before any torchrun job
    starts (the jobs only read them)."""

    model_id: str = ""  # the model of the TP, DP and TP x PP jobs; empty: tiny-llama (CPU) or random-llama-1b (GPUs)
    plan_model: str = "llama-70b-shape"
    plan_devices: list = field(default_factory=lambda: ["1 x 24 GB", "2 x 24 GB", "8 x 80 GB", "2 nodes x 8 x 80 GB"])
    plan_formats: list = field(default_factory=lambda: ["16-bit", "nf4"])
    batch: int = 1
    context: int = 4096
    processes: list = field(default_factory=list)
    new_tokens: int = 0
    dp_prompts: int = 0
    allreduce_max_mib: int = 0
    dtype: Any = field(init=False, default=None)  # the jobs' dtype, as torch's (float32 on CPU processes)
    job_dtype: str = field(init=False, default="")
    gpus: list = field(init=False, default_factory=list)  # this machine's GPUs, with their memory
    jobs_on_gpus: bool = field(init=False, default=False)  # NCCL between GPUs; else CPU processes over gloo
    machines: dict = field(init=False, default_factory=dict)  # plan_devices parsed: text -> machine
    formats: list = field(init=False, default_factory=list)
    pipeline_model: str = field(init=False, default="")  # the model device_map places on real GPUs
    gpu_dtype: str = field(init=False, default="")
    repeats: int = field(init=False, default=2)
    scripts: Path = field(init=False, default=Path("scripts"))

    def resolve(self, *, device: str, quick: bool) -> str:
        for name in ("plan_devices", "plan_formats", "processes"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                raise BadParameter(f"{name}={value!r}: give a list, for example {name}=[{value!r}].")
        if not self.plan_devices:
            raise BadParameter("plan_devices=[]: give at least one machine, for example ['2 x 24 GB'].")
        self.machines = {text: parse_machine(text) for text in self.plan_devices}
        self.formats = [quant.check_format(f) for f in self.plan_formats] or ["16-bit"]
        check_sizes(1, batch=self.batch, context=self.context,
                    **{f"processes[{i}]": n for i, n in enumerate(self.processes)})
        check_sizes(0, new_tokens=self.new_tokens, dp_prompts=self.dp_prompts,
                    allreduce_max_mib=self.allreduce_max_mib)
        if self.new_tokens == 1:
            raise BadParameter("new_tokens=1: decoding needs at least 2 new tokens to time a step.")
        self.gpus = devices_present()
        self.jobs_on_gpus = on_gpus = len(self.gpus) >= 2
        most = len(self.gpus) if on_gpus else max(2, os.cpu_count() or 1)
        self.processes = sorted(set(self.processes or ([n for n in (2, 4, 8) if n <= most] if on_gpus else [2])))
        if self.processes[0] < 2 or self.processes[-1] > most:
            raise BadParameter(f"processes={self.processes}: each layout splits a model over at least 2 processes, "
                               f"and at most {most} here ({'GPUs' if on_gpus else 'CPU cores'}).")
        # device_map placement needs a model bigger than the share of a GPU it is given: the 1B model unless named
        given, self.model_id = bool(self.model_id), self.model_id or ("random-llama-1b" if on_gpus else "tiny-llama")
        self.pipeline_model = self.model_id if given or on_gpus else "random-llama-1b"
        for name in (self.model_id, self.plan_model):
            problem = None if name in SHAPES else models.check_model(name)
            if problem:
                raise ModelNotAvailable(problem)
        check_job_model(self.model_id, model_config(self.model_id))
        self.job_dtype = "bfloat16" if on_gpus else "float32"
        for name in (self.model_id, *LAYOUT_MODELS):  # what the torchrun jobs load, saved once before any starts
            model_folder(name, self.job_dtype)
        self.dtype = probes.resolve_dtype(self.job_dtype, device)
        self.gpu_dtype = "bfloat16" if self.gpus and probes.native_bf16("cuda:0") else "float16"
        self.new_tokens = self.new_tokens or (32 if on_gpus else 6 if quick else 16)
        self.dp_prompts = self.dp_prompts or (8 * max(self.processes) if on_gpus else 4 if quick else 8)
        self.allreduce_max_mib = self.allreduce_max_mib or (256 if on_gpus else 1 if quick else 64)
        self.repeats = 2 if quick else 3
        self.scripts = Path("scripts") if Path("scripts/layouts.py").exists() else scripts_dir()
        where = "the GPUs, over NCCL" if on_gpus else "CPU processes, over gloo"
        return (f"GPUs here: {describe_devices(self.gpus)}. The torchrun jobs run {self.model_id} ({self.job_dtype}) "
                f"on {where}, with {self.processes} processes.")


# --------------------------------------------------------------------------- devices and machines, real or typed in

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(g|gb|gib|m|mb|mib|t|tb|tib)\s*$", re.IGNORECASE)
_UNITS = {"g": GIB, "m": 2**20, "t": 2**40}
_NODES = re.compile(r"^\s*(\d+)\s*nodes?\s*[x×*]\s*(.+)$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in "24 GB", "80GiB" or "512 MB". As GPU makers use them, GB here are GiB (2**30 bytes)."""
    match = _SIZE.match(str(text))
    if not match:
        raise BadParameter(f"{text!r} is not a memory size; write it like '24 GB' or '80GiB'.")
    return int(float(match.group(1)) * _UNITS[match.group(2)[0].lower()])


def parse_devices(text: str) -> list[dict[str, Any]]:
    """Devices typed by a learner: "2 x 24 GB", "8x80GB", "24 GB + 12 GB"; "present" (or "") for this machine's GPUs.

    Returns ``[{"name": "gpu0", "bytes": ...}, ...]``.
    """
    if str(text).strip().lower() in ("", "present"):
        return devices_present()
    example = "write devices like '2 x 24 GB', '8 x 80 GB', '24 GB + 12 GB' or '2 nodes x 8 x 80 GB'"
    out: list[dict[str, Any]] = []
    for part in re.split(r"[+,]", str(text)):
        match = re.match(r"^\s*(?:(\d+)\s*[x×*]\s*)?(.+)$", part, re.IGNORECASE)
        count = int(match.group(1) or 1) if match else 0
        try:
            size_bytes = parse_size(match.group(2)) if match else 0
        except BadParameter:
            size_bytes = 0
        if count < 1 or size_bytes <= 0:
            raise BadParameter(f"devices={text!r}: {example}.")
        first = len(out)
        out.extend({"name": f"gpu{first + i}", "bytes": size_bytes} for i in range(count))
    return out


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
    if not devices:
        return "no GPU"
    groups: dict[float, int] = {}
    for device in devices:
        size = round(device["bytes"] / GIB, 1)
        groups[size] = groups.get(size, 0) + 1
    return " + ".join(f"{n} x {size:g} GiB" for size, n in groups.items())


# --------------------------------------------------------------------------- memory: weights + KV cache

def model_config(name: str):
    """The config of ``name``: a shape of :data:`SHAPES`, a labkit random-init model, a local folder or a cached hub
    id."""

    if name in SHAPES:
        return LlamaConfig(**SHAPES[name])
    if name in models.EMBEDDED and models.EMBEDDED[name].kind == "random":
        tokenizer = models.load_tokenizer(name)
        special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id}
        return models.random_config(name, len(tokenizer), special)
    problem = models.check_model(name)
    if problem:
        raise ModelNotAvailable(problem)
    with models._quiet_transformers():
        return AutoConfig.from_pretrained(str(models._resolve_folder(name)))


@functools.lru_cache(maxsize=8)
def empty_model(name: str):
    """A causal LM with the architecture of ``name`` on the meta device: its shapes, without memory (kept for reuse:
    read it, do not change it)."""

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config(name), dtype=torch.bfloat16)


def memory_needed(model, *, fmt: str = "16-bit", batch: int = 1, context: int = 4096,
                  element_bytes: int = 2) -> dict[str, int]:
    """Bytes to serve ``model``: its weights stored in format ``fmt`` (labkit.quant's prediction: what is not
    quantized keeps the model's own dtype, so build a plan's model in 16-bit) and the KV cache of ``batch`` sequences
    of ``context`` tokens with ``element_bytes`` per number (2: 16-bit). Activations are small beside these at decode
    time and are left to the planning margin."""

    check_sizes(1, batch=batch, context=context)
    if element_bytes not in (1, 2, 4):
        raise BadParameter(f"element_bytes={element_bytes!r}: use 1, 2 (16-bit) or 4 (float32).")
    weights = sum(quant.predict_footprint(model, fmt).values())
    kv = roofline.kv_cache_bytes(model.config, batch=batch, context=context,
                                 dtype={1: "int8", 2: "float16", 4: "float32"}[element_bytes])
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def cache_bytes(output) -> int:
    """Bytes of the keys and values held in the cache a forward pass returned (``model(..., use_cache=True)``); a
    pipeline stage's cache holds only its own layers."""
    cache = compat.output_cache(output)
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def devices_needed(total_bytes: int, device_bytes: int, *, usable: float = USABLE_FRACTION) -> int:
    """The fewest devices of ``device_bytes`` that hold ``total_bytes``, filling each to ``usable``."""
    return max(1, math.ceil(total_bytes / (device_bytes * usable)))


def fit(need: dict[str, int], devices: list[dict[str, Any]], *, usable: float = USABLE_FRACTION) -> dict[str, Any]:
    """Does ``need`` (from :func:`memory_needed`) fit on one of ``devices``, and on all of them together?"""
    if not devices:
        return {"one_device": False, "all_devices": False, "devices_needed": None,
                "share_per_device": None}
    smallest = min(d["bytes"] for d in devices)
    total = sum(d["bytes"] for d in devices)
    return {"one_device": need["total"] <= max(d["bytes"] for d in devices) * usable,
            "all_devices": need["total"] <= total * usable,
            "devices_needed": devices_needed(need["total"], smallest, usable=usable),
            "share_per_device": need["total"] / len(devices) / smallest}


# --------------------------------------------------------------------------- the layout planner

def plan_layout(model, machine: dict[str, Any], *, fmt: str = "16-bit", batch: int = 1, context: int = 4096,
                usable: float = USABLE_FRACTION) -> dict[str, Any]:
    """The layout for ``model`` on ``machine`` (from :func:`parse_machine`): tensor-parallel size, pipeline stages,
    replicas, and the reasons.

    The rule people deploy with: one GPU if it holds the model; else the smallest tensor-parallel size that divides
    the key/value heads (each rank holds whole heads), stays inside a node (TP's all-reduces at every layer need
    the fast links within a node) and holds the model; if no TP size inside a node does, TP over the whole node
    and as few pipeline stages as hold the model (one stage per node, or more). Memory is shared evenly between
    the GPUs of a replica (an approximation: the embeddings and output layer sit on the first and last stages).
    The GPUs left over serve more replicas (data parallelism).
    """
    need = memory_needed(model, fmt=fmt, batch=batch, context=context)
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    gpu = min(d["bytes"] for d in machine["devices"]) * usable
    per_node, total = machine["per_node"], len(machine["devices"])
    reasons = [f"{fmt} needs {need['total'] / GIB:,.1f} GiB (weights {need['weights'] / GIB:,.1f} + KV cache "
               f"{need['kv_cache'] / GIB:,.2f}); one GPU holds {gpu / GIB:,.1f} GiB at {usable:.0%}."]
    valid = [t for t in range(1, per_node + 1) if kv_heads % t == 0 and heads % t == 0]
    if need["total"] <= gpu:
        tp, pp = 1, 1
        reasons.append("One GPU holds it: no split.")
    else:
        holding = [t for t in valid if need["total"] / t <= gpu]
        if holding:
            tp, pp = holding[0], 1
            skipped = [t for t in range(1, tp) if t not in valid]
            reasons.append(f"TP {tp}: the smallest size that holds it and divides the {kv_heads} key/value heads"
                           + (f" ({', '.join(map(str, skipped))} would not)" if skipped else "")
                           + f", inside a node of {per_node}.")
        else:
            tp = valid[-1]
            pp = math.ceil(need["total"] / (tp * gpu))
            reasons.append(f"No TP size inside a node of {per_node} holds it: TP {tp} (a divisor of the {kv_heads} "
                           f"key/value heads) and {pp} pipeline stage{'s' * (pp > 1)}, which pass one hidden state "
                           "per step between them.")
    gpus_used = tp * pp
    fits = gpus_used <= total and pp <= config.num_hidden_layers
    if not fits:
        reasons.append(f"That is {gpus_used} GPUs and the machine has {total}: it does not fit in {fmt}.")
    replicas = total // gpus_used if fits else 0
    if fits and replicas > 1:
        reasons.append(f"{replicas} copies over the {total} GPUs (data parallelism).")
    return {"fmt": fmt, "tp": tp, "pp": pp, "gpus_per_replica": gpus_used, "replicas": replicas, "fits": fits,
            "per_gpu_bytes": need["total"] / gpus_used, "need": need, "reasons": reasons}


# --------------------------------------------------------------------------- placement: device maps

def _planning_dtypes(model, fmt: str):
    """accelerate's size arguments for a format: linear weights in ``fmt``, everything else 16-bit."""


    quant.check_format(fmt)
    if fmt == "16-bit":
        return torch.bfloat16, {}
    low = torch.int8 if fmt in ("int8", "torchao-int8", "torchao-float8") else CustomDtype.INT4
    quantized = {id(m) for m in quant.quantized_linears(model)}  # the output layer stays 16-bit
    linear = {f"{name}.weight" for name, m in model.named_modules() if id(m) in quantized}
    special = {name: torch.bfloat16 for name, _ in model.named_parameters() if name not in linear}
    return low, special


def plan_device_map(model, devices: list[dict[str, Any]], *, fmt: str = "16-bit", cpu_bytes: int | None = None,
                    usable: float = USABLE_FRACTION, strategy: str = "auto") -> dict[str, int | str]:
    """Where ``from_pretrained(device_map=strategy)`` would put each block of ``model`` on ``devices`` (no GPU needed).

    "auto" (the same as "balanced") first shares the model out evenly between the GPUs, as transformers does;
    "sequential" fills GPU 0, then GPU 1, ... What does not fit on the GPUs goes to "cpu" (``cpu_bytes``, default:
    unlimited) and then "disk". Decoder layers are never split.
    """

    if strategy not in ("auto", "balanced", "sequential"):
        raise BadParameter(f"strategy={strategy!r}: use 'auto', 'balanced' or 'sequential'.")
    dtype, special = _planning_dtypes(model, fmt)
    no_split = list(model._no_split_modules or [])
    max_memory: dict[int | str, int] = {i: int(d["bytes"] * usable) for i, d in enumerate(devices)}
    max_memory["cpu"] = cpu_bytes if cpu_bytes is not None else 2**62
    # accelerate warns that typed-in devices are "not available": planning for them is the point here
    with compat.quiet_logger("accelerate.utils.modeling"):
        if strategy != "sequential" and len(devices) > 1:
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype, special_dtypes=special)
        return dict(infer_auto_device_map(model, max_memory=max_memory, dtype=dtype, special_dtypes=special,
                                          no_split_module_classes=no_split))


def device_of(name: str, device_map: dict[str, Any]) -> Any:
    """The device a module or parameter ``name`` gets from ``device_map`` (longest matching prefix), or None."""
    best = None
    for key, device in device_map.items():
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best[0]):
                best = (key, device)
    return None if best is None else best[1]


def unplaced(model, device_map: dict[str, Any]) -> list[str]:
    """Parameters and buffers of ``model`` that ``device_map`` puts nowhere (an empty list: the map covers all)."""
    names_ = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return [n for n in names_ if device_of(n, device_map) is None]


def blocks(model) -> list[str]:
    """The model's blocks in order, as a device map can place them: embeddings, each decoder layer, norm, head."""
    no_split = set(model._no_split_modules or [])
    out: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(b + ".") for b in out):
            continue
        has_own = any(True for _ in module.parameters(recurse=False)) or \
            any(True for _ in module.buffers(recurse=False))
        if type(module).__name__ in no_split or (has_own and not list(module.children())):
            out.append(name)
        elif has_own:
            out.append(name)
    return out


def tensor_bytes(model, fmt: str = "16-bit") -> dict[int, int]:
    """The bytes of each distinct parameter and buffer of ``model`` (by ``id``) stored in format ``fmt``: a quantized
    weight as labkit.quant's ``weight_parts`` counts it, scales included; any other tensor in its own dtype."""

    quant.check_format(fmt)
    layers = {id(m.weight): m for m in quant.quantized_linears(model)}
    sizes: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in sizes:
            continue
        layer = layers.get(id(tensor))
        parts = None if fmt == "16-bit" or layer is None else quant.weight_parts(
            fmt, layer.out_features, layer.in_features, element_bytes=tensor.element_size())
        sizes[id(tensor)] = tensor.numel() * tensor.element_size() if parts is None else sum(parts)
    return sizes


def placement(model, device_map: dict[str, Any], *, fmt: str = "16-bit") -> list[dict[str, Any]]:
    """One row per block: its name, its device, and its bytes in format ``fmt`` (scales included). A tensor two
    blocks share (tied embeddings and output layer) counts once, in the first block that holds it."""
    sizes = tensor_bytes(model, fmt)
    modules = dict(model.named_modules())
    rows = []
    for name in blocks(model):
        module = modules[name]
        held = 0
        for tensor in [*module.parameters(), *module.buffers()]:
            held += sizes.pop(id(tensor), 0)
        rows.append({"block": name, "device": device_of(name, device_map), "bytes": held})
    return rows


def balanced_max_memory(model, count: int, *, fmt: str = "16-bit") -> dict[int, int]:
    """A ``max_memory`` that spreads ``model`` over ``count`` devices about evenly (for the pipeline demo):
    an even share of its bytes, plus room for its largest block so that a share never ends mid-layer short."""
    check_sizes(1, count=count)
    rows = placement(model, {"": 0}, fmt=fmt)
    share = sum(r["bytes"] for r in rows) / count
    return {i: int(share + max(r["bytes"] for r in rows)) for i in range(count)}


# --------------------------------------------------------------------------- torchrun jobs

def scripts_dir() -> Path:
    """``notebooks/scripts`` of the workbook (labkit is installed from the repository, editable)."""
    return Path(__file__).resolve().parents[1] / "notebooks" / "scripts"


def torchrun_args(script: str | os.PathLike, nproc: int, args: dict[str, Any] | None = None, *,
                  nnodes: int = 1, rdzv_endpoint: str = "") -> list[str]:
    """The arguments after ``torchrun``: one machine (``--standalone``, a free port) or a rendezvous."""
    check_sizes(1, nproc=nproc, nnodes=nnodes)
    launcher = ["--standalone"] if nnodes == 1 and not rdzv_endpoint else \
        ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", "labkit"]
    script_args: list[str] = []
    for key, value in (args or {}).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            script_args += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            script_args += [flag, *map(str, value)]
        else:
            script_args += [flag, str(value)]
    return [*launcher, "--nproc-per-node", str(nproc), str(script), *script_args]


def torchrun_command(script: str | os.PathLike, nproc: int, args: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """The command a learner types in a terminal for the same job."""
    return "torchrun " + shlex.join(torchrun_args(script, nproc, args, **kwargs))


def threads_per_process(nproc: int) -> int:
    """CPU threads for each of ``nproc`` processes: OMP_NUM_THREADS when set, else the cores shared out."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // nproc)


def _job_env(nproc: int, gpus: bool) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(nproc)), "PYTHONUNBUFFERED": "1"}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the job's processes see no GPU: gloo on the CPU
    return env


def _failure(script: Path, what: str, returncode: int, output: str) -> LaunchFailed:
    """The worker's own error first, then its last lines (torchrun's summary after them says little more)."""
    lines = output.strip().splitlines()
    summary = next((i for i, line in enumerate(lines)
                    if line.startswith("=" * 20) or "torch/distributed/elastic/multiprocessing" in line), len(lines))
    errors = [line for line in lines[:summary] if _ERROR_LINE.match(line)]
    headline = f": {_without_rank(errors[-1])}" if errors else ""
    tail = "\n".join(lines[:summary][-6:])
    return LaunchFailed(f"{script.name} {what} failed (exit status {returncode}){headline}\n{tail}")


_ERROR_LINE = re.compile(r"^\s*(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|BadParameter|ModelNotAvailable|LaunchFailed): ")


def _without_rank(line: str) -> str:
    return re.sub(r"^\s*\[rank\d+\]:\s*", "", line).strip()


def launch(script: str | os.PathLike, nproc: int, args: dict[str, Any] | None = None, *, gpus: bool = True,
           timeout_s: float = 600, echo: bool = True) -> dict[str, Any]:
    """Run ``script`` under torchrun with ``nproc`` processes and return the JSON its rank 0 wrote.

    The job runs in its own processes (a Jupyter kernel cannot host torch.distributed workers), started by the
    caller's Python (``python -m torch.distributed.run`` is ``torchrun``). ``gpus=False`` hides the GPUs from
    the job, so that it runs on CPU processes with gloo.
    """
    script = _existing(script)
    with tempfile.TemporaryDirectory(prefix="labkit-job-") as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run",
                   *torchrun_args(script, nproc, {**(args or {}), "out": str(out)})]
        if echo:
            print("$ " + torchrun_command(script, nproc, args))
        start = time.perf_counter()
        job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=_job_env(nproc, gpus), start_new_session=True)
        output = _wait(job, timeout_s, f"{script.name} with {_processes(nproc)}")
        if job.returncode != 0 or not out.exists():
            raise _failure(script, f"with {_processes(nproc)}", job.returncode, output)
        result = json.loads(out.read_text())
    result["launch_s"] = time.perf_counter() - start
    return result


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_nodes(script: str | os.PathLike, nnodes: int, nproc: int, args: dict[str, Any] | None = None, *,
                 gpus: bool = False, timeout_s: float = 600, echo: bool = True) -> dict[str, Any]:
    """Run ``script`` as ``nnodes`` "machines" of ``nproc`` processes each, all on this one, meeting at a
    c10d rendezvous on 127.0.0.1: the multi-node launch, rehearsed. Returns the JSON the global rank 0 wrote."""
    script = _existing(script)
    endpoint = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="labkit-nodes-") as folder:
        out = Path(folder) / "result.json"
        full = {**(args or {}), "out": str(out)}
        if echo:
            for node in range(nnodes):
                print(f"node {node}$ " + torchrun_command(script, nproc, args, nnodes=nnodes, rdzv_endpoint=endpoint))
        env = _job_env(nproc * nnodes, gpus)
        launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run",
                                       *torchrun_args(script, nproc, full, nnodes=nnodes, rdzv_endpoint=endpoint)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      start_new_session=True)
                     for _ in range(nnodes)]
        start = time.perf_counter()
        texts = []
        try:
            for launcher in launchers:
                left = max(1.0, timeout_s - (time.perf_counter() - start))
                texts.append(_wait(launcher, left, f"{script.name} on {nnodes} nodes", total_s=timeout_s))
        finally:
            for launcher in launchers:
                _stop(launcher)
        for node, (launcher, output) in enumerate(zip(launchers, texts, strict=True)):
            if launcher.returncode != 0:
                raise _failure(script, f"on node {node} of {nnodes}", launcher.returncode, output)
        if not out.exists():
            raise LaunchFailed(f"{script.name} on {nnodes} nodes ended without writing its results.")
        result = json.loads(out.read_text())
    result["launch_s"] = time.perf_counter() - start
    return result


def _stop(process: subprocess.Popen) -> None:
    """Stop a launcher and every worker it started (they share its process group)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait(process: subprocess.Popen, timeout_s: float, what: str, *, total_s: float | None = None) -> str:
    """The output of ``process`` once it ends; past ``timeout_s`` it is stopped with its workers."""
    try:
        return process.communicate(timeout=timeout_s)[0] or ""
    except subprocess.TimeoutExpired:
        _stop(process)
        raise LaunchFailed(f"{what} ran past {total_s or timeout_s:.0f} s and was stopped.") from None


def _existing(script: str | os.PathLike) -> Path:
    script = Path(script)
    if not script.exists():
        raise BadParameter(f"{script} does not exist; the scripts live in {scripts_dir()}.")
    return script


def copy_bandwidth(source: str, target: str, *, megabytes: int = 256, repeats: int = 5) -> dict[str, Any]:
    """Bytes per second of one copy from ``source`` to ``target`` (pinned host memory when the source is the
    CPU): the physical limit of a link (host to GPU over PCIe, GPU to GPU over NVLink or PCIe)."""

    check_sizes(1, megabytes=megabytes)
    data = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=source)
    if source == "cpu" and torch.cuda.is_available():
        data = data.pin_memory()
    destination = torch.empty_like(data, device=target)
    timed = target if target.startswith("cuda") else source
    timing = measure(lambda: destination.copy_(data, non_blocking=True), device=timed, warmup=2, repeats=repeats)
    return {"source": source, "target": target, "bytes": data.numel(),
            "bytes_per_s": data.numel() / (min(timing.times_ms) / 1e3)}


# --------------------------------------------------------------------------- the models the jobs run

def check_tensor_parallel(config, size: int) -> None:
    """One sentence when ``size`` ranks cannot split this model's heads evenly (tensor parallelism needs it)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for what, count in (("attention heads", heads), ("key/value heads", kv_heads),
                        ("MLP width", getattr(config, "intermediate_size", size))):
        if count % size:
            raise BadParameter(f"{size} processes cannot split the model's {count} {what} evenly; "
                               f"use a process count that divides {count}.")


def check_job_model(name: str, config) -> None:
    """One sentence when ``name`` cannot run the tensor-parallel job: transformers needs a plan for its architecture."""
    if not getattr(config, "base_model_tp_plan", None):
        raise BadParameter(f"model_id={name!r}: transformers has no tensor-parallel plan for {config.model_type} "
                           "models; use a Llama-family causal model such as tiny-llama, smollm2-135m or "
                           "random-llama-1b.")


def layout_config(name: str):
    """The config of one of :data:`LAYOUT_MODELS` (a new object every call)."""

    if name == "layers-llama":
        return LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "tiny-moe":
        return Qwen3MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              num_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
                              tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise BadParameter(f"{name!r} is not a layout model; use one of {', '.join(LAYOUT_MODELS)}.")


def layouts_for(processes: int, model_id: str) -> dict[str, Any]:
    """The one-machine layouts that can split their models over ``processes`` processes, and why the others cannot."""
    run, skipped = [], {}
    try:
        check_tensor_parallel(model_config(model_id), processes)
        run.append("tp")
    except BadParameter as error:
        skipped[f"tensor parallelism with {processes} processes"] = str(error)
    layers = layout_config("layers-llama").num_hidden_layers
    if processes <= layers:
        run.append("pp")
    else:
        skipped[f"pipeline parallelism with {processes} processes"] = f"layers-llama has {layers} layers to share out"
    moe = layout_config("tiny-moe")
    if moe.num_experts % processes == 0 and moe.num_key_value_heads % processes == 0:
        run.append("ep")
    else:
        skipped[f"expert parallelism with {processes} processes"] = (
            f"tiny-moe's {moe.num_experts} experts and {moe.num_key_value_heads} key/value heads must both divide "
            f"into {processes} (ep_size = tp_size)")
    return {"run": [*run, "dp"], "skipped": skipped}


def model_folder(name: str, dtype: Any = "float32") -> Path:
    """A folder ``from_pretrained`` can load ``name`` from (``DistributedConfig`` splits a model while loading it):
    a layout model or a labkit random-init model saved once in labkit's cache with a fixed seed, or the model's own
    folder. The launching process calls it before any job starts (notebook_plan does), so the jobs only read it."""
    dtype = probes.resolve_dtype(dtype)
    if name not in LAYOUT_MODELS:
        spec = models.EMBEDDED.get(name)
        return models.random_folder(name, 0, dtype) if spec is not None and spec.kind == "random" \
            else Path(models._resolve_folder(name))
    folder = cache_dir() / "models" / f"{name}-seed0-{str(dtype).removeprefix('torch.')}"

    def build(work: Path) -> None:
        with models._quiet_transformers():
            models.build_from_config(layout_config(name), dtype=dtype).save_pretrained(work)

    return models.saved_folder(folder, build, tokenizer=False)


# --------------------------------------------------------------------------- inside a torchrun job

def local_device() -> str:
    """This process's device: its own GPU (LOCAL_RANK) where there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return f"cuda:{index}"
    return "cpu"


def write_from_rank0(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Rank 0 writes ``data`` as JSON (atomically); other ranks write nothing."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    path = Path(path)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=1))
    partial.replace(path)


# --------------------------------------------------------------------------- communication

def all_reduce_seconds(rows: list[dict[str, Any]], size: int) -> float:
    """One all-reduce of ``size`` bytes as the benchmark measured it: the first size at least as large, or beyond the
    largest one measured, that one's bandwidth (an extrapolation)."""
    nearest = next((r for r in rows if r["bytes"] >= size), None)
    if nearest is None:
        return size / rows[-1]["algbw_bytes_per_s"]
    return nearest["median_us"] / 1e6
