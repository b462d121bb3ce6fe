"""Exercises with checkers, at the end of notebooks 01 to 05: predict-then-measure questions and small code tasks.

``q = exercises.get("01.1")``, then ``q.check(answer, **context)`` says whether the answer is right and, when it
is not, which mistake it looks like; ``q.hint()`` gives the next hint, ``q.solution()`` shows one. The checks test
behaviour (a function is called on fresh random inputs; a number is compared with what this machine measured or
with the exact count), never the text of the answer.

Progress: an answer that passes is recorded in a small JSON file on this machine (``progress_path()``), never sent
anywhere; ``labkit progress`` lists it. Solutions filled in by a workshop run (``labkit run --solutions``) are not
recorded.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from labkit.errors import BadParameter

CORRECT, WRONG, NOT_ATTEMPTED = "correct", "wrong", "not attempted"


class Wrong(Exception):
    """Raised by a checker: the message says which mistake the answer looks like."""


class NotAttempted(Exception):
    """Raised by a checker when the answer is still the placeholder."""


@dataclass
class Verdict:
    exercise: str
    status: str
    message: str

    def __bool__(self) -> bool:
        return self.status == CORRECT

    def __str__(self) -> str:
        mark = {CORRECT: "Correct", WRONG: "Not yet", NOT_ATTEMPTED: "Not attempted yet"}[self.status]
        return f"{self.exercise} · {mark}: {self.message}"


@dataclass
class Exercise:
    id: str                      # "01.1": notebook, then number
    title: str
    kind: str                    # "predict" or "code"
    checker: Callable[[Any, dict[str, Any]], str]   # raises Wrong / NotAttempted, or returns what was right
    solve: Callable[[dict[str, Any]], Any]          # the answer a solution gives, for this context
    solution_code: str
    hints: tuple[str, ...]
    example_context: dict[str, Any] = field(default_factory=dict)  # a context the tests (and a reader) can use
    typical_mistakes: tuple[tuple[Any, str], ...] = ()  # (answer, words its message must contain), for the tests
    _hints_shown: int = 0

    @property
    def notebook(self) -> str:
        return self.id.split(".")[0]

    def check(self, answer: Any = None, *, record: bool = True, **context: Any) -> Verdict:
        """Check ``answer``; prints the verdict and returns it (truthy when correct). Never raises on a wrong answer."""
        if answer is None or answer is Ellipsis:
            verdict = Verdict(self.id, NOT_ATTEMPTED, "write your answer in the cell above the check, then run it again.")
        else:
            try:
                verdict = Verdict(self.id, CORRECT, self.checker(answer, context) or "well done.")
            except NotAttempted as why:
                verdict = Verdict(self.id, NOT_ATTEMPTED, str(why))
            except Wrong as why:
                verdict = Verdict(self.id, WRONG, f"{why} (.hint() gives a hint)")
            except Exception as error:  # an answer the checker did not foresee: explained, never a crash
                verdict = Verdict(self.id, WRONG, f"this answer could not be checked ({type(error).__name__}: {error}); "
                                                  "see the question for what to give (.hint() gives a hint)")
        if verdict and record:
            _record(self.id)
        print(verdict)
        return verdict

    def hint(self) -> str:
        """The next hint (each call goes one level further, then repeats the last)."""
        text = self.hints[min(self._hints_shown, len(self.hints) - 1)]
        level = min(self._hints_shown, len(self.hints) - 1) + 1
        self._hints_shown += 1
        print(f"Hint {level} of {len(self.hints)}: {text}")
        return text

    def solution(self) -> str:
        """One solution, as code."""
        print(self.solution_code)
        return self.solution_code

    def solved(self, **context: Any) -> Any:
        """The answer the solution gives here (what a workshop run fills in)."""
        return self.solve(context)


# --------------------------------------------------------------------------- helpers for checkers

def _number(answer: Any) -> float:
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        raise Wrong(f"give a number, not {type(answer).__name__} {answer!r}")
    if not math.isfinite(answer):
        raise Wrong(f"{answer} is not a finite number")
    return float(answer)


def _close(value: float, expected: float, rel: float = 0.10) -> bool:
    return abs(value - expected) <= rel * abs(expected)


def _predicted(answer: Any, expected: float, unit: str, mistakes: dict[str, float], rel: float = 0.10) -> str:
    """A predicted number against the true one; ``mistakes`` maps a message to the value that mistake gives."""
    value = _number(answer)
    if _close(value, expected, rel):
        return f"{value:.4g} {unit}, and the exact value is {expected:.4g} {unit}."
    for message, wrong in mistakes.items():
        if wrong and _close(value, wrong, min(rel, 0.05)):
            raise Wrong(message)
    raise Wrong(f"{value:.4g} {unit} is {value / expected:.3g}x the right value" if expected else f"{value:.4g} is not it")


def _callable(answer: Any, what: str) -> Callable:
    if not callable(answer):
        raise Wrong(f"give {what} (a function), not {type(answer).__name__}")
    return answer


def _call(function: Callable, *args: Any) -> Any:
    try:
        return function(*args)
    except NotImplementedError:
        raise NotAttempted("your function still raises NotImplementedError: write its body, then check again.") from None
    except Exception as error:  # the learner's code: any error is an answer to explain, not a crash
        raise Wrong(f"your function raised {type(error).__name__}: {error}") from None


# --------------------------------------------------------------------------- 01 · Flash Attention

def _score_matrix(answer, c):
    from labkit.attention import score_matrix_bytes
    from labkit.roofline import element_size

    b, h, n, dtype = c["batch"], c["heads"], c["seq"], c["dtype"]
    mib = score_matrix_bytes(b, h, n, n, dtype) / 2**20
    size = element_size(dtype)
    return _predicted(answer, mib, "MiB", {
        "that looks like bytes: the question asks for MiB (divide by 2**20)": mib * 2**20,
        f"that is one head's matrix: each of the {h} heads holds its own": mib / h if h > 1 else 0,
        f"that is one sequence's: each of the {b} sequences in the batch holds its own": mib / b if b > 1 else 0,
        "a score for every query and every key: N x N per head, not N": mib / n,
        f"{str(dtype).removeprefix('torch.')} takes {size} bytes per element": mib * (4 if size == 2 else 2) / size,
    })


def _score_matrix_solution(c):
    from labkit.attention import score_matrix_bytes

    return score_matrix_bytes(c["batch"], c["heads"], c["seq"], c["seq"], c["dtype"]) / 2**20


def _attention_by_hand(answer, c):
    import torch
    import torch.nn.functional as F

    function = _callable(answer, "my_attention(q, k, v)")
    fresh = torch.Generator().manual_seed(time.time_ns() % 2**31)  # new inputs each time: compute, not memorise
    q, k, v = (torch.randn(2, 3, 17, 16, dtype=torch.float64, generator=fresh) for _ in range(3))
    out = _call(function, q, k, v)
    if out is None:
        raise NotAttempted("your function returns None: compute the attention output and return it.")
    if not isinstance(out, torch.Tensor):
        raise Wrong(f"return a tensor, not {type(out).__name__}")
    expected = F.scaled_dot_product_attention(q, k, v)
    if out.shape != expected.shape:
        raise Wrong(f"the output has shape {tuple(out.shape)}; it must be {tuple(expected.shape)}, one vector per query")
    out = out.to(torch.float64)
    if torch.allclose(out, expected, atol=1e-6):
        return "it matches scaled_dot_product_attention on fresh random inputs."
    unscaled = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
    if torch.allclose(out, unscaled, atol=1e-6):
        raise Wrong("the scores need dividing by sqrt(d), the head size, before the softmax")
    wrong_axis = torch.softmax(q @ k.transpose(-2, -1) / 16 ** 0.5, dim=-2) @ v
    if torch.allclose(out, wrong_axis, atol=1e-6):
        raise Wrong("the softmax runs over the wrong axis: each query's weights over the keys (the last axis) must sum to 1")
    raise Wrong(f"the output differs from scaled_dot_product_attention by {float((out - expected).abs().max()):.3g}")


def _attention_solution(c):
    import torch

    def my_attention(q, k, v):
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        return torch.softmax(scores, dim=-1) @ v

    return my_attention


def _backend_that_runs(c) -> tuple[str, list[str]]:
    import torch.nn.functional as F

    from labkit.attention import backend_from_ops, ops_that_ran, random_qkv

    q, k, v = random_qkv(1, 8, 1024, 64, device=c["device"], dtype=c["dtype"])
    seen = ops_that_ran(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), c["device"])
    return backend_from_ops(seen.ops) or "none found", seen.ops


def _pick_backend(answer, c):
    from labkit.probes import BACKENDS

    if not isinstance(answer, str) or not answer.strip():
        raise Wrong(f"give a backend's name, one of {', '.join(BACKENDS)}")
    name = answer.strip().upper().removeprefix("SDPBACKEND.")
    if name not in BACKENDS:
        raise Wrong(f"{answer!r} is not a backend; use one of {', '.join(BACKENDS)}")
    ran, _ = _backend_that_runs(c)
    if name != ran:
        raise Wrong(f"the profiler saw {ran} run here, not {name}: PyTorch tries the fused backends in its own order "
                    f"and takes the first whose conditions the inputs meet")
    return f"the profiler saw {ran} run."


# --------------------------------------------------------------------------- 02 · decoders and generation

def _decode_bound(answer, c):
    expected = c["bandwidth_gb_per_s"] * 1e9 / (c["parameters"] * c["bytes_per_parameter"])
    return _predicted(answer, expected, "tokens/s", {
        "that counts one byte per parameter: 16-bit weights take 2 bytes each": expected * c["bytes_per_parameter"],
        "that counts bits, not bytes, per parameter": expected / 8,
    })


def _kv_cache(answer, c):
    layers, heads, kv_heads, head_dim = c["layers"], c["heads"], c["kv_heads"], c["head_dim"]
    expected = 2 * layers * kv_heads * head_dim * c["context"] * c["batch"] * c["bytes_per_element"] / 2**20
    return _predicted(answer, expected, "MiB", {
        "the cache holds keys AND values: twice that": expected / 2,
        f"this model shares key/value heads: {kv_heads} of them, not the {heads} query heads": expected * heads / kv_heads if heads != kv_heads else 0,
        f"every one of the {layers} layers keeps its own cache": expected / layers,
        "that looks like bytes: the question asks for MiB (divide by 2**20)": expected * 2**20,
    })


def _kv_cache_solution(c):
    return 2 * c["layers"] * c["kv_heads"] * c["head_dim"] * c["context"] * c["batch"] * c["bytes_per_element"] / 2**20


def _padding_side(answer, c):
    side = str(answer).strip().lower()
    if side not in ("left", "right"):
        raise Wrong("answer 'left' or 'right'")
    if side == "right":
        raise Wrong("with right padding the pad tokens sit between a short prompt and the tokens generated after it; a "
                    "decoder continues from the last position, which would be padding")
    return "the prompts end together at the right, so every sequence continues from its own last real token."


# --------------------------------------------------------------------------- 03 · encoder fastpath

def _ideal_speedup(answer, c):
    p = c["padding_fraction"]
    expected = 1 / (1 - p)
    return _predicted(answer, expected, "x", {
        "that is the fraction of the work left, a time ratio: the speed-up is its inverse": 1 - p,
        "the fastpath does only the real tokens' work, (1 - p) of it: the speed-up is 1 / (1 - p)": 1 + p,
        "that is the padding's share relative to the real tokens, not the speed-up": p / (1 - p),
    }, rel=0.02)


def _fastpath_cases(answer, c):
    reasons = c["cases"]  # case -> labkit's reason it does not take the fastpath ("" when it does)
    if isinstance(answer, str) or not hasattr(answer, "__iter__"):
        raise Wrong("give a list or set of case names")
    chosen = {str(a) for a in answer}
    unknown = chosen - set(reasons)
    if unknown:
        raise Wrong(f"{sorted(unknown)} are not among the cases: {sorted(reasons)}")
    expected = {case for case, why in reasons.items() if not why}
    extra = chosen - expected
    if extra:
        case = sorted(extra)[0]
        raise Wrong(f"{case!r} does not skip the padding: {reasons[case]}")
    if expected - chosen:
        raise Wrong(f"{sorted(expected - chosen)[0]!r} does skip the padding too")
    return f"only {sorted(expected)} skip the padding."


def _tiny_bert_layer():
    import torch
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    config = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1)
    config._attn_implementation = "eager"
    with torch.random.fork_rng():  # the learner's own random state is left as it was
        torch.manual_seed(time.time_ns() % 2**31)
        layer = BertLayer(config).eval()
        with torch.no_grad():  # random LayerNorm weights too, so that a swapped norm shows
            for module in layer.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.normal_(1.0, 0.2)
                    module.bias.normal_(0.0, 0.2)
        x = torch.randn(2, 7, 32)
    return layer, config, x


def _convert_layer(answer, c):
    import torch

    function = _callable(answer, "my_convert_layer(bert_layer, config)")
    bert_layer, config, x = _tiny_bert_layer()
    layer = _call(function, bert_layer, config)
    if layer is None:
        raise NotAttempted("your function returns None: build the nn.TransformerEncoderLayer and return it.")
    if not isinstance(layer, torch.nn.TransformerEncoderLayer):
        raise Wrong(f"return an nn.TransformerEncoderLayer, not {type(layer).__name__}")
    if not layer.self_attn.batch_first:
        raise Wrong("BERT's tensors are (batch, length, hidden): build the layer with batch_first=True")
    if layer.norm_first:
        raise Wrong("BERT normalises after each residual sum (post-norm): norm_first=False")
    layer.eval()
    with torch.inference_mode():
        expected = bert_layer(x)
        expected = expected[0] if isinstance(expected, tuple) else expected  # a tuple in older transformers
        got = _call(layer, x)
    if got.shape != expected.shape:
        raise Wrong(f"the output has shape {tuple(got.shape)}, not {tuple(expected.shape)}")
    difference = float((got - expected).abs().max())
    if difference < 1e-4:
        return f"its output equals the BERT layer's (largest difference {difference:.1e})."
    q = bert_layer.attention.self.query.weight
    if not torch.equal(layer.self_attn.in_proj_weight[:32], q):
        raise Wrong("in_proj_weight must hold query, key and value stacked, in that order (torch.cat of the three)")
    if not (layer.activation is torch.nn.functional.gelu or isinstance(layer.activation, torch.nn.GELU)):
        raise Wrong("BERT's feed-forward uses GELU: activation='gelu'")
    if layer.norm1.eps != config.layer_norm_eps:
        raise Wrong(f"use BERT's LayerNorm epsilon, layer_norm_eps={config.layer_norm_eps}")
    raise Wrong(f"the output differs from the BERT layer's by {difference:.3g}: check each copy, the biases too "
                "(in_proj from query, key, value; out_proj from the attention's output dense; norm1 from the "
                "attention's output LayerNorm, norm2 from the feed-forward's; linear1 and linear2 from the "
                "feed-forward)")


def _convert_solution(c):
    from labkit.fastpath import _convert_layer as convert

    return convert


# --------------------------------------------------------------------------- 04 · quantization

def _nf4_footprint(answer, c):
    rows, cols, block = c["rows"], c["cols"], c["blocksize"]
    weights = rows * cols / 2
    scales = rows * cols / block * 4
    expected = (weights + scales) / 2**20
    return _predicted(answer, expected, "MiB", {
        f"the scales count too: one float32 absmax per block of {block} weights": weights / 2**20,
        "4 bits is half a byte per weight, not a byte": (rows * cols + scales) / 2**20,
        "that is the 16-bit size: 2 bytes per weight": rows * cols * 2 / 2**20,
        "that looks like bytes: the question asks for MiB (divide by 2**20)": expected * 2**20,
    }, rel=0.03)


def _bnb_config(answer, c):
    import torch

    if not hasattr(answer, "load_in_4bit") or not hasattr(answer, "bnb_4bit_quant_type"):
        raise Wrong(f"give a transformers BitsAndBytesConfig, not {type(answer).__name__}")
    if getattr(answer, "load_in_8bit", False):
        raise Wrong("load_in_8bit asks for int8 weights; NF4 is a 4-bit format: load_in_4bit=True")
    if not answer.load_in_4bit:
        raise Wrong("NF4 is a 4-bit format: load_in_4bit=True")
    if answer.bnb_4bit_quant_type != "nf4":
        raise Wrong(f"bnb_4bit_quant_type={answer.bnb_4bit_quant_type!r} is FP4's layout; NF4 is 'nf4'")
    if not answer.bnb_4bit_use_double_quant:
        raise Wrong("double quantization (bnb_4bit_use_double_quant=True) also quantizes the scales")
    if answer.bnb_4bit_compute_dtype != torch.bfloat16:
        raise Wrong(f"the compute dtype is {answer.bnb_4bit_compute_dtype}: bnb_4bit_compute_dtype=torch.bfloat16 "
                    "dequantizes each block to bfloat16 for the matrix products")
    return "NF4 weights, scales quantized again, matrix products in bfloat16."


def _bnb_solution(c):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _closest_format(answer, c):
    kl = c["kl"]  # format -> measured KL divergence against 16-bit
    if not kl:
        raise NotAttempted("no 4-bit or 8-bit format ran here, so there is nothing to compare (see the skips above).")
    name = str(answer).strip().lower()
    if name not in kl:
        raise Wrong(f"{answer!r} is not a format measured here; use one of {', '.join(kl)}")
    best = min(kl, key=kl.get)
    if kl[name] > kl[best] * 1.05:  # within 5% of the smallest is a tie at this measurement's precision
        raise Wrong(f"measured here, {best} stayed closest (KL {kl[best]:.3g} nats) and {name} moved {kl[name]:.3g}")
    tie = f" (a tie with {best}, {kl[best]:.3g})" if name != best else ""
    return f"{name} moved the next-token distributions least, {kl[name]:.3g} nats{tie}."


# --------------------------------------------------------------------------- 05 · several GPUs

def _gpus_needed(answer, c):
    from labkit.parallel import USABLE_FRACTION, devices_needed

    if isinstance(answer, bool) or not isinstance(answer, (int, float)) or not float(answer).is_integer():
        raise Wrong("give a whole number of GPUs")
    answer = int(answer)
    need, device = c["total_bytes"], c["device_bytes"]
    expected = devices_needed(need, device)
    if answer == expected:
        return f"{expected} GPUs of {device / 1e9:.0f} GB for {need / 2**30:.1f} GiB."
    if answer == math.ceil(need / device):
        raise Wrong(f"a GPU cannot give all its memory to the model: plan with {USABLE_FRACTION:.0%} of each")
    if answer == math.ceil(c["weight_bytes"] / (device * USABLE_FRACTION)):
        raise Wrong("the KV cache needs room too, beside the weights")
    raise Wrong(f"{answer} GPUs is not it")


def _gpus_solution(c):
    from labkit.parallel import devices_needed

    return devices_needed(c["total_bytes"], c["device_bytes"])


def _split(answer, c):
    function = _callable(answer, "my_split(items, rank, world_size)")
    for size in range(0, 10):
        items = list(range(100, 100 + size))
        for world in (1, 2, 3, 4):
            parts = [_call(function, items, rank, world) for rank in range(world)]
            if any(p is None for p in parts):
                raise NotAttempted("your function returns None: return the list of items for this rank.")
            given = [x for part in parts for x in part]
            missing = sorted(set(items) - set(given))
            if missing:
                raise Wrong(f"with {size} items and {world} processes, items {missing} go to no process "
                            "(the remainder of the division must go somewhere)")
            if len(given) != len(set(given)):
                raise Wrong(f"with {size} items and {world} processes, some items go to two processes")
            sizes = [len(p) for p in parts]
            if max(sizes) - min(sizes) > 1:
                raise Wrong(f"with {size} items and {world} processes the shares are {sizes}: they should differ by at most 1")
    return "every item goes to exactly one process, and the shares differ by at most one."


def _split_solution(c):
    def my_split(items, rank, world_size):
        per, extra = divmod(len(items), world_size)
        start = rank * per + min(rank, extra)
        return items[start:start + per + (rank < extra)]

    return my_split


def _bus_bandwidth(answer, c):
    size, seconds, n = c["message_bytes"], c["seconds"], c["ranks"]
    algbw = size / seconds / 1e9
    expected = algbw * 2 * (n - 1) / n
    return _predicted(answer, expected, "GB/s", {
        "that is the algorithm bandwidth (bytes / time): bus bandwidth scales it by 2(n-1)/n": algbw,
        "the factor is 2(n-1)/n, not 2(n-1)": algbw * 2 * (n - 1),
        "that looks like bytes per second: the question asks for GB/s": expected * 1e9,
    }, rel=0.02)


# --------------------------------------------------------------------------- typical wrong answers (for the tests)

def _unscaled_attention(q, k, v):
    """attention without the 1/sqrt(d) scale"""
    import torch

    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def _one_column(q, k, v):
    """a function returning a tensor of the wrong shape"""
    return q[..., :1]


def _returns_none(*args):
    """the placeholder function, still returning None"""
    return None


def _the_bert_layer_itself(layer, config):
    """a function returning the BERT layer unconverted"""
    return layer


def _floor_split(items, rank, world_size):
    """a split by len(items) // world_size that drops the remainder"""
    per = len(items) // world_size
    return items[rank * per:(rank + 1) * per]


