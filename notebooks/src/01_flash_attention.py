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
# 1. **the picture**: the math backend builds the whole N × N score matrix, the fused backends (Flash Attention,
#    memory-efficient, cuDNN) never do; you predict the memory, then measure it;
# 2. **how to force a backend** with `torch.nn.attention.sdpa_kernel`, and how to *prove* which one ran (the profiler),
#    including what the source page's old `torch.backends.cuda.sdp_kernel(...)` really does;
# 3. **eligibility**: which inputs each backend refuses, with PyTorch's own reason, and the source page's
#    `No available kernel.  Aborting execution.` with its fix;
# 4. **transformers models**: `attn_implementation="eager" | "sdpa" | "flash_attention_2"` and
#    `model.set_attn_implementation`, with identical greedy tokens;
# 5. **correctness** of every backend against a float64 reference;
# 6. **the sweep**: time, TFLOP/s, fraction of the measured matmul ceiling and memory, as the sequence grows, on a
#    live board, then as figures;
# 7. **`labkit.attention.best_backend`**: the fastest backend for your shape, measured.
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
repeats = 0                # timed calls per point (0 means 5)
quick = False              # smaller sizes, for tests and CPU-only machines
solutions = False          # fill every exercise with its solution (a teacher's run)
results_path = ""          # where to write the results JSON (empty: do not write)

# %%
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from labkit import attention, models, plots, probes, results, roofline, widgets
from labkit.errors import BadParameter

widgets.short_errors()  # a bad parameter below stops the notebook with one sentence, not a traceback
device = probes.resolve_device(device)
dtype = probes.resolve_dtype(dtype, device)
probes.check_dtype(device, dtype)
plan = attention.plan_sweep(device, quick=quick, batch=batch, heads=heads, seq_lengths=seq_lengths,
                            head_dims=head_dims, repeats=repeats)
model_problem = models.check_model(model_id)  # a wrong name stops here; a missing package is skipped in section 4
res = results.Results("01_flash_attention", results_path)
dtype_name = str(dtype).removeprefix("torch.")
on_gpu = device.startswith("cuda")
runnable = [b for b in probes.BACKENDS if probes.try_sdpa(device, dtype, "plain", b).ok]
print(f"Working on {device} ({probes.device_label(device)}) in {dtype_name}; "
      f"backends that run here: {', '.join(runnable)}")
print(f"Sweep: batch {plan['batch']}, heads {plan['heads']}, lengths {plan['seq_lengths']}, head sizes {plan['head_dims']}")

# %%
widgets.show(results.environment_rows(res.env), ["item", "value"], title="Environment")


# %% [markdown]
# ## 1. SDPA in one picture
#
# Written out by hand, attention is three lines. The middle one builds `scores`, a `(batch, heads, N, N)` tensor:
# every query against every key. This is what the **MATH** backend does.

# %%
def attention_by_hand(q, k, v):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (batch, heads, N, N): the whole score matrix
    weights = torch.softmax(scores, dim=-1)
    return weights @ v

q, k, v = attention.random_qkv(1, plan["heads"], 256, 64, device=device, dtype=dtype)
error = attention.relative_error(F.scaled_dot_product_attention(q, k, v), attention_by_hand(q, k, v))
print(f"SDPA vs attention by hand: relative error {error:.2e} (tolerance for {dtype_name}: "
      f"{attention.TOLERANCES[dtype_name]:.0e})")
res.check("sdpa_equals_attention_by_hand", error <= attention.TOLERANCES[dtype_name])

# %% [markdown]
# The **fused** backends compute the same result without ever holding `scores`: Flash Attention walks over the keys in
# tiles, keeps a running maximum and sum per query row (an *online softmax*) and writes only the output, which is
# `(batch, heads, N, d)`.
#
# **Predict before you measure.** One score matrix takes `batch × heads × N² × bytes per element`. Doubling N should
# multiply the MATH backend's extra memory by about 4; a fused backend's extra memory should only double (it grows
# like its output, with N). The table below gives the size of one score matrix at each length of this notebook's sweep,
# in the input dtype and in float32 (an implementation may compute the softmax in float32 for accuracy).

# %%
element = roofline.element_size(dtype)
predicted = [{"N": n, f"one score matrix in {dtype_name} (MiB)": attention.score_matrix_bytes(plan["batch"], plan["heads"], n, n, dtype) / 2**20,
              "in float32 (MiB)": attention.score_matrix_bytes(plan["batch"], plan["heads"], n, n, "float32") / 2**20,
              "output (MiB)": plan["batch"] * plan["heads"] * n * 64 * element / 2**20} for n in plan["seq_lengths"]]
widgets.show(predicted, title=f"Predicted, batch {plan['batch']}, heads {plan['heads']}, head size 64, {dtype_name}")

