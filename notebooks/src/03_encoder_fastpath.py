# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · The encoder fastpath: skipping padding, then and now
#
# When does skipping padding pay for an encoder, and how do today's libraries skip it? The source page says
# BetterTransformer sent encoder layers to `torch.nn.TransformerEncoderLayer`'s *fastpath*. That
# path skips padding with nested tensors. The converter is gone from today's libraries. transformers' BERT uses SDPA,
# but it computes every padded position. This notebook shows, on your machine:
#
# 1. **The fastpath itself.** Its conditions as PyTorch checks them, and how to *prove* it ran: profiler op names and
#    exact zeros at padded positions. Then the situations that silently turn part of it off, and accelerate's hooks.
# 2. **`labkit.fastpath.to_fastpath(model)`**, BetterTransformer's encoder conversion rebuilt. You convert one layer
#    yourself first. It is checked against the transformers model on padded batches.
# 3. **Real use**: sentence embeddings with the embedded MiniLM. The similarities must be identical; each is timed.
# 4. **The sweep**: padding fraction × batch × length. transformers eager and sdpa against the fastpath, counted in
#    real tokens per second, that is without padding. Points that contradict their own cost model are measured again.
#    The fastpath's real work is set against the machine's matmul ceiling.
# 5. **Skipping padding today**: jagged nested tensors, packed sequences in transformers, PyTorch's `varlen_attn` and
#    FlexAttention document masks.
#
# Nothing here downloads anything.

# %% tags=["parameters"]
# Parameters (papermill overrides this cell). A size of 0 or an empty list means: sized for this device.
device = "auto"                                  # auto, cpu, cuda or cuda:N
dtype = "auto"                                   # auto picks float16 on a GPU, float32 on CPU
model_id = "minilm-l6"                           # a BERT-family encoder for sections 2 and 3
sweep_model = "auto"                             # sections 4-5; auto: minilm-l6 on CPU, random-bert-base on GPU
padding_fractions = [0.0, 0.25, 0.5, 0.75]       # share of padded positions in a batch
batch_sizes = []                                 # batch sizes of the sweep
lengths = []                                     # padded sequence lengths of the sweep
quick = "auto"                                   # small sizes: "auto" means on a machine without a GPU; True or False
solutions = False                                # fill every exercise with its solution (a teacher's run)
results_path = ""                                # where to write the results JSON (empty: do not write)

# %% tags=["install-if-missing"]
import importlib.util
import runpy

if importlib.util.find_spec("labkit") is None:  # Colab, Kaggle or a fresh kernel: the workbook installs itself, once
    runpy.run_path("../tools/install_workbook.py", run_name="__main__")

# %%
import pandas as pd
import torch
import transformers

import labkit
from labkit import compat, fastpath, models, outputs, plots, results, roofline, timing
from labkit.widgets import LiveBoard, show

lab = labkit.start("03_encoder_fastpath", globals())

# %% [markdown]
# Every results file carries the environment report, so that a number can be traced to the versions and the device
# that produced it:

# %%
show(lab.environment_rows(), ["item", "value"], title="Environment")

# %% [markdown]
# ## 1. The fastpath, and how to prove it ran
#
# `nn.TransformerEncoder` has two shortcuts in inference, and PyTorch decides them separately:
#
# * **packing**: the encoder turns a padded batch into a *nested tensor* (`aten::_nested_tensor_from_mask`), a batch
#   of sequences of different lengths stored without their padding. No work is spent on padded positions, and the
#   output comes back with exact zeros there.
# * **the fused layer**: each `nn.TransformerEncoderLayer` runs as one op (`aten::_transformer_encoder_layer_fwd`)
#   instead of a dozen.
#
# The conditions, as torch 2.13 checks them in `torch/nn/modules/transformer.py`:
#
# * eval mode (`model.eval()`);
# * no gradient to track. PyTorch tests "gradient tracking is on *and* the input or a weight requires grad", so
#   `torch.no_grad()` is enough, `torch.inference_mode()` works too, and so do frozen weights
#   (`model.requires_grad_(False)`);
# * `batch_first=True`, a relu or gelu activation, an even number of heads, equal layer-norm epsilons, biases
#   (`bias=False` turns both shortcuts off), no autocast, and the tensors on a CPU or a GPU;
# * for packing: a key padding mask with the padding on the **right** of each sequence, post-norm layers
#   (`norm_first=True` turns packing off when the encoder is built), and no `torch.compile` (while dynamo traces the
#   forward, `torch.compiler.is_compiling()` is true and the encoder skips the packing);
# * for the fused layer: no forward hooks or pre-hooks registered on the layer or inside it (`register_forward_hook`,
#   `register_forward_pre_hook`).
#
# PyTorch checks them at each call, silently. When one fails, it takes the slower path and says nothing. Only what is
# decided when the encoder is built warns, once. `labkit.fastpath.why_not_fastpath` names the packing condition that
# failed, and `why_not_fused` the layer's. The profiler proves what ran.
#
# First, the fastpath's own case: a two-layer encoder and four sequences of 48, 30, 17 and 5 tokens. They are padded
# on the right to 48.

# %%
torch.manual_seed(0)
layer = torch.nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True)
encoder = torch.nn.TransformerEncoder(layer, num_layers=2).to(lab.device, lab.dtype).eval()
src = torch.randn(4, 48, 128, device=lab.device, dtype=lab.dtype)
real_tokens = torch.tensor([48, 30, 17, 5], device=lab.device)
padding = torch.arange(48, device=lab.device)[None, :] >= real_tokens[:, None]  # True marks padding
with torch.no_grad():
    out = encoder(src, src_key_padding_mask=padding)
print(f"output {tuple(out.shape)}; exact zeros at all {int(padding.sum())} padded positions: "
      f"{bool((out[padding] == 0).all())}")

# %% [markdown]
# The zeros are the nested tensor's signature. The padded positions were never computed. They were filled in when the
# result was turned back into a padded tensor. The first time a batch is packed, PyTorch warns that its nested-tensor
# API is a prototype; section 5 comes back to it.
#
# Now the same case again, and nine situations, each one condition away from it:
# - training mode;
# - gradients tracked, with the weights requiring grad, then with them frozen;
# - padding on the left, then no padding mask;
# - a forward hook on the first layer, as a tool that captures activations registers one;
# - an encoder built with `norm_first=True`, and one built with `bias=False`;
# - the encoder under `torch.compile` with `backend="eager"`: dynamo traces the forward and decides the path, and no
#   kernels are generated.
#
# **03.1 · Predict.** In which of these situations does the encoder still pack the batch and skip the padding? Give a
# set of the situation names printed below.

# %%
import copy
import functools
import warnings


def rebuilt(**changes):  # the encoder's sizes, built with changes, and what PyTorch warned while building it
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        built = torch.nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=256, dropout=0.0,
                                                 batch_first=True, **changes)
        variant = torch.nn.TransformerEncoder(built, num_layers=2)
    warned = [str(w.message).partition(" because ")[2] for w in said if "use_nested_tensor" in str(w.message)]
    return variant.to(lab.device, lab.dtype).eval(), "; ".join(warned)


