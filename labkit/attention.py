"""Notebook 01's topic, scaled dot-product attention: its parameters, and the mechanisms its cells call that are too
long for a cell: which backend really ran (the profiler), a call's peak extra memory, and a sweep of timed calls that
turns refusals and out-of-memory into rows and re-measures points against the trend. The formulas (FLOPs, rates,
fractions of the ceiling) and the conclusions are written in the notebook.

The backend is never inferred from the context manager's name: :func:`labkit.timing.ops_that_ran` runs the call
under the profiler and reads the ATen op that did the work.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil
import torch

from labkit import compat, models, probes, results, roofline
from labkit.errors import BadParameter, check_sizes
from labkit.probes import BACKENDS
from labkit.timing import attempt, measure, peak_extra_memory, recheck_trend, synchronize

# Relative (Frobenius) error allowed against a float64 reference, per input dtype: the 16-bit values are a few units
# of each format's rounding step (fp16 ~ 5e-4, bf16 ~ 4e-3) accumulated over a softmax.
TOLERANCES = {"float64": 1e-10, "float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


# --------------------------------------------------------------------------- the notebook's parameters

@dataclass
class Parameters(models.ModelParameters):
    """Notebook 01's parameters cell (same names, same defaults); :meth:`resolve` sizes and checks them."""

    batch: int = 0
    heads: int = 0
    seq_lengths: list[int] = field(default_factory=list)
    head_dims: list[int] = field(default_factory=lambda: [64, 128])
    repeats: int = 0
    compile_flex: Any = "auto"
    warmup: int = field(init=False, default=2)
    runnable: list[str] = field(init=False, default_factory=list)  # the backends that run here
    compile_flex_why: str = field(init=False, default="")  # why FlexAttention is not compiled ('' when it is)
    flex_seq: int = field(init=False, default=0)  # section 8's length
    math_seq: int = field(init=False, default=0)  # the longest length the MATH backend is tried at

    def resolve(self, *, device: str, quick: bool) -> str:
        """Fill the sizes left at 0/empty for ``device`` (one sentence for a bad value) and say what will run."""
        check_sizes(0, batch=self.batch, heads=self.heads, repeats=self.repeats)
        if not list(self.head_dims):
            raise BadParameter("head_dims=[]: give at least one head size, for example [64, 128].")
        check_sizes(1, **{f"seq_lengths[{i}]": n for i, n in enumerate(self.seq_lengths)},
                    **{f"head_dims[{i}]": d for i, d in enumerate(self.head_dims)})
        if self.compile_flex not in ("auto", True, False):
            raise BadParameter(f"compile_flex={self.compile_flex!r}: use 'auto', True or False.")
        on_gpu = str(device).startswith("cuda")
        if on_gpu:  # sizes that show the trend and finish quickly on this device
            lengths, batch, heads = [512, 1024, 2048, 4096] + ([] if quick else [8192, 16384]), 4, 16
        else:
            lengths, batch, heads = ([128, 256, 512] if quick else [256, 512, 1024, 2048]), 1, 4 if quick else 8
        self.batch, self.heads = self.batch or batch, self.heads or heads
        self.seq_lengths = sorted(set(self.seq_lengths or lengths))
        self.head_dims, self.warmup, self.repeats = sorted(set(self.head_dims)), 1 if quick else 2, self.repeats or 5
        self.resolve_model(device)  # dtype, max_new_tokens and model_id: a wrong name stops here
        self.runnable = [b for b in BACKENDS if probes.try_sdpa(device, self.dtype, "plain", b)["ok"]]
        # Compiling FlexAttention's CPU kernel takes longer than a whole quick run the first time: quick CPU runs
        # measure the uncompiled path, and say so.
        compiled = (on_gpu or not quick) if self.compile_flex == "auto" else self.compile_flex
        self.compile_flex_why = "" if compiled else (
            "compile_flex=False" if self.compile_flex is False else
            "compiling FlexAttention for a CPU takes longer than a quick run allows; run with quick=False or "
            "compile_flex=True to measure it")
        self.compile_flex = compiled
        self.flex_seq = min(self.seq_lengths[-1], 8192)
        # the longest length at which the MATH backend's scores fit (the shortest when none does)
        fitting = [n for n in self.seq_lengths if not math_too_big(device, self.batch, self.heads, n)]
        self.math_seq = max(fitting, default=self.seq_lengths[0])
        return (f"Backends that run here: {', '.join(self.runnable)}. Sweep: batch {self.batch}, heads {self.heads}, "
                f"lengths {self.seq_lengths}, head sizes {self.head_dims}.")