# %% [markdown]
# Now the measurement: each backend that runs here, at each length, head size 64, no mask. *Peak MiB* is the memory
# one call allocates above what its inputs already hold (on a GPU from the CUDA allocator's statistics, on a CPU from
# the profiler's allocation records).

# %%
picture = attention.sweep(device, dtype, seq_lengths=plan["seq_lengths"], head_dims=[64], causal=[False],
                          backends=runnable, batch=plan["batch"], heads=plan["heads"],
                          warmup=plan["warmup"], repeats=plan["repeats"])
widgets.show([attention.display_row(r) for r in picture], ["backend", "N", "ms", "peak MiB", "status", "why"],
             title="Measured: time and peak extra memory per call")

# %%
exponents = {b: roofline.growth_exponent([(r["seq"], r["peak_extra_bytes"]) for r in picture
                                           if r["backend"] == b and r["status"] == "ok"]) for b in runnable}
for backend, p in exponents.items():
    if p is not None:
        print(f"{backend:20s} extra memory grows like N^{p:.2f}")
        res.metric(f"memory_growth_exponent_{backend.lower()}", p)
longest = max(r["seq"] for r in picture if r["status"] == "ok")
one_matrix = attention.score_matrix_bytes(plan["batch"], plan["heads"], longest, longest, dtype)
math_at_longest = [r for r in picture if r["backend"] == "MATH" and r["seq"] == longest and r["peak_extra_bytes"]]
if math_at_longest:
    ratio = math_at_longest[0]["peak_extra_bytes"] / one_matrix
    print(f"At N={longest} the MATH backend's peak is {ratio:.1f} score matrices in {dtype_name}")
    res.metric("math_peak_in_score_matrices", ratio)
if exponents.get("MATH") is not None:
    res.check("math_memory_grows_like_n_squared", exponents["MATH"] > 1.5, f"N^{exponents['MATH']:.2f}")
fused_at_longest = [r for r in picture if r["backend"] != "MATH" and r["seq"] == longest and r["peak_extra_bytes"]]
if fused_at_longest:
    res.check("fused_backends_never_hold_a_score_matrix",
              all(r["peak_extra_bytes"] < one_matrix for r in fused_at_longest),
              f"at N={longest}: " + ", ".join(f"{r['backend']} {r['peak_extra_bytes'] / 2**20:.1f} MiB" for r in fused_at_longest)
              + f" < one score matrix {one_matrix / 2**20:.1f} MiB")
else:
    res.skip("fused-backend memory", f"no fused backend runs for {dtype_name} on {device}")


# %% [markdown]
# What you saw: the MATH backend's extra memory grows close to N², and the line above says how many score matrices it
# holds at its peak (the scores and their softmax at least; more when 16-bit inputs are computed in float32). A fused
# backend's grows roughly like N and, once N is well above the head size, stays far below one score matrix. At long
# sequences that difference decides whether a model fits at all.
#
# ## 2. Forcing a backend, and proving which one ran
#
# The modern way is the context manager `torch.nn.attention.sdpa_kernel`. Given one backend, only that one may run.
# Given a list, any of them may run, **in PyTorch's own order**; `set_priority=True` asks PyTorch to try them in your
# list's order. Don't trust the name of the context manager to tell you what ran: the profiler records the ATen op
# that did the work (`aten::_scaled_dot_product_flash_attention...`, `..._efficient_attention`, `..._cudnn_attention`,
# `..._attention_math`), and on a GPU the CUDA kernels too.

# %%
def run_under(backends, set_priority=False):
    def call():
        with sdpa_kernel(backends, set_priority=set_priority):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return call

requests = {f"sdpa_kernel(SDPBackend.{b})": (getattr(SDPBackend, b), False) for b in probes.BACKENDS}
requests["sdpa_kernel([MATH, FLASH_ATTENTION])"] = ([SDPBackend.MATH, SDPBackend.FLASH_ATTENTION], False)
requests["sdpa_kernel([MATH, FLASH_ATTENTION], set_priority=True)"] = ([SDPBackend.MATH, SDPBackend.FLASH_ATTENTION], True)

proofs = []
for asked, (backends, priority) in requests.items():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # refusals are explained in section 3
            seen = attention.ops_that_ran(run_under(backends, priority), device)
        proofs.append({"asked for": asked, "ran (profiler)": seen.backend, "evidence": seen.evidence})
    except RuntimeError as err:
        proofs.append({"asked for": asked, "ran (profiler)": None, "evidence": "refused: " + str(err).splitlines()[0]})
seen = attention.ops_that_ran(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device)
proofs.append({"asked for": "no sdpa_kernel: PyTorch chooses", "ran (profiler)": seen.backend, "evidence": seen.evidence})
widgets.show(proofs, title=f"What ran, {dtype_name} causal, on {device}")

