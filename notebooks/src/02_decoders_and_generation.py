# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Decoder models: from BetterTransformer to native attention, and generation at the bandwidth limit
#
# What makes generating text fast, and what sets its limit on your machine? The source page makes a decoder
# (`facebook/opt-350m`) faster with `model.to_bettertransformer()`. That call is gone from today's libraries. This
# notebook shows what replaced it, then measures what really makes generation fast:
#
# 1. **the story**: what BetterTransformer did for decoders, the call failing on today's stack, and the native
#    `attn_implementation="sdpa"` that replaced it;
# 2. **prefill vs decode**: eager vs sdpa (vs flash_attention_2 where it exists) on the embedded SmolLM2 and on the
#    source page's OPT architecture: prefill latency and memory as the prompt grows, decode speed, identical tokens;
# 3. **why decode barely speeds up**: each decode step reads every weight once, so a step cannot take less than
#    *bytes read ÷ memory bandwidth*; every decode run is put beside that bound;
# 4. **closing the gap**: a static KV cache, and the caches of today's layouts (MLA, sliding windows); a hand-written
#    decode loop and a compiled step; one step under the profiler; decode attention at long context against the time
#    to read its cache; larger batches (throughput against latency); the padding pitfalls of decoders, and which
#    attention backends take a padded batch's mask;
# 5. **one figure**: every decode run as a fraction of the bandwidth bound.
#
# Nothing here downloads anything.

# %% tags=["parameters"]
# Parameters (papermill overrides this cell). A size of 0 or an empty list means: sized for this device.
device = "auto"                           # auto, cpu, cuda or cuda:N
dtype = "auto"                            # auto picks bfloat16 on a recent GPU, float32 on CPU
model_ids = ["smollm2-135m", "tiny-opt"]  # decoders compared in section 2 (facebook/opt-350m works when cached)
decode_model = "auto"                     # model of section 4; auto: smollm2-135m on CPU, random-llama-1b on GPU
prompt = "Hello my dog is cute and"
prompt_lengths = []                       # prefill prompt lengths in tokens
prefill_batch = 0                         # prompts per prefill call
new_tokens = 0                            # tokens generated per decode measurement
batch_sizes = []                          # decode batch sizes of section 4
compile = "auto"                          # compile the decode step; auto means on a GPU only
quick = "auto"                            # small sizes: "auto" means on a machine without a GPU; True or False to force
solutions = False                         # fill every exercise with its solution (a teacher's run)
results_path = ""                         # where to write the results JSON (empty: do not write)

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
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import StaticCache

import labkit
from labkit import compat, generation, models, outputs, plots, probes, roofline, timing
from labkit.widgets import show

lab = labkit.start("02_decoders_and_generation", globals())

# %%
show(lab.environment_rows(), ["item", "value"], title="Environment")

# %% [markdown]
# ## 1. What BetterTransformer did for decoders, and why it went away
#
# For decoders, `model.to_bettertransformer()` (from the optimum package) swapped each attention module for one that
# called `torch.nn.functional.scaled_dot_product_attention`, so that the fused kernels of notebook 01 could run. Since
# then transformers has grown its own SDPA attention for almost every architecture, made it the default, and removed
# the `to_bettertransformer` method (and optimum dropped BetterTransformer itself in its 2.0 release, by its release
# notes). Calling it on today's stack, on purpose:

# %% tags=["old-api-on-purpose"]
opt_problem = models.check_model("tiny-opt")  # random weights, but the tokenizer comes from smollm2-135m
if opt_problem:
    lab.skip("to_bettertransformer on OPT", opt_problem)
else:
    opt, _ = models.load_model("tiny-opt", device=lab.device, dtype=lab.dtype)
    try:
        opt.to_bettertransformer()  # the source page's call, on purpose
        bettertransformer_error = None
    except AttributeError as err:
        bettertransformer_error = err
    print(f"{type(bettertransformer_error).__name__}: {bettertransformer_error}")
    built_with = compat.attn_implementation(opt)  # transformers keeps it in a private config field
    print(f"optimum installed: {probes.package_version('optimum') or 'no'}; "
          f"this OPT model was built with attn_implementation={built_with!r} without asking")
    lab.check("to_bettertransformer_is_gone", isinstance(bettertransformer_error, AttributeError))
    lab.check("sdpa_is_the_default", built_with == "sdpa")
    del opt

# %% [markdown]
# The replacement is one argument at load time, `attn_implementation="sdpa"`, and it is already the default. The
# original `to_bettertransformer()` code needs an older stack (optimum 1.x with transformers below 4.49), in an
# environment of its own: the legacy notebook [legacy/bettertransformer.ipynb](legacy/bettertransformer.ipynb) runs
# it there (`make legacy` builds its kernel), checks that its tokens equal eager ones, and times it on this machine.
#
# ## 2. Prefill and decode, eager against sdpa
#
# Generating text has two phases. **Prefill** runs the whole prompt through the model in one forward pass and fills
# the KV cache (the keys and values of every layer, kept so that later tokens need not recompute them): many tokens
# per weight read, so it is compute-heavy, and attention over the prompt is where the SDPA kernels matter (eager
# attention builds the N × N score matrix, as in notebook 01). **Decode** then produces one token per step, attending
# to the cache.
#
# What to expect: at long prompts sdpa's prefill should be faster than eager's and need less memory, because eager
# attention holds each layer's N² scores; at short prompts other tensors and fixed costs dominate and the two are
# close. Prefill here computes the logits of the last position only, as `generate` does. Decode speed should barely
# differ, for a reason section 3 measures. Prefill times are the median of several runs, shown with their **p10-p90**
# spread (the 10th and 90th percentiles: the middle 80% of the runs fall between them); the TFLOP/s column counts
# about 2 FLOPs per weight per token, the arithmetic that each weight read serves. Prefill time must grow with
# the prompt; a point where it fell instead is measured again, and if it still contradicts the trend it is marked
# **noisy** and nothing is concluded from it.

# %%
def prefill(model, ids):  # the whole prompt in one forward pass, filling the KV cache; logits of the last position only
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=True, logits_to_keep=1)


def prefill_point(model, tokens, repeats):  # one prompt length: its time, and the memory it needs beyond the weights
    ids = outputs.random_prompt(model, batch=lab.p.prefill_batch, length=tokens)
    took = timing.measure(lambda: prefill(model, ids), device=lab.device, warmup=1, repeats=repeats)
    peak = timing.peak_extra_memory(lambda: prefill(model, ids), lab.device)  # None where it cannot be measured
    return {"prompt tokens": tokens, "batch": ids.shape[0], "median ms": took.median_ms, "p10 ms": took.p10_ms,
            "p90 ms": took.p90_ms, "tokens per s": ids.numel() / took.median_ms * 1e3,
            "peak MiB": None if peak is None else peak / 2**20}

# %%
prefill_rows, loaded = [], {}
for name in lab.p.model_ids:
    if lab.p.problems[name]:
        lab.skip(f"prefill and decode of {name}", lab.p.problems[name])
        continue
    model, tokenizer = loaded[name] = models.load_model(name, device=lab.device, dtype=lab.dtype)
    positions = model.config.max_position_embeddings  # a prompt must leave a position for the next token
    lengths = [n for n in lab.p.prompt_lengths if n < positions]
    left_out = [n for n in lab.p.prompt_lengths if n >= positions]
    if left_out:
        print(f"{name}: prompts of {left_out} tokens are left out (at most {positions - 1} fit)")
    for implementation in lab.p.implementations:
        model.set_attn_implementation(implementation)  # the same weights, another attention
        points = [prefill_point(model, n, lab.p.repeats) for n in lengths]
        points = timing.recheck_trend(  # the timing rule: a time that fell as the prompt grew is measured again
            points, work="prompt tokens", time="median ms", low="p10 ms", high="p90 ms",
            remeasure=lambda p, m=model: prefill_point(m, p["prompt tokens"], lab.p.repeats + 2))
        prefill_rows += [{"model": name, "attention": implementation, **point} for point in points]
    model.set_attn_implementation("sdpa")

# %%
sweep = pd.DataFrame(prefill_rows)
counts = {name: sum(p.numel() for p in m.parameters()) for name, (m, _) in loaded.items()}  # parameters
if not sweep.empty:  # 2 FLOPs a weight a token (a multiply and an add), the attention scores left out
    tokens = sweep["batch"] * sweep["prompt tokens"]
    sweep["TFLOP/s"] = 2 * sweep["model"].map(counts) * tokens / sweep["median ms"] / 1e9
    shown = ["model", "attention", "batch", "prompt tokens", "median ms", "p10 ms", "p90 ms", "tokens per s",
             "TFLOP/s", "peak MiB", "noisy"]
    lab.table("prefill", sweep[shown], title=f"Prefill ({lab.dtype_name})")
    fig = plots.lines(sweep, x="prompt tokens", y="median ms", series="attention", panel="model", logx=True, logy=True,
                      spread=("p10 ms", "p90 ms"), title=f"Prefill on {lab.device_label}, {lab.dtype_name}")
    lab.figure("prefill", fig)

