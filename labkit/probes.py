"""What this machine can do: versions, devices, SDPA backends (and why not), attention
implementations, bitsandbytes 4-bit, NCCL and GPU topology.

Every answer comes from running a tiny call, not from a capability table: the
``torch.backends.cuda.can_use_*`` helpers say False on CPU even where a backend runs.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import time
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from labkit import compat
from labkit.errors import BadParameter, first_line
from labkit.paths import cache_dir, write_atomically

BACKENDS = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
DTYPES = ("float32", "float16", "bfloat16")
INPUT_KINDS = ("plain", "causal", "masked")
PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "flash-attn", "gguf", "papermill")
_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "LABKIT_CACHE")
# torch's own names (torch.half is float16, torch.float float32, torch.double float64) and their short forms
_DTYPE_NAMES = ("float32", "float", "float16", "half", "bfloat16", "float64", "double")
_SHORT_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}


# --------------------------------------------------------------------------- versions, devices

def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_names() -> list[str]:
    """Devices worth probing: the CPU and each CUDA device."""
    return ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0))]


def environment() -> dict[str, Any]:
    """What a result depends on: platform, the versions of Python and of the packages the workbook cares about (None:
    not installed), the CPU and every CUDA device (name, compute capability, memory), the relevant environment
    variables."""
    versions = {"python": platform.python_version(), **{name: package_version(name) for name in PACKAGES},
                "torch": torch.__version__, "torch built for CUDA": torch.version.cuda or "no (CPU build)"}
    gpus = []
    for name in device_names()[1:]:
        props = torch.cuda.get_device_properties(torch.device(name))
        gpus.append({"device": name, "name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_bytes": int(props.total_memory), "multiprocessors": int(props.multi_processor_count)})
    cpu = {"device": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "platform": platform.platform(), "versions": versions,
            "devices": {"cpu": cpu, "cuda_available": torch.cuda.is_available(), "cuda": gpus},
            "environment_variables": {n: os.environ[n] for n in _ENV_VARS if n in os.environ}}


def environment_rows(env: dict[str, Any]) -> list[dict[str, str]]:
    """The environment report (or a probe report: versions and devices) as (item, value) rows for a table."""
    rows = [{"item": "platform", "value": env["platform"]}] if "platform" in env else []
    rows += [{"item": name, "value": value or "not installed"} for name, value in env["versions"].items()]
    cpu = env["devices"]["cpu"]
    rows.append({"item": "cpu", "value": f"{cpu['name']}, {cpu['cores']} cores"})
    rows += [{"item": gpu["device"], "value": f"{gpu['name']} (compute capability {gpu['capability']}, "
              f"{gpu['memory_bytes'] / 2**30:.1f} GiB)"} for gpu in env["devices"]["cuda"]]
    if not env["devices"]["cuda"]:
        rows.append({"item": "cuda", "value": "no CUDA GPU on this machine"})
    return rows + [{"item": k, "value": v} for k, v in env.get("environment_variables", {}).items()]


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo where there is one, else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.lower().startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_label(device: str) -> str:
    """A human name for a device ("cpu (x86_64, 2 cores)", "NVIDIA H100 80GB HBM3")."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def resolve_device(device: str = "auto") -> str:
    """Turn "auto"/"cpu"/"cuda"/"cuda:N" into a device this machine has, or say why not."""
    device = (device or "auto").strip().lower()
    if device in ("auto", "cpu"):
        return "cuda:0" if device == "auto" and torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise BadParameter(f"device={device!r} is not a device name; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise BadParameter(f"device={device!r} was asked for, but this machine has no usable CUDA GPU "
                           f"(torch {torch.__version__}, {build}); use device='cpu' or 'auto'.")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise BadParameter(f"device={device!r} was asked for, but this machine has only "
                           f"{torch.cuda.device_count()} CUDA device(s).")
    return f"cuda:{index}"


