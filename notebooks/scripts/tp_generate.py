"""Greedy generation with tensor parallelism: every process holds a slice of every layer.

    torchrun --standalone --nproc-per-node 2 scripts/tp_generate.py --model tiny-llama --out tp.json

With one process the model is loaded whole, with no parallel plan: the baseline. With N processes it is loaded
with transformers' tensor-parallel plan (``DistributedConfig(tp_plan="auto")``) over gloo (CPU) or NCCL (GPUs).
Rank 0 writes to --out: the greedy token ids, the prompt's top-10 next-token logits, the decode rate,
the bytes each rank holds, the attention backend that ran and the collectives one forward pass called.
"""

import argparse
import time

import torch

from labkit import attention, generation, models, parallel, probes, roofline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True, help="the JSON file rank 0 writes")
    args = parser.parse_args()

    device = parallel.local_device()
    dtype = probes.resolve_dtype(args.dtype, device)
    ranks = parallel.world_size()
    start = time.perf_counter()
    if ranks > 1:
        parallel.check_tensor_parallel(parallel.model_config(args.model), ranks)
        model, tokenizer, backend = parallel.load_tensor_parallel(args.model, dtype=dtype, attn_implementation=args.attn)
    else:
        model, tokenizer = models.load_model(args.model, device=device, dtype=dtype, attn_implementation=args.attn)
        backend = "none (one process)"
    load_s = time.perf_counter() - start

    prompt = generation.random_prompt(model, batch=args.batch, length=args.prompt_tokens)
    with torch.inference_mode():
        ran = attention.ops_that_ran(lambda: model(input_ids=prompt), device)
        top = model(input_ids=prompt).logits[0, -1].float().topk(10)  # to compare with one process, value by value
    decode = generation.measure_decode(model, prompt, new_tokens=args.new_tokens, warmup=1, repeats=args.repeats,
                                       tokenizer=tokenizer)
    collectives = {op: n for op, n in ran.counts.items() if op.startswith("c10d::")}  # one forward = one token step
    held = roofline.parameter_bytes(model)  # this rank's shards
    bytes_per_rank = [held]
    if ranks > 1:
        bytes_per_rank = [None] * ranks
        torch.distributed.all_gather_object(bytes_per_rank, held)
    parallel.write_from_rank0(args.out, {
        "script": "tp_generate", "model": args.model, "world_size": ranks, "backend": backend, "device": device,
        "device_label": probes.device_label(device), "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation, "sdpa_backend": ran.backend,
        "threads": torch.get_num_threads(), "load_s": load_s, "collectives_per_forward": collectives,
        "top_logits": top.values.tolist(), "top_token_ids": top.indices.tolist(), "parameter_bytes_per_rank": bytes_per_rank,
        **{k: decode[k] for k in ("batch", "prompt_tokens", "new_tokens", "tokens_per_s", "step_ms",
                                  "first_token_ms", "timing_fallback", "token_ids")}})
    if ranks > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
