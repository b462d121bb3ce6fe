"""Notebook 05's topic, inference on several devices: how much memory a model needs, which layout to give it, where
its layers go, and the torchrun jobs that run each layout.

The layouts people deploy, each measured by notebook 05:
- placement with ``device_map``: consecutive layers on consecutive devices, one device working at a time (capacity);
- tensor parallelism (TP): every layer's matrices split across ranks, ``DistributedConfig(tp_size=N)``;
- pipeline parallelism (PP): consecutive layers on consecutive ranks, ``DistributedConfig(pp_size=N)``;
- expert parallelism (EP): a mixture-of-experts model's experts shared out, ``DistributedConfig(ep_size=N)``;
- data parallelism (DP): one whole replica per rank, the prompts split between them;
- TP inside a node and PP across nodes, the multi-node layout.
The jobs run under ``torchrun`` (``notebooks/scripts/``), never inside a Jupyter kernel.
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
from pathlib import Path
from typing import Any

import torch
from accelerate import infer_auto_device_map
from accelerate.utils import CustomDtype, get_balanced_memory
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

from labkit import compat, models, outputs, probes, quant, roofline
from labkit.errors import BadParameter, LabkitError, ModelNotAvailable, check_sizes
from labkit.metrics import multi_gpu as names
from labkit.paths import cache_dir
from labkit.timing import measure, synchronize

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

# Published link speeds, bytes per second in each direction (nccl-tests' bus bandwidth compares with this).
# Source: NVIDIA's MLPerf Inference v4.1 system description of an 8 x H200 SXM node, "18x 4th Gen NVLink, 900GB/s"
# (both directions together) and "10x 400Gbe Infiniband" (400 Gbit/s per network card):
# https://raw.githubusercontent.com/mlcommons/inference_results_v4.1/main/closed/NVIDIA/systems/H200-SXM-141GBx8_TRT_MaxQ.json
LINKS: dict[str, dict[str, Any]] = {
    "NVLink 4 (H100/H200 SXM)": {"bytes_per_s": 900e9 / 2, "published": "900 GB/s, both directions together"},
    "400 Gbit/s network card (InfiniBand NDR)": {"bytes_per_s": 400e9 / 8, "published": "400 Gbit/s"},
}
LINKS_SOURCE = ("https://raw.githubusercontent.com/mlcommons/inference_results_v4.1/main/closed/NVIDIA/systems/"
                "H200-SXM-141GBx8_TRT_MaxQ.json")

# Random-init models the layouts run besides the learner's model (built from a config, saved once in labkit's
# cache, no download). "layers-llama" is shaped so that its layers, not Python, take a decode step's time on a
# CPU (4 layers of width 512, a 512-token vocabulary): the pipeline's bubble shows. "tiny-moe" is a Qwen3-MoE
# mixture of experts: 4 experts per layer, 2 chosen per token.
LAYOUT_MODELS = ("layers-llama", "tiny-moe")


class LaunchFailed(LabkitError, RuntimeError):
    """A torchrun job exited with an error; the message ends with the job's last lines of output."""


# --------------------------------------------------------------------------- the notebook's plan and summary

