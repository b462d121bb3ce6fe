# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · 4-bit and 8-bit weights: what they save in memory and in time, and which kernel runs
#
# What do 4-bit and 8-bit weights save on your machine, in memory and in time, and what do they cost in quality? The
# source page loads OPT with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)`. It
# generates under `sdp_kernel(enable_flash=True, ...)`, which leaves cuDNN attention on too. This notebook measures
# each format:
#
# 1. **what is stored**: bitsandbytes' FP4, NF4 (with and without double quantization) and LLM.int8, and torchao's
#    int8 and int4 weight-only formats (float8 on a GPU that has float8 units); the footprint predicted from the
#    model's own tensors, then counted from what each quantized model really holds;
# 2. **the config**: what `BitsAndBytesConfig(load_in_4bit=True)` fills in when you say nothing else, and which
#    attention kernel runs under a Flash-only context;
# 3. **quality**: perplexity on a text shipped with the workbook, and how far each format moved the model's
#    next-token distributions; then today's FP8, MXFP4 and NVFP4, written by hand and scored the same way;
# 4. **speed**: prefill, and decode at batch 1 and 8 against each format's own bandwidth bound;
# 5. **quantization for speed**: which kernel each torchao format runs, under the profiler; the batch size where
#    weight-only quantization stops helping; the compiled one-token step of notebook 02 with int4 weights;
# 6. **a summary**: which formats saved memory, which saved time, on this machine.
#
# Both libraries also run on a CPU (bitsandbytes slowly). A format this machine cannot run is skipped, with the reason.

# %% tags=["parameters"]
# Parameters (papermill overrides this cell). A size of 0 means: sized for this device.
device = "auto"            # auto, cpu, cuda or cuda:N
compute_dtype = "auto"     # auto picks bfloat16 where it is native (and on a CPU), else float16
model_id = "smollm2-135m"  # a causal language model with real weights
formats = ["16-bit", "fp4", "nf4", "nf4-double", "int8", "torchao-int8", "torchao-int4", "torchao-float8"]
prompt = "Hello my dog is cute and"
eval_tokens = 0            # tokens of the shipped text scored for perplexity
batch_sizes = [1, 8]       # decode batch sizes
new_tokens = 0             # tokens generated per decode measurement
quick = "auto"             # small sizes: "auto" means on a machine without a GPU; True or False to force
solutions = False          # fill every exercise with its solution (a teacher's run)
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
from labkit import footprint, models, outputs, plots, quant, roofline, timing
from labkit.widgets import show

lab = labkit.start("04_quantization", globals())
for what, why in lab.p.skipped.items():  # the formats this machine cannot run, each with its reason
    lab.skip(what, why)

# %%
show(lab.environment_rows(), ["item", "value"], title="Environment")

# %% [markdown]
# ## 1. What each format stores, predicted then counted
#
# Both libraries quantize the **weight matrices of the linear layers** and nothing else:
#
# * bitsandbytes' **FP4** and **NF4** store 4 bits per weight, in blocks of 64 weights. Each block shares one float32
#   scale, its *absmax*, and a 16-entry table holds the format's levels. NF4's 16 levels follow a normal distribution,
#   which matches trained weights better than FP4's floating-point levels. **Double quantization** stores the scales
#   themselves in 8 bits.
# * bitsandbytes' **LLM.int8** stores 8 bits per weight with one float32 scale per row. At run time it multiplies the
#   few large "outlier" input features in 16-bit. It casts bfloat16 inputs to float16 for its own quantization.
# * torchao's **int8 weight-only** stores 8 bits per weight with one scale per row. It is symmetric: the zero point it
#   also stores per row is always 0. torchao's **int4 weight-only** stores 4 bits per weight, with a scale and a zero
#   point per group of 64 weights along a row. torchao's default group is 128; SmolLM2's rows of 576 weights are not a
#   multiple of 128, hence 64. Both keep the activations in 16-bit.
# * Without `torch.compile`, torchao 0.18's int8 weight-only turns the whole int8 weight into a 16-bit copy on every
#   call, and multiplies by that: `torch.mm(x, qdata.t().to(dtype))` in its `int8_tensor.py`. So it reads more bytes
#   than the 16-bit model, not fewer. Only compiled does the conversion fuse into the product.
# * torchao's **float8** needs a GPU with float8 units. It stores the weights in 8-bit floating point and turns the
#   activations into float8 too, so that the matrix product itself runs on the float8 units.
# * What stays 16-bit: the **embeddings**, the **norms**, the **biases**, and everything computed at run time, such as
#   the activations and the **KV cache**. The **output layer**, `lm_head`, too: transformers keeps it in 16-bit
#   whether or not it is tied to the embeddings, and the torchao copies below get the same rule.
#
# So a model shrinks by less than 4x, and the smaller the model, the larger the share of its embeddings. **The
# prediction**: `footprint.predict_footprint` walks the 16-bit model's own tensors and prices each linear weight in each
# format, weights then scales. It does the same for a 1B-parameter Llama built on the meta device, which holds shapes
# and no memory.

# %%
model, tokenizer = models.load_model(model_id, device=lab.device, dtype=lab.dtype, attn_implementation="sdpa")
special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
with torch.device("meta"):  # a 1B-parameter Llama's shapes, no memory
    big = models.build_from_config(models.random_config("random-llama-1b", len(tokenizer), special), dtype=lab.dtype)
rows = []
for name in lab.p.formats:
    small, large = (footprint.predict_footprint(m, name, device=lab.device) for m in (model, big))
    rows.append({"format": name, f"{model_id} MiB": sum(small.values()) / 2**20,
                 "of which scales MiB": small["scales"] / 2**20, "random-llama-1b GiB": sum(large.values()) / 2**30})
predicted = pd.DataFrame(rows)
predicted.insert(3, "x smaller", predicted[f"{model_id} MiB"][0] / predicted[f"{model_id} MiB"])
predicted["random-llama-1b x smaller"] = predicted["random-llama-1b GiB"][0] / predicted["random-llama-1b GiB"]
lab.table("predicted", predicted, title="Predicted footprints")
share = [m.get_input_embeddings().weight.numel() / sum(p.numel() for p in m.parameters()) for m in (model, big)]
print(f"The input embeddings hold {share[0]:.0%} of {model_id}'s parameters and {share[1]:.0%} of random-llama-1b's.")

# %% [markdown]
# **04.1 · Predict.** A 4096 × 4096 linear layer stored in NF4 with blocks of 64 weights and a float32 scale per
# block (no double quantization): how many MiB?

# %%
nf4_layer = lab.exercise("04.1", rows=4096, cols=4096, blocksize=64)
answer = None  # your prediction, in MiB
nf4_layer.check(answer)

# %% [markdown]
# **04.2 · Predict.** The same layer in torchao's int4 weight-only format with groups of 128 weights along each row
# (torchao's default group size), each group keeping a bfloat16 scale and a bfloat16 zero point: how many MiB?

# %%
int4_layer = lab.exercise("04.2", rows=4096, cols=4096, group_size=128)
answer = None  # your prediction, in MiB
int4_layer.check(answer)

