# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · The encoder fastpath: nested tensors, and a modern BetterTransformer for BERT-family encoders
#
# The source page says BetterTransformer sent encoder layers to an equivalent of `torch.nn.TransformerEncoderLayer`'s
# *fastpath*, which skips padding with nested tensors. The converter is gone from today's libraries, and transformers'
# BERT uses SDPA but neither fuses the layer nor skips padding. This notebook shows, on your machine:
#
# 1. **the fastpath itself**: its conditions, how to *prove* it ran (profiler op names, exact zeros at padded
#    positions), and the cases that silently fall back, with the reason;
# 2. **`labkit.fastpath.to_fastpath(model)`**: BetterTransformer's encoder conversion rebuilt, checked against the
#    transformers model on padded batches;
# 3. **real use**: sentence embeddings with the embedded MiniLM, identical similarities, and the speed of each;
# 4. **the sweep**: padding fraction × batch × length, transformers eager and sdpa against the fastpath, in real
#    (non-padding) tokens per second: where the fastpath wins and where it loses;
# 5. **where PyTorch is going**: nested *jagged* tensors straight into SDPA.
#
# Nothing here downloads anything.

# %% tags=["parameters"]
# Parameters (papermill overrides this cell). A size of 0 or an empty list means: sized for this device.
device = "auto"                                  # auto, cpu, cuda or cuda:N
dtype = "auto"                                   # auto picks float16 on a GPU, float32 on CPU
model_id = "minilm-l6"                           # a BERT-family encoder for sections 2 and 3
sweep_model = "auto"                             # encoder of the sweep; auto means minilm-l6 on CPU, random-bert-base on GPU
padding_fractions = [0.0, 0.25, 0.5, 0.75]       # share of padded positions in a batch
batch_sizes = []                                 # batch sizes of the sweep
lengths = []                                     # padded sequence lengths of the sweep
quick = False                                    # smaller sizes, for tests and CPU-only machines
solutions = False                                # fill every exercise with its solution (a teacher's run)
results_path = ""                                # where to write the results JSON (empty: do not write)

# %%
import warnings

import torch
import torch.nn.functional as F

from labkit import attention, fastpath, models, plots, probes, results, timing, widgets
from labkit.errors import BadParameter, check_sizes

widgets.short_errors()  # a bad parameter below stops the notebook with one sentence, not a traceback
device = probes.resolve_device(device)
on_gpu = device.startswith("cuda")
dtype = probes.resolve_dtype("float16" if dtype == "auto" and on_gpu else dtype, device)
probes.check_dtype(device, dtype)
bad = [p for p in padding_fractions if not 0 <= p < 1]
if not padding_fractions or bad:
    raise BadParameter(f"padding_fractions={padding_fractions!r}: give fractions in [0, 1), for example [0.0, 0.5, 0.75].")
check_sizes(1, **{f"batch_sizes[{i}]": b for i, b in enumerate(batch_sizes)}, **{f"lengths[{i}]": n for i, n in enumerate(lengths)})
sweep_model = sweep_model if sweep_model != "auto" else ("random-bert-base" if on_gpu else "minilm-l6")
if on_gpu:
    sizes = {"batch_sizes": [16, 64] if quick else [16, 64, 128], "lengths": [128, 256] if quick else [128, 256, 512]}
else:
    sizes = {"batch_sizes": [8] if quick else [4, 8], "lengths": [128]}
batch_sizes = sorted(set(batch_sizes or sizes["batch_sizes"]))
lengths = sorted(set(lengths or sizes["lengths"]))
padding_fractions = sorted(set(padding_fractions))
problems = {name: models.check_model(name) for name in (model_id, sweep_model)}  # a wrong name stops here
repeats = 5
res = results.Results("03_encoder_fastpath", results_path)
dtype_name = str(dtype).removeprefix("torch.")
tolerance = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}[dtype_name]  # relative error, and similarities
warnings.filterwarnings("once", message="The PyTorch API of nested tensors")
print(f"Working on {device} ({probes.device_label(device)}) in {dtype_name}; sweep on {sweep_model}: "
      f"batches {batch_sizes}, lengths {lengths}, padding {padding_fractions}")

# %%
widgets.show(results.environment_rows(res.env), ["item", "value"], title="Environment")

