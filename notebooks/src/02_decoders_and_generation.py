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
#    source page's OPT architecture: prefill latency and memory as the prompt grows, decode speed, identical tokens;
# 3. **why decode barely speeds up**: each decode step reads every weight once, so a step cannot take less than
#    *bytes read ÷ memory bandwidth*; every decode run is put beside that bound;
# 4. **closing the gap**: a static KV cache, a hand-written decode loop and a compiled step, where a step's time goes,
#    larger batches (throughput against latency), and the padding pitfalls of decoders;
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

# %%
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import labkit
from labkit import compat, generation, models, plots, probes, roofline, timing
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
# spread (the 10th and 90th percentiles: the middle 80% of the runs fall between them). Prefill time must grow with
# the prompt; a point where it fell instead is measured again, and if it still contradicts the trend it is marked
# **noisy** and nothing is concluded from it.

# %%
prefill_rows, decode_rows, loaded = [], [], {}
for name in lab.model_ids:
    if lab.problems[name]:
        lab.skip(f"prefill and decode of {name}", lab.problems[name])
        continue
    model, tokenizer = loaded[name] = models.load_model(name, device=lab.device, dtype=lab.dtype)
    lengths = generation.usable_lengths(model, lab.prompt_lengths)  # what fits the model's position table
    if len(lengths) < len(lab.prompt_lengths):
        print(f"{name}: prompts longer than {model.config.max_position_embeddings - 1} tokens are left out")
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(lab.device)
    for implementation in lab.implementations:
        model.set_attn_implementation(implementation)  # the same weights, another attention
        which = {"model": name, "attn_implementation": implementation}
        for row in generation.prefill_sweep(model, lengths, batch=lab.prefill_batch, repeats=lab.repeats):
            prefill_rows.append({**which, **row})
        decode = generation.measure_decode(model, prompt_ids, new_tokens=lab.new_tokens, repeats=lab.repeats,
                                           tokenizer=tokenizer)
        decode_rows.append({**which, **decode})
    model.set_attn_implementation("sdpa")

# %%
show(generation.prefill_table(prefill_rows), title=f"Prefill ({lab.dtype_name})")
lab.add(generation.prefill_findings(prefill_rows))
fig = plots.prefill_sweep(prefill_rows, title=f"Prefill on {lab.device_label}, {lab.dtype_name}")
lab.figure("prefill", fig)
longest = generation.longest_prompt(prefill_rows, {n: m.config for n, (m, _) in loaded.items()}, lab.dtype)
show(longest, title="Eager against sdpa at the longest prompt (a noisy time gives no ratio)")
lab.add(generation.longest_prompt_findings(longest))

# %% [markdown]
# Read the memory column first: it does not depend on timing noise. Where eager needs more memory than sdpa, compare
# the excess with the size of one layer's scores beside it. The time ratio is shown only where both times held up
# against the trend. At the quick sizes on a CPU a layer's scores take less than a MiB (the "one layer's scores MiB"
# column); at 2048 tokens
# and batch 4, eager needed 5.92x the prefill memory of sdpa for smollm2-135m (measured on an H100 in
# `reference/nvidia-h100/partial-02_decoders_and_generation.ipynb`). That run's time ratio is not quoted: its sdpa
# times fell as the prompts grew (43.96 ms at 256 tokens, 20.07 ms at 2048), the contradiction now marked noisy.
#
# Are the results the same? In float32, with each implementation: the logits of two random prompts (a random-weight
# model's greedy text is repetitive, so the logits are the sharper test) and the greedy tokens of the prompt.
# flash_attention_2 runs only in 16-bit, where rounding differs, so it is not part of this comparison.

# %%
agree, fp32_models = {}, {}
for name, (model, tokenizer) in loaded.items():
    fp32 = model if lab.dtype == torch.float32 else models.load_model(name, device=lab.device, dtype="float32")[0]
    fp32_models[name] = fp32
    agree[name] = generation.implementations_agree(fp32, tokenizer, prompt, ["eager", "sdpa"],
                                                   new_tokens=lab.new_tokens)
    print(f"{name}: logits differ by {agree[name]['logit_error']:.1e} (relative, 2 random prompts of 48 tokens); "
          f"greedy {' | '.join(f'{k}: {v!r}' for k, v in agree[name]['text'].items())}")