# %% [markdown]
# Now every format is made. bitsandbytes quantizes while loading: `from_pretrained(...,
# quantization_config=BitsAndBytesConfig(...))`. torchao quantizes a model already loaded, in place:
# `quantize_(model, config, filter_fn=...)` (here on a copy, so that the 16-bit model stays as the reference;
# transformers' `TorchAoConfig(config)` does the same inside `from_pretrained`). Then the bytes each model holds are
# counted from its tensors, beside what `get_memory_footprint()` reports, and the layer of 04.1 and 04.2 is quantized
# for real and counted too.

# %%
loaded = {"16-bit": model}
for name in lab.p.bnb_formats:  # bitsandbytes: quantized while loading
    config = quant.quantization_config(name, lab.dtype)  # a BitsAndBytesConfig
    loaded[name] = models.load_model(model_id, device=lab.device, dtype=lab.dtype, attn_implementation="sdpa",
                                     quantization_config=config)[0]
for name in lab.p.torchao_formats:  # torchao: quantize_(a copy of the 16-bit model, config, filter_fn)
    loaded[name] = quant.torchao_quantized(model, name, lab.device)
parts = {"kept": "16-bit part MiB", "weights": "quantized weights MiB", "scales": "scales MiB"}
rows = []
for name, m in loaded.items():
    counted = footprint.count_footprint(m)  # what each tensor really holds, bitsandbytes' and torchao's scales too
    rows.append({"format": name, **{parts[k]: b / 2**20 for k, b in counted.items()}, "total MiB": sum(
        counted.values()) / 2**20, "get_memory_footprint() MiB": m.get_memory_footprint() / 2**20})
held = pd.DataFrame(rows)
held["predicted MiB"] = held["format"].map(predicted.set_index("format")[f"{model_id} MiB"])
held["x smaller"] = held["total MiB"][0] / held["total MiB"]
lab.table("footprint", held, title=f"{model_id}: footprints counted from the tensors")

# %% tags=["reveals-04.1", "reveals-04.2"]
total, off = held.set_index("format")["total MiB"], held["total MiB"] - held["predicted MiB"]
lab.check("prediction_matches_counted_footprint", (off.abs() <= 0.01 * held["total MiB"]).all())
four_bit = total.reindex(["fp4", "nf4", "nf4-double"]).max()  # NaN when no 4-bit format ran
if "int8" in total and four_bit > 0:
    lab.check("footprint_ordering_16bit_int8_4bit", total["16-bit"] > total["int8"] > four_bit)
if "torchao-int8" in total and "torchao-int4" in total:
    lab.check("torchao_footprints_below_16bit_int8_above_int4",
              total["16-bit"] > total["torchao-int8"] > total["torchao-int4"])
for name, mib in total.items():
    lab.metric(f"footprint_{name.replace('-', '_')}_mib", mib)
if "nf4" in loaded:  # the layer of 04.1 and 04.2, quantized for real and counted
    nf4_layer.compare(quant.layer_footprint_mib("nf4", 4096, 4096, device=lab.device), "MiB")
if "torchao-int4" in loaded:
    int4_layer.compare(quant.layer_footprint_mib("torchao-int4", 4096, 4096, device=lab.device, group_size=128), "MiB")

# %% [markdown]
# What to look for: the counted totals should match the predictions; a "Not seen on this machine" line says so when
# they do not. `get_memory_footprint()` is right only for plain tensors. It multiplies each parameter's element count
# by the size of the dtype the parameter *presents*. So it misses bitsandbytes' scales, kept beside the parameter in
# its `quant_state`. And it counts every torchao weight as 16-bit: a torchao tensor subclass presents its 16-bit dtype
# while holding int8 or packed int4 values and their scales inside. The "16-bit part" column is what no format
# shrinks.
#
# **04.3 · Code.** What does int8 weight-only store for one row? Quantize a row yourself. `my_int8_row(row)` takes a
# row of weights and returns `(q, scale)`: `q` a `torch.int8` tensor, `scale` one number, with `q × scale ≈ row`. The
# format is symmetric: no zero point, levels from -128 to 127. The check runs your function on a fresh random row.
# `row_exercise.hint()` gives a hint. The cell after it compares your scale with the one torchao stored.

# %%
row_exercise = lab.exercise("04.3")


def my_int8_row(row):
    return None  # your code: one scale for the row, then q = the rounded levels, as torch.int8


answer = None  # once my_int8_row is written: answer = my_int8_row
row_exercise.check(answer)

# %%
if "torchao-int8" in loaded:  # the same row in the 16-bit model and in torchao's int8 copy
    name, stored = next((n, m.weight) for n, m in loaded["torchao-int8"].named_modules()
                        if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "qdata"))
    row = model.get_submodule(name).weight[0].float()
    q, scale = (row_exercise.answer if row_exercise.verdicts[-1] else row_exercise.exercise.solution)(row)
    off = (q.int() - stored.qdata[0].int()).abs()  # how many levels apart, weight by weight
    same = float((off == 0).float().mean())
    print(f"{name}, row 0: your scale {float(scale):.5g}; torchao stored {float(stored.scale.flatten()[0]):.5g}; "
          f"max|w| / 127.5 = {float(row.abs().max()) / 127.5:.5g}. Your levels equal torchao's at {same:.0%} of the "
          f"weights and differ by at most {int(off.max())}.")
    lab.check("int8_row_by_hand_is_within_one_level_of_torchao", int(off.max()) <= 1, f"{int(off.max())} levels")
else:
    lab.skip("your int8 row beside torchao's", "torchao-int8 is not among the formats that run here")

# %% [markdown]
# ## 2. The config: what `BitsAndBytesConfig(load_in_4bit=True)` fills in
#
# The source page writes `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)` and passes it
# to `from_pretrained(..., quantization_config=...)`: today's API. Its attention context is not. The page's
# `torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False, enable_mem_efficient=False)` is deprecated. It
# leaves a fourth switch, `enable_cudnn`, at `True`, so it allows Flash **or cuDNN** attention, not Flash alone. The
# source is `sdp_kernel` in torch 2.13's `torch/backends/cuda/__init__.py`. Notebook 01 reads the switches; notebook 02
# runs a padded batch under it. What the config leaves out matters more. Ask it:

# %%
from transformers import BitsAndBytesConfig

page_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)  # the source page's
bare_config = BitsAndBytesConfig(load_in_4bit=True)
print(f"The page's config: bnb_4bit_quant_type={page_config.bnb_4bit_quant_type!r}, "
      f"bnb_4bit_use_double_quant={page_config.bnb_4bit_use_double_quant}")
print(f"BitsAndBytesConfig(load_in_4bit=True) alone: bnb_4bit_compute_dtype={bare_config.bnb_4bit_compute_dtype}")
lab.check("bitsandbytes_4bit_defaults_to_fp4", page_config.bnb_4bit_quant_type == "fp4")

# %% [markdown]
# Leave out `bnb_4bit_quant_type` and you get **FP4**, not NF4: the page's model is stored in the format this
# notebook's `fp4` row measures, and section 3 shows what that costs in quality. `bnb_4bit_compute_dtype` is the
# dtype each 4-bit block is dequantized to for its matrix product (float32 when left out); what comes out of a layer,
# and so what attention and the KV cache see, stays in the `dtype=` the model was loaded in (the H100 run stored in
# `reference/nvidia-h100/partial-04_quantization.ipynb` loaded NF4 with a float32 compute dtype and still saw bfloat16
# activations). Notebook 01's rules apply to that dtype.
#
# Below, today's `sdpa_kernel(SDPBackend.FLASH_ATTENTION)` allows Flash alone. It wraps one forward pass of the FP4
# model on one unpadded prompt, with the profiler watching. A padded batch would fail there on a GPU, since the CUDA
# Flash kernel takes no mask (notebook 02 shows it).

