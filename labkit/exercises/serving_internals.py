"""Exercises of notebook 07 (what a server tunes)."""

from __future__ import annotations

import math

import torch

from labkit.exercises import Exercise, behaves_like, predict, returns_none
from labkit.exercises.serving import paged_cases

# --------------------------------------------------------------------------- 07.1 the prompt tokens block sharing saves

def prompt_tokens_with_sharing(shared_tokens, own_tokens, page_size, requests):
    # the shared prompt's full pages are found by hash; the rest of its last page and the request's own tokens are
    # computed (transformers 5.25: match_prefix_blocks matches whole pages only)
    shared_pages = shared_tokens // page_size
    return requests * (shared_tokens + own_tokens - shared_pages * page_size)


def _prompt_tokens_mistakes(expected, shared_tokens, own_tokens, page_size, requests):
    shared, page, n = shared_tokens, page_size, requests
    return {f"that counts only the questions: the shared prompt's last page is not full ({shared} = "
            f"{shared // page} x {page} + {shared % page}), and only full pages are shared": n * own_tokens,
            "that is what the burst computes without sharing: the shared prompt's full pages are in the cache "
            "already": n * (shared + own_tokens),
            f"that is one request's share: the burst has {n} requests": expected / n,
            "that counts the shared prompt once more, but an earlier request computed it before the burst":
                expected + shared}


# --------------------------------------------------------------------------- 07.2 the KV blocks a shared prefix holds

def blocks_held_with_sharing(shared_tokens, own_tokens, new_tokens, page_size, requests):
    # the shared prompt's full pages once; each request's own pages for the rest of its tokens. At the last step a
    # request has cached its prompt and every new token but the last (sampled, never fed back)
    shared_pages = shared_tokens // page_size
    own_pages = math.ceil((shared_tokens + own_tokens + new_tokens - 1) / page_size) - shared_pages
    return shared_pages + requests * own_pages


def _blocks_held_mistakes(expected, shared_tokens, own_tokens, new_tokens, page_size, requests):
    every = math.ceil((shared_tokens + own_tokens + new_tokens - 1) / page_size)  # one request's pages, all its own
    return {f"that is the burst without sharing: each request would hold all its {every} pages": requests * every,
            "that leaves out the shared pages: they stay in the cache, held once":
                expected - shared_tokens // page_size,
            f"that is one request's pages: the burst has {requests} requests": every}


# --------------------------------------------------------------------------- 07.3 writing a request into its pages

def write_to_pages(pool, block_table, rows):
    # row t of the request goes to page block_table[t // page], at offset t % page; the rest of the pool is untouched
    page = pool.shape[1]
    positions = torch.arange(len(rows), device=pool.device)
    pages = torch.as_tensor(block_table, device=pool.device)[positions // page]
    pool[pages, positions % page] = rows
    return pool


def _in_pool_order(pool, block_table, rows):
    """writes the rows into the pool's first pages, ignoring the block table"""
    pool.flatten(0, 1)[:len(rows)] = rows
    return pool


def _one_page_per_row(pool, block_table, rows):
    """writes row t to page block_table[t], not block_table[t // page]"""
    for t in range(min(len(rows), len(block_table))):
        pool[block_table[t], 0] = rows[t]
    return pool


def _new_pool(pool, block_table, rows):
    """builds a new pool holding only this request, zeros elsewhere"""
    fresh = torch.zeros_like(pool)
    return write_to_pages(fresh, block_table, rows)


WRITE_MISTAKES = ((_in_pool_order, "the rows went into the pool's first pages: look each page up in the block table"),
                  (_new_pool, "the other requests' pages were wiped: write into the pool you were given"))


def _write(answer, c):
    behaves_like(answer, "write_to_pages(pool, block_table, rows)", write_to_pages, paged_cases(1, written=False),
                 WRITE_MISTAKES, none="write the rows into the pool, then return the pool.",
                 otherwise="the pool differs from the one expected: row t goes to page block_table[t // page size], "
                           "at offset t % page size, and nothing else changes")
    return "every row went to its page and offset, and the other requests' pages were left as they were."


# --------------------------------------------------------------------------- 07.4 what an early exit must get right

def exit_break_even(exit_layer, layers, layer_mib, head_mib):
    # if a step's time is the weight bytes it reads: a proposal reads the first exit_layer layers and the LM head, a
    # check reads the whole model once. 06.2's formula with a check of one step leaves the draft's cost:
    # (1 + proposals x draft_cost - 1) / proposals = draft_cost
    return (exit_layer * layer_mib + head_mib) / (layers * layer_mib + head_mib)


def _exit_break_even_mistakes(expected, exit_layer, layers, layer_mib, head_mib):
    return {f"that leaves out the LM head: every proposal ends with it, and it is {head_mib / layer_mib:.0f} layers' "
            "worth of bytes": exit_layer / layers,
            "that counts only the LM head: the proposal also runs the first layers":
                head_mib / (layers * layer_mib + head_mib),
            "that is the share of the bytes the draft skips, not the share it reads": 1 - expected,
            "that looks like a percentage: give the rate as a fraction of the proposals (0 to 1)": expected * 100}


EXERCISES = [
    predict("07.1", "The prompt tokens a burst computes with block sharing", prompt_tokens_with_sharing, "tokens",
            _prompt_tokens_mistakes,
            ("Only full pages of the shared prompt can be shared; the cache found them by their tokens' hash.",
             "per request: shared + own - page size x (shared // page size); then times the requests."),
            {"shared_tokens": 250, "own_tokens": 8, "page_size": 16, "requests": 6}),
    predict("07.2", "The KV blocks a burst holds with a shared prefix", blocks_held_with_sharing, "blocks",
            _blocks_held_mistakes,
            ("The shared prompt's full pages are held once, however many requests point at them.",
             "shared pages = shared // page size; each request: ceil((shared + own + new - 1) / page size) pages, "
             "minus the shared ones; the last new token is sampled, never cached."),
            {"shared_tokens": 250, "own_tokens": 8, "new_tokens": 4, "page_size": 16, "requests": 6}, rel=0.02),
    Exercise("07.3", "Writing a request's keys into its pages", "code", _write, write_to_pages,
             ("The block table lists the request's pages in order; the pool's pages are in no order.",
              "Row t goes to page block_table[t // page size], at offset t % page size: "
              "`pool[pages, offsets] = rows`, then return the pool."),
             {}, (*WRITE_MISTAKES, (_one_page_per_row, "differs"), (returns_none, "returns None"))),
    predict("07.4", "The acceptance an early exit needs to break even", exit_break_even, "of the proposals",
            _exit_break_even_mistakes,
            ("Decode at batch 1 reads every weight once per step: count a proposal's bytes against a step's.",
             "draft_cost = (exit layer x layer MiB + head MiB) / (layers x layer MiB + head MiB); with a check of "
             "one step, 06.2's break-even (1 + proposals x draft_cost - 1) / proposals is draft_cost itself."),
            {"exit_layer": 15, "layers": 30, "layer_mib": 13.5, "head_mib": 108.0}),
]
