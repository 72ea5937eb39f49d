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

from ..errors import ConfigError
from ..parallel import DTYPE, build_sharded, mixed_precision_policy, read_diffusers_weights
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


def _load_component(cls, root, subfolder: str, dtype: torch.dtype, random_init: bool, device):
    """``from_pretrained`` a component, or build it from its config with random weights."""
    path = root / subfolder
    try:
        if random_init:
            config = (
                cls.load_config(path)
                if hasattr(cls, "load_config")
                else cls.config_class.from_pretrained(path)
            )
            with torch.device(device):
                model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
            return model.to(dtype)
        model = cls.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"paths.pretrained_model: cannot load {subfolder}/ from {root}: {first}") from None
    return model.to(device)


class SD3Adapter(TeacherAdapter):
    """SD3.5 Medium and Large (the difference is the transformer config read from the folder)."""

    family = "sd3"

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.root = resolve_teacher_dir(cfg.paths.pretrained_model, REQUIRED)
        random_init = cfg.model.random_init
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(self.root, subfolder="scheduler")
        self.schedule = FlowMatchingSchedule(
            shift=sched.config.shift,
            use_dynamic_shifting=sched.config.use_dynamic_shifting,
            num_train_timesteps=sched.config.num_train_timesteps,
        )
        self.transformer_cls = SD3Transformer2DModel
        self.transformer_config = SD3Transformer2DModel.load_config(self.root / "transformer")
        te_dtype = DTYPE[cfg.precision.text_encoders]
        self.tokenizers = [
            CLIPTokenizer.from_pretrained(self.root / "tokenizer"),
            CLIPTokenizer.from_pretrained(self.root / "tokenizer_2"),
            T5TokenizerFast.from_pretrained(self.root / "tokenizer_3"),
        ]
        self.text_encoders = [
            _load_component(
                CLIPTextModelWithProjection, self.root, "text_encoder", te_dtype, random_init, self.device
            ),
            _load_component(
                CLIPTextModelWithProjection, self.root, "text_encoder_2", te_dtype, random_init, self.device
            ),
            _load_component(T5EncoderModel, self.root, "text_encoder_3", te_dtype, random_init, self.device),
        ]
        for enc in self.text_encoders:
            enc.requires_grad_(False).eval()
        self.vae = _load_component(
            AutoencoderKL, self.root, "vae", DTYPE[cfg.precision.vae], random_init, self.device
        )
        self.vae.requires_grad_(False).eval()
        if cfg.model.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()
        self.scaling_factor = self.vae.config.scaling_factor
        self.shift_factor = self.vae.config.shift_factor or 0.0
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    # --- networks -----------------------------------------------------------------------------------

    def blocks(self, net):
        return list(net.transformer_blocks)

    def _teacher_state(self) -> dict[str, torch.Tensor] | None:
        """The full teacher transformer weights on rank 0 (None elsewhere)."""
        if not self.info.is_main:
            return None
        if self.cfg.model.random_init:
            with torch.device(self.device):
                return self.transformer_cls.from_config(self.transformer_config).state_dict()
        try:
            return read_diffusers_weights(self.root / "transformer")
        except FileNotFoundError as err:
            raise ConfigError(f"paths.pretrained_model: {err}") from None

    def build_networks(self):
        state = self._teacher_state()
        gc = self.cfg.model.gradient_checkpointing
        compute = self.cfg.precision.compute if self.cfg.precision.fsdp_mixed else "fp32"
        nets = []
        for trainable in (True, True, False):
            nets.append(
                build_sharded(
                    lambda: self.transformer_cls.from_config(self.transformer_config),
                    state,
                    self.info,
                    blocks=self.blocks,
                    dtype=torch.float32 if trainable else DTYPE[self.cfg.precision.teacher],
                    mp_policy=mixed_precision_policy(compute if trainable else self.cfg.precision.teacher),
                    trainable=trainable,
                    gradient_checkpointing=gc and trainable,
                )
            )
        generator, fake, teacher = nets
        teacher.eval()
        return generator, fake, teacher

    def forward(self, net: nn.Module, x, level, cond: Cond):
        out = net(
            hidden_states=x,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled"],
            timestep=self.schedule.timesteps_for_model(level),
            return_dict=False,
        )[0]
        return out.float()

    # --- conditioning and latents -------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
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
        if resolution % (self.vae_scale * self.transformer_config["patch_size"]):
            raise ConfigError(
                f"train.resolution: {resolution} is not a multiple of "
                f"{self.vae_scale * self.transformer_config['patch_size']} (VAE factor x patch size)"
            )
        side = resolution // self.vae_scale
        return (self.vae.config.latent_channels, side, side)

    @torch.no_grad()
    def encode_images(self, images, generator):
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator)
        return ((z - self.shift_factor) * self.scaling_factor).float()

    def decode_latents(self, latents):
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()
