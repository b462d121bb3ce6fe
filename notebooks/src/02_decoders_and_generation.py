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
# The source page makes a decoder (`facebook/opt-350m`) faster with `model.to_bettertransformer()` and generates under a
# Flash-only context. That call is gone from today's libraries; this notebook shows what replaced it and then measures
# what really makes generation fast, on your machine:
#
# 1. **the story**: what BetterTransformer did for decoders, the call failing on today's stack, and the native
#    `attn_implementation="sdpa"` that replaced it;
# 2. **prefill vs decode**: eager vs sdpa (vs flash_attention_2 where it exists) on the embedded SmolLM2 and on the
#    source page's OPT architecture: prefill latency and memory as the prompt grows, decode tokens/s, identical tokens;
# 3. **why decode barely speeds up**: each decode step reads every weight once, so tokens/s is bounded by
#    *memory bandwidth ÷ bytes per step*; every decode run is reported as a fraction of that bound;
# 4. **closing the gap**: a static KV cache and compilation, larger batches (throughput against latency), and the
#    padding pitfalls of decoders;
# 5. **one figure**: tokens/s of every recipe as a fraction of the bandwidth limit.
#
# Nothing here downloads anything.

# %% tags=["parameters"]
# Parameters (papermill overrides this cell). A size of 0 or an empty list means: sized for this device.
device = "auto"                          # auto, cpu, cuda or cuda:N
dtype = "auto"                           # auto picks bfloat16 on a recent GPU, float32 on CPU
model_ids = ["smollm2-135m", "tiny-opt"] # decoders compared in section 2 (facebook/opt-350m works when cached)
decode_model = "auto"                    # model of sections 3 to 5; auto means smollm2-135m on CPU, random-llama-1b on GPU
prompt = "Hello my dog is cute and"
prompt_lengths = []                      # prefill prompt lengths in tokens
prefill_batch = 0                        # prompts per prefill call
new_tokens = 0                           # tokens generated per decode measurement
batch_sizes = []                         # decode batch sizes of section 4
compile = "auto"                         # compile the decode step; auto means on a GPU only
quick = False                            # smaller sizes, for tests and CPU-only machines
solutions = False                        # fill every exercise with its solution (a teacher's run)
results_path = ""                        # where to write the results JSON (empty: do not write)

# %%
import logging
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from labkit import generation, models, plots, probes, results, roofline, widgets
from labkit.errors import BadParameter, check_sizes

widgets.short_errors()  # a bad parameter below stops the notebook with one sentence, not a traceback
device = probes.resolve_device(device)
dtype = probes.resolve_dtype(dtype, device)
probes.check_dtype(device, dtype)
on_gpu = device.startswith("cuda")
if isinstance(model_ids, str) or not model_ids:
    raise BadParameter(f"model_ids={model_ids!r}: give a list of one or more causal language models.")
check_sizes(0, prefill_batch=prefill_batch, new_tokens=new_tokens)
check_sizes(1, **{f"prompt_lengths[{i}]": n for i, n in enumerate(prompt_lengths)},
            **{f"batch_sizes[{i}]": b for i, b in enumerate(batch_sizes)})
if new_tokens == 1:
    raise BadParameter("new_tokens=1: decoding needs at least 2 new tokens to time a step.")
if compile not in ("auto", True, False):
    raise BadParameter(f"compile={compile!r}: use 'auto', True or False.")
decode_model = decode_model if decode_model != "auto" else ("random-llama-1b" if on_gpu else "smollm2-135m")
if on_gpu:
    sizes = {"prompt_lengths": [256, 1024, 2048], "prefill_batch": 4, "new_tokens": 64 if quick else 128,
             "batch_sizes": [1, 8, 32] if quick else [1, 8, 32, 64]}
else:
    sizes = {"prompt_lengths": [32, 128] if quick else [64, 256], "prefill_batch": 1,
             "new_tokens": 12 if quick else 16, "batch_sizes": [1, 4]}
