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
# `torch.nn.functional.scaled_dot_product_attention` (SDPA) computes `softmax(Q Kᵀ / √d) V`, the heart of every
# transformer. PyTorch has several implementations of it, called **backends**. This notebook shows, on your machine:
#
# 1. **the picture**: attention written by hand (you write it first), the score matrix the MATH backend builds and
#    the fused backends (Flash Attention, memory-efficient, cuDNN) never do; you predict its memory, then measure it;
# 2. **how to force a backend** with `torch.nn.attention.sdpa_kernel`, and how to *prove* which one ran (the profiler),
#    including what a *list* of backends means and what the source page's old `torch.backends.cuda.sdp_kernel(...)`
#    really does;
# 3. **eligibility**: which inputs each backend refuses, with PyTorch's own reason, and the source page's
#    `No available kernel.  Aborting execution.` with its fix;
# 4. **transformers models**: `attn_implementation="eager" | "sdpa" | "flash_attention_2"` and
#    `model.set_attn_implementation`, with identical greedy tokens in float32, and how many agree in 16-bit;
# 5. **correctness** of every backend against a float64 reference;
# 6. **the sweep**: time, TFLOP/s, fraction of the measured matmul ceiling and memory, as the sequence grows, on a
#    live board, then as figures;
# 7. **`labkit.attention.best_backend`**: the fastest backend for your shape, measured;
# 8. **attention today**: which FlashAttention PyTorch runs, when Flash is not the fastest, FlexAttention measured
#    against SDPA for a causal and a document (packed sequences) mask, variable-length attention, and the
#    `attn_implementation` values transformers 5 accepts.
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

# %%
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import labkit
from labkit import attention, attention_today, models, plots, probes, roofline, widgets
from labkit.widgets import show

lab = labkit.start("01_flash_attention", globals())

# %%
show(lab.environment_rows(), ["item", "value"], title="Environment")

# %% [markdown]
# ## 1. SDPA in one picture
#
# Attention takes a query vector per position (`q`), a key and a value vector per position (`k`, `v`), all of shape
# `(batch, heads, N, d)` with `N` positions and head size `d`. Each query is compared with every key (a dot product,
# divided by `√d`), a softmax over the keys turns those scores into weights that sum to 1, and the output is the
# weighted sum of the values.
#
# **01.1 · Code.** Write it yourself: `my_attention(q, k, v)` returns `softmax(q kᵀ / √d) v`. Then set
# `answer = my_attention` and run the cell: the check calls your function on fresh random inputs and compares it
# with `F.scaled_dot_product_attention`. `ex.hint()` gives a hint (again for the next one), `ex.solution()` shows one.

# %%
ex = lab.exercise("01.1")


def my_attention(q, k, v):
    return None  # your code: the scores, a softmax over the keys, the weighted sum of the values


answer = None  # once my_attention is written: answer = my_attention
ex.check(answer)

# %% [markdown]
# One way to write it, checked against SDPA. The middle line builds `scores`, a `(batch, heads, N, N)` tensor: every
# query against every key. This is what the **MATH** backend does.

# %%
def attention_by_hand(q, k, v):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (batch, heads, N, N): the whole score matrix
    weights = torch.softmax(scores, dim=-1)  # each query's weights over the keys sum to 1
    return weights @ v


q, k, v = attention.random_qkv(1, lab.heads, 256, 64, device=lab.device, dtype=lab.dtype)
error = attention.relative_error(F.scaled_dot_product_attention(q, k, v), attention_by_hand(q, k, v))
tolerance = attention.TOLERANCES[lab.dtype_name]
print(f"SDPA vs attention by hand: relative error {error:.2e} (tolerance for {lab.dtype_name}: {tolerance:.0e})")
lab.check("sdpa_equals_attention_by_hand", error <= tolerance)

