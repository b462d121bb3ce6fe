# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Flash Attention and the SDPA backends, measured against the machine's limit
#
# Which attention kernel runs on your machine, and how close does it come to the machine's limit? The function is
# `torch.nn.functional.scaled_dot_product_attention`, SDPA for short. It computes `softmax(Q Kᵀ / √d) V`, the heart of
# every transformer. PyTorch has several implementations of it, called **backends**. This notebook shows, on your
# machine:
#
# 1. **the picture**: attention written by hand, by you first. The MATH backend builds the score matrix; the fused
#    backends, Flash Attention, memory-efficient and cuDNN, never do. You predict its memory, then measure it. Then you
#    write the fused idea yourself, tiled attention with an online softmax, and measure its memory;
# 2. **how to force a backend** with `torch.nn.attention.sdpa_kernel`, and how the profiler *proves* which one ran.
#    Also what a *list* of backends means, and what replaced the source page's `sdp_kernel(...)`;
# 3. **eligibility**: which inputs each backend refuses, with PyTorch's own reason, and the source page's
#    `No available kernel.  Aborting execution.` with its fix;
# 4. **transformers models**: `attn_implementation="eager" | "sdpa" | "flash_attention_2"` and
#    `model.set_attn_implementation`, with identical greedy tokens in float32, and how many agree in 16-bit;
# 5. **correctness** of every backend against a float64 reference;
# 6. **the sweep**: time, TFLOP/s, fraction of the measured matmul ceiling and memory, as the sequence grows, on a
#    live board, then as figures;
# 7. **the fastest backend for your shape**, measured, against PyTorch's own choice. The profiler shows where the
#    time went: busy time against wall time, and the top ops or kernels;
# 8. **attention today**: which FlashAttention PyTorch runs, and when Flash is not the fastest. FlexAttention is
#    measured against SDPA for a causal mask and a document mask over packed sequences. Then variable-length
#    attention, and the `attn_implementation` values transformers 5 accepts.
#
# On a CPU only the MATH and FLASH_ATTENTION backends exist; the notebook says so where it matters and still runs to
# the end. Nothing here downloads anything.

# %% tags=["parameters"]
# Parameters (papermill overrides this cell). A size of 0 or an empty list means: sized for this device.
device = "auto"            # auto, cpu, cuda or cuda:N
dtype = "auto"             # dtype of the attention inputs; auto picks bfloat16 on a recent GPU, float32 on CPU
model_id = "smollm2-135m"  # a causal language model for section 4 (embedded, cached Hub id or local folder)
prompt = "Hello my dog is cute and"
max_new_tokens = 20
batch = 0                  # batch size of the sweep
heads = 0                  # attention heads of the sweep
seq_lengths = []           # sequence lengths of the sweep, for example [1024, 4096, 16384]
head_dims = [64, 128]      # head sizes of the sweep
repeats = 0                # timed calls per point, at least (0 means 5)
compile_flex = "auto"      # torch.compile FlexAttention (section 8); auto: on a GPU, and on a CPU unless quick
quick = "auto"             # small sizes: "auto" means on a machine without a GPU; True or False to force
solutions = False          # fill every exercise with its solution (a teacher's run)
results_path = ""          # where to write the results JSON (empty: do not write)

# %% tags=["install-if-missing"]
import importlib.util
import os
import runpy

if importlib.util.find_spec("labkit") is None:  # Colab, Kaggle or a fresh kernel: the workbook installs itself, once
    if not os.path.exists("../tools/install_workbook.py"):  # this notebook alone, not opened from a clone
        raise RuntimeError("labkit is missing, and this notebook is not in the notebooks/ folder of a clone of the "
                           "workbook, which would install it: clone the workbook and open this notebook from there.")
    runpy.run_path("../tools/install_workbook.py", run_name="__main__")

# %%
import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import labkit
from labkit import attention, models, outputs, plots, probes, roofline, timing, widgets
from labkit.widgets import show

lab = labkit.start("01_flash_attention", globals())

# %%
show(lab.environment_rows(), ["item", "value"], title="Environment")

# %% [markdown]
# ## 1. SDPA in one picture
#
# Attention takes a query vector `q`, a key `k` and a value `v` per position. All three have the shape
# `(batch, heads, N, d)`, with `N` positions and head size `d`. Each query is compared with every key: a dot product,
# divided by `√d`. A softmax over the keys turns those scores into weights that sum to 1. The output is the weighted
# sum of the values.
#
# **01.1 · Code.** Write it yourself: `my_attention(q, k, v)` returns `softmax(q kᵀ / √d) v`. Then set
# `answer = my_attention` and run the cell. The check calls your function on fresh random inputs and compares it
# with `F.scaled_dot_product_attention`. `ex.hint()` gives a hint, and the next call the next one; `ex.solution()`
# shows one answer.

# %%
ex = lab.exercise("01.1")


def my_attention(q, k, v):
    return None  # your code: the scores, a softmax over the keys, the weighted sum of the values


answer = None  # once my_attention is written: answer = my_attention
ex.check(answer)

# %% [markdown]
# One way to write it, checked against SDPA. The first line builds `scores`, a `(batch, heads, N, N)` tensor: every
# query against every key. This is what the **MATH** backend does. A causal mask, used from section 2 on, sets the
# scores of the keys after each query to -inf, so that the softmax gives them no weight. The error of one output
# against another is the relative Frobenius error, `‖output − reference‖ / ‖reference‖`, computed in float64.

