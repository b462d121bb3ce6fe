"""Scaled dot-product attention, measured: which backend really ran, how accurate it is, how fast it is
against the machine's ceiling, how much memory it needs, and which one is best for a given shape.

The backend is never inferred from the context manager's name: :func:`ops_that_ran` runs the call under
the profiler and :func:`backend_from_ops` reads the ATen op that did the work.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from labkit import compat
from labkit.errors import BadParameter, check_sizes
from labkit.probes import BACKENDS

# The ATen op each backend dispatches to (a prefix: the CPU flash op is ..._flash_attention_for_cpu).
OP_TO_BACKEND = {
    "aten::_scaled_dot_product_flash_attention": "FLASH_ATTENTION",
    "aten::_scaled_dot_product_efficient_attention": "EFFICIENT_ATTENTION",
    "aten::_scaled_dot_product_cudnn_attention": "CUDNN_ATTENTION",
    "aten::_scaled_dot_product_attention_math": "MATH",
    "aten::_scaled_dot_product_fused_attention_overrideable": "OVERRIDEABLE",
}

# Relative (Frobenius) error allowed against a float64 reference, per input dtype. The 16-bit values
# are a few units of each format's rounding step (fp16 ~ 5e-4, bf16 ~ 4e-3) accumulated over a softmax.
TOLERANCES = {"float64": 1e-10, "float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


def backend_names(backends: str | Iterable[str] | None = None) -> list[str]:
    """Check backend names ("MATH", "FLASH_ATTENTION", ...); None means all of them."""
    if backends is None:
        return list(BACKENDS)
    names = [backends] if isinstance(backends, str) else list(backends)
    names = [str(n).strip().upper() for n in names]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise BadParameter(f"backends={backends!r}: use one or more of {', '.join(BACKENDS)}.")
    return names


def sdp_backends(names: str | Iterable[str]):
    """The ``torch.nn.attention.SDPBackend`` members for some backend names (a list is a priority order)."""
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, name) for name in backend_names(names)]


def random_qkv(batch: int, heads: int, seq: int, head_dim: int, *, device: str = "cpu", dtype: Any = "float32",
               seed: int = 0, seq_k: int | None = None):
    """Fresh random query, key, value of shape (batch, heads, seq, head_dim), reproducible by ``seed``."""
    import torch

    from labkit.probes import resolve_dtype

    seq_k = seq if seq_k is None else seq_k
    check_sizes(1, batch=batch, heads=heads, seq=seq, seq_k=seq_k, head_dim=head_dim)
    generator = torch.Generator(device=device).manual_seed(seed)
    torch_dtype = resolve_dtype(dtype, device)
    q = torch.randn(batch, heads, seq, head_dim, generator=generator, device=device, dtype=torch_dtype)
    k = torch.randn(batch, heads, seq_k, head_dim, generator=generator, device=device, dtype=torch_dtype)
    v = torch.randn(batch, heads, seq_k, head_dim, generator=generator, device=device, dtype=torch_dtype)
    return q, k, v


def naive_attention(q, k, v, *, causal: bool = False):
    """Attention written out: softmax(Q K^T / sqrt(d)) V, with the full score matrix in memory."""
    import math

    import torch

    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def reference_attention(q, k, v, *, causal: bool = False):
    """The float64 answer that every backend is compared with."""
    return naive_attention(q.double(), k.double(), v.double(), causal=causal)


def relative_error(output, reference) -> float:
    """||output - reference|| / ||reference|| (Frobenius), computed in float64."""
    output, reference = output.double(), reference.double()
    return float((output - reference).norm() / reference.norm())


def score_matrix_bytes(batch: int, heads: int, seq_q: int, seq_k: int, dtype: Any = "float32") -> int:
    """Bytes of one (batch, heads, seq_q, seq_k) score matrix: what the math backend materialises."""
    from labkit.roofline import element_size

    check_sizes(1, batch=batch, heads=heads, seq_q=seq_q, seq_k=seq_k)
    return batch * heads * seq_q * seq_k * element_size(dtype)


def sdpa_call(q, k, v, backends: str | Iterable[str] | None = None, *, causal: bool = False,
              attn_mask=None, dropout_p: float = 0.0) -> Callable[[], Any]:
    """A call of ``F.scaled_dot_product_attention`` restricted to ``backends`` (None: PyTorch chooses)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    chosen = None if backends is None else sdp_backends(backends)

    def call():
        if chosen is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal)
        with sdpa_kernel(chosen):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal)

    return call


