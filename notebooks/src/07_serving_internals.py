# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · What a server tunes, measured: prefix caching, token budget, paged blocks, self-drafts, disaggregated prefill
#
# Notebook 06 showed that continuous batching with a paged KV cache beats static batches. This notebook opens the
# engine and turns the knobs its operator turns. It uses transformers 5.25's own continuous batching, the engine of
# `transformers serve`, on a small random-weight model. The tokens do not matter here, only what the engine computes
# and holds. On your machine, this notebook measures:
#
# 1. **prefix caching**: requests that share a long system prompt, served with and without block sharing: time to
#    first token, the prompt tokens the model computed, the KV pages held;
# 2. **the token budget**: the most tokens one step may hold, swept: time to first token of new requests against the
#    time between tokens of running ones;
# 3. **a paged block table by hand**: pages in a pool and a table per request. A gather rebuilds a request's keys and
#    values; it is checked equal to the contiguous cache and timed against it;
# 4. **a draft from the model itself**: SmolLM2's first layers propose tokens and the whole model checks them. The
#    acceptance rate and the speed-up at three exit layers, beside the acceptance that breaks even;
# 5. **disaggregated prefill, rehearsed**: one process prefills and sends the KV cache, another decodes from it. The
#    bytes moved against the prefill they save.
#
# Nothing here downloads anything.

# %% tags=["parameters"]
# Parameters (papermill overrides this cell). A size of 0 or an empty list means: sized for this device.
device = "auto"                # auto, cpu, cuda or cuda:N
dtype = "auto"                 # auto picks bfloat16 on a recent GPU, float32 on CPU
model_id = "tiny-llama"        # the served model: embedded, a local folder, or a Hub id in your cache
shared_prompt_tokens = 0       # section 1: the system prompt every request starts with
requests = 0                   # section 1: requests in the burst; section 2: conversations running
token_budgets = []             # section 2: the most tokens one step may hold (max_batch_tokens), swept
page_size = 0                  # tokens per page of the paged KV cache
spec_model_id = "smollm2-135m"  # section 4: the model that drafts for itself with its first layers
exit_layers = []               # section 4: the layers after which the draft exits
handoff_tokens = []            # section 5: the prompt lengths whose KV cache one process sends the other
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
import pandas as pd
import torch
from transformers import ContinuousBatchingConfig, DynamicCache, GenerationConfig

import labkit
from labkit import compat, exercises, launcher, models, results, roofline, serving_internals, timing
from labkit.widgets import show

lab = labkit.start("07_serving_internals", globals())

# %%
show(lab.environment_rows(), ["item", "value"], title="Environment")

# %% [markdown]
# ## 1. Prefix caching: a system prompt computed once
#
# A chat service puts the same system prompt before every user's question. Every request then starts with the same
# few hundred tokens, and without help the engine computes their keys and values again for each request. The paged
# cache makes sharing cheap: a request's cache is a list of pages, so two requests can point at the same page.
#
# transformers 5.25 does this when `ContinuousBatchingConfig(allow_block_sharing=True)`, its default. After a
# forward pass, each page it filled is hashed with its tokens and the hash of the page before it
# (`mark_complete_blocks` in `continuous_batching/cache_allocators/cache_allocator.py`). A new request looks up its
# prompt's pages by hash (`match_prefix_blocks`) and computes only what follows the last matched page. Only full
# pages are matched, and never the whole prompt: the last token must be computed to give the first new token.
#
# The workload: the system prompt is served once, as an earlier user's request would have been. Then a burst of
# requests arrives at once, each the system prompt followed by a short question of its own. The model is random;
# its token ids are random too, from a fixed seed.

# %%
model, _ = models.load_model(lab.p.model_id, device=lab.device, dtype=lab.dtype)
tokens = max(lab.p.shared_prompt_tokens + 64 * lab.p.requests, lab.p.cache_tokens)  # section 3 reuses them
ids = torch.randint(100, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(7)).tolist()
system = ids[:lab.p.shared_prompt_tokens]  # what every request starts with
questions = [ids[lab.p.shared_prompt_tokens + 64 * i:][:lab.p.question_tokens] for i in range(lab.p.requests)]
page, no_eos = lab.p.page_size, GenerationConfig(do_sample=False, eos_token_id=-1)
print(f"{lab.p.requests} requests of {len(system)} shared + {lab.p.question_tokens} own tokens; pages of {page}")

# %% [markdown]
# **07.1 · Predict.** With block sharing on, how many prompt tokens does the model compute for the whole burst?
# The system prompt's full pages are in the cache already. Count what each request must still compute.

# %%
ex = lab.exercise("07.1", shared_tokens=len(system), own_tokens=lab.p.question_tokens, page_size=page,
                  requests=lab.p.requests)
answer = None  # your prediction: prompt tokens computed for the burst, with block sharing
ex.check(answer)

# %% [markdown]
# **07.2 · Predict.** And the memory: at its peak, how many KV blocks does the cache hold for the burst, with
# sharing? A block is one page of every layer. Each request makes `new_tokens` tokens.

# %%
ex_blocks = lab.exercise("07.2", shared_tokens=len(system), own_tokens=lab.p.question_tokens,
                         new_tokens=lab.p.new_tokens, page_size=page, requests=lab.p.requests)