def notebook_plan(*, device: str, quick: bool, model_id: str = "", plan_model: str = "llama-70b-shape",
                  plan_devices: Any = ("1 x 24 GB", "2 x 24 GB", "8 x 80 GB", "2 nodes x 8 x 80 GB"),
                  plan_formats: Any = ("16-bit", "nf4"), batch: int = 1, context: int = 4096, processes: Any = (),
                  new_tokens: int = 0, dp_prompts: int = 0, allreduce_max_mib: int = 0) -> dict[str, Any]:
    """Notebook 05's parameters, checked (one sentence for a bad one), sized for this machine, and its models loaded."""
    for name, value in (("plan_devices", plan_devices), ("plan_formats", plan_formats), ("processes", processes)):
        if isinstance(value, (str, int)):
            raise BadParameter(f"{name}={value!r}: give a list, for example {name}=[{value!r}].")
    if not plan_devices:
        raise BadParameter("plan_devices=[]: give at least one machine, for example ['2 x 24 GB'].")
    machines = {text: parse_machine(text) for text in plan_devices}
    from labkit import quant  # (imported here: the torchrun jobs import this module and need none of it)

    formats = [quant.check_format(f) for f in plan_formats] or ["16-bit"]
    check_sizes(1, batch=batch, context=context, **{f"processes[{i}]": n for i, n in enumerate(processes)})
    check_sizes(0, new_tokens=new_tokens, dp_prompts=dp_prompts, allreduce_max_mib=allreduce_max_mib)
    if new_tokens == 1:
        raise BadParameter("new_tokens=1: decoding needs at least 2 new tokens to time a step.")
    gpus = devices_present()
    jobs_on_gpus = len(gpus) >= 2  # NCCL between GPUs; otherwise CPU processes over gloo, GPUs hidden from them
    most = len(gpus) if jobs_on_gpus else max(2, os.cpu_count() or 1)
    processes = sorted(set(processes or ([n for n in (2, 4, 8) if n <= most] if jobs_on_gpus else [2])))
    if processes[0] < 2 or processes[-1] > most:
        raise BadParameter(f"processes={processes}: each layout splits a model over at least 2 processes, and at "
                           f"most {most} here ({'GPUs' if jobs_on_gpus else 'CPU cores'}).")
    model_given = bool(model_id)
    model_id = model_id or ("random-llama-1b" if jobs_on_gpus else "tiny-llama")
    for name in (model_id, plan_model):
        problem = None if name in SHAPES else models.check_model(name)
        if problem:
            raise ModelNotAvailable(problem)
    check_job_model(model_id, model_config(model_id))
    job_dtype = "bfloat16" if jobs_on_gpus else "float32"
    for name in (model_id, *LAYOUT_MODELS):  # what the torchrun jobs load, saved once before any of them starts
        model_folder(name, job_dtype)
    dtype = probes.resolve_dtype(job_dtype, device)
    job_model, tokenizer = models.load_model(model_id, device=device, dtype=dtype, attn_implementation="sdpa")
    where = "the GPUs, over NCCL" if jobs_on_gpus else "CPU processes, over gloo"
    return {
        "dtype": dtype, "line": f"GPUs here: {describe_devices(gpus)}. The torchrun jobs run {model_id} "
                                f"({job_dtype}) on {where}, with {processes} processes.",
        "gpus": gpus, "jobs_on_gpus": jobs_on_gpus, "processes": processes, "machines": machines,
        "formats": formats, "plan_model": plan_model, "planned": empty_model(plan_model), "batch": batch,
        "context": context, "model_id": model_id, "job_dtype": job_dtype, "job_model": job_model,
        "tokenizer": tokenizer,
        # device_map placement needs a model bigger than the share of a GPU it is given: the 1B model unless named
        "pipeline_model": model_id if model_given or jobs_on_gpus else "random-llama-1b",
        "gpu_dtype": "bfloat16" if gpus and probes.native_bf16("cuda:0") else "float16",
        "new_tokens": new_tokens or (32 if jobs_on_gpus else 6 if quick else 16),
        "dp_prompts": dp_prompts or (8 * max(processes) if jobs_on_gpus else 4 if quick else 8),
        "allreduce_max_mib": allreduce_max_mib or (256 if jobs_on_gpus else 1 if quick else 64),
        "repeats": 2 if quick else 3,
        "scripts": Path("scripts") if Path("scripts/layouts.py").exists() else scripts_dir(),
    }


def what_you_measured(results: dict[str, Any]) -> list[str]:
    """Notebook 05's results in a few sentences (each one only when its part ran)."""
    m, checks, lines = results["metrics"], results["checks"], []
    totals = [v for k, v in m.items() if k.startswith("plan_") and k.endswith("_16_bit_total_gib")]
    for total in totals[:1]:
        lines.append(f"The planned model needs {total:,.1f} GiB in 16-bit (weights and KV cache); the planner "
                     "keeps tensor parallelism inside a node and adds pipeline stages across nodes only when one "
                     "node cannot hold it.")
    split = sorted(int(k.split("_")[1]) for k in m if re.fullmatch(r"tp_\d+_speedup", k) and not k.startswith("tp_1"))
    for n in split[:1]:
        same = "the same greedy tokens as one process" if checks.get("tp_tokens_equal_single_process") else \
            "tokens compared with one process in the table"
        lines.append(f"Tensor parallelism over {n} processes gave {same}, each holding about 1/{n} of the weights, "
                     f"at {m[f'tp_{n}_speedup']:.2f}x the speed of one process here: every layer pays two all-reduces.")
    dp = sorted(int(k.split("_")[1]) for k in m if re.fullmatch(r"dp_\d+_speedup", k) and not k.startswith("dp_1"))
    for n in dp[-1:]:
        lines.append(f"Data parallelism over {n} processes gave {m[f'dp_{n}_speedup']:.2f}x the tokens/s of one "
                     "process, with nothing exchanged while generating; each process holds a whole copy.")
    if "pp_2_step_vs_one_process" in m:
        lines.append(f"Two pipeline stages took {m['pp_2_step_vs_one_process']:.2f}x one process's time per decode "
                     "step: a token still passes every layer in turn, so each stage waits for the other (the bubble).")
    if "ep_2_experts_per_rank" in m:
        lines.append(f"Expert parallelism left {m['ep_2_experts_per_rank']:.0f} experts on each of 2 processes, with "
                     "the same tokens as one process.")
    if checks.get("tp_pp_tokens_equal_single_process"):
        lines.append("TP inside each of two rehearsed nodes and PP across them generated one process's tokens, "
                     "through a workaround for transformers' error on that combination.")
    if "allreduce_best_busbw_gb_per_s" in m:
        lines.append(f"The best all-reduce bus bandwidth between these processes was "
                     f"{m['allreduce_best_busbw_gb_per_s']:.3g} GB/s, {m['allreduce_fraction_of_copy']:.0%} of the "
                     "measured limit; small messages cost latency, not bandwidth.")
    return lines


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


