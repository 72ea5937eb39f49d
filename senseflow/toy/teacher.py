"""The toy SD3-family teacher: its VAE and transformer are trained here, its text encoders are random.

The teacher folder has the diffusers layout of ``stabilityai/stable-diffusion-3.5-medium`` (the layout of
:func:`senseflow.data.tiny.build_tiny_sd3`, sized by the preset), so the SD3 adapter and the SD3.5
recipe read it unchanged:

* ``tokenizer``/``tokenizer_2``/``tokenizer_3``: the hand-made CLIP BPE and T5 Unigram tokenizers of
  :mod:`senseflow.data.tiny` (every caption word is one token);
* ``text_encoder``/``_2``/``_3``: 2-layer CLIP-L, CLIP-G (width 32 each) and T5 (width 64) encoders with
  **random, fixed weights** (seeded): they are never trained, yet give every caption a distinct,
  deterministic embedding (token identities and positions), which the transformer learns to read;
* ``vae``: an ``AutoencoderKL`` with 3 levels (x4 down-sampling: 64 px -> 16x16x8 latents; SD3's x8 with
  16 channels trains far too slowly on a CPU to draw sharp shapes), **trained here** as an autoencoder (L1 + L2 reconstruction, a small KL term) on the training split; its
  ``scaling_factor``/``shift_factor`` are the measured 1/std and mean of the latents;
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with SD3.5's shift 3, so the recipe's anchor
  indices ``[999, 749, 499, 249]`` are its σ = 1, 0.9, 0.75, 0.5 (shift 1, which SD3's resolution rule
  would suggest at 64 px, gave a worse teacher for the same CPU time: attribute accuracy 15-20 % instead
  of 27 %; the composition is decided at high noise, where shift 3 puts the training);
* ``transformer``: an ``SD3Transformer2DModel`` (MMDiT, patch 2, RMS q/k norm, dual attention in the first
  half of the blocks as SD3.5 Medium) **trained here** with the rectified-flow loss ``|v̂ − (ε − x₀)|²``
  at logit-normal noise levels on the scheduler's training table (SD3's training distribution, the
  same draw as the engine's fake-score loss) and the caption replaced by the empty prompt 10 % of the time,
  so that classifier-free guidance works; the saved weights are an EMA.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..schedules import sample_table_index
from .data import images_to_tensor
from .presets import RESOLUTION, T5_MAX_LENGTH, TEXT_WIDTHS, Preset

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BASE_CONFIG = REPO / "configs" / "SD35" / "sd35_senseflow.yaml"
"""The SD3.5 Medium SenseFlow recipe: the base of every toy config (teacher training encodes prompts
through its adapter, distillation runs it with paths and sizes overridden)."""
LATENT_CHANNELS = 8
CAPTION_DROPOUT = 0.1
SHIFT = 3.0
"""The scheduler's shift (see the module docstring)."""
KL_WEIGHT = 1e-6


def toy_overrides() -> list[str]:
    """Config overrides shared by training, distillation and inference of the toy teacher. No
    ``torch.compile`` here: at 8 x 8 tokens its compilation costs more than it saves on the CPU presets;
    the ``gpu`` preset turns it on for the teacher's training (``Preset.teacher_compile``; the
    distillation runs can compile too, ``Preset.distill_compile``, which pays only in long runs)."""
    return [
        f"model.t5_max_length={T5_MAX_LENGTH}",
        "model.gradient_checkpointing=false",
        "model.compile_blocks=false",
        "discriminator.compile_heads=false",
    ]


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# --- VAE ------------------------------------------------------------------------------------------------