# %% [markdown]
# ## 1. The fastpath, and how to prove it ran
#
# `nn.TransformerEncoder` has two shortcuts in inference. When its conditions hold, **each layer runs as one fused op**
# (`aten::_transformer_encoder_layer_fwd`), and when a key padding mask is given too, **the batch is first packed
# into a nested tensor** (`aten::_nested_tensor_from_mask`): the padding is dropped, so no work is spent on it, and
# the output comes back with exact zeros where the padding was.
#
# The conditions: eval mode; no gradients (`torch.inference_mode()`); `batch_first=True`; a relu or gelu activation; an
# even number of heads; equal layer-norm epsilons; no autocast; and for the nested tensor, a key padding mask with the
# padding on the **right** of each sequence. PyTorch checks them silently: when one fails it takes the slow path and
# says nothing. `labkit.fastpath.why_not_fastpath` names the failing condition, and the profiler proves what ran.

# %%
torch.manual_seed(0)
layer = torch.nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True)
encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).to(device, dtype).eval()
src = torch.randn(4, 48, 128, device=device, dtype=dtype)
real_tokens = torch.tensor([48, 30, 17, 5], device=device)
right_padding = torch.arange(48, device=device)[None, :] >= real_tokens[:, None]  # True marks padding
left_padding = right_padding.flip(1)

def attempt(label, mask=right_padding, training=False, grad=False):
    encoder.train(training)
    context = torch.enable_grad() if grad else torch.inference_mode()
    try:
        with context, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reason = fastpath.why_not_fastpath(encoder, src, mask)
            seen = attention.ops_that_ran(lambda: encoder(src, src_key_padding_mask=mask), device)
            out = encoder(src, src_key_padding_mask=mask)
    finally:
        encoder.eval()
    said = sorted({w.category.__name__ for w in caught})
    zeros = bool((out[right_padding] == 0).all()) if mask is right_padding else None
    return {"case": label, "why not (labkit)": reason or "-", "fused layer op": fastpath.fastpath_ran(seen.ops),
            "padding skipped (nested tensor)": fastpath.padding_skipped(seen.ops), "exact zeros at padding": zeros,
            "warnings": ", ".join(said) or "none"}

cases = [attempt("eval, inference mode, right padding"), attempt("training mode", training=True),
         attempt("left padding", mask=left_padding), attempt("no padding mask", mask=None),
         attempt("gradients enabled", grad=True)]
widgets.show(cases, title="nn.TransformerEncoder: what ran, from the profiler")
res.check("fastpath_proven_by_profiler_and_zeros", cases[0]["fused layer op"] and cases[0]["padding skipped (nested tensor)"]
          and cases[0]["exact zeros at padding"])
res.check("labkit_names_every_fallback", all((c["why not (labkit)"] == "-") == c["padding skipped (nested tensor)"] for c in cases),
          "a reason is given exactly when the profiler shows no nested tensor")
print(f"warnings raised by the {len(cases) - 1} fallback cases: {[c['warnings'] for c in cases[1:]]}")

# %% [markdown]
# Read the table: only the first case skips the padding. Left padding and a missing mask still fuse each layer but
# compute on every padded position; training mode and gradients turn the fused layer off as well. None of them raises,
# and the line above lists what they warned (the warnings column: only the nested-tensor path itself says anything,
# about its prototype status): without the profiler you would not know.
#
# ## 2. `to_fastpath`: BetterTransformer's encoder conversion, rebuilt
#
# `labkit.fastpath.to_fastpath(model)` takes a transformers BERT-family encoder and returns a module whose layers are
# `nn.TransformerEncoderLayer`s with the original weights copied in (query, key and value stacked into one input
# projection; BERT's post-norm order is the layer's `norm_first=False`). The embeddings are reused as they are. Its
# output is compared with the transformers model in eager mode on a padded batch, at the real (non-padded) positions. The
# original BetterTransformer conversion still runs in the legacy notebook
# [legacy/bettertransformer.ipynb](legacy/bettertransformer.ipynb) (transformers 4.48 and optimum 1.27, in a kernel of
# its own), which times it beside this converter on the same batches; `make compare-legacy` puts both in one report.

