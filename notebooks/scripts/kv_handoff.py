"""Disaggregated prefill, rehearsed on one machine: one process prefills and sends the KV cache, the other decodes.

    torchrun --standalone --nproc-per-node 2 scripts/kv_handoff.py --model-folder FOLDER --prompt-tokens 64 256 \
        --out handoff.json

Rank 0 is the prefill server. For each prompt length it runs the prompt once through the model, times that prefill,
and sends the first token and every layer's keys and values to rank 1 over gloo. Rank 1 is the decode server. It
receives them into a ``DynamicCache`` and decodes greedily from there, never running the prompt itself. The transfer
is timed on rank 1, from a barrier both ranks pass to the last tensor received, after one untimed transfer. Rank 0
also decodes the whole prompt alone with ``generate``: one process's greedy tokens. Rank 0 writes one JSON object to
--out: for each prompt length, the tokens of both, the bytes sent, the prefill and transfer times. Both processes run
on the CPU, and the imports are few: starting them is most of the job's time.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DynamicCache

from labkit import timing


def prompt_ids(tokens: int, vocab_size: int) -> torch.Tensor:
    """The prompt of ``tokens`` random token ids, the same in every process (a fixed seed)."""
    return torch.randint(100, vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))


def prefill(model, ids: torch.Tensor) -> tuple[int, DynamicCache]:
    """The prompt through the model once: its first new token (greedy) and its KV cache."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    return int(logits[0, -1].argmax()), cache


def send_cache(first: int, cache: DynamicCache, peer: int) -> int:
    """The first token, then every layer's keys and values, to ``peer``; the bytes of the tensors sent."""
    tensors = [torch.tensor([first])] + [t for layer in cache.layers for t in (layer.keys, layer.values)]
    for tensor in tensors:
        dist.send(tensor.contiguous(), dst=peer)
    return sum(t.numel() * t.element_size() for t in tensors)


def receive_cache(model, tokens: int, peer: int) -> tuple[int, DynamicCache]:
    """What :func:`send_cache` sent, into a new cache: the shapes follow from the model's config and the prompt."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (1, config.num_key_value_heads, tokens, head_dim)
    first, cache = torch.zeros(1, dtype=torch.long), DynamicCache(config=config)
    dist.recv(first, src=peer)
    for layer in range(config.num_hidden_layers):
        keys, values = torch.empty(shape, dtype=model.dtype), torch.empty(shape, dtype=model.dtype)
        dist.recv(keys, src=peer)
        dist.recv(values, src=peer)
        cache.update(keys, values, layer)
    return int(first), cache


def decode(model, first: int, cache: DynamicCache, new_tokens: int) -> list[int]:
    """Greedy decoding from a received cache: ``new_tokens`` tokens, the first one the prefill server's."""
    tokens = [first]
    with torch.inference_mode():
        while len(tokens) < new_tokens:
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-folder", required=True, help="a saved model (labkit.models.folder_for_processes)")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills and transfers per prompt length")
    parser.add_argument("--out", required=True, help="the JSON file rank 0 writes")
    job = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(job.model_folder, dtype=torch.float32).eval()
    dist.init_process_group("gloo")
    rank, rows = dist.get_rank(), []
    for tokens in job.prompt_tokens:
        ids = prompt_ids(tokens, model.config.vocab_size)
        if rank == 0:
            prefill_ms = timing.measure(lambda ids=ids: prefill(model, ids), warmup=1, repeats=job.repeats,
                                        min_time_s=0).median_ms
            first, cache = prefill(model, ids)
            with torch.inference_mode():  # one process alone, the whole prompt: plain greedy decoding
                alone = model.generate(ids, max_new_tokens=job.new_tokens, do_sample=False, eos_token_id=None,
                                       min_new_tokens=job.new_tokens)[0, tokens:].tolist()
        moved, sent = [], 0
        for repeat in range(1 + job.repeats):  # the same cache sent again, the first time untimed (a warm-up)
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                sent = send_cache(first, cache, peer=1)
            else:
                first, received = receive_cache(model, tokens, peer=0)
                moved += [1e3 * (time.perf_counter() - start)] if repeat else []
        reply = [None, None]
        if rank == 1:
            reply = [decode(model, first, received, job.new_tokens), statistics.median(moved)]
        dist.broadcast_object_list(reply, src=1)  # the decode server's tokens and transfer time, to rank 0
        if rank == 0:
            rows.append({"prompt_tokens": tokens, "decoded": reply[0], "one_process": alone, "bytes_sent": sent,
                         "prefill_ms": prefill_ms, "transfer_ms": reply[1]})
    if rank == 0:  # the launcher reads this file once every process has ended
        Path(job.out).write_text(json.dumps({
            "script": "kv_handoff", "world_size": dist.get_world_size(), "backend": dist.get_backend(),
            "model_folder": job.model_folder, "dtype": "float32", "threads": torch.get_num_threads(),
            "rows": rows}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
