"""Time the discriminator step of the full-size VFM discriminator (DINOv2-L taps, 8 projection heads of
0.77 B parameters, random weights) on one 1024-px real and one fake image, as the engine runs it: real
pass, backward, fake pass, backward, gradient clipping, fused AdamW; one compile variant per process.
Each process times the step with one DINOv2 pass over both images (the engine's, ``paired_features``) and
with a pass per image (the engine until the nineteenth session), alternately.

    python tools/disc_probe.py                        # compiled heads
    python tools/disc_probe.py --heads eager
    python tools/disc_probe.py --mode reduce-overhead # the heads' branches as CUDA graphs
    python tools/disc_probe.py --backbone             # DINOv2 blocks compiled too
    python tools/disc_probe.py --channels-last        # the heads' conv weights channels-last
    python tools/disc_probe.py --nchw                 # NCHW conv inputs (the heads until session 19)
    python tools/disc_probe.py --kernels 16           # then the 16 costliest GPU kernels of one step
    python tools/disc_probe.py --attention cudnn      # DINOv2's attention on cuDNN's kernel only

``issue ms``: host time until the step's calls return; ``ms``: wall time to the end of the GPU work.
Where they are close, the host sets the pace.
"""

import argparse
import contextlib
import statistics
import time

import torch

from senseflow.data.tiny import resolve_arch
from senseflow.discriminator import DiscriminatorConfig, VFMDiscriminator
from senseflow.discriminator.heads import SNConv2d
from senseflow.kernels import ATTENTION_BACKENDS, attention_backend, cast_matmul_weights_
from senseflow.losses.gan import hinge_d_fake, hinge_d_real
from senseflow.profiling import costliest_kernels


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--heads", choices=["eager", "compiled"], default="compiled")
    p.add_argument("--backbone", action="store_true", help="compile the DINOv2 blocks")
    p.add_argument("--mode", help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--channels-last", action="store_true", help="the heads' conv weights channels-last")
    p.add_argument("--nchw", action="store_true", help="conv inputs as the compiled heads leave them (NCHW)")
    p.add_argument(
        "--kernels", type=int, default=0, help="then profile one step: its N costliest GPU kernels"
    )
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, help="the only SDPA backend (default: torch's)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script at a small --res")
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    cfg = DiscriminatorConfig(
        compile_heads=args.heads == "compiled", compile_backbone=args.backbone, compile_mode=args.mode
    )
    torch.manual_seed(0)
    disc = VFMDiscriminator(
        cfg, resolve_arch("arch:dinov2_large"), resolve_arch("arch:clip_vit_l14"), random_init=True
    ).to(dev)
    cast_matmul_weights_(disc.backbone.model, torch.bfloat16)  # as the engine does under bf16
    if args.channels_last:
        disc.heads.to(memory_format=torch.channels_last)
    for m in disc.heads.modules():
        if isinstance(m, SNConv2d):
            m.channels_last = not args.nchw
    disc.train()
    params = list(disc.trainable_parameters())
    opt = torch.optim.AdamW(params, lr=1e-6, fused=cuda)
    gen = torch.Generator(dev).manual_seed(0)
    real = torch.rand(1, 3, args.res, args.res, device=dev) * 2 - 1
    fake = torch.rand(1, 3, args.res, args.res, device=dev) * 2 - 1
    text = disc.encode_text(["a photo of a cat"])
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)

    @contextlib.contextmanager
    def amp():
        with attention_backend(args.attention), autocast:
            yield

    with amp():
        ref = disc.reference_features(torch.rand(1, 3, args.res, args.res, device=dev) * 2 - 1)
    weight = torch.tensor([0.8], device=dev)

    def step(separate: bool):
        if args.mode:
            torch.compiler.cudagraph_mark_step_begin()
        with amp():
            if separate:
                feats_real = disc.features(real, gen)
            else:
                feats_real, feats_fake = disc.paired_features(real, fake, gen)
            logits_real = disc.logits(feats_real, text, ref)
        (weight * hinge_d_real(logits_real)).mean().backward()
        with amp():
            if separate:
                feats_fake = disc.features(fake, gen)
            logits_fake = disc.logits(feats_fake, text, ref)
        (weight * hinge_d_fake(logits_fake)).mean().backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if cuda:  # the engine's skip of a non-finite step without a host synchronisation
            opt.found_inf = (~torch.isfinite(norm)).float()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if cuda else lambda: None
    t0 = time.perf_counter()
    for i in range(6):
        step(separate=i % 2 == 1)
    sync()
    warm = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    walls, issues = {False: [], True: []}, {False: [], True: []}
    for i in range(2 * args.iters):  # the two variants alternate, so drifts of the host hit both alike
        separate = i % 2 == 1
        sync()
        t0 = time.perf_counter()
        step(separate)
        issues[separate].append(time.perf_counter() - t0)
        sync()
        walls[separate].append(time.perf_counter() - t0)
    name = f"heads {args.heads}{' NCHW' if args.nchw else ''}{' channels-last' if args.channels_last else ''}{' + backbone compiled' if args.backbone else ''}{f' {args.mode}' if args.mode else ''}{f' attention={args.attention}' if args.attention else ''}"
    for separate in (True, False):
        w, iss = walls[separate], issues[separate]
        print(
            f"RESULT {name}, {'separate' if separate else 'paired'} DINOv2 passes: disc step "
            f"{1000 * statistics.median(w):.1f} ms (issue {1000 * statistics.median(iss):.1f} ms, "
            f"min {1000 * min(w):.1f})",
            flush=True,
        )
    if args.kernels and cuda:
        total, rows = costliest_kernels(lambda: step(False), args.kernels)
        print(f"KERNELS of one step (paired), {total:.1f} ms of GPU time:")
        for row in rows:
            print(f"  {row}")
    print(
        f"peak {torch.cuda.max_memory_allocated() / 2**30 if cuda else float('nan'):.1f} GiB, "
        f"warm-up {warm:.0f} s, {torch.cuda.get_device_name() if cuda else 'cpu'}",
        flush=True,
    )


if __name__ == "__main__":
    main()