def _everything_to_everyone(items, rank, world_size):
    """a split that gives every process every item"""
    return items


# --------------------------------------------------------------------------- the exercises

EXERCISES: dict[str, Exercise] = {e.id: e for e in [
    Exercise("01.1", "The score matrix, predicted", "predict", _score_matrix, _score_matrix_solution,
             "from labkit import attention\nanswer = attention.score_matrix_bytes(given[\"batch\"], given[\"heads\"], given[\"seq\"], given[\"seq\"],\n                                        given[\"dtype\"]) / 2**20  # batch x heads x N x N x bytes per element",
             ("The math backend holds one score per (query, key) pair, for every head of every sequence.",
              "Count batch x heads x N x N elements, times the bytes of one element in this dtype, then divide by 2**20."),
             {"batch": 4, "heads": 16, "seq": 4096, "dtype": "float32"},
             ((4096.0 * 2**20, "bytes"), (256.0, "one head"), (1024.0, "one sequence"), (1.0, "N x N"),
              (2048.0, "bytes per element"))),
    Exercise("01.2", "Attention by hand", "code", _attention_by_hand, _attention_solution,
             "def my_attention(q, k, v):\n    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5\n"
             "    return torch.softmax(scores, dim=-1) @ v",
             ("Three steps: scores from queries and keys, a softmax, then a weighted sum of the values.",
              "scores = q @ k.transpose(-2, -1), scaled by 1 / sqrt(head size); softmax over the last axis; then @ v."),
             {},
             ((_unscaled_attention, "sqrt(d)"), (_one_column, "shape"), (_returns_none, "returns None"), (3, "a function"))),
    Exercise("01.3", "Which backend does PyTorch pick?", "predict", _pick_backend,
             lambda c: _backend_that_runs(c)[0],
             "from labkit import attention\nq, k, v = attention.random_qkv(1, 8, 1024, 64, device=given[\"device\"], dtype=given[\"dtype\"])\n"
             "seen = attention.ops_that_ran(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), given[\"device\"])\n"
             "answer = attention.backend_from_ops(seen.ops)  # only a measurement tells",
             ("The table 'What ran' in this notebook shows what PyTorch chose with no sdpa_kernel around the call.",
              "The fused backends come first when the inputs allow them: 4-D, no mask, a supported dtype and head size."),
             {"device": "cpu", "dtype": "float32"},
             (("NOT_A_BACKEND", "not a backend"), (7, "backend's name"))),
    Exercise("02.1", "The decode bound", "predict", _decode_bound,
             lambda c: c["bandwidth_gb_per_s"] * 1e9 / (c["parameters"] * c["bytes_per_parameter"]),
             "answer = given[\"bandwidth_gb_per_s\"] * 1e9 / (given[\"parameters\"] * given[\"bytes_per_parameter\"])",
             ("At batch 1 every decode step reads every weight once.",
              "tokens/s <= bytes per second / bytes read per step; bytes per step = parameters x bytes per parameter."),
             {"parameters": 1.0e9, "bytes_per_parameter": 2, "bandwidth_gb_per_s": 1000.0},
             ((1000.0, "one byte"), (62.5, "bits"))),
    Exercise("02.2", "The KV cache, predicted", "predict", _kv_cache, _kv_cache_solution,
             "answer = (2 * given[\"layers\"] * given[\"kv_heads\"] * given[\"head_dim\"] * given[\"context\"] * given[\"batch\"]\n          * given[\"bytes_per_element\"] / 2**20)",
             ("Every layer keeps a key and a value vector for every token of every sequence.",
              "2 (K and V) x layers x key/value heads x head size x tokens x batch x bytes per element; then / 2**20."),
             {"layers": 16, "heads": 32, "kv_heads": 8, "head_dim": 64, "context": 4096, "batch": 1, "bytes_per_element": 2},
             ((64.0, "keys AND values"), (512.0, "shares key/value"), (8.0, "every one of the 16 layers"))),
    Exercise("02.3", "Which side to pad for batched generation?", "predict", _padding_side, lambda c: "left",
             "answer = \"left\"  # tokenizer.padding_side = \"left\" before tokenizing a batch of prompts",
             ("A decoder continues from the last position of each row.",
              "Where must each prompt's last real token sit so that the next token follows it?"),
             {}, (("right", "between a short prompt"), ("middle", "'left' or 'right'"))),
    Exercise("03.1", "The best the fastpath can do", "predict", _ideal_speedup,
             lambda c: 1 / (1 - c["padding_fraction"]),
             "answer = 1 / (1 - given[\"padding_fraction\"])",
             ("The padded model computes on every position; the fastpath only on the real tokens.",
              "With a fraction p of padding the fastpath does (1 - p) of the work: the time ratio is (1 - p)."),
             {"padding_fraction": 0.75}, ((0.25, "inverse"), (1.75, "1 / (1 - p)"), (3.0, "share"))),
    Exercise("03.2", "Which calls skip the padding?", "predict", _fastpath_cases,
             lambda c: {case for case, why in c["cases"].items() if not why},
             "answer = {case for case, why in given[\"cases\"].items() if not why}  # the cases with no reason to fall back",
             ("Section 1's table lists the cases; the fastpath has conditions on the mode, the grad state and the mask.",
              "Eval mode, inference mode (or no_grad), and a key padding mask with the padding on the right."),
             {"cases": {"eval, inference mode, right padding": "", "training mode": "the model is in training mode",
                        "left padding": "the padding is not on the right"}},
             ((["training mode"], "training mode"), ([], "does skip"), ("left padding", "list or set"))),
    Exercise("03.3", "Convert one more encoder layer", "code", _convert_layer, _convert_solution,
             "def my_convert_layer(bert_layer, config):\n"
             "    attention = bert_layer.attention\n"
             "    layer = nn.TransformerEncoderLayer(config.hidden_size, config.num_attention_heads,\n"
             "        dim_feedforward=config.intermediate_size, dropout=0.0, activation='gelu',\n"
             "        layer_norm_eps=config.layer_norm_eps, batch_first=True, norm_first=False)\n"
             "    with torch.no_grad():\n"
             "        q, k, v = attention.self.query, attention.self.key, attention.self.value\n"
             "        layer.self_attn.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))\n"
             "        layer.self_attn.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))\n"
             "        layer.self_attn.out_proj.load_state_dict(attention.output.dense.state_dict())\n"
             "        layer.norm1.load_state_dict(attention.output.LayerNorm.state_dict())\n"
             "        layer.linear1.load_state_dict(bert_layer.intermediate.dense.state_dict())\n"
             "        layer.linear2.load_state_dict(bert_layer.output.dense.state_dict())\n"
             "        layer.norm2.load_state_dict(bert_layer.output.LayerNorm.state_dict())\n"
             "    return layer",
             ("Build nn.TransformerEncoderLayer with BERT's sizes (batch_first=True, dropout=0, GELU, post-norm), then "
              "copy the weights in.",
              "The layer's in_proj_weight stacks query, key and value: torch.cat([q.weight, k.weight, v.weight]); "
              "norm1 is the attention output's LayerNorm, norm2 the feed-forward's."),
             {}, ((_returns_none, "returns None"), (_the_bert_layer_itself, "TransformerEncoderLayer"))),
    Exercise("04.1", "NF4's footprint, predicted", "predict", _nf4_footprint,
             lambda c: (c["rows"] * c["cols"] / 2 + c["rows"] * c["cols"] / c["blocksize"] * 4) / 2**20,
             "weights = given[\"rows\"] * given[\"cols\"]\nanswer = (weights / 2 + weights / given[\"blocksize\"] * 4) / 2**20  # half a byte each, plus a float32 scale per block",
             ("Each weight takes 4 bits; each block of weights also stores one scale.",
              "rows x cols / 2 bytes of weights, plus rows x cols / blocksize float32 scales (4 bytes each)."),
             {"rows": 4096, "cols": 4096, "blocksize": 64},
             ((8.0, "scales count"), (17.0, "half a byte"), (32.0, "16-bit size"))),
    Exercise("04.2", "An NF4 config, written", "code", _bnb_config, _bnb_solution,
             "my_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4',\n"
             "                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)",
             ("transformers' BitsAndBytesConfig takes the format at load time: from_pretrained(..., quantization_config=...).",
              "Four arguments: load_in_4bit, bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype."),
             {}, (("nf4", "BitsAndBytesConfig"),)),
    Exercise("04.3", "Which format stays closest to 16-bit?", "predict", _closest_format,
             lambda c: min(c["kl"], key=c["kl"].get) if c["kl"] else "",
             "answer = min(given[\"kl\"], key=given[\"kl\"].get)  # the format with the smallest measured KL divergence",
             ("KL divergence measures how far each format moved the next-token distributions from 16-bit.",
              "More bits per weight keep more of each weight: compare int8 with the 4-bit formats."),
             {"kl": {"fp4": 0.44, "nf4": 0.25, "nf4-double": 0.25, "int8": 0.017}},
             (("nf4", "stayed closest"), ("q4", "not a format"))),
    Exercise("05.1", "How many GPUs?", "predict", _gpus_needed,
             lambda c: _gpus_solution(c),
             "answer = math.ceil(given[\"total_bytes\"] / (0.9 * given[\"device_bytes\"]))  # or parallel.devices_needed(...)",
             ("Weights and the KV cache must both fit, and each GPU keeps some memory for itself.",
              "Divide the total by 90% of one GPU's memory and round up."),
             {"total_bytes": 22.5e9, "weight_bytes": 20.5e9, "device_bytes": 24e9},
             ((1, "90%"), (1.5, "whole number"), (5, "is not it"))),
    Exercise("05.2", "The data-parallel split", "code", _split, _split_solution,
             "def my_split(items, rank, world_size):\n    per, extra = divmod(len(items), world_size)\n"
             "    start = rank * per + min(rank, extra)\n    return items[start:start + per + (rank < extra)]",
             ("Each process takes one contiguous block of the prompts, as accelerate's split_between_processes does.",
              "divmod(len(items), world_size) gives the share and the remainder; the first `remainder` ranks take one more."),
             {}, ((_floor_split, "go to no process"), (_everything_to_everyone, "two processes"), (_returns_none, "returns None"))),
    Exercise("05.3", "Bus bandwidth", "predict", _bus_bandwidth,
             lambda c: c["message_bytes"] / c["seconds"] / 1e9 * 2 * (c["ranks"] - 1) / c["ranks"],
             "n = given[\"ranks\"]\nanswer = given[\"message_bytes\"] / given[\"seconds\"] / 1e9 * 2 * (n - 1) / n",
             ("nccl-tests reports two numbers: algorithm bandwidth (size / time) and bus bandwidth.",
              "For all-reduce, bus bandwidth = algorithm bandwidth x 2(n-1)/n: what each link carries."),
             {"message_bytes": 256 * 2**20, "seconds": 2e-3, "ranks": 8},
             ((134.217728, "algorithm bandwidth"), (1879.048192, "not 2(n-1)"))),
]}