prompt_lengths = sorted(set(prompt_lengths or sizes["prompt_lengths"]))
prefill_batch = prefill_batch or sizes["prefill_batch"]
new_tokens = new_tokens or sizes["new_tokens"]
batch_sizes = sorted(set(batch_sizes or sizes["batch_sizes"]))
compile_step = on_gpu if compile == "auto" else compile
problems = {name: models.check_model(name) for name in [*model_ids, decode_model]}  # a wrong name stops here
repeats = 3 if on_gpu and not quick else 2
res = results.Results("02_decoders_and_generation", results_path)
key = results.metric_name

dtype_name = str(dtype).removeprefix("torch.")
implementations = ["eager", "sdpa"]
if probes.flash_attn()["ok"] and on_gpu and dtype_name in ("float16", "bfloat16"):
    implementations.append("flash_attention_2")
print(f"Working on {device} ({probes.device_label(device)}) in {dtype_name}; attention implementations: {implementations}")
print(f"Prefill: batch {prefill_batch}, lengths {prompt_lengths}; decode: {new_tokens} new tokens, batches {batch_sizes}; "
      f"decode model {decode_model}; compile {'on' if compile_step else 'off'}")

# %%
widgets.show(results.environment_rows(res.env), ["item", "value"], title="Environment")

# %% [markdown]
# ## 1. What BetterTransformer did for decoders, and why it went away
#
# For decoders, `model.to_bettertransformer()` (from the optimum package) swapped each attention module for one that
# called `torch.nn.functional.scaled_dot_product_attention`, so that the fused kernels of notebook 01 could run. Since
# then transformers has grown its own SDPA attention for almost every architecture, made it the default, and removed
# the `to_bettertransformer` method (and, by its release notes, optimum 2.0 dropped BetterTransformer itself). Calling
# it on today's stack, on purpose:

# %% tags=["old-api-on-purpose"]
opt_problem = models.check_model("tiny-opt")  # random weights, but the tokenizer comes from smollm2-135m
if opt_problem:
    res.skip("to_bettertransformer on OPT", opt_problem)
else:
    opt, opt_tokenizer = models.load_model("tiny-opt", device=device, dtype=dtype)
    try:
        opt.to_bettertransformer()  # the source page's call, on purpose
        bettertransformer_error = None
    except AttributeError as err:
        bettertransformer_error = err
    print(f"{type(bettertransformer_error).__name__}: {bettertransformer_error}" if bettertransformer_error else "it ran")
    print(f"optimum installed: {probes.package_version('optimum') or 'no'}; "
          f"this OPT model was built with attn_implementation={opt.config._attn_implementation!r} without asking")
    res.check("to_bettertransformer_is_gone", isinstance(bettertransformer_error, AttributeError))
    res.check("sdpa_is_the_default", opt.config._attn_implementation == "sdpa")
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
# the KV cache: many tokens per weight read, so it is compute-heavy, and attention over the prompt is where the SDPA
# kernels matter (eager attention builds the N × N score matrix, as in notebook 01). **Decode** then produces one token
# per step, attending to the cache.
#
# What to expect: at long prompts sdpa's prefill should be faster than eager's and need less memory, because eager
# attention holds each layer's N² scores; at short prompts other tensors and fixed costs dominate and the two are
# close (the cell after the tables prints the ratios and the size of one layer's scores). Prefill here computes the
# logits of the last position only, as `generate` does. Decode tokens/s should barely differ, for a reason section 3
# measures. The greedy tokens must be identical (compared in float32, where
# both implementations agree to rounding).

