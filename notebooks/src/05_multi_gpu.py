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
# A model is spread over devices for one of two reasons: it does not fit on one, or one is not fast enough. The
# layouts people deploy buy different things. This notebook measures each one on your machine:
#
# 1. **do I need more than one GPU?** The memory of the weights (per dtype and 4/8-bit format) plus the KV cache
#    (per batch and context), checked against a real model, compared with the GPUs present or with machines you type
#    in ("2 x 24 GB", "2 nodes x 8 x 80 GB"); and where `device_map="auto"` would put every layer, planned without
#    any GPU;
# 2. **placement with `device_map`**: consecutive layers on consecutive GPUs, one GPU working at a time (measured
#    where there are GPUs);
# 3. **tensor parallelism** (TP): every layer's matrices split across processes with transformers'
#    `DistributedConfig(tp_size=N)`, launched with `torchrun`; in float32 the tokens must equal one process's;
# 4. **data parallelism** (DP): one whole copy of the model per process, the prompts shared out;
# 5. **pipeline parallelism** (PP, `pp_size`): consecutive layers on consecutive processes, and the *bubble*;
# 6. **expert parallelism** (EP, `ep_size`): the experts of a mixture-of-experts model shared out;
# 7. **several machines**: the layout a planner proposes (TP inside a node, PP across nodes), rehearsed as two
#    "nodes" on this machine;
# 8. combining them, and the serving engines that do all this for you;
# 9. **the communication** every split pays: an all-reduce benchmark, reported as nccl-tests reports it, and what
#    TP's traffic would cost over NVLink or over a network.
#
# The same scripts are written for one CPU machine (processes talking over gloo), several GPUs (NCCL) and several
# machines (a torchrun rendezvous). Where this machine has fewer GPUs than a measurement needs, that cell says so in
# one line.

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

# %%
import labkit
from labkit import compat, models, parallel, plots, probes, quant
from labkit.widgets import show

lab = labkit.start("05_multi_gpu", globals())

# %%
show(lab.environment_rows(), ["item", "value"], title="Environment")
nccl = probes.nccl()
print(f"NCCL: {nccl['version'] or 'no'} ({nccl['reason'] or 'ready'}); gloo: {'yes' if nccl['gloo'] else 'no'}")

# %% [markdown]
# ## 1. Do I need more than one GPU?
#
# Serving a model needs room for two things, counted below; the activations of a forward pass are not counted, the
# planning margin is there for them:
#
# * the **weights**: parameters x bytes per parameter, 2 in 16-bit; in 4-bit formats about half a byte for the
#   linear layers plus their scales, while embeddings and norms stay 16-bit (notebook 04);
# * the **KV cache**: 2 (keys and values) x layers x key/value heads x head size x batch x context x 2 bytes. Many
#   recent models (Llama 3 among them) use *grouped-query attention* (GQA): several query heads share one key/value
#   head, so the cache holds fewer heads than attention uses (llama-70b-shape: 64 query heads, 8 key/value heads).
#
# A plan fills each device to 90% at most, a margin we leave for the CUDA context, the activations and the allocator.
# First what the model needs:

# %%
model = lab.planned  # on the meta device: shapes, no memory
parameters = sum(p.numel() for p in model.parameters())
print(f"{lab.plan_model}: {parameters / 1e9:.2f} billion parameters, {model.config.num_hidden_layers} layers; "
      f"batch {lab.batch} x context {lab.context} tokens")
needs, rows = parallel.need_rows(model, lab.formats, batch=lab.batch, context=lab.context)
show(rows, title=f"{lab.plan_model}: memory needed")

# %% [markdown]
# **05.1 · Predict.** Take the total of the table's first row (16-bit unless you changed `plan_formats`). How many
# GPUs of 24 GB does it need, with the planning margin this notebook uses?