# %%
from torch.nn.attention import SDPBackend, sdpa_kernel

if "fp4" not in loaded:
    lab.skip("Flash-only attention on the FP4 model", "fp4 is not among the formats that run here")
else:
    batch = tokenizer([prompt], return_tensors="pt").to(lab.device)

    def flash_only():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.inference_mode():
            return loaded["fp4"](**batch)

    try:
        seen = timing.ops_that_ran(flash_only, lab.device)
        print(f"Under sdpa_kernel(FLASH_ATTENTION) the FP4 model ran {seen.backend} ({seen.evidence}); "
              f"its output is {flash_only().logits.dtype}.")
        lab.check("fp4_model_runs_flash_attention", seen.backend == "FLASH_ATTENTION")
    except RuntimeError as err:  # Flash refused this input on this device: the reason is the lesson
        lab.skip("Flash-only attention on the FP4 model", str(err).strip().splitlines()[0])

# %% [markdown]
# ## 3. Quality: perplexity and KL divergence
#
# **Perplexity** is exp(mean negative log-likelihood) of each token of a text given the ones before it: lower is
# better, and a model that spread its bets evenly over V tokens would score V. The text is shipped with the workbook
# (written for it, so no model has memorised it). The **KL divergence** KL(P‖Q) = Σ p·log(p/q) measures, position by
# position, how far a format's next-token distribution Q moved from the 16-bit model's P, averaged over the text.
# With natural logarithms its unit is the **nat** (1 nat = 1/ln 2 ≈ 1.44 bits); 0 means the same distribution. Be
# aware that the embedded SmolLM2's weights went through a 4-bit GGUF format once already (notebook 00), so the
# "16-bit" reference is itself a dequantized model.
#
# **04.4 · Predict.** Of the formats this run measures, which one will move the next-token distributions least from
# 16-bit (the smallest KL divergence)? The next two cells measure and then check your answer.

# %%
closest = lab.exercise("04.4", kl={})  # the cell after the next fills in the KL divergences measured
print("formats:", ", ".join(lab.p.formats[1:]))
answer = None  # a format name, for example "nf4"

# %%
import math

text_ids = tokenizer(quant.sample_text(), return_tensors="pt").input_ids[:, :lab.p.eval_tokens]
reference = quant.score(model, text_ids)  # the 16-bit model: its log-likelihoods and next-token distributions
rows = []
for name, m in loaded.items():
    scored = reference if m is model else quant.score(m, text_ids, reference=reference)  # KL(P_16-bit || P_format)
    rows.append({"format": name, "mean NLL": scored["mean_nll"], "KL vs 16-bit (nats)": scored["kl"]})
quality = pd.DataFrame(rows)
quality.insert(1, "perplexity", quality["mean NLL"].map(math.exp))  # exp(mean negative log-likelihood)
quality.insert(2, "change", quality["perplexity"] / quality["perplexity"][0] - 1)
lab.table("quality", quality, title=f"Quality on {reference['tokens']} tokens of the shipped text")
if model_id in models.RANDOM:  # nothing learned: a perplexity near the vocabulary's size
    print(f"{model_id} has random weights: perplexity {quality['perplexity'][0]:,.0f} against a vocabulary of "
          f"{len(tokenizer):,}. These rows compare formats on noise; smollm2-135m has real weights.")
lab.check("perplexities_finite", quality["perplexity"].map(math.isfinite).all())
for name, r in quality.set_index("format").iterrows():
    lab.metric(f"perplexity_{name.replace('-', '_')}", r["perplexity"])
    lab.metric(f"kl_vs_16bit_{name.replace('-', '_')}", r["KL vs 16-bit (nats)"])

# %% tags=["reveals-04.4"]
kl = quality.set_index("format")["KL vs 16-bit (nats)"].drop("16-bit")
closest.given["kl"] = kl.to_dict()
closest.check(answer)
if closest.given["kl"]:
    closest.compare(kl.idxmin())
if "fp4" in kl and "nf4" in kl:
    fp4, nf4 = quality.set_index("format").loc[["fp4", "nf4"], "perplexity"]
    print(f"FP4, the default when bnb_4bit_quant_type is left out, moved the distributions {kl['fp4']:.3f} nats "
          f"(perplexity {fp4:.1f}); NF4, at the same size, {kl['nf4']:.3f} nats (perplexity {nf4:.1f}).")
else:
    print("FP4 and NF4 did not both run here, so the cost of the default is not measured on this machine.")

# %% [markdown]
# The H100 run stored in `reference/nvidia-h100/partial-04_quantization.ipynb` scored the whole shipped text. Its
# quality table shows the same order: NF4 moved the distributions less than FP4, and LLM.int8 least of all. Asking for
# `bnb_4bit_quant_type="nf4"` costs one argument and no memory. Where weights keep more bits, they keep more of the
# model.

# %% [markdown]
# ### Today's formats, computed by hand: FP8, MXFP4 and NVFP4
#
# Deployments today mostly use floating-point formats with many small scales, not the integers above.
#
# - **FP8** (E4M3: 4 exponent bits, 3 mantissa bits, largest value 448) runs on GPUs of compute capability 8.9 and
#   newer. Its scale covers a whole tensor, a row, or a block of 128 × 128 weights. Blocks are the layout of
#   DeepSeek-V3's checkpoints and the default of transformers' `FineGrainedFP8Config`. transformers quantizes a weight
#   only where the block divides both of its sides, and leaves the others in 16 bits: a model whose layers are, say,
#   576 wide (4.5 × 128) needs a smaller block. The cells below use the largest block up to 128 that divides them all.
# - **MXFP4**, the Open Compute Project's microscaling format, stores 4-bit floats (E2M1: 0, 0.5, 1, 1.5, 2, 3, 4 and
#   6, each with a sign). Every 32 values share one power-of-two scale. gpt-oss ships its experts in it.
# - **NVFP4**, NVIDIA Blackwell's format, stores the same 4-bit floats. Every 16 values share an FP8 scale, and one
#   FP32 scale per tensor keeps those scales in FP8's range.
#
# Products of FP4 values need compute capability 10.0 (Blackwell); transformers 5.25 also runs MXFP4 checkpoints
# (gpt-oss's) from 7.5 with its Triton kernels. The numbers each format keeps can be computed anywhere, so the cells
# below write each format by hand. They check the 4-bit ones against torchao's reference code, then put every weight
# of the model's layers through each format and score it as above.
#
# **Predict.** MXFP4 and NVFP4 both keep 4-bit values. Which one keeps the weights closer, and why?

# %%
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # every magnitude a 4-bit float (E2M1) holds


def to_e2m1(x):
    """Round to the nearest 4-bit float (E2M1), a tie to the even code as hardware does; above 6 stays 6."""
    a = x.abs().clamp(max=6)
    # one mantissa bit: from 2^e to 2^(e+1) the step is 2^(e-1); below 1 (0 and 0.5, subnormal) the step is 0.5
    step = 2.0 ** (torch.floor(torch.log2(a.clamp(min=1))) - 1)
    return torch.round(a / step) * step * x.sign()  # torch.round sends a tie to the even multiple of the step


