"""Exercises of notebook 06 (from generate() to a server)."""

from __future__ import annotations

import math

import torch

from labkit import roofline
from labkit.exercises.core import Exercise, NotAttempted, Wrong, call, function_answer, predicted, returns_none

# --------------------------------------------------------------------------- 06.1 the padding a static batch wastes

def padding_waste_percent(prompt_tokens, new_tokens):
    # a static batch pads every prompt to the longest one and runs every row until the longest output is done
    positions = len(prompt_tokens) * (max(prompt_tokens) + max(new_tokens))
    return 100 * (1 - (sum(prompt_tokens) + sum(new_tokens)) / positions)


def _padding_waste(answer, c):
    prompts, news = c["prompt_tokens"], c["new_tokens"]
    expected = padding_waste_percent(prompts, news)
    rows = len(prompts)
    return predicted(answer, expected, "%", {
        "that counts the padded prompts only: every row also runs until the longest output is done, and the "
        "positions after a short request's last token hold nothing": 100 * (1 - sum(prompts) / (rows * max(prompts))),
        "that counts the outputs only: the prompts are padded to the longest one too":
            100 * (1 - sum(news) / (rows * max(news))),
        "that is the share of useful positions; the question asks for the wasted share": 100 - expected,
        "that looks like a fraction: the question asks for a percentage": expected / 100,
    }, rel=0.05)


# --------------------------------------------------------------------------- 06.2 the acceptance rate that breaks even

def break_even_acceptance(proposals, verify_cost, draft_cost):
    # one step costs verify_cost + proposals x draft_cost greedy steps and yields 1 + rate x proposals tokens:
    # it breaks even when the tokens equal the cost
    return (verify_cost + proposals * draft_cost - 1) / proposals


def _break_even(answer, c):
    k, v, d = c["proposals"], c["verify_cost"], c["draft_cost"]
    expected = break_even_acceptance(k, v, d)
    return predicted(answer, expected, "of the proposals", {
        "that leaves out the cost of proposing: the draft runs once per proposed token": (v - 1) / k,
        "that leaves out verifying: the main model's forward over all the proposals costs more than one step": d,
        "that forgets the token the main model adds at every step, accepted proposals or not": (v + k * d) / k,
        "that looks like a percentage: give the rate as a fraction of the proposals (0 to 1)": expected * 100,
    })


# --------------------------------------------------------------------------- 06.3 KV bytes per token with GQA

def kv_kib_per_token(layers, kv_heads, head_dim, bytes_per_element):
    # a key and a value vector per key/value head (GQA: fewer than the query heads), in every layer
    return roofline.kv_bytes_per_token(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                       element_bytes=bytes_per_element) / 2**10


def _kv_per_token(answer, c):
    layers, heads, kv_heads = c["layers"], c["heads"], c["kv_heads"]
    expected = kv_kib_per_token(layers, kv_heads, c["head_dim"], c["bytes_per_element"])
    return predicted(answer, expected, "KiB", {
        f"that counts the {heads} query heads; under grouped-query attention only the {kv_heads} key/value heads "
        "are cached": expected * heads / kv_heads if heads != kv_heads else 0,
        "the cache holds a key AND a value vector for each head: twice that": expected / 2,
        f"every one of the {layers} layers keeps its own keys and values": expected / layers,
        "that counts bits, not bytes, per element": expected * 8,
        "that looks like bytes: the question asks for KiB (divide by 1024)": expected * 2**10,
    })


# --------------------------------------------------------------------------- 06.4 a paged cache's block table