# %%
prefill_rows, decode_rows, greedy = [], [], {}
loaded = {}
for name in model_ids:
    if problems[name]:
        res.skip(f"prefill and decode of {name}", problems[name])
        continue
    model, tokenizer = models.load_model(name, device=device, dtype=dtype)
    loaded[name] = (model, tokenizer)
    limit = getattr(model.config, "max_position_embeddings", None) or max(prompt_lengths)
    lengths = [n for n in prompt_lengths if n + 1 <= limit]
    if len(lengths) < len(prompt_lengths):
        print(f"{name}: prompt lengths above its {limit} positions are left out")
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    for implementation in implementations:
        model.set_attn_implementation(implementation)
        for n in lengths:
            ids = generation.random_prompt(model, batch=prefill_batch, length=n)
            row = generation.measure_prefill(model, ids, repeats=repeats)
            prefill_rows.append({"model": name, "attn_implementation": implementation, **row})
        row = generation.measure_decode(model, prompt_ids, new_tokens=new_tokens, repeats=repeats, tokenizer=tokenizer)
        decode_rows.append({"model": name, "attn_implementation": implementation, "recipe": f"{implementation}, dynamic cache", **row})
    model.set_attn_implementation("sdpa")
widgets.show([{**r, "peak MiB": r["peak_extra_bytes"] / 2**20 if r["peak_extra_bytes"] is not None else None} for r in prefill_rows],
             ["model", "attn_implementation", "batch", "prompt_tokens", "median_ms", "tokens_per_s", "peak MiB"],
             title=f"Prefill ({dtype_name})")
widgets.show(decode_rows, ["model", "attn_implementation", "prompt_tokens", "new_tokens", "step_ms", "tokens_per_s"],
             title=f"Decode, batch 1 ({dtype_name})")

# %%
for r in prefill_rows:
    name = key("prefill", r["model"], r["attn_implementation"], f"n{r['prompt_tokens']}")
    res.metric(f"{name}_ms", r["median_ms"])
    if r["peak_extra_bytes"] is not None:
        res.metric(f"{name}_peak_mib", r["peak_extra_bytes"] / 2**20)
for r in decode_rows:
    res.metric(key("decode", r["model"], r["attn_implementation"], "tokens_per_s"), r["tokens_per_s"])
for name in loaded:
    rows = {r["attn_implementation"]: r for r in prefill_rows if r["model"] == name and r["prompt_tokens"] == max(
        x["prompt_tokens"] for x in prefill_rows if x["model"] == name)}
    if rows.get("eager") and rows.get("sdpa") and rows["eager"]["peak_extra_bytes"] and rows["sdpa"]["peak_extra_bytes"]:
        ratio = rows["eager"]["peak_extra_bytes"] / rows["sdpa"]["peak_extra_bytes"]
        n, config = rows["sdpa"]["prompt_tokens"], loaded[name][0].config
        scores = roofline.element_size(dtype) * prefill_batch * config.num_attention_heads * n * n
        print(f"{name}, longest prompt ({n} tokens): eager needs {ratio:.2f}x the prefill memory of sdpa and "
              f"{rows['eager']['median_ms'] / rows['sdpa']['median_ms']:.2f}x its time; one layer's scores take "
              f"{scores / 2**20:.1f} MiB")
        res.metric(key("prefill", name, "eager_over_sdpa_memory"), ratio)

# %% [markdown]
# Are the results the same? In float32, with each implementation: the logits of two random prompts (a random-weight
# model's greedy text is repetitive, so the logits are the sharper test) and the greedy tokens of the prompt.
# flash_attention_2 runs only in 16-bit, where rounding differs, so it is not part of this comparison.

# %%
agree, logit_errors, fp32_models = {}, {}, {}
for name, (model, tokenizer) in loaded.items():
    check_model = model if dtype == torch.float32 else models.load_model(name, device=device, dtype="float32")[0]
    fp32_models[name] = check_model
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    random_ids = generation.random_prompt(check_model, batch=2, length=48, seed=1)
    tokens, logits = {}, {}
    for implementation in [i for i in implementations if i != "flash_attention_2"]:
        check_model.set_attn_implementation(implementation)
        tokens[implementation] = generation.generate_exactly(check_model, ids, new_tokens, tokenizer=tokenizer)[0, ids.shape[1]:].tolist()
        with torch.inference_mode():
            logits[implementation] = check_model(input_ids=random_ids).logits.double()
    check_model.set_attn_implementation("sdpa")
    agree[name] = all(t == tokens["sdpa"] for t in tokens.values())
    logit_errors[name] = max(float((l - logits["sdpa"]).norm() / logits["sdpa"].norm()) for l in logits.values())
    res.metric(key("logits_relative_difference", name), logit_errors[name])
    print(f"{name}: logits differ by {logit_errors[name]:.1e} (relative, 2 random prompts of 48 tokens); "
          f"greedy {' | '.join(f'{k}: {tokenizer.decode(v)!r}' for k, v in tokens.items())}")