frozen = copy.deepcopy(encoder).requires_grad_(False)
hooked = copy.deepcopy(encoder)
hooked.layers[0].register_forward_hook(lambda module, args, output: None)  # as a tool capturing activations does
(pre_norm, pre_norm_warned), (no_bias, no_bias_warned) = rebuilt(norm_first=True), rebuilt(bias=False)
compiled = torch.compile(copy.deepcopy(encoder), backend="eager")  # dynamo decides the path; no kernels built

# %%
situations = {  # name: (the encoder, its padding mask, training mode, gradients tracked); nothing runs yet
    "eval, torch.no_grad(), right padding": (encoder, padding, False, False),
    "training mode": (encoder, padding, True, False),
    "gradients tracked": (encoder, padding, False, True),
    "gradients tracked, weights frozen": (frozen, padding, False, True),
    "left padding": (encoder, padding.flip(1), False, False),
    "no padding mask": (encoder, None, False, False),
    "a forward hook on layer 0": (hooked, padding, False, False),
    "norm_first=True": (pre_norm, padding, False, False),
    "bias=False": (no_bias, padding, False, False),
    "torch.compile": (compiled, padding, False, False)}
warned = {"norm_first=True": pre_norm_warned, "bias=False": no_bias_warned}  # when they were built

# %%
reasons = {}  # labkit's reading of torch's conditions in each situation: (why no packing, why a layer is not fused)
for name, (module, mask, training, grad) in situations.items():
    module.train(training)
    with torch.enable_grad() if grad else torch.no_grad():
        reasons[name] = fastpath.why_not_fastpath(module, src, mask), fastpath.why_not_fused(module, src, mask)
    module.eval()
print("The situations:", *situations, sep="\n- ")
ex = lab.exercise("03.1", reasons=reasons)
answer = None  # a set of situation names, e.g. {"training mode", "left padding"}
ex.check(answer)

# %% [markdown]
# Each situation runs once in its mode; the compiled one traces its graph then. It runs once more under the profiler,
# where `fastpath.what_ran` looks for two op names: the packing and the fused layer. Beside what the profiler saw is
# labkit's reason for each part that did not run:

# %% tags=["reveals-03.1"]
rows = []
for name, (module, mask, training, grad) in situations.items():
    module.train(training)
    with torch.enable_grad() if grad else torch.no_grad():
        out = module(src, src_key_padding_mask=mask)  # a first call (torch.compile traces its graph here)
        ran = fastpath.what_ran(functools.partial(module, src, src_key_padding_mask=mask), lab.device)  # profiled
    module.eval()
    zeros = None if mask is None else bool((out[mask] == 0).all())
    rows.append({"situation": name, **ran, "exact zeros at padding": zeros, "why the padding is not skipped":
                 reasons[name][0] or "-", "why a layer is not fused": reasons[name][1] or "-",
                 "warned": f"when built: {warned[name]}" if warned.get(name) else "no"})
ran = pd.DataFrame(rows)
lab.table("situations", ran, show=False)
show(ran.drop(columns="exact zeros at padding"),
     title=f"nn.TransformerEncoder ({len(encoder.layers)} layers): what ran")
ex.compare(set(ran.loc[ran["padding skipped"], "situation"]))

# %%
layers = len(encoder.layers)
by = ran.set_index("situation")
first = by.iloc[0]  # the fastpath's own case
lab.check("fastpath_proven_by_profiler_and_zeros",
          first["padding skipped"] and first["exact zeros at padding"] and first["fused layers"] == layers)
named = (((by["why the padding is not skipped"] == "-") == by["padding skipped"])
         & ((by["why a layer is not fused"] == "-") == (by["fused layers"] == layers)))
lab.check("labkit_names_every_fallback", named.all(),
          "a reason is given exactly when the profiler shows no nested tensor, or fewer fused layers")
lab.check("no_grad_or_frozen_weights_suffice", by.loc["gradients tracked, weights frozen", "padding skipped"])
hooked = by.loc["a forward hook on layer 0"]
lab.check("a_hook_turns_off_the_fused_layer_only", hooked["padding skipped"] and hooked["fused layers"] < layers)
print(f"{by['padding skipped'].sum()} of {len(by)} situations packed the batch; "
      f"{(by['fused layers'] == layers).sum()} ran every layer fused.")

# %% [markdown]
# Read the table by its two parts. Packing is decided once, by the encoder, before any layer runs: training mode,
# tracked gradients, left padding, a missing mask, pre-norm or bias-free layers, and compilation each stop it. Frozen
# weights do not: the gradient condition needs a weight that requires grad. The fused layer is decided by each layer:
# a hook stops it for the hooked layer only, while the batch stays packed; pre-norm layers and the dynamo-traced
# encoder still fuse.
# Only the two encoders built with `norm_first=True` or `bias=False` warned, when they were built; every other
# situation changed the path without a word.
#
# **accelerate and the hooks.** A model loaded with `device_map=` is dispatched by accelerate. It puts a hook on each
# layer that moves the layer's inputs to its device. A common claim is that these hooks turn the fastpath off.
# accelerate 1.15 attaches them by replacing the module's `forward` in `add_hook_to_module`. It does not call
# `register_forward_hook`, so the hook condition above never sees them. Below, the encoder is dispatched as a
# `device_map` load does it: a hook on each layer. `force_hooks=True` attaches them although every layer is on one
# device here. Then once more, with its last layer offloaded to disk.

# %%
import tempfile

from accelerate import dispatch_model

names_of_layers = [f"layers.{i}" for i in range(len(encoder.layers))]
device_maps = {"every layer dispatched to its device": dict.fromkeys(names_of_layers, lab.device),
               "the last layer offloaded to disk": {**dict.fromkeys(names_of_layers, lab.device),
                                                    names_of_layers[-1]: "disk"}}

# %%
rows = []
with tempfile.TemporaryDirectory() as folder, compat.quiet_logger("accelerate"):  # it calls any cpu entry "offloaded"
    for label, device_map in device_maps.items():
        dispatched = dispatch_model(copy.deepcopy(encoder), device_map=device_map, offload_dir=folder, force_hooks=True)
        row = {"accelerate": label, "modules with an accelerate hook": compat.accelerate_hooks(dispatched),
               "torch forward hooks": compat.has_forward_hooks(dispatched)}
        try:
            with torch.no_grad():
                row |= fastpath.what_ran(functools.partial(dispatched, src, src_key_padding_mask=padding), lab.device)
        except (RuntimeError, AssertionError) as err:
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:150]}"
        rows.append(row)
accelerated = pd.DataFrame(rows)
lab.table("accelerate", accelerated, title="The encoder dispatched by accelerate: its hooks, and what the profiler saw")

# %%
dispatched_only = accelerated.iloc[0]
lab.check("accelerate_dispatch_keeps_the_fastpath",
          not dispatched_only["torch forward hooks"] and dispatched_only["modules with an accelerate hook"] > 0
          and dispatched_only["padding skipped"] and dispatched_only["fused layers"] == len(encoder.layers),
          str(dispatched_only.to_dict()))

