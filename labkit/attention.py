"""Notebook 01's topic, scaled dot-product attention measured: which backend really ran, how accurate it is, how fast
it is against the machine's ceiling, how much memory it needs, which one is best for a given shape, and today's other
options (FlexAttention, variable-length attention, the FlashAttention versions, transformers' implementations).

The backend is never inferred from the context manager's name: :func:`ops_that_ran` runs the call under
the profiler and :func:`backend_from_ops` reads the ATen op that did the work.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from labkit import compat, models, probes, results, roofline
from labkit.errors import BadParameter, check_sizes
from labkit.metrics import attention as names
from labkit.probes import BACKENDS
from labkit.timing import attempt, measure, recheck_trend, synchronize

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


# --------------------------------------------------------------------------- the notebook's plan and summary

def notebook_plan(*, device: str, quick: bool, dtype: Any = "auto", model_id: str = "smollm2-135m",
                  max_new_tokens: int = 20, batch: int = 0, heads: int = 0, seq_lengths: Sequence[int] = (),
                  head_dims: Sequence[int] = (64, 128), repeats: int = 0, compile_flex: Any = "auto") -> dict[str, Any]:
    """Notebook 01's parameters, checked (one sentence for a bad one), and the sizes left at 0 filled for ``device``."""
    sizes = plan_sweep(device, quick=quick, batch=batch, heads=heads, seq_lengths=seq_lengths, head_dims=head_dims,
                       repeats=repeats)
    check_sizes(1, max_new_tokens=max_new_tokens)
    if compile_flex not in ("auto", True, False):
        raise BadParameter(f"compile_flex={compile_flex!r}: use 'auto', True or False.")
    dtype = probes.resolve_dtype(dtype, device)
    probes.check_dtype(device, dtype)
    model_problem = models.check_model(model_id)  # a wrong name stops here; a missing package is skipped later
    runnable = [b for b in BACKENDS if probes.try_sdpa(device, dtype, "plain", b).ok]
    on_gpu = str(device).startswith("cuda")
    line = (f"Backends that run here: {', '.join(runnable)}. Sweep: batch {sizes['batch']}, heads {sizes['heads']}, "
            f"lengths {sizes['seq_lengths']}, head sizes {sizes['head_dims']}.")
    # Compiling FlexAttention's CPU kernel takes longer than a whole quick run the first time: quick CPU runs
    # measure the uncompiled path, and say so.
    compiled = (on_gpu or not quick) if compile_flex == "auto" else compile_flex
    why_not = "" if compiled else (
        "compile_flex=False" if compile_flex is False else
        "compiling FlexAttention for a CPU takes longer than a quick run allows; run with quick=False or "
        "compile_flex=True to measure it")
    return {"dtype": dtype, "line": line, **sizes, "runnable": runnable, "model_problem": model_problem,
            "compile_flex": compiled, "compile_flex_why": why_not, "flex_seq": min(sizes["seq_lengths"][-1], 8192),
            "math_seq": math_seq(device, sizes["batch"], sizes["heads"], sizes["seq_lengths"])}


def math_seq(device: str, batch: int, heads: int, seq_lengths: Sequence[int]) -> int:
    """The longest of ``seq_lengths`` at which the sweep tries the MATH backend (its scores fit, :func:`_math_too_big`);
    the shortest when none does."""
    fitting = [n for n in seq_lengths if not _math_too_big(device, batch, heads, n)]
    return max(fitting) if fitting else min(seq_lengths)


def what_you_measured(results: dict[str, Any]) -> list[str]:
    """Notebook 01's results in a few sentences (each one only when its part ran)."""
    m, checks, lines = results["metrics"], results["checks"], []
    math_p = m.get(names.memory_growth_exponent("MATH"))
    fused = [(b, m[names.memory_growth_exponent(b)]) for b in BACKENDS[1:] if names.memory_growth_exponent(b) in m]
    if math_p is not None:
        peak = m.get(names.MATH_PEAK)
        lines.append(f"Memory: the MATH backend's extra memory grew like N^{math_p:.2f}"
                     + (f" and peaked at {peak:.1f} score matrices" if peak is not None else "")
                     + ("; " + ", ".join(f"{b}'s like N^{p:.2f}" for b, p in fused)
                        + ": a fused kernel never holds the N x N scores." if fused else "."))
    if names.BEST_TFLOPS in m:
        ratio = m.get(names.PYTORCH_CHOICE_VS_BEST)
        lines.append(f"Speed: the fastest backend at the longest causal shape ran at {m[names.BEST_TFLOPS]:.3g} "
                     f"TFLOP/s, {100 * m[names.BEST_FRACTION]:.0f}% of this machine's measured matmul ceiling"
                     + (f"; PyTorch's own choice took {ratio:.2f}x its time." if ratio is not None else "."))
    exponents = [(b, m[names.time_exponent(b)]) for b in BACKENDS if names.time_exponent(b) in m]
    if exponents:
        lines.append("Time grew like " + ", ".join(f"N^{p:.2f} ({b})" for b, p in exponents)
                     + " between the two longest lengths. The work grows like N^2: below 2, fixed costs still weigh "
                       "at those lengths; above 2, each unit of work got slower (caches, or a busy machine).")
    if m.get(names.NOISY_POINTS):
        lines.append(f"{m[names.NOISY_POINTS]:.0f} sweep point(s) stayed against the trend when re-measured: marked "
                     "noisy and left out of these conclusions.")
    flex = []
    for mask in names.MASKS:
        sdpa = m.get(names.masked(mask, "sdpa"))
        ran = [(i, m[names.masked(mask, i)]) for i in names.IMPLEMENTATIONS[1:] if names.masked(mask, i) in m]
        if sdpa is not None and ran:
            impl, ms = ran[-1]
            flex.append(f"{ms:.3g} ms against SDPA's {sdpa:.3g} ms for a {mask} mask ({impl.replace('_', ' ')})")
    if flex:
        lines.append("FlexAttention took " + "; ".join(flex) + ".")
    if checks.get("a_list_runs_in_pytorchs_order_without_set_priority"):
        lines.append("A list given to sdpa_kernel only allowed backends: both orders of the same list ran the same "
                     "one.")
    return lines