# %%
singles = {f"sdpa_kernel(SDPBackend.{b})": b for b in probes.BACKENDS}
ran_singles = [p for p in proofs if p["asked for"] in singles and p["ran (profiler)"]]
res.check("a_forced_backend_is_the_one_that_ran",
          ran_singles and all(p["ran (profiler)"] == singles[p["asked for"]] for p in ran_singles))
listed = [p for p in proofs if p["asked for"].startswith("sdpa_kernel([")]
res.check("a_backend_list_runs_one_of_its_members",
          all(p["ran (profiler)"] in ("MATH", "FLASH_ATTENTION") for p in listed))
plain, ordered = listed[0]["ran (profiler)"], listed[1]["ran (profiler)"]
print(f"[MATH, FLASH_ATTENTION] ran {plain}; with set_priority=True it ran {ordered}.")
if plain == ordered and not on_gpu:
    print("On a CPU, PyTorch's dispatcher tries Flash then math in a fixed order, so set_priority changed nothing here.")
elif plain != ordered:
    print("set_priority=True made PyTorch follow the list's order.")

# %% [markdown]
# ### The source page's `torch.backends.cuda.sdp_kernel(...)`
#
# The source page forces Flash Attention with `torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False,
# enable_mem_efficient=False)`. That function is deprecated. Worse, it has a fourth switch, `enable_cudnn`, which
# defaults to `True`, so the source page's call does **not** switch off the cuDNN backend: on a GPU where cuDNN
# attention is eligible and preferred, code under it can run cuDNN attention, not Flash. The cell below runs it once,
# on purpose, captures its warning, reads the four switches inside it, and asks the profiler what ran.

# %% tags=["old-api-on-purpose"]
# The source page's old API, run on purpose: its FutureWarning is captured and shown.
legacy_error = ""
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        with torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False, enable_mem_efficient=False):
            switches = attention.enabled_backends()
            legacy = attention.ops_that_ran(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device)
    except (AttributeError, RuntimeError) as err:
        legacy_error = f"{type(err).__name__}: {str(err).splitlines()[0]}"
deprecations = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
for w in deprecations[:1]:
    print(f"{w.category.__name__}: {w.message}")
if legacy_error:
    res.skip("the old sdp_kernel context manager", f"it failed on torch {torch.__version__}: {legacy_error}")
else:
    widgets.show([{"backend": b, "enabled inside sdp_kernel(...)": on} for b, on in switches.items()],
                 title="The four switches inside the old context manager")
    print(f"What ran under it (profiler): {legacy.backend} ({legacy.evidence})")
    res.check("old_sdp_kernel_warns", bool(deprecations))
    res.check("old_sdp_kernel_leaves_cudnn_enabled", switches["CUDNN_ATTENTION"])
    res.check("old_sdp_kernel_ran_an_enabled_backend", switches.get(legacy.backend, False), str(legacy.backend))
print("Switches after the context manager:", attention.enabled_backends())

# %% [markdown]
# The modern equivalent is `sdpa_kernel(SDPBackend.FLASH_ATTENTION)` (section 2's table): exactly one backend is
# allowed, so what ran is what you asked for, or you get an error. If you really want "Flash, else cuDNN", say so with
# a list.
#
# ## 3. Eligibility: which inputs each backend refuses, and why
#
# Each fused backend has conditions: dtypes (on a GPU, Flash Attention takes only float16/bfloat16), 4-D inputs
# `(batch, heads, N, d)`, masks, dropout, head size. When a forced backend refuses, PyTorch emits warnings that say
# why, then raises `No available kernel`. labkit forces each backend on each case and keeps those reasons.

# %%
eligible = attention.eligibility(device, dtype)
cases = list(dict.fromkeys(r["case"] for r in eligible))
grid = [{"case": case, **{r["backend"]: r["ok"] for r in eligible if r["case"] == case}} for case in cases]
widgets.show(grid, ["case", *probes.BACKENDS], title=f"Does it run? (forced, one backend at a time, on {device})")
reasons = []
for backend in probes.BACKENDS:
    refused = [r for r in eligible if r["backend"] == backend and not r["ok"]]
    if refused and len(refused) == len(cases) and len({r["reason"] for r in refused}) == 1:
        reasons.append({"backend": backend, "case": "every case", "why (PyTorch's words)": refused[0]["reason"]})
    else:
        reasons += [{"backend": backend, "case": r["case"], "why (PyTorch's words)": r["reason"]} for r in refused]
widgets.show(reasons, title="Why not")
own = [r for r in eligible if not r["ok"] and r["backend"] in runnable]
res.check("refusals_carry_torchs_own_reason", all(not r["reason"].startswith("no reason given") for r in own),
          f"{len(own)} refusals of backends that exist on {device}")