# %% [markdown]
# With accelerate's hooks the encoder still packs and fuses, and there is no torch hook to count. A model split over
# two GPUs is not shown here: the packed batch would move between devices at a layer boundary, and that stays
# untested. Offloading is different. An offloaded layer's weights stay on the `meta` device, which holds no data,
# until each submodule's own `forward` runs. `MultiheadAttention` reads its `out_proj` weights without calling
# `out_proj`. So the call fails with the error in the table instead of falling back.
#
# ## 2. BetterTransformer's encoder conversion, rebuilt
#
# A BERT layer is self-attention followed by a feed-forward block:
# - self-attention: query, key and value projections, an output projection, a residual sum and a LayerNorm;
# - feed-forward: a GELU between two linear layers, a residual sum and a LayerNorm.
#
# Each LayerNorm comes *after* its residual sum: "post-norm". `nn.TransformerEncoderLayer` computes the same thing. So
# converting a model means building one such layer per BERT layer and copying the weights in. Try it yourself first.
#
# **03.2 · Code.** Write `my_convert_layer(bert_layer, config)`. It returns an `nn.TransformerEncoderLayer` that
# computes what the BERT layer computes; the config gives the sizes. The check builds a small random BERT layer,
# converts it with your function and compares the two outputs. `ex.hint()` gives a hint.

# %%
ex = lab.exercise("03.2")


def my_convert_layer(bert_layer, config):
    ...  # your code: build the nn.TransformerEncoderLayer, copy bert_layer's weights into it, return it


answer = None  # once my_convert_layer is written: answer = my_convert_layer
ex.check(answer)

# %% [markdown]
# `labkit.fastpath.to_fastpath(model)` does this for every layer with `fastpath.convert_layer`, which `ex.solution()`
# shows. It reuses the model's embeddings as they are. Query, key and value are stacked, in that order, into the
# layer's one input projection. BERT's post-norm order is the layer's `norm_first=False`.
#
# The converted model is compared with the transformers model in eager mode on a padded batch, at the real positions.
# What to expect: the same numbers up to rounding. The profiler should show the packing and the fused layers only on
# the converted side. The original BetterTransformer conversion still runs in the legacy notebook
# [legacy/bettertransformer.ipynb](legacy/bettertransformer.ipynb), with transformers 4.48 and optimum 1.27 in a kernel
# of its own. It times that conversion beside this converter on the same batches; `make compare-legacy` puts both in
# one report.

# %%
if lab.p.model_problem:
    lab.skip(f"to_fastpath on {model_id}", lab.p.model_problem)
else:
    model, tokenizer = models.load_model(model_id, device=lab.device, dtype=lab.dtype, attn_implementation="eager")
    fast = fastpath.to_fastpath(model)
    batch = fastpath.padded_batch(tokenizer, batch=8, length=64, padding_fraction=0.5, device=lab.device)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.inference_mode():
        expected = model(**inputs).last_hidden_state
        got = fast(**inputs).last_hidden_state
        seen = pd.DataFrame([{"model": label, **fastpath.what_ran(functools.partial(m, **inputs), lab.device)}
                             for label, m in {f"transformers ({compat.attn_implementation(model)})": model,
                                              "to_fastpath": fast}.items()])
    real = batch["attention_mask"].bool()  # compared at the real (non-padded) positions only
    relative = float((got[real].double() - expected[real].double()).norm() / expected[real].double().norm())
    difference = float((got[real] - expected[real]).abs().max())
    print(f"{model_id} ({fast.source}), {batch['padding_fraction']:.0%} padding: relative error {relative:.2e} "
          f"(tolerance for {lab.dtype_name}: {lab.p.tolerance:.0e}), largest absolute difference {difference:.2e}")
    lab.table("conversion", seen, title="What the profiler saw")

# %%
if not lab.p.model_problem:
    theirs, ours = seen.iloc[0], seen.iloc[1]
    lab.metric("to_fastpath_max_abs_difference", difference)
    lab.check("to_fastpath_matches_transformers", relative <= lab.p.tolerance, f"{relative:.2e}")
    lab.check("to_fastpath_skips_padding", ours["padding skipped"] and bool((got[~real] == 0).all()))
    lab.check("transformers_bert_neither_fuses_nor_skips_padding",
              theirs["fused layers"] == 0 and not theirs["padding skipped"])

# %% [markdown]
# A model the converter cannot carry over exactly gets one sentence naming what is unsupported, not a wrong answer:

# %%
llama_problem = models.check_model("tiny-llama")  # random weights; its tokenizer comes from smollm2-135m
if llama_problem:
    lab.skip("to_fastpath on a Llama model", llama_problem)
else:
    llama, _ = models.load_model("tiny-llama", device=lab.device)
    try:
        fastpath.to_fastpath(llama)
        refused = ""
    except fastpath.UnsupportedModel as err:
        refused = str(err)
    print(refused or "(converted)")
    lab.check("unsupported_model_gets_a_clear_error", "llama" in refused)

# %% [markdown]
# ## 3. Real use: sentence embeddings
#
# The embedded MiniLM is a sentence encoder. The mean of its token vectors is an embedding. The cosine similarity of
# two embeddings says how close two sentences are. Sentences of very different lengths make a batch with much
# padding, and its share is printed below. That is where skipping padding should pay. Both models must give the same
# similarities.

# %%
sentences = [
    "A dog.",
    "The cat sleeps.",
    "My dog is cute and loves to play fetch in the park every morning before breakfast.",
    "Flash Attention computes exact attention without ever holding the full matrix of scores in memory.",
    "Rain.",
    "Nested tensors let a batch of sequences of different lengths be stored without padding, so no work is wasted.",
    "GPUs are fast.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch, drinking his morning coffee.",
]

