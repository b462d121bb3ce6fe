# ---
# jupyter:
#   kernelspec:
#     display_name: Python (legacy BetterTransformer)
#     language: python
#     name: labkit-legacy
# ---

# %% [markdown]
# # Legacy track: the source page's BetterTransformer code, run for real
#
# Many learners arrive with a page that teaches `model.to_bettertransformer()` (from `optimum`) for OPT and for BERT
# encoders, and `torch.backends.cuda.sdp_kernel(...)` to force Flash Attention. On today's stack both are gone or
# deprecated: notebook 02 shows the `AttributeError` and notebook 03 shows what replaced the encoder half. This
# notebook runs the original code in an environment where it still works, so you can see what it did, check that it
# gave the same answers, and put its speed next to today's path on the same machine.
#
# **Kernel.** It runs in its own kernel, *Python (legacy BetterTransformer)*, which `make legacy` builds: a
# `.venv-legacy` with transformers 4.48.3 and optimum 1.27.0 (optimum's BetterTransformer refuses transformers 4.49
# and newer), the same torch as the main kernel, and labkit for timing and results. In JupyterLab, pick that kernel
# from the kernel menu. In the main kernel the first cells stop with one sentence saying so.
#
# **What to expect.** On OPT, BetterTransformer swaps each attention layer for one that calls
# `scaled_dot_product_attention`: the greedy tokens must be identical to eager ones. On BERT it swaps each encoder
# layer for PyTorch's fused `TransformerEncoderLayer` fastpath, which packs a padded batch into a nested tensor and
# skips the padding: it should be faster than eager attention as padding grows, and its outputs must match eager ones
# at the real tokens. Then the same batches run through transformers' own `sdpa` (here, 4.48) and through labkit's
# fastpath converter (notebook 03), which does what BetterTransformer did for encoders on today's stack.

# %% tags=["parameters"]
# Parameters (papermill overrides this cell). A size of 0 means: sized for this device.
device = "auto"                       # auto, cpu, cuda or cuda:N
decoder_ids = ["tiny-opt"]            # OPT decoders; "facebook/opt-350m" works when it is in your Hugging Face cache
encoder_ids = ["tiny-bert", "minilm-l6"]  # BERT-family encoders to convert
prompt = "Hello my dog is cute and"
max_new_tokens = 20
padding_fractions = [0.0, 0.25, 0.5, 0.75]  # share of padded positions in an encoder batch
batch = 0                             # sentences per encoder batch (0: as notebook 03's sweep, 8 on CPU, 64 on a GPU)
length = 0                            # padded length of an encoder batch (0: 128 on CPU, 256 on a GPU)
quick = "auto"                        # small sizes: "auto" means without a GPU; True or False to force
results_path = ""                     # where to write the results JSON (empty: do not write)

# %%
import copy
import importlib.metadata
import importlib.util
import warnings

import pandas as pd
import torch
import transformers

from labkit import fastpath, models, probes, results, timing, widgets
from labkit.errors import BadParameter, check_sizes
from labkit.paths import cache_dir

widgets.short_errors()  # a bad parameter below stops the notebook with one sentence, not a traceback
too_new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 49)
no_optimum = importlib.util.find_spec("optimum") is None
if too_new or no_optimum:
    raise BadParameter("this notebook runs in the kernel 'Python (legacy BetterTransformer)' that `make legacy` "
                       "builds: BetterTransformer needs optimum 1.x and transformers < 4.49, and this kernel has "
                       f"transformers {transformers.__version__}{' and no optimum' if no_optimum else ''}.")
if device == "auto":
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
if device.startswith("cuda") and not torch.cuda.is_available():
    raise BadParameter(f"device={device!r}, but this machine has no usable CUDA GPU; use device='auto' or 'cpu'.")
on_gpu = device.startswith("cuda")
quick = (not on_gpu) if quick == "auto" else bool(quick)
dtype = torch.float16 if on_gpu else torch.float32
bad = [p for p in padding_fractions if not 0 <= p < 1]
if not padding_fractions or bad or 0 not in padding_fractions:
    raise BadParameter(f"padding_fractions={padding_fractions!r}: give fractions in [0, 1), 0 among them, "
                       "for example [0.0, 0.5, 0.75].")