def gather_from_pages(pool, block_table, length):
    # token t of the sequence lies in page block_table[t // page], at row t % page of that page
    page = pool.shape[1]
    positions = torch.arange(length, device=pool.device)
    pages = torch.as_tensor(block_table, device=pool.device)[positions // page]
    return pool[pages, positions % page]


def _pool_order(pool, block_table, length):
    """reads the pool's pages in their own order, ignoring the block table"""
    return pool.flatten(0, 1)[:length]


def _swapped(pool, block_table, length):
    """takes the page from t % page and the row from t // page"""
    page, t = pool.shape[1], torch.arange(length)
    return pool[torch.as_tensor(block_table)[t % page % len(block_table)], t // page % page]


def _whole_pages(pool, block_table, length):
    """returns every row of the sequence's pages, the empty end of the last page too"""
    return pool[torch.as_tensor(block_table)].flatten(0, 1)


def paged_case(length, page, generator):
    """A sequence's contiguous cache (length x 2 heads x 4 numbers) written into a shuffled pool of pages, and its
    block table: the pool's other rows hold noise, as another request's pages would."""
    needed = math.ceil(length / page)
    pool = torch.randn(needed + 3, page, 2, 4, generator=generator)
    table = torch.randperm(needed + 3, generator=generator)[:needed].tolist()
    contiguous = torch.randn(length, 2, 4, generator=generator)
    for t in range(length):
        pool[table[t // page], t % page] = contiguous[t]
    return pool, table, contiguous


def _gather(answer, c):
    function, generator = function_answer(answer, "gather_from_pages(pool, block_table, length)"), torch.Generator()
    generator.manual_seed(0)
    for length, page in ((5, 4), (16, 4), (37, 16), (1, 16)):
        pool, table, contiguous = paged_case(length, page, generator)
        got = call(function, pool.clone(), list(table), length)
        if got is None:
            raise NotAttempted("your function returns None: return the sequence's rows, in order.")
        case = f"with {length} tokens in pages of {page}"
        if not isinstance(got, torch.Tensor) or got.shape != contiguous.shape:
            raise Wrong(f"{case}, your function returned shape {getattr(got, 'shape', type(got).__name__)}, not "
                        f"{tuple(contiguous.shape)}: cut it to the sequence's length (its last page is partly empty)")
        if not torch.equal(got, contiguous):
            if torch.equal(got, _pool_order(pool, table, length)):
                raise Wrong(f"{case}, your function read the pages in the pool's order: look each one up in the "
                            "block table")
            first = int((got != contiguous).flatten(1).any(1).nonzero()[0])
            raise Wrong(f"{case}, token {first} differs from the contiguous cache: token t lies in page "
                        "block_table[t // page size], at offset t % page size")
    return "every token came back from its page, in order, equal to the contiguous cache."


EXERCISES = [
    Exercise("06.1", "How much does a static batch waste?", "predict", _padding_waste, padding_waste_percent,
             ("A static batch pads every prompt to its longest prompt, and runs until its longest output is done.",
              "positions = rows x (longest prompt + longest output); useful = the sum of every request's prompt and "
              "output; waste = 1 - useful / positions, in %."),
             {"prompt_tokens": [12, 30, 8, 20], "new_tokens": [40, 6, 10, 4]},
             ((41.67, "padded prompts only"), (62.5, "outputs only"), (46.43, "share of useful"),
              (0.5357, "fraction"))),
    Exercise("06.2", "The acceptance rate at which a draft breaks even", "predict", _break_even,
             break_even_acceptance,
             ("Count what one speculative step costs and what it yields, both in steps of plain greedy decoding.",
              "cost = verify_cost + proposals x draft_cost; tokens = 1 + rate x proposals; solve tokens = cost."),
             {"proposals": 4, "verify_cost": 1.5, "draft_cost": 0.05},
             ((0.125, "cost of proposing"), (0.05, "leaves out verifying"), (0.425, "forgets the token"),
              (17.5, "percentage"))),
    Exercise("06.3", "KV bytes per token with grouped-query attention", "predict", _kv_per_token, kv_kib_per_token,
             ("Every layer caches a key and a value vector for each key/value head, for every token.",
              "2 (K and V) x layers x key/value heads x head size x bytes per element; then / 1024 for KiB."),
             {"layers": 32, "heads": 32, "kv_heads": 8, "head_dim": 128, "bytes_per_element": 2},
             ((512.0, "query heads"), (64.0, "key AND a value"), (4.0, "every one of the 32 layers"),
              (131072.0, "looks like bytes"))),
    Exercise("06.4", "Reading a sequence back from a paged cache", "code", _gather, gather_from_pages,
             ("The pool's pages are in no particular order; the block table lists the sequence's pages in order.",
              "Token t lies in page block_table[t // page size], at offset t % page size; index the pool with both "
              "(`pool[pages, offsets]`) for the first `length` tokens."),
             {}, ((_pool_order, "block table"), (_swapped, "t // page size"), (_whole_pages, "length"),
                  (returns_none, "returns None"))),
]