def build_vae(channels: tuple[int, ...], seed: int):
    """A randomly initialised ``AutoencoderKL`` with one level per channel entry (3: 64 px -> 16x16x8),
    started with a narrow posterior (log-variance -6)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=tuple(channels),
            layers_per_block=1,
            norm_num_groups=4 if min(channels) < 16 else 8,
            latent_channels=LATENT_CHANNELS,
            sample_size=RESOLUTION,
            scaling_factor=1.0,
            shift_factor=0.0,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        with torch.no_grad():
            vae.encoder.conv_out.bias[LATENT_CHANNELS:] = -6.0
    return vae


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_vae(images: np.ndarray, preset: Preset, device: torch.device, seed: int):
    """Train the VAE as an autoencoder on (N, R, R, 3) uint8 images; returns the model (eval mode)."""
    vae = build_vae(preset.vae_channels, seed).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=preset.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, preset.vae_steps, max(preset.vae_steps // 20, 1))
    )
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device).manual_seed(seed + 1)
    data = torch.from_numpy(images).to(device)  # uint8 on the device: no host copy per step
    t0 = time.time()
    for step in range(preset.vae_steps):
        idx = torch.randint(0, len(data), (preset.vae_batch,), generator=gen).to(device)
        x = data[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with autocast(device):
            post = vae.encode(x).latent_dist
            y = vae.decode(post.sample(generator=noise_gen)).sample.float()
        rec = F.l1_loss(y, x) + F.mse_loss(y, x)
        loss = rec + KL_WEIGHT * post.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(preset.vae_steps // 10, 1) == 0:
            logger.info(
                "vae: step %d/%d reconstruction %.4f (%.1fs)",
                step + 1,
                preset.vae_steps,
                float(rec),
                time.time() - t0,
            )
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_posterior(vae, images: np.ndarray, device: torch.device, batch: int = 256):
    """Posterior means and standard deviations (N, 8, 16, 16) float32 on the CPU (unscaled)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        x = images_to_tensor(images[i : i + batch]).to(device, vae.dtype)
        post = vae.encode(x).latent_dist
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def calibrate_vae(vae, means: torch.Tensor) -> tuple[float, float]:
    """Set the VAE's ``shift_factor`` (mean) and ``scaling_factor`` (1/std) from posterior means."""
    shift = float(means.mean())
    scale = float(1.0 / (means - shift).std())
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    return scale, shift


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, device: torch.device, batch: int = 256) -> torch.Tensor:
    """Encode (posterior mean) and decode; (N, 3, R, R) float32 in [-1, 1] on the CPU."""
    out = []
    for i in range(0, len(images), batch):
        x = images_to_tensor(images[i : i + batch]).to(device, vae.dtype)
        out.append(vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [-1, 1]."""
    mse = float(((a - b) / 2).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


# --- teacher folder -------------------------------------------------------------------------------------


def latent_side(preset: Preset) -> int:
    """Side of the latent grid (the VAE halves the image once per level but the first)."""
    return RESOLUTION // 2 ** (len(preset.vae_channels) - 1)


def transformer_config(preset: Preset) -> dict:
    """The ``SD3Transformer2DModel`` config of the preset (16x16x8 latents, patch 2: 64 image tokens)."""
    return dict(
        sample_size=latent_side(preset),
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=preset.depth,
        attention_head_dim=preset.width // preset.heads,
        num_attention_heads=preset.heads,
        joint_attention_dim=TEXT_WIDTHS[2],
        caption_projection_dim=preset.width,
        pooled_projection_dim=TEXT_WIDTHS[0] + TEXT_WIDTHS[1],
        pos_embed_max_size=latent_side(preset),
        qk_norm="rms_norm",
        dual_attention_layers=tuple(range(preset.depth // 2)),
    )


def build_teacher_folder(out: Path, vae, preset: Preset, seed: int) -> Path:
    """Write the complete teacher folder with a randomly initialised transformer (trained afterwards)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from ..data.tiny import _tiny_clip, _tiny_t5, save_sd3_folder, sd3_tokenizers

    clip_tok, t5_tok = sd3_tokenizers(out)
    w_l, w_g, w_t5 = TEXT_WIDTHS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        text_encoder = _tiny_clip(CLIPTextModelWithProjection, clip_tok, w_l, "quick_gelu", projection=w_l)
        torch.manual_seed(seed + 2)
        text_encoder_2 = _tiny_clip(CLIPTextModelWithProjection, clip_tok, w_g, "gelu", projection=w_g)
        torch.manual_seed(seed + 3)
        text_encoder_3 = _tiny_t5(t5_tok, d_model=w_t5)
        torch.manual_seed(seed + 4)
        transformer = SD3Transformer2DModel(**transformer_config(preset))
    encoders = (text_encoder, text_encoder_2, text_encoder_3)
    save_sd3_folder(out, transformer, vae.to("cpu"), encoders, (clip_tok, t5_tok), SHIFT)
    return out


def count_parameters(module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def encode_captions(adapter, captions: list[str], dtype: torch.dtype, chunk: int = 1024) -> dict:
    """Every caption encoded once by the adapter (the text encoders are frozen), stored in ``dtype`` on
    the adapter's device: a training step then indexes rows instead of running three text encoders."""
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(captions), chunk):
        for k, v in adapter.encode_prompts(captions[i : i + chunk]).items():
            parts.setdefault(k, []).append(v.to(dtype) if v.is_floating_point() else v)
    return {k: torch.cat(v) for k, v in parts.items()}


def trainee_and_ema(net, compile_blocks: Callable | None = None) -> tuple:
    """The transformer to train and its EMA copy (frozen, eval mode). ``compile_blocks(net)``: the blocks
    to ``torch.compile`` in the trained one; the copy is taken first, so the EMA (the saved weights) stays
    an eager module with the diffusers state-dict keys."""
    from ..parallel import compile_modules

    ema = copy.deepcopy(net).eval().requires_grad_(False)
    if compile_blocks is not None:
        compile_modules(compile_blocks(net))
    return net, ema


def train_teacher(
    folder: Path,
    means: torch.Tensor,
    stds: torch.Tensor,
    captions: list[str],
    preset: Preset,
    device: torch.device,
    seed: int,
) -> dict:
    """Train the folder's transformer with rectified flow and write its EMA weights back; returns stats.

    Prompts are encoded by the SD3 adapter of the recipe (the encoding the engine uses), latents are
    posterior samples scaled and shifted as the adapter's ``encode_images`` does."""
    from diffusers import SD3Transformer2DModel

    from ..inference import build_inference

    _, adapter = build_inference(BASE_CONFIG, folder, device, torch.float32, toy_overrides())
    schedule = adapter.schedule
    cuda = device.type == "cuda"
    compiled = preset.teacher_compile and cuda
    net, ema = trainee_and_ema(
        SD3Transformer2DModel.from_pretrained(folder / "transformer").to(device).train(),
        adapter.blocks if compiled else None,
    )
    n_params = count_parameters(net)
    logger.info(
        "teacher transformer: %.2fM parameters (%s)%s",
        n_params / 1e6,
        preset.params_label,
        ", blocks compiled" if compiled else "",
    )
    net_params, ema_params = list(net.parameters()), list(ema.parameters())
    # fused: one kernel for every parameter's update (the step is bound by launches, Preset.teacher_compile)
    opt = torch.optim.AdamW(net_params, lr=preset.teacher_lr, weight_decay=0.0, fused=True if cuda else None)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, preset.teacher_steps, preset.teacher_warmup)
    )
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device).manual_seed(seed + 1)
    means, stds = means.to(device), stds.to(device)
    scale, shift = adapter.scaling_factor, adapter.shift_factor
    empty = adapter.empty_cond(1)
    all_cond = encode_captions(adapter, captions, torch.bfloat16 if device.type == "cuda" else torch.float32)
    batch = preset.teacher_batch
    t0, losses = time.time(), []
    for step in range(preset.teacher_steps):
        idx = torch.randint(0, len(captions), (batch,), generator=gen).to(device)
        z = means[idx]
        z = z + stds[idx] * torch.randn(z.shape, generator=noise_gen, device=device)
        x0 = (z - shift) * scale
        cond = {k: v[idx].to(empty[k].dtype) for k, v in all_cond.items()}
        drop = (torch.rand(batch, generator=gen) < CAPTION_DROPOUT).to(device)
        cond = {
            k: torch.where(drop.reshape(-1, *[1] * (v.dim() - 1)), empty[k].expand_as(v), v)
            for k, v in cond.items()
        }
        levels = schedule.table_level(
            sample_table_index(batch, "logit_normal", 0, 999, noise_gen, device), "descending"
        )
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)
        x_t = schedule.add_noise(x0, noise, levels)
        with autocast(device):
            pred = adapter.forward(net, x_t, levels, cond)
        loss = F.mse_loss(pred.float(), schedule.pred_target(x0, noise, levels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(preset.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, net_params, 1 - decay)
        losses.append(loss.detach())  # no host sync per step
        if (step + 1) % max(preset.teacher_steps // 20, 1) == 0:
            logger.info(
                "teacher: step %d/%d loss %.4f (mean of last %d), %.1fs",
                step + 1,
                preset.teacher_steps,
                float(torch.stack(losses[-50:]).mean()),
                min(len(losses), 50),
                time.time() - t0,
            )
    seconds = time.time() - t0
    losses = [float(v) for v in torch.stack(losses[-50:]).cpu()]
    tmp = folder / "transformer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ema.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder / "transformer")
    tmp.rename(folder / "transformer")
    return {
        "parameters": n_params,
        "steps": preset.teacher_steps,
        "batch": batch,
        "final_loss": float(np.mean(losses[-50:])),
        "train_seconds": seconds,
        "samples_per_second": preset.teacher_steps * batch / max(seconds, 1e-9),
    }