# --------------------------------------------------------------------------- inputs, reference, errors

def backend_names(backends: str | Iterable[str] | None = None) -> list[str]:
    """Check backend names ("MATH", "FLASH_ATTENTION", ...); None means all of them."""
    if backends is None:
        return list(BACKENDS)
    listed = [backends] if isinstance(backends, str) else list(backends)
    listed = [str(n).strip().upper() for n in listed]
    unknown = [n for n in listed if n not in BACKENDS]
    if unknown or not listed:
        raise BadParameter(f"backends={backends!r}: use one or more of {', '.join(BACKENDS)}.")
    return listed


def sdp_backends(backend_list: str | Iterable[str]) -> list[SDPBackend]:
    """The ``torch.nn.attention.SDPBackend`` members for some backend names."""
    return [getattr(SDPBackend, n) for n in backend_names(backend_list)]


def random_qkv(batch: int, heads: int, seq: int, head_dim: int, *, device: str = "cpu", dtype: Any = "float32",
               seed: int = 0, seq_k: int | None = None):
    """Fresh random query, key, value of shape (batch, heads, seq, head_dim), reproducible by ``seed``."""
    seq_k = seq if seq_k is None else seq_k
    check_sizes(1, batch=batch, heads=heads, seq=seq, seq_k=seq_k, head_dim=head_dim)
    generator = torch.Generator(device=device).manual_seed(seed)
    torch_dtype = probes.resolve_dtype(dtype, device)
    q = torch.randn(batch, heads, seq, head_dim, generator=generator, device=device, dtype=torch_dtype)
    k = torch.randn(batch, heads, seq_k, head_dim, generator=generator, device=device, dtype=torch_dtype)
    v = torch.randn(batch, heads, seq_k, head_dim, generator=generator, device=device, dtype=torch_dtype)
    return q, k, v


def naive_attention(q, k, v, *, causal: bool = False):
    """Attention written out: softmax(Q K^T / sqrt(d)) V, with the full score matrix in memory."""
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
    check_sizes(1, batch=batch, heads=heads, seq_q=seq_q, seq_k=seq_k)
    return batch * heads * seq_q * seq_k * roofline.element_size(dtype)


def sdpa_call(q, k, v, backends: str | Iterable[str] | None = None, *, causal: bool = False,
              attn_mask=None, dropout_p: float = 0.0) -> Callable[[], Any]:
    """A call of ``F.scaled_dot_product_attention`` restricted to ``backends`` (None: PyTorch chooses)."""
    chosen = None if backends is None else sdp_backends(backends)

    def call():
        if chosen is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal)
        with sdpa_kernel(chosen):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal)

    return call


def enabled_backends() -> dict[str, bool]:
    """The global on/off flags of the four backends (what the old ``torch.backends.cuda.sdp_kernel`` sets)."""
    cuda = torch.backends.cuda
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
    return probes.explain_refusal(error, probes.refusal_reasons([str(w.message) for w in caught]), [backend], device)


def backend_from_ops(ops: Iterable[str]) -> str | None:
    """The SDPA backend that ran, read from profiler op names; None when no SDPA op was recorded."""
    for op in ops:
        for prefix, backend in OP_TO_BACKEND.items():
            if op.startswith(prefix):
                return backend
    return None


def ops_that_ran(fn: Callable[[], Any], device: str = "cpu") -> Profiled:
    """Run ``fn`` once under ``torch.profiler`` and return the op names (and GPU kernel names) it recorded."""
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
    if str(device).startswith("cuda"):
        dev = torch.device(device)
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev) - before)
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