# %%
def attention_by_hand(q, k, v, causal=False):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (batch, heads, N, N): the whole score matrix
    if causal:  # query i may not see the keys after it
        later = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(later, float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # each query's weights over the keys sum to 1
    return weights @ v


from labkit.outputs import relative_error  # ||output - reference|| / ||reference||, in float64

q, k, v = torch.randn(3, 1, lab.p.heads, 256, 64, device=lab.device, dtype=lab.dtype)  # query, key, value
error = relative_error(F.scaled_dot_product_attention(q, k, v), attention_by_hand(q, k, v))
tolerance = attention.TOLERANCES[lab.dtype_name]
print(f"SDPA vs attention by hand: relative error {error:.2e} (tolerance for {lab.dtype_name}: {tolerance:.0e})")
lab.check("sdpa_equals_attention_by_hand", error <= tolerance)

# %% [markdown]
# The **fused** backends compute the same result without ever holding `scores`. Flash Attention walks over the keys in
# tiles. It keeps a running maximum and sum per query row, an *online softmax*, and writes only the output of shape
# `(batch, heads, N, d)`. So the MATH backend's extra memory should grow like N²: doubling N multiplies it by about 4.
# A fused backend's should grow only like N, as its output does.
#
# **01.2 · Predict.** How many MiB does one score matrix take for the sizes printed below? Count one forward call,
# every head of every sequence, in this notebook's dtype. The cell after it measures the MATH backend's peak extra
# memory, which holds at least one such matrix. `seq` is the longest length of the sweep at which MATH is tried.

# %%
ex = lab.exercise("01.2", batch=lab.p.batch, heads=lab.p.heads, seq=lab.p.math_seq, dtype=lab.dtype_name)
print("sizes:", ex.given)
answer = None  # your prediction, in MiB
ex.check(answer)

# %% [markdown]
# Now the measurement: each backend that runs here, at each length of the sweep, head size 64, no mask. *Peak MiB* is
# the memory one call allocates above what its inputs already hold. On a GPU it comes from the CUDA allocator's
# statistics, on a CPU from the profiler's allocation records. Every time in this notebook follows the workbook's one
# timing rule, `labkit.timing.measure`: warm-up calls, then enough repeats to fill a minimum measured time. It keeps
# the median, and the 10th and 90th percentiles of the repeats, p10 and p90, as its spread.
#
# The loop below is this notebook's measurement, used again in sections 6 and 7: for each backend, head size and mask,
# a series of growing lengths, each call forced to that one backend. `attention.time_call` times one call and does the
# bookkeeping: a refusal or an out-of-memory becomes the row's status, with its reason. After an out-of-memory, longer
# lengths of the series are skipped; MATH is not even tried where its float32 scores and their softmax would take more
# than a quarter of the free memory (`attention.math_too_big` says so). `attention.mark_noisy` is the timing rule's
# last step, explained in section 6.

# %%
import functools

timing_rule = {"warmup": lab.p.warmup, "repeats": lab.p.repeats}  # the workbook's timing rule: warm-up, repeats


def forced_sdpa(q, k, v, backend, causal):  # only this backend may run
    with sdpa_kernel(getattr(SDPBackend, backend)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

# %%
def measure_points(backends, head_dims, causals, lengths, memory=True, on_row=None):
    rows = []
    for backend, d, causal in [(b, d, c) for b in backends for d in head_dims for c in causals]:  # N grows in each
        series, calls, stop = [], {}, ""  # stop: why longer lengths are skipped (a shorter one ran out of memory)
        for n in lengths:
            q, k, v = torch.randn(3, lab.p.batch, lab.p.heads, n, d, device=lab.device, dtype=lab.dtype)
            calls[n] = functools.partial(forced_sdpa, q, k, v, backend, causal)
            skip = stop or (backend == "MATH" and attention.math_too_big(lab.device, lab.p.batch, lab.p.heads, n))
            point = ({"status": "skipped", "why": skip} if skip else
                     attention.time_call(calls[n], lab.device, backend, memory=memory, **timing_rule))
            stop = stop or (f"a shorter sequence ({n}) ran out of memory" if point["status"] == "oom" else "")
            series.append({"backend": backend, "head_dim": d, "causal": causal, "n": n, **point})
        attention.mark_noisy(series, lambda r, calls=calls: attention.time_call(calls[r["n"]], lab.device,
                                                                                memory=False, **timing_rule))
        rows += series
        for row in series if on_row else []:  # show each row as its series is done
            on_row(row)
    return rows

# %% [markdown]
# The memory picture: head size 64, no mask. The last column counts the peak in score matrices: the peak divided by
# one matrix's `batch · heads · N² · bytes per element`.

# %% tags=["reveals-01.2"]
picture = pd.DataFrame(measure_points(lab.p.runnable, [64], [False], lab.p.seq_lengths))
score_matrix_mib = lab.p.batch * lab.p.heads * picture["n"] ** 2 * roofline.element_size(lab.dtype) / 2**20
picture["score matrices"] = picture["peak MiB"] / score_matrix_mib  # the peak, counted in N x N score matrices
lab.table("memory", picture, title="Measured: time and peak extra memory per call, head size 64, no mask")
math_peak = picture.loc[(picture["backend"] == "MATH") & (picture["n"] == lab.p.math_seq), "peak MiB"].dropna()
ex.compare(math_peak.iloc[0] if len(math_peak) else None, "MiB")  # the MATH backend's peak extra memory

# %%
import math


def growth_exponent(points):  # p in y ~ N^p, between the two longest lengths
    (n1, y1), (n2, y2) = sorted(points)[-2:]
    return math.log(y2 / y1) / math.log(n2 / n1)


measured = picture[(picture["status"] == "ok") & (picture["peak MiB"] > 0)]
growth = {b: growth_exponent(zip(s["n"], s["peak MiB"], strict=True))
          for b, s in measured.groupby("backend", sort=False) if s["n"].nunique() > 1}
for backend, p in growth.items():
    print(f"{backend:20s} extra memory grows like N^{p:.2f}")
if "MATH" in growth:
    lab.check("math_memory_grows_like_n_squared", growth["MATH"] > 1.5, f"N^{growth['MATH']:.2f}")

# %%
math_rows = measured[measured["backend"] == "MATH"]
if len(math_rows):  # on a big GPU MATH is not tried at the longest lengths: its longest is used
    at = math_rows.loc[math_rows["n"].idxmax()]
    print(f"At N={at['n']} the MATH backend's peak is {at['score matrices']:.1f} score matrices in {lab.dtype_name} "
          f"(one is {at['peak MiB'] / at['score matrices']:.2f} MiB)")
fused = measured[(measured["backend"] != "MATH") & (measured["n"] == measured["n"].max())]
if len(fused):
    lab.check("fused_backends_never_hold_a_score_matrix", (fused["score matrices"] < 1).all(),
              ", ".join(f"{b} {m:.1f} MiB" for b, m in zip(fused["backend"], fused["peak MiB"], strict=True)))
else:
    lab.skip("fused-backend memory", f"no fused backend ran for {lab.dtype_name} at N={measured['n'].max()}")

# %% [markdown]
# What you saw: the MATH backend's extra memory grows close to N². The line above says how many score matrices it
# holds at its peak: the scores and their softmax at least, more when 16-bit inputs are computed in float32. A fused
# backend's grows roughly like N. Once N is well above the head size, it stays far below one score matrix. At long
# sequences that difference decides whether a model fits at all.
#
# **01.3 · Code.** Now write the fused idea yourself. `tiled_attention(q, k, v, block)` walks over the keys in blocks of
# `block` and never holds more than one `(N, block)` tile of scores. Per query it keeps a running maximum `m`, a
# running sum `l` of `exp(score − m)`, and a running output. When a block raises the maximum, everything summed so far
# is multiplied by `exp(m_old − m_new)`. That is the online softmax. The check compares your function with SDPA on
# fresh inputs, with a last block shorter than the others. Then it measures your function's peak extra memory against
# the MATH backend's, at a length where one score matrix dominates.

# %%
ex = lab.exercise("01.3", device=lab.device)


def tiled_attention(q, k, v, block):
    return None  # your code: a loop over blocks of keys, with a running maximum, sum and output per query


answer = None  # once tiled_attention is written: answer = tiled_attention
ex.check(answer)

# %% [markdown]
# The verdict printed both peaks. Yours should be a few tiles; MATH's, more than one whole score matrix.
#
# ## 2. Forcing a backend, and proving which one ran
#
# Today's way is the context manager `torch.nn.attention.sdpa_kernel`. Given one backend, only that one may run: what
# ran is what you asked for, or you get an error. Given a list, any of them may run, **in PyTorch's own order**. The
# list says which backends are *allowed*, not in which order to try them.
#
# Don't trust the name of the context manager to tell you what ran. The profiler records the ATen op that did the work
# (`aten::_scaled_dot_product_flash_attention...`, `..._efficient_attention`, `..._cudnn_attention`,
# `..._attention_math`), and on a GPU the CUDA kernels too. Here is one forced call, proven:

# %%
q, k, v = torch.randn(3, 1, 8, 256, 64, device=lab.device, dtype=lab.dtype)


def causal_call():
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


with sdpa_kernel(SDPBackend.MATH):  # only the MATH backend may run
    forced = timing.ops_that_ran(causal_call, lab.device)
print(f"sdpa_kernel(SDPBackend.MATH): the profiler saw {forced.backend} ({forced.evidence})")

# %% [markdown]
# **01.4 · Predict.** With no `sdpa_kernel` around it, which backend does PyTorch run for `causal_call()` here? It is
# a causal call on `(1, 8, 256, 64)` inputs in this notebook's dtype. Answer with a name such as `"MATH"`. The check
# runs the call under the profiler, and the next table shows it beside every other request.

# %%
ex = lab.exercise("01.4", device=lab.device, dtype=lab.dtype_name)
answer = None  # a backend's name
ex.check(answer)

# %% [markdown]
# The same call with no `sdpa_kernel`, under each single backend, and under one list in both orders. What to expect:
# a single backend runs or is refused (section 3 says why). Both orders of a list run the same backend.

# %% tags=["reveals-01.4"]
import contextlib
import warnings

requests = [("no sdpa_kernel: PyTorch chooses", [])]  # (what is asked, the backends allowed)
requests += [(f"sdpa_kernel(SDPBackend.{b})", [b]) for b in probes.BACKENDS]
requests += [(f"sdpa_kernel([{', '.join(order)}])", order) for order in (["MATH", "FLASH_ATTENTION"],
                                                                         ["FLASH_ATTENTION", "MATH"])]
proofs = []
for asked, allowed in requests:
    only = sdpa_kernel([getattr(SDPBackend, b) for b in allowed]) if allowed else contextlib.nullcontext()
    try:
        with only, warnings.catch_warnings(action="ignore"):  # refused: section 3 says why
            seen = timing.ops_that_ran(causal_call, lab.device)
        proofs.append({"asked for": asked, "ran (profiler)": seen.backend, "evidence": seen.evidence})
    except RuntimeError as err:
        proofs.append({"asked for": asked, "ran (profiler)": None, "evidence": f"refused: {str(err).splitlines()[0]}"})
proofs = pd.DataFrame(proofs)
lab.table("what_ran", proofs, title=f"What ran, {lab.dtype_name}, causal, (1, 8, 256, 64), on {lab.device}")
ex.compare(proofs["ran (profiler)"][0])  # the first row: no sdpa_kernel, PyTorch chose

# %% [markdown]
# Reading the table: a forced backend must be the one the profiler saw, and the two orders of one list must run the
# same backend. A list only allows its backends; PyTorch tries them in its own order. `set_priority=True` makes the
# list's order the priority, as `sdpa_kernel`'s docstring in `torch/nn/attention/__init__.py` says.

# %%
ran = dict(zip(proofs["asked for"], proofs["ran (profiler)"], strict=True))
forced = [(asked, allowed[0]) for asked, allowed in requests if len(allowed) == 1 and pd.notna(ran[asked])]
lab.check("a_forced_backend_is_the_one_that_ran", forced and all(ran[a] == b for a, b in forced), str(forced))
plain, reverse = ran["sdpa_kernel([MATH, FLASH_ATTENTION])"], ran["sdpa_kernel([FLASH_ATTENTION, MATH])"]
lab.check("a_list_runs_in_pytorchs_order_without_set_priority", plain == reverse, f"{plain} vs {reverse}")
said = "made no difference" if plain == reverse else "changed which backend ran"
print(f"The order of the list {said}: [MATH, FLASH_ATTENTION] ran {plain}, [FLASH_ATTENTION, MATH] ran {reverse}.")

# %% [markdown]
# **What replaced `sdp_kernel`.** The source page forces Flash with the deprecated
# `torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False, enable_mem_efficient=False)`. Its fourth
# switch, `enable_cudnn`, defaults to `True` in `torch/backends/cuda/__init__.py`, so cuDNN stays on. Today's
# `sdpa_kernel(SDPBackend.FLASH_ATTENTION)` allows Flash alone. The old call runs once below, on purpose: its warning,
# its four switches, and what the profiler saw.

# %%
def enabled_backends():  # the four global on/off switches of SDPA's backends, which the old API sets
    cuda = torch.backends.cuda
    return {"FLASH_ATTENTION": cuda.flash_sdp_enabled(), "EFFICIENT_ATTENTION": cuda.mem_efficient_sdp_enabled(),
            "MATH": cuda.math_sdp_enabled(), "CUDNN_ATTENTION": cuda.cudnn_sdp_enabled()}


# %% tags=["old-api-on-purpose"]
# The source page's old API, run on purpose: its FutureWarning is captured and shown.
if not hasattr(torch.backends.cuda, "sdp_kernel"):
    lab.skip("the old sdp_kernel context manager", f"torch {torch.__version__} no longer has it")
else:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False, enable_mem_efficient=False):
            switches = enabled_backends()
            legacy = timing.ops_that_ran(causal_call, lab.device)
    old = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    print("\n".join(f"{w.category.__name__}: {w.message}" for w in old[:1]))
    show([{"backend": b, "enabled inside sdp_kernel(...)": on} for b, on in switches.items()],
         title="The four switches inside the old context manager")
    print(f"What ran under it (profiler): {legacy.backend} ({legacy.evidence})")
    lab.check("old_sdp_kernel_warns", bool(old))
    lab.check("old_sdp_kernel_leaves_cudnn_enabled", switches["CUDNN_ATTENTION"])
    lab.check("old_sdp_kernel_ran_an_enabled_backend", switches.get(legacy.backend, False), str(legacy.backend))
print("Switches after the context manager:", enabled_backends())

# %% [markdown]
# ## 3. Eligibility: which inputs each backend refuses, and why
#
# Each fused backend has conditions: dtypes (on a GPU, Flash Attention takes only float16/bfloat16), 4-D inputs
# `(batch, heads, N, d)`, masks, dropout, head size. When a forced backend refuses, PyTorch emits warnings that say
# why, then raises `No available kernel`. labkit forces each backend on each case and keeps those reasons.

# %%
cases = {"4-D, no mask (the easy case)": {}, "float32 inputs": {"dtype": "float32"},
         "3-D inputs (no heads dimension)": {"ndim": 3}, "boolean attention mask": {"input_kind": "masked"},
         "is_causal=True": {"input_kind": "causal"}, "dropout_p=0.1": {"dropout_p": 0.1},
         "head size 72 (not a power of two)": {"head_dim": 72}, "head size 36 (not a multiple of 8)": {"head_dim": 36},
         "head size 512": {"head_dim": 512}}
eligible = []
for case, inputs in cases.items():  # one tiny call per case, forced to one backend at a time
    for backend in probes.BACKENDS:
        tried = probes.try_sdpa(lab.device, **{"dtype": lab.dtype_name, **inputs}, backends=backend)
        eligible.append({"case": case, "backend": backend, "runs": tried["ok"],
                         "why not (PyTorch's words)": tried["reason"]})
eligible = pd.DataFrame(eligible)
grid = eligible.pivot(index="case", columns="backend", values="runs").loc[list(cases), probes.BACKENDS].reset_index()
lab.table("eligibility", grid, title=f"Does it run? ({lab.dtype_name} unless the case says otherwise, on {lab.device})")

# %%
refused = eligible[~eligible["runs"]]
one_reason = refused.groupby("backend")["why not (PyTorch's words)"].transform("nunique").eq(1)
every_case = refused.groupby("backend")["case"].transform("size").eq(len(cases))  # refused everything, for one reason
why_not = pd.concat([refused[~(one_reason & every_case)],
                     refused[one_reason & every_case].drop_duplicates("backend").assign(case="every case")])
lab.table("why_not", why_not[["backend", "case", "why not (PyTorch's words)"]], title="Why not")
own = refused.loc[refused["backend"].isin(lab.p.runnable), "why not (PyTorch's words)"]  # backends that exist here
lab.check("refusals_carry_torchs_own_reason", not own.str.startswith(probes.NO_REASON).any(), f"{len(own)} refusals")

# %% [markdown]
# ### "No available kernel.  Aborting execution." and its fix
#
# The source page meets this error and suggests installing a PyTorch nightly. The cause is usually the input, and on
# a GPU the GPU's generation: every backend you allowed refused it. A different build helps only when yours lacks the
# kernel altogether; `torch.backends.cuda.is_flash_attention_available()` says so. A common way to get there is
# passing 3-D tensors `(batch, N, d)`, for example from an older model or a hand-written layer. Forcing Flash
# Attention on them:

# %%
q3, k3, v3 = (t[:, 0] for t in (q, k, v))  # (batch, N, d): the heads dimension is missing
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q3, k3, v3)
        no_kernel = ""
    except RuntimeError as err:
        no_kernel = str(err).strip()
