"""Exercises of notebook 04 (4-bit and 8-bit weights: what they save in memory and in time)."""

from __future__ import annotations

import math
import time

import torch

from labkit import footprint
from labkit.exercises import Exercise, NotAttempted, Wrong, call, predict


def nf4_mib(rows, cols, blocksize):
    # half a byte per weight, plus one float32 absmax scale per block of `blocksize` weights
    return sum(footprint.four_bit_parts(rows * cols, blocksize=blocksize)) / 2**20


def _nf4_mistakes(expected, rows, cols, blocksize):
    weights, scales = rows * cols / 2, rows * cols / blocksize * 4
    return {f"the scales count too: one float32 absmax per block of {blocksize} weights": weights / 2**20,
            "4 bits is half a byte per weight, not a byte": (rows * cols + scales) / 2**20,
            "that is the 16-bit size: 2 bytes per weight": rows * cols * 2 / 2**20,
            "that looks like bytes: the question asks for MiB (divide by 2**20)": expected * 2**20}


def int4_mib(rows, cols, group_size):
    # half a byte per weight, plus a bfloat16 scale and a bfloat16 zero point per group of `group_size` weights
    return sum(footprint.int4_weight_only_parts(rows, cols, group_size=group_size)) / 2**20


def _int4_mistakes(expected, rows, cols, group_size):
    weights, groups = rows * cols / 2, rows * cols / group_size
    return {f"the groups count too: each group of {group_size} weights keeps a scale and a zero point": weights / 2**20,
            "torchao's int4 keeps a zero point beside each scale (the levels are 0..15, shifted)":
                (weights + 2 * groups) / 2**20,
            f"the scale and the zero point are bfloat16, 2 bytes each, per group of {group_size}":
                (weights + 8 * groups) / 2**20,
            "4 bits is half a byte per weight, not a byte": (2 * weights + 4 * groups) / 2**20,
            "that is the 16-bit size: 2 bytes per weight": rows * cols * 2 / 2**20,
            "that looks like bytes: the question asks for MiB (divide by 2**20)": expected * 2**20}


def my_int8_row(row):
    # symmetric: one scale for the row, no zero point; the largest magnitude maps to the top level, 127
    scale = row.abs().max() / 127
    q = torch.round(row / scale).clamp(-128, 127).to(torch.int8)  # round to the nearest level, never truncate
    return q, scale


def _int8_row(answer, c):
    fresh = torch.Generator().manual_seed(time.time_ns() % 2**31)  # a new row each time: compute, not memorise
    row = torch.randn(256, generator=fresh)
    row[int(torch.randint(256, (1,), generator=fresh))] = -4 * float(row.abs().max())  # the largest is negative
    out = call(answer, row.clone(), what="my_int8_row(row)", none="return (q, scale).")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise Wrong("return two things: q (an int8 tensor) and scale (one number)")
    q, scale = out
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.shape != row.shape:
        raise Wrong("q must be a torch.int8 tensor with one value per weight of the row: .to(torch.int8)")
    scale = float(scale)
    error = float((q.double() * scale - row.double()).abs().max())
    largest = float(row.abs().max())
    if math.isclose(scale, float(row.max()) / 127, rel_tol=1e-3):
        raise Wrong("the scale must come from the largest magnitude, row.abs().max(): here the most negative weight "
                    "is larger than the most positive, and it was clipped")
    if math.isclose(scale, largest / 255, rel_tol=1e-3):
        raise Wrong("with scale = max|w| / 255 the largest weights need levels up to 255, beyond int8's 127: a "
                    "symmetric int8 format has 127 levels on each side of 0")
    if error > 0.5001 * scale:
        truncated = torch.trunc(row / scale).clamp(-128, 127).to(torch.int8)
        if torch.equal(q, truncated):
            raise Wrong("round to the nearest level: .to(torch.int8) alone truncates towards zero")
        raise Wrong(f"q x scale misses a weight by {error:.3g}, more than half a level ({scale / 2:.3g}): q x scale "
                    "must give the row back")
    if scale > largest / 126:
        raise Wrong(f"the scale {scale:.3g} leaves levels unused: max|w| / 127 = {largest / 127:.3g} uses them all")
    return (f"q x scale gives the row back within half a level ({error:.2g}, a level is {scale:.3g}); the scale is "
            f"max|w| / {largest / scale:.4g}. torchao divides by 127.5, half of int8's 255 steps.")


def _int8_positive_max(row):
    """the scale from the largest positive weight only"""
    scale = row.max() / 127
    return torch.round(row / scale).clamp(-128, 127).to(torch.int8), scale