def enabled_backends() -> dict[str, bool]:
    """The global on/off flags of the four backends (what the old ``torch.backends.cuda.sdp_kernel`` sets)."""
    from torch.backends import cuda

    return {"FLASH_ATTENTION": cuda.flash_sdp_enabled(), "EFFICIENT_ATTENTION": cuda.mem_efficient_sdp_enabled(),
            "MATH": cuda.math_sdp_enabled(), "CUDNN_ATTENTION": cuda.cudnn_sdp_enabled()}


# --------------------------------------------------------------------------- which kernel ran

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


def refusal(call: Callable[[], Any], device: str, backend: str) -> str:
    """Run ``call`` once: '' when it ran, else torch's reason why ``backend`` refused these inputs.

    Errors other than a refusal (out-of-memory, a kernel failure) are raised.
    """
    from labkit.probes import explain_refusal, refusal_reasons
    from labkit.timing import synchronize

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
    return explain_refusal(error, refusal_reasons([str(w.message) for w in caught]), [backend], device)


def backend_from_ops(ops: Iterable[str]) -> str | None:
    """The SDPA backend that ran, read from profiler op names; None when no SDPA op was recorded."""
    for op in ops:
        for prefix, backend in OP_TO_BACKEND.items():
            if op.startswith(prefix):
                return backend
    return None


def ops_that_ran(fn: Callable[[], Any], device: str = "cpu") -> Profiled:
    """Run ``fn`` once under ``torch.profiler`` and return the op names (and GPU kernel names) it recorded."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    on_cuda = str(device).startswith("cuda")
    if on_cuda:
        activities.append(ProfilerActivity.CUDA)
    prof = profile(activities=activities)
    with _quiet_native_stderr():
        prof.start()
    try:
        fn()
        if on_cuda:
            torch.cuda.synchronize(torch.device(device))
    finally:
        with _quiet_native_stderr():
            prof.stop()
    ops, kernels = [], []
    for event in prof.events():
        is_gpu = on_cuda and getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
        (kernels if is_gpu else ops).append(event.name)
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return Profiled(ops=list(dict.fromkeys(ops)), kernels=list(dict.fromkeys(kernels)), counts=counts)


def peak_extra_memory(fn: Callable[[], Any], device: str = "cpu") -> int | None:
    """Bytes a call allocates at its peak, above what was allocated before it (None if unmeasurable).

    On CUDA from the caching allocator's statistics; on CPU from the profiler's allocation records.
    """
    import torch

    if str(device).startswith("cuda"):
        dev = torch.device(device)
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev) - before)
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_stderr():  # the whole call: the CPU allocator logs about blocks made before profiling
        prof.start()
        try:
            fn()
        finally:
            prof.stop()
    allocations = compat.profiler_allocations(prof)
    if allocations is None:
        return None
    current = peak = 0
    for _, nbytes in allocations:
        current += nbytes
        peak = max(peak, current)
    return int(peak)


# --------------------------------------------------------------------------- eligibility, accuracy

def eligibility_cases(device: str, dtype: Any) -> list[dict[str, Any]]:
    """The inputs that decide which fused backend may run, each as arguments of :func:`labkit.probes.try_sdpa`."""
    from labkit.probes import resolve_dtype

    name = str(resolve_dtype(dtype, device)).removeprefix("torch.")
    return [
        {"case": f"{name}, 4-D, no mask (the easy case)", "dtype": name},
        {"case": "float32 inputs", "dtype": "float32"},
        {"case": f"{name}, 3-D inputs (no heads dimension)", "dtype": name, "ndim": 3},
        {"case": f"{name}, boolean attention mask", "dtype": name, "input_kind": "masked"},
        {"case": f"{name}, is_causal=True", "dtype": name, "input_kind": "causal"},
        {"case": f"{name}, dropout_p=0.1", "dtype": name, "dropout_p": 0.1},
        {"case": f"{name}, head size 72 (not a power of two)", "dtype": name, "head_dim": 72},
        {"case": f"{name}, head size 36 (not a multiple of 8)", "dtype": name, "head_dim": 36},
        {"case": f"{name}, head size 512", "dtype": name, "head_dim": 512},
    ]


def eligibility(device: str, dtype: Any, backends: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Force each backend on each case of :func:`eligibility_cases`: did it run, and if not, torch's reason."""
    from labkit.probes import try_sdpa

    rows = []
    for case in eligibility_cases(device, dtype):
        arguments = {k: v for k, v in case.items() if k != "case"}
        for backend in backend_names(backends):
            attempt = try_sdpa(device, backends=backend, **arguments)
            rows.append({"case": case["case"], "backend": backend, "ok": attempt.ok, "reason": attempt.reason,
                         "error": attempt.error.splitlines()[0] if attempt.error else ""})
    return rows