# %%
need = needs[lab.formats[0]]
ex = lab.exercise("05.1", total_bytes=need["total"], weight_bytes=need["weights"],
                  device_bytes=parallel.parse_size("24 GB"))
answer = None  # a whole number of GPUs
ex.check(answer)

# %% [markdown]
# The machines you listed (and this machine's GPUs, if any): how many of their GPUs the model needs, and whether they
# have that many. GB here are GiB (2**30 bytes). A GPU sold as 80 GB shows a little less to programs (the H100 in
# `reference/nvidia-h100/` showed 79.2 GiB to torch); the 10% margin covers that.

# %% tags=["reveals-05.1"]
machines = {**lab.machines, **({"GPUs here": {"devices": lab.gpus}} if lab.gpus else {})}
fits = parallel.machine_rows(needs, machines, lab.plan_model)
show(fits["rows"], title=f"{lab.plan_model}: GPUs needed on each machine")
lab.record(fits["metrics"])
ex.compare(parallel.devices_needed(need["total"], parallel.parse_size("24 GB")), "GPUs")

# %% [markdown]
# Is the calculator right? The model the jobs below run is loaded for real: its weights are counted by
# `get_memory_footprint()` and its KV cache is measured after a forward pass over a prompt.

# %%
check = parallel.calculator_check(lab.job_model)
show(check["rows"], title=f"{lab.model_id} ({lab.job_dtype}) on {lab.device}")
lab.add(check)

# %% [markdown]
# **Where would the layers go?** `from_pretrained(..., device_map="auto")` first shares the model out evenly between
# the GPUs (`"sequential"` would fill GPU 0 first), then gives each GPU whole decoder layers in order; what is left
# over goes to the CPU (offloaded: fetched to a GPU at every step) and then to disk. accelerate plans this from the
# shapes alone, so no GPU is needed: below, each machine you listed, for each format. Each bar is the model from its
# embeddings (left) to its output layer (right), each block as wide as its bytes in that format.

# %%
planned = parallel.placements(lab.planned, machines, lab.formats)
title = f"{lab.plan_model}: device_map='auto' as planned"
lab.figure("device_maps", plots.device_maps(planned["placements"], title=title))
show(planned["rows"], title="Blocks per device")
lab.add(planned)

# %% [markdown]
# Every plan places every parameter somewhere (checked for each plan). A plan with a grey "cpu" part runs, but those
# layers' weights cross to the GPU at every step: section 2 measures what that costs where there is a GPU.
#
# ## 2. Placement with `device_map`: what it buys
#
# ```python
# model = AutoModelForCausalLM.from_pretrained(name, device_map="auto", max_memory={0: "20GiB", 1: "20GiB"})
# ```
#
# Each GPU holds some consecutive layers and a token passes through them in turn: GPU 1 waits while GPU 0 works. The
# model fits where it did not, but one token still reads every weight once, through one GPU at a time, so **expect
# about the speed of one GPU**, not more. That is an expectation from how the placement runs (accelerate's guide:
# "Loading parts of a model onto each GPU and processing a single input at one time",
# https://huggingface.co/docs/accelerate/main/en/usage_guides/distributed_inference): measured below where there are
# GPUs, and between CPU processes in section 5. With two GPUs: the model split over both against the model on one;
# with one GPU: half of a 1B model offloaded to the CPU against none; with no GPU, nothing (a `device_map` places
# layers on GPUs).

# %%
placed = parallel.measure_device_map(lab.pipeline_model, lab.gpus, dtype=lab.gpu_dtype, new_tokens=lab.new_tokens,
                                     repeats=lab.repeats)
if placed["rows"]:
    show(placed["rows"], title=f"{lab.pipeline_model}, batch 1, placed by device_map")
    print(placed.get("line", ""))
lab.add(placed)