# %%
longest = pd.DataFrame()
if not sweep.empty:
    at = sweep[sweep["prompt tokens"] == sweep.groupby("model")["prompt tokens"].transform("max")]
    eager, sdpa = (at[at["attention"] == which].set_index("model") for which in ("eager", "sdpa"))
    heads = pd.Series({name: m.config.num_attention_heads for name, (m, _) in loaded.items()})
    scores = sdpa["batch"] * heads * sdpa["prompt tokens"] ** 2 * lab.dtype.itemsize  # one layer's N x N, every head
    longest = pd.DataFrame({
        "prompt tokens": sdpa["prompt tokens"],
        "eager / sdpa memory": eager["peak MiB"] / sdpa["peak MiB"],
        "eager / sdpa time": (eager["median ms"] / sdpa["median ms"]).where(~(eager["noisy"] | sdpa["noisy"])),
        "one layer's scores MiB": scores / 2**20,
    }).dropna(subset=["eager / sdpa memory"]).rename_axis("model").reset_index()
    lab.table("longest_prompt", longest, title="Eager against sdpa at the longest prompt (a noisy time gives no ratio)")

# %% [markdown]
# Read the memory column first: it does not depend on timing noise. Where eager needs more memory than sdpa, compare
# the excess with the size of one layer's scores beside it. The time ratio is shown only where both times held up
# against the trend. At the quick sizes on a CPU a layer's scores take less than a MiB. At 2048 tokens and batch 4 on
# an H100, eager needed several times the prefill memory of sdpa. That run's memory table is stored in
# `reference/nvidia-h100/partial-02_decoders_and_generation.ipynb`. Its time ratio is not used: its sdpa times fell
# as the prompts grew, a contradiction this notebook now marks noisy.
#
# Then decode, with each implementation: the prompt, then `new_tokens` tokens generated greedily. A step's time is the
# difference of two `generate` calls, one for `new_tokens` tokens and one for a single token (the prefill and the
# set-up), divided by the `new_tokens - 1` steps between them.

# %%
decode_rows = []
for name, (model, tokenizer) in loaded.items():
    prompt_ids = tokenizer(lab.p.prompt, return_tensors="pt").input_ids.to(lab.device)
    for implementation in lab.p.implementations:
        model.set_attn_implementation(implementation)
        decode = outputs.measure_decode(model, prompt_ids, new_tokens=lab.p.new_tokens, repeats=lab.p.repeats,
                                           tokenizer=tokenizer)
        decode_rows.append({"model": name, "attention": implementation, **decode})
    model.set_attn_implementation("sdpa")

# %% [markdown]
# Are the results the same? In float32, with each implementation: the logits of two random prompts (a random-weight
# model's greedy text is repetitive, so the logits are the sharper test) and the greedy tokens of the prompt.
# flash_attention_2 runs only in 16-bit, where rounding differs, so it is not part of this comparison.

# %%
agree, fp32_models = [], {}
for name, (model, tokenizer) in loaded.items():
    fp32 = model if lab.dtype == torch.float32 else models.load_model(name, device=lab.device, dtype="float32")[0]
    fp32_models[name] = fp32
    ids = tokenizer(lab.p.prompt, return_tensors="pt").input_ids.to(lab.device)
    two_random = outputs.random_prompt(fp32, batch=2, length=48, seed=1)
    tokens, logits = {}, {}
    for implementation in ("eager", "sdpa"):
        fp32.set_attn_implementation(implementation)
        out = outputs.generate_exactly(fp32, ids, lab.p.new_tokens, tokenizer=tokenizer)
        tokens[implementation] = out[0, ids.shape[1]:].tolist()
        with torch.inference_mode():
            logits[implementation] = fp32(input_ids=two_random).logits.double()
    fp32.set_attn_implementation("sdpa")
    error = (logits["eager"] - logits["sdpa"]).norm() / logits["sdpa"].norm()
    agree.append({"model": name, "logits relative difference": float(error),
                  "same greedy tokens": tokens["eager"] == tokens["sdpa"],
                  **{f"{k} greedy text": tokenizer.decode(v) for k, v in tokens.items()}})
agree = pd.DataFrame(agree)

# %%
if agree.empty:
    lab.skip("eager against sdpa, tokens and logits", "no model of model_ids could be loaded")
else:
    lab.table("agreement", agree, title="Eager against sdpa in float32 (logits of 2 random prompts of 48 tokens)")
    lab.check("greedy_tokens_identical_across_implementations", agree["same greedy tokens"].all())  # the table: which
    worst = agree["logits relative difference"].max()
    lab.check("logits_agree_across_implementations", worst < 1e-4, f"largest relative difference {worst:.1e}")

# %% [markdown]
# ## 3. Why decode barely speeds up: the bandwidth bound
#
# One decode step for one sequence multiplies a single token's activations by every weight matrix: about 2 FLOPs per
# weight, but every weight must come from memory. So a step cannot take less than *bytes read ÷ memory bandwidth*,
# with bytes read = the weights (once) + the KV cache of the context so far. The bound on tokens/s is
#
# `tokens/s ≤ batch × bandwidth ÷ (weight bytes + KV cache bytes)`.
#
# The cell below counts the bytes from the model itself: every parameter once (an output layer tied to the input
# embedding is one parameter, as in every model here; an untied input embedding would be read only at the rows of the
# tokens looked up, so for such a model the count is an upper bound). labkit measures the bandwidth now, with a large
# copy (a small buffer could sit in a CPU cache).

# %%
measured = roofline.bandwidth_ceiling(lab.device)  # a large copy, timed now
bandwidth = measured["bytes_per_s"]
print(f"Memory bandwidth: {bandwidth / 1e9:.1f} GB/s, {measured['source']}")

# %% [markdown]
# **02.1 · Predict.** The first model of section 2 (smollm2-135m unless you changed `model_ids`) has the number of
# parameters printed below, each stored in `bytes_per_parameter` bytes in this notebook's dtype, and this machine's
# memory bandwidth is the one just measured. At batch 1, at most how many tokens per second can it generate?

# %%
first = next(iter(loaded), None)
ex = lab.exercise("02.1", parameters=counts.get(first, 1.0e9), bytes_per_parameter=lab.dtype.itemsize,
                  bandwidth_gb_per_s=round(bandwidth / 1e9, 1))
print(ex)
answer = None  # your prediction, in tokens/s
ex.check(answer)

# %% [markdown]
# The measurement: each run's time per step beside the time its bytes need at this bandwidth (the *bound step*), and
# only then the rates. The further a step is above its bound, the less of it goes to reading the weights at the
# machine's best speed.

# %%
def weight_bytes(model):  # every parameter once (a tied embedding and output layer are one parameter)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bound_ms(model, batch, context):  # a step reads every weight once and the whole KV cache, at the copy's speed
    cache = roofline.kv_cache_bytes(model.config, batch=batch, context=context, dtype=model.dtype)
    return (weight_bytes(model) + cache) / bandwidth * 1e3

# %% tags=["reveals-02.1"]
decode = pd.DataFrame(decode_rows).rename(columns=lambda c: c.replace("_", " "))
if not decode.empty:
    decode["weights MB"] = decode["model"].map({n: weight_bytes(m) / 1e6 for n, (m, _) in loaded.items()})
    decode["context"] = decode["prompt tokens"] + decode["new tokens"] // 2  # the cache grows: its middle size
    decode["bound ms"] = [bound_ms(loaded[m][0], 1, c) for m, c in zip(decode["model"], decode["context"], strict=True)]
    decode["fraction of bound"] = decode["bound ms"] / decode["step ms"]
    decode["weights GB/s"] = decode["weights MB"] / decode["step ms"]  # the speed a step reads its weights at
    decode["TFLOP/s"] = 2 * decode["model"].map(counts) / decode["step ms"] / 1e9  # one token a step
    shown = ["model", "attention", "weights MB", "step ms", "bound ms", "fraction of bound", "weights GB/s",
             "TFLOP/s", "tokens per s"]
    lab.table("decode", decode[shown], title=f"Decode, batch 1, against the bandwidth bound ({lab.dtype_name})")
    slowest = decode.loc[decode["fraction of bound"].idxmin()]
    print(f"{slowest['model']} ({slowest['attention']}) spends {slowest['step ms'] / slowest['bound ms']:.1f}x the "
          "time its bytes need")
    mine = decode[(decode["model"] == first) & (decode["attention"] == "sdpa")].iloc[0]
    print(f"{first}: the bound is {1e3 / mine['bound ms']:.4g} tokens/s; it generated:")
    ex.compare(mine["tokens per s"], "tokens/s")

