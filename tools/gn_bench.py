"""Time torch's GroupNorm against senseflow.kernels.SplitGroupNorm at the SD3/SDXL VAE decoder's sizes
(fp32, one image, 32 groups) on the GPU; prints one line per size. ``python tools/gn_bench.py``."""

import torch
from torch import nn

from senseflow.kernels import SplitGroupNorm


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


for c, side in ((128, 1024), (256, 512), (512, 256), (512, 128)):
    ref = nn.GroupNorm(32, c, eps=1e-6).cuda()
    fast = SplitGroupNorm(32, c, eps=1e-6).cuda()
    x = torch.randn(1, c, side, side, device="cuda", requires_grad=True)
    g = torch.randn_like(x)
    row = [f"{c}x{side}x{side}"]
    for name, m in (("torch", ref), ("split", fast)):
        with torch.no_grad():
            row.append(f"{name} fwd {timed(lambda m=m, x=x: m(x)):.3f} ms")
        row.append(f"fwd+bwd {timed(lambda m=m, x=x, g=g: m(x).backward(g)):.3f} ms")
    print(" | ".join(row))