# %% [markdown]
# The bound of each row is the physical limit of its slowest path: for weights in GPU memory, the GPU's memory
# bandwidth over the weight bytes read per token; for offloaded weights, the measured host-to-GPU copy bandwidth over
# the offloaded bytes, which must cross at every step. What was seen, where the cell ran: with two GPUs, the line under
# the table gives the split model's tokens/s as a multiple of one GPU's, and near 1 (a little under, for the hop
# between the GPUs) is the "speed of one GPU" expected above; with one GPU, the offloaded row is the slower one, and a
# fraction of its copy bound near 1 says that copying the offloaded weights is what sets its pace. Without a GPU the
# cell says it skipped, and section 5 shows the same effect between CPU processes.
#
# ## 3. The layouts as torchrun jobs
#
# A Jupyter kernel cannot host the processes, so a script runs them under `torchrun` (`scripts/layouts.py`); each
# launch prints the command to type in a terminal for the same job. Starting the processes costs seconds (each imports
# torch and transformers), more than these small jobs take, so one launch runs the four one-machine layouts one after
# another in the same processes: tensor, pipeline and expert parallelism, and data parallelism; sections 3 to 6 read
# its results (`--layouts tp` runs one alone). Each layout is compared with its model whole in one process: rank 0
# runs it alone, with the threads one process would have, while the others wait.

# %%
jobs = {}
for n in lab.processes:
    layouts = parallel.layouts_for(n, lab.model_id)  # those whose sizes divide n processes
    lab.add(layouts)
    jobs[n] = parallel.launch(lab.scripts / "layouts.py", n, {
        "layouts": layouts["run"], "model": lab.model_id, "dtype": lab.job_dtype, "new_tokens": lab.new_tokens,
        "repeats": lab.repeats, "prompts": lab.dp_prompts, "one_process_threads": parallel.threads_per_process(1)},
        gpus=lab.jobs_on_gpus)
if not lab.jobs_on_gpus:
    lab.skip("the layouts over NCCL", f"GPUs here: {len(lab.gpus)}, 2 needed: they ran on CPU processes over gloo")

# %% [markdown]
# ### Tensor parallelism: every layer split across processes
#
# transformers' tensor-parallel plan (`DistributedConfig(tp_size=N)` in `from_pretrained`) splits each attention block
# by heads and each MLP by its width. Write a linear layer as y = x W, with W's rows for the inputs and its columns
# for the outputs (PyTorch stores W transposed). The query, key, value, gate and up projections are split
# **colwise**: each process holds some columns of W, so it computes its own slice of the output features (its own
# heads) and nothing needs exchanging. The output and down projections are split **rowwise**: each process holds the
# rows of W that match the slice of input it already has, so each computes a partial sum of the full output, and an
# **all-reduce** adds the partial sums up. That happens after the attention block and after the MLP of every layer,
# for every token. So each process holds about 1/N of the weights and reads 1/N per token (faster), and pays for
# collectives at every layer of every token (slower): the script counts them with the profiler during one forward
# pass. Expect identical greedy tokens in float32 (in 16-bit the partial sums are added in another order, so a
# near-tie can flip); expect a speed-up only where an all-reduce costs less than the work it splits. Here it is
# measured between this machine's GPUs over NCCL where there are two or more, else between CPU processes; for GPUs in
# general, transformers' documentation says that tensor parallelism "works best on hardware with fast intra-node links
# such as NVLink" (https://huggingface.co/docs/transformers/main/en/tensor_parallelism).

# %%
tp = parallel.tp_findings(parallel.with_layout(jobs, "tp"))
if tp["rows"]:
    show(tp["rows"], title=f"Tensor parallel decode, {lab.model_id} ({lab.job_dtype}), batch 1")
lab.add(tp)