# %% [markdown]
# The **fused** backends compute the same result without ever holding `scores`: Flash Attention walks over the keys in
# tiles, keeps a running maximum and sum per query row (an *online softmax*) and writes only the output, which is
# `(batch, heads, N, d)`. So the MATH backend's extra memory should grow like N² (doubling N multiplies it by about
# 4), a fused backend's only like N (it grows like its output).
#
# **01.2 · Predict.** How many MiB does one score matrix take for the sizes printed below (one forward call, every head
# of every sequence, in this notebook's dtype)? The cell after it measures the MATH backend's peak extra memory, which
# holds at least one such matrix. (`seq` is the longest length of the sweep at which the MATH backend is tried.)

# %%
ex = lab.exercise("01.2", batch=lab.batch, heads=lab.heads, seq=lab.math_seq, dtype=lab.dtype_name)
print("sizes:", ex.given)
answer = None  # your prediction, in MiB
ex.check(answer)

# %% [markdown]
# Now the measurement: each backend that runs here, at each length of the sweep, head size 64, no mask. *Peak MiB* is
# the memory one call allocates above what its inputs already hold (on a GPU from the CUDA allocator's statistics, on
# a CPU from the profiler's allocation records). Every time in this notebook follows the workbook's one timing rule
# (`labkit.timing.measure`): warm-up calls, then enough repeats to fill a minimum measured time, and the median, with
# the 10th and 90th percentiles of the repeats (p10, p90) as its spread where a table shows them.

# %% tags=["reveals-01.2"]
picture = attention.sweep(lab.device, lab.dtype, seq_lengths=lab.seq_lengths, head_dims=[64], causal=[False],
                          backends=lab.runnable, batch=lab.batch, heads=lab.heads, warmup=lab.warmup,
                          repeats=lab.repeats)
show([attention.display_row(r) for r in picture], ["backend", "N", "ms", "peak MiB", "status", "why"],
     title="Measured: time and peak extra memory per call, head size 64, no mask")
math_peak = attention.peak_bytes(picture, "MATH", lab.math_seq)
ex.compare(None if math_peak is None else math_peak / 2**20, "MiB")  # the MATH backend's peak extra memory

# %%
memory = attention.memory_findings(picture, batch=lab.batch, heads=lab.heads, dtype=lab.dtype)
print("\n".join(memory["lines"]))
lab.add(memory)

# %% [markdown]
# What you saw: the MATH backend's extra memory grows close to N², and the line above says how many score matrices it
# holds at its peak (the scores and their softmax at least; more when 16-bit inputs are computed in float32). A fused
# backend's grows roughly like N and, once N is well above the head size, stays far below one score matrix. At long
# sequences that difference decides whether a model fits at all.
#
# ## 2. Forcing a backend, and proving which one ran
#
# The modern way is the context manager `torch.nn.attention.sdpa_kernel`. Given one backend, only that one may run.
# Given a list, any of them may run, **in PyTorch's own order**: the list says which backends are *allowed*, not in
# which order to try them; `set_priority=True` asks PyTorch to try them in your list's order (the table below shows
# whether this machine's dispatcher does). Don't trust the name of the context manager to tell you what ran: the
# profiler records the ATen op that did the work (`aten::_scaled_dot_product_flash_attention...`,
# `..._efficient_attention`, `..._cudnn_attention`, `..._attention_math`), and on a GPU the CUDA kernels too. Here is
# one forced call, proven:

# %%
q, k, v = attention.random_qkv(1, 8, 256, 64, device=lab.device, dtype=lab.dtype)


def causal_call():
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


with sdpa_kernel(SDPBackend.MATH):  # only the MATH backend may run
    forced = attention.ops_that_ran(causal_call, lab.device)
print(f"sdpa_kernel(SDPBackend.MATH): the profiler saw {forced.backend} ({forced.evidence})")

# %% [markdown]
# **01.3 · Predict.** With no `sdpa_kernel` around it, which backend does PyTorch run for `causal_call()` here (a
# causal call on `(1, 8, 256, 64)` inputs in this notebook's dtype)? Answer with a name such as `"MATH"`; the check
# runs the call under the profiler, and the next table shows it beside every other request.

# %%
ex = lab.exercise("01.3", device=lab.device, dtype=lab.dtype_name)
answer = None  # a backend's name
ex.check(answer)

