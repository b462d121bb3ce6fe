# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Inference on several GPUs (and several machines)
#
# When does a model need more than one GPU, and what does each way of splitting it buy? A model is spread over devices
# for one of two reasons: it does not fit on one, or one is not fast enough. The layouts people deploy buy different
# things. This notebook measures each one on your machine:
#
# 1. **do I need more than one GPU?** The memory of the weights, per dtype and 4/8-bit format, plus the KV cache, per
#    batch and context. It is checked against a real model and compared with the GPUs present, or with machines you
#    type in, such as "2 x 24 GB" or "2 nodes x 8 x 80 GB". Then where `device_map="auto"` would put every layer,
#    planned without any GPU;
# 2. **placement with `device_map`**: consecutive layers on consecutive GPUs, one GPU working at a time; measured
#    where there are GPUs;
# 3. **tensor parallelism**, TP: every layer's matrices split across processes with transformers'
#    `DistributedConfig(tp_size=N)`, launched with `torchrun`. In float32 the tokens must equal one process's;
# 4. **data parallelism**, DP: one whole copy of the model per process, the prompts shared out;
# 5. **pipeline parallelism**, PP with `pp_size`: consecutive layers on consecutive processes, and the *bubble*;
# 6. **expert parallelism**, EP with `ep_size`: the experts of a mixture-of-experts model shared out;
# 7. **several machines**: the layout a planner proposes, TP inside a node and PP across nodes, rehearsed as two
#    "nodes" on this machine;
# 8. combining them, and the serving engines that do all this for you;
# 9. **the communication** every split pays: an all-reduce benchmark, reported as nccl-tests reports it, and what
#    TP's traffic would cost over NVLink or over a network.
#
# The same scripts are written for one CPU machine, where processes talk over gloo; for several GPUs, over NCCL; and
# for several machines, through a torchrun rendezvous. Where this machine has fewer GPUs than a measurement needs,
# that cell says so in one line.

# %% tags=["parameters"]
# Parameters (papermill overrides this cell). A size of 0 or an empty list means: sized for this machine.
device = "auto"                                   # auto, cpu or cuda: where single-device measurements run
model_id = ""                                     # the model of the TP, DP and TP x PP jobs; empty: tiny-llama (CPU)
plan_model = "llama-70b-shape"                    # the model planned: a shape, a labkit model or a hub id
plan_devices = ["1 x 24 GB", "2 x 24 GB", "8 x 80 GB", "2 nodes x 8 x 80 GB"]  # machines to plan for
plan_formats = ["16-bit", "nf4"]                  # weight formats to plan with
batch = 1                                         # sequences served at once, for the KV cache
context = 4096                                    # tokens per sequence held in the KV cache
processes = []                                    # process counts of the one-machine layouts (2 or more)
new_tokens = 0                                    # tokens generated per job
dp_prompts = 0                                    # prompts shared out by the data-parallel job
allreduce_max_mib = 0                             # largest all-reduce message
quick = "auto"                                    # small sizes: "auto" means without a GPU; True or False to force
solutions = False                                 # fill every exercise with its solution (a teacher's run)
results_path = ""                                 # where to write the results JSON (empty: do not write)

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
import math

import pandas as pd
import torch

import labkit
from labkit import compat, footprint, launcher, models, outputs, parallel, plots, probes, results, roofline, timing
from labkit.widgets import show

lab = labkit.start("05_multi_gpu", globals())

# %%
show(lab.environment_rows(), ["item", "value"], title="Environment")
nccl = probes.nccl()
print(f"NCCL: {nccl['version'] or 'no'} ({nccl['reason'] or 'ready'}); gloo: {'yes' if nccl['gloo'] else 'no'}")

# %% [markdown]
# ## 1. Do I need more than one GPU?
#
# Serving a model needs room for two things, counted below. The activations of a forward pass are not counted: the
# planning margin is there for them.
#
# * The **weights**: parameters x bytes per parameter, 2 in 16-bit. In 4-bit formats, about half a byte for the
#   linear layers plus their scales, while embeddings and norms stay 16-bit, as notebook 04 showed.
# * The **KV cache**: 2 for keys and values x layers x key/value heads x head size x batch x context x 2 bytes. Many
#   recent models, Llama 3 among them, use *grouped-query attention*, GQA: several query heads share one key/value
#   head. So the cache holds fewer heads than attention uses; llama-70b-shape has 64 query heads and 8 key/value
#   heads. `roofline.kv_cache_bytes` computes it, for GQA and for the newer layouts shown below.
#
# A plan fills each device to 90% at most. The margin is for the CUDA context, the activations and the allocator.
# First what the model needs:

# %%
from transformers import AutoModelForCausalLM

GIB = 2**30
with torch.device("meta"):  # the shapes only: no memory used, nothing downloaded
    model = AutoModelForCausalLM.from_config(models.model_config(lab.p.plan_model), dtype=torch.bfloat16)
print(f"{lab.p.plan_model}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} billion parameters, "
      f"{model.config.num_hidden_layers} layers; batch {lab.p.batch} x context {lab.p.context} tokens")


# %%
need = pd.DataFrame([{"format": fmt, "weights": sum(footprint.predict_footprint(model, fmt).values()),  # notebook 04's
                      "KV cache": roofline.kv_cache_bytes(model.config, batch=lab.p.batch, context=lab.p.context)}
                     for fmt in lab.p.formats])  # the workbook's one KV formula: GQA, MLA, sliding windows
need["total"] = need["weights"] + need["KV cache"]
gib = need.set_index("format").div(GIB).add_suffix(" GiB").reset_index()
lab.table("memory_needed", gib, title=f"{lab.p.plan_model}: memory needed")
per_token = roofline.kv_cache_bytes(model.config, batch=1, context=1)  # under GQA: the key/value heads only
every_head = per_token * model.config.num_attention_heads // model.config.num_key_value_heads
print(f"KV cache per token: {per_token / 1024:.0f} KiB; {every_head / 1024:.0f} KiB if each of the "
      f"{model.config.num_attention_heads} query heads kept its own keys and values")

# %% [markdown]
# **05.1 · Predict.** Take the total of the table's first row (16-bit unless you changed `plan_formats`). How many
# GPUs of 24 GB does it need, with the planning margin this notebook uses?

# %%
first = need.iloc[0]
ex = lab.exercise("05.1", total_bytes=int(first["total"]), weight_bytes=int(first["weights"]), device_bytes=24 * GIB)
answer = None  # a whole number of GPUs
ex.check(answer)

# %% [markdown]
# The machines you listed, and this machine's GPUs if any: how many of their GPUs the model needs, and whether they
# have that many. GB here are GiB, 2**30 bytes. A GPU sold as 80 GB shows a little less to programs. The cell's last
# line reads what the GPUs of the runs stored in `reference/` showed to torch, beside the planning margin.

# %% tags=["reveals-05.1"]
machines = {**lab.p.machines, **({"GPUs here": {"devices": lab.p.gpus}} if lab.p.gpus else {})}
fits = gib[["format", "total GiB"]].copy()
for text, machine in machines.items():
    usable = [d["bytes"] * footprint.USABLE_FRACTION for d in machine["devices"]]  # the planning margin
    fits[text] = ["fits on one" if total <= max(usable) else f"{math.ceil(total / min(usable))} needed, "
                  + ("enough" if total <= sum(usable) else "too few") for total in need["total"]]
lab.table("gpus_needed", fits, title=f"{lab.p.plan_model}: GPUs needed on each machine")
ex.compare(math.ceil(first["total"] / (24 * GIB * footprint.USABLE_FRACTION)), "GPUs")
for device, run in results.reference_runs("00_setup_and_probes").items():  # a stored run's GPUs, as torch saw them
    for gpu in run["env"]["devices"].get("cuda", []):
        print(f"reference/{device}: {gpu['name']} showed {gpu['memory_bytes'] / GIB:.1f} GiB to torch; "
              f"the plan uses {footprint.USABLE_FRACTION:.0%} of what a GPU is sold as")

# %% [markdown]
# **Today's layouts.** The formula above is plain GQA. Two newer layouts change the cache by large factors. DeepSeek's
# multi-head latent attention (MLA) caches one compressed latent and one small rotary key per token and layer. Sliding
# window layers keep only the last `window` tokens while decoding (right after a long prompt, transformers still holds
# the whole prompt behind them: notebook 02 measures it). `roofline.kv_cache_bytes` counts all of them, and notebook
# 02 measures it against real caches. Below, four published shapes at this notebook's batch and context, on the machines
# you listed. Notebook 02 cites the source of each shape. Predict first: which one's cache changes its GPU count most?