# %% [markdown]
# What was seen: each process holds about 1/N of the bytes; the table says how many greedy tokens match one process's
# (asserted in float32, where the sum of the shares rounds the same); the last columns the collectives one forward
# pass called: two all-reduces per layer, one more for the embedding (its vocabulary is split across the processes
# and their partial lookups summed), and an all-gather of each process's slice of the logits. Whether N
# processes were faster depends on what one collective costs on this machine's links, measured in section 9.
#
# **05.2 · Predict.** Under GQA the KV cache holds the key/value heads only, and tensor parallelism gives each process
# its share of them (that is why TP must divide the key/value heads). After the job's prompt, how many KiB of KV cache
# does each tensor-parallel process hold? The model's shape and the job's sizes are printed with the question.

# %%
tp_job = max(parallel.with_layout(jobs, "tp").items(), default=(0, None))[1]
if tp_job is not None:
    ex = lab.exercise("05.2", **parallel.kv_exercise(tp_job, lab.job_model.config))
    print(ex)
    answer = None  # your prediction, in KiB
    ex.check(answer)

# %% [markdown]
# The job measured each process's cache after the prompt, beside one process's:

# %% tags=["reveals-05.2"]
if tp_job is not None:
    kv = parallel.kv_per_rank(tp_job)
    show(kv["rows"], title=f"KV cache after a {tp_job['tp']['prompt_tokens']}-token prompt, {lab.model_id}")
    lab.add(kv)
    ex.compare(kv["kib_per_rank"], "KiB")

# %% [markdown]
# ## 4. Data parallelism: one whole model per process, the prompts shared out
#
# Each process loads the whole model and takes a consecutive share of the prompts
# (`accelerate.PartialState().split_between_processes`); rank 0 gathers the results in prompt order. Nothing is
# exchanged while generating, so throughput should grow with the processes as long as each has its own device (or
# cores): the price is a full copy of the weights per process.

# %%
dp = parallel.dp_findings(parallel.with_layout(jobs, "dp"), lab.dp_prompts)
show(dp["rows"], title=f"Data parallel generation, {lab.dp_prompts} prompts x {lab.new_tokens} tokens, {lab.model_id}")
lab.add(dp)
lines = {"tensor parallel (one sequence)": ([r["processes"] for r in tp["rows"]], [r["speed-up"] for r in tp["rows"]]),
         "data parallel (all prompts)": ([r["processes"] for r in dp["rows"]], [r["speed-up"] for r in dp["rows"]])}
lab.figure("scaling", plots.scaling(lines, ylabel="speed-up over 1 process", title=f"{lab.model_id}"))

# %% [markdown]
# What was seen: the speed-up column, and the figure against the ideal line. On a CPU the processes share its cores:
# each process gets a share of the threads, and one process alone gets them all (unless `OMP_NUM_THREADS` sets them),
# so the comparison is fair to one process using the whole machine.
#
# **05.3 · Code.** Write the data-parallel split: `my_split(items, rank, world_size)` returns the items that process
# `rank` of `world_size` works on. Every item must go to exactly one process, and the shares may differ by at most
# one.

# %%
ex = lab.exercise("05.3")


def my_split(items, rank, world_size):
    return None  # your code


answer = None  # once my_split is written: answer = my_split
ex.check(answer)

# %% [markdown]
# ## 5. Pipeline parallelism: stages in turn, and the bubble
#
# `DistributedConfig(pp_size=N)` gives each process consecutive layers (transformers 5.25 splits them by count); the
# embeddings go to the first stage, the final norm and the output layer to the last. In a decode step stage 0 runs its
# layers and sends the hidden states to stage 1, which runs its layers, computes the logits and broadcasts them to
# every stage (so that `generate()` works unchanged). While one stage computes, the others wait: that idle time is the
# *bubble*. With one sequence, or several decoded together as one batch, they all sit in the same stage at the same
# time, so expect a step to take about as long as in one process (plus the transfers), and each stage to be busy
# about 1/N of the time that one process is. Pipelines fill the bubble by keeping several micro-batches in flight, one
# per stage: with m micro-batches over p stages the idle share falls to (p - 1) / (m + p - 1) (GPipe,
# https://arxiv.org/abs/1811.06965). transformers 5.25 runs the plain schedule only (its source leaves the others as a
# TODO, `transformers/distributed/pipeline_parallel.py`). The job runs `layers-llama`, a random model shaped so that
# its layers, not Python, take most of a step on a CPU (4 layers of width 512, a 512-token vocabulary), with 1
# sequence and with several.