# %%
if problems[model_id]:
    res.skip(f"to_fastpath on {model_id}", problems[model_id])
    fast = None
else:
    model, tokenizer = models.load_model(model_id, device=device, dtype=dtype, attn_implementation="eager")
    fast = fastpath.to_fastpath(model)
    batch = fastpath.padded_batch(tokenizer, batch=8, length=64, padding_fraction=0.5, device=device)
    with torch.inference_mode():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = fast(batch["input_ids"], batch["attention_mask"]).last_hidden_state
        seen = attention.ops_that_ran(lambda: fast(batch["input_ids"], batch["attention_mask"]), device)
        seen_hf = attention.ops_that_ran(lambda: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), device)
    real = batch["attention_mask"].bool()
    difference = float((got[real].float() - expected[real].float()).abs().max())
    relative = attention.relative_error(got[real], expected[real])
    print(f"{model_id} ({fast.source}), {100 * batch['padding_fraction']:.0f}% padding: relative error {relative:.2e} "
          f"(tolerance for {dtype_name}: {tolerance:.0e}), max abs difference {difference:.2e}")
    widgets.show([{"model": "transformers (eager)", "fused layer op": fastpath.fastpath_ran(seen_hf.ops),
                   "padding skipped": fastpath.padding_skipped(seen_hf.ops)},
                  {"model": "to_fastpath", "fused layer op": fastpath.fastpath_ran(seen.ops),
                   "padding skipped": fastpath.padding_skipped(seen.ops)}], title="What the profiler saw")
    res.metric("to_fastpath_max_abs_difference", difference)
    res.metric("to_fastpath_relative_error", relative)
    res.check("to_fastpath_matches_transformers", relative <= tolerance, f"{relative:.2e}")
    res.check("to_fastpath_skips_padding", fastpath.padding_skipped(seen.ops) and bool((got[~real] == 0).all()))
    res.check("transformers_bert_neither_fuses_nor_skips_padding",
              not fastpath.fastpath_ran(seen_hf.ops) and not fastpath.padding_skipped(seen_hf.ops))

# %% [markdown]
# A model the converter cannot carry over exactly gets one sentence naming what is unsupported, not a wrong answer:

# %%
unsupported_problem = models.check_model("tiny-llama")  # random weights, but the tokenizer comes from smollm2-135m
if unsupported_problem:
    res.skip("to_fastpath on a Llama model", unsupported_problem)
else:
    llama, _ = models.load_model("tiny-llama", device=device)
    try:
        fastpath.to_fastpath(llama)
        refused = ""
    except fastpath.UnsupportedModel as err:
        refused = str(err)
    print(refused or "(converted)")
    res.check("unsupported_model_gets_a_clear_error", "llama" in refused)
    del llama

# %% [markdown]
# ## 3. Real use: sentence embeddings
#
# The embedded MiniLM is a sentence encoder: the mean of its token vectors is an embedding, and the cosine similarity
# of two embeddings says how close two sentences are. Sentences of very different lengths make a batch with much
# padding (its share is printed below), which is where skipping it should pay. The similarities must be the same from
# both models.