assert torch.equal(to_e2m1(E2M1), E2M1)  # each 4-bit float rounds to itself
print("0.25, 0.75, 2.5, 5 and 7 round to", to_e2m1(torch.tensor([0.25, 0.75, 2.5, 5.0, 7.0])).tolist())

# %%
def mxfp4(w):  # 32 values share a power-of-two scale that puts their largest in [4, 8): 6 = 1.5 × 2², so 2 below
    blocks = w.reshape(-1, 32)
    scale = 2.0 ** (torch.floor(torch.log2(blocks.abs().amax(1, keepdim=True).clamp(min=2.0**-126))) - 2)
    return (to_e2m1(blocks / scale) * scale).reshape(w.shape), scale


def nvfp4(w):  # 16 values share an FP8 scale; one FP32 scale per tensor puts the largest FP8 scale at 448
    blocks = w.reshape(-1, 16)
    tensor_scale = blocks.abs().amax() / (6 * 448)
    block_scale = (blocks.abs().amax(1, keepdim=True) / 6 / tensor_scale).clamp(torch.finfo(torch.float8_e4m3fn).tiny)
    block_scale = block_scale.to(torch.float8_e4m3fn).float()
    kept = to_e2m1(blocks * ((1 / tensor_scale) / block_scale))  # torchao's order of operations: ties round alike
    return (kept * (block_scale * tensor_scale)).reshape(w.shape), block_scale

# %%
def fp8(w, block):  # E4M3 values, one FP32 scale per block[0] × block[1] weights (the block divides w's sides)
    tiles = w.reshape(w.shape[0] // block[0], block[0], w.shape[1] // block[1], block[1])
    scale = tiles.abs().amax((1, 3), keepdim=True).clamp(min=1e-12) / 448  # the largest lands on 448
    return ((tiles / scale).to(torch.float8_e4m3fn).float() * scale).reshape(w.shape), scale


# the weights every format can take: each linear layer's but the output layer's, rows a whole number of 32-blocks
linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features % 32 == 0
           and m is not model.get_output_embeddings()]
sides = sorted({side for n in linears for side in model.get_submodule(n).weight.shape})
block = math.gcd(128, *sides)  # the largest power of two up to 128 that divides every side
# name: (quantize-dequantize, bits per stored value, bits per scale); NVFP4's one FP32 scale per matrix is left out
TODAY = {"fp8 per tensor": (lambda w: fp8(w, w.shape), 8, 32),
         "fp8 per row": (lambda w: fp8(w, (1, w.shape[1])), 8, 32),
         f"fp8 per {block}x{block} block": (lambda w: fp8(w, (block, block)), 8, 32),
         "mxfp4": (mxfp4, 4, 8), "nvfp4": (nvfp4, 4, 8)}

# %%
weight = model.get_submodule(linears[0]).weight.detach().float().cpu()
if quant.torchao_problem():
    lab.skip("4-bit formats checked against torchao", quant.torchao_problem())
else:  # torchao's reference implementations of both 4-bit formats, run on the same weight
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

    scale, data = to_mx(weight, torch.float4_e2m1fn_x2, 32)
    same_mx = torch.equal(mxfp4(weight)[0], to_dtype(data, scale, torch.float4_e2m1fn_x2, 32, torch.float32))
    theirs = NVFP4Tensor.to_nvfp4(weight, per_tensor_scale=weight.abs().amax() / (6 * 448)).dequantize(torch.float32)
    same_nv = torch.equal(nvfp4(weight)[0], theirs)
    print(f"by hand against torchao, every value of a {tuple(weight.shape)} weight: MXFP4 equal {same_mx}, "
          f"NVFP4 equal {same_nv}")
    lab.check("fp4_formats_by_hand_match_torchao", same_mx and same_nv, "MXFP4 and NVFP4 written in the cell")

# %% [markdown]
# Now every linear layer of the model's blocks whose rows split into blocks of 32, in each format: its stored bits
# counted from the tensors (values plus scales), how far the weights moved (relative error, ‖W − Q(W)‖ / ‖W‖, over all
# of them), and what that did to the next-token distributions. The embedding and output layer stay in 16 bits, as
# bitsandbytes leaves them.

# %%
import copy
import importlib.util

rows, fake = [], copy.deepcopy(model)  # one copy: each format overwrites its layers from the 16-bit model's weights
for name, (quantize, value_bits, scale_bits) in TODAY.items():
    bits, values, moved, norm = 0, 0, 0.0, 0.0
    for layer in linears:
        w = model.get_submodule(layer).weight.data.float()
        kept, scale = quantize(w)
        bits, values = bits + w.numel() * value_bits + scale.numel() * scale_bits, values + w.numel()
        moved, norm = moved + float((kept - w).square().sum()), norm + float(w.square().sum())
        fake.get_submodule(layer).weight.data = kept.to(model.dtype)
    scored = quant.score(fake, text_ids, reference=reference)
    rows.append({"format": name, "bits per weight": bits / values, "weight error": (moved / norm) ** 0.5,
                 "perplexity": scored["perplexity"], "KL vs 16-bit (nats)": scored["kl"]})
del fake
today = pd.DataFrame(rows)
lab.table("today_formats", today, title=f"By hand, every linear layer (sides {sides}); FP8 blocks {block} x {block}")

# %%
by = today.set_index("format")
print(f"NVFP4 moved the weights {by.loc['nvfp4', 'weight error']:.3f} of their size, MXFP4 "
      f"{by.loc['mxfp4', 'weight error']:.3f}. NVFP4's blocks are half as long and its scales are FP8 numbers, not "
      f"powers of two; that costs {by.loc['nvfp4', 'bits per weight'] - by.loc['mxfp4', 'bits per weight']:.2f} bits "
      "more per weight.")
lab.check("nvfp4_keeps_weights_closer_than_mxfp4", by.loc["nvfp4", "weight error"] < by.loc["mxfp4", "weight error"],
          "relative weight error")
lab.check("fp8_keeps_weights_closer_than_fp4", by.filter(like="fp8", axis=0)["weight error"].max()
          < by.loc[["mxfp4", "nvfp4"], "weight error"].min(), "relative weight error")
for name, r in quality.set_index("format").reindex(["nf4", "torchao-int4"]).dropna(how="all").iterrows():
    print(f"{name} (section 3, same text): KL {r['KL vs 16-bit (nats)']:.3f} nats, perplexity {r['perplexity']:.1f}")

# %% [markdown]
# On a GPU of compute capability 8.9 or newer, transformers loads the model in FP8 with its own kernels
# (`FineGrainedFP8Config`, with the blocks above; each activation is quantized to FP8 as it arrives). The cell counts
# the weights it stored in FP8 before it scores them. transformers
# 5.25 fetches that kernel from the Hub with the `kernels` package (`integrations/finegrained_fp8.py`), so it needs
# that package and, once, the internet. Elsewhere the cell says why it skips.

# %%
if quant.fp8_problem(lab.device):  # compute capability 8.9 or newer
    lab.skip("FP8 loaded by transformers", quant.fp8_problem(lab.device))
elif importlib.util.find_spec("kernels") is None:  # transformers 5.25 fetches its FP8 kernel through it
    lab.skip("FP8 loaded by transformers", "its kernel comes from the Hub through the `kernels` package, which is "
             "not installed here")