if agree:
    lab.add(generation.agreement_findings(agree))
else:
    lab.skip("eager against sdpa, tokens and logits", "no model of model_ids could be loaded")

# %% [markdown]
# ## 3. Why decode barely speeds up: the bandwidth bound
#
# One decode step for one sequence multiplies a single token's activations by every weight matrix: about 2 FLOPs per
# weight, but every weight must come from memory. So a step cannot take less than *bytes read ÷ memory bandwidth*,
# with bytes read = the weights (once) + the KV cache of the context so far. The bound on tokens/s is
#
# `tokens/s ≤ batch × bandwidth ÷ (weight bytes + KV cache bytes)`.
#
# labkit counts the bytes from the model itself (tied embeddings once; an untied input embedding contributes only the
# rows it looks up) and measures the bandwidth now with a large copy (a small buffer could sit in a CPU cache).

# %%
bandwidth = roofline.bandwidth_ceiling(lab.device)
print(f"Memory bandwidth: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s, {bandwidth['source']}")

# %% [markdown]
# **02.1 · Predict.** The first model of section 2 (smollm2-135m unless you changed `model_ids`) has the number of
# parameters printed below, each stored in `bytes_per_parameter` bytes in this notebook's dtype, and this machine's
# memory bandwidth is the one just measured. At batch 1, at most how many tokens per second can it generate?

# %%
first = next(iter(loaded), None)
ex = lab.exercise("02.1", parameters=sum(p.numel() for p in loaded[first][0].parameters()) if first else 1.0e9,
                  bytes_per_parameter=roofline.element_size(lab.dtype),
                  bandwidth_gb_per_s=round(bandwidth["bytes_per_s"] / 1e9, 1))
print(ex)
answer = None  # your prediction, in tokens/s
ex.check(answer)

# %% [markdown]
# The measurement: each run's time per step beside the time its bytes need at this bandwidth (the *bound step*), and
# only then the rates. The further a step is above its bound, the less of it goes to reading the weights at the
# machine's best speed.

# %% tags=["reveals-02.1"]
for r in decode_rows:
    r.update(generation.bandwidth_bound(loaded[r["model"]][0], r, bandwidth["bytes_per_s"]))
    if r["attn_implementation"] == "sdpa":
        print(f"{r['model']}: {generation.step_verdict(r['step_ms'], r['bound_step_ms'], lab.device)}")
show(generation.decode_table(decode_rows), title=f"Decode, batch 1, against the bandwidth bound ({lab.dtype_name})")
lab.add(generation.decode_findings(decode_rows, bandwidth["bytes_per_s"]))
mine = [r for r in decode_rows if r["model"] == first and r["attn_implementation"] == "sdpa"]
if mine:
    print(f"{first}: the bound is {mine[0]['bound_tokens_per_s']:.4g} tokens/s; it generated:")
    ex.compare(mine[0]["tokens_per_s"], "tokens/s")

# %% [markdown]
# Compare eager's and sdpa's steps in the table: at batch 1 a decode step attends from one token to a short cache,
# little work next to the matrix-vector products, so a faster attention kernel has little to speed up; the table shows
# how much the implementation moved each step on this machine. On a GPU a small model's step can sit far above its
# bound (measured on an H100 and stored in `reference/nvidia-h100/partial-02_decoders_and_generation.ipynb`:
# smollm2-135m, sdpa, 22.8 ms a step where its bytes need 0.09 ms). The usual reading is that it is **launch-bound**:
# its step is hundreds of small kernels, each launched from Python by the CPU, and the GPU idles between them. A model
# as small as tiny-opt (13 MB in float32) can stay in a CPU's caches between steps, so its bound is only nominal
# there. Section 4 measures where a step's time goes.
#
# ## 4. Closing the gap
#
# The recipes, all on the same model (`decode_model`) at batch 1 and with the same prompt, each timed as in section 2:
#
# * **dynamic cache**: plain `generate`; the cache grows by concatenation each step;
# * **static cache**: `cache_implementation="static"` preallocates the cache for prompt + new tokens, so every step has
#   the same shapes (and attends over the whole preallocated length, masked);
# * **hand loop**: decoding written out in the style of gpt-fast (`labkit.generation.GreedyLoop`): a static cache made
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
if lab.problems[lab.decode_model]:
    lab.skip(f"recipes on {lab.decode_model}", lab.problems[lab.decode_model])