def accuracy(device: str, dtypes: Sequence[str], *, backends: Sequence[str] | None = None, batch: int = 2,
             heads: int = 4, seq: int = 128, head_dim: int = 64, causal: bool = False,
             seed: int = 0) -> list[dict[str, Any]]:
    """Each backend's output against the float64 reference on fresh random inputs, per dtype.

    Rows: dtype, backend, ran, relative error, tolerance, within tolerance (or the refusal reason).
    """
    from labkit.probes import try_sdpa

    rows = []
    for dtype in dtypes:
        q, k, v = random_qkv(batch, heads, seq, head_dim, device=device, dtype=dtype, seed=seed)
        reference = reference_attention(q, k, v, causal=causal)
        name = str(q.dtype).removeprefix("torch.")
        tolerance = TOLERANCES[name]
        for backend in backend_names(backends):
            probe = try_sdpa(device, name, "causal" if causal else "plain", backend, head_dim=head_dim)
            if not probe.ok:
                rows.append({"dtype": name, "backend": backend, "ran": False, "relative_error": None,
                             "tolerance": tolerance, "within_tolerance": None, "reason": probe.reason})
                continue
            error = relative_error(sdpa_call(q, k, v, backend, causal=causal)(), reference)
            rows.append({"dtype": name, "backend": backend, "ran": True, "relative_error": error,
                         "tolerance": tolerance, "within_tolerance": error <= tolerance, "reason": ""})
    return rows


# --------------------------------------------------------------------------- the sweep