# %% [markdown]
# The same call under each single backend, under two lists in both orders, with and without `set_priority=True`, and
# with no `sdpa_kernel` at all. What to expect: a single backend either runs or is refused (section 3 says why);
# without `set_priority=True`, both orders of a list run the same backend; with it, the table shows whether the order
# changed anything here.

# %% tags=["reveals-01.3"]
proofs = attention.what_ran(causal_call, lab.device)
show(proofs, title=f"What ran, {lab.dtype_name}, causal, (1, 8, 256, 64), on {lab.device}")
ex.compare(proofs[0]["ran (profiler)"])  # the first row: no sdpa_kernel, PyTorch chose
found = attention.what_ran_findings(proofs, lab.device)
print("\n".join(found["lines"]))
lab.add(found)

# %% [markdown]
# ### The source page's `torch.backends.cuda.sdp_kernel(...)`
#
# The source page forces Flash Attention with `torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False,
# enable_mem_efficient=False)`. That function is deprecated. Worse, it has a fourth switch, `enable_cudnn`, which
# defaults to `True`, so the source page's call does **not** switch off the cuDNN backend: on a GPU where cuDNN
# attention is eligible and comes first in PyTorch's order, code under it runs cuDNN attention, not Flash. The cell
# below runs it once, on purpose, captures its warning, reads the four switches inside it, and asks the profiler what
# ran.

# %% tags=["old-api-on-purpose"]
# The source page's old API, run on purpose: its FutureWarning is captured and shown.
import warnings

if not hasattr(torch.backends.cuda, "sdp_kernel"):
    lab.skip("the old sdp_kernel context manager", f"torch {torch.__version__} no longer has it")
else:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False, enable_mem_efficient=False):
            switches = attention.enabled_backends()
            legacy = attention.ops_that_ran(causal_call, lab.device)
    old = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    print("\n".join(f"{w.category.__name__}: {w.message}" for w in old[:1]))
    show([{"backend": b, "enabled inside sdp_kernel(...)": on} for b, on in switches.items()],
         title="The four switches inside the old context manager")
    print(f"What ran under it (profiler): {legacy.backend} ({legacy.evidence})")
    lab.check("old_sdp_kernel_warns", bool(old))
    lab.check("old_sdp_kernel_leaves_cudnn_enabled", switches["CUDNN_ATTENTION"])
    lab.check("old_sdp_kernel_ran_an_enabled_backend", switches.get(legacy.backend, False), str(legacy.backend))
print("Switches after the context manager:", attention.enabled_backends())

# %% [markdown]
# The modern equivalent is `sdpa_kernel(SDPBackend.FLASH_ATTENTION)` (the table above): exactly one backend is
# allowed, so what ran is what you asked for, or you get an error.
#
# A list is not a "Flash, else cuDNN" request. `sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION])`
# allows both and lets PyTorch try them in its own order, as both orders of `[MATH, FLASH_ATTENTION]` showed above. On
# the H100 measured in `reference/nvidia-h100/` (torch 2.11, bfloat16), PyTorch's own order ran cuDNN attention first
# (its `best_backend` figure names PyTorch's choice `CUDNN_ATTENTION`), so that list would have run cuDNN there. To
# mean "Flash, else cuDNN", add `set_priority=True`, as torch's own `sdpa_kernel` documentation does for "cuDNN, then
# Flash": `sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION], set_priority=True)`.
#
# ## 3. Eligibility: which inputs each backend refuses, and why
#
# Each fused backend has conditions: dtypes (on a GPU, Flash Attention takes only float16/bfloat16), 4-D inputs
# `(batch, heads, N, d)`, masks, dropout, head size. When a forced backend refuses, PyTorch emits warnings that say
# why, then raises `No available kernel`. labkit forces each backend on each case and keeps those reasons.

# %%
eligible = attention.eligibility(lab.device, lab.dtype)
show(attention.eligibility_grid(eligible), ["case", *probes.BACKENDS],
     title=f"Does it run? (forced, one backend at a time, on {lab.device})")
show(attention.why_not(eligible), title="Why not")
lab.add(attention.eligibility_findings(eligible, lab.runnable))