# %% [markdown]
# Compare eager's and sdpa's steps in the table: at batch 1 a decode step attends from one token to a short cache,
# little work next to the matrix-vector products, so a faster attention kernel has little to speed up; the table shows
# how much the implementation moved each step on this machine. Its TFLOP/s column beside the prefill table's shows the
# other half of the story: the same weights, read once for one token here instead of once for a whole prompt.
#
# On a GPU a small model's step can sit far above its bound. The H100 run stored in
# `reference/nvidia-h100/partial-02_decoders_and_generation.ipynb` shows it for smollm2-135m, in its decode table.
# Is the GPU then waiting for the CPU? A step is hundreds of small kernels, and the CPU must launch each one. Section 4
# profiles one step to find out. A model as small as tiny-opt can stay in a CPU's caches between steps, so its bound
# is only nominal there.
#
# ## 4. Closing the gap
#
# The recipes, all on the same model (`decode_model`) at batch 1 and with the same prompt, each timed as in section 2:
#
# * **dynamic cache**: plain `generate`; the cache grows by concatenation each step;
# * **static cache**: `cache_implementation="static"` preallocates the cache for prompt + new tokens, so every step has
#   the same shapes (and attends over the whole preallocated length, masked);
# * **hand loop**: decoding written out in the style of gpt-fast (`labkit.outputs.GreedyLoop`): a static cache made
#   once, one forward per token, the argmax and the position kept on the device, no `generate` machinery in between;
# * **hand loop, compiled step**: the same with the one-token step compiled, gpt-fast's one rebinding
#   `step = torch.compile(step, mode="reduce-overhead", fullgraph=True)`. On a GPU that mode records a **CUDA graph**:
#   the step's kernels are captured once and then replayed with a single launch, so the CPU no longer launches each of
#   them; it needs fixed shapes and fixed memory addresses, which the static cache provides;
# * **static cache + compile**: with a static cache, `generate` compiles its decode step by itself on a GPU (the same
#   `reduce-overhead` mode); the "static cache" recipe above switches that off (`disable_compile=True`) so that the two
#   effects are measured apart. The first call of a compiled recipe compiles; its extra time is reported apart.

# %%
main = None
if lab.p.problems[lab.p.decode_model]:
    lab.skip(f"recipes on {lab.p.decode_model}", lab.p.problems[lab.p.decode_model])
else:
    main, main_tokenizer = loaded.get(lab.p.decode_model) or models.load_model(lab.p.decode_model, device=lab.device,
                                                                                dtype=lab.dtype)
    main.set_attn_implementation("sdpa")
    parameters = sum(p.numel() for p in main.parameters())
    ids = outputs.random_prompt(main, batch=1, length=16)
    print(f"{lab.p.decode_model}: {parameters / 1e9:.3f} billion parameters, {weight_bytes(main) / 1e9:.3f} GB read "
          "per step")

# %% [markdown]
# **02.2 · Predict.** A static cache is allocated in full before the first step. How many MiB does it take for the
# decode model's shape printed below, one sequence of `context` tokens, in this notebook's dtype?
#
# Look at the heads. The model's config names two numbers: `num_attention_heads`, the **query** heads (`heads`), and
# `num_key_value_heads`, the **key/value** heads (`kv_heads`). With **grouped-query attention (GQA)** each group of
# query heads shares one key head and one value head, so only the key/value heads are cached: every layer keeps, for
# every token, one key and one value vector of `head_dim` numbers per key/value head.

# %%
shape = roofline.kv_shape(main.config) if main is not None else {"layers": 32, "heads": 32, "kv_heads": 8,
                                                                   "head_dim": 128}  # Llama-3-8B's shape
context = min(8192, main.config.max_position_embeddings) if main is not None else 8192
ex = lab.exercise("02.2", **shape, context=context, batch=1, bytes_per_element=roofline.element_size(lab.dtype))
print(ex)
answer = None  # your prediction, in MiB
ex.check(answer)

# %% [markdown]
# The measurement: a real `StaticCache` for that context, one token run through it (which allocates its tensors),
# and the bytes of every layer's keys and values added up.

# %% tags=["reveals-02.2"]
if main is not None:
    cache = StaticCache(config=main.config, max_cache_len=context)  # made in full before the first step
    with torch.inference_mode():  # one token through it allocates its tensors (the argument's name changed in 5.24)
        main(input_ids=ids[:, :1], use_cache=True, **{compat.forward_keywords(main)["cache"]: cache})
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    ex.compare(cache_bytes / 2**20, "MiB")
    # a key and a value vector of head_dim numbers per key/value head, in every layer, for every token
    formula = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * context * main.dtype.itemsize
    print(f"GQA: {shape['kv_heads']} key/value heads per layer instead of {shape['heads']}, a cache "
          f"{shape['heads'] / shape['kv_heads']:g}x smaller than one key and value per query head needs")
    kv = pd.DataFrame([{**shape, "context": context, "measured MiB": cache_bytes / 2**20,
                        "formula MiB": formula / 2**20}])
    lab.table("kv_cache", kv, title="A static KV cache, measured")
    sliding = [layer for layer in cache.layers if layer.is_sliding]  # a sliding window keeps its last tokens only
    if sliding:
        lab.skip("the KV cache against the formula", f"{len(sliding)} of {len(cache.layers)} layers keep a sliding "
                 f"window of {main.config.sliding_window} tokens, not all {context}")
    else:
        lab.check("kv_cache_size_is_the_formula", cache_bytes == formula,
                  f"measured {cache_bytes} B, formula {formula} B")

# %% [markdown]
# ### Today's KV layouts
#
# GQA is one way to shrink the cache. Models released since use two more:
#
# * **Multi-head latent attention (MLA)**, in DeepSeek-V2 and V3. Each layer caches one compressed latent per token
#   and one small rotary key, shared by every head. Per the DeepSeek-V2 paper, arXiv 2405.04434, table 1, that is
#   `kv_lora_rank + qk_rope_head_dim` numbers per token and layer.
# * **Sliding-window layers**, in Mistral, Gemma 2 and 3, gpt-oss. Such a layer attends to the last `window` tokens
#   only, so it caches no more. Gemma 3 puts five sliding layers, window 1024, before each global layer.
#
# The shapes below are the published ones, each set in the cell. Llama-3-8B: the Llama 3 paper, arXiv 2407.21783,
# table 3. Mistral-7B: the Mistral 7B paper, arXiv 2310.06825, table 1; `MistralConfig()`'s defaults are that table.
# DeepSeek-V3: its report, arXiv 2412.19437, section 4.2; `DeepseekV3Config()`'s defaults are those shapes. Gemma-3-27B:
# the 5:1 pattern and the window come from the Gemma 3 report, arXiv 2503.19786, section 2. Its layer and head sizes
# come from the `config.json` of `google/gemma-3-27b-pt` on the Hugging Face Hub.
#
# `roofline.kv_cache_bytes` is the one KV formula of this workbook. It counts the tokens each layer holds and the
# numbers each token adds there. Predict: at 128k tokens, which of the four needs the most cache beside its weights?

# %%
from transformers import AutoModelForCausalLM, DeepseekV3Config, Gemma3TextConfig, LlamaConfig, MistralConfig

from labkit import footprint

layouts = {  # the published shapes; whatever is not set is transformers' default
    "Llama-3-8B, GQA": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "Mistral-7B, sliding 4096": MistralConfig(),
    "Gemma-3-27B, 5 sliding : 1 global": Gemma3TextConfig(hidden_size=5376, intermediate_size=21504,
                                                          num_hidden_layers=62, num_attention_heads=32,
                                                          num_key_value_heads=16, head_dim=128, sliding_window=1024),
    "DeepSeek-V3, MLA": DeepseekV3Config(),
}
weights_of = {}
for name, config in layouts.items():
    with torch.device("meta"):  # the shapes only: no memory used, nothing downloaded
        weights_of[name] = roofline.parameter_bytes(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16))

