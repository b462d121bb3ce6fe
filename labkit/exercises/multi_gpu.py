"""Exercises of notebook 05 (inference on several GPUs)."""

import math

from labkit import footprint, models, roofline
from labkit.exercises import Exercise, Wrong, predict

USABLE = footprint.USABLE_FRACTION


def gpus_needed(total_bytes, device_bytes):
    # weights and KV cache must fit in the usable part of each GPU (labkit plans with 90%), rounded up
    return footprint.devices_needed(total_bytes, device_bytes)


def _gpus_needed(answer, c):
    if isinstance(answer, bool) or not isinstance(answer, (int, float)) or not float(answer).is_integer():
        raise Wrong("give a whole number of GPUs")
    need, device = c["total_bytes"], c["device_bytes"]
    if answer == gpus_needed(need, device):
        return f"{int(answer)} GPUs of {device / 2**30:.0f} GiB for {need / 2**30:.1f} GiB."
    if answer == footprint.devices_needed(need, device, usable=1.0):
        raise Wrong(f"a GPU cannot give all its memory to the model: plan with {USABLE:.0%} of each")
    if answer == footprint.devices_needed(c["weight_bytes"], device):
        raise Wrong("the KV cache needs room too, beside the weights")
    raise Wrong(f"{int(answer)} GPUs is not it")


def kv_cache_kib_per_rank(layers, kv_heads, head_dim, tp, batch, tokens, element_bytes):
    # GQA: the cache holds the key/value heads only, and tensor parallelism gives each rank kv_heads / tp of them
    per_token = roofline.kv_bytes_per_token(layers=layers, kv_heads=kv_heads // tp, head_dim=head_dim,
                                            element_bytes=element_bytes)
    return batch * tokens * per_token / 1024


def _kv_per_rank_mistakes(expected, heads, kv_heads, tp):  # two of them can give the same number: both are named
    return {f"that is the whole cache: each of the {tp} ranks holds only its share of the key/value heads":
                expected * tp,
            f"that counts the {heads} query heads: under GQA the cache holds only the {kv_heads} key/value heads":
                expected * heads / kv_heads,
            "the cache holds a key AND a value per head and token: twice that": expected / 2,
            "that looks like bytes: the question asks for KiB (divide by 1024)": expected * 1024}


def layout_for_budget(layouts, budget_ms):
    # a latency budget is per user: keep the layouts whose time per token meets it, then take the most tokens/s
    meets = {name: m["tokens_per_s"] for name, m in layouts.items() if m["ms_per_token"] <= budget_ms}
    return max(meets, key=meets.get) if meets else "none"


def _budget(answer, c):
    layouts, budget = c["layouts"], c["budget_ms"]
    expected, names = layout_for_budget(layouts, budget), (*layouts, "none")
    if not isinstance(answer, str) or answer not in names:
        raise Wrong(f"give one of {', '.join(map(repr, names))}")
    if answer == expected:
        return (f"{answer!r}: it meets the {budget:.3g} ms per token, and makes the most tokens/s of the layouts "
                "that do." if expected != "none" else f"no layout gives a token within {budget:.3g} ms.")
    chosen = layouts.get(answer)
    if chosen and chosen["ms_per_token"] > budget:
        raise Wrong(f"{answer!r} makes each user wait {chosen['ms_per_token']:.3g} ms per token, over the budget of "
                    f"{budget:.3g} ms: tokens/s counts every user together; a latency budget is what one user sees")
    if chosen:
        raise Wrong(f"{answer!r} meets the budget, but {expected!r} meets it too and makes more tokens/s")
    raise Wrong(f"{expected!r} makes each user wait {layouts[expected]['ms_per_token']:.3g} ms per token, within the "
                "budget")


def layout_for(model, machine, fmt, batch, context):
    # the smallest TP inside a node that divides the heads (each rank holds whole heads) and holds the model at 90%
    # of each GPU; if none does, TP over the whole node and as few pipeline stages as hold it
    model, machine = models.empty_model(model), footprint.parse_machine(machine)
    need = footprint.memory_needed(model, fmt=fmt, batch=batch, context=context)["total"]
    gpu = min(d["bytes"] for d in machine["devices"]) * footprint.USABLE_FRACTION
    heads = (model.config.num_attention_heads, model.config.num_key_value_heads)
    sizes = [t for t in range(1, machine["per_node"] + 1) if all(h % t == 0 for h in heads)]
    tp = next((t for t in sizes if need / t <= gpu), sizes[-1])
    return (tp, math.ceil(need / (tp * gpu)))