def score_matrix_bytes(batch: int, heads: int, seq_q: int, seq_k: int, dtype: Any = "float32") -> int:
    """Bytes of one (batch, heads, seq_q, seq_k) score matrix: what the math backend materialises."""
    check_sizes(1, batch=batch, heads=heads, seq_q=seq_q, seq_k=seq_k)
    return batch * heads * seq_q * seq_k * roofline.element_size(dtype)


def refusal(call: Callable[[], Any], device: str, backend: str) -> str:
    """Run ``call`` once: '' when it ran, else torch's reason why ``backend`` refused these inputs.

    Errors other than a refusal (out-of-memory, a kernel failure) are raised.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
            synchronize(device)
            return ""
        except RuntimeError as err:
            error = str(err)
            if "No available kernel" not in error and "No viable backend" not in error:
                raise
    return probes.explain_refusal(error, caught, [backend], device)


def math_too_big(device: str, batch: int, heads: int, seq: int) -> str:
    """Why the math backend is not even tried at this size ('' when it is): its float32 scores would not fit."""
    needed = 2 * score_matrix_bytes(batch, heads, seq, seq, "float32")  # scores and their softmax
    on_gpu = str(device).startswith("cuda")  # what can be allocated: the driver's answer, or the system's
    free = probes.gpu_memory_allowed(device) if on_gpu else psutil.virtual_memory().available  # the hub's share too
    if needed > free / 4:
        return (f"the math backend would materialise {needed / 2**30:.1f} GiB of scores, more than a quarter of "
                f"the {free / 2**30:.1f} GiB free")
    return ""


# --------------------------------------------------------------------------- one timed call, and a series rechecked

# The measured keys of :func:`time_call`; they stay None where nothing was measured (refused, skipped, oom).
MEASURED = ("ms", "p10 ms", "p90 ms", "peak MiB")


def time_call(call: Callable[[], Any], device: str, backend: str | None = None, *, memory: bool = True,
              warmup: int = 2, repeats: int = 5) -> dict[str, Any]:
    """One point of a sweep: ``call`` timed by the workbook's rule (:func:`labkit.timing.measure`: median, p10, p90
    in ms) and, with ``memory``, its peak extra memory in MiB (:func:`labkit.timing.peak_extra_memory`).

    The bookkeeping a learner should not have to write: with ``backend``, a refusal is judged on these very inputs
    and kept with torch's reason (status "refused"); an out-of-memory (status "oom") or another kernel error
    ("failed") becomes the row's status and one-line reason instead of stopping the notebook.
    """
    def run() -> dict[str, Any]:
        refused = refusal(call, device, backend) if backend else ""
        if refused:
            return {"status": "refused", "why": refused}
        timed = measure(call, device=device, warmup=warmup, repeats=repeats)
        peak = peak_extra_memory(call, device) if memory else None
        return {"ms": timed.median_ms, "p10 ms": timed.p10_ms, "p90 ms": timed.p90_ms,
                "peak MiB": None if peak is None else peak / 2**20}

    outcome = attempt(run, device)
    row = {**dict.fromkeys(MEASURED), "status": "ok", "why": ""}
    row.update(outcome.get("value") or {"status": outcome["status"], "why": outcome["reason"]})
    return row


# Attention's work grows as N**2 at a fixed head size, so a time growing faster than this between two lengths goes
# against the cost model. The 0.5 above 2 is room for the scores leaving a cache level (our choice, not measured).
STEEPEST = 2.5


def mark_noisy(series: list[dict[str, Any]], remeasure: Callable[[dict[str, Any]], dict[str, Any]], *,
               work: str = "n") -> list[dict[str, Any]]:
    """The timing rule's last step for one series (rows of :func:`time_call` whose ``work`` grows): points whose time
    fell while the work grew, or grew faster than N**STEEPEST, are measured again once (``remeasure(row)`` returns a
    fresh :func:`time_call` row), and those still against the trend get ``noisy=True``
    (:func:`labkit.timing.recheck_trend`); every row gets ``noisy``. Returns ``series``, updated in place; a notebook
    draws no conclusion from a noisy point."""
    timed = [i for i, r in enumerate(series) if r["status"] == "ok"]
    checked = recheck_trend([series[i] for i in timed], work=work, time="ms", low="p10 ms", high="p90 ms",
                            max_exponent=STEEPEST,
                            remeasure=lambda r: {k: v for k, v in remeasure(r).items() if k in MEASURED[:3] and v})
    for i, row in zip(timed, checked, strict=True):
        if row.pop("remeasured", False):
            row["why"] = (f"against the cost model (time fell as N grew, or grew faster than N^{STEEPEST}), also when "
                          "re-measured: not used" if row["noisy"]
                          else "re-measured once (it went against the cost model)")
        series[i] = row
    for row in series:
        row.setdefault("noisy", False)
    return series


def reference_sweep(head_dim: int) -> dict[str, Any]:
    """The stored reference runs' sweep points at ``head_dim``, causal, from each run's "sweep" table:
    ``{device: {(backend, n): TFLOP/s}}``."""
    found: dict[str, Any] = {}
    for device, run in results.reference_runs("01_flash_attention").items():
        if "sweep" in run.get("tables", {}):
            t = results.table(run, "sweep")
            t = t[(t["head_dim"] == head_dim) & t["causal"] & t["TFLOP/s"].notna()]
            found[device] = {(b, int(n)): float(r) for b, n, r in zip(t["backend"], t["n"], t["TFLOP/s"], strict=True)}
    return found


# ------------------------------------------------------------------- section 8: attention beyond SDPA's backends
# As the installed stack offers it (checked against torch 2.13 and transformers 5.25): a first call timed apart from
# the rest (FlexAttention compiles on its first), and transformers' ``attn_implementation`` values, built without
# downloading anything.

def timed_with_first_call(call: Callable[[], Any], device: str, *, warmup: int = 1,
                          repeats: int = 5) -> tuple[Any, dict[str, Any]]:
    """Run ``call`` once (its output, its wall time, compilation included, and the first line of each warning it
    raised), then time it by the workbook's rule (:func:`labkit.timing.measure`) with its warnings silenced
    (uncompiled FlexAttention warns once per process that it is not compiled)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        out = call()
        synchronize(device)
        first_s = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timing = measure(call, device=device, warmup=warmup, repeats=repeats)
    said = " ".join(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught))
    return out, {"ms": timing.median_ms, "p10 ms": timing.p10_ms, "p90 ms": timing.p90_ms, "first call s": first_s,
                 "warning": said}