# %%
GIB, long = 2**30, 131072  # 128k tokens, one sequence, in bfloat16
rows = []
for name, config in layouts.items():
    kv = {n: roofline.kv_cache_bytes(config, batch=1, context=n, dtype=torch.bfloat16) for n in (1, 32768, long)}
    need = weights_of[name] + kv[long]
    rows.append({"model": name, "weights GiB": weights_of[name] / GIB, "KV KiB, first token": kv[1] / 1024,
                 "KV GiB at 32k": kv[32768] / GIB, "KV GiB at 128k": kv[long] / GIB,
                 "KV / weights at 128k": kv[long] / weights_of[name],
                 "80 GiB GPUs for both": footprint.devices_needed(need, 80 * GIB)})
kv_layouts = pd.DataFrame(rows)
lab.table("kv_layouts", kv_layouts, title="KV cache of today's layouts, bfloat16, batch 1 (the formula)")
most = kv_layouts.loc[kv_layouts["KV / weights at 128k"].idxmax()]
print(f"At 128k tokens {most['model']} needs {most['KV / weights at 128k']:.2f}x its weights for the cache")

# %% [markdown]
# The table answers the prediction. The first-token column is the per-token cost before any window fills. Llama's GQA
# cache grows with every token, to about its weights' size at 128k. Mistral's stops at its window: past 4096 tokens it
# stays flat. Gemma keeps only its global layers growing, one layer in six. MLA keeps 576 numbers per token and layer
# for DeepSeek-V3's 128 heads. That model's weights are what need many GPUs, not its cache. The GPU column uses the
# planning margin of notebook 05: each GPU filled to 90%.

# %% [markdown]
# Is the formula what transformers really keeps? A small model shows it: Gemma 3's layout, shrunk. It has 6 layers, 5
# sliding with a window of 32 tokens and 1 global, and random weights. It generates well past the window, then its
# cache is measured tensor by tensor.
#
# **02.5 · Predict.** After the prompt and the new tokens printed below, how many KiB does this model's cache hold?
# The model is in float32. A sliding layer in transformers keeps the last `window - 1` tokens: with the token being
# processed they make the window. The last generated token has not been through the model yet.

# %%
from transformers import Gemma3ForCausalLM

small = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32,
                         max_position_embeddings=256)  # layer_types: 5 sliding, then 1 full (Gemma 3's pattern)
torch.manual_seed(0)
gemma_like = Gemma3ForCausalLM(small).eval()
small_prompt, small_new = 20, 60
ex = lab.exercise("02.5", layers=small.num_hidden_layers, sliding_layers=small.layer_types.count("sliding_attention"),
                  window=small.sliding_window, kv_heads=small.num_key_value_heads, head_dim=small.head_dim,
                  prompt_tokens=small_prompt, new_tokens=small_new, bytes_per_element=gemma_like.dtype.itemsize)
print(ex)
answer = None  # your prediction, in KiB
ex.check(answer)

# %% tags=["reveals-02.5"]
prompt_ids = torch.randint(0, small.vocab_size, (1, small_prompt))
out = outputs.generate_exactly(gemma_like, prompt_ids, small_new, return_dict_in_generate=True)
held = compat.output_cache(out).layers
seen_tokens = out.sequences.shape[1] - 1  # every token but the last generated one went through the model
sliding_cache = pd.DataFrame({"layer": range(len(held)), "type": small.layer_types,
                              "tokens held": [layer.keys.shape[-2] for layer in held],
                              "formula tokens": roofline.kv_tokens_held(small, seen_tokens),
                              "bytes": [layer.keys.nbytes + layer.values.nbytes for layer in held],
                              "bytes allocated": [layer.keys.untyped_storage().nbytes()
                                                  + layer.values.untyped_storage().nbytes() for layer in held]})
lab.table("sliding_cache", sliding_cache, title=f"A Gemma-3-like cache after {seen_tokens} tokens, measured")
cache_total = int(sliding_cache["bytes"].sum())
formula_total = roofline.kv_cache_bytes(small, batch=1, context=seen_tokens, dtype=torch.float32)
ex.compare(cache_total / 1024, "KiB")
lab.check("sliding_window_cache_is_the_formula", cache_total == formula_total and
          (sliding_cache["tokens held"] == sliding_cache["formula tokens"]).all(),
          f"measured {cache_total} B, formula {formula_total} B")
print(f"Every layer full would hold {seen_tokens} tokens each: "
      f"{seen_tokens * len(held) / sliding_cache['tokens held'].sum():.1f}x this cache")

# %% [markdown]
# The sliding layers stopped at 31 tokens; the global layer kept all of them. The formula gave the bytes of the keys
# and values each layer attends to exactly, and the line above says how many times smaller the window made this cache;
# at 128k, for Gemma-3-27B, the table above shows how much.
#
# The `bytes allocated` column counts the memory behind those tensors, and a sliding layer's is larger. transformers
# 5.25 (`DynamicSlidingWindowLayer.update` in `cache_utils.py`) concatenates the new keys to the kept ones and keeps a
# slice of the result: the slice is what attention reads next, the whole concatenation is what stays allocated. While
# decoding, that is `window` tokens, one more than the slice. After a long prompt it is the whole prompt, in every
# sliding layer, until the next token arrives. The cell below sends this model a prompt four windows long and looks.

# %%
long_prompt = torch.randint(0, small.vocab_size, (1, 4 * small.sliding_window))
with torch.inference_mode():
    first = compat.output_cache(gemma_like(long_prompt, use_cache=True)).layers[0]  # a sliding layer
allocated = first.keys.untyped_storage().nbytes() // (first.keys.nbytes // first.keys.shape[-2])
print(f"Prompt {long_prompt.shape[1]} tokens: sliding layer 0 attends to {first.keys.shape[-2]}, holds {allocated}")

# %% [markdown]
# A memory plan from the formula is right for a long decode, within a token per sliding layer. Right after a long
# prompt, every sliding layer briefly holds the whole prompt, as a full-attention layer would: plan the peak for that.

# %% [markdown]
# Now the recipes. What to expect: every recipe does the same matrix-vector products, so a recipe can only remove
# what a step spends around them (the bookkeeping of a growing cache, `generate`'s own work per step, and on a GPU
# the launching of each kernel). Where those products take most of a step, no recipe can help much.

# %%
recipes = []
if main is not None:
    def try_recipe(label, call):
        outcome = timing.attempt(call, lab.device)  # a failed compile becomes a skipped recipe, with its reason
        if outcome["status"] == "ok":
            recipes.append({"recipe": label, **outcome["value"]})
        else:
            lab.skip(label, outcome["reason"])

    n, repeats = lab.p.new_tokens, lab.p.repeats
    same = {"new_tokens": n, "repeats": repeats, "tokenizer": main_tokenizer}  # n tokens, the same prompt
    recipes.append({"recipe": "dynamic cache", **outputs.measure_decode(main, ids, **same)})
    recipes.append({"recipe": "static cache", **outputs.measure_decode(main, ids, cache_implementation="static",
                                                                          disable_compile=True, **same)})
    loop = outputs.GreedyLoop(main, batch=1, prompt_tokens=ids.shape[1], new_tokens=n)
    recipes.append({"recipe": "hand loop", **outputs.measure_loop(loop, ids, repeats=repeats)})

# %%
if main is not None and lab.p.compile_step:
    mode = "reduce-overhead" if lab.on_gpu else "default"  # reduce-overhead: the step replays as a CUDA graph
    compiled = outputs.GreedyLoop(main, batch=1, prompt_tokens=ids.shape[1], new_tokens=n, compile_mode=mode)
    try_recipe("hand loop, compiled step", lambda: outputs.measure_loop(compiled, ids, repeats=repeats))
    if lab.on_gpu:
        try_recipe("static cache + compile", lambda: outputs.measure_decode(main, ids, cache_implementation="static",
                                                                              **same))
    else:
        lab.skip("static cache + compile", "generate compiles its own step only on an accelerator, not on a CPU")
elif main is not None:
    lab.skip("compiled decode steps", "off on a CPU unless compile=True: the first call compiles, slowly there")

# %% [markdown]
# Where a step's time goes: the matrix-vector products of one step are timed alone (every weight matrix times one
# vector, back to back, nothing else), and each recipe's step is split into those products and the rest.

# %%
if recipes:
    weights = {id(m.weight): m.weight for m in main.modules() if isinstance(m, torch.nn.Linear)}  # shared ones once
    vectors = [(torch.randn(1, w.shape[1], device=w.device, dtype=w.dtype), w) for w in weights.values()]

    def products():  # the matrix-vector products of one decode step, back to back, and nothing else
        with torch.inference_mode():
            for x, w in vectors:
                torch.nn.functional.linear(x, w)

    alone = timing.measure(products, device=lab.device, warmup=2, repeats=5)
    read = sum(w.numel() * w.element_size() for w in weights.values())
    print(f"The matrix-vector products alone: {len(vectors)} of them, {read / 1e6:.0f} MB in {alone.median_ms:.3g} ms, "
          f"{read / alone.median_ms / 1e6:.3g} GB/s (a copy: {bandwidth / 1e9:.3g} GB/s)")

