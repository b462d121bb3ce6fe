"""Notebook 05's topic, inference on several devices: the mechanisms too long for a cell.

Its typed :class:`Parameters`; ``device_map="auto"`` planned without a GPU (accelerate's own planning); the models
the torchrun jobs load (saved once before any job starts) and what a job needs of labkit. The jobs are scripts
(``notebooks/scripts/``), never run inside a Jupyter kernel; the notebook builds its tables from their results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import infer_auto_device_map
from accelerate.utils import CustomDtype, compute_module_sizes, get_balanced_memory
from transformers import LlamaConfig, Qwen3MoeConfig

from labkit import compat, footprint, launcher, models, probes
from labkit.errors import BadParameter, ModelNotAvailable, check_sizes
from labkit.footprint import USABLE_FRACTION
from labkit.paths import cache_dir

# Random-init models the layouts run besides the learner's model (built from a config, saved once in labkit's
# cache, no download). "layers-llama" is shaped so that its layers, not Python, take a decode step's time on a
# CPU (4 layers of width 512, a 512-token vocabulary): the pipeline's bubble shows. "tiny-moe" is a Qwen3-MoE
# mixture of experts: 4 experts per layer, 2 chosen per token.
LAYOUT_MODELS = ("layers-llama", "tiny-moe")


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
        config = models.model_config(self.model_id)
        if not getattr(config, "base_model_tp_plan", None):  # transformers splits a model by its architecture's plan
            raise BadParameter(f"model_id={self.model_id!r}: transformers has no tensor-parallel plan for "
                               f"{config.model_type} models; use a Llama-family causal model such as tiny-llama, "
                               "smollm2-135m or random-llama-1b.")
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
                f"({self.job_dtype}) on {where}, with {self.processes} processes.")


def plan_device_map(model, devices: list[dict[str, Any]], *, fmt: str = "16-bit") -> list[dict[str, Any]]:
    """Where ``from_pretrained(device_map="auto")`` would put each block of ``model`` on ``devices``, planned by
    accelerate from the shapes alone (no GPU needed): one row per block (embeddings, each decoder layer, norm, output
    layer), with its device and its bytes as accelerate counts them in ``fmt`` (a 4-bit weight as half a byte, its
    scales left to the margin). "auto" first shares the model out evenly between the GPUs; what does not fit on them
    goes to "cpu". Decoder layers are never split."""
    footprint.check_format(fmt)
    dtype, special = torch.bfloat16, {}
    if fmt != "16-bit":  # the linear layers' weights in fmt; embeddings, norms and the output layer stay 16-bit
        quantized = {id(m) for m in footprint.quantized_linears(model)}
        linear = {f"{name}.weight" for name, m in model.named_modules() if id(m) in quantized}
        dtype = torch.int8 if fmt in ("int8", "torchao-int8", "torchao-float8") else CustomDtype.INT4
        special = {name: torch.bfloat16 for name, _ in [*model.named_parameters(), *model.named_buffers()]
                   if name not in linear}
    no_split = list(model._no_split_modules or [])
    max_memory = {**{i: int(d["bytes"] * USABLE_FRACTION) for i, d in enumerate(devices)}, "cpu": 2**62}
    # accelerate warns that typed-in devices are "not available": planning for them is the point here
    with compat.quiet_logger("accelerate.utils.modeling"):
        if len(devices) > 1:
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype, special_dtypes=special)
        device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=dtype, special_dtypes=special,
                                           no_split_module_classes=no_split)
    sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special)  # a tied output layer: counted once
    return [{"block": name, "device": device_of(name, device_map), "bytes": sizes.get(name, 0)}
            for name in blocks(model)]


def device_of(name: str, device_map: dict[str, Any]) -> Any:
    """The device a module or parameter ``name`` gets from ``device_map`` (longest matching prefix), or None."""
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(keys, key=len)] if keys else None


def blocks(model) -> list[str]:
    """The model's blocks in order, as a device map can place them: embeddings, each decoder layer, norm, head."""
    no_split, out = set(model._no_split_modules or []), []
    for name, module in model.named_modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if name and not any(name.startswith(b + ".") for b in out) and (type(module).__name__ in no_split or own):
            out.append(name)
    return out


def layout_config(name: str):
    """The config of one of :data:`LAYOUT_MODELS` (a new object every call)."""
    shared = {"vocab_size": 512, "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False,
              "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if name == "layers-llama":
        return LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                           **shared)
    if name == "tiny-moe":
        return Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, head_dim=16, num_experts=4, num_experts_per_tok=2, **shared)
    raise BadParameter(f"{name!r} is not a layout model; use one of {', '.join(LAYOUT_MODELS)}.")


def model_folder(name: str, dtype: Any = "float32") -> Path:
    """A folder ``from_pretrained`` can load ``name`` from (``DistributedConfig`` splits a model while loading it):
    a layout model or a labkit random-init model saved once in labkit's cache with a fixed seed, or the model's own
    folder. The launching process calls it before any job starts (``Parameters.resolve``): the jobs only read it."""
    dtype = probes.resolve_dtype(dtype)
    if name not in LAYOUT_MODELS:
        return Path(models.folder_for_processes(name, dtype))

    def build(work: Path) -> None:
        with models.quiet_transformers():
            models.build_from_config(layout_config(name), dtype=dtype).save_pretrained(work)

    folder = cache_dir() / "models" / f"{name}-seed0-{str(dtype).removeprefix('torch.')}"
    return models.saved_folder(folder, build, tokenizer=False)


# --------------------------------------------------------------------------- inside a torchrun job

def local_device() -> str:
    """This process's device: its own GPU (LOCAL_RANK) where there are GPUs, else the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return f"cuda:{torch.cuda.current_device()}"