print("error :", no_kernel or "(none: it ran)")
print("reason:", "; ".join(probes.refusal_reasons([str(w.message) for w in caught])) or "-")

# %%
if "FLASH_ATTENTION" in lab.p.runnable:
    def fixed():  # the fix: give the tensors their heads dimension back
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q3.unsqueeze(1), k3.unsqueeze(1), v3.unsqueeze(1))
    after_fix = timing.ops_that_ran(fixed, lab.device)
    print(f"fixed: 4-D inputs, the profiler saw {after_fix.backend} ({after_fix.evidence})")
    lab.check("no_available_kernel_reproduced", "No available kernel" in no_kernel, no_kernel[:120])
    lab.check("the_fix_runs_flash", after_fix.backend == "FLASH_ATTENTION")
else:
    lab.skip("'No available kernel' with 3-D inputs", f"Flash Attention does not run for {lab.dtype_name} here at all")

# %% [markdown]
# The fixes, in order of preference. Give the backend an input it accepts: 4-D tensors, float16 or bfloat16 on a GPU,
# `dropout_p=0.0`, a head size it supports. Or allow a fallback with a list, `sdpa_kernel([SDPBackend.FLASH_ATTENTION,
# SDPBackend.MATH])`. A nightly build changes nothing when the input is the problem.
#
# About dropout: `dropout_p` is an argument of the call, and `F.scaled_dot_product_attention` has no training or eval
# mode. `model.eval()` does not change what your own code passes. transformers' attention layers pass `0.0`
# themselves when the module is not training; Llama's reads `dropout=0.0 if not self.training else
# self.attention_dropout`. That is why `eval()` matters for a transformers model and not for a bare SDPA call.
#
# ## 4. transformers models: `attn_implementation`
#
# Models in transformers choose their attention code with `attn_implementation=` at load time:
# - `"eager"`: attention written out, like `attention_by_hand`;
# - `"sdpa"`, the default: it calls `F.scaled_dot_product_attention`, so everything above applies;
# - `"flash_attention_2"`: the separate flash-attn package.
#
# Section 8 lists the others. `model.set_attn_implementation(...)` switches a loaded model. The greedy tokens must not
# depend on the choice.

# %%
if lab.p.model_problem:
    lab.skip(f"attn_implementation with {model_id}", lab.p.model_problem)
