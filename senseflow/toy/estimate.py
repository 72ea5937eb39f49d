"""A time estimate of a preset on one GPU, from counted FLOPs and stated throughput assumptions.

FLOPs per image of every network (transformer forward with the real token count, VAE encode/decode,
evaluation nets) are counted with ``torch.utils.flop_counter`` on the CPU; stage totals follow from the
preset's step counts (training = 3x forward). The time of a stage is ``FLOPs / throughput`` plus a fixed
cost per optimiser step / engine iteration / sampler step (kernel launches and Python: these models are
small, so that term matters), plus the measured CPU time of rendering the data, divided among processes.
The same FLOP totals divided by a run's measured stage times give the throughput that run achieved,
which the report shows next to the estimate.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .presets import RESOLUTION, T5_MAX_LENGTH, TEXT_WIDTHS, Preset

logger = logging.getLogger(__name__)

H100_TFLOPS = 100.0
"""Assumed sustained bf16 throughput on an H100 for these narrow networks (~10 % of the dense peak)."""
OVERHEAD_S = {"train_step": 0.015, "engine_iter": 0.060, "sample_step": 0.005, "net_step": 0.003}
"""Assumed fixed GPU cost (launches, Python, optimiser) per optimiser step, engine iteration, sampler
step of one evaluation batch, and evaluation-net training step."""
RENDER_S_PER_IMAGE = 0.6e-3
"""Measured CPU time of rendering one scene (128 px drawn, box-filtered to 64 px), one process."""
PNG_S_PER_IMAGE = 1.0e-3
"""CPU time of writing one engine PNG."""
TEXT_TOKENS = 77 + T5_MAX_LENGTH
ENGINE_FWD_PER_SAMPLE = 5.9
"""Transformer forward-equivalents per sample per engine iteration: fake score forward + backward (3),
generator forward (1), backward simulation (0.5 x 1.5 anchors), and per generator step (1 in 10) the
generator forward + backward (3), DM teacher CFG pair + fake (3), ISG teacher CFG pair + generator
forward + backward (5)."""


def _count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


@functools.lru_cache(maxsize=8)
def flops_per_image(preset: Preset) -> dict[str, float]:
    """Forward FLOPs per image: transformer (64 image + 117 text tokens), VAE encode and decode,
    feature net, cell classifier (9 crops), the discriminator's DINOv2 with its pixel decoder (masked
    image modelling)."""
    from diffusers import SD3Transformer2DModel

    from .evalnets import CROP, CellClassifier, FeatureNet
    from .teacher import LATENT_CHANNELS, build_vae, latent_side, transformer_config
    from .vfm import TOKENS, MaskedImageModel, build_dino, random_mask

    with torch.random.fork_rng(devices=[]):
        net = SD3Transformer2DModel(**transformer_config(preset)).eval()
        vae = build_vae(preset.vae_channels, 0).eval()
        side = latent_side(preset)
        x = torch.randn(1, LATENT_CHANNELS, side, side)
        ctx = torch.randn(1, TEXT_TOKENS, TEXT_WIDTHS[2])
        pooled = torch.randn(1, TEXT_WIDTHS[0] + TEXT_WIDTHS[1])
        t = torch.tensor([500.0])
        img = torch.randn(1, 3, RESOLUTION, RESOLUTION)
        mim = MaskedImageModel(build_dino(preset, 0)).eval()
        uint8 = torch.zeros(1, RESOLUTION, RESOLUTION, 3, dtype=torch.uint8)
        mask = random_mask(1, TOKENS, 0.5, torch.Generator())
        return {
            "transformer": _count(
                lambda: net(
                    hidden_states=x,
                    encoder_hidden_states=ctx,
                    pooled_projections=pooled,
                    timestep=t,
                    return_dict=False,
                )
            ),
            "vae_encode": _count(lambda: vae.encode(img)),
            "vae_decode": _count(lambda: vae.decode(x)),
            "featnet": _count(lambda: FeatureNet()(img)),
            "vfm": _count(lambda: mim(uint8, mask)),
            "classifier": 9 * _count(lambda: CellClassifier()(torch.randn(1, 3, CROP, CROP))),
        }


def stage_work(preset: Preset) -> dict[str, dict[str, float]]:
    """Per stage: ``flops`` and fixed-cost ``steps`` (by kind), and ``cpu_s`` (rendering and PNGs)."""
    f = flops_per_image(preset)
    tr, enc, dec = f["transformer"], f["vae_encode"], f["vae_decode"]
    n_ckpt = preset.distill_iters // preset.save_interval
    ev = preset.num_eval
    eval_batches = -(-ev // preset.eval_batch)
    student_evals = 4 * n_ckpt  # variants x checkpoints
    return {
        "data": {
            "cpu_s": RENDER_S_PER_IMAGE * (preset.num_train + 2 * ev) / max(os.cpu_count() or 1, 1)
            + PNG_S_PER_IMAGE * preset.num_distill_images
        },
        "backbones": {
            "flops": 3 * preset.vfm_steps * preset.vfm_batch * f["vfm"],
            "net_step": preset.vfm_steps,
        },
        "vae": {
            "flops": 3 * preset.vae_steps * preset.vae_batch * (enc + dec)
            + preset.num_train * enc
            + ev * (enc + dec),
            "train_step": preset.vae_steps,
        },
        "teacher": {
            "flops": 3 * preset.teacher_steps * preset.teacher_batch * tr,
            "train_step": preset.teacher_steps,
        },
        "featnet": {"flops": 3 * preset.featnet_steps * 64 * f["featnet"], "net_step": preset.featnet_steps},
        "classifiers": {
            "flops": 3 * preset.classifier_steps * 256 * f["classifier"] / 9,
            "net_step": preset.classifier_steps,
        },
        "distill": {
            "flops": 4
            * preset.distill_iters
            * preset.distill_batch
            * (ENGINE_FWD_PER_SAMPLE * tr + 0.5 * enc + 0.35 * dec),
            "engine_iter": 4 * preset.distill_iters,
        },
        "eval": {
            "flops": ev * tr * (2 * preset.teacher_many_steps + 8 + 4 + 4 * student_evals)
            + ev * dec * (3 + student_evals)
            + ev * (f["featnet"] + f["classifier"]) * (6 + student_evals),
            "sample_step": eval_batches * (preset.teacher_many_steps + 4 + 4 + 4 * student_evals),
        },
    }


def estimate_seconds(
    preset: Preset, tflops: float = H100_TFLOPS, overhead: dict[str, float] | None = None
) -> dict[str, float]:
    """Estimated seconds per stage, their ``total``, and ``wall``: the total less the shorter of the two
    sides that run at once on a GPU (the stages that need only the data beside the VAE and teacher,
    :func:`senseflow.toy.pipeline.run_setup_stages`), on a GPU with the given sustained throughput."""
    overhead = overhead or OVERHEAD_S
    out = {}
    for stage, work in stage_work(preset).items():
        s = work.get("cpu_s", 0.0) + work.get("flops", 0.0) / (tflops * 1e12)
        s += sum(overhead[k] * v for k, v in work.items() if k in overhead)
        out[stage] = s
    total = sum(out.values())
    side = min(out["backbones"] + out["featnet"] + out["classifiers"], out["vae"] + out["teacher"])
    out["total"], out["wall"] = total, total - side
    return out


def achieved_tflops(preset: Preset, stage_seconds: dict[str, float]) -> dict[str, float]:
    """Sustained TFLOP/s a run achieved per stage (its counted FLOPs over its measured seconds)."""
    work = stage_work(preset)
    out = {}
    for stage, w in work.items():
        if "flops" in w and stage_seconds.get(stage, 0) > 0:
            out[stage] = w["flops"] / stage_seconds[stage] / 1e12
    return out