for backend in probes.BACKENDS:
    res.metric(f"eligible_cases_{backend.lower()}", sum(r["ok"] for r in eligible if r["backend"] == backend))

# %% [markdown]
# ### "No available kernel.  Aborting execution." and its fix
#
# The source page meets this error and suggests installing a PyTorch nightly. The cause is the input, not the build:
# every backend you allowed refused it. A common way to get there is passing 3-D tensors `(batch, N, d)`, for
# example from an older model or a hand-written layer. Forcing Flash Attention on them:

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
if "FLASH_ATTENTION" in runnable:
    def fixed():  # the fix: give the tensors their heads dimension back
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q3.unsqueeze(1), k3.unsqueeze(1), v3.unsqueeze(1))
    after_fix = attention.ops_that_ran(fixed, device)
    print(f"fixed: 4-D inputs, the profiler saw {after_fix.backend} ({after_fix.evidence})")
    res.check("no_available_kernel_reproduced", "No available kernel" in no_kernel, no_kernel.splitlines()[0] if no_kernel else "")
    res.check("the_fix_runs_flash", after_fix.backend == "FLASH_ATTENTION")
else:
    res.skip("'No available kernel' with 3-D inputs", f"Flash Attention does not run for {dtype_name} on {device} at all")

# %% [markdown]
# The fixes, in order of preference: give the backend an input it accepts (4-D tensors; float16/bfloat16 on a GPU;
# dropout 0 in eval mode; a head size it supports), or allow a fallback with a list, `sdpa_kernel([SDPBackend.FLASH_ATTENTION,
# SDPBackend.MATH])`. A nightly build changes nothing when the input is the problem.
#
# ## 4. transformers models: `attn_implementation`
#
# Models in transformers choose their attention code with `attn_implementation=` at load time: `"eager"` (attention
# written out, like `attention_by_hand`), `"sdpa"` (the default: calls `F.scaled_dot_product_attention`, so everything
# above applies) and `"flash_attention_2"` (the separate flash-attn package). `model.set_attn_implementation(...)`
# switches a loaded model. The greedy tokens must not depend on the choice.

# %%
if model_problem:
    res.skip(f"attn_implementation with {model_id}", model_problem)
else:
    model, tokenizer = models.load_model(model_id, device=device, dtype="float32", attn_implementation="eager")
    greedy = {"eager": models.generate_greedy(model, tokenizer, prompt, max_new_tokens)}
    model.set_attn_implementation("sdpa")
    greedy["sdpa"] = models.generate_greedy(model, tokenizer, prompt, max_new_tokens)
    widgets.show([{"attn_implementation": name, "continuation": g["continuation"], "tokens": g["new_tokens"]}
                  for name, g in greedy.items()], title=f"{model_id}, float32, greedy")
    res.check("greedy_tokens_identical_eager_vs_sdpa", greedy["eager"]["token_ids"] == greedy["sdpa"]["token_ids"])
    first_step = {"float32": models.next_token_candidates(model, tokenizer, prompt)}

# %% [markdown]
# Which kernel runs *inside* the model? The profiler again, on one forward pass over a batch of two prompts, once with
# prompts of equal length and once padded (a padded batch makes transformers pass an attention mask, and a mask is one
# of the conditions of section 3).

# %%
if not model_problem:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = {"equal lengths": [prompt, prompt], "padded": [prompt, "Hi"]}
    inside = []
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        for label, texts in batches.items():
            inputs = tokenizer(texts, return_tensors="pt", padding=True).to(device)
            with torch.inference_mode():
                seen = attention.ops_that_ran(lambda: model(**inputs), device)
            inside.append({"attn_implementation": implementation, "batch": label,
                           "SDPA backend (profiler)": seen.backend or "none: matmul + softmax", "evidence": seen.evidence})
    widgets.show(inside, title="What ran inside the model")
    res.check("eager_calls_no_sdpa", all(r["SDPA backend (profiler)"].startswith("none") for r in inside if r["attn_implementation"] == "eager"))
    res.check("sdpa_model_runs_an_sdpa_backend", all(r["SDPA backend (profiler)"] in probes.BACKENDS for r in inside if r["attn_implementation"] == "sdpa"))

# %% [markdown]
# In 16-bit the two implementations add and round in a different order, and the logits themselves are rounded:
# bfloat16 keeps 8 significant bits, so near a logit of 16 its steps are 0.125 apart and two candidates that differ by
# less can become a tie. The next cell measures how many greedy tokens agree in 16-bit (in float32, above, they all
# must) and shows the first step's top candidates in each precision. flash_attention_2 (16-bit only) joins when the
# flash-attn package is importable and a GPU is present. Agreement in 16-bit is reported, not asserted: a tie can break
# either way, and neither answer is wrong.