# %% [markdown]
# ### "No available kernel.  Aborting execution." and its fix
#
# The source page meets this error and suggests installing a PyTorch nightly. The cause is usually the input (and, on
# a GPU, the GPU's generation): every backend you allowed refused it. A different build helps only when yours lacks the
# kernel altogether (`torch.backends.cuda.is_flash_attention_available()` says so). A common way to get there is
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
if "FLASH_ATTENTION" in lab.runnable:
    def fixed():  # the fix: give the tensors their heads dimension back
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q3.unsqueeze(1), k3.unsqueeze(1), v3.unsqueeze(1))
    after_fix = attention.ops_that_ran(fixed, lab.device)
    print(f"fixed: 4-D inputs, the profiler saw {after_fix.backend} ({after_fix.evidence})")
    lab.check("no_available_kernel_reproduced", "No available kernel" in no_kernel, no_kernel[:120])
    lab.check("the_fix_runs_flash", after_fix.backend == "FLASH_ATTENTION")
else:
    lab.skip("'No available kernel' with 3-D inputs", f"Flash Attention does not run for {lab.dtype_name} here at all")

# %% [markdown]
# The fixes, in order of preference: give the backend an input it accepts (4-D tensors; float16/bfloat16 on a GPU;
# `dropout_p=0.0`; a head size it supports), or allow a fallback with a list, `sdpa_kernel([SDPBackend.FLASH_ATTENTION,
# SDPBackend.MATH])`. A nightly build changes nothing when the input is the problem.
#
# About dropout: `dropout_p` is an argument of the call, and `F.scaled_dot_product_attention` has no training or eval
# mode. `model.eval()` does not change what your own code passes; transformers' attention layers pass `0.0`
# themselves when the module is not training (Llama's reads `dropout=0.0 if not self.training else
# self.attention_dropout`), which is why `eval()` matters for a transformers model and not for a bare SDPA call.
#
# ## 4. transformers models: `attn_implementation`
#
# Models in transformers choose their attention code with `attn_implementation=` at load time: `"eager"` (attention
# written out, like `attention_by_hand`), `"sdpa"` (the default: calls `F.scaled_dot_product_attention`, so everything
# above applies) and `"flash_attention_2"` (the separate flash-attn package); section 8 lists the others.
# `model.set_attn_implementation(...)` switches a loaded model. The greedy tokens must not depend on the choice.

# %%
if lab.model_problem:
    lab.skip(f"attn_implementation with {model_id}", lab.model_problem)
else:
    model, tokenizer = models.load_model(model_id, device=lab.device, dtype="float32", attn_implementation="eager")
    greedy = {"eager": models.generate_greedy(model, tokenizer, prompt, max_new_tokens)}
    model.set_attn_implementation("sdpa")
    greedy["sdpa"] = models.generate_greedy(model, tokenizer, prompt, max_new_tokens)
    show([{"attn_implementation": name, "continuation": g["continuation"], "tokens": g["new_tokens"]}
          for name, g in greedy.items()], title=f"{model_id}, float32, greedy")
    lab.check("greedy_tokens_identical_eager_vs_sdpa", greedy["eager"]["token_ids"] == greedy["sdpa"]["token_ids"])
    first_step = {"float32": models.next_token_candidates(model, tokenizer, prompt)}

# %% [markdown]
# Which kernel runs *inside* the model? The profiler again, on one forward pass over a batch of two prompts, once with
# prompts of equal length and once padded (a padded batch makes transformers pass an attention mask, and a mask is one
# of the conditions of section 3).

# %%
if not lab.model_problem:
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    inside = []
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        for label, texts in {"equal lengths": [prompt, prompt], "padded": [prompt, "Hi"]}.items():
            inputs = tokenizer(texts, return_tensors="pt", padding=True).to(lab.device)
            with torch.inference_mode():
                seen = attention.ops_that_ran(lambda inputs=inputs: model(**inputs), lab.device)
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
# less can become a tie. The next cell measures how many greedy tokens agree in 16-bit (in float32, above, they all
# must) and shows the first step's top candidates in each precision. flash_attention_2 (16-bit only) joins when the
# flash-attn package is importable and a GPU is present. Agreement in 16-bit is reported, not asserted: a tie can break
# either way, and neither answer is wrong.

