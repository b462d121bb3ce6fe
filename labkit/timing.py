"""Correct timings, by one rule for the whole workbook.

The rule:
1. **warm-up** calls first, untimed: they pay for lazy initialisation, autotuning (cuDNN, torch.compile) and caches;
2. **enough repeats**: at least ``repeats`` timed calls, and more until they fill ``min_time_s`` of measured time
   (as ``torch.utils.benchmark.Timer.blocked_autorange`` fills its ``min_run_time``), so a fast call is not judged
   on a handful of samples;
3. the **median** is the result, with **p10 and p90** (the 10th and 90th percentiles) shown as its spread;
4. a series whose trend contradicts its own cost model (time falling while the work grows, or growing faster than
   the work's power allows) is **re-measured once**
   at the offending points and, if still inconsistent, those points are marked ``noisy`` instead of being explained
   (:func:`recheck_trend`).

On CUDA, kernels run asynchronously: a wall clock around a call measures only the launch. Each repeat is therefore
bracketed by CUDA events and the end event is synchronised, as PyTorch's own benchmarking recipes do. On CPU,
``time.perf_counter`` around the call is correct. Compared implementations must be given the same inputs: build
them once, outside the timed call.

Why not ``torch.utils.benchmark.Timer``: its ``blocked_autorange`` times blocks of several calls and reports their
means, so the p10-p90 spread of single calls is not there to show; it has no warm-up count, no minimum number of
repeats and no peak memory, and it brackets CUDA calls with a synchronised wall clock rather than CUDA events.

What a call ran and allocated, from ``torch.profiler``: :func:`ops_that_ran` (the ATen ops and GPU kernels, and the
SDPA backend they prove), :func:`time_by_op` (where the time of one call went: busy time against wall time, and the
ops or kernels that took it) and :func:`peak_extra_memory`.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from labkit import compat
from labkit.errors import BadParameter, first_line


@dataclass
class Timing:
    """The result of timing one call: milliseconds per call and, on CUDA, peak memory."""

    device: str
    times_ms: list[float] = field(repr=False)
    peak_memory_bytes: int | None = None

    @property
    def repeats(self) -> int:
        return len(self.times_ms)

    @property
    def median_ms(self) -> float:
        return float(np.percentile(self.times_ms, 50))

    @property
    def p10_ms(self) -> float:
        return float(np.percentile(self.times_ms, 10))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.times_ms, 90))

    def summary(self) -> dict[str, Any]:  # the keys a table's row (and recheck_trend) reads
        return {"median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms, "repeats": self.repeats,
                "peak_memory_bytes": self.peak_memory_bytes}


def synchronize(device: str) -> None:
    """Wait for every queued kernel on ``device`` (a no-op on CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def measure(fn: Callable[[], Any], *, device: str = "cpu", warmup: int = 3, repeats: int = 10,
            min_time_s: float | None = None, max_repeats: int = 1000) -> Timing:
    """Time ``fn()`` by the workbook's rule: ``warmup`` untimed calls, then at least ``repeats`` timed ones, and more
    until ``min_time_s`` of measured time is filled (0 for exactly ``repeats``; by default 0.2 s on CUDA, 0.05 s on
    CPU: enough samples for a stable median without slowing the CPU tests)."""
    if warmup < 0 or repeats < 1 or max_repeats < repeats:
        raise BadParameter(f"warmup={warmup}, repeats={repeats}, max_repeats={max_repeats}: warmup must be >= 0 and "
                           "1 <= repeats <= max_repeats.")
    on_cuda = str(device).startswith("cuda")
    min_time_s = (0.2 if on_cuda else 0.05) if min_time_s is None else min_time_s
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    # CUDA events are recorded on the current device's stream: make it the device being timed
    with torch.cuda.device(torch.device(device)) if on_cuda else contextlib.nullcontext():
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        while len(times) < repeats or (sum(times) < 1e3 * min_time_s and len(times) < max_repeats):
            if on_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start_s = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start_s) * 1e3)
        peak = int(torch.cuda.max_memory_allocated()) if on_cuda else None
    return Timing(device=str(device), times_ms=times, peak_memory_bytes=peak)


OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                 "cudnn_status_not_enough_workspace")


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA out-of-memory errors and for CPU allocations that failed."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and any(text in str(error).lower() for text in OUT_OF_MEMORY))