if not loaded:
    res.skip("eager against sdpa, tokens and logits", "no model of model_ids could be loaded")
else:
    res.check("greedy_tokens_identical_across_implementations", all(agree.values()), str(agree))
    res.check("logits_agree_across_implementations", max(logit_errors.values()) < 1e-4,
              f"largest relative difference {max(logit_errors.values()):.1e}")

# %% [markdown]
# ## 3. Why decode barely speeds up: the bandwidth bound
#
# One decode step for one sequence multiplies a single token's activations by every weight matrix: about 2 FLOPs per
# weight, but every weight must come from memory. So a step cannot be faster than *bytes read ÷ memory bandwidth*,
# with bytes read = the weights (once) + the KV cache of the context so far. The bound on tokens/s is
#
# `tokens/s ≤ batch × bandwidth ÷ (weight bytes + KV cache bytes)`.
#
# labkit counts the bytes from the model itself (tied embeddings once; an untied input embedding contributes only the
# rows it looks up) and measures the bandwidth now with a large copy (a small buffer could sit in a CPU cache).

# %%
bandwidth = roofline.bandwidth_ceiling(device)
print(f"Memory bandwidth: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s, {bandwidth['source']}")

def decode_bound(model, row):
    return generation.bandwidth_bound(model, row, bandwidth["bytes_per_s"])

bounded = []
for r in decode_rows:
    r.update(decode_bound(loaded[r["model"]][0], r))
    bounded.append({"model": r["model"], "attn_implementation": r["attn_implementation"], "weights MB": r["weight_bytes"] / 1e6,
                    "KV cache MB": r["kv_cache_bytes"] / 1e6, "tokens/s": r["tokens_per_s"],
                    "bound tokens/s": r["bound_tokens_per_s"], "fraction of bound": r["fraction_of_bound"]})
    res.metric(key("decode", r["model"], r["attn_implementation"], "fraction_of_bandwidth_bound"), r["fraction_of_bound"])
widgets.show(bounded, title="Decode, batch 1, against the bandwidth bound")
for name in loaded:
    rates = [r["tokens_per_s"] for r in decode_rows if r["model"] == name]
    print(f"{name}: the attention implementations span {min(rates):.1f} to {max(rates):.1f} tokens/s "
          f"({max(rates) / min(rates):.2f}x); best fraction of the bound {max(r['fraction_of_bound'] for r in decode_rows if r['model'] == name):.2f}")