else:
    main, main_tokenizer = loaded.get(lab.decode_model) or models.load_model(lab.decode_model, device=lab.device,
                                                                              dtype=lab.dtype)
    main.set_attn_implementation("sdpa")
    parameters = sum(p.numel() for p in main.parameters())
    ids = generation.random_prompt(main, batch=1, length=16)
    print(f"{lab.decode_model}: {parameters / 1e9:.3f} billion parameters, "
          f"{roofline.weight_bytes_per_token(main) / 1e9:.3f} GB read per step")

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
    cache_bytes = generation.kv_cache_measured(main, context=context)
    ex.compare(cache_bytes / 2**20, "MiB")
    print(f"GQA: {shape['kv_heads']} key/value heads per layer instead of {shape['heads']}, a cache "
          f"{shape['heads'] / shape['kv_heads']:g}x smaller than one key and value per query head would need")
    lab.add(generation.kv_cache_findings(main, cache_bytes, context=context))

# %% [markdown]
# Now the recipes. What to expect: every recipe does the same matrix-vector products, so a recipe can only remove
# what a step spends around them (the bookkeeping of a growing cache, `generate`'s own work per step, and on a GPU
# the launching of each kernel). Where those products take most of a step, no recipe can help much.

# %%
recipes = []
if main is not None:
    def add(label, row):
        recipes.append({"recipe": label, **row, **generation.bandwidth_bound(main, row, bandwidth["bytes_per_s"])})

    def try_recipe(label, call):
        outcome = timing.attempt(call, lab.device)  # a failed compile becomes a skipped recipe, with its reason
        if outcome["status"] == "ok":
            add(label, outcome["value"])
        else:
            lab.skip(label, outcome["reason"])

    n, repeats = lab.new_tokens, lab.repeats
    add("dynamic cache", generation.measure_decode(main, ids, new_tokens=n, repeats=repeats, tokenizer=main_tokenizer))
    add("static cache", generation.measure_decode(main, ids, new_tokens=n, repeats=repeats, tokenizer=main_tokenizer,
                                                  cache_implementation="static", disable_compile=True))
    loop = generation.GreedyLoop(main, batch=1, prompt_tokens=ids.shape[1], new_tokens=n)
    add("hand loop", generation.measure_loop(loop, ids, repeats=repeats))

# %%
if main is not None and lab.compile_step:
    mode = "reduce-overhead" if lab.on_gpu else "default"  # reduce-overhead: the step replays as a CUDA graph
    compiled = generation.GreedyLoop(main, batch=1, prompt_tokens=ids.shape[1], new_tokens=n, compile_mode=mode)
    try_recipe("hand loop, compiled step", lambda: generation.measure_loop(compiled, ids, repeats=repeats))
    if lab.on_gpu:
        try_recipe("static cache + compile", lambda: generation.measure_decode(
            main, ids, new_tokens=n, repeats=repeats, tokenizer=main_tokenizer, cache_implementation="static"))
    else:
        lab.skip("static cache + compile", "generate compiles its step by itself only on an accelerator (cuda, xpu, "
                 "...), not on a CPU")
elif main is not None:
    lab.skip("compiled decode steps", "compilation is off on a CPU by default (the first call compiles, which is "
             "slow there); set compile=True to measure it")

# %% [markdown]
# Where a step's time goes: the matrix-vector products of one step are timed alone (every weight matrix times one
# vector, back to back, nothing else), and each recipe's step is split into those products and the rest.