# %%
if not lab.p.model_problem:
    model.set_attn_implementation("sdpa")
    tokenizer.padding_side = "right"
    inputs = tokenizer(sentences, padding=True, return_tensors="pt").to(lab.device)
    mask = inputs["attention_mask"].unsqueeze(-1)

    def embedding(hidden):  # the mean of the real tokens' vectors, made unit length: a dot product is the cosine
        return torch.nn.functional.normalize(((hidden * mask).sum(1) / mask.sum(1)).float(), dim=-1)

    def embed_transformers():
        with torch.inference_mode():
            return embedding(model(**inputs).last_hidden_state)

    def embed_fastpath():
        with torch.inference_mode():
            return embedding(fast(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state)

    embed = {"transformers sdpa": embed_transformers, "fastpath": embed_fastpath}

# %%
if not lab.p.model_problem:
    similarity = {label: e @ e.T for label, e in ((label, fn()) for label, fn in embed.items())}
    gap = float((similarity["fastpath"] - similarity["transformers sdpa"]).abs().max())
    closest = similarity["fastpath"].fill_diagonal_(-1).argmax(1).tolist()  # each sentence's nearest other one
    show(pd.DataFrame({"sentence": [s[:60] for s in sentences],
                       "closest other sentence": [sentences[j][:60] for j in closest]}),
         title="Nearest neighbour by embedding")
    speed = {label: timing.measure(fn, device=lab.device, warmup=1, repeats=lab.p.repeats)
             for label, fn in embed.items()}
    embeddings = pd.DataFrame([{"model": label, "median ms": t.median_ms, "p10 ms": t.p10_ms, "p90 ms": t.p90_ms}
                               for label, t in speed.items()])
    embeddings["sentences/s"] = len(sentences) / (embeddings["median ms"] / 1e3)
    padding_share = 1 - inputs["attention_mask"].float().mean().item()
    lab.table("embeddings", embeddings, title=f"{len(sentences)} sentences, {padding_share:.0%} padding; the two "
              f"similarity matrices differ by at most {gap:.2e}")
    embedding_speedup = speed["transformers sdpa"].median_ms / speed["fastpath"].median_ms
    lab.metric("embedding_fastpath_speedup", embedding_speedup)
    lab.check("similarities_identical", gap <= lab.p.tolerance, f"{gap:.2e}")

# %% [markdown]
# ## 4. The sweep: when does skipping padding pay?
#
# For each padding fraction × batch × length, transformers sdpa and the fastpath run on the same batch; transformers
# eager joins them at full sizes. Each gets a median time, with p10-p90 (the 10th and 90th percentiles of the
# repeats), and **real tokens per second**. Padding does not count: it is work nobody asked for.
#
# Two facts to reason from. With no padding, the fastpath has nothing to skip and pays for packing the batch. A padded
# model computes every position, whatever the padding. Predict before you run it: as padding grows, does each
# implementation's real tokens/s rise, stay flat or fall? If time followed the tokens computed, the fastpath's would
# stay flat and the padded model's would fall.
#
# Before the sweep, one more measurement: the fastpath on a single sequence of 8 tokens. That call does almost no
# work, so its time is the **floor**: the cost of launching the model's kernels. No amount of skipped padding removes
# it. Where a batch takes little more than the floor, padding barely changes the time, for any implementation. On a
# fast GPU, small batches do.
#
# Each series, one implementation at one batch and length, has a cost model:
# - the fastpath's time must not rise as the padding grows, since its work, the real tokens, shrinks;
# - a padded model's time must stay flat, since it computes every position. Its point without padding is the
#   exception: transformers then passes no mask, and SDPA may pick another kernel.
#
# Two points contradict the model when their p10-p90 ranges do not overlap the way it allows. An example: a padded
# model clearly faster at 75% padding than at 25%. Such points are measured once more. Those that still contradict it
# are marked **noisy** in the speed-up table and the figure: shown, but not read.
#
# **03.3 · Predict.** Take the largest padding fraction of this run, printed below. If time were proportional to the
# tokens computed, what speed-up would skipping padding give over a model that computes every position? That holds
# for the linear layers, which dominate at these lengths. Attention's work grows with the square of each sequence's
# length, so the measured speed-up can land on either side.

# %%
ex = lab.exercise("03.3", padding_fraction=max(lab.p.padding_fractions))
print(f"the largest padding fraction of this run: {max(lab.p.padding_fractions)}")
answer = None  # your prediction: how many times faster
ex.check(answer)

# %%
if lab.p.sweep_problem:
    lab.skip(f"the sweep on {lab.p.sweep_model}", lab.p.sweep_problem)
else:
    sweeping, sweep_tokenizer = models.load_model(lab.p.sweep_model, device=lab.device, dtype=lab.dtype,
                                                  attn_implementation="eager")
    runs = {"transformers eager": sweeping, "transformers sdpa": sweeping, "fastpath": fastpath.to_fastpath(sweeping)}

    def forward(implementation, batch):  # the call to time: one forward pass on a padded batch
        if implementation.startswith("transformers "):  # its attention is set first, untimed
            sweeping.set_attn_implementation(implementation.removeprefix("transformers "))
        return functools.partial(runs[implementation], input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"])

    tiny = fastpath.padded_batch(sweep_tokenizer, batch=1, length=8, padding_fraction=0.0, device=lab.device)
    with torch.inference_mode():
        floor_ms = timing.measure(forward("fastpath", tiny), device=lab.device, warmup=2,
                                  repeats=lab.p.repeats).p10_ms  # the fastest 10% of calls
    print(f"The floor: the fastpath on 1 sequence of 8 tokens takes {floor_ms:.2f} ms (fastest 10% of calls)")

# %%
if not lab.p.sweep_problem:
    sizes = [(b, n, p) for b in lab.p.batch_sizes for n in lab.p.lengths for p in lab.p.padding_fractions]
    board = LiveBoard(["implementation", "batch", "length", "padding", "median_ms", "p10_ms", "p90_ms", "status"],
                      title=f"{lab.p.sweep_model}, {lab.dtype_name}", total=len(sizes) * len(lab.p.implementations))
    batches, rows = {}, []
    for b, n, p in sizes:
        batch = batches[b, n, p] = fastpath.padded_batch(sweep_tokenizer, batch=b, length=n, padding_fraction=p,
                                                         device=lab.device)
        real = batch["attention_mask"].sum(1)  # each sequence's real tokens
        for implementation in lab.p.implementations:
            with torch.inference_mode():
                measured = fastpath.timed(forward(implementation, batch), lab.device, lab.p.repeats)
            rows.append({"implementation": implementation, "batch": b, "length": n, "asked": p,
                         "padding": round(batch["padding_fraction"], 3), "real_tokens": int(real.sum()),
                         "real_pairs": int((real**2).sum()),  # (query, key) pairs within each sequence
                         "padding_tokens": b * n - int(real.sum()), **measured, "noisy": False})
            board(rows[-1])

# %% [markdown]
# The cost model above, applied to each series: `timing.recheck_trend(points, work=...)` measures the points that go
# against the trend of `work` once more and marks those that still do noisy. A padded model's series is checked both
# ways: against its real tokens and against its padding tokens.

# %%
if not lab.p.sweep_problem:
    def remeasure(point):  # a point against its series' cost model, measured once more (the timing rule)
        call = forward(point["implementation"], batches[point["batch"], point["length"], point["asked"]])
        with torch.inference_mode():
            again = fastpath.timed(call, lab.device, lab.p.repeats)
        board({**point, **again, "status": "re-measured"})
        return again

    series = {}  # (implementation, batch, length) -> the indices of its rows
    for i, r in enumerate(rows):
        if r["status"] == "ok" and (r["implementation"] == "fastpath" or r["padding"] > 0):
            series.setdefault((r["implementation"], r["batch"], r["length"]), []).append(i)

# %%
sweep = None
if not lab.p.sweep_problem:
    for (implementation, _, _), indices in series.items():
        for work in ["real_tokens"] if implementation == "fastpath" else ["real_tokens", "padding_tokens"]:
            points = timing.recheck_trend([dict(rows[i]) for i in indices], work=work, remeasure=remeasure)
            for i, point in zip(indices, points, strict=True):
                rows[i] = {**point, "noisy": point["noisy"] or rows[i]["noisy"]}  # noisy against either trend
    board.finish()
    sweep = pd.DataFrame(rows)
    sweep["real tokens/s"] = sweep["real_tokens"] / (sweep["median_ms"] / 1e3)  # padding is work nobody asked for
    lab.table("sweep", sweep.drop(columns="asked"), show=False)

# %% tags=["reveals-03.3"]
if sweep is not None:
    ok = sweep[sweep["status"] == "ok"]
    speedups = ok[ok.implementation == "fastpath"].merge(ok[ok.implementation == "transformers sdpa"],
                                                         on=["batch", "length", "padding"], suffixes=("", " sdpa"))
    sweep = sweep if len(speedups) else None  # no point where both ran (out of memory, say): nothing to compare
if sweep is not None:
    speedups["fastpath vs sdpa"] = speedups["median_ms sdpa"] / speedups["median_ms"]  # above 1: the fastpath wins
    speedups["fastest 10% ratio"] = speedups["p10_ms sdpa"] / speedups["p10_ms"]
    speedups["ideal"] = 1 / (1 - speedups["padding"])  # if time were proportional to the tokens computed
    speedups["noisy"] = speedups["noisy"] | speedups["noisy sdpa"]
    speedups["size"] = speedups["batch"] * speedups["length"]
    best = speedups.sort_values(["size", "padding"]).iloc[-1]  # the largest batch x length, at the most padding
    print(f"batch {best.batch}, length {best.length}, {best.padding:.0%} padding: the fastpath against transformers "
          f"sdpa{' (noisy: not to be read)' if best.noisy else ''}")
    ex.compare(best["fastpath vs sdpa"], "x")

# %%
if sweep is not None:
    speedups = speedups[["batch", "length", "padding", "fastpath vs sdpa", "fastest 10% ratio", "ideal", "noisy"]]
    lab.table("speedups", speedups, title="The fastpath's speed-up over transformers sdpa (above 1: faster; ideal if "
              "time ∝ tokens: 1 / (1 - padding))")
    for r in speedups.to_dict("records"):
        lab.metric(f"speedup_fastpath_vs_sdpa_b{r['batch']}_n{r['length']}_pad{round(100 * r['padding'])}",
                   r["fastpath vs sdpa"])  # named as the reference runs name it
    fig = plots.lines(ok, x="padding", y="real tokens/s", series="implementation", panel=["batch", "length"],
                      xlabel="padding fraction", title=f"{lab.p.sweep_model} on {lab.device_label}, {lab.dtype_name}")
    lab.figure("real_tokens_per_s_vs_padding", fig)

# %%
if sweep is not None:
    for (b, n), group in ok[ok.implementation != "transformers eager"].groupby(["batch", "length"]):
        least = group[group.padding == group.padding.min()].set_index("implementation")
        most = group[group.padding == group.padding.max()].set_index("implementation")
        if group.padding.nunique() < 2 or len(least) < 2 or len(most) < 2:
            continue
        if least.noisy.any() or most.noisy.any():
            print(f"batch {b}, length {n}: noisy (re-measured, still against the trend): no conclusion")
            continue
        change = most.p10_ms / least.p10_ms  # each implementation's time, from the least to the most padding
        print(f"batch {b}, length {n}: {least.p10_ms['fastpath'] / floor_ms:.1f}x the floor without padding; from "
              f"{group.padding.min():.0%} to {group.padding.max():.0%} padding the fastpath's time "
              f"x{change['fastpath']:.2f}, transformers sdpa's x{change['transformers sdpa']:.2f}")

# %%
if sweep is not None:
    fast_series = ok[(ok.implementation == "fastpath") & (ok.batch == best.batch) & (ok.length == best.length)]
    first, last = fast_series.sort_values("padding").iloc[[0, -1]].itertuples()
    what, at = "fastpath time falls with padding", f"batch {best.batch} x length {best.length}"
    if last.padding < 0.5 or first.padding > 0:
        lab.skip(what, f"{at} did not run at no padding and at 50% or more")
    elif first.noisy or last.noisy:
        lab.skip(what, f"{at}: its points stayed noisy after a re-measurement, so they support no conclusion")
    elif first.p10_ms < 2 * floor_ms:
        lab.skip(what, f"even {at} takes only {first.p10_ms / floor_ms:.1f}x the floor ({first.p10_ms:.2f} vs "
                 f"{floor_ms:.2f} ms): the time is issuing kernels, which skipping padding cannot shorten")
    else:
        lab.check("fastpath_time_falls_with_padding", last.p10_ms / first.p10_ms < 0.9,
                  f"batch {best.batch}, length {best.length}: x{last.p10_ms / first.p10_ms:.2f}", timing=True)

# %% [markdown]
# **03.4 · Explain a measured number.** The fastpath's time at the most padding is in the table above; explain it
# with a two-part cost model. Every call pays the floor. The rest follows the real tokens, and at a padding fraction
# `p` only `1 - p` of them are real. From the floor and the fastpath's time without padding, printed below for the
# headline batch and length, what time does the model give at the most padding? The cell after it puts the measured
# time beside yours.

# %%
if sweep is not None and first.padding == 0:
    print(f"batch {best.batch}, length {best.length}: the floor {floor_ms:.3f} ms; the fastpath without padding "
          f"{first.p10_ms:.3f} ms; the most padding {last.padding:.0%} (fastest 10% of calls)")
    floor_model = lab.exercise("03.4", floor_ms=floor_ms, no_padding_ms=first.p10_ms, padding_fraction=last.padding)
    answer = None  # your explanation: the time at the most padding, in ms
    floor_model.check(answer)
elif sweep is not None:
    lab.skip("03.4", f"the sweep has no point without padding at batch {best.batch}, length {best.length}")

# %% tags=["reveals-03.4"]
if sweep is not None and first.padding == 0:
    modelled = floor_ms + (first.p10_ms - floor_ms) * (1 - last.padding)  # the two-part cost model
    floor_model.compare(last.p10_ms, "ms measured (fastest 10% of calls)")
    print(f"The model gives {modelled:.3f} ms; time proportional to the tokens alone would give "
          f"{first.p10_ms * (1 - last.padding):.3f} ms. Measured: {last.p10_ms:.3f} ms"
          f"{' (noisy: not to be read)' if last.noisy else ''}.")

# %% [markdown]
# The figure and the printed lines answer the question for your machine. They show how many real tokens per second
# each implementation delivers as padding grows, and how close the fastpath comes to the ideal. They also show
# whether it is faster or slower when there is nothing to skip. Where a batch takes close to the floor, the lines
# barely move with padding: the work is done faster than the kernels can be launched. On a GPU, the CPU launches them. A
# point marked noisy contradicted its cost model twice; nothing above is concluded from it.
#
# How close does that come to the machine's limit? Take the sweep's headline point: its largest batch and length, at
# the most padding. The real tokens' work is counted as FLOPs: 2 per weight per token in the linear layers, plus
# attention over each sequence's own tokens. Divided by each implementation's time, it is set against the matmul
# ceiling measured now. What to expect: below the ceiling, since a layer is more than its matrix products. Softmax,
# LayerNorm, GELU and packing the batch cost time too. Transformers sdpa should be lower still: its time also pays for
# the padding.

# %%
if sweep is not None:
    flops_per_s = roofline.compute_ceiling(lab.device, lab.dtype, quick=lab.quick)["flops_per_s"]
    c = sweeping.config
    weights = 4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size  # Q, K, V, output; two feed-forward
    point = ok[(ok.batch == best.batch) & (ok.length == best.length) & (ok.padding == best.padding)]
    point = point.set_index("implementation").loc[["fastpath", "transformers sdpa"]]
    linear = 2 * weights * c.num_hidden_layers * point["real_tokens"]  # 2 FLOPs per weight per real token
    attention = 4 * c.hidden_size * c.num_hidden_layers * point["real_pairs"]  # Q.K and P.V, within each sequence
    work = (linear + attention).iloc[0]  # the same real tokens for both: FLOPs nobody asked for are not counted
    point["GFLOP/s"] = work / (point["median_ms"] / 1e3) / 1e9
    point["fraction of ceiling"] = point["GFLOP/s"] * 1e9 / flops_per_s
    rates = ", ".join(f"{i} {r['GFLOP/s']:.3g} GFLOP/s ({r['fraction of ceiling']:.0%})" for i, r in point.iterrows())
    print(f"At batch {best.batch} x length {best.length}, {best.padding:.0%} padding, the real tokens need "
          f"{work / 1e9:.3g} GFLOP (attention {attention.iloc[0] / work:.0%} of it, the linear layers the rest); "
          f"in real work per second: {rates} of this machine's matmul ceiling in {lab.dtype_name}, "
          f"{flops_per_s / 1e9:.3g} GFLOP/s" + (" (a noisy point: not to be read)" if best.noisy else ""))
    lab.metric("fastpath_fraction_of_matmul_ceiling", point.loc["fastpath", "fraction of ceiling"])

# %% [markdown]
# Your numbers beside the reference runs stored in `reference/<device>/`, when there are any. Two sizes are shown:
# this run's largest batch × length, and a full GPU run's, batch 128 × length 512. A GPU run uses larger sizes than a
# CPU one, so a row is empty where a run did not measure that size.

# %%
shown = {"sentence embeddings: the fastpath's speed-up over transformers sdpa": "embedding_fastpath_speedup"}
largest = {(max(lab.p.batch_sizes), max(lab.p.lengths)): "this run's",
           (max(fastpath.GPU_SIZES["batch_sizes"]), max(fastpath.GPU_SIZES["lengths"])): "a full GPU run's"}
for (b, n), whose in largest.items():
    for p in lab.p.padding_fractions:
        shown[f"the fastpath's speed-up at {p:.0%} padding, batch {b} x length {n} ({whose} largest)"] = \
            f"speedup_fastpath_vs_sdpa_b{b}_n{n}_pad{round(100 * p)}"
shown["the fastpath's real work as a fraction of the matmul ceiling (headline point)"] = \
    "fastpath_fraction_of_matmul_ceiling"
show(lab.beside_references(shown), title="This machine and the reference runs")

# %% [markdown]
# **The stored GPU run.** The same question on an H100, read from the run stored in `reference/`. Predict first: on a
# GPU, does the fastpath's real tokens/s hold up as padding grows? The cell takes each panel, one batch × length. It
# divides the real tokens/s at the most padding by that at none: the share of its rate each implementation kept.

# %%
stored = results.reference_runs("03_encoder_fastpath")
if not stored:
    lab.skip("the stored GPU run's sweep", "no reference run of this notebook is stored in reference/")
else:
    device_name, run = next(iter(stored.items()))
    gpu = results.table(run, "sweep").sort_values("padding")  # every sweep point: its median time, real tokens/s
    gpu, most = gpu[gpu.implementation != "transformers eager"], gpu.padding.max()
    ends = gpu.groupby(["batch", "length", "implementation"])["real tokens/s"].agg(["first", "last"])
    kept = (ends["last"] / ends["first"]).unstack("implementation").reset_index()  # at the most padding over none
    kept["a model whose time stays flat"] = 1 - most  # the padded model's cost model; time ∝ real tokens keeps 1
    lab.table("stored_gpu_padding", kept, title=f"Share of its real tokens/s kept at {most:.0%} padding, {device_name}")
    falls, ahead = int((kept["fastpath"] < 1).sum()), int((kept["fastpath"] > kept["transformers sdpa"]).sum())
    print(f"In the stored {device_name} run the fastpath's real tokens/s fell from no padding to {most:.0%} in "
          f"{falls} of {len(kept)} panels, keeping {kept.fastpath.min():.0%} to {kept.fastpath.max():.0%} of its rate; "
          f"transformers sdpa kept {kept['transformers sdpa'].min():.0%} to {kept['transformers sdpa'].max():.0%}. "
          f"The fastpath kept more than sdpa in {ahead} of {len(kept)} panels, the most at batch "
          f"{kept.loc[kept.fastpath.idxmax(), 'batch']} x length {kept.loc[kept.fastpath.idxmax(), 'length']}. "
          f"Its time went to {((1 - most) / kept.fastpath).min():.2f}-{((1 - most) / kept.fastpath).max():.2f} "
          f"of its time without padding, its real tokens to {1 - most:.2f}.")

# %% [markdown]
# What it means: where the fastpath's real tokens/s fell, its time did not fall in step with the real tokens. The
# time ratios above show it. Part of each forward pass is a fixed cost, the floor of this section, and skipping
# padding cannot remove it. Where the fastpath kept more of its rate than transformers sdpa, its gain is relative: the
# padded model lost more. "The fastpath gains as padding grows" is true against a padded model, not in real tokens
# per second.
#
# ## 5. Skipping padding today
#
# **Nested tensors.** torch 2.13 still calls its whole nested-tensor API a prototype. That is the warning printed in
# section 1 the first time a batch was packed. It recommends the *jagged* layout, `layout=torch.jagged`: the one under
# active development, and it works with `torch.compile`. `F.scaled_dot_product_attention` takes jagged nested tensors
# directly: attention over sequences of different lengths, with no padding and no mask. Checked against SDPA run on
# each sequence alone:

# %%
lengths_demo = [5, 17, 32]
per_sequence = [torch.randn(n, 4, 64, device=lab.device, dtype=lab.dtype) for n in lengths_demo]  # tokens, heads, dim
try:
    jagged = torch.nested.nested_tensor(per_sequence, layout=torch.jagged).transpose(1, 2)  # batch, heads, ragged, dim
    out = torch.nn.functional.scaled_dot_product_attention(jagged, jagged, jagged)
    alone = [torch.nn.functional.scaled_dot_product_attention(*[t.transpose(0, 1)] * 3) for t in per_sequence]
    worst = max(float((o.float() - a.float()).abs().max()) for o, a in zip(out.unbind(), alone, strict=True))
    print(f"SDPA on a jagged batch of lengths {lengths_demo}: max difference from each sequence alone {worst:.1e}")
    lab.check("jagged_sdpa_matches_each_sequence_alone", worst <= lab.p.tolerance, f"{worst:.1e}")
except (RuntimeError, NotImplementedError, TypeError) as err:
    lab.skip("SDPA on jagged nested tensors", f"torch {torch.__version__} on {lab.device}: "
             f"{str(err).strip().splitlines()[0][:160]}")

# %% [markdown]
# **Packed sequences.** Training and serving stacks today often keep no padding at all. The real tokens of a batch go
# into one row, and attention is told where each sequence ends. transformers builds such a row with
# `DataCollatorWithFlattening`. Its `position_ids` restart at 0 for each sequence. With
# `return_flash_attn_kwargs=True` it also returns the boundaries, the cumulative lengths `cu_seq_lens_q` and
# `cu_seq_lens_k`. Three ways keep the sequences apart inside attention:
#
# * **A block-diagonal mask** for SDPA, True where two tokens belong to the same sequence. Given no attention mask,
#   transformers builds it from `position_ids` that restart at 0. It does so for causal models, and since transformers
#   5.25 for bidirectional encoders such as BERT too: `create_bidirectional_mask` in `masking_utils.py`. Before 5.25
#   an encoder's mask ignored packing, and you passed the mask yourself. The row's `position_ids` are then all that
#   keeps the sequences apart. The mask has T × T entries for T packed tokens, so it only suits modest rows.
# * **`torch.nn.attention.varlen.varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k)`**, PyTorch's FlashAttention
#   kernel for packed sequences. It is a GPU kernel: on a CPU the call fails, and its row in the table below says why.
#   It plugs into transformers with `AttentionInterface.register`; labkit's `fastpath.varlen_attention` is that
#   function. With `attn_implementation="flash_attention_2"` and the flash-attn package, transformers reads the
#   boundaries from `position_ids` itself.
# * **FlexAttention with a document mask.** `create_block_mask` with the rule "same sequence", `document_mask` below,
#   tells the compiled kernel which 128 × 128 blocks of the score matrix hold two different sequences. The kernel
#   skips them. It is compiled for each shape on its first call, shown in the "first call s" column. So it is measured
#   at the most padding only.
#
# First the packing itself, written out below. `pack` puts a padded batch's real tokens in one row with
# `DataCollatorWithFlattening`. `sequence_ids` turns the boundaries into each token's sequence number, and both masks
# follow from it. Then a small packed example, with the mask the installed transformers builds for the sweep's model
# from the row's `position_ids` alone, with no attention mask given:

# %%
from torch.nn.attention.flex_attention import create_block_mask
from transformers import DataCollatorWithFlattening


def pack(batch):  # the real tokens of a padded batch in one row, as transformers packs them, on this device
    pairs = zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), strict=True)
    sequences = [{"input_ids": ids[mask.bool()].tolist()} for ids, mask in pairs]
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")(sequences)
    return {k: v.to(lab.device) if torch.is_tensor(v) else v for k, v in packed.items() if k != "labels"}


