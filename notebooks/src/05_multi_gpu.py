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
# A model is spread over devices for one of two reasons: it does not fit on one, or one is not fast enough. There
# are three ways to spread it, and they buy different things. This notebook measures each on your machine:
#
# 1. **do I need more than one GPU?** The memory of the weights (per dtype and 4/8-bit format) plus the KV cache
#    (per batch and context), checked against a real model, compared with the GPUs present or with machines you type
#    in ("2 x 24 GB"); and where `device_map="auto"` would put every layer, planned without any GPU;
# 2. **pipeline placement** (`device_map="auto"`): consecutive layers on consecutive devices, run one after another,
#    expected to buy capacity rather than speed (measured where there are GPUs);
# 3. **tensor parallelism**: every layer's matrices split across processes with transformers' tensor-parallel plan,
#    launched with `torchrun`; the tokens must equal one process's tokens;
# 4. **data parallelism**: one whole copy of the model per process, the prompts split between them;
# 5. **combining** them (tensor parallel + SDPA, 4-bit + `device_map`), launching on **several machines**, and the
#    serving engines that do all this for you;
# 6. **the communication** every split pays: an all-reduce benchmark, reported as nccl-tests reports it.
#
# The same scripts are written for one CPU machine (processes talking over gloo), several GPUs (NCCL) and several
# machines (a torchrun rendezvous). Where this machine has fewer GPUs than a measurement needs, that cell says so
# in one line; the last section shows the stored reference runs, where there are any.

# %% tags=["parameters"]
# Parameters (papermill overrides this cell). A size of 0 or an empty list means: sized for this machine.
device = "auto"                                   # auto, cpu or cuda: where single-device measurements run
model_id = ""                                     # the model the jobs run; empty picks tiny-llama or random-llama-1b
plan_model = "llama-70b-shape"                    # the model whose memory is planned: a shape, a labkit model or a hub id
plan_devices = ["1 x 24 GB", "2 x 24 GB", "8 x 80 GB"]  # machines to plan for, as you would describe them
plan_formats = ["16-bit", "nf4"]                  # weight formats to plan with
batch = 1                                         # sequences served at once, for the KV cache
context = 4096                                    # tokens per sequence held in the KV cache
processes = []                                    # process counts for the torchrun jobs
new_tokens = 0                                    # tokens generated per job
dp_prompts = 0                                    # prompts shared out by the data-parallel job
allreduce_max_mib = 0                             # largest all-reduce message
quick = False                                     # smaller sizes, for tests and CPU-only machines
solutions = False                                 # fill every exercise with its solution (a teacher's run)
results_path = ""                                 # where to write the results JSON (empty: do not write)

# %%
import os
import shutil
import subprocess
from pathlib import Path

import torch

from labkit import generation, models, parallel, plots, probes, quant, results, roofline, widgets
from labkit.errors import BadParameter, ModelNotAvailable, check_sizes

widgets.short_errors()  # a bad parameter below stops the notebook with one sentence, not a traceback
device = probes.resolve_device(device)
on_gpu = device.startswith("cuda")
gpus = parallel.devices_present()
for name, value in (("plan_devices", plan_devices), ("plan_formats", plan_formats), ("processes", processes)):
    if isinstance(value, (str, int)):
        raise BadParameter(f"{name}={value!r}: give a list, for example {name}=[{value!r}].")
if not plan_devices:
    raise BadParameter("plan_devices=[]: give at least one machine, for example ['2 x 24 GB'].")
machines = {text: parallel.parse_devices(text) for text in plan_devices}
for text, devices in machines.items():
    if not devices:
        raise BadParameter(f"plan_devices: {text!r} means this machine's GPUs, and it has none; describe one like '1 x 24 GB'.")
plan_formats = [quant.check_format(f) for f in plan_formats] or ["16-bit"]
check_sizes(1, batch=batch, context=context, **{f"processes[{i}]": n for i, n in enumerate(processes)})
check_sizes(0, new_tokens=new_tokens, dp_prompts=dp_prompts, allreduce_max_mib=allreduce_max_mib)
if new_tokens == 1:
    raise BadParameter("new_tokens=1: decoding needs at least 2 new tokens to time a step.")
