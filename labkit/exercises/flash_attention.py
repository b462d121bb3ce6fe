"""Exercises of notebook 01 (Flash Attention and the SDPA backends)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from labkit import attention, roofline, timing
from labkit.exercises import Exercise, Wrong, behaves_like, predict, returns_none
from labkit.probes import BACKENDS


def _fresh_qkv(n: int) -> tuple:
    """New random (q, k, v) in float64 at each check, (2, 3, n, 16): the answer must compute, not memorise."""
    fresh = torch.Generator().manual_seed(time.time_ns() % 2**31)
    return tuple(torch.randn(2, 3, n, 16, dtype=torch.float64, generator=fresh) for _ in range(3))


def my_attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ v


def _unscaled_attention(q, k, v):
    """attention without the 1/sqrt(d) scale"""
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def _softmax_over_queries(q, k, v):
    """attention whose softmax runs over the queries"""
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-2) @ v


def _one_column(q, k, v):
    """a function returning a tensor of the wrong shape"""
    return q[..., :1]


ATTENTION_MISTAKES = (
    (_unscaled_attention, "the scores need dividing by sqrt(d), the head size, before the softmax"),
    (_softmax_over_queries, "the softmax runs over the wrong axis: each query's weights over the keys (the last "
                            "axis) must sum to 1"))


def _attention_by_hand(answer, c):
    behaves_like(answer, "my_attention(q, k, v)", F.scaled_dot_product_attention,
                 [("on fresh random inputs", _fresh_qkv(17))], ATTENTION_MISTAKES,
                 none="compute the attention output and return it.")
    return "it matches scaled_dot_product_attention on fresh random inputs."


def tiled_attention(q, k, v, block):
    # walk over the keys in blocks; per query keep a running maximum m, a running sum l and an unnormalised output
    scale = q.shape[-1] ** -0.5
    m = torch.full(q.shape[:-1] + (1,), float("-inf"), dtype=q.dtype, device=q.device)
    l = torch.zeros_like(m)
    out = torch.zeros_like(q)
    for start in range(0, k.shape[-2], block):
        scores = q @ k[..., start:start + block, :].transpose(-2, -1) * scale  # (..., N, block): one tile only
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        p = torch.exp(scores - m_new)
        rescale = torch.exp(m - m_new)  # what was summed under the old maximum, brought to the new one
        l = l * rescale + p.sum(dim=-1, keepdim=True)
        out = out * rescale + p @ v[..., start:start + block, :]
        m = m_new
    return out / l


def _no_rescale(q, k, v, block):
    """tiled attention that never rescales what it summed when the running maximum grows"""
    m = torch.full(q.shape[:-1] + (1,), float("-inf"), dtype=q.dtype)
    l, out = torch.zeros_like(m), torch.zeros_like(q)
    for start in range(0, k.shape[-2], block):
        scores = q @ k[..., start:start + block, :].transpose(-2, -1) / q.shape[-1] ** 0.5
        m = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        p = torch.exp(scores - m)
        l, out = l + p.sum(dim=-1, keepdim=True), out + p @ v[..., start:start + block, :]
    return out / l


def _no_maximum(q, k, v, block):
    """tiled attention without the running maximum: exp() of the raw scores"""
    l, out = torch.zeros(q.shape[:-1] + (1,), dtype=q.dtype), torch.zeros_like(q)
    for start in range(0, k.shape[-2], block):
        p = torch.exp(q @ k[..., start:start + block, :].transpose(-2, -1) / q.shape[-1] ** 0.5)
        l, out = l + p.sum(dim=-1, keepdim=True), out + p @ v[..., start:start + block, :]
    return out / l


def _drops_last_block(q, k, v, block):
    """tiled attention whose loop stops before a last, shorter block"""
    kept = k.shape[-2] // block * block
    return tiled_attention(q, k[..., :kept, :], v[..., :kept, :], block)


def _whole_matrix(q, k, v, block):
    """attention that ignores the blocks and builds the whole N x N score matrix"""
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v


TILING_MISTAKES = (
    (_drops_last_block, "the last keys were left out: the last block may be shorter than the others"),
    (_no_rescale, "when the running maximum grows, rescale the running sum and output by exp(old max - new max) "
                  "before adding the new block"),
    (_no_maximum, "the output holds inf or nan: subtract the running maximum before exp()"))


def _tiled(answer, c):
    q, k, v = _fresh_qkv(50)  # 50 = 3 x 16 + 2: a last block shorter than the others
    behaves_like(answer, "tiled_attention(q, k, v, block)", lambda q, k, v, block: F.scaled_dot_product_attention(
        q, k, v), [("with 50 keys in blocks of 16", (q, k, v, 16)),
                   ("with large scores (exp() of them overflows)", (300 * q, k, v, 16))], TILING_MISTAKES,
                 none="walk over the key blocks, then return the output.")
    return "it matches SDPA, with a short last block and with large scores. " + _tiled_memory(answer, c["device"])


def _tiled_memory(function, device):
    """Peak extra memory of the answer and of the MATH backend, where the N x N scores dominate."""
    b, h, n, d = 1, 2, 2048, 16
    q, k, v = torch.randn(3, b, h, n, d, device=device)
    one_matrix = attention.score_matrix_bytes(b, h, n, n, "float32")
    tiled = timing.peak_extra_memory(lambda: function(q, k, v, 64), device)
    with sdpa_kernel(SDPBackend.MATH):
        math_peak = timing.peak_extra_memory(lambda: F.scaled_dot_product_attention(q, k, v), device)
    if tiled is None or math_peak is None:
        return "(peak memory cannot be measured here)"
    if tiled >= one_matrix:
        raise Wrong(f"at N={n} your function's peak extra memory is {tiled / 2**20:.1f} MiB, at least one whole "
                    f"N x N score matrix ({one_matrix / 2**20:.0f} MiB): compute the scores one key block at a time")
    return (f"At N={n}, blocks of 64 keys, its peak extra memory was {tiled / 2**20:.1f} MiB; the MATH backend's "
            f"{math_peak / 2**20:.1f} MiB; one score matrix is {one_matrix / 2**20:.0f} MiB.")


def score_matrix_mib(batch, heads, seq, dtype):
    # one score per (query, key) pair, for every head of every sequence: batch x heads x N x N elements
    return batch * heads * seq * seq * roofline.element_size(dtype) / 2**20


def _score_matrix_mistakes(mib, batch, heads, seq, dtype):
    size = roofline.element_size(dtype)
    return {"that looks like bytes: the question asks for MiB (divide by 2**20)": mib * 2**20,
            f"that is one head's matrix: each of the {heads} heads holds its own": mib / heads if heads > 1 else 0,
            f"that is one sequence's: each of the {batch} sequences in the batch holds its own":
                mib / batch if batch > 1 else 0,
            "a score for every query and every key: N x N per head, not N": mib / seq,
            f"{str(dtype).removeprefix('torch.')} takes {size} bytes per element": mib * (4 if size == 2 else 2) / size}


def backend_pytorch_picks(device, dtype):
    # only a measurement tells: run the call under the profiler and read which backend's op ran
    q, k, v = torch.randn(3, 1, 8, 256, 64, device=device, dtype=getattr(torch, dtype))  # section 2's inputs
    seen = timing.ops_that_ran(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device)
    return timing.backend_from_ops(seen.ops) or "none found"


def _pick_backend(answer, c):
    name = answer.strip().upper().removeprefix("SDPBACKEND.") if isinstance(answer, str) else ""
    if name not in BACKENDS:
        raise Wrong(f"{answer!r} is not a backend's name; use one of {', '.join(BACKENDS)}")
    ran = backend_pytorch_picks(c["device"], c["dtype"])
    if name != ran:
        raise Wrong(f"the profiler saw {ran} run here, not {name}: PyTorch tries the fused backends in its own order "
                    f"and takes the first whose conditions the inputs meet")
    return f"the profiler saw {ran} run."


EXERCISES = [
    Exercise("01.1", "Attention by hand", "code", _attention_by_hand, my_attention,
             ("Three steps: scores from queries and keys, a softmax, then a weighted sum of the values.",
              "scores = q @ k.transpose(-2, -1), scaled by 1 / sqrt(head size); softmax over the last axis; then @ v."),
             {}, (*ATTENTION_MISTAKES, (_one_column, "shape"), (returns_none, "returns None"), (3, "a function"))),
    predict("01.2", "The score matrix, predicted", score_matrix_mib, "MiB", _score_matrix_mistakes,
            ("The math backend holds one score per (query, key) pair, for every head of every sequence.",
             "Count batch x heads x N x N elements, times the bytes of one element in this dtype, then divide by "
             "2**20."),
            {"batch": 4, "heads": 16, "seq": 4096, "dtype": "float32"}),
    Exercise("01.3", "Tiled attention with an online softmax", "code", _tiled, tiled_attention,
             ("Loop over the keys in blocks of `block`. Per query keep three things: the largest score so far (m), "
              "the sum of exp(score - m) so far (l), and the sum of exp(score - m) times the values so far (out).",
              "Per block: scores = q @ k_blockᵀ / sqrt(d); m_new = max(m, the block's row maximum); p = exp(scores - "
              "m_new); l = l · exp(m - m_new) + p.sum(-1); out = out · exp(m - m_new) + p @ v_block; m = m_new. "
              "Return out / l."),
             {"device": "cpu"}, (*TILING_MISTAKES, (_whole_matrix, "whole"), (returns_none, "returns None"),
                                 (3, "a function"))),
    Exercise("01.4", "Which backend does PyTorch pick?", "predict", _pick_backend, backend_pytorch_picks,
             ("The fused backends come first when the inputs allow them: 4-D, no mask, a supported dtype and head "
              "size.",
              "Each backend has conditions (dtype, head size, masks); PyTorch runs the first in its own order whose "
              "conditions these inputs meet."),
             {"device": "cpu", "dtype": "float32"}, (("NOT_A_BACKEND", "not a backend"), (7, "backend's name"))),
]