check_sizes(0, batch=batch, length=length)
check_sizes(1, max_new_tokens=max_new_tokens)
batch = batch or (64 if on_gpu else 8)   # points of notebook 03's sweep, so a run of both can be compared
length = length or (256 if on_gpu else 128)
padding_fractions = sorted(set(padding_fractions))
repeats = 3 if quick else 5
tolerance = 1e-2 if on_gpu else 1e-4    # relative, float16 on a GPU and float32 on a CPU
res = results.Results("bettertransformer", results_path, env=probes.environment(),
                      timing_checks=device.startswith("cuda"))  # on a CPU a timing claim is an observation
versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "optimum", "accelerate")}
widgets.show([{"package": k, "version": v} for k, v in versions.items()], title="This kernel")
print(f"Working on {device} in {str(dtype).removeprefix('torch.')}; encoder batches {batch} x {length}, "
      f"padding {padding_fractions}")

# %% [markdown]
# ## 1. The models, built for transformers 4.48
#
# The embedded models come from the main install: tiny-opt and tiny-bert have random weights and the same shapes as in
# notebooks 02 and 03 (`labkit.models.random_config`), with the tokenizers of smollm2-135m and minilm-l6; minilm-l6 has
# real weights. Each is built with `attn_implementation="eager"`, because BetterTransformer converts eager layers only;
# the decoders in float32 on every device, so that their greedy tokens can be compared exactly.

# %%
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast


def tokenizer_folder(name):
    """The folder of an embedded model's tokenizer, or the reason it is not here."""
    if name == "smollm2-135m":
        folder = cache_dir() / "models" / "smollm2-135m"
        return (folder, "") if models.complete(folder) else \
            (None, f"smollm2-135m is not converted yet in {folder.parent}: run `make install` (labkit prepare) "
                   "in the main venv")
    try:
        return models.minilm_folder(), ""
    except Exception as err:  # ModelNotAvailable: the package is not installed in this venv
        return None, str(err)


def build(name, task):
    """(model, tokenizer, reason): a model for transformers 4.48 in eager attention, or the reason it cannot be had.

    Decoders are built in float32 on every device, so that greedy tokens can be compared exactly (as notebook 02
    does)."""
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    dtype_here = torch.float32 if task == "causal-lm" else dtype
    spec = models.EMBEDDED.get(name)
    if spec is None:  # a Hub id: only from the local cache, the Hub is not reachable here
        try:
            model = auto.from_pretrained(name, attn_implementation="eager", torch_dtype=dtype_here,
                                         local_files_only=True)
            return model.to(device).eval(), AutoTokenizer.from_pretrained(name, local_files_only=True), ""
        except OSError as err:
            return None, None, f"{name} is not in the Hugging Face cache ({str(err).splitlines()[0][:120]})"
    folder, reason = tokenizer_folder(spec.tokenizer_from or name)
    if folder is None:
        return None, None, reason
    # smollm2-135m's folder was saved by transformers 5, whose tokenizer class 4.48 does not know: its tokenizer.json
    # is the same format, so the generic fast tokenizer reads it
    loader = PreTrainedTokenizerFast if (spec.tokenizer_from or name) == "smollm2-135m" else AutoTokenizer
    tokenizer = loader.from_pretrained(str(folder))
    if spec.kind == "random":
        special = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        torch.manual_seed(0)
        model = auto.from_config(models.random_config(name, len(tokenizer), special), attn_implementation="eager",
                                 torch_dtype=dtype_here)
    else:
        model = auto.from_pretrained(str(folder), attn_implementation="eager", torch_dtype=dtype_here)
    return model.to(device).eval(), tokenizer, ""


rows = []
built = {}
for name in decoder_ids + encoder_ids:
    model, tokenizer, reason = build(name, "causal-lm" if name in decoder_ids else "encoder")
    if model is None:
        res.skip(f"{name} in the legacy kernel", reason)
    else:
        built[name] = (model, tokenizer)
    rows.append({"model": name, "type": model.config.model_type if model else "-",
                 "parameters (M)": sum(p.numel() for p in model.parameters()) / 1e6 if model else None,
                 "built": "yes" if model else reason})
widgets.show(rows, title="Models")