def _layout(answer, c):
    if not isinstance(answer, (tuple, list)) or len(answer) != 2 or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in answer):
        raise Wrong("give the layout as (tp, pp): two whole numbers of at least 1")
    (tp, pp), expected = answer, layout_for(**c)
    model, machine = models.empty_model(c["model"]), footprint.parse_machine(c["machine"])
    need = footprint.memory_needed(model, fmt=c["fmt"], batch=c["batch"], context=c["context"])["total"]
    gpu, node, gpus = min(d["bytes"] for d in machine["devices"]) * USABLE, machine["per_node"], len(machine["devices"])
    kv_heads = model.config.num_key_value_heads
    if (tp, pp) == expected:
        return (f"TP {tp} x PP {pp}: {tp * pp} GPUs, {gpu / 2**30:,.0f} GiB usable on each, hold its "
                f"{need / 2**30:,.0f} GiB, with TP inside a node of {node}.")
    if tp > node:
        raise Wrong(f"TP {tp} spans more than one node of {node} GPUs: its two all-reduces per layer would cross the "
                    "network at every token; keep TP inside a node, stages across nodes")
    if kv_heads % tp:
        raise Wrong(f"TP {tp} does not divide the {kv_heads} key/value heads: transformers' TP gives each "
                    "process whole heads")
    if tp * pp > gpus:
        raise Wrong(f"that is {tp * pp} GPUs; the machine has {gpus}")
    if need / (tp * pp) > gpu:
        raise Wrong(f"each GPU would hold {need / (tp * pp) / 2**30:,.0f} GiB, more than the {gpu / 2**30:,.0f} GiB "
                    f"one GPU can give at {USABLE:.0%}: it does not fit")
    if pp > expected[1]:
        raise Wrong("that holds the model, with more pipeline stages than needed: each stage adds a hop per step "
                    "and idles while the others work; give TP the whole node first")
    raise Wrong("that holds the model, but not with the smallest TP inside a node: the GPUs it leaves free would "
                "serve more copies of the model")


def bus_bandwidth_gb_per_s(message_bytes, seconds, ranks):
    # nccl-tests' bus bandwidth: the algorithm bandwidth (size / time) times 2(n-1)/n for all-reduce
    return message_bytes / seconds * 2 * (ranks - 1) / ranks / 1e9


def _bus_bandwidth_mistakes(expected, message_bytes, seconds, ranks):
    algbw = message_bytes / seconds / 1e9
    return {"that is the algorithm bandwidth (bytes / time): bus bandwidth scales it by 2(n-1)/n": algbw,
            "the factor is 2(n-1)/n, not 2(n-1)": algbw * 2 * (ranks - 1),
            "that looks like bytes per second: the question asks for GB/s": expected * 1e9}


EXERCISES = [
    Exercise("05.1", "How many GPUs?", "predict", _gpus_needed, gpus_needed,
             ("Weights and the KV cache must both fit, and each GPU keeps some memory for itself.",
              "Divide the total by 90% of one GPU's memory and round up."),
             {"total_bytes": 23.5e9, "weight_bytes": 20.5e9, "device_bytes": 24 * 2**30},
             ((1, "90%"), (1.5, "whole number"), (5, "is not it"))),
    predict("05.2", "The KV cache of one rank", kv_cache_kib_per_rank, "KiB", _kv_per_rank_mistakes,
            ("Under grouped-query attention the cache keeps one key and one value vector per key/value head, not "
             "per query head.",
             "Per token: 2 x layers x (key/value heads / TP) x head size x bytes per number; times batch and tokens."),
            {"layers": 32, "heads": 32, "kv_heads": 8, "head_dim": 128, "tp": 2, "batch": 1, "tokens": 1024,
             "element_bytes": 2}, rel=0.02),
    Exercise("05.3", "A layout for a latency budget", "predict", _budget, layout_for_budget,
             ("A latency budget is per user: the time between two tokens of one sequence, not the total tokens/s.",
              "Keep the layouts whose ms per token is at most the budget; of those, take the one with the most "
              "tokens/s; 'none' if no layout meets it."),
             {"layouts": {"one": {"ms_per_token": 40.0, "tokens_per_s": 25.0},
                          "tp": {"ms_per_token": 25.0, "tokens_per_s": 40.0},
                          "dp": {"ms_per_token": 42.0, "tokens_per_s": 48.0}}, "budget_ms": 30.0},
             (("dp", "a latency budget is what one user sees"), ("one", "over the budget"), ("none", "within the"),
              (2, "give one of"))),
    Exercise("05.4", "TP and PP for a machine", "predict", _layout, layout_for,
             ("Tensor parallelism stays inside one node and, in transformers, must divide the key/value heads; "
              "pipeline stages go across nodes.",
              "Compare the GiB the model needs with 90% of one GPU: the GPUs it takes is the TP size times the "
              "stages. If one node's GPUs cannot hold it, TP fills the node and the stages are nodes."),
             {"model": "llama-405b-shape", "machine": "2 nodes x 8 x 80 GB", "fmt": "16-bit", "batch": 1,
              "context": 4096},
             (((16, 1), "inside a node"), ((8, 1), "does not fit"), ((6, 2), "key/value heads"),
              ((4, 4), "pipeline stages"), (16, "(tp, pp)"))),
    predict("05.5", "Bus bandwidth", bus_bandwidth_gb_per_s, "GB/s", _bus_bandwidth_mistakes,
            ("nccl-tests reports two numbers: algorithm bandwidth (size / time) and bus bandwidth.",
             "For all-reduce, bus bandwidth = algorithm bandwidth x 2(n-1)/n: what each link carries."),
            {"message_bytes": 256 * 2**20, "seconds": 2e-3, "ranks": 8}, rel=0.02),
]