def resolve_dtype(dtype: Any = "auto", device: str = "cpu"):
    """Turn a dtype name ("bf16", "float16", "auto", a torch.dtype) into a torch.dtype.

    "auto" is bfloat16 on a GPU that supports it, float16 on an older GPU, float32 on CPU.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype or "auto").strip().lower().removeprefix("torch.")
    if name == "auto" and device.startswith("cuda"):
        return torch.bfloat16 if native_bf16(device) else torch.float16
    name = "float32" if name == "auto" else _SHORT_DTYPE_NAMES.get(name, name)
    if name not in _DTYPE_NAMES:
        raise BadParameter(
            f"dtype={dtype!r} is not a dtype for model weights here; use one of 'auto', 'float32', 'float16', "
            "'bfloat16' (8-bit and 4-bit weights come from bitsandbytes, notebook 04).")
    return getattr(torch, name)


GPU_SHARE = "LABKIT_GPU_SHARE"  # set per learner by the class hub (hub/classroom.py, gpu_share_env)


@functools.cache
def gpu_share() -> float | None:
    """The share of a GPU's memory this process may allocate: $LABKIT_GPU_SHARE, read once; None when unset
    (``labkit.lab.apply_gpu_share`` caps torch's allocator at it)."""
    text = os.environ.get(GPU_SHARE, "").strip()
    if not text:
        return None
    try:
        share = float(text)
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        raise BadParameter(f"{GPU_SHARE}={text!r}: give a share of the GPU's memory above 0 and at most 1, "
                           "such as 0.25.")
    return share


def gpu_memory_allowed(device: str) -> int:
    """Bytes this process may still allocate on ``device``: the driver's free memory, within the class hub's share."""
    free, total = torch.cuda.mem_get_info(torch.device(device))
    share = gpu_share()
    return free if share is None else min(free, int(share * total))


BF16_CAPABILITY = (8, 0)  # bfloat16 matrix units: Ampere (8.0) and newer; a T4 (7.5) emulates it, slowly


def native_bf16(device: str) -> bool:
    """bfloat16 arithmetic in hardware: compute capability 8.0 (Ampere) or newer, for this very device."""
    return torch.cuda.get_device_capability(torch.device(device)) >= BF16_CAPABILITY


def tiny_matmul(device: str, dtype) -> None:
    """One 8 x 8 matrix product in ``dtype`` on ``device``: raises what torch raises where it cannot run."""
    a = torch.ones(8, 8, device=device).to(dtype)
    (a @ a).float().sum().item()


def check_dtype(device: str, dtype) -> None:
    """Raise BadParameter when a small matrix product in ``dtype`` cannot run on ``device``."""
    if device.startswith("cuda") and dtype == torch.bfloat16 and not native_bf16(device):
        capability = ".".join(map(str, torch.cuda.get_device_capability(torch.device(device))))
        raise BadParameter(f"dtype bfloat16 is not native on {device} (compute capability {capability}, bf16 needs "
                           "8.0+); use dtype='float16' or 'auto'.")
    try:
        tiny_matmul(device, dtype)
    except (RuntimeError, TypeError, NotImplementedError) as err:
        raise BadParameter(f"dtype {str(dtype).removeprefix('torch.')} cannot run a matrix product on {device} "
                           f"({first_line(err)}); use dtype='auto'.") from None


# --------------------------------------------------------------------------- SDPA backends

_TRIGGERED = re.compile(r"\s*\(Triggered internally at .*\)\s*$", re.S)
_NOT_USED_HEADER = re.compile(r"^[\w\s-]+ kernel not used because:?$", re.I)


def refusal_reasons(messages: list[str]) -> list[str]:
    """The reasons in torch's SDPA warnings: every message but the "X kernel not used because:" headers."""
    reasons = [_TRIGGERED.sub("", m).strip() for m in messages]
    return list(dict.fromkeys(r for r in reasons if r and not _NOT_USED_HEADER.match(r)))


NO_REASON = "no reason given by torch"  # how explain_refusal begins when torch said nothing it could use


def explain_refusal(error: str, caught: list, backends: list[str], device: str) -> str:
    """One line saying why an SDPA call restricted to ``backends`` refused: torch's own warnings (``caught``, as
    ``warnings.catch_warnings(record=True)`` gives them) when it gave any, else what its error means."""
    reasons = refusal_reasons([str(w.message) for w in caught])
    if reasons:
        return "; ".join(reasons)
    if "No viable backend" in error:
        return f"PyTorch has no {'/'.join(backends)} kernel for {device.split(':')[0]} devices"
    return f"{NO_REASON}; its error: {first_line(error) if error.strip() else 'none'}"


def try_sdpa(device: str = "cpu", dtype: Any = "float32", input_kind: str = "plain", backends: Any = "MATH", *,
             dropout_p: float = 0.0, batch: int = 1, heads: int = 2, seq: int = 8, head_dim: int = 16,
             ndim: int = 4) -> dict[str, Any]:
    """Run one tiny SDPA call (inputs ``(batch, heads, seq, head_dim)``, or 3-D without the batch) restricted to
    ``backends``: plain, causal or with a boolean mask. Returns whether it ran (``ok``) and, if not, torch's
    ``error`` and the ``reason``."""
    torch_dtype = resolve_dtype(dtype, device)
    names = [backends] if isinstance(backends, str) else list(backends)
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise BadParameter(f"backend(s) {', '.join(map(str, unknown))} unknown; use {', '.join(BACKENDS)}.")
    if input_kind not in INPUT_KINDS:
        raise BadParameter(f"input_kind={input_kind!r}; use one of {', '.join(INPUT_KINDS)}.")
    q, k, v = (torch.randn((batch, heads, seq, head_dim)[4 - ndim:], device=device, dtype=torch_dtype) for _ in "qkv")
    mask = torch.ones(seq, seq, device=device, dtype=torch.bool).tril() if input_kind == "masked" else None
    error = ""
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel([getattr(SDPBackend, n) for n in names]):
        warnings.simplefilter("always")  # a refused backend says why in a warning, before the error
        try:
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                           is_causal=input_kind == "causal")
            if device.startswith("cuda"):
                torch.cuda.synchronize(torch.device(device))  # an asynchronous kernel failure surfaces here
        except RuntimeError as err:
            error = str(err).strip()
    return {"device": device, "dtype": str(torch_dtype).removeprefix("torch."), "input_kind": input_kind,
            "backend": "+".join(names), "ok": not error,
            "reason": explain_refusal(error, caught, names, device) if error else "", "error": error}