# %% [markdown]
# Read the table and the lines under it: how far each run is from its bound, and how little (or how much) the attention
# implementation moved tokens/s. At batch 1 a step is a few dozen matrix-vector products over short rows of cache, so
# attention is a small part of it. The gap to the bound is everything else a step pays for; the likely suspects are
# per-step work outside the matrix products (Python, kernel launches, the sampling loop) and matrix-vector products that
# do not stream memory at full speed. The recipes of the next section remove some of that work, and their numbers say
# how much it mattered. (A model as small as tiny-opt, 13 MB in float32, fits in a CPU's caches, so its bound is only
# nominal there.)
#
# ## 4. Closing the gap
#
# The recipes, all on the same model (`decode_model`) at batch 1, each timed as in section 2:
#
# * **dynamic cache**: plain `generate`, the cache grows by concatenation each step;
# * **static cache**: `cache_implementation="static"` preallocates the cache for prompt + new tokens, so every step has
#   the same shapes;
# * **static cache + compile**: with a static cache, transformers compiles the decode step by itself on a GPU (on a
#   CPU only when asked); the "static cache" recipe above switches that off (`disable_compile=True`) so the two effects
#   are measured apart. Here the compile is configured with `CompileConfig(mode="reduce-overhead", fullgraph=True)` on a
#   GPU (the mode that records CUDA graphs). The cache size depends on prompt and new tokens, so changing either
#   recompiles: the first call's extra time is reported separately as compile time;
# * **hand loop**: decoding written out in the style of gpt-fast (`labkit.generation.GreedyLoop`): a static cache made
#   once, one forward per token, the argmax on the device, no `generate` machinery in between;
# * **hand loop, compiled step**: the same with the one-token step compiled (`mode="reduce-overhead"` on a GPU, so the
#   step replays as a CUDA graph; the position is passed as a tensor so the step compiles once).

# %%
import time

from transformers import CompileConfig

if problems[decode_model]:
    res.skip(f"recipes on {decode_model}", problems[decode_model])
    recipes = []
else:
    main, main_tokenizer = loaded[decode_model] if decode_model in loaded else models.load_model(decode_model, device=device, dtype=dtype)
    main.set_attn_implementation("sdpa")
    parameters = sum(p.numel() for p in main.parameters())
    print(f"{decode_model}: {parameters / 1e9:.3f} billion parameters, {roofline.weight_bytes_per_token(main) / 1e9:.3f} GB read per step")
    ids = generation.random_prompt(main, batch=1, length=16)
    recipes = []

    def recipe(label, **kwargs):
        row = generation.measure_decode(main, ids, new_tokens=new_tokens, repeats=repeats, tokenizer=main_tokenizer, **kwargs)
        row.update(decode_bound(main, row), recipe=label)
        recipes.append(row)
        return row

    recipe("dynamic cache")
    recipe("static cache", cache_implementation="static", disable_compile=True)

    def loop_recipe(label, compile_mode=None):
        loop = generation.GreedyLoop(main, batch=1, prompt_tokens=ids.shape[1], new_tokens=new_tokens, compile_mode=compile_mode)
        start = time.perf_counter()
        loop(ids)  # the first call compiles when compile_mode is set
        first_s = time.perf_counter() - start
        row = generation.measure_loop(loop, ids, repeats=repeats)
        row.update(decode_bound(main, row), recipe=label)
        recipes.append(row)
        return first_s - row["generate_ms"] / 1e3

    loop_recipe("hand loop")

# %%
if recipes and compile_step:
    try:
        loop_compile_s = loop_recipe("hand loop, compiled step", "reduce-overhead" if on_gpu else "default")
        print(f"compile of the hand loop's step: {loop_compile_s:.1f} s more than a compiled call")
        res.metric("hand_loop_compile_seconds", loop_compile_s)
    except Exception as err:  # a failed compile is a skipped recipe, with its reason
        res.skip("hand loop, compiled step", f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}")
elif recipes:
    res.skip("hand loop, compiled step", "compilation is off on a CPU by default (the first call compiles, which is slow on a CPU); "
             "set compile=True to measure it")
if recipes and compile_step:
    main.generation_config.compile_config = CompileConfig(mode="reduce-overhead" if on_gpu else "default", fullgraph=True)
    if not on_gpu:
        main.generation_config.compile_config._compile_all_devices = True  # transformers compiles only on accelerators by default
    try:
        start = time.perf_counter()
        generation.generate_exactly(main, ids, new_tokens, tokenizer=main_tokenizer, cache_implementation="static")
        first_s = time.perf_counter() - start
        row = recipe("static cache + compile", cache_implementation="static")
        compile_s = first_s - row["generate_ms"] / 1e3
        print(f"compile: the first call took {first_s:.1f} s, {compile_s:.1f} s more than a compiled call")
        res.metric("compile_seconds", compile_s)
    except Exception as err:  # a failed compile is a skipped recipe, with its reason
        res.skip("static cache + compile", f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}")
    finally:
        main.generation_config.compile_config = None