# %%
if recipes:
    alone = generation.weights_alone(main)
    show(generation.step_budget(recipes, alone), title=f"Decode recipes, {lab.decode_model}, batch 1, {lab.dtype_name}")
    for line in generation.budget_lines(recipes, alone, bandwidth["bytes_per_s"]):
        print(line)
    best = max(recipes, key=lambda r: r["fraction_of_bound"])
    verdict = generation.step_verdict(best["step_ms"], best["bound_step_ms"], lab.device,
                                      products_ms=alone["median_ms"])
    print(f"fastest, {best['recipe']}: {verdict}")
    lab.add(generation.recipe_findings(recipes, alone, dtype=lab.dtype))

# %% [markdown]
# The lines under the table say it from this run's numbers: how much of a step the products take here, and whether
# each recipe changed the step by more than the spread of its own measurements. The products alone are timed eagerly,
# one launch each: on a CPU no recipe can go much below that time; on a GPU a step replayed as a CUDA graph can. A
# recipe that moved by less than the spread did nothing measurable. On a GPU, where a small model's step sits far above
# its bound, the rest is where the compiled step (one CUDA graph launch per step) can make its difference, and the
# table says how much it did.
#
# The last line counts the recipes that generated exactly the same tokens. In float32 they must all agree (this
# notebook checks it). In 16-bit it is a count, not a claim: a compiled step may add up a sum in another order, and
# where two candidate tokens' logits nearly tie, greedy decoding may then pick the other one and continue differently.
#
# ### Batching: throughput against latency
#
# A step reads the weights once whatever the batch, so decoding several sequences together should multiply tokens/s,
# while each sequence's step gets a little slower. The bandwidth bound on the tokens/s of all sequences grows with the
# batch (the KV cache grows too); the compute bound (the matmul ceiling ÷ about 2 FLOPs per weight per token) is the
# same at every batch, since every token costs the same arithmetic, so at some batch it becomes the lower of the two.
# The table shows both (batch 1 is the dynamic-cache recipe above).

# %%
batch_rows = []
if recipes:
    flops = roofline.compute_ceiling(lab.device, lab.dtype, quick=lab.quick)["flops_per_s"]
    batch_rows = generation.batch_sweep(main, main_tokenizer, batch_sizes=lab.batch_sizes, new_tokens=n,
                                        repeats=repeats, prompt_tokens=ids.shape[1], batch1=recipes[0],
                                        bandwidth_bytes_per_s=bandwidth["bytes_per_s"], flops_per_s=flops)
    show(batch_rows, title=f"Decode batch sweep, {lab.decode_model}, dynamic cache")
    lab.add(generation.batch_findings(batch_rows))
    if len(batch_rows) >= 2:
        first_row, last_row = batch_rows[0], batch_rows[-1]
        print(f"batch {last_row['batch']} vs {first_row['batch']}: "
              f"{last_row['tokens/s (all sequences)'] / first_row['tokens/s (all sequences)']:.1f}x the tokens/s, "
              f"each step {last_row['step ms'] / first_row['step ms']:.1f}x as long")

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

# %% tags=["reveals-02.3"]
pad_name = next(iter(fp32_models), None)  # smollm2-135m by default: a real model, so real text
if pad_name is None:
    lab.skip("padding pitfalls", "no model of model_ids could be loaded")
else:
    pad_model, pad_tokenizer = fp32_models[pad_name], loaded[pad_name][1]
    pad_tokenizer.pad_token = pad_tokenizer.pad_token or pad_tokenizer.eos_token
    texts, count = [prompt, "Hi"], 8
    short = pad_tokenizer(texts[1], return_tensors="pt").input_ids.to(lab.device)
    seen = {"alone": generation.generate_exactly(pad_model, short, count, tokenizer=pad_tokenizer)[0, -count:].tolist()}
    with generation.transformers_warnings() as said:
        for side in ("right", "left"):
            pad_tokenizer.padding_side = side
            batch = pad_tokenizer(texts, return_tensors="pt", padding=True).to(lab.device)
            out = generation.generate_exactly(pad_model, batch.input_ids, count, attention_mask=batch.attention_mask,
                                              tokenizer=pad_tokenizer)
            seen[side] = out[1, -count:].tolist()
    show([{"prompt 'Hi'": k, "continuation": pad_tokenizer.decode(v)} for k, v in seen.items()], title="Continuations")
    print(*[f"transformers said: {m}" for m in dict.fromkeys(said) if "padding" in m], sep="\n")
    ex.compare(next((side for side in ("left", "right") if seen[side] == seen["alone"]), "neither side"), "padding")
    lab.add(generation.padding_findings(seen, said))