def attempt(call: Callable[[], Any], device: str = "cpu") -> dict[str, Any]:
    """Run ``call()``; an out-of-memory or a kernel failure becomes a row instead of a crash.

    Returns ``{"status": "ok", "value": result}``, ``{"status": "oom", "reason": ...}`` or
    ``{"status": "failed", "reason": ...}``; any other exception is raised (a bug, not a measurement).
    What the call held is given back either way (Python garbage and the CUDA cache).
    """
    try:
        return {"status": "ok", "value": call()}
    except Exception as err:  # only out-of-memory and runtime (kernel) errors are turned into rows
        if is_out_of_memory(err):
            return {"status": "oom", "reason": first_line(err)[:200]}
        if isinstance(err, RuntimeError):
            return {"status": "failed", "reason": f"{type(err).__name__}: {first_line(err)[:200]}"}
        raise
    finally:
        gc.collect()
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- trends that contradict the cost model

def against_the_trend(points: Sequence[dict[str, Any]], *, work: str, time: str = "median_ms",
                      low: str = "p10_ms", high: str = "p90_ms", max_exponent: float | None = None) -> list[int]:
    """Indices of points against the cost model: a point's time fell although its work grew (this point's ``high``,
    p90, is below the ``low``, p10, of a point with less work), or, given ``max_exponent``, its time grew faster than
    work**max_exponent (its ``low`` above the smaller point's ``high`` times the work ratio to that power).
    ``points`` are one series (same implementation); the order does not matter. Points without a time are ignored."""
    timed = [i for i, p in enumerate(points) if p.get(time) is not None and p.get(work) is not None]
    suspects = set()
    for i, j in itertools.product(timed, timed):
        if points[j][work] < points[i][work]:
            fastest_i, slowest_i = points[i].get(low) or points[i][time], points[i].get(high) or points[i][time]
            fastest_j, slowest_j = points[j].get(low) or points[j][time], points[j].get(high) or points[j][time]
            fell = slowest_i < fastest_j
            too_steep = max_exponent is not None and points[j][work] > 0 and \
                fastest_i > slowest_j * (points[i][work] / points[j][work]) ** max_exponent
            if fell or too_steep:
                suspects.update((i, j))
    return sorted(suspects)


def recheck_trend(points: list[dict[str, Any]], *, work: str, remeasure: Callable[[dict[str, Any]], dict[str, Any]],
                  time: str = "median_ms", low: str = "p10_ms", high: str = "p90_ms",
                  max_exponent: float | None = None) -> list[dict[str, Any]]:
    """The timing rule's step 4 for one series: points :func:`against_the_trend` are measured again once
    (``remeasure(point)`` returns the new timing keys); those still against it get ``noisy=True``, the others
    ``noisy=False``. Returns the (updated) points; a notebook draws no conclusion from a noisy point."""
    rule = dict(work=work, time=time, low=low, high=high, max_exponent=max_exponent)
    for i in against_the_trend(points, **rule):
        points[i] = {**points[i], **remeasure(points[i]), "remeasured": True}
    still = set(against_the_trend(points, **rule))
    for i, point in enumerate(points):
        point["noisy"] = i in still
    return points


# --------------------------------------------------------------------------- what ran, from the profiler

OP_TO_BACKEND = {
    "aten::_scaled_dot_product_flash_attention": "FLASH_ATTENTION",
    "aten::_scaled_dot_product_efficient_attention": "EFFICIENT_ATTENTION",
    "aten::_scaled_dot_product_cudnn_attention": "CUDNN_ATTENTION",
    "aten::_scaled_dot_product_attention_math": "MATH",
    "aten::_scaled_dot_product_fused_attention_overrideable": "OVERRIDEABLE",
}


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence C++ writes to file descriptor 2 (the profiler's start/stop log lines) for a moment."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _profiled(device: str, **options):
    """``torch.profiler`` around the block (and GPU kernels on CUDA, waited for), its start and stop logs silenced."""
    on_cuda = str(device).startswith("cuda")
    prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])], **options)
    with _quiet_native_stderr():
        prof.start()
    try:
        yield prof
        synchronize(device)
    finally:
        with _quiet_native_stderr():
            prof.stop()


@dataclass
class Profiled:
    """What the profiler saw during one call: ATen op names, GPU kernel names, and the backend they prove."""

    ops: list[str]
    kernels: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # how many times each op ran

    @property
    def backend(self) -> str | None:
        return backend_from_ops(self.ops)

    @property
    def evidence(self) -> str:
        """The op (and GPU kernel) names that identify the backend, for a table."""
        ops = [op for op in self.ops if any(op.startswith(prefix) for prefix in OP_TO_BACKEND)]
        kernels = [k for k in self.kernels if any(w in k.lower() for w in ("flash", "fmha", "cudnn", "sdpa",
                                                                          "attention", "softmax", "gemm"))]
        return ", ".join(ops + kernels[:3]) or "no attention op recorded"