elif recipes:
    res.skip("static cache + compile", "compilation is off on a CPU by default (the first call compiles, which is slow on a CPU); "
             "set compile=True to measure it")
if recipes:
    widgets.show(recipes, ["recipe", "new_tokens", "step_ms", "tokens_per_s", "bound_tokens_per_s", "fraction_of_bound"],
                 title=f"Decode recipes, {decode_model}, batch 1, {dtype_name}")
    for r in recipes:
        res.metric(key("recipe", r["recipe"], "tokens_per_s"), r["tokens_per_s"])
        res.metric(key("recipe", r["recipe"], "fraction_of_bandwidth_bound"), r["fraction_of_bound"])
    same = all(r["token_ids"] == recipes[0]["token_ids"] for r in recipes)
    print(f"All recipes generated the same tokens: {same}")
    res.metric("recipes_agreeing_with_dynamic_cache", sum(r["token_ids"] == recipes[0]["token_ids"] for r in recipes))

# %% [markdown]
# ### Batching: throughput against latency
#
# A step reads the weights once whatever the batch, so decoding several sequences together should multiply tokens/s,
# while each sequence's step gets a little slower. The bandwidth bound grows with the batch (the KV cache grows too);
# the compute bound (the matmul ceiling ÷ about 2 FLOPs per weight per token) does not depend on the batch per token, so
# at some batch it becomes the lower of the two. The table shows both.

# %%
batch_rows = []
if recipes:
    flops_ceiling = roofline.compute_ceiling(device, dtype, quick=quick)
    for b in batch_sizes:
        batch_ids = generation.random_prompt(main, batch=b, length=16, seed=b)
        row = generation.measure_decode(main, batch_ids, new_tokens=new_tokens, repeats=repeats, tokenizer=main_tokenizer)
        bound = decode_bound(main, row)["bound_tokens_per_s"]
        context = row["prompt_tokens"] + row["new_tokens"] // 2
        compute_bound = b * flops_ceiling["flops_per_s"] / roofline.decoder_flops_per_token(
            parameters, layers=main.config.num_hidden_layers, context=context, hidden=main.config.hidden_size)
        batch_rows.append({"batch": b, "step_ms": row["step_ms"], "tokens/s (all sequences)": row["tokens_per_s"],
                           "bound tokens/s": bound, "fraction of bound": row["tokens_per_s"] / bound,
                           "compute bound tokens/s": compute_bound})
        res.metric(f"batch{b}_tokens_per_s", row["tokens_per_s"])
        res.metric(f"batch{b}_step_ms", row["step_ms"])
    widgets.show(batch_rows, title=f"Decode batch sweep, {decode_model}, dynamic cache")
    if len(batch_rows) >= 2:
        gain = batch_rows[-1]["tokens/s (all sequences)"] / batch_rows[0]["tokens/s (all sequences)"]
        slower = batch_rows[-1]["step_ms"] / batch_rows[0]["step_ms"]
        print(f"batch {batch_rows[-1]['batch']} vs 1: {gain:.1f}x the tokens/s, each step {slower:.1f}x as long")
        res.check("batching_raises_throughput", gain > 1.0)


# %% [markdown]
# ### Padding pitfalls
#
# A batch of prompts of different lengths must be padded. A decoder generates after the **last** position, so padding
# must go on the **left**; with right padding the short prompt's continuation starts after pad tokens. transformers
# warns about it (captured below). The check, in float32: a prompt's greedy continuation inside a left-padded batch is
# the same as alone.