# %%
if not model_problem:
    half = dtype if dtype != torch.float32 else torch.bfloat16
    half_name = str(half).removeprefix("torch.")
    model_16, tokenizer_16 = models.load_model(model_id, device=device, dtype=half, attn_implementation="sdpa")
    reference_16 = models.generate_greedy(model_16, tokenizer_16, prompt, max_new_tokens)
    compare = {}
    model_16.set_attn_implementation("eager")
    compare["eager"] = models.generate_greedy(model_16, tokenizer_16, prompt, max_new_tokens)
    flash = probes.flash_attn()
    if flash["ok"] and on_gpu:
        model_16.set_attn_implementation("flash_attention_2")
        compare["flash_attention_2"] = models.generate_greedy(model_16, tokenizer_16, prompt, max_new_tokens)
    else:
        res.skip("attn_implementation='flash_attention_2'", flash["reason"] if not flash["ok"] else "flash-attn needs a CUDA GPU")
    rows = []
    for name, g in compare.items():
        agree = next((i for i, (a, b) in enumerate(zip(g["token_ids"], reference_16["token_ids"])) if a != b), len(g["token_ids"]))
        rows.append({"attn_implementation": name, f"tokens agreeing with sdpa ({half_name})": f"{agree} of {len(g['token_ids'])}",
                     "continuation": g["continuation"]})
        res.metric(f"greedy_tokens_agreeing_{name}_vs_sdpa_{half_name}", agree)
    widgets.show(rows, title=f"{model_id} in {half_name}: sdpa says {reference_16['continuation']!r}")
    model_16.set_attn_implementation("eager")
    first_step[f"{half_name}, eager"] = models.next_token_candidates(model_16, tokenizer_16, prompt)
    model_16.set_attn_implementation("sdpa")
    first_step[f"{half_name}, sdpa"] = models.next_token_candidates(model_16, tokenizer_16, prompt)
    widgets.show([{"precision": name, **{f"#{i + 1}": f"{c['token']!r} {c['logit']:.4g}" for i, c in enumerate(cands)}}
                  for name, cands in first_step.items()], title="The first generated token: top candidates and their logits")
    del model, model_16

# %% [markdown]
# ## 5. Correctness against float64
#
# Every backend, every dtype, fresh random inputs (causal), compared with attention computed in float64. The error is
# the relative (Frobenius) error; the tolerance is a few rounding steps of each format, accumulated over a softmax
# (float16 keeps 11 significant bits, bfloat16 only 8, so its tolerance is wider).

# %%
dtypes = ["float32"]
for candidate in ("float16", "bfloat16"):
    try:
        probes.check_dtype(device, probes.resolve_dtype(candidate))
        dtypes.append(candidate)
    except BadParameter as err:
        res.skip(f"accuracy in {candidate}", str(err))
accurate = attention.accuracy(device, dtypes, causal=True, heads=plan["heads"])
widgets.show(accurate, ["dtype", "backend", "ran", "relative_error", "tolerance", "within_tolerance", "reason"],
             title="Relative error against float64")
ran = [r for r in accurate if r["ran"]]
for r in ran:
    res.metric(f"relative_error_{r['backend'].lower()}_{r['dtype']}", r["relative_error"])
res.check("every_backend_within_tolerance", ran and all(r["within_tolerance"] for r in ran))

# %% [markdown]
# ## 6. The sweep: time, TFLOP/s and memory against the machine's limit
#
# Every backend that runs here (section 3 showed the others refuse) × head size × (causal or not) × sequence
# length. For each point: the median time of several calls
# after warm-up (CUDA events on a GPU), the achieved TFLOP/s (forward FLOPs `4·B·H·N²·d`, halved when causal because
# half the scores are masked), that rate as a **fraction of the matmul ceiling** measured on this machine, and the
# peak extra memory. An out-of-memory is recorded as a row, and longer sequences of that series are skipped.
#
# What to expect: at short lengths every call is dominated by fixed costs (launching kernels, threads), so the rate is
# low; as N grows a fused backend does more work for every byte it reads and should get closer to the ceiling. The MATH
# backend writes the score matrix to memory and reads it back, so it should stay further from the ceiling, by how much
# depends on how fast this machine computes compared with how fast it moves memory. The cell after the figures prints
# what your run showed.

# %%
ceiling = roofline.compute_ceiling(device, dtype, quick=quick)
print(f"Matmul ceiling in {dtype_name}: {ceiling['flops_per_s'] / 1e12:.3f} TFLOP/s, {ceiling['source']}")
total = len(runnable) * len(plan["head_dims"]) * 2 * len(plan["seq_lengths"])
board = widgets.LiveBoard(attention.DISPLAY_COLUMNS, title=f"SDPA forward sweep, {dtype_name}, batch {plan['batch']}, heads {plan['heads']}",
                          total=total)
