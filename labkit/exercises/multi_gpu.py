"""Exercises of notebook 05 (inference on several GPUs)."""

from __future__ import annotations

import math

from labkit import parallel
from labkit.exercises.core import Exercise, NotAttempted, Wrong, call, function_answer, predicted, returns_none

# --------------------------------------------------------------------------- 05.1 how many GPUs

def gpus_needed(total_bytes, device_bytes):
    # weights and KV cache must fit in the usable part of each GPU (labkit plans with 90%), rounded up
    return parallel.devices_needed(total_bytes, device_bytes)


def _gpus_needed(answer, c):
    if isinstance(answer, bool) or not isinstance(answer, (int, float)) or not float(answer).is_integer():
        raise Wrong("give a whole number of GPUs")
    answer = int(answer)
    need, device = c["total_bytes"], c["device_bytes"]
    expected = gpus_needed(need, device)
    if answer == expected:
        return f"{expected} GPUs of {device / 1e9:.0f} GB for {need / 2**30:.1f} GiB."
    if answer == math.ceil(need / device):
        raise Wrong(f"a GPU cannot give all its memory to the model: plan with {parallel.USABLE_FRACTION:.0%} of each")
    if answer == math.ceil(c["weight_bytes"] / (device * parallel.USABLE_FRACTION)):
        raise Wrong("the KV cache needs room too, beside the weights")
    raise Wrong(f"{answer} GPUs is not it")


# --------------------------------------------------------------------------- 05.2 the data-parallel split

def my_split(items, rank, world_size):
    per, extra = divmod(len(items), world_size)
    start = rank * per + min(rank, extra)
    return items[start:start + per + (rank < extra)]


def _split(answer, c):
    function = function_answer(answer, "my_split(items, rank, world_size)")
    for size in range(0, 10):
        items = list(range(100, 100 + size))
        for world in (1, 2, 3, 4):
            parts = [call(function, items, rank, world) for rank in range(world)]
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
                raise Wrong(f"with {size} items and {world} processes the shares are {sizes}: they should differ "
                            "by at most 1")
    return "every item goes to exactly one process, and the shares differ by at most one."


def _floor_split(items, rank, world_size):
    """a split by len(items) // world_size that drops the remainder"""
    per = len(items) // world_size
    return items[rank * per:(rank + 1) * per]


def _everything_to_everyone(items, rank, world_size):
    """a split that gives every process every item"""
    return items


# --------------------------------------------------------------------------- 05.3 bus bandwidth

def bus_bandwidth_gb_per_s(message_bytes, seconds, ranks):
    # nccl-tests' bus bandwidth: the algorithm bandwidth (size / time) times 2(n-1)/n for all-reduce
    return parallel.bus_bandwidth(message_bytes, seconds, ranks)["busbw_bytes_per_s"] / 1e9


def _bus_bandwidth(answer, c):
    size, seconds, n = c["message_bytes"], c["seconds"], c["ranks"]
    algbw = size / seconds / 1e9
    expected = bus_bandwidth_gb_per_s(size, seconds, n)
    return predicted(answer, expected, "GB/s", {
        "that is the algorithm bandwidth (bytes / time): bus bandwidth scales it by 2(n-1)/n": algbw,
        "the factor is 2(n-1)/n, not 2(n-1)": algbw * 2 * (n - 1),
        "that looks like bytes per second: the question asks for GB/s": expected * 1e9,
    }, rel=0.02)


EXERCISES = [
    Exercise("05.1", "How many GPUs?", "predict", _gpus_needed, gpus_needed,
             ("Weights and the KV cache must both fit, and each GPU keeps some memory for itself.",
              "Divide the total by 90% of one GPU's memory and round up."),
             {"total_bytes": 22.5e9, "weight_bytes": 20.5e9, "device_bytes": 24e9},
             ((1, "90%"), (1.5, "whole number"), (5, "is not it"))),
    Exercise("05.2", "The data-parallel split", "code", _split, my_split,
             ("Each process takes one contiguous block of the prompts, as accelerate's split_between_processes does.",
              "divmod(len(items), world_size) gives the share and the remainder; the first `remainder` ranks take "
              "one more."),
             {}, ((_floor_split, "go to no process"), (_everything_to_everyone, "two processes"),
                  (returns_none, "returns None")),
             answer_is_function=True),
    Exercise("05.3", "Bus bandwidth", "predict", _bus_bandwidth, bus_bandwidth_gb_per_s,
             ("nccl-tests reports two numbers: algorithm bandwidth (size / time) and bus bandwidth.",
              "For all-reduce, bus bandwidth = algorithm bandwidth x 2(n-1)/n: what each link carries."),
             {"message_bytes": 256 * 2**20, "seconds": 2e-3, "ranks": 8},
             ((134.217728, "algorithm bandwidth"), (1879.048192, "not 2(n-1)"))),
]