# %%
sentences = [
    "A dog.",
    "The cat sleeps.",
    "My dog is cute and loves to play fetch in the park every morning before breakfast.",
    "Flash Attention computes exact attention without ever holding the full matrix of scores in memory.",
    "Rain.",
    "Nested tensors let a batch of sequences of different lengths be stored without padding, so no work is wasted on it.",
    "GPUs are fast.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch, drinking his morning coffee.",
]
if fast is not None:
    model.set_attn_implementation("sdpa")
    tokenizer.padding_side = "right"
    inputs = tokenizer(sentences, padding=True, return_tensors="pt").to(device)
    padding_share = 1 - inputs["attention_mask"].float().mean().item()

    def embed_transformers():
        with torch.inference_mode():
            return fastpath.masked_mean(model(**inputs).last_hidden_state, inputs["attention_mask"])

    def embed_fastpath():
        with torch.inference_mode():
            return fastpath.masked_mean(fast(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state,
                                        inputs["attention_mask"])

    similarities = {}
    for label, embed in (("transformers sdpa", embed_transformers), ("fastpath", embed_fastpath)):
        vectors = F.normalize(embed().float(), dim=-1)
        similarities[label] = vectors @ vectors.T
    gap = float((similarities["fastpath"] - similarities["transformers sdpa"]).abs().max())
    speed = {label: timing.measure(embed, device=device, warmup=1, repeats=repeats)
             for label, embed in (("transformers sdpa", embed_transformers), ("fastpath", embed_fastpath))}
    closest = similarities["fastpath"].fill_diagonal_(-1).argmax(1).tolist()
    widgets.show([{"sentence": s[:60], "closest other sentence": sentences[j][:60]} for s, j in zip(sentences, closest)],
                 title="Nearest neighbour by embedding")
    widgets.show([{"model": label, "median ms": t.median_ms, "sentences/s": len(sentences) / (t.median_ms / 1e3)}
                  for label, t in speed.items()], title=f"{len(sentences)} sentences, {100 * padding_share:.0f}% padding")
    print(f"largest difference between the two similarity matrices: {gap:.2e}")
    res.metric("embedding_similarity_max_difference", gap)
    res.metric("embedding_fastpath_speedup", speed["transformers sdpa"].median_ms / speed["fastpath"].median_ms)
    res.check("similarities_identical", gap <= tolerance, f"{gap:.2e}")

# %% [markdown]
# ## 4. The sweep: when does skipping padding pay?
#
# For each padding fraction × batch × length: transformers eager, transformers sdpa and the fastpath, median time and
# **real tokens per second** (padding does not count: it is work nobody asked for). What to expect: with no padding the
# fastpath has nothing to skip and pays for packing the batch, so it can be slower; as the padding grows, the
# transformers model keeps computing on padded positions while the fastpath does not.
#
# Before the sweep, one more measurement: the fastpath on a single sequence of 8 tokens. That call does almost no
# work, so its time is the **floor**: the cost of issuing the model's kernels, which no amount of skipped padding can
# remove. Where a batch takes not much more than the floor (on a fast GPU, small batches do), padding barely changes
# the time, for any implementation.

# %%
sweep_rows = []
if problems[sweep_model]:
    res.skip(f"the sweep on {sweep_model}", problems[sweep_model])
else:
    sweeping, sweep_tokenizer = models.load_model(sweep_model, device=device, dtype=dtype, attn_implementation="eager")
    sweep_fast = fastpath.to_fastpath(sweeping)
    total = len(padding_fractions) * len(batch_sizes) * len(lengths) * 3
    board = widgets.LiveBoard(["implementation", "batch", "length", "padding", "median_ms", "real tokens/s", "status"],
                              title=f"{sweep_model}, {dtype_name}", total=total)

    def run_hf(batch):
        with torch.inference_mode():
            return sweeping(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def run_fast(batch):
        with torch.inference_mode():
            return sweep_fast(batch["input_ids"], batch["attention_mask"])

    tiny = fastpath.padded_batch(sweep_tokenizer, batch=1, length=8, padding_fraction=0.0, device=device)
    floor = timing.measure(lambda: run_fast(tiny), device=device, warmup=2, repeats=repeats)
    print(f"The floor: the fastpath on 1 sequence of 8 tokens takes {floor.p10_ms:.2f} ms (fastest 10% of {repeats} calls)")
    res.metric("fastpath_floor_ms", floor.p10_ms)
    for b in batch_sizes:
        for n in lengths:
            for p in padding_fractions:
                batch = fastpath.padded_batch(sweep_tokenizer, batch=b, length=n, padding_fraction=p, device=device)
                real = int(batch["attention_mask"].sum())
                for label in ("transformers eager", "transformers sdpa", "fastpath"):
                    if label != "fastpath":
                        sweeping.set_attn_implementation(label.split()[1])
                    call = (lambda: run_fast(batch)) if label == "fastpath" else (lambda: run_hf(batch))
                    row = {"implementation": label, "batch": b, "length": n, "padding": round(batch["padding_fraction"], 3)}
                    try:
                        t = timing.measure(call, device=device, warmup=1, repeats=repeats)
                        row.update(median_ms=t.median_ms, p10_ms=t.p10_ms, **{"real tokens/s": real / (t.median_ms / 1e3)},
                                   status="ok")
                    except Exception as err:
                        if not timing.is_out_of_memory(err):
                            raise
                        row.update(status="oom")
                    finally:
                        timing.free_memory(device)
                    sweep_rows.append(row)
                    board.add(row)
    board.finish()

# %%
if sweep_rows:
    ok = [r for r in sweep_rows if r["status"] == "ok"]
    data = {}
    for b in batch_sizes:
        for n in lengths:
            panel = {}
            for label in ("transformers eager", "transformers sdpa", "fastpath"):
                points = sorted((r["padding"], r["real tokens/s"]) for r in ok
                                if r["implementation"] == label and r["batch"] == b and r["length"] == n)
                if points:
                    panel[label] = ([x for x, _ in points], [y for _, y in points])
            data[f"batch {b}, length {n}"] = panel
    fig = plots.panels(data, xlabel="padding fraction", ylabel="real tokens/s",
                       title=f"{sweep_model} on {probes.device_label(device)}, {dtype_name}")
    res.figure("real_tokens_per_s_vs_padding", fig)
    speedups = []
    for r in ok:
        res.metric(results.metric_name("sweep", r["implementation"], f"b{r['batch']}", f"n{r['length']}",
                              f"pad{round(100 * r['padding'])}", "ms"), r["median_ms"])
        if r["implementation"] == "fastpath":
            sdpa = next((x for x in ok if x["implementation"] == "transformers sdpa" and x["batch"] == r["batch"]
                         and x["length"] == r["length"] and x["padding"] == r["padding"]), None)
            if sdpa:
                ratio = sdpa["median_ms"] / r["median_ms"]
                speedups.append({"batch": r["batch"], "length": r["length"], "padding": r["padding"], "fastpath vs sdpa": ratio,
                                 "fastest 10% ratio": sdpa["p10_ms"] / r["p10_ms"]})
                res.metric(results.metric_name("speedup_fastpath_vs_sdpa", f"b{r['batch']}", f"n{r['length']}",
                                      f"pad{round(100 * r['padding'])}"), ratio)
    widgets.show(speedups, title="Speed-up of the fastpath over transformers sdpa (above 1: the fastpath is faster)")
    for s in speedups:
        if s["padding"] == 0:
            print(f"batch {s['batch']}, length {s['length']}, no padding: the fastpath is "
                  f"{'faster' if s['fastpath vs sdpa'] > 1 else 'slower'} ({s['fastpath vs sdpa']:.2f}x)")
    most = max(padding_fractions)
    # The fastpath's own time should fall as padding grows (less real work); transformers' should not. That holds
    # only where the work outweighs the floor, so it is checked where the work is largest: the longest batch.
    # Compared on the fastest 10% of the calls: a busy machine slows some calls, rarely all of them.
    if most >= 0.5 and 0 in padding_fractions:
        def p10(label, b, n, fraction):
            return next((r["p10_ms"] for r in ok if r["implementation"] == label and r["batch"] == b
                         and r["length"] == n and abs(r["padding"] - fraction) < 0.05), None)

        for b in batch_sizes:
            for n in lengths:
                fast_0, fast_most = p10("fastpath", b, n, 0), p10("fastpath", b, n, most)
                hf_0, hf_most = p10("transformers sdpa", b, n, 0), p10("transformers sdpa", b, n, most)
                if fast_0 and fast_most and hf_0 and hf_most:
                    print(f"batch {b}, length {n}: no padding takes {fast_0 / floor.p10_ms:.1f}x the floor; from no padding "
                          f"to {most:.0%}, the fastpath's time x{fast_most / fast_0:.2f}, transformers sdpa's x{hf_most / hf_0:.2f}")
                    if fast_0 >= 2 * floor.p10_ms and fast_most >= fast_0:
                        print("    unexpected: the work outweighs the floor here, yet skipping padding did not shorten the time")
        b, n = max(batch_sizes), max(lengths)
        fast_0, fast_most = p10("fastpath", b, n, 0), p10("fastpath", b, n, most)
        if not (fast_0 and fast_most):
            res.skip("fastpath_time_falls_with_padding", f"batch {b} x length {n} did not run at 0 and {most:.0%} padding")
        elif fast_0 < 2 * floor.p10_ms:
            res.skip("fastpath_time_falls_with_padding",
                     f"even batch {b} x length {n} takes only {fast_0 / floor.p10_ms:.1f}x the floor ({fast_0:.2f} vs "
                     f"{floor.p10_ms:.2f} ms): the time is issuing kernels, which skipping padding cannot shorten")
        else:
            res.check("fastpath_time_falls_with_padding", fast_most / fast_0 < 0.9,
                      f"batch {b}, length {n}: x{fast_most / fast_0:.2f}")
    for target, fraction in ((1.3, 0.5), (1.8, 0.75)):
        measured = [s["fastpath vs sdpa"] for s in speedups if abs(s["padding"] - fraction) < 0.05]
        if measured:
            print(f"issue target {target}x at {fraction:.0%} padding (set for float16 on an H100/H200): "
                  f"measured up to {max(measured):.2f}x here ({dtype_name} on {device})")

# %% [markdown]
# The figure and the printed lines answer the question for your machine: how many real tokens per second each
# implementation delivers as padding grows, and whether the fastpath is faster or slower when there is nothing to
# skip. Where a batch takes close to the floor, the lines barely move with padding: the work is done faster than the
# kernels can be issued (on a GPU, the CPU issues them).
#
# ## 5. Where this is going: nested jagged tensors into SDPA
#
# The fastpath's nested tensors are an older layout; PyTorch now develops *jagged* nested tensors
# (`layout=torch.jagged`), which `F.scaled_dot_product_attention` accepts directly: attention over sequences of
# different lengths with no padding and no mask. Checked against SDPA run on each sequence alone:

# %%
seq_lengths = [5, 17, 32]
per_sequence = [torch.randn(4, n, 64, device=device, dtype=dtype) for n in seq_lengths]  # (heads, length, head size)
try:
    jagged = torch.nested.nested_tensor([t.transpose(0, 1) for t in per_sequence], layout=torch.jagged).transpose(1, 2)
    out = F.scaled_dot_product_attention(jagged, jagged, jagged)
    alone = [F.scaled_dot_product_attention(t, t, t) for t in per_sequence]
    worst = max(float((o.float() - a.float()).abs().max()) for o, a in zip(out.transpose(1, 2).unbind(), [a.transpose(0, 1) for a in alone]))
    print(f"SDPA on a jagged batch of lengths {seq_lengths}: shape {tuple(out.shape[:2])} x ragged x {out.shape[-1]}, "
          f"max difference from each sequence alone {worst:.1e}")
    res.check("jagged_sdpa_matches_each_sequence_alone", worst <= tolerance, f"{worst:.1e}")
except (RuntimeError, NotImplementedError, TypeError) as err:
    res.skip("SDPA on jagged nested tensors", f"torch {torch.__version__} on {device}: {str(err).strip().splitlines()[0][:160]}")

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
# **03.1 · Predict.** With the largest padding fraction of this run (printed below), what is the best speed-up skipping padding can give over a model that computes on every position?

# %%
from labkit import exercises

verdicts = []
ex = exercises.get("03.1")
given = {"padding_fraction": max(padding_fractions)}
print("given:", given)
answer = None  # your prediction: how many times faster, at best
if solutions:  # a workshop run fills in the solution
    answer = ex.solved(**given)
verdicts.append(ex.check(answer, record=not solutions, **given))

# %% [markdown]
# **03.2 · Predict.** Section 1 ran `nn.TransformerEncoder` in five situations. Which of them skip the padding with a nested tensor? Give a set of the case names printed below.

# %%
ex = exercises.get("03.2")
given = {"cases": {c["case"]: "" if c["why not (labkit)"] == "-" else c["why not (labkit)"] for c in cases}}
print("cases:", list(given["cases"]))
answer = None  # a set of case names
if solutions:  # a workshop run fills in the solution
    answer = ex.solved(**given)
verdicts.append(ex.check(answer, record=not solutions, **given))

# %% [markdown]
# **03.3 · Code.** Convert one BERT layer yourself: `my_convert_layer(bert_layer, config)` returns an `nn.TransformerEncoderLayer` that computes what the BERT layer computes. The check builds a small random BERT layer and compares the two outputs.

# %%
ex = exercises.get("03.3")
given = {}


def my_convert_layer(bert_layer, config):
    return None  # your code


answer = my_convert_layer
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