# %%
class Captured(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

pad_name = "smollm2-135m" if "smollm2-135m" in loaded else next(iter(loaded), None)
pad_model, pad_tokenizer = (fp32_models[pad_name], loaded[pad_name][1]) if pad_name else (None, None)
if pad_model is None:
    res.skip("padding pitfalls", "no model of model_ids could be loaded")
else:
    if pad_tokenizer.pad_token is None:
        pad_tokenizer.pad_token = pad_tokenizer.eos_token
    texts = [prompt, "Hi"]
    alone = generation.generate_exactly(pad_model, pad_tokenizer(texts[1], return_tensors="pt").input_ids.to(device),
                                        8, tokenizer=pad_tokenizer)[0, -8:].tolist()
    captured = Captured()
    logging.getLogger("transformers").addHandler(captured)
    padded = {}
    try:
        for side in ("right", "left"):
            pad_tokenizer.padding_side = side
            batch = pad_tokenizer(texts, return_tensors="pt", padding=True).to(device)
            out = generation.generate_exactly(pad_model, batch.input_ids, 8, attention_mask=batch.attention_mask,
                                              tokenizer=pad_tokenizer)
            padded[side] = out[1, -8:].tolist()
    finally:
        logging.getLogger("transformers").removeHandler(captured)
        pad_tokenizer.padding_side = "left"
    widgets.show([{"prompt 'Hi'": "alone", "continuation": pad_tokenizer.decode(alone)}] +
                 [{"prompt 'Hi'": f"{side}-padded in a batch", "continuation": pad_tokenizer.decode(ids)} for side, ids in padded.items()],
                 title="Greedy continuation of the short prompt")
    for message in dict.fromkeys(captured.messages):
        if "padding" in message:
            print("transformers said:", message)
    res.check("left_padding_matches_the_prompt_alone", padded["left"] == alone)
    res.check("right_padding_is_warned_about", any("right-padding" in m for m in captured.messages))

# %% [markdown]
# A padded batch also carries an attention mask, and a mask is one of the conditions of notebook 01. Where the Flash
# kernel does not take an arbitrary mask (PyTorch's CUDA Flash kernel is documented not to), the source page's
# Flash-only context fails on a padded batch with `No available kernel`; the cell below tries it on your device. The fix
# is to allow a backend that takes masks (a list: Flash first, then memory-efficient) or not to pad (batches of equal
# lengths).

# %%
if pad_model is not None:
    batch = pad_tokenizer([prompt, "Hi"], return_tensors="pt", padding=True).to(device)

    def forward_under(backends):
        with sdpa_kernel(backends), torch.inference_mode():
            return pad_model(**batch)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            forward_under([SDPBackend.FLASH_ATTENTION])
            flash_only = ""
        except RuntimeError as err:
            flash_only = str(err).strip().splitlines()[0]
    reasons = probes.refusal_reasons([str(w.message) for w in caught])
    if flash_only:
        print("Flash only, padded batch:", flash_only)
        print("why:", "; ".join(reasons) or "-")
        try:
            fixed = forward_under([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]).logits.shape[0] == 2
        except RuntimeError as err:
            fixed = False
            print("the fix failed too:", str(err).strip().splitlines()[0])
        print(f"fix, sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION]): {'runs' if fixed else 'fails'}")
        res.check("padded_batch_under_flash_only_fails_with_no_available_kernel", "No available kernel" in flash_only)
        res.check("allowing_efficient_attention_fixes_it", fixed)
    else:
        res.skip("'No available kernel' with a padded batch", f"the Flash kernel on {device} accepts the padding mask, so nothing fails here")

# %% [markdown]
# ## 5. The whole story in one figure
#
# Tokens/s of every decode run of this notebook as a fraction of its own bandwidth bound (1.0 = the memory system never
# waits). Batch-1 recipes first, then the batch sweep.

# %%
labels, fractions = [], []
for r in decode_rows:
    labels.append(f"{r['model']}, {r['attn_implementation']}")
    fractions.append(r["fraction_of_bound"])
for r in recipes:
    labels.append(f"{decode_model}, {r['recipe']}")
    fractions.append(r["fraction_of_bound"])
for r in batch_rows:
    labels.append(f"{decode_model}, batch {r['batch']}")
    fractions.append(r["fraction of bound"])
if not fractions:
    res.skip("decode against the bandwidth bound", "no decode ran: no model of this run could be loaded")
else:
    fig = plots.bars(labels, fractions, xlabel="fraction of the bandwidth bound", limit=1.0, limit_label="bandwidth bound",
                     title=f"Decode on {probes.device_label(device)}, {dtype_name}")
    res.figure("fraction_of_bandwidth_bound", fig)
    res.check("every_decode_run_stays_under_its_bandwidth_bound", all(f < 1.05 for f in fractions),
              f"largest fraction {max(fractions):.2f}; above 1 would mean a wrong byte count or bandwidth")
    best = max(zip(fractions, labels))
    print(f"Best: {best[1]} at {100 * best[0]:.0f}% of its bandwidth bound")
    if recipes:
        res.metric("best_fraction_of_bandwidth_bound_batch1", max(r["fraction_of_bound"] for r in recipes))
if recipes and on_gpu and parameters >= 1e9:
    res.check("best_batch1_recipe_reaches_half_the_bandwidth_bound", max(r["fraction_of_bound"] for r in recipes) >= 0.5)
else:
    res.skip("the 50% of the bandwidth bound target", "it is set for batch-1 decode of a model of 1B parameters or more on a GPU")

# %% [markdown]
# ## Your numbers beside the reference runs

# %%
reference = results.reference_runs("02_decoders_and_generation")
keys = sorted(k for k in res.metrics if "fraction_of_bandwidth_bound" in k)
widgets.show([{"metric": k, "this machine": res.metrics[k], **{name: run["metrics"].get(k) for name, run in reference.items()}}
              for k in keys], title="Fraction of the bandwidth bound: this machine and the reference runs")
if not reference:
    print("No reference runs are stored yet under reference/: only this machine's numbers are shown.")

# %% [markdown]
# ## Results

# %% [markdown]
# ## Exercises
#
# Predict, then check; or write a few lines, then check. Each check says whether the answer is right and, when it is
# not, which mistake it looks like; `ex.hint()` gives a hint (call it again for the next one), `ex.solution()` shows one.
# Answers that pass are remembered on this machine only (`labkit progress` in a terminal lists them). An answer left
# as `None` is "not attempted": the notebook still runs to its end.

# %% [markdown]
# **02.1 · Predict.** A decoder of 1.0 billion parameters in 16-bit, at batch 1, on this machine's measured memory bandwidth (printed below): at most how many tokens per second can it generate?

# %%
from labkit import exercises

verdicts = []
ex = exercises.get("02.1")
given = {"parameters": 1.0e9, "bytes_per_parameter": 2,
           "bandwidth_gb_per_s": round(roofline.bandwidth_ceiling(device)["bytes_per_s"] / 1e9, 1)}
print("given:", given)
answer = None  # your prediction, in tokens/s
if solutions:  # a workshop run fills in the solution
    answer = ex.solved(**given)
verdicts.append(ex.check(answer, record=not solutions, **given))

# %% [markdown]
# **02.2 · Predict.** How many MiB does the KV cache take for the model shape below (Llama-3-8B's: 32 layers, 32 query heads sharing 8 key/value heads of size 128), one sequence of 8192 tokens, 16-bit?

# %%
ex = exercises.get("02.2")
given = {"layers": 32, "heads": 32, "kv_heads": 8, "head_dim": 128, "context": 8192,
           "batch": 1, "bytes_per_element": 2}
answer = None  # your prediction, in MiB
if solutions:  # a workshop run fills in the solution
    answer = ex.solved(**given)
verdicts.append(ex.check(answer, record=not solutions, **given))

# %% [markdown]
# **02.3 · Predict.** To generate from a batch of prompts of different lengths with a decoder, does the tokenizer pad on the `"left"` or on the `"right"`? (Section 4's padding pitfalls show what goes wrong.)

# %%
ex = exercises.get("02.3")
given = {}
answer = None  # "left" or "right"
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