# The jobs run on GPUs where there are at least two (NCCL), else on CPU processes (gloo), GPUs hidden from them.
jobs_on_gpus = len(gpus) >= 2
most = len(gpus) if jobs_on_gpus else max(2, os.cpu_count() or 1)
processes = sorted({1, *(processes or [n for n in (2, 4, 8) if n <= (most if jobs_on_gpus else 2)])})
if max(processes) > most:
    raise BadParameter(f"processes={processes}: at most {most} here ({'GPUs' if jobs_on_gpus else 'CPU cores'}).")
model_given = bool(model_id)
model_id = model_id or ("random-llama-1b" if jobs_on_gpus else "tiny-llama")
job_dtype = "bfloat16" if jobs_on_gpus else "float32"
for name in (model_id, plan_model):
    problem = None if name in parallel.SHAPES else models.check_model(name)
    if problem:
        raise ModelNotAvailable(problem)
parallel.check_job_model(model_id, parallel.model_config(model_id))
# Pipeline placement needs a model bigger than the share of a GPU it is given: the 1B model unless one was named.
pipeline_model = model_id if model_given or jobs_on_gpus else "random-llama-1b"
gpu_dtype = "bfloat16" if gpus and probes.native_bf16("cuda:0") else "float16"
new_tokens = new_tokens or (32 if jobs_on_gpus else 6 if quick else 16)
dp_prompts = dp_prompts or (8 * max(processes) if jobs_on_gpus else 4 if quick else 8)
allreduce_max_mib = allreduce_max_mib or (256 if jobs_on_gpus else 1 if quick else 64)
repeats = 2 if quick else 3
scripts = Path("scripts") if Path("scripts/tp_generate.py").exists() else parallel.scripts_dir()
res = results.Results("05_multi_gpu", results_path)
print(f"GPUs here: {parallel.describe_devices(gpus)}. The torchrun jobs run {model_id} ({job_dtype}) on "
      f"{'the GPUs, over NCCL' if jobs_on_gpus else 'CPU processes, over gloo'}, with {processes} processes.")

# %%
widgets.show(results.environment_rows(res.env), ["item", "value"], title="Environment")
nccl = probes.nccl()
print(f"NCCL: {nccl['version'] or 'no'} ({nccl['reason'] or 'ready'}); gloo: {'yes' if nccl['gloo'] else 'no'}")

# %% [markdown]
# ## 1. Do I need more than one GPU?
#
# Serving a model needs room for two things, counted below; the activations of a forward pass are not counted,
# the planning margin is there for them:
#
# * the **weights**: parameters x bytes per parameter, 2 in 16-bit; in 4-bit formats about half a byte for the
#   linear layers plus their scales, while embeddings and norms stay 16-bit (notebook 04);
# * the **KV cache**: 2 (keys and values) x layers x key/value heads x head size x batch x context x 2 bytes.
#
# A plan fills each device to 90% at most, a margin we leave for the CUDA context, the activations and the
# allocator. First the calculator, then a check of it against a model loaded for real.

# %%
plan = parallel.empty_model(plan_model)  # on the meta device: shapes, no memory
parameters = sum(p.numel() for p in plan.parameters())
print(f"{plan_model}: {parameters / 1e9:.2f} billion parameters, {plan.config.num_hidden_layers} layers; "
      f"batch {batch} x context {context} tokens")
needs = {fmt: parallel.memory_needed(plan, fmt=fmt, batch=batch, context=context) for fmt in plan_formats}
rows = []
for fmt, need in needs.items():
    row = {"format": fmt, "weights GiB": need["weights"] / 2**30, "KV cache GiB": need["kv_cache"] / 2**30,
           "total GiB": need["total"] / 2**30}
    for text, devices in {**machines, **({"GPUs here": gpus} if gpus else {})}.items():
        verdict = parallel.fit(need, devices)
        row[text] = ("fits on one" if verdict["one_device"] else
                     f"{verdict['devices_needed']} needed, " + ("enough" if verdict["all_devices"] else "too few"))
    rows.append(row)
    res.metric(results.metric_name("plan", plan_model, fmt, "total_gib"), need["total"] / 2**30)