rows = attention.sweep(device, dtype, seq_lengths=plan["seq_lengths"], head_dims=plan["head_dims"], backends=runnable,
                       batch=plan["batch"], heads=plan["heads"], ceiling_flops_per_s=ceiling["flops_per_s"],
                       warmup=plan["warmup"], repeats=plan["repeats"],
                       on_row=lambda row: board.add(attention.display_row(row)))
board.finish()

# %%
headline_d = max(plan["head_dims"])
for causal in (True, False):
    fig = plots.attention_sweep(rows, head_dim=headline_d, causal=causal,
                                score_bytes_per_token_pair=plan["batch"] * plan["heads"] * element,
                                title=f"SDPA forward on {probes.device_label(device)}, {dtype_name}, head size {headline_d}, "
                                      f"{'causal' if causal else 'no mask'}")
    res.figure(f"sweep_d{headline_d}_{'causal' if causal else 'full'}", fig)

# %%
for r in rows:
    if r["status"] == "ok":
        key = f"{r['backend'].lower()}_d{r['head_dim']}_{'causal' if r['causal'] else 'full'}_n{r['seq']}"
        res.metric(f"sweep_{key}_ms", r["median_ms"])
        res.metric(f"sweep_{key}_tflops", r["tflops"])
        res.metric(f"sweep_{key}_fraction_of_ceiling", r["fraction_of_ceiling"])
        if r["peak_extra_bytes"] is not None:
            res.metric(f"sweep_{key}_peak_mib", r["peak_extra_bytes"] / 2**20)
res.check("sweep_measured_every_backend_that_runs", all(any(r["backend"] == b and r["status"] == "ok" for r in rows) for b in runnable))
ok = [r for r in rows if r["status"] == "ok"]
for r in rows:
    if r["status"] in ("failed", "refused"):
        print(f"{r['status'].capitalize()}: {r['backend']} at N={r['seq']}, d={r['head_dim']}: {r['reason']}")
    if r["status"] in ("oom", "skipped"):  # points this machine could not hold: recorded, the sweep went on
        res.skip(f"sweep {r['backend']} d={r['head_dim']} {'causal' if r['causal'] else 'full'} N={r['seq']}", r["reason"])
best_row = max(ok, key=lambda r: r["tflops"])
print(f"Best point: {best_row['backend']} at N={best_row['seq']}, d={best_row['head_dim']}, "
      f"{'causal' if best_row['causal'] else 'no mask'}: {best_row['tflops']:.3f} TFLOP/s, "
      f"{100 * best_row['fraction_of_ceiling']:.0f}% of the matmul ceiling")
def slope(backend, key):
    """p in key ~ N^p between the two longest lengths of the headline series."""
    return roofline.growth_exponent([(r["seq"], r[key]) for r in ok
                                     if r["backend"] == backend and r["head_dim"] == headline_d and r["causal"]])

for backend in runnable:
    time_p, rate_p = slope(backend, "median_ms"), slope(backend, "fraction_of_ceiling")
    if time_p is not None:
        trend = "rising" if rate_p > 0.05 else "falling" if rate_p < -0.05 else "flat"
        print(f"{backend}: between the two longest lengths, time grows like N^{time_p:.2f}; fraction of the ceiling {trend}")
        res.metric(f"sweep_time_exponent_{backend.lower()}", time_p)
longest_n = max(r["seq"] for r in ok if r["head_dim"] == headline_d and r["causal"])
at_longest = {r["backend"]: r for r in ok if r["head_dim"] == headline_d and r["causal"] and r["seq"] == longest_n}
for backend, r in at_longest.items():
    memory = f", {r['peak_extra_bytes'] / 2**20:.1f} MiB extra" if r["peak_extra_bytes"] is not None else ""
    print(f"At N={longest_n} (d={headline_d}, causal) {backend} reached {100 * r['fraction_of_ceiling']:.0f}% of the "
          f"matmul ceiling in {r['median_ms']:.3g} ms{memory}")
for r in rows:
    if r["status"] == "oom":
        print(f"Out of memory: {r['backend']} at N={r['seq']} (d={r['head_dim']}) -- recorded, not fatal")