def sequence_ids(cu_seq_lens):  # the sequence each packed token belongs to: [0, 3, 5] -> 0 0 0 1 1
    return torch.repeat_interleave(torch.arange(len(cu_seq_lens) - 1, device=cu_seq_lens.device),
                                   cu_seq_lens.diff().long())


def document_mask(ids):  # FlexAttention's block mask: a token attends only to the tokens of its own sequence
    return create_block_mask(lambda b, h, q, kv: ids[q] == ids[kv], None, None, len(ids), len(ids), device=ids.device)


# %%
if not lab.p.sweep_problem:
    example = fastpath.padded_batch(sweep_tokenizer, batch=4, length=8, padding_fraction=0.5, device=lab.device)
    packed = pack(example)
    print(f"padded batch {tuple(example['input_ids'].shape)}, {example['padding_fraction']:.0%} padding -> "
          f"packed row {tuple(packed['input_ids'].shape)}")
    print("position_ids:", packed["position_ids"][0].tolist(), " cu_seq_lens_q:", packed["cu_seq_lens_q"].tolist())
    ids = sequence_ids(packed["cu_seq_lens_q"])
    block = (ids[:, None] == ids[None, :])[None, None]  # (1, 1, T, T), True where two tokens share a sequence
    print("block-diagonal mask (1: same sequence):")
    print(block[0, 0].int().cpu())