widgets.show(rows, title=f"{plan_model}: memory needed, and the machines")

# %% [markdown]
# Is the calculator right? The model the jobs below run is loaded for real: its weights are counted by
# `get_memory_footprint()` and its KV cache is measured after a forward pass over a prompt.

# %%
job_model, tokenizer = models.load_model(model_id, device=device, dtype=job_dtype, attn_implementation="sdpa")
element = roofline.element_size(job_model.dtype)
probe_tokens = 64
predicted = parallel.memory_needed(job_model, batch=2, context=probe_tokens, element_bytes=element)
with torch.inference_mode():
    output = job_model(input_ids=generation.random_prompt(job_model, batch=2, length=probe_tokens), use_cache=True)
measured_kv = parallel.cache_bytes(output)
measured_weights = job_model.get_memory_footprint()
widgets.show([{"what": "weights", "predicted MiB": predicted["weights"] / 2**20, "measured MiB": measured_weights / 2**20},
              {"what": f"KV cache, 2 x {probe_tokens} tokens", "predicted MiB": predicted["kv_cache"] / 2**20,
               "measured MiB": measured_kv / 2**20}], title=f"{model_id} ({job_dtype}) on {device}")
res.check("calculator_weights_match_footprint", abs(predicted["weights"] / measured_weights - 1) < 0.01)
res.check("calculator_kv_cache_exact", predicted["kv_cache"] == measured_kv)
del output

# %% [markdown]
# **Where would the layers go?** `from_pretrained(..., device_map="auto")` first shares the model out evenly
# between the GPUs (`"sequential"` would fill GPU 0 first), then gives each GPU whole decoder layers in order; what
# is left over goes to the CPU (offloaded: fetched to a GPU at every step) and then to disk. accelerate plans this
# from the shapes alone, so no GPU is needed: below, each machine you listed, for each format. Each bar is the
# model from its embeddings (left) to its output layer (right), each block as wide as its bytes in that format.

# %%
placements, per_device = {}, []
for text, devices in {**machines, **({f"GPUs here ({parallel.describe_devices(gpus)})": gpus} if gpus else {})}.items():
    for fmt in plan_formats:
        device_map = parallel.plan_device_map(plan, devices, fmt=fmt)
        label = f"{text}, {fmt}"
        res.check(results.metric_name("plan_covers_every_layer", text, fmt), not parallel.unplaced(plan, device_map))
        placements[label] = parallel.placement(plan, device_map, fmt=fmt)
        for where in dict.fromkeys(r["device"] for r in placements[label]):
            mine = [r for r in placements[label] if r["device"] == where]
            per_device.append({"plan": label, "device": f"GPU {where}" if isinstance(where, int) else where,
                               "blocks": len(mine), "from": mine[0]["block"], "to": mine[-1]["block"]})
fig = plots.device_maps(placements, title=f"{plan_model}: device_map='auto' as planned")
saved = res.figure("device_maps", fig)
widgets.show(per_device, title="Blocks per device")

# %% [markdown]
# Every plan places every parameter somewhere (a check per plan). A plan with a grey "cpu" part runs, but those
# layers' weights cross to the GPU at every step: section 2 measures what that costs where there is a GPU.
#
# ## 2. Pipeline placement: what `device_map="auto"` buys
#
# With `device_map="auto"` each GPU holds some consecutive layers, and a token passes through them in turn: GPU 1
# waits while GPU 0 works. The model fits where it did not, but one token still reads every weight once, through
# one GPU at a time, so **expect about the speed of one GPU**, not more. What is measured depends on the machine:
# with two GPUs, the model split over both against the model on one; with one GPU, half of a 1B model offloaded to
# the CPU against none; with no GPU, nothing (a `device_map` places layers on GPUs).

# %%
pipeline_rows = []


def decode_row(label, model, bound_bytes_per_s, bound_bytes):
    prompt = generation.random_prompt(model, batch=1, length=16)
    row = generation.measure_decode(model, prompt, new_tokens=new_tokens, repeats=repeats, tokenizer=tokenizer)
    bound = bound_bytes_per_s / bound_bytes
    return {"placement": label, "tokens/s": row["tokens_per_s"], "bound tokens/s": bound,
            "fraction of bound": row["tokens_per_s"] / bound, "token_ids": row["token_ids"]}