# %%
pp = parallel.pp_findings(parallel.with_layout(jobs, "pp"))
if pp["stages"]:
    show(pp["stages"], title="Pipeline stages of layers-llama: the layers and bytes each process holds")
    show(pp["steps"], title="Decode step: one process against the pipeline; busy = share of the time in its layers")
lab.add(pp)

# %% [markdown]
# What was seen: each of the N stages holds about 1/N of the bytes (the `share of 1 process` column: the capacity a
# pipeline buys), and the step table says whether its greedy tokens equal one process's. The step time of the pipeline
# is compared with one process's, and the busy share of each stage with that of one process running all the layers:
# the difference is the bubble, plus the time of the transfers.
#
# ## 6. Expert parallelism: a mixture of experts, shared out
#
# A mixture-of-experts (MoE) layer replaces the MLP with several MLPs, the *experts*, and a small *router* that picks a
# few of them for each token. The job runs `tiny-moe`, a random Qwen3-MoE model built from a config: 4 experts per
# layer, 2 per token. `DistributedConfig(tp_size=N, ep_size=N)` gives each process 1/N of the experts (transformers
# 5.25 requires `ep_size` to be a multiple of `tp_size` and to divide `tp_size x fsdp_size`, so attention is split by
# TP as well). The experts get their tokens in one of two ways (`ep_implementation`): `"all_reduce"`, every process
# runs its own experts on the whole batch and an all-reduce sums the outputs (the job asks for `"auto"`, which picks
# `"all_reduce"` at inference when the processes hold the same batch, as here), or `"all_to_all"`, each token travels
# to the process that holds its expert and back. Expect the same tokens as one process either way, and the profiler to
# show which collective each one called.

# %%
ep = parallel.ep_findings(parallel.with_layout(jobs, "ep"))
if ep["rows"]:
    show(ep["rows"], title="tiny-moe with expert parallelism, one forward pass per way of dispatching")
lab.add(ep)

# %% [markdown]
# ## 7. Several machines: TP inside a node, PP across nodes
#
# The rule people deploy with: tensor parallelism inside a node, where GPUs talk over NVLink or PCIe, and pipeline
# (or data) parallelism across nodes, where they talk over the network. TP pays two all-reduces per layer for every
# token, so it wants the fastest link; PP sends one hidden state per stage per step; DP sends nothing while generating.
# transformers 4.53's documentation: "Tensor parallelism is very communication intensive, therefore it is reccomended
# [sic] to use it on a single machine with multiple GPUs [...] For multi-node training, methods as pipeline or data
# parallelism are more efficient" (https://huggingface.co/docs/transformers/v4.53.3/perf_infer_gpu_multi); vLLM's:
# "The tensor parallel size should be the number of GPUs in each node, and the pipeline parallel size is the number of
# nodes" (https://docs.vllm.ai/en/v0.8.3/serving/distributed_serving.html). Section 9 puts numbers on the difference.
#
# The planner applies that rule to a model and a machine: one GPU if it holds the model; else the smallest TP size
# that divides the key/value heads (each process holds whole heads), stays inside a node and holds the model; if no
# TP size inside a node does, TP over the whole node and as few pipeline stages as hold it. The GPUs left over serve
# more copies (data parallelism).
#
# **05.4 · Predict.** llama-405b-shape (126 layers, 8 key/value heads) in 16-bit, on two nodes of 8 GPUs of 80 GB:
# which TP size, and how many pipeline stages? Answer `(tp, pp)`.

# %%
ex = lab.exercise("05.4", model="llama-405b-shape", machine="2 nodes x 8 x 80 GB", fmt="16-bit", batch=lab.batch,
                  context=lab.context)
answer = None  # (tp, pp)
ex.check(answer)

# %% tags=["reveals-05.4"]
big = parallel.parse_machine("2 nodes x 8 x 80 GB")
layouts = parallel.layout_rows(list(dict.fromkeys([lab.plan_model, "llama-405b-shape"])),
                               {**lab.machines, big["text"]: big}, lab.formats, batch=lab.batch, context=lab.context)
show(layouts, title="The planner's layouts")
chosen = parallel.plan_layout(parallel.empty_model("llama-405b-shape"), big, batch=lab.batch, context=lab.context)
ex.compare((chosen["tp"], chosen["pp"]), "(tp, pp) by the planner")

# %% [markdown]
# Where 4-bit weights make one GPU enough, the table says so in the nf4 rows, at the quality cost notebook 04 measures.
# For llama-405b-shape on two nodes of 8 GPUs the layout is TP 8 inside each node and 2 pipeline stages, one per node.
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
rehearsal = parallel.launch_nodes(lab.scripts / "layouts.py", 2, 2, {
    "layouts": ["tp_pp"], "model": lab.model_id, "dtype": lab.job_dtype, "new_tokens": lab.new_tokens,
    "one_process_threads": parallel.threads_per_process(1)}, gpus=False)  # see the skip below
found = parallel.tp_pp_findings(rehearsal)
print(f"{rehearsal['world_size']} processes on {rehearsal['nodes']} nodes met over {rehearsal['backend']}.")
print("The plain call:", found["error"] or "it loaded: this transformers combines TP and PP without the workaround")
show(found["rows"], title="TP inside each node, PP across: what each process held and called in one forward pass")
print(found["line"])
lab.add(found)
lab.skip("the two-node rehearsal over NCCL", "it ran on CPU processes: " + (
    "on one machine both rehearsed nodes would use GPUs 0 and 1" if lab.gpus else "no GPU here"))

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
bnb_probe = probes.bitsandbytes_4bit([lab.device])
if all(r["ok"] for r in bnb_probe):
    compute = "bfloat16" if not lab.on_gpu or probes.native_bf16(lab.device) else "float16"
    with compat.quiet_logger("bitsandbytes"):  # its CPU backend logs about optional kernels
        nf4 = quant.quantization_config("nf4", compute)  # a BitsAndBytesConfig
        four_bit, _ = models.load_model(lab.model_id, device=lab.device, dtype=compute, attn_implementation="sdpa",
                                        device_map="auto", quantization_config=nf4)
    found = parallel.four_bit_findings(four_bit, lab.model_id)
    print(found["line"])
    lab.add(found)
    del four_bit
else:
    lab.skip("4-bit with device_map", f"bitsandbytes cannot run 4-bit on {lab.device}: {bnb_probe[0]['reason']}")

# %% [markdown]
# **Serving engines** do these layouts for you, with batching and paged KV caches besides. They are not installed
# here; their flags, from their documentation:
#
# * **vLLM**: `vllm serve MODEL --tensor-parallel-size 8 --pipeline-parallel-size 2` (TP inside each node, PP across
#   nodes, https://docs.vllm.ai/en/v0.8.3/serving/distributed_serving.html); `--data-parallel-size` for copies and
#   `--enable-expert-parallel` for the experts of a MoE model
#   (https://docs.vllm.ai/en/latest/serving/data_parallel_deployment/).
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
# **05.5 · Predict.** Suppose an all-reduce of 256 MiB over 8 ranks takes 2 ms. What bus bandwidth, in GB/s, does
# nccl-tests report for it?

# %%
ex = lab.exercise("05.5", message_bytes=256 * 2**20, seconds=2e-3, ranks=8)
answer = None  # your prediction, in GB/s
ex.check(answer)

# %% tags=["reveals-05.5"]
bench = parallel.launch(lab.scripts / "allreduce_bench.py", max(lab.processes), {"max_mib": lab.allreduce_max_mib},
                        gpus=lab.jobs_on_gpus)
found = parallel.allreduce_findings(bench, on_gpus=lab.jobs_on_gpus)
title = f"all_reduce, {bench['world_size']} processes over {bench['backend']} on {bench['device_label']}"
show(found["rows"], title=title)
lab.figure("allreduce", plots.bandwidth_sweep(bench["rows"], limit=found["limit"], limit_label=found["limit_label"],
                                              title=title))
print(found["line"])
lab.add(found)
busbw = parallel.bus_bandwidth(ex.given["message_bytes"], ex.given["seconds"], ex.given["ranks"])["busbw_bytes_per_s"]
ex.compare(busbw / 1e9, "GB/s, the busbw column's formula on the question's numbers")

# %% [markdown]
# Back to tensor parallelism: at batch 1 each all-reduce of a decode step carries one token's hidden state (hidden
# size x bytes per number: the `message bytes` column below for the job's model, 16 KiB for llama-70b-shape), where
# the latency dominates; the all-gather at the end collects each process's slice of the logits. The collectives the
# profiler counted in one forward pass (a decode step makes the same calls), each timed at a one-token message from
# the benchmark above, predict what N processes add to each step:

# %%
if tp_job is not None:
    cost = parallel.tp_cost(tp_job, lab.job_model.config, bench["rows"])
    show(cost["rows"], title=f"Collectives in one forward pass, {cost['processes']} processes")
    print(f"predicted communication {cost['predicted_ms']:.2f} ms per token; measured step {cost['step_ms']:.2f} ms "
          f"with {cost['processes']} processes, against {cost['one_process_step_ms']:.2f} ms with one")
    lab.add(cost)

# %% [markdown]
# Where the prediction falls short of the measured step, the difference is time the benchmark does not see: the
# bookkeeping of the split tensors, and each collective waiting for the slowest process.
#
# **Over NVLink or over the network?** The same arithmetic for the planned model with TP 8: two all-reduces per layer,
# each of the hidden states of every token in the forward pass. Over a published NVLink-class link (900 GB/s for both
# directions of an H100/H200 SXM, 450 each way) against a 400 Gbit/s network card (50 GB/s), from the bandwidth alone
# (both figures from NVIDIA's MLPerf system description, linked in `labkit.parallel.LINKS_SOURCE`), beside this
# machine's measured table. Each call also pays a latency, not counted in the published columns: here the smallest
# message took the microseconds of the benchmark's first row.

# %%
phases = {f"decode step, batch {lab.batch}": lab.batch,
          f"prefill, {lab.batch} x {lab.context} tokens": lab.batch * lab.context}
links = parallel.link_prediction(lab.planned.config, tp=8, tokens_by_phase=phases, bench_rows=bench["rows"])
show(links, title=f"{lab.plan_model}, TP 8: all-reduce time per forward pass, predicted")
print(f"Sources of the link speeds: {parallel.LINKS_SOURCE}")

# %% [markdown]
# What the table says: in a decode step the bandwidth part is tiny on either published link, so what remains is each
# call's latency, 2 x layers calls per token (160 for llama-70b-shape), which the published columns leave out and this
# machine's column includes; a network's latency is paid at every layer. In a prefill the bytes decide, in proportion
# to the link speeds. Either way TP across nodes puts the network inside every layer, which is why the planner keeps
# TP inside a node and sends only one hidden state per step between pipeline stages.
#
# ## Your numbers beside the reference runs

# %%
shown = {k: k for k in lab.results.metrics if k.startswith(("tp_", "dp_", "pp_", "ep_", "allreduce_", "pipeline_"))}
show(lab.beside_references(shown), title="This machine and the reference runs")

# %% [markdown]
# ## What you measured

# %%
lab.finish()
