"""All-reduce micro-benchmark, reported as nccl-tests reports it (algorithm and bus bandwidth per message size).

    torchrun --standalone --nproc-per-node 2 scripts/allreduce_bench.py --max-mib 64 --out allreduce.json

It runs on whatever torchrun set up: NCCL between GPUs, gloo between CPU processes. Tensor parallelism pays one
all-reduce per attention block and one per MLP block of every layer, for every generated token; this measures
what one costs at each message size.
"""

import argparse

import torch
import torch.distributed as dist

from labkit import parallel, probes


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
    sizes = []
    size = args.min_bytes
    while size <= args.max_mib * 2**20:
        sizes.append(size)
        size *= 4
    rows = parallel.time_all_reduce(sizes, device=device, repeats=args.repeats)
    parallel.write_from_rank0(args.out, {"script": "allreduce_bench", "world_size": dist.get_world_size(),
                                         "backend": dist.get_backend(), "device": device,
                                         "device_label": probes.device_label(device), "rows": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