answer = None  # your prediction: KV blocks held at the peak, with block sharing
ex_blocks.check(answer)

# %% [markdown]
# One function serves the burst. `serving_internals.StepLog` is a forward pre-hook: before each forward pass of the
# engine, it notes how many query tokens the pass computes and how many KV blocks the cache holds. On a GPU the burst
# runs with CUDA graphs and asynchronous batching off: a replayed graph runs no Python hook, and pads its inputs. A
# block is one page of every layer. `serving_internals.collect` reads the engine's outputs until the given requests
# are done. Time to first token is counted from when a request was added.

# %%
def serve_burst(share):
    blocks = (len(system) // page + 4) * (lab.p.requests + 2)  # room for every request without sharing
    config = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=2 * len(system),
                                      allow_block_sharing=share, use_cuda_graph=False, use_async_batching=False)
    with model.continuous_batching_context_manager(generation_config=no_eos,
                                                   continuous_batching_config=config) as manager:
        first = manager.add_request(system, max_new_tokens=2)  # the earlier user's request
        serving_internals.collect(manager, [first])
        steps = serving_internals.StepLog(model, manager)
        burst = [manager.add_request(system + q, max_new_tokens=lab.p.new_tokens, record_timestamps=True)
                 for q in questions]
        done = serving_internals.collect(manager, burst)
        steps = steps.remove()
        sharing = manager.batch_processor.cache.use_prefix_sharing  # what the engine resolved
    outputs = [done[r] for r in burst]
    return outputs, steps, sharing

# %% [markdown]
# Each way is served once. The earlier request warms the engine up in each run, and it is not timed. Predict before
# the table: how much sooner does the first token come with sharing?

# %%
runs = {share: serve_burst(share) for share in (False, True)}

# %% tags=["reveals-07.1", "reveals-07.2"]
rows = []
for share, (outputs, steps, resolved) in runs.items():
    ttft = pd.Series([1e3 * (o.timestamps[0] - o.created_time) for o in outputs])
    prefill = steps["query tokens"].sum() - sum(len(o.generated_tokens) - 1 for o in outputs)  # decode: 1 each
    rows.append({"block sharing": share, "engine shared": resolved, "TTFT p50 ms": ttft.median(),
                 "TTFT p99 ms": ttft.quantile(0.99), "prompt tokens computed": prefill,
                 "prompt tokens sent": sum(len(o.prompt_ids) for o in outputs),
                 "peak KV blocks held": steps["blocks held"].max(), "steps": len(steps)})
prefix = pd.DataFrame(rows).set_index("block sharing")
lab.table("prefix_caching", prefix.reset_index(), title=f"A burst of {lab.p.requests} requests, {lab.p.model_id}")
ex.compare(prefix.loc[True, "prompt tokens computed"], "tokens")
ex_blocks.compare(prefix.loc[True, "peak KV blocks held"], "blocks")

# %%
off, on = prefix.loc[False], prefix.loc[True]
faster = off["TTFT p50 ms"] / on["TTFT p50 ms"]
same = all(a.generated_tokens == b.generated_tokens for a, b in zip(runs[False][0], runs[True][0], strict=True))
print(f"Sharing computed {on['prompt tokens computed']} of {on['prompt tokens sent']} prompt tokens "
      f"({off['prompt tokens computed']} without), held at most {on['peak KV blocks held']} blocks against "
      f"{off['peak KV blocks held']}, and gave the first token {faster:.1f}x sooner (p50); same tokens: {same}")
lab.check("block_sharing_computes_fewer_prompt_tokens", on["prompt tokens computed"] < off["prompt tokens computed"])
if lab.dtype == torch.float32:  # in 16-bit a prompt computed in other batches may round a near-tie the other way
    lab.check("block_sharing_gives_the_same_tokens", same)
lab.check("block_sharing_cuts_time_to_first_token_2x", faster >= 2, f"{faster:.2f}x", timing=True)
lab.metric("prefix_caching_ttft_p50_speedup", faster)

# %% [markdown]
# What was seen: with sharing, each request computed only its question and the part of the system prompt past its
# last full page. Without it, every request computed the whole system prompt again. The peak blocks column shows the
# memory side: shared pages are held once, whatever the number of requests using them.
#
# Without sharing the requests also wait for each other. The step's token budget holds about two prompts, so the
# burst's prefills queue over several steps; the p99 shows the last one. With sharing, every remaining prefill fits
# in one step.
#
# One behaviour of 5.25 to know: a page is hashed only after the forward pass, and only while its request runs.
# `mark_complete_blocks` in `continuous_batching/cache.py` returns early for a finished request. So a request that
# stops at its first token, `max_new_tokens=1`, leaves nothing to share. The earlier request above asks
# for 2 tokens for that reason.

# %% [markdown]
# ## 2. The token budget: first tokens against steady tokens
#
# Each step of continuous batching holds at most `max_batch_tokens` query tokens: one for each running request that
# is decoding, plus chunks of new prompts. A prompt longer than what is left is split over several steps; this is
# **chunked prefill**. The budget sets a trade-off:
#
# * a **small budget** splits a new prompt into many small chunks: running requests keep a steady pace, but the new
#   request waits many steps for its first token;
# * a **large budget** computes a new prompt in one step: its first token comes soon, but that step is long, and
#   every running request waits for it.
#
# The workload: `requests` conversations are running, short prompts each making `chat_tokens` tokens. Once every one
# has made its first token, new requests arrive with long prompts. Measured: the new requests' time to first token
# (TTFT), and the running ones' inter-token latency (ITL), both as p50 and p99. Prediction: as the budget grows,
# TTFT falls and the ITL p99 rises.

