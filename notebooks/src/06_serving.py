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
# The earlier notebooks made one model answer one batch quickly. A service answers many users whose requests arrive
# at different times and want outputs of different lengths; there the question becomes how many tokens per second the
# machine makes for everyone, and how long each user waits. On your machine, this notebook measures:
#
# 1. **static against continuous batching** on a mixed workload shipped with labkit: padded batches through
#    `generate` against transformers' continuous batching with a **paged KV cache** (tokens/s, time to first token,
#    per-token latency, and the KV memory each holds);
# 2. **the throughput-latency curve**: tokens/s against per-token latency as the batch grows, with the bandwidth and
#    compute bounds of notebook 02's roofline and the knee where they meet;
# 3. **speculative decoding**: prompt lookup and a draft model, their acceptance rate and speed-up, the same tokens;
# 4. **the KV cache's size** per token (MHA, GQA, MQA) and a **quantized KV cache** against the model's own;
# 5. **a real server**, `transformers serve --continuous-batching`, started and stopped from here, under a bounded
#    load of concurrent clients, and what it answers to bad input;
# 6. where to go next: vLLM and SGLang.
#
# Nothing here downloads anything; the server listens on this machine's loopback address only.

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

# %%
import time

from transformers import ContinuousBatchingConfig, GenerationConfig, StoppingCriteriaList

import labkit
from labkit import models, outputs, plots, quant, roofline, serving
from labkit.widgets import show

lab = labkit.start("06_serving", globals())

# %%
show(lab.environment_rows(), ["item", "value"], title="Environment")

# %% [markdown]
# ## 1. Static batching against continuous batching
#
# The workload is a list of requests with mixed prompt and output lengths, written once with a fixed seed and shipped
# in `labkit/data/serving_workload.txt` (on a CPU its lengths are divided, to stay quick). All of them are waiting when
# the run starts, as in a busy service.
#
# * **Static batching** takes the requests a batch at a time. Every prompt is padded to the batch's longest prompt
#   (on the left, as notebook 02 showed for decoders), and the batch runs until its longest output is done: a request
#   that wants a few tokens waits for one that wants many, and the next batch waits for this one.
# * **Continuous batching** (first described for the Orca server: Yu et al., OSDI 2022,
#   https://www.usenix.org/conference/osdi22/presentation/yu) decides at *every step* which requests run: a
#   finished request leaves at once and a waiting one takes its place. Its KV cache is **paged** (the idea of vLLM's
#   PagedAttention): keys and values live in fixed-size pages of a shared pool, and each request holds only the pages
#   its own tokens fill, found through a small table, so nothing is padded.
#
# What is measured per request: the **time to first token** (TTFT, from the start of the run), the **per-token
# latency** (the time between its tokens once it runs) and its **end-to-end latency** (until it is answered). Each is
# shown as its p50 (the median request) and p99 (the 99th percentile, the unluckiest requests; with under a hundred
# requests, as on a CPU, p99 falls between the two slowest, so it is in effect the slowest request). The workload:

# %%
model, tokenizer, workload = lab.model, lab.tokenizer, lab.workload
show(serving.workload_table(workload[:2 * lab.static_batch]), title=f"The first requests of {len(workload)}")

# %% [markdown]
# **06.1 · Predict.** The first static batch holds the first `static_batch` requests above. Every row is padded to the
# longest prompt and runs as many steps as the longest output, so the batch computes and caches
# `rows x (longest prompt + longest output)` positions. What percentage of them hold no real token of any request?

# %%
first = workload[:lab.static_batch]
ex = lab.exercise("06.1", prompt_tokens=[r.prompt_tokens for r in first], new_tokens=[r.new_tokens for r in first])
answer = None  # your prediction, in % of the first batch's positions
ex.check(answer)

# %% [markdown]
# Static batching with `generate`: greedy decoding, each batch forced to run exactly its longest output
# (`min_new_tokens`), so that both ways make the same number of tokens. `outputs.StepClock` is a stopping criterion
# that never stops: `generate` calls it after every step, so it notes when each step's tokens were ready. A short run
# on two requests warms everything up first; then the whole workload is timed.