# %%
if not lab.model_problem:
    half = lab.dtype if lab.dtype != torch.float32 else torch.bfloat16
    half_name = str(half).removeprefix("torch.")
    model_16, tokenizer_16 = models.load_model(model_id, device=lab.device, dtype=half, attn_implementation="sdpa")
    sdpa_16 = models.generate_greedy(model_16, tokenizer_16, prompt, max_new_tokens)
    model_16.set_attn_implementation("eager")
    others = {"eager": models.generate_greedy(model_16, tokenizer_16, prompt, max_new_tokens)}
    flash = probes.flash_attn()
    if flash["ok"] and lab.on_gpu:
        model_16.set_attn_implementation("flash_attention_2")
        others["flash_attention_2"] = models.generate_greedy(model_16, tokenizer_16, prompt, max_new_tokens)
    else:
        lab.skip("attn_implementation='flash_attention_2'", flash["reason"] or "flash-attn needs a CUDA GPU")
    agreement = attention.greedy_agreement(others, sdpa_16, half_name)
    show(agreement["rows"], title=f"{model_id} in {half_name}: sdpa says {sdpa_16['continuation']!r}")
    lab.record(agreement["metrics"])

# %%
if not lab.model_problem:
    for implementation in ("eager", "sdpa"):
        model_16.set_attn_implementation(implementation)
        first_step[f"{half_name}, {implementation}"] = models.next_token_candidates(model_16, tokenizer_16, prompt)
    show([{"precision": name, **{f"#{i + 1}": f"{c['token']!r} {c['logit']:.4g}" for i, c in enumerate(cands)}}
          for name, cands in first_step.items()], title="The first generated token: top candidates and their logits")
    del model, model_16

# %% [markdown]
# ## 5. Correctness against float64
#
# Every backend, every dtype, fresh random inputs (causal), compared with attention computed in float64. The error is
# the relative (Frobenius) error; the tolerance is a few rounding steps of each format, accumulated over a softmax
# (float16 keeps 11 significant bits, bfloat16 only 8, so its tolerance is wider).

# %%
dtypes, not_here = attention.dtypes_that_run(lab.device)
accurate = attention.accuracy(lab.device, dtypes, causal=True, heads=lab.heads)
show(accurate, ["dtype", "backend", "ran", "relative_error", "tolerance", "within_tolerance", "reason"],
     title="Relative error against float64")
lab.add({**attention.accuracy_findings(accurate), "skipped": not_here})

# %% [markdown]
# ## 6. The sweep: time, TFLOP/s and memory against the machine's limit
#
# Every backend that runs here (section 3 showed the others refuse) × head size × (causal or not) × sequence
# length. For each point: the median time (CUDA events on a GPU), the achieved TFLOP/s (forward FLOPs `4·B·H·N²·d`,
# halved when causal because half the scores are masked), that rate as a **fraction of the matmul ceiling** measured
# on this machine, and the peak extra memory. An out-of-memory is recorded as a row, and longer sequences of that
# series are skipped. The MATH backend is not even tried at a length where its float32 scores and their softmax would
# take more than a quarter of the free memory; the table says so.
#
# A series whose time *falls* while its work grows contradicts its own cost model: those points are measured again
# once, and the ones still against the trend are marked **noisy** (in the table, and with a cross in the figures) and
# left out of every conclusion below. On a shared machine, a neighbour's burst of work is the usual cause.
#
# What to expect: at short lengths every call is dominated by fixed costs (launching kernels, threads), so the rate is
# low; as N grows a fused backend does more work for every byte it reads and should get closer to the ceiling. The MATH
# backend writes the score matrix to memory and reads it back, so it should stay further from the ceiling, by how much
# depends on how fast this machine computes compared with how fast it moves memory.

