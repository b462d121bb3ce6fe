"""Exercises of notebook 01 (Flash Attention and the SDPA backends)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from labkit import attention, roofline, timing
from labkit.exercises.core import Exercise, NotAttempted, Wrong, call, function_answer, predicted, returns_none
from labkit.probes import BACKENDS


def my_attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ v


def _attention_by_hand(answer, c):
    function = function_answer(answer, "my_attention(q, k, v)")
    fresh = torch.Generator().manual_seed(time.time_ns() % 2**31)  # new inputs each time: compute, not memorise
    q, k, v = (torch.randn(2, 3, 17, 16, dtype=torch.float64, generator=fresh) for _ in range(3))
    out = call(function, q, k, v)
    if out is None:
        raise NotAttempted("your function returns None: compute the attention output and return it.")
    if not isinstance(out, torch.Tensor):
        raise Wrong(f"return a tensor, not {type(out).__name__}")
    expected = F.scaled_dot_product_attention(q, k, v)
    if out.shape != expected.shape:
        raise Wrong(f"the output has shape {tuple(out.shape)}; it must be {tuple(expected.shape)}, "
                    "one vector per query")
    out = out.to(torch.float64)
    if torch.allclose(out, expected, atol=1e-6):
        return "it matches scaled_dot_product_attention on fresh random inputs."
    if torch.allclose(out, _unscaled_attention(q, k, v), atol=1e-6):
        raise Wrong("the scores need dividing by sqrt(d), the head size, before the softmax")
    wrong_axis = torch.softmax(q @ k.transpose(-2, -1) / 16 ** 0.5, dim=-2) @ v
    if torch.allclose(out, wrong_axis, atol=1e-6):
        raise Wrong("the softmax runs over the wrong axis: each query's weights over the keys (the last axis) "
                    "must sum to 1")
    raise Wrong(f"the output differs from scaled_dot_product_attention by {float((out - expected).abs().max()):.3g}")


def _unscaled_attention(q, k, v):
    """attention without the 1/sqrt(d) scale"""
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def _one_column(q, k, v):
    """a function returning a tensor of the wrong shape"""
    return q[..., :1]


def score_matrix_mib(batch, heads, seq, dtype):
    # one score per (query, key) pair, for every head of every sequence: batch x heads x N x N elements
    return attention.score_matrix_bytes(batch, heads, seq, seq, dtype) / 2**20


def _score_matrix(answer, c):
    b, h, n, dtype = c["batch"], c["heads"], c["seq"], c["dtype"]
    mib = score_matrix_mib(b, h, n, dtype)
    size = roofline.element_size(dtype)
    return predicted(answer, mib, "MiB", {
        "that looks like bytes: the question asks for MiB (divide by 2**20)": mib * 2**20,
        f"that is one head's matrix: each of the {h} heads holds its own": mib / h if h > 1 else 0,
        f"that is one sequence's: each of the {b} sequences in the batch holds its own": mib / b if b > 1 else 0,
        "a score for every query and every key: N x N per head, not N": mib / n,
        f"{str(dtype).removeprefix('torch.')} takes {size} bytes per element": mib * (4 if size == 2 else 2) / size,
    })


def backend_pytorch_picks(device, dtype):
    # only a measurement tells: run the call under the profiler and read which backend's op ran
    q, k, v = torch.randn(3, 1, 8, 256, 64, device=device, dtype=getattr(torch, dtype))  # section 2's inputs
    seen = timing.ops_that_ran(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device)
    return timing.backend_from_ops(seen.ops) or "none found"


def _pick_backend(answer, c):
    if not isinstance(answer, str) or not answer.strip():
        raise Wrong(f"give a backend's name, one of {', '.join(BACKENDS)}")
    name = answer.strip().upper().removeprefix("SDPBACKEND.")
    if name not in BACKENDS:
        raise Wrong(f"{answer!r} is not a backend; use one of {', '.join(BACKENDS)}")
    ran = backend_pytorch_picks(c["device"], c["dtype"])
    if name != ran:
        raise Wrong(f"the profiler saw {ran} run here, not {name}: PyTorch tries the fused backends in its own order "
                    f"and takes the first whose conditions the inputs meet")
    return f"the profiler saw {ran} run."


EXERCISES = [
    Exercise("01.1", "Attention by hand", "code", _attention_by_hand, my_attention,
             ("Three steps: scores from queries and keys, a softmax, then a weighted sum of the values.",
              "scores = q @ k.transpose(-2, -1), scaled by 1 / sqrt(head size); softmax over the last axis; then @ v."),
             {},
             ((_unscaled_attention, "sqrt(d)"), (_one_column, "shape"), (returns_none, "returns None"),
              (3, "a function"))),
    Exercise("01.2", "The score matrix, predicted", "predict", _score_matrix, score_matrix_mib,
             ("The math backend holds one score per (query, key) pair, for every head of every sequence.",
              "Count batch x heads x N x N elements, times the bytes of one element in this dtype, then divide by "
              "2**20."),
             {"batch": 4, "heads": 16, "seq": 4096, "dtype": "float32"},
             ((4096.0 * 2**20, "bytes"), (256.0, "one head"), (1024.0, "one sequence"), (1.0, "N x N"),
              (2048.0, "bytes per element"))),
    Exercise("01.3", "Which backend does PyTorch pick?", "predict", _pick_backend, backend_pytorch_picks,
             ("The fused backends come first when the inputs allow them: 4-D, no mask, a supported dtype and head "
              "size.",
              "Each backend has conditions (dtype, head size, masks); PyTorch runs the first in its own order whose "
              "conditions these inputs meet."),
             {"device": "cpu", "dtype": "float32"},
             (("NOT_A_BACKEND", "not a backend"), (7, "backend's name"))),
]
