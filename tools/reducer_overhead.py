"""Host cost of :class:`senseflow.distributed.GradReducer` per step, on a model with the parameter tensors
of a full-size transformer (its layer structure at a tiny width: the reducer's per-parameter work depends
on the number of tensors, not their size).

    torchrun --standalone --nproc_per_node 2 tools/reducer_overhead.py [--arch sd35_medium] [--steps 20]

Runs one forward and backward per step, like the fake-score step of ``model.fsdp=never``, once without
averaging (a single process's step) and once through the reducer (``begin``/``arm``/``finish``), and
prints on rank 0 the ATen operators per step (counted by the profiler) and the median host time per step
of each. gloo on CPUs, NCCL on GPUs; on CPUs the host time includes the model's arithmetic."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

ARCH = Path(__file__).resolve().parents[1] / "senseflow" / "arch"
TINY_WIDTH = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "caption_projection_dim": 16,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 16,
    "sample_size": 16,
}


def build(arch: str, device: torch.device) -> tuple[torch.nn.Module, int]:
    """The tiny-width model and the bucket size that splits it into as many buckets as 64 MiB buckets
    split the full-size model (sized on the meta device)."""
    from diffusers import SD3Transformer2DModel

    cfg = json.loads((ARCH / arch / "transformer" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with torch.device("meta"):
        full = sum(p.numel() for p in SD3Transformer2DModel(**cfg).parameters())
    torch.manual_seed(0)
    net = SD3Transformer2DModel(**(cfg | TINY_WIDTH)).to(device)
    tiny = sum(p.numel() for p in net.parameters())
    return net, max(1, (64 << 20) * tiny // full)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sd35_medium", help="a folder of senseflow/arch with an SD3 transformer")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    from senseflow.distributed import GradReducer, init_distributed

    info = init_distributed("auto")
    device = info.device
    net, bucket_bytes = build(args.arch, device)
    params = [p for p in net.parameters() if p.requires_grad]
    n = 2
    inputs = {
        "hidden_states": torch.randn(n, net.config.in_channels, 8, 8, device=device),
        "encoder_hidden_states": torch.randn(n, 4, net.config.joint_attention_dim, device=device),
        "pooled_projections": torch.randn(n, net.config.pooled_projection_dim, device=device),
        "timestep": torch.full((n,), 500.0, device=device),
    }

    def step(reducer: GradReducer | None) -> None:
        out = net(**inputs, return_dict=False)[0]
        if reducer is not None:
            reducer.begin()
            reducer.arm()
        out.square().mean().backward()
        if reducer is not None:
            reducer.finish()
        for p in params:
            p.grad = None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results = {}
    reducer = GradReducer(params, bucket_bytes=bucket_bytes)
    for name, red in (("single", None), ("reducer", reducer)):
        for _ in range(3):
            step(red)
        times = []
        for _ in range(args.steps):
            sync()
            t0 = time.perf_counter()
            step(red)
            sync()
            times.append(time.perf_counter() - t0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step(red)
            sync()
        ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        results[name] = {"ms": 1e3 * statistics.median(times), "aten_ops": ops}
    if info.is_main:
        s, r = results["single"], results["reducer"]
        print(
            f"{args.arch} structure at a tiny width ({len(params)} parameter tensors in {len(reducer.buckets)} "
            f"buckets, as 64 MiB buckets at full size), {info.world_size} ranks on {device.type}, "
            f"torch {torch.__version__}, {os.cpu_count()} CPUs"
        )
        for name, v in results.items():
            print(f"{name:8s} {v['ms']:8.1f} ms/step  {v['aten_ops']:6d} ATen ops/step")
        print(
            f"reducer adds {r['aten_ops'] - s['aten_ops']} ATen ops and {r['ms'] - s['ms']:.1f} ms per step"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
