"""Data-parallel generation: every process holds the whole model and takes its share of the prompts.

    torchrun --standalone --nproc-per-node 2 scripts/dp_generate.py --model smollm2-135m --prompts 8 --out dp.json

The prompts are split with accelerate's ``PartialState().split_between_processes`` (consecutive shares, in rank
order), each process generates greedily for its share, and rank 0 gathers the results in prompt order and writes
them to --out with the wall time of the whole job (from a barrier before the first prompt to one after the last).
"""

import argparse
import time

import torch
from accelerate import PartialState

from labkit import generation, models, parallel, probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", required=True, help="the JSON file rank 0 writes")
    args = parser.parse_args()

    # joins the process group torchrun set up: NCCL on GPUs; gloo on CPU, where accelerate must be told cpu=True
    state = PartialState(cpu=not torch.cuda.is_available())
    device = parallel.local_device()
    dtype = probes.resolve_dtype(args.dtype, device)
    model, tokenizer = models.load_model(args.model, device=device, dtype=dtype, attn_implementation="sdpa")
    prompts = [generation.random_prompt(model, batch=1, length=args.prompt_tokens, seed=i) for i in range(args.prompts)]
    generation.generate_exactly(model, prompts[0], 2, tokenizer=tokenizer)  # warm-up, outside the timed part

    state.wait_for_everyone()
    start = time.perf_counter()
    mine = []
    with state.split_between_processes(list(range(args.prompts))) as share:
        for index in share:
            ids = generation.generate_exactly(model, prompts[index], args.new_tokens, tokenizer=tokenizer)
            mine.append({"prompt": index, "rank": state.process_index,
                         "token_ids": ids[0, args.prompt_tokens:].tolist()})
    state.wait_for_everyone()
    seconds = time.perf_counter() - start

    gathered = [mine]
    if state.num_processes > 1:
        gathered = [None] * state.num_processes
        torch.distributed.all_gather_object(gathered, mine)
    results = [row for share in gathered for row in share]  # rank order = prompt order
    tokens = sum(len(row["token_ids"]) for row in results)
    parallel.write_from_rank0(args.out, {
        "script": "dp_generate", "model": args.model, "world_size": state.num_processes,
        "backend": str(state.backend), "device": device, "device_label": probes.device_label(device),
        "threads": torch.get_num_threads(), "prompts": args.prompts, "new_tokens": args.new_tokens,
        "seconds": seconds, "tokens_per_s": tokens / seconds, "results": results})
    state.destroy_process_group()


if __name__ == "__main__":
    main()