# %%
ceiling = roofline.compute_ceiling(lab.device, lab.dtype, quick=lab.quick)
print(f"Matmul ceiling in {lab.dtype_name}: {ceiling['flops_per_s'] / 1e12:.3f} TFLOP/s, {ceiling['source']}")
board = widgets.LiveBoard(attention.DISPLAY_COLUMNS, total=attention.sweep_size(lab.runnable, lab.head_dims,
                                                                                lab.seq_lengths),
                          title=f"SDPA forward sweep, {lab.dtype_name}, batch {lab.batch}, heads {lab.heads}")
rows = attention.sweep(lab.device, lab.dtype, seq_lengths=lab.seq_lengths, head_dims=lab.head_dims,
                       backends=lab.runnable, batch=lab.batch, heads=lab.heads,
                       ceiling_flops_per_s=ceiling["flops_per_s"], warmup=lab.warmup, repeats=lab.repeats,
                       on_row=lambda row: board.add(attention.display_row(row)))
board.finish()
lab.record(attention.sweep_metrics(rows))

# %%
headline_d = max(lab.head_dims)
for causal in (True, False):
    fig = plots.attention_sweep(rows, head_dim=headline_d, causal=causal,
                                score_bytes_per_token_pair=lab.batch * lab.heads * roofline.element_size(lab.dtype),
                                title=f"SDPA forward on {lab.device_label}, {lab.dtype_name}, head size {headline_d}, "
                                      f"{'causal' if causal else 'no mask'}")
    lab.figure(f"sweep_d{headline_d}_{'causal' if causal else 'full'}", fig)

# %%
found = attention.sweep_findings(rows, head_dim=headline_d, runnable=lab.runnable)
print("\n".join(found["lines"]))
lab.add(found)

# %% [markdown]
# Read the figures: on the left, time against N; attention does N² work, so at long N the lines approach a slope of 2
# (the cell above printed the measured exponents; at short N fixed costs flatten them). In the middle, the memory of
# MATH runs parallel to, and a few times above, the dashed line of one N × N score matrix, while the fused backends
# stay near the size of their output. On the right, the fraction of the matmul ceiling. Causal attention needs half
# the work; the cell above printed its time against no mask (0.50x would be half the time). Whether a backend saves
# that time depends on its kernel: MATH computes every score and adds the mask afterwards (under the profiler its
# matrix product is the full N × N one), so it saves nothing.
#
# A fraction near or above 1 means "at the limit", not "faster than the machine": the ceiling is one matrix product
# measured in this session, and on a shared machine the neighbours slow some measurements more than others.
#
# ## 7. `best_backend`: the fastest one for your shape
#
# `labkit.attention.best_backend` measures every backend that runs for one shape, dtype and device and returns the
# fastest, with the table it measured. It also measures PyTorch's own choice (no `sdpa_kernel`) and names what that
# ran. Expect the winner to depend on the machine: each backend is a different kernel library (PyTorch's own Flash
# Attention and memory-efficient kernels, NVIDIA's cuDNN, a CPU kernel), each tuned for particular hardware
# generations, and PyTorch's default order is fixed per release, not measured on your GPU.

# %%
best_n = max((r["seq"] for r in attention.usable(rows) if r["head_dim"] == headline_d and r["causal"]),
             default=lab.seq_lengths[0])
choice = attention.best_backend(lab.device, lab.dtype, batch=lab.batch, heads=lab.heads, seq=best_n,
                                head_dim=headline_d, causal=True, ceiling_flops_per_s=ceiling["flops_per_s"],
                                warmup=lab.warmup, repeats=lab.repeats)
show([attention.display_row(r) for r in choice.rows], ["backend", "ms", "TFLOP/s", "% of ceiling", "status", "why"],
     title=f"best_backend: batch {lab.batch}, heads {lab.heads}, N={best_n}, d={headline_d}, causal, {lab.dtype_name}")
measured = [r for r in choice.rows if r["status"] == "ok"]
fig = plots.bars([r["backend"] for r in measured], [r["tflops"] for r in measured], xlabel="TFLOP/s",
                 limit=ceiling["flops_per_s"] / 1e12, limit_label="matmul ceiling",
                 title=f"N={best_n}, d={headline_d}, causal, {lab.dtype_name}")
lab.figure("best_backend", fig)

