"""All-reduce micro-benchmark, reported as nccl-tests reports it (algorithm and bus bandwidth per message size).

    torchrun --standalone --nproc-per-node 2 scripts/allreduce_bench.py --max-mib 64 --out allreduce.json

It runs on whatever torchrun set up: NCCL between GPUs, gloo between CPU processes. Tensor parallelism pays one
all-reduce per attention block and one per MLP block of every layer, for every generated token; this measures
what one costs at each message size. Notebook 05 runs ``time_all_reduce`` inside its largest layouts launch
(``layouts.py --allreduce-max-mib``), which saves starting the processes a second time.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from labkit import parallel, probes
from labkit.timing import synchronize


def bus_bandwidth(message_bytes: int, seconds: float, ranks: int) -> dict:
    """All-reduce bandwidths as nccl-tests reports them: algorithm bandwidth (bytes / time) and bus bandwidth
    (x 2(n-1)/n, the traffic each link carries in a ring, comparable to the link's own speed)."""
    algorithm = message_bytes / seconds
    return {"algbw_bytes_per_s": algorithm, "busbw_bytes_per_s": algorithm * 2 * (ranks - 1) / ranks}


def time_all_reduce(sizes_bytes: list[int], *, device: str, warmup: int = 3, repeats: int = 10) -> list[dict]:
    """Time ``all_reduce`` (sum, float32) for each message size on the initialised process group.

    Every rank runs the same calls; a barrier starts each repeat together and the slowest rank's time
    counts (what a collective costs the whole job).
    """
    rows = []
    ranks = dist.get_world_size()
    for size in sizes_bytes:
        buffer = torch.ones(max(1, size // 4), dtype=torch.float32, device=device)
        times = []
        for i in range(warmup + repeats):
            dist.barrier()
            synchronize(device)
            start = time.perf_counter()
            dist.all_reduce(buffer)
            synchronize(device)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i >= warmup:
                times.append(float(elapsed))
        seconds = statistics.median(times)
        rows.append({"bytes": buffer.numel() * 4, "median_us": seconds * 1e6,
                     **bus_bandwidth(buffer.numel() * 4, seconds, ranks)})
    return rows


def message_sizes(min_bytes: int, max_mib: int) -> list[int]:
    """From ``min_bytes`` up to ``max_mib`` MiB, each 4 times the last."""
    sizes = [min_bytes]
    while sizes[-1] * 4 <= max_mib * 2**20:
        sizes.append(sizes[-1] * 4)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-bytes", type=int, default=256, help="smallest message (bytes)")
    parser.add_argument("--max-mib", type=int, default=64, help="largest message (MiB)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", required=True, help="the JSON file rank 0 writes")
    args = parser.parse_args()

    device = parallel.local_device()
    on_gpu = device.startswith("cuda")
    dist.init_process_group("nccl" if on_gpu else "gloo", device_id=torch.device(device) if on_gpu else None)
    rows = time_all_reduce(message_sizes(args.min_bytes, args.max_mib), device=device, repeats=args.repeats)
    if dist.get_rank() == 0:  # the launcher reads this file once every process has ended
        Path(args.out).write_text(json.dumps({"script": "allreduce_bench", "world_size": dist.get_world_size(),
                                              "backend": dist.get_backend(), "device": device,
                                              "device_label": probes.device_label(device), "rows": rows}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