# %%
if recipes:
    budget = pd.DataFrame(recipes).rename(columns=lambda c: c.replace("_", " "))
    budget["products ms"] = alone.median_ms
    budget["the rest ms"] = budget["step ms"] - alone.median_ms
    budget["bound ms"] = bound_ms(main, 1, ids.shape[1] + n // 2)  # the cache's middle size, as in section 3
    budget["fraction of bound"] = budget["bound ms"] / budget["step ms"]
    base, spread = budget.iloc[0], budget["step p90 ms"] - budget["step p10 ms"]
    budget["change ms"] = budget["step ms"] - base["step ms"]  # against the dynamic cache
    budget["beyond the spread"] = budget["change ms"].abs() > spread.clip(lower=spread.iloc[0])  # either one's p10-p90
    budget["same tokens"] = [tokens == base["token ids"] for tokens in budget["token ids"]]
    shown = ["recipe", "step ms", "step p10 ms", "step p90 ms", "products ms", "the rest ms", "bound ms",
             "fraction of bound", "change ms", "beyond the spread", "same tokens", "first call extra s"]
    lab.table("recipes", budget[shown], title=f"Decode recipes, {lab.p.decode_model}, batch 1, {lab.dtype_name}")

# %%
if recipes:
    lab.check("recipes_decode_the_same_number_of_tokens", budget[["prompt tokens", "new tokens"]].nunique().max() == 1)
    if lab.dtype == torch.float32:  # in 16-bit a compiled sum may round otherwise and flip a near-tie
        lab.check("recipes_generate_the_same_tokens", budget["same tokens"].all(),
                  f"{budget['same tokens'].sum()} of {len(budget)} agree")
    moved = budget[budget["beyond the spread"]]
    print(f"The products take {min(alone.median_ms / base['step ms'], 1):.0%} of a dynamic-cache step; moved by more "
          f"than the spread: {', '.join(moved['recipe']) or 'no recipe'} (same products: only the rest can move)")
    best = budget.loc[budget["fraction of bound"].idxmax()]
    share = min(alone.median_ms / best["step ms"], 1)
    pace = "the products set the pace" if share >= 0.5 else "the rest sets the pace: " + (
        "the host preparing each small kernel" if lab.on_gpu else "Python and the dispatch of every small op")
    print(f"Fastest, {best['recipe']}: {best['fraction of bound']:.0%} of the bandwidth bound; the products take "
          f"{share:.0%} of its step, so {pace}.")

# %% [markdown]
# The table and the lines under it say it from this run's numbers: how much of a step the products take here, and
# whether each recipe changed the step by more than the spread of the measurements (the larger p10-p90 range of the
# recipe and of the dynamic cache: "beyond the spread"). The products alone are timed eagerly, one launch each: on a CPU
# no recipe can go much below that time; on a GPU a step replayed as a CUDA graph can. A recipe that moved by less than
# the spread did nothing measurable. On a GPU, where a small model's step sits far above its bound, the rest is where
# the compiled step (one CUDA graph launch per step) can make its difference, and the table says how much it did. A
# compiled recipe's first call compiles: the "first call extra s" column.
#
# The "same tokens" column says which recipes generated exactly the dynamic cache's tokens. In float32 they must all
# agree (this notebook checks it). In 16-bit it is a count, not a claim: a compiled step may add up a sum in another
# order, and where two candidate tokens' logits nearly tie, greedy decoding may then pick the other one and continue
# differently.
#
# ### Your own decode loop
#
# **02.4 · Code.** `generate` and the hand loop both keep a KV cache. Now write such a loop yourself:
# `my_decode(model, input_ids, new_tokens)` returns the greedy new tokens, shape `(batch, new_tokens)`. Run the prompt
# once with `use_cache=True` and a cache, then feed one token a step with that cache. The check runs your function on
# a small random model. It compares the tokens with a loop that uses `use_cache=False`. `ex.hint()` gives a hint,
# `ex.solution()` shows one.

# %%
ex = lab.exercise("02.4")


def my_decode(model, input_ids, new_tokens):
    return None  # your code: the prompt once with a cache, then one token a step through that cache


answer = None  # once my_decode is written: answer = my_decode
ex.check(answer)

# %% [markdown]
# What does the cache save? Without it, every step runs the whole sequence through the model again. With it, a step
# runs one token. Predict how many times faster the cached loop is here. The cell below times both on the decode model,
# with your loop once it passes, else the workbook's.

# %%
def without_cache(model, input_ids, new_tokens):  # every step runs the whole sequence so far
    seq = input_ids
    with torch.inference_mode():
        for _ in range(new_tokens):
            token = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], dim=1)
    return seq[:, input_ids.shape[1]:]


# %%
if main is not None:
    rows, tokens = [], {}
    for label, decode_loop in (("KV cache", ex.answer if ex.verdicts[-1] else ex.exercise.solution),
                               ("use_cache=False", without_cache)):
        def run(f=decode_loop, key=label):  # keeps the tokens of its last call
            tokens[key] = f(main, ids, n)[0].tolist()

        took = timing.measure(run, device=lab.device, warmup=1, repeats=1)
        rows.append({"loop": label, "ms": took.median_ms, "ms a token": took.median_ms / n})
    loops = pd.DataFrame(rows)
    loops["same tokens"] = [tokens[label] == tokens["use_cache=False"] for label in loops["loop"]]
    lab.table("cache_loop", loops, title=f"{n} tokens after a {ids.shape[1]}-token prompt")
    speedup = loops["ms"][1] / loops["ms"][0]
    print(f"The KV cache made this loop {speedup:.2g}x as fast as use_cache=False; same tokens: "
          f"{loops['same tokens'][0]}")
    lab.check("kv_cache_loop_is_faster_than_recomputing", speedup > 1, f"{speedup:.2f}x", timing=True)

# %% [markdown]
# The gap grows with the sequence. Without a cache, each step runs the prompt and every token so far again. With
# it, each step runs one token, and reads the cache instead.
#
# ### One step under the profiler
#
# The products timed alone are an estimate from outside a step. The profiler looks inside one. It runs the hand loop's
# one-token step once and records every operator. Two numbers matter. **Busy time** is when the device computed: GPU
# kernels on a GPU, time inside PyTorch's operators on a CPU. **Wall time** is the whole step, profiler overhead
# included.
#
# What to expect: on a GPU, a small model's step should be **host-bound**. The GPU finishes each small kernel quickly
# and then waits for the host. There Python, transformers and PyTorch's dispatcher prepare each kernel, then launch
# it. Busy time is then far below wall time. On a CPU, Python and the operators take turns on the same cores, and busy
# time is the operators' share.
# Predict before you run it: on this machine, will the matrix products take most of the step?

# %%
if recipes:
    probe = outputs.GreedyLoop(main, batch=1, prompt_tokens=ids.shape[1], new_tokens=4)  # its own static cache
    token = probe(ids, 1)  # the prompt is in the cache; the next position is ids.shape[1]

    def one_step(at):  # the hand loop's step: one token through the model at position `at`, the next token out
        with torch.inference_mode():
            return probe.forward(token, torch.tensor([at], device=lab.device))

    for at in (ids.shape[1], ids.shape[1] + 1):  # two warm-up steps
        one_step(at)
    step_view = timing.time_by_op(lambda: one_step(ids.shape[1] + 2), lab.device)
    lab.table("step_profile", step_view.table.head(8), title=f"One decode step of {lab.p.decode_model}, by "
              + ("GPU kernel" if lab.on_gpu else "operator (self time)"))

# %% [markdown]
# On a CPU the rows are PyTorch operators; `aten::mm` is a matrix product. On a GPU they are kernels; cuBLAS names
# its matrix products with `gemm`, `gemv` or `nvjet`. The cell below adds up those rows. It divides the bytes of the
# weights by their time: the speed at which the products read the weights. It sets that speed beside the copy's.

