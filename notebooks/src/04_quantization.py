# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · FP4, NF4 and Int8 weights with bitsandbytes, combined with fast attention
#
# The source page loads OPT with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)` and
# generates under a Flash-only SDPA context. This notebook measures what that buys and what it costs, side by side,
# for each format, on your machine:
#
# 1. **what is stored**: 4-bit FP4 and NF4 (with and without double quantization) and LLM.int8, why embeddings, norms
#    and the KV cache stay 16-bit, the footprint predicted from the model's own tensors, then measured;
# 2. **loading** with `quantization_config=BitsAndBytesConfig(...)`, the compute dtype, and which attention kernel ran
#    under the source page's Flash-only context;
# 3. **quality**: perplexity on a text shipped with the workbook, the KL divergence of next-token distributions
#    against the 16-bit model, and the source page's prompt continued by each;
# 4. **speed**: prefill, and decode tokens/s at batch 1 and 8, against each format's own bandwidth bound;
# 5. **a summary** table and figure.
#
# bitsandbytes runs 4-bit and 8-bit on a CPU too (slowly), so this notebook runs everywhere bitsandbytes imports.

# %% tags=["parameters"]
# Parameters (papermill overrides this cell). A size of 0 or an empty list means: sized for this device.
device = "auto"                                          # auto, cpu, cuda or cuda:N
compute_dtype = "auto"                                   # auto picks bfloat16 where it is native, else float16
model_id = "smollm2-135m"                                # a causal language model with real weights
formats = ["16-bit", "fp4", "nf4", "nf4-double", "int8"] # bitsandbytes formats to compare
prompt = "Hello my dog is cute and"
max_new_tokens = 20
eval_tokens = 0                                          # tokens of the shipped text scored for perplexity
batch_sizes = [1, 8]                                     # decode batch sizes
new_tokens = 0                                           # tokens generated per decode measurement
quick = False                                            # smaller sizes, for tests and CPU-only machines
solutions = False                                        # fill every exercise with its solution (a teacher's run)
results_path = ""                                        # where to write the results JSON (empty: do not write)

# %%
import logging
import re
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from labkit import attention, generation, models, probes, quant, results, roofline, timing, widgets
from labkit.errors import BadParameter, ModelNotAvailable, check_sizes

widgets.short_errors()  # a bad parameter below stops the notebook with one sentence, not a traceback
device = probes.resolve_device(device)
on_gpu = device.startswith("cuda")
if compute_dtype == "auto":
    compute_dtype = "bfloat16" if not on_gpu or probes.native_bf16(device) else "float16"
compute_dtype = probes.resolve_dtype(compute_dtype, device)
probes.check_dtype(device, compute_dtype)
if isinstance(formats, str) or not formats:
    raise BadParameter(f"formats={formats!r}: give a list, for example ['16-bit', 'nf4', 'int8'].")
formats = [quant.check_format(f) for f in dict.fromkeys(["16-bit", *formats])]  # 16-bit is the reference
check_sizes(0, eval_tokens=eval_tokens, new_tokens=new_tokens)
check_sizes(1, max_new_tokens=max_new_tokens, **{f"batch_sizes[{i}]": b for i, b in enumerate(batch_sizes)})
if new_tokens == 1:
    raise BadParameter("new_tokens=1: decoding needs at least 2 new tokens to time a step.")
model_problem = models.check_model(model_id)  # a wrong name stops here
if model_problem:  # every section measures this model: without it there is nothing to do
    raise ModelNotAvailable(model_problem)
eval_tokens = eval_tokens or (4096 if on_gpu else 384 if quick else 512)  # 4096: the whole text (about 2,400 tokens)
new_tokens = new_tokens or (64 if on_gpu else 6 if quick else 8)
batch_sizes = sorted(set(batch_sizes))
repeats = 2 if not on_gpu else 3
dtype_name = str(compute_dtype).removeprefix("torch.")
res = results.Results("04_quantization", results_path)
bnb_probe = probes.bitsandbytes_4bit([device])  # a real 4-bit matrix product on this device, not just an import
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend logs about optional kernels
requested = list(formats)
if not all(r["ok"] for r in bnb_probe):
    res.skip("every bitsandbytes format", f"bitsandbytes cannot run 4-bit on {device}: {bnb_probe[0]['reason']}")
    formats = ["16-bit"]
# why the NF4 cells below may have nothing to do
nf4_missing = ("nf4 is not among the formats of this run" if "nf4" not in requested
               else f"bitsandbytes cannot run 4-bit on {device}" if "nf4" not in formats else "")