# %%
from transformers import DeepseekV3Config, Gemma3TextConfig, LlamaConfig, MistralConfig

published = {  # the published shapes; whatever is not set is transformers' default
    "Llama-3-8B, GQA": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,  # 2407.21783
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "Mistral-7B, sliding 4096": MistralConfig(),  # its defaults: arXiv 2310.06825, table 1
    "Gemma-3-27B, 5 sliding : 1 global": Gemma3TextConfig(hidden_size=5376, intermediate_size=21504,  # 2503.19786
                                                          num_hidden_layers=62, num_attention_heads=32,
                                                          num_key_value_heads=16, head_dim=128, sliding_window=1024),
    "DeepSeek-V3, MLA": DeepseekV3Config(),  # its defaults: arXiv 2412.19437, section 4.2
}
rows = []
for name, config in published.items():
    with torch.device("meta"):  # the shapes only
        shape = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    need = footprint.memory_needed(shape, batch=lab.p.batch, context=lab.p.context)  # KV: roofline.kv_cache_bytes
    rows.append({"model": name, "weights GiB": need["weights"] / GIB, "KV cache GiB": need["kv_cache"] / GIB,
                 **{f"{text}: GPUs": footprint.devices_needed(need["total"], min(d["bytes"] for d in m["devices"]))
                    for text, m in machines.items()}})

# %%
today = pd.DataFrame(rows)
lab.table("today_layouts", today, title=f"Today's layouts, 16-bit, batch {lab.p.batch} x {lab.p.context} tokens")
heavy = today.loc[(today["KV cache GiB"] / today["weights GiB"]).idxmax()]
print(f"At batch {lab.p.batch} x {lab.p.context} tokens, {heavy['model']} has the largest cache beside its weights: "
      f"{heavy['KV cache GiB']:.3g} GiB against {heavy['weights GiB']:.3g} GiB")

# %% [markdown]
# The line above names the layout whose cache weighs most here. Try `context = 131072` in the parameters cell. The
# rows whose GPU count then grows are the layouts whose cache grows with every token, in every layer.

# %% [markdown]
# Is the calculator right? The model the jobs below run is loaded for real: its weights are counted by
# `get_memory_footprint()` and its KV cache is measured after a forward pass over a prompt.

# %%
job_model, _ = models.load_model(lab.p.model_id, device=lab.device, dtype=lab.dtype, attn_implementation="sdpa")
prompt = torch.randint(0, job_model.config.vocab_size, (2, 64), device=lab.device)  # 2 sequences of 64 tokens
with torch.inference_mode():
    output = job_model(input_ids=prompt, use_cache=True)
predicted = {"weights": sum(footprint.predict_footprint(job_model, "16-bit").values()),  # in the model's own dtype
             "KV cache": roofline.kv_cache_bytes(job_model.config, batch=2, context=64, dtype=lab.dtype)}
measured = {"weights": job_model.get_memory_footprint(), "KV cache": footprint.cache_bytes(output)}
calculator = pd.DataFrame({"what": ["weights", "KV cache, 2 x 64 tokens"],
                           "predicted MiB": [v / 2**20 for v in predicted.values()],
                           "measured MiB": [v / 2**20 for v in measured.values()]})
lab.table("calculator", calculator, title=f"{lab.p.model_id} ({lab.p.job_dtype}) on {lab.device}")
lab.check("calculator_weights_match_footprint", abs(predicted["weights"] / measured["weights"] - 1) < 0.01)
lab.check("calculator_kv_cache_exact", predicted["KV cache"] == measured["KV cache"])

# %% [markdown]
# **Where would the layers go?** `from_pretrained(..., device_map="auto")` first shares the model out evenly between
# the GPUs; `"sequential"` would fill GPU 0 first. Then it gives each GPU whole decoder layers in order. What is left
# over goes to the CPU, offloaded and fetched to a GPU at every step, and then to disk. accelerate plans this from the
# shapes alone, so no GPU is needed. Below, each machine you listed, for each format. Each bar is the model, from its
# embeddings on the left to its output layer on the right. Each block is as wide as accelerate counts its bytes in
# that format. A 4-bit weight counts as half a byte; its scales, a few percent more, are left to the planning margin.

# %%
placed, rows = {}, []
for text, machine in machines.items():
    for fmt in lab.p.formats:
        label = f"{text}, {fmt}"  # each block, its device and its bytes, planned by accelerate from shapes alone
        placed[label] = parallel.plan_device_map(model, machine["devices"], fmt=fmt)
        blocks = pd.DataFrame(placed[label])
        blocks["device"] = [d if d in ("cpu", "disk") else f"GPU {d}" for d in blocks["device"]]
        for where, held in blocks.groupby("device", sort=False):
            rows.append({"plan": label, "device": where, "blocks": len(held), "from": held["block"].iloc[0],
                         "to": held["block"].iloc[-1], "GiB": held["bytes"].sum() / GIB})
uncovered = [label for label, blocks in placed.items() if any(b["device"] is None for b in blocks)]
lab.check("plan_covers_every_layer", not uncovered, f"left out: {uncovered}")
lab.figure("device_maps", plots.device_maps(placed, title=f"{lab.p.plan_model}: device_map='auto' as planned"))
lab.table("device_maps", pd.DataFrame(rows), title="Blocks per device")

# %% [markdown]
# Every plan places every block somewhere (checked for each plan). A plan with a grey "cpu" part runs, but those
# layers' weights cross to the GPU at every step: section 2 measures what that costs where there is a GPU.
#
# ## 2. Placement with `device_map`: what it buys
#
# ```python
# model = AutoModelForCausalLM.from_pretrained(name, device_map="auto", max_memory={0: "20GiB", 1: "20GiB"})
# ```
#
# Each GPU holds some consecutive layers, and a token passes through them in turn: GPU 1 waits while GPU 0 works. The
# model fits where it did not. But one token still reads every weight once, through one GPU at a time. So **expect
# about the speed of one GPU**, not more. accelerate's guide describes the placement this way: "Loading parts of a
# model onto each GPU and processing a single input at one time",
# https://huggingface.co/docs/accelerate/main/en/usage_guides/distributed_inference. It is measured below where there
# are GPUs, and between CPU processes in section 5:
# - with two GPUs, the model split over both against the model on one;
# - with one GPU, half of a 1B model offloaded to the CPU against none;
# - with no GPU, nothing: a `device_map` places layers on GPUs.

# %%
from accelerate.utils import compute_module_sizes  # the bytes of each module, as accelerate counts them


def copy_bytes_per_s(source, target, size=256 * 2**20):  # a link's speed: one copy over it, from pinned host memory
    data = torch.empty(size, dtype=torch.uint8, device=source)
    data = data.pin_memory() if source == "cpu" else data
    into = torch.empty_like(data, device=target)
    return size / (min(timing.measure(lambda: into.copy_(data, non_blocking=True), device=target).times_ms) / 1e3)


# %%
name, rows = lab.p.pipeline_model, []
if not lab.p.gpus:
    lab.skip("pipeline placement", "no GPU here: a device_map places layers on GPUs (and offloads from them)")
else:  # the model whole on one GPU, bound by the GPU's memory bandwidth
    one, _ = models.load_model(name, device="cuda:0", dtype=lab.p.gpu_dtype, attn_implementation="sdpa")
    weights = sum(p.numel() * p.element_size() for p in one.parameters())  # every weight read once per token
    bandwidth = roofline.bandwidth_ceiling("cuda:0")["bytes_per_s"]
    prompt = torch.randint(100, one.config.vocab_size, (1, 16), device="cuda:0")  # 16 tokens clear of the specials
    rows.append({"placement": "one GPU", "key": "one_gpu", "bytes per token": weights, "over GB/s": bandwidth / 1e9,
                 **outputs.measure_decode(one, prompt, new_tokens=lab.p.new_tokens, repeats=lab.p.repeats)})
    del one
    torch.cuda.empty_cache()