# %%
arrivals = torch.randint(100, model.config.vocab_size, (3, lab.p.arrival_tokens),  # three long prompts
                         generator=torch.Generator().manual_seed(8)).tolist()


def serve_mixed(budget, **knobs):
    blocks = (sum(map(len, arrivals)) + lab.p.requests * (lab.p.question_tokens + lab.p.chat_tokens)) // page + 16
    config = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=budget,
                                      allow_block_sharing=False, **knobs)
    with model.continuous_batching_context_manager(generation_config=no_eos,
                                                   continuous_batching_config=config) as manager:
        chats = [manager.add_request(q, max_new_tokens=lab.p.chat_tokens, streaming=True, record_timestamps=True)
                 for q in questions]
        serving_internals.collect(manager, chats, started_only=True)  # every conversation is running
        new = [manager.add_request(a, max_new_tokens=4, record_timestamps=True) for a in arrivals]
        done = serving_internals.collect(manager, chats + new)
    itl = [1e3 * t for r in chats for t in pd.Series(done[r].timestamps).diff().dropna()]
    ttft = [1e3 * (done[r].timestamps[0] - done[r].created_time) for r in new]
    return pd.Series(itl), pd.Series(ttft)

# %%
rows = []  # the engine is warm from section 1
for budget in lab.p.token_budgets:
    itl, ttft = serve_mixed(budget)
    rows.append({"token budget": budget, "TTFT p50 ms": ttft.median(), "TTFT p99 ms": ttft.quantile(0.99),
                 "ITL p50 ms": itl.median(), "ITL p99 ms": itl.quantile(0.99)})
budgets = pd.DataFrame(rows)
lab.table("token_budget", budgets, title=f"{lab.p.requests} running conversations, {len(arrivals)} long prompts "
          f"of {len(arrivals[0])} tokens arriving")

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6.4, 3.6))
for column, style in (("TTFT p50 ms", "o-"), ("TTFT p99 ms", "o--"), ("ITL p50 ms", "s-"), ("ITL p99 ms", "s--")):
    ax.plot(budgets["token budget"], budgets[column], style, label=column)
ax.set(xscale="log", yscale="log", xlabel="max_batch_tokens (the step's token budget)", ylabel="ms",
       title=f"{lab.p.model_id} on {lab.device_label}")
ax.set_xticks(budgets["token budget"], [str(b) for b in budgets["token budget"]])
ax.legend(fontsize=8)
lab.figure("token_budget", fig)
plt.show()

# %%
small, large = budgets.iloc[0], budgets.iloc[-1]
print(f"Budget {small['token budget']:.0f}: new prompts waited {small['TTFT p50 ms']:.0f} ms (p50) for a first token, "
      f"running ones {small['ITL p99 ms']:.1f} ms (p99) between tokens. Budget {large['token budget']:.0f}: "
      f"{large['TTFT p50 ms']:.0f} ms and {large['ITL p99 ms']:.1f} ms.")
lab.check("a_larger_budget_gives_new_requests_an_earlier_first_token",
          large["TTFT p50 ms"] < small["TTFT p50 ms"], timing=True)
lab.check("a_larger_budget_stalls_running_requests_longer", large["ITL p99 ms"] > small["ITL p99 ms"], timing=True)

# %% [markdown]
# What was seen: the smallest budget made new prompts wait many steps for their first token. Larger budgets cut
# that wait, with less to gain at each step up. The ITL p50 stays near one decode step, since most steps are plain
# decode steps. The ITL p99 is a step that also held a chunk of a new prompt, and it grows with the chunk.
#
# A service picks its budget from its latency goals: the largest budget whose ITL p99 still meets its goal
# keeps first tokens as early as possible. vLLM's engine arguments name the same knob `--max-num-batched-tokens`
# (its documentation).
#
# **Two more knobs, where this machine allows.** `cpu_offload_space` (GiB) gives the engine a pinned host buffer.
# When the device's cache is full, a request it evicts is copied there instead of being recomputed later. CUDA graphs
# (`use_cuda_graph`) replay a whole step's kernels with one launch; on a GPU the next cell serves the middle budget
# with them off and on.

# %%
try:  # the swap pool is one pinned host buffer: OffloadingManager.__init__, continuous_batching/offloading_manager.py
    torch.empty(1, dtype=torch.uint8, pin_memory=True)
    pinned = None
except RuntimeError as error:
    pinned = str(error).split(";")[0]
if not lab.on_gpu:
    lab.skip("CPU KV offload", f"on a CPU the KV cache is in host memory already, and here torch says: {pinned}")
    lab.skip("CUDA graphs", "they need a CUDA device: decide_use_cuda_graphs in continuous_batching/"
             "initialization.py turns them off when no graph backend is available")