else:
    model, tokenizer = models.load_model(model_id, device=lab.device, dtype="float32", attn_implementation="eager")
    greedy = {"eager": outputs.generate_greedy(model, tokenizer, prompt, max_new_tokens)}
    model.set_attn_implementation("sdpa")
    greedy["sdpa"] = outputs.generate_greedy(model, tokenizer, prompt, max_new_tokens)
    show([{"attn_implementation": name, "continuation": g["continuation"], "tokens": g["new_tokens"]}
          for name, g in greedy.items()], title=f"{model_id}, float32, greedy")
    lab.check("greedy_tokens_identical_eager_vs_sdpa", greedy["eager"]["token_ids"] == greedy["sdpa"]["token_ids"])
    first_step = {"float32": outputs.next_token_candidates(model, tokenizer, prompt)}

# %% [markdown]
# Which kernel runs *inside* the model? The profiler again, on one forward pass over a batch of two prompts. Once the
# prompts have equal length, once they are padded. A padded batch makes transformers pass an attention mask, and a
# mask is one of the conditions of section 3.

# %%
if not lab.p.model_problem:
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    inside = []
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        for label, texts in {"equal lengths": [prompt, prompt], "padded": [prompt, "Hi"]}.items():
            inputs = tokenizer(texts, return_tensors="pt", padding=True).to(lab.device)
            with torch.inference_mode():
                seen = timing.ops_that_ran(lambda inputs=inputs: model(**inputs), lab.device)
            inside.append({"attn_implementation": implementation, "batch": label,
                           "SDPA backend (profiler)": seen.backend or "none: matmul + softmax",
                           "evidence": seen.evidence})
    show(inside, title="What ran inside the model")
    by_implementation = {i: [r["SDPA backend (profiler)"] for r in inside if r["attn_implementation"] == i]
                         for i in ("eager", "sdpa")}
    lab.check("eager_calls_no_sdpa", all(b.startswith("none") for b in by_implementation["eager"]))
    lab.check("sdpa_model_runs_an_sdpa_backend", all(b in probes.BACKENDS for b in by_implementation["sdpa"]))

# %% [markdown]
# In 16-bit the two implementations add and round in a different order, and the logits themselves are rounded:
# bfloat16 keeps 8 significant bits, so near a logit of 16 its steps are 0.125 apart and two candidates that differ by
# less can become a tie. The next cell measures how many greedy tokens agree in 16-bit; in float32, above, they all
# must. It shows the first step's top candidates in each precision. flash_attention_2, which is 16-bit only, joins
# when the flash-attn package is importable and a GPU is present. Agreement in 16-bit is reported, not asserted: a tie
# can break either way, and neither answer is wrong.

# %%
if not lab.p.model_problem:
    half = lab.dtype if lab.dtype != torch.float32 else torch.bfloat16
    half_name = str(half).removeprefix("torch.")
    model_16, tokenizer_16 = models.load_model(model_id, device=lab.device, dtype=half, attn_implementation="sdpa")
    sdpa_16 = outputs.generate_greedy(model_16, tokenizer_16, prompt, max_new_tokens)
    model_16.set_attn_implementation("eager")
    others = {"eager": outputs.generate_greedy(model_16, tokenizer_16, prompt, max_new_tokens)}
    flash = probes.flash_attn()
    if flash["ok"] and lab.on_gpu:
        model_16.set_attn_implementation("flash_attention_2")
        others["flash_attention_2"] = outputs.generate_greedy(model_16, tokenizer_16, prompt, max_new_tokens)
    else:
        lab.skip("attn_implementation='flash_attention_2'", flash["reason"] or "flash-attn needs a CUDA GPU")

# %%
if not lab.p.model_problem:
    agreement = []
    for implementation, g in others.items():  # greedy tokens agree until the first one that differs
        pairs = list(zip(g["token_ids"], sdpa_16["token_ids"], strict=False))
        agree = next((i for i, (a, b) in enumerate(pairs) if a != b), len(g["token_ids"]))
        agreement.append({"attn_implementation": implementation, "dtype": half_name, "tokens agreeing with sdpa": agree,
                          "of": len(g["token_ids"]), "continuation": g["continuation"]})
    lab.table("greedy_agreement", pd.DataFrame(agreement), title=f"sdpa says {sdpa_16['continuation']!r}")

# %%
if not lab.p.model_problem:
    for implementation in ("eager", "sdpa"):
        model_16.set_attn_implementation(implementation)
        first_step[f"{half_name}, {implementation}"] = outputs.next_token_candidates(model_16, tokenizer_16, prompt)
    show([{"precision": name, **{f"#{i + 1}": f"{c['token']!r} {c['logit']:.4g}" for i, c in enumerate(cands)}}
          for name, cands in first_step.items()], title="The first generated token: top candidates and their logits")
    del model, model_16

# %% [markdown]
# ## 5. Correctness against float64
#
# Every backend, every dtype, fresh random causal inputs, compared with attention computed in float64. The error is
# the relative Frobenius error. The tolerance is a few rounding steps of each format, accumulated over a softmax.
# float16 keeps 11 significant bits and bfloat16 only 8, so bfloat16's tolerance is wider.

# %%
dtypes = []
for dtype_name in ("float32", "float16", "bfloat16"):
    try:
        probes.check_dtype(lab.device, probes.resolve_dtype(dtype_name))  # can this device multiply in it at all?
        dtypes.append(dtype_name)
    except labkit.errors.BadParameter as err:
        lab.skip(f"accuracy in {dtype_name}", str(err))

# %%
accuracy = []
for dtype_name in dtypes:
    q, k, v = torch.randn(3, 2, lab.p.heads, 128, 64, device=lab.device, dtype=getattr(torch, dtype_name))
    reference = attention_by_hand(q.double(), k.double(), v.double(), causal=True)  # the answer, in float64
    for backend in probes.BACKENDS:
        tried = probes.try_sdpa(lab.device, dtype_name, "causal", backend, head_dim=64)  # does it run at all?
        with sdpa_kernel(getattr(SDPBackend, backend)):
            output = F.scaled_dot_product_attention(q, k, v, is_causal=True) if tried["ok"] else None
        error = None if output is None else relative_error(output, reference)
        accuracy.append({"dtype": dtype_name, "backend": backend, "relative error": error, "why not": tried["reason"]})
accuracy = pd.DataFrame(accuracy)
accuracy["tolerance"] = accuracy["dtype"].map(attention.TOLERANCES)
accuracy["within tolerance"] = accuracy["relative error"] <= accuracy["tolerance"]
lab.table("accuracy", accuracy, title="Relative error against float64")
compared = accuracy[accuracy["relative error"].notna()]
lab.check("every_backend_within_tolerance", len(compared) and compared["within tolerance"].all())

# %% [markdown]
# ## 6. The sweep: time, TFLOP/s and memory against the machine's limit
#
# Every backend that runs here × head size × causal or not × sequence length, measured by section 1's
# `measure_points`. Section 3 showed why the others refuse. For each point:
# - the median time, taken with CUDA events on a GPU;
# - the achieved TFLOP/s: forward FLOPs `4·B·H·N²·d` over the time, halved when causal because half the scores are
#   masked;
# - that rate as a **fraction of the matmul ceiling** measured on this machine; `with_rate` below has the formula;
# - the peak extra memory.
#
# An out-of-memory is recorded as a row, and longer sequences of that series are skipped.
# The MATH backend is not even tried at a length where its float32 scores and their softmax would take more than a
# quarter of the free memory; the table says so.
#
# A series whose time *falls* while its work grows contradicts its own cost model. So does one whose time grows
# much faster than the N² work: `attention.STEEPEST` allows N^2.5, room for the scores leaving a cache. Those points
# are measured again once, by `attention.mark_noisy` in `measure_points`. The ones still against the trend are
# marked **noisy**, in the table and with a cross in the figures, and left out of every conclusion below. On a shared
# machine, a neighbour's burst of work is the usual cause.
#
# What to expect. The work grows like N², and so does a fused backend's memory traffic: Flash Attention reads every
# key and value once per block of queries. The FlashAttention paper puts its traffic at Θ(N²·d²/M) bytes, with M the
# fast on-chip memory (arXiv 2205.14135, Theorem 2). So its FLOPs per byte do not grow with N.
#
# Its rate can still rise with N, for two other reasons. Each call has fixed costs: a launch, waking threads. And a
# kernel splits the work into blocks of queries, one per GPU multiprocessor or CPU core at a time (FlashAttention-2
# paper, arXiv 2307.08691, section 3.2). A short sequence makes few blocks, so some units idle. Once both are paid
# for, the rate should flatten. The MATH backend writes the score matrix to memory and reads it back, so it should stay
# further from the ceiling.
#
# Predict before you run it: from the shortest length to the next, the work quadruples. Will the time?