# %%
tokenizer.padding_side = "left"  # decoders continue from each row's last real token (notebook 02)
greedy = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)


def static_batching(requests):
    start, rows = time.perf_counter(), []
    for batch in serving.batches(requests, lab.static_batch):
        padded = tokenizer.pad({"input_ids": [list(r.prompt_ids) for r in batch]}, return_tensors="pt").to(lab.device)
        longest = max(r.new_tokens for r in batch)  # the whole batch runs until its longest request is done
        clock = outputs.StepClock(lab.device)
        output = model.generate(**padded, max_new_tokens=longest, min_new_tokens=longest,
                                stopping_criteria=StoppingCriteriaList([clock]), **greedy)
        rows += serving.static_rows(batch, output, padded, clock, start)
    return rows


static_batching(workload[:2])  # warm-up
static = serving.measured_runs(lambda: static_batching(workload), device=lab.device, repeats=lab.repeats)

# %% tags=["reveals-06.1"]
row = static[0]
print(f"first batch: {row['batch_size']} rows padded to {row['padded_width']} prompt positions, "
      f"then {row['generated']} steps")
ex.compare(100 * serving.static_kv(static[:lab.static_batch], 1)["waste"], "%")
waste = serving.static_kv(static, 1)["waste"]
print(f"over the whole workload: {100 * waste:.0f}% of the positions held no real token")

# %% [markdown]
# Continuous batching with the same model: `continuous_batching_context_manager` starts transformers' scheduler in a
# background thread, and the model's attention reads and writes the paged cache while it runs (on a GPU where flash
# attention is installed, transformers switches the model to it for the run). Each request is added with its
# own `max_new_tokens`; `eos_token_id=-1` switches the end-of-text token off, so that every request makes exactly its
# tokens, as in the static batches. `ContinuousBatchingConfig` gets the page size and how many pages to keep, enough
# for this workload (left to itself it sizes the pool from the device's free memory: on a CPU, most of the RAM); on a
# CPU it also gets the most tokens one step may hold.

# %%
config = ContinuousBatchingConfig(page_size=lab.page_size, num_blocks=lab.kv_pages,
                                  max_batch_tokens=lab.max_batch_tokens)
no_eos = GenerationConfig(do_sample=False, eos_token_id=-1)


def continuous_batching(requests):
    with model.continuous_batching_context_manager(generation_config=no_eos,
                                                   continuous_batching_config=config) as manager:
        start = time.perf_counter()
        for r in requests:
            manager.add_request(list(r.prompt_ids), request_id=r.id, max_new_tokens=r.new_tokens,
                                record_timestamps=True)
        outputs = serving.collect(manager, len(requests))  # wait until every request has finished
    return serving.continuous_rows(requests, outputs, start)


continuous_batching(workload[:2])  # warm-up
continuous = serving.measured_runs(lambda: continuous_batching(workload), device=lab.device, repeats=lab.repeats)

# %% [markdown]
# Both runs side by side. The KV memory of static batching is each batch's padded cache (the largest batch is its
# peak); that of continuous batching is, at every moment a token was made, the pages its running requests needed.
# Both use the one formula for the bytes a token adds to the cache (section 4).

# %%
results = serving.batching_results(static, continuous, bytes_per_token=serving.kv_bytes_per_token(model),
                                   page_size=lab.page_size)
show(serving.batching_table(results), title=f"{len(workload)} requests, {lab.model_id}, {lab.dtype_name}")
same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(static, continuous, strict=True))
print(f"{same} of {len(workload)} requests got the same tokens both ways")
lab.add(serving.batching_findings(results, same_tokens=same, requests=len(workload), on_gpu=lab.on_gpu,
                                  quick=lab.quick))