if len(gpus) >= 2:
    one, _ = models.load_model(pipeline_model, device="cuda:0", dtype=gpu_dtype, attn_implementation="sdpa")
    weights = roofline.parameter_bytes(one)
    bandwidth = roofline.bandwidth_ceiling("cuda:0")["bytes_per_s"]
    pipeline_rows.append(decode_row("one GPU", one, bandwidth, weights))
    del one
    torch.cuda.empty_cache()
    spread, _ = models.load_model(pipeline_model, dtype=gpu_dtype, attn_implementation="sdpa", device_map="auto",
                                  max_memory=parallel.balanced_max_memory(parallel.empty_model(pipeline_model), 2))
    placed = getattr(spread, "hf_device_map", {"": str(spread.device)})  # transformers sets it only when spread
    print("device map:", sorted(set(map(str, placed.values()))), "-", len(placed), "entries")
    pipeline_rows.append(decode_row("two GPUs, device_map='auto'", spread, bandwidth, weights))
    res.check("pipeline_uses_two_gpus", len({d for d in placed.values() if isinstance(d, int)}) == 2)
    res.check("pipeline_tokens_equal_one_gpu", pipeline_rows[0]["token_ids"] == pipeline_rows[1]["token_ids"])
    del spread
elif len(gpus) == 1:
    one, _ = models.load_model(pipeline_model, device="cuda:0", dtype=gpu_dtype, attn_implementation="sdpa")
    weights = roofline.parameter_bytes(one)
    bandwidth = roofline.bandwidth_ceiling("cuda:0")["bytes_per_s"]
    pipeline_rows.append(decode_row("all on the GPU", one, bandwidth, weights))
    del one
    torch.cuda.empty_cache()
    half, _ = models.load_model(pipeline_model, dtype=gpu_dtype, attn_implementation="sdpa", device_map="auto",
                                max_memory={0: weights // 2, "cpu": 2**62})
    placed = getattr(half, "hf_device_map", {"": str(half.device)})
    if {0, "cpu"} <= set(placed.values()):
        offloaded = sum(r["bytes"] for r in parallel.placement(half, placed) if r["device"] == "cpu")
        link = parallel.copy_bandwidth("cpu", "cuda:0")
        print(f"{offloaded / 2**30:.2f} GiB offloaded to the CPU; host-to-GPU copy {link['bytes_per_s'] / 1e9:.1f} GB/s (measured)")
        pipeline_rows.append(decode_row("part offloaded to the CPU", half, link["bytes_per_s"], offloaded))
        res.check("offload_tokens_equal_all_on_gpu", pipeline_rows[0]["token_ids"] == pipeline_rows[1]["token_ids"])
    else:
        res.skip("CPU offload", f"device_map put all of {pipeline_model} on {sorted(set(map(str, placed.values())))}")
    del half
else:
    res.skip("pipeline placement", "no GPU here: a device_map places layers on GPUs (and offloads from them)")
if pipeline_rows:
    widgets.show([{k: v for k, v in r.items() if k != "token_ids"} for r in pipeline_rows], title=f"{pipeline_model}, batch 1")
    for r in pipeline_rows:
        res.metric(results.metric_name("pipeline", r["placement"], "tokens_per_s"), r["tokens/s"])

# %% [markdown]
# The bound of each row is the physical limit of its slowest path: for weights in GPU memory, the GPU's memory
# bandwidth over the weight bytes read per token; for offloaded weights, the measured host-to-GPU copy bandwidth
# over the offloaded bytes, which must cross at every step.
#
# ## 3. Tensor parallelism: every layer split across processes
#
# transformers' tensor-parallel plan (`DistributedConfig(tp_plan="auto")` in `from_pretrained`) splits each
# attention block by heads and each MLP by its width: the query, key, value, gate and up projections by columns,
# the output and down projections by rows. Each process computes its share, and an **all-reduce** sums the shares
# after the attention block and after the MLP of every layer, for every token. So each process holds about 1/N of
# the weights and reads 1/N per token (faster), and pays for collectives at every layer of every token (slower):
# the script counts them with the profiler during one forward pass.
#
# A Jupyter kernel cannot host the processes, so a script runs them under `torchrun`; the cell prints the command to
# type in a terminal for the same job. With one process the script loads the model whole: the baseline. Expect
# identical greedy tokens; expect a speed-up only where an all-reduce costs less than the work it splits.

# %%
tp_runs = {}
for n in processes:
    try:
        parallel.check_tensor_parallel(parallel.model_config(model_id), n)
    except BadParameter as error:
        res.skip(f"tensor parallel with {n} processes", str(error))
        continue
    tp_runs[n] = parallel.launch(scripts / "tp_generate.py", n, {
        "model": model_id, "dtype": job_dtype, "new_tokens": new_tokens, "repeats": repeats}, gpus=jobs_on_gpus)
base = tp_runs[1]
tp_rows = []
for n, run in tp_runs.items():
    gap = max(abs(a - b) for a, b in zip(run["top_logits"], base["top_logits"], strict=True))
    same = [a == b for a, b in zip(run["token_ids"][0], base["token_ids"][0], strict=True)]
    calls = run["collectives_per_forward"]
    tp_rows.append({"processes": n, "backend": run["backend"], "tokens/s": run["tokens_per_s"],
                    "speed-up": run["tokens_per_s"] / base["tokens_per_s"], "step ms": run["step_ms"],
                    "MiB per process": max(run["parameter_bytes_per_rank"]) / 2**20,
                    "SDPA backend": run["sdpa_backend"], "tokens equal to 1 process": f"{sum(same)}/{len(same)}",
                    "collectives per forward": ", ".join(f"{c} {op.removeprefix('c10d::')}" for op, c in calls.items()) or "none",
                    "top logit gap": gap})
    res.metric(f"tp_{n}_tokens_per_s", run["tokens_per_s"])
    res.metric(f"tp_{n}_speedup", run["tokens_per_s"] / base["tokens_per_s"])
    res.metric(f"tp_{n}_top_logit_gap", gap)
widgets.show(tp_rows, title=f"Tensor parallel decode, {model_id} ({job_dtype}), batch 1, on {base['device_label']}")

# %%
split = [n for n in tp_runs if n > 1]
if not split:
    res.skip("tensor-parallel checks", f"no run with more than one process (processes={processes})")
else:
    total = base["parameter_bytes_per_rank"][0]
    res.check("tp_weights_split", all(max(tp_runs[n]["parameter_bytes_per_rank"]) <= 1.1 * total / n for n in split))
    res.check("tp_ran_sdpa", all(run["sdpa_backend"] for run in tp_runs.values()))
    res.check("tp_calls_collectives", all(tp_runs[n]["collectives_per_forward"] for n in split))
    if job_dtype == "float32":  # the shares are summed in another order, so 16-bit logits may differ in the last bit
        res.check("tp_tokens_equal_single_process", all(tp_runs[n]["token_ids"] == base["token_ids"] for n in split))
        res.check("tp_logits_close", all(r["top logit gap"] < 1e-4 * max(1.0, max(map(abs, base["top_logits"])))
                                         for r in tp_rows))
    else:
        print("16-bit: token agreement and the logit gap are reported above, not asserted (summation order differs).")

# %% [markdown]
# What was seen: each process holds about 1/N of the bytes; the table says how many greedy tokens match one
# process's (asserted in float32, where the sum of the shares rounds the same); the SDPA backend column shows which
# attention kernel ran inside each process, and the last column the collectives one forward pass called. Whether N
# processes were faster depends on what one collective costs on this machine's links, measured in section 6, against
# the work each one splits.
#
# ## 4. Data parallelism: one whole model per process, the prompts shared out
#
# Each process loads the whole model and takes a consecutive share of the prompts
# (`accelerate.PartialState().split_between_processes`); rank 0 gathers the results in prompt order. Nothing is
# exchanged while generating, so throughput should grow with the processes as long as each has its own device
# (or cores): the price is a full copy of the weights per process.

# %%
dp_runs = {n: parallel.launch(scripts / "dp_generate.py", n, {
    "model": model_id, "dtype": job_dtype, "prompts": dp_prompts, "new_tokens": new_tokens}, gpus=jobs_on_gpus)
    for n in processes}
dp_base = dp_runs[1]
dp_rows = []
for n, run in dp_runs.items():
    order = [r["prompt"] for r in run["results"]]
    dp_rows.append({"processes": n, "backend": run["backend"], "threads each": run["threads"],
                    "prompts per process": ", ".join(str(sum(r["rank"] == k for r in run["results"])) for k in range(n)),
                    "seconds": run["seconds"], "tokens/s": run["tokens_per_s"],
                    "speed-up": run["tokens_per_s"] / dp_base["tokens_per_s"], "in order": order == list(range(dp_prompts))})
    res.metric(f"dp_{n}_tokens_per_s", run["tokens_per_s"])
    res.metric(f"dp_{n}_speedup", run["tokens_per_s"] / dp_base["tokens_per_s"])
widgets.show(dp_rows, title=f"Data parallel generation, {dp_prompts} prompts x {new_tokens} tokens, {model_id}")
res.check("dp_results_complete_and_in_order", all(r["in order"] for r in dp_rows))
res.check("dp_tokens_equal_single_process", all(
    [r["token_ids"] for r in run["results"]] == [r["token_ids"] for r in dp_base["results"]] for run in dp_runs.values()))

# %%
fig = plots.scaling({"tensor parallel (one sequence)": (list(tp_runs), [r["speed-up"] for r in tp_rows]),
                     "data parallel (all prompts)": (list(dp_runs), [r["speed-up"] for r in dp_rows])},
                    ylabel="speed-up over 1 process", title=f"{model_id} on {base['device_label']}")
saved = res.figure("scaling", fig)

# %% [markdown]
# What was seen: the speed-up column, and the figure against the ideal line. On a CPU, the processes share its
# cores: each process gets a share of the threads (the "threads each" column), so the comparison is fair to one
# process using them all.
#
# ## 5. Combining them, and several machines
#
# **Tensor parallel + SDPA.** The tensor-parallel processes above loaded the model with `attn_implementation="sdpa"`,
# and the SDPA backend column shows the kernel that ran inside each (notebook 01 explains the backends). Each
# process runs attention on its own heads: no attention kernel needs to know about the split.
#
# **4-bit + `device_map`.** A quantization config and a device map combine in one `from_pretrained` call. The
# footprint should match section 1's calculator for that format.

# %%
bnb_probe = probes.bitsandbytes_4bit([device])
if all(r["ok"] for r in bnb_probe):
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend logs about optional kernels
    compute = "bfloat16" if not on_gpu or probes.native_bf16(device) else "float16"
    four_bit, _ = models.load_model(model_id, device=device, dtype=compute, attn_implementation="sdpa", device_map="auto",
                                    quantization_config=quant.quantization_config("nf4", compute))
    placed = getattr(four_bit, "hf_device_map", {"": str(four_bit.device)})
    planned = parallel.memory_needed(parallel.empty_model(model_id), fmt="nf4")["weights"]
    measured = four_bit.get_memory_footprint() + quant.predict_footprint(job_model, "nf4")["constants"]
    print(f"{model_id} in nf4 with device_map='auto': placed on {sorted(set(map(str, placed.values())))}; "
          f"{measured / 2**20:.2f} MiB measured (with the scales), {planned / 2**20:.2f} MiB planned")
    ids = generation.generate_exactly(four_bit, generation.random_prompt(four_bit, batch=1, length=8), 4, tokenizer=tokenizer)
    res.check("nf4_device_map_matches_plan", abs(measured / planned - 1) < 0.01)
    res.metric("nf4_device_map_mib", measured / 2**20)
    del four_bit
else:
    res.skip("4-bit with device_map", f"bitsandbytes cannot run 4-bit on {device}: {bnb_probe[0]['reason']}")

# %% [markdown]
# **Several machines.** The scripts do not change. On each machine (a *node*) you start the same command, naming how
# many nodes there are and one address where they meet (the *rendezvous*); torchrun numbers the processes across all
# of them. For two machines with 8 GPUs each, on both:
#
# ```
# torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id job1 \
#     scripts/tp_generate.py --model MODEL --dtype bfloat16 --out tp.json
# ```
#
# where `HOST` is the address of one of them. Below, the rehearsal: two "nodes" of one process each, both on this
# machine, meeting at 127.0.0.1, running the all-reduce benchmark of section 6.

# %%
rehearsal = parallel.launch_nodes(scripts / "allreduce_bench.py", 2, 1, {"max_mib": 1, "repeats": 3})
print(f"{rehearsal['world_size']} processes on 2 nodes met over {rehearsal['backend']} and all-reduced "
      f"{len(rehearsal['rows'])} message sizes in {rehearsal['launch_s']:.1f} s (launch included)")
res.check("multinode_rendezvous", rehearsal["world_size"] == 2 and len(rehearsal["rows"]) > 0)

# %% [markdown]
# Between machines the all-reduce crosses the network instead of NVLink or PCIe: run section 6's benchmark over
# two nodes to see what that link costs before splitting layers across it.
#
# **When you outgrow this workbook**, serving engines do tensor parallelism (and batching, paged KV caches, ...)
# for you. They are not installed here; their one-line commands for two GPUs:
#
# * vLLM: `vllm serve MODEL --tensor-parallel-size 2` (`--pipeline-parallel-size` adds pipeline stages across nodes);
# * Text Generation Inference: `text-generation-launcher --model-id MODEL --num-shard 2`.
#
# ## 6. The communication: what one all-reduce costs
#
# Each process starts with a message of S bytes and ends with the sum of all of them. nccl-tests reports two
# bandwidths: the *algorithm bandwidth* S / time, and the *bus bandwidth*, that times 2(N-1)/N: the bytes each link
# carries in a ring all-reduce, comparable to the link's own speed. Small messages are dominated by latency, large
# ones by bandwidth. The dashed line is one measured copy of the message: between CPU processes, the memory copy
# rate (no all-reduce can beat one copy of its data, so it is a true limit); between two GPUs, one GPU 0 to GPU 1
# copy, a reference rather than a hard limit (NCCL may use several links at once).

# %%
ranks = max(processes)
if ranks < 2:
    res.skip("all-reduce benchmark", "one process only: an all-reduce needs at least two (set processes=[1, 2])")
else:
    bench = parallel.launch(scripts / "allreduce_bench.py", ranks, {"max_mib": allreduce_max_mib}, gpus=jobs_on_gpus)
    if jobs_on_gpus:
        limit = parallel.copy_bandwidth("cuda:0", "cuda:1")["bytes_per_s"]
        limit_label = "one GPU 0 to GPU 1 copy (measured)"
        topology = probes.topology()
        print("peer access between GPUs:", topology["peer_access"])
        if shutil.which("nvidia-smi"):
            print(subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout)
    else:
        limit = roofline.bandwidth_ceiling("cpu")["bytes_per_s"] / 2  # that ceiling counts a copy's reads and writes
        limit_label = "one memory copy of the message (measured)"
    widgets.show([{"bytes": r["bytes"], "µs": r["median_us"], "algbw GB/s": r["algbw_bytes_per_s"] / 1e9,
                   "busbw GB/s": r["busbw_bytes_per_s"] / 1e9} for r in bench["rows"]],
                 title=f"all_reduce over {bench['backend']}, {ranks} processes on {bench['device_label']}")
    fig = plots.bandwidth_sweep(bench["rows"], limit=limit, limit_label=limit_label,
                                title=f"all_reduce, {ranks} processes over {bench['backend']}")
    saved = res.figure("allreduce", fig)
    best = max(r["busbw_bytes_per_s"] for r in bench["rows"])
    res.metric("allreduce_best_busbw_gb_per_s", best / 1e9)
    res.metric("allreduce_smallest_us", bench["rows"][0]["median_us"])
    res.metric("allreduce_fraction_of_copy", best / limit)
    print(f"best bus bandwidth {best / 1e9:.3g} GB/s = {best / limit:.1%} of the {limit_label}, {limit / 1e9:.3g} GB/s")


# %% [markdown]
# Back to tensor parallelism: at batch 1 each all-reduce carries one token's hidden state, a few KiB at most, where
# the latency dominates; the all-gather at the end collects each process's slice of the logits. The collectives the
# profiler counted in one forward pass, each timed at its message size from the benchmark above (an all-gather timed
# as an all-reduce of the same size, an approximation), predict what N processes add to each step:

# %%
def seconds_for(size):
    # one all-reduce of size bytes, from the benchmark (the first size at least as large)
    nearest = next((r for r in bench["rows"] if r["bytes"] >= size), bench["rows"][-1])
    return nearest["median_us"] / 1e6


if ranks >= 2 and len(tp_runs) > 1:
    n = max(tp_runs)
    config = job_model.config
    messages = {"allreduce": config.hidden_size * element, "allgather": config.vocab_size // n * element}
    rows, predicted_ms = [], 0.0
    for op, count in tp_runs[n]["collectives_per_forward"].items():
        kind = next((k for k in messages if op.removeprefix("c10d::").startswith(k)), None)
        size = messages.get(kind, config.hidden_size * element)
        rows.append({"collective": op, "calls per token": count, "message bytes": size,
                     "ms each (benchmark)": seconds_for(size) * 1e3})
        predicted_ms += count * seconds_for(size) * 1e3
    widgets.show(rows, title=f"Collectives in one forward pass, {n} processes")
    print(f"predicted communication {predicted_ms:.2f} ms per token; measured step {tp_runs[n]['step_ms']:.2f} ms with "
          f"{n} processes, against {base['step_ms']:.2f} ms with one (ideal with {n}: {base['step_ms'] / n:.2f} ms)")
    res.metric("tp_predicted_communication_ms_per_token", predicted_ms)
else:
    print("Needs the tensor-parallel runs and the all-reduce benchmark with at least 2 processes.")

# %% [markdown]
# Where the prediction falls short of the measured step, the difference is time the benchmark does not see: what
# the split adds besides the collectives themselves (the bookkeeping of the sharded tensors, and each collective
# waiting for the slowest process). Run the notebook on GPUs to see how much of each remains there.
#
# ## Your numbers beside the reference runs

# %%
reference = results.reference_runs("05_multi_gpu")
keys = sorted(k for k in res.metrics if k.startswith(("tp_", "dp_", "allreduce_", "pipeline_")))
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
# **05.1 · Predict.** Section 1's calculator gave the memory that llama-70b-shape needs in 16-bit (printed below, weights and KV cache). How many 24 GB GPUs does it need, with the planning margin this notebook uses?

# %%
from labkit import exercises

verdicts = []
ex = exercises.get("05.1")
need_70b = parallel.memory_needed(parallel.empty_model("llama-70b-shape"), fmt="16-bit", batch=batch, context=context)
given = {"total_bytes": need_70b["total"], "weight_bytes": need_70b["weights"], "device_bytes": 24e9}
print(f"weights {need_70b['weights'] / 2**30:.1f} GiB + KV cache {need_70b['kv_cache'] / 2**30:.2f} GiB")
answer = None  # a whole number of GPUs
if solutions:  # a workshop run fills in the solution
    answer = ex.solved(**given)
verdicts.append(ex.check(answer, record=not solutions, **given))

# %% [markdown]
# **05.2 · Code.** Write the data-parallel split: `my_split(items, rank, world_size)` returns the items that process `rank` of `world_size` works on. Every item must go to exactly one process, and the shares may differ by at most one.

# %%
ex = exercises.get("05.2")
given = {}


def my_split(items, rank, world_size):
    return None  # your code


answer = my_split
if solutions:  # a workshop run fills in the solution
    answer = ex.solved(**given)
verdicts.append(ex.check(answer, record=not solutions, **given))

# %% [markdown]
# **05.3 · Predict.** Suppose an all-reduce of 256 MiB over 8 ranks takes 2 ms. What bus bandwidth, in GB/s, does nccl-tests report for it (section 6 explains the two bandwidths)?

# %%
ex = exercises.get("05.3")
given = {"message_bytes": 256 * 2**20, "seconds": 2e-3, "ranks": 8}
answer = None  # your prediction, in GB/s
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