print(f"Working on {device} ({probes.device_label(device)}), compute dtype {dtype_name}, "
      f"bitsandbytes {probes.package_version('bitsandbytes') or 'missing'}; formats {formats}")

# %%
widgets.show(results.environment_rows(res.env), ["item", "value"], title="Environment")

# %% [markdown]
# ## 1. What each format stores, predicted then measured
#
# bitsandbytes quantizes the **weight matrices of the linear layers** and nothing else:
#
# * **FP4** and **NF4** store 4 bits per weight, in blocks of 64 weights that share one float32 scale (*absmax*). NF4's
#   16 levels follow a normal distribution, which matches trained weights better than FP4's floating-point levels.
#   **Double quantization** stores the scales themselves in 8 bits.
# * **LLM.int8** stores 8 bits per weight with one float32 scale per row, and runs outlier features in 16-bit.
# * The **embeddings** (and an output layer tied to them), the **layer norms**, the **biases**, and everything computed
#   at run time (activations, the **KV cache**) stay in 16-bit.
#
# So a model shrinks by less than 4x, and the smaller the model, the larger the share of its embeddings. **Predict**:
# labkit counts the model's own tensors for each format. `get_memory_footprint()` counts parameters and buffers, so the
# scales are listed apart. A 1B-parameter model is predicted too, from its shape only (meta device, no memory used).