# %% [markdown]
# Read the table row by row. Under static batching, a request of the second batch has its first token only after the
# whole first batch is done, which shows in the TTFT p99; continuous batching starts every waiting request as soon as
# there is room. Tokens/s counts only the tokens requests asked for: the steps a static batch runs past a short
# request's end produce nothing anyone wanted. On a CPU a step's cost grows with the tokens in it (section 2's curve
# shows how fast here), so expect a smaller gain than on a GPU, where below section 2's knee a step costs about the same
# whatever the batch; on a GPU, with the full workload, the notebook records the ratio and expects at least twice static
# batching's tokens/s. The last column is the share of KV positions that hold no real token: padding for static
# batching, the unfilled end of each request's last page for the paged cache.
#
# ## 2. The throughput-latency curve
#
# Decoding one step reads every weight once whatever the batch, so a bigger batch makes more tokens per step at little
# extra cost, until the arithmetic, which does grow with the batch, becomes the bottleneck. Notebook 02's roofline
# gives both bounds:
#
# * **bandwidth bound**: `batch x bandwidth / (weight bytes + KV cache bytes)` tokens/s; it grows with the batch;
# * **compute bound**: `FLOP/s ceiling / FLOPs per token` (about 2 per weight), the same at every batch.
#
# They meet at the **knee**: about `ridge point x bytes per weight / 2` (the ridge point is notebook 00's FLOP/s
# ceiling over its bytes/s). Below the knee, raising the batch buys tokens/s almost for free; above it, every step gets
# longer and each user waits longer per token. Prediction: tokens/s grows with the batch while the per-token latency
# grows slowly, then the latency climbs.

# %%
bandwidth = roofline.bandwidth_ceiling(lab.device)["bytes_per_s"]
flops = roofline.compute_ceiling(lab.device, lab.dtype, quick=lab.quick)["flops_per_s"]
curve = serving.decode_curve(model, batch_sizes=lab.batch_sizes, prompt_tokens=lab.curve_prompt,
                             new_tokens=lab.curve_new_tokens)
curve = serving.curve_bounds(model, curve, bandwidth_bytes_per_s=bandwidth, flops_per_s=flops)
knee = serving.knee_batch(model, bandwidth_bytes_per_s=bandwidth, flops_per_s=flops)
show(serving.curve_table(curve), title=f"Decode, {lab.model_id}, prompts of {lab.curve_prompt} tokens")
print(f"the bounds meet near batch {knee:.0f} on {lab.device_label}")
fig = plots.serving_curve(curve, knee=knee, title=f"{lab.model_id} on {lab.device_label}")
lab.figure("throughput_latency", fig)
lab.add(serving.curve_findings(curve, knee))

# %% [markdown]
# A point marked `noisy` in the table kept contradicting its cost model after one re-measurement: draw no conclusion
# from it. Where your batches stay below the knee, tokens/s should climb nearly in step with the batch; the fraction of
# the bound says how close each point came to the roofline. Continuous batching is how a server stays near the knee:
# it keeps the batch full even though requests come and go.
#
# ## 3. Speculative decoding
#
# A step of the large model reads all its weights to make one token. **Speculative decoding** lets something cheap
# propose the next `k` tokens, then runs the large model **once** over all of them: it checks every proposal in that
# one forward pass, keeps the proposals up to the first it disagrees with, and adds one token of its own. With greedy
# decoding the tokens are greedy's (up to rounding: a forward over several tokens may round differently from one over
# a single token, which can flip a rare near-tie in 16-bit); only the number of large-model steps changes. The share
# of proposed tokens that were kept is the **acceptance rate**.
#
# * **Prompt lookup** (`prompt_lookup_num_tokens=`) proposes by finding the last few tokens earlier in the text and
#   copying what followed them there. No second model; it pays off when the output repeats the input (quoting,
#   editing code, summarising with the source's words).
# * **A draft model** (`assistant_model=`) proposes with a small model that shares the tokenizer.
#
# Prediction: on a prompt that starts quoting a passage again, prompt lookup proposes the right tokens and the large
# model needs a few steps instead of one per token; on a story it writes fresh, it rarely finds anything to copy.
# `serving.ForwardCounter` counts the large model's forward passes and the tokens each one checks.

# %%
counter = serving.ForwardCounter(model)
prompts = {"repeating": tokenizer(serving.repeating_prompt(lab.quote_words), return_tensors="pt").to(lab.device),
           "fresh": tokenizer(serving.FRESH_PROMPT, return_tensors="pt").to(lab.device)}