else:
    from transformers import FineGrainedFP8Config

    fp8_model, _ = models.load_model(lab.p.model_id, device=lab.device, dtype=lab.dtype,
                                     quantization_config=FineGrainedFP8Config(weight_block_size=(block, block)))
    in_fp8 = [fp8_model.get_submodule(n).weight.dtype for n in linears].count(torch.float8_e4m3fn)
    lab.check("fp8_loaded_every_linear_weight_in_fp8", in_fp8 == len(linears))
    try:  # the kernel is fetched at the first product: offline and not cached, transformers raises ImportError
        scored = quant.score(fp8_model, text_ids, reference=reference)
        print(f"transformers' FP8 ({in_fp8} of {len(linears)} linear weights stored in FP8), weights and activations: "
              f"KL {scored['kl']:.3f} nats, perplexity {scored['perplexity']:.1f}; by hand, weights only, "
              f"{block}x{block} blocks: KL {by.loc[f'fp8 per {block}x{block} block', 'KL vs 16-bit (nats)']:.3f} nats")
    except ImportError as error:
        lab.skip("FP8 loaded by transformers", str(error).splitlines()[0])
    del fp8_model

# %% [markdown]
# ## 4. Speed against each format's own limit
#
# A decode step reads every weight once, so fewer bytes should mean a faster step: the bound of notebook 02,
# `batch × bandwidth ÷ bytes read per step`, is higher for every format here, computed from the bytes *this* format
# holds (counted above), scales included. But a weight stored in 4 or 8 bits must be turned back into 16-bit numbers
# before (or while) it is multiplied. Whether that costs more than the bytes it saves depends on the kernel. First,
# which bitsandbytes ops one decode step of the NF4 model runs, at batch 1 and at batch 8:

# %%
if "nf4" in loaded:
    rows = []
    for batch in (1, 8):
        ids = torch.randint(100, len(tokenizer), (batch, 1), device=lab.device)  # one token per sequence
        with torch.inference_mode():
            seen = timing.ops_that_ran(lambda ids=ids: loaded["nf4"](input_ids=ids), lab.device)
        ops = sorted(o for o in seen.ops if o.startswith("bitsandbytes::"))  # the names are listed once each
        kernels = sorted(k for k in seen.kernels if any(w in k.lower() for w in ("4bit", "gemv", "gemm", "dequant")))
        rows.append({"batch": batch, "bitsandbytes ops": ", ".join(ops), "GPU kernels": ", ".join(kernels[:3]) or "-"})
    show(rows, title="bitsandbytes ops of one NF4 step (one token per sequence)")
else:
    lab.skip("the bitsandbytes ops of an NF4 step", "nf4 is not among the formats that run here")

# %% [markdown]
# What the profiler shows is one op name whatever the batch: bitsandbytes 0.50.2 sends every 4-bit matrix product
# through a single op (`bitsandbytes::gemm_4bit`; on a CPU with AVX-512 bfloat16 it repacks the weights at the first
# forward pass and runs `bitsandbytes::gemv_4bit` for every shape). The H100 run stored in
# `reference/nvidia-h100/partial-04_quantization.ipynb` saw `gemm_4bit` at
# batch 1 and at batch 8 alike. Inside that op, on a CUDA GPU, bitsandbytes chooses between its own 4-bit kernel and
# "dequantize, then an ordinary matrix product" from the number of rows, the weight's shape and the GPU's architecture
# (`_gemm_4bit_use_custom_cuda` in `bitsandbytes/backends/cuda/ops.py`); on a GPU the kernels column above names what
# ran. Now every format, prefill and decode:

# %%
bandwidth = roofline.bandwidth_ceiling(lab.device)
print(f"Memory bandwidth {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s ({bandwidth['source']}).")
prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(lab.device)
prefill_ids = torch.randint(100, len(tokenizer), (1, lab.p.prefill_tokens), device=lab.device)  # random tokens
shape = roofline.kv_shape(model.config)  # each token adds a key and a value per layer and key/value head
kv_per_token = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * lab.dtype.itemsize
context = prompt_ids.shape[1] + lab.p.new_tokens // 2  # the KV cache at the run's middle length

# %% [markdown]
# Prefill is one forward pass over a prompt of random tokens, keeping only the last position's logits as `generate`
# does, timed by the workbook's timing rule. Decode is one `generate` call for all the new tokens, with a clock that
# `generate` calls after each new token (a stopping criterion that never stops): the steps are the gaps between the
# clock's times, the first of them a warm-up.

# %%
import numpy as np
from transformers import StoppingCriteriaList

rows, continuations = [], {}
for name, m in loaded.items():
    with torch.inference_mode():
        prefill = timing.measure(lambda m=m: m(input_ids=prefill_ids, logits_to_keep=1), device=lab.device,
                                 warmup=lab.p.warmup, repeats=lab.p.repeats).median_ms
    weights = quant.step_bytes(m)  # what this format holds, scales included: each step reads it once
    for batch in lab.p.batch_sizes:
        clock = outputs.StepClock(lab.device)  # the time each new token was ready
        ids = outputs.generate_exactly(m, prompt_ids.repeat(batch, 1), lab.p.new_tokens,
                                       stopping_criteria=StoppingCriteriaList([clock]))[:, prompt_ids.shape[1]:]
        step_ms = 1e3 * np.median(np.diff(clock.times)[min(1, lab.p.new_tokens - 2):])  # the first step warms up
        rows.append({"format": name, "batch": batch, "tokens/s": batch * 1e3 / step_ms, "step ms": step_ms,
                     "bytes per step": weights + batch * context * kv_per_token, "prefill ms": prefill,
                     "tokens": ids.shape[1]})
        continuations.setdefault(name, tokenizer.decode(ids[0], skip_special_tokens=True))
speed = pd.DataFrame(rows)

# %%
speed["bound tokens/s"] = speed["batch"] * bandwidth["bytes_per_s"] / speed["bytes per step"]
speed["fraction of bound"] = speed["tokens/s"] / speed["bound tokens/s"]
sixteen = speed[speed["format"] == "16-bit"].set_index("batch")
speed.insert(3, "x 16-bit", speed["tokens/s"] / speed["batch"].map(sixteen["tokens/s"]))
lab.table("speed", speed, title=f"Decode ({lab.p.new_tokens} new tokens) and prefill ({lab.p.prefill_tokens} tokens)")
texts = pd.DataFrame(continuations.items(), columns=["format", "continuation"])
lab.table("continuations", texts, title=f"{prompt!r}, continued by each format (greedy)")
lab.check("every_format_produced_tokens", (speed["tokens"] > 0).all() and (speed["tokens/s"] > 0).all())
lab.check("continuations_are_text", texts["continuation"].map(lambda text: any(c.isalpha() for c in text)).all())
smallest = lab.p.batch_sizes[0]
first = speed[speed["batch"] == smallest].set_index("format")
for name, rate in first["tokens/s"].items():
    lab.metric(f"decode_{name.replace('-', '_')}_batch{smallest}_tokens_per_s", rate)

