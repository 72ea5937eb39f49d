"""A tiny, randomly initialised SDXL teacher with the layout of ``stabilityai/stable-diffusion-xl-base-1.0``.

Built offline and deterministically (no downloads) from the hand-made CLIP tokenizer of
:mod:`senseflow.data.tiny`.  ``StableDiffusionXLPipeline.from_pretrained(dir)`` loads the folder and
generates 128x128 images (16x16 latents) on the CPU in well under a second per step.

Sizes (mirroring SDXL's structure, not its widths):

* ``text_encoder``: ``CLIPTextModel``, hidden 8; ``text_encoder_2``: ``CLIPTextModelWithProjection``,
  hidden 24, projection 24.  The UNet's ``cross_attention_dim`` 32 = 8 + 24 (penultimate hidden states
  of both encoders, concatenated); its added-condition input 72 = 24 (pooled) + 6 x 8 (``time_ids``).
* ``unet``: two levels (32, 64), one cross-attention level with 1 / 2 transformer layers, ``text_time``
  added embedding.
* ``vae``: ``AutoencoderKL`` with 4 latent channels, factor 8, ``scaling_factor`` 0.13025.
* ``scheduler``: ``EulerDiscreteScheduler`` with SDXL's settings (scaled-linear betas 0.00085..0.012,
  1000 steps, ``steps_offset`` 1, ``leading`` spacing, epsilon prediction).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .tiny import _reinit_zero_outputs, _tiny_clip, _tiny_vae, build_clip_tokenizer, save_tiny_pipeline

logger = logging.getLogger(__name__)

TEXT_ENCODER_HIDDEN = 8
TEXT_ENCODER_2_HIDDEN = 24
TEXT_ENCODER_2_PROJECTION = 24
ADDITION_TIME_EMBED_DIM = 8
SCALING_FACTOR = 0.13025


def build_tiny_sdxl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete, randomly initialised tiny SDXL diffusers directory into ``out_dir``; return its path.

    The weights depend only on ``seed`` (the caller's global torch RNG state is left untouched).
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_clip_tokenizer(out / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")

    # fork_rng: seeding must not disturb the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            norm_num_groups=8,
            cross_attention_dim=TEXT_ENCODER_HIDDEN + TEXT_ENCODER_2_HIDDEN,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=TEXT_ENCODER_2_PROJECTION + 6 * ADDITION_TIME_EMBED_DIM,
        )
        _reinit_zero_outputs(unet)
        torch.manual_seed(seed)
        text_encoder = _tiny_clip(CLIPTextModel, tok, TEXT_ENCODER_HIDDEN, "quick_gelu")  # as CLIP ViT-L
        torch.manual_seed(seed)
        text_encoder_2 = _tiny_clip(  # as OpenCLIP bigG
            CLIPTextModelWithProjection,
            tok,
            TEXT_ENCODER_2_HIDDEN,
            "gelu",
            projection=TEXT_ENCODER_2_PROJECTION,
        )
        torch.manual_seed(seed)
        vae = _tiny_vae(4, SCALING_FACTOR, None, quant_conv=True)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    save_tiny_pipeline(pipe, out, {"tokenizer": build_clip_tokenizer, "tokenizer_2": build_clip_tokenizer})
    logger.info("built tiny SDXL teacher (seed %d) in %s", seed, out)
    return out