def default_sweep_sizes(device: str, quick: bool = False) -> dict[str, Any]:
    """Batch, heads, sequence lengths and head sizes that show the trend and finish quickly on this device."""
    if str(device).startswith("cuda"):
        lengths = [512, 1024, 2048, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
        return {"batch": 4, "heads": 16, "seq_lengths": lengths, "head_dims": [64, 128]}
    lengths = [128, 256, 512] if quick else [256, 512, 1024, 2048]
    return {"batch": 1, "heads": 4 if quick else 8, "seq_lengths": lengths, "head_dims": [64, 128]}


def free_memory_bytes(device: str) -> int | None:
    """Memory free for new allocations on ``device`` (CUDA: the driver's answer; CPU: MemAvailable)."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _math_too_big(device: str, batch: int, heads: int, seq: int) -> str:
    """Why the math backend is not even tried at this size ('' when it is): its float32 scores would not fit."""
    needed = 2 * score_matrix_bytes(batch, heads, seq, seq, "float32")  # scores and their softmax
    free = free_memory_bytes(device)
    if free is not None and needed > free / 4:
        return (f"the math backend would materialise {needed / 2**30:.1f} GiB of scores, more than a quarter of "
                f"the {free / 2**30:.1f} GiB free")
    return ""


# Every sweep row has these keys; they stay None where nothing was measured (refused, skipped, out of memory).
MEASURED_KEYS = ("median_ms", "p10_ms", "p90_ms", "flops", "tflops", "fraction_of_ceiling", "peak_extra_bytes")


def sweep(device: str, dtype: Any, *, seq_lengths: Sequence[int], head_dims: Sequence[int] = (64, 128),
          causal: Sequence[bool] = (False, True), backends: Sequence[str] | None = None, batch: int = 1,
          heads: int = 8, ceiling_flops_per_s: float | None = None, warmup: int = 2, repeats: int = 5,
          measure_memory: bool = True, on_row: Callable[[dict[str, Any]], None] | None = None,
          progress: bool = False) -> list[dict[str, Any]]:
    """Time every backend x head size x causal x sequence length; refusals and out-of-memory become rows.

    Each row: backend, head_dim, causal, seq, status (ok / refused / failed / oom / skipped), median/p10/p90 ms,
    TFLOP/s (forward FLOPs 4*B*H*N^2*d, halved when causal), fraction of ``ceiling_flops_per_s`` and
    the peak extra memory of one call. A refusal is judged at the real shape, with torch's reason; after an
    out-of-memory, longer sequences of that series are skipped; any other kernel error is a "failed" row.
    """
    from labkit.probes import resolve_dtype
    from labkit.roofline import attention_flops
    from labkit.timing import attempt, measure

    check_sizes(1, batch=batch, heads=heads, repeats=repeats)
    check_sizes(0, warmup=warmup)
    lengths = sorted({int(n) for n in seq_lengths})
    check_sizes(1, **{f"seq_lengths[{i}]": n for i, n in enumerate(lengths)},
                **{f"head_dims[{i}]": d for i, d in enumerate(head_dims)})
    torch_dtype = resolve_dtype(dtype, device)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    series = [(b, d, c) for b in backend_names(backends) for d in head_dims for c in causal]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(series) * len(lengths), desc="attention sweep", leave=False)
    rows: list[dict[str, Any]] = []
    for backend, head_dim, is_causal in series:
        base = {"backend": backend, "dtype": dtype_name, "head_dim": head_dim, "causal": is_causal}
        stop_reason = ""
        for seq in lengths:
            row = {**base, "seq": seq, "status": "ok", "reason": "", **dict.fromkeys(MEASURED_KEYS)}
            too_big = _math_too_big(device, batch, heads, seq) if backend == "MATH" else ""
            if stop_reason:
                row.update(status="skipped", reason=stop_reason)
            elif too_big:
                row.update(status="skipped", reason=too_big)
            else:
                def point(seq=seq, head_dim=head_dim, backend=backend, is_causal=is_causal):
                    q, k, v = random_qkv(batch, heads, seq, head_dim, device=device, dtype=torch_dtype)
                    call = sdpa_call(q, k, v, backend, causal=is_causal)
                    refused = refusal(call, device, backend)  # the real shape, not a tiny stand-in
                    if refused:
                        return {"status": "refused", "reason": refused}
                    timing = measure(call, device=device, warmup=warmup, repeats=repeats)
                    flops = attention_flops(batch, heads, seq, seq, head_dim, causal=is_causal)
                    rate = flops / (timing.median_ms / 1e3)
                    return {"median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
                            "flops": flops, "tflops": rate / 1e12,
                            "fraction_of_ceiling": rate / ceiling_flops_per_s if ceiling_flops_per_s else None,
                            "peak_extra_bytes": peak_extra_memory(call, device) if measure_memory else None}

                outcome = attempt(point, device)  # out-of-memory and kernel failures become rows; the sweep goes on
                if outcome["status"] == "ok":
                    row.update(outcome["value"])
                else:
                    row.update(status=outcome["status"], reason=outcome["reason"])
                    if outcome["status"] == "oom":
                        stop_reason = f"a shorter sequence ({seq}) ran out of memory"
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def plan_sweep(device: str, *, quick: bool = False, batch: int = 0, heads: int = 0,
               seq_lengths: Sequence[int] = (), head_dims: Sequence[int] = (64, 128),
               repeats: int = 0) -> dict[str, Any]:
    """Fill the sizes a learner left at 0/empty from :func:`default_sweep_sizes`; one sentence for bad ones."""
    check_sizes(0, batch=batch, heads=heads, repeats=repeats)
    if not list(head_dims):
        raise BadParameter("head_dims=[]: give at least one head size, for example [64, 128].")
    sizes = default_sweep_sizes(device, quick)
    lengths = sorted(set(seq_lengths or sizes["seq_lengths"]))
    check_sizes(1, **{f"seq_lengths[{i}]": n for i, n in enumerate(lengths)},
                **{f"head_dims[{i}]": d for i, d in enumerate(head_dims)})
    return {"batch": batch or sizes["batch"], "heads": heads or sizes["heads"], "seq_lengths": lengths,
            "head_dims": sorted(set(head_dims)), "warmup": 1 if quick else 2, "repeats": repeats or 5}


def display_row(row: dict[str, Any]) -> dict[str, Any]:
    """A sweep row in display units (ms, TFLOP/s, % of the ceiling, MiB) for a table or a live board."""
    fraction, peak = row.get("fraction_of_ceiling"), row.get("peak_extra_bytes")
    return {"backend": row["backend"], "d": row.get("head_dim"), "causal": row.get("causal"), "N": row.get("seq"),
            "ms": row.get("median_ms"), "TFLOP/s": row.get("tflops"),
            "% of ceiling": None if fraction is None else round(100 * fraction, 1),
            "peak MiB": None if peak is None else round(peak / 2**20, 2),
            "status": row["status"] if row["status"] != "ok" else "", "why": row.get("reason", "")}


DISPLAY_COLUMNS = ("backend", "d", "causal", "N", "ms", "TFLOP/s", "% of ceiling", "peak MiB", "status", "why")


# --------------------------------------------------------------------------- the best backend

@dataclass
class BackendChoice:
    """The fastest backend for one shape, and the table of every candidate measured."""

    backend: str | None
    median_ms: float | None
    rows: list[dict[str, Any]]

    @property
    def tflops(self) -> float | None:
        best = [r for r in self.rows if r["backend"] == self.backend and r.get("tflops") is not None]
        return best[0]["tflops"] if best else None


def best_backend(device: str, dtype: Any, *, batch: int, heads: int, seq: int, head_dim: int,
                 causal: bool = False, candidates: Sequence[str] | None = None,
                 ceiling_flops_per_s: float | None = None, warmup: int = 2, repeats: int = 5) -> BackendChoice:
    """Measure each candidate backend that runs for this shape, dtype and device, and pick the fastest.

    Also measures PyTorch's own choice (no ``sdpa_kernel``) and names the backend it ran, from the profiler.
    """
    from labkit.roofline import attention_flops
    from labkit.timing import measure

    rows = sweep(device, dtype, seq_lengths=[seq], head_dims=[head_dim], causal=[causal], backends=candidates,
                 batch=batch, heads=heads, ceiling_flops_per_s=ceiling_flops_per_s, warmup=warmup,
                 repeats=repeats, measure_memory=False)
    for row in rows:
        row.pop("seq", None)
    q, k, v = random_qkv(batch, heads, seq, head_dim, device=device, dtype=dtype)
    default = sdpa_call(q, k, v, None, causal=causal)
    ran = ops_that_ran(default, device).backend
    timing = measure(default, device=device, warmup=warmup, repeats=repeats)
    rate = attention_flops(batch, heads, seq, seq, head_dim, causal=causal) / (timing.median_ms / 1e3)
    rows.append({"backend": f"PyTorch's choice ({ran or 'unknown'})", "dtype": rows[0]["dtype"] if rows else "",
                 "head_dim": head_dim, "causal": causal, "status": "ok", "reason": "", "median_ms": timing.median_ms,
                 "tflops": rate / 1e12, "fraction_of_ceiling": rate / ceiling_flops_per_s if ceiling_flops_per_s else None})
    measured = [r for r in rows if r["status"] == "ok" and r["backend"] in BACKENDS]
    if not measured:
        return BackendChoice(backend=None, median_ms=None, rows=rows)
    fastest = min(measured, key=lambda r: r["median_ms"])
    return BackendChoice(backend=fastest["backend"], median_ms=fastest["median_ms"], rows=rows)
