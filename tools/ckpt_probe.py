"""Time one training pass (forward + backward, bf16 autocast over fp32 weights, one image) of the full-size
SD3.5 Medium transformer (random weights) under several ways to combine activation checkpointing with
``torch.compile`` of the blocks; one variant per process, one line of results per variant.

    python tools/ckpt_probe.py outside      # diffusers' checkpointing around compiled blocks (the engine's)
    python tools/ckpt_probe.py inside       # the checkpoint inside each block's compiled code
    python tools/ckpt_probe.py none         # no checkpointing (the memory it saves)
    python tools/ckpt_probe.py budget=0.3   # no checkpoint; the compiler recomputes to a memory budget
    python tools/ckpt_probe.py outside --eager
    python tools/ckpt_probe.py budget=0.3 --mode reduce-overhead   # blocks as CUDA graphs
    python tools/ckpt_probe.py budget=0.3 --attention cudnn        # cuDNN's attention kernel
    python tools/ckpt_probe.py budget=0.3 --kernels 20             # then the 20 costliest GPU kernels
    python tools/ckpt_probe.py budget=0.3 --recompute-attention    # torch's partitioner as it comes

Set ``TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0`` when comparing variants: the on-disk
caches' keys do not cover the attention backend or the partitioner's operator list, so a later process
may reuse an earlier variant's compiled graphs.

``issue ms``: host time to issue the pass (forward and backward calls return); ``ms``: wall time to the
end of the GPU work. Where they are close, the host sets the pace.
"""

import argparse
import json
import statistics
import time
import types
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from torch.utils.checkpoint import checkpoint

from senseflow.kernels import ATTENTION_BACKENDS, attention_backend
from senseflow.parallel import keep_cudnn_attention_saved
from senseflow.profiling import costliest_kernels

ARCH = Path(__file__).resolve().parents[1] / "senseflow" / "arch" / "sd35_medium" / "transformer"


def _checkpointed_forward(self, *args, **kwargs):
    return checkpoint(self.plain_forward, *args, use_reentrant=False, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("variant")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--mode", help="torch.compile mode of the blocks, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, help="the only SDPA backend (default: torch's)")
    p.add_argument(
        "--recompute-attention", action="store_true", help="budget=: let torch recompute cuDNN's attention"
    )
    p.add_argument("--forward", action="store_true", help="time a forward without gradient instead")
    p.add_argument(
        "--kernels", type=int, default=0, help="then profile one pass: its N costliest GPU kernels"
    )
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--res", type=int, default=1024)
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    cfg = json.loads((ARCH / "config.json").read_text())
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(cfg)
    model = model.to_empty(device=dev).float()
    for prm in model.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    model.train()
    variant = args.variant
    if variant.startswith("budget="):
        torch._functorch.config.activation_memory_budget = float(variant.split("=")[1])
        if not args.recompute_attention:
            keep_cudnn_attention_saved()  # as the engine's compile_modules does under a budget
    if variant == "outside":
        model.enable_gradient_checkpointing()
    for blk in model.transformer_blocks:
        if variant == "inside":
            blk.plain_forward = blk.forward
            blk.forward = types.MethodType(_checkpointed_forward, blk)
        if not args.eager:
            blk.compile(mode=args.mode)
    side = args.res // 8
    x = torch.randn(1, 16, side, side, device=dev)
    ctx = torch.randn(1, 333, cfg["joint_attention_dim"], device=dev)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], device=dev)
    t = torch.tensor([500.0], device=dev)
    base = torch.cuda.memory_allocated()

    def step():
        with attention_backend(args.attention), torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.set_grad_enabled(not args.forward):
                out = model(x, ctx, pooled, t, return_dict=False)[0]
        if not args.forward:
            out.float().square().mean().backward()

    for _ in range(3):
        step()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    walls, issues = [], []
    for _ in range(args.iters):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        issues.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    print(
        f"RESULT {variant}{' eager' if args.eager else ''}{f' {args.mode}' if args.mode else ''}"
        f"{f' attention={args.attention}' if args.attention else ''}"
        f"{' recompute-attention' if args.recompute_attention else ''}: {'fwd' if args.forward else 'fwd+bwd'} {1000 * statistics.median(walls):.1f} ms "
        f"(issue {1000 * statistics.median(issues):.1f} ms), activations+grads peak {peak:.1f} GiB "
        f"over {base / 2**30:.1f} GiB of weights, {torch.cuda.get_device_name()}",
        flush=True,
    )
    if args.kernels:
        if args.mode:  # a replayed CUDA graph hides its kernels from the profiler
            print("KERNELS: not listed with --mode (CUDA graphs)")
            return
        model.zero_grad(set_to_none=True)  # as in the timed passes: no accumulation into existing grads
        total, rows = costliest_kernels(step, args.kernels)
        print(f"KERNELS of one pass, {total:.1f} ms of GPU time:")
        for row in rows:
            print(f"  {row}")


if __name__ == "__main__":
    main()