# Section 2's requests: (what the table says, the backends allowed, set_priority); None = no sdpa_kernel at all.
REQUESTS: tuple[tuple[str, tuple[str, ...] | None, bool], ...] = (
    ("no sdpa_kernel: PyTorch chooses", None, False),
    *((f"sdpa_kernel(SDPBackend.{b})", (b,), False) for b in BACKENDS),
    ("sdpa_kernel([MATH, FLASH_ATTENTION])", ("MATH", "FLASH_ATTENTION"), False),
    ("sdpa_kernel([FLASH_ATTENTION, MATH])", ("FLASH_ATTENTION", "MATH"), False),
    ("sdpa_kernel([MATH, FLASH_ATTENTION], set_priority=True)", ("MATH", "FLASH_ATTENTION"), True),
    ("sdpa_kernel([FLASH_ATTENTION, MATH], set_priority=True)", ("FLASH_ATTENTION", "MATH"), True),
)


def ran_under(call: Callable[[], Any], device: str, backends: Sequence[str] | None,
              set_priority: bool = False) -> Profiled:
    """What the profiler saw when ``call`` ran under ``sdpa_kernel(backends, set_priority=...)`` (None: no
    sdpa_kernel). A refusal raises torch's RuntimeError."""
    if backends is None:
        return ops_that_ran(call, device)
    with sdpa_kernel(sdp_backends(backends), set_priority=set_priority):
        return ops_that_ran(call, device)


def what_ran(call: Callable[[], Any], device: str) -> list[dict[str, Any]]:
    """One row per request of :data:`REQUESTS`: what the profiler saw run, or the refusal."""
    rows = []
    for asked, backends, priority in REQUESTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # refusals are explained in section 3
                seen = ran_under(call, device, backends, priority)
            rows.append({"asked for": asked, "ran (profiler)": seen.backend, "evidence": seen.evidence})
        except RuntimeError as err:
            rows.append({"asked for": asked, "ran (profiler)": None,
                         "evidence": "refused: " + str(err).strip().splitlines()[0]})
    return rows