# %%
from transformers.masking_utils import create_bidirectional_mask

if not lab.p.sweep_problem:
    sweeping.set_attn_implementation("sdpa")  # the sweep ran it eager; from here on it runs transformers' sdpa
    row = torch.zeros(1, packed["input_ids"].shape[1], 1, device=lab.device)  # only its shape, dtype, device are read
    built = create_bidirectional_mask(config=sweeping.config, inputs_embeds=row, attention_mask=None,
                                      position_ids=packed["position_ids"])
    same = built is not None and torch.equal(built, block)
    print(f"transformers {transformers.__version__}, sdpa, a packed row and no mask: " + (
        "it builds the same block-diagonal mask" if same else
        "no mask (every token attends to every other)" if built is None else "another mask"))
    expected = compat.encoder_mask_from_position_ids()  # what the installed source does (read by labkit.compat)
    lab.check("transformers_builds_the_packed_mask_as_its_source_says", same == expected,
              f"transformers {transformers.__version__}")

# %% [markdown]
# Now the sweep's model on its largest batch and length, at the least and the most padding of this run. The padded
# batch goes through transformers sdpa. Then the same sequences are packed, and each way is checked against the padded
# batch's output at the real tokens. What to expect: without padding, a packed row only adds work, because the
# block-diagonal mask makes attention cover the whole row. With much padding, every linear layer now computes only
# real tokens. A way that cannot run on this machine says why in one line.