# %%
base, slow = first.loc["16-bit"], 1 / first.loc["16-bit", "fraction of bound"]  # the step against what its bytes need
read_ms = base["step ms"] / slow  # the step's weight and cache bytes at this machine's measured bandwidth
print(f"16-bit at batch {smallest}: a step took {base['step ms']:.3g} ms where reading its bytes at this machine's "
      f"bandwidth needs {read_ms:.3g} ms ({slow:.1f}x).")
with torch.inference_mode():  # where that time goes: one token through the 16-bit model, as a batch-1 step runs it
    view = timing.time_by_op(lambda: model(input_ids=prompt_ids[:, -1:]), lab.device)
products = view.ms_of(*timing.MATRIX_PRODUCTS)
print(f"One token's forward under the profiler (which adds time of its own): {view.wall_ms:.3g} ms. Matrix "
      f"products {products:.3g} ms ({products / read_ms:.1f}x the time to read the bytes), other ops "
      f"{view.busy_ms - products:.3g} ms, and {view.wall_ms - view.busy_ms:.3g} ms with no op running (the host's "
      f"Python and dispatch between ops). Fewer weight bytes can shorten at most the matrix products: "
      f"{products / view.wall_ms:.0%} of this forward.")
for name, r in first.drop("16-bit").iterrows():
    print(f"{name}: {r['x 16-bit']:.2f}x the 16-bit tokens/s at batch {smallest}; "
          f"its bound is {r['bound tokens/s'] / base['bound tokens/s']:.2f}x higher")

# %% [markdown]
# Read the `x 16-bit` column against the bound. Every low-bit format had a higher bound. A format that is not faster
# lost its gain elsewhere: in turning stored weights back into numbers, or in the part of a step that is not reading
# weights at all. The profiled forward above says how large each part is here.
#
# What about a large model on a GPU? This run cannot say, and neither can the stored H100 run. Its model has 135M
# parameters. Its batch-1 steps stayed far under their bounds in every format it measured
# (`reference/nvidia-h100/partial-04_quantization.ipynb`, speed table). So reading weights did not set their pace, and
# fewer bytes had nothing to win there. Notebook 02 profiles such a step.
#
# Where reading weights does set the pace, the fused kernel inside `gemm_4bit` matters. It dequantizes each block of
# weights next to the multiply. On CUDA, bitsandbytes 0.50 runs it for every product of at most 4 rows whose length is
# a multiple of the block size: batch-1 decode included. From 5 rows on, the per-generation rule named above decides
# (`_gemm_4bit_use_custom_cuda` in `backends/cuda/ops.py`). Whether that makes 4-bit decode of a large model faster
# than 16-bit is a GPU measurement this notebook has not made.
#
# ## 5. Quantization for speed
#
# A weight-only format saves time only with a kernel that reads the packed weights and restores them next to the
# multiply. Which kernel runs depends on the layout you ask torchao for. labkit asks for a tinygemm layout, as
# gpt-fast's int4 uses (https://github.com/pytorch-labs/gpt-fast, `quantize.py`). On a GPU that is
# `Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")`, whose product calls `aten::_weight_int4pack_mm`. On
# a CPU it is `PrototypeInt4WeightOnlyConfig`, whose product calls `aten::_weight_int4pack_mm_for_cpu`.
#
# The default, `Int4WeightOnlyConfig()`, packs `PLAIN` instead. Its product calls `torch.ops.mslk.bf16i4bf16_rowwise`,
# from the separate mslk package. The source is torchao 0.18's `quantization/quantize_/workflows/int4/int4_tensor.py`.
# Predict: what does a learner who copies `Int4WeightOnlyConfig()` get on this machine? The cell below tries it on one
# layer. Then it profiles labkit's int4 layer on one token, as in batch-1 decode.

# %%
import copy
import importlib.util

size = lab.p.layer_size
layer = torch.nn.Linear(size, size, bias=False, device=lab.device, dtype=lab.dtype)
one_token = torch.randn(1, size, device=lab.device, dtype=lab.dtype)  # batch-1 decode: one row
if "torchao-int4" in loaded:  # else the first lines of the notebook say why
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    plain = copy.deepcopy(layer)
    try:
        quantize_(plain, Int4WeightOnlyConfig())  # what a learner copies: the default PLAIN packing
        ran = timing.ops_that_ran(lambda: plain(one_token), lab.device)
        names = [o for o in ran.ops + ran.kernels if any(w in o for w in ("int4", "mslk", "i4bf16"))]
        print(f"Int4WeightOnlyConfig() ran: {', '.join(names) or '-'}")
    except (ImportError, RuntimeError) as err:  # mslk missing, or no kernel for this device
        print(f"Int4WeightOnlyConfig(): {type(err).__name__}: {err}")

# %%
if "torchao-int4" in loaded:  # labkit's int4 layer, one token, under the profiler
    layers = {"16-bit": layer, "torchao-int4": quant.torchao_quantized(layer, "torchao-int4", lab.device)}
    with torch.inference_mode():
        layers["torchao-int4"](one_token)  # warm-up
        int4_view = timing.time_by_op(lambda: layers["torchao-int4"](one_token), lab.device)
    lab.table("int4_kernel", int4_view.table.head(8), title=f"labkit's int4 layer ({size} x {size}), one token")
    packed_ms = int4_view.ms_of("int4pack", "tinygemm")  # the CPU op's name, the GPU kernel's name
    packed_bytes = size * size / 2  # 4 bits a weight; the scales and zero points left out
    rate = packed_bytes / (packed_ms / 1e3) if packed_ms else float("nan")  # bytes/s
    print(f"The int4 kernel took {packed_ms / int4_view.busy_ms:.0%} of the layer's busy time. It read the packed "
          f"weights at {rate / 1e9:.3g} GB/s; a copy reaches {bandwidth['bytes_per_s'] / 1e9:.3g} GB/s.")
    lab.check("int4_layer_runs_the_tinygemm_kernel", packed_ms > 0, ", ".join(int4_view.table["name"].head(3)))

# %% [markdown]
# Now int8 weight-only, in eager mode. Section 1 said that torchao 0.18 turns the whole int8 weight into a 16-bit copy
# on every call, then multiplies by that copy. The profiler should show it: a copy operator beside the product.
# Predict: at batch 1, which takes longer, the copy or the product?

# %%
if "torchao-int8" in loaded:
    int8_layer = quant.torchao_quantized(layer, "torchao-int8", lab.device)
    with torch.inference_mode():
        int8_layer(one_token)  # warm-up
        int8_view = timing.time_by_op(lambda: int8_layer(one_token), lab.device)
    lab.table("int8_eager", int8_view.table.head(8), title="torchao int8 weight-only, eager, one token")
    copy_ms = int8_view.ms_of("copy")  # aten::copy_ and aten::_to_copy on a CPU, the copy kernel on a GPU
    product_ms = int8_view.ms_of(*timing.MATRIX_PRODUCTS)
    moved = size * size * (1 + 2 + 2)  # read 1 byte a weight, write a 2-byte copy, read that copy in the product
    print(f"The 16-bit copy took {copy_ms:.3g} ms and the product {product_ms:.3g} ms. Each call moved "
          f"{moved / 2**20:.0f} MiB, where the 16-bit layer reads {2 * size * size / 2**20:.0f} MiB.")
    lab.check("int8_eager_makes_a_16bit_copy_every_call", copy_ms > 0, ", ".join(int8_view.table["name"].head(3)))

