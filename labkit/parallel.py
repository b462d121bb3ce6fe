"""Inference on several devices: how much memory a model needs, where its layers go, and the torchrun jobs.

Three ways to spread inference, taught by notebook 05:
- pipeline (model) placement: ``device_map`` puts consecutive layers on consecutive devices; it buys capacity;
- tensor parallelism: every layer's matrices are split across ranks (transformers' ``DistributedConfig``);
- data parallelism: one whole replica per rank, the prompts split between them.
The jobs themselves run under ``torchrun`` (scripts in ``notebooks/scripts/``), never inside a Jupyter kernel.
"""

from __future__ import annotations

import contextlib
import json
import logging
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

from labkit import compat
from labkit.errors import BadParameter, LabkitError, check_sizes

GIB = 2**30
# Share of each device's memory a plan may fill. The rest is a planning margin (our choice, not a measurement)
# for the CUDA context, activations and allocator fragmentation.
USABLE_FRACTION = 0.9

# Architecture shapes of public models, as configs only (meta device: nothing is downloaded or allocated).
# Numbers from the models' published config.json files.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-8b-shape": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-70b-shape": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                            num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}


class LaunchFailed(LabkitError, RuntimeError):
    """A torchrun job exited with an error; the message ends with the job's last lines of output."""


# --------------------------------------------------------------------------- devices, real or typed in

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(g|gb|gib|m|mb|mib|t|tb|tib)\s*$", re.IGNORECASE)
_UNITS = {"g": GIB, "m": 2**20, "t": 2**40}


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
    example = "write devices like '2 x 24 GB', '8 x 80 GB' or '24 GB + 12 GB'"
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


def devices_present() -> list[dict[str, Any]]:
    """This machine's CUDA GPUs with their total memory (an empty list without a GPU)."""
    import torch

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
    """The config of ``name``: a shape of :data:`SHAPES`, a labkit random-init model, or a local folder / cached hub id."""
    from transformers import AutoConfig, LlamaConfig

    from labkit import models

    if name in SHAPES:
        return LlamaConfig(**SHAPES[name])
    if name in models.EMBEDDED and models.EMBEDDED[name].kind == "random":
        tokenizer = models.load_tokenizer(name)
        special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id}
        return models.random_config(name, len(tokenizer), special)
    problem = models.check_model(name)
    if problem:
        raise models.ModelNotAvailable(problem)
    with models._quiet_transformers():
        return AutoConfig.from_pretrained(str(models._resolve_folder(name)))


def empty_model(name: str):
    """A causal LM with the architecture of ``name`` on the meta device: its shapes, without memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config(name), dtype=torch.bfloat16)


def memory_needed(model, *, fmt: str = "16-bit", batch: int = 1, context: int = 4096, element_bytes: int = 2) -> dict[str, int]:
    """Bytes to serve ``model``: its weights stored in format ``fmt`` (see labkit.quant) and the KV cache of
    ``batch`` sequences of ``context`` tokens, both with ``element_bytes`` per unquantized number (2: 16-bit).
    Activations are small beside these at decode time and are left to the planning margin."""
    from labkit.quant import predict_footprint
    from labkit.roofline import kv_cache_bytes

    check_sizes(1, batch=batch, context=context)
    if element_bytes not in (1, 2, 4):
        raise BadParameter(f"element_bytes={element_bytes!r}: use 1, 2 (16-bit) or 4 (float32).")
    weights = predict_footprint(model, fmt, sixteen_bit_bytes=element_bytes)
    kv = kv_cache_bytes(model.config, batch=batch, context=context,
                        dtype={1: "int8", 2: "float16", 4: "float32"}[element_bytes])
    return {"weights": weights["stored"] + weights["constants"], "kv_cache": kv,
            "total": weights["stored"] + weights["constants"] + kv}


def cache_bytes(output) -> int:
    """Bytes of the keys and values held in the cache a forward pass returned (``model(..., use_cache=True)``)."""
    cache = compat.output_cache(output)
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
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


# --------------------------------------------------------------------------- placement: device maps

def _planning_dtypes(model, fmt: str):
    """accelerate's size arguments for a format: linear weights in ``fmt``, everything else 16-bit."""
    import torch
    from accelerate.utils import CustomDtype

    from labkit.quant import _linear_weights, check_format

    check_format(fmt)
    if fmt == "16-bit":
        return torch.bfloat16, {}
    low = torch.int8 if fmt == "int8" else CustomDtype.INT4
    linear = {f"{name}.weight" for name, _ in _linear_weights(model)}  # the output layer stays 16-bit
    special = {name: torch.bfloat16 for name, _ in model.named_parameters() if name not in linear}
    return low, special