def need_rows(model, formats: list[str], *, batch: int, context: int) -> tuple[dict[str, dict], list[dict]]:
    """The memory needed in each format (bytes), and table rows of it in GiB."""
    needs = {fmt: memory_needed(model, fmt=fmt, batch=batch, context=context) for fmt in formats}
    rows = [{"format": fmt, "weights GiB": n["weights"] / GIB, "KV cache GiB": n["kv_cache"] / GIB,
             "total GiB": n["total"] / GIB} for fmt, n in needs.items()]
    return needs, rows


def machine_rows(needs: dict[str, dict], machines: dict[str, dict], model_name: str) -> dict[str, Any]:
    """For each format, how many GPUs of each machine the model needs, and the metrics of the plan."""
    rows, metrics = [], {}
    for fmt, need in needs.items():
        row = {"format": fmt, "total GiB": need["total"] / GIB}
        for text, machine in machines.items():
            verdict = fit(need, machine["devices"])
            row[text] = ("fits on one" if verdict["one_device"] else
                         f"{verdict['devices_needed']} needed, " + ("enough" if verdict["all_devices"] else "too few"))
        rows.append(row)
        metrics[names.plan(model_name, fmt, "total_gib")] = need["total"] / GIB
    return {"rows": rows, "metrics": metrics}


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


def layout_rows(model_names: list[str], machines: dict[str, dict], formats: list[str], *, batch: int,
                context: int) -> list[dict[str, Any]]:
    """The planner's layout for every model, machine and format, as table rows."""
    rows = []
    for name in model_names:
        model = empty_model(name)
        for text, machine in machines.items():
            for fmt in formats:
                plan = plan_layout(model, machine, fmt=fmt, batch=batch, context=context)
                rows.append({"model": name, "machine": text, "format": fmt,
                             "TP": plan["tp"] if plan["fits"] else "-", "PP": plan["pp"] if plan["fits"] else "-",
                             "replicas": plan["replicas"], "GiB per GPU": plan["per_gpu_bytes"] / GIB,
                             "why": " ".join(plan["reasons"][1:])})
    return rows


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


def placements(model, machines: dict[str, dict], formats: list[str]) -> dict[str, Any]:
    """``device_map="auto"`` planned for every machine and format: the placements (for the figure), a row per device
    (which blocks it holds) and a check per plan that every parameter goes somewhere."""
    placed, rows, checks = {}, [], {}
    for text, machine in machines.items():
        for fmt in formats:
            device_map = plan_device_map(model, machine["devices"], fmt=fmt)
            label = f"{text}, {fmt}"
            checks[names.plan_covers(text, fmt)] = not unplaced(model, device_map)
            placed[label] = placement(model, device_map, fmt=fmt)
            for where in dict.fromkeys(r["device"] for r in placed[label]):
                mine = [r for r in placed[label] if r["device"] == where]
                rows.append({"plan": label, "device": f"GPU {where}" if isinstance(where, int) else where,
                             "blocks": len(mine), "from": mine[0]["block"], "to": mine[-1]["block"]})
    return {"placements": placed, "rows": rows, "checks": checks}


def balanced_max_memory(model, count: int, *, fmt: str = "16-bit") -> dict[int, int]:
    """A ``max_memory`` that spreads ``model`` over ``count`` devices about evenly (for the pipeline demo):
    an even share of its bytes, plus room for its largest block so that a share never ends mid-layer short."""
    check_sizes(1, count=count)
    rows = placement(model, {"": 0}, fmt=fmt)
    share = sum(r["bytes"] for r in rows) / count
    return {i: int(share + max(r["bytes"] for r in rows)) for i in range(count)}


def calculator_check(model, *, probe_tokens: int = 64) -> dict[str, Any]:
    """The calculator against a model loaded for real: weights from ``get_memory_footprint()``, the KV cache measured
    after a forward pass over ``probe_tokens`` tokens of 2 sequences."""

    predicted = memory_needed(model, batch=2, context=probe_tokens, element_bytes=roofline.element_size(model.dtype))
    with torch.inference_mode():
        output = model(input_ids=outputs.random_prompt(model, batch=2, length=probe_tokens), use_cache=True)
    measured = {"weights": model.get_memory_footprint(), "kv_cache": cache_bytes(output)}
    rows = [{"what": "weights", "predicted MiB": predicted["weights"] / 2**20,
             "measured MiB": measured["weights"] / 2**20},
            {"what": f"KV cache, 2 x {probe_tokens} tokens", "predicted MiB": predicted["kv_cache"] / 2**20,
             "measured MiB": measured["kv_cache"] / 2**20}]
    return {"rows": rows, "checks": {
        "calculator_weights_match_footprint": abs(predicted["weights"] / measured["weights"] - 1) < 0.01,
        "calculator_kv_cache_exact": predicted["kv_cache"] == measured["kv_cache"]}}


# --------------------------------------------------------------------------- device_map on real GPUs