# %%
ceiling = roofline.compute_ceiling(lab.device, lab.dtype, quick=lab.quick)["flops_per_s"]  # one big matmul, measured
print(f"Matmul ceiling in {lab.dtype_name}: {ceiling / 1e12:.3f} TFLOP/s")


def with_rate(row):  # Q Kᵀ and P V: 2·N·N·d FLOPs each, per head and sequence; a causal mask needs half of them
    flops = 4 * lab.p.batch * lab.p.heads * row["n"] ** 2 * row["head_dim"] / (2 if row["causal"] else 1)
    row["TFLOP/s"] = None if row["ms"] is None else flops / (row["ms"] / 1e3) / 1e12
    row["fraction of ceiling"] = None if row["ms"] is None else row["TFLOP/s"] * 1e12 / ceiling
    return row


columns = ["backend", "head_dim", "causal", "n", "ms", "TFLOP/s", "fraction of ceiling", "peak MiB", "status", "why"]
points = len(lab.p.runnable) * len(lab.p.head_dims) * 2 * len(lab.p.seq_lengths)
board = widgets.LiveBoard(columns, total=points,
                          title=f"SDPA forward sweep, {lab.dtype_name}, batch {lab.p.batch}, heads {lab.p.heads}")
rows = measure_points(lab.p.runnable, lab.p.head_dims, [False, True], lab.p.seq_lengths,
                      on_row=lambda row: board.add(with_rate(row)))
board.finish()
sweep = pd.DataFrame(rows)
lab.table("sweep", sweep, show=False)  # the board above shows it

# %%
headline_d = max(lab.p.head_dims)
score_bytes = lab.p.batch * lab.p.heads * roofline.element_size(lab.dtype)  # of one N x N matrix, divided by N²
for causal in (True, False):
    fig = plots.attention_sweep(sweep, head_dim=headline_d, causal=causal, score_bytes_per_token_pair=score_bytes,
                                title=f"SDPA forward on {lab.device_label}, d={headline_d}, causal={causal}")
    lab.figure(f"sweep_d{headline_d}_{'causal' if causal else 'full'}", fig)

# %% [markdown]
# What the sweep shows, from the points a conclusion may use (measured, and not noisy). First what this machine could
# not measure, and the best point:

# %%
measured_backends = set(sweep.loc[sweep["status"] == "ok", "backend"])
lab.check("sweep_measured_every_backend_that_runs", set(lab.p.runnable) <= measured_backends)
for r in sweep[sweep["status"] != "ok"].itertuples():
    where = f"{r.backend} at N={r.n}, d={r.head_dim}, {'causal' if r.causal else 'no mask'}"
    if r.status in ("oom", "skipped"):  # points this machine could not hold: recorded, the sweep went on
        lab.skip(f"sweep {where}", r.why)
    else:
        print(f"{r.status.capitalize()}: {where}: {r.why}")
usable = sweep[(sweep["status"] == "ok") & ~sweep["noisy"]]
top = usable.loc[usable["TFLOP/s"].idxmax()]
print(f"{sweep['noisy'].sum()} noisy point(s), left out below. Best point: {top['backend']} at N={top['n']}, "
      f"d={top['head_dim']}, causal={top['causal']}: {top['TFLOP/s']:.3g} TFLOP/s, {top['fraction of ceiling']:.0%}")

# %% [markdown]
# Then the headline series (the largest head size, causal), backend by backend. First how time grows (`p` in time ~
# N^p), between the two shortest lengths and between the two longest. Then causal against no mask at one length, and
# where the longest length got to.

# %%
causal_d = usable[(usable["head_dim"] == headline_d) & usable["causal"]]
full_d = usable[(usable["head_dim"] == headline_d) & ~usable["causal"]]
time_growth = {}
for backend, s in causal_d.groupby("backend", sort=False):
    if s["n"].nunique() > 1:
        time_growth[backend] = growth_exponent(zip(s["n"], s["ms"], strict=True))
        short_p = growth_exponent(sorted(zip(s["n"], s["ms"], strict=True))[:2])  # the two shortest lengths
        rate_p = growth_exponent(zip(s["n"], s["TFLOP/s"], strict=True))
        trend = "rising" if rate_p > 0.05 else "falling" if rate_p < -0.05 else "flat"
        print(f"{backend}: time grows like N^{short_p:.2f} between the shortest two N, N^{time_growth[backend]:.2f} "
              f"between the longest two; TFLOP/s between those two {trend}")
    both = s.merge(full_d[full_d["backend"] == backend], on="n", suffixes=("", " no mask"))
    if len(both):
        at = both.loc[both["n"].idxmax()]
        print(f"{backend}: causal took {at['ms'] / at['ms no mask']:.2f}x the time of no mask (N={at['n']})")
    at = s.loc[s["n"].idxmax()]
    print(f"{backend}: at N={at['n']}, {at['fraction of ceiling']:.0%} of the ceiling, {at['peak MiB']:.1f} MiB extra")

# %% [markdown]
# Read the figures. On the left, time against N: attention does N² work, so at long N the lines approach a slope of 2.
# The answer to the prediction is the first exponent printed above. Well below 2 means the fixed costs and the idle
# units were still being spread over more work, not that a byte bought more work. In the middle, the memory of
# MATH runs parallel to, and a few times above, the dashed line of one N × N score matrix, while the fused backends
# stay near the size of their output. On the right, the fraction of the matmul ceiling. Causal attention needs half
# the work; the cell above printed its time against no mask (0.50x would be half the time). Whether a backend saves
# that time depends on its kernel: MATH computes every score and adds the mask afterwards (under the profiler its
# matrix product is the full N × N one), so it saves nothing.
#
# A fraction near or above 1 means "at the limit", not "faster than the machine": the ceiling is one matrix product
# measured in this session, and on a shared machine the neighbours slow some measurements more than others.
#
# ## 7. The fastest backend for your shape
#
# One shape: the longest causal length the sweep measured, the largest head size. Every backend that runs here is
# timed, and so is PyTorch's own choice, with the name of what it ran. Expect the winner to depend on the machine.
# Each backend's kernels were written for some hardware generations and not others; section 8 shows what that costs on
# an H100. PyTorch's default order comes with the release and, on recent ones, with the GPU generation and the cuDNN
# version (`check_prefer_cudnn_attention` in ATen's `sdp_utils.cpp` can put cuDNN first); it is not measured on your
# GPU.

# %%
best_n = int(causal_d["n"].max()) if len(causal_d) else lab.p.seq_lengths[0]
candidates = pd.DataFrame(measure_points(lab.p.runnable, [headline_d], [True], [best_n], memory=False))
q, k, v = torch.randn(3, lab.p.batch, lab.p.heads, best_n, headline_d, device=lab.device, dtype=lab.dtype)
chosen = timing.ops_that_ran(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), lab.device).backend
default = timing.measure(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device=lab.device,
                         **timing_rule)
pytorch_choice = {"backend": f"PyTorch's choice ({chosen})", "ms": default.median_ms, "status": "ok", "why": ""}
candidates = pd.concat([candidates, pd.DataFrame([pytorch_choice])], ignore_index=True)
flops = 4 * lab.p.batch * lab.p.heads * best_n**2 * headline_d / 2  # causal: half of 4·B·H·N²·d
candidates["TFLOP/s"] = flops / (candidates["ms"] / 1e3) / 1e12
candidates["fraction of ceiling"] = candidates["TFLOP/s"] * 1e12 / ceiling
candidates = candidates[["backend", "ms", "p10 ms", "p90 ms", "TFLOP/s", "fraction of ceiling", "status", "why"]]
lab.table("best_backend", candidates, title=f"Every backend at N={best_n}, d={headline_d}, causal, {lab.dtype_name}")

# %%
ran_here = candidates[candidates["status"] == "ok"]
fig = plots.bars(ran_here["backend"], ran_here["TFLOP/s"], xlabel="TFLOP/s", limit=ceiling / 1e12,
                 limit_label="matmul ceiling", title=f"N={best_n}, d={headline_d}, causal, {lab.dtype_name}")