# %% [markdown]
# ## 2. The decoder: `model.to_bettertransformer()` on OPT
#
# The source page's snippet, as it was written for `facebook/opt-350m`:
#
# ```python
# model = AutoModelForCausalLM.from_pretrained("facebook/opt-350m")
# model.to_bettertransformer()
# ```
#
# On transformers 4.48 the snippet as written stops at its second line: `from_pretrained` now picks
# `attn_implementation="sdpa"` for OPT and BERT when nothing is said, and optimum 1.27 refuses a model that uses it
# ("This model already uses BetterTransformer optimizations from Transformers"). Section 1 built every model with
# `attn_implementation="eager"`: the one change the snippet needs here.
#
# The call needs no assignment: optimum's `BetterTransformer.transform(model, keep_original_model=False)` swaps the
# layers of `model` itself (and returns it too). Then `generate` as usual. We convert a copy, so that the eager model
# stays for the comparison: the greedy tokens of both must be identical, and the time per generated token shows what
# the conversion bought on this machine.

# %%
decoder_rows, converted = [], {}
for name in decoder_ids:
    if name not in built:
        continue
    model, tokenizer = built[name]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        bt_model = copy.deepcopy(model).to_bettertransformer()  # the source page's call
    converted[name] = bt_model
    inputs = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False).to(device)
    tokens, rates = {}, {}
    for label, m in (("eager", model), ("BetterTransformer", bt_model)):
        def generate(m=m, inputs=inputs, pad=tokenizer.pad_token_id):
            with torch.inference_mode():
                return m.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=pad)
        tokens[label] = generate()[0, inputs.input_ids.shape[1]:].tolist()
        t = timing.measure(generate, device=device, warmup=1, repeats=repeats)
        rates[label] = max_new_tokens / (t.median_ms / 1e3)
        decoder_rows.append({"model": name, "path": label, "tokens/s": rates[label], "median ms": t.median_ms,
                             "continuation": tokenizer.decode(tokens[label])[:60]})
        res.metric(results.metric_name("decode", name, label, "tokens_per_s"), rates[label])
    layer = type(bt_model.model.decoder.layers[0].self_attn).__name__
    print(f"{name}: after to_bettertransformer() the attention layers are {layer}; "
          f"warnings while converting: "
          f"{sorted({type(w.message).__name__ + ': ' + str(w.message)[:80] for w in said}) or 'none'}")
    res.check(results.metric_name("bettertransformer_tokens_identical", name),
              tokens["eager"] == tokens["BetterTransformer"])
widgets.show(decoder_rows, title=f"Greedy generation, {max_new_tokens} new tokens")

# %% [markdown]
# The source page then forced Flash Attention around `generate` with `torch.backends.cuda.sdp_kernel`. That context
# manager is deprecated in today's torch (notebook 01 shows its replacement, `torch.nn.attention.sdpa_kernel`); here
# it runs as written, and its `FutureWarning` is caught and shown.
#
# Look at the page's snippet once more: `from_pretrained("facebook/opt-350m")` with no `torch_dtype` loads the weights
# in float32 in transformers 4.x (its docstring: "If not specified - the model will get loaded in `torch.float`
# (fp32)"), and on a GPU PyTorch's Flash kernel takes only float16 and bfloat16. Forcing Flash around a float32 model on
# a GPU is therefore exactly the page's own `RuntimeError: No available kernel.` (notebook 00 reproduces it). On a CPU,
# whose Flash kernel takes float32, the same code runs. The cell below runs the page's context on this machine and says
# which of the two you got.

# %% tags=["old-api-on-purpose"]
flash_rows = []
for name, bt_model in converted.items():
    tokenizer = built[name][1]
    inputs = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False).to(device)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            with torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False, enable_mem_efficient=False):
                with torch.inference_mode():
                    out = bt_model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                            do_sample=False, pad_token_id=tokenizer.pad_token_id)
            outcome = "ran: " + tokenizer.decode(out[0, inputs.input_ids.shape[1]:])[:50]
        except RuntimeError as err:
            outcome = "failed: " + str(err).strip().splitlines()[0][:120]
    deprecations = sorted({str(w.message).split(". ")[0] for w in said if issubclass(w.category, FutureWarning)})
    flash_rows.append({"model": name, "Flash only": outcome, "FutureWarning": "; ".join(deprecations) or "none"})
    res.check(results.metric_name("old_sdp_kernel_warns", name), bool(deprecations))
widgets.show(flash_rows, title="The source page's Flash-only context")