# --------------------------------------------------------------------------- answers that depend only on versions

def cache_key(distributions: tuple[str, ...], *, modules: tuple[str, ...] = (), devices: list[str] = ()) -> str:
    """What a probe's answer depends on: installed versions, which modules can be imported (a missing or hidden
    package), and the devices probed."""
    parts = [f"{name}={package_version(name)}" for name in distributions]
    parts += [f"{module} {'found' if importlib.util.find_spec(module) else 'missing'}" for module in modules]
    return "|".join(parts + [f"{device}={device_label(device)}" for device in devices])


def cached(name: str, key: str, build: Callable[[], list[dict[str, Any]]], *,
           use_cache: bool = True) -> list[dict[str, Any]]:
    """``build()``'s rows, or those it gave before under the same ``key`` (kept in labkit's cache as ``name``.json)."""
    path = cache_dir() / f"{name}.json"
    try:
        stored = json.loads(path.read_text()) if use_cache else {}
        if stored.get("key") == key:
            return stored["rows"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none yet, or unreadable: build it again
        pass
    rows = build()
    try:
        write_atomically(path, json.dumps({"key": key, "rows": rows}))
    except OSError:  # a read-only cache only costs the time of building the answer again
        pass
    return rows


# --------------------------------------------------------------------------- attention implementations

# The answer's layout: bump it when :func:`_build_attn_implementations` changes what it lists, so that an answer
# cached by an older labkit is rebuilt.
_ATTN_IMPLEMENTATIONS_LAYOUT = "2: labkit's own registrations left out; flash_attention_* not built beside kernels"


def attn_implementations(*, use_cache: bool = True) -> list[dict[str, Any]]:
    """Every ``attn_implementation=`` value transformers accepts, and whether a model can be built with it here.

    Built only (no forward): a flash_attention_2 without the flash-attn package fails at build time
    with ImportError, which is what a learner would meet. Where the ``kernels`` package is installed,
    transformers 5 replaces a missing flash-attn package with a Hub kernel, downloading it, so those values
    are not built (nothing here downloads). Names labkit registers itself (``labkit_*``, notebook 03's
    varlen function) are left out. The answer depends only on the installed packages, so it is cached per
    set of versions (importing transformers' modeling code takes ~2 s).
    """
    versions = cache_key(("torch", "transformers", "flash-attn", "flash_attn_3", "kernels"),
                         modules=("flash_attn", "flash_attn_3", "kernels"))
    key = f"{_ATTN_IMPLEMENTATIONS_LAYOUT}|{versions}"
    return cached("attn_implementations", key, _build_attn_implementations, use_cache=use_cache)


def kernels_installed() -> bool:
    """Whether transformers would use the ``kernels`` package (Hub kernels, downloaded on demand): installed, at a
    version this transformers accepts. transformers requires it since 5.25, so it is installed with it."""
    from transformers.utils import is_kernels_available

    return is_kernels_available()


def _build_attn_implementations() -> list[dict[str, Any]]:
    # Imported here, only when no cached answer fits: transformers' modeling code takes seconds to import, which
    # `labkit probe` would otherwise pay on every call.
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    names = ["eager"] + [n for n in AttentionInterface().valid_keys() if n != "eager" and not n.startswith("labkit_")]
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32)
    rows = []
    for name in names:
        if name.startswith("flash_attention_") and kernels_installed():
            rows.append({"attn_implementation": name, "ok": None,
                         "reason": "not tried: the kernels package is installed, so transformers would download the "
                                   "kernels-community Hub kernel in place of a missing flash-attn package"})
            continue
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compat.build_model_class(LlamaForCausalLM, config, name)
            rows.append({"attn_implementation": name, "ok": True, "reason": ""})
        except Exception as err:  # any failure to build is the answer we report
            reason = f"{type(err).__name__}: {first_line(err)}"
            rows.append({"attn_implementation": name, "ok": False, "reason": reason})
    return rows