lab.figure("best_backend", fig)
forced_ok = ran_here[ran_here["backend"].isin(probes.BACKENDS)]
winner = forced_ok.loc[forced_ok["ms"].idxmin()] if len(forced_ok) else None
pick = candidates.iloc[-1]  # PyTorch's choice
if winner is None:
    lab.skip("best_backend", f"no backend ran at N={best_n}, d={headline_d} on {lab.device}")
else:
    print(f"The fastest: {winner['backend']}, {winner['TFLOP/s']:.3g} TFLOP/s, {winner['fraction of ceiling']:.0%} of "
          f"the matmul ceiling; {pick['backend']} took {pick['ms'] / winner['ms']:.2f}x its time.")
    lab.metric("best_backend_tflops", winner["TFLOP/s"])
    lab.metric("best_backend_fraction_of_ceiling", winner["fraction of ceiling"])
    lab.metric("best_backend_pytorch_choice_time_ratio", pick["ms"] / winner["ms"])

# %% [markdown]
# A fused backend should beat MATH at the longest length where both ran (judged on the fastest 10% of the calls, p10),
# and on a GPU in bfloat16 at N ≥ 8192, the fastest backend should reach 75% of the matmul ceiling.

# %%
with_math = causal_d[causal_d["n"].isin(causal_d.loc[causal_d["backend"] == "MATH", "n"])]
at_n = with_math[with_math["n"] == with_math.loc[with_math["backend"] != "MATH", "n"].max()]
fastest_10 = at_n.set_index("backend")["p10 ms"]  # each backend judged on its fastest 10% of calls
if len(fastest_10) > 1:
    fused = fastest_10.drop("MATH").idxmin()
    said = f"N={at_n['n'].max()}: {fused} {fastest_10[fused]:.3g} ms vs MATH {fastest_10['MATH']:.3g} ms"
    lab.check("a_fused_backend_beats_math_at_long_n", fastest_10[fused] < fastest_10["MATH"], said, timing=True)
else:
    lab.skip("fused vs math at long N", f"MATH and a fused backend never ran at one length on {lab.device}")
if lab.on_gpu and lab.dtype_name == "bfloat16" and best_n >= 8192 and winner is not None:
    lab.check("best_backend_reaches_75_percent_of_the_matmul_ceiling", winner["fraction of ceiling"] >= 0.75)
else:
    lab.skip("75% of the matmul ceiling", f"expected only of bfloat16 on a GPU at N >= 8192, not {lab.dtype_name} "
                                          f"on {lab.device} at N={best_n}")

# %% [markdown]
# ### Where the time went: the profiler's view
#
# Why is one backend faster than another? `timing.time_by_op` runs one call under `torch.profiler`. It returns the
# call's wall time, the time the device was busy, and the ops that took it. On a GPU the rows are kernels and busy time
# is kernel time; on a CPU the rows are ATen ops and their own time. Busy close to wall means the kernels set the pace,
# not the Python around them. MATH, FLASH_ATTENTION and CUDNN_ATTENTION, where they ran, are profiled at one length,
# the longest at which MATH ran.
#
# What to expect from MATH: its two matrix products are the arithmetic. Everything else passes over memory with
# little arithmetic: the scaling, the causal mask, the softmax. The softmax reads the N × N scores once and writes them
# once, in float32 even for 16-bit inputs. ATen keeps that reduction in float32 unless
# `torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)` is set (its default is off, `ATen/Context.h`). Those
# bytes divided by the softmax's time give its bandwidth, set beside this machine's copy ceiling.

# %%
ok = sweep[(sweep["status"] == "ok") & (sweep["head_dim"] == headline_d) & sweep["causal"]]
math_lengths = ok.loc[ok["backend"] == "MATH", "n"]
n_profiled = int(math_lengths.max() if len(math_lengths) else ok["n"].min())  # the longest length where MATH ran
ran_there = set(ok.loc[ok["n"] == n_profiled, "backend"])
q, k, v = torch.randn(3, lab.p.batch, lab.p.heads, n_profiled, headline_d, device=lab.device, dtype=lab.dtype)
views, top_ops = {}, []
for backend in [b for b in ("MATH", "FLASH_ATTENTION", "CUDNN_ATTENTION") if b in ran_there]:
    call = functools.partial(forced_sdpa, q, k, v, backend, True)
    call()  # warm-up: a first call's one-off costs would show in the profile
    views[backend] = timing.time_by_op(call, lab.device)
    top_ops.append(views[backend].table.head(3).assign(backend=backend))
top_ops = pd.concat(top_ops)[["backend", "name", "calls", "ms", "share"]]
lab.table("time_by_op", top_ops, title=f"Top {'kernels' if lab.on_gpu else 'ops'} by own time, N={n_profiled}, "
                                       f"d={headline_d}, causal, {lab.dtype_name}")

# %%
copy = roofline.bandwidth_ceiling(lab.device)["bytes_per_s"]  # a large copy, measured now
scores_bytes = lab.p.batch * lab.p.heads * n_profiled**2 * 4  # one N x N matrix of float32 scores
math_view = views.get("MATH")
softmax_ms = math_view.ms_of("softmax", "SoftMax") if math_view else 0.0
if softmax_ms:
    rate = 2 * scores_bytes / (softmax_ms / 1e3)  # read once, written once
    products = math_view.ms_of(*timing.MATRIX_PRODUCTS)  # ATen's bmm on a CPU, cuBLAS kernels on a GPU
    print(f"MATH: {products / math_view.busy_ms:.0%} of its busy time in matrix products. Its "
          f"softmax moved {2 * scores_bytes / 2**20:.0f} MiB in {softmax_ms:.3g} ms: {rate / 1e9:.3g} GB/s, against "
          f"{copy / 1e9:.3g} GB/s for a large copy.")
order, least = sorted(views, key=lambda b: views[b].busy_ms), min(v.busy_share for v in views.values())
pace = "the kernels, not the host, set the pace" if least >= 0.8 else "the host set part of the pace"
print(f"Busy time, fastest first: {', '.join(f'{b} {views[b].busy_ms:.3g} ms' for b in order)}. Each was busy at "
      f"least {least:.0%} of its wall time: {pace}.")

# %% [markdown]
# ### Try it yourself
#
# Pick a backend and a sequence length, then run the next cell: it measures that one point and shows which kernel ran.
# (Under papermill the defaults are used: the fastest backend at the shortest length.)

# %%
first = winner["backend"] if winner is not None else lab.p.runnable[0]
backend_picker = widgets.picker(lab.p.runnable, value=first, description="backend")
length_picker = widgets.picker(lab.p.seq_lengths, value=lab.p.seq_lengths[0], description="sequence length")

# %%
picked_backend, picked_n = backend_picker.value, length_picker.value
point = with_rate(measure_points([picked_backend], [headline_d], [True], [picked_n])[0])
if point["status"] != "ok":  # MATH too big for this device's memory at this length, or refused: nothing to profile
    lab.skip(f"your pick, {picked_backend} at N = {picked_n}", point["why"] or point["status"])
else:
    q, k, v = torch.randn(3, lab.p.batch, lab.p.heads, picked_n, headline_d, device=lab.device, dtype=lab.dtype)
    with sdpa_kernel(getattr(SDPBackend, picked_backend)):
        proof = timing.ops_that_ran(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), lab.device)
    show([point], columns, title=f"Your pick; the profiler saw {proof.backend}")
    lab.check("the_picked_backend_ran", proof.backend == picked_backend)

# %% [markdown]
# ## Your numbers beside the reference runs
#
# Reference runs on real GPUs are stored under `reference/<device>/`. Where there are any, the headline series (largest
# head size, causal) of each is shown next to yours.

# %%
beside = causal_d[["backend", "n", "TFLOP/s"]].rename(columns={"TFLOP/s": "this machine TFLOP/s"})
for device, reference in attention.reference_sweep(headline_d).items():
    beside[f"{device} TFLOP/s"] = [reference.get((b, n)) for b, n in zip(beside["backend"], beside["n"], strict=True)]
show(beside, title="TFLOP/s: this machine and the reference runs")

# %% [markdown]
# Section 6's question on the stored GPU runs: how did time grow between their two shortest lengths, and between their
# two longest? A run stores TFLOP/s; within one series, time is proportional to N² / TFLOP/s. An exponent far below 2
# at the short end is a GPU with units still idle and a launch still weighing.

# %%
for device, reference in attention.reference_sweep(headline_d).items():
    for backend in dict.fromkeys(b for b, _ in reference):
        series = sorted((n, n**2 / rate) for (b, n), rate in reference.items() if b == backend)  # time, up to a factor
        if len(series) > 2:
            print(f"{device}, {backend}: time grew like N^{growth_exponent(series[:2]):.2f} from N={series[0][0]} to "
                  f"{series[1][0]}, like N^{growth_exponent(series):.2f} from {series[-2][0]} to {series[-1][0]}")