# %% [markdown]
# ## 3. The encoder: BetterTransformer on BERT, against eager, sdpa and labkit's fastpath
#
# For each encoder and each padding fraction, the same right-padded batch (labkit's `fastpath.padded_batch`, the one
# notebook 03 uses) goes through four paths in this kernel:
#
# - **eager**: transformers 4.48's BERT with eager attention, computing on every padded position;
# - **sdpa**: the same weights with transformers' own `attn_implementation="sdpa"`;
# - **BetterTransformer**: `model.to_bettertransformer()`, PyTorch's fused encoder layer on a nested tensor;
# - **labkit fastpath**: `fastpath.to_fastpath(model)`, notebook 03's converter onto the same PyTorch fastpath.
#
# What to expect: the two fastpath versions should track each other and fall in time as padding grows; eager and sdpa
# should not. Their outputs at the real tokens must match eager ones.

# %%
encoder_rows, agreement, timings = [], [], []
floors = {}
for name in encoder_ids:
    if name not in built:
        continue
    eager, tokenizer = built[name]
    # the same weights with transformers' own SDPA attention (4.48 picks the attention class when it builds a layer)
    sdpa = AutoModel.from_config(copy.deepcopy(eager.config), attn_implementation="sdpa", torch_dtype=dtype)
    sdpa.load_state_dict(eager.state_dict())
    sdpa = sdpa.to(device).eval()
    attention_class = type(sdpa.encoder.layer[0].attention.self).__name__
    res.check(results.metric_name("sdpa_copy_runs_sdpa_attention", name), "Sdpa" in attention_class, attention_class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimum's notices about the conversion
        bt = copy.deepcopy(eager).to_bettertransformer()
    fast = fastpath.to_fastpath(eager)

    def run_hf(m, b):
        with torch.inference_mode():
            return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state

    def run_fast(b, fast=fast):
        with torch.inference_mode():
            return fast(b["input_ids"], b["attention_mask"]).last_hidden_state

    paths = {"eager": lambda b, m=eager: run_hf(m, b), "sdpa": lambda b, m=sdpa: run_hf(m, b),
             "BetterTransformer": lambda b, m=bt: run_hf(m, b), "labkit fastpath": run_fast}
    tiny = fastpath.padded_batch(tokenizer, batch=1, length=8, padding_fraction=0.0, device=device)
    floors[name] = timing.measure(lambda run=paths["BetterTransformer"], tiny=tiny: run(tiny), device=device, warmup=1,
                                  repeats=repeats).p10_ms
    for p in padding_fractions:
        b = fastpath.padded_batch(tokenizer, batch=batch, length=length, padding_fraction=p, device=device)
        real = b["attention_mask"].bool()
        reference = run_hf(eager, b).float()
        row = {"model": name, "padding": round(b["padding_fraction"], 3)}
        for label, call in paths.items():
            out = call(b).float()
            error = float((out[real] - reference[real]).norm() / reference[real].norm())
            agreement.append({"model": name, "padding": row["padding"], "path": label, "relative error": error})
            t = timing.measure(lambda call=call, b=b: call(b), device=device, warmup=1, repeats=repeats)
            row[f"{label} ms"] = t.median_ms
            row[f"{label} p10"] = t.p10_ms
            timings.append({"model": name, "batch": batch, "length": length, "padding": p,  # as asked, as 03 does
                            "path": label, "median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms})
        encoder_rows.append(row)
res.table("timings", pd.DataFrame(timings, columns=["model", "batch", "length", "padding", "path", "median_ms",
                                                    "p10_ms", "p90_ms"]))  # what the run report joins with 03
widgets.show([{k: v for k, v in r.items() if not k.endswith("p10")} for r in encoder_rows],
             title=f"Median ms per batch of {batch} x {length}")

# %%
worst = {}
for r in agreement:
    worst[r["path"]] = max(worst.get(r["path"], 0.0), r["relative error"])
widgets.show([{"path": k, "largest relative error at real tokens": v, "tolerance": tolerance}
              for k, v in worst.items()],
             title="Against eager, every model and padding level")
if agreement:
    res.check("bettertransformer_matches_eager", worst["BetterTransformer"] <= tolerance,
              f"{worst['BetterTransformer']:.1e}")
    res.check("labkit_fastpath_matches_eager", worst["labkit fastpath"] <= tolerance, f"{worst['labkit fastpath']:.1e}")
else:
    res.skip("encoder outputs against eager", "no encoder of encoder_ids could be built")

# %% [markdown]
# The speed-ups, per padding level: BetterTransformer against eager (what the source page promised), and labkit's
# fastpath against BetterTransformer (whether today's converter keeps what was lost). The figure shows real tokens per
# second (padding does not count) for the four paths.

# %%
most = max(padding_fractions)
for r in encoder_rows:
    r["BT vs eager"] = r["eager ms"] / r["BetterTransformer ms"]
    r["BT vs sdpa"] = r["sdpa ms"] / r["BetterTransformer ms"]
    r["labkit fastpath vs BT"] = r["BetterTransformer ms"] / r["labkit fastpath ms"]
    res.metric(results.metric_name("speedup_bettertransformer_vs_eager", r["model"], f"pad{round(100 * r['padding'])}"),
               r["BT vs eager"])
widgets.show([{k: r[k] for k in ("model", "padding", "BT vs eager", "BT vs sdpa", "labkit fastpath vs BT")}
              for r in encoder_rows],
             title="Speed-ups (above 1: the first is faster)")
if encoder_rows:
    from labkit import plots

    data = pd.DataFrame([{"model": r["model"], "padding": r["padding"], "implementation": label,
                          "real tokens/s": batch * length * (1 - r["padding"]) / (r[f"{label} ms"] / 1e3)}
                         for r in encoder_rows for label in ("eager", "sdpa", "BetterTransformer", "labkit fastpath")])
    fig = plots.lines(data, x="padding", y="real tokens/s", series="implementation", panel="model",
                      xlabel="padding fraction",
                      title=f"Legacy BetterTransformer and today's paths, {batch} x {length} on {device}")
    res.figure("real_tokens_per_s_vs_padding", fig)
    # The claim is checked where padding leaves the most to skip, on the model with the most work, and only where
    # that work outweighs the floor (one 8-token call): below it, nothing can get faster by skipping padding.
    name = max({r["model"] for r in encoder_rows}, key=lambda n: sum(p.numel() for p in built[n][0].parameters()))
    top = next(r for r in encoder_rows if r["model"] == name and abs(r["padding"] - most) < 0.05)
    print(f"{name}: at {most:.0%} padding BetterTransformer takes {top['BetterTransformer p10']:.2f} ms, eager "
          f"{top['eager p10']:.2f} ms (fastest 10%); the floor, one 8-token call, takes {floors[name]:.2f} ms")
    if most < 0.5:
        res.skip("BetterTransformer against eager with padding",
                 f"the largest padding fraction is {most:.0%}; the claim is for 50% or more")
    elif top["eager p10"] < 2 * floors[name]:
        res.skip("BetterTransformer against eager with padding",
                 f"eager takes only {top['eager p10'] / floors[name]:.1f}x the floor here: the time is each call's "
                 "fixed cost, not the work")
    else:
        res.check("bettertransformer_beats_eager_with_padding", top["BetterTransformer p10"] < top["eager p10"],
                  f"{name}, {most:.0%} padding: x{top['eager p10'] / top['BetterTransformer p10']:.2f}", timing=True)

# %% [markdown]
# In the speed-up table, a 'BT vs eager' that rises above 1 as padding grows means the nested-tensor fastpath skipped
# the padding; 'labkit fastpath vs BT' near 1 means today's converter kept that gain. A 'Skipped:' or 'Not seen on this
# machine' line above says where this machine did not show it. To put the numbers beside today's stack in one report,
# run the comparison from a terminal in the repository:
#
# ```bash
# make compare-legacy
# # labkit run --notebooks 02,03,legacy -p sweep_model=minilm-l6 --out runs/legacy-compare: one report with the table
# # "Legacy BetterTransformer against today's path"
# ```
#
# The report joins this notebook's numbers with notebook 03's sweep at the same batch, length and padding (transformers
# 5's sdpa and labkit's fastpath, in the main kernel). Back to [notebook 02](../02_decoders_and_generation.ipynb) and
# [notebook 03](../03_encoder_fastpath.ipynb).

# %%
res.write()
held = sum(res.checks.values())
print(f"{held} of {len(res.checks)} claims held on this machine; "
      f"{len(res.skipped)} parts skipped (each said why above).")