# %%
if lab.on_gpu:  # the middle budget, CUDA graphs off and on: graphs shorten the steps the running requests wait for
    budget, rows = lab.p.token_budgets[len(lab.p.token_budgets) // 2], []
    for graphs in (False, True):
        itl, ttft = serve_mixed(budget, use_cuda_graph=graphs)
        rows.append({"CUDA graphs": graphs, "ITL p50 ms": itl.median(), "ITL p99 ms": itl.quantile(0.99),
                     "TTFT p50 ms": ttft.median()})
    lab.table("cuda_graphs", pd.DataFrame(rows), title=f"Budget {budget}, {lab.device_label}")

# %% [markdown]
# ## 3. A paged block table by hand
#
# The engine's cache is a pool of pages, and each request owns a **block table**: the list of its pages, in order.
# Exercise 06.4 practised reading one request back from its pages. Here is the whole bookkeeping: several requests
# of different lengths, and pages handed out from a free list in no order. The model's own keys and values are
# written through each table. Then attention for one new token of each request, over its pages, against the same
# attention over its contiguous cache.
#
# **07.3 · Code.** First, the write. Write `write_to_pages(pool, block_table, rows)`: `pool` has shape (pages, page
# size, ...), and row t of the request goes to its place in the pages its table lists. Other requests' pages must
# not change. Return the pool. The checker tries it on shuffled pools; the cell after it writes the model's keys.

# %%
ex = lab.exercise("07.3")


def write_to_pages(pool, block_table, rows):
    return None  # your code


answer = None  # once write_to_pages is written: answer = write_to_pages
ex.check(answer)

# %%
write = answer if ex.exercise.verdict(answer, ex.given) else ex.exercise.solution  # yours, once it passes
shape = roofline.kv_shape(model.config)
lengths = [lab.p.cache_tokens, lab.p.cache_tokens // 2 + 5, 3 * page - 1]  # full pages and a partial last page
pool_pages = sum(-(-n // page) for n in lengths) + 4  # every request's pages, and four spare
pool_k = torch.zeros(pool_pages, page, shape["kv_heads"], shape["head_dim"], dtype=model.dtype, device=lab.device)
pool_v, free = torch.zeros_like(pool_k), torch.randperm(pool_pages).tolist()  # pages come free in any order
contiguous, tables = [], []
for n in lengths:
    cache = DynamicCache(config=model.config)  # the model's first layer's keys and values for a prompt of n tokens
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids[:n]], device=lab.device), cache=cache, use_cache=True, logits_to_keep=1)
    k, v = (x[0].transpose(0, 1) for x in (cache.layers[0].keys, cache.layers[0].values))  # (tokens, heads, dim)
    table = torch.tensor([free.pop() for _ in range(-(-n // page))], device=lab.device)
    pool_k, pool_v = write(pool_k, table, k), write(pool_v, table, v)
    contiguous.append((k, v))
    tables.append(table)

# %% [markdown]
# The gather rebuilds a request's keys and values from the pool through its table. Prediction: exactly equal to
# the contiguous cache, bit for bit, since it only moves rows. Then one query per request attends over both.

# %%
def gather(pool, table, n):
    positions = torch.arange(n, device=pool.device)
    return pool[table[positions // page], positions % page]


def attend(k, v, q):  # one new token's attention over n cached tokens; (heads, 1, dim) out
    return torch.nn.functional.scaled_dot_product_attention(q, k.transpose(0, 1), v.transpose(0, 1), enable_gqa=True)


queries = [torch.randn(shape["heads"], 1, shape["head_dim"], dtype=model.dtype, device=lab.device) for _ in lengths]

# %%
rows = []
for n, table, (k, v), q in zip(lengths, tables, contiguous, queries, strict=True):
    equal = torch.equal(gather(pool_k, table, n), k) and torch.equal(gather(pool_v, table, n), v)
    flat = timing.measure(lambda k=k, v=v, q=q: attend(k, v, q), device=lab.device)
    paged = timing.measure(lambda n=n, t=table, q=q: attend(gather(pool_k, t, n), gather(pool_v, t, n), q),
                           device=lab.device)
    rows.append({"tokens": n, "pages": len(table), "block table": table.tolist()[:6], "gather equal": equal,
                 "contiguous ms": flat.median_ms, "gather + attention ms": paged.median_ms,
                 "ratio": paged.median_ms / flat.median_ms})
paged_table = pd.DataFrame(rows)
lab.table("paged_block_table", paged_table, title=f"Pool of {pool_pages} pages of {page} tokens, layer 0")
lab.check("paged_gather_equals_the_contiguous_cache_exactly", paged_table["gather equal"].all())

# %%
longest = paged_table.iloc[0]
copied = 2 * longest["tokens"] * shape["kv_heads"] * shape["head_dim"] * model.dtype.itemsize  # K and V, once
bandwidth = roofline.bandwidth_ceiling(lab.device)["bytes_per_s"]  # a copy's bytes read plus bytes written, per s
print(f"For {longest['tokens']} tokens, gathering then attending took {longest['ratio']:.1f}x the contiguous "
      f"attention. The gather copies {copied / 2**10:.0f} KiB, read once and written once: "
      f"{1e3 * 2 * copied / bandwidth:.3f} ms at this machine's copy ceiling of {bandwidth / 1e9:.1f} GB/s.")

# %% [markdown]
# What was seen: the gather is exact, and it is not free. Copying a request's keys and values into a contiguous
# buffer costs a pass over them, besides the attention's own pass. Compare the extra time with the copy's time at the
# ceiling, printed above. Far above it, the indexing ops' fixed cost dominates at this size, not the bytes.
#
# Engines avoid the copy with attention kernels that read the pages in place, through the block table.
# transformers' continuous batching has a decode path through `flash_attn_with_kvcache` with its block table
# (`max_blocks_per_request` in `ContinuousBatchingConfig`'s docstring). PyTorch 2.13's `varlen_attn` takes one as
# `block_table`, with the pool as keys and values (`torch/nn/attention/varlen.py`). The GPU branch below runs it on
# the same pool, against the gather.

# %%
if not lab.on_gpu:
    lab.skip("varlen_attn over the block table", "torch.nn.attention.varlen.varlen_attn runs flash attention's "
             "CUDA kernel; this machine has no CUDA GPU")
else:  # flash attention's paged path wants pages of a multiple of 256 tokens (flash-attention's mha_varlen_fwd)
    big = [-(-n // 256) for n in lengths]  # each request's pages of 256 tokens
    pool_k2 = torch.zeros(sum(big) + 2, 256, *pool_k.shape[2:], dtype=pool_k.dtype, device=lab.device)
    pool_v2, free = torch.zeros_like(pool_k2), torch.randperm(len(pool_k2)).tolist()
    block_table = torch.zeros(len(lengths), max(big), dtype=torch.int32, device=lab.device)
    for i, (n, (k, v)) in enumerate(zip(lengths, contiguous, strict=True)):
        block_table[i, :big[i]] = torch.tensor([free.pop() for _ in range(big[i])])
        positions = torch.arange(n, device=lab.device)
        pool_k2[block_table[i, positions // 256], positions % 256] = k
        pool_v2[block_table[i, positions // 256], positions % 256] = v

# %%
if lab.on_gpu:  # one new token per request, packed: (requests, heads, dim)
    from torch.nn.attention.varlen import varlen_attn

    q = torch.cat([x.transpose(0, 1) for x in queries])
    used = torch.tensor(lengths, dtype=torch.int32, device=lab.device)
    cu_q = torch.arange(len(lengths) + 1, dtype=torch.int32, device=lab.device)
    cu_k = torch.nn.functional.pad(used.cumsum(0, dtype=torch.int32), (1, 0))
    run = lambda: varlen_attn(q, pool_k2, pool_v2, cu_q, cu_k, 1, max(lengths), enable_gqa=True,  # noqa: E731
                              seqused_k=used, block_table=block_table)
    by_gather = torch.cat([attend(gather(pool_k, t, n), gather(pool_v, t, n), x).transpose(0, 1)
                           for n, t, x in zip(lengths, tables, queries, strict=True)])
    error = (run() - by_gather).abs().max().item()
    fused, gathered = timing.measure(run, device=lab.device), timing.measure(
        lambda: [attend(gather(pool_k, t, n), gather(pool_v, t, n), x)
                 for n, t, x in zip(lengths, tables, queries, strict=True)], device=lab.device)
    lab.table("varlen_block_table", pd.DataFrame([{"requests": len(lengths), "max abs difference": error,
              "varlen_attn ms": fused.median_ms, "gather + SDPA ms": gathered.median_ms}]),
              title="Attention through the block table, in place against gathered")
    lab.check("varlen_attn_over_pages_matches_the_gather", error < 2e-2, f"{error:.2e}")

# %% [markdown]
# ## 4. A draft from the model itself: early exit
#
# Notebook 06 drafted with a separate small model, and its random draft was never right. A model can draft for
# itself: run only its first `k` layers, then its final norm and LM head, and propose that token. Then the whole
# model checks the proposals in one forward pass, as in 06. This is **early-exit self-speculation**.
#
# transformers 5.25 does it with `generate(..., assistant_early_exit=k)`. `EarlyExitCandidateGenerator` in
# `generation/candidate_generator.py` lowers the base model's `config.num_hidden_layers` to `k` while it drafts.
# A Llama runs `self.layers[: self.config.num_hidden_layers]`, so the draft is the first `k` layers. The draft keeps
# a cache of its own: the generator copies the model's arguments without `cache`. So checking recomputes the first
# `k` layers too.
#
# The model is `spec_model_id`, by default SmolLM2-135M with its real weights. It was trained to predict only from
# its last layer. The draft proposes `proposals` tokens at every step; the counting is 06's, with one more column.
# A forward hook notes each forward pass and the layers it ran. Passes with fewer layers are the draft's. The others
# are the model's own, and each yields the proposals it accepts plus one token of its own.
#
# Predict before the table: which exit layer pays best? A shallow exit drafts cheaply but is rarely right. A deep
# exit agrees more often, but each proposal costs nearly a whole step.

# %%
spec_model, spec_tokenizer = models.load_model(lab.p.spec_model_id, device=lab.device, dtype=lab.dtype)
layers = spec_model.config.num_hidden_layers
exits = serving_internals.exit_layers(lab.p.exit_layers, layers)  # left empty: 1/6, 1/2 and 5/6 of the depth
spec_model.generation_config.num_assistant_tokens = lab.p.proposals  # the draft proposes this many at every step
spec_model.generation_config.num_assistant_tokens_schedule = "constant"
spec_model.generation_config.assistant_confidence_threshold = 0.0  # and never stops proposing early
story = spec_tokenizer("Once upon a time, in a small village by the sea, there lived", return_tensors="pt")
story, n = story.to(lab.device), lab.p.spec_new_tokens
print(f"{lab.p.spec_model_id}: {layers} layers; drafts exit after layers {exits}; {n} new tokens a run")

# %%
def self_speculate(exit_layer=None):  # greedy generate, timed once; every forward pass noted
    kept, prompt, log = {}, story["input_ids"].shape[1], serving_internals.ForwardLog(spec_model)
    knobs = {"assistant_early_exit": exit_layer} if exit_layer else {}

    def call():
        log.rows.clear()
        kept["ids"] = spec_model.generate(**story, max_new_tokens=n, do_sample=False, **knobs)[0, prompt:].tolist()
    with compat.quiet_logger("transformers"):  # assisted generation logs a notice about its own arguments
        ms = timing.measure(call, device=lab.device, warmup=0, repeats=1, min_time_s=0).median_ms
    forwards = log.remove()
    own, draft = forwards[forwards["layers"] == layers], forwards[forwards["layers"] < layers]
    proposed = own["tokens"].iloc[0] - prompt + (own["tokens"].iloc[1:] - 1).sum()  # past the token each starts at
    return {"exit layer": exit_layer or layers, "ids": kept["ids"], "ms": ms, "tokens/s": 1e3 * len(kept["ids"]) / ms,
            "model forwards": len(own), "draft forwards": len(draft), "draft ms": draft["ms"].sum(),
            "proposed": proposed, "accepted": len(kept["ids"]) - len(own)}

# %% [markdown]
# **07.4 · Predict.** Suppose a step's time is the weight bytes it reads, as for decode at batch 1. A proposal from
# the exit after layer `k` reads `k` layers and the LM head. A check reads the whole model once: one greedy step. With
# 06.2's formula, what acceptance rate must the middle exit reach to break even? The cell prints the sizes.

# %%
layer_mib = roofline.parameter_bytes(spec_model.base_model.layers[0]) / 2**20  # one decoder layer's weights
head_mib = roofline.parameter_bytes(spec_model.get_output_embeddings()) / 2**20  # every proposal ends with it
print(f"{layers} layers of {layer_mib:.1f} MiB, an LM head of {head_mib:.1f} MiB")
ex = lab.exercise("07.4", exit_layer=exits[len(exits) // 2], layers=layers, layer_mib=round(layer_mib, 2),
                  head_mib=round(head_mib, 2))
answer = None  # your prediction: an acceptance rate between 0 and 1
ex.check(answer)

# %% [markdown]
# Plain greedy decoding first, after a short untimed run that warms the model up. Then one run per exit layer, each
# timed once, from the same prompt.

# %%
spec_model.generate(**story, max_new_tokens=2, do_sample=False)  # warm-up, untimed
greedy = self_speculate()
runs = [self_speculate(k) for k in exits]

# %% [markdown]
# The break-even acceptance uses 06's formula, exercise 06.2's `break_even_acceptance`. A step of speculation costs
# `verify_cost + proposals x draft_cost` greedy steps and yields `1 + rate x proposals` tokens. Both costs come from
# the run itself. `draft_cost` is the draft's mean forward pass. `verify_cost` is the rest of the run's time per check:
# the model's own forward pass, and the draft's `generate` loop around its forwards.

# %% tags=["reveals-07.4"]
break_even = exercises.get("06.2").solution  # (verify_cost + proposals x draft_cost - 1) / proposals
step = greedy["ms"] / len(greedy["ids"])  # one step of plain greedy decoding, ms
rows = []
for run in runs:
    per_check = run["proposed"] / run["model forwards"]  # proposals the model checks in each of its forwards
    draft_cost = run["draft ms"] / run["draft forwards"] / step  # one proposal, in greedy steps
    verify_cost = (run["ms"] - run["draft ms"]) / run["model forwards"] / step  # a check and the loop around it
    rows.append({**{k: v for k, v in run.items() if k != "ids"}, "acceptance rate": run["accepted"] / run["proposed"],
                 "draft cost": draft_cost, "verify cost": verify_cost,
                 "break-even rate": break_even(per_check, verify_cost, draft_cost),
                 "break-even by weight bytes": ex.exercise.solution(run["exit layer"], layers, layer_mib, head_mib),
                 "speed-up vs greedy": greedy["ms"] / run["ms"], "same tokens as greedy": run["ids"] == greedy["ids"]})
spec = pd.DataFrame(rows)
lab.table("self_speculation", spec, title=f"Early-exit self-speculation, {lab.p.spec_model_id}, batch 1, greedy; "
          f"plain greedy {greedy['tokens/s']:.1f} tokens/s")
ex.compare(spec.set_index("exit layer").loc[ex.given["exit_layer"], "break-even rate"])

# %%
best = spec.loc[spec["speed-up vs greedy"].idxmax()]
print(f"Plain greedy: {greedy['tokens/s']:.1f} tokens/s. Best exit: layer {best['exit layer']}, accepted "
      f"{best['acceptance rate']:.0%} of its proposals where it needed {best['break-even rate']:.0%} to break even: "
      f"{best['speed-up vs greedy']:.2f}x greedy's speed.")
shallow, deep = spec.iloc[0], spec.iloc[-1]
print(f"Layer {shallow['exit layer']}: {shallow['acceptance rate']:.0%} accepted; layer {deep['exit layer']}: "
      f"{deep['acceptance rate']:.0%}.")
if lab.dtype == torch.float32:  # in 16-bit a near-tie may round the other way: the table shows it, unchecked
    lab.check("self_speculation_gives_the_greedy_tokens", spec["same tokens as greedy"].all())
lab.check("a_deeper_exit_is_accepted_more_often", deep["acceptance rate"] > shallow["acceptance rate"],
          f"{shallow['acceptance rate']:.2f} at layer {shallow['exit layer']}, {deep['acceptance rate']:.2f} at "
          f"{deep['exit layer']}")
lab.metric("self_speculation_best_speedup", best["speed-up vs greedy"])

# %% [markdown]
# What was seen: the tokens are greedy's at every exit layer, since the model's own forward pass decides each one.
# Deeper exits agree more often, but this model's middle layers were never trained to predict a token. A speed-up
# above 1 needs the rate above the break-even, and an untrained exit falls short of it. A break-even above 100%
# means that exit cannot pay at any rate. Look at the verify cost too: each check also pays for the draft's own
# `generate` loop, a fixed cost per step that is large on a CPU. The break-even by weight bytes is 07.4's model. It
# leaves out that loop, and the cost of checking several tokens in one pass.
#
# **Against batch size.** A draft pays at batch 1 because a decode step reads every weight to compute one token per
# request. A larger batch uses the same read for more tokens, so the spare compute that verification uses shrinks.
# Does transformers 5.25's speculation take a batch at all? The next cell tries a batch of two.

# %%
pair = spec_tokenizer(["Once upon a time", "The capital of France is"], return_tensors="pt", padding=True)
try:
    with compat.quiet_logger("transformers"):
        spec_model.generate(**pair.to(lab.device), max_new_tokens=2, do_sample=False, assistant_early_exit=exits[0])
    lab.skip("self-speculation against batch size", "this transformers took a batch of two; this notebook does not "
             "measure batches yet")
except ValueError as error:  # _assisted_decoding in generation/utils.py
    lab.skip("self-speculation against batch size", f"transformers' generate refuses a batch of two: {error}")

# %% [markdown]
# **Drafts trained to agree.** What servers use today trains the draft to predict what the model would say.
# LayerSkip trains early exits with an exit loss and layer dropout; its paper reports up to 2.16x on CNN/DM
# summarization (Elhoushi et al., 2024, arXiv:2404.16710, abstract). EAGLE-3 trains a small head on the model's
# features from several layers; its paper reports speed-ups up to 6.5x (Li et al., 2025, arXiv:2503.01840,
# abstract). DeepSeek-V3 trains a multi-token prediction module with the model. Its report says the second token
# is accepted 85% to 90% of the time, for 1.8x the tokens per second (arXiv:2412.19437, section 5.4.3). transformers
# 5.25 runs one such trained draft, Gemma 4's assistant, through `SinglePositionMultiTokenCandidateGenerator`. The
# measurement above shows why training matters: the draft is cheap only if it is also right.

# %% [markdown]
# ## 5. Disaggregated prefill, rehearsed
#
# Prefill is one long forward pass over the prompt; decode is many short ones, each reading all the weights. Section 2
# showed how they get in each other's way in one engine. Large deployments run them on different machines: a prefill
# server computes the prompt's KV cache and sends it, and a decode server generates from it. vLLM's documentation
# gives the reasons: time to first token and inter-token latency are tuned separately, and prefills stop
# interrupting decodes. The same page notes that it does not improve throughput ("Disaggregated Prefilling", vLLM
# docs). vLLM moves the cache through KV connectors, SGLang's PD disaggregation through Mooncake or NIXL, and NVIDIA
# Dynamo through NIXL (each project's documentation).
#
# Here is the same handoff between two processes on this machine, over gloo. `notebooks/scripts/kv_handoff.py`: rank
# 0 prefills a prompt of the served model and sends the first token and every layer's keys and values. Rank 1
# receives them into a `DynamicCache` and decodes greedily, never running the prompt. Rank 0 also decodes the whole
# prompt alone with `generate`, for the check. The decode server's tokens must equal those.
#
# What it costs: the cache's bytes over the link, against the prefill the decode server did not compute. Predict
# first: which grows faster with the prompt, the prefill's time or the transfer's?

# %%
folder = models.folder_for_processes(lab.p.model_id)  # the same weights as `model`, saved for the processes
job = launcher.launch(launcher.scripts_dir() / "kv_handoff.py", 2, {
    "model_folder": folder, "prompt_tokens": lab.p.handoff_tokens, "new_tokens": lab.p.handoff_new_tokens,
    "repeats": 3}, gpus=False)  # two CPU processes, gloo between them
handoff = pd.DataFrame(job["rows"])
kv_token = roofline.kv_bytes_per_token(**{k: shape[k] for k in ("layers", "kv_heads", "head_dim")}, element_bytes=4)
handoff["bytes by formula"] = handoff["prompt_tokens"] * kv_token + 8  # the cache in float32, and the first token
handoff["same tokens as one process"] = [a == b for a, b in zip(handoff["decoded"], handoff["one_process"],
                                                                strict=True)]
handoff["link GB/s"] = handoff["bytes_sent"] / handoff["transfer_ms"] / 1e6
handoff["transfer / prefill"] = handoff["transfer_ms"] / handoff["prefill_ms"]

# %% [markdown]
# Notebook 05 measures links between GPUs. Where a stored reference run of 05 in `reference/` holds one, the table
# adds the time of the same bytes over that link.

# %%
for device, run in results.reference_runs("05_multi_gpu").items():  # notebook 05's measured links, stored
    if "allreduce_best_busbw_gb_per_s" in run.get("metrics", {}):
        link = 1e9 * run["metrics"]["allreduce_best_busbw_gb_per_s"]
        handoff[f"ms over {device}'s all-reduce"] = 1e3 * handoff["bytes_sent"] / link
if not any(c.startswith("ms over") for c in handoff.columns):
    lab.skip("moving the cache over a GPU link", "no stored reference run of notebook 05 holds its link speeds yet")
lab.table("kv_handoff", handoff.drop(columns=["decoded", "one_process"]),
          title=f"{lab.p.model_id}'s KV cache handed from a prefill process to a decode process, {job['threads']} "
          f"thread each; {job['launch_s']:.1f} s to start the job and run it")
lab.check("the_decode_process_gives_one_process_s_tokens", handoff["same tokens as one process"].all())
lab.check("the_bytes_moved_are_the_kv_cache_s_size", (handoff["bytes_sent"] == handoff["bytes by formula"]).all())

# %% [markdown]
# Where does moving start to pay? Each prompt length was measured both ways, the prefill's time and the transfer's.
# The crossover lies below the shortest length from which moving wins at every longer one.

# %%
wins = handoff["transfer_ms"] < handoff["prefill_ms"]  # moving beat recomputing at this length
losing = handoff.loc[~wins, "prompt_tokens"]
after = handoff.loc[handoff["prompt_tokens"] > (losing.max() if len(losing) else 0), "prompt_tokens"]
crossover = (f"from {after.min()} tokens" + (f", and not at {losing.max()}" if len(losing) else ", the shortest "
             "length measured") if len(after) else "at no length measured")
biggest = handoff.iloc[-1]
print(f"For {biggest['prompt_tokens']} prompt tokens the decode process received {biggest['bytes_sent'] / 2**10:.0f} "
      f"KiB in {biggest['transfer_ms']:.2f} ms ({biggest['link GB/s']:.2f} GB/s); prefilling them took "
      f"{biggest['prefill_ms']:.1f} ms. On this link, moving the cache beat recomputing it {crossover}.")
lab.check("moving_the_longest_prompt_s_cache_beats_recomputing_it", bool(wins.iloc[-1]),
          f"{biggest['transfer_ms']:.2f} ms against {biggest['prefill_ms']:.1f} ms", timing=True)
lab.metric("kv_handoff_transfer_over_prefill_longest", biggest["transfer / prefill"])

# %% [markdown]
# What was seen: the decode process gave one process's tokens from a cache it never computed. The bytes moved are the
# formula's, the same bytes for every prompt token. Prefilling costs compute for every token too. A deployment weighs
# the same two numbers: its prefill time on its GPUs, and its cache's bytes over its network. NVIDIA Dynamo's router
# decides per request whether to prefill remotely, from the prompt's length and the prefill queue (its "Architecture
# Flow" page). For short prompts the fixed costs decide: a call into the model, a message per tensor.

# %% [markdown]
# ## What you measured

# %%
measured = [
    f"Prefix caching: block sharing computed {on['prompt tokens computed']} of {on['prompt tokens sent']} prompt "
    f"tokens of a burst of {lab.p.requests} requests ({off['prompt tokens computed']} without), held at most "
    f"{on['peak KV blocks held']} KV blocks against {off['peak KV blocks held']}, and gave the first token "
    f"{faster:.1f}x sooner (p50 {on['TTFT p50 ms']:.0f} ms against {off['TTFT p50 ms']:.0f} ms).",
    f"The token budget: from {small['token budget']:.0f} to {large['token budget']:.0f} tokens a step, new "
    f"requests' first token went from {small['TTFT p50 ms']:.0f} to {large['TTFT p50 ms']:.0f} ms (p50) and "
    f"running requests' inter-token latency p99 from {small['ITL p99 ms']:.1f} to {large['ITL p99 ms']:.1f} ms.",
    f"A paged block table by hand: the gather gave back every request's keys and values exactly; gathering, then "
    f"attending, took {longest['ratio']:.1f}x the contiguous attention for {longest['tokens']} tokens.",
    f"Early-exit self-speculation on {lab.p.spec_model_id} gave greedy's tokens at exit layers {exits}; it accepted "
    + ", ".join(f"{r:.0%}" for r in spec["acceptance rate"]) + " of its proposals, where break-even needed "
    + ", ".join(f"{r:.0%}" for r in spec["break-even rate"]) + f"; the best ran at {best['speed-up vs greedy']:.2f}x "
    f"greedy's {greedy['tokens/s']:.1f} tokens/s.",
    f"Disaggregated prefill, rehearsed: a decode process gave one process's tokens from a KV cache of "
    f"{biggest['bytes_sent'] / 2**10:.0f} KiB sent over gloo in {biggest['transfer_ms']:.2f} ms, where prefilling "
    f"the {biggest['prompt_tokens']} tokens took {biggest['prefill_ms']:.1f} ms; moving beat recomputing {crossover}.",
]
lab.finish(measured)