# %%
found = attention.best_backend_findings(choice, rows, ceiling_flops_per_s=ceiling["flops_per_s"],
                                        device=lab.device, dtype=lab.dtype, head_dim=headline_d, seq=best_n)
print("\n".join(found["lines"]))
lab.add(found)

# %% [markdown]
# ### Try it yourself
#
# Pick a backend and a sequence length, then run the next cell: it measures that one point and shows which kernel ran.
# (Under papermill the defaults are used: the best backend at the shortest length.)

# %%
backend_picker = widgets.picker(lab.runnable, value=choice.backend or lab.runnable[0], description="backend")
length_picker = widgets.picker(lab.seq_lengths, value=lab.seq_lengths[0], description="sequence length")

# %%
picked_backend, picked_n = backend_picker.value, length_picker.value
point = attention.sweep(lab.device, lab.dtype, seq_lengths=[picked_n], head_dims=[headline_d], causal=[True],
                        backends=[picked_backend], batch=lab.batch, heads=lab.heads,
                        ceiling_flops_per_s=ceiling["flops_per_s"], warmup=lab.warmup, repeats=lab.repeats)[0]
q_p, k_p, v_p = attention.random_qkv(lab.batch, lab.heads, picked_n, headline_d, device=lab.device, dtype=lab.dtype)
proof = attention.ops_that_ran(attention.sdpa_call(q_p, k_p, v_p, picked_backend, causal=True), lab.device)
show([attention.display_row(point)], attention.DISPLAY_COLUMNS, title=f"Your pick; the profiler saw {proof.backend}")
lab.check("the_picked_backend_ran", proof.backend == picked_backend)

# %% [markdown]
# ## Your numbers beside the reference runs
#
# Reference runs on real GPUs are stored under `reference/<device>/`. Where there are any, the headline series (largest
# head size, causal) of each is shown next to yours.

# %%
show(attention.beside_reference_runs(rows, headline_d), title="TFLOP/s: this machine and the reference runs")

# %% [markdown]
# ## 8. Attention today: which Flash, when not Flash, and beyond SDPA
#
# ### Which FlashAttention runs behind `SDPBackend.FLASH_ATTENTION`
#
# On a GPU, PyTorch's FLASH_ATTENTION backend is its built-in copy of **FlashAttention-2** (SDPA's documentation cites
# the FlashAttention-2 paper, and torch 2.13's `torch.nn.attention.restore_flash_attention_impl` says it restores "the
# default FA2 implementation"). `torch.backends.cuda` reports whether that kernel is compiled in
# (`is_flash_attention_available()`), not its version. torch 2.13 can swap in newer ones:
# `torch.nn.attention.list_flash_attention_impls()` names them (FA3, FA4), `activate_flash_attention_impl("FA4")` plugs
# one in, `current_flash_attention_impl()` says which is active (None: the built-in one). Each needs its own package
# (FA3 the `flash_attn_interface` module, FA4 `flash_attn.cute`) and a recent GPU (FA4 checks for compute capability
# 9.0 or 10.0: Hopper or Blackwell). On a CPU, FLASH_ATTENTION is a different kernel altogether, PyTorch's own CPU
# implementation of the same tiling idea (`aten::_scaled_dot_product_flash_attention_for_cpu` in section 2's table).
# The cell tries to activate each one (and restores the default). Its column "available here" says, for the built-in
# one, whether this torch has it compiled in (`is_flash_attention_available()`: False on a build without CUDA, whose
# FLASH_ATTENTION is the CPU kernel), and for each other one whether activating it worked.

# %%
show(attention_today.flash_implementations(), title="FlashAttention implementations behind FLASH_ATTENTION")

# %% [markdown]
# ### Flash is not always the fastest
#
# The source page means to run Flash Attention and nothing else: `sdpa_kernel(SDPBackend.FLASH_ATTENTION)` today.
# On the H100 measured in `reference/nvidia-h100/` (torch 2.11) it was not the fastest choice: in that run (bfloat16,
# N=16384, head size 128, causal), cuDNN attention ran at 628 TFLOP/s and Flash at 344, and PyTorch's own choice there
# was cuDNN. So on that GPU a Flash-only context makes attention about 1.8x *slower* than PyTorch's
# default. (The page's old `sdp_kernel(...)` call, which leaves cuDNN switched on, would by that order have run cuDNN
# after all.) The cell reads those numbers from the stored runs:

