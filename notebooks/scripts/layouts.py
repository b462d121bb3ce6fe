"""One model spread over several processes, in the layouts people deploy, each against the same model in one process.

    torchrun --standalone --nproc-per-node 2 scripts/layouts.py --layouts tp --out tp.json
    torchrun --standalone --nproc-per-node 2 scripts/layouts.py --layouts tp pp ep dp --out layouts.json
    # on each of two machines (nodes), meeting at HOST:
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id job1 \
        scripts/layouts.py --layouts tp_pp --out tp_pp.json

The layouts (transformers' ``DistributedConfig`` splits the model while ``from_pretrained`` loads it):
  tp     tensor parallelism, DistributedConfig(tp_size=N): every layer's matrices split across the N processes;
  pp     pipeline parallelism, DistributedConfig(pp_size=N): consecutive layers on consecutive processes;
  ep     expert parallelism, DistributedConfig(tp_size=N, ep_size=N): a mixture-of-experts model's experts shared out;
  dp     data parallelism: a whole copy per process, the prompts shared out (accelerate's split_between_processes);
  tp_pp  TP inside each node and PP across the nodes: DistributedConfig(tp_size=per node, pp_size=nodes).
Several layouts can run in one launch: starting the processes (importing torch and transformers) costs seconds, more
than these small jobs. For the same reason ``--allreduce-max-mib`` also times all-reduce after the layouts, with
``allreduce_bench.py``'s ``time_all_reduce`` (notebook 05's section 9). Each layout is compared with its model whole
in one process: rank 0 runs it alone, with the threads one process would have, while the others wait. Rank 0 writes
one JSON object to --out.
"""

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from labkit import compat, footprint, outputs, parallel, probes, roofline, timing

LAYOUTS = ("tp", "pp", "ep", "dp", "tp_pp")


def owned_layers(model) -> list[int]:
    """The decoder layers this process runs (a pipeline stage replaces the others with placeholders)."""
    from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

    layers = model.get_decoder().layers
    return [i for i, layer in enumerate(layers) if not isinstance(layer, PipelineIdentityLayer)]


@contextlib.contextmanager
def busy_time(modules, device: str):
    """Seconds spent inside ``modules``' forward passes within the block: ``with busy_time(...) as busy:`` then
    ``busy["s"]`` (the time a pipeline stage computes; the rest of a step it waits or does bookkeeping)."""

    busy = {"s": 0.0}
    starts: list[float] = []

    def before(module, args):
        timing.synchronize(device)
        starts.append(time.perf_counter())

    def after(module, args, output):
        timing.synchronize(device)
        busy["s"] += time.perf_counter() - starts.pop()

    handles = [h for m in modules for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield busy
    finally:
        for handle in handles:
            handle.remove()


def decode_rate(model, prompt, *, new_tokens: int, repeats: int, warmup: int = 1) -> dict:
    """Decode tokens/s by ``outputs.measure_decode``, with exactly the calls asked: in a distributed job every rank
    must make the same calls, so no minimum measured time."""
    return outputs.measure_decode(model, prompt, new_tokens=new_tokens, warmup=warmup, repeats=repeats, min_time_s=0)


def collectives(counts: dict[str, int]) -> dict[str, int]:
    """The communication ops among a profile's op counts (``c10d::allreduce_``, ``c10d::send``, ...)."""
    return {op.removeprefix("c10d::"): n for op, n in counts.items() if op.startswith("c10d::")}


def load(folder, dtype, device, distributed_config=None):
    """The model at ``folder``: whole on ``device``, or split over the processes as ``distributed_config`` says."""
    if distributed_config is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    with compat.cpu_accelerator_without_gpus():  # CPU processes of a CUDA build of torch: gloo, not NCCL
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa",
                                                    distributed_config=distributed_config).eval()


def one_process(job, fn):
    """``fn()`` run by rank 0 alone, with ``--one-process-threads`` threads (the notebook gives it one process's share
    of the cores, as each rank has: one worker against N), while the other ranks wait."""
    result = None
    if dist.get_rank() == 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(job.one_process_threads)
        try:
            result = fn()
        finally:
            torch.set_num_threads(threads)
    dist.barrier()
    return result