n = lab.spec_new_tokens
plain = {label: serving.speculative_run(model, ids, new_tokens=n, counter=counter) for label, ids in prompts.items()}
lookup = {f"{label}, prompt lookup": serving.speculative_run(model, ids, new_tokens=n, counter=counter,
                                                             prompt_lookup_num_tokens=10)
          for label, ids in prompts.items()}
show(serving.speculative_table(lookup, plain), title=f"Prompt lookup, {n} new tokens, {lab.model_id}")
lab.add(serving.lookup_findings(lookup, plain))

# %% [markdown]
# **A draft model.** The draft must share the model's tokenizer and be much cheaper. Of the embedded models that
# generate text, only `smollm2-135m` has real weights, and it is the smallest of its family, so there is no meaningful
# draft for it on this machine. The default draft is `tiny-llama`: random weights, the same tokenizer. It shows what a
# useless draft costs. (With a Hub cache, serve a larger SmolLM2 with `smollm2-135m`'s weights as its draft.) The draft
# proposes exactly `proposals` tokens at every step. First, what a step costs, in steps of plain greedy decoding:
# verifying costs more than a plain step (more tokens in one forward), and each proposal costs one draft step.

# %%
draft, proposals = None, 4
if lab.draft_problem:  # the draft's package is missing here: the rest of the notebook runs without it
    lab.skip(f"the draft model {lab.draft_model_id}", lab.draft_problem)
else:
    draft, _ = models.load_model(lab.draft_model_id, device=lab.device, dtype=lab.dtype)
    draft.generation_config.num_assistant_tokens = proposals  # propose exactly this many tokens at every step
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0  # and never stop proposing early
    draft_alone = serving.speculative_run(draft, prompts["fresh"], new_tokens=n, counter=serving.ForwardCounter(draft))
    costs = serving.step_costs(model, prompts["fresh"], proposals=proposals, greedy=plain["fresh"],
                               draft_greedy=draft_alone)
    print(f"verifying {proposals} proposals costs {costs['verify_cost']:.3f} greedy steps; "
          f"one draft step costs {costs['draft_cost']:.3f}")

# %% [markdown]
# **06.2 · Predict.** A speculative step costs `verify_cost + proposals x draft_cost` greedy steps and yields
# `1 + rate x proposals` tokens, where `rate` is the acceptance rate. At what acceptance rate does this draft break even
# with plain greedy decoding, with the costs printed above?

# %%
if draft is not None:
    ex = lab.exercise("06.2", proposals=proposals, verify_cost=round(costs["verify_cost"], 3),
                      draft_cost=round(costs["draft_cost"], 3))
    answer = None  # your prediction: an acceptance rate between 0 and 1
    ex.check(answer)

# %% [markdown]
# Now assisted decoding for real. The break-even it measures comes from the run itself: its time per verification step
# in greedy steps, less the one token a step always yields, shared by the proposals.

# %% tags=["reveals-06.2"]
if draft is not None:
    assisted = serving.speculative_run(model, prompts["fresh"], new_tokens=n, counter=counter, assistant_model=draft)
    show(serving.speculative_table({f"fresh, draft {lab.draft_model_id}": assisted}, plain), title="Assisted decoding")
    break_even = serving.measured_break_even(assisted, plain["fresh"], proposals)
    print("the acceptance rate at which this run would have matched greedy decoding:")
    ex.compare(break_even)
    print(f"the draft's proposals were accepted at a rate of {assisted['acceptance_rate']:.2f}")
    random_draft = lab.draft_model_id in models.EMBEDDED and models.EMBEDDED[lab.draft_model_id].kind == "random"
    lab.add(serving.draft_findings(assisted, plain["fresh"], break_even=break_even, random_draft=random_draft,
                                   predicted=ex.exercise.solved(**ex.given)))

# %% [markdown]
# The prediction adds up the parts; the run also pays for work the sum leaves out (the draft's own generate loop, the
# bookkeeping of candidates), so its break-even can differ, and on a busy machine both are noisy. A random draft's
# proposals are essentially never right, so each of its steps costs more than a greedy step and yields one token: it
# can only slow decoding down. A real draft pays when its acceptance rate sits well above the break-even; prompt
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
# The formula, `2 x layers x key/value heads x head size x bytes per element`, is `labkit.roofline.kv_bytes_per_token`,
# the one notebook 02 used.
#
# **06.3 · Predict.** How many KiB does one token add to the 16-bit KV cache of `llama-8b-shape` (Llama 3 8B's
# architecture: the numbers are in the call below)?