# %% [markdown]
# `torch.compile` can fuse the conversion into the product, so that no 16-bit copy is written. That is a claim about
# the code the compiler generates; the cell below profiles it where compiling fits the run.

# %%
if "torchao-int8" in loaded and (lab.on_gpu or not lab.quick):
    fused = torch.compile(int8_layer)
    with torch.inference_mode():
        fused(one_token)  # the first call compiles
        fused_view = timing.time_by_op(lambda: fused(one_token), lab.device)
    lab.table("int8_compiled", fused_view.table.head(8), title="torchao int8 weight-only, compiled, one token")
    print(f"Compiled: {fused_view.wall_ms:.3g} ms a call against {int8_view.wall_ms:.3g} ms eager; a copy operator "
          f"took {fused_view.ms_of('copy'):.3g} ms. On a CPU the profiler counts ATen operators only, not the "
          "compiler's own kernels.")
elif "torchao-int8" in loaded:
    lab.skip("int8 weight-only, compiled", "compiling costs more time than a quick CPU run has; use quick=False")

# %% [markdown]
# A step takes at least max(bytes read ÷ bandwidth, FLOPs ÷
# FLOP/s) (the roofline of notebook 00): each sequence of the batch costs 2 FLOPs per weight (a multiply and an add)
# whatever the format, while the bytes do not grow with the batch. As the batch grows, the step becomes
# compute-bound, and from there fewer bytes buy nothing.
#
# **04.5 · Predict.** With this machine's measured ceilings (printed below), above which batch size does int4
# weight-only stop making a decode step faster than 16-bit weights, by the roofline?

# %%
ceiling = roofline.compute_ceiling(lab.device, lab.dtype, quick=lab.quick)
print(f"This machine: {ceiling['flops_per_s'] / 1e12:.3g} TFLOP/s in {lab.dtype_name} ({ceiling['source']}); "
      f"{bandwidth['bytes_per_s'] / 1e9:.1f} GB/s.")
if not lab.on_gpu and lab.dtype != torch.float32:  # not every CPU has 16-bit arithmetic: the same product in float32
    n = roofline.default_sizes(lab.device, lab.quick)["matmul_size"]  # the size the ceiling above was measured at
    wide = roofline.measure_matmul_ceiling(lab.device, torch.float32, n)["flops_per_s"]  # 2 n^3 FLOPs, best repeat
    ratio = wide / ceiling["flops_per_s"]
    gap = (f" So the roofline below, built on the {lab.dtype_name} ceiling, turns compute-bound at a batch "
           f"{ratio:.3g}x smaller than float32's would.") if ratio > 2 else ""
    print(f"In float32 the same matmul ran at {wide / 1e12:.3g} TFLOP/s, {ratio:.3g}x the {lab.dtype_name} rate (torch "
          f"names this CPU's vector instructions {torch.backends.cpu.get_cpu_capability()}).{gap}")
crossover = lab.exercise("04.5", flops_per_s=ceiling["flops_per_s"], bytes_per_s=bandwidth["bytes_per_s"])
answer = None  # your prediction: a batch size
crossover.check(answer)

# %% [markdown]
# The measurement: one square linear layer, in 16-bit and in torchao int4 weight-only, fed the same `batch` one-token
# rows at each batch size; its speed-up beside the roofline's. A point whose time fell while the batch grew is
# measured again, and marked noisy if it stays so (no conclusion is drawn from it). The batch where int4 stops being
# faster is read between the two batches around it, where the speed-up crosses 1 on log scales.

# %%
flops, bytes_per_s = ceiling["flops_per_s"], bandwidth["bytes_per_s"]
limit = flops * 2 / (2 * bytes_per_s)  # 2 FLOPs per weight and sequence against a 16-bit weight's 2 bytes read once


def roofline_speedup(batch):  # per weight, a step takes max(its bytes / bandwidth, 2 FLOPs per sequence / FLOP/s)
    computing = 2 * batch / flops  # whatever the format
    return np.maximum(2 / bytes_per_s, computing) / np.maximum(0.5 / bytes_per_s, computing)  # 16-bit over int4


# %%
if "torchao-int4" in loaded:  # else the first lines of the notebook say why; `layers` was made above
    inputs = {batch: torch.randn(batch, size, device=lab.device, dtype=lab.dtype) for batch in lab.p.sweep_batches}

    def timed(point):  # one format's layer fed `batch` one-token rows (the same rows for both formats)
        with torch.inference_mode():
            t = timing.measure(lambda: layers[point["format"]](inputs[point["batch"]]), device=lab.device,
                               warmup=1, repeats=3)
        return {**point, **t.summary()}

    points = []
    for name in layers:  # a point whose time fell while the batch grew is timed again, and marked noisy if it stays so
        series = [timed({"format": name, "batch": batch}) for batch in lab.p.sweep_batches]
        points += timing.recheck_trend(series, work="batch", remeasure=timed)

# %%
seen = None  # the batch where int4 stopped being faster (None: it was faster at every batch)
if "torchao-int4" in loaded:
    wide = pd.DataFrame(points).pivot(index="batch", columns="format")  # a row per batch, a column per (what, format)
    sweep = pd.DataFrame({"batch": wide.index, "16-bit ms": wide["median_ms", "16-bit"].values,
                          "int4 ms": wide["median_ms", "torchao-int4"].values})
    sweep["int4 speed-up"] = sweep["16-bit ms"] / sweep["int4 ms"]
    sweep["roofline speed-up"] = roofline_speedup(sweep["batch"])
    sweep["noisy"] = wide["noisy"].any(axis=1).values  # rechecked, and still out of its trend
    lab.table("int4_sweep", sweep, title=f"One {lab.p.layer_size}-square layer: int4 weight-only against 16-bit")
    clean = sweep[~sweep["noisy"]].reset_index(drop=True)  # no conclusion is drawn from a noisy point
    slower = clean.index[clean["int4 speed-up"] <= 1]
    if len(slower):  # the speed-up crosses 1 between the last batch where int4 was faster and the next, on log scales
        pair = clean.iloc[max(slower[0] - 1, 0):slower[0] + 1][::-1]  # np.interp wants the speed-ups increasing
        seen = float(np.exp(np.interp(0, np.log(pair["int4 speed-up"]), np.log(pair["batch"]))))

# %% tags=["reveals-04.5"]
lab.table("break_even", pd.DataFrame({"batch by the roofline": [limit], "batch measured": [seen]}), show=False)
if "torchao-int4" not in loaded:
    print(f"No layer measured: torchao-int4 does not run here. By the roofline its gain ends at batch {limit:.0f}.")
else:
    grid = np.geomspace(min(lab.p.sweep_batches), max(lab.p.sweep_batches), 64)
    curve = list(zip(grid, roofline_speedup(grid), strict=True))
    lab.figure("int4_break_even", plots.weight_only_sweep(sweep, curve=curve, roofline_batch=limit,
                                                          title=lab.device_label))
    crossover.compare(seen or f"still faster at batch {max(lab.p.sweep_batches)}", "sequences")
    ended = (f", and still faster at batch {sweep['batch'].iloc[-1]}; the roofline puts the end of its gain at batch "
             f"{limit:.0f}" if seen is None else f"; its gain ended at about batch {seen:.0f} (between the batches "
             f"measured), where the roofline says {limit:.0f}")
    print(f"At batch {sweep['batch'][0]} int4 was {sweep['int4 speed-up'][0]:.2f}x as fast as 16-bit{ended}.")