# %%
reference_model, tokenizer = models.load_model(model_id, device=device, dtype=compute_dtype, attn_implementation="sdpa")
element = roofline.element_size(compute_dtype)
with torch.device("meta"):
    big = models.build_from_config(models.random_config("random-llama-1b", len(tokenizer), {
        "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}),
        dtype=compute_dtype)
predicted, predicted_big = {}, {}
for name in quant.FORMATS:
    predicted[name] = quant.predict_footprint(reference_model, name, sixteen_bit_bytes=element)
    predicted_big[name] = quant.predict_footprint(big, name, sixteen_bit_bytes=element)
widgets.show([{"format": name, f"{model_id} stored MiB": predicted[name]["stored"] / 2**20,
               "+ scales MiB": predicted[name]["constants"] / 2**20,
               "x smaller": predicted["16-bit"]["stored"] / predicted[name]["stored"],
               "1B model stored GiB": predicted_big[name]["stored"] / 2**30,
               "1B x smaller": predicted_big["16-bit"]["stored"] / predicted_big[name]["stored"]}
              for name in quant.FORMATS], title="Predicted footprints")
embedding = reference_model.get_input_embeddings().weight
print(f"{model_id}: the embeddings are {embedding.numel() / sum(p.numel() for p in reference_model.parameters()):.0%} "
      f"of its parameters; random-llama-1b's are {big.get_input_embeddings().weight.numel() / sum(p.numel() for p in big.parameters()):.0%}")
res.metric("predicted_1b_nf4_times_smaller", predicted_big["16-bit"]["stored"] / predicted_big["nf4"]["stored"])
del big

# %% [markdown]
# Now every format is measured in turn: the 16-bit reference stays loaded, and each quantized model is loaded,
# measured and freed. For each: the footprint, and everything sections 2 to 4 need (perplexity, KL divergence, the
# continuation, prefill and decode timings), so that each model is loaded once. On a GPU, the memory a format adds
# while generating is measured above what was already allocated.

# %%
text_ids = tokenizer(quant.sample_text(), return_tensors="pt").input_ids[:, :eval_tokens]
reference_logits = quant.next_token_logits(reference_model, text_ids)
prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
bandwidth = roofline.bandwidth_ceiling(device)
print(f"{text_ids.shape[1]} tokens of the shipped text; memory bandwidth {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s ({bandwidth['source']})")
rows, decode_rows = [], []
board = widgets.LiveBoard(["format", "footprint MiB", "perplexity", "KL vs 16-bit", "prefill ms", "batch-1 tokens/s"],
                          title=f"{model_id}, compute dtype {dtype_name}", total=len(formats))
for name in formats:
    if on_gpu:
        before = torch.cuda.memory_allocated(device)
    model = reference_model if name == "16-bit" else models.load_model(
        model_id, device=device, dtype=compute_dtype, attn_implementation="sdpa",
        quantization_config=quant.quantization_config(name, compute_dtype))[0]
    row = {"format": name, "footprint": model.get_memory_footprint()}
    if on_gpu:
        if name == "16-bit":
            before = 0  # the reference was loaded before this loop: count all of it
        torch.cuda.reset_peak_memory_stats(device)
    continuation = generation.generate_exactly(model, prompt_ids, max_new_tokens, tokenizer=tokenizer)[0, prompt_ids.shape[1]:]
    row["continuation"] = tokenizer.decode(continuation, skip_special_tokens=True)
    if on_gpu:
        row["peak_generate_bytes"] = torch.cuda.max_memory_allocated(device) - before
    row.update(quant.perplexity(model, text_ids))
    row["kl"] = 0.0 if name == "16-bit" else quant.kl_divergence(reference_logits, quant.next_token_logits(model, text_ids))
    row["prefill_ms"] = generation.measure_prefill(model, generation.random_prompt(model, batch=1, length=128),
                                                   repeats=repeats)["median_ms"]
    for b in batch_sizes:
        ids = generation.random_prompt(model, batch=b, length=16, seed=b)
        decode = generation.measure_decode(model, ids, new_tokens=new_tokens, repeats=repeats, tokenizer=tokenizer)
        # the quantization scales are read at every step too
        bound = generation.bandwidth_bound(model, decode, bandwidth["bytes_per_s"],
                                           extra_bytes=predicted[name]["constants"])["bound_tokens_per_s"]
        decode_rows.append({"format": name, "batch": b, "tokens/s": decode["tokens_per_s"], "bound tokens/s": bound,
                            "fraction of bound": decode["tokens_per_s"] / bound, "step ms": decode["step_ms"]})
    row["batch1_tokens_per_s"] = next(r["tokens/s"] for r in decode_rows if r["format"] == name and r["batch"] == batch_sizes[0])
    rows.append(row)
    board.add({"format": name, "footprint MiB": row["footprint"] / 2**20, "perplexity": row["perplexity"],
               "KL vs 16-bit": row["kl"], "prefill ms": row["prefill_ms"], "batch-1 tokens/s": row["batch1_tokens_per_s"]})
    if model is not reference_model:
        del model
        timing.free_memory(device)  # bitsandbytes' parameters hold reference cycles: collect them now
board.finish()

# %%
measured = {r["format"]: r["footprint"] for r in rows}
widgets.show([{"format": name, "predicted MiB": predicted[name]["stored"] / 2**20, "measured MiB": measured[name] / 2**20,
               "x smaller than 16-bit": measured["16-bit"] / measured[name],
               "x smaller, scales included": measured["16-bit"] / (measured[name] + predicted[name]["constants"]),
               **({"added while generating MiB": next(r["peak_generate_bytes"] for r in rows if r["format"] == name) / 2**20} if on_gpu else {})}
              for name in measured], title="Footprint: predicted and measured")
for name, size in measured.items():
    res.metric(f"footprint_{name.replace('-', '_')}_mib", size / 2**20)
res.check("prediction_matches_measured_footprint",
          all(abs(measured[n] - predicted[n]["stored"]) <= 0.01 * measured[n] for n in measured))
four_bit = [measured[n] for n in measured if n in ("fp4", "nf4", "nf4-double")]
if "int8" in measured and four_bit:
    res.check("footprint_ordering_16bit_int8_4bit", measured["16-bit"] > measured["int8"] > max(four_bit))

# %% [markdown]
# ## 2. Loading, the compute dtype, and which attention kernel ran
#
# The source page passed `load_in_4bit=True` straight to `from_pretrained`. In transformers 5 that keyword is gone:
# everything goes through `quantization_config=BitsAndBytesConfig(...)`. The old call, on purpose:

# %% tags=["old-api-on-purpose"]
from transformers import AutoModelForCausalLM

try:
    folder = str(models.smollm2_folder())
    try:
        AutoModelForCausalLM.from_pretrained(folder, load_in_4bit=True)  # the old keyword, on purpose
        old_keyword = "(it loaded)"
    except (TypeError, ValueError) as err:
        old_keyword = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    print(old_keyword)
    res.check("load_in_4bit_keyword_is_gone", "load_in_4bit" in old_keyword and "loaded" not in old_keyword)
except models.ModelNotAvailable as err:
    res.skip("the load_in_4bit demonstration", str(err))
print(repr(quant.quantization_config("nf4", compute_dtype)).splitlines()[0], "...")

# %% [markdown]
# `bnb_4bit_compute_dtype` is the dtype a 4-bit weight is dequantized to for each matrix product inside a quantized
# layer (its default is float32). What comes out of the layer, and so what attention and the KV cache see, is what the
# table below shows in its activations column: compare it with the `dtype=` the rest of the model was loaded in. Notebook
# 01's rules apply to that dtype. The source page's Flash-only context, around one forward pass of the NF4 model, with
# the compute dtype of this run and with float32, the profiler watching:

# %%
if "nf4" in formats:
    batch = tokenizer([prompt], return_tensors="pt").to(device)
    compute_rows = []
    for dtype_choice in dict.fromkeys([compute_dtype, torch.float32]):
        nf4_model = models.load_model(model_id, device=device, dtype=compute_dtype, attn_implementation="sdpa",
                                      quantization_config=quant.quantization_config("nf4", dtype_choice))[0]

        def flash_only():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.inference_mode():
                return nf4_model(**batch)

        row = {"compute dtype": str(dtype_choice).removeprefix("torch.")}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                seen = attention.ops_that_ran(flash_only, device)
                row.update({"Flash only": f"ran {seen.backend}", "activations": str(flash_only().logits.dtype),
                            "forward ms": timing.measure(flash_only, device=device, warmup=1, repeats=3).median_ms})
            except RuntimeError as err:
                reasons = probes.refusal_reasons([str(w.message) for w in caught])
                row.update({"Flash only": f"refused: {'; '.join(reasons) or str(err).splitlines()[0]}"})
        compute_rows.append(row)
        del nf4_model
        timing.free_memory(device)
    widgets.show(compute_rows, title="NF4 under the source page's Flash-only context")
    res.check("nf4_in_the_compute_dtype_runs_flash_attention", compute_rows[0]["Flash only"] == "ran FLASH_ATTENTION")
else:
    res.skip("Flash-only context on the NF4 model", nf4_missing)

# %% [markdown]
# ## 3. Quality: perplexity, KL divergence, and the generated text
#
# Perplexity is exp(mean negative log-likelihood) of each token of a text given the ones before it: lower is better.
# The text is shipped with the workbook (written for it, so no model has memorised it). The KL divergence measures how
# far each format's next-token distributions moved from the 16-bit model's, position by position. Be aware that the
# embedded SmolLM2's weights went through a 4-bit GGUF format once already (notebook 00), so its "16-bit" reference
# is itself a dequantized model.

# %%
widgets.show([{"format": r["format"], "perplexity": r["perplexity"], "change": r["perplexity"] / rows[0]["perplexity"] - 1,
               "KL vs 16-bit (nats)": r["kl"], "continuation": r["continuation"][:70]} for r in rows],
             title=f"Quality on {rows[0]['tokens']} tokens; prompt {prompt!r}")
for r in rows:
    key = r["format"].replace("-", "_")
    res.metric(f"perplexity_{key}", r["perplexity"])
    res.metric(f"kl_vs_16bit_{key}", r["kl"])
res.check("perplexities_finite", all(r["perplexity"] == r["perplexity"] and r["perplexity"] < float("inf") for r in rows))
res.check("continuations_are_text", all(re.search(r"[A-Za-z]{2}", r["continuation"]) for r in rows))
kl = {r["format"]: r["kl"] for r in rows}
if "nf4" in kl and "fp4" in kl:
    print(f"NF4 moved the next-token distributions {kl['nf4']:.3f} nats from 16-bit, FP4 {kl['fp4']:.3f}: "
          f"{'NF4' if kl['nf4'] < kl['fp4'] else 'FP4'} kept closer to the 16-bit model on this text")

# %% [markdown]
# ## 4. Speed against each format's own limit
#
# A decode step reads every weight once, so fewer bytes should mean a faster step: the bound of notebook 02,
# `batch × bandwidth ÷ bytes per step`, is higher for 4-bit. But a 4-bit weight must be **dequantized** before it is
# multiplied, which is extra work on every step, and 8-bit matrix products handle outliers separately. The table shows
# how close each format comes to its own bound, at each batch size, and the lines under it compare each format's gain
# with the gain its bound promised. First, which bitsandbytes kernels one decode step of the NF4 model runs, at batch 1
# and at batch 8 (bitsandbytes picks its kernel by the shape of the input):

# %%
if "nf4" in formats:
    nf4_model = models.load_model(model_id, device=device, dtype=compute_dtype, attn_implementation="sdpa",
                                  quantization_config=quant.quantization_config("nf4", compute_dtype))[0]
    kernel_rows = []
    for b in sorted({1, 8}):
        step_ids = generation.random_prompt(nf4_model, batch=b, length=1)
        with torch.inference_mode():
            seen = attention.ops_that_ran(lambda: nf4_model(input_ids=step_ids), device)
        kernel_rows.append({"batch": b, "bitsandbytes ops": ", ".join(sorted({o for o in seen.ops if o.startswith("bitsandbytes::")}))})
    widgets.show(kernel_rows, title="bitsandbytes ops in one NF4 decode step")
    del nf4_model
    timing.free_memory(device)
else:
    res.skip("bitsandbytes ops of an NF4 decode step", nf4_missing)
widgets.show(decode_rows, title=f"Decode, {new_tokens} new tokens after 16 prompt tokens")
widgets.show([{"format": r["format"], "prefill ms (128 tokens)": r["prefill_ms"]} for r in rows], title="Prefill")
for r in decode_rows:
    key = f"{r['format'].replace('-', '_')}_batch{r['batch']}"
    res.metric(f"decode_{key}_tokens_per_s", r["tokens/s"])
    res.metric(f"decode_{key}_fraction_of_bound", r["fraction of bound"])
for r in rows:
    res.metric(f"prefill_{r['format'].replace('-', '_')}_ms", r["prefill_ms"])
first = {r["format"]: r for r in decode_rows if r["batch"] == batch_sizes[0]}
for name, r in first.items():
    if name != "16-bit":
        print(f"{name}: {r['tokens/s'] / first['16-bit']['tokens/s']:.2f}x the 16-bit tokens/s at batch {batch_sizes[0]}, "
              f"while its bound is {r['bound tokens/s'] / first['16-bit']['bound tokens/s']:.2f}x higher")
print(f"largest fraction of a bound: {max(r['fraction of bound'] for r in decode_rows):.2f}")

# %% [markdown]
# ## 5. Summary

# %%
summary = []
for r in rows:
    d = first[r["format"]]
    summary.append({"format": r["format"], "MiB": r["footprint"] / 2**20, "x smaller": rows[0]["footprint"] / r["footprint"],
                    f"tokens/s (batch {batch_sizes[0]})": d["tokens/s"], "fraction of bound": d["fraction of bound"],
                    "perplexity change": r["perplexity"] / rows[0]["perplexity"] - 1})
widgets.show(summary, title=f"{model_id} on {probes.device_label(device)}, compute dtype {dtype_name}")
import matplotlib.pyplot as plt

fig, (ax_size, ax_speed, ax_quality) = plt.subplots(1, 3, figsize=(13, 3.4))
names = [s["format"] for s in summary]
ax_size.barh(names, [s["MiB"] for s in summary])
ax_size.set_xlabel("footprint (MiB)")
ax_speed.barh(names, [s["fraction of bound"] for s in summary])
ax_speed.axvline(1.0, color="k", linestyle="--", linewidth=1)
ax_speed.set_xlabel(f"fraction of the bandwidth bound (batch {batch_sizes[0]})")
ax_quality.barh(names, [100 * s["perplexity change"] for s in summary])
ax_quality.set_xlabel("perplexity change vs 16-bit (%)")
for ax in (ax_size, ax_speed, ax_quality):
    ax.invert_yaxis()
fig.suptitle(f"{model_id}: size, speed and quality per format")
fig.tight_layout()
saved = res.figure("summary", fig)

# %% [markdown]
# ## Your numbers beside the reference runs

# %%
reference = results.reference_runs("04_quantization")
keys = sorted(k for k in res.metrics if k.startswith(("footprint_", "perplexity_")))
widgets.show([{"metric": k, "this machine": res.metrics[k], **{n: run["metrics"].get(k) for n, run in reference.items()}}
              for k in keys], title="This machine and the reference runs")
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
# **04.1 · Predict.** A 4096 × 4096 linear layer stored in NF4 with blocks of 64 weights and a float32 scale per block (no double quantization): how many MiB?

# %%
from labkit import exercises

verdicts = []
ex = exercises.get("04.1")
given = {"rows": 4096, "cols": 4096, "blocksize": 64}
answer = None  # your prediction, in MiB
if solutions:  # a workshop run fills in the solution
    answer = ex.solved(**given)
verdicts.append(ex.check(answer, record=not solutions, **given))

# %% [markdown]
# **04.2 · Code.** Write the `BitsAndBytesConfig` for NF4 weights with double quantization and matrix products in bfloat16 (what `from_pretrained(..., quantization_config=my_config)` takes).

# %%
from transformers import BitsAndBytesConfig

ex = exercises.get("04.2")
given = {}
my_config = None  # your config
answer = my_config
if solutions:  # a workshop run fills in the solution
    answer = ex.solved(**given)
verdicts.append(ex.check(answer, record=not solutions, **given))

# %% [markdown]
# **04.3 · Predict, then compare.** Of the formats measured above, which moved the next-token distributions least from 16-bit (the smallest KL divergence)?

# %%
ex = exercises.get("04.3")
given = {"kl": {r["format"]: r["kl"] for r in rows if r["format"] != "16-bit"}}
print("formats:", list(given["kl"]))
answer = None  # a format name
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
