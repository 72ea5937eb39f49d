"""Stable Diffusion 3 / 3.5 (MMDiT, flow matching) adapter (spec §2, §11).

Conditioning: CLIP-L and CLIP-G penultimate hidden states, concatenated on channels and zero-padded
to the T5 width, followed along the sequence by T5 (77 tokens in training, spec §11) -> (B, 154, 4096);
pooled: the two CLIP projected pooled outputs concatenated -> (B, 2048). The unconditional branch is
the empty prompt. The transformer receives ``1000·σ``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..schedules import FlowMatchingSchedule
from .base import Cond, TeacherAdapter, resolve_teacher_dir

logger = logging.getLogger(__name__)

REQUIRED = (
    "transformer/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "text_encoder_3/config.json",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "scheduler/scheduler_config.json",
)


class SD3Adapter(TeacherAdapter):
    """SD3.5 Medium and Large (the difference is the transformer config read from the folder)."""

    family = "sd3"

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.root = resolve_teacher_dir(cfg.paths.pretrained_model, REQUIRED)
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(self.root, subfolder="scheduler")
        self.schedule = FlowMatchingSchedule(
            shift=sched.config.shift,
            use_dynamic_shifting=sched.config.use_dynamic_shifting,
            num_train_timesteps=sched.config.num_train_timesteps,
        )
        self.transformer_cls = SD3Transformer2DModel
        self.transformer_config = SD3Transformer2DModel.load_config(self.root / "transformer")
        self._text_side(
            [(CLIPTokenizer, "tokenizer"), (CLIPTokenizer, "tokenizer_2"), (T5TokenizerFast, "tokenizer_3")],
            [
                (CLIPTextModelWithProjection, "text_encoder"),
                (CLIPTextModelWithProjection, "text_encoder_2"),
                (T5EncoderModel, "text_encoder_3"),
            ],
        )
        self._load_vae(AutoencoderKL)

    def blocks(self, net):
        return list(net.transformer_blocks)

    def forward(self, net: nn.Module, x, level, cond: Cond):
        out = net(
            hidden_states=x,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled"],
            timestep=self.schedule.timesteps_for_model(level),
            return_dict=False,
        )[0]
        return out.float()

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Cond:
        tok_l, tok_g, tok_t5 = self.tokenizers
        enc_l, enc_g, enc_t5 = self.text_encoders
        clip_states, pooled = [], []
        for tok, enc in ((tok_l, enc_l), (tok_g, enc_g)):
            ids = tok(
                prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
            out = enc(ids.to(self.device), output_hidden_states=True)
            clip_states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        ids = tok_t5(
            prompts,
            padding="max_length",
            max_length=self.cfg.model.t5_max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        t5 = enc_t5(ids.to(self.device))[0]
        clip = torch.cat(clip_states, dim=-1)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "prompt_embeds": torch.cat([clip.to(t5.dtype), t5], dim=-2),
            "pooled": torch.cat(pooled, dim=-1),
        }

    def latent_shape(self, resolution):
        side = self._check_resolution(resolution, self.vae_scale * self.transformer_config["patch_size"])
        return (self.vae.config.latent_channels, side, side)