def get(exercise_id: str) -> Exercise:
    """The exercise ``exercise_id`` ("01.1"), or one sentence listing them."""
    if exercise_id not in EXERCISES:
        raise BadParameter(f"no exercise {exercise_id!r}; there are {', '.join(EXERCISES)}.")
    return EXERCISES[exercise_id]


def for_notebook(notebook: str) -> list[Exercise]:
    """The exercises at the end of a notebook ("01" or "01_flash_attention")."""
    return [e for e in EXERCISES.values() if e.notebook == notebook[:2]]


# --------------------------------------------------------------------------- progress, kept on this machine

def progress_path() -> Path:
    """$LABKIT_PROGRESS, else progress.json in the user's data folder ($XDG_DATA_HOME/labkit or ~/.local/share/labkit)."""
    if os.environ.get("LABKIT_PROGRESS"):
        return Path(os.environ["LABKIT_PROGRESS"])
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "labkit" / "progress.json"


def _load() -> dict[str, str]:
    try:
        data = json.loads(progress_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.get("done", {}).items() if isinstance(k, str) and isinstance(v, str)} \
        if isinstance(data, dict) else {}


def _record(exercise_id: str) -> None:
    done = _load()
    done.setdefault(exercise_id, time.strftime("%Y-%m-%d %H:%M"))
    path = progress_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"done": done}, indent=2))
    except OSError:  # a read-only home must not break a notebook
        pass


def progress() -> list[dict[str, str]]:
    """Every exercise, with when it was first answered correctly on this machine."""
    done = _load()
    return [{"exercise": e.id, "title": e.title, "kind": e.kind, "done": done.get(e.id, "")} for e in EXERCISES.values()]


def mistakes_markdown() -> str:
    """The typical mistakes of every exercise with the message its checker gives (WORKSHOP.md lists them)."""
    import contextlib
    import io

    lines = []
    for e in EXERCISES.values():
        for answer, _ in e.typical_mistakes:
            with contextlib.redirect_stdout(io.StringIO()):
                verdict = e.check(answer, record=False, **e.example_context)
            shown = (answer.__doc__ or "a function") if callable(answer) else repr(answer)
            message = verdict.message.removesuffix(" (.hint() gives a hint)")
            lines.append(f"- **{e.id}** {e.title}, answer {shown}: {message}")
    return "\n".join(lines)


def summary(verdicts: list[Verdict]) -> dict[str, int]:
    """Counts of a notebook's verdicts: correct, wrong, not attempted."""
    return {status: sum(v.status == status for v in verdicts) for status in (CORRECT, WRONG, NOT_ATTEMPTED)}
