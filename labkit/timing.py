"""Correct timings: warm-up, repeats, median and spread, CUDA events, peak memory, OOM-proof sweeps.

On CUDA, kernels run asynchronously: a wall clock around a call measures only the launch. Each
repeat is therefore bracketed by CUDA events and the end event is synchronised, as PyTorch's own
benchmarking recipes do. On CPU, ``time.perf_counter`` around the call is correct.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from labkit.errors import BadParameter


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default does."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is outside 0..100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Timing:
    """The result of timing one call: milliseconds per call and, on CUDA, peak memory."""

    device: str
    warmup: int
    repeats: int
    times_ms: list[float] = field(repr=False)
    peak_memory_bytes: int | None = None

    @property
    def median_ms(self) -> float:
        return percentile(self.times_ms, 50)

    @property
    def p10_ms(self) -> float:
        return percentile(self.times_ms, 10)

    @property
    def p90_ms(self) -> float:
        return percentile(self.times_ms, 90)

    def summary(self) -> dict[str, Any]:
        """Median, p10, p90 (ms), repeats and peak memory, ready for a table or a results file."""
        return {"median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms,
                "repeats": self.repeats, "peak_memory_bytes": self.peak_memory_bytes}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), **self.summary()}

    def __str__(self) -> str:
        memory = f", peak {self.peak_memory_bytes / 2**20:.1f} MiB" if self.peak_memory_bytes is not None else ""
        return (f"{self.median_ms:.3f} ms median (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}, "
                f"{self.repeats} runs on {self.device}{memory})")


def synchronize(device: str) -> None:
    """Wait for every queued kernel on ``device`` (a no-op on CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


def measure(fn: Callable[[], Any], *, device: str = "cpu", warmup: int = 3, repeats: int = 10) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones (CUDA events on GPU)."""
    if warmup < 0 or repeats < 1:
        raise BadParameter(f"warmup={warmup}, repeats={repeats}: warmup must be >= 0 and repeats >= 1.")
    device = str(device)
    on_cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    peak = None
    if on_cuda:
        import torch

        # Events are recorded on the current device's stream: make it the device being timed.
        with torch.cuda.device(torch.device(device)):
            torch.cuda.reset_peak_memory_stats()
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            peak = int(torch.cuda.max_memory_allocated())
    else:
        for _ in range(repeats):
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return Timing(device=device, warmup=warmup, repeats=repeats, times_ms=times, peak_memory_bytes=peak)


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA out-of-memory errors and for CPU allocations that failed."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    if isinstance(error, MemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        text in message for text in ("out of memory", "can't allocate memory", "cublas_status_alloc_failed",
                                     "cudnn_status_alloc_failed", "cudnn_status_not_enough_workspace"))


def free_memory(device: str = "cpu") -> None:
    """Give back what a failed or finished measurement held (Python garbage and the CUDA cache)."""
    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def sweep(make_call: Callable[[Any], Callable[[], Any]], values: Iterable[Any], *, device: str = "cpu",
          warmup: int = 2, repeats: int = 5, stop_after_oom: bool = True,
          on_row: Callable[[dict[str, Any]], None] | None = None, progress: bool = False,
          label: str = "sweep") -> list[dict[str, Any]]:
    """Time ``make_call(value)()`` for each value; out-of-memory becomes a row, not a crash.

    ``make_call(value)`` does the set-up (allocations) outside the timing and returns the call to
    time. After an out-of-memory row, larger values are recorded as skipped when ``stop_after_oom``.
    ``on_row`` sees each row as it is made (a live board hooks in here).
    """
    values = list(values)
    rows: list[dict[str, Any]] = []
    ran_out = None
    iterator: Iterable[Any] = values
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(values, desc=label, leave=False)
    for value in iterator:
        if ran_out is not None and stop_after_oom:
            row = {"value": value, "status": "skipped", "reason": f"a smaller value ({ran_out}) ran out of memory"}
        else:
            try:
                timing = measure(make_call(value), device=device, warmup=warmup, repeats=repeats)
                row = {"value": value, "status": "ok", **timing.summary()}
            except Exception as err:  # only out-of-memory is turned into a row
                if not is_out_of_memory(err):
                    raise
                ran_out = value
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                row = {"value": value, "status": "oom", "reason": first_line[:200]}
            finally:
                free_memory(device)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