# %%
if recipes:
    products_ms = step_view.ms_of(*timing.MATRIX_PRODUCTS)  # aten::mm, addmm, bmm on a CPU; gemm, gemv, nvjet on a GPU
    weight_read = roofline.weight_bytes_per_token(main)  # every weight read once a step
    streamed = weight_read / (products_ms / 1e3) if products_ms else float("nan")  # bytes/s
    wall = step_view.wall_ms
    busy = pd.DataFrame([{"wall ms": wall, "busy ms": step_view.busy_ms, "busy share": step_view.busy_share,
                          "products ms": products_ms, "products share of wall": products_ms / wall,
                          "products GB/s": streamed / 1e9, "copy GB/s": bandwidth / 1e9}])
    lab.table("step_busy", busy, title="One decode step: busy time against wall time")
    if lab.on_gpu:
        pace = ("host-bound: the GPU idled while Python, transformers and PyTorch prepared each kernel"
                if step_view.busy_share < 0.5 else "the GPU's kernels kept it busy: the device sets the pace")
    else:
        pace = ("the matrix-vector kernels set the pace, not Python" if products_ms >= 0.5 * wall
                else "the work around the products sets the pace")
    print(f"Busy {step_view.busy_share:.0%} of the step; the products took {products_ms / wall:.0%} of "
          f"it, reading the weights at {streamed / bandwidth:.0%} of a copy's speed: {pace}.")

# %% [markdown]
# Read the two shares together. A busy share near 1 says the device worked the whole step. A products share near 1
# says the matrix products were that work. Their speed against the copy's tells how close they came to the memory's
# limit. On a GPU the same step replayed as a CUDA graph removes the host's part; the compiled recipe above measured
# that.

# %% [markdown]
# ### Decode attention at long context
#
# A decode step reads every weight once, and also the whole KV cache: one query attends to every cached token. At
# short contexts the weights dominate; past some length the cache does. Where, for the decode model? The bytes say
# it: the weights against the cache's bytes per token, in every layer.
#
# The measurement: one layer's attention at decode shapes, batch 1, one query per head against `N` cached tokens,
# through `scaled_dot_product_attention`. Under GQA the query heads that share a key/value head are that head's
# query rows, so the call has one key/value head per row group. Its bound is the time to read that layer's keys and
# values once at the copy's speed. Every length uses the first `N` tokens of one cache, built before any timing.
# Predict: will the time track the bytes, at about the copy's speed?

# %%
if recipes:
    at = roofline.kv_shape(main.config)
    group, per_token = at["heads"] // at["kv_heads"], roofline.kv_cache_bytes(main.config, batch=1, context=1,
                                                                             dtype=main.dtype)
    contexts = [2**k for k in range(10, 17 if lab.quick else 19 if not lab.on_gpu else 21, 2)]
    query = torch.randn(1, at["kv_heads"], group, at["head_dim"], device=lab.device, dtype=main.dtype)
    keys, values = (torch.randn(1, at["kv_heads"], contexts[-1], at["head_dim"], device=lab.device, dtype=main.dtype)
                    for _ in range(2))

    def attend(n, h=at["kv_heads"]):  # one layer, one new token: the first h heads' queries against n cached tokens
        return torch.nn.functional.scaled_dot_product_attention(query[:, :h], keys[:, :h, :n], values[:, :h, :n])

    def attention_point(n, repeats=5):
        took = timing.measure(lambda: attend(n), device=lab.device, warmup=2, repeats=repeats)
        return {"context": n, "median ms": took.median_ms, "p10 ms": took.p10_ms, "p90 ms": took.p90_ms}

    points = timing.recheck_trend([attention_point(n) for n in contexts], work="context", time="median ms",
                                  low="p10 ms", high="p90 ms", remeasure=lambda p: attention_point(p["context"], 9))
    print(f"{lab.p.decode_model}: {at['layers']} layers, {at['heads']} query heads in {at['kv_heads']} groups, "
          f"{per_token / 1024:.0f} KiB of cache per token; the weights are {weight_bytes(main) / 2**20:.0f} MiB")

# %%
if recipes:
    attention = pd.DataFrame(points)
    layer_bytes = attention["context"] * per_token / at["layers"]  # one layer's keys and values
    attention["layer KV MiB"] = layer_bytes / 2**20
    attention["read ms"] = layer_bytes / bandwidth * 1e3  # the bound: every byte once, at the copy's speed
    attention["time / read"] = attention["median ms"] / attention["read ms"]
    attention["attention GB/s"] = layer_bytes / attention["median ms"] / 1e6
    attention["all layers ms"] = attention["median ms"] * at["layers"]
    attention["KV / weights, a step"] = attention["context"] * per_token / weight_bytes(main)
    lab.table("decode_attention", attention, title=f"Decode attention, one layer, batch 1, {lab.dtype_name}")
    crossover = weight_bytes(main) / per_token  # the context where a step reads as many cache bytes as weight bytes
    clean = attention[~attention["noisy"]]
    lab.check("decode_attention_stays_above_its_read_time", (clean["time / read"] > 0.95).all(),
              f"lowest {clean['time / read'].min():.2f}", timing=True)
    print(f"The cache outweighs the weights from {crossover:,.0f} tokens on; the matrix products of a step took "
          f"{alone.median_ms:.3g} ms, attention over every layer {attention['all layers ms'].iloc[-1]:.3g} ms at "
          f"{attention['context'].iloc[-1]:,} tokens.")

# %% [markdown]
# The `time / read` column is the ratio to read. Near 1, attention streamed the cache at the copy's speed. Far above
# 1, something else set its pace. The profiler says what, at the longest context: the share of the call inside
# PyTorch's operators, and which operator took it. Then the same call over one key/value head alone, a part of the
# cache that no kernel can hand to more than one worker unless it splits the cache itself.