# %% [markdown]
# ## 8. Attention today: which Flash, when not Flash, and beyond SDPA
#
# ### Which FlashAttention runs behind `SDPBackend.FLASH_ATTENTION`
#
# On a GPU, PyTorch's FLASH_ATTENTION backend is its built-in copy of **FlashAttention-2** (FA2). The installed torch
# says so three times. SDPA's documentation cites the FlashAttention-2 paper. `restore_flash_attention_impl` "restores
# the default FA2 implementation". And `_get_flash_version` in `torch/nn/attention/__init__.py` returns the closest
# FlashAttention tag, 2.5.7. `torch.backends.cuda.is_flash_attention_available()` says whether that kernel is compiled
# in, not its version.
#
# torch 2.13 can swap in newer ones. `torch.nn.attention.list_flash_attention_impls()` names them (FA3, FA4);
# `activate_flash_attention_impl("FA3")` plugs one in; `current_flash_attention_impl()` says which is active (None:
# the built-in one). Each needs its own package and a recent GPU, checked in `torch/nn/attention/_fa3.py` and
# `_fa4.py`. FA3 imports `flash_attn_interface` and requires a compute capability 9.x, Hopper. FA4 imports
# `flash_attn.cute.interface` and takes 9.x or 10.x, Hopper or datacenter Blackwell (both check the major version).
#
# On a CPU, FLASH_ATTENTION is a different kernel: PyTorch's own CPU version of the same tiling idea
# (`aten::_scaled_dot_product_flash_attention_for_cpu` in section 2's table). The cell tries to activate each
# implementation, then restores the default. Its column "available here" says, for the built-in one, whether this
# torch has it compiled in (False on a build without CUDA), and for each other one whether activating it worked.

# %%
attn = torch.nn.attention
compiled_in = torch.backends.cuda.is_flash_attention_available()
default = attn.restore_flash_attention_impl.__doc__.strip().splitlines()[0]  # what torch says the default is
flash_impls = [{"implementation": "built in (the default)", "available here": compiled_in, "what torch says":
                f"restore_flash_attention_impl: {default!r}; is_flash_attention_available() = {compiled_in}"}]
for impl in attn.list_flash_attention_impls():
    try:
        attn.activate_flash_attention_impl(impl)
        active, said = attn.current_flash_attention_impl() == impl, "activated, then the default restored"
    except Exception as err:  # the missing package or GPU is the answer
        active, said = False, f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    finally:
        if attn.current_flash_attention_impl() is not None:
            attn.restore_flash_attention_impl()
    flash_impls.append({"implementation": impl, "available here": active, "what torch says": said})
lab.table("flash_implementations", pd.DataFrame(flash_impls), title="FlashAttention implementations")

# %% [markdown]
# ### Flash is not always the fastest
#
# The source page means to run Flash Attention and nothing else: `sdpa_kernel(SDPBackend.FLASH_ATTENTION)` today. On
# an H100 that is not the fastest choice, and the reason is the generation the kernel was written for. The built-in
# Flash is FA2, written for the A100. It does not use what Hopper added: `wgmma`, matrix instructions that run
# asynchronously; the TMA, a unit that copies tiles between memory levels on its own; and warps specialised into
# loaders and computers that overlap. FlashAttention-3 was written to use them (FA3 paper, arXiv 2407.08608). cuDNN,
# NVIDIA's library, has attention kernels of its own for Hopper. Its SDPA support matrix lists Hopper apart, with fp8:
# docs.nvidia.com/deeplearning/cudnn/frontend/latest/operations/Attention.html.
#
# Predict: in the stored H100 run, at its longest causal length, how many times slower is Flash alone than the fastest
# backend? The cell reads that run from `reference/`. The run's figure
# `reference/nvidia-h100/01_flash_attention.best_backend.png` also names PyTorch's own choice there: cuDNN. So the
# page's old `sdp_kernel(...)` call, which leaves cuDNN on, would have run cuDNN after all.

# %%
for device, reference in attention.reference_sweep(head_dim=128).items():
    longest = max((n for _, n in reference), default=None)
    rates = {b: rate for (b, n), rate in reference.items() if n == longest}  # TFLOP/s at the longest causal length
    if "FLASH_ATTENTION" in rates:
        fastest = max(rates, key=rates.get)
        slower = rates[fastest] / rates["FLASH_ATTENTION"]  # time under Flash alone / time of the fastest
        print(f"{device}, N={longest}, d=128, causal: {fastest} {rates[fastest]:.0f} TFLOP/s, FLASH_ATTENTION "
              f"{rates['FLASH_ATTENTION']:.0f} TFLOP/s: forcing FLASH_ATTENTION alone runs {slower:.2f}x slower.")

# %% [markdown]
# ### FlexAttention: your own mask or score, compiled into one kernel
#
# `torch.nn.attention.flex_attention` takes two small Python functions instead of a mask tensor: a **`mask_mod(b, h,
# q_idx, kv_idx)`** that says whether a query may see a key, and a **`score_mod(score, b, h, q_idx, kv_idx)`** that
# changes a score before the softmax. `create_block_mask` evaluates the mask at every position once, when the block
# mask is built, and records for each block of 128 × 128 positions whether it is empty, full or partial, so the kernel
# skips the empty ones entirely. A **document mask**
# is the case it was made for: several documents packed into one sequence (no padding), each attending only to
# itself, causally. SDPA can only take such a mask as a dense `N × N` tensor.
#
# What to expect: `flex_attention` is meant to run under `torch.compile`, which writes a fused kernel for your mask
# (a C++ kernel on a CPU, a Triton kernel on a GPU). The first call pays for the compilation. Called without
# `torch.compile`, it falls back to an unfused path that materialises the whole score matrix, and should be slower
# than SDPA. Compiled, it should beat SDPA given a dense document mask, because it skips the blocks between documents;
# for a plain causal mask, SDPA's own fused kernels are the ones to beat.

# %%
from torch.nn.attention.flex_attention import and_masks, create_block_mask, create_mask, flex_attention

n = lab.p.flex_seq
lengths = [n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8]  # four documents packed into one sequence
docs = torch.repeat_interleave(torch.arange(len(lengths), device=lab.device), torch.tensor(lengths, device=lab.device))


def causal(b, h, q_idx, kv_idx):  # a mask_mod: may query q_idx see key kv_idx?
    return q_idx >= kv_idx


def same_document(b, h, q_idx, kv_idx):
    return docs[q_idx] == docs[kv_idx]


document = and_masks(causal, same_document)  # packed sequences: causal, and only inside each document
blocks = {"causal": create_block_mask(causal, None, None, n, n, device=lab.device),
          "document": create_block_mask(document, None, None, n, n, device=lab.device)}
print(f"{n} positions packed from documents of {lengths} tokens; the first positions belong to {docs[:4].tolist()}")

# %%
flex = torch.compile(flex_attention) if lab.p.compile_flex else flex_attention
implementation = "flex_compiled" if lab.p.compile_flex else "flex_eager"
q, k, v = torch.randn(3, lab.p.batch, lab.p.heads, n, headline_d, device=lab.device, dtype=lab.dtype)
masks = {"causal": (blocks["causal"], {"is_causal": True}),  # each mask, and the same mask as SDPA takes it
         "document": (blocks["document"], {"attn_mask": create_mask(document, 1, 1, n, n, lab.device)})}
flexed, expected = [], None
for mask, (block_mask, sdpa_mask) in masks.items():
    calls = {"sdpa": lambda m=sdpa_mask: F.scaled_dot_product_attention(q, k, v, **m),
             implementation: lambda m=block_mask: flex(q, k, v, block_mask=m)}
    for name, call in calls.items():  # the first call (FlexAttention compiles in it), then the timed ones
        outcome = timing.attempt(lambda c=call: attention.timed_with_first_call(
            c, lab.device, **timing_rule), lab.device)  # an out-of-memory is a row
        out, row = outcome.get("value") or (None, {"status": outcome["status"], "why": outcome["reason"]})
        expected = out if name == "sdpa" else expected
        if name != "sdpa" and out is not None and expected is not None:
            row.update({"blocks skipped %": block_mask.sparsity(), "error vs SDPA": relative_error(out, expected)})
        flexed.append({"mask": mask, "implementation": name, "status": "ok", "why": "", **row})