# %% [markdown]
# Read the figures: on the left, time against N; attention does N² work, so at long N the lines approach a slope of 2
# (the cell above printed the measured exponents; at short N fixed costs flatten them). In the middle, the memory of
# MATH follows the dashed N² line while the fused backends stay near the size of their output. On the right, the
# fraction of the matmul ceiling. Causal attention does half the work, and the printed numbers show whether it ran in
# half the time.
#
# A fraction near or above 1 means "at the limit", not "faster than the machine": the ceiling is one matrix product
# measured in this session, and on a shared machine (the tests run two notebooks at once on two CPU cores) the
# neighbours slow some measurements more than others.
#
# ## 7. `best_backend`: the fastest one for your shape
#
# `labkit.attention.best_backend` measures every backend that runs for one shape, dtype and device and returns the
# fastest, with the table it measured. It also measures PyTorch's own choice (no `sdpa_kernel`) and names what that
# ran. Expect the winner to depend on the machine: each backend is a different kernel library (PyTorch's own Flash
# Attention and memory-efficient kernels, NVIDIA's cuDNN, a CPU kernel), each tuned for particular hardware
# generations, and PyTorch's default order is fixed per release, not measured on your GPU. Measure on your machine, and
# compare with the reference runs below, which come from other GPUs.

# %%
ran_lengths = sorted({r["seq"] for r in ok if r["head_dim"] == headline_d and r["causal"]})
best_n = ran_lengths[-1]
choice = attention.best_backend(device, dtype, batch=plan["batch"], heads=plan["heads"], seq=best_n, head_dim=headline_d,
                                causal=True, ceiling_flops_per_s=ceiling["flops_per_s"],
                                warmup=plan["warmup"], repeats=plan["repeats"])
widgets.show([attention.display_row({**r, "seq": best_n}) for r in choice.rows],
             ["backend", "ms", "TFLOP/s", "% of ceiling", "status", "why"],
             title=f"best_backend: batch {plan['batch']}, heads {plan['heads']}, N={best_n}, d={headline_d}, causal, {dtype_name}")
measured = [r for r in choice.rows if r["status"] == "ok"]
fig = plots.bars([r["backend"] for r in measured], [r["tflops"] for r in measured], xlabel="TFLOP/s",
                 limit=ceiling["flops_per_s"] / 1e12, limit_label="matmul ceiling",
                 title=f"N={best_n}, d={headline_d}, causal, {dtype_name}")
res.figure("best_backend", fig)
print(f"best_backend chose {choice.backend}: {choice.median_ms:.3f} ms, {choice.tflops:.3f} TFLOP/s, "
      f"{100 * choice.tflops * 1e12 / ceiling['flops_per_s']:.0f}% of the matmul ceiling")

# %%
by_name = {r["backend"]: r for r in choice.rows if r["status"] == "ok"}
pytorch_pick = next(r for r in choice.rows if r["backend"].startswith("PyTorch's choice"))
print(f"PyTorch's own choice took {pytorch_pick['median_ms']:.3g} ms, best_backend's {choice.median_ms:.3g} ms "
      f"({pytorch_pick['median_ms'] / choice.median_ms:.2f}x)")
# Fused against MATH at the longest length where both ran: on a big GPU, MATH's score matrix does not fit at best_n.
same_series = [r for r in ok if r["head_dim"] == headline_d and r["causal"]]
math_lengths = {r["seq"] for r in same_series if r["backend"] == "MATH"}
fused_lengths = {r["seq"] for r in same_series if r["backend"] != "MATH"}
both = sorted(math_lengths & fused_lengths)
if both:
    n_both = both[-1]
    at_n = [r for r in same_series if r["seq"] == n_both]
    math_row = next(r for r in at_n if r["backend"] == "MATH")
    fastest_fused = min((r for r in at_n if r["backend"] != "MATH"), key=lambda r: r["p10_ms"])
    res.check("a_fused_backend_beats_math_at_long_n", fastest_fused["p10_ms"] < math_row["p10_ms"],
              f"N={n_both}: {fastest_fused['backend']} {fastest_fused['p10_ms']:.3g} ms vs MATH {math_row['p10_ms']:.3g} ms (fastest 10%)")
else:
    res.skip("fused vs math at long N", f"MATH and a fused backend never ran at the same length on {device}")
res.metric("best_backend_tflops", choice.tflops)
res.metric("best_backend_fraction_of_ceiling", choice.tflops * 1e12 / ceiling["flops_per_s"])
if on_gpu and dtype_name == "bfloat16" and best_n >= 8192:
    res.check("best_backend_reaches_75_percent_of_the_matmul_ceiling", choice.tflops * 1e12 >= 0.75 * ceiling["flops_per_s"])
else:
    res.skip("the 75% of the matmul ceiling target", f"it is set for bfloat16 on a GPU at N >= 8192; this run is {dtype_name} on {device}, N={best_n}")

# %% [markdown]
# ### Try it yourself
#
# Pick a backend and a sequence length, then run the next cell: it measures that one point and shows which kernel ran.
# (Under papermill the defaults are used: the best backend at the shortest length.)

# %%
backend_picker = widgets.picker(runnable, value=choice.backend or runnable[0], description="backend")
length_picker = widgets.picker(plan["seq_lengths"], value=plan["seq_lengths"][0], description="sequence length")

