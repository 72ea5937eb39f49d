"""All-reduce bandwidth between the GPUs of one host, as the replicated engine uses it (fp32 buckets).

    torchrun --standalone --nproc_per_node 2 tools/allreduce_bw.py [MiB ...]

Prints, per buffer size, the median time of 10 all-reduces and the bus bandwidth (NCCL's convention:
2 (n - 1) / n bytes moved per byte of buffer)."""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    for mib in [int(a) for a in sys.argv[1:]] or [64, 256, 1024]:
        t = torch.ones(mib << 18, device="cuda")  # fp32
        for _ in range(3):
            dist.all_reduce(t)
        times = []
        for _ in range(10):
            torch.cuda.synchronize()
            start = time.perf_counter()
            dist.all_reduce(t)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        sec = statistics.median(times)
        if rank == 0:
            bus = 2 * (world - 1) / world * t.numel() * 4 / sec / 1e9
            print(
                f"all-reduce {mib} MiB fp32 on {world} GPUs: {sec * 1e3:.2f} ms, bus bandwidth {bus:.0f} GB/s"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