flexed = pd.DataFrame(flexed)
lab.table("flex_vs_sdpa", flexed.drop(columns="warning", errors="ignore"), title=f"FlexAttention and SDPA, N={n}")

# %% [markdown]
# The same output (within the dtype's tolerance), and the time of each against SDPA's:

# %%
if lab.p.compile_flex_why:
    lab.skip("FlexAttention compiled", lab.p.compile_flex_why)
tolerance = attention.TOLERANCES[lab.dtype_name]
for _, r in flexed.iterrows():
    if r["status"] != "ok":
        lab.skip(f"{r['implementation']} with a {r['mask']} mask", r["why"])
        continue
    lab.metric(f"masked_{r['mask']}_{r['implementation']}_ms", r["ms"])
    sdpa = flexed[(flexed["mask"] == r["mask"]) & (flexed["implementation"] == "sdpa") & (flexed["status"] == "ok")]
    if r["implementation"] != "sdpa" and len(sdpa):
        lab.metric(f"masked_{r['mask']}_{r['implementation']}_first_call_s", r["first call s"])
        lab.metric(f"masked_{r['mask']}_{r['implementation']}_blocks_skipped_percent", r["blocks skipped %"])
        error = r["error vs SDPA"]
        lab.check(f"flex_attention_matches_sdpa_{r['mask']}", error <= tolerance, f"{error:.2e}")
        ratio = r["ms"] / sdpa["ms"].iloc[0]
        print(f"{r['mask']} mask: FlexAttention {r['ms']:.3g} ms, {ratio:.2f}x SDPA's time; it skips "
              f"{r['blocks skipped %']:.0f}% of the blocks; its first call took {r['first call s']:.2f} s")
warned = [w for w in flexed.get("warning", pd.Series(dtype=str)).dropna() if w]
if warned:
    print(f"PyTorch warned: {warned[0]}")

# %% [markdown]
# A `score_mod` changes the scores themselves, which SDPA cannot do at all. Gemma 2 caps its attention scores with
# `cap · tanh(score / cap)` (`attn_logit_softcapping=50.0` in its config; transformers' FlexAttention integration
# applies exactly this `score_mod`). A cap of 5 on random inputs makes the effect visible; attention by hand with the
# same cap is the reference.

# %%
def soft_cap(score, b, h, q_idx, kv_idx):  # a score_mod
    return 5.0 * torch.tanh(score / 5.0)


q_s, k_s, v_s = torch.randn(3, 1, 2, 128, 64, device=lab.device, dtype=lab.dtype)
q_s = 4 * q_s  # larger scores, so that the cap bites
with warnings.catch_warnings(action="ignore"):  # uncompiled: small, run once (PyTorch warns so once a process)
    capped = flex_attention(q_s, k_s, v_s, score_mod=soft_cap)
by_hand = torch.softmax(soft_cap(q_s @ k_s.transpose(-2, -1) / 64**0.5, 0, 0, 0, 0), dim=-1) @ v_s
uncapped = F.scaled_dot_product_attention(q_s, k_s, v_s)
error, changed = relative_error(capped, by_hand), relative_error(uncapped, by_hand)
print(f"soft-capped FlexAttention against attention by hand: {error:.1e}; plain SDPA differs by {changed:.2f}")
lab.check("flex_score_mod_matches_attention_by_hand", error <= attention.TOLERANCES[lab.dtype_name], f"{error:.1e}")

# %% [markdown]
# ### Variable-length attention: `torch.nn.attention.varlen.varlen_attn`
#
# torch 2.13 also has `varlen_attn`, the FlashAttention "varlen" interface: the documents are concatenated into one
# `(tokens, heads, d)` tensor, `cu_seq_q`/`cu_seq_k` give where each starts, and causal is `window_size=(-1, 0)`. No
# padding and no mask tensor. It calls PyTorch's CUDA Flash Attention kernel directly, so it needs a CUDA GPU and
# float16 or bfloat16 inputs. The same packed documents as above:

# %%
from torch.nn.attention.varlen import varlen_attn

packed = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]  # (tokens, heads, head size): no padding
starts = torch.tensor([0, *lengths], device=lab.device).cumsum(0).to(torch.int32)  # where each document starts


def packed_call():
    return varlen_attn(*packed, starts, starts, max(lengths), max(lengths), window_size=(-1, 0))  # causal

# %%
try:
    out = packed_call()
    timing.synchronize(lab.device)
except (RuntimeError, NotImplementedError) as err:
    lab.skip("torch.nn.attention.varlen.varlen_attn", "it runs PyTorch's CUDA Flash Attention kernel, which refused "
             f"here ({type(err).__name__}: {str(err).strip().splitlines()[0].split('. ')[0]})")
else:
    expected = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], **masks["document"][1])[0].transpose(0, 1)
    error = relative_error(out, expected)
    varlen_ms = timing.measure(packed_call, device=lab.device, **timing_rule).median_ms
    print(f"varlen_attn on the packed documents: {varlen_ms:.3g} ms in {lab.dtype_name}, relative error {error:.1e} "
          "against SDPA with the same mask")
    lab.metric("masked_document_varlen_attn_ms", varlen_ms)
    lab.check("varlen_attn_matches_sdpa_document", error <= attention.TOLERANCES[lab.dtype_name], f"{error:.2e}")

# %% [markdown]
# ### What transformers 5 accepts for `attn_implementation`
#
# Besides `eager` and `sdpa`: `flash_attention_2`, `flash_attention_3` and `flash_attention_4` (each needs its
# flash-attn package and a GPU), `flex_attention` (FlexAttention, compiled by transformers), `paged|eager` (eager
# attention over a paged cache, for continuous batching), and a **Hub kernel id** such as
# `kernels-community/flash-attn2`, loaded through the `kernels` package.
# When a `flash_attention_*` package is missing but `kernels` is installed (transformers requires it since 5.25),
# transformers loads the Hub kernel in the last column instead. The table builds a tiny model with each value on the
# `meta` device (no weights, nothing downloaded); the `flash_attention_*` values and a Hub id are only tried where
# `kernels` is absent, so that nothing is downloaded.

# %%
show(attention.attn_implementation_rows(), ["attn_implementation", "ok", "reason", "kernels fallback"],
     title="attn_implementation= values, built with this stack")

# %% [markdown]
# ## What you measured
#
# Each sentence from this notebook's own tables above, and only where its part ran.

# %%
summary = []
if "MATH" in growth:
    peak = math_rows.loc[math_rows["n"].idxmax(), "score matrices"]
    fused_growth = ", ".join(f"{b}'s like N^{p:.2f}" for b, p in growth.items() if b != "MATH")
    summary.append(f"Memory: the MATH backend's extra memory grew like N^{growth['MATH']:.2f} and peaked at {peak:.1f} "
                   "score matrices" + (f"; {fused_growth}: a fused kernel never holds the N x N scores."
                                       if fused_growth else "."))
if winner is not None:
    summary.append(f"Speed: the fastest backend at N={best_n}, causal, d={headline_d} ({winner['backend']}) ran at "
                   f"{winner['TFLOP/s']:.3g} TFLOP/s, {winner['fraction of ceiling']:.0%} of this machine's measured "
                   f"matmul ceiling; PyTorch's own choice took {pick['ms'] / winner['ms']:.2f}x its time.")
if time_growth:
    summary.append("Time grew like " + ", ".join(f"N^{p:.2f} ({b})" for b, p in time_growth.items())
                   + " between the two longest lengths. The work grows like N^2: below 2, fixed costs still weigh; "
                     "above 2, each unit of work got slower (caches, or a busy machine).")
if sweep["noisy"].any():
    summary.append(f"{sweep['noisy'].sum()} sweep point(s) stayed against the trend when re-measured: marked noisy and "
                   "left out of these conclusions.")

# %%
timed = flexed[(flexed["status"] == "ok")].pivot(index="mask", columns="implementation", values="ms")
if implementation in timed and "sdpa" in timed:
    summary.append("FlexAttention took " + "; ".join(f"{r[implementation]:.3g} ms against SDPA's {r['sdpa']:.3g} ms "
                                                     f"for a {mask} mask" for mask, r in timed.iterrows()) + ".")
if plain == reverse:
    summary.append("A list given to sdpa_kernel only allowed backends: both orders of the same list ran the same one.")
summary.append(f"Profiler, N={n_profiled}, causal: busy time " + ", ".join(f"{b} {v.busy_ms:.3g} ms of {v.wall_ms:.3g} "
                                                                         "ms wall" for b, v in views.items()) + ".")
lab.finish(summary)
