"""Stable Diffusion XL (ε-prediction UNet, DDPM) adapter, with DMD2's bottleneck classifier (spec §9).

* Conditioning: penultimate hidden states of both CLIP encoders concatenated (B, 77, 2048), the second
  encoder's projected pooled output (B, 1280), and micro-conditioning ``time_ids`` = (H, W, 0, 0, H, W)
  at the training resolution. The unconditional branch is all zeros (DMD2 convention).
* The UNet receives the integer DDPM step ``t``; ``ᾱ_t`` comes from the teacher's scheduler config.
* DMD2 (R5): the fake UNet gains a classification mode — embeddings, input conv, down blocks and mid
  block only — whose bottleneck feeds a small convolutional head (:class:`DMD2ClassifierHead`).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..schedules import DDPMSchedule
from .base import Cond, TeacherAdapter, resolve_teacher_dir

logger = logging.getLogger(__name__)

REQUIRED = (
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer",
    "tokenizer_2",
    "scheduler/scheduler_config.json",
)


class DMD2ClassifierHead(nn.Module):
    """DMD2's GAN head on the UNet bottleneck (spec §9.6): stride-2 4x4 convolutions with GroupNorm(32)
    and SiLU down to 4x4, a 4x4 stride-4 convolution to 1x1 (+ GN, SiLU), then a 1x1 convolution to one
    logit. At SDXL size (1280 x 32 x 32) that is exactly DMD2's 32 -> 16 -> 8 -> 4 -> 1 stack."""

    fsdp_compute_fp32 = True  # the head runs in fp32 (spec §9.6), also under FSDP2 mixed precision

    def __init__(self, channels: int, size: int):
        super().__init__()
        if size < 4 or 2 ** round(math.log2(size)) != size:
            raise ValueError(f"DMD2 head needs a power-of-two bottleneck of at least 4, got {size}")
        layers: list[nn.Module] = []
        for _ in range(int(math.log2(size // 4))):
            layers += [nn.Conv2d(channels, channels, 4, 2, 1), nn.GroupNorm(32, channels), nn.SiLU()]
        layers += [nn.Conv2d(channels, channels, 4, 4, 0), nn.GroupNorm(32, channels), nn.SiLU()]
        layers.append(nn.Conv2d(channels, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, C, s, s) bottleneck -> (B,) logits, in float32."""
        with torch.autocast(feats.device.type, enabled=False):
            return self.net(feats.float()).flatten(1).mean(1)


def _unet_class():
    """``UNet2DConditionModel`` with a ``bottleneck`` method (DMD2's classification mode)."""
    from diffusers import UNet2DConditionModel

    class UNetWithBottleneck(UNet2DConditionModel):
        def bottleneck(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
            """Time/added embeddings, input conv, down blocks and mid block; returns the mid-block output."""
            emb = self.time_embedding(self.get_time_embed(sample=sample, timestep=timestep), None)
            aug = self.get_aug_embed(
                emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
            )
            emb = emb + aug if aug is not None else emb
            h = self.conv_in(sample)
            for block in self.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
                else:
                    h, _ = block(hidden_states=h, temb=emb)
            if getattr(self.mid_block, "has_cross_attention", False):
                return self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
            return self.mid_block(h, emb)

    UNetWithBottleneck.__name__ = "UNet2DConditionModel"
    return UNetWithBottleneck


class SDXLAdapter(TeacherAdapter):
    """SDXL base 1.0 teacher, generator and fake score (UNets)."""

    family = "sdxl"
    net_subfolder = "unet"

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        from diffusers import AutoencoderKL, EulerDiscreteScheduler
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.root = resolve_teacher_dir(cfg.paths.pretrained_model, REQUIRED)
        sched = EulerDiscreteScheduler.from_pretrained(self.root, subfolder="scheduler").config
        if sched.prediction_type != "epsilon":
            logger.warning(
                "SDXL scheduler prediction_type is %s; the recipe assumes epsilon", sched.prediction_type
            )
        self.schedule = DDPMSchedule(
            sched.beta_start, sched.beta_end, sched.beta_schedule, sched.num_train_timesteps
        )
        self.transformer_cls = _unet_class()
        self.transformer_config = self.transformer_cls.load_config(self.root / "unet")
        self._text_side(
            [(CLIPTokenizer, "tokenizer"), (CLIPTokenizer, "tokenizer_2")],
            [(CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")],
        )
        self._load_vae(AutoencoderKL)
        res = cfg.train.resolution
        self.time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=self.device)

    # --- networks -----------------------------------------------------------------------------------

    def blocks(self, net):
        blocks = [*net.down_blocks, net.mid_block, *net.up_blocks]
        if hasattr(net, "cls_head"):
            blocks.append(net.cls_head)
        return blocks

    def unit_starts(self, net):
        # the classifier's bottleneck runs the down blocks and the mid block only
        return [net.up_blocks[0]]

    def fake_extras(self) -> dict[str, nn.Module]:
        """DMD2's classifier head on the fake UNet (R5), when the recipe uses it."""
        if not self.cfg.distill.classifier.enabled:
            return {}
        return {"cls_head": DMD2ClassifierHead(*self.bottleneck_shape(self.cfg.train.resolution))}

    def build_networks(self):
        generator, fake, teacher = super().build_networks()
        if self.cfg.distill.classifier.enabled:
            from ..parallel import register_forward_method

            register_forward_method(fake, "bottleneck")  # all-gathers the root's weights for it, casts inputs
        return generator, fake, teacher

    def bottleneck_shape(self, resolution: int) -> tuple[int, int]:
        """Channels and side of the mid-block output for a square latent of that resolution."""
        side = self.latent_shape(resolution)[1] // 2 ** (
            len(self.transformer_config["block_out_channels"]) - 1
        )
        return self.transformer_config["block_out_channels"][-1], side

    def forward(self, net: nn.Module, x, level, cond: Cond):
        out = net(
            x,
            level.long(),
            encoder_hidden_states=cond["prompt_embeds"],
            added_cond_kwargs={"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]},
            return_dict=False,
        )[0]
        return out.float()

    def bottleneck(self, net: nn.Module, x, level, cond: Cond) -> torch.Tensor:
        """DMD2's classification mode of a (fake) UNet: the mid-block output (B, C, s, s)."""
        return net.bottleneck(
            x,
            level.long(),
            encoder_hidden_states=cond["prompt_embeds"],
            added_cond_kwargs={"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]},
        )

    # --- conditioning -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Cond:
        states, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            ids = tok(
                prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
            out = enc(ids.to(self.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        return {"prompt_embeds": torch.cat(states, dim=-1), "pooled": pooled}

    def complete_cond(self, text: Cond, batch: int) -> Cond:
        """The micro-conditioning time ids of ``train.resolution`` (spec §9.2)."""
        return {**text, "time_ids": self.time_ids.expand(batch, -1).to(text["pooled"].dtype)}

    def empty_cond(self, batch: int) -> Cond:
        """All-zero text and pooled embeddings with the usual time ids (DMD2's unconditional branch)."""
        cond = super().empty_cond(batch)
        return {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in cond.items()}

    def latent_shape(self, resolution):
        n_down = len(self.transformer_config["block_out_channels"]) - 1
        side = self._check_resolution(resolution, self.vae_scale * 2**n_down)
        return (self.vae.config.latent_channels, side, side)
