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

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import infer_auto_device_map
from accelerate.utils import CustomDtype, get_balanced_memory
from transformers import LlamaConfig, Qwen3MoeConfig

from labkit import compat, footprint, launcher, models, probes
from labkit.errors import BadParameter, ModelNotAvailable, check_sizes
from labkit.footprint import GIB, USABLE_FRACTION
from labkit.paths import cache_dir
from labkit.timing import measure

# Random-init models the layouts run besides the learner's model (built from a config, saved once in labkit's
# cache, no download). "layers-llama" is shaped so that its layers, not Python, take a decode step's time on a
# CPU (4 layers of width 512, a 512-token vocabulary): the pipeline's bubble shows. "tiny-moe" is a Qwen3-MoE
# mixture of experts: 4 experts per layer, 2 chosen per token.
LAYOUT_MODELS = ("layers-llama", "tiny-moe")


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
        self.machines = {text: footprint.parse_machine(text) for text in self.plan_devices}
        self.formats = [footprint.check_format(f) for f in self.plan_formats] or ["16-bit"]
        check_sizes(1, batch=self.batch, context=self.context,
                    **{f"processes[{i}]": n for i, n in enumerate(self.processes)})
        check_sizes(0, new_tokens=self.new_tokens, dp_prompts=self.dp_prompts,
                    allreduce_max_mib=self.allreduce_max_mib)
        if self.new_tokens == 1:
            raise BadParameter("new_tokens=1: decoding needs at least 2 new tokens to time a step.")
        self.gpus = footprint.devices_present()
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
            problem = None if name in models.SHAPES else models.check_model(name)
            if problem:
                raise ModelNotAvailable(problem)
        check_job_model(self.model_id, models.model_config(self.model_id))
        self.job_dtype = "bfloat16" if on_gpus else "float32"
        for name in (self.model_id, *LAYOUT_MODELS):  # what the torchrun jobs load, saved once before any starts
            model_folder(name, self.job_dtype)
        self.dtype = probes.resolve_dtype(self.job_dtype, device)
        self.gpu_dtype = "bfloat16" if self.gpus and probes.native_bf16("cuda:0") else "float16"
        self.new_tokens = self.new_tokens or (32 if on_gpus else 6 if quick else 16)
        self.dp_prompts = self.dp_prompts or (8 * max(self.processes) if on_gpus else 4 if quick else 8)
        self.allreduce_max_mib = self.allreduce_max_mib or (256 if on_gpus else 1 if quick else 64)
        self.repeats = 2 if quick else 3
        self.scripts = Path("scripts") if Path("scripts/layouts.py").exists() else launcher.scripts_dir()
        where = "the GPUs, over NCCL" if on_gpus else "CPU processes, over gloo"
        return (f"GPUs here: {footprint.describe_devices(self.gpus)}. The torchrun jobs run {self.model_id} "
                f"({self.job_dtype}) "
                f"on {where}, with {self.processes} processes.")


# --------------------------------------------------------------------------- devices and machines, real or typed in


# --------------------------------------------------------------------------- memory: weights + KV cache


# --------------------------------------------------------------------------- the layout planner

def plan_layout(model, machine: dict[str, Any], *, fmt: str = "16-bit", batch: int = 1, context: int = 4096,
                usable: float = USABLE_FRACTION) -> dict[str, Any]:
    """The layout for ``model`` on ``machine`` (from :func:`labkit.footprint.parse_machine`): tensor-parallel size,
    pipeline stages, replicas, and the reasons.

    The rule people deploy with: one GPU if it holds the model; else the smallest tensor-parallel size that divides
    the key/value heads (each rank holds whole heads), stays inside a node (TP's all-reduces at every layer need
    the fast links within a node) and holds the model; if no TP size inside a node does, TP over the whole node
    and as few pipeline stages as hold the model (one stage per node, or more). Memory is shared evenly between
    the GPUs of a replica (an approximation: the embeddings and output layer sit on the first and last stages).
    The GPUs left over serve more replicas (data parallelism).
    """
    need = footprint.memory_needed(model, fmt=fmt, batch=batch, context=context)
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


    footprint.check_format(fmt)
    if fmt == "16-bit":
        return torch.bfloat16, {}
    low = torch.int8 if fmt in ("int8", "torchao-int8", "torchao-float8") else CustomDtype.INT4
    quantized = {id(m) for m in footprint.quantized_linears(model)}  # the output layer stays 16-bit
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
    weight as ``labkit.footprint.weight_parts`` counts it, scales included; any other tensor in its own dtype."""

    footprint.check_format(fmt)
    layers = {id(m.weight): m for m in footprint.quantized_linears(model)}
    sizes: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in sizes:
            continue
        layer = layers.get(id(tensor))
        parts = None if fmt == "16-bit" or layer is None else footprint.weight_parts(
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
        check_tensor_parallel(models.model_config(model_id), processes)
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
    folder. The launching process calls it before any job starts (``Parameters.resolve`` does): the jobs only read
    it."""
    dtype = probes.resolve_dtype(dtype)
    if name not in LAYOUT_MODELS:
        spec = models.EMBEDDED.get(name)
        return models.random_folder(name, 0, dtype) if spec is not None and spec.kind == "random" \
            else Path(models.resolve_folder(name))
    folder = cache_dir() / "models" / f"{name}-seed0-{str(dtype).removeprefix('torch.')}"

    def build(work: Path) -> None:
        with models.quiet_transformers():
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