def plan_device_map(model, devices: list[dict[str, Any]], *, fmt: str = "16-bit", cpu_bytes: int | None = None,
                    usable: float = USABLE_FRACTION, strategy: str = "auto") -> dict[str, int | str]:
    """Where ``from_pretrained(device_map=strategy)`` would put each block of ``model`` on ``devices`` (no GPU needed).

    "auto" (the same as "balanced") first shares the model out evenly between the GPUs, as transformers does;
    "sequential" fills GPU 0, then GPU 1, ... What does not fit on the GPUs goes to "cpu" (``cpu_bytes``, default:
    unlimited) and then "disk". Decoder layers are never split.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if strategy not in ("auto", "balanced", "sequential"):
        raise BadParameter(f"strategy={strategy!r}: use 'auto', 'balanced' or 'sequential'.")
    dtype, special = _planning_dtypes(model, fmt)
    no_split = list(model._no_split_modules or [])
    max_memory: dict[int | str, int] = {i: int(d["bytes"] * usable) for i, d in enumerate(devices)}
    max_memory["cpu"] = cpu_bytes if cpu_bytes is not None else 2**62
    # accelerate warns that typed-in devices are "not available": planning for them is the point here
    with _quiet_logger("accelerate.utils.modeling"):
        if strategy != "sequential" and len(devices) > 1:
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype, special_dtypes=special)
        return dict(infer_auto_device_map(model, max_memory=max_memory, dtype=dtype, special_dtypes=special,
                                          no_split_module_classes=no_split))


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return [n for n in names if device_of(n, device_map) is None]


def blocks(model) -> list[str]:
    """The model's blocks in order, as a device map can place them: embeddings, each decoder layer, norm, head."""
    no_split = set(model._no_split_modules or [])
    out: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(b + ".") for b in out):
            continue
        has_own = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        if type(module).__name__ in no_split or (has_own and not list(module.children())):
            out.append(name)
        elif has_own:
            out.append(name)
    return out


def placement(model, device_map: dict[str, Any], *, fmt: str = "16-bit") -> list[dict[str, Any]]:
    """One row per block: its name, its device, and its bytes in format ``fmt`` (scales included). A tensor two
    blocks share (tied embeddings and output layer) counts once, in the first block that holds it."""
    from labkit.quant import tensor_footprints

    sizes = {id(tensor): stored + scales for tensor, stored, scales in tensor_footprints(model, fmt)}
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
    headline = f": {errors[-1].strip()}" if errors else ""
    tail = "\n".join(lines[:summary][-6:])
    return LaunchFailed(f"{script.name} {what} failed (exit status {returncode}){headline}\n{tail}")


_ERROR_LINE = re.compile(r"^\s*(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|BadParameter|ModelNotAvailable|LaunchFailed): ")


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
        outputs = []
        try:
            for launcher in launchers:
                left = max(1.0, timeout_s - (time.perf_counter() - start))
                outputs.append(_wait(launcher, left, f"{script.name} on {nnodes} nodes", total_s=timeout_s))
        finally:
            for launcher in launchers:
                _stop(launcher)
        for node, (launcher, output) in enumerate(zip(launchers, outputs, strict=True)):
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
    import torch

    from labkit.timing import measure

    check_sizes(1, megabytes=megabytes)
    data = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=source)
    if source == "cpu" and torch.cuda.is_available():
        data = data.pin_memory()
    destination = torch.empty_like(data, device=target)
    timed = target if target.startswith("cuda") else source
    timing = measure(lambda: destination.copy_(data, non_blocking=True), device=timed, warmup=2, repeats=repeats)
    return {"source": source, "target": target, "bytes": data.numel(),
            "bytes_per_s": data.numel() / (min(timing.times_ms) / 1e3)}


# --------------------------------------------------------------------------- inside a torchrun job

def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device() -> str:
    """This process's device: its own GPU (LOCAL_RANK) where there are GPUs, else the CPU."""
    import torch

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
        raise BadParameter(f"model_id={name!r}: transformers has no tensor-parallel plan for {config.model_type} models; "
                           "use a Llama-family causal model such as tiny-llama, smollm2-135m or random-llama-1b.")


def load_tensor_parallel(name: str, *, dtype, attn_implementation: str = "sdpa"):
    """``name`` loaded with transformers' tensor-parallel plan across this job's ranks (run under torchrun)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from labkit import models

    spec = models.EMBEDDED.get(name)
    folder = models._random_folder(name, 0, dtype) if spec is not None and spec.kind == "random" \
        else models._resolve_folder(name)
    with models._quiet_transformers(), compat.cpu_accelerator_without_gpus():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn_implementation,
                                                     distributed_config=DistributedConfig(tp_plan="auto"))
    return model.eval(), models.load_tokenizer(name), torch.distributed.get_backend()



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
    import torch
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