# %%
def way_call(way, padded, packed):  # one way's call: the real tokens' hidden states, in packed order
    row, ids = {k: packed[k] for k in ("input_ids", "position_ids")}, sequence_ids(packed["cu_seq_lens_q"])
    implementation, inputs = "sdpa", row  # "packed sdpa, no mask": only the position_ids say where sequences end
    if way == "padded sdpa":
        inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    elif way == "packed sdpa block mask":
        inputs = {**row, "attention_mask": (ids[:, None] == ids[None, :])[None, None]}
    elif way == "packed varlen":  # the row with its boundaries, as DataCollatorWithFlattening returns them
        implementation, inputs = "labkit_varlen", packed
    elif way == "packed flex document mask":  # the compiled kernel skips the blocks that hold two sequences
        implementation, inputs = "flex_attention", {**row, "attention_mask": document_mask(ids)}
    elif way == "packed sdpa, no mask, no position_ids":  # nothing says where sequences end
        inputs = {"input_ids": packed["input_ids"]}
    sweeping.set_attn_implementation(implementation)

    def call():
        with torch.inference_mode():
            hidden = sweeping(**inputs).last_hidden_state
        return hidden[padded["attention_mask"].bool()] if way == "padded sdpa" else hidden[0]
    return call


# %%
from transformers import AttentionInterface

