"""Exercises of notebook 06 (from generate() to a server)."""

from __future__ import annotations

import math

import torch

from labkit import roofline
from labkit.exercises import Exercise, behaves_like, predict, returns_none

# --------------------------------------------------------------------------- 06.1 the padding a static batch wastes

def padding_waste_percent(prompt_tokens, new_tokens):
    # a static batch pads every prompt to the longest one and runs every row until the longest output is done
    positions = len(prompt_tokens) * (max(prompt_tokens) + max(new_tokens))
    return 100 * (1 - (sum(prompt_tokens) + sum(new_tokens)) / positions)


def _padding_waste_mistakes(expected, prompt_tokens, new_tokens):
    rows = len(prompt_tokens)
    return {"that counts the padded prompts only: every row also runs until the longest output is done, and the "
            "positions after a short request's last token hold nothing":
                100 * (1 - sum(prompt_tokens) / (rows * max(prompt_tokens))),
            "that counts the outputs only: the prompts are padded to the longest one too":
                100 * (1 - sum(new_tokens) / (rows * max(new_tokens))),
            "that is the share of useful positions; the question asks for the wasted share": 100 - expected,
            "that looks like a fraction: the question asks for a percentage": expected / 100}


# --------------------------------------------------------------------------- 06.2 the acceptance rate that breaks even

def break_even_acceptance(proposals, verify_cost, draft_cost):
    # one step costs verify_cost + proposals x draft_cost greedy steps and yields 1 + rate x proposals tokens:
    # it breaks even when the tokens equal the cost
    return (verify_cost + proposals * draft_cost - 1) / proposals


def _break_even_mistakes(expected, proposals, verify_cost, draft_cost):
    return {"that leaves out the cost of proposing: the draft runs once per proposed token":
                (verify_cost - 1) / proposals,
            "that leaves out verifying: the main model's forward over all the proposals costs more than one step":
                draft_cost,
            "that forgets the token the main model adds at every step, accepted proposals or not":
                (verify_cost + proposals * draft_cost) / proposals,
            "that looks like a percentage: give the rate as a fraction of the proposals (0 to 1)": expected * 100}


# --------------------------------------------------------------------------- 06.3 KV bytes per token with GQA

def kv_kib_per_token(layers, kv_heads, head_dim, bytes_per_element):
    # a key and a value vector per key/value head (GQA: fewer than the query heads), in every layer
    return roofline.kv_bytes_per_token(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                       element_bytes=bytes_per_element) / 2**10


def _kv_per_token_mistakes(expected, layers, heads, kv_heads):
    return {f"that counts the {heads} query heads; under grouped-query attention only the {kv_heads} key/value heads "
            "are cached": expected * heads / kv_heads if heads != kv_heads else 0,
            "the cache holds a key AND a value vector for each head: twice that": expected / 2,
            f"every one of the {layers} layers keeps its own keys and values": expected / layers,
            "that counts bits, not bytes, per element": expected * 8,
            "that looks like bytes: the question asks for KiB (divide by 1024)": expected * 2**10}


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


GATHER_MISTAKES = ((_pool_order, "your function read the pages in the pool's order: look each one up in the "
                                 "block table"),
                   (_whole_pages, "cut it to the sequence's length (its last page is partly empty)"))


def paged_cases(seed: int, *, written: bool) -> list[tuple[str, tuple]]:
    """Sequences of a few lengths and page sizes, each a shuffled pool of pages holding noise (as other requests'
    pages would), its block table and its rows (length x 2 heads x 4 numbers); ``written``: the rows are in the
    pool already."""
    generator, cases = torch.Generator().manual_seed(seed), []
    for length, page in ((5, 4), (16, 4), (37, 16), (1, 16)):
        needed = math.ceil(length / page)
        pool = torch.randn(needed + 3, page, 2, 4, generator=generator)
        table = torch.randperm(needed + 3, generator=generator)[:needed].tolist()
        rows = torch.randn(length, 2, 4, generator=generator)
        for t in range(length if written else 0):
            pool[table[t // page], t % page] = rows[t]
        cases.append((f"with {length} tokens in pages of {page}", (pool, table, rows)))
    return cases


def _gather(answer, c):
    behaves_like(answer, "gather_from_pages(pool, block_table, length)", gather_from_pages,
                 [(case, (pool, table, len(rows))) for case, (pool, table, rows) in paged_cases(0, written=True)],
                 GATHER_MISTAKES, none="return the sequence's rows, in order.",
                 otherwise="a token differs from the contiguous cache: token t lies in page block_table[t // page "
                           "size], at offset t % page size")
    return "every token came back from its page, in order, equal to the contiguous cache."


EXERCISES = [
    predict("06.1", "How much does a static batch waste?", padding_waste_percent, "%", _padding_waste_mistakes,
            ("A static batch pads every prompt to its longest prompt, and runs until its longest output is done.",
             "positions = rows x (longest prompt + longest output); useful = the sum of every request's prompt and "
             "output; waste = 1 - useful / positions, in %."),
            {"prompt_tokens": [12, 30, 8, 20], "new_tokens": [40, 6, 10, 4]}, rel=0.05),
    predict("06.2", "The acceptance rate at which a draft breaks even", break_even_acceptance, "of the proposals",
            _break_even_mistakes,
            ("Count what one speculative step costs and what it yields, both in steps of plain greedy decoding.",
             "cost = verify_cost + proposals x draft_cost; tokens = 1 + rate x proposals; solve tokens = cost."),
            {"proposals": 4, "verify_cost": 1.5, "draft_cost": 0.05}),
    predict("06.3", "KV bytes per token with grouped-query attention", kv_kib_per_token, "KiB",
            _kv_per_token_mistakes,
            ("Every layer caches a key and a value vector for each key/value head, for every token.",
             "2 (K and V) x layers x key/value heads x head size x bytes per element; then / 1024 for KiB."),
            {"layers": 32, "heads": 32, "kv_heads": 8, "head_dim": 128, "bytes_per_element": 2}),
    Exercise("06.4", "Reading a sequence back from a paged cache", "code", _gather, gather_from_pages,
             ("The pool's pages are in no particular order; the block table lists the sequence's pages in order.",
              "Token t lies in page block_table[t // page size], at offset t % page size; index the pool with both "
              "(`pool[pages, offsets]`) for the first `length` tokens."),
             {}, (*GATHER_MISTAKES, (_swapped, "t // page size"), (returns_none, "returns None"))),
]