# %%
shape_8b = roofline.kv_shape(models.model_config("llama-8b-shape"))
ex = lab.exercise("06.3", layers=shape_8b["layers"], heads=shape_8b["heads"], kv_heads=shape_8b["kv_heads"],
                  head_dim=shape_8b["head_dim"], bytes_per_element=2)
answer = None  # your prediction, in KiB per token
ex.check(answer)

# %% [markdown]
# The table computes it for every decoder of the workbook and for the same 8B shape made MHA and MQA. To check the
# formula against a real cache, `llama-8b-shape` is built on PyTorch's **meta device** (shapes, no memory), run over
# 16 tokens, and the cache it leaves is measured.

# %% tags=["reveals-06.3"]
config_8b = models.model_config("llama-8b-shape")
configs = {name: models.model_config(name) for name in ("tiny-llama", "tiny-opt", "random-llama-1b",
                                                          "llama-8b-shape", "llama-70b-shape")}
configs = {lab.model_id: model.config, **configs, "llama-8b-shape as MHA": serving.with_kv_heads(config_8b, 32),
           "llama-8b-shape as MQA": serving.with_kv_heads(config_8b, 1)}
kv_rows = serving.kv_table(configs)
show(kv_rows, title="KV cache per token, 16-bit")
measured = {name: serving.measured_kv_bytes_per_token(models.empty_model(name))
            for name in ("llama-8b-shape", "llama-70b-shape")}
ex.compare(measured["llama-8b-shape"] / 2**10, "KiB per token")
print(f"llama-70b-shape's cache on the meta device: {measured['llama-70b-shape'] / 2**10:.0f} KiB per token")
lab.add(serving.kv_findings(kv_rows, measured))

# %% [markdown]
# **A quantized KV cache.** transformers' `QuantizedCache` stores the keys and values in fewer bits. Its `quanto`
# backend (4-bit, optimum-quanto) follows the KIVI paper (https://arxiv.org/abs/2402.02750): the most recent tokens (up
# to `residual_length`, 128 by default) stay in the model's dtype, older ones are quantized in groups. Its `fp8` backend
# (plain PyTorch inside transformers) keeps no such window: every token is stored in float8 with one scale per tensor,
# fixed by the first tokens it sees. A third backend, `hqq`, installs, but once it is there transformers imports it (and
# PyTorch's compiler with it) every time its cache code is imported, which slows every notebook's start, so the workbook
# leaves it out. You would write `model.generate(..., cache=QuantizedCache(backend="quanto", config=model.config,
# nbits=4))`. Below, the shipped text's first `kv_context` tokens are read into each cache, then the next ones are read
# through it a few at a time: what each cache holds at the end, how long the pass took, the perplexity of the tokens
# read, and how far the next-token distributions moved from the model's own cache (KL divergence in nats, as in notebook
# 04). On a CPU the model's own cache is float32, so a quantized cache is compared with 4-byte numbers there, with
# 2-byte ones on a GPU.

# %%
text_ids = tokenizer(quant.sample_text(), return_tensors="pt")["input_ids"][:, :lab.kv_context + lab.kv_read + 1]
kinds, left_out = serving.usable_caches(quick=lab.quick)
for what, why in left_out.items():
    lab.skip(what, why)
if "quanto" in kinds and not serving.quanto_extension_built():
    print("optimum-quanto compiles its extension now, once: this takes minutes the first time")