AttentionInterface.register("labkit_varlen", fastpath.varlen_attention)  # PyTorch's varlen kernel, for transformers
if not lab.p.sweep_problem:
    b, n = max(lab.p.batch_sizes), max(lab.p.lengths)
    extremes = sorted({min(lab.p.padding_fractions), max(lab.p.padding_fractions)})
    padded = {p: fastpath.padded_batch(sweep_tokenizer, batch=b, length=n, padding_fraction=p, device=lab.device)
              for p in extremes}
    packed = {p: pack(batch) for p, batch in padded.items()}  # the same sequences, their real tokens in one row
    tokens = max(row["input_ids"].shape[1] for row in packed.values())
    cannot = {}  # a way that cannot run here, and why (a way that fails when it runs says so in its row)
    if tokens**2 > 2**26:  # a (T, T) mask of bools over 64 MiB
        cannot["packed sdpa block mask"] = (f"a dense mask for {tokens:,} packed tokens would hold {tokens**2:,} "
                                            "entries: varlen or FlexAttention keep the sequences apart without it")
    if lab.quick and lab.device == "cpu":
        cannot["packed flex document mask"] = ("FlexAttention compiles its kernel for each shape before its first "
                                               "call; on a CPU that takes longer than a quick run allows (quick=False "
                                               "runs it)")

# %%
if not lab.p.sweep_problem:
    rows, hidden = [], {}  # (way, padding) -> the real tokens' hidden states
    for p, way in [(p, way) for p in extremes for way in
                   ("padded sdpa", "packed sdpa block mask", "packed varlen", "packed flex document mask")]:
        if cannot.get(way) or (way == "packed flex document mask" and p != max(extremes)):  # compiled for each shape
            continue
        measured, hidden[way, p] = fastpath.measure_way(functools.partial(way_call, way, padded[p], packed[p]),
                                                         lab.device, lab.p.repeats)
        tokens = padded[p]["input_ids"].numel() if way == "padded sdpa" else packed[p]["input_ids"].shape[1]
        rows.append({"way": way, "asked": p, "padding": round(padded[p]["padding_fraction"], 3),
                     "tokens computed": tokens, **measured})
    ways = pd.DataFrame(rows)
    ways["relative error"] = [outputs.relative_error(hidden[w, p], hidden["padded sdpa", p])
                              if hidden[w, p] is not None and hidden.get(("padded sdpa", p)) is not None else None
                              for w, p in zip(ways["way"], ways["asked"], strict=True)]
    padded_ms = ways[ways.way == "padded sdpa"].set_index("asked")["median_ms"]
    ways["speed-up over padded"] = ways["asked"].map(padded_ms) / ways["median_ms"]
    lab.table("padding_free", ways.drop(columns="asked"), title=f"{lab.p.sweep_model}, batch {b} x length {n}: the "
              "padded batch, then packed rows")

# %%
if not lab.p.sweep_problem:
    most, mixing = max(extremes), {}
    if most > 0 and hidden.get(("padded sdpa", most)) is not None:  # the trap: a packed row with less to go on
        mixing = {way: outputs.relative_error(way_call(way, padded[most], packed[most])(), hidden["padded sdpa", most])
                  for way in ("packed sdpa, no mask", "packed sdpa, no mask, no position_ids")}
        sweeping.set_attn_implementation("sdpa")
    for way, error in mixing.items():
        print(f"{way}: relative error {error:.2e} from the padded batch")
    failed = ways[ways["status"] != "ok"]
    for way, why in {**cannot, **dict(zip(failed["way"], failed["why"], strict=True))}.items():
        if why:
            lab.skip(way, why)

# %%
if not lab.p.sweep_problem:
    ran_here = ways[ways["status"] == "ok"]
    worst = ran_here["relative error"].max() if len(ran_here) else 0.0
    lab.check("padding_free_ways_match_the_padded_batch", len(ran_here) and worst <= lab.p.tolerance,
              f"largest relative error {worst:.2e}")
    for r in ran_here[ran_here.way != "padded sdpa"].to_dict("records"):
        lab.metric(f"padding_free_speedup_{r['way'].replace(' ', '_')}_b{b}_n{n}_pad{round(100 * r['padding'])}",
                   r["speed-up over padded"])
    if mixing:
        floor = 5 * max(worst, lab.p.tolerance / 100)  # far beyond rounding: 5x the worst error of a kept-apart way
        positions, nothing = mixing.values()  # with the restarting position_ids; with neither mask nor position_ids
        lab.check("packed_row_without_position_ids_mixes_its_sequences", nothing > floor,
                  f"{nothing:.2e} without position_ids or a mask, {worst:.2e} with a mask")
        if compat.encoder_mask_from_position_ids():  # transformers 5.25 and newer build the mask from position_ids
            lab.check("restarting_position_ids_keep_packed_sequences_apart", positions <= lab.p.tolerance,
                      f"{positions:.2e} with position_ids and no mask")
        else:
            lab.check("packed_rows_need_a_mask_on_bidirectional_sdpa", positions > floor,
                      f"{positions:.2e} with position_ids and no mask, {worst:.2e} with a mask")

# %% [markdown]
# The "speed-up over padded" column is the answer for this machine, on the same sequences. "Tokens computed" is the
# work each way's linear layers did. The two lines under the table are the trap. A packed row without `position_ids`
# gives the encoder no way to see where sequences end; it numbers the positions straight through. Its output is wrong
# without any error. With the restarting `position_ids` and no mask, the output matches the padded batch where
# transformers builds the mask from them, from 5.25 on. Before that it is wrong in the same silent way.

# %% [markdown]
# ## What you measured

# %%
measured = [f"Of {len(ran)} ways of calling nn.TransformerEncoder, {ran['padding skipped'].sum()} packed the batch and "
            "skipped the padding; PyTorch said nothing when a call fell back, the profiler showed it."]
if not lab.p.model_problem:
    measured.append(f"The converted encoder matched transformers to a relative error of {relative:.1e}, with exact "
                    "zeros at the padding.")
    measured.append(f"Sentence embeddings ({padding_share:.0%} padding): the fastpath ran {embedding_speedup:.2f}x the "
                    "speed of transformers sdpa, with the same similarities.")
if sweep is not None:
    noisy = int(sweep["noisy"].sum())
    measured.append(f"At batch {best.batch} x length {best.length} with {best.padding:.0%} padding the fastpath ran "
                    f"{best['fastpath vs sdpa']:.2f}x transformers sdpa" + (" (a noisy point: not to be read)"
                                                                           if best.noisy else "")
                    + f", where a time proportional to the tokens computed would give {best.ideal:.2f}x"
                    + (f"; {noisy} sweep point{'s' * (noisy != 1)} stayed noisy after a re-measurement and support "
                       "no conclusion." if noisy else "."))
    measured.append(f"At the sweep's headline point the fastpath did the real tokens' work at "
                    f"{point.loc['fastpath', 'fraction of ceiling']:.0%} of this machine's matmul ceiling.")
    measured.append(f"The floor, one 8-token sequence through the fastpath, took {floor_ms:.2f} ms: a batch that takes "
                    "little more than that is bound by issuing kernels, not by padding.")

# %%
if not lab.p.sweep_problem and (ran_here.way != "padded sdpa").any():
    packed_ways = ran_here[ran_here.way != "padded sdpa"]
    top = packed_ways.sort_values(["padding", "speed-up over padded"]).iloc[-1]  # the most padding, the fastest way
    measured.append(f"Packing the same sequences into one row without padding ({top.way}) ran "
                    f"{top['speed-up over padded']:.2f}x the padded batch at {top.padding:.0%} padding.")
lab.finish(measured)