def every_rank(value):
    """``value`` from every rank, in rank order."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def measure(job, model, prompt, *, decode=True):
    """What one forward pass over ``prompt`` called and kept, the greedy tokens, and the decode rate."""
    with torch.inference_mode():
        ran = timing.ops_that_ran(lambda: model(input_ids=prompt), job.device)
        output = model(input_ids=prompt, use_cache=True)
    top = output.logits[0, -1].float().topk(10)
    held = {"parameter_bytes": roofline.parameter_bytes(model), "kv_cache_bytes": footprint.cache_bytes(output),
            "collectives": collectives(ran.counts)}
    result = {"sdpa_backend": ran.backend, "top_logits": top.values.tolist(), **held}
    if decode:
        result.update(decode_rate(model, prompt, new_tokens=job.new_tokens, repeats=job.repeats))
    else:
        result["token_ids"] = outputs.generate_exactly(model, prompt, job.new_tokens)[:, prompt.shape[1]:].tolist()
    return result


def against_one_process(job, split, whole, prompt, *, decode=True):
    """``split`` measured on every rank beside ``whole`` measured in one process."""
    mine = measure(job, split, prompt, decode=decode)
    ranks = every_rank({k: mine[k] for k in ("parameter_bytes", "kv_cache_bytes", "collectives")})
    alone = one_process(job, lambda: measure(job, whole, prompt, decode=decode))
    result = {k: v for k, v in mine.items() if k not in ("parameter_bytes", "kv_cache_bytes", "collectives")}
    result["prompt_tokens"] = prompt.shape[1]
    result.update({f"{k}_per_rank": [r[k] for r in ranks] for k in ("parameter_bytes", "kv_cache_bytes")})
    result["collectives_per_rank"] = [r["collectives"] for r in ranks]
    if alone is not None:
        result.update({f"one_process_{k}": v for k, v in alone.items() if k != "collectives"})
    return result


def tensor_parallel(job):
    """Every layer split across the processes: attention by heads, the MLP by its width."""
    folder = parallel.model_folder(job.model, job.dtype)
    whole = load(folder, job.dtype, job.device)
    split = load(folder, job.dtype, job.device, DistributedConfig(tp_size=job.world))
    prompt = outputs.random_prompt(whole, batch=1, length=job.prompt_tokens)
    return {"model": job.model, "sizes": {"tp_size": job.world}, **against_one_process(job, split, whole, prompt)}


def pipeline_parallel(job):
    """Consecutive layers on consecutive processes; a token passes through the stages in turn."""
    folder = parallel.model_folder("layers-llama", job.dtype)
    whole = load(folder, job.dtype, job.device)
    split = load(folder, job.dtype, job.device, DistributedConfig(pp_size=job.world))
    owned = owned_layers(split)
    computing = [split.get_decoder().layers[i] for i in owned] + ([split.lm_head] if job.rank == job.world - 1 else [])
    batches = []
    for batch in (1, job.batch_in_flight):
        prompt = outputs.random_prompt(whole, batch=batch, length=job.prompt_tokens)
        with busy_time(computing, job.device) as busy:
            start = time.perf_counter()
            outputs.generate_exactly(split, prompt, job.new_tokens)
            wall = time.perf_counter() - start
        rate = decode_rate(split, prompt, new_tokens=job.new_tokens, repeats=job.repeats)
        shares = every_rank(busy["s"] / wall)

        def alone(prompt=prompt):
            with busy_time([*whole.get_decoder().layers, whole.lm_head], job.device) as busy_whole:
                start = time.perf_counter()
                outputs.generate_exactly(whole, prompt, job.new_tokens)
                share = busy_whole["s"] / (time.perf_counter() - start)
            return {"busy_share": share, **decode_rate(whole, prompt, new_tokens=job.new_tokens,
                                                                 repeats=job.repeats)}

        one = one_process(job, alone) or {}
        batches.append({"batch": batch, "step_ms": rate["step_ms"], "token_ids": rate["token_ids"],
                        "busy_share_per_rank": shares, **{f"one_process_{k}": v for k, v in one.items()}})
    return {"model": "layers-llama", "sizes": {"pp_size": job.world}, "layers_per_rank": every_rank(owned),
            "parameter_bytes_per_rank": every_rank(roofline.parameter_bytes(split)),
            "one_process_parameter_bytes": roofline.parameter_bytes(whole), "batches": batches}


def expert_parallel(job):
    """A mixture-of-experts model: its experts shared out, attention split as in tensor parallelism."""
    folder = parallel.model_folder("tiny-moe", job.dtype)
    whole = load(folder, job.dtype, job.device)
    prompt = outputs.random_prompt(whole, batch=1, length=job.prompt_tokens)
    implementations = {}
    for implementation in ("auto", "all_to_all"):  # auto: all_reduce at inference when every rank holds the batch
        config = DistributedConfig(tp_size=job.world, ep_size=job.world, ep_implementation=implementation)
        split = load(folder, job.dtype, job.device, config)
        result = against_one_process(job, split, whole, prompt, decode=False)
        result["experts_per_rank"] = split.get_decoder().layers[0].mlp.experts.num_experts
        implementations[implementation] = result
        del split
    return {"model": "tiny-moe", "sizes": {"tp_size": job.world, "ep_size": job.world},
            "num_experts": whole.config.num_experts, "implementations": implementations}


def data_parallel(job):
    """A whole copy of the model per process; each process takes a consecutive share of the prompts."""
    state = PartialState(cpu=not torch.cuda.is_available())  # joins the process group torchrun set up
    whole = load(parallel.model_folder(job.model, job.dtype), job.dtype, job.device)
    prompts = [outputs.random_prompt(whole, batch=1, length=job.prompt_tokens, seed=i) for i in range(job.prompts)]
    outputs.generate_exactly(whole, prompts[0], 2)  # warm-up, outside the timed part

    def generate(indices):
        start = time.perf_counter()
        rows = [{"prompt": i, "rank": state.process_index, "token_ids": outputs.generate_exactly(
                    whole, prompts[i], job.new_tokens)[0, job.prompt_tokens:].tolist()} for i in indices]
        return rows, time.perf_counter() - start

    alone = one_process(job, lambda: generate(range(job.prompts)))
    state.wait_for_everyone()
    start = time.perf_counter()
    with state.split_between_processes(list(range(job.prompts))) as share:
        mine, _ = generate(share)
    state.wait_for_everyone()  # the job's time runs from the first barrier to the last, on its slowest rank
    seconds = max(every_rank(time.perf_counter() - start))
    results = [row for rows in every_rank(mine) for row in rows]  # rank order = prompt order
    tokens = len(results) * job.new_tokens
    out = {"model": job.model, "prompts": job.prompts, "results": results, "seconds": seconds,
           "tokens_per_s": tokens / seconds}
    if alone is not None:
        out.update({"one_process_seconds": alone[1], "one_process_tokens_per_s": tokens / alone[1],
                    "one_process_token_ids": [r["token_ids"] for r in alone[0]]})
    return out


def tensor_and_pipeline_parallel(job):
    """TP inside each node, PP across the nodes: the layout for a model too big for one node."""
    per_node, nodes = job.local_world, job.world // job.local_world
    folder = parallel.model_folder(job.model, job.dtype)
    whole = load(folder, job.dtype, job.device)
    config = DistributedConfig(tp_size=per_node, pp_size=nodes)
    try:  # transformers 5.25 (and 5.24) fails here: see compat.tp_plan_skips_other_stages
        split, plain_error = load(folder, job.dtype, job.device, config), None
    except Exception as error:  # every rank fails the same way, before any collective
        plain_error = f"{type(error).__name__}: {error}"
        with compat.tp_plan_skips_other_stages():
            split = load(folder, job.dtype, job.device, config)
    prompt = outputs.random_prompt(whole, batch=1, length=job.prompt_tokens)
    result = against_one_process(job, split, whole, prompt, decode=False)
    return {"model": job.model, "sizes": {"tp_size": per_node, "pp_size": nodes}, "per_node": per_node,
            "plain_error": plain_error, "stage_per_rank": [r // per_node for r in range(job.world)], **result}


# The model each layout loads (None: the --model one).
MODEL_OF = {"tp": None, "pp": "layers-llama", "ep": "tiny-moe", "dp": None, "tp_pp": None}
RUN = {"tp": tensor_parallel, "pp": pipeline_parallel, "ep": expert_parallel, "dp": data_parallel,
       "tp_pp": tensor_and_pipeline_parallel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["tp"])
    parser.add_argument("--model", default="tiny-llama", help="the model of tp, dp and tp_pp")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-in-flight", type=int, default=4, help="pp: sequences decoded together")
    parser.add_argument("--prompts", type=int, default=4, help="dp: prompts shared out")
    parser.add_argument("--one-process-threads", type=int, default=0, help="0: as many as each process has")
    parser.add_argument("--allreduce-max-mib", type=int, default=0, help="also time all-reduce up to this size")
    parser.add_argument("--out", required=True, help="the JSON file rank 0 writes")
    job = parser.parse_args()

    job.device = parallel.local_device()
    job.dtype = probes.resolve_dtype(job.dtype, job.device)
    # The models' folders, saved once before the process group exists (inside it only rank 0 would write files): the
    # launching notebook has saved them already; run from a terminal, one rank saves them while the others wait.
    for name in sorted({MODEL_OF[layout] or job.model for layout in job.layouts}):
        parallel.model_folder(name, job.dtype)
    on_gpu = job.device.startswith("cuda")
    dist.init_process_group("nccl" if on_gpu else "gloo", device_id=torch.device(job.device) if on_gpu else None)
    job.rank, job.world = dist.get_rank(), dist.get_world_size()
    job.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", job.world))
    job.one_process_threads = job.one_process_threads or torch.get_num_threads()
    results = {}
    for name in job.layouts:
        start = time.perf_counter()
        results[name] = {**RUN[name](job), "seconds_in_job": time.perf_counter() - start}
    if job.allreduce_max_mib:  # the benchmark's own rule: messages from 256 bytes, 4 times larger each
        from allreduce_bench import message_sizes, time_all_reduce  # a script beside this one

        results["allreduce"] = {"rows": time_all_reduce(message_sizes(256, job.allreduce_max_mib), device=job.device,
                                                        repeats=20)}
    if job.rank == 0:  # the launcher reads this file once every process has ended
        Path(job.out).write_text(json.dumps({
            "script": "layouts", "world_size": job.world, "nodes": job.world // job.local_world,
            "backend": dist.get_backend(), "device": job.device, "device_label": probes.device_label(job.device),
            "dtype": str(job.dtype).removeprefix("torch."), "threads": torch.get_num_threads(), **results}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