# %%
faster = attention_today.reference_backend_rates(head_dim=128)
show(faster, title="Stored reference runs: the fastest backend against Flash Attention alone")
for r in faster:
    print(f"{r['reference run']}, N={r['N']}: forcing FLASH_ATTENTION alone would run "
          f"{r['Flash only is slower by']:.2f}x slower than {r['fastest backend']}.")

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

n = lab.flex_seq
docs = attention_today.document_ids(attention_today.packed_lengths(n), lab.device)


def causal(b, h, q_idx, kv_idx):  # a mask_mod: may query q_idx see key kv_idx?
    return q_idx >= kv_idx


def same_document(b, h, q_idx, kv_idx):
    return docs[q_idx] == docs[kv_idx]


document = and_masks(causal, same_document)  # packed sequences: causal, and only inside each document
blocks = {"causal": create_block_mask(causal, None, None, n, n, device=lab.device),
          "document": create_block_mask(document, None, None, n, n, device=lab.device)}
print(f"{n} positions packed from documents of {attention_today.packed_lengths(n)} tokens")

# %%
flex = torch.compile(flex_attention) if lab.compile_flex else flex_attention
q, k, v = attention.random_qkv(lab.batch, lab.heads, n, headline_d, device=lab.device, dtype=lab.dtype)
cases = {"causal": (blocks["causal"], {"is_causal": True}),  # each mask, and the same mask as SDPA takes it
         "document": (blocks["document"], {"attn_mask": create_mask(document, 1, 1, n, n, lab.device)})}
flexed = attention_today.flex_vs_sdpa(flex, q, k, v, cases, device=lab.device, compiled=lab.compile_flex,
                                      warmup=lab.warmup, repeats=lab.repeats)
show(flexed, attention_today.FLEX_COLUMNS, title=f"FlexAttention and SDPA, batch {lab.batch}, heads {lab.heads}, "
                                                 f"N={n}, d={headline_d}, {lab.dtype_name}")
found = attention_today.flex_findings(flexed, compile_skipped=lab.compile_flex_why)
print("\n".join(found["lines"]))
lab.add(found)

# %% [markdown]
# A `score_mod` changes the scores themselves, which SDPA cannot do at all. Gemma 2 caps its attention scores with
# `cap · tanh(score / cap)` (`attn_logit_softcapping=50.0` in its config; transformers' FlexAttention integration
# applies exactly this `score_mod`). A cap of 5 on random inputs makes the effect visible; attention by hand with the
# same cap is the reference.

# %%
def soft_cap(score, b, h, q_idx, kv_idx):  # a score_mod
    return 5.0 * torch.tanh(score / 5.0)


q_s, k_s, v_s = attention.random_qkv(1, 2, 128, 64, device=lab.device, dtype=lab.dtype, seed=1)
q_s = 4 * q_s  # larger scores, so that the cap bites
capped = attention_today.quietly(flex_attention, q_s, k_s, v_s, score_mod=soft_cap)  # uncompiled: small, run once
by_hand = torch.softmax(soft_cap(q_s @ k_s.transpose(-2, -1) / 64**0.5, 0, 0, 0, 0), dim=-1) @ v_s
plain = F.scaled_dot_product_attention(q_s, k_s, v_s)
error, changed = attention.relative_error(capped, by_hand), attention.relative_error(plain, by_hand)
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
packed = attention_today.varlen_row(q[:1], k[:1], v[:1], attention_today.packed_lengths(n), device=lab.device,
                                    warmup=lab.warmup, repeats=lab.repeats)
found = attention_today.varlen_findings(packed, dtype=lab.dtype)
print("\n".join(found["lines"]))
lab.add(found)

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
show(attention_today.attn_implementation_rows(), ["attn_implementation", "ok", "reason", "kernels fallback"],
     title="attn_implementation= values, built with this stack")

# %% [markdown]
# ## What you measured

# %%
lab.finish()