def what_ran_findings(rows: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """Section 2's claims: a forced backend is the one that ran; a list only allows backends, it does not order them.
    What ``set_priority=True`` did is reported, not asserted: on a CPU PyTorch tries FLASH_ATTENTION, then MATH,
    whatever the priority says."""
    ran = {r["asked for"]: r["ran (profiler)"] for r in rows}
    singles = [(asked, backends[0]) for asked, backends, _ in REQUESTS if backends and len(backends) == 1]
    forced = [(asked, b) for asked, b in singles if ran[asked]]
    plain, reverse = ran["sdpa_kernel([MATH, FLASH_ATTENTION])"], ran["sdpa_kernel([FLASH_ATTENTION, MATH])"]
    ordered = ran["sdpa_kernel([MATH, FLASH_ATTENTION], set_priority=True)"]
    lines = [f"PyTorch chose {ran['no sdpa_kernel: PyTorch chooses']}. [MATH, FLASH_ATTENTION] ran {plain} and "
             f"[FLASH_ATTENTION, MATH] ran {reverse}: "
             + ("without set_priority the order of the list made no difference." if plain == reverse else
                "the two orders ran different backends.")]
    if ordered == "MATH":
        lines.append("With set_priority=True, [MATH, FLASH_ATTENTION] ran MATH: the list's order became the order "
                     "tried.")
    else:
        lines.append(f"With set_priority=True, [MATH, FLASH_ATTENTION] still ran {ordered}"
                     + (": on a CPU, PyTorch tries FLASH_ATTENTION and then MATH, whatever the priority says."
                        if not str(device).startswith("cuda") else "."))
    return {"lines": lines, "checks": {
        "a_forced_backend_is_the_one_that_ran": (bool(forced) and all(ran[a] == b for a, b in forced), str(forced)),
        "a_list_runs_in_pytorchs_order_without_set_priority": (plain == reverse, f"{plain} vs {reverse}")}}


# --------------------------------------------------------------------------- memory (section 1)

def memory_findings(picture: list[dict[str, Any]], *, batch: int, heads: int, dtype: Any) -> dict[str, Any]:
    """What section 1's memory measurement shows: growth exponents, MATH's peak in score matrices, and whether the
    fused backends stayed below one score matrix at the longest length."""
    dtype_name = str(dtype).removeprefix("torch.")
    ok = [r for r in picture if r["status"] == "ok"]
    found: dict[str, Any] = {"lines": [], "metrics": {}, "checks": {}, "skipped": {}}
    for backend in dict.fromkeys(r["backend"] for r in ok):
        p = roofline.growth_exponent([(r["seq"], r["peak_extra_bytes"]) for r in ok if r["backend"] == backend])
        if p is not None:
            found["lines"].append(f"{backend:20s} extra memory grows like N^{p:.2f}")
            found["metrics"][names.memory_growth_exponent(backend)] = p
    if not ok:
        return found
    longest = max(r["seq"] for r in ok)
    one_matrix = score_matrix_bytes(batch, heads, longest, longest, dtype)
    math_ran = [r["seq"] for r in ok if r["backend"] == "MATH" and r["peak_extra_bytes"]]
    if math_ran:  # on a big GPU the MATH backend is not tried at the longest lengths: its longest is used
        math_n = max(math_ran)
        math_matrix = score_matrix_bytes(batch, heads, math_n, math_n, dtype)
        math_peak = peak_bytes(picture, "MATH", math_n)
        found["lines"].append(f"At N={math_n} the MATH backend's peak is {math_peak / math_matrix:.1f} score "
                              f"matrices in {dtype_name} (one is {math_matrix / 2**20:.2f} MiB)")
        found["metrics"][names.MATH_PEAK] = math_peak / math_matrix
    if names.memory_growth_exponent("MATH") in found["metrics"]:
        p = found["metrics"][names.memory_growth_exponent("MATH")]
        found["checks"]["math_memory_grows_like_n_squared"] = (p > 1.5, f"N^{p:.2f}")
    fused = [r for r in ok if r["backend"] != "MATH" and r["seq"] == longest and r["peak_extra_bytes"]]
    if fused:
        found["checks"]["fused_backends_never_hold_a_score_matrix"] = (
            all(r["peak_extra_bytes"] < one_matrix for r in fused),
            ", ".join(f"{r['backend']} {r['peak_extra_bytes'] / 2**20:.1f} MiB" for r in fused)
            + f" against one score matrix of {one_matrix / 2**20:.1f} MiB")
    else:
        found["skipped"]["fused-backend memory"] = f"no fused backend ran for {dtype_name} at N={longest}"
    return found


def peak_bytes(rows: list[dict[str, Any]], backend: str, seq: int) -> int | None:
    """The peak extra memory ``backend`` measured at length ``seq`` (None when it did not run there)."""
    found = [r["peak_extra_bytes"] for r in rows if r["backend"] == backend and r.get("seq") == seq
             and r["status"] == "ok" and r["peak_extra_bytes"] is not None]
    return found[0] if found else None


# --------------------------------------------------------------------------- eligibility, accuracy

def eligibility_cases(device: str, dtype: Any) -> list[dict[str, Any]]:
    """The inputs that decide which fused backend may run, each as arguments of :func:`labkit.probes.try_sdpa`."""
    name = str(probes.resolve_dtype(dtype, device)).removeprefix("torch.")
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
    rows = []
    for case in eligibility_cases(device, dtype):
        arguments = {k: v for k, v in case.items() if k != "case"}
        for backend in backend_names(backends):
            tried = probes.try_sdpa(device, backends=backend, **arguments)
            rows.append({"case": case["case"], "backend": backend, "ok": tried.ok, "reason": tried.reason,
                         "error": tried.error.splitlines()[0] if tried.error else ""})
    return rows


def eligibility_grid(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per case, one column per backend: did it run?"""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    return [{"case": case, **{r["backend"]: r["ok"] for r in rows if r["case"] == case}} for case in cases]


def why_not(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each refusal with torch's reason; a backend refused for every case with one reason gets one row."""
    cases = len({r["case"] for r in rows})
    reasons = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        refused = [r for r in rows if r["backend"] == backend and not r["ok"]]
        if refused and len(refused) == cases and len({r["reason"] for r in refused}) == 1:
            reasons.append({"backend": backend, "case": "every case", "why (PyTorch's words)": refused[0]["reason"]})
        else:
            reasons += [{"backend": backend, "case": r["case"], "why (PyTorch's words)": r["reason"]} for r in refused]
    return reasons


def eligibility_findings(rows: list[dict[str, Any]], runnable: Sequence[str]) -> dict[str, Any]:
    """How many cases each backend ran, and whether every refusal of a backend that exists here has torch's reason."""
    own = [r for r in rows if not r["ok"] and r["backend"] in runnable]
    return {"metrics": {names.eligible_cases(b): sum(r["ok"] for r in rows if r["backend"] == b)
                        for b in dict.fromkeys(r["backend"] for r in rows)},
            "checks": {"refusals_carry_torchs_own_reason": (
                all(not r["reason"].startswith("no reason given") for r in own), f"{len(own)} refusals")}}


def dtypes_that_run(device: str) -> tuple[list[str], dict[str, str]]:
    """The dtypes whose matrix products run on ``device`` (float32 always), and why the others are skipped."""
    ran, skipped = ["float32"], {}
    for candidate in ("float16", "bfloat16"):
        try:
            probes.check_dtype(device, probes.resolve_dtype(candidate))
            ran.append(candidate)
        except BadParameter as err:
            skipped[f"accuracy in {candidate}"] = str(err)
    return ran, skipped


def accuracy(device: str, dtypes: Sequence[str], *, backends: Sequence[str] | None = None, batch: int = 2,
             heads: int = 4, seq: int = 128, head_dim: int = 64, causal: bool = False,
             seed: int = 0) -> list[dict[str, Any]]:
    """Each backend's output against the float64 reference on fresh random inputs, per dtype.

    Rows: dtype, backend, ran, relative error, tolerance, within tolerance (or the refusal reason).
    """
    rows = []
    for dtype in dtypes:
        q, k, v = random_qkv(batch, heads, seq, head_dim, device=device, dtype=dtype, seed=seed)
        reference = reference_attention(q, k, v, causal=causal)
        dtype_name = str(q.dtype).removeprefix("torch.")
        tolerance = TOLERANCES[dtype_name]
        for backend in backend_names(backends):
            tried = probes.try_sdpa(device, dtype_name, "causal" if causal else "plain", backend, head_dim=head_dim)
            if not tried.ok:
                rows.append({"dtype": dtype_name, "backend": backend, "ran": False, "relative_error": None,
                             "tolerance": tolerance, "within_tolerance": None, "reason": tried.reason})
                continue
            error = relative_error(sdpa_call(q, k, v, backend, causal=causal)(), reference)
            rows.append({"dtype": dtype_name, "backend": backend, "ran": True, "relative_error": error,
                         "tolerance": tolerance, "within_tolerance": error <= tolerance, "reason": ""})
    return rows


def accuracy_findings(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ran = [r for r in rows if r["ran"]]
    return {"metrics": {names.relative_error(r["backend"], r["dtype"]): r["relative_error"] for r in ran},
            "checks": {"every_backend_within_tolerance": bool(ran) and all(r["within_tolerance"] for r in ran)}}


def greedy_agreement(continuations: dict[str, dict[str, Any]], reference: dict[str, Any],
                     dtype_name: str) -> dict[str, Any]:
    """How many greedy tokens of each implementation agree with ``reference`` (sdpa), as rows and metrics."""
    rows, metrics = [], {}
    for implementation, g in continuations.items():
        pairs = list(zip(g["token_ids"], reference["token_ids"], strict=False))
        agree = next((i for i, (a, b) in enumerate(pairs) if a != b), len(g["token_ids"]))
        rows.append({"attn_implementation": implementation,
                     f"tokens agreeing with sdpa ({dtype_name})": f"{agree} of {len(g['token_ids'])}",
                     "continuation": g["continuation"]})
        metrics[names.greedy_tokens_agreeing(implementation, dtype_name)] = agree
    return {"rows": rows, "metrics": metrics}


# --------------------------------------------------------------------------- the sweep

def default_sweep_sizes(device: str, quick: bool = False) -> dict[str, Any]:
    """Batch, heads, sequence lengths and head sizes that show the trend and finish quickly on this device."""
    if str(device).startswith("cuda"):
        lengths = [512, 1024, 2048, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
        return {"batch": 4, "heads": 16, "seq_lengths": lengths, "head_dims": [64, 128]}
    lengths = [128, 256, 512] if quick else [256, 512, 1024, 2048]
    return {"batch": 1, "heads": 4 if quick else 8, "seq_lengths": lengths, "head_dims": [64, 128]}


def plan_sweep(device: str, *, quick: bool = False, batch: int = 0, heads: int = 0,
               seq_lengths: Sequence[int] = (), head_dims: Sequence[int] = (64, 128),
               repeats: int = 0) -> dict[str, Any]:
    """Fill the sizes a learner left at 0/empty from :func:`default_sweep_sizes`; one sentence for bad ones."""
    check_sizes(0, batch=batch, heads=heads, repeats=repeats)
    if not list(head_dims):
        raise BadParameter("head_dims=[]: give at least one head size, for example [64, 128].")
    check_sizes(1, **{f"seq_lengths[{i}]": n for i, n in enumerate(seq_lengths)},
                **{f"head_dims[{i}]": d for i, d in enumerate(head_dims)})
    sizes = default_sweep_sizes(device, quick)
    return {"batch": batch or sizes["batch"], "heads": heads or sizes["heads"],
            "seq_lengths": sorted(set(seq_lengths or sizes["seq_lengths"])), "head_dims": sorted(set(head_dims)),
            "warmup": 1 if quick else 2, "repeats": repeats or 5}


def free_memory_bytes(device: str) -> int | None:
    """Memory free for new allocations on ``device`` (CUDA: the driver's answer; CPU: MemAvailable)."""
    if str(device).startswith("cuda"):
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


def _rates(timing, flops: int, ceiling_flops_per_s: float | None) -> dict[str, Any]:
    rate = flops / (timing.median_ms / 1e3)
    return {"median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms, "flops": flops,
            "tflops": rate / 1e12, "fraction_of_ceiling": rate / ceiling_flops_per_s if ceiling_flops_per_s else None}


def sweep(device: str, dtype: Any, *, seq_lengths: Sequence[int], head_dims: Sequence[int] = (64, 128),
          causal: Sequence[bool] = (False, True), backends: Sequence[str] | None = None, batch: int = 1,
          heads: int = 8, ceiling_flops_per_s: float | None = None, warmup: int = 2, repeats: int = 5,
          measure_memory: bool = True, recheck: bool = True, on_row: Callable[[dict[str, Any]], None] | None = None,
          progress: bool = False) -> list[dict[str, Any]]:
    """Time every backend x head size x causal x sequence length; refusals and out-of-memory become rows.

    Each row: backend, head_dim, causal, seq, status (ok / refused / failed / oom / skipped), median/p10/p90 ms,
    TFLOP/s (forward FLOPs 4*B*H*N^2*d, halved when causal), fraction of ``ceiling_flops_per_s``, the peak extra
    memory of one call, and ``noisy``/``remeasured``. Timings follow :func:`labkit.timing.measure`; with ``recheck``,
    a series whose time falls as its FLOPs grow is re-measured once at those points and the points still against
    the trend are marked ``noisy`` (:func:`labkit.timing.recheck_trend`). A refusal is judged at the real shape, with
    torch's reason; after an out-of-memory, longer sequences of that series are skipped; any other kernel error is a
    "failed" row. ``on_row`` gets each series' rows once the series is measured and rechecked.
    """
    check_sizes(1, batch=batch, heads=heads, repeats=repeats)
    check_sizes(0, warmup=warmup)
    lengths = sorted({int(n) for n in seq_lengths})
    check_sizes(1, **{f"seq_lengths[{i}]": n for i, n in enumerate(lengths)},
                **{f"head_dims[{i}]": d for i, d in enumerate(head_dims)})
    torch_dtype = probes.resolve_dtype(dtype, device)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    series = [(b, d, c) for b in backend_names(backends) for d in head_dims for c in causal]
    bar = None
    if progress:
        from tqdm.auto import tqdm  # an optional progress bar outside notebooks

        bar = tqdm(total=len(series) * len(lengths), desc="attention sweep", leave=False)

    def point(backend: str, head_dim: int, is_causal: bool, seq: int, memory: bool) -> dict[str, Any]:
        q, k, v = random_qkv(batch, heads, seq, head_dim, device=device, dtype=torch_dtype)  # same inputs each time
        call = sdpa_call(q, k, v, backend, causal=is_causal)
        refused = refusal(call, device, backend)  # the real shape, not a tiny stand-in
        if refused:
            return {"status": "refused", "reason": refused}
        timing = measure(call, device=device, warmup=warmup, repeats=repeats)
        flops = roofline.attention_flops(batch, heads, seq, seq, head_dim, causal=is_causal)
        return {**_rates(timing, flops, ceiling_flops_per_s),
                "peak_extra_bytes": peak_extra_memory(call, device) if memory else None}

    def remeasure(row: dict[str, Any]) -> dict[str, Any]:
        again = attempt(lambda: point(row["backend"], row["head_dim"], row["causal"], row["seq"], False), device)
        fresh = again.get("value") or {}
        return {k: fresh[k] for k in ("median_ms", "p10_ms", "p90_ms", "tflops", "fraction_of_ceiling") if k in fresh}

    rows: list[dict[str, Any]] = []
    for backend, head_dim, is_causal in series:
        base = {"backend": backend, "dtype": dtype_name, "head_dim": head_dim, "causal": is_causal}
        stop_reason, measured = "", []
        for seq in lengths:
            row = {**base, "seq": seq, "status": "ok", "reason": "", **dict.fromkeys(MEASURED_KEYS),
                   "noisy": False, "remeasured": False}
            too_big = _math_too_big(device, batch, heads, seq) if backend == "MATH" else ""
            if stop_reason or too_big:
                row.update(status="skipped", reason=stop_reason or too_big)
            else:  # out-of-memory and kernel failures become rows; the sweep goes on
                outcome = attempt(lambda b=backend, d=head_dim, c=is_causal, n=seq: point(b, d, c, n, measure_memory),
                                  device)
                if outcome["status"] == "ok":
                    row.update(outcome["value"])
                else:
                    row.update(status=outcome["status"], reason=outcome["reason"])
                    if outcome["status"] == "oom":
                        stop_reason = f"a shorter sequence ({seq}) ran out of memory"
            measured.append(row)
        timed = [i for i, r in enumerate(measured) if r["status"] == "ok"]
        if recheck and len(timed) > 1:
            checked = recheck_trend([measured[i] for i in timed], work="flops", remeasure=remeasure)
            for i, row in zip(timed, checked, strict=True):
                measured[i] = row
        for row in measured:
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def sweep_size(backends: Sequence[str], head_dims: Sequence[int], seq_lengths: Sequence[int],
               causal: Sequence[bool] = (False, True)) -> int:
    """How many rows :func:`sweep` returns for these arguments (a live board's total)."""
    return len(backends) * len(head_dims) * len(causal) * len(set(seq_lengths))


def usable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows a conclusion may use: measured, and not marked noisy."""
    return [r for r in rows if r["status"] == "ok" and not r.get("noisy")]


def sweep_metrics(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Every measured point under its metric name (:mod:`labkit.metrics.attention`), None where not measured, and
    how many points stayed noisy."""
    metrics: dict[str, float | None] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        peak = r["peak_extra_bytes"]
        values = {"ms": r["median_ms"], "tflops": r["tflops"], "fraction_of_ceiling": r["fraction_of_ceiling"],
                  "peak_mib": None if peak is None else peak / 2**20}
        for what, value in values.items():
            metrics[names.sweep(r["backend"], r["head_dim"], r["causal"], r["seq"], what)] = value
    metrics[names.NOISY_POINTS] = sum(bool(r.get("noisy")) for r in rows)
    return metrics


def sweep_findings(rows: list[dict[str, Any]], *, head_dim: int, runnable: Sequence[str]) -> dict[str, Any]:
    """What the sweep shows, from the points a conclusion may use (:func:`usable`): lines to print, the time
    exponents, the best point, and the points this machine could not measure."""
    found: dict[str, Any] = {"lines": [], "metrics": {}, "checks": {}, "skipped": {}}
    found["checks"]["sweep_measured_every_backend_that_runs"] = all(
        any(r["backend"] == b and r["status"] == "ok" for r in rows) for b in runnable)
    for r in rows:
        where = f"{r['backend']} at N={r['seq']}, d={r['head_dim']}, {'causal' if r['causal'] else 'no mask'}"
        if r["status"] in ("failed", "refused"):
            found["lines"].append(f"{r['status'].capitalize()}: {where}: {r['reason']}")
        elif r["status"] in ("oom", "skipped"):  # points this machine could not hold: recorded, the sweep went on
            found["skipped"][f"sweep {where}"] = r["reason"]
    noisy = [r for r in rows if r.get("noisy")]
    if noisy:
        found["lines"].append(f"{len(noisy)} point(s) took less time than a point with less work, again when "
                              "re-measured: marked noisy in the table and the figure, and left out below.")
    good = usable(rows)
    if not good:
        return found
    best = max(good, key=lambda r: r["tflops"])
    found["lines"].append(f"Best point: {best['backend']} at N={best['seq']}, d={best['head_dim']}, "
                          f"{'causal' if best['causal'] else 'no mask'}: {best['tflops']:.3g} TFLOP/s"
                          + (f", {100 * best['fraction_of_ceiling']:.0f}% of the matmul ceiling"
                             if best["fraction_of_ceiling"] is not None else ""))
    headline = [r for r in good if r["head_dim"] == head_dim and r["causal"]]
    for backend in dict.fromkeys(r["backend"] for r in headline):
        mine = [r for r in headline if r["backend"] == backend]
        time_p = roofline.growth_exponent([(r["seq"], r["median_ms"]) for r in mine])
        rate_p = roofline.growth_exponent([(r["seq"], r["tflops"]) for r in mine])
        if time_p is not None:
            trend = "rising" if rate_p > 0.05 else "falling" if rate_p < -0.05 else "flat"
            found["lines"].append(f"{backend}: between the two longest lengths, time grows like N^{time_p:.2f}; "
                                  f"TFLOP/s {trend}")
            found["metrics"][names.time_exponent(backend)] = time_p
    full = [r for r in good if r["head_dim"] == head_dim and not r["causal"]]
    halves = []
    for backend in dict.fromkeys(r["backend"] for r in headline):
        both = {r["seq"] for r in headline if r["backend"] == backend} & {r["seq"] for r in full
                                                                         if r["backend"] == backend}
        if both:
            n = max(both)
            causal_ms = next(r["median_ms"] for r in headline if r["backend"] == backend and r["seq"] == n)
            full_ms = next(r["median_ms"] for r in full if r["backend"] == backend and r["seq"] == n)
            halves.append(f"{backend} {causal_ms / full_ms:.2f}x at N={n}")
    if halves:
        found["lines"].append(f"Causal against no mask (d={head_dim}), the time ratio: " + ", ".join(halves)
                              + " (half the work; 0.50x would be half the time)")
    longest = max((r["seq"] for r in headline), default=None)
    for r in headline:
        if r["seq"] == longest:
            memory = f", {r['peak_extra_bytes'] / 2**20:.1f} MiB extra" if r["peak_extra_bytes"] is not None else ""
            share = f"{100 * r['fraction_of_ceiling']:.0f}% of the matmul ceiling in " \
                if r["fraction_of_ceiling"] is not None else ""
            found["lines"].append(f"At N={longest} (d={head_dim}, causal) {r['backend']} reached {share}"
                                  f"{r['median_ms']:.3g} ms{memory}")
    return found


def display_row(row: dict[str, Any]) -> dict[str, Any]:
    """A sweep row in display units (ms, TFLOP/s, % of the ceiling, MiB) for a table or a live board."""
    fraction, peak = row.get("fraction_of_ceiling"), row.get("peak_extra_bytes")
    status, why = ("" if row["status"] == "ok" else row["status"]), row.get("reason", "")
    if row.get("noisy"):
        status, why = "noisy", "less time than a point with less work, also when re-measured: not used"
    elif row.get("remeasured"):
        why = "re-measured once (its time had fallen as the work grew)"
    return {"backend": row["backend"], "d": row.get("head_dim"), "causal": row.get("causal"), "N": row.get("seq"),
            "ms": row.get("median_ms"), "TFLOP/s": row.get("tflops"),
            "% of ceiling": None if fraction is None else round(100 * fraction, 1),
            "peak MiB": None if peak is None else round(peak / 2**20, 2), "status": status, "why": why}


DISPLAY_COLUMNS = ("backend", "d", "causal", "N", "ms", "TFLOP/s", "% of ceiling", "peak MiB", "status", "why")


def beside_reference_runs(rows: list[dict[str, Any]], head_dim: int) -> list[dict[str, Any]]:
    """The headline series (``head_dim``, causal) of this run beside the same points of the stored reference runs."""
    reference = results.reference_runs("01_flash_attention")
    table = []
    for r in rows:
        if r["status"] == "ok" and r["head_dim"] == head_dim and r["causal"]:
            key = names.sweep(r["backend"], head_dim, True, r["seq"], "tflops")
            table.append({"backend": r["backend"], "N": r["seq"], "this machine TFLOP/s": r["tflops"],
                          **{f"{device} TFLOP/s": run["metrics"].get(key) for device, run in reference.items()}})
    return table


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
    rows = sweep(device, dtype, seq_lengths=[seq], head_dims=[head_dim], causal=[causal], backends=candidates,
                 batch=batch, heads=heads, ceiling_flops_per_s=ceiling_flops_per_s, warmup=warmup,
                 repeats=repeats, measure_memory=False)
    q, k, v = random_qkv(batch, heads, seq, head_dim, device=device, dtype=dtype)
    default = sdpa_call(q, k, v, None, causal=causal)
    ran = ops_that_ran(default, device).backend
    timing = measure(default, device=device, warmup=warmup, repeats=repeats)
    flops = roofline.attention_flops(batch, heads, seq, seq, head_dim, causal=causal)
    rows.append({"backend": f"PyTorch's choice ({ran or 'unknown'})", "dtype": rows[0]["dtype"] if rows else "",
                 "head_dim": head_dim, "causal": causal, "seq": seq, "status": "ok", "reason": "",
                 **_rates(timing, flops, ceiling_flops_per_s), "peak_extra_bytes": None})
    measured = [r for r in rows if r["status"] == "ok" and r["backend"] in BACKENDS]
    if not measured:
        return BackendChoice(backend=None, median_ms=None, rows=rows)
    fastest = min(measured, key=lambda r: r["median_ms"])
    return BackendChoice(backend=fastest["backend"], median_ms=fastest["median_ms"], rows=rows)


def best_backend_findings(choice: BackendChoice, rows: list[dict[str, Any]], *, ceiling_flops_per_s: float,
                          device: str, dtype: Any, head_dim: int, seq: int) -> dict[str, Any]:
    """best_backend's result in words and metrics, and whether a fused backend beat MATH where both ran."""
    dtype_name = str(dtype).removeprefix("torch.")
    found: dict[str, Any] = {"lines": [], "metrics": {}, "checks": {}, "skipped": {}}
    if choice.backend is None:
        found["skipped"]["best_backend"] = f"no backend ran at N={seq}, d={head_dim} on {device}"
        return found
    fraction = choice.tflops * 1e12 / ceiling_flops_per_s
    found["lines"].append(f"best_backend chose {choice.backend}: {choice.median_ms:.3g} ms, {choice.tflops:.3g} "
                          f"TFLOP/s, {100 * fraction:.0f}% of the matmul ceiling")
    found["metrics"].update({names.BEST_TFLOPS: choice.tflops, names.BEST_FRACTION: fraction})
    pick = next(r for r in choice.rows if r["backend"].startswith("PyTorch's choice"))
    found["lines"].append(f"{pick['backend']} took {pick['median_ms']:.3g} ms "
                          f"({pick['median_ms'] / choice.median_ms:.2f}x best_backend's time)")
    found["metrics"][names.PYTORCH_CHOICE_VS_BEST] = pick["median_ms"] / choice.median_ms
    # fused against MATH at the longest length where both ran (on a big GPU MATH's scores do not fit at the longest)
    series = [r for r in usable(rows) if r["head_dim"] == head_dim and r["causal"]]
    both = sorted({r["seq"] for r in series if r["backend"] == "MATH"} & {r["seq"] for r in series
                                                                           if r["backend"] != "MATH"})
    if both:
        at_n = [r for r in series if r["seq"] == both[-1]]
        math_row = next(r for r in at_n if r["backend"] == "MATH")
        fastest = min((r for r in at_n if r["backend"] != "MATH"), key=lambda r: r["p10_ms"])
        found.setdefault("timing", {})["a_fused_backend_beats_math_at_long_n"] = (
            fastest["p10_ms"] < math_row["p10_ms"], f"N={both[-1]}: {fastest['backend']} {fastest['p10_ms']:.3g} ms "
                                                    f"vs MATH {math_row['p10_ms']:.3g} ms (fastest 10%)")
    else:
        found["skipped"]["fused vs math at long N"] = f"MATH and a fused backend never ran at one length on {device}"
    if str(device).startswith("cuda") and dtype_name == "bfloat16" and seq >= 8192:
        found["checks"]["best_backend_reaches_75_percent_of_the_matmul_ceiling"] = fraction >= 0.75
    else:
        found["skipped"]["75% of the matmul ceiling"] = ("reaching 75% of the matmul ceiling is expected only of "
                                                         f"bfloat16 on a GPU at N >= 8192; this run is {dtype_name} "
                                                         f"on {device} at N={seq}")
    return found