# --------------------------------------------------------------------------- bitsandbytes, flash-attn, NCCL

def import_bitsandbytes():
    """Import bitsandbytes quietly (its CPU backend logs about optional kernels), or return None."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    try:
        with compat.quiet_logger("bitsandbytes"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes  # optional (the quant extra), and hidden by the fault matrix: imported on demand
        return bitsandbytes
    except Exception:  # a broken install counts as not importable; the reason is reported below
        return None


def bitsandbytes_4bit(devices_to_probe: list[str] | None = None, *, use_cache: bool = False) -> list[dict[str, Any]]:
    """Whether a tiny NF4 and FP4 quantized matmul runs (and is close to the float one) on each device.

    ``use_cache=True`` reuses the answer found earlier with the same torch and bitsandbytes versions on the same
    devices, without importing bitsandbytes (seconds, most of them in the torch compiler modules it pulls in):
    what ``labkit probe`` does.
    """
    chosen = devices_to_probe or device_names()

    def build() -> list[dict[str, Any]]:
        bnb = import_bitsandbytes()
        return [{"device": device, "quant_type": quant_type, **_bnb_matmul(bnb, device, quant_type)}
                for device in chosen for quant_type in ("nf4", "fp4")]

    key = cache_key(("torch", "bitsandbytes"), modules=("bitsandbytes",), devices=chosen)
    return cached("bitsandbytes_4bit", key, build, use_cache=use_cache)


def _bnb_matmul(bnb, device: str, quant_type: str) -> dict[str, Any]:
    if bnb is None:
        broken = importlib.util.find_spec("bitsandbytes") is not None
        return {"ok": False, "reason": "bitsandbytes is installed but fails to import" if broken
                else "bitsandbytes is not installed"}
    try:
        import bitsandbytes.functional as bnbf  # optional (the quant extra): imported only when it is there

        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(64, 64, generator=generator).to(device)
        x = torch.randn(4, 64, generator=generator).to(device)
        packed, state = bnbf.quantize_4bit(weight, quant_type=quant_type)
        y = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        relative_error = ((y.float() - x @ weight.t()).norm() / (x @ weight.t()).norm()).item()
    except Exception as err:  # the failure itself is the probe's answer
        return {"ok": False, "reason": f"{type(err).__name__}: {first_line(err)[:160]}"}
    if not relative_error < 0.3:
        return {"ok": False, "reason": f"runs but relative error {relative_error:.2f} is too large for 4-bit"}
    return {"ok": True, "reason": "", "relative_error": round(relative_error, 4)}


def flash_attn() -> dict[str, Any]:
    """Whether the flash-attn package (used by attn_implementation='flash_attention_2') is importable."""
    if importlib.util.find_spec("flash_attn") is None:
        return {"ok": False, "version": None, "reason": "the flash-attn package is not installed"}
    return {"ok": True, "version": package_version("flash-attn") or package_version("flash_attn"), "reason": ""}


def nccl() -> dict[str, Any]:
    """Whether torch.distributed can use NCCL (GPUs) and gloo (CPU) here."""
    if not dist.is_available():
        return {"ok": False, "gloo": False, "version": None, "reason": "torch was built without torch.distributed"}
    answer = {"ok": False, "gloo": bool(dist.is_gloo_available()), "version": None}
    if not dist.is_nccl_available():
        return {**answer, "reason": "this torch build has no NCCL (a CPU build, or not Linux); gloo is the CPU "
                                    "fallback"}
    if not torch.cuda.is_available():
        return {**answer, "reason": "NCCL is built in but there is no CUDA GPU to use it with"}
    return {**answer, "ok": True, "version": ".".join(map(str, torch.cuda.nccl.version())), "reason": ""}


def topology() -> dict[str, Any]:
    """Peer-to-peer access between every pair of GPUs (what multi-GPU transfers will use)."""
    count = len(device_names()) - 1  # the GPUs
    matrix = [[i == j or bool(torch.cuda.can_device_access_peer(i, j)) for j in range(count)] for i in range(count)]
    return {"gpus": count, "peer_access": matrix if count > 1 else [],
            "reason": "" if count > 1 else f"{count} GPU(s): no GPU-to-GPU links to probe"}


# --------------------------------------------------------------------------- the whole report (`labkit probe`)

def probe(devices_to_probe: list[str] | None = None, *, use_cache: bool = True) -> dict[str, Any]:
    """The machine report of ``labkit probe``: versions and devices (:func:`environment`), which SDPA backend runs for
    each device x dtype x input kind (with the reason when it does not), and the features. ``use_cache=False``
    rebuilds the attn_implementation and bitsandbytes answers instead of reusing those found earlier with the same
    package versions (and devices)."""
    chosen, env = devices_to_probe or device_names(), environment()
    sdpa = [{k: v for k, v in try_sdpa(device, dtype, kind, backend).items() if k != "error"}
            for device in chosen for dtype in DTYPES for kind in INPUT_KINDS for backend in BACKENDS]
    return {"versions": env["versions"], "devices": env["devices"], "sdpa": sdpa,
            "features": {"attn_implementations": attn_implementations(use_cache=use_cache),
                         "bitsandbytes_4bit": bitsandbytes_4bit(chosen, use_cache=use_cache),
                         "flash_attn": flash_attn(), "nccl": nccl(), "topology": topology()}}