def _int8_over_255(row):
    """the scale as if int8 had 255 levels on one side"""
    scale = row.abs().max() / 255
    return torch.round(row / scale).clamp(-128, 127).to(torch.int8), scale


def _int8_truncated(row):
    """the right scale, but truncation instead of rounding"""
    scale = row.abs().max() / 127
    return (row / scale).to(torch.int8), scale


def closest_format(kl):
    # the format whose next-token distributions moved least from 16-bit: the smallest measured KL divergence
    return min(kl, key=kl.get) if kl else ""


def _closest_format(answer, c):
    kl = c["kl"]  # format -> measured KL divergence against 16-bit
    if not kl:
        raise NotAttempted("no 4-bit or 8-bit format ran here, so there is nothing to compare (see the skips above).")
    name = str(answer).strip().lower()
    if name not in kl:
        raise Wrong(f"{answer!r} is not a format measured here; use one of {', '.join(kl)}")
    best = closest_format(kl)
    if kl[name] > kl[best] * 1.05:  # within 5% of the smallest is a tie at this measurement's precision
        raise Wrong(f"measured here, {best} stayed closest (KL {kl[best]:.3g} nats) and {name} moved {kl[name]:.3g}")
    tie = f" (a tie with {best}, {kl[best]:.3g})" if name != best else ""
    return f"{name} moved the next-token distributions least, {kl[name]:.3g} nats{tie}."


def break_even(flops_per_s, bytes_per_s):
    # a 16-bit weight is 2 bytes, read once per step, and costs 2 FLOPs per sequence of the batch: the step turns
    # compute-bound (fewer weight bytes stop mattering) where batch x 2 / FLOP/s = 2 bytes / (bytes/s)
    return flops_per_s * 2 / (2 * bytes_per_s)


def _break_even_mistakes(expected):
    return {"that is where the int4 step itself turns compute-bound (4x fewer bytes): its advantage starts shrinking "
            "there, and is gone only once the 16-bit step is compute-bound too": expected / 4,
            "each weight costs 2 FLOPs per sequence (a multiply and an add), not 1": 2 * expected,
            "a 16-bit weight is 2 bytes": expected / 2,
            "at batch 1 a step reads every weight for a single token: as memory-bound as decoding gets": 1.0}


EXERCISES = [
    predict("04.1", "NF4's footprint, predicted", nf4_mib, "MiB", _nf4_mistakes,
            ("Each weight takes 4 bits; each block of weights also stores one scale.",
             "rows x cols / 2 bytes of weights, plus rows x cols / blocksize float32 scales (4 bytes each)."),
            {"rows": 4096, "cols": 4096, "blocksize": 64}, rel=0.03),
    predict("04.2", "int4 weight-only with group-wise scales, predicted", int4_mib, "MiB", _int4_mistakes,
            ("Each weight takes 4 bits; each group of weights along a row also keeps a scale and a zero point.",
             "rows x cols / 2 bytes of weights, plus rows x cols / group_size groups of 2 + 2 bytes (bfloat16)."),
            {"rows": 4096, "cols": 4096, "group_size": 128}, rel=0.02),
    Exercise("04.3", "One row in int8, by hand", "code", _int8_row, my_int8_row,
             ("Symmetric int8: q = round(w / scale), with one scale for the whole row and no zero point.",
              "Pick the scale so that the largest magnitude, row.abs().max(), lands on the top level, 127; then "
              "round, clamp to [-128, 127] and convert with .to(torch.int8)."),
             {}, ((_int8_positive_max, "largest magnitude"), (_int8_over_255, "127 levels on each side"),
                  (_int8_truncated, "round to the nearest level"))),
    Exercise("04.4", "Which format stays closest to 16-bit?", "predict", _closest_format, closest_format,
             ("KL divergence measures how far each format moved the next-token distributions from 16-bit.",
              "More bits per weight keep more of each weight: compare the 8-bit formats with the 4-bit ones."),
             {"kl": {"fp4": 0.44, "nf4": 0.25, "nf4-double": 0.25, "int8": 0.017}},
             (("nf4", "stayed closest"), ("q4", "not a format"))),
    predict("04.5", "Where int4 weight-only stops helping, predicted", break_even, "sequences", _break_even_mistakes,
            ("A decode step takes max(bytes read / bandwidth, FLOPs / FLOP/s). Fewer weight bytes help only while "
             "the first term is the larger one.",
             "With 16-bit weights a batch of b sequences does 2 x b FLOPs per 2 bytes of weight: the step turns "
             "compute-bound when b = FLOP/s / (bytes/s)."),
            # the ceilings measured on an H100 in reference/nvidia-h100 (notebook 00)
            {"flops_per_s": 7.777e14, "bytes_per_s": 2.984e12}),
]