# %% [markdown]
# A padded batch also carries an attention mask, and a mask is one of the conditions of notebook 01. PyTorch's CUDA
# Flash kernel takes no mask at all (its operator, `aten::_scaled_dot_product_flash_attention`, has `is_causal` but no
# `attn_mask` argument; the CPU one, `_scaled_dot_product_flash_attention_for_cpu`, takes a mask). So on a GPU the
# source page's Flash-only context fails on a padded batch with `No available kernel`; the cell below tries it on your
# device. The fix is to allow a backend that takes masks as well: `sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])`
# enables both, PyTorch tries them in its own fixed order and runs the first that accepts the call (a list is not a
# priority order unless `set_priority=True` is passed); or not to pad (batches of equal lengths).

# %%
if pad_name is not None:
    model = loaded[pad_name][0]  # in the notebook's dtype: on a GPU, Flash takes only 16-bit inputs
    batch = pad_tokenizer([prompt, "Hi"], return_tensors="pt", padding=True).to(lab.device)

    def forward_under(backends):
        with sdpa_kernel(backends), torch.inference_mode():
            return model(**batch)

    flash_only = generation.attempt_with_reasons(lambda: forward_under([SDPBackend.FLASH_ATTENTION]))
    if flash_only["ok"]:
        lab.skip("'No available kernel' with a padded batch", f"the Flash kernel on {lab.device} accepts the padding "
                 "mask, so nothing fails here")
    else:
        print(f"Flash only, padded batch: {flash_only['error']}\nwhy: {'; '.join(flash_only['reasons']) or '-'}")
        both = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        fix = generation.attempt_with_reasons(lambda: forward_under(both))
        print(f"fix, sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION]): {'runs' if fix['ok'] else fix['error']}")
        lab.check("padded_batch_under_flash_only_fails_with_no_available_kernel",
                  "No available kernel" in flash_only["error"])
        lab.check("allowing_efficient_attention_fixes_it", fix["ok"])

# %% [markdown]
# ## 5. The whole story in one figure
#
# Every decode run of this notebook as a fraction of its own bandwidth bound (1.0 = a step takes no longer than reading
# its bytes at the measured copy speed):
# section 3's runs, the recipes, then the batch sweep.

# %%
labels, values = generation.fractions(decode_rows, recipes, batch_rows, lab.decode_model)
if not values:
    lab.skip("decode against the bandwidth bound", "no decode ran: no model of this run could be loaded")
else:
    fig = plots.bars(labels, values, xlabel="fraction of the bandwidth bound", limit=1.0,
                     limit_label="bandwidth bound", title=f"Decode on {lab.device_label}, {lab.dtype_name}")
    lab.figure("fraction_of_bandwidth_bound", fig)
    lab.check("every_decode_run_stays_under_its_bandwidth_bound", max(values) < 1.05,
              f"largest fraction {max(values):.2f}; above 1: a wrong byte count or bandwidth, or weights small "
              "enough to stay in a CPU cache", timing=True)
    print(f"Best: {labels[values.index(max(values))]} at {100 * max(values):.0f}% of its bandwidth bound")
if recipes and lab.on_gpu and parameters >= 1e9:
    best = max(r["fraction_of_bound"] for r in recipes)
    lab.check("best_batch1_recipe_reaches_half_the_bandwidth_bound", best >= 0.5, f"best {100 * best:.0f}%")
else:
    lab.skip("half the bandwidth bound at batch 1", "reaching half the bandwidth bound at batch 1 is expected only on "
             "a GPU with a model of 1B parameters or more")

# %% [markdown]
# ## Your numbers beside the reference runs

# %%
show(lab.beside_references(generation.REFERENCE_METRICS), title="This machine and the reference runs")

# %% [markdown]
# ## What you measured

# %%
lab.finish()