caches = {}
for kind in kinds:
    try:
        caches[kind] = serving.cache_quality(model, text_ids, context=lab.kv_context, cache=kind)
    except Exception as error:  # a backend that fails here is reported, not fatal
        lab.skip(f"QuantizedCache({kind})", f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
read = text_ids.shape[1] - lab.kv_context - 1
show(serving.cache_table(caches), title=f"{lab.kv_context} tokens read into each cache, then {read} through it")
lab.add(serving.cache_findings(caches, model))

# %% [markdown]
# **Feeding notebook 05's calculator.** The bytes per token decide how many users a server can hold at once. On
# 8 x 80 GB, after `llama-70b-shape`'s 16-bit weights, the memory left holds this many sequences of 4,096 tokens with
# a 16-bit KV cache, and with each quantized cache at the share of a 16-bit cache it held above (quanto's residual
# window was in this machine's dtype, so on a CPU its share is a little high):

# %%
show(serving.fits_table(caches, model), title="llama-70b-shape on 8 x 80 GB (labkit.parallel's calculator)")

# %% [markdown]
# ## 5. A real server under load
#
# `transformers serve` is an OpenAI-compatible HTTP server (the `serving` extra of transformers: FastAPI, uvicorn and
# the openai package); `--continuous-batching` runs the scheduler of section 1 behind it. labkit starts it in a
# subprocess on a free loopback port and waits until its `/health` answers. The command and the log file are printed:
# open the log to see what the server did. Nothing may outlive this notebook: the server runs in a process group of
# its own behind a small watchdog, `server.stop()` ends the group, the same is registered to run when the kernel
# exits, and if the kernel is killed outright the watchdog notices at once (on Linux the kernel's death is signalled
# to it) and stops the server.

# %%
problem = serving.serving_problem()
server = None
if problem:
    lab.skip("the server (section 5)", problem)
else:
    server = serving.Server(serving.model_folder(lab.model_id), device=lab.device, dtype=lab.dtype_name,
                            kv_pages=lab.server_pages, max_batch_tokens=lab.server_max_batch_tokens,
                            max_model_len=lab.server_door)
    print(f"$ {server.command_line}\nlog: {server.log_path}")
    server.start()
    print(f"answering on {server.url} after {server.started_s:.1f} s "
          f"(watchdog pid {server.watchdog_pid}, server pid {server.server_pid()})")

# %% [markdown]
# A client is a few lines with the `openai` package's asynchronous client: one streaming completion per request,
# noting when the first piece of text arrives (TTFT) and when the answer ends. `temperature=0` asks for greedy
# decoding; `max_retries=0` and `timeout` keep a failing request from being retried or waited on forever.

# %%
if server:
    from openai import APIStatusError, AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
    texts = {r.id: tokenizer.decode(r.prompt_ids) for r in lab.server_workload}

    async def one_request(request):
        start, first, tokens = time.perf_counter(), None, 0
        stream = await client.completions.create(model=server.model, prompt=texts[request.id], stream=True,
                                                 max_tokens=request.new_tokens, temperature=0)
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        return {"ttft_s": (first or end) - start, "latency_s": end - start, "tokens": tokens}

# %% [markdown]
# The load: at each level, `N` clients share a fixed list of requests, each client sending its next request when its
# last one is answered (never more than `N` in flight), with a time limit per request and per level. One request first
# warms the server up (its first request builds the paged cache). Prediction: requests/s and tokens/s rise with the
# clients while the server's batches fill, and each request's TTFT and latency rise as it shares each step with more.
# (The cell `await`s at its top level, which Jupyter allows because it runs each cell in an event loop; in a script
# you would wrap the same code in a function and call `asyncio.run(...)`.)

# %%
if server:
    await one_request(lab.server_workload[0])  # a warm-up request
    levels = [await serving.load(one_request, lab.server_workload, concurrency=c, timeout_s=600)
              for c in lab.server_concurrency]
    show(serving.load_table(levels), title=f"transformers serve --continuous-batching, {lab.model_id}")
    fig = plots.server_load(levels, title=f"{len(lab.server_workload)} requests per level, {lab.device_label}")
    lab.figure("server_load", fig)
    lab.add(serving.load_findings(levels, server))

# %% [markdown]
# **Bad input.** A request for a model the server does not serve, and prompts too long. A server has two limits on a
# prompt's length. At the door: since transformers 5.25, `transformers serve` refuses a prompt that leaves no room for
# an answer within `--max-model-len` tokens (without the flag, the model's context), before any work. Inside: its KV
# cache holds `--cb-num-blocks` pages of 256 tokens, and a prompt longer than that can never be placed. Here the door
# is set on purpose at twice what the cache holds (within the model's context), the server's command above shows
# it, so that one prompt is longer than the door and one passes the door but not the cache. (Before 5.25 there is no
# door, and only the second one is sent.) What the server answers is its own: each status code and message, `/health`
# after each, and the last error line of its log. Predict each status before you run the cell.

# %%
if server:
    door, cache = server.max_model_len, lab.server_capacity
    asks = [("unknown model", "no-such-model", "Hello")]
    asks += [("longer than --max-model-len", server.model, serving.prompt_of(tokenizer, door + 64))] if door else []
    mid = (cache + (door or 2 * cache)) // 2  # past the cache, within the door
    asks += [("longer than the KV cache", server.model, serving.prompt_of(tokenizer, mid))] if mid > cache else []
    if mid <= cache:
        lab.skip("a prompt past the KV cache", f"the cache holds {cache} tokens, the door admits {door}: none fits")
    answers = {}
    for label, model_name, prompt in asks:
        try:
            await client.completions.create(model=model_name, prompt=prompt, max_tokens=4)
            answers[label] = {"status": 200, "message": "(answered)"}
        except APIStatusError as error:
            answers[label] = serving.error_answer(error)
        status, message = server.health()
        answers[f"GET /health after: {label}"] = {"status": status, "message": message}
    show([{"request": k, **v} for k, v in answers.items()], title="What the server said")
    print(f"last error in the log: {server.last_error()}")
    lab.add(serving.bad_input_findings(answers))

# %% [markdown]
# The unknown model should get a 4xx. The prompt longer than the door gets a 400 that names both lengths, and
# `/health` still answers 200: nothing reached the model. The prompt that passed the door reaches the continuous
# batching scheduler, which can never place it in the cache: if the table shows a 5xx for it and `/health` answers 503
# afterwards, the scheduler's worker has stopped (the last error of its log, printed above, says why) and the server
# fails every request until restarted. The lesson for your own service: the door's limit must not admit what the cache
# cannot hold (`--max-model-len` at most the cache's tokens; vLLM refuses to start when its `--max-model-len` is more
# than its KV cache can store, https://github.com/vllm-project/vllm/pull/2163), and watch `/health`.
#
# Stopping the server, and checking that nothing is left:

# %%
if server:
    pids = [server.watchdog_pid, server.server_pid()]
    server.stop()
    left = [pid for pid in pids if serving.pid_running(pid)]
    print(f"stopped: processes {pids} running afterwards: {left or 'none'}; port {server.port} open: "
          f"{server.port_in_use()}")
    lab.add(serving.stop_findings(server, pids))

# %% [markdown]
# ## 6. Where to go next
#
# `transformers serve` is the shortest path from a transformers model to an OpenAI-compatible endpoint, with the same
# continuous batching as section 1. It runs one process (`--device auto`, its default, places the layers over every
# GPU as `device_map="auto"` does, notebook 05's section 2; it has no tensor-parallel flag), and `--quantization
# bnb-4bit` loads NF4 weights with double quantization. Its continuous batching can also share KV pages between
# requests that start with the same tokens (**prefix caching**: `ContinuousBatchingConfig(allow_block_sharing=True)`,
# the default in 5.25). The dedicated servers add what a busy service needs; check each one's documentation for the
# version you install:
#
# * **vLLM** (`vllm serve <model>`): PagedAttention and continuous batching, **prefix caching** (requests that start
#   with the same tokens, such as a shared system prompt, reuse its KV pages) and **chunked prefill** (a long prompt
#   is split so that it does not stall everyone's decoding), both on by default in recent releases,
#   speculative decoding, an fp8 KV cache (`--kv-cache-dtype fp8`), and several GPUs: `--tensor-parallel-size 4`,
#   `--pipeline-parallel-size 2`, `--data-parallel-size 2` (notebook 05's three ways).
# * **SGLang** (`python -m sglang.launch_server --model-path <model>`): RadixAttention, a prefix cache kept as a tree
#   of token sequences and on by default, chunked prefill (`--chunked-prefill-size`), and `--tp 4` / `--dp 2` for
#   tensor and data parallelism.
#
# Both speak the same OpenAI API, so section 5's client and load work against them unchanged: point `base_url` at
# them and compare.
#
# ## What you measured

# %%
lab.finish()
