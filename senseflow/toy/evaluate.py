"""Sampling the teacher and the students on the evaluation prompts, and scoring the images.

The students are sampled by :func:`senseflow.inference.generate` (the x0 sampler at the recipe's four
anchors, one conditional pass per step); the teacher by the same seeding with classifier-free guidance
and the Euler sampler, on the scheduler's levels ``S_k(1 − i/N)`` (``k`` its shift; for N = 4 these are
exactly the recipe's anchor levels). Prompt ``i`` gets the same initial noise in every method.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..inference import SEED_STRIDE, build_inference, generate, latent_shape, load_generator
from ..sampling import inference_levels, per_sample_noise, run_sampler
from ..schedules import shift_sigma
from .data import Split, images_to_tensor, load_split
from .evalnets import (
    CellClassifier,
    FeatureNet,
    attribute_scores,
    extract_features,
    fd_metrics,
    predict_cells,
)
from .presets import RESOLUTION, Preset
from .teacher import BASE_CONFIG, toy_overrides

logger = logging.getLogger(__name__)

EVAL_SEED = 20250601
"""Seed of the evaluation noise (prompt i: ``EVAL_SEED·1000003 + i``, as the inference scripts)."""


@dataclass
class EvalContext:
    """Everything the evaluation of one method needs (built once per process)."""

    preset: Preset
    device: torch.device
    cfg: object
    adapter: object
    featnet: FeatureNet
    classifier: CellClassifier
    split: Split
    real_features: np.ndarray

    @property
    def prompts(self) -> list[str]:
        return self.split.captions


def load_eval_nets(out: Path, device: torch.device) -> tuple[FeatureNet, CellClassifier]:
    """The feature net and the cell classifier saved by their stages."""
    featnet, classifier = FeatureNet(), CellClassifier()
    featnet.load_state_dict(torch.load(out / "featnet" / "featnet.pt", weights_only=True))
    classifier.load_state_dict(torch.load(out / "classifiers" / "classifier.pt", weights_only=True))
    return featnet.to(device).eval(), classifier.to(device).eval()


def build_context(out: Path, preset: Preset, device: torch.device) -> EvalContext:
    """Adapter of the toy teacher (text encoders, VAE, schedule), evaluation nets, real features."""
    cfg, adapter = build_inference(BASE_CONFIG, out / "teacher", device, torch.float32, toy_overrides())
    featnet, classifier = load_eval_nets(out, device)
    split = load_split(out / "data" / "eval")
    real = extract_features(featnet, images_to_tensor(split.images))
    return EvalContext(preset, device, cfg, adapter, featnet, classifier, split, real)


def teacher_levels(num_steps: int, shift: float) -> torch.Tensor:
    """The Euler sampler's levels ``S_shift(1 − i/N)``, i = 0..N−1 (the last step goes to σ = 0)."""
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return shift_sigma(u, shift).float()


GUIDANCE_SEED = 20251122
"""Seed of the per-prompt guidance scales of a guidance range (prompt i: ``GUIDANCE_SEED + i``)."""


def guidance_scales(cfg_scale: float | tuple[float, float], start: int, n: int) -> torch.Tensor:
    """The CFG scale of prompts ``start .. start+n-1``: ``cfg_scale``, or for a range ``(lo, hi)`` a draw of
    U(lo, hi) per prompt, seeded by its index (the same whatever the batch size)."""
    if isinstance(cfg_scale, (int, float)):
        return torch.full((n,), float(cfg_scale))
    lo, hi = map(float, cfg_scale)
    u = [
        float(torch.rand((), generator=torch.Generator().manual_seed(GUIDANCE_SEED + start + i)))
        for i in range(n)
    ]
    return lo + (hi - lo) * torch.tensor(u)