def measure_device_map(name: str, gpus: list[dict[str, Any]], *, dtype: str, new_tokens: int,
                       repeats: int) -> dict[str, Any]:
    """Decode speed of ``name`` placed with ``device_map="auto"``: over two GPUs against one GPU; with one GPU, half
    of it offloaded to the CPU against none. Each row's bound is its slowest path's bandwidth over the bytes that
    cross it per token. Returns rows and findings (skips where there is no GPU)."""

    if not gpus:
        return {"rows": [], "skipped": {"pipeline placement": "no GPU here: a device_map places layers on GPUs "
                                                              "(and offloads from them)"}}

    def decode_row(label, model, bound_bytes_per_s, bound_bytes):
        prompt = outputs.random_prompt(model, batch=1, length=16)
        row = outputs.measure_decode(model, prompt, new_tokens=new_tokens, repeats=repeats)
        bound = bound_bytes_per_s / bound_bytes
        return {"placement": label, "tokens/s": row["tokens_per_s"], "bound tokens/s": bound,
                "fraction of bound": row["tokens_per_s"] / bound, "token_ids": row["token_ids"]}

    one, _ = models.load_model(name, device="cuda:0", dtype=dtype, attn_implementation="sdpa")
    weights = roofline.parameter_bytes(one)
    bandwidth = roofline.bandwidth_ceiling("cuda:0")["bytes_per_s"]
    rows = [decode_row("one GPU", one, bandwidth, weights)]
    del one
    torch.cuda.empty_cache()
    findings: dict[str, Any] = {"checks": {}, "skipped": {}}
    if len(gpus) >= 2:
        spread, _ = models.load_model(name, dtype=dtype, attn_implementation="sdpa", device_map="auto",
                                      max_memory=balanced_max_memory(empty_model(name), 2))
        placed = getattr(spread, "hf_device_map", {"": str(spread.device)})  # transformers sets it only when spread
        rows.append(decode_row("two GPUs, device_map='auto'", spread, bandwidth, weights))
        findings["checks"]["pipeline_uses_two_gpus"] = len({d for d in placed.values() if isinstance(d, int)}) == 2
        findings["checks"]["pipeline_tokens_equal_one_gpu"] = rows[0]["token_ids"] == rows[1]["token_ids"]
        findings["line"] = (f"split over two GPUs, {name} made {rows[1]['tokens/s'] / rows[0]['tokens/s']:.2f}x the "
                            "tokens/s of one GPU")
    else:
        half, _ = models.load_model(name, dtype=dtype, attn_implementation="sdpa", device_map="auto",
                                    max_memory={0: weights // 2, "cpu": 2**62})
        placed = getattr(half, "hf_device_map", {"": str(half.device)})
        if {0, "cpu"} <= set(placed.values()):
            offloaded = sum(r["bytes"] for r in placement(half, placed) if r["device"] == "cpu")
            link = copy_bandwidth("cpu", "cuda:0")
            rows.append(decode_row("part offloaded to the CPU", half, link["bytes_per_s"], offloaded))
            findings["line"] = (f"{offloaded / GIB:.2f} GiB offloaded to the CPU; host-to-GPU copy "
                                f"{link['bytes_per_s'] / 1e9:.1f} GB/s (measured)")
            findings["checks"]["offload_tokens_equal_all_on_gpu"] = rows[0]["token_ids"] == rows[1]["token_ids"]
        else:
            where = sorted(set(map(str, placed.values())))
            findings["skipped"]["CPU offload"] = f"device_map put all of {name} on {where}"
    findings["metrics"] = {names.pipeline_placement(r["placement"]): r["tokens/s"] for r in rows}
    return {"rows": [{k: v for k, v in r.items() if k != "token_ids"} for r in rows], **findings}


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


def owned_layers(model) -> list[int]:
    """The decoder layers this process runs (a pipeline stage replaces the others with placeholders)."""
    from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

    layers = model.get_decoder().layers
    return [i for i, layer in enumerate(layers) if not isinstance(layer, PipelineIdentityLayer)]


@contextlib.contextmanager
def busy_time(modules, device: str):
    """Seconds spent inside ``modules``' forward passes within the block: ``with busy_time(...) as busy:`` then
    ``busy["s"]`` (the time a pipeline stage computes; the rest of a step it waits or does bookkeeping)."""

    busy = {"s": 0.0}
    starts: list[float] = []

    def before(module, args):
        synchronize(device)
        starts.append(time.perf_counter())

    def after(module, args, output):
        synchronize(device)
        busy["s"] += time.perf_counter() - starts.pop()

    handles = [h for m in modules for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield busy
    finally:
        for handle in handles:
            handle.remove()


def decode_rate(model, prompt, *, new_tokens: int, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Decode tokens/s as ``outputs.measure_decode`` defines it, with exactly ``warmup + repeats`` calls of each
    length: in a distributed job every rank must make the same calls, so no minimum measured time."""

    if new_tokens < 2:
        raise BadParameter(f"new_tokens={new_tokens}: decoding needs at least 2 new tokens to time a step.")
    out: dict[str, Any] = {}

    def run(count):
        def call():
            out["ids"] = outputs.generate_exactly(model, prompt, count)[:, prompt.shape[1]:]
        return call

    device = str(model.device)
    one = measure(run(1), device=device, warmup=warmup, repeats=repeats, min_time_s=0)
    full = measure(run(new_tokens), device=device, warmup=warmup, repeats=repeats, min_time_s=0)
    step_ms = (full.median_ms - one.median_ms) / (new_tokens - 1)
    fallback = step_ms <= 0
    if fallback:  # timing noise larger than the decode itself: the whole call per token, flagged
        step_ms = full.median_ms / new_tokens
    return {"batch": prompt.shape[0], "new_tokens": new_tokens, "generate_ms": full.median_ms, "step_ms": step_ms,
            "timing_fallback": fallback, "tokens_per_s": prompt.shape[0] * 1e3 / step_ms,
            "token_ids": out["ids"].tolist()}


def collectives(counts: dict[str, int]) -> dict[str, int]:
    """The communication ops among a profile's op counts (``c10d::allreduce_``, ``c10d::send``, ...)."""
    return {op.removeprefix("c10d::"): n for op, n in counts.items() if op.startswith("c10d::")}


# which dimension of a layout each collective serves (transformers 5.25: the tensor-parallel styles all-reduce and
# all-gather over the TP group; a pipeline stage sends and receives activations and broadcasts the logits over the
# PP group; expert parallelism all-reduces, or exchanges tokens all-to-all, over the EP group)
DIMENSION_OF = {"allreduce_": "TP", "allgather_into_tensor_coalesced_": "TP", "send": "PP", "recv_": "PP",
                "broadcast_": "PP", "alltoall_base_": "EP"}


# --------------------------------------------------------------------------- inside a torchrun job

def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device() -> str:
    """This process's device: its own GPU (LOCAL_RANK) where there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return f"cuda:{index}"
    return "cpu"


def write_from_rank0(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Rank 0 writes ``data`` as JSON (atomically); other ranks write nothing."""
    if rank() != 0:
        return
    path = Path(path)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=1))
    partial.replace(path)


# --------------------------------------------------------------------------- communication

def bus_bandwidth(message_bytes: int, seconds: float, ranks: int) -> dict[str, float]:
    """All-reduce bandwidths as nccl-tests reports them: algorithm bandwidth (bytes / time) and bus bandwidth
    (x 2(n-1)/n, the traffic each link carries in a ring, comparable to the link's own speed)."""
    algorithm = message_bytes / seconds
    return {"algbw_bytes_per_s": algorithm, "busbw_bytes_per_s": algorithm * 2 * (ranks - 1) / ranks}


def time_all_reduce(sizes_bytes: list[int], *, device: str, warmup: int = 3, repeats: int = 10) -> list[dict[str, Any]]:
    """Time ``all_reduce`` (sum, float32) for each message size on the initialised process group.

    Every rank runs the same calls; a barrier starts each repeat together and the slowest rank's time
    counts (what a collective costs the whole job).
    """
    import torch.distributed as dist

    from labkit.timing import percentile, synchronize

    rows = []
    ranks = dist.get_world_size()
    for size in sizes_bytes:
        buffer = torch.ones(max(1, size // 4), dtype=torch.float32, device=device)
        times = []
        for i in range(warmup + repeats):
            dist.barrier()
            synchronize(device)
            start = time.perf_counter()
            dist.all_reduce(buffer)
            synchronize(device)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i >= warmup:
                times.append(float(elapsed))
        seconds = percentile(times, 50)
        rows.append({"bytes": buffer.numel() * 4, "median_us": seconds * 1e6,
                     **bus_bandwidth(buffer.numel() * 4, seconds, ranks)})
    return rows


def all_reduce_seconds(rows: list[dict[str, Any]], size: int) -> float:
    """One all-reduce of ``size`` bytes as the benchmark measured it: the first size at least as large, or beyond the
    largest one measured, that one's bandwidth (an extrapolation)."""
    nearest = next((r for r in rows if r["bytes"] >= size), None)
    if nearest is None:
        return size / rows[-1]["algbw_bytes_per_s"]
    return nearest["median_us"] / 1e6


def tp_traffic(config, *, tokens: int, element_bytes: int = 2) -> dict[str, int]:
    """What tensor parallelism all-reduces per forward pass over ``tokens`` tokens (a decode step of a batch, or a
    prefill): two all-reduces per decoder layer (after attention, after the MLP), each of the hidden states."""
    check_sizes(1, tokens=tokens, element_bytes=element_bytes)
    return {"all_reduces": 2 * config.num_hidden_layers, "bytes_each": tokens * config.hidden_size * element_bytes}


def link_seconds(message_bytes: int, ranks: int, bytes_per_s: float) -> float:
    """The bandwidth part of one ring all-reduce over a link of ``bytes_per_s``: each link carries 2(n-1)/n of the
    message (nccl-tests' bus bandwidth, turned around). The latency of each call comes on top, not counted here."""
    return message_bytes * 2 * (ranks - 1) / ranks / bytes_per_s


def link_prediction(config, *, tp: int, tokens_by_phase: dict[str, int], bench_rows: list[dict[str, Any]],
                    element_bytes: int = 2) -> list[dict[str, Any]]:
    """Predicted TP communication per forward pass, for each phase (``{"decode step, batch 1": 1, ...}``): over this
    machine's links (the measured benchmark, latency included) and over the published links of :data:`LINKS`
    (bandwidth only)."""
    rows = []
    for phase, tokens in tokens_by_phase.items():
        traffic = tp_traffic(config, tokens=tokens, element_bytes=element_bytes)
        count, size = traffic["all_reduces"], traffic["bytes_each"]
        row = {"phase": phase, "all-reduces": count, "MiB each": size / 2**20,
               "this machine ms": count * all_reduce_seconds(bench_rows, size) * 1e3,
               "this machine from": "measured" if size <= bench_rows[-1]["bytes"] else "largest message's bandwidth"}
        for link, spec in LINKS.items():
            row[f"{link} ms"] = count * link_seconds(size, tp, spec["bytes_per_s"]) * 1e3
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- what the jobs found, for the notebook

def _equal(run: dict[str, Any], key: str = "token_ids") -> bool:
    return run[key] == run[f"one_process_{key}"]


def _listed(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {op}" for op, count in counts.items()) or "none"


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


def with_layout(jobs: dict[int, dict[str, Any]], layout: str) -> dict[int, dict[str, Any]]:
    """The launches (by process count) that ran ``layout``."""
    return {n: run for n, run in jobs.items() if layout in run}


def tp_findings(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Rows and findings of the tensor-parallel layout, one row per process count (and one process)."""
    if not runs:
        return {"rows": [], "skipped": {"tensor parallelism": "no launch could split the model's heads evenly"}}
    rows, metrics = [], {}
    first = next(iter(runs.values()))["tp"]
    rows.append({"processes": 1, "tokens/s": first["one_process_tokens_per_s"], "speed-up": 1.0,
                 "step ms": first["one_process_step_ms"],
                 "MiB per process": first["one_process_parameter_bytes"] / 2**20,
                 "tokens equal to 1 process": "-", "collectives per forward": "none", "top logit gap": 0.0})
    metrics[names.job("tp", 1, "tokens_per_s")] = first["one_process_tokens_per_s"]
    metrics[names.job("tp", 1, "speedup")] = 1.0
    checks: dict[str, Any] = {}
    for n, run in runs.items():
        tp = run["tp"]
        gap = max(abs(a - b) for a, b in zip(tp["top_logits"], tp["one_process_top_logits"], strict=True))
        same = [a == b for a, b in zip(tp["token_ids"][0], tp["one_process_token_ids"][0], strict=True)]
        speedup = tp["tokens_per_s"] / tp["one_process_tokens_per_s"]
        rows.append({"processes": n, "tokens/s": tp["tokens_per_s"], "speed-up": speedup, "step ms": tp["step_ms"],
                     "MiB per process": max(tp["parameter_bytes_per_rank"]) / 2**20,
                     "tokens equal to 1 process": f"{sum(same)}/{len(same)}",
                     "collectives per forward": _listed(tp["collectives_per_rank"][0]),
                     "top logit gap": gap})
        metrics.update({names.job("tp", n, "tokens_per_s"): tp["tokens_per_s"], names.job("tp", n, "speedup"): speedup,
                        names.job("tp", n, "top_logit_gap"): gap})
    split = {n: run["tp"] for n, run in runs.items()}
    whole = first["one_process_parameter_bytes"]
    checks["tp_weights_split"] = all(max(r["parameter_bytes_per_rank"]) <= 1.1 * whole / n for n, r in split.items())
    checks["tp_calls_collectives"] = all(r["collectives_per_rank"][0] for r in split.values())
    checks["tp_ran_sdpa"] = all(r["sdpa_backend"] for r in split.values())
    if runs[next(iter(runs))]["dtype"] == "float32":  # the shares are summed in another order: 16-bit may differ
        checks["tp_tokens_equal_single_process"] = all(_equal(r) for r in split.values())
    return {"rows": rows, "metrics": metrics, "checks": checks}


def kv_exercise(run: dict[str, Any], config) -> dict[str, Any]:
    """What exercise 05.2 gives: the tensor-parallel job's model shape, process count, prompt and number size."""
    shape = roofline.kv_shape(config)
    return {**{k: shape[k] for k in ("layers", "heads", "kv_heads", "head_dim")}, "tp": run["world_size"],
            "batch": 1, "tokens": run["tp"]["prompt_tokens"], "element_bytes": roofline.element_size(run["dtype"])}


def kv_per_rank(run: dict[str, Any]) -> dict[str, Any]:
    """The KV cache each tensor-parallel process held after the prompt, against one process's."""
    tp = run["tp"]
    rows = [{"processes": 1, "rank": "-", "KV cache KiB": tp["one_process_kv_cache_bytes"] / 1024}]
    rows += [{"processes": run["world_size"], "rank": r, "KV cache KiB": b / 1024}
             for r, b in enumerate(tp["kv_cache_bytes_per_rank"])]
    share = max(tp["kv_cache_bytes_per_rank"]) / tp["one_process_kv_cache_bytes"]
    return {"rows": rows, "kib_per_rank": max(tp["kv_cache_bytes_per_rank"]) / 1024,
            "metrics": {names.job("tp", run["world_size"], "kv_cache_share_per_rank"): share},
            "checks": {"tp_kv_cache_split_by_heads": share == 1 / run["world_size"]}}


def dp_findings(runs: dict[int, dict[str, Any]], prompts: int) -> dict[str, Any]:
    """Rows and findings of the data-parallel layout."""
    if not runs:
        return {"rows": [], "skipped": {"data parallelism": "no launch ran it"}}
    first = next(iter(runs.values()))["dp"]
    rows = [{"processes": 1, "prompts per process": str(prompts), "seconds": first["one_process_seconds"],
             "tokens/s": first["one_process_tokens_per_s"], "speed-up": 1.0, "in order": True}]
    metrics = {names.job("dp", 1, "tokens_per_s"): first["one_process_tokens_per_s"],
               names.job("dp", 1, "speedup"): 1.0}
    complete, equal = True, True
    for n, run in runs.items():
        dp = run["dp"]
        order = [r["prompt"] for r in dp["results"]]
        speedup = dp["tokens_per_s"] / dp["one_process_tokens_per_s"]
        rows.append({"processes": n, "prompts per process": ", ".join(
            str(sum(r["rank"] == k for r in dp["results"])) for k in range(n)), "seconds": dp["seconds"],
            "tokens/s": dp["tokens_per_s"], "speed-up": speedup, "in order": order == list(range(prompts))})
        metrics.update({names.job("dp", n, "tokens_per_s"): dp["tokens_per_s"], names.job("dp", n, "speedup"): speedup})
        complete &= order == list(range(prompts))
        equal &= [r["token_ids"] for r in dp["results"]] == dp["one_process_token_ids"]
    return {"rows": rows, "metrics": metrics,
            "checks": {"dp_results_complete_and_in_order": complete, "dp_tokens_equal_single_process": equal}}


def pp_findings(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Rows and findings of the pipeline layout (the smallest launch that ran it): each stage's layers and bytes, and
    each batch's step time and busy share against one process."""
    if not runs:
        return {"stages": [], "steps": [], "skipped": {"pipeline parallelism": "no launch ran it"}}
    run = runs[min(runs)]
    pp, n = run["pp"], run["world_size"]
    whole = pp["one_process_parameter_bytes"]
    stages = [{"stage (rank)": r, "layers": ", ".join(map(str, layers)),
               "MiB": pp["parameter_bytes_per_rank"][r] / 2**20,
               "share of 1 process": pp["parameter_bytes_per_rank"][r] / whole}
              for r, layers in enumerate(pp["layers_per_rank"])]
    steps, metrics, equal = [], {}, True
    for b in pp["batches"]:
        ratio = b["step_ms"] / b["one_process_step_ms"]
        same = b["token_ids"] == b["one_process_token_ids"]
        steps.append({"sequences in flight": b["batch"], "one process: step ms": b["one_process_step_ms"],
                      "one process: busy in layers": b["one_process_busy_share"],
                      f"{n} stages: step ms": b["step_ms"],
                      **{f"stage {r} busy": share for r, share in enumerate(b["busy_share_per_rank"])},
                      "step vs one process": ratio, "tokens equal to 1 process": same})
        metrics[names.pp_step(n, b["batch"])] = ratio
        equal &= same
    metrics[names.pp_step(n)] = steps[0]["step vs one process"]
    return {"stages": stages, "steps": steps, "metrics": metrics, "checks": {
        "pp_tokens_equal_single_process": equal,
        "pp_each_stage_holds_part": max(pp["parameter_bytes_per_rank"]) < whole}}


def ep_findings(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Rows and findings of the expert-parallel layout (the smallest launch that ran it), one row per way of bringing
    the experts their tokens."""
    if not runs:
        return {"rows": [], "skipped": {"expert parallelism": "no launch could share tiny-moe's experts evenly"}}
    run = runs[min(runs)]
    ep, n = run["ep"], run["world_size"]
    rows = []
    for implementation, result in ep["implementations"].items():
        rows.append({"ep_implementation": implementation, "experts per rank": result["experts_per_rank"],
                     "MiB per rank": max(result["parameter_bytes_per_rank"]) / 2**20,
                     "tokens equal to 1 process": _equal(result),
                     "collectives per forward": _listed(result["collectives_per_rank"][0])})
    auto = ep["implementations"]["auto"]
    return {"rows": rows, "metrics": {names.job("ep", n, "experts_per_rank"): auto["experts_per_rank"]},
            "checks": {"ep_tokens_equal_single_process": all(_equal(r) for r in ep["implementations"].values()),
                       "ep_experts_shared_out": auto["experts_per_rank"] * n == ep["num_experts"]}}


def tp_pp_findings(run: dict[str, Any]) -> dict[str, Any]:
    """Rows and findings of TP inside each node and PP across nodes: what each rank held and which collectives each
    dimension called."""
    result = run["tp_pp"]
    whole, rows = result["one_process_parameter_bytes"], []
    for r, (stage, counts) in enumerate(zip(result["stage_per_rank"], result["collectives_per_rank"], strict=True)):
        by_dimension: dict[str, list[str]] = {}
        for op, count in counts.items():
            by_dimension.setdefault(DIMENSION_OF.get(op, "?"), []).append(f"{count} {op}")
        rows.append({"rank": r, "node": r // result["per_node"], "pipeline stage": stage,
                     "MiB": result["parameter_bytes_per_rank"][r] / 2**20,
                     "share of 1 process": result["parameter_bytes_per_rank"][r] / whole,
                     **{f"{dim} collectives": ", ".join(ops) for dim, ops in sorted(by_dimension.items())}})
    same = [a == b for a, b in zip(result["token_ids"][0], result["one_process_token_ids"][0], strict=True)]
    checks = {"tp_pp_rendezvous_of_two_nodes": run["nodes"] == 2 == run["world_size"] // result["per_node"]}
    if run["dtype"] == "float32":  # TP sums the shares in another order: in 16-bit a near-tie may flip a token
        checks["tp_pp_tokens_equal_single_process"] = _equal(result)
    return {"rows": rows, "error": result["plain_error"], "checks": checks,
            "line": f"{sum(same)} of {len(same)} greedy tokens ({run['dtype']}) equal one process's; one process "
                    f"holds {whole / 2**20:.1f} MiB."}


def tp_cost(run: dict[str, Any], config, bench_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The collectives one tensor-parallel forward pass called, each timed at its message size from the all-reduce
    benchmark (an all-gather timed as an all-reduce of the same size, an approximation): what N processes add to
    each decode step."""
    n, tp = run["world_size"], run["tp"]
    element = roofline.element_size(run["dtype"])
    messages = {"allreduce_": config.hidden_size * element, "allgather_into_tensor_coalesced_":
                config.vocab_size // n * element}
    rows, predicted_ms = [], 0.0
    for op, count in tp["collectives_per_rank"][0].items():
        size = messages.get(op, config.hidden_size * element)
        each = all_reduce_seconds(bench_rows, size) * 1e3
        rows.append({"collective": op, "calls per token": count, "message bytes": size, "ms each (benchmark)": each})
        predicted_ms += count * each
    return {"rows": rows, "predicted_ms": predicted_ms, "step_ms": tp["step_ms"],
            "one_process_step_ms": tp["one_process_step_ms"], "processes": n,
            "metrics": {"tp_predicted_communication_ms_per_token": predicted_ms}}


def allreduce_findings(bench: dict[str, Any], *, on_gpus: bool) -> dict[str, Any]:
    """The all-reduce table, its limit (one measured copy of the message) and the headline numbers."""
    if on_gpus:
        limit = copy_bandwidth("cuda:0", "cuda:1")["bytes_per_s"]
        limit_label = "one GPU 0 to GPU 1 copy (measured)"
    else:
        limit = roofline.bandwidth_ceiling("cpu")["bytes_per_s"] / 2  # that ceiling counts a copy's reads and writes
        limit_label = "one memory copy of the message (measured)"
    rows = [{"bytes": r["bytes"], "µs": r["median_us"], "algbw GB/s": r["algbw_bytes_per_s"] / 1e9,
             "busbw GB/s": r["busbw_bytes_per_s"] / 1e9} for r in bench["rows"]]
    best = max(r["busbw_bytes_per_s"] for r in bench["rows"])
    return {"rows": rows, "limit": limit, "limit_label": limit_label,
            "line": f"best bus bandwidth {best / 1e9:.3g} GB/s = {best / limit:.1%} of the {limit_label}, "
                    f"{limit / 1e9:.3g} GB/s",
            "metrics": {"allreduce_best_busbw_gb_per_s": best / 1e9,
                        "allreduce_smallest_us": bench["rows"][0]["median_us"],
                        "allreduce_fraction_of_copy": best / limit}}


def four_bit_findings(four_bit, name: str) -> dict[str, Any]:
    """A 4-bit (NF4) model placed with ``device_map="auto"``: where it went, its footprint against the plan, and that
    it generates."""
    from labkit import quant

    placed = getattr(four_bit, "hf_device_map", {"": str(four_bit.device)})
    planned = memory_needed(empty_model(name), fmt="nf4")["weights"]
    measured = sum(quant.count_footprint(four_bit).values())  # bitsandbytes' scales included
    ids = outputs.generate_exactly(four_bit, outputs.random_prompt(four_bit, batch=1, length=8), 4)
    return {"line": f"{name} in nf4 with device_map='auto': placed on {sorted(set(map(str, placed.values())))}; "
                    f"{measured / 2**20:.2f} MiB measured (with the scales), {planned / 2**20:.2f} MiB planned",
            "metrics": {"nf4_device_map_mib": measured / 2**20},
            "checks": {"nf4_device_map_matches_plan": abs(measured / planned - 1) < 0.01 and ids.shape[1] == 12}}