# %%
if len(lab.p.gpus) >= 2:  # the same weights over two GPUs, one after the other
    spread, _ = models.load_model(name, dtype=lab.p.gpu_dtype, attn_implementation="sdpa", device_map="auto",
                                  max_memory={0: weights, 1: weights})  # either holds it all: "auto" shares it out
    where = getattr(spread, "hf_device_map", {"": str(spread.device)})  # transformers sets it only when spread
    rows.append({"placement": "two GPUs, device_map='auto'", "key": "two_gpus_device_map_auto",
                 "bytes per token": weights, "over GB/s": bandwidth / 1e9,
                 **outputs.measure_decode(spread, prompt, new_tokens=lab.p.new_tokens, repeats=lab.p.repeats)})
    lab.check("pipeline_uses_two_gpus", len({d for d in where.values() if isinstance(d, int)}) == 2)
elif lab.p.gpus:  # half of it offloaded: those weights cross from the CPU at every step
    half, _ = models.load_model(name, dtype=lab.p.gpu_dtype, attn_implementation="sdpa", device_map="auto",
                                max_memory={0: weights // 2, "cpu": 2**62})
    where = getattr(half, "hf_device_map", {"": str(half.device)})
    if {0, "cpu"} <= set(where.values()):
        offloaded = sum(b for block, b in compute_module_sizes(half).items() if where.get(block) == "cpu")  # bytes
        link = copy_bytes_per_s("cpu", "cuda:0")  # host to GPU, measured
        rows.append({"placement": "part offloaded to the CPU", "key": "part_offloaded_to_the_cpu",
                     "bytes per token": offloaded, "over GB/s": link / 1e9,
                     **outputs.measure_decode(half, prompt, new_tokens=lab.p.new_tokens, repeats=lab.p.repeats)})
    else:
        lab.skip("CPU offload", f"device_map put all of {name} on {sorted(set(map(str, where.values())))}")

# %%
if len(rows) == 2:
    decode = pd.DataFrame(rows)[["placement", "key", "bytes per token", "over GB/s", "tokens_per_s", "token_ids"]]
    decode["bound tokens/s"] = decode["over GB/s"] * 1e9 / decode["bytes per token"]  # the slowest path's limit
    decode["fraction of bound"] = decode["tokens_per_s"] / decode["bound tokens/s"]
    same = decode["token_ids"][0] == decode["token_ids"][1]
    lab.check("pipeline_tokens_equal_one_gpu" if len(lab.p.gpus) >= 2 else "offload_tokens_equal_all_on_gpu", same)
    lab.table("device_map_decode", decode.drop(columns=["key", "token_ids"]), title=f"{name}, batch 1, by device_map")
    second = decode.iloc[1]
    print(f"{second['placement']}: {second['tokens_per_s'] / decode['tokens_per_s'][0]:.2f}x the tokens/s of one GPU; "
          f"its bound: {second['bytes per token'] / GIB:.2f} GiB per token over {second['over GB/s']:.1f} GB/s")
    for key, tokens_per_s in zip(decode["key"], decode["tokens_per_s"], strict=True):
        lab.metric(f"pipeline_{key}_tokens_per_s", tokens_per_s)

# %% [markdown]
# The bound of each row is the physical limit of its slowest path. For weights in GPU memory, it is the GPU's memory
# bandwidth over the weight bytes read per token. For offloaded weights, it is the measured host-to-GPU copy bandwidth
# over the offloaded bytes, which must cross at every step. What was seen, where the cell ran:
# - with two GPUs, the line under the table gives the split model's tokens/s as a multiple of one GPU's. Near 1 is
#   the "speed of one GPU" expected above, a little under for the hop between the GPUs;
# - with one GPU, the offloaded row is the slower one. A fraction of its copy bound near 1 says that copying the
#   offloaded weights sets its pace.
#
# Without a GPU the cell says it skipped, and section 5 shows the same effect between CPU processes.
#
# ## 3. The layouts as torchrun jobs
#
# A Jupyter kernel cannot host the processes, so a script runs them under `torchrun` (`scripts/layouts.py`); each launch
# prints the command to type in a terminal for the same job. Starting the processes costs seconds (each imports torch
# and transformers), more than these small jobs take, so one launch runs the four one-machine layouts one after another
# in the same processes: tensor, pipeline and expert parallelism, and data parallelism; sections 3 to 6 read its results
# (`--layouts tp` runs one alone). The largest launch then times all-reduce too, for section 9. Each layout is compared
# with its model whole in one process: rank 0 runs it alone while the others wait, with the same share of the machine as
# each of the N processes (one GPU; on a CPU, its share of the cores' threads), as one GPU is compared with N. The cost
# model: N equal workers are at most N times as fast as one, and each layout's speed-up is checked against it.
#
# Not every layout splits its model over every process count. In transformers, tensor parallelism needs the attention
# heads and the key/value heads to divide evenly; the MLP's width need not (the last process holds a shorter slice,
# says `ColwiseParallel`'s docstring). That is transformers' rule, not a law of tensor parallelism. Its colwise plan
# cuts a projection's output rows into nearly equal chunks, one per process, and does not check where the heads end:
# see `ColwiseParallel.shard_param` in `transformers/distributed/tensor_parallel.py`. When N does not divide the
# key/value heads, a chunk ends inside a head, and attention cannot split it into whole heads. Only continuous
# batching checks up front: "Number of key value heads ... must be divisible by tensor parallel size", says
# `PagedAttentionCache` in `transformers/generation/continuous_batching/cache.py`. vLLM does otherwise. In vLLM 0.15's
# `LlamaAttention`, https://docs.vllm.ai/en/v0.15.0/api/vllm/model_executor/models/llama/, when N exceeds the
# key/value heads, each process keeps a copy of one of them. N must then be a multiple of their number.
#
# Expert parallelism needs the experts to divide, and the key/value heads too when `ep_size` equals `tp_size`; a
# pipeline needs at least one layer per stage. The first cell below picks, for each count, the layouts that can run and
# says why it leaves any out; data parallelism always runs.

# %%
c = job_model.config  # the job model of TP and DP, loaded in section 1
moe, deep = parallel.layout_config("tiny-moe"), parallel.layout_config("layers-llama")  # those of EP and PP
split = {"tp": {"attention heads": c.num_attention_heads, "key/value heads": c.num_key_value_heads},  # whole heads
         "ep": {"experts": moe.num_experts, "key/value heads": moe.num_key_value_heads}}  # EP: with ep_size = tp_size
runs = {}  # process count -> the layouts whose model splits over that many processes
for n in lab.p.processes:
    uneven = {key: " and ".join(f"{k} {what}" for what, k in sizes.items() if k % n) for key, sizes in split.items()}
    why_not = {"tp": uneven["tp"] and f"{n} processes cannot split the model's {uneven['tp']} evenly",
               "pp": n > deep.num_hidden_layers and f"layers-llama has {deep.num_hidden_layers} layers to share out",
               "ep": uneven["ep"] and f"{n} processes cannot split tiny-moe's {uneven['ep']} evenly (ep = tp size)"}
    for layout, why in why_not.items():
        if why:
            lab.skip(f"{dict(tp='tensor', pp='pipeline', ep='expert')[layout]} parallelism with {n} processes", why)
    runs[n] = [layout for layout, why in why_not.items() if not why] + ["dp"]
print("layouts per launch:", runs)

# %%
jobs = {n: launcher.launch(lab.p.scripts / "layouts.py", n, {
    "layouts": layouts, "model": lab.p.model_id, "dtype": lab.p.job_dtype, "new_tokens": lab.p.new_tokens,
    "repeats": lab.p.repeats, "prompts": lab.p.dp_prompts, "one_process_threads": launcher.threads_per_process(n),
    "allreduce_max_mib": lab.p.allreduce_max_mib if n == max(runs) else 0},  # section 9's benchmark, in one launch
    gpus=lab.p.jobs_on_gpus) for n, layouts in runs.items()}
if not lab.p.jobs_on_gpus:
    lab.skip("the layouts over NCCL", f"GPUs here: {len(lab.p.gpus)}, 2 needed: they ran on CPU processes over gloo")

# %% [markdown]
# ### Tensor parallelism: every layer split across processes
#
# transformers' tensor-parallel plan, `DistributedConfig(tp_size=N)` in `from_pretrained`, splits each attention block
# by heads and each MLP by its width. Write a linear layer as y = x W, with W's rows for the inputs and its columns
# for the outputs; PyTorch stores W transposed.
# - The query, key, value, gate and up projections are split **colwise**. Each process holds some columns of W. So it
#   computes its own slice of the output features, its own heads, and nothing needs exchanging.
# - The output and down projections are split **rowwise**. Each process holds the rows of W that match the slice of
#   input it already has. So each computes a partial sum of the full output, and an **all-reduce** adds them up.
#
# That all-reduce happens after the attention block and after the MLP of every layer, for every token. So each process
# holds about 1/N of the weights and reads 1/N per token, which is faster. And it pays for collectives at every layer
# of every token, which is slower. The script counts them with the profiler during one forward pass.
#
# Expect identical greedy tokens in float32. The partial sums are added in another order, so the logits differ in
# their last bits; in 16-bit those bits are coarse enough that a near-tie can flip. Expect a speed-up only where an
# all-reduce costs less than the work it splits. Here it is measured between this machine's GPUs over NCCL where there
# are two or more, else between CPU processes. For GPUs in general, transformers' documentation says that tensor
# parallelism "works best on hardware with fast intra-node links such as NVLink". That is v5.17's page, the newest
# found: https://huggingface.co/docs/transformers/v5.17.0/tensor_parallelism.

# %%
tp_runs = {n: run["tp"] for n, run in jobs.items() if "tp" in run}
rows = []
for n, tp in tp_runs.items():
    same = [a == b for a, b in zip(tp["token_ids"][0], tp["one_process_token_ids"][0], strict=True)]
    rows.append({"processes": n, "tokens/s": tp["tokens_per_s"], "step ms": tp["step_ms"],
                 "MiB per process": max(tp["parameter_bytes_per_rank"]) / 2**20,
                 "tokens equal to 1 process": f"{sum(same)}/{len(same)}",
                 "collectives per forward": ", ".join(f"{c} {op}" for op, c in tp["collectives_per_rank"][0].items()),
                 "top logit gap": max(abs(a - b) for a, b in zip(tp["top_logits"], tp["one_process_top_logits"],
                                                                 strict=True))})
if rows:  # first the model whole in one process, as the first launch measured it
    tp = next(iter(tp_runs.values()))
    rows.insert(0, {"processes": 1, "tokens/s": tp["one_process_tokens_per_s"], "step ms": tp["one_process_step_ms"],
                    "MiB per process": tp["one_process_parameter_bytes"] / 2**20, "tokens equal to 1 process": "-",
                    "collectives per forward": "none", "top logit gap": 0.0})
tp_table = pd.DataFrame(rows, columns=None if rows else ["processes", "speed-up"])
if rows:
    tp_table["speed-up"] = tp_table["tokens/s"] / tp_table["tokens/s"][0]
    tp_table["share of 1 process"] = tp_table["MiB per process"] / tp_table["MiB per process"][0]

# %%
if tp_runs:
    lab.table("tensor_parallel", tp_table, title=f"Tensor parallel decode, {lab.p.model_id} ({lab.p.job_dtype})")
    lab.check("tp_weights_split", all(tp_table["share of 1 process"][1:] <= 1.1 / tp_table["processes"][1:]))
    lab.check("tp_calls_collectives", all(tp["collectives_per_rank"][0] for tp in tp_runs.values()))
    lab.check("tp_ran_sdpa", all(tp["sdpa_backend"] for tp in tp_runs.values()))
    tp_same = all(tp["token_ids"] == tp["one_process_token_ids"] for tp in tp_runs.values())
    if lab.p.job_dtype == "float32":  # the shares are summed in another order: 16-bit may differ
        lab.check("tp_tokens_equal_single_process", tp_same)
    for n, speedup in zip(tp_table["processes"][1:], tp_table["speed-up"][1:], strict=True):
        lab.metric(f"tp_{n}_speedup", speedup)
    lab.check("tp_speedup_at_most_n", (tp_table["speed-up"] <= 1.1 * tp_table["processes"]).all(), timing=True)
else:
    lab.skip("tensor parallelism", "no launch could split the model's heads evenly")

# %% [markdown]
# What was seen: each process holds about 1/N of the bytes, in the `share of 1 process` column. The table says how many
# greedy tokens match one process's; in float32, whose rounding differences are tiny, it is asserted (a near-tie
# between the top two logits could still flip a token). The
# `collectives per forward` column says what one forward pass called:
# - two all-reduces per layer;
# - one more for the embedding: its vocabulary is split across the processes, and their partial lookups are summed;
# - an all-gather of each process's slice of the logits.
#
# Whether N processes were faster depends on what one collective costs on this machine's links, measured in section 9.
#
# **05.2 · Predict.** Under GQA the KV cache holds the key/value heads only, and transformers' tensor parallelism gives
# each process an equal share of them. After the job's prompt, how many KiB of KV cache
# does each tensor-parallel process hold? The model's shape and the job's sizes are printed with the question.

# %%
tp_n = max(tp_runs, default=None)  # the largest tensor-parallel launch
if tp_n is not None:
    c = job_model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    ex = lab.exercise("05.2", layers=c.num_hidden_layers, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                      head_dim=head_dim, tp=tp_n, batch=1, tokens=tp_runs[tp_n]["prompt_tokens"],
                      element_bytes=lab.dtype.itemsize)
    print(ex)
    answer = None  # your prediction, in KiB
    ex.check(answer)

# %% [markdown]
# The job measured each process's cache after the prompt, beside one process's:

# %% tags=["reveals-05.2"]
if tp_n is not None:
    tp = tp_runs[tp_n]
    kv = pd.DataFrame({"processes": [1] + [tp_n] * tp_n, "rank": ["-", *map(str, range(tp_n))],
                       "KV cache KiB": [b / 1024 for b in [tp["one_process_kv_cache_bytes"],
                                                           *tp["kv_cache_bytes_per_rank"]]]})
    lab.table("kv_per_rank", kv, title=f"KV cache after a {tp['prompt_tokens']}-token prompt, {lab.p.model_id}")
    shares = [b / tp["one_process_kv_cache_bytes"] for b in tp["kv_cache_bytes_per_rank"]]
    lab.check("tp_kv_cache_split_by_heads", all(share == 1 / tp_n for share in shares))
    ex.compare(kv["KV cache KiB"][1:].max(), "KiB")

# %% [markdown]
# ## 4. Data parallelism: one whole model per process, the prompts shared out
#
# Each process loads the whole model and takes a consecutive share of the prompts, with
# `accelerate.PartialState().split_between_processes`. Rank 0 gathers the results in prompt order. Nothing is
# exchanged while generating, so throughput should grow with the processes as long as each has its own device or
# cores. The price is a full copy of the weights per process.

# %%
dp_runs = {n: run["dp"] for n, run in jobs.items()}  # every launch runs it
alone = next(iter(dp_runs.values()))
rows = [{"processes": 1, "prompts per process": str(lab.p.dp_prompts), "seconds": alone["one_process_seconds"],
         "tokens/s": alone["one_process_tokens_per_s"], "in order": True}]
dp_same = True
for n, dp in dp_runs.items():
    ranks = [r["rank"] for r in dp["results"]]
    rows.append({"processes": n, "prompts per process": ", ".join(str(ranks.count(k)) for k in range(n)),
                 "seconds": dp["seconds"], "tokens/s": dp["tokens_per_s"],
                 "in order": [r["prompt"] for r in dp["results"]] == list(range(lab.p.dp_prompts))})
    dp_same &= [r["token_ids"] for r in dp["results"]] == dp["one_process_token_ids"]
dp_table = pd.DataFrame(rows)
dp_table["speed-up"] = dp_table["tokens/s"] / dp_table["tokens/s"][0]
lab.table("data_parallel", dp_table, title=f"Data parallel, {lab.p.dp_prompts} prompts x {lab.p.new_tokens} tokens")
lab.check("dp_results_complete_and_in_order", dp_table["in order"].all())
lab.check("dp_tokens_equal_single_process", dp_same)

# %%
for n, speedup in zip(dp_table["processes"][1:], dp_table["speed-up"][1:], strict=True):
    lab.metric(f"dp_{n}_speedup", speedup)
lab.check("dp_speedup_at_most_n", (dp_table["speed-up"] <= 1.1 * dp_table["processes"]).all(), timing=True)
speed_ups = pd.concat([tp_table.assign(job="tensor parallel (one sequence)"),
                       dp_table.assign(job="data parallel (all prompts)")])
lab.figure("scaling", plots.scaling(speed_ups, ylabel="speed-up over 1 process", title=lab.p.model_id))

# %% [markdown]
# What was seen: the speed-up column, and the figure against the ideal line. On a CPU the processes share its cores:
# each process gets a share of the threads, and so does the one process they are compared with (one worker against N
# equal workers). One process given every core could be faster than that baseline; it is not what is compared here.
#
# **05.3 · Predict.** A service promises each user a token at least every `budget_ms` milliseconds. With N processes
# you can run the model in one process, split it by tensor parallelism (one sequence at a time, every process working
# on it) or copy it by data parallelism (N sequences at once, one per process). The cell prints the tokens/s each
# layout measured above and the budget. Which layout meets the budget with the most tokens/s? Answer `"one"`,
# `"tp"`, `"dp"` or `"none"`. Think first about what a user waits per token under each.

# %%
n = max(dp_runs)  # the largest launch
# one process, timed as TP is where TP ran (its decode steps), else as DP is (whole generate calls, prefill included)
one = (tp_runs[n] if n in tp_runs else alone)["one_process_tokens_per_s"]
dp_rate = dp_runs[n]["tokens_per_s"]  # n sequences together
layouts = {"one": {"ms_per_token": 1e3 / one, "tokens_per_s": one},
           "dp": {"ms_per_token": 1e3 * n / dp_rate, "tokens_per_s": dp_rate}}  # about 1/n of dp_rate per user
if n in tp_runs:  # one sequence, split over the n processes
    layouts["tp"] = {"ms_per_token": 1e3 / tp_runs[n]["tokens_per_s"], "tokens_per_s": tp_runs[n]["tokens_per_s"]}
budget_ms = float(f"{1.1 * min(m['ms_per_token'] for m in layouts.values()):.3g}")  # within 10% of the quickest
ex = lab.exercise("05.3", layouts=layouts, budget_ms=budget_ms)
print(f"budget: a token every {budget_ms} ms for each user; measured tokens/s with {n} processes: "
      + ", ".join(f"{name} {m['tokens_per_s']:.1f}" for name, m in layouts.items())
      + f" (dp over {n} sequences at once, the others over one)")
answer = None  # "one", "tp", "dp" or "none"
ex.check(answer)

# %% [markdown]
# The time per token a user sees: one process and TP make one sequence's tokens, so it is 1000 / tokens/s. DP's
# tokens/s is shared by its N users, so each waits about N times longer per token than its rate suggests.

# %% tags=["reveals-05.3"]
budget = pd.DataFrame.from_dict(layouts, orient="index").rename_axis("layout").reset_index()
budget["meets the budget"] = budget["ms_per_token"] <= budget_ms
lab.table("latency_budget", budget, title=f"A token every {budget_ms} ms per user, {n} processes")
meeting = budget[budget["meets the budget"]]
ex.compare(meeting.loc[meeting["tokens_per_s"].idxmax(), "layout"] if len(meeting) else "none")

# %% [markdown]
# ## 5. Pipeline parallelism: stages in turn, and the bubble
#
# `DistributedConfig(pp_size=N)` gives each process consecutive layers; transformers 5.25 splits them by count. The
# embeddings go to the first stage, the final norm and the output layer to the last. In a decode step, stage 0 runs
# its layers and sends the hidden states to stage 1. Stage 1 runs its layers, computes the logits and broadcasts them
# to every stage, so that `generate()` works unchanged. While one stage computes, the others wait: that idle time is
# the *bubble*.
#
# With one sequence, or several decoded together as one batch, all sit in the same stage at the same time. So expect
# a step to take about as long as in one process, plus the transfers. Expect each stage to be busy about 1/N of the
# time that one process is. Pipelines fill the bubble by keeping several micro-batches in flight, one per stage. With
# m micro-batches over p stages, the idle share falls to (p - 1) / (m + p - 1): GPipe,
# https://arxiv.org/abs/1811.06965. transformers 5.25 runs the plain schedule only; its source leaves the others as a
# TODO in `transformers/distributed/pipeline_parallel.py`.
#
# The job runs `layers-llama`, a random model shaped so that its layers, not Python, take most of a step on a CPU: 4
# layers of width 512 and a 512-token vocabulary. It runs with 1 sequence and with several.

# %%
pp_runs = {n: run for n, run in jobs.items() if "pp" in run}
if pp_runs:
    run = pp_runs[min(pp_runs)]  # the smallest launch that ran it
    pp, n = run["pp"], run["world_size"]
    stages = pd.DataFrame({"stage (rank)": range(n), "layers": [", ".join(map(str, x)) for x in pp["layers_per_rank"]],
                           "MiB": [b / 2**20 for b in pp["parameter_bytes_per_rank"]]})
    stages["share of 1 process"] = stages["MiB"] * 2**20 / pp["one_process_parameter_bytes"]
    lab.table("pipeline_stages", stages, title="Pipeline stages of layers-llama: the layers and bytes each holds")
else:
    lab.skip("pipeline parallelism", "no launch ran it")

# %%
if pp_runs:
    steps = pd.DataFrame([{"sequences in flight": b["batch"], "one process: step ms": b["one_process_step_ms"],
                           "one process: busy in layers": b["one_process_busy_share"],
                           f"{n} stages: step ms": b["step_ms"],
                           **{f"stage {r} busy": share for r, share in enumerate(b["busy_share_per_rank"])},
                           "tokens equal to 1 process": b["token_ids"] == b["one_process_token_ids"]}
                          for b in pp["batches"]])
    steps["step vs one process"] = steps[f"{n} stages: step ms"] / steps["one process: step ms"]
    lab.table("pipeline_steps", steps, title="Decode step against one process; busy: share of the time in its layers")
    lab.check("pp_tokens_equal_single_process", steps["tokens equal to 1 process"].all())
    lab.check("pp_each_stage_holds_part", stages["share of 1 process"].max() < 1)
    lab.metric(f"pp_{n}_step_vs_one_process", steps["step vs one process"][0])
    busy = steps[[f"stage {r} busy" for r in range(n)]].mean(axis=1) / steps["one process: busy in layers"]
    idle = {m: (n - 1) / (m + n - 1) for m in (1, 4, 16)}  # GPipe's bubble: m micro-batches in flight, n stages
    print(f"With one sequence each stage was busy {busy[0]:.2f} of one process's share ({1 - idle[1]:.2f} expected); "
          f"with {steps['sequences in flight'].iloc[-1]} decoded together, {busy.iloc[-1]:.2f}. A schedule with 4 or "
          f"16 micro-batches in flight would leave each stage idle {idle[4]:.0%} or {idle[16]:.0%} of the time.")

# %% [markdown]
# What was seen: each of the N stages holds about 1/N of the bytes, in the `share of 1 process` column: the capacity a
# pipeline buys. The step table says whether its greedy tokens equal one process's. The pipeline's step time is
# compared with one process's. Each stage's busy share is compared with that of one process running all the layers.
# The difference is the bubble, plus the time of the transfers. The line under the tables puts the busy share beside
# the 1/N expected. It also gives the bubble GPipe's formula predicts for several micro-batches in flight.
#
# ## 6. Expert parallelism: a mixture of experts, shared out
#
# A mixture-of-experts layer, MoE, replaces the MLP with several MLPs, the *experts*, and a small *router* that picks a
# few of them for each token. The job runs `tiny-moe`, a random Qwen3-MoE model built from a config: 4 experts per
# layer, 2 per token. `DistributedConfig(tp_size=N, ep_size=N)` gives each process 1/N of the experts. transformers
# 5.25 requires `ep_size` to be a multiple of `tp_size` and to divide `tp_size x fsdp_size`, so attention is split by
# TP as well. The experts get their tokens in one of two ways, chosen by `ep_implementation`:
# - `"all_reduce"`: every process runs its own experts on the whole batch, and an all-reduce sums the outputs. The job
#   asks for `"auto"`, which picks `"all_reduce"` at inference when the processes hold the same batch, as here;
# - `"all_to_all"`: each token travels to the process that holds its expert, and back.
#
# Expect the same tokens as one process either way, and the profiler to show which collective each one called.

# %%
ep_runs = {n: run for n, run in jobs.items() if "ep" in run}
if ep_runs:
    run = ep_runs[min(ep_runs)]  # the smallest launch that ran it
    ep, ep_n = run["ep"], run["world_size"]
    ways = pd.DataFrame([{"ep_implementation": way, "experts per rank": r["experts_per_rank"],
                          "MiB per rank": max(r["parameter_bytes_per_rank"]) / 2**20,
                          "tokens equal to 1 process": r["token_ids"] == r["one_process_token_ids"],
                          "collectives per forward": ", ".join(f"{c} {op}"
                                                               for op, c in r["collectives_per_rank"][0].items())}
                         for way, r in ep["implementations"].items()])
    lab.table("expert_parallel", ways, title="tiny-moe, expert parallel: one forward pass per way of dispatching")
    lab.check("ep_tokens_equal_single_process", ways["tokens equal to 1 process"].all())
    experts = ep["implementations"]["auto"]["experts_per_rank"]
    lab.check("ep_experts_shared_out", experts * ep_n == ep["num_experts"])
    lab.metric(f"ep_{ep_n}_experts_per_rank", experts)
else:
    lab.skip("expert parallelism", "no launch could share tiny-moe's experts evenly")

# %% [markdown]
# ## 7. Several machines: TP inside a node, PP across nodes
#
# The rule people deploy with: tensor parallelism inside a node, where GPUs talk over NVLink or PCIe, and pipeline (or
# data) parallelism across nodes, where they talk over the network. TP pays two all-reduces per layer for every token,
# so it wants the fastest link; PP sends one hidden state per stage per step; DP sends nothing while generating.
# transformers' documentation says TP "works best on hardware with fast intra-node links", as section 3 quoted. vLLM
# 0.8.3's documentation gives the rule in one line: "The tensor parallel size should be the number of GPUs in each node,
# and the pipeline parallel size is the number of nodes", at
# https://docs.vllm.ai/en/v0.8.3/serving/distributed_serving.html. Section 9 puts numbers on the difference.
#
# The planner (written out in the cell after your prediction) applies that rule to a model and a machine: one GPU if it
# holds the model; else the smallest TP size that divides the key/value heads (transformers' rule: whole heads), stays
# inside a node and holds the model; if no TP size inside a node does, TP over the whole node and as few pipeline
# stages as hold it. The GPUs left over serve more copies (data parallelism).
#
# **05.4 · Predict.** llama-405b-shape (126 layers, 8 key/value heads) in 16-bit, on two nodes of 8 GPUs of 80 GB:
# which TP size, and how many pipeline stages? Answer `(tp, pp)`.

# %%
ex = lab.exercise("05.4", model="llama-405b-shape", machine="2 nodes x 8 x 80 GB", fmt="16-bit", batch=lab.p.batch,
                  context=lab.p.context)
answer = None  # (tp, pp)
ex.check(answer)

# %% tags=["reveals-05.4"]
def plan(model, machine, fmt):  # the rule above, for a model on a machine typed in
    need = footprint.memory_needed(model, fmt=fmt, batch=lab.p.batch, context=lab.p.context)["total"]
    gpu = min(d["bytes"] for d in machine["devices"]) * footprint.USABLE_FRACTION  # the planning margin
    heads = (model.config.num_attention_heads, model.config.num_key_value_heads)
    sizes = [t for t in range(1, machine["per_node"] + 1) if all(h % t == 0 for h in heads)]  # whole heads per rank
    tp = next((t for t in sizes if need / t <= gpu), sizes[-1])  # the smallest TP that holds it, else the whole node
    pp = math.ceil(need / (tp * gpu))  # 1 where TP holds it; else stages, across nodes
    fits = tp * pp <= len(machine["devices"]) and pp <= model.config.num_hidden_layers
    return {"TP": tp, "PP": pp, "fits": fits, "replicas": len(machine["devices"]) // (tp * pp) if fits else 0,
            "GiB needed": need / GIB, "GiB per GPU": need / (tp * pp) / GIB, "GiB a GPU holds": gpu / GIB}


big = footprint.parse_machine("2 nodes x 8 x 80 GB")
shapes = {name: models.empty_model(name) for name in dict.fromkeys([lab.p.plan_model, "llama-405b-shape"])}  # meta
rows = [{"model": name, "machine": text, "format": fmt, **plan(shape, machine, fmt)} for name, shape in shapes.items()
        for text, machine in {**lab.p.machines, big["text"]: big}.items() for fmt in lab.p.formats]
lab.table("layouts", pd.DataFrame(rows), title="The planner's layouts (replicas: copies over the GPUs left)")
chosen = plan(shapes["llama-405b-shape"], big, "16-bit")
ex.compare((chosen["TP"], chosen["PP"]), "(tp, pp) by the planner")

# %% [markdown]
# Where a layout needs more GPUs than the machine has, `fits` is False: TP and PP say how many it would take. Where
# 4-bit weights make one GPU enough, the table says so in the nf4 rows, at the quality cost notebook 04 measures. For
# llama-405b-shape on two nodes of 8 GPUs the layout is TP 8 inside each node and 2 pipeline stages, one per node.
# On each node:
#
# ```
# torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id job1 \
#     scripts/layouts.py --layouts tp_pp --model MODEL --dtype bfloat16 --out tp_pp.json
# ```
#
# where `HOST` is the address of one of them; the script takes TP = processes per node and PP = nodes. Below, the
# rehearsal: two "nodes" of two processes each, both on this machine, meeting at 127.0.0.1: TP 2 inside each, PP 2
# across.
#
# One thing to know first: in transformers 5.25 (as in 5.24), `DistributedConfig(tp_size=2, pp_size=2)` stops while
# loading with
# `KeyError: 'model.layers.N.self_attn.q_proj.weight'`. The call is right (the config's own error messages suggest
# combining TP and PP); the bug is in transformers: it expands the tensor-parallel plan over every layer, then the
# pipeline replaces the layers of the other stages with placeholders, then applying the plan looks their weights up
# (`maybe_distribute_model` in `transformers/distributed/mixin.py`). The job makes the plain call first and shows its
# error in one line, then loads again with a workaround that drops the plan's entries for what this stage does not hold
# (`compat.tp_plan_skips_other_stages`). `scripts/tp_pp_keyerror.py` is the plain call alone, to report it.

# %%
heads = [job_model.config.num_attention_heads, getattr(job_model.config, "num_key_value_heads", None) or 2]
rehearsed = lab.p.model_id if all(h % 2 == 0 for h in heads) else "tiny-llama"  # TP 2 needs heads that split in two
if rehearsed != lab.p.model_id:
    parallel.model_folder(rehearsed, lab.p.job_dtype)  # saved here, before the job: the job only reads it
    lab.skip(f"TP x PP with {lab.p.model_id}", f"its {heads[0]} query and {heads[1]} key/value heads do not split "
             "over 2 tensor-parallel processes; the rehearsal runs tiny-llama")
rehearsal = launcher.launch(lab.p.scripts / "layouts.py", 2, {
    "layouts": ["tp_pp"], "model": rehearsed, "dtype": lab.p.job_dtype, "new_tokens": lab.p.new_tokens,
    "one_process_threads": launcher.threads_per_process(4)}, nodes=2, gpus=False)  # see the skip below
tp_pp = rehearsal["tp_pp"]
print(f"{rehearsal['world_size']} processes on {rehearsal['nodes']} nodes met over {rehearsal['backend']}.")
print("The plain call:", tp_pp["plain_error"] or "it loaded: this transformers combines TP and PP unaided")
why = "on one machine both rehearsed nodes would use GPUs 0 and 1" if lab.p.gpus else "no GPU here"
lab.skip("the two-node rehearsal over NCCL", f"it ran on CPU processes: {why}")

# %%
# the group each collective runs in: TP all-reduces and all-gathers inside a node; PP sends, receives, broadcasts
group = {"allreduce_": "TP", "allgather_into_tensor_coalesced_": "TP", "send": "PP", "recv_": "PP", "broadcast_": "PP"}
whole, rows = tp_pp["one_process_parameter_bytes"], []
for r, (stage, counts) in enumerate(zip(tp_pp["stage_per_rank"], tp_pp["collectives_per_rank"], strict=True)):
    held = tp_pp["parameter_bytes_per_rank"][r]
    row = {"rank": r, "node": r // tp_pp["per_node"], "pipeline stage": stage, "MiB": held / 2**20,
           "share of 1 process": held / whole}
    for op, count in counts.items():
        key = f"{group.get(op, 'other')} collectives"
        row[key] = f"{row[key]}, {count} {op}" if key in row else f"{count} {op}"
    rows.append(row)
lab.table("tp_pp", pd.DataFrame(rows), title="TP inside each node, PP across: held and called in one forward pass")
tp_pp_same = [a == b for a, b in zip(tp_pp["token_ids"][0], tp_pp["one_process_token_ids"][0], strict=True)]
print(f"{sum(tp_pp_same)} of {len(tp_pp_same)} greedy tokens ({rehearsal['dtype']}) equal one process's; one process "
      f"holds {whole / 2**20:.1f} MiB.")
lab.check("tp_pp_rendezvous_of_two_nodes", rehearsal["nodes"] == 2 == rehearsal["world_size"] // tp_pp["per_node"])
if rehearsal["dtype"] == "float32":  # TP sums the shares in another order: in 16-bit a near-tie may flip a token
    lab.check("tp_pp_tokens_equal_single_process", tp_pp["token_ids"] == tp_pp["one_process_token_ids"])

# %% [markdown]
# What was seen: the line under the table says whether the tokens equal one process's (in float32 they should; in
# bfloat16 a near-tie may flip); the all-reduces (and the all-gather of the logits) run inside each node, the TP group;
# the pipeline's send and receive and the broadcast of the logits (its shape, then its values) are what crosses
# between the nodes, the PP group. With TP 2 and PP 2, a process would hold a quarter of the bytes if every tensor were
# shared out. In tiny-llama, the job model without GPUs, the embedding table holds most of the bytes and is tied to the
# output layer, so the first stage holds it for the lookup and the last for the logits (each split over its TP pair):
# the `share of 1 process` column is about half there, and nearer a quarter in a model whose layers outweigh its
# embeddings.
#
# ## 8. Combining them, and the engines that do it for you
#
# **Tensor parallel + SDPA.** The tensor-parallel processes loaded the model with `attn_implementation="sdpa"`; each
# process runs attention on its own heads, so no attention kernel needs to know about the split.
#
# **4-bit + `device_map`.** A quantization config and a device map combine in one `from_pretrained` call. The
# footprint should match section 1's calculator for that format.

# %%
from transformers import BitsAndBytesConfig

bnb_probe = probes.bitsandbytes_4bit([lab.device])
if all(r["ok"] for r in bnb_probe):
    compute = torch.bfloat16 if not lab.on_gpu or probes.native_bf16(lab.device) else torch.float16
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    with compat.quiet_logger("bitsandbytes"):  # its CPU backend logs about optional kernels
        four_bit, _ = models.load_model(lab.p.model_id, device=lab.device, dtype=compute, attn_implementation="sdpa",
                                        device_map="auto", quantization_config=nf4)
    where = sorted(set(map(str, getattr(four_bit, "hf_device_map", {"": four_bit.device}).values())))
    planned = sum(footprint.predict_footprint(models.empty_model(lab.p.model_id), "nf4").values())  # section 1's way
    held = sum(footprint.count_footprint(four_bit).values())  # from its tensors, bitsandbytes' scales included
    ids = outputs.generate_exactly(four_bit, outputs.random_prompt(four_bit, batch=1, length=8), 4)
    print(f"{lab.p.model_id} in nf4 with device_map='auto': placed on {where}; {held / 2**20:.2f} MiB counted (with "
          f"the scales), {planned / 2**20:.2f} MiB planned; it generated {ids.shape[1] - 8} tokens")
    lab.check("nf4_device_map_matches_plan", abs(held / planned - 1) < 0.01 and ids.shape[1] == 12)
    del four_bit
else:
    lab.skip("4-bit with device_map", f"bitsandbytes cannot run 4-bit on {lab.device}: {bnb_probe[0]['reason']}")

# %% [markdown]
# **Serving engines** do these layouts for you, with batching and paged KV caches besides. They are not installed
# here; their flags, from their documentation:
#
# * **vLLM**: `vllm serve MODEL --tensor-parallel-size 8 --pipeline-parallel-size 2` (TP inside each node, PP across
#   nodes, vLLM 0.8.3: https://docs.vllm.ai/en/v0.8.3/serving/distributed_serving.html); `--data-parallel-size` for
#   copies and `--enable-expert-parallel` for the experts of a MoE model
#   (vLLM 0.12.0: https://docs.vllm.ai/en/v0.12.0/serving/data_parallel_deployment/).
# * **SGLang**: `python -m sglang.launch_server --model-path MODEL --tp 8` (also `--tp-size`), `--dp` for copies,
#   `--ep-size` for experts (https://docs.sglang.io/advanced_features/server_arguments.html). Its `--tp` counts the
#   GPUs of all nodes: `--tp 16 --nnodes 2 --node-rank 0 --dist-init-addr HOST:PORT` splits every layer over both
#   nodes (its multi-node example, https://docs.sglang.io/references/multi_node_deployment/multi_node.html); TP inside
#   each node and PP across is `--tp 8 --pp-size 2` with the same node flags.
# * **`transformers serve`** (in transformers itself): `transformers serve --device auto` loads with
#   `device_map="auto"`, the placement of section 2; `--continuous-batching` batches requests. Its 5.25 command line
#   has no tensor-parallel flag (checked in `transformers/cli/serve.py`).
#
# Text Generation Inference (`text-generation-launcher`), which older guides show, is in maintenance mode: its
# documentation says so and recommends vLLM and SGLang instead
# (https://huggingface.co/docs/text-generation-inference/en/index).
#
# ## 9. The communication: what one all-reduce costs
#
# Each process starts with a message of S bytes and ends with the sum of all of them. nccl-tests reports two
# bandwidths (https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md): the *algorithm bandwidth* S /
# time, and the *bus bandwidth*, that times 2(N-1)/N: the bytes each link carries in a ring all-reduce, comparable to
# the link's own speed. Small messages are dominated by latency, large ones by bandwidth. The dashed line is one
# measured copy of the message: between CPU processes the memory copy rate (no all-reduce can beat one copy of its
# data, so it is a true limit); between two GPUs one GPU 0 to GPU 1 copy, a reference rather than a hard limit.
#
# The benchmark is `time_all_reduce` in `scripts/allreduce_bench.py`. It already ran, inside the largest launch of
# section 3, after its layouts: starting the processes again would cost more than the benchmark itself. The script
# also runs on its own under torchrun (its first lines say how).
#
# **05.5 · Predict.** Suppose an all-reduce of 256 MiB over 8 ranks takes 2 ms. What bus bandwidth, in GB/s, does
# nccl-tests report for it?

# %%
ex = lab.exercise("05.5", message_bytes=256 * 2**20, seconds=2e-3, ranks=8)
answer = None  # your prediction, in GB/s
ex.check(answer)

# %% tags=["reveals-05.5"]
job = jobs[max(jobs)]  # the largest launch ran allreduce_bench.py's time_all_reduce after its layouts
bench, ranks = job["allreduce"], job["world_size"]
allreduce = pd.DataFrame(bench["rows"])[["bytes", "median_us"]].rename(columns={"median_us": "µs"})
allreduce["algbw GB/s"] = allreduce["bytes"] / (allreduce["µs"] / 1e6) / 1e9  # the message over the time
allreduce["busbw GB/s"] = allreduce["algbw GB/s"] * 2 * (ranks - 1) / ranks  # what each link of a ring carries
title = f"all_reduce, {ranks} processes over {job['backend']} on {job['device_label']}"
lab.table("allreduce", allreduce, title=title)
size, seconds, n = ex.given["message_bytes"], ex.given["seconds"], ex.given["ranks"]
busbw = size / seconds * 2 * (n - 1) / n  # the busbw column's formula on the question's numbers
ex.compare(busbw / 1e9, "GB/s, the busbw column's formula on the question's numbers")

# %%
if lab.p.jobs_on_gpus:
    limit, limit_label = copy_bytes_per_s("cuda:0", "cuda:1"), "GPU 0 to GPU 1 copy (measured)"
else:  # the ceiling counts a copy's reads and writes: one copy of the message moves half of that
    limit, limit_label = roofline.bandwidth_ceiling("cpu")["bytes_per_s"] / 2, "memory copy of the message (measured)"
lab.figure("allreduce", plots.bandwidth_sweep(bench["rows"], limit=limit, limit_label=limit_label, title=title))
best = allreduce["busbw GB/s"].max() * 1e9
print(f"best bus bandwidth {best / 1e9:.3g} GB/s = {best / limit:.1%} of the {limit_label}, {limit / 1e9:.3g} GB/s")
lab.metric("allreduce_best_busbw_gb_per_s", best / 1e9)
lab.metric("allreduce_fraction_of_copy", best / limit)

# %% [markdown]
# Back to tensor parallelism: at batch 1 each all-reduce of a decode step carries one token's hidden state (hidden
# size x bytes per number: the `message bytes` column below for the job's model, 16 KiB for llama-70b-shape), where
# the latency dominates; the all-gather at the end collects each process's slice of the logits. The collectives the
# profiler counted in one forward pass (a decode step makes the same calls), each timed at a one-token message from
# the benchmark above, predict what N processes add to each step:

# %%
def all_reduce_ms(size):  # the benchmark's first message at least this large; past the largest, its bandwidth
    larger = allreduce[allreduce["bytes"] >= size]
    return larger["µs"].iloc[0] / 1e3 if len(larger) else size / (allreduce["algbw GB/s"].iloc[-1] * 1e6)


if tp_n is not None:
    tp, element = tp_runs[tp_n], lab.dtype.itemsize
    message = {"allreduce_": job_model.config.hidden_size * element,  # one token's hidden state
               "allgather_into_tensor_coalesced_": job_model.config.vocab_size // tp_n * element}  # a logits slice
    cost = pd.DataFrame([{"collective": op, "calls per token": count,
                          "message bytes": message.get(op, message["allreduce_"])}
                         for op, count in tp["collectives_per_rank"][0].items()])
    cost["ms each (benchmark)"] = cost["message bytes"].map(all_reduce_ms)
    predicted_ms = (cost["calls per token"] * cost["ms each (benchmark)"]).sum()
    lab.table("tp_communication", cost, title=f"Collectives in one forward pass, {tp_n} processes")
    share = predicted_ms / tp["step_ms"]  # of each decode step, the part the collectives would take
    print(f"predicted communication {predicted_ms:.2f} ms per token, {share:.0%} of the measured step "
          f"({tp['step_ms']:.2f} ms with {tp_n} processes, against {tp['one_process_step_ms']:.2f} ms with one)")

# %% [markdown]
# The line under the table gives the share of the measured step that the collectives would take. Where N processes
# took longer than one process's step divided by N plus that prediction, the difference is time the benchmark does not
# see: the bookkeeping of the split tensors, and each collective waiting for the slowest process.
#
# **Over NVLink or over the network?** The same arithmetic for the planned model with TP 8: two all-reduces per layer,
# each of the hidden states of every token in the forward pass. Over a published NVLink-class link (900 GB/s for both
# directions of an H100/H200 SXM, 450 each way) against a 400 Gbit/s network card (50 GB/s), from the bandwidth alone
# (both figures from NVIDIA's MLPerf Inference v4.1 system description of an 8 x H200 SXM node, "18x 4th Gen NVLink,
# 900GB/s" and "10x 400Gbe Infiniband", at
# https://raw.githubusercontent.com/mlcommons/inference_results_v4.1/main/closed/NVIDIA/systems/H200-SXM-141GBx8_TRT_MaxQ.json
# ), beside this machine's measured table. Each call also pays a latency, not counted in the published columns: here
# the smallest message took the microseconds of the benchmark's first row.

# %%
nvlink, network = "NVLink 4 (H100/H200 SXM)", "400 Gbit/s network card"
links = {nvlink: 900e9 / 2, network: 400e9 / 8}  # published, bytes per second each way
tp_size, rows = 8, []
for phase, tokens in {f"decode step, batch {lab.p.batch}": lab.p.batch,
                      f"prefill, {lab.p.batch} x {lab.p.context} tokens": lab.p.batch * lab.p.context}.items():
    calls = 2 * model.config.num_hidden_layers  # after attention and after the MLP, in every layer
    size = tokens * model.config.hidden_size * 2  # the hidden states of every token, 16-bit
    row = {"phase": phase, "all-reduces": calls, "MiB each": size / 2**20,
           "this machine ms": calls * all_reduce_ms(size),
           "this machine from": "measured" if size <= bench["rows"][-1]["bytes"] else "largest message's bandwidth"}
    for link, bytes_per_s in links.items():  # a ring all-reduce: each link carries 2(n-1)/n of the message
        row[f"{link} ms"] = calls * size * 2 * (tp_size - 1) / tp_size / bytes_per_s * 1e3
    row["network / NVLink"] = row[f"{network} ms"] / row[f"{nvlink} ms"]
    rows.append(row)
lab.table("tp_links", pd.DataFrame(rows), title=f"{lab.p.plan_model}, TP 8: all-reduce time per forward pass")

# %% [markdown]
# What the table says: in a decode step the bandwidth part is tiny on either published link, so what remains is each
# call's latency, 2 x layers calls per token (160 for llama-70b-shape), which the published columns leave out and this
# machine's column includes; a network's latency is paid at every layer. In a prefill the bytes decide, in proportion
# to the link speeds (the last column). Either way TP across nodes puts the network inside every layer, which is why
# the planner keeps TP inside a node and sends only one hidden state per step between pipeline stages.
#
# ## Your numbers beside the reference runs

# %%
show(lab.beside_references({name: name for name in lab.metrics}), title="This machine and the reference runs")

# %% [markdown]
# ## What you measured

# %%
measured = [f"{lab.p.plan_model} needs {gib['total GiB'][0]:,.1f} GiB in {gib['format'][0]} (weights and KV cache); "
            "the planner keeps tensor parallelism inside a node and adds pipeline stages across nodes only when one "
            "node cannot hold it."]
if len(tp_table) > 1:
    n, speedup = tp_table["processes"][1], tp_table["speed-up"][1]
    same = "the same greedy tokens as one process" if tp_same else "tokens compared with one process in the table"
    measured.append(f"Tensor parallelism over {n} processes gave {same}, each holding about 1/{n} of the weights, at "
                    f"{speedup:.2f}x the speed of one process here: every layer pays two all-reduces.")
n, speedup = dp_table["processes"].iloc[-1], dp_table["speed-up"].iloc[-1]
measured.append(f"Data parallelism over {n} processes gave {speedup:.2f}x the tokens/s of one process, with nothing "
                "exchanged while generating; each process holds a whole copy.")
if pp_runs:
    measured.append(f"{len(stages)} pipeline stages took {steps['step vs one process'][0]:.2f}x one process's time per "
                    "decode step: a token still passes every layer in turn, so each stage waits for the others.")
if ep_runs:
    same = "the same tokens as" if ways["tokens equal to 1 process"].all() else "other tokens than"
    measured.append(f"Expert parallelism left {experts} experts on each of {ep_n} processes, with {same} one process.")

# %%
if all(tp_pp_same):
    measured.append("TP inside each of two rehearsed nodes and PP across them generated one process's tokens, "
                    "through a workaround for transformers' error on that combination.")
measured.append(f"The best all-reduce bus bandwidth between these processes was {best / 1e9:.3g} GB/s, "
                f"{best / limit:.0%} of the measured limit; the smallest message ({allreduce['bytes'][0]} bytes) "
                f"took {allreduce['µs'][0]:.0f} µs: small messages cost latency, not bandwidth.")
offloading = [label for label, blocks in placed.items() if any(b["device"] == "cpu" for b in blocks)]
measured.insert(1, f"device_map='auto' placed {lab.p.plan_model} in {len(placed)} plans without a GPU; "
                   f"{len(offloading)} of them put layers on the CPU, to be copied to a GPU at every step.")
predicted_mib, measured_mib = calculator["predicted MiB"], calculator["measured MiB"]
measured.insert(1, f"The calculator, checked on {lab.p.model_id} loaded for real: weights {predicted_mib[0]:.1f} MiB "
                   f"predicted, {measured_mib[0]:.1f} MiB by get_memory_footprint(); KV cache {predicted_mib[1]:.3f} "
                   f"MiB predicted, {measured_mib[1]:.3f} MiB measured.")
lab.finish(measured)