@torch.no_grad()
def sample_guided(
    ctx: EvalContext,
    net,
    levels: torch.Tensor,
    cfg_scale: float | tuple[float, float],
    sampler: str = "euler",
) -> torch.Tensor:
    """The teacher with classifier-free guidance on every evaluation prompt: (N, 3, R, R) in [-1, 1].
    ``cfg_scale``: one scale, or a range ``(lo, hi)`` drawn from per prompt (:func:`guidance_scales`)."""
    adapter, out = ctx.adapter, []
    prompts = ctx.prompts
    for start in range(0, len(prompts), ctx.preset.eval_batch):
        chunk = prompts[start : start + ctx.preset.eval_batch]
        n = len(chunk)
        gens = [
            torch.Generator(ctx.device).manual_seed(EVAL_SEED * SEED_STRIDE + start + i) for i in range(n)
        ]
        noise_fn = per_sample_noise(gens)
        noise = noise_fn((n, *latent_shape(adapter, RESOLUTION, RESOLUTION)))
        cond, uncond = adapter.encode_prompts(chunk), adapter.empty_cond(n)
        scale = guidance_scales(cfg_scale, start, n).to(ctx.device)

        def pred_fn(x, level, cond=cond, uncond=uncond, scale=scale):
            return adapter.guided(net, x, level, cond, uncond, scale)

        x0 = run_sampler(sampler, pred_fn, noise, levels.to(ctx.device), adapter.schedule, noise_fn)
        out.append(adapter.decode_latents(x0).float().clamp(-1, 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_generator(ctx: EvalContext, net, num_steps: int = 4) -> torch.Tensor:
    """A generator (or the teacher without guidance) with the x0 sampler at the recipe's anchors."""
    levels = inference_levels(ctx.cfg, ctx.adapter.schedule, num_steps)
    prompts, out = ctx.prompts, []
    for start in range(0, len(prompts), ctx.preset.eval_batch):
        chunk = prompts[start : start + ctx.preset.eval_batch]
        idx = list(range(start, start + len(chunk)))
        images = generate(ctx.adapter, net, chunk, idx, EVAL_SEED, levels, "x0", RESOLUTION, RESOLUTION)
        out.append(images.cpu())
    return torch.cat(out)


def load_net(ctx: EvalContext, checkpoint: Path):
    """A transformer in fp32 for evaluation: a ``ckpt_model_*.pth`` or the teacher's ``transformer/``."""
    return load_generator(ctx.adapter, checkpoint, torch.float32)


def score(
    ctx: EvalContext, images: torch.Tensor, objects: list[list[dict]] | None = None
) -> dict[str, float]:
    """Frechet distance to the real evaluation images and attribute accuracy for the evaluation prompts."""
    feats = extract_features(ctx.featnet, images)
    out = fd_metrics(feats, ctx.real_features)
    out.update(attribute_scores(predict_cells(ctx.classifier, images), objects or ctx.split.objects))
    return out


def save_images(images: torch.Tensor, path: Path) -> None:
    """(N, 3, R, R) in [-1, 1] -> ``path`` (.npz of uint8 (N, R, R, 3))."""
    from .data import tensor_to_images

    np.savez_compressed(path, images=tensor_to_images(images))


def load_images(path: Path) -> np.ndarray:
    """The uint8 images written by :func:`save_images`."""
    with np.load(path) as f:
        return f["images"]


def grid(images: np.ndarray, cols: int = 8, scale: int = 2) -> Image.Image:
    """A contact sheet of (N, R, R, 3) uint8 images, each enlarged ``scale`` times (nearest)."""
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    pad = 2
    sheet = Image.new(
        "RGB", (pad + cols * (w * scale + pad), pad + rows * (h * scale + pad)), (255, 255, 255)
    )
    for i, arr in enumerate(images):
        im = Image.fromarray(arr).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        sheet.paste(im, (pad + (i % cols) * (w * scale + pad), pad + (i // cols) * (h * scale + pad)))
    return sheet


def comparison_grid(rows: list[tuple[str, np.ndarray]], scale: int = 2, label_w: int = 190) -> Image.Image:
    """One row per method (label, (K, R, R, 3) uint8), the same K prompts in every row."""
    k, h, w, _ = rows[0][1].shape
    pad = 2
    sheet = Image.new(
        "RGB", (label_w + pad + k * (w * scale + pad), pad + len(rows) * (h * scale + pad)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (h * scale + pad)
        for j, line in enumerate(_wrap(label, 30)[:3]):
            draw.text((4, y + 4 + 12 * j), line, fill=(0, 0, 0))
        for i, arr in enumerate(images[:k]):
            im = Image.fromarray(arr).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            sheet.paste(im, (label_w + pad + i * (w * scale + pad), y))
    return sheet


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines
