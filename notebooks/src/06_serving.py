# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · From generate() to a server: continuous batching, paged KV cache, speculative decoding, a server under load
#
# The earlier notebooks made one model answer one batch quickly. A service answers many users. Their requests arrive
# at different times and want outputs of different lengths. The questions become: how many tokens per second does the
# machine make for everyone, and how long does each user wait? On your machine, this notebook measures:
#
# 1. **Static against continuous batching** on a mixed workload shipped with labkit. Padded batches through
#    `generate` against transformers' continuous batching with a **paged KV cache**: tokens/s, time to first token,
#    per-token latency, and the KV memory each holds.
# 2. **The throughput-latency curve**: tokens/s against per-token latency as the batch grows. Beside it, the bandwidth
#    and compute bounds of notebook 02's roofline and the knee where they meet.
# 3. **Speculative decoding**: prompt lookup and a draft model, their acceptance rate and speed-up, the same tokens.
# 4. **The KV cache's size** per token for MHA, GQA and MQA, and a **quantized KV cache** against the model's own.
# 5. **A real server**, `transformers serve --continuous-batching`, started and stopped from here. It runs under a
#    bounded load of concurrent clients, and is sent bad input.
# 6. Where to go next: vLLM and SGLang.
#
# Nothing here downloads anything. The server listens on this machine's loopback address only.

# %% tags=["parameters"]
# Parameters (papermill overrides this cell). A size of 0 or an empty list means: sized for this device.
device = "auto"                # auto, cpu, cuda or cuda:N
dtype = "auto"                 # auto picks bfloat16 on a recent GPU, float32 on CPU
model_id = "smollm2-135m"      # the served model: embedded, a local folder, or a Hub id in your cache
draft_model_id = "tiny-llama"  # the draft of section 3; it must share the model's tokenizer
requests = 0                   # requests taken from the shipped workload (at most 128)
static_batch = 0               # requests per static batch
batch_sizes = []               # decode batch sizes of the throughput-latency curve
kv_context = 0                 # tokens in the KV cache when the quantized caches are compared
server_concurrency = []        # numbers of concurrent clients sent to the server, one level each
server_requests = 0            # requests per level
quick = "auto"                 # small sizes: "auto" means on a machine without a GPU; True or False to force
solutions = False              # fill every exercise with its solution (a teacher's run)
results_path = ""              # where to write the results JSON (empty: do not write)

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
import time

import pandas as pd
from transformers import ContinuousBatchingConfig, GenerationConfig, StoppingCriteriaList

import labkit
from labkit import compat, footprint, models, outputs, plots, quant, roofline, serving, timing
from labkit.widgets import show

lab = labkit.start("06_serving", globals())

# %%
show(lab.environment_rows(), ["item", "value"], title="Environment")

# %% [markdown]
# ## 1. Static batching against continuous batching
#
# The workload is a list of requests with mixed prompt and output lengths. It was written once with a fixed seed and
# ships in `labkit/data/serving_workload.txt`. On a CPU its lengths are divided, to stay quick. All requests are
# waiting when the run starts, as in a busy service.
#
# * **Static batching** takes the requests a batch at a time. Every prompt is padded on the left to the batch's
#   longest prompt, as notebook 02 showed for decoders. The batch runs until its longest output is done. A request
#   that wants a few tokens waits for one that wants many, and the next batch waits for this one.
# * **Continuous batching** decides at *every step* which requests run. A finished request leaves at once, and a
#   waiting one takes its place. It was first described for the Orca server: Yu et al., OSDI 2022,
#   https://www.usenix.org/conference/osdi22/presentation/yu. Its KV cache is **paged**, the idea of vLLM's
#   PagedAttention. Keys and values live in fixed-size pages of a shared pool. Each request holds only the pages its
#   own tokens fill, found through a small table, so nothing is padded.
#
# Three times are measured per request:
# - the **time to first token**, TTFT, from the start of the run;
# - the **per-token latency**, the time between its tokens once it runs;
# - the **end-to-end latency**, until it is answered.
#
# Each is shown as its p50, the median request, and its p99, the unluckiest requests. With under a hundred requests,
# as on a CPU, p99 falls between the two slowest: in effect the slowest request. The model, and the workload cut from
# the shipped text with its tokenizer:

# %%
model, tokenizer = models.load_model(lab.p.model_id, device=lab.device, dtype=lab.dtype)
workload = serving.load_workload(tokenizer, requests=lab.p.requests, length_scale=lab.p.length_scale)
lengths = pd.DataFrame({"request": [r.id for r in workload], "prompt tokens": [r.prompt_tokens for r in workload],
                         "new tokens": [r.new_tokens for r in workload]})
show(lengths[:2 * lab.p.static_batch], title=f"The first requests of {len(workload)}")

# %% [markdown]
# **06.1 · Predict.** The first static batch holds the first `static_batch` requests above. Every row is padded to the
# longest prompt and runs as many steps as the longest output, so the batch computes and caches
# `rows x (longest prompt + longest output)` positions. What percentage of them hold no real token of any request?

# %%
first_batch = lengths[:lab.p.static_batch]
ex = lab.exercise("06.1", prompt_tokens=list(first_batch["prompt tokens"]), new_tokens=list(first_batch["new tokens"]))
answer = None  # your prediction, in % of the first batch's positions
ex.check(answer)

# %% [markdown]
# Static batching with `generate`: greedy decoding, each batch forced by `min_new_tokens` to run exactly its longest
# output. So both ways make the same number of tokens. `outputs.StepClock` is a stopping criterion that never stops.
# `generate` calls it after every step, so it notes when each step's tokens were ready. A request's tokens are the
# first of its row's, and it is answered when its whole batch is done.

# %%
tokenizer.padding_side = "left"  # decoders continue from each row's last real token (notebook 02)
greedy_args = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)


def static_batching(requests):
    start, rows, size = time.perf_counter(), [], lab.p.static_batch
    for batch in (requests[i:i + size] for i in range(0, len(requests), size)):  # in arrival order
        padded = tokenizer.pad({"input_ids": [list(r.prompt_ids) for r in batch]}, return_tensors="pt").to(lab.device)
        longest = max(r.new_tokens for r in batch)  # the whole batch runs until its longest request is done
        clock = outputs.StepClock(lab.device)
        output = model.generate(**padded, max_new_tokens=longest, min_new_tokens=longest,
                                stopping_criteria=StoppingCriteriaList([clock]), **greedy_args)
        width = padded["input_ids"].shape[1]
        rows += [{"request": r.id, "prompt_tokens": r.prompt_tokens, "new_tokens": r.new_tokens,
                  "batch_size": len(batch), "padded_width": width, "generated": output.shape[1] - width,
                  "token_ids": output[i, width:width + r.new_tokens].tolist(),
                  "times_s": [t - start for t in clock.times[:r.new_tokens]], "latency_s": clock.times[-1] - start}
                 for i, r in enumerate(batch)]
    return rows

# %% [markdown]
# A short run on two requests warms everything up first. Then the whole workload is timed: the median of `repeats`
# runs. A whole workload is too long to repeat only to warm up.

# %%
def median_run(run):  # `repeats` runs of the whole workload, ordered by the time their last request was answered
    runs = sorted((run(workload) for _ in range(lab.p.repeats)), key=lambda rows: max(r["latency_s"] for r in rows))
    return runs[len(runs) // 2]


static_batching(workload[:2])  # warm-up
static = median_run(static_batching)

# %% tags=["reveals-06.1"]
padded = pd.DataFrame(static)  # a row per request: its batch's padded prompt width and the steps its batch ran
padded["positions"] = padded["padded_width"] + padded["generated"]  # what its row of the batch computes and caches
padded["useful"] = padded["prompt_tokens"] + padded["new_tokens"]  # what its request needed
first = padded[:lab.p.static_batch]
waste = {"first batch": 1 - first["useful"].sum() / first["positions"].sum(),
         "whole workload": 1 - padded["useful"].sum() / padded["positions"].sum()}
print(f"first batch: {len(first)} rows padded to {first['padded_width'][0]} prompt positions, then "
      f"{first['generated'][0]} steps; over the whole workload {waste['whole workload']:.0%} of the positions held "
      "no real token")
ex.compare(100 * waste["first batch"], "%")

# %% [markdown]
# Continuous batching with the same model. `continuous_batching_context_manager` starts transformers' scheduler in a
# background thread. The model's attention reads and writes the paged cache while it runs. On a GPU where flash
# attention is installed, transformers switches the model to it for the run.
#
# Each request is added with its own `max_new_tokens`. `eos_token_id=-1` switches the end-of-text token off, so every
# request makes exactly its tokens, as in the static batches. `ContinuousBatchingConfig` gets the page size and enough
# pages for this workload. Left to itself, it sizes the pool from the device's free memory: on a CPU, most of the RAM.
# On a CPU it also gets the most tokens one step may hold.

# %%
page = lab.p.page_size
pages = sum(-(-(r.prompt_tokens + r.new_tokens) // page) + 1 for r in workload)  # all at once, a page to spare each
# on a CPU, a step holds at most the longest prompt and a token of every other request (at least 256 tokens)
step_tokens = None if lab.on_gpu else max(256, max(r.prompt_tokens for r in workload) + len(workload))
config = ContinuousBatchingConfig(page_size=page, num_blocks=pages, max_batch_tokens=step_tokens)
no_eos, chosen = GenerationConfig(do_sample=False, eos_token_id=-1), {}

# %%
def continuous_batching(requests):
    with model.continuous_batching_context_manager(generation_config=no_eos,
                                                   continuous_batching_config=config) as manager:
        start, chosen["config"], chosen["attention"] = time.perf_counter(), manager.continuous_batching_config, \
            compat.attn_implementation(model)  # what transformers resolved for this run
        for r in requests:
            manager.add_request(list(r.prompt_ids), request_id=r.id, max_new_tokens=r.new_tokens,
                                record_timestamps=True)
        finished = {}
        for result in manager:  # outputs as they come, until every request has finished
            if result.is_finished():
                assert not result.error, f"request {result.request_id} failed: {result.error}"
                finished[result.request_id] = result
                if len(finished) == len(requests):
                    break
    return [{"request": r.id, "prompt_tokens": r.prompt_tokens, "new_tokens": len(finished[r.id].generated_tokens),
             "token_ids": list(finished[r.id].generated_tokens),
             "times_s": [t - start for t in finished[r.id].timestamps or []],  # when each of its tokens was made
             "scheduled_s": finished[r.id].lifespan[0] - start, "latency_s": finished[r.id].lifespan[1] - start}
            for r in requests]

# %%
continuous_batching(workload[:2])  # warm-up
continuous = median_run(continuous_batching)

# %% [markdown]
# Both runs side by side. Tokens/s is every token a request asked for, over the time until the last answer. The KV
# memory of static batching is each batch's padded cache; the largest batch is its peak. For continuous batching, the
# cell replays the timestamps. At every moment a request started or a token was made, it counts the pages the running
# requests needed. Both use the one formula for the bytes a token adds to the cache, from section 4:
# `2 (K and V) x layers x key/value heads x head size x bytes per number`.

# %%
shape = roofline.kv_shape(model.config)
kv_per_token = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * model.dtype.itemsize
paged = pd.DataFrame(continuous)
paged["useful"] = paged["prompt_tokens"] + paged["new_tokens"]
paged["positions"] = -(-paged["useful"] // page) * page  # each request's own length, rounded up to whole pages


def pages_held(moment):  # each running request's prompt and the tokens it has made so far, in whole pages
    return sum(-(-(r["prompt_tokens"] + sum(t <= moment for t in r["times_s"])) // page)
               for r in continuous if r["scheduled_s"] <= moment <= r["latency_s"])


moments = {t for r in continuous for t in r["times_s"]} | {r["scheduled_s"] for r in continuous}
peak_tokens = {"static": (padded["batch_size"] * padded["positions"]).max(),  # the largest padded batch
               "continuous": max(map(pages_held, moments)) * page}  # the most pages held at once

# %%
for run in (padded, paged):  # each request's time to first token, time between its tokens, and latency, in ms
    run["TTFT"] = 1e3 * run["times_s"].map(lambda t: t[0])
    run["per-token"] = 1e3 * run["times_s"].map(lambda t: (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else float("nan"))
    run["latency"] = 1e3 * run["latency_s"]

# %%
rows = []
for mode, run in (("static", padded), ("continuous", paged)):
    rows.append({"batching": mode, "tokens/s": run["new_tokens"].sum() / run["latency_s"].max(),
                 **{f"{what} p{q} ms": run[what].quantile(q / 100)
                    for what in ("TTFT", "per-token", "latency") for q in (50, 99)},
                 "KV peak MiB": peak_tokens[mode] * kv_per_token / 2**20,
                 "KV slots wasted %": 100 * (1 - run["useful"].sum() / run["positions"].sum())})
batching = pd.DataFrame(rows)
lab.table("batching", batching, title=f"{len(workload)} requests, {lab.p.model_id}, {lab.dtype_name}")

# %%
by_mode = batching.set_index("batching")
ratio = by_mode.loc["continuous", "tokens/s"] / by_mode.loc["static", "tokens/s"]
wasted = by_mode["KV slots wasted %"]
same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(static, continuous, strict=True))
print(f"Continuous batching: {ratio:.2f}x static batching's tokens/s, the same tokens for {same} of {len(workload)} "
      f"requests; KV positions without a real token: padded {wasted['static']:.0f}%, paged {wasted['continuous']:.0f}%")
used = chosen["config"]  # transformers' choices for the continuous run: its attention, CUDA graphs, async batching
print(f"The continuous run used attention {chosen['attention']!r}, CUDA graphs (varlen, decode) "
      f"{used.cuda_graph_booleans}, asynchronous batching {used.use_async_batching}; static batching used neither.")
lab.check("paged_cache_wastes_fewer_slots_than_padding", wasted["continuous"] < wasted["static"])
if lab.on_gpu and not lab.quick:  # the full workload on a GPU, where a step costs about the same below the knee
    lab.check("continuous_batching_at_least_twice_static_tokens_per_s", ratio >= 2, f"{ratio:.2f}x")
lab.metric("continuous_over_static_tokens_per_s", ratio)

# %% [markdown]
# Read the table row by row. Under static batching, a request of the second batch gets its first token only after
# the whole first batch is done. That shows in the TTFT p99. Continuous batching starts every waiting request as soon
# as there is room. Tokens/s counts only the tokens requests asked for. The steps a static batch runs past a short
# request's end produce nothing anyone wanted.
#
# On a CPU a step's cost grows with the tokens in it; section 2's curve shows how fast here. So expect a smaller gain
# than on a GPU. There, below section 2's knee, a step costs about the same whatever the batch. On a GPU with the full
# workload, the notebook records the ratio and expects at least twice static batching's tokens/s. The last column is
# the share of KV positions that hold no real token. For static batching that is padding. For the paged cache it is
# the unfilled end of each request's last page.
#
# The two runs differ in more than scheduling. When the attention needs no mask (flash attention), transformers 5.25
# turns on CUDA graphs and asynchronous batching for continuous batching, as `decide_use_cuda_graphs` and
# `decide_use_async_batching` in `transformers/generation/continuous_batching/initialization.py` decide. A CUDA graph
# replays a whole step's kernels with one launch. Static `generate` gets neither here: it compiles only with a static
# cache, as `_valid_auto_compile_criteria` in `transformers/generation/utils.py` decides. So on a GPU the ratio mixes
# better scheduling with fewer kernel launches. The line above the table says what this run used: on a CPU there are no
# CUDA graphs, so the ratio is scheduling alone.

# %% [markdown]
# **Where the time goes.** `timing.time_by_op` runs a call once under PyTorch's profiler. It gives the wall time, the
# busy time and each op's time. Busy time is, on a GPU, the time kernels ran; on a CPU, the time inside PyTorch's
# ATen ops. Both ways run the first batch's requests, cut to a few tokens each, so that the profile takes seconds. A
# forward pre-hook counts the model's passes; each pass reads every weight once. Those bytes over the time of the
# matrix products give the bandwidth they reached, beside this machine's copy ceiling. Continuous batching runs its
# steps in a thread of its own, so its profile records every thread. Predict: what share of the wall time is busy,
# and which op takes most of it?

# %%
import dataclasses

few = [dataclasses.replace(r, new_tokens=min(r.new_tokens, 4)) for r in workload[:lab.p.static_batch]]
forwards, views, passes = [], {}, {}
hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1))  # one entry per forward pass
for mode, run in (("static", static_batching), ("continuous", continuous_batching)):
    if lab.on_gpu:  # a new batch shape may capture new CUDA graphs: once, before the profile
        run(few)
    forwards.clear()  # continuous batching steps in a thread of its own: the profiler records every thread
    views[mode] = timing.time_by_op(lambda run=run: run(few), lab.device, all_threads=mode == "continuous")
    passes[mode] = len(forwards)
hook.remove()

# %%
ceiling, weights = roofline.bandwidth_ceiling(lab.device)["bytes_per_s"], roofline.weight_bytes_per_token(model)
lab.table("batching_profile", pd.concat([view.table.head(8).assign(batching=mode) for mode, view in views.items()]),
          title=f"The top ops of {len(few)} requests of up to 4 tokens, {lab.device_label}")
for mode, view in views.items():
    products_s = view.ms_of(*timing.MATRIX_PRODUCTS) / 1e3 or float("nan")  # matrix products: ATen ops or kernels
    reached = passes[mode] * weights / products_s  # each weight read once per forward pass
    print(f"{mode}: busy {view.busy_ms:.0f} of {view.wall_ms:.0f} ms ({view.busy_share:.0%}); {view.table['name'][0]} "
          f"took {view.table['share'][0]:.0%} of the busy time; {passes[mode]} forward passes read the weights at "
          f"{reached / 1e9:.1f} GB/s in the matrix products, against a copy ceiling of {ceiling / 1e9:.1f} GB/s")

# %% [markdown]
# What was seen: the lines above put each way's busy share beside its bandwidth. A busy share far below 1 means the
# host set the pace: Python, the scheduler, launching kernels. Matrix products near the copy ceiling mean the
# weights' bytes set it. On a GPU, compare the two ways' busy shares: CUDA graphs and asynchronous batching, where
# they are on, should raise continuous batching's.

# %% [markdown]
# **06.4 · Code.** A paged cache keeps each request's keys and values in fixed-size pages of a shared pool, in
# whichever pages were free. The request's **block table** lists its pages in order. Write
# `gather_from_pages(pool, block_table, length)`: `pool` has shape (pages, page size, ...), and the function returns
# the request's first `length` rows in order, its contiguous cache. Where does token t sit? The checker tries your
# function on shuffled pools; the cell after it runs it on this model's own keys.

# %%
ex = lab.exercise("06.4")


def gather_from_pages(pool, block_table, length):
    return None  # your code


answer = None  # once gather_from_pages is written: answer = gather_from_pages
ex.check(answer)

# %% [markdown]
# The model's keys for the workload's longest prompt, from its first layer, written into a pool of shuffled pages,
# then read back through the block table. Prediction: exactly the contiguous keys, since paging only moves rows around.

# %%
import torch
from transformers import DynamicCache

gather = answer if ex.exercise.verdict(answer, ex.given) else ex.exercise.solution  # yours, once it passes
longest = max(workload, key=lambda r: r.prompt_tokens)
cache, prompt = DynamicCache(config=model.config), torch.tensor([list(longest.prompt_ids)], device=lab.device)
with torch.inference_mode():
    model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
keys = cache.layers[0].keys[0].transpose(0, 1)  # (tokens, key/value heads, head size): the contiguous cache
needed = -(-len(keys) // page)  # whole pages
pool = torch.randn(needed + 4, page, *keys.shape[1:], dtype=keys.dtype, device=keys.device)  # others' pages: noise
table = torch.randperm(needed + 4)[:needed].tolist()  # the free pages this request got, in its order
for t in range(len(keys)):
    pool[table[t // page], t % page] = keys[t]
read_back = gather(pool, table, len(keys))
print(f"{len(keys)} tokens in pages {table} of {len(pool)}; read back equal to the contiguous keys: "
      f"{torch.equal(read_back, keys)}")
lab.check("paged_gather_equals_the_contiguous_cache", torch.equal(read_back, keys))

# %% [markdown]
# ## 2. The throughput-latency curve
#
# Decoding one step reads every weight once, whatever the batch. So a bigger batch makes more tokens per step at
# little extra cost. That holds until the arithmetic, which does grow with the batch, becomes the bottleneck. Notebook
# 02's roofline gives both bounds:
#
# * **bandwidth bound**: `batch x bandwidth / (weight bytes + KV cache bytes)` tokens/s; it grows with the batch;
# * **compute bound**: `FLOP/s ceiling / FLOPs per token` (about 2 per weight), the same at every batch.
#
# They meet at the **knee**: about `ridge point x bytes per weight / 2`. The ridge point is notebook 00's FLOP/s
# ceiling over its bytes/s. Below the knee, raising the batch buys tokens/s almost for free. Above it, every step gets
# longer and each user waits longer per token. Prediction: tokens/s grows with the batch while the per-token latency
# grows slowly; then the latency climbs.

# %%
def decode_point(batch):  # greedy decoding of `batch` random prompts, timed (notebook 02's measurement)
    ids = outputs.random_prompt(model, batch=batch, length=lab.p.curve_prompt)
    return outputs.measure_decode(model, ids, new_tokens=lab.p.curve_new_tokens, repeats=1)


points = [decode_point(batch) for batch in lab.p.batch_sizes]
# the timing rule: a point where a bigger batch stepped faster than a smaller one is measured again, once
points = timing.recheck_trend(points, work="batch", time="step_ms", remeasure=lambda row: decode_point(row["batch"]))
curve = pd.DataFrame(points)[["batch", "tokens_per_s", "step_ms", "noisy"]]
curve.columns = ["batch", "tokens/s", "per-token latency ms", "noisy"]

# %%
bandwidth = roofline.bandwidth_ceiling(lab.device)["bytes_per_s"]
flops = roofline.compute_ceiling(lab.device, lab.dtype, quick=lab.quick)["flops_per_s"]
weights = roofline.weight_bytes_per_token(model)  # the weight bytes one step reads (notebook 02)
parameters = weights / model.dtype.itemsize
context = lab.p.curve_prompt + lab.p.curve_new_tokens // 2  # the KV cache at the run's middle length
curve["bandwidth bound tokens/s"] = curve["batch"] * bandwidth / (weights + curve["batch"] * context * kv_per_token)
hidden = shape["heads"] * shape["head_dim"]  # 2 FLOPs per weight, plus Q.K and P.V over the cached tokens
curve["compute bound tokens/s"] = flops / (2 * parameters + 4 * shape["layers"] * context * hidden)
bound = curve[["bandwidth bound tokens/s", "compute bound tokens/s"]].min(axis=1)
curve["fraction of the bound"] = curve["tokens/s"] / bound
knee = (flops / (2 * parameters)) * weights / bandwidth  # batch x bandwidth / weights = FLOP/s / (2 x parameters)
lab.table("curve", curve, title=f"Decode, {lab.p.model_id}, prompts of {lab.p.curve_prompt} tokens")
fig = plots.serving_curve(curve, knee=knee, title=f"{lab.p.model_id} on {lab.device_label}")
lab.figure("throughput_latency", fig)

# %%
low, high = curve.iloc[0], curve.iloc[-1]
longer = high["per-token latency ms"] / low["per-token latency ms"]
print(f"Batch {high.batch:.0f} made {high['tokens/s']:.1f} tokens/s against {low['tokens/s']:.1f} at batch "
      f"{low.batch:.0f}, each step {longer:.1f}x as long; the bounds meet near batch {knee:.0f} on {lab.device_label}.")
closest = curve["fraction of the bound"].max()  # a point above its bound would mean a wrong bound or a bad timing
lab.check("batching_raises_tokens_per_s", high["tokens/s"] > low["tokens/s"], timing=True)
lab.check("every_point_under_its_roofline_bound", closest < 1.05, f"highest fraction {closest:.2f}", timing=True)

# %% [markdown]
# A point marked `noisy` in the table kept contradicting its cost model after one re-measurement: draw no conclusion
# from it. Where your batches stay below the knee, tokens/s should climb nearly in step with the batch. The fraction
# of the bound says how close each point came to the roofline. Continuous batching is how a server stays near the
# knee: it keeps the batch full while requests come and go.
#
# ## 3. Speculative decoding
#
# A step of the large model reads all its weights to make one token. **Speculative decoding** lets something cheap
# propose the next `k` tokens. Then the large model runs **once** over all of them. It checks every proposal in that
# one forward pass, keeps the proposals up to the first it disagrees with, and adds one token of its own.
#
# With greedy decoding the tokens are greedy's; only the number of large-model steps changes. Rounding is the one
# exception: a forward over several tokens may round differently from one over a single token. In 16-bit, that can
# flip a rare near-tie. The share of proposed tokens that were kept is the **acceptance rate**.
#
# * **Prompt lookup**, `prompt_lookup_num_tokens=`, finds the last few tokens earlier in the text and proposes what
#   followed them there. It needs no second model. It pays off when the output repeats the input: quoting, editing
#   code, summarising with the source's words.
# * **A draft model**, `assistant_model=`, proposes with a small model that shares the tokenizer.
#
# Prediction: on a prompt that starts quoting a passage again, prompt lookup proposes the right tokens. The large
# model then needs a few steps instead of one per token. On a story it writes fresh, it rarely finds anything to copy.
# The prompts: a passage of the shipped text, then the start of a copy of it; and the opening of a story.

# %%
passage = " ".join(serving.QUOTED_TEXT.read_text(encoding="utf-8").split()[:lab.p.quote_words])
copy_start = " ".join(passage.split()[:12])  # the copy's first words: the rest of the passage is in the prompt
prompt_texts = {"repeating": f"Copy the passage exactly.\n\nPassage: {passage}\n\nCopy: {copy_start}",
                "fresh": "Once upon a time, in a small village by the sea, there lived"}  # the model writes on for long
prompts = {label: tokenizer(text, return_tensors="pt").to(lab.device) for label, text in prompt_texts.items()}

# %% [markdown]
# Counting is a forward pre-hook on the model: it notes how many tokens each forward pass is given. The first pass
# carries the prompt, and with speculation the first proposals. Each later pass carries the last token and the
# proposals it checks. Each pass yields the proposals it accepts plus one token of its own. So the accepted proposals
# are the new tokens less the passes.

# %%
def speculative_run(inputs, **proposer):  # greedy generate, timed by the workbook's rule, its forward passes counted
    forwards, kept, prompt = [], {}, inputs["input_ids"].shape[1]  # the tokens given to each forward of the model

    def call():
        forwards.clear()
        kept["ids"] = model.generate(**inputs, max_new_tokens=n, **greedy_args, **proposer)[0, prompt:].tolist()

    hook = model.register_forward_pre_hook(lambda _, args, kw: forwards.append(kw["input_ids"].shape[1]),
                                           with_kwargs=True)
    with compat.quiet_logger("transformers"):  # assisted generation logs a notice about its own arguments
        ms = timing.measure(call, device=lab.device, warmup=1, repeats=1, min_time_s=0).median_ms
    hook.remove()
    ids, steps = kept["ids"], len(forwards)
    proposed = forwards[0] - prompt + sum(k - 1 for k in forwards[1:])  # each pass's tokens past the one it starts at
    accepted = max(0, len(ids) - steps)
    return {"token_ids": ids, "new_tokens": len(ids), "ms": ms, "ms_per_token": ms / len(ids), "model_forwards": steps,
            "proposed": proposed, "accepted": accepted, "acceptance_rate": accepted / proposed if proposed else 0.0,
            "tokens_per_forward": len(ids) / steps}

# %%
n, plain, lookup = lab.p.spec_new_tokens, {}, {}
for label, ids in prompts.items():  # greedy decoding, then greedy with prompt lookup proposing up to 10 tokens a step
    plain[label] = speculative_run(ids)
    lookup[label] = speculative_run(ids, prompt_lookup_num_tokens=10)
looked = pd.DataFrame([{"prompt": label, **run} for label, run in lookup.items()]).drop(columns="token_ids")
looked["speed-up vs greedy"] = looked["prompt"].map({label: run["ms"] for label, run in plain.items()}) / looked["ms"]
looked["same tokens as greedy"] = [lookup[label]["token_ids"] == plain[label]["token_ids"] for label in lookup]
lab.table("prompt_lookup", looked, title=f"Prompt lookup, {n} new tokens, {lab.p.model_id}")

# %%
repeating, fresh = looked.set_index("prompt").loc["repeating"], looked.set_index("prompt").loc["fresh"]
speedup = repeating["speed-up vs greedy"]
print(f"Prompt lookup accepted {repeating.acceptance_rate:.0%} of its proposals on the repeating prompt "
      f"({speedup:.2f}x greedy's speed), {fresh.acceptance_rate:.0%} on the fresh one.")
if lab.dtype == torch.float32:  # in 16-bit a near-tie may round the other way: the table shows it, unchecked
    lab.check("prompt_lookup_gives_the_greedy_tokens", looked["same tokens as greedy"].all())
said = tokenizer.decode(plain["repeating"]["token_ids"], skip_special_tokens=True).split()[:3]
if said and " ".join(said) in passage:  # greedy decoding itself goes on copying the passage: what lookup can propose
    lab.check("a_repeating_prompt_accepts_more_proposals", repeating.acceptance_rate > fresh.acceptance_rate)
else:
    lab.skip("a repeating prompt accepts more proposals", f"{lab.p.model_id} does not copy the passage (it wrote "
             f"{' '.join(said)!r}; random weights?), so prompt lookup has nothing right to propose")
lab.check("prompt_lookup_speeds_up_a_repeating_prompt", speedup > 1, timing=True)
lab.metric("speculative_prompt_lookup_repeating_speedup", speedup)

# %% [markdown]
# **A draft model.** The draft must share the model's tokenizer and be much cheaper. Of the embedded models that
# generate text, only `smollm2-135m` has real weights. It is the smallest of its family, so there is no meaningful
# draft for it on this machine. The default draft is `tiny-llama`: random weights, the same tokenizer. It shows what a
# useless draft costs. With a Hub cache, serve a larger SmolLM2 with `smollm2-135m` as its draft.
#
# The draft proposes exactly `proposals` tokens at every step. First, what a step costs, counted in steps of plain
# greedy decoding. Verifying costs more than a plain step, since one forward carries more tokens. Each proposal costs
# one draft step.

# %%
draft, proposals, draft_problem = None, 4, models.check_model(lab.p.draft_model_id)
if draft_problem:  # the draft's package is missing here: the rest of the notebook runs without it
    lab.skip(f"the draft model {lab.p.draft_model_id}", draft_problem)
else:
    draft, _ = models.load_model(lab.p.draft_model_id, device=lab.device, dtype=lab.dtype)
    draft.generation_config.num_assistant_tokens = proposals  # propose exactly this many tokens at every step
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0  # and never stop proposing early
    draft_ms = timing.measure(lambda: outputs.generate_exactly(draft, prompts["fresh"]["input_ids"], n),
                              device=lab.device, warmup=1, repeats=1, min_time_s=0).median_ms  # the draft by itself
    draft_cost = draft_ms / n / plain["fresh"]["ms_per_token"]  # a draft step, in greedy steps

# %% [markdown]
# Verifying is one forward of the model over the last token and the `proposals` tokens: it costs a greedy step plus
# what the extra tokens add to that forward. Both forwards are timed after the same prompt, the cache cut back after
# each.

# %%
import torch
from transformers import DynamicCache, QuantizedCache

ids, cache = prompts["fresh"]["input_ids"], DynamicCache(config=model.config)
with torch.inference_mode():
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)  # the prompt, read once

def forward_ms(count):  # one forward over `count` more tokens, timed; the cache cut back to the prompt after each
    def call():
        with torch.inference_mode():
            model(input_ids=ids[:, -1:].repeat(1, count), cache=cache, use_cache=True, logits_to_keep=count)
        cache.crop(-count)
    return timing.measure(call, device=lab.device, warmup=1, repeats=3).median_ms

greedy_step = plain["fresh"]["ms_per_token"]
verify_cost = (greedy_step + max(0.0, forward_ms(1 + proposals) - forward_ms(1))) / greedy_step
if draft is not None:
    print(f"verifying {proposals} proposals costs {verify_cost:.3f} greedy steps; a draft step {draft_cost:.3f}")

# %% [markdown]
# **06.2 · Predict.** A speculative step costs `verify_cost + proposals x draft_cost` greedy steps and yields
# `1 + rate x proposals` tokens, where `rate` is the acceptance rate. At what acceptance rate does this draft break even
# with plain greedy decoding, with the costs printed above?

# %%
if draft is not None:
    ex = lab.exercise("06.2", proposals=proposals, verify_cost=round(verify_cost, 3), draft_cost=round(draft_cost, 3))
    answer = None  # your prediction: an acceptance rate between 0 and 1
    ex.check(answer)

# %% [markdown]
# Now assisted decoding for real. The break-even it measures comes from the run itself: its time per verification step
# in greedy steps, less the one token a step always yields, shared by the proposals.

# %% tags=["reveals-06.2"]
if draft is not None:
    assisted = speculative_run(prompts["fresh"], assistant_model=draft)
    greedy = plain["fresh"]
    step = (assisted["ms"] / assisted["model_forwards"]) / greedy["ms_per_token"]  # one verification, in greedy steps
    break_even = (step - 1) / proposals  # the accepted proposals must pay for all but the one token a step yields
    noisy = step < 1  # a verification step does at least a greedy step's work: faster means the timings were disturbed
    drafted = pd.DataFrame([{"draft": lab.p.draft_model_id, **assisted, "noisy": noisy}]).drop(columns="token_ids")
    drafted["speed-up vs greedy"] = greedy["ms"] / assisted["ms"]
    drafted["same tokens as greedy"] = assisted["token_ids"] == greedy["token_ids"]
    drafted["break-even rate"], drafted["predicted break-even"] = break_even, ex.exercise.solved(**ex.given)
    lab.table("draft", drafted, title="Assisted decoding on the fresh prompt")
    print("the acceptance rate at which this run would have matched greedy decoding:")
    ex.compare(break_even)
    print(f"the draft's proposals were accepted at a rate of {assisted['acceptance_rate']:.2f}: "
          f"{greedy['ms'] / assisted['ms']:.2f}x the speed of greedy decoding" + (
              f" (noisy: a verification step timed at {step:.2f} greedy steps, under the 1 its work rules out; "
              "run the cell again on a quiet machine)" if noisy else ""))

# %%
if draft is not None:
    lab.check("a_verification_step_costs_at_least_a_greedy_step", not noisy, f"{step:.2f} greedy steps", timing=True)
    if lab.dtype == torch.float32:  # in 16-bit a near-tie may round the other way
        lab.check("assisted_decoding_gives_the_greedy_tokens", assisted["token_ids"] == greedy["token_ids"])
    if lab.p.draft_model_id in models.RANDOM and lab.p.draft_model_id != lab.p.model_id:  # an equal draft: all accepted
        lab.check("a_random_draft_is_almost_never_accepted", assisted["acceptance_rate"] < 0.2)
    lab.metric("speculative_draft_fresh_speedup", greedy["ms"] / assisted["ms"])

# %% [markdown]
# The prediction adds up the parts. The run also pays for work the sum leaves out: the draft's own generate loop and
# the bookkeeping of candidates. So its break-even can differ, and on a busy machine both are noisy. A random draft's
# proposals are essentially never right. Each of its steps costs more than a greedy step and yields one token, so it
# can only slow decoding down. A real draft pays when its acceptance rate sits well above the break-even. Prompt
# lookup's draft costs almost nothing, which is why it pays even at a modest rate.
#
# ## 4. The KV cache: its size per token, and quantized
#
# Every layer keeps a key and a value vector for each **key/value head** and each token. Three designs:
#
# * **MHA** (multi-head attention): one key/value head per query head;
# * **GQA** (grouped-query attention): groups of query heads share one key/value head (Llama 3 8B: 32 query heads, 8
#   key/value heads);
# * **MQA** (multi-query attention): all query heads share a single key/value head.
#
# The formula, `2 x layers x key/value heads x head size x bytes per element`, is the one notebook 02 used
# (`labkit.roofline.kv_bytes_per_token`); section 1 wrote it out, and the cells below do again.
#
# **06.3 · Predict.** How many KiB does one token add to the 16-bit KV cache of `llama-8b-shape` (Llama 3 8B's
# architecture: the cell prints its numbers)?

# %%
shape_8b = roofline.kv_shape(models.model_config("llama-8b-shape"))
print(f"llama-8b-shape: {shape_8b}")
ex = lab.exercise("06.3", **shape_8b, bytes_per_element=2)  # layers, heads, kv_heads, head_dim
answer = None  # your prediction, in KiB per token
ex.check(answer)

# %% [markdown]
# To check the answer against a real cache, `llama-8b-shape` is built on PyTorch's **meta device** (shapes, no
# memory), run over 16 tokens, and the cache it leaves is measured (and the same for the 70B shape).

# %% tags=["reveals-06.3"]
cache_bytes = {}
for name in ("llama-8b-shape", "llama-70b-shape"):
    empty = models.empty_model(name)  # built on the meta device: its shapes, no memory
    with torch.inference_mode():
        out = empty(input_ids=torch.zeros(1, 16, dtype=torch.long, device=empty.device), use_cache=True,
                    logits_to_keep=1)
    cache_bytes[name] = footprint.cache_bytes(out) / 16  # the bytes of the cache its 16 tokens left, per token
ex.compare(cache_bytes["llama-8b-shape"] / 2**10, "KiB per token")
print(f"llama-70b-shape's cache on the meta device: {cache_bytes['llama-70b-shape'] / 2**10:.0f} KiB per token")

# %% [markdown]
# The formula for every decoder of the workbook, and for the same 8B shape made MHA and MQA (its 32 query heads each
# with a key/value head of its own, then all sharing one), each checked against the caches just measured:

# %%
import copy

names = ("tiny-llama", "tiny-opt", "random-llama-1b", "llama-8b-shape", "llama-70b-shape")
configs = {lab.p.model_id: model.config, **{name: models.model_config(name) for name in names}}
for kind, kv_heads in (("MHA", 32), ("MQA", 1)):  # the 8B shape with as many key/value heads as query heads, and one
    configs[f"llama-8b-shape as {kind}"] = copy.deepcopy(configs["llama-8b-shape"])
    configs[f"llama-8b-shape as {kind}"].num_key_value_heads = kv_heads
rows = []
for name, config in configs.items():
    dims = roofline.kv_shape(config)
    per_token = 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"] * 2  # K and V, every layer, 2 bytes a number
    kind = "MHA" if dims["kv_heads"] == dims["heads"] else "MQA" if dims["kv_heads"] == 1 else "GQA"
    rows.append({"model": name, "attention": kind, **dims, "KV KiB per token": per_token / 2**10,  # a sliding layer
                 "GiB at 4096 tokens": roofline.kv_cache_bytes(config, batch=1, context=4096) / 2**30})  # keeps less
kv_sizes = pd.DataFrame(rows)
lab.table("kv_per_token", kv_sizes, title="KV cache per token, 16-bit")
for name, value in cache_bytes.items():
    formula = kv_sizes.set_index("model").loc[name, "KV KiB per token"] * 2**10
    lab.check(f"kv_formula_matches_the_cache_of_{name.replace('-', '_')}", formula == value,
              f"{formula:.0f} vs {value:.0f} bytes")

# %% [markdown]
# **A quantized KV cache.** transformers' `QuantizedCache` stores the keys and values in fewer bits. Its docstring calls
# it "similar to" the KIVI paper, https://arxiv.org/abs/2402.02750, and says where it differs. KIVI quantizes keys per
# channel and values per token. transformers quantizes both the same way, in groups of `q_group_size` (64) numbers that
# lie next to each other in memory: see `QuantizedLayer` in `transformers/cache_utils.py` and optimum-quanto's `group`.
# With a head size of 64, as in SmolLM2, a group is one token's vector in one head. The `quanto` backend stores 4-bit
# numbers with optimum-quanto. It keeps the most recent tokens, up to `residual_length`, 128 by default, in the model's
# dtype. The `fp8` backend keeps no such window: every token is stored in float8 with one scale per tensor, fixed by the
# first tokens it sees. A third backend, `hqq`, is left out: once installed, transformers imports it, and PyTorch's
# compiler with it, whenever its cache code is imported, which slows every notebook's start. You would write
# `model.generate(..., cache=QuantizedCache(backend="quanto", config=model.config, nbits=4))`.
#
# What does it save? Read `update()` in the same file: at every step each layer dequantizes its whole cache into a
# new tensor in the model's dtype, and attention reads that copy. So the cache holds fewer bytes, but a step reads the
# small cache, writes a full-size copy and reads it again. Storage shrinks; per-step traffic does not. A server
# whose attention kernel reads the quantized values directly saves both: vLLM's fp8 KV cache does so with its Flash
# Attention 3 backend, as vLLM 0.25's documentation says
# (https://docs.vllm.ai/en/v0.25.0/features/quantization/quantized_kvcache/).
# SGLang's documentation warns that an unfused dequantization can be "extremely slow"
# (https://docs.sglang.io/advanced_features/quantized_kv_cache.html).
#
# Below, the shipped text's first `kv_context` tokens are read into each cache, then the next ones through it a few at
# a time. The table gives what each cache holds at the end, and the bytes one more token's `update()` hands to
# attention. It also gives the time of the pass, the perplexity of the tokens read, and how far the next-token
# distributions moved from the model's own cache (KL divergence in nats, as in notebook 04). Predict before you run
# it: which caches hold less, and which ones hand attention less? On a CPU the model's own cache is float32, so a
# quantized cache is compared with 4-byte numbers there, with 2-byte ones on a GPU.

# %%
import math

text_ids = tokenizer(quant.sample_text(), return_tensors="pt")["input_ids"][:, :lab.p.kv_context + lab.p.kv_read + 1]
text_ids, kv_context, end, kept = text_ids.to(lab.device), lab.p.kv_context, text_ids.shape[1] - 1, {}
quanto_problem = serving.quanto_problem(quick=lab.quick)  # not installed, or its CPU extension not compiled yet
kinds = ["dynamic", "fp8"] if quanto_problem else ["dynamic", "quanto", "fp8"]  # the model's own cache first
if quanto_problem:
    lab.skip("QuantizedCache(quanto)", quanto_problem)

# %%
def read_through(kind):  # the context read into the cache at once, then the next tokens 16 at a time through it
    cache = (DynamicCache(config=model.config) if kind == "dynamic"
             else QuantizedCache(backend=kind, config=model.config, nbits=4 if kind == "quanto" else None))
    logits = []
    with torch.inference_mode():
        model(input_ids=text_ids[:, :kv_context], cache=cache, use_cache=True, logits_to_keep=1)
        for start in range(kv_context, end, 16):
            piece = text_ids[:, start:min(start + 16, end)]
            logits.append(model(input_ids=piece, cache=cache, use_cache=True).logits[0].float().cpu())
    kept[kind] = cache, torch.cat(logits)  # what the cache holds at the end, and the logits at every position read

# %% [markdown]
# What a cache holds is the memory of the tensors its layers keep: keys and values in the model's dtype, and for a
# quantized cache the quantized numbers with their scales (fp8 keeps a pair of tensors; quanto's quantized tensor is
# a tensor subclass that packs the tensors it is made of).

# %%
def tensor_bytes(x):  # the memory a tensor holds; a pair of tensors, both
    if isinstance(x, tuple):
        return sum(map(tensor_bytes, x))
    if not isinstance(x, torch.Tensor):
        return 0
    if type(x) is not torch.Tensor:  # a tensor subclass (quanto's): the tensors it packs
        return sum(tensor_bytes(getattr(x, name)) for name in x.__tensor_flatten__()[0])
    return x.untyped_storage().nbytes()


def held_bytes(cache):  # every tensor each layer of the cache keeps, but 0-dim counters (a sliding window's size)
    return sum(tensor_bytes(value) for layer in cache.layers for value in vars(layer).values()
               if not (isinstance(value, torch.Tensor) and value.dim() == 0))


def handed_bytes(cache):  # what one more token's update() returns for attention to read, every layer (it adds a token)
    token = torch.zeros(1, shape["kv_heads"], 1, shape["head_dim"], dtype=model.dtype, device=lab.device)
    with torch.inference_mode():
        return sum(k.nbytes + v.nbytes for k, v in (layer.update(token, token) for layer in cache.layers))

# %%
if "quanto" in kinds and not serving.quanto_extension_built():
    print("optimum-quanto compiles its extension now, once: this takes minutes the first time")
caches, targets = {}, text_ids[0, kv_context + 1:].cpu()  # the token that follows each position read
for kind in kinds:
    try:
        ms = timing.measure(lambda kind=kind: read_through(kind), device=lab.device, warmup=1, repeats=1,
                            min_time_s=0).median_ms
    except Exception as error:  # a backend that fails here is reported, not fatal
        if kind == "dynamic":  # the model's own cache must work: nothing to compare with otherwise
            raise
        lab.skip(f"QuantizedCache({kind})", f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
        continue
    cache, logits = kept[kind]
    log_q = torch.log_softmax(logits, dim=-1)  # the next-token distribution at every position read, as logarithms
    log_p = caches["dynamic"]["log_q"] if caches else log_q  # the model's own cache's: the reference P
    caches[kind] = {"ms": ms, "held_bytes": held_bytes(cache), "tokens_held": kv_context + len(logits),
                    "handed_bytes": handed_bytes(cache),  # after held_bytes: it adds a token to the cache
                    "log_q": log_q, "perplexity": math.exp(-log_q.gather(1, targets[:, None]).mean().item()),
                    "kl": outputs.kl_divergence(log_p, log_q)}  # KL(P || Q), mean over positions, in nats

# %%
base, read = caches["dynamic"], text_ids.shape[1] - lab.p.kv_context - 1
held = pd.DataFrame([{"cache": "DynamicCache (the model's own)" if kind == "dynamic" else f"QuantizedCache({kind})",
                      "tokens held": run["tokens_held"], "MiB held": run["held_bytes"] / 2**20,
                      "share of the model's cache": run["held_bytes"] / base["held_bytes"],
                      "MiB handed to attention per step": run["handed_bytes"] / 2**20, "ms": run["ms"],
                      "perplexity": run["perplexity"],
                      "KL from the model's cache (nats)": run["kl"]}
                     for kind, run in caches.items()])
lab.table("kv_caches", held, title=f"{lab.p.kv_context} tokens read into each cache, then {read} through it")
formula = kv_per_token * base["tokens_held"]  # section 1's bytes per token, for every token the cache holds
lab.check("kv_formula_matches_the_cache_held", base["held_bytes"] == formula, f"{base['held_bytes']} vs {formula}")
for kind, run in list(caches.items())[1:]:
    share, handed = run["held_bytes"] / base["held_bytes"], run["handed_bytes"] / base["handed_bytes"]
    print(f"QuantizedCache({kind}) held {share:.0%} of the model's own cache but handed attention {handed:.0%} as many "
          f"bytes per step, and took {run['ms'] / base['ms']:.2f}x its time; its next-token distributions "
          f"{run['kl']:.3g} nats away")
    lab.check(f"quantized_{kind}_cache_holds_less", share < 1)
    lab.check(f"quantized_{kind}_cache_hands_attention_a_full_size_copy", handed == 1, f"{handed:.2f}x")
    lab.metric(f"kv_cache_{kind}_over_model_cache", share)

# %% [markdown]
# What was seen: the `MiB held` column shrinks for each quantized cache, while the bytes handed to attention stay
# those of the model's own cache, as `update()` promised. The `ms` column and the line above say what the extra
# dequantizing cost in time on this machine.
#
# **Feeding notebook 05's calculator.** The bytes per token decide how many users a server can hold at once. Take
# 8 x 80 GB, each GPU filled to notebook 05's usable share, and `llama-70b-shape`'s 16-bit weights. The memory left
# holds this many sequences of 4,096 tokens with a 16-bit KV cache. Beside it, each quantized cache at the share of a
# 16-bit cache it held above. quanto's residual window was in this machine's dtype, so on a CPU its share is a little
# high:

# %%
sixteen_bit = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * 2  # this model's cache, 2 bytes a number
need = footprint.memory_needed(models.empty_model("llama-70b-shape"), fmt="16-bit", context=4096)  # one sequence
room = sum(d["bytes"] for d in footprint.parse_devices("8 x 80 GB")) * footprint.USABLE_FRACTION - need["weights"]
rows = []
for kind, run in caches.items():
    share = 1.0 if kind == "dynamic" else run["held_bytes"] / (sixteen_bit * run["tokens_held"])
    per_sequence = need["kv_cache"] * share  # a sequence's KV cache, at the share of a 16-bit one this cache held
    rows.append({"KV cache": "16-bit" if kind == "dynamic" else f"QuantizedCache({kind})", "share of 16-bit": share,
                 "weights GiB": need["weights"] / 2**30, "KV GiB per sequence": per_sequence / 2**30,
                 "sequences of 4096 tokens": max(0, int(room // per_sequence))})
fits = pd.DataFrame(rows)
lab.table("fits", fits, title="llama-70b-shape on 8 x 80 GB (notebook 05's calculator)")

# %% [markdown]
# ## 5. A real server under load
#
# `transformers serve` is an OpenAI-compatible HTTP server. It comes with the `serving` extra of transformers:
# FastAPI, uvicorn and the openai package. `--continuous-batching` runs the scheduler of section 1 behind it. labkit
# starts it in a subprocess on a free loopback port and waits until its `/health` answers. The command and the log
# file are printed: open the log to see what the server did.
#
# Nothing may outlive this notebook. The server runs in a process group of its own, behind a small watchdog.
# `server.stop()` ends the group, and the same runs when the kernel exits. If the kernel is killed outright, the
# watchdog notices at once and stops the server. On Linux the kernel's death is signalled to it.
#
# The server's paged KV cache is sized as section 1's was, for the requests it will be sent. Each concurrent client
# gets pages of 256 tokens, the server's default page size, for the longest request, and a page to spare.

# %%
server_workload = [workload[i % len(workload)] for i in range(lab.p.server_requests)]  # repeated if need be
longest = max(r.prompt_tokens + r.new_tokens for r in server_workload)
# transformers serve's page size: its default (its --cb-block-size flag would set it, through ContinuousBatchingConfig's
# block_size, which transformers 5.17 deprecated in favour of page_size and which logs a warning)
server_page = 256
server_pages = max(lab.p.server_concurrency) * (-(-longest // server_page) + 1)
capacity = server_pages * server_page  # the tokens its KV cache holds
# --max-model-len (transformers 5.25 and newer) set on purpose at twice what the cache holds, within the model's
# context, so that the bad input below can send one prompt past each limit
model_context = getattr(model.config, "max_position_embeddings", None) or 2 * capacity
door = min(2 * capacity, model_context) if compat.serve_takes_max_model_len() else None

# %%
problem = serving.serving_problem()
server = None
if problem:
    lab.skip("the server (section 5)", problem)
else:
    # on a CPU, the most tokens per batch kept above the cache's, so that a prompt that cannot fit is refused at once
    folder = models.folder_for_processes(lab.p.model_id, lab.dtype)  # a random-init model is saved for the server
    server = serving.Server(folder, device=lab.device, dtype=lab.dtype_name, kv_pages=server_pages, max_model_len=door,
                            max_batch_tokens=None if lab.on_gpu else capacity + server_page)
    print(f"$ {server.command_line}\nlog: {server.log_path}")
    server.start()
    print(f"answering on {server.url} after {server.started_s:.1f} s "
          f"(watchdog pid {server.watchdog_pid}, server pid {server.server_pid()})")

# %% [markdown]
# A client is a few lines with the `openai` package's asynchronous client. It sends one streaming completion per
# request. It notes when the first piece of text arrives, the TTFT, and when the answer ends. `temperature=0` asks for
# greedy decoding. `stream_options={"include_usage": True}` asks for a last chunk that says how many tokens were made;
# without it a stream carries no count. `max_retries=0` and `timeout` keep a failing request from being retried or
# waited on forever.

# %%
if server:
    import httpx
    from openai import APIStatusError, AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
    texts = {r.id: tokenizer.decode(r.prompt_ids) for r in server_workload}

    async def one_request(request):
        start, first, tokens = time.perf_counter(), None, 0
        stream = await client.completions.create(model=server.model, prompt=texts[request.id], stream=True,
                                                 max_tokens=request.new_tokens, temperature=0,
                                                 stream_options={"include_usage": True})  # a last chunk counts them
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        return {"ttft_s": (first or end) - start, "latency_s": end - start, "tokens": tokens}

# %% [markdown]
# The load: at each level, `N` clients share a fixed list of requests. Each client sends its next request when its
# last one is answered, so never more than `N` are in flight. There is a time limit per request and per level. One
# request first warms the server up, so that a first request's one-off costs stay out of the first level (the paged
# cache itself was built and warmed before the server first answered `/health`). Prediction: requests/s and tokens/s
# rise with the clients while the server's batches fill. Each request's TTFT and latency rise as it shares each step
# with more.
#
# The cell uses `await` at its top level. Jupyter allows it because it runs each cell in an event loop. In a script
# you would wrap the same code in a function and call `asyncio.run(...)`.

# %%
import asyncio


async def load(clients, timeout_s=600):  # the requests shared by `clients` clients, each sending its next when answered
    waiting, replies = list(server_workload), []

    async def user():
        while waiting:
            request = waiting.pop(0)
            try:
                replies.append({"ok": True, **await one_request(request)})
            except Exception as error:  # a failed request is a measurement (an error row), not a crash
                replies.append({"ok": False, "error": f"{type(error).__name__}: {error}"})

    start = time.perf_counter()
    _, late = await asyncio.wait([asyncio.create_task(user()) for _ in range(clients)], timeout=timeout_s)
    for task in late:  # the level stops after `timeout_s`: what it has not answered counts as failed
        task.cancel()
    return pd.DataFrame(replies, columns=["ok", "ttft_s", "latency_s", "tokens", "error"]), time.perf_counter() - start

# %%
if server:
    await one_request(server_workload[0])  # a warm-up request
    rows = []
    for clients in lab.p.server_concurrency:  # a row per level: answered, failed, rates, and p50/p99 in ms
        replies, seconds = await load(clients)
        ok = replies[replies["ok"]]
        rows.append({"concurrency": clients, "requests": len(server_workload), "answered": len(ok),
                     "failed": len(server_workload) - len(ok), "seconds": seconds, "requests_per_s": len(ok) / seconds,
                     "tokens_per_s": ok["tokens"].sum() / seconds, "errors": sorted(set(replies["error"].dropna()))[:3],
                     **{f"{what}_p{q}_ms": 1e3 * ok[f"{what}_s"].quantile(q / 100)
                        for what in ("ttft", "latency") for q in (50, 99)}})
    levels = pd.DataFrame(rows)
    lab.table("server_load", levels, title=f"transformers serve --continuous-batching, {lab.p.model_id}")

# %%
if server:
    title = f"{len(server_workload)} requests per level, {lab.device_label}"
    lab.figure("server_load", plots.server_load(levels, title=title))
    one, top = levels.iloc[0], levels.iloc[-1]
    print(f"{top.concurrency} clients: {top.requests_per_s:.2f} requests/s against {one.requests_per_s:.2f} with "
          f"{one.concurrency}, TTFT p50 {top.get('ttft_p50_ms', float('nan')):.0f} ms; up in {server.started_s:.1f} s")
    lab.check("server_answered_every_request", levels["failed"].sum() == 0, f"{levels['failed'].sum()} failed")
    lab.metric(f"server_c{top.concurrency}_tokens_per_s", top.tokens_per_s)

# %% [markdown]
# **Bad input.** A request for a model the server does not serve, and prompts too long. A server has two limits on a
# prompt's length:
# - At the door. Since transformers 5.25, `transformers serve` refuses a prompt that leaves no room for an answer
#   within `--max-model-len` tokens, before any work. Without the flag, the limit is the model's context.
# - Inside. Its KV cache holds `--cb-num-blocks` pages of 256 tokens, and a longer prompt can never be placed.
#
# Here the door is set on purpose at twice what the cache holds, within the model's context; the server's command
# above shows it. So one prompt is longer than the door, and one passes the door but not the cache. Before 5.25 there
# is no door, and only the second one is sent. What the server answers is its own: each status code and message,
# `/health` after each, and the last error line of its log. Predict each status before you run the cell.

# %%
def prompt_of(tokens):  # the shipped text, repeated and cut to `tokens` tokens
    text = serving.QUOTED_TEXT.read_text(encoding="utf-8")
    ids = tokenizer(text * (tokens // len(tokenizer(text)["input_ids"]) + 1), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:tokens])


if server:
    door, cache = server.max_model_len, capacity
    asks = [("unknown model", "no-such-model", "Hello")]
    asks += [("longer than --max-model-len", server.model, prompt_of(door + 64))] if door else []
    mid = (cache + (door or 2 * cache)) // 2  # past the cache, within the door
    asks += [("longer than the KV cache", server.model, prompt_of(mid))] if mid > cache else []
    if mid <= cache:
        lab.skip("a prompt past the KV cache", f"the cache holds {cache} tokens, the door admits {door}: none fits")

# %%
if server:
    answers = []
    for label, model_name, prompt in asks:
        try:
            await client.completions.create(model=model_name, prompt=prompt, max_tokens=4)
            answer = {"status": 200, "message": "(answered)"}
        except APIStatusError as error:  # the status code and the server's own message
            said = error.body.get("detail") or error.body.get("error") if isinstance(error.body, dict) else error.body
            answer = {"status": error.status_code, "message": str(said if said is not None else error)}
        try:  # what /health answers after each: a status, or nothing at all once the server's process has exited
            health = httpx.get(f"{server.url}/health", timeout=5)
            after, said = health.status_code, health.text
        except httpx.TransportError as error:
            after, said = None, f"no answer ({type(error).__name__}: {error}): the server is down"
        answers.append({"request": label, **answer, "GET /health after": after, "/health said": said})
    bad_input = pd.DataFrame(answers)
    lab.table("bad_input", bad_input, title="What the server said")
    log = server.log_path.read_text(errors="replace").splitlines()  # the last line of a traceback names its error
    errors = [line.strip() for line in log if "Error" in line and not line.lstrip().startswith(("File ", "^"))]
    print(f"last error in the log: {errors[-1] if errors else ''}")

# %%
if server:
    status, health = (bad_input.set_index("request")[column] for column in ("status", "GET /health after"))
    lab.check("unknown_model_gets_a_client_error", 400 <= status["unknown model"] < 500, str(answers[0]))
    if "longer than the KV cache" in status:  # not sent where the door admits nothing the cache cannot hold
        lab.check("over_long_prompt_gets_an_error", status["longer than the KV cache"] >= 400, str(answers[-1]))
    if "longer than --max-model-len" in status:  # refused before any work: the server stays healthy
        refused = status["longer than --max-model-len"] == 400 and health["longer than --max-model-len"] == 200
        lab.check("a_prompt_past_max_model_len_is_refused_at_the_door", refused, str(answers[1]))

# %% [markdown]
# The unknown model should get a 4xx. The prompt longer than the door gets a 400 that names both lengths, and
# `/health` still answers 200: nothing reached the model. The prompt that passed the door reaches the continuous
# batching scheduler, which can never place it in the cache. The table may show a 5xx for it, and `/health` a 503
# afterwards, or no answer at all. Then the scheduler's worker has stopped, and the server fails every request until
# restarted. The last error of its log, printed above, says why.
#
# The lesson for your own service: watch `/health`, and never let the door admit what the cache cannot hold. Keep
# `--max-model-len` at most the cache's tokens. vLLM refuses to start when its `--max-model-len` is more than its KV
# cache can store: https://github.com/vllm-project/vllm/pull/2163.
#
# Stopping the server, and checking that nothing is left:

# %%
if server:
    pids = [server.watchdog_pid, server.server_pid()]
    server.stop()
    left = [pid for pid in pids if serving.pid_running(pid)]
    print(f"stopped: processes {pids} running afterwards: {left or 'none'}; port {server.port} open: "
          f"{serving.port_open(server.port)}")
    lab.check("nothing_left_running_after_stop", not left and not serving.port_open(server.port),
              f"still running: {left}, port open: {serving.port_open(server.port)}")

# %% [markdown]
# ## 6. Where to go next
#
# `transformers serve` is the shortest path from a transformers model to an OpenAI-compatible endpoint, with the same
# continuous batching as section 1. It answers HTTP in one process and runs the model in another that it spawns
# (`EngineClient.start_process` in `transformers/cli/serving/model_manager.py`). `--device auto`, its default, places
# the layers over every GPU as `device_map="auto"` does in notebook 05's section 2; it has no tensor-parallel flag.
# `--quantization bnb-4bit` loads NF4 weights with double quantization. Its continuous batching can share KV pages
# between requests that start with the same tokens: **prefix caching**,
# `ContinuousBatchingConfig(allow_block_sharing=True)`, the default in 5.25. The dedicated servers add what a busy
# service needs. Check each one's documentation for the version you install:
#
# * **vLLM**, `vllm serve <model>`: PagedAttention and continuous batching. **Prefix caching**: requests that start
#   with the same tokens, such as a shared system prompt, reuse its KV pages. **Chunked prefill**: a long prompt is
#   split so that it does not stall everyone's decoding. Both are on by default in recent releases. Also speculative
#   decoding, an fp8 KV cache with `--kv-cache-dtype fp8`, and several GPUs: `--tensor-parallel-size 4`,
#   `--pipeline-parallel-size 2` and `--data-parallel-size 2`, notebook 05's three ways.
# * **SGLang**, `python -m sglang.launch_server --model-path <model>`: RadixAttention, a prefix cache kept as a tree
#   of token sequences and on by default. Chunked prefill with `--chunked-prefill-size`, and `--tp 4` and `--dp 2`
#   for tensor and data parallelism.
#
# Both speak the same OpenAI API, so section 5's client and load work against them unchanged: point `base_url` at
# them and compare.
#
# ## What you measured

# %%
measured = [f"On the mixed workload, continuous batching made {by_mode.loc['continuous', 'tokens/s']:.1f} tokens/s "
            f"against {by_mode.loc['static', 'tokens/s']:.1f} for padded static batches ({ratio:.2f}x); static "
            f"batching left {wasted['static']:.0f}% of its KV positions without a real token, the paged cache "
            f"{wasted['continuous']:.0f}%.",
            f"Decoding at batch {high.batch:.0f} gave {high['tokens/s']:.1f} tokens/s against {low['tokens/s']:.1f} "
            f"at batch {low.batch:.0f}, each step {longer:.1f}x as long; the roofline puts the knee near batch "
            f"{knee:.0f} on this machine.",
            f"Prompt lookup accepted {repeating.acceptance_rate:.0%} of its proposals on a prompt that repeats itself "
            f"({speedup:.2f}x the speed of greedy decoding) and {fresh.acceptance_rate:.0%} "
            "on one that does not" + ("; the tokens are greedy's either way." if looked["same tokens as greedy"].all()
                                      else ".")]
if draft is not None:
    measured.append(f"The draft model's proposals were accepted at a rate of {assisted['acceptance_rate']:.2f} where "
                    f"it needed {break_even:.2f} to break even: {greedy['ms'] / assisted['ms']:.2f}x greedy's speed"
                    + (" (noisy timings: a verification step came out cheaper than a greedy step)." if noisy else "."))

# %%
per_token = kv_sizes.set_index("model")["KV KiB per token"]
measured.append(f"One token adds {per_token['llama-8b-shape']:.0f} KiB to llama-8b-shape's 16-bit KV cache (GQA), "
                f"{per_token['llama-8b-shape as MHA']:.0f} KiB as MHA and {per_token['llama-8b-shape as MQA']:.0f} KiB "
                f"as MQA; {per_token[lab.p.model_id]:.0f} KiB to {lab.p.model_id}'s.")
if len(caches) > 1:
    shares = ", ".join(f"{kind} {run['held_bytes'] / base['held_bytes']:.0%}" for kind, run in list(caches.items())[1:])
    measured.append(f"A quantized KV cache held this share of the model's own cache at the same context: {shares}.")
if server:
    measured.append(f"transformers serve with continuous batching answered {top.requests_per_s:.2f} requests/s "
                    f"({top.tokens_per_s:.1f} tokens/s) with {top.concurrency} concurrent clients, time to first "
                    f"token p50 {top.get('ttft_p50_ms', float('nan')):.0f} ms.")
lab.finish(measured)