# %% [markdown]
# The roofline assumes a kernel that reaches the machine's FLOP/s ceiling while it dequantizes. Where the measured
# gain ends before the roofline's batch, the int4 kernel computes more slowly than a 16-bit matrix product does: the
# dequantization is not free. Either way, weight-only quantization is a tool for small batches: batch-1 decode, the
# latency of one user.
#
# Finally, the decode step itself with int4 weights, eager and compiled: notebook 02's hand loop (a static KV cache,
# one forward pass per token) with `torch.compile` on the one-token step. On a GPU it also uses CUDA graphs: the GPU
# records the step's kernels once and replays them, instead of waiting for the CPU to launch each one. On a GPU the
# model is one of about 1B parameters (`random-llama-1b`, random weights: speed only); on a CPU it is the notebook's
# own model. Each run is put against its own bandwidth bound.

# %%
if lab.p.compile_problem:
    lab.skip("the compiled one-token step", lab.p.compile_problem)
else:
    fast, _ = models.load_model(lab.p.speed_model_id, device=lab.device, dtype=lab.dtype, attn_implementation="sdpa")
    step_models = {"16-bit": fast}
    if "torchao-int4" in loaded:  # else only 16-bit: the first lines of the notebook say why
        step_models["torchao-int4"] = quant.torchao_quantized(fast, "torchao-int4", lab.device)
    ids = torch.randint(100, fast.config.vocab_size, (1, 16), device=lab.device)  # a prompt of 16 random tokens
    shape = roofline.kv_shape(fast.config)  # its KV cache at the run's middle length, as above
    kv_per_token = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * lab.dtype.itemsize
    cache = kv_per_token * (16 + lab.p.new_tokens // 2)

# %%
import warnings

if not lab.p.compile_problem:  # else skipped above, with the reason
    rows = []
    for name, m in step_models.items():
        for step, mode in (("eager", None), ("compiled", "reduce-overhead" if lab.on_gpu else "default")):
            loop = outputs.GreedyLoop(m, batch=1, prompt_tokens=16, new_tokens=lab.p.new_tokens, compile_mode=mode)
            with warnings.catch_warnings():  # torchao's tensors lack a hash for the compiler's cache: a note
                warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
                run = outputs.measure_loop(loop, ids, warmup=1, repeats=lab.p.repeats)  # as notebook 02 times it
            rows.append({"format": name, "step": step, "tokens/s": run["tokens_per_s"], "step ms": run["step_ms"],
                         "first call extra s": run["first_call_extra_s"], "tokens": len(run["token_ids"][0]),
                         "bound step ms": 1e3 * (quant.step_bytes(m) + cache) / bytes_per_s})
    compiled = pd.DataFrame(rows)

# %%
if not lab.p.compile_problem:
    compiled["fraction of bound"] = compiled["bound step ms"] / compiled["step ms"]
    lab.table("compiled_step", compiled, title=f"{lab.p.speed_model_id}, batch 1: the one-token step, eager, compiled")
    lab.check("compiled_steps_produced_tokens", (compiled["tokens"] > 0).all())
    for name, r in compiled[compiled["step"] == "compiled"].set_index("format").iterrows():
        lab.metric(f"step_compiled_{name.replace('-', '_')}_batch1_fraction_of_bound", r["fraction of bound"])
        lab.metric(f"step_compiled_{name.replace('-', '_')}_batch1_tokens_per_s", r["tokens/s"])

# %% [markdown]
# What to look for, where the step was measured: the `fraction of bound` of each compiled row against its eager row
# (compiling cuts the Python work of a step and, on a GPU, the launching of each kernel, so a step whose time went
# there moves towards its bound); int4's rows against 16-bit's (its bound is higher, since it reads fewer bytes); and
# `first call extra s`, the compiling that the first call pays once.
#
# ## 6. Summary
#
# One row per format: its footprint, its batch-1 decode as a fraction of its own bound, its perplexity change.

# %%
summary = held[["format", "total MiB", "x smaller"]].rename(columns={"total MiB": "MiB"})
summary.insert(1, "library", summary["format"].map(footprint.library))
summary[f"x 16-bit tokens/s (batch {smallest})"] = summary["format"].map(first["x 16-bit"])
summary["fraction of bound"] = summary["format"].map(first["fraction of bound"])
summary["perplexity change"] = summary["format"].map(quality.set_index("format")["change"])
lab.table("summary", summary, title=f"{model_id} on {lab.device_label}, compute dtype {lab.dtype_name}")
lab.figure("summary", plots.quantized_formats(summary, title=f"{model_id}: size, speed and quality per format"))
show(lab.beside_references(quant.REFERENCE_METRICS), title="This machine and the reference runs")

# %% [markdown]
# The table above says which formats saved memory and which saved time on this machine. Every format saves memory,
# less on a small model, whose embeddings stay 16-bit. Time is saved only by a kernel that restores the stored weights
# faster than reading the saved bytes would take, and only at small batches. Which library's kernels do that depends on
# the GPU, the model's size and the batch. The speed column measured it for this model here; section 5's profiler
# showed which kernel each torchao format ran. float8 also quantizes the activations, so that the product itself runs
# on a GPU's float8 units.
#
# ## What you measured

# %%
measured = []
if len(total) > 1:
    smaller = ", ".join(f"{name} {mib:.0f} MiB ({total['16-bit'] / mib:.2f}x smaller)"
                        for name, mib in total.iloc[1:].items())
    measured.append(f"Footprints counted from the tensors, against {total['16-bit']:.0f} MiB in 16-bit: {smaller}.")
if len(kl):
    page = (f" FP4, what BitsAndBytesConfig(load_in_4bit=True) gives by default, moved {kl['fp4']:.3f} nats against "
            f"NF4's {kl['nf4']:.3f}." if "fp4" in kl and "nf4" in kl else "")
    measured.append(f"Closest to the 16-bit model's next-token distributions: {kl.idxmin()} (KL {kl.min():.3g} "
                    f"nats).{page}")
gains = first["x 16-bit"].drop("16-bit")
if len(gains):
    faster = ", ".join(gains[gains > 1.05].index)
    measured.append(f"Batch-{smallest} decode against 16-bit here: "
                    f"{', '.join(f'{name} {gain:.2f}x' for name, gain in gains.items())}; " + (
                        f"faster: {faster}." if faster else "none was faster: these formats saved memory, not time, "
                        "on this machine."))

# %%
layer = ("" if "torchao-int4" not in loaded else f"; one layer measured here stopped gaining at batch {seen:.0f}"
         if seen else "; one layer measured here was still faster with int4 at the largest batch tried")
measured.append(f"By this machine's roofline, int4 weight-only stops making a decode step faster from about batch "
                f"{limit:.0f}{layer}.")
if not lab.p.compile_problem:
    billions = sum(p.numel() for p in fast.parameters()) / 1e9
    fractions = compiled[compiled["step"] == "compiled"].set_index("format")["fraction of bound"]
    measured.append(f"With the one-token step compiled, batch-1 decode of a {billions:.2g}-billion-parameter model "
                    "reached these fractions of each format's own bandwidth bound: "
                    f"{', '.join(f'{name} {100 * v:.0f}%' for name, v in fractions.items())}.")
lab.finish(measured)