# %%
picked_backend, picked_n = backend_picker.value, length_picker.value
point = attention.sweep(device, dtype, seq_lengths=[picked_n], head_dims=[headline_d], causal=[True], backends=[picked_backend],
                        batch=plan["batch"], heads=plan["heads"], ceiling_flops_per_s=ceiling["flops_per_s"],
                        warmup=plan["warmup"], repeats=plan["repeats"])[0]
q_p, k_p, v_p = attention.random_qkv(plan["batch"], plan["heads"], picked_n, headline_d, device=device, dtype=dtype)
proof = attention.ops_that_ran(attention.sdpa_call(q_p, k_p, v_p, picked_backend, causal=True), device)
widgets.show([attention.display_row(point)], attention.DISPLAY_COLUMNS, title=f"Your pick; the profiler saw {proof.backend}")
res.check("the_picked_backend_ran", proof.backend == picked_backend)

# %% [markdown]
# ## Your numbers beside the reference runs
#
# Reference runs on real GPUs are stored under `reference/<device>/`. Where there are any, the headline series (largest
# head size, causal) of each is shown next to yours.

# %%
reference = results.reference_runs("01_flash_attention")
table = []
for r in ok:
    if r["head_dim"] == headline_d and r["causal"]:
        key = f"sweep_{r['backend'].lower()}_d{headline_d}_causal_n{r['seq']}_tflops"
        row = {"backend": r["backend"], "N": r["seq"], "this machine TFLOP/s": r["tflops"]}
        row.update({f"{name} TFLOP/s": run["metrics"].get(key) for name, run in reference.items()})
        table.append(row)
widgets.show(table, title="TFLOP/s: this machine and the reference runs")
if not reference:
    print("No reference runs are stored yet under reference/: only this machine's numbers are shown.")

# %% [markdown]
# ## Results
#
# The checks above are this notebook's claims about what it showed; when `results_path` is set (papermill, `make run`,
# the tests), they are written with the metrics, the figures and the environment.

# %% [markdown]
# ## Exercises
#
# Predict, then check; or write a few lines, then check. Each check says whether the answer is right and, when it is
# not, which mistake it looks like; `ex.hint()` gives a hint (call it again for the next one), `ex.solution()` shows one.
# Answers that pass are remembered on this machine only (`labkit progress` in a terminal lists them). An answer left
# as `None` is "not attempted": the notebook still runs to its end.

# %% [markdown]
# **01.1 · Predict.** How many MiB does the MATH backend's score matrix take for the sizes printed below (one forward call, every head of every sequence)? Section 2 predicted these for other lengths; now do it yourself.

# %%
from labkit import exercises

verdicts = []
ex = exercises.get("01.1")
given = {"batch": plan["batch"], "heads": plan["heads"], "seq": 4096, "dtype": dtype_name}
print("sizes:", given)
answer = None  # your prediction, in MiB
if solutions:  # a workshop run fills in the solution
    answer = ex.solved(**given)
verdicts.append(ex.check(answer, record=not solutions, **given))

# %% [markdown]
# **01.2 · Code.** Write attention by hand: `my_attention(q, k, v)` takes tensors of shape (batch, heads, N, d) and returns softmax(q kᵀ / √d) v. The check calls it on fresh random inputs and compares it with `F.scaled_dot_product_attention`.

# %%
ex = exercises.get("01.2")
given = {}


def my_attention(q, k, v):
    return None  # your code


answer = my_attention
if solutions:  # a workshop run fills in the solution
    answer = ex.solved(**given)
verdicts.append(ex.check(answer, record=not solutions, **given))

# %% [markdown]
# **01.3 · Predict, then measure.** With no `sdpa_kernel` around it, which backend does PyTorch run here for a causal call on (1, 8, 1024, 64) inputs in this notebook's dtype? Answer with a name such as `"FLASH_ATTENTION"`; the check runs the call under the profiler.

# %%
ex = exercises.get("01.3")
given = {"device": device, "dtype": dtype_name}
answer = None  # a backend name
if solutions:  # a workshop run fills in the solution
    answer = ex.solved(**given)
verdicts.append(ex.check(answer, record=not solutions, **given))

# %%
counts = exercises.summary(verdicts)
print(f"Exercises: {counts['correct']} correct, {counts['wrong']} not yet, "
      f"{counts['not attempted']} not attempted")
if solutions:
    res.check("exercise_solutions_pass", counts["correct"] == len(verdicts), str(counts))

# %%
res.write()
widgets.show([{"check": name, "passed": passed} for name, passed in res.checks.items()], title="Checks")
for what, why in res.skipped.items():
    print(f"Skipped: {what} -- {why}")