def attn_implementation_rows() -> list[dict[str, Any]]:
    """The ``attn_implementation=`` values this transformers accepts (:func:`labkit.probes.attn_implementations`),
    the Hub kernel transformers loads instead of a missing flash-attn package when the ``kernels`` package is
    installed, and a Hub kernel id tried as a value. Nothing is downloaded: the Hub id is only tried when ``kernels``
    is absent (it then fails before any download)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_flash_attention_utils import FLASH_ATTN_KERNEL_FALLBACK

    rows = [{**r, "kernels fallback": FLASH_ATTN_KERNEL_FALLBACK.get(r["attn_implementation"], "")}
            for r in probes.attn_implementations()]
    hub = {"attn_implementation": FLASH_ATTN_KERNEL_FALLBACK.get("flash_attention_2", "kernels-community/flash-attn2"),
           "ok": None, "kernels fallback": "", "reason": "the kernels package is installed: transformers would "
                                                         "download this kernel from the Hub, so it is not tried here"}
    if importlib.util.find_spec("kernels") is None:
        config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=32)
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compat.build_model_class(LlamaForCausalLM, config, hub["attn_implementation"])
            hub.update(ok=True, reason="")
        except Exception as err:  # the error a learner would meet is the answer
            hub.update(ok=False, reason=f"{type(err).__name__}: {probes.first_line(err)}")
    return [*rows, hub]
