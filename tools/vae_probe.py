"""Time the full-size SD3.5 VAE (random weights, fp32 as the spec's recipes hold it) at one 1024-px image, as
the engine runs it: the no-gradient encode of a real image (other iterations), the no-gradient decode of
the generator's sample (other iterations) and the differentiable, checkpointed decode of the GAN term
(generator iterations: forward, then backward with its recomputation). One variant per process.

    python tools/vae_probe.py                       # the engine's VAE (split GroupNorm, NCHW)
    python tools/vae_probe.py --attention tf32      # the mid-block attention as TF32 matrix products
    python tools/vae_probe.py --compile             # encoder and decoder under torch.compile
    python tools/vae_probe.py --kernels 16          # then the 16 costliest GPU kernels of one decode

fp32 matrix products use TF32 with ``--tf32`` (spec §12.4 enables it; cuDNN's convolutions use TF32 by
torch's default). Prints the median wall times and the peak memory of each pass.
"""

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKL

from senseflow.data.tiny import resolve_arch
from senseflow.kernels import use_matmul_attention, use_split_group_norm
from senseflow.profiling import costliest_kernels


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attention", choices=["default", "tf32"], default="default")
    p.add_argument("--tf32", action="store_true", help="torch.backends.cuda.matmul.allow_tf32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-split-gn", action="store_true")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--kernels", type=int, default=0)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script at a small --res")
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = args.tf32 or args.attention == "tf32"
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    root = resolve_arch("arch:sd35_medium") / "vae"
    torch.manual_seed(0)
    with torch.device(dev):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root))
    vae = vae.to(dtype).requires_grad_(False).eval()
    if not args.no_split_gn:
        use_split_group_norm(vae)
    vae.enable_gradient_checkpointing()
    if args.attention == "tf32":
        use_matmul_attention(vae)
    encoder, decoder = vae.encoder, vae.decoder
    if args.compile:  # in place, as model.compile_vae: the checkpointed decode with gradient too
        encoder.compile()
        decoder.compile()
    image = (torch.rand(1, 3, args.res, args.res, device=dev) * 2 - 1).to(dtype)
    latent = torch.randn(1, 16, args.res // 8, args.res // 8, device=dev).to(dtype)
    grad_out = torch.randn(1, 3, args.res, args.res, device=dev)

    def encode():
        with torch.no_grad():
            return encoder(image)

    def decode():
        with torch.no_grad():
            return decoder(latent)

    def decode_grad():
        z = latent.detach().requires_grad_(True)
        out = decoder(z)
        (out.float() * grad_out).sum().backward()
        return z.grad

    sync = torch.cuda.synchronize if cuda else lambda: None
    passes = {"encode (no grad)": encode, "decode (no grad)": decode, "decode + backward": decode_grad}
    t0 = time.perf_counter()
    for fn in passes.values():
        for _ in range(3):
            fn()
    sync()
    warm = time.perf_counter() - t0
    name = (
        f"{args.dtype}"
        f"{' tf32-attention' if args.attention == 'tf32' else ''}{' tf32' if args.tf32 else ''}"
        f"{' compiled' if args.compile else ''}{' torch-GN' if args.no_split_gn else ''}"
    )
    for label, fn in passes.items():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        walls = []
        for _ in range(args.iters):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            walls.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
        print(
            f"RESULT {name}: {label} {1000 * statistics.median(walls):.1f} ms "
            f"(min {1000 * min(walls):.1f}), +{peak:.2f} GiB peak",
            flush=True,
        )
    if args.kernels and cuda:
        total, rows = costliest_kernels(lambda: decode(), args.kernels)
        print(f"KERNELS of one decode (no grad), {total:.1f} ms of GPU time:")
        for row in rows:
            print(f"  {row}")
    print(f"warm-up {warm:.0f} s, {torch.cuda.get_device_name() if cuda else 'cpu'}", flush=True)


if __name__ == "__main__":
    main()