def backend_from_ops(ops: Iterable[str]) -> str | None:
    """The SDPA backend that ran, read from profiler op names; None when no SDPA op was recorded."""
    return next((backend for op in ops for prefix, backend in OP_TO_BACKEND.items() if op.startswith(prefix)), None)


def ops_that_ran(fn: Callable[[], Any], device: str = "cpu") -> Profiled:
    """Run ``fn`` once under ``torch.profiler`` and return the op names (and GPU kernel names) it recorded."""
    on_cuda = str(device).startswith("cuda")
    with _profiled(device) as prof:
        fn()
    ops, kernels = [], []
    for event in prof.events():
        is_gpu = on_cuda and getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
        (kernels if is_gpu else ops).append(event.name)
    return Profiled(ops=list(dict.fromkeys(ops)), kernels=list(dict.fromkeys(kernels)), counts=dict(Counter(ops)))


# the names of matrix products in a profile: ATen ops on a CPU (a batched one too: MATH attention's two products),
# cuBLAS kernels (gemm, gemv, nvjet, splitK) on a GPU
MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "gemm", "gemv", "nvjet", "splitK")


@dataclass
class OpTimes:
    """Where the time of one call went, from ``torch.profiler`` (:func:`time_by_op`)."""

    device: str
    wall_ms: float  # the whole call, profiler overhead included
    busy_ms: float  # GPU: time kernels ran on the GPU; CPU: time inside ATen ops (self times, so no double counting)
    table: Any  # a pandas DataFrame: name, calls, ms (self time), share (of busy time), by ms descending

    @property
    def busy_share(self) -> float:
        """busy / wall: near 1, the device (or the ATen kernels on a CPU) set the pace; far below, the host does."""
        return self.busy_ms / self.wall_ms if self.wall_ms else 0.0

    def ms_of(self, *names: str) -> float:
        """Self time of the ops or kernels whose name contains any of ``names``."""
        hit = self.table["name"].map(lambda n: any(part in n for part in names))
        return float(self.table.loc[hit, "ms"].sum())


def time_by_op(fn: Callable[[], Any], device: str = "cpu", *, all_threads: bool = False) -> OpTimes:
    """Run ``fn`` once under ``torch.profiler``: its wall time, the device's busy time and the time of each op.

    On CUDA the rows are GPU kernels and their device time; on a CPU they are ATen ops and their self CPU time (the
    time inside the op minus the ops it called), of the calling thread only unless ``all_threads`` (for work that
    ``fn`` hands to a thread of its own). Warm ``fn`` up before: a first call's one-off costs would show.
    """
    import pandas as pd

    on_cuda = str(device).startswith("cuda")
    every_thread = {"experimental_config": compat.all_threads_profiler_config()} if all_threads and not on_cuda else {}
    synchronize(device)
    with _profiled(device, **every_thread) as prof:
        start = time.perf_counter()
        fn()
        synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    rows = []
    for event in prof.key_averages():
        if on_cuda:
            ms = event.self_device_time_total / 1e3 if event.device_type == torch.autograd.DeviceType.CUDA else 0.0
        else:
            ms = event.self_cpu_time_total / 1e3 if event.key.startswith("aten::") else 0.0
        if ms > 0:
            rows.append({"name": event.key, "calls": int(event.count), "ms": ms})
    table = pd.DataFrame(rows, columns=["name", "calls", "ms"]).sort_values("ms", ascending=False, ignore_index=True)
    busy_ms = float(table["ms"].sum())
    table["share"] = table["ms"] / busy_ms if busy_ms else 0.0
    return OpTimes(device=str(device), wall_ms=wall_ms, busy_ms=busy_ms, table=table)


def peak_extra_memory(fn: Callable[[], Any], device: str = "cpu") -> int | None:
    """Bytes a call allocates at its peak, above what was allocated before it (None if unmeasurable).

    On CUDA from the caching allocator's statistics; on CPU from the profiler's allocation records.
    """
    if str(device).startswith("cuda"):
        dev = torch.device(device)
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev) - before)
    # the whole call silenced: the CPU allocator logs about blocks made before profiling
    with _quiet_native_stderr(), _profiled("cpu", profile_memory=True) as prof:
        fn()
    allocations = compat.profiler_allocations(prof)
    if allocations is None:
        return None
    return int(max([0, *itertools.accumulate(nbytes for _, nbytes in allocations)]))  # the running total's peak