# %%
if recipes:
    view = timing.time_by_op(lambda: attend(contexts[-1]), lab.device)
    top, far, units = view.table.iloc[0], attention.iloc[-1], at["kv_heads"]
    print(f"At {contexts[-1]:,} tokens{' (noisy)' if far['noisy'] else ''}: busy {view.busy_share:.0%} of the call; "
          f"{top['name']} {top['share']:.0%} of it; {far['attention GB/s']:.3g} GB/s, a copy {bandwidth / 1e9:.3g}")
    one_head = timing.measure(lambda: attend(contexts[-1], h=1), device=lab.device, warmup=2, repeats=5).median_ms
    head_gbps = far["layer KV MiB"] * 2**20 / units / one_head / 1e6  # one head's keys and values, read alone
    rounds = -(-units // torch.get_num_threads())  # on a CPU: whole heads, shared out over the threads
    on_cpu = f" {torch.get_num_threads()} threads: {rounds} rounds of one head, {units / rounds * head_gbps:.3g} GB/s."
    print(f"One key/value head alone: {head_gbps:.3g} GB/s; all {units}: {far['median ms'] / one_head:.1f}x its time."
          f"{'' if lab.on_gpu else on_cpu}")

# %% [markdown]
# Read the lines together. When the attention operator takes nearly all of the call, the gap to the copy is the
# kernel's own pace, not Python's. FlashAttention splits its work by batch, heads and blocks of queries. At decode
# there is one query per head, so batch 1 leaves only the heads to split: a few pieces, however long the cache. On a
# CPU, PyTorch's kernel (`cpu_flash_attention` in ATen) gives each thread whole heads and reads each head's cache from
# start to end. On a CPU the last line above counts the rounds that makes, one head's time each, and the speed they
# give: it should be near the measured speed of the line before. On a GPU, a few pieces would leave most of its
# multiprocessors idle.
#
# **Split-KV**, or Flash-Decoding, fixes that. Its authors describe three steps: split the keys and values into
# chunks, attend to each chunk in parallel, keeping each row's log-sum-exp, then combine the chunks with those
# log-sum-exps. The source is "Flash-Decoding for long-context inference", by Dao, Haziza, Massa and Sizov, PyTorch
# blog, October 2023. PyTorch's own FlashAttention for CUDA does it unasked: when batch × heads × query blocks cannot
# fill the multiprocessors, it picks a number of splits (`num_splits_heuristic` in ATen's `flash_api.cpp`). On a GPU,
# a kernel named `...splitkv...` in the profiler's line above is that. The cell below writes the three steps and
# checks that they give the same output as one call.

# %%
def split_kv_attention(q, k, v, splits):  # Flash-Decoding's three steps, one chunk of the cache at a time
    parts, sums = [], []
    for k_chunk, v_chunk in zip(k.chunk(splits, dim=2), v.chunk(splits, dim=2), strict=True):
        scores = q @ k_chunk.transpose(-1, -2) / q.shape[-1] ** 0.5
        sums.append(torch.logsumexp(scores, dim=-1, keepdim=True))  # each row's log-sum-exp over this chunk
        parts.append(torch.softmax(scores, dim=-1) @ v_chunk)  # the chunk's attention, as if it were all
    share = torch.softmax(torch.stack(sums), dim=0)  # each chunk's part of the whole softmax's denominator
    return (share * torch.stack(parts)).sum(dim=0)


if recipes:
    length, splits = contexts[1], 8  # (n, the step count of the recipes, is used again below)
    q64, k64, v64 = query.double(), keys[:, :, :length].double(), values[:, :, :length].double()  # float64
    gap = float((split_kv_attention(q64, k64, v64, splits) -
                 torch.nn.functional.scaled_dot_product_attention(q64, k64, v64)).abs().max())
    lab.check("split_kv_equals_one_attention_call", gap < 1e-9, f"largest difference {gap:.1e}")
    print(f"{splits} chunks of {length // splits} tokens, merged: largest difference from one call {gap:.1e}; "
          f"{units * splits} pieces of work instead of {units}")

# %% [markdown]
# The chunks do not depend on each other, so each can run on its own multiprocessor; only the short merge waits for
# all of them. The blog measured its speed-up on GPUs; this notebook checks the arithmetic. The table above holds the
# rest: past the crossover printed under it, the cache, not the weights, sets a step's bytes.
#
# ### Batching: throughput against latency
#
# A step reads the weights once whatever the batch, so decoding several sequences together should multiply tokens/s,
# while each sequence's step gets a little slower. The bandwidth bound on the tokens/s of all sequences grows with the
# batch (the KV cache grows too); the compute bound (the matmul ceiling ÷ about 2 FLOPs per weight per token) is the
# same at every batch, since every token costs the same arithmetic, so at some batch it becomes the lower of the two.
# The table shows both (batch 1 is the dynamic-cache recipe above).

# %%
batches = pd.DataFrame()
if recipes:
    rows = [recipes[0] if b == 1 else outputs.measure_decode(  # batch 1: the dynamic-cache recipe
        main, outputs.random_prompt(main, batch=b, length=ids.shape[1]), **same) for b in lab.p.batch_sizes]
    batches = pd.DataFrame(rows)[["batch", "step_ms", "tokens_per_s"]].rename(columns=lambda c: c.replace("_", " "))

# %%
if recipes:
    middle = ids.shape[1] + n // 2  # the cache's middle size
    batches["bound tokens per s"] = [b * 1e3 / bound_ms(main, b, middle) for b in batches["batch"]]
    batches["fraction of bound"] = batches["tokens per s"] / batches["bound tokens per s"]
    flops = roofline.compute_ceiling(lab.device, lab.dtype, quick=lab.quick)["flops_per_s"]
    # FLOPs a token: 2 a weight (a multiply and an add), and attention's Q.K and P.V over the cache in every layer
    flops_per_token = 2 * parameters + 4 * main.config.num_hidden_layers * middle * main.config.hidden_size
    batches["compute bound tokens per s"] = flops / flops_per_token  # the same at every batch: every token costs alike
    lower = batches["compute bound tokens per s"] < batches["bound tokens per s"]
    batches["the lower bound"] = lower.map({True: "compute", False: "bandwidth"})
    knee = flops / flops_per_token * weight_bytes(main) / bandwidth  # the batch where the two meet (the cache left out)
    lab.table("batches", batches, title=f"Decode batch sweep, {lab.p.decode_model}, dynamic cache")
    print(f"The compute bound is the lower one from about batch {knee:.0f} on this machine.")
    if len(batches) >= 2:
        one, last = batches.iloc[0], batches.iloc[-1]
        gain = last["tokens per s"] / one["tokens per s"]
        print(f"batch {last['batch']:.0f} vs {one['batch']:.0f}: {gain:.1f}x the tokens/s, each step "
              f"{last['step ms'] / one['step ms']:.1f}x as long")
        lab.check("batching_raises_throughput", gain > 1.0, f"batch {last['batch']:.0f}: {gain:.2f}x", timing=True)

# %% [markdown]
# ### Padding pitfalls
#
# A batch of prompts of different lengths must be padded to one length, with pad tokens that the attention mask hides.
#
# **02.3 · Predict.** To generate from a batch of prompts of different lengths with a decoder, on which side must the
# tokenizer pad, `"left"` or `"right"`? (The cell after your answer shows what each side does.)

# %%
ex = lab.exercise("02.3")
answer = None  # "left" or "right"
ex.check(answer)

# %% [markdown]
# The demonstration, in float32: the short prompt's greedy continuation alone, then inside a right-padded and a
# left-padded batch. transformers warns about one of them (its warning is captured and printed below).

# %%
pad_name = next(iter(fp32_models), None)  # smollm2-135m by default: a real model, so real text
if pad_name is None:
    lab.skip("padding pitfalls", "no model of model_ids could be loaded")
else:
    pad_model, pad_tokenizer = fp32_models[pad_name], loaded[pad_name][1]
    pad_tokenizer.pad_token = pad_tokenizer.pad_token or pad_tokenizer.eos_token
    texts, count = [lab.p.prompt, "Hi"], 8
    short = pad_tokenizer(texts[1], return_tensors="pt").input_ids.to(lab.device)
    seen = {"alone": outputs.generate_exactly(pad_model, short, count, tokenizer=pad_tokenizer)[0, -count:].tolist()}
    with generation.transformers_warnings() as said:  # transformers logs its warnings; they are kept here
        for side in ("right", "left"):
            pad_tokenizer.padding_side = side
            batch = pad_tokenizer(texts, return_tensors="pt", padding=True).to(lab.device)
            out = outputs.generate_exactly(pad_model, batch.input_ids, count, attention_mask=batch.attention_mask,
                                              tokenizer=pad_tokenizer)
            seen[side] = out[1, -count:].tolist()

# %% tags=["reveals-02.3"]
if pad_name is not None:
    padding = pd.DataFrame({"prompt 'Hi'": list(seen), "continuation": map(pad_tokenizer.decode, seen.values())})
    lab.table("padding", padding, title="Continuations")
    print(*[f"transformers said: {m}" for m in dict.fromkeys(said) if "padding" in m], sep="\n")
    ex.compare(next((side for side in ("left", "right") if seen[side] == seen["alone"]), "neither side"), "padding")
    lab.check("left_padding_matches_the_prompt_alone", seen["left"] == seen["alone"])
    lab.check("right_padding_is_warned_about", any("right-padding" in m for m in said))

# %% [markdown]
# A padded batch also carries an attention mask, one of notebook 01's conditions. PyTorch's CUDA Flash operator takes
# no mask. Its signature in the installed torch, `aten::_scaled_dot_product_flash_attention`, has `is_causal` but no
# `attn_mask`. The CPU operator, `_scaled_dot_product_flash_attention_for_cpu`, does take a mask. So on a GPU,
# `sdpa_kernel([SDPBackend.FLASH_ATTENTION])` fails on a padded batch with `No available kernel`.
#
# The source page's call is a different one, and it generates a single prompt, unpadded. Its
# `torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False, enable_mem_efficient=False)` has a fourth
# switch, `enable_cudnn`, which defaults to `True` (`sdp_kernel` in torch 2.13's `torch/backends/cuda/__init__.py`).
# Predict: which backends does the page's call leave on? The cell below asks torch, with the deprecated call on purpose.

# %% tags=["old-api-on-purpose"]
import warnings

from torch.backends import cuda

with warnings.catch_warnings(record=True) as said:
    warnings.simplefilter("always")  # its deprecation warning, printed below
    with cuda.sdp_kernel(enable_flash=True, enable_math=False, enable_mem_efficient=False):  # the source page's call
        switches = {SDPBackend.FLASH_ATTENTION: cuda.flash_sdp_enabled(), SDPBackend.MATH: cuda.math_sdp_enabled(),
                    SDPBackend.EFFICIENT_ATTENTION: cuda.mem_efficient_sdp_enabled(),
                    SDPBackend.CUDNN_ATTENTION: cuda.cudnn_sdp_enabled()}
page_backends = [backend for backend, on in switches.items() if on]  # the same list for today's sdpa_kernel
print(*[f"{w.category.__name__}: {w.message}" for w in said[:1]], sep="\n")
print(f"The page's call leaves on: {', '.join(b.name for b in page_backends)}")
lab.check("page_call_leaves_cudnn_on", SDPBackend.CUDNN_ATTENTION in page_backends)

# %% [markdown]
# So the page's call asks for Flash **or cuDNN**. The cuDNN operator, `aten::_scaled_dot_product_cudnn_attention`,
# takes a mask: its signature has an `attn_bias` argument. Whether it accepts this mask is decided on the GPU.
# PyTorch's `can_use_cudnn_attention` (`aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`, not shipped in the
# wheel) checks the mask's shape, where Flash's check refuses any mask. It also needs 16-bit inputs and a GPU from
# the A100's generation on. So under the page's call a padded batch may run cuDNN attention instead of failing.
#
# The cell below tries both lists on your device and names the backend that ran. The fix for a Flash-only list is to
# allow a backend that takes masks, such as `sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])`. PyTorch tries the
# allowed backends in its own fixed order unless `set_priority=True` is passed. Or do not pad: batch equal lengths.

# %%
if pad_name is not None:
    model = loaded[pad_name][0]  # in the notebook's dtype: on a GPU, Flash takes only 16-bit inputs
    batch = pad_tokenizer([lab.p.prompt, "Hi"], return_tensors="pt", padding=True).to(lab.device)

    def forward_under(backends):  # (its error's first line or "", why SDPA's kernels refused, the backend that ran)
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel(backends), torch.inference_mode():
            warnings.simplefilter("always")  # SDPA warns each kernel's reason before it raises
            try:
                return "", [], timing.ops_that_ran(lambda: model(**batch), lab.device).backend
            except RuntimeError as err:  # such as "No available kernel"
                return str(err).strip().splitlines()[0], probes.refusal_reasons([str(w.message) for w in caught]), None

# %%
if pad_name is not None:
    error, reasons, ran = forward_under([SDPBackend.FLASH_ATTENTION])
    page_error, _, page_ran = forward_under(page_backends)
    print(f"The page's list, {' or '.join(b.name for b in page_backends)}: {page_error or f'{page_ran} ran'}")
    if not error:
        lab.skip("'No available kernel' with a padded batch", f"the Flash kernel on {lab.device} takes the mask "
                 f"({ran} ran)")
    else:
        print(f"Flash only, padded batch: {error}\nwhy: {'; '.join(reasons) or '-'}")
        fix, _, fixed = forward_under([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
        print(f"fix, sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION]): {fix or f'{fixed} ran'}")
        lab.check("padded_batch_under_flash_only_fails_with_no_available_kernel", "No available kernel" in error)
        lab.check("allowing_efficient_attention_fixes_it", not fix)

# %% [markdown]
# ## 5. The whole story in one figure
#
# Every decode run of this notebook as a fraction of its own bandwidth bound (1.0 = a step takes no longer than reading
# its bytes at the measured copy speed):
# section 3's runs, the recipes, then the batch sweep.

# %%
runs = [decode.assign(run=decode["model"] + ", " + decode["attention"])] if not decode.empty else []
if recipes:
    wide = batches[batches["batch"] != 1]  # batch 1 is the dynamic-cache recipe, shown once
    runs += [budget.assign(run=f"{lab.p.decode_model}, " + budget["recipe"]),
             wide.assign(run=f"{lab.p.decode_model}, batch " + wide["batch"].astype(str))]
fractions = pd.concat(runs, ignore_index=True)[["run", "fraction of bound"]] if runs else pd.DataFrame()
if fractions.empty:
    lab.skip("decode against the bandwidth bound", "no decode ran: no model of this run could be loaded")
else:
    fig = plots.bars(fractions["run"], fractions["fraction of bound"], xlabel="fraction of the bandwidth bound",
                     limit=1.0, limit_label="bandwidth bound", title=f"Decode on {lab.device_label}, {lab.dtype_name}")
    lab.figure("fraction_of_bandwidth_bound", fig)
    top = fractions.loc[fractions["fraction of bound"].idxmax()]
    lab.check("every_decode_run_stays_under_its_bandwidth_bound", top["fraction of bound"] < 1.05,
              f"{top['run']}: {top['fraction of bound']:.2f}; weights that stay in a CPU cache?", timing=True)
    print(f"Best: {top['run']} at {top['fraction of bound']:.0%} of its bandwidth bound")

# %%
if recipes and lab.on_gpu and parameters >= 1e9:
    highest = budget["fraction of bound"].max()
    lab.check("best_batch1_recipe_reaches_half_the_bandwidth_bound", highest >= 0.5, f"best {highest:.0%}")
else:
    lab.skip("half the bandwidth bound at batch 1", "expected only on a GPU, with a model of 1B parameters or more")

# %% [markdown]
# ## Your numbers beside the reference runs

# %%
steps = budget.set_index("recipe")["step ms"] if recipes else pd.Series(dtype=float)
headlines = {  # words: (the name labkit compare and the report know it by, this run's value)
    "memory bandwidth GB/s": ("bandwidth_gb_per_s", bandwidth / 1e9),
    "best batch-1 fraction of the bandwidth bound": ("best_fraction_of_bandwidth_bound_batch1",
                                                     budget["fraction of bound"].max() if recipes else None),
    "dynamic cache, ms a step": ("recipe_dynamic_cache_step_ms", steps.get("dynamic cache")),
    "hand loop, compiled step, ms a step": ("recipe_hand_loop_compiled_step_step_ms",
                                            steps.get("hand loop, compiled step")),
    "matrix products alone, ms a step": ("matrix_products_alone_ms", alone.median_ms if recipes else None),
    "batch 1 tokens/s": ("batch1_tokens_per_s", budget["tokens per s"].iloc[0] if 1 in lab.p.batch_sizes and recipes
                         else None),
}
lab.record(dict(headlines.values()))  # a number not measured in this run (None) is left out
show(lab.beside_references({words: name for words, (name, _) in headlines.items()}), title="Beside the reference runs")

# %% [markdown]
# ## What you measured

# %%
measured = []
if not decode.empty:
    r = decode[decode["attention"] == "sdpa"].iloc[0]
    measured.append(f"Decode of {r['model']} (sdpa, batch 1): {r['step ms']:.3g} ms a step, where reading its bytes "
                    f"at this machine's bandwidth needs {r['bound ms']:.3g} ms: {r['step ms'] / r['bound ms']:.1f}x.")
if recipes:
    measured.append(f"The best batch-1 recipe, {best['recipe']}, reached {best['fraction of bound']:.0%} of the "
                    f"bandwidth bound; the matrix-vector products alone took {alone.median_ms:.3g} ms of the dynamic "
                    f"cache's {base['step ms']:.3g} ms step.")
if not longest.empty:
    measured.append("Prefill at the longest prompt, eager's peak memory over sdpa's: " + ", ".join(
        f"{m} {x:.2f}x" for m, x in zip(longest["model"], longest["eager / sdpa memory"], strict=True))
        + " (eager holds each layer's N x N scores).")
if not agree.empty:
    measured.append(f"eager and sdpa in float32: {'the same' if agree['same greedy tokens'].all() else 'different'} "
                    f"greedy tokens, logits within {agree['logits relative difference'].max():.1e} (relative).")
if not sweep.empty and sweep["noisy"].any():
    measured.append(f"{sweep['noisy'].sum()} prefill times stayed against the trend after a second measurement "
                    "(marked noisy): nothing is concluded from them.")

# %%
measured.append(f"The KV formula {'matched' if cache_total == formula_total else 'did not match'} a Gemma-3-like "
                f"cache ({cache_total} B measured); at 128k tokens {most['model']}'s cache is "
                f"{most['KV / weights at 128k']:.2f}x its weights, the most of four.")
if recipes:
    measured.append(f"Decode attention over {contexts[-1]:,} cached tokens took {far['time / read']:.1f}x the time to "
                    f"read them at the copy's speed{' (a noisy point)' if far['noisy'] else ''}; the cache outweighs "
                    f"{lab.p.decode_model}'s weights from {crossover:,.0f} tokens on.")

# %%
if not sweep.empty and not decode.empty:
    measured.append(f"Prefill reached up to {sweep['TFLOP/s'].max():.3g} TFLOP/s, decode {decode['TFLOP/s'].max():.2g}:"
                    " a weight read serves a whole prompt in prefill, one token in decode.")
if main is not None:
    measured.append(f"A static KV cache of {lab.p.decode_model} for {context} tokens took {cache_bytes / 2**20:.4g} "
                    f"MiB: a key and a value for each of {shape['kv_heads']} key/value heads, in every layer.")
if len(batches) >= 2:
    measured.append(f"Batch {last['batch']:.0f} produced {gain:.1f}x the tokens/s of batch {one['batch']:.0f}: a step "
                    "reads the weights once for all the sequences of its batch.")
if pad_name is not None:
    measured.append("A short prompt in a left-padded batch continued exactly as it does alone."
                    if seen["left"] == seen["alone"] else
                    "A short prompt in a left-padded batch did not continue as it does alone here.")
lab.finish(measured or ["No decode ran on this machine: the 'Skipped:' lines above say why."])
